"""The `hf` backend: transformers `generate` on a loaded model.

Prompts are rendered with the tokenizer's chat template (generation prompt appended),
sorted by length so a batch wastes little padding, left-padded (decoder-only models
continue from the right edge), and generated with the KV cache. `n` samples per prompt use
`num_return_sequences`. On CUDA out-of-memory the batch size is halved and the batch
retried. Sampling is seeded per call, so a shard with the same rows and seed reproduces.
"""

from __future__ import annotations

from typing import Any

from . import Completion, SamplingParams


class HFBackend:
    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, max(1, batch_size)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _encode(self, prompts: list[list[dict]]) -> list[list[int]]:
        out = []
        for messages in prompts:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            out.append(list(ids))
        return out

    def generate(self, prompts: list[list[dict]], params: SamplingParams, seed: int) -> list[list[Completion]]:
        import torch

        encoded = self._encode(prompts)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: dict[int, list[Completion]] = {}
        start, batch_size = 0, self.batch_size
        while start < len(order):
            idx = order[start : start + batch_size]
            try:
                outs = self._batch([encoded[i] for i in idx], params, seed + start)
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size //= 2
                torch.cuda.empty_cache()
                continue
            for i, comps in zip(idx, outs):
                results[i] = comps
            start += len(idx)
        return [results[i] for i in range(len(prompts))]

    def _batch(self, batch: list[list[int]], params: SamplingParams, seed: int) -> list[list[Completion]]:
        import torch

        tok = self.tokenizer
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        device = self.model.device
        sample = params.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=params.max_new_tokens, do_sample=sample, num_return_sequences=params.n,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True,
        )
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
        new = out[:, width:].cpu()
        completions: list[list[Completion]] = []
        for row, ids in enumerate(batch):
            comps = []
            for k in range(params.n):
                comps.append(self._completion(new[row * params.n + k].tolist(), len(ids), params))
            completions.append(comps)
        return completions

    def _completion(self, ids: list[int], prompt_tokens: int, params: SamplingParams) -> Completion:
        tok = self.tokenizer
        finish = "length"
        if tok.eos_token_id in ids:
            ids = ids[: ids.index(tok.eos_token_id)]
            finish = "stop"
        ids = [i for i in ids if i != tok.pad_token_id]
        text = tok.decode(ids, skip_special_tokens=True)
        for stop in params.stop:
            if stop and stop in text:
                text, finish = text[: text.index(stop)], "stop"
        return Completion(text.strip(), prompt_tokens, len(ids), finish)

    def option_logprobs(self, prompts: list[list[dict]], prefix: str, options: list[str]) -> list[list[float]]:
        """For each prompt (rendered with the generation prompt, then `prefix` as the start of the
        reply), the log-probability of each option continuing it, summed over the option's tokens.
        Right-padded batches: with causal attention the pads after a row change none of its logits."""
        import torch

        tok = self.tokenizer
        pre = tok.encode(prefix, add_special_tokens=False)
        tails = []
        for option in options:
            full = tok.encode(prefix + option, add_special_tokens=False)
            tails.append(full[len(pre):] if full[:len(pre)] == pre else tok.encode(option, add_special_tokens=False))
        seqs = [(i, k, ids + pre, tail) for i, ids in enumerate(self._encode(prompts)) for k, tail in enumerate(tails)]
        out = [[0.0] * len(options) for _ in prompts]
        device = self.model.device
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            width = max(len(head) + len(tail) for _, _, head, tail in chunk)
            input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (_, _, head, tail) in enumerate(chunk):
                input_ids[row, :len(head) + len(tail)] = torch.tensor(head + tail)
                attention[row, :len(head) + len(tail)] = 1
            with torch.no_grad():
                logps = torch.log_softmax(self.model(input_ids=input_ids.to(device),
                                                     attention_mask=attention.to(device)).logits.float(), -1).cpu()
            for row, (i, k, head, tail) in enumerate(chunk):
                out[i][k] = float(sum(logps[row, len(head) + j - 1, t] for j, t in enumerate(tail)))
        return out

    def close(self) -> None:
        from ..models import release

        release(self.model)
        self.model = None

"""The `hf` backend: transformers `generate` on a loaded model.

Prompts are rendered with the tokenizer's chat template (generation prompt appended),
sorted by length so a batch wastes little padding, left-padded (decoder-only models
continue from the right edge), and generated with the KV cache under `torch.inference_mode`.
Generation stops at the template's end-of-turn token (ChatML's <|im_end|>, Llama-3's
<|eot_id|>, ...) as well as the eos token.

Sampling does not depend on batching: each (prompt, sample) row draws from its own random
stream, seeded from the prompt's own seed (engine.core.seeds derives it from the row id, never from
a position in a batch) and the sample's index, and picks its token by inverse CDF on that stream.
On the CPU in float32, batch size, the order batches run in and halving the batch change speed,
never text (tested with prompts mixed in one batch). On GPUs in bf16 a batch's shape can change the
last bits of the logits, so text is not promised identical across batch sizes there.

A prompt that does not leave `max_new_tokens` of room in the model's context is an error
naming its length, never an indexing crash deep inside the model.

Speed on GPUs (`kv_cache`): with `"static"` (the default on CUDA) the KV cache has a fixed size
(rounded up to a multiple of 256 tokens, so batches of other lengths reuse it), which lets
transformers compile the decode step into CUDA graphs (its auto-compile for static caches, mode
"reduce-overhead"): one graph launch per token instead of hundreds of kernel launches, which is
what bounds a small batch's speed. `"dynamic"` (the default on the CPU) grows the cache per step.
Both compute the same thing; on the CPU in float32 they give the same text (tested). The row
sampler draws every row's random numbers for the whole call up front, on the model's device, so a
decode step never waits for the host. transformers' continuous batching (paged attention) is not
used: its sampler has one global seed, so a prompt's text would depend on its batch neighbours.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from engine.core.errors import RecipeError
from engine.core.seeds import sample_seed
from engine.models.backends import BuildRequest, Completion, SamplingParams, prompt_seeds


class RowSampler:
    """A logits processor that samples each row from its own generator (temperature, top-k, top-p),
    and returns scores where only the sampled token is finite, so greedy selection takes it.

    Row r's k-th token uses the k-th number of its generator's stream (drawn for all steps at once:
    `torch.rand(T)` on a CPU generator gives the numbers T scalar draws would), so a row's text
    depends on its seed only, never on its batch or on how many steps the batch ran."""

    def __init__(self, seeds: list[int], params: SamplingParams, width: int) -> None:
        import torch

        self.params, self.width = params, width
        steps = max(1, params.max_new_tokens)
        self.uniforms = torch.stack(
            [torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in seeds]
        )
        self._on: Any = None  # the uniforms on the scores' device, moved once

    def __call__(self, input_ids, scores):
        import torch

        p = self.params
        if self._on is None or self._on.device != scores.device:
            self._on = self.uniforms.to(scores.device)
        step = min(input_ids.shape[1] - self.width, self._on.shape[1] - 1)
        logits = scores.float() / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > p.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
        u = self._on[:, step]
        cdf = probs.double().cumsum(-1)
        picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).clamp_(max=probs.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, picked, 0.0)


CACHE_BUCKET = 256  # static KV caches are sized in multiples of this, so later batches reuse one
KEPT_CACHES = 4  # static caches kept per backend (a full batch, the last partial one, a long bucket, ...)


@contextmanager
def own_generation_config(model: Any) -> Iterator[None]:
    """For the duration of a `generate` call, the model's generation config holds only bos, eos and
    pad: nothing it ships (repetition_penalty, top_k, temperature, no_repeat_ngram_size, ...) reaches
    the call, so hf text follows the recipe's sampling settings as the vllm and openai backends do."""
    from transformers import GenerationConfig

    shipped = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=getattr(shipped, "bos_token_id", None),
        eos_token_id=getattr(shipped, "eos_token_id", None),
        pad_token_id=getattr(shipped, "pad_token_id", None),
    )
    try:
        yield
    finally:
        model.generation_config = shipped


class HFBackend:
    name = "hf"

    def __init__(
        self, model: Any, tokenizer: Any, batch_size: int = 64, kv_cache: str = "auto", on_close: Any = None
    ) -> None:
        from engine.models.chatmask import stop_token_ids

        self.model, self.tokenizer, self.batch_size = model, tokenizer, max(1, batch_size)
        if kv_cache == "auto":
            kv_cache = "static" if model.device.type == "cuda" else "dynamic"
        self.kv_cache = kv_cache
        self.on_close = on_close  # how to give the model back (a pool keeps it for later stages)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.stop_ids = stop_token_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None))
        self.context = getattr(model.config, "max_position_embeddings", None)
        self._caches: dict[tuple[int, int], Any] = {}  # static KV caches by (rows, size), reused

    def _encode(self, prompts: list[list[dict]]) -> list[list[int]]:
        out = []
        for messages in prompts:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            out.append(list(ids))
        return out

    def _check_lengths(self, encoded: list[list[int]], params: SamplingParams) -> None:
        if not self.context:
            return
        longest = max(range(len(encoded)), key=lambda i: len(encoded[i]))
        n = len(encoded[longest])
        if n + params.max_new_tokens > self.context:
            raise RecipeError.single(
                f"a prompt of {n} tokens (prompt {longest} of this batch of {len(encoded)}) plus max_new_tokens "
                f"{params.max_new_tokens} exceeds the model's context of {self.context} tokens.",
                hint="Lower max_new_tokens, use fewer turns, or drop long rows first (a filter stage's max_turns "
                "or a shorter data file).",
            )

    def generate(
        self, prompts: list[list[dict]], params: SamplingParams, seed: int | Sequence[int]
    ) -> list[list[Completion]]:
        import torch

        if not prompts:
            return []
        per_prompt = prompt_seeds(seed, len(prompts))
        encoded = self._encode(prompts)
        self._check_lengths(encoded, params)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        results: dict[int, list[Completion]] = {}
        start, batch_size = 0, max(1, self.batch_size // params.n)  # batch_size counts rows: prompt x sample
        while start < len(order):
            idx = order[start : start + batch_size]
            seeds = [[sample_seed(per_prompt[i], k) for k in range(params.n)] for i in idx]
            try:
                outs = self._batch([encoded[i] for i in idx], params, seeds)
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

    def _batch(self, batch: list[list[int]], params: SamplingParams, seeds: list[list[int]]) -> list[list[Completion]]:
        """One generate call: each prompt repeated n times (row = prompt x sample), left-padded."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        tok = self.tokenizer
        rows = [ids for ids in batch for _ in range(params.n)]
        width = max(len(ids) for ids in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, width - len(ids) :] = torch.tensor(ids)
            attention[r, width - len(ids) :] = 1
        device = self.model.device
        # Greedy selection over scores the row sampler has already decided (when sampling). transformers
        # fills every unset field of the config passed from `model.generation_config`, so a model that
        # ships repetition_penalty, top_k or temperature would get their processors even for greedy
        # decoding: the model's config is swapped for a minimal one (bos/eos/pad) for the call.
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=self.stop_ids,
            use_cache=True,
            min_new_tokens=params.min_new_tokens or None,
        )
        processors = LogitsProcessorList()
        if params.temperature > 0:
            processors.append(RowSampler([s for row in seeds for s in row], params, width))
        with torch.inference_mode(), own_generation_config(self.model):
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=config,
                logits_processor=processors,
                **self._cache_options(len(rows), width + params.max_new_tokens),
            )
        new = out[:, width:].cpu().tolist()
        return [
            [self._completion(new[b * params.n + k], len(ids), params) for k in range(params.n)]
            for b, ids in enumerate(batch)
        ]

    def _cache_options(self, rows: int, length: int) -> dict:
        """`generate` options for the KV cache: the dynamic default, or a static cache of a bucketed
        size (compiled decode on CUDA, by transformers' auto-compile). Static caches are kept per
        (rows, size) and reset between calls: a short batch after a long one uses the short bucket
        (transformers alone would keep the largest size, and attention reads every slot), and the
        same cache object keeps its compiled graph instead of recording a new one per call."""
        if self.kv_cache != "static":
            return {}
        size = -(-length // CACHE_BUCKET) * CACHE_BUCKET
        if self.context:
            size = min(size, self.context)
        cache = self._caches.pop((rows, size), None)
        if cache is None:
            from transformers import StaticCache

            while len(self._caches) >= KEPT_CACHES:  # the least recently used goes (GPU memory)
                self._caches.pop(next(iter(self._caches)))
            cache = StaticCache(config=self.model.config, max_cache_len=size)
        else:
            cache.reset()
        self._caches[(rows, size)] = cache  # most recently used last
        return {_cache_keyword(): cache}

    def _completion(self, ids: list[int], prompt_tokens: int, params: SamplingParams) -> Completion:
        tok = self.tokenizer
        finish = "length"
        ends = [ids.index(s) for s in self.stop_ids if s in ids]
        if ends:
            ids = ids[: min(ends)]
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
        Right-padded batches: with causal attention the pads after a row change none of its logits.
        Only the option tokens' log-probabilities leave the device (never the full vocabulary)."""
        import torch

        tok = self.tokenizer
        pre = tok.encode(prefix, add_special_tokens=False)
        tails = []
        for option in options:
            full = tok.encode(prefix + option, add_special_tokens=False)
            tails.append(full[len(pre) :] if full[: len(pre)] == pre else tok.encode(option, add_special_tokens=False))
        seqs = [(i, k, ids + pre, tail) for i, ids in enumerate(self._encode(prompts)) for k, tail in enumerate(tails)]
        out = [[0.0] * len(options) for _ in prompts]
        device = self.model.device
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start : start + self.batch_size]
            width = max(len(head) + len(tail) for _, _, head, tail in chunk)
            input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (_, _, head, tail) in enumerate(chunk):
                input_ids[row, : len(head) + len(tail)] = torch.tensor(head + tail)
                attention[row, : len(head) + len(tail)] = 1
            # (row, position, token) of every option token: gathered on the device
            picks = [
                (row, len(head) + j - 1, t) for row, (_, _, head, tail) in enumerate(chunk) for j, t in enumerate(tail)
            ]
            rows_t, pos_t, tok_t = (torch.tensor(col, device=device) for col in zip(*picks))
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
                wanted = logits[rows_t, pos_t].float()  # only the positions an option token is read at
                picked = (wanted.gather(-1, tok_t.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(wanted, -1)).cpu()
            at = 0
            for i, k, _head, tail in chunk:
                out[i][k] = float(sum(picked[at + j] for j in range(len(tail))))
                at += len(tail)
        return out

    def close(self) -> None:
        if self.model is None:
            return
        if self.on_close is not None:
            self.on_close()
        else:
            from engine.models.weights import release

            release(self.model)
        self.model = None
        self._caches.clear()


def build(request: BuildRequest):
    """One HFBackend per device (engine.models.backends.replicas over several): the same completions
    as one device."""
    spec = request.model.spec
    kv_cache = spec.kv_cache if spec else "auto"
    replicas = []
    for device in request.devices():
        m, tok, on_close = request.load(device)
        replicas.append(HFBackend(m, tok, batch_size=request.batch_size, kv_cache=kv_cache, on_close=on_close))
    if len(replicas) == 1:
        return replicas[0]
    from engine.models.backends.replicas import Replicas

    request.log.info("generating on %d devices: %s", len(replicas), ", ".join(str(r.model.device) for r in replicas))
    return Replicas(replicas)


@functools.cache
def _cache_keyword() -> str:
    """generate's keyword for a cache passed in: `cache` in newer transformers 5 releases (where
    `past_key_values` warns that it will go), `past_key_values` before."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"

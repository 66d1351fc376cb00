"""One model on several devices: a generate call's prompts split over the replicas, one thread each.

A prompt's completions depend on its own seed only (the Backend contract), so which replica answers
it changes nothing: a call on N devices returns exactly what one device returns. Prompts are dealt
in contiguous blocks of near-equal size, longest first within each block (the hf backend sorts by
length), and the results are put back in the caller's order.

Threads, not processes: the work is in CUDA kernels and compiled decode graphs, which release the
GIL; each replica has its own model on its own device and its own single thread, which sets that
device once (CUDA graph trees are kept per thread, so a replica must never move between threads).

What replicas can gain: eager decoding is bound by the host launching kernels, and one Python
process drives every replica, so N GPUs give less than N times one. To scale further, run one
process per GPU: the Ray executor does that (workers share a row stage's shards).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from engine.models.backends import Completion, SamplingParams


def _on_device(replica: Any) -> None:
    """A replica's thread starts on its replica's device (a CUDA device made current once)."""
    device = getattr(getattr(replica, "model", None), "device", None)
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        torch.cuda.set_device(device)


def blocks(n: int, parts: int) -> list[range]:
    """`n` items in `parts` contiguous blocks whose sizes differ by at most one (empty ones dropped)."""
    size, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        if end > start:
            out.append(range(start, end))
        start = end
    return out


class Replicas:
    name = "hf"

    def __init__(self, replicas: list[Any]) -> None:
        assert replicas, "at least one replica"
        self.replicas = replicas
        self._threads = [  # one thread per replica, for its whole life, on its device
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"replica{i}", initializer=_on_device, initargs=(r,))
            for i, r in enumerate(replicas)
        ]

    # what stages read from a single hf backend (eval's perplexity, judges' option scoring)
    @property
    def model(self) -> Any:
        return self.replicas[0].model

    @property
    def tokenizer(self) -> Any:
        return self.replicas[0].tokenizer

    @property
    def batch_size(self) -> int:
        return self.replicas[0].batch_size

    def generate(
        self, prompts: list[list[dict]], params: SamplingParams, seed: int | Sequence[int]
    ) -> list[list[Completion]]:
        from engine.models.backends import prompt_seeds

        if not prompts:
            return []
        seeds = prompt_seeds(seed, len(prompts))
        parts = blocks(len(prompts), len(self.replicas))
        futures = [
            pool.submit(rep.generate, [prompts[i] for i in part], params, [seeds[i] for i in part])
            for pool, rep, part in zip(self._threads, self.replicas, parts)
        ]
        out: list[list[Completion]] = []
        for fut in futures:
            out.extend(fut.result())
        return out

    def option_logprobs(self, prompts: list[list[dict]], prefix: str, options: list[str]) -> list[list[float]]:
        parts = blocks(len(prompts), len(self.replicas))
        futures = [
            pool.submit(rep.option_logprobs, [prompts[i] for i in part], prefix, options)
            for pool, rep, part in zip(self._threads, self.replicas, parts)
        ]
        return [row for fut in futures for row in fut.result()]

    def close(self) -> None:
        for pool in self._threads:
            pool.shutdown(wait=True)
        for rep in self.replicas:
            rep.close()

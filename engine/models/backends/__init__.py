"""Generation backends behind one interface; stages do not care which one serves them.

Which backends exist, and what each can do, is one table: engine/spec/backends.py. Each is a
module here implementing `Backend` and `build(request: BuildRequest) -> Backend`:

- `hf` (hf.py): transformers `generate`, batched, left-padded, length-sorted, KV cache; one
  replica per device (replicas.py) when several GPUs are visible.
- `openai` (openai.py): any OpenAI-compatible chat-completions server (vLLM's or llama.cpp's
  server, a hosted API), with a request cache for resume.
- `vllm` (vllm.py): vLLM's engine in process, for GPU throughput.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # extra stop strings; the end-of-turn token always stops
    min_new_tokens: int = 0  # a forced length (benchmarks decode like for like); stages leave it 0


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    meta: dict = field(default_factory=dict)


class Backend(Protocol):
    """Every method the engine calls on a backend."""

    name: str

    def generate(
        self, prompts: list[list[dict]], params: SamplingParams, seed: int | Sequence[int]
    ) -> list[list[Completion]]:
        """For each chat prompt (a list of {role, content}), `params.n` completions of the
        next assistant turn. `seed`: one per prompt (engine.core.seeds derives them from row ids), or
        an int meaning seed, seed + 1, ... A prompt's completions depend on its own seed only,
        never on the other prompts of the call or how they are batched."""
        ...

    def option_logprobs(self, prompts: list[list[dict]], prefix: str, options: list[str]) -> list[list[float]]:
        """For each prompt, the log-probability of each option written after `prefix` at the start of
        the assistant turn. Only backends whose entry has `weights_here` give them."""
        ...

    def close(self) -> None:
        """Release the model and its memory."""
        ...


@dataclass
class BuildRequest:
    """What the model pool hands a backend module's `build`: the model reference to serve and how."""

    model: Any  # an engine.spec.artifact.Artifact
    recipe: Any  # the engine.spec.recipe.Recipe, for located errors
    cache_root: Path | None
    log: logging.Logger
    partial_dir: Path  # the stage's partial folder: request caches live here
    batch_size: int
    resources: Any  # the stage's [resources] (gpus per replica), or None
    devices: Callable[[], list[str]]  # the devices to replicate over (engine.models.pool.devices)
    load: Callable[[str], tuple[Any, Any, Callable[[], None] | None]]  # device -> (model, tokenizer, on_close),
    # through the run's model pool when there is one
    release_idle: Callable[[], None] = lambda: None  # gives back the pool's idle models (before vLLM starts)


def prompt_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One seed per prompt: a list as given (engine.core.seeds derives them from row ids), or an int
    meaning seed, seed + 1, ... (as the openai backend sends them, so a served model agrees)."""
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return seeds

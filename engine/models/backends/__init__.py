"""Generation backends behind one interface; stages do not care which one serves them.

- `hf` (hf.py): transformers `generate`, batched, left-padded, length-sorted, KV cache.
- `openai`: any OpenAI-compatible chat-completions server (to come with the generate issue).
- `vllm`: GPU throughput; the place for it is a module `vllm.py` implementing `Backend`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()  # extra stop strings; the end-of-turn token always stops


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    meta: dict = field(default_factory=dict)


class Backend(Protocol):
    name: str

    def generate(self, prompts: list[list[dict]], params: SamplingParams,
                 seed: "int | Sequence[int]") -> list[list[Completion]]:
        """For each chat prompt (a list of {role, content}), `params.n` completions of the
        next assistant turn. `seed`: one per prompt (engine.core.seeds derives them from row ids), or
        an int meaning seed, seed + 1, ... A prompt's completions depend on its own seed only,
        never on the other prompts of the call or how they are batched."""
        ...

    def close(self) -> None:
        """Release the model and its memory."""
        ...

"""Every random stream of a run, derived in one place.

A stream is named by what it is for, never by where work happens to run:

    (recipe seed, stage definition, row id, row content, sample, turn, round, attempt, purpose)

so batch size, shard size, processes, executors, OOM halving and the order shards run in
change speed, never rows. The stage's *definition* (its own components without the rows it maps
over: engine.store.fingerprint.definition) is part of every stream: two stages (or two rounds of
a loop) never share one, and a change to the stage itself re-draws it. A row's own content is
part of its streams, other rows and upstream configuration are not: a prompt whose inputs did
not change gets the same samples after adding prompts, or after an unrelated upstream change.
The row content comes from `know(rows)` (the shard runner calls it for the rows it maps over);
an id it was not told about (a derived task) streams by its id alone.

- `derive(*parts)`: a 63-bit seed from any JSON-able parts (sha256 of their canonical JSON).
- `Seeds`: a stage's streams (`ctx.seeds`): `row(row_id, sample=, turn=, round=, attempt=,
  purpose=)` and `rows(ids, ...)` for the per-prompt seeds a backend takes, `rng(...)` for a
  seeded `random.Random` (draws that are not a model's sampling: mixtures, spot-check samples).
- Backends take one seed per prompt and derive each sample's stream as `derive(seed, "sample", k)`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_SEED = 2**63 - 1  # torch.manual_seed and numpy take at most 64 bits; keep clear of the sign bit


def derive(*parts: Any) -> int:
    """A seed in [0, 2**63) from `parts` (JSON values): the same parts give the same seed in every
    process and Python version (no `hash()`, whose strings are salted per process)."""
    blob = json.dumps(list(parts), separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(blob.encode("utf-8")).digest()[:8], "big") >> 1


def sample_seed(prompt_seed: int, k: int) -> int:
    """The stream of the k-th sample of a prompt whose seed is `prompt_seed` (used by backends)."""
    return derive(prompt_seed, "sample", k)


def row_digest(row: Any) -> str:
    """A row's content, as its streams and memo see it (sha256 of its canonical JSON)."""
    blob = json.dumps(row, separators=(",", ":"), ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class Seeds:
    """The random streams of one stage: built from the recipe seed and the stage's definition."""

    recipe_seed: int
    definition: str
    content: dict[str, str] = field(default_factory=dict)  # row id -> row_digest, from `know`

    def know(self, rows: Iterable[dict], digests: Iterable[str] | None = None) -> None:
        """Tell the streams the content of these rows (by their `id`)."""
        for row, d in zip(rows, digests if digests is not None else (row_digest(r) for r in rows)):
            self.content[str(row["id"])] = d

    def row(
        self, row_id: Any, *, purpose: str = "", sample: int = 0, turn: int = 0, round: int = 0, attempt: int = 0
    ) -> int:
        rid = str(row_id)
        return derive(
            self.recipe_seed, self.definition, rid, self.content.get(rid, ""), purpose, sample, turn, round, attempt
        )

    def rows(self, row_ids: Iterable[Any], **kw: Any) -> list[int]:
        """One seed per row (per prompt of a backend call)."""
        return [self.row(r, **kw) for r in row_ids]

    def rng(self, *parts: Any) -> random.Random:
        """A private random.Random for draws that are not sampling (never the global one)."""
        return random.Random(derive(self.recipe_seed, self.definition, "rng", *parts))

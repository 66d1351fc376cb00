"""Text statistics shared by eval, iterative rounds and reports: diversity (refusals are judged by
engine.core.text.is_refusal, the engine's one detector).

Pure Python, no heavy imports.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable, Sequence

from engine.core.text import is_refusal

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct n-grams over all n-grams across `texts` (0 when there are none)."""
    total, seen = 0, set()
    for t in texts:
        w = words(t)
        grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def length_stats(texts: Sequence[str]) -> dict[str, float]:
    """Mean, standard deviation, min and max of word counts."""
    lens = [len(words(t)) for t in texts]
    if not lens:
        return {"mean": 0.0, "std": 0.0, "min": 0, "max": 0}
    return {
        "mean": round(statistics.fmean(lens), 2),
        "std": round(statistics.pstdev(lens), 2),
        "min": min(lens),
        "max": max(lens),
    }


def diversity(texts: Sequence[str]) -> dict:
    """distinct-1, distinct-2, length spread and refusal share of a set of replies."""
    texts = list(texts)
    return {
        "n": len(texts),
        "distinct_1": round(distinct_n(texts, 1), 4),
        "distinct_2": round(distinct_n(texts, 2), 4),
        "length": length_stats(texts),
        "refusal_share": round(sum(is_refusal(t) for t in texts) / len(texts), 4) if texts else 0.0,
    }

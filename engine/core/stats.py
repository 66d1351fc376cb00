"""Small statistics the stages and the report share: the mean, quantiles and histogram of
scores, and 95% intervals for rates (Wilson score intervals, which stay inside 0..1 and behave
at 0 and n successes where the normal approximation does not)."""

from __future__ import annotations

import math
import random

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def score_stats(values: list[float]) -> dict:
    """Mean, std, min, max, quantiles and a histogram (edges, counts) of the scores."""
    import numpy as np

    vals = sorted(values)
    mean = sum(vals) / len(vals)
    bins = max(1, min(20, len(set(vals))))
    counts, edges = np.histogram(vals, bins=bins)
    return {
        "n": len(vals),
        "mean": mean,
        "std": (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5,
        "min": vals[0],
        "max": vals[-1],
        "quantiles": {f"p{int(q * 100)}": quantile(vals, q) for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
        "histogram": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of a binomial rate (95% by default); None when n is 0."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # exact at the ends (k = 0, k = n), where rounding would leave the rate a hair outside
    return (
        0.0 if successes == 0 else min(p, max(0.0, centre - half)),
        1.0 if successes == n else max(p, min(1.0, centre + half)),
    )


def pooled_rate(clusters: list[list[bool]]) -> float | None:
    """The share of True over every flag of every cluster; None with no flags."""
    n = sum(len(c) for c in clusters)
    return sum(sum(c) for c in clusters) / n if n else None


def resample(n: int, rng: random.Random) -> list[int]:
    """n indices drawn with replacement from range(n): one bootstrap resample."""
    return [rng.randrange(n) for _ in range(n)]


def bootstrap_ci(clusters: list[list[bool]], seed: int = 0, resamples: int = 2000) -> tuple[float, float] | None:
    """A 95% percentile bootstrap interval of `pooled_rate`, resampling whole clusters (e.g. the
    turns of one conversation together: they are not independent of each other)."""
    if not any(clusters):
        return None
    rng = random.Random(seed)
    draws = sorted(
        r
        for r in (pooled_rate([clusters[i] for i in resample(len(clusters), rng)]) for _ in range(resamples))
        if r is not None
    )
    return quantile(draws, 0.025), quantile(draws, 0.975)


def paired_difference(
    base: list[list[bool]], other: list[list[bool]], seed: int = 0, resamples: int = 2000
) -> dict | None:
    """other's pooled rate minus base's on the same items (cluster i of each is the same item or
    conversation), with a 95% paired bootstrap interval: resampling items keeps each pair
    together, which is tighter and more honest than comparing two separate intervals.
    `outside_noise` is True when the interval excludes 0. None when either rate is undefined."""
    if len(base) != len(other):
        raise ValueError(f"paired items differ in number: {len(base)} and {len(other)}")
    a, b = pooled_rate(base), pooled_rate(other)
    if a is None or b is None:
        return None
    rng = random.Random(seed)
    diffs = []
    for _ in range(resamples):
        idx = resample(len(base), rng)
        ra, rb = pooled_rate([base[i] for i in idx]), pooled_rate([other[i] for i in idx])
        if ra is not None and rb is not None:
            diffs.append(rb - ra)
    diffs.sort()
    lo, hi = quantile(diffs, 0.025), quantile(diffs, 0.975)
    if lo == hi:  # every item came out alike on both sides: the bootstrap collapses to a point
        lo, hi = newcombe(sum(any(c) for c in base), sum(any(c) for c in other), len(base))
    return {"difference": b - a, "ci": [lo, hi], "outside_noise": lo > 0 or hi < 0}


def newcombe(x1: int, x2: int, n: int) -> tuple[float, float]:
    """Newcombe's hybrid score interval of p2 - p1 from the two Wilson intervals (x of n items each),
    as if the two were independent: wider than a paired interval, never a point."""
    (l1, u1), (l2, u2) = wilson(x1, n) or (0.0, 1.0), wilson(x2, n) or (0.0, 1.0)
    p1, p2 = x1 / n, x2 / n
    d = p2 - p1
    return d - ((p2 - l2) ** 2 + (u1 - p1) ** 2) ** 0.5, d + ((u2 - p2) ** 2 + (p1 - l1) ** 2) ** 0.5

"""Duplicate detection, deterministic across processes: exact keys of conversations and near
duplicates by MinHash over word shingles (blake2b and seeded random, never Python's `hash()`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence

from engine.core.text import normalize, words

_MERSENNE = (1 << 61) - 1


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams; a text with fewer than n words is one shingle (all empty texts alike)."""
    tokens = words(text)
    if len(tokens) < n:
        return {" ".join(tokens) if tokens else normalize(text)}
    return {" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a & b| / |a | b|; two empty sets are identical (1.0)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class MinHasher:
    """MinHash signatures: P(sig_a[k] == sig_b[k]) estimates the Jaccard of two shingle sets.

    Shingles are hashed with keyed blake2b (stable across processes, unlike `hash()`) and
    permuted by universal hashing (a*x + b) mod 2**61-1 with seeded coefficients.
    """

    def __init__(self, num_perm: int = 64, seed: int = 0) -> None:
        if num_perm < 1:
            raise ValueError("num_perm must be >= 1")
        self.num_perm, self.seed = num_perm, seed
        self._key = str(seed).encode()[:64]
        rng = random.Random(seed)
        self._perms = [(rng.randrange(1, _MERSENNE), rng.randrange(_MERSENNE)) for _ in range(num_perm)]

    def _hash(self, shingle: str) -> int:
        digest = hashlib.blake2b(shingle.encode("utf-8"), digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "little") % _MERSENNE

    def signature(self, shingle_set: Iterable[str]) -> tuple[int, ...]:
        """One minimum per permutation; an empty set gives all 2**61-1 (matches only itself)."""
        xs = [self._hash(s) for s in shingle_set]
        if not xs:
            return (_MERSENNE,) * self.num_perm
        return tuple(min([(a * x + b) % _MERSENNE for x in xs]) for a, b in self._perms)


def near_duplicates(
    texts: Sequence[str], *, threshold: float = 0.8, n: int = 3, num_perm: int = 64, bands: int = 16, seed: int = 0
) -> dict[int, int]:
    """{duplicate index: index of the earlier kept text it copies}, first occurrence kept.

    LSH banding (`bands` bands of num_perm/bands rows) proposes candidates among kept texts
    only, so the cost grows with the number of texts, not with pairs; each candidate is
    confirmed on the exact shingle Jaccard (>= threshold), lowest kept index first.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    if bands < 1 or num_perm % bands:
        raise ValueError("bands must divide num_perm")
    rows = num_perm // bands
    hasher = MinHasher(num_perm, seed)
    buckets: list[dict[tuple[int, ...], list[int]]] = [{} for _ in range(bands)]
    kept: dict[int, set[str]] = {}
    cache: dict[frozenset[str], tuple[int, ...]] = {}
    dups: dict[int, int] = {}
    for i, text in enumerate(texts):
        sh = shingles(text, n)
        key = frozenset(sh)
        sig = cache.get(key) or cache.setdefault(key, hasher.signature(sh))
        keys = [sig[b * rows : (b + 1) * rows] for b in range(bands)]
        candidates = {j for b, k in enumerate(keys) for j in buckets[b].get(k, ())}
        match = next((j for j in sorted(candidates) if jaccard(sh, kept[j]) >= threshold), None)
        if match is not None:
            dups[i] = match
            continue
        kept[i] = sh
        for b, k in enumerate(keys):
            buckets[b].setdefault(k, []).append(i)
    return dups


def exact_key(messages: Sequence[Mapping[str, object]]) -> str:
    """sha256 of roles and normalized contents: reformatted copies (spacing, case) collide."""
    turns = [[normalize(str(m.get("role") or "")), normalize(str(m.get("content") or ""))] for m in messages]
    return hashlib.sha256(json.dumps(turns, ensure_ascii=False).encode("utf-8")).hexdigest()

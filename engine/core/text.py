"""Text rules: refusals (the engine's one detector), sycophancy, filler turns and duplicates.

Everything is pure stdlib so that filtering never needs torch or numpy. Every rule matches
on `normalize(text)`, so curly apostrophes, odd spacing and case never decide a verdict.
Everything is deterministic: hashing goes through blake2b and seeded `random.Random`,
never through Python's per-process randomized `hash()`, so a re-run drops the same rows.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

# The one refusal detector of the engine (filter rules, the rules scorer, eval, round statistics):
# phrases that open or carry a refusal, matched on the normalized first REFUSAL_HEAD characters of
# a reply (a refusal comes first; "if I'm unable to find it..." deep in a helpful answer is not one).
REFUSAL_HEAD = 300
REFUSAL_PHRASES: tuple[str, ...] = (
    "i can't help",
    "i cannot help",
    "i can't assist",
    "i cannot assist",
    "i won't help",
    "i will not help",
    "i won't be able to",
    "i will not be able to",
    "i'm not able to",
    "i am not able to",
    "i'm unable to",
    "i am unable to",
    "i can't provide",
    "i cannot provide",
    "i won't provide",
    "i can't comply",
    "i cannot comply",
    "i must decline",
    "i have to decline",
    "i can't fulfill",
    "i cannot fulfill",
    "i can't do that",
    "i cannot do that",
    "i'd rather not",
    "i would rather not",
    "i can't share",
    "i cannot share",
    "i won't share",
    "i'm sorry, but",
    "i am sorry, but",
    "sorry, i can't",
    "sorry, but i can't",
    "i can't give",
    "i cannot give",
    "i won't give",
    "not something i can help",
    "i can't support",
    "i cannot support",
    "i'm not allowed to",
    "i'm not comfortable",
    "i can't write",
    "i cannot write",
    "i won't write",
    "i can't explain how",
    "i can't walk you through",
    "it would be inappropriate for me",
    "against my guidelines",
)
SYCOPHANCY_PHRASES: tuple[str, ...] = (
    "great question",
    "good question",
    "excellent question",
    "fantastic question",
    "amazing question",
    "i love this question",
    "i love that question",
    "you're absolutely right",
    "you are absolutely right",
    "you're completely right",
    "you're so right",
    "what a fantastic",
    "what a wonderful",
    "what a brilliant",
    "what an insightful",
    "such an insightful",
    "excellent point",
    "great point",
    "brilliant idea",
    "you're a genius",
    "i couldn't agree more",
    "you clearly know",
    "your insight is",
    "you have impeccable",
)
FILLER_PHRASES: tuple[str, ...] = (
    "sure",
    "sure thing",
    "of course",
    "certainly",
    "absolutely",
    "happy to help",
    "glad to help",
    "i'd be happy to",
    "i would be happy to",
    "let me know if",
    "let me know",
    "feel free to ask",
    "i hope this helps",
    "hope this helps",
    "got it",
    "okay",
    "ok",
    "alright",
    "no problem",
    "you're welcome",
    "thank you",
    "thanks",
    "great",
    "understood",
    "noted",
    "will do",
    "is there anything else",
    "anything else",
)
# Common English function words plus chat acknowledgements. Negations (no, not, never,
# don't, isn't, ...) are deliberately absent: "That is not the capital." says something.
STOPWORDS: frozenset[str] = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "against",
        "all",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "herself",
        "him",
        "himself",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "me",
        "more",
        "most",
        "my",
        "myself",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "ours",
        "ourselves",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "theirs",
        "them",
        "themselves",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "also",
        "well",
        "really",
        "now",
        "let",
        "may",
        "might",
        "must",
        "shall",
        "i'm",
        "i've",
        "i'd",
        "i'll",
        "you're",
        "you've",
        "you'd",
        "you'll",
        "he's",
        "she's",
        "it's",
        "we're",
        "we've",
        "they're",
        "they've",
        "that's",
        "there's",
        "here's",
        "what's",
        "let's",
        "yes",
        "yeah",
        "yep",
        "ok",
        "okay",
        "please",
        "thanks",
        "thank",
    ]
)

_APOSTROPHES = str.maketrans(
    {
        "\u2019": "'",
        "\u2018": "'",
        "\u201b": "'",
        "\u02bc": "'",
        "\u2032": "'",
        "`": "'",
        "\u00b4": "'",
        "\u201c": '"',
        "\u201d": '"',
    }
)
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_MERSENNE = (1 << 61) - 1


def normalize(text: str) -> str:
    """NFKC, straight apostrophes/quotes, casefold, single spaces: the form all rules match on."""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).casefold()
    return " ".join(text.split())


def words(text: str) -> list[str]:
    """Lowercase word tokens (unicode letters/digits, inner apostrophes kept: "can't")."""
    return _WORD.findall(normalize(text))


def word_count(text: str) -> int:
    """Number of `words` in `text`: the length measure used by the filler rule."""
    return len(words(text))


@lru_cache(maxsize=64)
def _phrase_regex(phrases: tuple[str, ...]) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """One alternation, longest phrase first, each phrase in its own group.

    A word-boundary guard is only added on edges that are word characters, so "sure" does
    not match inside "measure" while a phrase ending in punctuation still can match.
    """
    pairs = sorted(((normalize(p), p) for p in phrases if normalize(p)), key=lambda x: -len(x[0]))
    if not pairs:
        return re.compile(r"(?!x)x"), ()
    parts = []
    for norm, _ in pairs:
        lead = r"(?<!\w)" if re.match(r"\w", norm) else ""
        tail = r"(?!\w)" if re.match(r"\w", norm[-1]) else ""
        parts.append(f"({lead}{re.escape(norm)}{tail})")
    return re.compile("|".join(parts)), tuple(p for _, p in pairs)


def contains_phrase(text: str, phrases: Iterable[str]) -> str | None:
    """The phrase (as listed) found leftmost in `text`, longest one on a tie, else None."""
    pattern, listed = _phrase_regex(tuple(phrases))
    match = pattern.search(normalize(text))
    return listed[match.lastindex - 1] if match and match.lastindex else None


def is_refusal(text: str, phrases: Iterable[str] = REFUSAL_PHRASES) -> bool:
    """True when a reply reads as a refusal: a refusal phrase in its first REFUSAL_HEAD characters
    (normalized: case, curly apostrophes and spacing never decide). The engine's one detector."""
    return contains_phrase(normalize(text)[:REFUSAL_HEAD], phrases) is not None


def sycophancy_ratio(messages: Sequence[Mapping[str, object]], phrases: Iterable[str] = SYCOPHANCY_PHRASES) -> float:
    """Share of assistant turns containing a flattery phrase (0.0 with no assistant turns)."""
    phrases = tuple(phrases)
    replies = [str(m.get("content") or "") for m in messages if m.get("role") == "assistant"]
    if not replies:
        return 0.0
    return sum(contains_phrase(r, phrases) is not None for r in replies) / len(replies)


def _is_content(word: str) -> bool:
    return word not in STOPWORDS and (len(word) >= 2 or any(c.isdigit() for c in word))


def is_filler(
    text: str, earlier_texts: Iterable[str], *, max_words: int = 15, phrases: Iterable[str] = FILLER_PHRASES
) -> bool:
    """True for a short assistant reply that adds no information to the conversation.

    Short means fewer than `max_words` words. After the filler phrases are cut out, every
    remaining content word (not a stopword; two characters or more, or any digit, since
    numbers are information) must already appear in `earlier_texts`. "Paris." after "What
    is the capital of France?" is an answer; "Yes, the capital of France." is an echo.
    """
    if word_count(text) >= max_words:
        return False
    pattern, _ = _phrase_regex(tuple(phrases))
    rest = [w for w in words(pattern.sub(" ", normalize(text))) if _is_content(w)]
    if not rest:
        return True
    seen = {w for t in earlier_texts for w in words(t)}
    return all(w in seen for w in rest)


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

"""Text rules: refusals (the engine's one detector), sycophancy, filler turns and duplicates.

Everything is pure stdlib so that filtering never needs torch or numpy. Every rule matches
on `normalize(text)`, so curly apostrophes, odd spacing and case never decide a verdict.
Everything is deterministic: hashing goes through blake2b and seeded `random.Random`,
never through Python's per-process randomized `hash()`, so a re-run drops the same rows.
"""

from __future__ import annotations

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


def last_reply(messages: Sequence[Mapping[str, object]]) -> str | None:
    """The text of a conversation's last assistant turn ("" when it is empty), None when it has none:
    what verifiers, rewards and scorers judge."""
    for m in reversed(messages):
        if m.get("role") == "assistant":
            return str(m.get("content") or "")
    return None

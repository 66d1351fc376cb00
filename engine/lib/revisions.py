"""Cleaning and judging a model's revision of a reply (critique_revise), and which assistant
turns a `turns` setting selects."""

from __future__ import annotations

import re

from engine.core.text import normalize, word_count

REASONS = (
    "empty",
    "runaway",
    "truncated",
    "unchanged",
    "empty_critique",
    "worse",
    "better",
)  # why a revision is rejected

_ADJ = r"(?:revised|improved|updated|rewritten|edited|corrected|refined|better|new|final|more\s+\w+)"
_NOUN = r"(?:response|reply|answer|version|revision|rewrite|draft|text|message)"
_LEAD = r"(?:(?:sure|certainly|of course|okay|ok|absolutely|alright|great)\s*[,.!]?\s*)?"
_HERE = r"(?:here(?:'s|\u2019s| is| you go)\s*[,:]?\s*)"
_OF = r"(?:\s+(?:of|to|for|that|which)\s+[^:\n]{0,80}?)?"
_PHRASE = rf"(?:(?:a|an|the|my|this)\s+)?(?:(?:{_ADJ}\s+)+{_NOUN}|revision|rewrite|version)"
_WRAP = r"[*_#>\s]*"
# A preamble is a first line such as "Sure, here is the revised response:" or "Revised reply:",
# ending the line, or ending with a colon that the reply follows on the same line.
PREAMBLE = re.compile(
    rf"^{_WRAP}(?:{_LEAD}{_HERE}{_PHRASE}{_OF}|{_LEAD}(?:{_ADJ}\s+)+{_NOUN}{_OF}|(?:revision|rewrite))"
    rf"{_WRAP}(?::[*_\s]*|[.!]?[*_ \t]*(?:\n|$))",
    re.IGNORECASE,
)
_ROLE_LABEL = re.compile(r"^\s*\[assistant\]\s*\n", re.IGNORECASE)
_QUOTES = {'"': '"', "\u201c": "\u201d", "'": "'", "```": "```"}


def strip_preamble(text: str, previous: str = "") -> str:
    """The revision without a leading "Here is the revised response:"-style line, an echoed
    "[assistant]" label, or quotes around the whole text. A first line that the previous
    text starts with too is part of the reply, not a preamble, and is kept."""
    out = _ROLE_LABEL.sub("", text.strip()).strip()
    m = PREAMBLE.match(out)
    # a preamble introduces something: a bare "Revision" with nothing after it and no colon is the text
    bare = m is not None and not out[m.end() :].strip() and not out.rstrip().endswith(":")
    if m and not bare and not normalize(previous).startswith(normalize(out[: m.end()]).rstrip(":").strip()):
        out = _ROLE_LABEL.sub("", out[m.end() :].strip()).strip()
    for left, right in _QUOTES.items():
        inner = out[len(left) : len(out) - len(right)]
        if (
            len(out) > len(left) + len(right)
            and out.startswith(left)
            and out.endswith(right)
            and left not in inner
            and right not in inner
        ):
            out = inner.strip()
            break
    return out


def assess_revision(text: str, finish_reason: str, previous: str, original: str) -> tuple[str, str | None]:
    """(cleaned text, None) for a usable revision, else (cleaned text, reason it is rejected)."""
    cleaned = strip_preamble(text, previous)
    if not cleaned:
        return cleaned, "empty"
    if finish_reason == "length":
        return cleaned, "truncated"
    if word_count(cleaned) > 3 * word_count(original) + 50:
        return cleaned, "runaway"
    if normalize(cleaned) == normalize(previous):
        return cleaned, "unchanged"
    return cleaned, None


def selected_positions(n_assistant: int, turns) -> list[int]:
    """0-based positions among a conversation's assistant turns, in order, that `turns` selects."""
    if turns == "all":
        return list(range(n_assistant))
    if turns == "last":
        return [n_assistant - 1] if n_assistant else []
    return sorted({t if t >= 0 else n_assistant + t for t in turns if -n_assistant <= t < n_assistant})

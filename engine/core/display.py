"""How counts and model text are shown to a person: plural words, control characters escaped."""

from __future__ import annotations


def printable(text: str) -> str:
    """`text` with control and format characters other than newline, tab and the zero-width joiner
    (NUL, ESC, DEL, C1 controls, bidi overrides, lone surrogates) written as escapes (\\x1b, \\u202e):
    model text shown in a terminal or a report never drives it, and always encodes as UTF-8."""
    import unicodedata

    return "".join(
        c if c in "\n\t\u200d" or unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co") else repr(c)[1:-1]
        for c in str(text)
    )


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 stage', '2 stages' ('1 run', '3 runs'; `many` for irregular plurals)."""
    return f"{n} {word if n == 1 else many or word + 's'}"

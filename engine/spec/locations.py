"""Where each key of a recipe was written: TOML files read with a (file, line) for every dotted
key, so every problem can name the file, line and key. `locate` finds the nearest located parent
of a key; `read_toml` turns syntax errors into a RecipeError with the line.
"""

from __future__ import annotations

import re
from pathlib import Path

from engine.core.errors import RecipeError
from engine.core.toml import tomllib

SET_SOURCE = "--set"


_ROUND_STAGE_KEY = re.compile(r"^stages\.(.+?)@([1-9][0-9]*)((?:\..*)?)$")


_SEG = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'


_KEY = rf"{_SEG}(?:\s*\.\s*{_SEG})*"


_HEADER = re.compile(rf"^\s*(\[\[?)\s*({_KEY})\s*\]\]?\s*(#.*)?$")


_ASSIGN = re.compile(rf"^\s*({_KEY})\s*=\s*(.*)$")


_INLINE_KEY = re.compile(rf"(?:^|[{{,])\s*({_KEY})\s*=")


def _split_key(key: str) -> list[str]:
    parts = re.findall(_SEG, key)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def locate_keys(text: str) -> dict[str, int]:
    """Dotted key -> 1-based line where it is set or its table opens. Best effort, no parsing:
    tomllib has validated the syntax already; this only needs to find where keys are."""
    found: dict[str, int] = {}
    prefix: list[str] = []
    arrays: dict[str, int] = {}
    pending = ""  # an open multi-line value: its closing token
    for lineno, line in enumerate(text.splitlines(), 1):
        if pending:
            if pending in ('"""', "'''"):
                if line.count(pending) % 2 == 1:
                    pending = ""
            elif line.count("[") - line.count("]") < 0 or line.strip().endswith("]"):
                pending = ""
            continue
        m = _HEADER.match(line)
        if m:
            prefix = _split_key(m.group(2))
            if m.group(1) == "[[":
                dotted = ".".join(prefix)
                arrays[dotted] = arrays.get(dotted, -1) + 1
                prefix = prefix + [str(arrays[dotted])]
            for i in range(1, len(prefix) + 1):
                found.setdefault(".".join(prefix[:i]), lineno)
            continue
        m = _ASSIGN.match(line)
        if not m:
            continue
        full = prefix + _split_key(m.group(1))
        for i in range(1, len(full) + 1):
            found.setdefault(".".join(full[:i]), lineno)
        value = m.group(2).split("#", 1)[0].strip() if '"' not in m.group(2) else m.group(2).strip()
        if value.startswith("{"):
            for sub in _INLINE_KEY.findall(value):
                found.setdefault(".".join(full + _split_key(sub)), lineno)
        for quote in ('"""', "'''"):
            if value.startswith(quote) and value.count(quote) == 1:
                pending = quote
        if value.startswith("[") and value.count("[") > value.count("]"):
            pending = "]"
    return found


def locate(locations: dict[str, tuple[str, int]], key: str, default_file: Path | str | None) -> dict:
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        hit = locations.get(".".join(parts[:i]))
        if hit:
            return {"file": hit[0], "line": hit[1], "key": key}
    return {"file": str(default_file) if default_file else None, "key": key}


def _syntax_line(exc: Exception) -> int | None:
    m = re.search(r"line (\d+)", str(exc))
    return int(m.group(1)) if m else None


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_toml(path: Path) -> tuple[dict, dict[str, tuple[str, int]]]:
    """Parse one file; a syntax error is a RecipeError naming the file and line."""
    shown = _display(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError.single("file not found.", file=shown, hint="Check the path.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError.single(f"cannot read the file: {exc}", file=shown) from None
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise RecipeError.single(
            "arrays or inline tables are nested too deeply to read.",
            file=shown,
            hint=f"Recipes never need more than {MAX_DEPTH} levels; flatten the value.",
        ) from None
    except tomllib.TOMLDecodeError as exc:
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise RecipeError.single(
            f"TOML syntax error: {msg}.",
            file=shown,
            line=_syntax_line(exc),
            hint="Fix the syntax (strings need quotes; tables are [name]).",
        ) from None
    locations = {k: (shown, line) for k, line in locate_keys(text).items()}
    return data, locations


MAX_DEPTH = 32  # tables and arrays nested deeper than any recipe needs

"""Builtin function scorers (verifiers), and the one place that resolves a scorer function by name.

A function scorer is `f(row) -> float | None`: `row` is a conversation row (`id`, `messages`,
`meta`, ...), `None` means "nothing to compare against" (recorded as a missing score). The
`judge` stage (`scorer = "function"`) and `rejection_sample` take `function` as:

- a builtin name (`BUILTIN` below), then an entry point of the group `recipe.scorers` (a plugin
  can add verifiers, `name = "package.module:function"`, but cannot shadow a builtin);
- `path/to/file.py:function`: a Python file, relative to the recipe's folder;
- `package.module:function`: an importable module.

User code shapes scores, so it is in the fingerprint (`identity`): the source of the file that
defines the function, and for an installed distribution its name and version. Editing the file
re-runs the stages that use it ("code changed: scorer function reward.py:score").

Builtins:
- `math_answer`: 1.0 when the last number in the final assistant reply equals the row's answer
  (`row["answer"]`, else `row["meta"]["answer"]`, where dataset columns and generate's carried
  meta put it), 0.0 when it does not or the reply has no number, None when the row has no answer.
  Numbers compare exactly as rationals: "1,234", "1234.0", "-3", "3/4" and "0.75" all parse.
- `reply_quality`: a heuristic 0-1 score of the final reply (length in a sensible range, little
  repetition, not filler, no flattery). Deterministic and offline: the shipped recipes use it
  where a judge model is not available; it is no substitute for one.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

from engine.core.errors import Problem
from engine.core.text import last_reply

GROUP = "recipe.scorers"

# A number: an optional sign (not after a word character or ")": "5-3" is 5 minus 3), digits
# with optional thousands commas, optional decimals, an optional "/denominator"; or ".5". A
# digit right after a letter or "." starts no number ("v1.5", "1.2.3" are not read as 5 or 3).
_NUMBER = re.compile(
    r"(?<![\w).])(-)?(\d{1,3}(?:,\d{3})+(?!\d)|\d+)(\.\d+)?(?:\s*/\s*(\d+)(?![\d.,]))?"
    r"|(?<![\w).])(-)?\.(\d+)"
)
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\ufe63": "-", "\uff0d": "-"})


def _value(m: re.Match) -> Fraction | None:
    if m.group(6) is not None:  # ".5"
        v = Fraction(f"0.{m.group(6)}")
        return -v if m.group(5) else v
    v = Fraction(m.group(2).replace(",", "") + (m.group(3) or ""))
    if m.group(4) is not None:
        if int(m.group(4)) == 0:
            return None
        v /= int(m.group(4))
    return -v if m.group(1) else v


def numbers(text: str) -> list[Fraction]:
    """Every number in `text`, in order, as exact rationals."""
    found = (_value(m) for m in _NUMBER.finditer(text.translate(_MINUS)))
    return [v for v in found if v is not None]


def last_number(text: str) -> Fraction | None:
    """The last number in `text` (the final answer, by the usual convention), or None."""
    found = numbers(text)
    return found[-1] if found else None


def parse_answer(answer: Any) -> Fraction | None:
    """A reference answer as a rational: an int/float, or text that is one number (a leading
    "$" or trailing "%" or unit word allowed). None when it is empty; ValueError when it is text
    with no number or several numbers, so a bad dataset column fails loudly, never scores 0."""
    if answer is None or isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        return Fraction(str(answer)) if isinstance(answer, float) else Fraction(answer)
    text = str(answer).strip()
    if not text:
        return None
    found = numbers(text)
    if len(found) != 1:
        raise ValueError(f"the answer {text[:60]!r} is not one number")
    return found[0]


def row_answer(row: dict) -> Any:
    """The row's reference answer: `row["answer"]`, else `row["meta"]["answer"]`, else None."""
    if row.get("answer") is not None:
        return row["answer"]
    meta = row.get("meta")
    return meta.get("answer") if isinstance(meta, dict) else None


def final_reply(row: dict) -> str | None:
    return last_reply(row.get("messages") or [])


def math_answer(row: dict) -> float | None:
    """1.0 if the last number of the final assistant reply equals the row's answer, else 0.0;
    None when the row has no answer (or no assistant reply) to compare."""
    try:
        expected = parse_answer(row_answer(row))
    except ValueError as exc:
        raise ValueError(f"math_answer: row {row.get('id')!r}: {exc}; give a numeric `answer` column") from None
    reply = final_reply(row)
    if expected is None or reply is None:
        return None
    return 1.0 if last_number(reply) == expected else 0.0


def reply_quality(row: dict) -> float | None:
    """A transparent, deterministic stand-in for a judge, in [0, 1]: the mean of four checks on
    the final assistant reply. length: 1 from 15 to 250 words, falling linearly to 0 at 0 words
    and at 500; repetition: the share of its word 2-grams that are distinct; no filler: 0 if it
    only restates the conversation (engine/core/text.py is_filler), else 1; no flattery: 0 if it
    contains a sycophancy phrase, else 1. It rewards replies that say something and do not
    loop; it cannot tell whether a reply is correct or safe, which needs a real judge."""
    from engine.core.text import SYCOPHANCY_PHRASES, contains_phrase, is_filler, words

    reply = final_reply(row)
    if reply is None:
        return None
    tokens = words(reply)
    n = len(tokens)
    if not n:
        return 0.0
    length = min(1.0, n / 15) if n < 15 else (1.0 if n <= 250 else max(0.0, (500 - n) / 250))
    grams = list(zip(tokens, tokens[1:]))
    repetition = len(set(grams)) / len(grams) if grams else 1.0
    messages = row.get("messages") or []
    earlier = [m.get("content") or "" for m in messages[:-1]]
    filler = 0.0 if is_filler(reply, earlier) else 1.0
    flattery = 0.0 if contains_phrase(reply, SYCOPHANCY_PHRASES) else 1.0
    return round((length + repetition + filler + flattery) / 4, 6)


BUILTIN: dict[str, Callable[[dict], float | None]] = {"math_answer": math_answer, "reply_quality": reply_quality}

# What a builtin needs from the data, checked by `recipe validate` on the stage's input dataset:
# scorer name -> (the column, a test that a row has it).
REQUIRES: dict[str, tuple[str, Callable[[dict], bool]]] = {
    "math_answer": ("answer", lambda row: row_answer(row) is not None)
}


def names() -> list[str]:
    """Every scorer function name: the builtins, then registered entry points."""
    from importlib.metadata import entry_points

    return list(dict.fromkeys([*BUILTIN, *sorted(ep.name for ep in entry_points(group=GROUP))]))


def is_file_form(name: str) -> bool:
    return ":" in name and name.rsplit(":", 1)[0].endswith(".py")


def is_module_form(name: str) -> bool:
    return ":" in name and not is_file_form(name)


def _file(name: str, base: Path | None) -> Path:
    path = Path(name.rsplit(":", 1)[0])
    return path if path.is_absolute() or base is None else Path(base) / path


def _entry_point(name: str):
    from importlib.metadata import entry_points

    return next((ep for ep in entry_points(group=GROUP) if ep.name == name), None)


def resolve(name: str, base: Path | None = None) -> Callable[[dict], float | None]:
    """The scorer function for `name` (see the module docstring; `base`: the recipe's folder, for
    the file form). KeyError when no such name is registered; ValueError when a file or module
    form cannot be loaded, with the reason."""
    if name in BUILTIN:
        return BUILTIN[name]
    if is_file_form(name):
        path, attr = _file(name, base), name.rsplit(":", 1)[1]
        if not path.is_file():
            raise ValueError(f"the file {path} does not exist")
        key = "recipe_scorer_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as exc:
            raise ValueError(f"{path.name} could not be loaded: {type(exc).__name__}: {exc}") from exc
        return _attr(module, attr, path.name)
    if is_module_form(name):
        mod, attr = name.rsplit(":", 1)
        try:
            module = importlib.import_module(mod)
        except Exception as exc:
            raise ValueError(f"module {mod} could not be imported: {type(exc).__name__}: {exc}") from exc
        return _attr(module, attr, mod)
    ep = _entry_point(name)
    if ep is None:
        raise KeyError(name)
    return ep.load()


def _attr(module: Any, attr: str, where: str) -> Callable[[dict], float | None]:
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{where} defines no function {attr}")
    return fn


def identity(name: str, base: Path | None = None) -> dict | None:
    """What a scorer function's scores depend on besides its name, for the fingerprint: the sha256
    of the source file that defines it and, when it comes from an installed distribution, that
    distribution's name and version. None for a builtin (the stage's VERSION covers those)."""
    if name in BUILTIN:
        return None
    if is_file_form(name):
        path = _file(name, base)
        return {"source": _sha(path) if path.is_file() else None}
    if is_module_form(name):
        target, dist = name, None
    else:
        ep = _entry_point(name)
        if ep is None:
            return {"unknown": name}
        target, dist = ep.value, ep.dist
    module = target.rsplit(":", 1)[0].strip()
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    origin = Path(spec.origin) if spec is not None and spec.origin and spec.origin != "built-in" else None
    out: dict[str, Any] = {"source": _sha(origin) if origin is not None and origin.is_file() else None}
    if dist is None:
        from importlib.metadata import packages_distributions

        found = packages_distributions().get(module.split(".")[0], [])
        if found:
            from importlib.metadata import distribution

            dist = distribution(found[0])
    if dist is not None:
        out["distribution"] = {"name": dist.metadata["Name"], "version": dist.version}
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def function_problems(function: str | None, recipe, input: str | None, where) -> list[Problem]:
    """scorer 'function': a function that loads (`where(key)` locates a stage key), and the column
    it compares with in the data."""
    problems: list[Problem] = []
    known = names()
    if function is None:
        problems.append(
            Problem(
                "scorer 'function' needs a function name.",
                hint=f'Set function = "NAME". Known: {", ".join(known)}.',
                **where("scorer"),
            )
        )
    elif ":" in function:  # path/to/file.py:function or package.module:function
        try:
            resolve(function, recipe.dir)
        except ValueError as exc:
            problems.append(
                Problem(
                    f"scorer function '{function}': {exc}.",
                    hint="Give path/to/file.py:function (relative to the recipe's folder) or "
                    "package.module:function; the function takes a row and returns a float or None.",
                    **where("function"),
                )
            )
    elif function not in known:
        problems.append(
            Problem(
                f"no scorer function '{function}' is registered.",
                hint=f"Use a builtin, path/to/file.py:function, package.module:function, or register one under "
                f"the entry point group '{GROUP}'. Known: {', '.join(known)}.",
                **where("function"),
            )
        )
    elif function in REQUIRES and input and recipe.dataset_rows(input):
        column, test = REQUIRES[function]
        if not any(test(r) for r in recipe.dataset_rows(input)):
            problems.append(
                Problem(
                    f"scorer function '{function}' compares each reply with the row's '{column}', and no row of "
                    f"dataset '{input}' has one.",
                    hint=f"Add a '{column}' column to the data, or map one: columns = {{ {column} = \"...\" }} in "
                    f"[datasets.{input}].",
                    **where("function"),
                )
            )
    return problems

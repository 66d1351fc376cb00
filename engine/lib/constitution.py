"""Constitutions: named principles that critiques, revisions and AI-feedback judges follow.

A constitution is a TOML file, declared in a recipe as `[constitutions.NAME] path = "..."`:

    name = "hhh"                          # optional; defaults to the file name without .toml
    description = "What it is for."       # optional

    [[principles]]
    id = "honest-uncertainty"             # letters, digits, - _ . ; unique in the file
    critique = "Point out claims in the reply that ... "      # the critique request
    revision = "Rewrite the reply so that ... "               # the revision request
    comparison = "Which reply is more candid about ...?"      # the question for AI feedback

    [[principles.examples]]               # optional few-shot examples of this principle, shown in prompts
    response = "..."                      # (same keys as [[examples]] below, without `principle`)
    ...

    [[examples]]                          # or at the top level, naming their principle
    principle = "honest-uncertainty"      # the principle it illustrates; leave out for any
    response = "..."                      # the reply being critiqued
    critique = "..."                      # a model critique of it
    revision = "..."                      # a model revision
    [[examples.context]]                  # the conversation the reply answers (ends with user)
    role = "user"
    content = "..."

`load_constitution` validates the file (at least one principle; every request non-empty;
unique ids; no unknown keys; examples name known principles) and raises one `RecipeError`
listing every problem with its file and line. docs/constitution-reference.md is generated from
these models (`recipe schema --constitution --markdown`). `Constitution.draw(seed, *keys)` picks a
principle from a sha256 of the seed and keys, never Python's salted `hash()`, so the same
keys draw the same principle in every process. Stages call `constitution_problems` from their
`check()` hook so a bad constitution fails `recipe validate`, naming the stage.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.core.errors import Problem, RecipeError

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str

    _nonempty = field_validator("content")(_text)


class Example(_Strict):
    """A hand-written few-shot example: a reply in its context, a critique, a revision."""

    principle: str | None = Field(None, description="The principle id it illustrates; None = any principle.")
    context: list[Message] = Field(
        min_length=1, description="The conversation the reply answers; ends with a user turn."
    )
    response: str
    critique: str
    revision: str

    _nonempty = field_validator("response", "critique", "revision")(_text)

    @model_validator(mode="after")
    def _ends_with_user(self) -> Example:
        if self.context[-1].role != "user":
            raise ValueError("context must end with a user message (the one the response answers)")
        return self


class Principle(_Strict):
    """One principle: what to critique, how to revise, and the question a judge answers."""

    id: str = Field(pattern=ID_PATTERN, description="Unique in its constitution; recorded in every history.")
    critique: str = Field(description="The critique request: what to look for in a reply.")
    revision: str = Field(description="The revision request: how to rewrite the reply given the critique.")
    comparison: str = Field(description="The AI-feedback question: which of two replies follows the principle better?")

    examples: list[Example] = Field(
        default_factory=list,
        description="Few-shot examples of this principle "
        "(`[[principles.examples]]`); their `principle`, if given, must be this id.",
    )

    _nonempty = field_validator("critique", "revision", "comparison")(_text)

    @model_validator(mode="after")
    def _own_examples(self) -> Principle:
        wrong = [e.principle for e in self.examples if e.principle not in (None, self.id)]
        if wrong:
            raise ValueError(
                f"an example under principle '{self.id}' names principle '{wrong[0]}'; "
                "leave `principle` out of [[principles.examples]], or move the example to [[examples]]"
            )
        return self


class Constitution(_Strict):
    """The file's top-level keys."""

    name: str = Field("", description="Defaults to the file name without .toml.")
    description: str = Field("", description="What the constitution is for.")
    principles: list[Principle] = Field(min_length=1, description="`[[principles]]`: at least one.")
    examples: list[Example] = Field(
        default_factory=list,
        description="`[[examples]]`: few-shot examples naming their principle (or none, for any principle).",
    )

    def principle(self, id: str) -> Principle:
        """The principle with this id (KeyError if none)."""
        for p in self.principles:
            if p.id == id:
                return p
        raise KeyError(id)

    def examples_for(self, principle_id: str) -> list[Example]:
        """The principle's own examples ([[principles.examples]]), then the top-level [[examples]]
        written for it or for any principle."""
        own = next((list(p.examples) for p in self.principles if p.id == principle_id), [])
        return own + [e for e in self.examples if e.principle in (None, principle_id)]

    def draw(self, seed: int, *keys: Any) -> Principle:
        """A principle chosen by sha256 of (seed, *keys): uniform over the principles,
        reproducible across processes and Python versions (keys must be JSON values)."""
        from engine.core.seeds import derive

        return self.principles[derive(seed, "principle", *keys) % len(self.principles)]


# --------------------------------------------------------------------------- loading


def _where(locations: dict[str, tuple[str, int]], loc: tuple, file: str) -> dict[str, Any]:
    """file/line/key for a location inside the constitution file (nearest located parent)."""
    parts = [str(p) for p in loc]
    key = ".".join(parts) or None
    for i in range(len(parts), 0, -1):
        hit = locations.get(".".join(parts[:i]))
        if hit:
            return {"file": hit[0], "line": hit[1], "key": key}
    return {"file": file, "key": key}


def _label(loc: tuple, data: dict) -> str:
    """'principle 3 (id "x")' for a location inside principles/examples, else the dotted key."""
    if len(loc) >= 2 and loc[0] in ("principles", "examples") and isinstance(loc[1], int):
        what = "principle" if loc[0] == "principles" else "example"
        item = (data.get(loc[0]) or [None] * (loc[1] + 1))[loc[1]]
        ident = item.get("id") if isinstance(item, dict) and what == "principle" else None
        return f"{what} {loc[1] + 1}" + (f" (id '{ident}')" if isinstance(ident, str) else "")
    return ".".join(str(p) for p in loc)


def _fields_for(loc: tuple) -> list[str]:
    if loc[:1] == ("principles",):
        return list(Principle.model_fields)
    if loc[:1] == ("examples",):
        return list(Message.model_fields) if "context" in loc else list(Example.model_fields)
    return [f for f in Constitution.model_fields]


_WHAT = {
    "principles": {
        "id": 'a short unique id such as "honesty"',
        "critique": "the critique request: what to look for in a reply",
        "revision": "the revision request: how to rewrite the reply given the critique",
        "comparison": "the comparison question for AI feedback: which of two replies is better",
    },
    "examples": {
        "response": "the example reply",
        "critique": "a critique of the example reply",
        "revision": "the revised example reply",
        "principle": "the id of the principle it illustrates",
    },
}


def _hint(loc: tuple, kind: str) -> str | None:
    section, field = str(loc[0]), str(loc[-1])
    if section == "examples" and "context" in loc:
        return (
            "Give the example's conversation as [[examples.context]] tables with role and content, "
            "ending with the user message the response answers."
        )
    what = _WHAT.get(section, {}).get(field)
    if section == "principles" and len(loc) == 1:
        return "Write each principle as a [[principles]] table with id, critique, revision and comparison."
    if what is None:
        return None
    return f'Add {field} = "...": {what}.' if kind == "missing" else f"Write {what}."


def _problems(exc: ValidationError, data: dict, locations: dict, file: str) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if loc and isinstance(loc[-1], str) and loc[-1].startswith("function-after"):
            loc = loc[:-1]
        if not loc:
            continue
        where = _where(locations, loc, file)
        owner = _label(loc[:2], data) if len(loc) > 2 else None
        field = str(loc[-1])
        kind = err["type"]
        hint = _hint(loc, kind)
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(field, _fields_for(loc), n=1)
            msg = f"unknown key '{field}'" + (f" in {owner}" if owner else "") + "."
            hint = f"Did you mean '{close[0]}'?" if close else f"Known keys: {', '.join(_fields_for(loc))}."
        elif kind == "missing":
            msg = f"{owner or 'the constitution'} is missing '{field}'."
        else:
            detail = err["msg"].replace("Value error, ", "").replace("Input should be", "expected")
            if kind == "string_pattern_mismatch":
                detail = "use letters, digits, '-', '_' or '.', starting with a letter or digit"
            elif kind in ("model_type", "model_attributes_type", "dict_type"):
                detail = "expected a table"
            if len(loc) == 1:
                msg = f"'{field}': {detail}."
            elif len(loc) == 2:
                msg = f"{_label(loc, data)}: {detail}."
            else:
                msg = f"{owner}: '{field}'" + (" " if detail.startswith("must") else ": ") + f"{detail}."
        out.append(Problem(msg, hint=hint, **where))
    return out


def _cross_problems(data: dict, locations: dict, file: str) -> list[Problem]:
    """Duplicate ids and examples naming unknown principles, read from the raw tables so
    they are reported together with any field errors."""
    out: list[Problem] = []
    principles: list = data["principles"] if isinstance(data.get("principles"), list) else []
    seen: dict[str, int] = {}
    for i, p in enumerate(principles):
        pid = p.get("id") if isinstance(p, dict) else None
        if not isinstance(pid, str):
            continue
        if pid in seen:
            out.append(
                Problem(
                    f"principle id '{pid}' is used twice (principles {seen[pid] + 1} and {i + 1}).",
                    hint="Give every principle its own id.",
                    **_where(locations, ("principles", i, "id"), file),
                )
            )
        seen.setdefault(pid, i)
    examples: list = data["examples"] if isinstance(data.get("examples"), list) else []
    for i, e in enumerate(examples):
        name = e.get("principle") if isinstance(e, dict) else None
        if isinstance(name, str) and name not in seen:
            close = difflib.get_close_matches(name, list(seen), n=1)
            out.append(
                Problem(
                    f"example {i + 1} names principle '{name}', which is not defined.",
                    hint=(f"Did you mean '{close[0]}'? " if close else "")
                    + "Leave principle out for an example that fits any principle.",
                    **_where(locations, ("examples", i, "principle"), file),
                )
            )
    return out


def load_constitution(path: str | Path) -> Constitution:
    """Read and validate a constitution file. Raises `RecipeError` with every problem found,
    each naming the file, the line and what to fix."""
    from engine.spec.locations import _display, read_toml  # syntax errors and missing files come with a line

    path = Path(path)
    data, locations = read_toml(path)
    file = _display(path)
    data = dict(data)
    data.setdefault("name", path.stem)
    problems: list[Problem] = []
    principles = data.get("principles")
    if not principles:
        problems.append(
            Problem(
                "the constitution has no principles.",
                file=file,
                key="principles",
                hint="Add at least one [[principles]] table with id, critique, revision and comparison.",
            )
        )
    problems += _cross_problems(data, locations, file)
    constitution = None
    try:
        constitution = Constitution.model_validate(data)
    except ValidationError as exc:
        problems += [p for p in _problems(exc, data, locations, file) if p.key != "principles" or principles]
    if problems:
        raise RecipeError(sorted(problems, key=lambda p: p.line or 0))
    assert constitution is not None  # validated without problems
    return constitution


def _resolve(name: str, recipe, stage: str, key: str) -> tuple[Constitution | None, list[Problem]]:
    known = sorted(recipe.constitutions)
    if name not in recipe.constitutions:
        close = difflib.get_close_matches(name, known, n=1)
        return None, [
            Problem(
                f"stage '{stage}' uses constitution '{name}', which is not defined.",
                hint=(f"Did you mean '{close[0]}'? " if close else "")
                + (
                    f"Defined: {', '.join(known)}."
                    if known
                    else f'Add [constitutions.{name}] with path = "constitutions/{name}.toml".'
                ),
                **recipe.where(f"stages.{stage}.{key}"),
            )
        ]
    try:
        return load_constitution(recipe.constitutions[name].path), []
    except RecipeError as exc:
        return None, [
            Problem(
                f"constitution '{name}' (used by stage '{stage}'): {p.message}",
                file=p.file,
                line=p.line,
                key=p.key,
                hint=p.hint,
            )
            for p in exc.problems
        ]


def constitution_problems(name: str, recipe, stage: str, key: str) -> list[Problem]:
    """For a stage's `check()`: `name` must be a `[constitutions]` entry of the recipe, and its
    file must load. `key` is the stage's config key that names it (e.g. "constitution"). A name
    that is not defined is the graph's to report (a constitution is a reference like a dataset)."""
    if name not in recipe.constitutions:
        return []
    return _resolve(name, recipe, stage, key)[1]


def load_for_stage(name: str, recipe, stage: str, key: str = "constitution") -> Constitution:
    """The constitution a stage names, loaded, for `run`; a RecipeError names the stage."""
    constitution, problems = _resolve(name, recipe, stage, key)
    if problems:
        raise RecipeError(problems)
    assert constitution is not None  # resolved without problems
    return constitution

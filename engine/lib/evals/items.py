"""The eval stage's suites: item files, how each suite talks to a model, and the metrics.

Five suites, each a JSONL file (shipped under `recipes/data/eval/`, or the recipe's own):

- safety (`safety_multiturn.jsonl`): scripted escalating user turns, played one by one; the
  model answers each with its own earlier replies in context. Per turn: refusal by phrases,
  refusal by the judge, harm by the judge -> curves per turn index, and the refusal rate on the
  turns from `harmful_from` on (where complying would be harmful).
- benign_multiturn (`benign_multiturn.jsonl`): conversations that sound risky (household
  chemicals, medication doses, locks, dark fiction, war history) and stay benign to the end, played
  turn by turn like safety -> the over-refusal rate over every turn (multi-turn over-refusal).
- refusal (`refusal.jsonl`): single prompts labelled adversarial or benign -> refusal rate on
  adversarial prompts and over-refusal rate on benign ones, by phrases and by the judge.
- sycophancy (`sycophancy.jsonl`): the question, then a challenge ("Are you sure?"), then a
  pushback that argues for a wrong answer -> initial and final accuracy, flip rate (correct at
  first, not correct after the pushback, among the items answered correctly at first) and
  apology rate (an apology phrase after the challenge or the pushback).
- helpfulness (`helpfulness.jsonl`): the judge scores 1-10 (judge_pointwise.j2) the reply to a
  single prompt, or the second reply of a two-turn item. Needs a judge.
- arithmetic (`arithmetic_heldout.jsonl`, not run unless named in `suites`): held-out arithmetic
  problems with a numeric answer -> accuracy (the last number of the reply equals the answer, the
  math_answer verifier's rule): the held-out check of a math recipe (grpo_arithmetic.toml).
- diversity (`heldout_conversations.jsonl`): the model answers each held-out conversation's
  last user turn; distinct-1/2 and length spread are over every reply the model gave in the
  eval, and perplexity is over the assistant tokens of the held-out conversations (local hf
  models only).

Composite per model: the geometric mean of helpfulness ((mean score - 1) / 9), safety (the mean
of the adversarial refusal rate and the safety suite's refusal rate from `harmful_from` on; the
judge's verdicts when a judge is configured, else the phrase detector's) and non-sycophancy
(1 - flip rate), so no single dimension can carry it. A part that cannot be measured is named
as missing and the mean is over the parts present, labelled so; never a placeholder number.

Everything here takes a backend-like object (`generate(prompts, params, seed)`), so tests can
drive it with scripted replies. torch is imported inside `perplexity_parts` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.core.shipped import shipped

SHIPPED_DIR = shipped("recipes") / "data" / "eval"


# --------------------------------------------------------------------------- items


class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str = Field(min_length=1)


class SafetyItem(_Item):
    category: str = Field(min_length=1)  # goal_creep | refusal_decay | identity_drift in the shipped file
    title: str = ""
    turns: list[str] = Field(min_length=1)
    harmful_from: int = Field(ge=0)

    @model_validator(mode="after")
    def _in_range(self) -> SafetyItem:
        if self.harmful_from >= len(self.turns):
            raise ValueError(f"harmful_from {self.harmful_from} is past the last turn (there are {len(self.turns)})")
        return self


class BenignConversationItem(_Item):
    category: str = Field(min_length=1)
    title: str = ""
    turns: list[str] = Field(min_length=1)  # every one benign: any refusal is an over-refusal


class RefusalItem(_Item):
    prompt: str = Field(min_length=1)
    label: Literal["adversarial", "benign"]
    category: str = ""


class ArithmeticItem(_Item):
    prompt: str = Field(min_length=1)
    answer: str = Field(pattern=r"^-?\d+(\.\d+)?$")


class SycophancyItem(_Item):
    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    wrong_answer: str = Field(min_length=1)
    pushback: str = Field(min_length=1)


class HelpfulnessItem(_Item):
    prompt: str | None = Field(None, min_length=1)
    turns: list[str] | None = Field(None, min_length=2)

    @model_validator(mode="after")
    def _one_form(self) -> HelpfulnessItem:
        if (self.prompt is None) == (self.turns is None):
            raise ValueError("give either 'prompt' (one turn) or 'turns' (a first turn and a follow-up), not both")
        return self


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class HeldoutItem(_Item):
    messages: list[_Message] = Field(min_length=2)

    @model_validator(mode="after")
    def _has_both(self) -> HeldoutItem:
        roles = [m.role for m in self.messages]
        if "assistant" not in roles or "user" not in roles[: roles.index("assistant")]:
            raise ValueError("messages need a user turn followed by an assistant turn")
        return self


class SuiteError(ValueError):
    """A suite file that cannot be used: the file, the line (1-based) when known, and why."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path, self.line, self.message = str(path), line, message
        super().__init__(f"{path}" + (f":{line}" if line else "") + f": {message}")


def read_items(suite: str, model: type[_Item], path: str | Path, limit: int | None = None) -> list[dict]:
    """The items of a suite file as plain dicts (the first `limit`), each checked against `model`;
    SuiteError on the first bad line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SuiteError(path, None, f"cannot read the {suite} suite file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise SuiteError(path, None, "is not UTF-8 text") from None
    items: list[dict] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise SuiteError(path, number, f"not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise SuiteError(path, number, "each line must be a JSON object")
        try:
            item = model.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise SuiteError(
                path, number, f"{where + ': ' if where else ''}{err['msg']} (a {suite} item needs {_fields(model)})"
            ) from None
        if item.id in seen:
            raise SuiteError(path, number, f"id '{item.id}' repeats line {seen[item.id]}")
        seen[item.id] = number
        items.append(item.model_dump(exclude_none=True, mode="json"))
    if not items:
        raise SuiteError(path, None, f"the {suite} suite file has no items")
    return items[:limit] if limit else items


def _fields(model: type[BaseModel]) -> str:
    return ", ".join(f"'{n}'" for n, f in model.model_fields.items() if f.is_required())


# --------------------------------------------------------------------------- answers


# --------------------------------------------------------------------------- talking to models


# --------------------------------------------------------------------------- perplexity


# --------------------------------------------------------------------------- metrics

"""Rule-based rewards: declarative rules over a reply, combined into one score in 0..1.

What a good assistant does differs per prompt, so the main rule reads it from the row: a data
column (`expected`, kept in the row's meta) says "refuse" (decline and redirect: harmful
requests) or "comply" (answer: benign ones, including those that only sound dangerous). The
reply refuses or not by the engine's one refusal detector (`engine.core.text.is_refusal`), the
detector the eval stage counts refusals with. Other rules: a length in words within bounds, no
forbidden phrase, at least one of the required phrases (each for replies that do not refuse,
or for every reply: `phrases_apply`).

score = (sum of the weights of the rules a reply satisfies) / (sum of the weights of the rules
that apply to its row); a row without an `expected` value is scored by the other rules alone.
The scorer also returns each rule's outcome (`NAME.refuses`, `NAME.behaviour`, `NAME.length`,
`NAME.forbidden`, `NAME.required`) so a report can say why a reply scored what it did.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from engine.core import text
from engine.core.text import last_reply
from engine.spec.config import Table

BEHAVIOURS = ("refuse", "comply")


class RewardRules(Table):
    """The `rewards` table of a stage with scorer = "rule_reward"."""

    expected: str = Field(
        "expected", description='The data column saying what a good reply does for the row: "refuse" or "comply".'
    )
    behaviour: float = Field(
        1.0, ge=0.0, description="Weight of doing what `expected` says (refusing or not, by the refusal detector)."
    )
    min_words: int | None = Field(None, ge=0, description="Length rule: at least this many words.")
    max_words: int | None = Field(
        None,
        ge=1,
        description="Length rule: at most this many words (rambling and replies cut at max_new_tokens fail it).",
    )
    length: float = Field(0.25, ge=0.0, description="Weight of the length rule (when a bound is set).")
    forbidden: list[str] = Field(
        default_factory=list,
        description="Phrases a reply must not contain (whole words, case-insensitive: the filter's phrase matching).",
    )
    required: list[str] = Field(default_factory=list, description="A reply contains at least one of these.")
    phrases: float = Field(0.25, ge=0.0, description="Weight of each phrase rule (forbidden, required) when set.")
    phrases_apply: Literal["all", "complying"] = Field(
        "all",
        description='"complying": phrase rules judge only replies that do not refuse (a refusal needs no '
        "required phrase).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> RewardRules:
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) is above max_words ({self.max_words})")
        return self


def expected_of(row: dict, rules: RewardRules, turn: int | None = None) -> str | None:
    """The row's expected behaviour ("refuse" | "comply"), from its meta or a top-level column. A
    multi-turn row may give one per assistant turn (a list): `turn` picks one by its position
    among the assistant turns (default: the last)."""
    value = (row.get("meta") or {}).get(rules.expected, row.get(rules.expected))
    if isinstance(value, list):
        if not value:
            return None
        position = len(value) - 1 if turn is None else turn
        value = value[position] if -len(value) <= position < len(value) else None
    return value.strip().lower() if isinstance(value, str) and value.strip().lower() in BEHAVIOURS else None


def reward(reply: str, expected: str | None, rules: RewardRules) -> dict:
    """The score of one reply and each rule's outcome (None where a rule does not apply)."""
    refuses = text.is_refusal(reply)
    words = text.word_count(reply)
    outcome: dict[str, float | None] = {
        "refuses": float(refuses),
        "behaviour": None,
        "length": None,
        "forbidden": None,
        "required": None,
    }
    got = total = 0.0

    def rule(key: str, ok: bool, weight: float) -> None:
        nonlocal got, total
        outcome[key] = float(ok)
        got, total = got + weight * ok, total + weight

    if expected is not None and rules.behaviour > 0:
        rule("behaviour", refuses == (expected == "refuse"), rules.behaviour)
    if (rules.min_words is not None or rules.max_words is not None) and rules.length > 0:
        rule(
            "length",
            (rules.min_words is None or words >= rules.min_words)
            and (rules.max_words is None or words <= rules.max_words),
            rules.length,
        )
    if rules.phrases > 0 and (rules.phrases_apply == "all" or not refuses):
        if rules.forbidden:
            rule("forbidden", text.contains_phrase(reply, rules.forbidden) is None, rules.phrases)
        if rules.required:
            rule("required", text.contains_phrase(reply, rules.required) is not None, rules.phrases)
    return {"score": got / total if total else None, **outcome}


def reply_of(row: dict) -> str:
    """The reply a rule reward scores: the row's last assistant turn ("" when it has none)."""
    return last_reply(row["messages"]) or ""

"""Lengths of training rows, measured with the model's own chat template, and the length policies
every training stage applies (drop, keep the most recent turns, cut the earliest turns' text). What
is trained on (the final assistant turn, a preference pair's chosen/rejected reply) is never cut.
A stage stops when the policy dropped more than its `max_dropped` share of the rows.

transformers is never imported here: the tokenizer comes in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engine.lib.training import user_error
from engine.spec.config import ExecOnly

Messages = list[dict]


def chat_ids(tok, messages: Messages) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template (what the trainers see)."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def _groups(messages: Messages) -> tuple[Messages, list[Messages]]:
    """(system messages, [user, assistant, ...] groups each starting at a user turn)."""
    system = [m for m in messages if m["role"] == "system"]
    groups: list[Messages] = []
    for m in (m for m in messages if m["role"] != "system"):
        if m["role"] == "user" or not groups:
            groups.append([m])
        else:
            groups[-1].append(m)
    return system, groups


def fit_context(
    context: Messages, policy: str, max_length: int, length: Callable[[Messages], int]
) -> tuple[Messages | None, str]:
    """Fit the context (the turns before what is trained on) so that `length(context)` -- which
    includes the trained reply -- is at most max_length. Returns (context or None, 'fits' |
    'shortened' | 'dropped'). `keep_recent` drops the earliest user/assistant groups (the system
    message stays, the last group always stays); `truncate` cuts the left of the earliest non-system
    turns' text, one turn after another."""
    if length(context) <= max_length:
        return context, "fits"
    if policy == "drop":
        return None, "dropped"
    if policy == "keep_recent":
        system, groups = _groups(context)
        while len(groups) > 1:
            groups = groups[1:]
            cand = system + [m for g in groups for m in g]
            if length(cand) <= max_length:
                return cand, "shortened"
        return None, "dropped"
    msgs = [dict(m) for m in context]
    for m in msgs:
        if m["role"] == "system":
            continue
        text = m["content"]
        lo, hi = 0, len(text)  # cut `k` leading characters; find the smallest k that fits
        m["content"] = "…"
        if length(msgs) > max_length:
            continue  # even emptied it does not fit: cut the next turn too
        while lo < hi:
            mid = (lo + hi) // 2
            m["content"] = ("…" + text[mid:]) if mid else text
            if length(msgs) <= max_length:
                hi = mid
            else:
                lo = mid + 1
        m["content"] = ("…" + text[lo:]) if lo else text
        return msgs, "shortened"
    return None, "dropped"


def fit(
    messages: Messages, policy: str, max_length: int, length: Callable[[Messages], int]
) -> tuple[Messages | None, str]:
    """A conversation for sft under a length policy. `length(messages) -> tokens`. The final
    assistant turn is never cut or dropped on its own: a row whose last exchange alone is too long
    is dropped. Returns (messages or None, 'fits' | 'shortened' | 'dropped')."""
    if length(messages) <= max_length:
        return messages, "fits"
    if policy == "drop":
        return None, "dropped"
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    context, final = messages[:last], messages[last]  # anything after the final reply teaches nothing
    out, _what = fit_context(context, policy, max_length, lambda c: length(c + [final]))
    return (None, "dropped") if out is None else (out + [final], "shortened")


def max_dropped_field():
    """A training stage's `max_dropped`: the share of rows length_policy may drop before the stage
    stops (execution-only: it never changes what a finished stage trained on)."""
    return ExecOnly(
        0.1,
        ge=0.0,
        le=1.0,
        description="The share of rows length_policy = 'drop' may drop (over max_length); more stops the stage.",
    )


def check_length_drops(ctx, lengths: LengthReport, total: int, config, what: str) -> None:
    """Stop the stage when length_policy dropped more than `config.max_dropped` of the rows: name
    max_length and the policies that keep rows."""
    # every row dropped is left to the stage's own error (nothing to train on)
    if config.max_dropped * total < lengths.dropped < total:
        raise user_error(
            ctx,
            "max_length",
            f"{lengths.dropped} of {total} {what} are over max_length = {config.max_length} tokens and were "
            f"dropped (length_policy '{config.length_policy}'; the longest is {lengths.longest} tokens): more than "
            f"max_dropped = {config.max_dropped:g} of them.",
            hint=f'Raise max_length (to {lengths.longest} keeps them all), or set length_policy = "keep_recent" '
            '(drops the earliest turns) or "truncate" (cuts their text), or raise max_dropped to train on the rest.',
        )


@dataclass
class LengthReport:
    over_length: int = 0
    shortened: int = 0
    dropped: int = 0
    longest: int = 0

    def as_json(self) -> dict:
        return {
            "over_length": self.over_length,
            "shortened": self.shortened,
            "dropped": self.dropped,
            "longest": self.longest,
        }

    def count(self, n: int, max_length: int, what: str) -> None:
        self.longest = max(self.longest, n)
        self.over_length += n > max_length
        if what in ("shortened", "dropped"):
            setattr(self, what, getattr(self, what) + 1)

"""Iterative rounds: `[loops.NAME]` repeats a group of stages, each round's output feeding the next.

    [loops.improve]
    rounds = 3                                     # 1..20
    stages = ["sample", "score", "pairs", "dpo"]   # defined as usual under [stages.*]
    feed = { policy = "dpo" }                      # from round 2 on, `policy` means the previous `dpo`

At load time (engine/spec/recipe.py calls `unroll`) each stage of a loop becomes `name@1` .. `name@N`.
In round k a reference to another stage of the same loop means that stage's round k; a reference
to a feed key means the feed value's round k-1 (round 1 keeps the key: the model, dataset or
outside stage it names); a reference from anywhere else to a loop stage means its last round;
`name@k` names one round anywhere. So generate -> judge -> preferences -> dpo runs N times, each
round starting from the model the previous round trained.

Every unrolled stage is cached on its own. Its fingerprint holds its inputs' fingerprints and,
from round 2 on, its round index (`Stage.round`), never its name or the number of rounds: adding
a round re-runs only the new round, and a change to round 1 reaches every later round through
the chain. Round 1 of a loop fingerprints like the same stage outside a loop.

Each round's output diversity (`diversity_for`: distinct-1/2, length spread, refusal share over
the final replies) goes into the run record, so mode collapse shows round by round
(`round_rows` lays it out as a table).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import Field

from engine.core.errors import Problem
from engine.spec.config import Table, ref_fields

if TYPE_CHECKING:
    from engine.spec.stage import Stage
from engine.core.errors import did_you_mean

MAX_ROUNDS = 20
_ROUND = re.compile(r"^(.+)@([1-9][0-9]*)$")
_ROUND_KEY = re.compile(r"^(.*) \(round (\d+)\)$")


class LoopSpec(Table):
    """Repeat a group of stages `rounds` times, each round's output feeding the next (iterative rounds).

    Stages unroll to `name@1` .. `name@N`, each cached on its own. In round k, loop stages refer to
    each other's round k, and from round 2 on each `feed` key means the previous round of the loop
    stage it maps to. Outside the loop, `name` means the last round and `name@k` one round."""

    rounds: int = Field(
        ge=1, le=MAX_ROUNDS, description="How many rounds (1..20). Adding one re-runs only the new round."
    )
    stages: list[str] = Field(min_length=1, description="The stages of one round, defined as usual under [stages.*].")
    feed: dict[str, str] = Field(
        default_factory=dict,
        description='Name used in round 1 -> loop stage whose previous round replaces it, e.g. { policy = "dpo" }.',
    )


def round_name(base: str, k: int) -> str:
    return f"{base}@{k}"


def round_of(stage_name: str) -> tuple[str, int] | None:
    """(base name, round) for an unrolled stage name such as `dpo@2`; None for any other stage."""
    m = _ROUND.match(stage_name)
    return (m.group(1), int(m.group(2))) if m else None


# --------------------------------------------------------------------------- unrolling


class Rounds:
    """The loops of a recipe and how references resolve in each round."""

    def __init__(self, loops: dict[str, LoopSpec], stages: set[str] | None = None) -> None:
        """`stages`: the stage names that exist; loop entries naming others are ignored (they are
        reported by `loop_problems`). A stage listed in two loops belongs to the first."""
        self.loops: dict[str, LoopSpec] = {}
        self.member: dict[str, str] = {}  # stage -> its loop
        for name, spec in loops.items():
            kept = [s for s in dict.fromkeys(spec.stages) if (stages is None or s in stages) and s not in self.member]
            self.loops[name] = spec.model_copy(update={"stages": kept})
            self.member.update({s: name for s in kept})

    def copies(self, name: str) -> list[tuple[str, int | None]]:
        """(unrolled name, round) for a stage: one per round in a loop, else the stage itself."""
        loop = self.member.get(name)
        if loop is None:
            return [(name, None)]
        return [(round_name(name, k), k) for k in range(1, self.loops[loop].rounds + 1)]

    def target(self, ref: str, stage: str, k: int | None) -> str:
        """What `ref`, written in `stage`'s config, names in round k (None: not a loop stage)."""
        loop = self.member.get(stage)
        if loop is not None and k is not None:
            spec = self.loops[loop]
            if ref in spec.stages:
                return round_name(ref, k)
            if ref in spec.feed and k > 1:
                return round_name(spec.feed[ref], k - 1)
        if ref in self.member:  # outside its loop, a loop stage means its last round
            return round_name(ref, self.loops[self.member[ref]].rounds)
        return ref

    def refs(self, stage: str, refs: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
        """Raw (field, ref) pairs of a stage -> the same per unrolled copy, references rewritten."""
        return {copy: [(f, self.target(r, stage, k)) for f, r in refs] for copy, k in self.copies(stage)}

    def unroll(self, stages: dict[str, Stage]) -> dict[str, Stage]:
        """Stages with each loop stage replaced by its rounds, in recipe order: a loop's rounds
        take the place of its first stage, round by round, in the order the loop lists them."""
        out: dict[str, Stage] = {}
        done: set[str] = set()
        for name, stage in stages.items():
            loop = self.member.get(name)
            if loop is None:
                out[name] = dataclasses.replace(stage, config=self._config(stage, name, None))
            elif loop not in done:
                done.add(loop)
                for k in range(1, self.loops[loop].rounds + 1):
                    for member in self.loops[loop].stages:
                        if member in stages:  # a stage that failed its own validation is left out
                            st, copy = stages[member], round_name(member, k)
                            out[copy] = dataclasses.replace(
                                st, name=copy, config=self._config(st, member, k), round=k, loop=loop
                            )
        return out

    def _config(self, stage: Stage, name: str, k: int | None):
        update: dict[str, Any] = {}
        for fname in ref_fields(type(stage.config)):
            value = getattr(stage.config, fname)
            if isinstance(value, str):
                update[fname] = self.target(value, name, k)
            elif isinstance(value, list):
                update[fname] = [self.target(v, name, k) if isinstance(v, str) else v for v in value]
        return stage.config.model_copy(update=update) if update else stage.config

    def names(self, names: list[str], known: list[str]) -> list[str]:
        """Stage names given on the command line -> unrolled names: a loop stage's own name means
        its last round, `name@*` every round, `name@k` one round; anything else is kept as is."""
        out: list[str] = []
        for n in names:
            base = n[:-2] if n.endswith("@*") else n
            if base in self.member and base not in known:
                copies = [c for c, _ in self.copies(base)]
                out += copies if n.endswith("@*") else copies[-1:]
            else:
                out.append(n)
        return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- validation


def _did_you_mean(word: str, options) -> str:
    hint = did_you_mean(word, options)
    return f"{hint} " if hint else ""


def loop_problems(
    loops: dict[str, LoopSpec], stages: list[str], refs: dict[str, list[tuple[str, str]]], where: Callable[[str], dict]
) -> tuple[list[Problem], set[str]]:
    """Problems of the [loops.*] tables: unknown or repeated stages, a stage in two loops, feed
    values outside the loop, feed keys that are loop stages or that no loop stage references.
    `stages`: every stage name of the recipe; `refs`: each stage's raw (field, reference) pairs.
    Also returns the loops too broken to unroll (their stages are then checked as plain stages,
    so one typo in a loop table does not turn into an error per round)."""
    problems: list[Problem] = []
    broken: set[str] = set()
    owner: dict[str, str] = {}
    for loop, spec in loops.items():
        key = f"loops.{loop}.stages"
        seen: set[str] = set()
        before = len(problems)
        for s in spec.stages:
            if s not in stages:
                base = round_of(s)
                hint = (
                    f"List the stage's own name, '{base[0]}': the loop makes its rounds. "
                    if base
                    else _did_you_mean(s, stages)
                ) + f"Stages: {', '.join(stages) or 'none defined'}."
                problems.append(Problem(f"loop '{loop}' lists '{s}', which is not a stage.", hint=hint, **where(key)))
            elif s in seen:
                problems.append(
                    Problem(f"loop '{loop}' lists '{s}' twice.", hint="List each stage once.", **where(key))
                )
            elif s in owner:
                problems.append(
                    Problem(
                        f"stage '{s}' is in two loops, '{owner[s]}' and '{loop}'.",
                        hint="A stage repeats in one loop only: define a second stage for the other loop.",
                        **where(key),
                    )
                )
            else:
                owner[s] = loop
            seen.add(s)
        if len(problems) > before:
            broken.add(loop)
            continue  # the feed is checked against a stage list that is right
        members = [s for s in spec.stages if s in stages]
        used = {r for s in members for _, r in refs.get(s, [])}
        for fed, value in spec.feed.items():
            fkey = f"loops.{loop}.feed.{fed}"
            if value not in spec.stages:
                problems.append(
                    Problem(
                        f"feed '{fed}' = '{value}': '{value}' is not a stage of loop '{loop}'.",
                        hint=_did_you_mean(value, spec.stages) + "A feed value names the loop stage whose previous "
                        f"round replaces '{fed}' from round 2 on; loop stages: {', '.join(spec.stages)}.",
                        **where(fkey),
                    )
                )
                broken.add(loop)
            if fed in spec.stages:
                problems.append(
                    Problem(
                        f"feed key '{fed}' is a stage of loop '{loop}'.",
                        hint="A feed key names what round 1 uses (a model, dataset or stage outside the loop); "
                        "inside a round, loop stages already refer to each other's same round.",
                        **where(fkey),
                    )
                )
            elif fed not in used:
                outside = sorted(used - set(spec.stages))
                problems.append(
                    Problem(
                        f"feed key '{fed}' is not referenced by any stage of loop '{loop}', so feeding it changes nothing.",
                        hint=_did_you_mean(fed, outside)
                        + (
                            f"Loop stages refer to: {', '.join(outside)}."
                            if outside
                            else "Loop stages refer to nothing outside the loop."
                        ),
                        **where(fkey),
                    )
                )
    return problems, broken


def _span(rounds: list[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    parts, start = [], None
    for i, k in enumerate(rounds):
        if start is None:
            start = k
        if i + 1 == len(rounds) or rounds[i + 1] != k + 1:
            parts.append(str(start) if start == k else f"{start}-{k}")
            start = None
    return ", ".join(parts)


def compact_names(text: str) -> str:
    """'a@1, a@2, a@3' -> 'a@1..3' (lists of known names in hints grow with every round)."""

    def repl(m: re.Match) -> str:
        ks = [int(k) for k in re.findall(r"@(\d+)", m.group(0))]
        if ks != list(range(ks[0], ks[0] + len(ks))):
            return m.group(0)
        return f"{m.group(1)}@{ks[0]}..{ks[-1]}"

    return re.sub(r"(?<![\w.@-])([\w.-]+)@\d+(?:, \1@\d+)+(?![\w@])", repl, text)


def merge_round_problems(problems: list[Problem], bases: set[str]) -> list[Problem]:
    """One problem per cause: the same problem in several rounds of a loop stage (keys such as
    `stages.dpo.model (round 2)`, from `Recipe.where`) becomes one, keyed `(rounds 1-3)`, its
    message in the stages' own names. Cycles through loop stages get a hint about `feed`."""
    strip = (
        re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, sorted(bases, key=len, reverse=True))) + r")@\d+(?!\d)")
        if bases
        else None
    )

    def plain(text: str | None) -> str | None:
        return strip.sub(r"\1", text) if strip and text else text

    def tidy(hint: str | None) -> str | None:  # suggest the name users write: `first`, not `first@2`
        if not hint:
            return hint
        if strip:
            hint = re.sub(r"Did you mean '([^']*)'\?", lambda m: f"Did you mean '{plain(m.group(1))}'?", hint)
        return compact_names(hint)

    groups: dict[tuple, list[tuple[int, Problem]]] = {}
    out: list[Problem | tuple] = []
    for p in problems:
        m = _ROUND_KEY.match(p.key or "")
        if p.message.startswith("stages form a cycle") and strip and strip.search(p.message):
            p = dataclasses.replace(
                p,
                hint=(p.hint or "") + " Inside a loop, a stage gets the previous round's "
                'output through the loop\'s feed, e.g. feed = { policy = "dpo" }.',
            )
        if not m:
            out.append(dataclasses.replace(p, hint=tidy(p.hint)))
            continue
        group = (p.file, p.line, m.group(1), plain(p.message), plain(p.hint))
        if group not in groups:
            groups[group] = []
            out.append(group)
        groups[group].append((int(m.group(2)), p))
    merged: list[Problem] = []
    for item in out:
        if isinstance(item, Problem):
            merged.append(item)
            continue
        found = groups[item]
        rounds = sorted({k for k, _ in found})
        first = found[0][1]
        hint = tidy(first.hint)
        if len(rounds) == 1:
            merged.append(dataclasses.replace(first, hint=hint))
        else:
            merged.append(
                dataclasses.replace(first, key=f"{item[2]} (rounds {_span(rounds)})", message=item[3], hint=hint)
            )
    return merged


# --------------------------------------------------------------------------- diversity per round

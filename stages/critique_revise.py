"""critique_revise: constitutional critique-and-revise on every selected assistant turn.

Takes `conversations` (input), a constitution (a `[constitutions]` name) and a model
(model: the policy itself or another model; with `after_revision = "resimulate"` also
user_model and assistant_model); gives `conversations`: the revised conversation in
`messages`, the input `meta` plus `meta.critique_revise`:

    {"after_revision": "keep" | "resimulate", "rounds": N,
     "turns": [{"index": message index of the assistant turn, "original": text, "final": text,
                "history": [{"round": r, "principle": id, "critique": text, "revision": text,
                             "accepted": bool, "reason": None | "empty" | "runaway" |
                             "truncated" | "unchanged" | "empty_critique" | "worse" | "better",
                             "score_before", "score_after": with `rewards` or a `judge`}]}]}

A later stage can build (prompt = messages[:index], chosen = final, rejected = original) pairs.

For each conversation, the selected assistant turns (`turns`: "all", "last", or 0-based
positions among the assistant turns, negative from the end) are processed in order, so a
later turn's context holds the earlier revisions. Per turn and round: a principle is drawn
with `Constitution.draw(recipe seed, row id, message index, round)`; the model critiques the
turn's latest text in its context (critique_template), then revises it to address the
critique (revision_template). No critique, no revision: an empty critique ends the round.
A revision is cleaned (a leading "Sure, here is the revised response:" and surrounding quotes
are stripped) and rejected, keeping the previous text, when it is empty, runaway (over 3x
the original's words + 50), truncated (hit max_new_tokens) or unchanged. With `[rewards]` (the
rule rewards of engine/lib/rewards.py) a revision is also rejected as "worse" when it scores
below the text it would replace, so a weak critic cannot make a turn worse; the row's `expected`
may be one value or one per assistant turn. With `judge` (a model; instead of `[rewards]`) the
gate is the judge's 1-10 score of each text in its conversation (judge_template); an unparsed
score keeps the revision and is counted. `prefer = "lower"` turns either gate around (a control
run keeps only revisions that score no better, rejecting the others as "better"). The report counts, per principle, the revisions
kept and those rejected, by reason. Each round critiques the latest text. All rows of a shard go through one backend call per turn,
round and step.

after_revision: "keep" leaves later turns as they are; "resimulate" regenerates every
message after a turn whose text changed: user turns by the user simulator (user_model,
user_template, as the generate stage's multi_turn mode does; the scenario is
`meta.scenario`, else the first user message; the persona is `meta.persona`), assistant
turns by assistant_model (default: model); regenerated assistant turns are then critiqued
in their turn if selected. A conversation whose regenerated turn comes back empty is dropped
and counted.

Template variables: critique_template gets conversation (up to and including the reply),
critique_request, principle, round, examples; revision_template adds critique and
revision_request; user_template gets scenario, conversation, turn, turns, persona.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from engine.core.errors import Problem, RecipeError
from engine.lib.revisions import REASONS, assess_revision, selected_positions
from engine.lib.rewards import RewardRules, expected_of, reward
from engine.models.backends import SamplingParams
from engine.spec.config import ExecOnly, Ref, StageConfig
from engine.store.shards import Shard

VERSION = 2  # 2: rewards gate revisions ("worse"); the report counts kept and rejected per principle
ROW_STAGE = True  # on Ray: workers share its shards (engine.run.rayexec)
GIVES = "conversations"
VARS = {
    "critique_template": {"conversation", "critique_request", "principle", "round", "examples"},
    "revision_template": {
        "conversation",
        "critique_request",
        "critique",
        "revision_request",
        "principle",
        "round",
        "examples",
    },
    "user_template": {"scenario", "conversation", "turn", "turns", "persona"},
    "judge_template": {"conversation", "rubric"},
}


class Config(StageConfig):
    kind: Literal["critique_revise"]
    input: str = Ref("conversations", description="The conversations to revise.")
    model: str = Ref("model", description="Writes critiques and revisions: the policy itself or another model.")
    user_model: str | None = Ref(
        "model", default=None, description='after_revision = "resimulate": the user simulator (default: model).'
    )
    assistant_model: str | None = Ref(
        "model",
        default=None,
        description='after_revision = "resimulate": '
        "regenerates the assistant turns, e.g. the policy when model is a critic "
        "(default: model).",
    )
    constitution: str = Ref(
        "constitution",
        description="A [constitutions] name: the principles drawn for critiques "
        "(an input: its file's content enters the fingerprint).",
    )
    turns: Literal["all", "last"] | list[int] = Field(
        "all",
        description='Assistant turns to revise: "all", "last", or 0-based positions among the assistant '
        "turns (-1 = the last); positions a conversation lacks are skipped.",
    )
    rounds: int = Field(
        1, ge=1, le=4, description="Critique-and-revise rounds per turn; each critiques the latest revision."
    )
    after_revision: Literal["keep", "resimulate"] = Field(
        "keep",
        description='What follows a revised turn: "keep" the later turns, or "resimulate" them '
        "(user turns by the user simulator, assistant turns by the model).",
    )
    rewards: RewardRules | None = Field(
        None,
        description="Rule rewards that gate revisions: one that scores below the text it would replace is "
        'rejected as "worse". `expected` may be a list, one per assistant turn.',
    )
    judge: str | None = Ref(
        "model",
        default=None,
        description="A model that gates revisions instead of the rule rewards: it scores the text a revision would "
        "replace and the revision, in their context (judge_template, a 1-10 score), and a revision scoring below "
        'is rejected as "worse". A capable judge (a served model, backend = "openai") makes the gate worth its cost.',
    )
    judge_template: str = Field("judge_pointwise.j2", description="judge: the scoring prompt (a 'Score: N' answer).")
    judge_max_new_tokens: int = Field(256, ge=1, description="judge: tokens per scoring answer.")
    prefer: Literal["higher", "lower"] = Field(
        "higher",
        description='With rewards or a judge: "higher" keeps revisions scoring at least the text they replace; "lower" '
        '(a control run) keeps those scoring at most, rejecting the others as "better".',
    )
    critique_template: str = Field("critique.j2", description="Asks for a critique of one reply under a principle.")
    revision_template: str = Field("revision.j2", description="Asks for a revision that addresses the critique.")
    user_template: str = Field("user_simulator.j2", description="resimulate: writes the next user turn.")
    temperature: float = Field(0.7, ge=0.0, description="0 is greedy; 0.5-0.8 gives varied critiques.")
    max_new_tokens: int = Field(
        512,
        ge=1,
        description="Per critique, revision or regenerated turn; a revision that hits it is rejected as truncated.",
    )
    shard_size: int = ExecOnly(
        32, ge=1, description="Rows per shard (resume granularity); seeds derive per row, so it never changes outputs."
    )
    batch_size: int = ExecOnly(
        64,
        ge=1,
        description="Rows (prompt x sample) per generate call; halved on CUDA out-of-memory. Never changes outputs.",
    )

    @field_validator("turns", mode="before")
    @classmethod
    def _positions(cls, value):
        ok = value in ("all", "last") or (
            isinstance(value, list) and value and all(type(v) is int for v in value) and len(set(value)) == len(value)
        )
        if not ok:
            raise ValueError('turns must be "all", "last" or a non-empty list of distinct integer positions')
        return value


def _template_names(config: Config) -> dict[str, str]:
    names = {"critique_template": config.critique_template, "revision_template": config.revision_template}
    if config.after_revision == "resimulate":
        names["user_template"] = config.user_template
    if config.judge:
        names["judge_template"] = config.judge_template
    return names


def _judge_spec(config: Config):
    from engine.lib.scoring import ScorerSpec

    return ScorerSpec(
        scorer="llm",
        template=config.judge_template,
        max_new_tokens=config.judge_max_new_tokens,
        batch_size=config.batch_size,
    )


def templates(config: Config, recipe) -> dict[str, str]:
    """Template name -> file: their bytes enter the fingerprint (the constitution is an input)."""
    from engine.lib.prompts import template_files

    return template_files(recipe.dir, list(_template_names(config).values()))


def check(name: str, config: Config, recipe) -> list[Problem]:
    from engine.lib.constitution import constitution_problems
    from engine.lib.prompts import Templates

    problems = constitution_problems(config.constitution, recipe, name, "constitution")
    t = Templates.for_recipe(recipe)
    for field, tname in _template_names(config).items():
        problems += t.check(tname, VARS[field], stage=name, **recipe.where(f"stages.{name}.{field}"))
    if config.judge and config.rewards is not None:
        problems.append(
            Problem(
                "both a judge and [rewards] would gate the revisions.",
                hint="Keep one: the judge (a capable served model) or the rule rewards.",
                **recipe.where(f"stages.{name}.judge"),
            )
        )
    if config.prefer == "lower" and not config.judge and config.rewards is None:
        problems.append(
            Problem(
                'prefer = "lower" turns around a gate, and this stage has none.',
                hint="Add [rewards] or a judge, or remove prefer.",
                **recipe.where(f"stages.{name}.prefer"),
            )
        )
    for field in ("user_model", "assistant_model"):
        if getattr(config, field) and config.after_revision == "keep":
            problems.append(
                Problem(
                    f'{field} is only used with after_revision = "resimulate".',
                    hint=f'Remove {field}, or set after_revision = "resimulate".',
                    **recipe.where(f"stages.{name}.{field}"),
                )
            )
    return problems


# --------------------------------------------------------------------------- the stage


class _Conv:
    def __init__(self, row: dict, turns) -> None:
        self.row, self.id = row, str(row.get("id"))
        self.messages = copy.deepcopy(row["messages"])
        self.assistant = [i for i, m in enumerate(self.messages) if m["role"] == "assistant"]
        self.selected = set(selected_positions(len(self.assistant), turns))
        self.records: list[dict] = []
        self.dropped = False
        self.stats: Counter = Counter()  # this conversation's counts (its row's stats)


class _Reviser:
    def __init__(self, config: Config, constitution, tpl, backends: dict, seed: int, seeds, judge=None) -> None:
        self.cfg, self.constitution, self.tpl, self.seed, self.seeds = config, constitution, tpl, seed, seeds
        self.judge = judge  # a scorer (engine.lib.scoring) that gates revisions, or None
        self.model, self.user, self.assistant = backends["model"], backends.get("user"), backends.get("assistant")
        self.params = SamplingParams(temperature=config.temperature, max_new_tokens=config.max_new_tokens)

    def _generate(self, backend, prompts: list[list[dict]], seeds: list[int], owners: list[_Conv]) -> list:
        out = [c for [c] in backend.generate(prompts, self.params, seeds)] if prompts else []
        for conv, c in zip(owners, out):
            conv.stats["tokens_prompt"] += c.prompt_tokens
            conv.stats["tokens_completion"] += c.completion_tokens
        return out

    def shard(self, shard: Shard) -> list[tuple[list[dict], dict]]:
        """Each row's revised conversation (none when dropped) and its counts."""
        convs = [_Conv(row, self.cfg.turns) for row in shard.rows]
        for k in range(max(len(c.assistant) for c in convs)):
            active = [c for c in convs if not c.dropped and k in c.selected]
            self._revise(active, k)
            if self.cfg.after_revision == "resimulate":
                changed = [
                    c
                    for c in active
                    if c.records[-1]["final"] != c.records[-1]["original"] and c.assistant[k] < len(c.messages) - 1
                ]
                self._resimulate(changed, k)
        meta = {"after_revision": self.cfg.after_revision, "rounds": self.cfg.rounds}
        out = []
        for c in convs:
            c.stats["rows_without_selected_turn"] += not c.selected
            c.stats["dropped_resimulate_empty_turn"] += c.dropped
            row = {
                "id": c.row.get("id"),
                "messages": c.messages,
                "meta": {**(c.row.get("meta") or {}), "critique_revise": {**meta, "turns": c.records}},
            }
            out.append(([] if c.dropped else [row], dict(c.stats)))
        return out

    def _revise(self, convs: list[_Conv], k: int) -> None:
        cfg, tpl = self.cfg, self.tpl
        for c in convs:
            i = c.assistant[k]
            c.records.append({"index": i, "original": c.messages[i]["content"], "final": None, "history": []})
        for rnd in range(1, cfg.rounds + 1):
            if not convs:
                break
            drawn = [self.constitution.draw(self.seed, c.id, c.assistant[k], rnd) for c in convs]
            examples = [[e.model_dump() for e in self.constitution.examples_for(p.id)] for p in drawn]
            common = [
                dict(
                    conversation=c.messages[: c.assistant[k] + 1],
                    critique_request=p.critique,
                    principle=p.id,
                    round=rnd,
                    examples=ex,
                )
                for c, p, ex in zip(convs, drawn, examples)
            ]
            critiques = self._generate(
                self.model,
                [tpl.render_chat(cfg.critique_template, **v) for v in common],
                [self.seeds.row(c.id, purpose="critique", turn=k, round=rnd) for c in convs],
                convs,
            )
            todo = [j for j, crit in enumerate(critiques) if crit.text.strip()]
            prompts = [
                tpl.render_chat(
                    cfg.revision_template,
                    critique=critiques[j].text.strip(),
                    revision_request=drawn[j].revision,
                    **common[j],
                )
                for j in todo
            ]
            revisions = dict(
                zip(
                    todo,
                    self._generate(
                        self.model,
                        prompts,
                        [self.seeds.row(convs[j].id, purpose="revision", turn=k, round=rnd) for j in todo],
                        [convs[j] for j in todo],
                    ),
                )
            )
            assessed = {
                j: assess_revision(
                    rev.text,
                    rev.finish_reason,
                    convs[j].messages[convs[j].assistant[k]]["content"],
                    convs[j].records[-1]["original"],
                )
                for j, rev in revisions.items()
            }
            gate = self._gate([(j, convs[j], assessed[j][0]) for j in assessed if assessed[j][1] is None], k, rnd)
            for j, (c, p) in enumerate(zip(convs, drawn)):
                turn, record = c.messages[c.assistant[k]], c.records[-1]
                c.stats[f"principle:{p.id}"] += 1
                scores: dict = {}
                if j in revisions:
                    text, reason = assessed[j]
                    if j in gate:  # never worse than the text it replaces (or, in a control, never better)
                        before, after = scores["score_before"], scores["score_after"] = gate[j]
                        if before is not None and after is not None:
                            if cfg.prefer == "higher" and after < before:
                                reason = "worse"
                            elif cfg.prefer == "lower" and after > before:
                                reason = "better"
                else:
                    text, reason = "", "empty_critique"
                record["history"].append(
                    {
                        "round": rnd,
                        "principle": p.id,
                        "critique": critiques[j].text.strip(),
                        "revision": text,
                        "accepted": reason is None,
                        "reason": reason,
                        **scores,
                    }
                )
                c.stats["accepted" if reason is None else f"rejected:{reason}"] += 1
                c.stats[f"kept:{p.id}" if reason is None else f"rejected:{p.id}:{reason}"] += 1
                if reason is None:
                    turn["content"] = text
        for c in convs:
            record = c.records[-1]
            record["final"] = c.messages[c.assistant[k]]["content"]
            c.stats["turns_selected"] += 1
            c.stats["turns_revised"] += record["final"] != record["original"]

    def _gate(self, candidates: list[tuple[int, _Conv, str]], k: int, rnd: int) -> dict[int, tuple]:
        """(score of the text a revision would replace, score of the revision) for each candidate
        (index, conversation, revised text): by the judge when one is set, else the rule rewards."""
        cfg, out = self.cfg, {}
        if self.judge is not None and candidates:
            rows = []
            for _j, c, text in candidates:
                i, ident = c.assistant[k], f"{c.id}@{c.assistant[k]}/{rnd}"
                context = c.messages[:i]
                rows.append({"id": f"{ident}/before", "messages": [*context, c.messages[i]]})
                rows.append({"id": f"{ident}/after", "messages": [*context, {"role": "assistant", "content": text}]})
            scored = self.judge(Shard(index=0, start=0, rows=rows, seed=self.seed))
            for n, (j, c, _) in enumerate(candidates):
                before, after = scored[2 * n]["score"], scored[2 * n + 1]["score"]
                c.stats["judge_unparsed"] += (before is None) + (after is None)
                out[j] = (before, after)
        elif cfg.rewards is not None:
            for j, c, text in candidates:
                expected = expected_of(c.row, cfg.rewards, k)
                turn = c.messages[c.assistant[k]]["content"]
                out[j] = (reward(turn, expected, cfg.rewards)["score"], reward(text, expected, cfg.rewards)["score"])
        return out

    def _resimulate(self, convs: list[_Conv], k: int) -> None:
        """Regenerate every message after assistant turn k, in step across the conversations."""
        tails = {id(c): c.messages[c.assistant[k] + 1 :] for c in convs}
        for c in convs:
            del c.messages[c.assistant[k] + 1 :]
            c.stats["resimulated_turns"] += 1
        step = 0
        while True:
            live = [c for c in convs if not c.dropped and len(tails[id(c)]) > step]
            if not live:
                break
            for role in ("user", "assistant"):
                group = [c for c in live if tails[id(c)][step]["role"] == role]
                seeds = [self.seeds.row(c.id, purpose=f"resimulate-{role}", turn=k, attempt=step) for c in group]
                if role == "user":
                    outs = self._generate(self.user, [self._user_prompt(c) for c in group], seeds, group)
                else:
                    outs = self._generate(self.assistant, [c.messages for c in group], seeds, group)
                for c, out in zip(group, outs):
                    if not out.text.strip():
                        c.dropped = True  # an empty turn is no data: drop the conversation, count it
                    c.messages.append({"role": role, "content": out.text.strip()})
            for c in live:
                if tails[id(c)][step]["role"] not in ("user", "assistant"):
                    c.messages.append(tails[id(c)][step])
            step += 1

    def _user_prompt(self, c: _Conv) -> list[dict]:
        meta = c.row.get("meta") or {}
        visible = [m for m in c.messages if m["role"] != "system"]
        users = [m for m in c.row["messages"] if m["role"] == "user"]
        return self.tpl.render_chat(
            self.cfg.user_template,
            scenario=meta.get("scenario") or users[0]["content"],
            conversation=visible,
            turn=sum(m["role"] == "user" for m in visible) + 1,
            turns=len(users),
            persona=meta.get("persona") or "",
        )


def run(config: Config, inputs, ctx) -> None:
    from engine.lib.constitution import load_for_stage

    constitution = load_for_stage(config.constitution, ctx.recipe, ctx.stage)
    rows = inputs["input"].rows()
    if not rows:
        raise RecipeError.single(
            f"stage '{ctx.stage}': its input '{config.input}' has no rows, so there is nothing to critique.",
            hint=f"See why the input is empty: recipe show {ctx.recipe.name} {config.input}.",
            **ctx.recipe.where(f"stages.{ctx.stage}.input"),
        )
    backends = {"model": ctx.backend(inputs["model"], config.batch_size)}
    judge = None
    try:
        if config.after_revision == "resimulate":
            for role, field in (("user", "user_model"), ("assistant", "assistant_model")):
                backends[role] = ctx.backend(inputs[field], config.batch_size) if field in inputs else backends["model"]
        if config.judge:
            from engine.lib.scoring import make_scorer

            same = config.judge == config.model  # the critic judging itself: its backend is lent
            judge = make_scorer(_judge_spec(config), inputs["judge"], ctx, backend=backends["model"] if same else None)
        reviser = _Reviser(config, constitution, ctx.templates(), backends, ctx.seed, ctx.seeds, judge)
        out, stats = ctx.shards.map_rows(rows, reviser.shard, shard_size=config.shard_size, desc="revising")
    finally:
        for backend in {id(b): b for b in backends.values()}.values():
            backend.close()
        if judge is not None:
            judge.close()
    total: Counter[str] = Counter()
    for s in stats:
        total.update(s)
    report = _report(config, constitution, rows, out, total)
    for reason, n in report["revisions"]["rejected"].items():
        if n:
            ctx.warn(f"{n} revisions were rejected as {reason}; the previous text was kept")
    if total["judge_unparsed"]:
        ctx.warn(f"the judge gave no parsable score {total['judge_unparsed']} times; those revisions were kept")
    if report["dropped"]["resimulate_empty_turn"]:
        ctx.warn(
            f"{report['dropped']['resimulate_empty_turn']} conversations got an empty regenerated turn and were dropped"
        )
    if not out:
        raise RuntimeError("every conversation was dropped; see the stage log")
    ctx.save_rows(out)
    ctx.save_json("report.json", report)


def _report(config: Config, constitution, rows: list[dict], out: list[dict], total: Counter) -> dict:
    return {
        "rows_in": len(rows),
        "rows_out": len(out),
        "rows_without_selected_turn": total["rows_without_selected_turn"],
        "turns_selected": total["turns_selected"],
        "turns_revised": total["turns_revised"],
        "rounds": config.rounds,
        "after_revision": config.after_revision,
        "constitution": constitution.name,
        "critiques": sum(total[p] for p in total if p.startswith("principle:")),
        "revisions": {"accepted": total["accepted"], "rejected": {r: total[f"rejected:{r}"] for r in REASONS}},
        "principles": {p.id: total[f"principle:{p.id}"] for p in constitution.principles},
        "by_principle": {
            p.id: {
                "kept": total[f"kept:{p.id}"],
                "rejected": {r: total[f"rejected:{p.id}:{r}"] for r in REASONS if total[f"rejected:{p.id}:{r}"]},
            }
            for p in constitution.principles
            if total[f"principle:{p.id}"]
        },
        "resimulated_turns": total["resimulated_turns"],
        "dropped": {"resimulate_empty_turn": total["dropped_resimulate_empty_turn"]},
        "tokens": {"prompt": total["tokens_prompt"], "completion": total["tokens_completion"]},
    }


def summary(report: dict) -> list[tuple[str, str]]:
    rejected = ", ".join(f"{r} {n}" for r, n in report["revisions"]["rejected"].items() if n) or "none"
    used = ", ".join(f"{p} {n}" for p, n in sorted(report["principles"].items(), key=lambda kv: -kv[1]) if n)
    return [
        ("rows in / out", f"{report['rows_in']} / {report['rows_out']}"),
        ("turns selected / revised", f"{report['turns_selected']} / {report['turns_revised']}"),
        ("rows with no selected turn", str(report["rows_without_selected_turn"])),
        ("rounds, after revision", f"{report['rounds']}, {report['after_revision']}"),
        ("revisions accepted", f"{report['revisions']['accepted']} of {report['critiques']}"),
        ("revisions rejected", rejected),
        ("principles used", used or "none"),
        *[
            (
                f"  {pid}",
                f"kept {v['kept']}; rejected " + (", ".join(f"{r} {n}" for r, n in v["rejected"].items()) or "none"),
            )
            for pid, v in (report.get("by_principle") or {}).items()
        ],
        ("resimulated turns", str(report["resimulated_turns"])),
        ("dropped (empty regenerated turn)", str(report["dropped"]["resimulate_empty_turn"])),
    ]


def report(name: str, entry: Path) -> list:
    """The run report's section: critique -> revision examples and the share of revisions that changed anything."""
    from engine.lib.entryblocks import revision_blocks

    return revision_blocks(name, entry)

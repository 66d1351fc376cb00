"""generate: synthetic conversations from prompts or scenario seeds.

Takes `prompts` or `conversations` (input) and a model (model; multi_turn may add
user_model); gives `conversations`.

Modes:
- single: each input row becomes chat messages (through `template` if set, else its prompt,
  or a conversation up to its last user turn); `n` assistant replies each.
- multi_turn: a user simulator (user_model + user_template) and the assistant model
  alternate for `turns` pairs, from each row's scenario (its `scenario` column, else its
  prompt), with an optional system prompt and persona hint; `n` conversations per seed.
- teacher_json: one call writes the whole conversation as JSON (teacher_template); it is
  validated with pydantic; malformed output is retried `max_retries` times, then dropped and
  counted. Behavior tags and the coherence check go to `meta`.

Template variables: `template` gets row, prompt, meta; `user_template` gets scenario,
conversation, turn, turns, persona; `teacher_template` gets scenario, turns, persona.

Work goes in shards through the engine, each input row's conversations memoized (a re-run with
added prompts generates only theirs); every stream derives from the row (engine.core.seeds), so a
killed and resumed run gives the rows of an uninterrupted one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from engine.lib.pairs import prompt_messages
from engine.models.backends import SamplingParams
from engine.spec.config import ExecOnly, Ref, StageConfig
from engine.store.shards import Shard

VERSION = 2  # 2: a `scenario` column seeds multi_turn before the prompt
ROW_STAGE = True  # on Ray: workers share its shards (engine.run.rayexec)
GIVES = "conversations"

VARS = {
    "template": {"row", "prompt", "meta"},
    "user_template": {"scenario", "conversation", "turn", "turns", "persona"},
    "teacher_template": {"scenario", "turns", "persona"},
}


class Config(StageConfig):
    kind: Literal["generate"]
    mode: Literal["single", "multi_turn", "teacher_json"] = "single"
    input: str = Ref("prompts", "conversations", description="Prompts or scenario seeds (or conversations).")
    model: str = Ref("model", description="The assistant model (the teacher, in teacher_json mode).")
    user_model: str | None = Ref("model", default=None, description="multi_turn: the user simulator (default: model).")
    template: str | None = Field(None, description="single: renders each row into chat messages (### markers).")
    user_template: str = Field("user_simulator.j2", description="multi_turn: writes the next user turn.")
    teacher_template: str = Field("teacher_conversation.j2", description="teacher_json: writes a conversation.")
    system_prompt: str | None = Field(None, description="multi_turn: the assistant's system message.")
    persona: str | None = Field(None, description="A hint for the assistant's voice, passed to the templates.")
    turns: int = Field(
        3, ge=1, le=8, description="User/assistant pairs; 3-4 is the sweet spot, beyond 8 coherence falls apart."
    )
    n: int = Field(1, ge=1, description="Replies (single) or conversations (multi_turn, teacher_json) per row.")
    temperature: float = Field(0.7, ge=0.0, description="0.5-0.8 for synthetic data; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = off.")
    max_new_tokens: int = Field(256, ge=1)
    stop: list[str] = Field(default_factory=list, description="Extra stop strings.")
    max_retries: int = Field(2, ge=0, description="teacher_json: new attempts for malformed JSON.")
    shard_size: int = ExecOnly(
        32, ge=1, description="Rows per shard (resume granularity); seeds derive per row, so it never changes outputs."
    )
    batch_size: int = ExecOnly(
        64,
        ge=1,
        description="Rows (prompt x sample) per generate call; halved on CUDA out-of-memory. Never changes outputs.",
    )


def _template_names(config: Config) -> dict[str, str]:
    if config.mode == "single":
        return {"template": config.template} if config.template else {}
    if config.mode == "multi_turn":
        return {"user_template": config.user_template}
    return {"teacher_template": config.teacher_template}


def templates(config: Config, recipe) -> dict[str, str]:
    """Template name -> file, for the fingerprint (included templates too)."""
    from engine.lib.prompts import template_files

    return template_files(recipe.dir, list(_template_names(config).values()))


COMMON = {"input", "model", "n", "temperature", "top_p", "top_k", "max_new_tokens", "stop", "shard_size", "batch_size"}
MODE_USES = {
    "single": {"template"},
    "multi_turn": {"user_model", "user_template", "system_prompt", "persona", "turns"},
    "teacher_json": {"teacher_template", "persona", "turns", "max_retries"},
}


def uses(config: Config) -> tuple[set[str], str]:
    return COMMON | MODE_USES[config.mode] | {"mode"}, f"mode '{config.mode}'"


def check(name: str, config: Config, recipe) -> list:
    from engine.lib.prompts import Templates

    t = Templates.for_recipe(recipe)
    problems = []
    for field, tname in _template_names(config).items():
        problems += t.check(tname, VARS[field], stage=name, **recipe.where(f"stages.{name}.{field}"))
    return problems


def _scenario(row: dict) -> str:
    """The seed a user simulator plays: a row's `scenario` column (kept in meta) if it has one,
    else its prompt, else its last user message."""
    scenario = (row.get("meta") or {}).get("scenario")
    if isinstance(scenario, str) and scenario.strip():
        return scenario
    if isinstance(row.get("prompt"), str):
        return row["prompt"]
    return prompt_messages(row)[-1]["content"]


class Turn(BaseModel):
    index: int
    role: Literal["user", "assistant"]
    text: str = Field(min_length=1)


class Coherence(BaseModel):
    all_turns_advance: bool
    breaks_at: int | None = None
    why: str = ""


class TeacherOutput(BaseModel):
    scenario_safe: bool
    turns: list[Turn] = Field(min_length=2)
    behaviors: list[str] = Field(default_factory=list)
    coherence: Coherence
    decision_basis: str = ""


def parse_teacher(text: str) -> TeacherOutput | None:
    """The first JSON object in the text, validated; None when malformed or roles do not alternate."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if not match:
        return None
    try:
        out = TeacherOutput.model_validate(json.loads(match.group(0)))
    except (ValueError, ValidationError):
        return None
    roles = [t.role for t in out.turns]
    if roles[0] != "user" or roles[-1] != "assistant" or any(a == b for a, b in zip(roles, roles[1:])):
        return None
    return out


def run(config: Config, inputs, ctx) -> None:
    rows = inputs["input"].rows()
    tpl = ctx.templates()
    params = SamplingParams(
        n=1,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        max_new_tokens=config.max_new_tokens,
        stop=tuple(config.stop),
    )
    assistant = ctx.backend(inputs["model"], config.batch_size)
    user = ctx.backend(inputs["user_model"], config.batch_size) if "user_model" in inputs else assistant
    model_name = inputs["model"].name
    failures = {"teacher_json_malformed": 0, "empty_turn": 0}
    seeds = ctx.seeds  # every stream by row id, sample, turn and attempt: shard_size changes nothing

    def out_row(row, k, messages, tokens, **meta):
        base = dict(row.get("meta") or {})
        base.update(source_id=row["id"], sample=k, model=model_name, mode=config.mode, tokens=tokens, **meta)
        return {"id": f"{row['id']}#{k}", "messages": messages, "meta": base}

    def single(shard: Shard) -> list[dict]:
        prompts = []
        for row in shard.rows:
            if config.template:
                prompts.append(
                    tpl.render_chat(config.template, row=row, prompt=row.get("prompt"), meta=row.get("meta") or {})
                )
            else:
                prompts.append(prompt_messages(row))
        comps = assistant.generate(
            prompts,
            SamplingParams(**{**params.__dict__, "n": config.n}),
            seeds.rows([row["id"] for row in shard.rows], purpose="reply"),
        )
        return [
            out_row(
                row,
                k,
                [*p, {"role": "assistant", "content": c.text}],
                {"prompt": c.prompt_tokens, "completion": c.completion_tokens},
                finish=c.finish_reason,
            )
            for row, p, cs in zip(shard.rows, prompts, comps)
            for k, c in enumerate(cs)
        ]

    def multi_turn(shard: Shard) -> list[dict]:
        convs: list[tuple[dict, int, list]] = [(row, k, []) for row in shard.rows for k in range(config.n)]
        tokens = [{"prompt": 0, "completion": 0} for _ in convs]
        system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
        for turn in range(1, config.turns + 1):
            asks = [
                tpl.render_chat(
                    config.user_template,
                    scenario=_scenario(row),
                    conversation=conv,
                    turn=turn,
                    turns=config.turns,
                    persona=config.persona or "",
                )
                for row, _, conv in convs
            ]
            ids = [row["id"] for row, _, _ in convs]
            samples = [k for _, k, _ in convs]
            user_seeds = [seeds.row(i, purpose="user", sample=k, turn=turn) for i, k in zip(ids, samples)]
            for (_, _, conv), [c] in zip(convs, user.generate(asks, params, user_seeds)):
                conv.append({"role": "user", "content": c.text})
            reply_seeds = [seeds.row(i, purpose="reply", sample=k, turn=turn) for i, k in zip(ids, samples)]
            replies = assistant.generate([system + conv for _, _, conv in convs], params, reply_seeds)
            for i, ((_, _, conv), [c]) in enumerate(zip(convs, replies)):
                conv.append({"role": "assistant", "content": c.text})
                tokens[i]["prompt"] += c.prompt_tokens
                tokens[i]["completion"] += c.completion_tokens
        return [
            out_row(row, k, system + conv, tok, persona=config.persona, scenario=_scenario(row))
            for (row, k, conv), tok in zip(convs, tokens)
        ]

    def teacher(shard: Shard) -> tuple[list[dict], dict[str, int], dict[str, list[str]]]:
        todo = [(row, k) for row in shard.rows for k in range(config.n)]
        done: dict[int, tuple] = {}
        bad: dict[str, list[str]] = {}  # per row, a sample of output that did not parse, for the log
        for attempt in range(config.max_retries + 1):
            pending = [i for i in range(len(todo)) if i not in done]
            if not pending:
                break
            prompts = [
                tpl.render_chat(
                    config.teacher_template,
                    scenario=_scenario(todo[i][0]),
                    turns=config.turns,
                    persona=config.persona or "",
                )
                for i in pending
            ]
            attempt_seeds = [
                seeds.row(todo[i][0]["id"], purpose="teacher", sample=todo[i][1], attempt=attempt) for i in pending
            ]
            for i, [c] in zip(pending, assistant.generate(prompts, params, attempt_seeds)):
                parsed = parse_teacher(c.text)
                if parsed:
                    done[i] = (parsed, c, attempt)
                elif len(bad.setdefault(todo[i][0]["id"], [])) < 2:
                    bad[todo[i][0]["id"]].append(
                        f"{todo[i][0]['id']}#{todo[i][1]} attempt {attempt + 1}: {c.text[:600]!r}"
                    )
        rows_out = []
        for i, (row, k) in enumerate(todo):
            if i in done:
                parsed, c, attempt = done[i]
                messages = [{"role": t.role, "content": t.text} for t in parsed.turns]
                rows_out.append(
                    out_row(
                        row,
                        k,
                        messages,
                        {"prompt": c.prompt_tokens, "completion": c.completion_tokens},
                        behaviors=parsed.behaviors,
                        coherence=parsed.coherence.model_dump(),
                        scenario_safe=parsed.scenario_safe,
                        attempts=attempt + 1,
                    )
                )
        malformed: dict[str, int] = {}
        for i, (row, _) in enumerate(todo):
            if i not in done:
                malformed[row["id"]] = malformed.get(row["id"], 0) + 1
        return rows_out, malformed, bad

    def per_shard(shard: Shard) -> list[tuple[list[dict], dict]]:
        """Each input row's conversations (an empty turn is no data: the conversation is dropped and
        counted, never padded with filler) and what it lost."""
        malformed: dict[str, int] = {}
        bad: dict[str, list[str]] = {}
        if config.mode == "teacher_json":
            made, malformed, bad = teacher(shard)
        else:
            made = single(shard) if config.mode == "single" else multi_turn(shard)
        out, at = [], 0
        for row in shard.rows:  # `made` is in row order, at most n per row
            mine: list[dict] = []
            while at < len(made) and made[at]["meta"]["source_id"] == row["id"] and len(mine) < config.n:
                mine.append(made[at])
                at += 1
            kept = [r for r in mine if all(m["content"].strip() for m in r["messages"])]
            stats = {"malformed": malformed.get(row["id"], 0), "empty_turn": len(mine) - len(kept)}
            out.append((kept, {**stats, "malformed_samples": bad.get(row["id"], [])}))
        return out

    try:
        out, stats = ctx.shards.map_rows(rows, per_shard, shard_size=config.shard_size, desc="generating")
    finally:
        assistant.close()
        if user is not assistant:
            user.close()
    failures["teacher_json_malformed"] = sum(s.get("malformed", 0) for s in stats)
    failures["empty_turn"] = sum(s.get("empty_turn", 0) for s in stats)
    if failures["empty_turn"]:
        ctx.warn(f"{failures['empty_turn']} conversations had an empty turn and were dropped")
    samples = [b for st in stats for b in st.get("malformed_samples", [])][:3]
    if failures["teacher_json_malformed"]:
        ctx.warn(
            f"{failures['teacher_json_malformed']} teacher outputs stayed malformed after "
            f"{config.max_retries} retries and were dropped"
        )
        ctx.log.warning("a sample of teacher output that did not parse as the expected JSON:\n%s", "\n".join(samples))
    if not out:
        hint = f" (a teacher output that did not parse: {samples[0][:200]}...)" if samples else ""
        raise RuntimeError(f"no conversations were generated{hint}; the stage log has samples")
    ctx.save_rows(out)
    ctx.save_json(
        "report.json",
        {
            "rows_in": len(rows),
            "rows_out": len(out),
            "dropped": failures,
            "tokens": {
                "prompt": sum(r["meta"]["tokens"]["prompt"] for r in out),
                "completion": sum(r["meta"]["tokens"]["completion"] for r in out),
            },
        },
    )


def summary(report: dict) -> list[tuple[str, str]]:
    return [
        ("rows in", str(report["rows_in"])),
        ("rows out", str(report["rows_out"])),
        ("malformed JSON (dropped)", str(report["dropped"]["teacher_json_malformed"])),
        ("empty turn (dropped)", str(report["dropped"]["empty_turn"])),
        ("tokens prompt / completion", f"{report['tokens']['prompt']} / {report['tokens']['completion']}"),
    ]


def report(name: str, entry: Path) -> list:
    """The run report's section: the first rows and a seeded random few."""
    from engine.lib.entryblocks import sample_blocks

    return sample_blocks(name, entry)

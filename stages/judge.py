"""judge: score rows; adds `scores` ({name: value}) and keeps everything else.

Takes `conversations` (scorers llm, reward_model, rules, function) or `preferences`
(scorer pairwise); gives the same type. A model is needed for llm, pairwise, reward_model.

Scorers:
- llm: the pointwise template (`conversation`, `rubric`) asks for a final `Score: N` line
  (1-10); the last such line is parsed. Unparseable answers are retried with a new seed,
  then recorded as missing (None) and counted.
- pairwise: the pairwise template (`context`, `response_a`, `response_b`, `principle`) is
  asked in both orders to cancel position bias; the label is the share of the two verdicts
  that prefer `chosen` (1.0, 0.5 when the orders disagree, 0.0), from the parsed verdicts.
  (Token-probability verdicts, from backends that have the weights, are the preferences
  stage's `verdict = "logprobs"`.)
- reward_model: a sequence-classification head over the conversation; logit 0 is the score.
- rules: the filter stage's rules as numbers (refusal, sycophancy ratio, filler, words).
- rule_reward: rule-based rewards (engine/lib/rewards.py), the `rewards` table: whether the reply
  does what the row's `expected` column says ("refuse" or "comply", by the refusal detector the
  eval counts with), length bounds, forbidden and required phrases, combined into a score in
  0..1 (the weighted share of the rules that hold); each rule's outcome is kept beside it.
- function: a callable `f(row) -> float | None`: a builtin of engine/lib/verifiers.py (`math_answer`)
  or one registered under the entry point group `recipe.scorers` (verifiers).

The scorers themselves live in engine/lib/scoring.py (`make_scorer`, `scorer_problems`), shared with
rejection_sample, preferences and eval.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from engine.core.errors import Problem
from engine.lib.rewards import RewardRules
from engine.lib.scoring import (
    DEFAULT_PRINCIPLE,
    SCORER_GROUP,
    SCORERS,
    make_scorer,
    scorer_code,
    scorer_problems,
    template_name,
)
from engine.spec.config import ExecOnly, Ref, StageConfig
from engine.store.shards import Shard

VERSION = 1
ROW_STAGE = True  # on Ray: workers share its shards (engine.run.rayexec)
GIVES = "conversations"  # preferences in, preferences out: see gives()


class Config(StageConfig):
    kind: Literal["judge"]
    input: str = Ref("conversations", "preferences", description="Conversations; preferences for pairwise.")
    scorer: Literal[tuple(SCORERS)] = "llm"  # type: ignore[valid-type]
    model: str | None = Ref(
        "model", default=None, description="The judge or reward model (llm, pairwise, reward_model)."
    )
    name: str = Field("score", description="Key of this score in the row's `scores`.")
    template: str | None = Field(None, description="llm: judge_pointwise.j2, pairwise: judge_pairwise.j2 by default.")
    rubric: str | None = Field(None, description="llm: what to reward, passed to the template.")
    principle: str = Field(DEFAULT_PRINCIPLE, description="pairwise: the comparison question.")
    function: str | None = Field(
        None,
        description="function: `path/to/file.py:function` (relative to the recipe), `package.module:function`, "
        f"a builtin (math_answer, reply_quality) or an entry point name in `{SCORER_GROUP}`; its source is in the "
        "fingerprint.",
    )
    rewards: RewardRules | None = Field(
        None, description="rule_reward: the rules (default: the expected behaviour alone)."
    )
    max_retries: int = Field(2, ge=0, description="llm: new attempts when no score can be parsed.")
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy; retries add a little randomness.")
    shard_size: int = ExecOnly(64, ge=1, description="Rows per shard (resume granularity); never changes scores.")
    batch_size: int = ExecOnly(
        64,
        ge=1,
        description="Rows (prompt x sample) per generate call; halved on CUDA out-of-memory. Never changes outputs.",
    )


def gives(config: Config) -> str:
    return SCORERS[config.scorer].takes


def templates(config: Config, recipe) -> dict[str, str]:
    from engine.lib.prompts import template_files

    return template_files(recipe.dir, [template_name(config)]) if template_name(config) else {}  # type: ignore[arg-type, list-item]


SCORER_USES = {
    "llm": {"model", "template", "rubric", "max_retries", "max_new_tokens", "temperature"},
    "pairwise": {"model", "template", "principle", "max_new_tokens", "temperature"},
    "reward_model": {"model"},
    "rules": set(),
    "rule_reward": {"rewards"},
    "function": {"function"},
}


def uses(config: Config) -> tuple[set[str], str]:
    return {"input", "scorer", "name", "shard_size", "batch_size"} | SCORER_USES[
        config.scorer
    ], f"scorer '{config.scorer}'"


def check(name: str, config: Config, recipe) -> list[Problem]:
    problems = []
    from engine.spec.graph import artifact_type

    takes = artifact_type(recipe, config.input)
    if takes and takes != gives(config):
        problems.append(
            Problem(
                f"scorer '{config.scorer}' scores {gives(config)}, but '{config.input}' gives {takes}.",
                hint="pairwise takes preferences; every other scorer takes conversations.",
                **recipe.where(f"stages.{name}.input"),
            )
        )
    return problems + scorer_problems(name, config, recipe, model=config.model, input=config.input)  # type: ignore[arg-type]


def code(config: Config, recipe) -> dict:
    """A function scorer's source (and distribution) enters the fingerprint."""
    return scorer_code(config, recipe)  # type: ignore[arg-type]


def run(config: Config, inputs, ctx) -> None:
    rows = inputs["input"].rows()
    scorer = make_scorer(config, inputs.get("model"), ctx)  # type: ignore[arg-type]
    try:

        def per_shard(shard: Shard) -> list[tuple[list[dict], dict]]:
            values = scorer(shard)
            return [
                ([dict(r, scores={**(r.get("scores") or {}), **v})], {"missing": int(v.get(config.name, 0) is None)})
                for r, v in zip(shard.rows, values)
            ]

        out, stats = ctx.shards.map_rows(rows, per_shard, shard_size=config.shard_size, desc="judging")
    finally:
        scorer.close()
    missing = sum(s["missing"] for s in stats)
    if missing:
        ctx.warn(f"{missing} of {len(rows)} rows got no parseable score (recorded as missing)")
    if rows and missing == len(rows):
        raise RuntimeError(f"no answer of the judge could be parsed ({missing} rows); check the template and the model")
    values = [r["scores"].get(config.name) for r in out if isinstance(r["scores"].get(config.name), (int, float))]
    ctx.save_rows(out)
    ctx.save_json(
        "report.json",
        {
            "rows_in": len(rows),
            "rows_out": len(out),
            "scorer": config.scorer,
            "name": config.name,
            "missing": missing,
            "mean": sum(values) / len(values) if values else None,
        },
    )


def summary(report: dict) -> list[tuple[str, str]]:
    mean = report["mean"]
    return [
        ("rows", str(report["rows_in"])),
        ("scorer", report["scorer"]),
        ("missing scores", str(report["missing"])),
        ("mean score", "-" if mean is None else f"{mean:.3f}"),
    ]


def report(name: str, entry: Path) -> list:
    """The run report's section: the score distribution and sample rows with their scores."""
    from engine.lib.entryblocks import _json, sample_blocks, score_blocks

    key = (_json(entry / "report.json") or {}).get("name", "score")
    return score_blocks(name, entry, key) + sample_blocks(name, entry, score=key)

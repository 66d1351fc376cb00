"""rejection_sample: best-of-N. Sample `n` replies per prompt, score them, keep the best.

Takes `prompts` or `conversations` (input: for a conversation the context is everything up to
its last user turn, so its final reply is dropped), the policy (model) and, for the llm and
reward_model scorers, judge_model; gives `conversations` (output = "conversations": the kept
samples, for SFT) or `preferences` (output = "preferences": best versus worst per prompt).

Scorers are the judge stage's (built by `engine.lib.scoring.make_scorer`): llm (judge_model through
`template`, default judge_pointwise.j2, with `rubric`), reward_model (judge_model's logit),
rules (the filter's numbers; `rule` picks one), rule_reward (rule-based rewards from the
`rewards` table and the row's expected behaviour), function (a builtin such as math_answer, or an
entry point of `recipe.scorers`). `prefer = "lower"` when a lower score is better.

With `candidates` (a data column, or a list of them), hand-written replies join each prompt's
samples (after the n sampled ones, finish reason "written"): scored like any sample, chosen only
when they score best (a shipped demonstration competes with the policy's own replies under the
same reward), rejected only when they score worst (a written over-refusal as a contrast).

Selection, per prompt, over the samples that got a score:
- conversations: select = "top_k" keeps the `top_k` best; select = "threshold" keeps every
  sample at or above `threshold` (at or below with prefer = "lower").
- preferences: chosen = the best, rejected = the worst, only where the gap is at least
  `min_margin`; with select = "threshold" the chosen sample must also pass `threshold`.

Generation and scoring go in shards of prompts (a killed run resumes). Besides `rows.parquet`
the stage writes `samples.parquet` (every prompt with its n completions and their scores; a
`samples` artifact), `scores.png` (the score histogram), `report.json` (counts, mean and
quantiles, per-prompt best and worst, kept counts) and, for preferences, `pairs_sample.json`.
A scorer that never gives a score fails the stage; nothing kept is an error naming the knob.

Template variables (template, llm scorer): conversation, rubric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from engine.core.errors import Problem
from engine.core.stats import mean, score_stats
from engine.lib.pairs import best_and_worst, no_output, pair_row, prompt_messages, spot_check, spot_check_summary
from engine.lib.rewards import RewardRules
from engine.lib.scoring import (
    CONVERSATION_SCORERS,
    ScorerSpec,
    make_scorer,
    scorer_code,
    scorer_problems,
    template_name,
)
from engine.models.backends import Completion, SamplingParams
from engine.spec.config import ExecOnly, Ref, StageConfig
from engine.store.shards import Shard

VERSION = 2  # 2: candidates (written replies), rule_reward scorer, written flags in pair meta
ROW_STAGE = True  # on Ray: workers share its shards (engine.run.rayexec)
GIVES = "conversations"  # or preferences: see gives()


class Config(StageConfig):
    kind: Literal["rejection_sample"]
    input: str = Ref(
        "prompts", "conversations", description="Prompts, or conversations (their final reply is dropped)."
    )
    model: str = Ref("model", description="The policy that samples.")
    n: int = Field(4, ge=1, le=1024, description="Samples per prompt; 4 to 100 is usual.")
    temperature: float = Field(0.8, ge=0.0, description="Sampling temperature; n > 1 needs it above 0.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(256, ge=1)
    scorer: Literal[CONVERSATION_SCORERS] = Field(  # type: ignore[valid-type]
        "llm", description="What scores each sample."
    )
    judge_model: str | None = Ref("model", default=None, description="llm: the judge; reward_model: the reward model.")
    function: str | None = Field(
        None,
        description="function: `path/to/file.py:function` (relative to the recipe), `package.module:function`, "
        "a builtin (math_answer, reply_quality) or a `recipe.scorers` entry point; its source is in the fingerprint.",
    )
    template: str | None = Field(None, description="llm: the pointwise judge template (judge_pointwise.j2).")
    rubric: str | None = Field(None, description="llm: what to reward, passed to the template.")
    rule: Literal["words", "refusal", "sycophancy", "filler"] = Field("words", description="rules: the number used.")
    rewards: RewardRules | None = Field(
        None, description="rule_reward: the rules (default: the row's expected behaviour alone)."
    )
    candidates: str | list[str] | None = Field(
        None,
        description="Data columns of hand-written replies (each a string or a list) that join each prompt's n "
        "samples as candidates, scored like them: e.g. a decline-and-redirect for a harmful "
        "prompt, an over-cautious refusal of a benign one.",
    )
    prefer: Literal["higher", "lower"] = Field("higher", description="Which end of the score is better.")
    name: str = Field("score", description="Key of the score in the kept rows' `scores`.")
    judge_max_new_tokens: int = Field(256, ge=1, description="llm: tokens per judge answer.")
    judge_temperature: float = Field(0.0, ge=0.0, description="llm: 0 = greedy; retries add a little randomness.")
    max_retries: int = Field(2, ge=0, description="llm: new attempts when no score can be parsed.")
    select: Literal["top_k", "threshold"] = Field("top_k", description="Keep the top_k best, or all passing threshold.")
    top_k: int = Field(1, ge=1, description='select = "top_k", output = "conversations": samples kept per prompt.')
    threshold: float | None = Field(None, description='select = "threshold": the score a kept sample reaches.')
    output: Literal["conversations", "preferences"] = Field(
        "conversations", description="Kept samples (for SFT), or best-vs-worst pairs (for DPO)."
    )
    min_margin: float = Field(1.0, gt=0, description="preferences: the least score gap between chosen and rejected.")
    sample_size: int = Field(100, ge=0, description="preferences: pairs saved to pairs_sample.json for a spot-check.")
    shard_size: int = ExecOnly(
        16,
        ge=1,
        description="Prompts per shard (resume granularity); seeds derive per prompt, so it never changes outputs.",
    )
    batch_size: int = ExecOnly(
        64,
        ge=1,
        description="Rows (prompt x sample) per generate call; halved on CUDA out-of-memory. Never changes outputs.",
    )


def gives(config: Config) -> str:
    return config.output


def _spec(config: Config) -> ScorerSpec:
    return ScorerSpec(
        scorer=config.scorer,
        name=config.name,
        template=config.template,
        rubric=config.rubric,
        function=config.function,
        max_retries=config.max_retries,
        max_new_tokens=config.judge_max_new_tokens,
        temperature=config.judge_temperature,
        batch_size=config.batch_size,
        rewards=config.rewards,
    )


def score_key(config: Config) -> str:
    """The key of the one number selection uses, in a scorer's output dict."""
    return f"{config.name}.{config.rule}" if config.scorer == "rules" else config.name


def templates(config: Config, recipe) -> dict[str, str]:
    from engine.lib.prompts import template_files

    name = template_name(_spec(config))
    return template_files(recipe.dir, [name]) if name else {}


def uses(config: Config) -> tuple[set[str], str]:
    used = {
        "kind",
        "resources",
        "input",
        "model",
        "n",
        "temperature",
        "top_p",
        "max_new_tokens",
        "scorer",
        "prefer",
        "name",
        "select",
        "output",
        "shard_size",
        "batch_size",
        "candidates",
    }
    used |= {
        "llm": {"judge_model", "template", "rubric", "judge_max_new_tokens", "judge_temperature", "max_retries"},
        "reward_model": {"judge_model"},
        "rules": {"rule"},
        "rule_reward": {"rewards"},
        "function": {"function"},
    }[config.scorer]
    used |= {"threshold"} if config.select == "threshold" else set()
    used |= {"top_k"} if config.select == "top_k" and config.output == "conversations" else set()
    used |= {"min_margin", "sample_size"} if config.output == "preferences" else set()
    return used, f"scorer '{config.scorer}', select '{config.select}' and output '{config.output}'"


def check(name: str, config: Config, recipe) -> list[Problem]:
    problems = scorer_problems(
        name, _spec(config), recipe, model=config.judge_model, model_key="judge_model", input=config.input
    )
    where = lambda key: recipe.where(f"stages.{name}.{key}")  # noqa: E731
    if config.select == "threshold" and config.threshold is None:
        problems.append(
            Problem('select = "threshold" needs a threshold.', hint="Set threshold = <a score>.", **where("select"))
        )
    if config.output == "conversations" and config.select == "top_k" and config.top_k > config.n:
        problems.append(
            Problem(
                f"top_k = {config.top_k} is more than the n = {config.n} samples per prompt.",
                hint="Lower top_k or raise n.",
                **where("top_k"),
            )
        )
    if config.output == "preferences" and config.n < 2 and not config.candidates:
        problems.append(
            Problem('output = "preferences" needs n >= 2 samples per prompt.', hint="Raise n.", **where("n"))
        )
    rows = recipe.dataset_rows(config.input) if config.candidates else None
    for column in candidate_columns(config.candidates):
        if rows and not any(written(r, column) for r in rows):
            problems.append(
                Problem(
                    f"no row of dataset '{config.input}' has a '{column}' column of written replies.",
                    hint="Add the column, or remove it from candidates.",
                    **where("candidates"),
                )
            )
    if config.n > 1 and config.temperature == 0:
        problems.append(
            Problem(
                f"n = {config.n} samples at temperature 0 are all the same reply.",
                hint="Set temperature > 0 (0.7-1.0 is usual for best-of-n).",
                **where("temperature"),
            )
        )
    return problems


# --------------------------------------------------------------------------- selection and numbers


def passes(value: float, config: Config) -> bool:
    """At or above the threshold (at or below it with prefer = "lower")."""
    return value >= config.threshold if config.prefer == "higher" else value <= config.threshold  # type: ignore[operator]


def keep(values: list[float | None], config: Config) -> list[int]:
    """Indices of the samples kept for output = "conversations", best first (ties: earlier first)."""
    sign = 1 if config.prefer == "higher" else -1
    ranked = sorted((k for k, v in enumerate(values) if v is not None), key=lambda k: (-sign * values[k], k))  # type: ignore[operator]
    if config.select == "top_k":
        return ranked[: config.top_k]
    return [k for k in ranked if passes(values[k], config)]  # type: ignore[arg-type]


def candidate_columns(candidates: str | list[str] | None) -> list[str]:
    return [candidates] if isinstance(candidates, str) else list(candidates or [])


def written(row: dict, columns: str | list[str] | None) -> list[str]:
    """The hand-written candidate replies of a row: its `columns` (in meta), each a string or a list."""
    out = []
    for column in candidate_columns(columns):
        value = (row.get("meta") or {}).get(column)
        found = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        out += [v for v in found if isinstance(v, str) and v.strip()]
    return out


def _scored(sample: dict) -> list[tuple[int, float]]:
    return [(k, v) for k, v in enumerate(sample["scores"]) if v is not None]


# --------------------------------------------------------------------------- the stage


def code(config: Config, recipe) -> dict:
    """A function scorer's source (and distribution) enters the fingerprint."""
    return scorer_code(_spec(config), recipe)


def run(config: Config, inputs, ctx) -> None:
    rows = inputs["input"].rows()
    key = score_key(config)
    policy = ctx.backend(inputs["model"], config.batch_size)
    # the same [models] entry as judge: one loaded model serves both
    lend = policy if config.scorer == "llm" and config.judge_model == config.model else None
    try:
        scorer = make_scorer(_spec(config), inputs.get("judge_model"), ctx, backend=lend)
    except BaseException:
        policy.close()
        raise
    params = SamplingParams(
        n=config.n, temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens
    )
    model_name = inputs["model"].name

    def per_shard(shard: Shard) -> list[tuple[list[dict], dict]]:
        prompts = [prompt_messages(r) for r in shard.rows]
        comps = policy.generate(prompts, params, ctx.seeds.rows([r["id"] for r in shard.rows], purpose="sample"))
        comps = [
            cs + [Completion(w, 0, 0, "written") for w in written(r, config.candidates)]
            for r, cs in zip(shard.rows, comps)
        ]
        cands = [
            (
                j,
                k,
                {
                    "id": f"{r['id']}#{k}",
                    "messages": [*p, {"role": "assistant", "content": c.text}],
                    "meta": {**(r.get("meta") or {}), "source_id": r["id"], "sample": k},
                },
            )
            for j, (r, p, cs) in enumerate(zip(shard.rows, prompts, comps))
            for k, c in enumerate(cs)
            if c.text.strip()
        ]  # an empty reply is no sample: never scored, never kept
        scored = scorer(Shard(shard.index, shard.start, [c for _, _, c in cands], shard.seed)) if cands else []
        details = {(j, k): d for (j, k, _), d in zip(cands, scored)}
        out = []
        for j, (r, p, cs) in enumerate(zip(shard.rows, prompts, comps)):
            ds = [details.get((j, k)) for k in range(len(cs))]
            out.append(
                {
                    "id": r["id"],
                    "prompt": p,
                    "completions": [c.text for c in cs],
                    "scores": [None if d is None or d.get(key) is None else float(d[key]) for d in ds],
                    "meta": {
                        **(r.get("meta") or {}),
                        "model": model_name,
                        "score": key,
                        "score_details": ds,
                        "finish": [c.finish_reason for c in cs],
                        "tokens": {
                            "prompt": cs[0].prompt_tokens if cs else 0,
                            "completion": sum(c.completion_tokens for c in cs),
                        },
                    },
                }
            )
        kept = [sum(1 for jj, _, _ in cands if jj == j) for j in range(len(shard.rows))]
        return [([row], {"empty": len(cs) - k}) for row, cs, k in zip(out, comps, kept)]

    try:
        samples, stats = ctx.shards.map_rows(rows, per_shard, shard_size=config.shard_size, desc=f"best of {config.n}")
    finally:
        scorer.close()
        policy.close()
    empty = sum(s["empty"] for s in stats)
    total = sum(len(s["completions"]) for s in samples)
    values = [v for s in samples for v in s["scores"] if v is not None]
    missing = total - empty - len(values)
    if empty:
        ctx.warn(f"{empty} of {total} samples were empty (never scored or kept)")
    if missing:
        ctx.warn(f"{missing} of {total - empty} samples got no score from the {config.scorer} scorer")
    if not values:
        last = next((d for s in reversed(samples) for d in reversed(s["meta"]["score_details"]) if d), {})  # type: ignore[var-annotated]
        answer = last.get(f"{config.name}_answer")
        raise RuntimeError(
            f"no sample got a score ({total} samples, {empty} empty) from the {config.scorer} scorer"
            + (f"; the judge's last answer was {answer[-200:]!r}" if answer else "")
            + "; check the scorer, its template and model, or the data it compares against"
        )
    out, extra = (_pairs if config.output == "preferences" else _kept)(config, samples, ctx)
    ctx.save_rows(out)
    ctx.save_rows(samples, "samples.parquet")
    from engine.core.plots import histogram

    numbers = score_stats(values)
    histogram(
        ctx.out_dir / "scores.png",
        values,
        bins=len(numbers["histogram"]["counts"]),
        title=f"{ctx.stage}: {key} of {len(values)} samples",
        xlabel=key,
        threshold=config.threshold if config.select == "threshold" else None,
    )
    per_prompt = [best_and_worst(_scored(s), config.prefer) for s in samples]
    best = [s["scores"][b[0]] for s, b in zip(samples, per_prompt) if b]
    worst = [s["scores"][b[1]] for s, b in zip(samples, per_prompt) if b]
    report = {
        "rows_in": len(rows),
        "n": config.n,
        "samples": total,
        "empty": empty,
        "scored": len(values),
        "missing": missing,
        "scorer": config.scorer,
        "score": key,
        "prefer": config.prefer,
        "select": config.select,
        "top_k": config.top_k,
        "threshold": config.threshold,
        "output": config.output,
        "rows_out": len(out),
        "scores": numbers,
        "per_prompt": {
            "prompts_with_two_scores": len(best),
            "best_mean": mean(best),
            "worst_mean": mean(worst),
            "gap_mean": mean([abs(b - w) for b, w in zip(best, worst)]),
        },
        **extra,
    }
    ctx.save_json("report.json", report)


def _kept(config: Config, samples: list[dict], ctx) -> tuple[list[dict], dict]:
    out = []
    for s in samples:
        for rank, k in enumerate(keep(s["scores"], config)):
            meta = {m: v for m, v in s["meta"].items() if m not in ("score_details", "finish", "tokens", "score")}
            out.append(
                {
                    "id": f"{s['id']}#{k}",
                    "messages": [*s["prompt"], {"role": "assistant", "content": s["completions"][k]}],
                    "meta": {**meta, "source_id": s["id"], "sample": k, "rank": rank, "finish": s["meta"]["finish"][k]},
                    "scores": s["meta"]["score_details"][k],
                }
            )
    if not out:  # top_k keeps a sample wherever one got a score: only a threshold can keep nothing
        sign = 1 if config.prefer == "higher" else -1
        best = max(sign * v for s in samples for v in s["scores"] if v is not None) * sign
        raise no_output(
            ctx,
            "threshold",
            f"no sample reached threshold = {config.threshold:g} (best score seen: {best:g}).",
            "Loosen threshold, raise n, or use a stronger policy.",
            made="kept no samples",
        )
    return out, {
        "kept": len(out),
        "prompts_with_kept": len({r["meta"]["source_id"] for r in out}),
        "kept_written": sum(r["meta"]["finish"] == "written" for r in out),
        "kept_mean": mean([r["scores"][score_key(config)] for r in out]),
    }


def _pairs(config: Config, samples: list[dict], ctx) -> tuple[list[dict], dict]:
    out, below_margin, below_threshold = [], 0, 0
    for s in samples:
        found = best_and_worst(_scored(s), config.prefer)
        if found is None:
            continue
        b, w, gap = found
        if gap < config.min_margin:
            below_margin += 1
        elif config.select == "threshold" and not passes(s["scores"][b], config):
            below_threshold += 1
        else:
            out.append(
                pair_row(
                    s["id"],
                    s["prompt"],
                    s["completions"][b],
                    s["completions"][w],
                    {
                        "method": "best_vs_worst",
                        "source_id": s["id"],
                        "chosen_sample": b,
                        "rejected_sample": w,
                        "written": [s["meta"]["finish"][k] == "written" for k in (b, w)],
                        "score": score_key(config),
                        "margin": gap,
                        "model": s["meta"]["model"],
                        "scores": {"chosen": s["scores"][b], "rejected": s["scores"][w]},
                    },
                )
            )
    if not out:
        knob, loosen = ("threshold", "lower threshold") if below_threshold else ("min_margin", "lower min_margin")
        raise no_output(
            ctx,
            knob,
            f"of {len(samples)} prompts, {below_margin} had a best-worst score gap below "
            f"min_margin = {config.min_margin:g} and {below_threshold} a best sample below the "
            "threshold.",
            f"Try: {loosen}, raise n, or sample at a higher temperature.",
        )
    return out, {
        "pairs": len(out),
        "below_margin": below_margin,
        "below_threshold": below_threshold,
        "chosen_written": sum(p["meta"]["written"][0] for p in out),
        "rejected_written": sum(p["meta"]["written"][1] for p in out),
        "spot_check": spot_check(ctx, out, config.sample_size),
    }


def summary(report: dict) -> list[tuple[str, str]]:
    s, pp = report["scores"], report["per_prompt"]
    q = s["quantiles"]
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    rule = (
        f"top {report['top_k']}"
        if report["select"] == "top_k"
        else f"score >= {report['threshold']:g}"
        if report["prefer"] == "higher"
        else f"score <= {report['threshold']:g}"
    )
    out = [
        ("prompts x samples", f"{report['rows_in']} x {report['n']} = {report['samples']}"),
        ("scorer, score", f"{report['scorer']}, {report['score']} ({report['prefer']} is better)"),
        ("scored / missing / empty", f"{report['scored']} / {report['missing']} / {report['empty']}"),
        ("score mean ± sd, range", f"{fmt(s['mean'])} ± {fmt(s['std'])}, {fmt(s['min'])} to {fmt(s['max'])}"),
        ("quantiles p10 p25 p50 p75 p90", " ".join(fmt(q[k]) for k in ("p10", "p25", "p50", "p75", "p90"))),
        (
            "per prompt: best / worst / gap (mean)",
            f"{fmt(pp['best_mean'])} / {fmt(pp['worst_mean'])} / {fmt(pp['gap_mean'])}",
        ),
    ]
    if report["output"] == "conversations":
        out += [
            ("select", rule),
            (
                "kept rows",
                f"{report['kept']} from {report['prompts_with_kept']} prompts"
                f" ({report.get('kept_written', 0)} written candidates)",
            ),
            ("kept mean score", fmt(report["kept_mean"])),
        ]
    else:
        out += [
            ("pairs (best vs worst)", str(report["pairs"])),
            (
                "written candidates chosen / rejected",
                f"{report.get('chosen_written', 0)} / {report.get('rejected_written', 0)}",
            ),
            ("prompts below min_margin / threshold", f"{report['below_margin']} / {report['below_threshold']}"),
        ]
    return out + spot_check_summary(report.get("spot_check"))


def report(name: str, entry: Path) -> list:
    """The run report's section: a few of the pairs (output preferences), or the best against the
    worst sample of a few prompts (output conversations: best-of-n), and the score histogram."""
    from engine.core.document import Image
    from engine.lib.entryblocks import best_worst_blocks, pair_blocks

    blocks = pair_blocks(name, entry) if (entry / "pairs_sample.json").is_file() else best_worst_blocks(name, entry)
    if (entry / "scores.png").is_file():
        blocks.append(Image(f"{name}_scores.png", (entry / "scores.png").read_bytes(), f"{name}: sample scores"))
    return blocks

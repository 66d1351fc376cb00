"""eval: multi-turn failure modes and single-turn behaviour, several models side by side.

Takes models (`models`, compared in order: the first is the base, the last the final model)
and an optional judge model (`judge`); gives a `report`: rows.parquet (one row per model x
item: the transcript in `messages`, per-turn flags and scores in `meta`), metrics.json (per
model per suite, per-turn curves included), report.md / report.html / plots/*.png, and
report.json (the metrics table that `recipe show RUN STAGE` prints).

Suites (engine/lib/evals/items.py has the definitions): safety (scripted escalating multi-turn
scenarios, per-turn refusal and harm curves), benign_multiturn (conversations that sound risky
and stay benign: multi-turn over-refusal), refusal (adversarial and benign prompts; `samples`
adds k sampled replies per prompt and their mean refusal rate), sycophancy (a challenge, then a pushback toward a wrong answer), helpfulness (judge 1-10,
needs a judge: without one it is skipped and reported as "n/a (no judge)"), diversity
(distinct n-grams and length spread of all replies; perplexity on held-out conversations for
local hf models). Refusal is detected by phrases and, with a judge, by the judge; both are
reported. The composite is the geometric mean of helpfulness, safety and non-sycophancy over
the parts that could be measured, labelled with what is missing.

Suite files default to the shipped ones in recipes/data/eval/; their bytes enter the
fingerprint. Work items (model, suite, item) are ordered model by model and processed in
shards, so a killed eval resumes. Each is memoized by its model's identity and its item, so a
new tuned model evaluates only itself, and the table is recomputed from reused and new rows. A
model is loaded when a shard first needs it and released before the next one is loaded, so
each model loads once per process. The judge, when set, stays loaded alongside.

Template variables: refusal_template and harm_template get `conversation` (up to and
including the reply to classify); helpfulness_template gets `conversation` and `rubric`.
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path
from typing import Literal

from pydantic import Field

from engine.core.errors import Problem, RecipeError
from engine.lib.evals import metrics as evalmetrics
from engine.lib.evals import runners
from engine.lib.evals import stats as evalstats
from engine.lib.evals import suites as evalsuites
from engine.lib.evals.items import SHIPPED_DIR, SuiteError
from engine.models.backends import SamplingParams
from engine.spec.backends import BACKENDS
from engine.spec.config import ExecOnly, PathField, Ref, StageConfig
from engine.store.shards import Shard

VERSION = 1
ROW_STAGE = True  # on Ray: workers share its shards (engine.run.rayexec)
GIVES = "report"

Suite = Literal[evalsuites.NAMES]  # type: ignore[valid-type]
FILE_FIELDS = {
    "safety": "safety_file",
    "benign_multiturn": "benign_multiturn_file",
    "refusal": "refusal_file",
    "sycophancy": "sycophancy_file",
    "helpfulness": "helpfulness_file",
    "diversity": "heldout_file",
    "arithmetic": "arithmetic_file",
}
JUDGE_VARS = {
    "refusal_template": {"conversation"},
    "harm_template": {"conversation"},
    "helpfulness_template": {"conversation", "rubric"},
}


def _shipped(suite: str) -> str:
    return f"default: the shipped recipes/data/eval/{evalsuites.SUITES[suite].file}."


class Config(StageConfig):
    kind: Literal["eval"]
    models: list[str] = Ref(
        "model",
        min_length=1,
        description="Models to compare, in order: the first is the base, the last the final model.",
    )
    judge: str | None = Ref(
        "model", default=None, description="Judge model: refusal and harm verdicts, helpfulness scores."
    )
    suites: list[Suite] = Field(
        default_factory=lambda: list(evalsuites.DEFAULT),
        min_length=1,
        description="Suites to run (default: all but arithmetic).",
    )
    safety_file: str | None = PathField(None, description="Multi-turn safety scenarios (JSONL); " + _shipped("safety"))
    benign_multiturn_file: str | None = PathField(
        None, description="Conversations that sound risky and stay benign (JSONL); " + _shipped("benign_multiturn")
    )
    refusal_file: str | None = PathField(
        None, description="Adversarial and benign prompts (JSONL); " + _shipped("refusal")
    )
    sycophancy_file: str | None = PathField(
        None, description="Questions with known answers (JSONL); " + _shipped("sycophancy")
    )
    helpfulness_file: str | None = PathField(
        None, description="Prompts for the judge (JSONL); " + _shipped("helpfulness")
    )
    heldout_file: str | None = PathField(
        None, description="Held-out conversations for diversity and perplexity (JSONL); " + _shipped("diversity")
    )
    arithmetic_file: str | None = PathField(
        None, description="Held-out arithmetic problems with answers (JSONL); " + _shipped("arithmetic")
    )
    max_items: int | None = Field(None, ge=1, description="Use only the first N items of each suite (quick runs).")
    system_prompt: str | None = Field(None, description="A system message before every conversation.")
    challenge: str = Field(
        "Are you sure?", min_length=1, description="sycophancy: the turn between the answer and the pushback."
    )
    max_new_tokens: int = Field(256, ge=1, description="Per reply of an evaluated model.")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (comparable across models and runs).")
    samples: int = Field(
        0,
        ge=0,
        description="refusal suite: also sample this many replies per prompt at sample_temperature and report the "
        "mean refusal rate with an interval, beside the greedy one (0 = greedy only).",
    )
    sample_temperature: float = Field(0.7, gt=0.0, description="The temperature of the `samples` replies.")
    refusal_template: str = Field("eval_refusal_judge.j2", description="Judge template: does the reply refuse?")
    harm_template: str = Field("eval_harm_judge.j2", description="Judge template: is the reply harmful?")
    helpfulness_template: str = Field("judge_pointwise.j2", description="Judge template: helpfulness 1-10.")
    helpfulness_rubric: str | None = Field(None, description="Passed to the helpfulness template as `rubric`.")
    judge_max_new_tokens: int = Field(256, ge=1)
    judge_retries: int = Field(2, ge=0, description="New attempts when a judge answer cannot be parsed.")
    shard_size: int = ExecOnly(
        16, ge=1, description="Work items (model x suite item) per shard: resume granularity, never changes outputs."
    )
    batch_size: int = ExecOnly(
        64,
        ge=1,
        description="Rows (prompt x sample) per generate call; halved on CUDA out-of-memory. Never changes outputs.",
    )


def definition(components: dict) -> dict:
    """What one work item's result depends on besides its model and its item (engine.store.
    fingerprint.definition): not the list of models, the suites asked for, max_items or the suite
    files, so a new tuned model, another suite or more items evaluate only what is new."""
    per_item = {"suites", "max_items", *FILE_FIELDS.values()}
    return dict(
        components,
        inputs={f: v for f, v in components["inputs"].items() if f != "models"},
        config={k: v for k, v in components["config"].items() if k not in per_item},
        files={k: v for k, v in components["files"].items() if k not in per_item},
        templates={k: v for k, v in components["templates"].items() if not k.startswith("suite file")},
    )


def suite_path(config: Config, suite: str) -> Path:
    """The file a suite reads: the recipe's (already resolved to an absolute path) or the shipped one."""
    return Path(getattr(config, FILE_FIELDS[suite]) or SHIPPED_DIR / evalsuites.SUITES[suite].file)


def active_suites(config: Config) -> list[str]:
    """Suites that run, in the canonical order; helpfulness only with a judge."""
    return [
        s for s in evalsuites.NAMES if s in config.suites and (not evalsuites.SUITES[s].needs_judge or config.judge)
    ]


def _judge_templates(config: Config) -> dict[str, str]:
    """Config field -> template name, for the judge templates this config renders."""
    if not config.judge:
        return {}
    on = set(active_suites(config))
    return {
        f: getattr(config, f)
        for f, needed in (
            ("refusal_template", {"safety", "refusal", "benign_multiturn"}),
            ("harm_template", {"safety"}),
            ("helpfulness_template", {"helpfulness"}),
        )
        if on & needed
    }


def uses(config: Config) -> tuple[set[str], str]:
    """Suite files, judge settings and the sycophancy challenge count only for the suites asked for
    (helpfulness without a judge is asked for, skipped with a warning at run time)."""
    on = set(config.suites)
    used = {
        "models",
        "judge",
        "suites",
        "max_items",
        "system_prompt",
        "max_new_tokens",
        "temperature",
        "shard_size",
        "batch_size",
        *(FILE_FIELDS[s] for s in on),
        *_judge_templates(config),
    }
    used |= {"challenge"} if "sycophancy" in on else set()
    used |= {"samples", "sample_temperature"} if "refusal" in on else set()
    used |= {"helpfulness_rubric"} if "helpfulness" in on else set()
    used |= {"judge_max_new_tokens", "judge_retries"} if config.judge else set()
    return used, f"suites {', '.join(sorted(on))}" + (" with a judge" if config.judge else " without a judge")


def templates(config: Config, recipe) -> dict[str, str]:
    """Judge templates and the suite files: their bytes enter the fingerprint."""
    from engine.lib.prompts import template_files

    files = template_files(recipe.dir, list(_judge_templates(config).values()))
    for suite in active_suites(config):
        path = suite_path(config, suite)
        if path.is_file():
            files[f"suite file {suite} ({path.name})"] = str(path)
    return files


def check(name: str, config: Config, recipe) -> list[Problem]:
    problems = []
    for field, values in (("models", config.models), ("suites", config.suites)):
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            problems.append(
                Problem(
                    f"{field} lists {', '.join(repeated)} more than once.",
                    hint="Name each once.",
                    **recipe.where(f"stages.{name}.{field}"),
                )
            )
    for suite in active_suites(config):
        key = f"stages.{name}.{FILE_FIELDS[suite]}"
        try:
            evalsuites.load_suite(suite, suite_path(config, suite))
        except SuiteError as exc:
            problems.append(
                Problem(
                    f"{suite} suite: {exc.message}.",
                    file=exc.path,
                    line=exc.line,
                    key=key,
                    hint=f"Fix the file, or point {FILE_FIELDS[suite]} at another one "
                    f"(see recipes/data/README.md for the format).",
                )
            )
    from engine.lib.prompts import Templates

    t = Templates.for_recipe(recipe)
    for field, tname in _judge_templates(config).items():
        problems += t.check(tname, JUDGE_VARS[field], stage=name, **recipe.where(f"stages.{name}.{field}"))
    return problems


class _Models:
    """One evaluated model loaded at a time: a shard asks for model i, the previous one is released."""

    def __init__(self, ctx, models: list, batch_size: int) -> None:
        self.ctx, self.models, self.batch_size = ctx, models, batch_size
        self.index: int | None = None
        self.backend = None

    def get(self, i: int):
        if self.index != i:
            self.close()
            self.backend, self.index = self.ctx.backend(self.models[i], self.batch_size), i
        return self.backend

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
        self.backend, self.index = None, None


def _is_remote(model) -> bool:
    """Served by a backend that gives no token log-probabilities here (openai, vllm)."""
    return model.spec is not None and not BACKENDS[model.spec.backend].weights_here


def run(config: Config, inputs, ctx) -> None:
    from engine.lib.evals.report import write_eval_report
    from engine.lib.scoring import parse_score

    models = inputs["models"]
    judge_model = inputs.get("judge")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise RecipeError.single(
            f"stage '{ctx.stage}' lists a model twice in models.",
            hint="Name each model once.",
            **ctx.recipe.where(f"stages.{ctx.stage}.models"),
        )
    suites = active_suites(config)
    if "helpfulness" in config.suites and judge_model is None:
        ctx.warn(
            'the helpfulness suite needs a judge (set judge = "<a model>"); it is skipped and reported as '
            "n/a (no judge), and the composite is computed without it"
        )
    items = {}
    for suite in suites:
        try:
            items[suite] = evalsuites.load_suite(suite, suite_path(config, suite), config.max_items)
        except SuiteError as exc:
            raise RecipeError.single(
                f"{suite} suite: {exc.message}.",
                file=exc.path,
                line=exc.line,
                key=f"stages.{ctx.stage}.{FILE_FIELDS[suite]}",
            ) from None
    # model by model, so a model loads once; suite by suite, so each shard batches alike items. A
    # work item carries its model's identity: its result is reused while that model and item stay
    work = [
        {"id": f"{names[i]}/{s}/{it['id']}", "model": i, "model_id": ctx.input_id("models", i), "suite": s, "item": it}
        for i in range(len(models))
        for s in suites
        for it in items[s]
    ]
    params = SamplingParams(temperature=config.temperature, max_new_tokens=config.max_new_tokens)
    sampled = (
        SamplingParams(n=config.samples, temperature=config.sample_temperature, max_new_tokens=config.max_new_tokens)
        if config.samples
        else None
    )
    system = [{"role": "system", "content": config.system_prompt}] if config.system_prompt else []
    pool = _Models(ctx, models, config.batch_size)
    judge: list = []  # loaded on first use, kept for the whole stage

    def get_judge():
        if judge_model is None:
            return None
        if not judge:
            judge.append(
                runners.Judge(
                    ctx.backend(judge_model, config.batch_size),
                    ctx.templates(),
                    {
                        "refusal": config.refusal_template,
                        "harm": config.harm_template,
                        "helpfulness": config.helpfulness_template,
                    },
                    parse_score,
                    max_new_tokens=config.judge_max_new_tokens,
                    retries=config.judge_retries,
                    rubric=config.helpfulness_rubric or "",
                    seed=lambda key, what, attempt: ctx.seeds.row(key, purpose=f"judge-{what}", attempt=attempt),
                )
            )
        return judge[0]

    def per_shard(shard: Shard) -> list[tuple[list[dict], dict]]:
        out = []
        for (mi, suite), group in groupby(shard.rows, key=lambda r: (r["model"], r["suite"])):
            batch = [r["item"] for r in group]
            backend = pool.get(mi)
            gen = runners.Gen(
                backend,
                params,
                lambda item, turn, m=names[mi], s=suite: ctx.seeds.row(f"{m}/{s}/{item}", purpose="reply", turn=turn),  # type: ignore[misc]
                system,
                sampled,
            )
            ppl = None
            if getattr(backend, "name", "") == "hf":  # the loaded weights: no second copy

                def perplexity(convs, b=backend):
                    return runners.perplexity_parts(b.model, b.tokenizer, convs, config.batch_size)

                ppl = perplexity
            made = evalsuites.SUITES[suite].run(batch, gen, evalsuites.Play(get_judge, config.challenge, ppl))
            # the transcript as the model saw it: the system prompt first
            out += [
                {
                    "id": f"{names[mi]}/{suite}/{r['item_id']}",
                    "model": names[mi],
                    **r,
                    "messages": system + r["messages"],
                }
                for r in made
            ]
            shard.progress(len(batch))
        return [([r], {}) for r in out]

    def what_counts(w: dict) -> dict:  # a work item's result: its model (name and identity), suite and item
        return {"id": w["id"], "model_id": w["model_id"], "suite": w["suite"], "item": w["item"]}

    try:
        rows, _ = ctx.shards.map_rows(work, per_shard, shard_size=config.shard_size, desc="evaluating", key=what_counts)
    finally:
        pool.close()
        if judge:
            judge[0].close()

    judged = judge_model is not None
    per_model = {
        m.name: evalsuites.model_metrics(
            [r for r in rows if r["model"] == m.name],
            suites,
            judged,
            f"n/a ({m.spec.backend} backend: no token log-probabilities)" if _is_remote(m) else None,
        )
        for m in models
    }
    of = {n: [r for r in rows if r["model"] == n] for n in names}
    for n in names:  # 95% intervals of the headline rates; differences against the first model
        per_model[n]["headline"] = evalstats.headline(of[n], ctx.seed)
        per_model[n]["safety_per_turn"] = evalstats.per_turn(of[n])
    comparisons = {n: evalstats.compare(of[names[0]], of[n], ctx.seed) for n in names[1:]}
    missing = _judge_missing(rows) if judged else {}
    asked = _judge_asked(rows) if judged else 0
    if asked and sum(missing.values()):
        ctx.warn(
            f"{sum(missing.values())} of {asked} judge answers could not be parsed (recorded as n/a): "
            + ", ".join(f"{k} {v}" for k, v in missing.items() if v)
        )
    metrics = {
        "models": names,
        "judge": judge_model.name if judged else None,
        "suites": suites,
        "items": {s: len(items[s]) for s in suites},
        "judge_missing": missing,
        "per_model": per_model,
        "baseline": names[0],
        "comparisons": comparisons,
    }
    ctx.save_rows(rows)
    ctx.save_json("metrics.json", metrics)
    tiny = any(m.spec is not None and m.spec.path == "builtin:tiny-chat" for m in models) or any(
        spec.path == "builtin:tiny-chat" for spec in ctx.recipe.models.values()
    )
    written = write_eval_report(ctx.out_dir, metrics, rows, f"Eval report: {ctx.stage}", tiny)
    ctx.save_json(
        "report.json",
        {
            "models": names,
            "judge": metrics["judge"],
            "suites": suites,
            "items": metrics["items"],
            "rows_out": len(rows),
            "table": evalmetrics.metric_table(per_model, judged, names),
            "composite": {n: per_model[n]["composite"] for n in names},
            "judge_missing": missing,
            "headline": {n: per_model[n]["headline"] for n in names},
            "baseline": names[0],
            "differences": [
                (k, [evalstats.fmt_difference(comparisons[n].get(k)) for n in names[1:]])
                for k in evalstats.HEADLINE
                if any(k in comparisons[n] for n in names[1:])
            ],
            "files": [str(p.relative_to(ctx.out_dir)) for p in written],
        },
    )


def _judge_missing(rows: list[dict]) -> dict[str, int]:
    out = {"refusal": 0, "harm": 0, "helpfulness": 0}
    for r in rows:
        meta = r["meta"]
        if r["suite"] == "safety":
            out["refusal"] += sum(t["refusal_judge"] is None for t in meta["turns"])
            out["harm"] += sum(t["harm_judge"] is None for t in meta["turns"])
        elif r["suite"] == "refusal":
            out["refusal"] += meta["refusal_judge"] is None
        elif r["suite"] == "helpfulness":
            out["helpfulness"] += meta["score"] is None
    return out


def _judge_asked(rows: list[dict]) -> int:
    return sum(
        2 * len(r["meta"]["turns"]) if r["suite"] == "safety" else 1
        for r in rows
        if r["suite"] in ("safety", "refusal", "helpfulness")
    )


def summary_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """`recipe show`: the metrics table, one column per model."""
    return ["metric", *report["models"]], [[label, *values] for label, values in report["table"]]


def summary_notes(report: dict) -> list[str]:
    return [
        f"items per suite: {', '.join(f'{s} {n}' for s, n in report['items'].items())}",
        f"judge: {report['judge'] or 'none (refusal by phrases only; helpfulness n/a)'}",
    ]


def summary(report: dict) -> list[tuple[str, str]]:
    """The metrics table: one row per metric, the models as aligned columns."""
    names = report["models"]
    widths = [max([len(n), *(len(values[i]) for _, values in report["table"])]) for i, n in enumerate(names)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))

    out = [("models", line(names))]
    out += [(label, line(values)) for label, values in report["table"]]
    if report.get("differences"):
        out.append(
            (f"difference from {report['baseline']} (95% paired bootstrap; * outside the noise)", "  ".join(names[1:]))
        )
        out += [(f"  {k.replace('_', ' ')}", "  ".join(v)) for k, v in report["differences"]]
    out.append(("items per suite", ", ".join(f"{s} {n}" for s, n in report["items"].items())))
    out.append(("judge", report["judge"] or "none (phrases only; helpfulness n/a)"))
    return out

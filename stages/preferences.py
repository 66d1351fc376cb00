"""preferences: preference pairs (prompt, chosen, rejected) from conversations.

Takes `conversations` (input) and, for pairwise_judge and context_negative, a model; gives
`preferences`: `prompt` (the messages before the reply, ending with a user turn), `chosen` and
`rejected` (one assistant message each), `meta` (method, source ids, scores or labels, ...).

Methods:
- best_vs_worst: conversations scored by a judge stage (`scores[score]`), grouped by source
  (`meta.source_id`, else the id before `#`) and by the context of their final reply
  (messages[:-1]); the best against the worst of each group, only where the gap is at least
  `min_margin` (`prefer = "lower"` when a lower score is better).
- pairwise_judge (AI feedback): candidate replies sharing a source and a context (e.g.
  generate with n = 2) are compared two by two. Each pair gets a principle drawn from the
  constitution (seeded by the recipe seed, source, turn and the two ids); the judge answers its
  `comparison` question through `template`, in both orders (A/B swapped) to cancel position
  bias, `votes` times per order. The raw label is the share of parsed verdicts preferring one
  reply; pairs whose confidence |label - 0.5| * 2 reaches `threshold` are kept, oriented by the
  label. With `chain_of_thought` the judge reasons first and the recorded label is clamped to
  [0.4, 0.6] (such verdicts are over-confident, as the CAI paper found); the threshold applies
  to the raw label. With `verdict = "logprobs"` (an hf judge) nothing is parsed: the label is
  the judge's normalized probability of "A" versus "B" after "Verdict: ", averaged over both
  orders, as the CAI paper derives soft labels. Every judgment (kept or not) goes to
  `judgments.parquet`.
- revision: rows of a critique_revise stage; for each revised turn, prompt = messages[:index],
  chosen = the final text, rejected = the original, where they differ (`prefer = "lower"`, a
  control run, swaps them).
- context_negative: for each selected assistant turn with earlier turns, the model answers the
  last user message alone (the system message kept, earlier turns dropped); that reply is
  rejected, the real turn chosen: pairs that teach the use of context.

Turns (pairwise_judge, revision, context_negative): the last assistant turn of each
conversation, or with `from_turn = N` every assistant turn at 0-based position N or later.

`pairs_sample.json` next to the rows holds `sample_size` pairs drawn with the recipe seed, for a
human spot-check; `recipe show` prints a few. Zero pairs is an error that names the knob.

Template variables (template): context, response_a, response_b, principle, chain_of_thought.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from engine.core.errors import Problem, RecipeError
from engine.core.text import normalize
from engine.lib.pairs import (
    best_vs_worst_pairs,
    context_free_tasks,
    judged_pairs,
    no_output,
    pair_row,
    pairwise_tasks,
    revision_pairs,
    row_scores,
    spot_check,
    spot_check_summary,
)
from engine.lib.scoring import logprob_judgments, pairwise_label, parse_choice
from engine.models.backends import SamplingParams
from engine.spec.backends import BACKENDS
from engine.spec.config import ExecOnly, Ref, StageConfig
from engine.store.shards import Shard

VERSION = 1
ROW_STAGE = True  # on Ray: workers share its shards (engine.run.rayexec)
GIVES = "preferences"
TEMPLATE_VARS = {"context", "response_a", "response_b", "principle", "chain_of_thought"}
COMMON = {"kind", "resources", "method", "input", "sample_size", "shard_size", "batch_size"}
USES = {
    "best_vs_worst": {"score", "min_margin", "prefer"},
    "pairwise_judge": {
        "model",
        "constitution",
        "threshold",
        "chain_of_thought",
        "votes",
        "template",
        "judge_temperature",
        "max_new_tokens",
        "from_turn",
        "verdict",
    },
    "revision": {"from_turn", "prefer"},
    "context_negative": {"model", "temperature", "max_new_tokens", "from_turn"},
}


class Config(StageConfig):
    kind: Literal["preferences"]
    method: Literal["best_vs_worst", "pairwise_judge", "revision", "context_negative"] = Field(
        description="How pairs are made (see the stage's documentation)."
    )
    input: str = Ref("conversations", description="Scored samples, candidate replies, or critique_revise output.")
    model: str | None = Ref(
        "model",
        default=None,
        description="pairwise_judge: the judge; context_negative: writes the context-free replies.",
    )
    score: str = Field("score", description="best_vs_worst: the key in each row's `scores` (a judge stage's name).")
    min_margin: float = Field(1.0, gt=0, description="best_vs_worst: the least score gap between chosen and rejected.")
    prefer: Literal["higher", "lower"] = Field(
        "higher",
        description='best_vs_worst: which end of the score is better. revision: "lower" makes the original the '
        "chosen reply and the revision the rejected one (a control run).",
    )
    constitution: str | None = Ref(
        "constitution",
        default=None,
        description="pairwise_judge: a [constitutions] "
        "name; a principle is drawn per pair (an input, fingerprinted by content).",
    )
    threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="pairwise_judge: least confidence |label - 0.5| * 2 to keep a pair (1 = every verdict agrees).",
    )
    chain_of_thought: bool = Field(
        False, description="pairwise_judge: the judge reasons first; labels clamped to 0.4-0.6."
    )
    votes: int = Field(
        1,
        ge=1,
        le=16,
        description="pairwise_judge: verdicts sampled per order (more than 1 needs judge_temperature > 0).",
    )
    verdict: Literal["text", "logprobs"] = Field(
        "text",
        description='pairwise_judge: "text" parses the judge\'s written verdict; "logprobs" reads the '
        'probabilities of "A" and "B" after "Verdict: " (soft labels as in the CAI paper; an hf '
        "judge only, no chain_of_thought).",
    )
    template: str = Field("pairwise_principle.j2", description="pairwise_judge: the judge prompt.")
    judge_temperature: float = Field(0.0, ge=0.0, description="pairwise_judge: 0 = greedy verdicts.")
    temperature: float = Field(0.7, ge=0.0, description="context_negative: sampling temperature of the negatives.")
    max_new_tokens: int = Field(
        256, ge=1, description="Per judge answer (chain of thought needs room) or context-free reply."
    )
    from_turn: int | None = Field(
        None,
        ge=0,
        description="Pairs at every assistant turn from this 0-based position "
        "on; default: the last assistant turn only.",
    )
    sample_size: int = Field(100, ge=0, description="Pairs saved to pairs_sample.json for a human spot-check.")
    shard_size: int = ExecOnly(
        32,
        ge=1,
        description="Pairs or turns per shard (pairwise_judge, context_negative): "
        "resume granularity, never changes outputs.",
    )
    batch_size: int = ExecOnly(
        64,
        ge=1,
        description="Rows (prompt x sample) per generate call; halved on CUDA out-of-memory. Never changes outputs.",
    )


def templates(config: Config, recipe) -> dict[str, str]:
    """The judge template: its bytes enter the fingerprint (the constitution is an input)."""
    from engine.lib.prompts import template_files

    return template_files(recipe.dir, [config.template]) if config.method == "pairwise_judge" else {}


def uses(config: Config) -> tuple[set[str], str]:
    return COMMON | USES[config.method], f"method '{config.method}'"


def check(name: str, config: Config, recipe) -> list[Problem]:
    problems = []
    if config.method in ("pairwise_judge", "context_negative") and not config.model:
        problems.append(
            Problem(
                f"method '{config.method}' needs a model.",
                hint='Set model = "<a [models] name>".',
                **recipe.where(f"stages.{name}.method"),
            )
        )
    if config.method == "pairwise_judge":
        from engine.lib.constitution import constitution_problems
        from engine.lib.prompts import Templates

        if config.constitution is None:
            problems.append(
                Problem(
                    "method 'pairwise_judge' needs a constitution: the judge compares under its principles.",
                    hint='Set constitution = "<a [constitutions] name>".',
                    **recipe.where(f"stages.{name}.method"),
                )
            )
        else:
            problems += constitution_problems(config.constitution, recipe, name, "constitution")
        if config.votes > 1 and config.judge_temperature == 0:
            problems.append(
                Problem(
                    "votes > 1 with judge_temperature = 0 repeats the same verdict.",
                    hint="Set judge_temperature > 0 (e.g. 0.7), or votes = 1.",
                    **recipe.where(f"stages.{name}.votes"),
                )
            )
        if config.verdict == "logprobs":
            where = recipe.where(f"stages.{name}.verdict")
            if config.chain_of_thought or config.votes > 1:
                problems.append(
                    Problem(
                        'verdict = "logprobs" reads one probability per order: it takes no '
                        "chain_of_thought and no votes.",
                        hint='Remove chain_of_thought and votes, or use verdict = "text".',
                        **where,
                    )
                )
            spec = recipe.models.get(config.model) if config.model else None
            if spec is not None and not BACKENDS[spec.backend].weights_here:
                problems.append(
                    Problem(
                        f'verdict = "logprobs" needs the judge\'s token probabilities, which model '
                        f"'{config.model}' ({spec.backend} backend) does not give.",
                        hint='Use verdict = "text" with a server judge, or an hf model.',
                        **where,
                    )
                )
        problems += Templates.for_recipe(recipe).check(
            config.template, TEMPLATE_VARS, stage=name, **recipe.where(f"stages.{name}.template")
        )
    return problems


# --------------------------------------------------------------------------- methods


def _best_vs_worst(config: Config, rows: list[dict], ctx) -> tuple[list[dict], dict]:
    if not any(config.score in row_scores(r) for r in rows):
        raise RecipeError.single(
            f"stage '{ctx.stage}': no input row has scores.{config.score}.",
            hint="best_vs_worst takes rows scored by a judge stage; set score to that judge's name.",
            **ctx.recipe.where(f"stages.{ctx.stage}.score"),
        )
    pairs, stats = best_vs_worst_pairs(rows, config.score, config.prefer, config.min_margin)
    if not pairs:
        raise no_output(
            ctx,
            "min_margin",
            f"no group of samples has a score gap of at least min_margin = "
            f"{config.min_margin:g} (groups with two or more scored samples: "
            f"{stats['comparable_groups']}, largest gap: {stats['largest_gap']:g}).",
            "Lower min_margin, or sample more replies per prompt (generate n).",
        )
    return pairs, stats


def _revision(config: Config, rows: list[dict], ctx) -> tuple[list[dict], dict]:
    pairs, stats = revision_pairs(rows, config.from_turn)
    if config.prefer == "lower":  # a control: the original preferred over its revision
        pairs = [dict(p, chosen=p["rejected"], rejected=p["chosen"]) for p in pairs]
    if stats["rows_without_critique_revise"] == len(rows):
        raise RecipeError.single(
            f"stage '{ctx.stage}': no input row has meta.critique_revise.",
            hint="Method 'revision' takes the output of a critique_revise stage.",
            **ctx.recipe.where(f"stages.{ctx.stage}.input"),
        )
    if not pairs:
        # A measured outcome, not a misconfiguration: a weak critic (a small model critiquing itself)
        # often changes nothing. Downstream stages still run on their other inputs, and the report
        # says how many revisions changed anything.
        ctx.warn(
            f"no selected turn was changed by its revision ({stats['unchanged']} unchanged, "
            f"{stats['turns_not_selected']} revised turns not selected): no revision pairs. A stronger critic "
            '(model = "judge" in the critique_revise stage) or more max_new_tokens may help.'
        )
    return pairs, stats


def _context_negative(config: Config, rows: list[dict], inputs, ctx) -> tuple[list[dict], dict]:
    tasks, first_turns = context_free_tasks(rows, config.from_turn)
    if not tasks:
        raise no_output(
            ctx,
            "from_turn",
            f"no selected assistant turn has earlier turns ({first_turns} are first turns).",
            "Feed multi-turn conversations; by default only the last assistant turn of each is used.",
        )
    backend = ctx.backend(inputs["model"], config.batch_size)
    params = SamplingParams(temperature=config.temperature, max_new_tokens=config.max_new_tokens)

    def per_shard(shard: Shard) -> list[tuple[list[dict], dict]]:
        replies = backend.generate(
            [t["bare"] for t in shard.rows],
            params,
            ctx.seeds.rows([t["id"] for t in shard.rows], purpose="context_free"),
        )
        return [([dict(t, negative=c.text.strip(), finish=c.finish_reason)], {}) for t, [c] in zip(shard.rows, replies)]

    try:
        done, _ = ctx.shards.map_rows(
            tasks, per_shard, shard_size=config.shard_size, desc="plain replies", purpose="context_free"
        )
    finally:
        backend.close()
    pairs = [
        pair_row(
            t["id"],
            t["prompt"],
            t["chosen"],
            t["negative"],
            {
                "method": "context_negative",
                "source_id": t["source_id"],
                "index": t["index"],
                "model": inputs["model"].name,
                "finish": t["finish"],
            },
        )
        for t in done
        if t["negative"] and normalize(t["negative"]) != normalize(t["chosen"])
    ]
    same = len(done) - len(pairs)
    if not pairs:
        raise no_output(
            ctx,
            "model",
            f"every context-free reply was empty or equal to the real turn ({same}).",
            "Use a model that writes non-empty replies, or raise max_new_tokens.",
        )
    return pairs, {"first_turns_skipped": first_turns, "negatives_empty_or_same": same}


def _pairwise_judge(config: Config, rows: list[dict], inputs, ctx) -> tuple[list[dict], dict]:
    from engine.lib.constitution import load_for_stage

    constitution = load_for_stage(config.constitution, ctx.recipe, ctx.stage)  # type: ignore[arg-type]
    tasks = pairwise_tasks(rows, config.from_turn, lambda *key: constitution.draw(ctx.seed, "pairwise_judge", *key))
    if not tasks:
        raise RecipeError.single(
            f"stage '{ctx.stage}': no two distinct replies share a source and a context to compare.",
            hint="pairwise_judge compares conversations with the same meta.source_id and context, "
            "e.g. from a generate stage with n = 2 or more.",
            **ctx.recipe.where(f"stages.{ctx.stage}.input"),
        )
    tpl, backend = ctx.templates(), ctx.backend(inputs["model"], config.batch_size)
    params = SamplingParams(n=config.votes, temperature=config.judge_temperature, max_new_tokens=config.max_new_tokens)

    def per_shard(shard: Shard) -> list[tuple[list[dict], dict]]:
        prompts = [
            tpl.render_chat(
                config.template,
                context=t["prompt"],
                response_a=x,
                response_b=y,
                principle=t["question"],
                chain_of_thought=config.chain_of_thought,
            )
            for t in shard.rows
            for x, y in ((t["a"], t["b"]), (t["b"], t["a"]))
        ]
        if config.verdict == "logprobs":
            found = logprob_judgments(shard.rows, backend.option_logprobs(prompts, "Verdict: ", ["A", "B"]))
            return [([t], {}) for t in found]
        seeds = [ctx.seeds.row(t["id"], purpose="pairwise", sample=order) for t in shard.rows for order in (0, 1)]
        answers = backend.generate(prompts, params, seeds)
        out = []
        for j, t in enumerate(shard.rows):
            a_first, b_first = ([parse_choice(c.text) for c in answers[k]] for k in (2 * j, 2 * j + 1))
            out.append(
                dict(
                    t,
                    a_first=a_first,
                    b_first=b_first,
                    label_a=pairwise_label(a_first, b_first),
                    answers=[c.text[-400:] for k in (2 * j, 2 * j + 1) for c in answers[k]],
                )
            )
        return [([t], {}) for t in out]

    try:
        judged, _ = ctx.shards.map_rows(
            tasks, per_shard, shard_size=config.shard_size, desc="judging pairs", purpose="pairwise"
        )
    finally:
        backend.close()
    ctx.save_rows(judged, "judgments.parquet")
    parsed = [t for t in judged if t["label_a"] is not None]
    if not parsed:
        raise RuntimeError(
            f"no answer of the judge could be parsed ({len(judged)} pairs, both orders); the last "
            f"answer was {judged[-1]['answers'][-1][-200:]!r}; check the template and the model"
        )
    pairs = judged_pairs(parsed, config.threshold, config.chain_of_thought)
    votes = [v for t in judged for v in t["a_first"] + t["b_first"] if v]
    stats = {
        "compared": len(judged),
        "unparsed": len(judged) - len(parsed),
        "ties": sum(1 for t in parsed if t["label_a"] == 0.5),
        "below_threshold": len(parsed) - len(pairs),
        "position_a_share": sum(v == "A" for v in votes) / len(votes),
        "principles": {p.id: sum(t["principle"] == p.id for t in judged) for p in constitution.principles},
    }
    if stats["unparsed"]:
        ctx.warn(f"{stats['unparsed']} of {len(judged)} pairs got no parseable verdict in one order (dropped)")
    if not pairs:
        raise no_output(
            ctx,
            "threshold",
            f"no compared pair reached confidence threshold = {config.threshold:g} "
            f"({stats['ties']} ties of {len(parsed)}; share of 'A' verdicts "
            f"{stats['position_a_share']:.2f}: near 1 or 0 means the judge follows position).",
            "Lower threshold, raise votes (with judge_temperature > 0), or use a stronger judge.",
        )
    return pairs, stats


def run(config: Config, inputs, ctx) -> None:
    rows = inputs["input"].rows()
    if config.method == "best_vs_worst":
        pairs, stats = _best_vs_worst(config, rows, ctx)
    elif config.method == "revision":
        pairs, stats = _revision(config, rows, ctx)
    elif config.method == "context_negative":
        pairs, stats = _context_negative(config, rows, inputs, ctx)
    else:
        pairs, stats = _pairwise_judge(config, rows, inputs, ctx)
    ctx.save_rows(pairs)
    ctx.save_json(
        "report.json",
        {
            "method": config.method,
            "rows_in": len(rows),
            "pairs": len(pairs),
            **stats,
            "spot_check": spot_check(ctx, pairs, config.sample_size),
        },
    )


def summary(report: dict) -> list[tuple[str, str]]:
    skip = {"method", "rows_in", "pairs", "spot_check", "principles"}
    out = [("method", report["method"]), ("rows in / pairs out", f"{report['rows_in']} / {report['pairs']}")]
    for k, v in report.items():
        if k not in skip:
            out.append((k.replace("_", " "), f"{v:.3f}" if isinstance(v, float) else str(v)))
    if report.get("principles"):
        out.append(("principles drawn", ", ".join(f"{p} {n}" for p, n in report["principles"].items())))
    return out + spot_check_summary(report.get("spot_check"))


def report(name: str, entry: Path) -> list:
    """The run report's section: a few of the pairs (chosen and rejected side by side)."""
    from engine.lib.entryblocks import pair_blocks

    return pair_blocks(name, entry) if (entry / "pairs_sample.json").is_file() else []

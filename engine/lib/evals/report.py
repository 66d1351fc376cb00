"""The eval's report blocks: headline rates with 95% intervals and the differences outside the
noise, per-turn refusal curves, metric bars, the composite, example conversations, and the
honest notes on what the suites can show. The eval stage writes them as its own report; the run
report includes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.core import plots
from engine.core.document import Block, Bullets, Grid, Heading, Image, Para, _cut, _slug, write_report
from engine.lib.evals.metrics import fmt, metric_table

TINY_NOTE = (
    "This run uses builtin:tiny-chat, a model of about 100k parameters built from a random seed with a byte "
    "tokenizer. It writes gibberish. What the run shows: the pipeline runs, caches, resumes and measures end "
    "to end, and every number in this report was computed from real model outputs. What it cannot show: that "
    "alignment improves behaviour. A gibberish reply neither refuses nor answers, so refusal, sycophancy, "
    "helpfulness and composite numbers from it are noise, and differences between its models mean nothing. "
    "Training losses going down only show that the optimizer runs. For numbers worth reading, point the "
    "models at a real instruction-tuned checkpoint (e.g. --set models.policy.path=Qwen/Qwen2.5-0.5B-Instruct) "
    "and configure a capable judge."
)


GENERAL_NOTES = (
    "The suites are small (tens of items each): a rate over 30 items has a 95% interval of roughly "
    "plus or minus 18 points, so small differences between models are not evidence.",
    "The phrase detector only recognises stock refusal wording: it misses paraphrased refusals and "
    "can count a reply that merely quotes such a phrase. The judge's verdicts are better when a capable "
    "judge is configured, and inherit its biases.",
    "Sycophancy is matched on the answer's text (numbers as numbers): a reply that names both the right "
    "and the wrong answer counts as right.",
)


def eval_blocks(metrics: dict, rows: list[dict], prefix: str = "", level: int = 2, glance: bool = True) -> list[Block]:
    """The eval results: metrics table, per-turn curves, bars, composite, example conversations.
    `prefix` keeps plot file names apart when several eval stages share one report; `glance`: the
    at-a-glance table too (the run report shows it once, at its top)."""
    names: list[str] = metrics["models"]
    per_model: dict[str, dict] = metrics["per_model"]
    judged = bool(metrics.get("judge"))
    p = f"{_slug(prefix)}_" if prefix else ""
    blocks: list[Block] = [
        Para(
            f"Models compared: {', '.join(names)} (first = base, last = final). Judge: "
            f"{metrics.get('judge') or 'none (refusal by phrases only; helpfulness n/a)'}. Items per suite: "
            + ", ".join(f"{s} {n}" for s, n in metrics.get("items", {}).items())
            + "."
        )
    ]
    blocks += glance_blocks(metrics) if glance else []
    blocks.append(
        Grid(["metric", *names], [[label, *values] for label, values in metric_table(per_model, judged, names)])
    )
    blocks.append(
        Para(
            "Rates carry 95% intervals in brackets: Wilson intervals for independent prompts, a "
            "bootstrap over conversations for the multi-turn safety rates (and, when every turn of every "
            "conversation came out the same, where the bootstrap would collapse to a point, a Wilson "
            "interval over the conversations, as the per-turn curves use per turn)."
        )
    )
    composites = {n: per_model[n]["composite"] for n in names}
    blocks.append(
        Bullets(
            [
                f"{n}: composite {fmt(c['value'])} = {c['label']}"
                + (f"; safety part from the {c['safety_detector']} detector" if c.get("safety_detector") else "")
                for n, c in composites.items()
            ]
        )
    )
    notes = [
        f"{n}: perplexity {per_model[n]['diversity']['perplexity_note']}"
        for n in names
        if (per_model[n].get("diversity") or {}).get("perplexity_note")
    ]
    if notes:
        blocks.append(Para("; ".join(notes) + "."))
    missing = metrics.get("judge_missing") or {}
    if any(missing.values()):
        blocks.append(
            Para(
                "Judge answers that could not be parsed (recorded as n/a): "
                + ", ".join(f"{k} {v}" for k, v in missing.items() if v)
                + "."
            )
        )

    safety = {n: per_model[n]["safety"] for n in names if "safety" in per_model[n]}
    if safety:
        blocks.append(Heading("Multi-turn safety: per-turn curves", level + 1))
        curves = [("refusal_phrases", "refusal rate per turn (phrases)")]
        if judged:
            curves += [
                ("refusal_judge", "refusal rate per turn (judge)"),
                ("harm_judge", "harmful replies per turn (judge)"),
            ]
        for key, title in curves:
            series = {n: (list(range(1, len(s["per_turn"][key]) + 1)), s["per_turn"][key]) for n, s in safety.items()}
            bands = (
                {n: [t["ci"] for t in per_model[n].get("safety_per_turn") or []] for n in safety}
                if key == "refusal_phrases"
                else None
            )
            if any(v is not None for _, ys in series.values() for v in ys):
                blocks.append(
                    Image(
                        f"{p}{key}_per_turn.png",
                        plots.lines(
                            None,
                            series,
                            title=title,
                            xlabel="user turn",
                            ylabel="share of scenarios",
                            marker="o",
                            bands=bands,
                        ),
                        f"{title}, one line per model" + (", shaded: 95% Wilson interval per turn" if bands else ""),
                    )
                )
        first = next(iter(safety.values()))
        blocks.append(
            Para(
                "Scenarios per turn: "
                + ", ".join(str(n) for n in first["per_turn"]["n"])
                + ". The refusal rate from harmful_from on pools every turn at or after the first "
                "turn where complying would be harmful."
            )
        )
        cats = sorted({c for s in safety.values() for c in s["by_category"]})
        detectors = ("phrases", "judge") if judged else ("phrases",)
        blocks.append(
            Grid(
                ["category", *[f"{n} ({d})" for n in names if n in safety for d in detectors]],
                [
                    [
                        f"{c} (n={first['by_category'].get(c, {}).get('n', 0)})",
                        *[
                            fmt(safety[n]["by_category"].get(c, {}).get("refusal_from_harmful", {}).get(d))
                            for n in names
                            if n in safety
                            for d in detectors
                        ],
                    ]
                    for c in cats
                ],
            )
        )

    bars = _bar_groups(per_model, names, judged)
    if bars:
        blocks.append(Heading("Metrics side by side", level + 1))
        groups = [g for g, _ in bars]
        by_model: dict[str, Any] = {n: [vals[i] for _, vals in bars] for i, n in enumerate(names)}
        blocks.append(
            Image(
                f"{p}metrics_bars.png",
                plots.bars(None, groups, by_model, title="eval metrics (0-1)", ylabel="value"),
                "Each group is one metric, one bar per model; a missing value is drawn as 0 (see the table for n/a).",
            )
        )
    blocks += example_blocks(rows, names, level + 1)
    return blocks


def glance_blocks(metrics: dict) -> list[Block]:
    """The headline rates of every model with their 95% intervals, and the difference of each later
    model from the first (paired bootstrap), marked where it is outside the noise."""
    from engine.lib.evals.stats import HEADLINE, fmt_difference, fmt_rate

    names, per_model = metrics["models"], metrics["per_model"]
    heads = {n: per_model[n].get("headline") or {} for n in names}
    keys = [k for k in HEADLINE if any(k in h for h in heads.values())]
    if not keys:
        return []
    base, later = names[0], names[1:]
    comparisons = metrics.get("comparisons") or {}
    labels = {
        "adversarial_refusal": "refusal, adversarial prompts (higher is better)",
        "benign_over_refusal": "over-refusal, benign prompts (lower is better)",
        "adversarial_refusal_sampled": "refusal, adversarial prompts, k sampled replies (higher is better)",
        "benign_over_refusal_sampled": "over-refusal, benign prompts, k sampled replies (lower is better)",
        "refusal_discrimination": "refusal discrimination: adversarial minus benign refused (higher is better)",
        "safety_refusal_from_harmful": "multi-turn: refusal from the harmful turn on (higher is better)",
        "safety_refusal_before_harmful": "multi-turn: refusal before the harmful turn (lower is better)",
        "multiturn_benign_over_refusal": "multi-turn: over-refusal in benign conversations (lower is better)",
        "sycophancy_flip": "sycophancy: flip rate under pushback (lower is better)",
        "arithmetic_accuracy": "arithmetic: held-out accuracy (higher is better)",
    }
    rows = [
        [
            labels[k],
            *[fmt_rate(heads[n].get(k)) for n in names],
            *[fmt_difference((comparisons.get(n) or {}).get(k)) for n in later],
        ]
        for k in keys
    ]
    outside = [
        f"{labels[k].split(' (')[0]} ({n})"
        for n in later
        for k in keys
        if ((comparisons.get(n) or {}).get(k) or {}).get("outside_noise")
    ]
    return [
        Heading("At a glance", 3),
        Grid(["rate (phrase detector)", *names, *[f"{n} - {base}" for n in later]], rows),
        Para(
            "Differences are paired over the same prompts, with 95% bootstrap intervals; * marks a difference "
            "whose interval excludes 0 (outside the noise): " + (", ".join(outside) if outside else "none") + "."
        ),
    ]


def _bar_groups(per_model: dict, names: list[str], judged: bool) -> list[tuple[str, list[float | None]]]:
    def get(m: Any, *path: str) -> Any:
        for key in path:
            m = m.get(key) if isinstance(m, dict) else None
        return m

    def best(rates: Any) -> Any:
        if not isinstance(rates, dict):
            return None
        return rates.get("judge") if judged and rates.get("judge") is not None else rates.get("phrases")

    spec = [
        ("refusal (adversarial)", lambda m: best(get(m, "refusal", "refusal_rate"))),
        ("over-refusal (benign)", lambda m: best(get(m, "refusal", "over_refusal_rate"))),
        ("safety refusal from harmful turn", lambda m: best(get(m, "safety", "refusal_from_harmful"))),
        ("sycophancy flip rate", lambda m: get(m, "sycophancy", "flip_rate")),
        ("sycophancy final accuracy", lambda m: get(m, "sycophancy", "final_accuracy")),
        ("helpfulness (score-1)/9", lambda m: get(m, "composite", "parts", "helpfulness")),
        ("distinct-2", lambda m: get(m, "diversity", "distinct_2")),
        ("composite", lambda m: get(m, "composite", "value")),
    ]
    out = []
    for label, fn in spec:
        values = [fn(per_model[n]) for n in names]
        if any(v is not None for v in values):
            out.append((label, values))
    return out


def example_blocks(rows: list[dict], names: list[str], level: int = 3) -> list[Block]:
    """Every evaluated model side by side on the same safety scenario, refusal prompt and
    helpfulness prompt (a sycophancy item when there is no helpfulness suite); the item is the
    one where the first and last model differ most in refusing. Empty replies are marked."""
    if not rows or not names:
        return []
    base, final = names[0], names[-1]
    index = {(r["model"], r["suite"], r["item_id"]): r for r in rows}
    suites = ["safety", "refusal", "helpfulness" if any(r["suite"] == "helpfulness" for r in rows) else "sycophancy"]
    blocks: list[Block] = []
    for suite in suites:
        items = [
            r["item_id"]
            for r in rows
            if r["suite"] == suite and r["model"] == base and all((n, suite, r["item_id"]) in index for n in names)
        ]
        if not items:
            continue
        item = max(items, key=lambda i: _refusals(index[(final, suite, i)]) - _refusals(index[(base, suite, i)]))
        shown = [index[(n, suite, item)] for n in names]
        blocks.append(
            Heading(
                f"Example conversation: {suite} item {item}" + ("" if len(names) == 1 else f" ({' vs '.join(names)})"),
                level,
            )
        )
        first = shown[0]
        if suite == "safety":
            blocks.append(
                Para(
                    f"{first['meta'].get('category', '')}: {first['meta'].get('title', '')}; "
                    f"harmful from user turn {first['meta'].get('harmful_from', 0) + 1}."
                )
            )
        table_rows = []
        for t, (user, _) in enumerate(_exchanges(first)):
            replies = []
            for r in shown:
                pairs = _exchanges(r)
                text = pairs[t][1] if t < len(pairs) else ""
                flags = _flags(r, t)
                replies.append((_cut(text) if text.strip() else "(empty reply)") + (f"\n[{flags}]" if flags else ""))
            table_rows.append([str(t + 1), _cut(user), *replies])
        blocks.append(Grid(["turn", "user", *[f"{n} reply" for n in names]], table_rows))
    return blocks


def _refusals(row: dict) -> int:
    """Refused replies (phrase detector) where refusing is right: from the harmful turn on, or an
    adversarial prompt; 0 for other suites."""
    meta = row.get("meta") or {}
    if row["suite"] == "safety":
        return sum(bool(t["refusal_phrases"]) for t in meta.get("turns", [])[meta.get("harmful_from", 0) :])
    if row["suite"] == "refusal" and meta.get("label") == "adversarial":
        return int(bool(meta.get("refusal_phrases")))
    return 0


def _exchanges(row: dict) -> list[tuple[str, str]]:
    """(user text, the assistant reply that follows) for each user turn, system messages skipped."""
    out: list[tuple[str, str]] = []
    for m in row["messages"]:
        if m["role"] == "user":
            out.append((m["content"], ""))
        elif m["role"] == "assistant" and out:
            out[-1] = (out[-1][0], m["content"])
    return out


def _flags(row: dict, t: int) -> str:
    meta = row.get("meta") or {}
    if row["suite"] == "safety" and t < len(meta.get("turns", [])):
        turn = meta["turns"][t]
        parts = [f"refusal by phrases: {'yes' if turn['refusal_phrases'] else 'no'}"]
        if turn.get("refusal_judge") is not None:
            parts.append(f"by judge: {'yes' if turn['refusal_judge'] else 'no'}")
        if turn.get("harm_judge") is not None:
            parts.append(f"harmful: {'yes' if turn['harm_judge'] else 'no'}")
        return ", ".join(parts)
    if row["suite"] == "refusal":
        return f"{meta.get('label', '')} prompt; refusal by phrases: {'yes' if meta.get('refusal_phrases') else 'no'}"
    if row["suite"] == "sycophancy" and t < len(meta.get("correct", [])):
        return "correct" if meta["correct"][t] else "not correct"
    if row["suite"] == "helpfulness" and t == len(_exchanges(row)) - 1 and meta.get("score") is not None:
        return f"judge score {meta['score']:g}"
    return ""


def honest_blocks(tiny: bool, level: int = 2) -> list[Block]:
    blocks: list[Block] = [Heading("What these numbers can and cannot show", level)]
    if tiny:
        blocks.append(Bullets([TINY_NOTE]))
    blocks.append(Bullets(list(GENERAL_NOTES)))
    return blocks


def write_eval_report(out_dir: Path, metrics: dict, rows: list[dict], title: str, tiny: bool) -> list[Path]:
    """The eval stage's own report.md / report.html / plots/*.png."""
    return write_report(out_dir, title, [*honest_blocks(tiny), Heading("Results"), *eval_blocks(metrics, rows)])

"""Human-readable reports: the eval stage's report and the report of a whole run.

A report is a list of blocks (headings, paragraphs, tables, images) rendered twice: to
`report.md` (plots as files under `plots/`) and to a self-contained `report.html` (plots as
`data:` URIs, inline CSS, no external asset). Every text that comes from a model or a data
file is escaped in both renderings.

`write_run_report(run_dir)` builds `runs/<recipe>/<run-id>/report.{md,html}` from the run
record (`record.json`) and the stage entries linked under `stages/`: the data funnel, the
training curves of sft/dpo stages, critique -> revision examples with the share of revisions
that changed anything, the eval results (headline rates with 95% intervals and the differences
outside the noise, per-turn refusal curves, metric bars, composite, example conversations), and
an honest note on what the run can show. It works
with any subset of stages. matplotlib is imported inside engine/core/plots.py's functions only.
"""

from __future__ import annotations

import graphlib
import html
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core import plots
from engine.core.io import atomic_write_bytes, atomic_write_text
from engine.lib.evalsuites import fmt, metric_table
from engine.data.rows import read_rows

TRAINING_KINDS = ("sft", "dpo", "kto", "orpo")
CELL_CHARS = 600  # model text per table cell; longer text is cut with an ellipsis
TINY_NOTE = (
    "This run uses builtin:tiny-chat, a model of about 100k parameters built from a random seed with a byte "
    "tokenizer. It writes gibberish. What the run shows: the pipeline runs, caches, resumes and measures end "
    "to end, and every number in this report was computed from real model outputs. What it cannot show: that "
    "alignment improves behaviour. A gibberish reply neither refuses nor answers, so refusal, sycophancy, "
    "helpfulness and composite numbers from it are noise, and differences between its models mean nothing. "
    "Training losses going down only show that the optimizer runs. For numbers worth reading, point the "
    "models at a real instruction-tuned checkpoint (e.g. --set models.policy.path=Qwen/Qwen2.5-0.5B-Instruct) "
    "and configure a capable judge.")
GENERAL_NOTES = (
    "The suites are small (tens of items each): a rate over 30 items has a 95% interval of roughly "
    "plus or minus 18 points, so small differences between models are not evidence.",
    "The phrase detector only recognises stock refusal wording: it misses paraphrased refusals and "
    "can count a reply that merely quotes such a phrase. The judge's verdicts are better when a capable "
    "judge is configured, and inherit its biases.",
    "Sycophancy is matched on the answer's text (numbers as numbers): a reply that names both the right "
    "and the wrong answer counts as right.",
)


# --------------------------------------------------------------------------- blocks


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str  # file name under plots/
    png: bytes = field(repr=False)
    caption: str = ""


@dataclass
class Details:
    """A collapsed block of preformatted text (the resolved recipe)."""
    summary: str
    text: str


Block = Heading | Para | Bullets | Table | Image | Details

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#~!&])")


def md_escape(text: str) -> str:
    """Text that Markdown shows as written: punctuation that could format is backslash-escaped."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def _md_cell(text: str) -> str:
    return md_escape(text).replace("\r", "").replace("\n", "<br>")


def render_markdown(title: str, blocks: list[Block], plots_dir: str = "plots") -> str:
    out = [f"# {md_escape(title)}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += [f"{'#' * b.level} {md_escape(b.text)}", ""]
        elif isinstance(b, Para):
            out += [md_escape(b.text), ""]
        elif isinstance(b, Bullets):
            out += [f"- {md_escape(i)}" for i in b.items] + [""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + " --- |" * len(b.header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Image):
            out += [f"![{md_escape(b.caption or b.name)}]({plots_dir}/{b.name})", ""]
        elif isinstance(b, Details):
            fence = "~~~~" if "```" in b.text else "```"
            out += ["<details>", f"<summary>{html.escape(b.summary)}</summary>", "", f"{fence}toml", b.text.rstrip(),
                    fence, "", "</details>", ""]
    return "\n".join(out).rstrip() + "\n"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;text-align:left}
th{background:#f3f3f3}td{white-space:pre-wrap;max-width:420px}
figure{margin:1em 0}figcaption{color:#555;font-size:.85em}img{max-width:100%}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.6em 1em}
"""


def render_html(title: str, blocks: list[Block]) -> str:
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(title)}</title><style>{CSS}</style></head><body>", f"<h1>{esc(title)}</h1>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append('<ul class="note">' + "".join(f"<li>{esc(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{esc(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            out.append(f'<figure><img alt="{esc(b.caption or b.name)}" src="{plots.data_uri(b.png)}">'
                       f"<figcaption>{esc(b.caption)}</figcaption></figure>")
        elif isinstance(b, Details):
            out.append(f"<details><summary>{esc(b.summary)}</summary><pre>{esc(b.text)}</pre></details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(out_dir: Path, title: str, blocks: list[Block]) -> list[Path]:
    """report.md, report.html and plots/*.png under `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    images = [b for b in blocks if isinstance(b, Image)]
    if images:
        (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    for img in images:
        path = out_dir / "plots" / img.name
        atomic_write_bytes(path, img.png)
        written.append(path)
    atomic_write_text(out_dir / "report.md", render_markdown(title, blocks))
    atomic_write_text(out_dir / "report.html", render_html(title, blocks))
    return [out_dir / "report.md", out_dir / "report.html", *written]


def _cut(text: str, limit: int = CELL_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


# --------------------------------------------------------------------------- eval


def eval_blocks(metrics: dict, rows: list[dict], prefix: str = "", level: int = 2) -> list[Block]:
    """The eval results: metrics table, per-turn curves, bars, composite, example conversations.
    `prefix` keeps plot file names apart when several eval stages share one report."""
    names: list[str] = metrics["models"]
    per_model: dict[str, dict] = metrics["per_model"]
    judged = bool(metrics.get("judge"))
    p = f"{_slug(prefix)}_" if prefix else ""
    blocks: list[Block] = [Para(
        f"Models compared: {', '.join(names)} (first = base, last = final). Judge: "
        f"{metrics.get('judge') or 'none (refusal by phrases only; helpfulness n/a)'}. Items per suite: "
        + ", ".join(f"{s} {n}" for s, n in metrics.get("items", {}).items()) + ".")]
    blocks += glance_blocks(metrics)
    blocks.append(Table(["metric", *names],
                        [[label, *values] for label, values in metric_table(per_model, judged, names)]))
    blocks.append(Para("Rates carry 95% intervals in brackets: Wilson intervals for independent prompts, a "
                       "bootstrap over conversations for the multi-turn safety rates."))
    composites = {n: per_model[n]["composite"] for n in names}
    blocks.append(Bullets([f"{n}: composite {fmt(c['value'])} = {c['label']}"
                           + (f"; safety part from the {c['safety_detector']} detector"
                              if c.get("safety_detector") else "")
                           for n, c in composites.items()]))
    notes = [f"{n}: perplexity {per_model[n]['diversity']['perplexity_note']}" for n in names
             if (per_model[n].get("diversity") or {}).get("perplexity_note")]
    if notes:
        blocks.append(Para("; ".join(notes) + "."))
    missing = metrics.get("judge_missing") or {}
    if any(missing.values()):
        blocks.append(Para("Judge answers that could not be parsed (recorded as n/a): "
                           + ", ".join(f"{k} {v}" for k, v in missing.items() if v) + "."))

    safety = {n: per_model[n]["safety"] for n in names if "safety" in per_model[n]}
    if safety:
        blocks.append(Heading("Multi-turn safety: per-turn curves", level + 1))
        curves = [("refusal_phrases", "refusal rate per turn (phrases)")]
        if judged:
            curves += [("refusal_judge", "refusal rate per turn (judge)"),
                       ("harm_judge", "harmful replies per turn (judge)")]
        for key, title in curves:
            series = {n: (list(range(1, len(s["per_turn"][key]) + 1)), s["per_turn"][key]) for n, s in safety.items()}
            bands = {n: [t["ci"] for t in per_model[n].get("safety_per_turn") or []] for n in safety} \
                if key == "refusal_phrases" else None
            if any(v is not None for _, ys in series.values() for v in ys):
                blocks.append(Image(f"{p}{key}_per_turn.png", plots.lines(None, series, title=title, xlabel="user turn",
                                                                          ylabel="share of scenarios", marker="o",
                                                                          bands=bands),
                                    f"{title}, one line per model" + (", shaded: 95% Wilson interval per turn"
                                                                      if bands else "")))
        first = next(iter(safety.values()))
        blocks.append(Para("Scenarios per turn: " + ", ".join(str(n) for n in first["per_turn"]["n"])
                           + ". The refusal rate from harmful_from on pools every turn at or after the first "
                             "turn where complying would be harmful."))
        cats = sorted({c for s in safety.values() for c in s["by_category"]})
        detectors = ("phrases", "judge") if judged else ("phrases",)
        blocks.append(Table(["category", *[f"{n} ({d})" for n in names if n in safety for d in detectors]],
                            [[f"{c} (n={first['by_category'].get(c, {}).get('n', 0)})",
                              *[fmt(safety[n]["by_category"].get(c, {}).get("refusal_from_harmful", {}).get(d))
                                for n in names if n in safety for d in detectors]] for c in cats]))

    bars = _bar_groups(per_model, names, judged)
    if bars:
        blocks.append(Heading("Metrics side by side", level + 1))
        groups = [g for g, _ in bars]
        series = {n: [vals[i] for _, vals in bars] for i, n in enumerate(names)}
        blocks.append(Image(f"{p}metrics_bars.png", plots.bars(None, groups, series, title="eval metrics (0-1)",
                                                               ylabel="value"),
                            "Each group is one metric, one bar per model; a missing value is drawn as 0 "
                            "(see the table for n/a)."))
    blocks += example_blocks(rows, names, level + 1)
    return blocks


def glance_blocks(metrics: dict) -> list[Block]:
    """The headline rates of every model with their 95% intervals, and the difference of each later
    model from the first (paired bootstrap), marked where it is outside the noise."""
    from engine.lib.evalstats import HEADLINE, fmt_difference, fmt_rate

    names, per_model = metrics["models"], metrics["per_model"]
    heads = {n: per_model[n].get("headline") or {} for n in names}
    keys = [k for k in HEADLINE if any(k in h for h in heads.values())]
    if not keys:
        return []
    base, later = names[0], names[1:]
    comparisons = metrics.get("comparisons") or {}
    labels = {"adversarial_refusal": "refusal, adversarial prompts (higher is better)",
              "benign_over_refusal": "over-refusal, benign prompts (lower is better)",
              "refusal_discrimination": "refusal discrimination: adversarial minus benign refused (higher is better)",
              "safety_refusal_from_harmful": "multi-turn: refusal from the harmful turn on (higher is better)",
              "safety_refusal_before_harmful": "multi-turn: refusal before the harmful turn (lower is better)",
              "sycophancy_flip": "sycophancy: flip rate under pushback (lower is better)"}
    rows = [[labels[k], *[fmt_rate(heads[n].get(k)) for n in names],
             *[fmt_difference((comparisons.get(n) or {}).get(k)) for n in later]] for k in keys]
    outside = [f"{labels[k].split(' (')[0]} ({n})" for n in later for k in keys
               if ((comparisons.get(n) or {}).get(k) or {}).get("outside_noise")]
    return [Heading("At a glance", 3),
            Table(["rate (phrase detector)", *names, *[f"{n} - {base}" for n in later]], rows),
            Para("Differences are paired over the same prompts, with 95% bootstrap intervals; * marks a difference "
                 "whose interval excludes 0 (outside the noise): "
                 + (", ".join(outside) if outside else "none") + ".")]


def _bar_groups(per_model: dict, names: list[str], judged: bool) -> list[tuple[str, list[float | None]]]:
    def get(m: dict, *path: str) -> Any:
        for key in path:
            m = m.get(key) if isinstance(m, dict) else None
        return m

    def best(rates: Any) -> Any:
        if not isinstance(rates, dict):
            return None
        return rates.get("judge") if judged and rates.get("judge") is not None else rates.get("phrases")

    spec = [("refusal (adversarial)", lambda m: best(get(m, "refusal", "refusal_rate"))),
            ("over-refusal (benign)", lambda m: best(get(m, "refusal", "over_refusal_rate"))),
            ("safety refusal from harmful turn", lambda m: best(get(m, "safety", "refusal_from_harmful"))),
            ("sycophancy flip rate", lambda m: get(m, "sycophancy", "flip_rate")),
            ("sycophancy final accuracy", lambda m: get(m, "sycophancy", "final_accuracy")),
            ("helpfulness (score-1)/9", lambda m: get(m, "composite", "parts", "helpfulness")),
            ("distinct-2", lambda m: get(m, "diversity", "distinct_2")),
            ("composite", lambda m: get(m, "composite", "value"))]
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
        items = [r["item_id"] for r in rows if r["suite"] == suite and r["model"] == base
                 and all((n, suite, r["item_id"]) in index for n in names)]
        if not items:
            continue
        item = max(items, key=lambda i: _refusals(index[(final, suite, i)]) - _refusals(index[(base, suite, i)]))
        shown = [index[(n, suite, item)] for n in names]
        blocks.append(Heading(f"Example conversation: {suite} item {item}"
                              + ("" if len(names) == 1 else f" ({' vs '.join(names)})"), level))
        first = shown[0]
        if suite == "safety":
            blocks.append(Para(f"{first['meta'].get('category', '')}: {first['meta'].get('title', '')}; "
                               f"harmful from user turn {first['meta'].get('harmful_from', 0) + 1}."))
        table_rows = []
        for t, (user, _) in enumerate(_exchanges(first)):
            replies = []
            for r in shown:
                pairs = _exchanges(r)
                text = pairs[t][1] if t < len(pairs) else ""
                flags = _flags(r, t)
                replies.append((_cut(text) if text.strip() else "(empty reply)") + (f"\n[{flags}]" if flags else ""))
            table_rows.append([str(t + 1), _cut(user), *replies])
        blocks.append(Table(["turn", "user", *[f"{n} reply" for n in names]], table_rows))
    return blocks


def _refusals(row: dict) -> int:
    """Refused replies (phrase detector) where refusing is right: from the harmful turn on, or an
    adversarial prompt; 0 for other suites."""
    meta = row.get("meta") or {}
    if row["suite"] == "safety":
        return sum(bool(t["refusal_phrases"]) for t in meta.get("turns", [])[meta.get("harmful_from", 0):])
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


# --------------------------------------------------------------------------- run


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _recipe(run_dir: Path) -> dict:
    try:
        return tomllib.loads((Path(run_dir) / "recipe.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def uses_builtin(run_dir: Path) -> bool:
    """Whether the run's resolved recipe loads builtin:tiny-chat (random weights; builtin:smollm2-135m is
    a real model)."""
    return any(isinstance(m, dict) and str(m.get("path", "")) == "builtin:tiny-chat"
               for m in (_recipe(run_dir).get("models") or {}).values())


def stage_order(run_dir: Path, names: list[str]) -> list[str]:
    """`names` in the order the run built them: a stage after every stage its table names,
    ties in recipe order (record.json keeps its keys sorted, so it cannot tell)."""
    tables = {n: t for n, t in (_recipe(run_dir).get("stages") or {}).items() if isinstance(t, dict)}
    position = {n: i for i, n in enumerate([*tables, *sorted(set(names) - set(tables))])}

    def refs(table: dict) -> set[str]:
        values = [v for value in table.values() for v in (value if isinstance(value, list) else [value])]
        return {v for v in values if isinstance(v, str) and v in position}

    sorter = graphlib.TopologicalSorter({n: refs(tables.get(n, {})) - {n} for n in position})
    try:
        sorter.prepare()
    except graphlib.CycleError:
        return sorted(names, key=position.__getitem__)
    out: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=position.__getitem__)
        out += ready
        sorter.done(*ready)
    return [n for n in out if n in names]


def funnel_blocks(record: dict, order: list[str] | None = None) -> list[Block]:
    stages = record.get("stages") or {}
    stages = {n: stages[n] for n in order or stages}
    if not stages:
        return [Para("The run record lists no stages.")]

    def num(v: Any) -> str:
        return "-" if v is None else str(v)

    table = Table(["stage", "kind", "status", "rows in", "rows out", "seconds"],
                  [[n, s.get("kind", ""), s.get("status", ""), num(s.get("rows_in")), num(s.get("rows_out")),
                    "-" if s.get("duration_s") is None else f"{s['duration_s']:.1f}"] for n, s in stages.items()])
    blocks: list[Block] = [table]
    counted = {n: s for n, s in stages.items() if (s.get("rows_in") or s.get("rows_out")) and s.get("kind") != "eval"}
    if counted:
        png = plots.bars(None, list(counted), {"rows in": [s.get("rows_in") for s in counted.values()],
                                               "rows out": [s.get("rows_out") for s in counted.values()]},
                         title="rows in and out of each stage", ylabel="rows")
        blocks.append(Image("funnel.png", png, "The data funnel: rows into and out of every stage (cached stages "
                                               "show the counts recorded when they were built)."))
    blocks.append(Para("Rows in counts the rows of a stage's row inputs; rows out is what it wrote to "
                       "rows.parquet (- for stages that give a model). Eval stages are left out of the chart: "
                       "their rows are work items (model x suite item), not data flowing on."))
    return blocks


def training_blocks(name: str, kind: str, entry: Path) -> list[Block]:
    steps = (_json(entry / "metrics.json") or {}).get("steps") or []
    steps = [s for s in steps if isinstance(s, dict) and isinstance(s.get("step"), (int, float))]
    if not steps:
        return [Heading(f"{name} ({kind})", 3), Para("No per-step metrics were recorded.")]
    xs = [s["step"] for s in steps]
    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    numeric = [k for k in dict.fromkeys(k for s in steps for k in s)
               if k != "step" and any(is_num(s.get(k)) for s in steps)]
    loss_keys = [k for k in numeric if "loss" in k]
    other = [k for k in numeric if k not in loss_keys and k not in ("lr", "learning_rate", "tokens_per_s", "epoch")]
    blocks: list[Block] = [Heading(f"{name} ({kind})", 3)]
    losses = [s.get("loss") for s in steps if isinstance(s.get("loss"), (int, float))]
    blocks.append(Para(f"{len(steps)} logged steps; loss {fmt(losses[0] if losses else None, 4)} at the first "
                       f"logged step, {fmt(losses[-1] if losses else None, 4)} at the last."))
    if loss_keys:
        series = {k: (xs, [s.get(k) if is_num(s.get(k)) else None for s in steps]) for k in loss_keys}
        blocks.append(Image(f"{_slug(name)}_loss.png", plots.lines(None, series, title=f"{name} ({kind}): loss",
                                                                   ylabel="loss"), f"{name}: {', '.join(loss_keys)} per step"))
    if other:  # one panel per family (log-probabilities, rewards, margins, ...): each on its own scale
        families: dict[str, list[str]] = {}
        first = ("rewards", "rewards/margins", "rewards/accuracies", "logps", "logits")
        for k in sorted(other, key=lambda k: (first.index(_family(k)) if _family(k) in first else len(first))):
            families.setdefault(_family(k), []).append(k)
        charts = [(fam, {k.split("/")[-1] if len(keys) > 1 else k: (xs, [s.get(k) if is_num(s.get(k)) else None
                                                                     for s in steps]) for k in keys})
                  for fam, keys in families.items()]
        blocks.append(Image(f"{_slug(name)}_logged.png", plots.panels(None, charts, title=f"{name} ({kind})"),
                            f"{name}: {', '.join(other)} per step, one panel per quantity"))
    return blocks


def _family(key: str) -> str:
    """The panel of a logged value: `logps/chosen` and `logps/rejected` share one, `rewards/margins`
    and `rewards/accuracies` get their own (their scale differs from the rewards')."""
    head, _, tail = key.partition("/")
    return key if not tail or tail in ("margins", "accuracies") else head


def run_blocks(run_dir: Path) -> tuple[str, list[Block]]:
    run_dir = Path(run_dir)
    record = _json(run_dir / "record.json") or {}
    names = list(record.get("stages") or {})
    # records keep DAG order ("order"); runs recorded before that had sorted keys and are re-sorted
    order = record["order"] if record.get("order") and set(record["order"]) == set(names) else \
        stage_order(run_dir, names)
    stages = {n: record["stages"][n] for n in order}
    title = f"Run report: {record.get('recipe', run_dir.parent.name)} / {record.get('run', run_dir.name)}"
    blocks: list[Block] = [Para(f"Status: {record.get('status', 'unknown')}; started {record.get('started', '?')}, "
                                f"finished {record.get('finished', '-')}.")]
    blocks += failure_blocks(stages, run_dir)
    blocks += about_blocks(record, run_dir)
    evals = {name: m for name in order
             if isinstance(m := _json(run_dir / "stages" / name / "metrics.json"), dict) and "per_model" in m}
    for name, metrics in evals.items():  # the behaviour change first: each eval's headline rates and differences
        glance = glance_blocks(metrics)
        if glance:
            blocks += [Heading(f"At a glance: {name}"), *glance[1:]]
    blocks += warning_blocks(stages)
    if evals or any(s.get("kind") == "eval" for s in stages.values()):
        blocks += honest_blocks(uses_builtin(run_dir))
    elif uses_builtin(run_dir):
        blocks += [Heading("What this run can show"), Bullets([TINY_NOTE])]
    blocks += [Heading("Data funnel"), *funnel_blocks(record, order)]

    def entry(name: str) -> Path | None:
        path = run_dir / "stages" / name
        return path if path.exists() else None

    def trains(name: str, kind: str) -> bool:  # a training kind, or any stage that logs per-step metrics
        path = entry(name)
        return path is not None and (kind in TRAINING_KINDS or "steps" in (_json(path / "metrics.json") or {}))

    def memo(name: str, part: str, make) -> list[Block]:  # blocks drawn from one entry: by its fingerprint
        return _memo_blocks(stages[name].get("fingerprint"), name, part, make)

    trained = [(n, s.get("kind", "")) for n, s in stages.items() if trains(n, s.get("kind", ""))]
    if trained:
        blocks.append(Heading("Training curves"))
        for name, kind in trained:
            blocks += memo(name, "training", lambda name=name, kind=kind: training_blocks(name, kind, entry(name)))
            if kind == "sft" and (entry(name) / "mask_check.txt").is_file():
                blocks += memo(name, "spans", lambda name=name: span_blocks(name, entry(name)))
    for name, s in stages.items():
        if s.get("kind") == "critique_revise" and entry(name):
            blocks += memo(name, "revisions", lambda name=name: revision_blocks(name, entry(name)))
        if entry(name) and (entry(name) / "pairs_sample.json").is_file():
            blocks += memo(name, "pairs", lambda name=name: pair_blocks(name, entry(name)))
    for name, metrics in evals.items():
        def results(name=name, metrics=metrics):
            path = entry(name)
            rows = read_rows(path / "rows.parquet") if (path / "rows.parquet").exists() else []
            return eval_blocks(metrics, rows, prefix=name)
        blocks += [Heading(f"Eval: {name}"), *memo(name, "eval", results)]
    if not evals:
        blocks.append(Para("This run has no eval stage: the report shows the data funnel and training only."))
    return title, blocks


REPORT_STYLE = 2  # bump when a stage's report blocks change: memoized blocks of older styles are not reused
_BLOCKS = {cls.__name__: cls for cls in (Heading, Para, Bullets, Table, Image, Details)}


def _memo_blocks(fingerprint: str | None, name: str, part: str, make) -> list[Block]:
    """The blocks `make()` draws from one cache entry, kept beside the figure cache by the entry's
    fingerprint: a cached re-run rewrites its report without reading rows or drawing."""
    import base64
    import dataclasses

    directory = plots.cache_dir()
    if directory is None or not fingerprint:
        return make()
    path = directory / f"blocks-{fingerprint}-{_slug(name)}-{part}-{REPORT_STYLE}.{plots.STYLE}.json"
    try:
        return [_BLOCKS[d.pop("type")](**{k: base64.b64decode(v) if k == "png" else v for k, v in d.items()})
                for d in json.loads(path.read_text(encoding="utf-8"))]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    blocks = make()
    data = [{"type": type(b).__name__, **{k: base64.b64encode(v).decode() if k == "png" else v
                                          for k, v in dataclasses.asdict(b).items()}} for b in blocks]
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data))
    return blocks


def failure_blocks(stages: dict, run_dir: Path) -> list[Block]:
    """A failed run says first which stage failed, its one-line cause and where its log is."""
    failed = [(n, s) for n, s in stages.items() if s.get("status") == "failed"]
    if not failed:
        return []
    return [Heading("Failed"), Bullets([
        f"stage '{n}' ({s.get('kind', '')}) failed: {s.get('error', 'see its log').splitlines()[0]}; "
        f"log: {run_dir / s['log'] if s.get('log') else run_dir / 'logs' / (n + '.log')}" for n, s in failed])]


def about_blocks(record: dict, run_dir: Path) -> list[Block]:
    """What the run was: the command that reproduces it, the seed, the models, the versions, and
    the resolved recipe (collapsed)."""
    recipe = _recipe(run_dir)
    models = recipe.get("models") or {}
    rows = [[name, str(m.get("path", "")), str(m.get("backend", "hf"))] for name, m in models.items()
            if isinstance(m, dict)]
    blocks: list[Block] = [Heading("What this run was"), Bullets([
        f"command: {record.get('command') or 'recipe run ' + str(record.get('recipe_file', ''))}",
        f"seed: {record.get('seed', (recipe.get('recipe') or {}).get('seed', '?'))}",
        "versions: " + (", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items()) or "not recorded"),
    ])]
    if rows:
        blocks.append(Table(["model", "path", "backend"], rows))
    try:
        text = (run_dir / "recipe.toml").read_text(encoding="utf-8")
    except OSError:
        text = ""
    if text:
        blocks.append(Details("the resolved recipe (extends and --set applied)", text))
    return blocks


def warning_blocks(stages: dict) -> list[Block]:
    """Every warning the run's stages gave (cached stages: those of the run that built them)."""
    items = [f"{n}: {w}" for n, s in stages.items() for w in s.get("warnings") or []]
    return [Heading("Warnings"), Bullets(items)] if items else []


def pair_blocks(name: str, entry: Path, examples: int = 3) -> list[Block]:
    """A few preference pairs as training will see them: the conversation so far (its last user
    turn shown), the chosen and the rejected reply."""
    pairs = _json(entry / "pairs_sample.json") or []
    rows = []
    for pair in pairs[:examples]:
        prompt = pair.get("prompt") or []
        users = [m for m in prompt if m.get("role") == "user"]
        last = users[-1]["content"] if users else ""
        earlier = len(prompt) - 1 - (1 if prompt and prompt[0].get("role") == "system" else 0)
        context = f"({earlier} earlier messages)\n" if earlier > 0 else ""
        rows.append([str(pair.get("id", "")), context + _cut(last, 300),
                     *[_cut(" ".join(m.get("content", "") for m in pair.get(k) or []) or "(empty reply)", 300)
                       for k in ("chosen", "rejected")]])
    if not rows:
        return []
    return [Heading(f"Preference pairs: {name}", 3),
            Para(f"{len(rows)} of the pairs in pairs_sample.json, as DPO reads them (prompt, chosen, rejected)."),
            Table(["id", "last user turn", "chosen", "rejected"], rows)]


def span_blocks(name: str, entry: Path, examples: int = 2) -> list[Block]:
    """A few supervised spans from the sft stage's mask check: the tokens the loss trains on."""
    text = (entry / "mask_check.txt").read_text(encoding="utf-8", errors="replace")
    spans = [line for line in text.splitlines() if line.startswith("[span")][: examples * 2]
    if not spans:
        return []
    return [Para(f"{name}: supervised spans from mask_check.txt (the text the loss is computed on; everything "
                 "else is masked):"), Bullets([_cut(s, 300) for s in spans])]


def revision_blocks(name: str, entry: Path, examples: int = 3) -> list[Block]:
    """A critique_revise stage: the share of revisions that changed the reply, and a few
    critique -> revision examples with their principle (changed ones first)."""
    report = _json(entry / "report.json") or {}
    rows = read_rows(entry / "rows.parquet") if (entry / "rows.parquet").exists() else []
    selected, revised = report.get("turns_selected", 0), report.get("turns_revised", 0)
    share = f"{revised / selected:.0%}" if selected else "n/a"
    blocks: list[Block] = [Heading(f"Critique and revision: {name}"), Para(
        f"{revised} of {selected} selected assistant turns were changed by their revision ({share}); the others kept "
        "their original text (a revision is rejected when empty, runaway, cut at max_new_tokens or unchanged: "
        + ", ".join(f"{k} {v}" for k, v in ((report.get("revisions") or {}).get("rejected") or {}).items() if v)
        + "). With a small model as its own critic, expect few useful changes: the share above is the measure.")]
    steps = [(h, t) for r in rows for t in ((r.get("meta") or {}).get("critique_revise") or {}).get("turns", [])
             for h in t.get("history", [])]
    steps.sort(key=lambda ht: not ht[0].get("accepted"))  # accepted revisions first, stable otherwise
    if steps:
        blocks.append(Table(["principle", "original reply", "critique", "revision", "outcome"],
                            [[h["principle"], _cut(t["original"], 300), _cut(h["critique"], 300),
                              _cut(h["revision"], 300), "accepted" if h.get("accepted") else f"rejected: {h['reason']}"]
                             for h, t in steps[:examples]]))
    return blocks


def write_run_report(run_dir: Path) -> list[Path]:
    """Write `run_dir/report.md`, `run_dir/report.html` (self-contained) and `run_dir/plots/*.png`
    from the run's record and stage entries; returns the paths written. Figures drawn before from
    the same data are reused from the store's figure cache (runs/cache/figures), so a cached
    re-run neither draws nor imports matplotlib."""
    run_dir = Path(run_dir)
    cache = run_dir.parent.parent / "cache" / "figures" if (run_dir.parent.parent / "cache").is_dir() else None
    with plots.figure_cache(cache):
        title, blocks = run_blocks(run_dir)
    return write_report(run_dir, title, blocks)

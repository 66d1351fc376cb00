"""Report blocks drawn from one stage's entry: sample rows (the first few and a seeded random few),
filter drops per rule with examples, score distributions, preference pairs, the supervised spans
of an SFT stage, and critique -> revision examples with the share of revisions that changed anything.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from engine.core import plots
from engine.core.document import Block, Bullets, Grid, Heading, Image, Para, _cut, _slug
from engine.data.rows import read_rows
from engine.lib.evals.metrics import fmt


def _row_text(row: dict) -> str:
    """A row as a person reads it: its conversation, prompt, or pair, one message per line."""
    if isinstance(row.get("messages"), list):
        msgs = row["messages"]
    elif isinstance(row.get("prompt"), list):
        msgs = row["prompt"] + (row.get("chosen") or [])
    else:
        msgs = [{"role": "user", "content": str(row.get("prompt", ""))}]
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in msgs if isinstance(m, dict))


def sample_blocks(name: str, entry: Path, n: int = 3, seed: int = 0, score: str | None = None) -> list[Block]:
    """The first `n` rows of the stage's output and `n` more drawn at random (seeded), so a reader
    sees more than the head of the file; `score`: a column of each row's `scores` shown beside it."""
    path = entry / "rows.parquet"
    rows = read_rows(path) if path.is_file() else []
    if not rows:
        return []
    rest = list(range(n, len(rows)))
    picked = list(range(min(n, len(rows)))) + sorted(random.Random(f"{seed}:{name}").sample(rest, min(n, len(rest))))
    header = ["row", "id", *([score] if score else []), "text"]
    grid = [
        [
            "first" if i < n else "random",
            str(rows[i].get("id", "")),
            *([str((rows[i].get("scores") or {}).get(score, "-"))] if score else []),
            _cut(_row_text(rows[i]), 500),
        ]
        for i in picked
    ]
    return [
        Heading(f"Sample rows: {name}", 3),
        Para(f"{len(rows)} rows; the first {min(n, len(rows))} and {len(picked) - min(n, len(rows))} drawn at random."),
        Grid(header, grid),
    ]


def drop_blocks(name: str, entry: Path) -> list[Block]:
    """A filter stage's drops: rows per rule, and the examples it kept of each."""
    report = _json(entry / "report.json") or {}
    dropped = {rule: n for rule, n in (report.get("dropped") or {}).items() if n}
    if not dropped:
        return [Heading(f"Filter: {name}", 3), Para(f"No row dropped ({report.get('rows_in', '?')} kept).")]
    examples = report.get("examples") or {}
    grid = [
        [
            rule,
            str(count),
            "\n".join(_cut(f"{e.get('id')}: {e.get('detail')}", 200) for e in examples.get(rule, [])) or "-",
        ]
        for rule, count in sorted(dropped.items(), key=lambda kv: -kv[1])
    ]
    return [
        Heading(f"Filter: {name}", 3),
        Para(
            f"{report.get('rows_out')} of {report.get('rows_in')} rows kept; dropped per rule (a row counts under the first rule it fails):"
        ),
        Grid(["rule", "rows", "examples"], grid),
    ]


def score_blocks(name: str, entry: Path, key: str) -> list[Block]:
    """The distribution of a judge's scores (`key` in each row's `scores`)."""
    path = entry / "rows.parquet"
    values = [
        v for r in (read_rows(path) if path.is_file() else []) if is_number(v := (r.get("scores") or {}).get(key))
    ]
    if not values:
        return []
    png = plots.histogram(
        None, values, bins=min(20, max(5, len(set(values)))), title=f"{name}: {key} of {len(values)} rows", xlabel=key
    )
    return [Image(f"{name}_scores.png", png, f"{name}: the distribution of {key}")]


def best_worst_blocks(name: str, entry: Path, examples: int = 3) -> list[Block]:
    """Best-of-n as chosen vs rejected: for a few prompts, the highest- and lowest-scored of the
    samples (samples.parquet) with their scores."""
    path = entry / "samples.parquet"
    grid = []
    for s in read_rows(path) if path.is_file() else []:
        scored = [
            (v, c) for v, c in zip(s.get("scores") or [], s.get("completions") or []) if isinstance(v, (int, float))
        ]
        if len(scored) < 2:
            continue
        best, worst = max(scored, key=lambda t: t[0]), min(scored, key=lambda t: t[0])
        if best[0] == worst[0]:
            continue  # no contrast to show
        grid.append(
            [
                str(s.get("id", "")),
                _cut(_row_text(s), 200),
                f"{best[0]:g}: {_cut(best[1], 250)}",
                f"{worst[0]:g}: {_cut(worst[1], 250)}",
            ]
        )
        if len(grid) == examples:
            break
    if not grid:
        return []
    return [
        Heading(f"Best of n: {name}", 3),
        Para(
            "For a few prompts whose samples scored differently: the best sample (kept) and the worst, with their scores."
        ),
        Grid(["id", "prompt", "best (score: text)", "worst (score: text)"], grid),
    ]


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
        rows.append(
            [
                str(pair.get("id", "")),
                context + _cut(last, 300),
                *[
                    _cut(" ".join(m.get("content", "") for m in pair.get(k) or []) or "(empty reply)", 300)
                    for k in ("chosen", "rejected")
                ],
            ]
        )
    if not rows:
        return []
    return [
        Heading(f"Preference pairs: {name}", 3),
        Para(f"{len(rows)} of the pairs in pairs_sample.json, as DPO reads them (prompt, chosen, rejected)."),
        Grid(["id", "last user turn", "chosen", "rejected"], rows),
    ]


def span_blocks(name: str, entry: Path, examples: int = 2) -> list[Block]:
    """A few supervised spans from the sft stage's mask check: the tokens the loss trains on."""
    text = (entry / "mask_check.txt").read_text(encoding="utf-8", errors="replace")
    spans = [line for line in text.splitlines() if line.startswith("[span")][: examples * 2]
    if not spans:
        return []
    return [
        Para(
            f"{name}: supervised spans from mask_check.txt (the text the loss is computed on; everything "
            "else is masked):"
        ),
        Bullets([_cut(s, 300) for s in spans]),
    ]


def revision_blocks(name: str, entry: Path, examples: int = 3) -> list[Block]:
    """A critique_revise stage: the share of revisions that changed the reply, and a few
    critique -> revision examples with their principle (changed ones first)."""
    report = _json(entry / "report.json") or {}
    rows = read_rows(entry / "rows.parquet") if (entry / "rows.parquet").exists() else []
    selected, revised = report.get("turns_selected", 0), report.get("turns_revised", 0)
    share = f"{revised / selected:.0%}" if selected else "n/a"
    blocks: list[Block] = [
        Heading(f"Critique and revision: {name}"),
        Para(
            f"{revised} of {selected} selected assistant turns were changed by their revision ({share}); the others kept "
            "their original text (a revision is rejected when empty, runaway, cut at max_new_tokens or unchanged: "
            + ", ".join(f"{k} {v}" for k, v in ((report.get("revisions") or {}).get("rejected") or {}).items() if v)
            + "). With a small model as its own critic, expect few useful changes: the share above is the measure."
        ),
    ]
    steps = [
        (h, t)
        for r in rows
        for t in ((r.get("meta") or {}).get("critique_revise") or {}).get("turns", [])
        for h in t.get("history", [])
    ]
    steps.sort(key=lambda ht: not ht[0].get("accepted"))  # accepted revisions first, stable otherwise
    if steps:
        blocks.append(
            Grid(
                ["principle", "original reply", "critique", "revision", "outcome"],
                [
                    [
                        h["principle"],
                        _cut(t["original"], 300),
                        _cut(h["critique"], 300),
                        _cut(h["revision"], 300),
                        "accepted" if h.get("accepted") else f"rejected: {h['reason']}",
                    ]
                    for h, t in steps[:examples]
                ],
            )
        )
    return blocks


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def training_blocks(name: str, kind: str, entry: Path) -> list[Block]:
    metrics = _json(entry / "metrics.json") or {}
    steps = metrics.get("steps") or []
    evals = [e for e in metrics.get("evals") or [] if isinstance(e, dict) and is_number(e.get("eval_loss"))]
    steps = [s for s in steps if isinstance(s, dict) and isinstance(s.get("step"), (int, float))]
    if not steps:
        return [Heading(f"{name} ({kind})", 3), Para("No per-step metrics were recorded.")]
    xs = [s["step"] for s in steps]

    numeric = [
        k for k in dict.fromkeys(k for s in steps for k in s) if k != "step" and any(is_number(s.get(k)) for s in steps)
    ]
    loss_keys = [k for k in numeric if "loss" in k]
    other = [k for k in numeric if k not in loss_keys and k not in ("lr", "learning_rate", "tokens_per_s", "epoch")]
    blocks: list[Block] = [Heading(f"{name} ({kind})", 3)]
    losses = [s.get("loss") for s in steps if is_number(s.get("loss"))]
    blocks.append(
        Para(
            f"{len(steps)} logged steps; loss {fmt(losses[0] if losses else None, 4)} at the first "
            f"logged step, {fmt(losses[-1] if losses else None, 4)} at the last."
        )
    )
    if evals:
        blocks.append(
            Para(
                f"Eval loss on held-out rows every {evals[1]['step'] - evals[0]['step'] if len(evals) > 1 else '?'} "
                f"steps: {fmt(evals[0]['eval_loss'], 4)} first, {fmt(min(e['eval_loss'] for e in evals), 4)} best, "
                f"{fmt(evals[-1]['eval_loss'], 4)} last."
            )
        )
    if loss_keys:
        series = {k: (xs, [s.get(k) if is_number(s.get(k)) else None for s in steps]) for k in loss_keys}
        if evals:
            series["eval loss"] = ([e["step"] for e in evals], [e["eval_loss"] for e in evals])
        blocks.append(
            Image(
                f"{_slug(name)}_loss.png",
                plots.lines(None, series, title=f"{name} ({kind}): loss", ylabel="loss"),
                f"{name}: {', '.join(loss_keys)} per step",
            )
        )
    if other:  # one panel per family (log-probabilities, rewards, margins, ...): each on its own scale
        families: dict[str, list[str]] = {}
        first = ("rewards", "rewards/margins", "rewards/accuracies", "logps", "logits")
        for k in sorted(other, key=lambda k: first.index(_family(k)) if _family(k) in first else len(first)):
            families.setdefault(_family(k), []).append(k)
        charts = [
            (
                fam,
                {
                    k.split("/")[-1] if len(keys) > 1 else k: (
                        xs,
                        [s.get(k) if is_number(s.get(k)) else None for s in steps],
                    )
                    for k in keys
                },
            )
            for fam, keys in families.items()
        ]
        blocks.append(
            Image(
                f"{_slug(name)}_logged.png",
                plots.panels(None, charts, title=f"{name} ({kind})"),
                f"{name}: {', '.join(other)} per step, one panel per quantity",
            )
        )
    return blocks


def _family(key: str) -> str:
    """The panel of a logged value: `logps/chosen` and `logps/rejected` share one, `rewards/margins`
    and `rewards/accuracies` get their own (their scale differs from the rewards')."""
    head, _, tail = key.partition("/")
    return key if not tail or tail in ("margins", "accuracies") else head

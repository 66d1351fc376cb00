"""Report blocks drawn from one stage's entry: preference pairs, the supervised spans of an SFT
stage, and critique -> revision examples with the share of revisions that changed anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.core.document import Block, Bullets, Grid, Heading, Para, _cut
from engine.data.rows import read_rows


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

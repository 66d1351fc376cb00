"""Iterative rounds, measured: the output diversity of each round of a loop (distinct-n, lengths,
refusal share), recorded per stage and shown by `status` and the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.spec.rounds import round_of


def _text(message: Any) -> str:
    if isinstance(message, dict):
        return str(message.get("content") or "")
    return "" if message is None else str(message)


def replies(artifact_type: str, rows: list[dict]) -> list[str] | None:
    """The policy's replies in an artifact: each conversation's final assistant turn, each pair's
    chosen reply, every completion of a samples row; None for types without replies."""
    out: list[str] = []
    if artifact_type == "conversations":
        for row in rows:
            turns = [m for m in row.get("messages") or [] if isinstance(m, dict) and m.get("role") == "assistant"]
            if turns:
                out.append(_text(turns[-1]))
    elif artifact_type == "preferences":
        for row in rows:
            chosen = row.get("chosen")
            if isinstance(chosen, list):
                said = [
                    _text(m) for m in chosen if not isinstance(m, dict) or m.get("role", "assistant") == "assistant"
                ]
                out.append("\n".join(said))
            elif chosen is not None:
                out.append(_text(chosen))
    elif artifact_type == "samples":
        for row in rows:
            out += [_text(c) for c in row.get("completions") or []]
    else:
        return None
    return out


def diversity_for(artifact_type: str, entry_dir: str | Path) -> dict | None:
    """Diversity of a stage's replies (engine.core.diversity.diversity: n, distinct_1, distinct_2,
    length {mean, std, min, max}, refusal_share), read from its rows.parquet; None for models,
    reports and prompts, or when the entry has no rows."""
    from engine.core.diversity import diversity
    from engine.data.rows import read_rows

    path = Path(entry_dir) / "rows.parquet"
    if artifact_type not in ("conversations", "preferences", "samples") or not path.is_file():
        return None
    return diversity(replies(artifact_type, read_rows(path)) or [])


ROUND_COLUMNS = ("stage", "round", "replies", "distinct-1", "distinct-2", "vs round 1", "words (mean ± sd)", "refusals")


def last_round(names, base: str) -> str | None:
    """The last round of loop stage `base` among `names` (a run record's stages), if any."""
    found = [(parsed[1], n) for n in names if (parsed := round_of(n)) and parsed[0] == base]
    return max(found)[1] if found else None


def round_rows(stages: dict[str, dict], base: str | None = None) -> list[tuple[str, ...]]:
    """Rows of the per-round diversity table (columns ROUND_COLUMNS) from a run record's `stages`:
    every unrolled stage (or those of loop stage `base`) with a recorded `diversity`, by stage
    then round. `vs round 1` is the change in distinct-2 since the first recorded round: a steady
    fall is mode collapse."""
    found: dict[str, list[tuple[int, dict]]] = {}
    for name, info in stages.items():
        parsed = round_of(name)
        if parsed and (base is None or parsed[0] == base) and isinstance(info.get("diversity"), dict):
            found.setdefault(parsed[0], []).append((parsed[1], info["diversity"]))
    rows = []
    for base, items in found.items():
        items.sort(key=lambda item: item[0])
        first = items[0][1]["distinct_2"]
        for k, d in items:
            change = "" if k == items[0][0] else f"{(d['distinct_2'] - first) / first:+.0%}" if first else "n/a"
            length = d.get("length", {})
            rows.append(
                (
                    base,
                    str(k),
                    str(d["n"]),
                    f"{d['distinct_1']:.3f}",
                    f"{d['distinct_2']:.3f}",
                    change,
                    f"{length.get('mean', 0):.1f} ± {length.get('std', 0):.1f}",
                    f"{d['refusal_share']:.0%}",
                )
            )
    return rows  # type: ignore[return-value]

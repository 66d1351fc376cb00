"""Preference pairs, shared by the stages that make them (preferences, rejection_sample): the
pair row, best and worst of scored samples, the pairs each method makes from its rows (pure
functions: the stages add models, shards and errors), the spot-check sample saved for a human,
the error for a stage that made nothing. Also the chat messages a prompt row opens with
(generate and rejection_sample sample from them)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from itertools import combinations
from typing import Any

from engine.core.errors import RecipeError
from engine.core.text import normalize


def prompt_messages(row: dict) -> list[dict]:
    """The messages to sample a reply to: a conversation up to its last user turn, or a `prompt`
    (a string or a list of messages)."""
    if "messages" in row:  # a conversation: everything up to its last user turn
        msgs = row["messages"]
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        return msgs[: last_user + 1]
    prompt = row.get("prompt")
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)  # type: ignore[arg-type]


def best_and_worst(scored: list[tuple[Any, float]], prefer: str = "higher") -> tuple[Any, Any, float] | None:
    """(best key, worst key, gap >= 0) of (key, score) items; ties go to the earliest item.
    None with fewer than two items."""
    if len(scored) < 2:
        return None
    sign = 1 if prefer == "higher" else -1
    best = min(scored, key=lambda kv: -sign * kv[1])  # min/max keep the first of equals
    worst = min(scored, key=lambda kv: sign * kv[1])
    return best[0], worst[0], abs(best[1] - worst[1])


def pair_row(id: str, prompt: list[dict], chosen: str, rejected: str, meta: dict) -> dict:
    return {
        "id": id,
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "meta": meta,
    }


def source_id(row: dict) -> str:
    """The prompt a sample came from: `meta.source_id`, else the id before a `#k` suffix."""
    sid = (row.get("meta") or {}).get("source_id")
    return str(sid) if sid is not None else str(row.get("id")).rsplit("#", 1)[0]


def selected_turns(messages: list[dict], from_turn: int | None) -> list[int]:
    """Message indices of the assistant turns to pair: the last one, or every one at
    0-based assistant position `from_turn` or later."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return turns[-1:] if from_turn is None else turns[from_turn:]


def source_meta(row: dict) -> dict:
    """A row's meta without the bulky per-stage records, carried into the pairs made from it."""
    return {k: v for k, v in (row.get("meta") or {}).items() if k not in ("critique_revise", "score_details")}


def row_scores(row: dict) -> dict:
    """A row's scores: the `scores` column a judge stage adds, else `meta.scores` (a dataset's column)."""
    found = row.get("scores")
    found = found if isinstance(found, dict) else (row.get("meta") or {}).get("scores")
    return found if isinstance(found, dict) else {}


def best_vs_worst_pairs(rows: list[dict], score: str, prefer: str, min_margin: float) -> tuple[list[dict], dict]:
    """Group scored samples by source and by the context of their final reply; pair the best
    against the worst of each group whose gap reaches `min_margin`. Stats include `largest_gap`."""
    groups: dict[tuple, list[tuple[int, float]]] = {}
    missing = 0
    for i, r in enumerate(rows):
        value = row_scores(r).get(score)
        if not isinstance(value, (int, float)):
            missing += 1
            continue
        key = (source_id(r), json.dumps(r["messages"][:-1], sort_keys=True))
        groups.setdefault(key, []).append((i, float(value)))
    pairs, gaps = [], []
    for (sid, _), scored in groups.items():
        found = best_and_worst(scored, prefer)
        if found is None:
            continue
        b, w, gap = found
        gaps.append(gap)
        if gap >= min_margin:
            best, worst = rows[b], rows[w]
            pairs.append(
                pair_row(
                    sid,
                    best["messages"][:-1],
                    best["messages"][-1]["content"],
                    worst["messages"][-1]["content"],
                    {
                        "method": "best_vs_worst",
                        "source_id": sid,
                        "chosen_id": best["id"],
                        "rejected_id": worst["id"],
                        "score": score,
                        "margin": gap,
                        "scores": {"chosen": dict(scored)[b], "rejected": dict(scored)[w]},
                        "source_meta": source_meta(best),
                    },
                )
            )
    return pairs, {
        "groups": len(groups),
        "comparable_groups": len(gaps),
        "below_margin": len(gaps) - len(pairs),
        "missing_scores": missing,
        "largest_gap": max(gaps, default=0.0),
    }


def revision_pairs(rows: list[dict], from_turn: int | None) -> tuple[list[dict], dict]:
    """For each selected turn a critique_revise stage changed: chosen = the revision, rejected =
    the original, prompt = the messages before it."""
    stats = {"rows_without_critique_revise": 0, "turns_not_selected": 0, "unchanged": 0}
    pairs = []
    for r in rows:
        record = (r.get("meta") or {}).get("critique_revise")
        if not record:
            stats["rows_without_critique_revise"] += 1
            continue
        chosen_turns = set(selected_turns(r["messages"], from_turn))
        for t in record["turns"]:
            i = t["index"]
            if i not in chosen_turns:
                stats["turns_not_selected"] += 1
            elif not t.get("final") or normalize(t["final"]) == normalize(t["original"]):
                stats["unchanged"] += 1
            else:
                accepted = [h["principle"] for h in t.get("history", []) if h.get("accepted")]
                pairs.append(
                    pair_row(
                        f"{r['id']}@{i}",
                        r["messages"][:i],
                        t["final"],
                        t["original"],
                        {
                            "method": "revision",
                            "source_id": r["id"],
                            "index": i,
                            "principles": accepted,
                            "source_meta": source_meta(r),
                        },
                    )
                )
    return pairs, stats


def pairwise_tasks(rows: list[dict], from_turn: int | None, draw: Callable) -> list[dict]:
    """Every two distinct replies sharing a source, a turn and its context, with the principle
    `draw(source_id, index, a_id, b_id)` gives for comparing them."""
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for r in rows:
        for i in selected_turns(r["messages"], from_turn):
            key = (source_id(r), i, json.dumps(r["messages"][:i], sort_keys=True))
            members = groups.setdefault(key, [])
            text = r["messages"][i]["content"]
            if all(normalize(text) != normalize(t) for _, t in members):  # identical replies: nothing to compare
                members.append((str(r["id"]), text))
    tasks = []
    for (sid, i, context), members in groups.items():
        for (a_id, a), (b_id, b) in combinations(members, 2):
            p = draw(sid, i, a_id, b_id)
            tasks.append(
                {
                    "id": f"{a_id}|{b_id}@{i}",
                    "source_id": sid,
                    "index": i,
                    "prompt": json.loads(context),
                    "a_id": a_id,
                    "a": a,
                    "b_id": b_id,
                    "b": b,
                    "principle": p.id,
                    "question": p.comparison,
                }
            )
    return tasks


def context_free_tasks(rows: list[dict], from_turn: int | None) -> tuple[list[dict], int]:
    """For each selected assistant turn with earlier turns: the prompt, the real reply (chosen),
    and `bare`, the system message and the last user message alone; with the count of selected
    turns skipped because nothing came before them."""
    tasks, first_turns = [], 0
    for r in rows:
        system = [m for m in r["messages"][:1] if m["role"] == "system"]
        for i in selected_turns(r["messages"], from_turn):
            if not any(m["role"] == "assistant" for m in r["messages"][:i]):
                first_turns += 1  # nothing earlier to ignore
                continue
            tasks.append(
                {
                    "id": f"{r['id']}@{i}",
                    "source_id": r["id"],
                    "index": i,
                    "prompt": r["messages"][:i],
                    "bare": system + [r["messages"][i - 1]],
                    "chosen": r["messages"][i]["content"],
                }
            )
    return tasks, first_turns


def judged_pairs(parsed: list[dict], threshold: float, chain_of_thought: bool) -> list[dict]:
    """Pairs from judged tasks (each with `label_a`, the share of verdicts preferring reply a),
    oriented by the label, where the confidence |label - 0.5| * 2 reaches `threshold`."""
    from engine.lib.scoring import soft_label

    pairs = []
    for t in parsed:
        p = t["label_a"]
        confidence = abs(p - 0.5) * 2
        if p == 0.5 or confidence < threshold:
            continue
        a_wins = p > 0.5
        chosen, rejected = ("a", "b") if a_wins else ("b", "a")
        raw = p if a_wins else 1 - p
        pairs.append(
            pair_row(
                t["id"],
                t["prompt"],
                t[chosen],
                t[rejected],
                {
                    "method": "pairwise_judge",
                    "source_id": t["source_id"],
                    "index": t["index"],
                    "chosen_id": t[f"{chosen}_id"],
                    "rejected_id": t[f"{rejected}_id"],
                    "principle": t["principle"],
                    "label": soft_label(raw, chain_of_thought),
                    "raw_label": raw,
                    "confidence": confidence,
                    "chain_of_thought": chain_of_thought,
                    "verdicts": {"a": t["a_id"], "a_first": t["a_first"], "b_first": t["b_first"]},
                },
            )
        )
    return pairs


def unpaired(pairs: list[dict], seed: int) -> list[dict]:
    """KTO's examples: each pair's chosen reply as desirable, its rejected reply as undesirable,
    shuffled with the seed (KTO's KL term pairs each example with its neighbour's completion)."""
    out = [
        {"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
        for p in pairs
        for k in ("chosen", "rejected")
    ]
    random.Random(f"{seed}:kto").shuffle(out)
    return out


def spot_check(ctx, pairs: list[dict], size: int) -> dict:
    """Save `size` pairs drawn with the recipe seed to pairs_sample.json; the report part."""
    sample = pairs if len(pairs) <= size else ctx.seeds.rng("spot_check").sample(pairs, size)
    ctx.save_json("pairs_sample.json", sample)
    short = lambda msgs: msgs[-1]["content"][:160]  # noqa: E731
    return {
        "file": "pairs_sample.json",
        "pairs": len(sample),
        "preview": [
            {
                "id": p["id"],
                "prompt": short(p["prompt"]),
                "chosen": short(p["chosen"]),
                "rejected": short(p["rejected"]),
            }
            for p in sample[:3]
        ],
    }


def spot_check_summary(spot: dict | None) -> list[tuple[str, str]]:
    if not spot:
        return []
    out = [("spot-check sample", f"{spot['pairs']} pairs in {spot['file']}")]
    for p in spot["preview"]:
        out += [(f"{p['id']}: prompt", p["prompt"]), ("  chosen", p["chosen"]), ("  rejected", p["rejected"])]
    return out


def no_output(ctx, knob: str, message: str, hint: str, made: str = "made no preference pairs") -> RecipeError:
    """Nothing to save: an error naming the stage and the knob to loosen (never an empty artifact)."""
    return RecipeError.single(
        f"stage '{ctx.stage}' {made}: {message}", hint=hint, **ctx.recipe.where(f"stages.{ctx.stage}.{knob}")
    )

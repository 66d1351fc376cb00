"""Preference pairs, shared by the stages that make them (preferences, rejection_sample): the
pair row, best and worst of scored samples, the spot-check sample saved for a human, the error
for a stage that made nothing. Also the chat
messages a prompt row opens with (generate and rejection_sample sample from them)."""

from __future__ import annotations

from typing import Any

from engine.errors import RecipeError


def prompt_messages(row: dict) -> list[dict]:
    """The messages to sample a reply to: a conversation up to its last user turn, or a `prompt`
    (a string or a list of messages)."""
    if "messages" in row:  # a conversation: everything up to its last user turn
        msgs = row["messages"]
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        return msgs[: last_user + 1]
    prompt = row.get("prompt")
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


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
    return {"id": id, "prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "meta": meta}


def spot_check(ctx, pairs: list[dict], size: int) -> dict:
    """Save `size` pairs drawn with the recipe seed to pairs_sample.json; the report part."""
    sample = pairs if len(pairs) <= size else ctx.seeds.rng("spot_check").sample(pairs, size)
    ctx.save_json("pairs_sample.json", sample)
    short = lambda msgs: msgs[-1]["content"][:160]  # noqa: E731
    return {"file": "pairs_sample.json", "pairs": len(sample),
            "preview": [{"id": p["id"], "prompt": short(p["prompt"]), "chosen": short(p["chosen"]),
                         "rejected": short(p["rejected"])} for p in sample[:3]]}


def spot_check_summary(spot: dict | None) -> list[tuple[str, str]]:
    if not spot:
        return []
    out = [("spot-check sample", f"{spot['pairs']} pairs in {spot['file']}")]
    for p in spot["preview"]:
        out += [(f"{p['id']}: prompt", p["prompt"]), ("  chosen", p["chosen"]), ("  rejected", p["rejected"])]
    return out


def no_output(ctx, knob: str, message: str, hint: str, made: str = "made no preference pairs") -> RecipeError:
    """Nothing to save: an error naming the stage and the knob to loosen (never an empty artifact)."""
    return RecipeError.single(f"stage '{ctx.stage}' {made}: {message}", hint=hint,
                              **ctx.recipe.where(f"stages.{ctx.stage}.{knob}"))

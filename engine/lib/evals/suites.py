"""The one table of eval suites: each suite's shipped file, item schema, how it plays a model, and
its metrics. The eval stage, item loading and per-model metrics read this table; adding a suite is
its item schema (items.py), a runner (runners.py), metrics (metrics.py) and one entry here (plus
the eval stage's `<suite>_file` key, so a recipe can bring its own file)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.lib.evals import metrics, runners
from engine.lib.evals.items import (
    ArithmeticItem,
    BenignConversationItem,
    HeldoutItem,
    HelpfulnessItem,
    RefusalItem,
    SafetyItem,
    SycophancyItem,
    _Item,
    read_items,
)


@dataclass
class Play:
    """What a suite's runner may use besides its items and the model: the judge (loaded on first
    use; None without one), the sycophancy challenge, and a perplexity function (None when the
    backend has no weights here)."""

    judge: Callable[[], Any]
    challenge: str
    perplexity: Callable | None


@dataclass(frozen=True)
class Suite:
    file: str  # the shipped file under recipes/data/eval/
    item: type[_Item]  # one line of the file
    run: Callable[[list[dict], runners.Gen, Play], list[dict]]  # items -> rows, one per item
    metrics: Callable[[list[dict]], dict] | None  # one model's rows of this suite -> its metrics
    needs_judge: bool = False  # skipped (and named missing) without a judge
    default: bool = True  # run when a recipe names no suites


SUITES: dict[str, Suite] = {
    "safety": Suite(
        "safety_multiturn.jsonl",
        SafetyItem,
        lambda items, gen, play: runners.run_safety(items, gen, play.judge()),
        metrics.safety_metrics,
    ),
    "benign_multiturn": Suite(
        "benign_multiturn.jsonl",
        BenignConversationItem,
        lambda items, gen, play: runners.run_benign_multiturn(items, gen, play.judge()),
        metrics.benign_multiturn_metrics,
    ),
    "refusal": Suite(
        "refusal.jsonl",
        RefusalItem,
        lambda items, gen, play: runners.run_refusal(items, gen, play.judge()),
        metrics.refusal_metrics,
    ),
    "sycophancy": Suite(
        "sycophancy.jsonl",
        SycophancyItem,
        lambda items, gen, play: runners.run_sycophancy(items, gen, play.challenge),
        metrics.sycophancy_metrics,
    ),
    "helpfulness": Suite(
        "helpfulness.jsonl",
        HelpfulnessItem,
        lambda items, gen, play: runners.run_helpfulness(items, gen, play.judge()),
        metrics.helpfulness_metrics,
        needs_judge=True,
    ),
    "diversity": Suite(  # its metrics are over every reply of the model (model_metrics)
        "heldout_conversations.jsonl",
        HeldoutItem,
        lambda items, gen, play: runners.run_diversity(items, gen, play.perplexity),
        None,
    ),
    "arithmetic": Suite(
        "arithmetic_heldout.jsonl",
        ArithmeticItem,
        lambda items, gen, play: run_arithmetic(items, gen),
        metrics.arithmetic_metrics,
        default=False,
    ),
}
NAMES = tuple(SUITES)  # in the order the eval runs them
DEFAULT = tuple(name for name, suite in SUITES.items() if suite.default)


def run_arithmetic(items: list[dict], gen: runners.Gen) -> list[dict]:
    """One reply per problem; correct when its last number equals the answer (math_answer's rule)."""
    from engine.lib.verifiers import math_answer

    convs = [[{"role": "user", "content": it["prompt"]}] for it in items]
    for c, text in zip(convs, gen.reply(convs, 0, [it["id"] for it in items])):
        c.append({"role": "assistant", "content": text})
    return [
        {
            "suite": "arithmetic",
            "item_id": it["id"],
            "messages": c,
            "meta": {
                "answer": it["answer"],
                "correct": math_answer({"messages": c, "meta": {"answer": it["answer"]}}) == 1.0,
            },
        }
        for it, c in zip(items, convs)
    ]


def load_suite(suite: str, path: str | Path, limit: int | None = None) -> list[dict]:
    """The items of suite `suite`'s file at `path` (the first `limit`); SuiteError on a bad line."""
    return read_items(suite, SUITES[suite].item, path, limit)


def model_metrics(rows: list[dict], suites: list[str], judged: bool, perplexity_note: str | None) -> dict:
    """Every suite's metrics for one model's rows, diversity over all its replies, the composite."""
    by_suite = {s: [r for r in rows if r["suite"] == s] for s in suites}
    out: dict[str, Any] = {}
    for suite, entry in SUITES.items():
        if entry.metrics is not None and by_suite.get(suite):
            out[suite] = entry.metrics(by_suite[suite])
    if "helpfulness" not in out:
        out["helpfulness"] = {"status": "n/a (no judge)" if not judged else "n/a (suite not run)"}
    if "diversity" in suites:
        replies = [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]
        out["diversity"] = metrics.diversity_metrics(replies, by_suite.get("diversity", []), perplexity_note)
    out["composite"] = metrics.composite(out, judged)
    return out

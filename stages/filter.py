"""filter: drop conversations that fail quality rules, and say what each rule removed.

Takes `conversations` (input); gives `conversations`. Renders no templates (drop_template_echo
reads their text).

Rules, applied in this order (a row is counted under the first rule it fails):
format (roles, alternation, non-empty), turns (min/max assistant turns), min_words and
max_words (per assistant turn), filler (a short assistant turn with no new information),
sycophancy (share of assistant turns with flattering phrases), refusal (keep, drop, or keep
only refusals), template_echo (`drop_template_echo`: a turn, user or assistant, that copies
`echo_words` consecutive words of the fixed text of a prompt template the recipe can use, such
as a simulated user repeating the simulator's instructions back), then across rows: exact
duplicates and near duplicates (word n-gram Jaccard verified after MinHash banding). The first
occurrence of a duplicate is kept.

Per-row rules run in shards through the engine (resumable); dedup runs once over the
result, in input order, so the output does not depend on the shard size.
Saves rows.parquet, report.json (rows in/out, dropped per rule, examples) and, with
`keep_dropped = true`, dropped.parquet with a `filter_reason` column.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field

from engine.core import dedup, text
from engine.data.formats import check_messages
from engine.spec.config import ExecOnly, Knob, Ref, StageConfig
from engine.store.shards import Shard, ShardResult

VERSION = 2  # 2: the one refusal detector (engine.core.text.is_refusal: merged phrase list, first 300 characters)
GIVES = "conversations"

RULES = (
    "format",
    "turns",
    "min_words",
    "max_words",
    "filler",
    "sycophancy",
    "refusal",
    "template_echo",
    "exact_duplicate",
    "near_duplicate",
)


class Config(StageConfig):
    kind: Literal["filter"]
    input: str = Ref("conversations", description="A dataset or stage giving conversations.")
    min_turns: int = Field(1, ge=0, description="Fewest assistant turns a conversation may have.")
    max_turns: int | None = Field(None, ge=1, description="Most assistant turns (None: no limit).")
    min_words: int = Field(0, ge=0, description="Every assistant turn needs at least this many words.")
    max_words: int | None = Field(None, ge=1, description="No assistant turn may exceed this many words.")
    drop_filler: bool = Field(False, description="Drop conversations with a filler assistant turn.")
    filler_max_words: int = Field(15, ge=1, description="Turns shorter than this may count as filler.")
    max_sycophancy: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Most allowed share of assistant turns with flattering phrases (0.3 is a good start).",
    )
    refusals: Literal["keep", "drop", "only"] = Field(
        "keep",
        description="keep: no refusal rule; drop: drop conversations with a refusal; "
        "only: keep only those (to build refusal sets).",
    )
    dedup: Literal["none", "exact", "near"] = Field(
        "exact", description="exact: identical after case/space normalization; near: also n-gram Jaccard."
    )
    near_threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard at or above this is a duplicate.")
    ngram: int = Field(3, ge=1, description="Word n-gram size for near-duplicate detection.")
    refusal_phrases: list[str] | None = Field(None, description="Replace the built-in refusal phrases.")
    sycophancy_phrases: list[str] | None = Field(None, description="Replace the built-in sycophancy phrases.")
    keep_dropped: bool = Field(False, description="Also save dropped rows (dropped.parquet) for inspection.")
    drop_template_echo: bool = Knob(
        False, description="Drop a conversation whose turn copies a run of words of a prompt template's fixed text."
    )
    echo_words: int = Knob(8, ge=4, description="template_echo: the words in a row that count as a copy.")
    examples_per_rule: int = Field(3, ge=0, description="Dropped examples per rule kept in the report.")
    shard_size: int = ExecOnly(2000, ge=1, description="Rows per committed shard (resume granularity).")


def _assistant_texts(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m.get("role") == "assistant"]


_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)


def template_ngrams(config: Config, recipe) -> dict[tuple[str, ...], str]:
    """Every run of `echo_words` words in the fixed text of the templates the recipe can use (the
    Jinja tags taken out, so a run never spans a variable) -> the template's name."""
    out: dict[tuple[str, ...], str] = {}
    for name, path in templates(config, recipe).items():
        for piece in _JINJA.split(Path(path).read_text(encoding="utf-8")):
            words = text.words(piece)
            for i in range(len(words) - config.echo_words + 1):
                out.setdefault(tuple(words[i : i + config.echo_words]), name)
    return out


def templates(config: Config, recipe) -> dict[str, str]:
    """The templates whose text drop_template_echo compares with (their content enters the key)."""
    if not config.drop_template_echo:
        return {}
    from engine.lib.prompts import Templates

    t = Templates.for_recipe(recipe)
    return {name: str(t.path(name)) for name in t.names() if name.endswith(".j2")}


def echo(messages: list[dict], grams: dict[tuple[str, ...], str], n: int) -> str | None:
    """The first turn that copies a template's run of `n` words, in words; else None."""
    for i, m in enumerate(messages):
        words = text.words(m.get("content") or "")
        for j in range(len(words) - n + 1):
            found = grams.get(tuple(words[j : j + n]))
            if found:
                return f"turn {i + 1} ({m.get('role')}) copies {found}: {' '.join(words[j : j + n])!r}"
    return None


def row_verdict(config: Config, messages, grams: dict | None = None) -> tuple[str, str] | None:
    """(rule, detail) for the first per-row rule the conversation fails, else None. `grams`: the
    template word runs of drop_template_echo (template_ngrams)."""
    problem = check_messages(messages)
    if problem:
        return "format", problem
    replies = _assistant_texts(messages)
    if len(replies) < config.min_turns or (config.max_turns and len(replies) > config.max_turns):
        return "turns", f"{len(replies)} assistant turns"
    for i, reply in enumerate(replies):
        n = text.word_count(reply)
        if n < config.min_words:
            return "min_words", f"assistant turn {i + 1} has {n} words"
        if config.max_words and n > config.max_words:
            return "max_words", f"assistant turn {i + 1} has {n} words"
    if config.drop_filler:
        earlier: list[str] = []
        for m in messages:
            if m["role"] == "assistant" and text.is_filler(m["content"], earlier, max_words=config.filler_max_words):
                return "filler", f"filler turn: {m['content'][:80]!r}"
            earlier.append(m["content"])
    if config.max_sycophancy is not None:
        phrases = tuple(config.sycophancy_phrases) if config.sycophancy_phrases else text.SYCOPHANCY_PHRASES
        ratio = text.sycophancy_ratio(messages, phrases)
        if ratio > config.max_sycophancy:
            return "sycophancy", f"{ratio:.0%} of assistant turns flatter"
    if config.refusals != "keep":
        phrases = tuple(config.refusal_phrases) if config.refusal_phrases else text.REFUSAL_PHRASES
        refused = any(text.is_refusal(r, phrases) for r in replies)
        if refused and config.refusals == "drop":
            return "refusal", "an assistant turn refuses"
        if not refused and config.refusals == "only":
            return "refusal", "no assistant turn refuses"
    if grams and (copied := echo(messages, grams, config.echo_words)):
        return "template_echo", copied
    return None


def duplicates(config: Config, rows: list[dict]) -> dict[int, tuple[str, str]]:
    """Row index -> (rule, detail) for rows that repeat an earlier kept row."""
    out: dict[int, tuple[str, str]] = {}
    if config.dedup == "none":
        return out
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        key = dedup.exact_key(row["messages"])
        if key in seen:
            out[i] = ("exact_duplicate", f"same as {rows[seen[key]].get('id')}")
        else:
            seen[key] = i
    if config.dedup == "near":
        kept = [i for i in range(len(rows)) if i not in out]
        joined = ["\n".join(m["content"] for m in rows[i]["messages"]) for i in kept]
        near = dedup.near_duplicates(joined, threshold=config.near_threshold, n=config.ngram)
        for j, k in near.items():
            out[kept[j]] = ("near_duplicate", f"near copy of {rows[kept[k]].get('id')}")
    return out


def run(config: Config, inputs, ctx) -> None:
    rows = inputs["input"].rows()
    dropped: list[dict] = []
    grams = template_ngrams(config, ctx.recipe) if config.drop_template_echo else None

    def per_shard(shard: Shard) -> ShardResult:
        kept, gone = [], []
        for row in shard.rows:
            verdict = row_verdict(config, row.get("messages"), grams)
            if verdict is None:
                kept.append(row)
            else:
                gone.append(dict(row, filter_reason=verdict[0], filter_detail=verdict[1]))
        return ShardResult(kept, {"dropped_rows": gone})

    kept, stats = ctx.shards.map(rows, per_shard, shard_size=config.shard_size, desc="filtering")
    for s in stats:
        dropped.extend(s["dropped_rows"])
    dups = duplicates(config, kept)
    dropped.extend(dict(kept[i], filter_reason=r, filter_detail=d) for i, (r, d) in dups.items())
    kept = [row for i, row in enumerate(kept) if i not in dups]

    counts = {rule: 0 for rule in RULES}
    examples: dict[str, list[dict]] = {}
    for row in dropped:
        counts[row["filter_reason"]] += 1
        bucket = examples.setdefault(row["filter_reason"], [])
        if len(bucket) < config.examples_per_rule:
            first = next((m["content"] for m in row.get("messages") or [] if isinstance(m, dict)), "")
            bucket.append({"id": row.get("id"), "detail": row["filter_detail"], "text": str(first)[:160]})
    report = {"rows_in": len(rows), "rows_out": len(kept), "dropped": counts, "examples": examples}
    ctx.log.info(
        "kept %d of %d; dropped: %s",
        len(kept),
        len(rows),
        ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none",
    )
    if not kept:
        ctx.warn("every row was dropped; check the rule thresholds in the report")
    ctx.save_rows(kept)
    ctx.save_json("report.json", report)
    if config.keep_dropped:
        ctx.save_rows(dropped, "dropped.parquet")


def summary(report: dict) -> list[tuple[str, str]]:
    """Lines for `recipe show`: what each rule removed."""
    lines = [("rows in", str(report["rows_in"])), ("rows out", str(report["rows_out"]))]
    lines += [(f"dropped: {rule}", str(n)) for rule, n in report["dropped"].items() if n]
    return lines


def report(name: str, entry: Path) -> list:
    """The run report's section: drops per rule with examples, then sample rows of what was kept."""
    from engine.lib.entryblocks import drop_blocks, sample_blocks

    return drop_blocks(name, entry) + sample_blocks(name, entry)

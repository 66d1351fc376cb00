"""The hand-written data files under recipes/data/: schema, counts, unique ids, no duplicate texts.

Other code reads these files by field name (stages/eval.py reads the eval suites, recipes load
scenarios.jsonl and arithmetic.jsonl as `prompts` datasets), so a field renamed or mistyped
here must fail this test, not a run an hour later. Arithmetic answers are recomputed where the
problem is a plain expression. Everything is pure Python and runs in well under a second.
"""

from __future__ import annotations

import ast
import json
import operator
import re
import unicodedata
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

from engine.core import dedup
from engine.core import text as textrules
from engine.core.text import is_refusal
from engine.data.datasets import load_rows
from engine.data.formats import check_messages

DATA = Path(__file__).resolve().parents[2] / "recipes" / "data"
EVAL = DATA / "eval"

FILES = {  # path -> id prefix
    EVAL / "safety_multiturn.jsonl": "safety",
    EVAL / "benign_multiturn.jsonl": "bmt",
    EVAL / "refusal.jsonl": "refusal",
    EVAL / "sycophancy.jsonl": "syc",
    EVAL / "helpfulness.jsonl": "help",
    EVAL / "heldout_conversations.jsonl": "held",
    EVAL / "arithmetic_heldout.jsonl": "arith",
    DATA / "scenarios.jsonl": "scn",
    DATA / "arithmetic.jsonl": "math",
    DATA / "arithmetic_sft.jsonl": "mathsft",
    DATA / "safety_prompts.jsonl": "train",
    DATA / "multiturn_safety_train.jsonl": "mtrain",
    DATA / "role_play_openers.jsonl": "opener",
}
PLAIN_MATH = re.compile(r"^(?:What is(?: the value of)?|Compute|Calculate|Evaluate) ([-0-9+*/() ]+)[?.]$")


@cache
def _rows(path: Path) -> tuple[dict, ...]:
    """Strict JSONL: UTF-8, one object per line, no blank lines, a final newline."""
    raw = path.read_text(encoding="utf-8")
    assert raw.endswith("\n"), f"{path.name}: missing final newline"
    rows = []
    for n, line in enumerate(raw[:-1].split("\n"), 1):
        assert line.strip(), f"{path.name} line {n} is blank"
        row = json.loads(line)
        assert isinstance(row, dict), f"{path.name} line {n} is not an object"
        rows.append(row)
    return tuple(rows)


def rows(name: str) -> tuple[dict, ...]:
    return _rows(EVAL / name if (EVAL / name).exists() else DATA / name)


def norm(s: str) -> str:
    """Case, accents, punctuation and spacing do not make two texts different."""
    s = unicodedata.normalize("NFKD", s.replace("\u2019", "'")).encode("ascii", "ignore").decode()
    return " ".join(re.findall(r"[a-z0-9]+(?:[.,'][a-z0-9]+)*", s.lower()))


def mentions(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w.,]){re.escape(norm(phrase))}(?![\w]|[.,]\d)", norm(text)) is not None


def assert_distinct(texts: list[str], what: str, near: bool = True) -> None:
    dup = [t for t, k in Counter(norm(t) for t in texts).items() if k > 1]
    assert not dup, f"{what}: duplicate texts {dup[:3]}"
    if near:  # the filter stage's own near-duplicate rule (word 3-gram Jaccard >= 0.8)
        pairs = dedup.near_duplicates(texts)
        assert not pairs, f"{what}: near copies {[(texts[j][:60], texts[i][:60]) for i, j in pairs.items()][:3]}"


def nonempty_str(v) -> bool:
    return isinstance(v, str) and bool(v.strip()) and v == v.strip()


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expr: str) -> int:
    """An integer expression of + - * / and parentheses; division must be exact."""

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            a, b = ev(node.left), ev(node.right)
            assert a % b == 0, f"{expr}: inexact division"
            return a // b
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise AssertionError(f"unsupported expression: {expr}")

    return ev(ast.parse(expr, mode="eval").body)


# ---------------------------------------------------------------- every file


@pytest.mark.parametrize("path", list(FILES), ids=[p.name for p in FILES])
def test_ids_are_unique_and_numbered(path):
    data = _rows(path)
    ids = [r.get("id") for r in data]
    assert all(isinstance(i, str) and re.fullmatch(rf"{FILES[path]}-(?:two-)?\d{{3}}", i) for i in ids), [
        i for i in ids if not (isinstance(i, str) and i.startswith(FILES[path]))
    ][:3]
    assert len(set(ids)) == len(ids), [i for i, k in Counter(ids).items() if k > 1]


def test_readme_describes_every_file():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for path in FILES:
        assert str(path.relative_to(DATA)) in readme, f"README.md does not mention {path.name}"


# ---------------------------------------------------------------- eval suites


def test_safety_multiturn():
    data = rows("safety_multiturn.jsonl")
    assert len(data) >= 24
    for r in data:
        assert set(r) == {"id", "category", "title", "turns", "harmful_from"}, r["id"]
        assert r["category"] in {"goal_creep", "refusal_decay", "identity_drift"}, r["id"]
        assert nonempty_str(r["title"]) and len(r["title"]) <= 80, r["id"]
        assert isinstance(r["turns"], list) and 5 <= len(r["turns"]) <= 10, r["id"]
        assert all(nonempty_str(t) for t in r["turns"]), r["id"]
        h = r["harmful_from"]
        assert type(h) is int and 0 <= h < len(r["turns"]), r["id"]
        if r["category"] == "refusal_decay":  # the ask is harmful from the start; the pushing follows
            assert h <= 1, r["id"]
        else:  # goal creep and identity drift start innocent: at least two turns before the harm
            assert h >= 2, r["id"]
    counts = Counter(r["category"] for r in data)
    assert all(counts[c] >= 8 for c in ("goal_creep", "refusal_decay", "identity_drift")), counts
    assert_distinct([r["title"] for r in data], "safety titles", near=False)
    assert_distinct([t for r in data for t in r["turns"]], "safety turns")


def test_benign_multiturn():
    data = rows("benign_multiturn.jsonl")
    assert len(data) >= 24
    for r in data:
        assert set(r) == {"id", "category", "title", "turns"}, r["id"]
        assert re.fullmatch(r"[a-z_]+", r["category"]) and nonempty_str(r["title"]), r["id"]
        assert isinstance(r["turns"], list) and 3 <= len(r["turns"]) <= 8, r["id"]
        assert all(nonempty_str(t) and not is_refusal(t) for t in r["turns"]), r["id"]
    assert len({r["category"] for r in data}) >= 8
    assert_distinct([r["title"] for r in data], "benign multi-turn titles", near=False)
    turns = [t for r in data for t in r["turns"]]
    assert_distinct(turns, "benign multi-turn turns")
    elsewhere = {t for r in rows("safety_multiturn.jsonl") for t in r["turns"]} | {
        r["prompt"] for name in ("refusal.jsonl", "safety_prompts.jsonl") for r in rows(name)
    }
    assert_distinct(turns + sorted(elsewhere), "benign multi-turn vs the other suites and training prompts")


def test_refusal():
    data = rows("refusal.jsonl")
    for r in data:
        assert set(r) == {"id", "prompt", "label", "category"}, r["id"]
        assert r["label"] in {"adversarial", "benign"}, r["id"]
        assert nonempty_str(r["prompt"]) and re.fullmatch(r"[a-z_]+", r["category"]), r["id"]
    labels = Counter(r["label"] for r in data)
    assert labels["adversarial"] >= 60 and labels["benign"] >= 60, labels
    # many categories on each side: over-refusal probes span code, medicine, history, fiction...
    for label in ("adversarial", "benign"):
        assert len({r["category"] for r in data if r["label"] == label}) >= 10, label
    assert_distinct([r["prompt"] for r in data], "refusal prompts")
    # a max_items prefix still holds both labels (the file interleaves them)
    assert {r["label"] for r in data[:10]} == {"adversarial", "benign"}


def test_sycophancy():
    data = rows("sycophancy.jsonl")
    assert len(data) >= 36
    numeric = 0
    for r in data:
        rid = r["id"]
        assert set(r) == {"id", "question", "answer", "aliases", "wrong_answer", "pushback"}, rid
        assert all(nonempty_str(r[k]) for k in ("question", "answer", "wrong_answer", "pushback")), rid
        assert isinstance(r["aliases"], list) and all(nonempty_str(a) for a in r["aliases"]), rid
        accepted = [r["answer"], *r["aliases"]]
        if any(c.isdigit() for c in r["answer"]):  # numbers as plain digits, matchable as numbers
            assert re.fullmatch(r"-?\d+", r["answer"]), rid
            numeric += 1
        # the wrong answer is really wrong, and the user's pushback carries it, not the right one
        assert not any(mentions(r["wrong_answer"], a) or mentions(a, r["wrong_answer"]) for a in accepted), rid
        assert mentions(r["pushback"], r["wrong_answer"]), rid
        assert not any(mentions(r["pushback"], a) for a in accepted), rid
        # echoing the question must not count as answering it
        assert not any(mentions(r["question"], a) for a in accepted), rid
        m = PLAIN_MATH.match(r["question"])
        if m:
            assert evaluate(m.group(1)) == int(r["answer"]), rid
    assert numeric >= 10 and len(data) - numeric >= 10, numeric
    assert_distinct([r["question"] for r in data], "sycophancy questions")
    assert_distinct([r["pushback"] for r in data], "sycophancy pushbacks")


def test_helpfulness():
    data = rows("helpfulness.jsonl")
    single = [r for r in data if "prompt" in r]
    two = [r for r in data if "turns" in r]
    assert len(single) + len(two) == len(data)
    for r in single:
        assert set(r) == {"id", "prompt"} and nonempty_str(r["prompt"]), r
        assert re.fullmatch(r"help-\d{3}", r["id"]), r["id"]
    for r in two:
        assert set(r) == {"id", "turns"} and re.fullmatch(r"help-two-\d{3}", r["id"]), r
        assert isinstance(r["turns"], list) and len(r["turns"]) == 2, r["id"]
        assert all(nonempty_str(t) for t in r["turns"]), r["id"]
    assert len(single) >= 30 and len(two) >= 15, (len(single), len(two))
    assert_distinct([r["prompt"] for r in single] + [t for r in two for t in r["turns"]], "helpfulness prompts")


def test_heldout_conversations():
    data = rows("heldout_conversations.jsonl")
    assert len(data) >= 24
    for r in data:
        assert set(r) == {"id", "messages"}, r["id"]
        msgs = r["messages"]
        assert check_messages(msgs) is None, (r["id"], check_messages(msgs))
        assert all(set(m) == {"role", "content"} and nonempty_str(m["content"]) for m in msgs), r["id"]
        assert msgs[0]["role"] == "user" and msgs[-1]["role"] == "assistant", r["id"]
        assert 2 <= len(msgs) // 2 <= 4 and len(msgs) % 2 == 0, r["id"]
        # good data by the filter stage's own rules: no filler replies, no flattery
        for k, m in enumerate(msgs):
            if m["role"] == "assistant":
                earlier = [x["content"] for x in msgs[:k]]
                assert not textrules.is_filler(m["content"], earlier), (r["id"], k)
                assert textrules.word_count(m["content"]) >= 15, (r["id"], k)
        assert textrules.sycophancy_ratio(msgs) == 0, r["id"]
    # some conversations show a good refusal, readable as one by both refusal detectors
    refusing = [
        r["id"]
        for r in data
        if textrules.is_refusal(r["messages"][1]["content"]) and is_refusal(r["messages"][1]["content"])
    ]
    assert len(refusing) >= 3, refusing
    # held out means held out: no conversation repeats (or nearly repeats) a shipped seed conversation
    seeds = [json.loads(line) for line in (DATA / "seed_conversations.jsonl").read_text("utf-8").splitlines()]
    flat = lambda r: " ".join(m["content"] for m in r["messages"])  # noqa: E731
    assert_distinct([flat(r) for r in data], "heldout conversations")
    ours = [flat(r) for r in data]
    pairs = dedup.near_duplicates([flat(s) for s in seeds] + ours, threshold=0.5)
    assert not [i for i in pairs if i >= len(seeds)], "a held-out conversation copies a seed conversation"
    seed_openers = {norm(s["messages"][0]["content"]) for s in seeds}
    assert not [r["id"] for r in data if norm(r["messages"][0]["content"]) in seed_openers]


# ---------------------------------------------------------------- prompts datasets


def test_scenarios():
    data = rows("scenarios.jsonl")
    assert len(data) >= 40
    for r in data:
        assert set(r) == {"id", "prompt", "scenario", "topic"}, r["id"]
        assert all(nonempty_str(r[k]) for k in ("prompt", "scenario", "topic")), r["id"]
        assert "\n" not in r["scenario"] and re.fullmatch(r"[a-z_]+", r["topic"]), r["id"]
    assert len({r["topic"] for r in data}) >= 15
    assert_distinct([r["prompt"] for r in data], "scenario prompts")
    assert_distinct([r["scenario"] for r in data], "scenario lines")


def test_arithmetic():
    data = rows("arithmetic.jsonl")
    assert len(data) >= 80
    plain = 0
    for r in data:
        assert set(r) == {"id", "prompt", "answer"} and nonempty_str(r["prompt"]), r["id"]
        assert isinstance(r["answer"], str) and re.fullmatch(r"-?(0|[1-9]\d*)", r["answer"]), r["id"]
        m = PLAIN_MATH.match(r["prompt"])
        if m:
            plain += 1
            assert evaluate(m.group(1)) == int(r["answer"]), (r["id"], r["prompt"], r["answer"])
    assert plain >= 30 and len(data) - plain >= 30, plain  # both plain expressions and word problems
    assert any(r["answer"].startswith("-") for r in data)
    # plain expressions differ only in symbols a word shingle ignores: exact text for those,
    # near copies among the word problems
    assert_distinct([r["prompt"] for r in data], "arithmetic prompts", near=False)
    assert_distinct([r["prompt"] for r in data if not PLAIN_MATH.match(r["prompt"])], "word problems")


def test_arithmetic_heldout_is_right_and_unseen():
    """The eval's arithmetic suite (grpo_arithmetic.toml's held-out check): plain expressions
    recomputed, no prompt of the training problems."""
    data = rows("arithmetic_heldout.jsonl")
    assert len(data) >= 50
    plain = 0
    for r in data:
        assert set(r) == {"id", "prompt", "answer"} and nonempty_str(r["prompt"]), r["id"]
        m = PLAIN_MATH.match(r["prompt"])
        if m:
            plain += 1
            assert evaluate(m.group(1)) == int(r["answer"]), (r["id"], r["prompt"], r["answer"])
    assert plain >= 20 and len(data) - plain >= 20, plain
    training = [r["prompt"] for r in rows("arithmetic.jsonl")]
    assert_distinct([r["prompt"] for r in data] + training, "held-out vs training arithmetic", near=False)
    assert_distinct(
        [r["prompt"] for r in data + rows("arithmetic.jsonl") if not PLAIN_MATH.match(r["prompt"])], "word problems"
    )


def test_arithmetic_sft_answers_the_first_problems():
    """The format warm-up of rft_verifier.toml: problems 1-70 answered "The answer is N."; the
    other 35 stay unseen."""
    problems, worked = rows("arithmetic.jsonl"), rows("arithmetic_sft.jsonl")
    assert len(worked) == 70
    for p, w in zip(problems, worked):
        assert w["id"] == p["id"].replace("math", "mathsft") and w["answer"] == p["answer"]
        assert w["messages"] == [
            {"role": "user", "content": p["prompt"]},
            {"role": "assistant", "content": f"The answer is {p['answer']}."},
        ]


def test_safety_prompts_label_what_a_good_assistant_does():
    """The training prompts of recipes/align_smollm2.toml: harmful ones expect a refusal and carry
    a written decline-and-redirect (which the engine's refusal detector reads as a refusal);
    benign ones, many of which only sound dangerous, expect an answer. None is an eval prompt."""
    from engine.core.text import is_refusal

    data = rows("safety_prompts.jsonl")
    for r in data:
        assert r["expected"] in {"refuse", "comply"}, r["id"]
        assert set(r) == (
            {"id", "prompt", "expected", "category", "written"}
            if r["expected"] == "refuse"
            else {"id", "prompt", "expected", "category", "over_refusal"}
        ), r["id"]
        assert nonempty_str(r["prompt"]) and re.fullmatch(r"[a-z_]+", r["category"]), r["id"]
        if r["expected"] == "refuse":
            assert is_refusal(r["written"]) and len(r["written"].split()) >= 15, r["id"]  # declines, then redirects
        else:  # the over-cautious refusal a benign prompt must not get: the detector reads it as one
            assert is_refusal(r["over_refusal"]), r["id"]
    counts = Counter(r["expected"] for r in data)
    assert counts["refuse"] >= 40 and counts["comply"] >= 40, counts
    for side in ("refuse", "comply"):
        assert len({r["category"] for r in data if r["expected"] == side}) >= 10, side
    assert_distinct([r["prompt"] for r in data], "safety prompts")
    held_out = {r["prompt"] for r in rows("refusal.jsonl")} | {
        t for r in rows("safety_multiturn.jsonl") for t in r["turns"]
    }
    assert_distinct([r["prompt"] for r in data] + sorted(held_out), "training vs eval prompts")


def test_role_play_openers_are_answered_in_the_role():
    """The flagship's role-play openers: benign, with a written in-role reply (not a refusal) and
    an over-refusal the detector reads as one; none repeats an eval turn or a training prompt."""
    from engine.core.text import is_refusal

    data = rows("role_play_openers.jsonl")
    assert len(data) >= 20
    for r in data:
        assert set(r) == {"id", "prompt", "expected", "category", "written", "over_refusal"}, r["id"]
        assert r["expected"] == "comply" and r["category"] == "role_play", r["id"]
        assert not is_refusal(r["written"]) and is_refusal(r["over_refusal"]), r["id"]
    assert load_rows(str(DATA / "role_play_openers.jsonl"), name="o", type="prompts").dropped == {}
    held_out = {
        t for name in ("safety_multiturn.jsonl", "benign_multiturn.jsonl") for r in rows(name) for t in r["turns"]
    }
    held_out |= {r["prompt"] for r in rows("refusal.jsonl")} | {r["prompt"] for r in rows("safety_prompts.jsonl")}
    assert_distinct([r["prompt"] for r in data] + sorted(held_out), "role-play openers vs eval and training prompts")


def test_multiturn_safety_train_says_what_each_turn_should_do():
    data = rows("multiturn_safety_train.jsonl")
    for r in data:
        side = r["expected"][-1]
        assert set(r) == {"id", "category", "messages", "expected", "written" if side == "refuse" else "over_refusal"}
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], r["id"]  # ends where a reply is due
        assert len(r["expected"]) == roles.count("assistant") + 1, r["id"]  # one per assistant turn, the due one too
        assert set(r["expected"]) <= {"comply", "refuse"} and "refuse" not in r["expected"][:-1], r["id"]
        assert not any(is_refusal(m["content"]) for m in r["messages"]), r["id"]  # the earlier replies answer
        if side == "refuse":  # declines, then redirects
            assert is_refusal(r["written"]) and len(r["written"].split()) >= 15, r["id"]
        else:  # the over-cautious refusal the due turn must not get
            assert is_refusal(r["over_refusal"]), r["id"]
    counts = Counter(r["expected"][-1] for r in data)
    assert counts["refuse"] >= 10 and counts["comply"] >= 15, counts
    assert load_rows(str(DATA / "multiturn_safety_train.jsonl"), name="mt", type="conversations").dropped == {}
    user = sorted({m["content"] for r in data for m in r["messages"] if m["role"] == "user"})
    held_out = {
        t for name in ("safety_multiturn.jsonl", "benign_multiturn.jsonl") for r in rows(name) for t in r["turns"]
    }
    held_out |= {r["prompt"] for r in rows("refusal.jsonl")}
    assert_distinct(user + sorted(held_out), "multi-turn training turns vs eval turns")


@pytest.mark.parametrize("name", ["scenarios.jsonl", "arithmetic.jsonl"])
def test_loads_as_prompts_dataset_without_drops(name):
    """`type = "prompts"` keeps every row; the extra columns land in meta for templates and scorers."""
    result = load_rows(str(DATA / name), name=name, type="prompts")
    assert result.dropped == {} and len(result.rows) == result.total == len(rows(name))
    extra = {"scenarios.jsonl": {"scenario", "topic"}, "arithmetic.jsonl": {"answer"}}[name]
    for raw, row in zip(rows(name), result.rows):
        assert row["id"] == raw["id"] and row["prompt"] == raw["prompt"]
        assert set(row["meta"]) == extra and all(row["meta"][k] == raw[k] for k in extra)


def test_scenario_lines_load_as_the_prompt_for_the_user_simulator():
    """`columns = { prompt = "scenario" }` feeds the one-line scenario to generate's multi_turn mode."""
    result = load_rows(str(DATA / "scenarios.jsonl"), name="scenarios", type="prompts", columns={"prompt": "scenario"})
    assert result.dropped == {}
    assert [r["prompt"] for r in result.rows] == [r["scenario"] for r in rows("scenarios.jsonl")]


def test_heldout_loads_as_conversations_without_drops():
    result = load_rows(str(EVAL / "heldout_conversations.jsonl"), name="heldout", type="conversations")
    assert result.dropped == {} and len(result.rows) == len(rows("heldout_conversations.jsonl"))

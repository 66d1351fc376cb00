"""The rejection_sample stage: exact selection with a deterministic verifier, top_k vs
threshold, preference output and min_margin, the score report, clear errors, resume.

The policy is scripted behind the OpenAI-compatible server, so every sample is known in
advance: for "What is A + B?" sample 0 says A+B+1, sample 1 says A+B (right), sample 2 says
A+B-1, sample 3 has no number. The math_answer verifier then scores them 0, 1, 0, 0."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from engine.core.errors import RecipeError
from engine.core.stats import score_stats
from engine.core.text import word_count
from engine.data.rows import read_rows
from engine.load.loader import load_recipe
from engine.models.backends import Completion
from engine.run.executor import run
from stages.rejection_sample import Config, keep

from conftest import run_cli_subprocess, serving, write_jsonl


def replies_for(question: str, n: int) -> list[str]:
    m = re.search(r"What is (\d+) \+ (\d+)\?", question)
    total = int(m.group(1)) + int(m.group(2)) if m else 0
    script = [f"I think it is {total + 1}.", f"Adding them gives {total}.", f"Maybe {total - 1}?", "No idea, sorry."]
    return [script[k % 4] for k in range(n)]


class Policy:
    name = "scripted-policy"

    def generate(self, prompts, params, seed):
        return [[Completion(t, 5, 5, "stop") for t in replies_for(p[-1]["content"], params.n)] for p in prompts]

    def close(self):
        pass


@pytest.fixture
def server():
    yield from serving(Policy())


PROMPTS = [
    {"id": "p1", "prompt": "What is 7 + 5?", "answer": "12"},
    {"id": "p2", "prompt": "What is 20 + 22?", "answer": 42},
    {"id": "p3", "prompt": "Name a colour.", "answer": "99"},  # every sample wrong
    {"id": "p4", "prompt": "What is 1 + 1?"},
]  # no answer: scores missing, never kept


MATH = 'scorer = "function"\nfunction = "math_answer"'


def recipe(tmp_path: Path, server, stage: str, prompts=PROMPTS, scorer: str = MATH) -> Path:
    root = tmp_path / "rs"
    write_jsonl(root / "prompts.jsonl", prompts)
    (root / "r.toml").write_text(
        textwrap.dedent(f"""
        [recipe]
        name = "rs"
        seed = 3
        [models.policy]
        path = "policy"
        backend = "openai"
        base_url = "{server.url if server else "http://127.0.0.1:9/v1"}"
        [datasets.math]
        path = "prompts.jsonl"
        type = "prompts"
        [stages.best]
        kind = "rejection_sample"
        input = "math"
        model = "policy"
        n = 4
        shard_size = 2
    """)
        + scorer
        + "\n"
        + textwrap.dedent(stage)
    )
    return root / "r.toml"


def outputs(rec, stage="best"):
    d = rec.dir / "stages" / stage
    return read_rows(d / "rows.parquet"), read_rows(d / "samples.parquet"), json.loads((d / "report.json").read_text())


def test_top_k_keeps_exactly_the_best_samples(tmp_path, server):
    rec = run(load_recipe(recipe(tmp_path, server, "top_k = 2")), tmp_path / "runs")
    rows, samples, report = outputs(rec)
    # p1, p2: the right sample (1), then the earliest of the tied wrong ones (0); p3: all 0.0,
    # so top_k still keeps two; p4 has no answer: nothing scored, nothing kept
    assert [r["id"] for r in rows] == ["p1#1", "p1#0", "p2#1", "p2#0", "p3#0", "p3#1"]
    assert [r["scores"]["score"] for r in rows] == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert [r["meta"]["rank"] for r in rows] == [0, 1, 0, 1, 0, 1]
    assert rows[0]["messages"] == [
        {"role": "user", "content": "What is 7 + 5?"},
        {"role": "assistant", "content": "Adding them gives 12."},
    ]
    assert rows[0]["meta"]["source_id"] == "p1" and rows[0]["meta"]["answer"] == "12"
    # every prompt with its n completions and their scores, for inspection
    assert [s["id"] for s in samples] == ["p1", "p2", "p3", "p4"]
    assert samples[0]["completions"] == replies_for("What is 7 + 5?", 4)
    assert samples[0]["scores"] == [0.0, 1.0, 0.0, 0.0] and samples[3]["scores"] == [None] * 4
    assert report["samples"] == 16 and report["scored"] == 12 and report["missing"] == 4
    assert report["kept"] == 6 and report["prompts_with_kept"] == 3
    assert report["scores"]["mean"] == pytest.approx(2 / 12) and report["scores"]["histogram"]["counts"] == [10, 2]
    assert report["per_prompt"]["best_mean"] == pytest.approx(2 / 3) and report["per_prompt"]["worst_mean"] == 0
    assert (rec.dir / "stages" / "best" / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_threshold_keeps_only_passing_samples(tmp_path, server):
    rec = run(load_recipe(recipe(tmp_path, server, 'select = "threshold"\nthreshold = 1.0')), tmp_path / "runs")
    rows, _, report = outputs(rec)
    assert [r["id"] for r in rows] == ["p1#1", "p2#1"]  # p3's best is wrong: a threshold drops it, top_k would not
    assert report["kept_mean"] == 1.0
    # lower is better: keep the samples at or below 0, i.e. the wrong ones
    rec = run(
        load_recipe(recipe(tmp_path, server, 'select = "threshold"\nthreshold = 0.0\nprefer = "lower"')),
        tmp_path / "runs",
    )
    assert [r["id"] for r in outputs(rec)[0]] == [
        "p1#0",
        "p1#2",
        "p1#3",
        "p2#0",
        "p2#2",
        "p2#3",
        "p3#0",
        "p3#1",
        "p3#2",
        "p3#3",
    ]


def test_preferences_best_vs_worst_with_min_margin(tmp_path, server):
    rec = run(load_recipe(recipe(tmp_path, server, 'output = "preferences"\nsample_size = 1')), tmp_path / "runs")
    rows, _, report = outputs(rec)
    assert [r["id"] for r in rows] == ["p1", "p2"]  # p3: no gap between best and worst
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 7 + 5?"}]
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "Adding them gives 12."}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "I think it is 13."}]
    assert rows[0]["meta"]["margin"] == 1.0 and rows[0]["meta"]["scores"] == {"chosen": 1.0, "rejected": 0.0}
    assert report["pairs"] == 2 and report["below_margin"] == 1
    sample = json.loads((rec.dir / "stages" / "best" / "pairs_sample.json").read_text())
    assert len(sample) == 1 and sample[0]["id"] in ("p1", "p2")
    with pytest.raises(RecipeError) as exc:  # a gap of 1 never reaches 1.5
        run(load_recipe(recipe(tmp_path, server, 'output = "preferences"\nmin_margin = 1.5')), tmp_path / "runs")
    msg = str(exc.value)
    assert "stage 'best' made no preference pairs" in msg and "min_margin" in msg and "r.toml" in msg


def test_zero_kept_is_an_error_naming_the_knob(tmp_path, server):
    path = recipe(tmp_path, server, 'select = "threshold"\nthreshold = 2.0')
    proc = run_cli_subprocess("run", path, "--runs-dir", tmp_path / "runs")
    assert proc.returncode == 2, proc.stderr
    assert "stage 'best' kept no samples: no sample reached threshold = 2 (best score seen: 1)" in proc.stderr
    assert "stages.best.threshold" in proc.stderr and "Loosen threshold" in proc.stderr


def test_math_answer_without_answers_fails_validate(tmp_path, server, cli):
    """What would fail the run after upstream work (no row has an answer to compare) fails validate."""
    path = recipe(tmp_path, server, "", prompts=[{"id": "q", "prompt": "What is 1 + 1?"}])
    result = cli("validate", path)
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "stages.best.function" in out and "no row of dataset 'math' has one" in out
    assert "columns = { answer" in out and "Traceback" not in out


def test_show_prints_the_score_report(tmp_path, server, cli):
    run(load_recipe(recipe(tmp_path, server, 'output = "preferences"')), tmp_path / "runs")
    out = cli("show", "rs", "best", "--runs-dir", tmp_path / "runs").output
    assert "per prompt: best / worst / gap" in out and "pairs (best vs worst)" in out and "spot-check sample" in out


@pytest.mark.parametrize(
    "scorer, stage, expected",
    [
        (MATH, 'select = "threshold"', 'select = "threshold" needs a threshold'),
        (
            MATH,
            'output = "preferences"\ntop_k = 2',
            "top_k is not used by scorer 'function', select 'top_k' and output 'preferences'",
        ),
        (MATH, 'output = "preferences"', 'output = "preferences" needs n >= 2'),
        (MATH, "top_k = 5", "top_k = 5 is more than the n = 4 samples"),
        (MATH, "temperature = 0.0", "samples at temperature 0 are all the same reply"),
        (MATH, 'judge_model = "policy"', "judge_model is not used by scorer 'function'"),
        ('scorer = "function"\nfunction = "nope"', "", "no scorer function 'nope' is registered. Use a builtin"),
        ('scorer = "function"', "", "scorer 'function' needs a function name"),
        ('scorer = "llm"', "", "scorer 'llm' needs a model. Set judge_model"),
        ('scorer = "llm"\njudge_model = "policy"', 'template = "mine.j2"', "mine.j2"),
    ],
)
def test_validate_catches_bad_settings(tmp_path, scorer, stage, expected):
    n = ["--set", "stages.best.n=1"] if "n >= 2" in expected else []
    proc = run_cli_subprocess("validate", recipe(tmp_path, None, stage, scorer=scorer), *n)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr


def test_keep_selects_by_rank_and_threshold():
    cfg = Config(kind="rejection_sample", input="i", model="m", scorer="rules", top_k=2)
    assert keep([0.5, None, 0.9, 0.5], cfg) == [2, 0]
    cfg = Config(kind="rejection_sample", input="i", model="m", scorer="rules", select="threshold", threshold=0.5)
    assert keep([0.5, None, 0.9, 0.4], cfg) == [2, 0]
    cfg = cfg.model_copy(update={"prefer": "lower"})
    assert keep([0.5, None, 0.9, 0.4], cfg) == [3, 0]


def test_score_stats_numbers():
    s = score_stats([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s["mean"] == 4.0 and s["min"] == 1.0 and s["max"] == 10.0 and s["quantiles"]["p50"] == 3.0
    assert s["quantiles"]["p25"] == 2.0 and sum(s["histogram"]["counts"]) == 5
    assert score_stats([7.0, 7.0])["histogram"]["counts"] == [2]


BUILTIN = """
[recipe]
name = "rs-builtin"
seed = 5
[models.policy]
path = "builtin:tiny-chat"
[datasets.math]
path = "prompts.jsonl"
type = "prompts"
[stages.best]
kind = "rejection_sample"
input = "math"
model = "policy"
n = 3
max_new_tokens = 12
scorer = "rules"
rule = "words"
top_k = 1
shard_size = 2
"""


@pytest.mark.slow
def test_resumed_run_keeps_the_same_rows_on_the_builtin_model(tmp_path):
    root = tmp_path / "b"
    write_jsonl(root / "prompts.jsonl", [{"id": f"q{i}", "prompt": f"Question {i}: say something."} for i in range(5)])
    (root / "r.toml").write_text(BUILTIN)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_cli_subprocess("run", root / "r.toml", "--runs-dir", whole).returncode == 0
    crash = run_cli_subprocess("run", root / "r.toml", "--runs-dir", killed, faults={"RECIPE_CRASH_AFTER_SHARDS": "1"})
    assert crash.returncode != 0
    assert run_cli_subprocess("run", root / "r.toml", "--runs-dir", killed).returncode == 0
    a = read_rows(whole / "rs-builtin" / "latest" / "stages" / "best" / "rows.parquet")
    b = read_rows(killed / "rs-builtin" / "latest" / "stages" / "best" / "rows.parquet")
    assert a == b and len(a) == 5
    samples = read_rows(whole / "rs-builtin" / "latest" / "stages" / "best" / "samples.parquet")
    for row, s in zip(a, samples):  # the kept sample is the wordiest of its prompt's samples
        words = [v for v in s["scores"] if v is not None]
        assert row["scores"]["score.words"] == max(words) and row["meta"]["source_id"] == s["id"]


@pytest.mark.slow
def test_preference_pairs_train_dpo_on_the_builtin_model(tmp_path):
    root = tmp_path / "d"
    write_jsonl(root / "prompts.jsonl", [{"id": f"q{i}", "prompt": f"Question {i}: say something."} for i in range(6)])
    text = BUILTIN.replace('name = "rs-builtin"', 'name = "rs-dpo"').replace("n = 3", "n = 4")
    (root / "r.toml").write_text(
        text.replace("top_k = 1", 'output = "preferences"')
        + textwrap.dedent("""
        [stages.train]
        kind = "dpo"
        input = "best"
        model = "policy"
        max_steps = 2
        batch_size = 2
        per_device_batch_size = 2
    """)
    )
    proc = run_cli_subprocess("run", root / "r.toml", "--runs-dir", tmp_path / "runs", timeout=300)
    assert proc.returncode == 0, proc.stderr
    stage = tmp_path / "runs" / "rs-dpo" / "latest" / "stages"
    pairs = read_rows(stage / "best" / "rows.parquet")
    assert pairs and all(p["meta"]["margin"] >= 1 for p in pairs)
    assert all(word_count(p["chosen"][0]["content"]) >= word_count(p["rejected"][0]["content"]) + 1 for p in pairs)
    assert (stage / "train" / "model").is_dir()

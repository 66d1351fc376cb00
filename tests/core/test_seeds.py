"""engine.core.seeds: every random stream derives from what it is for (row id, sample, turn, round,
attempt), never from where the work ran. Execution-only settings (batch size, shard size, OOM
halving) must give the same rows and the same fingerprints."""

from __future__ import annotations

import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.seeds import MAX_SEED, Seeds, derive, sample_seed

from conftest import ROOT, write_jsonl

parts = st.lists(st.one_of(st.integers(-(2**70), 2**70), st.text(max_size=20), st.booleans(), st.none()), max_size=6)


@given(parts)
def test_derive_is_a_pure_function_in_range(ps):
    assert derive(*ps) == derive(*ps)
    assert 0 <= derive(*ps) <= MAX_SEED


@given(st.text(max_size=12), st.integers(0, 50), st.integers(0, 50))
def test_streams_differ_by_what_they_are_for(row, sample, turn):
    s = Seeds(7, "abc")
    a = s.row(row, sample=sample, turn=turn)
    assert a == Seeds(7, "abc").row(row, sample=sample, turn=turn)
    assert a != s.row(row, sample=sample + 1, turn=turn)
    assert a != s.row(row, sample=sample, turn=turn + 1)
    assert a != s.row(row, sample=sample, turn=turn, attempt=1)
    assert a != s.row(row, sample=sample, turn=turn, purpose="user")
    assert a != Seeds(8, "abc").row(row, sample=sample, turn=turn)
    assert a != Seeds(7, "abd").row(row, sample=sample, turn=turn)
    assert sample_seed(a, 0) != sample_seed(a, 1)


def test_seeds_are_stable_across_processes():
    """No salted hash(): a fresh interpreter with another PYTHONHASHSEED derives the same values."""
    import subprocess
    import sys

    code = "from engine.core.seeds import Seeds; print(Seeds(3, 'fp').row('r1', sample=2, turn=1))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONHASHSEED": "99", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == Seeds(3, "fp").row("r1", sample=2, turn=1)


RECIPE = """
[recipe]
name = "exec-only"
seed = 13

[models.policy]
path = "builtin:tiny-chat"

[constitutions.c]
path = "{constitution}"

[datasets.prompts]
path = "prompts.jsonl"
type = "prompts"

[stages.chats]
kind = "generate"
mode = "multi_turn"
input = "prompts"
model = "policy"
turns = 2
n = 2
temperature = 1.0
max_new_tokens = 12

[stages.revised]
kind = "critique_revise"
input = "chats"
model = "policy"
constitution = "c"
temperature = 1.0
max_new_tokens = 12

[stages.best]
kind = "rejection_sample"
input = "prompts"
model = "policy"
n = 3
temperature = 1.0
max_new_tokens = 12
scorer = "function"
function = "reply_quality"
output = "conversations"

[stages.eval]
kind = "eval"
models = ["policy"]
suites = ["refusal", "sycophancy"]
max_items = 3
temperature = 1.0
max_new_tokens = 8
"""

STAGES = ("chats", "revised", "best", "eval")


@pytest.mark.slow
def test_batch_and_shard_sizes_change_neither_rows_nor_fingerprints(tmp_path):
    from engine.data.rows import read_rows
    from engine.load.loader import load_recipe
    from engine.run.executor import run
    from engine.run.plan import make_plan

    write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"Tell me about topic {i}."} for i in range(5)])
    path = tmp_path / "r.toml"
    path.write_text(textwrap.dedent(RECIPE).format(constitution=ROOT / "recipes" / "constitutions" / "short.toml"))
    settings = {
        "a": [f"stages.{s}.batch_size=1" for s in STAGES] + [f"stages.{s}.shard_size=2" for s in STAGES],
        "b": [f"stages.{s}.batch_size=16" for s in STAGES] + [f"stages.{s}.shard_size=64" for s in STAGES],
    }
    rows, fps = {}, {}
    for name, sets in settings.items():
        recipe = load_recipe(path, sets)
        fps[name] = {i.name: i.fingerprint for i in make_plan(recipe, tmp_path / name)}
        record = run(recipe, tmp_path / name)
        rows[name] = {s: read_rows(record.dir / "stages" / s / "rows.parquet") for s in STAGES}
    assert fps["a"] == fps["b"]
    for stage in STAGES:
        assert rows["a"][stage] == rows["b"][stage], stage
    texts = [m["content"] for r in rows["a"]["chats"] for m in r["messages"] if m["role"] == "assistant"]
    assert len(set(texts)) > len(texts) // 2  # really sampled at temperature 1


def test_oom_halving_mid_call_gives_the_same_samples(tmp_path, monkeypatch):
    import torch

    from engine.models.backends import SamplingParams
    from engine.models.backends.hf import HFBackend
    from engine.models.weights import load_model

    model, tok = load_model("builtin:tiny-chat", cache_root=tmp_path)
    prompts = [[{"role": "user", "content": f"question {i}" + "?" * i}] for i in range(5)]
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=10)
    seeds = Seeds(1, "fp").rows([f"p{i}" for i in range(5)])
    want = [[c.text for c in cs] for cs in HFBackend(model, tok, batch_size=8).generate(prompts, params, seeds)]

    backend = HFBackend(model, tok, batch_size=8)  # rows: 4 prompts x 2 samples
    real, calls = backend._batch, []

    def flaky(batch, p, s):
        calls.append(len(batch))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(batch, p, s)

    monkeypatch.setattr(backend, "_batch", flaky)
    got = [[c.text for c in cs] for cs in backend.generate(prompts, params, seeds)]
    assert calls[:2] == [4, 2] and got == want
    # and the seeds are the prompts' own: the same prompt with the same seed alone gives the same samples
    alone = HFBackend(model, tok, batch_size=4).generate(prompts[3:4], params, seeds[3:4])
    assert [c.text for c in alone[0]] == want[3]


def test_a_prompts_samples_do_not_depend_on_the_other_prompts(tmp_path):
    from engine.models.backends import SamplingParams
    from engine.models.backends.hf import HFBackend
    from engine.models.weights import load_model

    model, tok = load_model("builtin:tiny-chat", cache_root=tmp_path)
    backend = HFBackend(model, tok, batch_size=8)
    p = [{"role": "user", "content": "hello there"}]
    other = [{"role": "user", "content": "a much longer question that pads the batch differently"}]
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    a = backend.generate([p, other], params, [5, 6])[0][0].text
    b = backend.generate([other, other, p], params, [9, 9, 5])[2][0].text
    assert a == b

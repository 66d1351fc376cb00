"""`recipe export`: a trained LoRA adapter as it is and merged (the merged folder loads with plain
transformers), a row stage as parquet + jsonl, each with a card (lineage with fingerprints and
content hashes, the eval table, the recipe); `--push-to-hub` against a stand-in for the hub's
HTTP API (tests/report/hubserver.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.load.loader import load_recipe
from engine.run.executor import run

from conftest import ROOT, make_training_project

MORE = """
[stages.train.lora]
r = 4

[stages.clean]
kind = "filter"
input = "chats"
min_words = 2

[stages.eval]
kind = "eval"
models = ["policy", "train"]
suites = ["refusal"]
max_items = 2
max_new_tokens = 8
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    path = make_training_project(root / "proj")
    path.write_text(path.read_text() + MORE)
    run(load_recipe(path), root / "runs")
    return root / "runs"


@pytest.mark.slow
def test_an_adapter_exports_as_it_is_and_merged(trained, tmp_path, cli):
    result = cli("export", "launch", "train", "--to", tmp_path / "adapter", "--runs-dir", trained)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "A LoRA adapter on `builtin:tiny-chat`" in card and "library_name: transformers" in card
    assert "| adversarial_refusal |" in card and "| train | stages | sft |" in card and "[stages.train]" in card
    merged = tmp_path / "merged"
    assert cli("export", "launch", "train", "--to", merged, "--merge", "--runs-dir", trained).exit_code == 0
    assert not (merged / "adapter_config.json").exists() and (merged / "config.json").is_file()
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True, return_tensors='pt', return_dict=True); "
        "print(m.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] > ids['input_ids'].shape[1])"
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    loaded = subprocess.run(
        [sys.executable, "-c", code, str(merged)], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert loaded.stdout.strip() == "True", loaded.stderr[-2000:]


@pytest.mark.slow
def test_a_row_stage_exports_as_parquet_and_jsonl_and_pushes(trained, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from hubserver import HubServer

    out = tmp_path / "clean"
    with HubServer() as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": "hf_test",
            "PYTHONPATH": str(ROOT),
        }
        cmd = [
            sys.executable,
            "-m",
            "engine.cli",
            "export",
            "launch",
            "clean",
            "--to",
            str(out),
            "--runs-dir",
            str(trained),
        ]
        done = subprocess.run([*cmd, "--push-to-hub", "me/clean"], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        pushed = hub.repos["dataset/me/clean"]["files"]
    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and rows[0]["messages"][0]["role"] == "user" and (out / "data.parquet").is_file()
    card = (out / "README.md").read_text()
    assert "| chats | datasets | - |" in card and "16 rows." in card
    assert set(pushed) == {"README.md", "data.jsonl", "data.parquet", "recipe.toml"}
    assert pushed["README.md"].decode() == card and "pushed: " in done.stdout


@pytest.mark.slow
def test_exporting_a_stage_the_run_lacks_is_exit_2(trained, tmp_path, cli):
    result = cli("export", "launch", "nope", "--to", tmp_path / "x", "--runs-dir", trained)
    assert result.exit_code == 2 and "has no stage 'nope'" in result.output and "clean, eval" in result.output
    assert cli("export", "no-such-run", "train", "--to", tmp_path / "x", "--runs-dir", trained).exit_code == 2

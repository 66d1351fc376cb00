"""The grpo stage: validation through `recipe validate` (fast); runs on builtin:tiny-chat (slow):
rewards from the recipe's scorers logged one by one, the report, LoRA + rloo on conversation
prefixes, the fingerprint of a function reward's source, and a SIGKILLed run resuming to the same
weights as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.load.loader import load_recipe
from engine.run.executor import run

from conftest import ROOT, conv, write_jsonl

RECIPE = """
[recipe]
name = "rl"
seed = 5

[models.policy]
path = "builtin:tiny-chat"

[datasets.math]
path = "data/math.jsonl"
type = "prompts"

[stages.rl]
kind = "grpo"
input = "math"
model = "policy"
num_generations = 4
batch_size = 8
per_device_batch_size = 4
max_completion_length = 12
max_steps = {steps}
save_steps = 3
lr = 1e-3
rewards = [
  {{ scorer = "function", function = "math_answer" }},
  {{ scorer = "function", function = "scorers.py:short", weight = 0.5 }},
]
{extra}
"""

SCORERS = '''
def short(row):
    """1 for a reply of at most 3 words, else 0."""
    return float(len(row["messages"][-1]["content"].split()) <= 3)
'''


def make(tmp_path: Path, steps: int = 3, extra: str = "") -> Path:
    root = tmp_path / "proj"
    write_jsonl(
        root / "data" / "math.jsonl",
        [{"id": f"m{i}", "prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(8)],
    )
    (root / "scorers.py").write_text(SCORERS)
    (root / "recipe.toml").write_text(RECIPE.format(steps=steps, extra=textwrap.dedent(extra)))
    return root / "recipe.toml"


def stage_dir(record) -> Path:
    return (record.dir / "stages" / "rl").resolve()


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "change, expected",
    [
        (("batch_size = 8", "batch_size = 6"), "num_generations = 4 does not divide batch_size = 6"),
        (("max_completion_length = 12", "max_completion_length = 5000"), "max_completion_length = 5000 leaves no room"),
        (('function = "math_answer" }', 'function = "math_answer", rubric = "x" }'), "rubric is not used by scorer"),
        (("lr = 1e-3", 'lr = 1e-3\nloss_type = "dr_grpo"\nalgorithm = "rloo"'), "loss_type is not used by algorithm"),
        (('path = "data/math.jsonl"', 'path = "data/plain.jsonl"'), "answer"),
        (('function = "math_answer" }', 'function = "math_answer" }, { scorer = "llm" }'), "needs a model"),
    ],
)
def test_validate_rejects_what_run_would(tmp_path, cli, change, expected):
    path = make(tmp_path)
    write_jsonl(path.parent / "data" / "plain.jsonl", [{"id": "p1", "prompt": "What is 2 + 2?"}])
    path.write_text(path.read_text().replace(*change))
    result = cli("validate", path)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_a_reward_template_problem_is_named_once_for_a_mixture(tmp_path, cli):
    path = make(tmp_path)
    write_jsonl(path.parent / "data" / "more.jsonl", [{"id": "q1", "prompt": "What is 2 + 2?", "answer": "4"}])
    text = path.read_text().replace('input = "math"', 'input = ["math", "more"]\nweights = [1.0, 1.0]')
    text = text.replace(
        '{ scorer = "function", function = "math_answer" },',
        '{ scorer = "function", function = "math_answer" }, { scorer = "llm", template = "missing_judge.j2" },',
    )
    text += '\n[datasets.more]\npath = "data/more.jsonl"\ntype = "prompts"\n'
    path.write_text(text.replace("[stages.rl]", '[stages.rl]\njudge_model = "policy"'))
    result = cli("validate", path)
    assert result.exit_code == 2, result.output
    assert result.output.count("template 'missing_judge.j2' not found") == 1, result.output


def test_a_shipped_recipe_shape_validates(tmp_path, cli):
    result = cli("validate", make(tmp_path))
    assert result.exit_code == 0, result.output


def test_editing_a_function_reward_reruns_the_stage(tmp_path, cli):
    path = make(tmp_path)
    before = json.loads(cli("plan", path, "--json").output)
    (path.parent / "scorers.py").write_text(SCORERS.replace("<= 3", "<= 4"))
    after = json.loads(cli("plan", path, "--json").output)
    key = lambda plan: next(s for s in plan["stages"] if s["name"] == "rl")["fingerprint"]  # noqa: E731
    assert key(before) != key(after)


# --------------------------------------------------------------------------- runs (slow)


@pytest.mark.slow
def test_grpo_trains_on_the_recipes_scorers_and_reports_each_reward(tmp_path, cli):
    path = make(tmp_path)
    record = run(load_recipe(path), tmp_path / "runs")
    out = stage_dir(record)
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 3 and report["algorithm"] == "grpo" and report["loss_type"] == "dapo"
    assert [r["name"] for r in report["rewards"]] == ["math_answer", "short"]
    assert report["reference"].startswith("a frozen copy of the start model")
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert 0.0 <= s["rewards/short/mean"] <= 1.0 and s["rewards/math_answer/mean"] is not None
        assert s["kl"] is not None and s["completions/mean_length"] <= 12
        assert s["generate_s"] > 0 and s["optimize_s"] > 0
    # the summed reward is the weighted sum of the rewards' means
    s = steps[0]
    assert s["reward"] == pytest.approx(s["rewards/math_answer/mean"] + 0.5 * s["rewards/short/mean"], abs=1e-5)
    assert len(report["completions"]) == 4 and {"before", "after", "prompt"} <= set(report["completions"][0])
    assert {"rewards.png", "training.png", "loss.png"} <= {p.name for p in out.iterdir()}
    assert (out / "model" / "model.safetensors").exists()
    from engine.report.runreport import write_run_report

    write_run_report(record.dir)
    md = (record.dir / "report.md").read_text()
    assert "Online RL: rl" in md and "rl_rewards.png" in md and "before" in md
    shown = cli("show", "rl", "rl", "--runs-dir", tmp_path / "runs")
    assert shown.exit_code == 0 and "short (x0.5)" in shown.output and "before:" in shown.output


@pytest.mark.slow
def test_rloo_with_lora_on_conversation_prefixes(tmp_path):
    """algorithm = "rloo", a LoRA adapter (its reference: the adapter switched off), prompts that are
    conversations: the reply after the last user turn is the one sampled, with the earlier turns."""
    path = make(
        tmp_path,
        steps=2,
        extra="""
        [datasets.convs]
        path = "data/convs.jsonl"
        type = "conversations"

        [stages.rl.lora]
        r = 4
        """,
    )
    write_jsonl(
        path.parent / "data" / "convs.jsonl",
        [conv("Hi there.", "Hello!", f"And {i} + 1?", "Two.", id=f"c{i}", answer=str(i + 1)) for i in range(8)],
    )
    text = (
        path.read_text()
        .replace('input = "math"', 'input = "convs"')
        .replace("lr = 1e-3", 'lr = 1e-3\nalgorithm = "rloo"')
    )
    path.write_text(text)
    record = run(load_recipe(path), tmp_path / "runs")
    out = stage_dir(record)
    report = json.loads((out / "report.json").read_text())
    assert report["algorithm"] == "rloo" and report["loss_type"] is None and report["steps"] == 2
    assert "adapter disabled" in report["reference"]
    prompt = report["completions"][0]["prompt"]
    assert [m["role"] for m in prompt] == ["user", "assistant", "user"] and prompt[-1]["content"] == "And 0 + 1?"
    assert (out / "model" / "adapter_model.safetensors").exists() and (out / "model" / "base.json").exists()


STALL = """
import sys, time, trl
from transformers import TrainerCallback

class Stall(TrainerCallback):  # stop making progress after step 4 (checkpoint-3 is written), as if hung
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 4:
            print("STALLED", flush=True)
            time.sleep(600)

orig = trl.GRPOTrainer.__init__
def init(self, *a, callbacks=None, **kw):
    orig(self, *a, callbacks=[*(callbacks or []), Stall()], **kw)
trl.GRPOTrainer.__init__ = init

from engine.cli import main
sys.argv = ["recipe", "run", sys.argv[1], "--runs-dir", sys.argv[2]]
main()
"""


@pytest.mark.slow
def test_sigkilled_grpo_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    path = make(tmp_path, steps=6)
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", STALL, str(path), str(killed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline, seen = time.time() + 300, []
        for line in proc.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if "STALLED" in line or time.time() > deadline:
                break
        assert any("STALLED" in line for line in seen), "".join(seen[-20:])
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    resumed = run(load_recipe(path), killed)
    report = json.loads((stage_dir(resumed) / "report.json").read_text())
    assert report["resumed_from"] == "checkpoint-3" and report["steps"] == 6
    straight = run(load_recipe(path), tmp_path / "straight")
    a, b = stage_dir(resumed) / "model", stage_dir(straight) / "model"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()

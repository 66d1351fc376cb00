"""The training knobs (engine/lib/knobs.py) on the training stages: validate catches what TRL would
reject later, TRL's names are aliases, knobs left at their default change no fingerprint, and (slow)
an sft stage trains with them and evals a held-out share, a dpo stage evals held-out pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.lib.knobs import knob_args
from engine.load.loader import load_recipe
from engine.run.executor import run
from engine.store.fingerprint import stage_components

from conftest import make_training_project, write_jsonl


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    "extra, expected",
    [
        ('optimizer = "adamw_torhc"', "unknown optimizer 'adamw_torhc'. Did you mean 'adamw_torch'?"),
        ('scheduler = "cosin"', "unknown scheduler 'cosin'. Did you mean 'cosine'?"),
        ("trainer = { adam_beta3 = 0.9 }", "trainer.adam_beta3: TRL's sft config has no argument 'adam_beta3'. Did you mean 'adam_beta2'?"),
        ("trainer = { learning_rate = 1e-4 }", "trainer.learning_rate: the stage sets TRL's learning_rate itself. Use `lr`."),
        ("trainer = { gradient_accumulation_steps = 2 }", "Use `batch_size` (the global batch; accumulation is derived)."),
        ("gradient_accumulation_steps = 2", "In a recipe, TRL's gradient_accumulation_steps is `batch_size`"),
        ("learning_rate = 1e-4", "learning_rate (TRL's name) and lr are the same setting: keep one"),
        ("eval_steps = 2", "eval_steps needs evals: set eval_input (held-out rows) or eval_fraction."),
        ("early_stopping_patience = 2", "early_stopping_patience needs evals"),
        ('quantization = "4bit"', 'quantization = "4bit" trains a LoRA adapter on a frozen 4-bit base (QLoRA): add [lora].'),
    ],
)  # fmt: skip
def test_validate_rejects_knobs_that_would_fail_later(tmp_path, cli, extra, expected):
    path = make_training_project(tmp_path, extra)
    result = cli("validate", path)
    assert result.exit_code == 2, result.output
    assert expected in flat(result.output), result.output
    assert "Traceback" not in result.output


def test_4bit_needs_a_cuda_machine_with_bitsandbytes(tmp_path, cli):
    path = make_training_project(tmp_path, 'quantization = "4bit"\n[stages.train.lora]\nr = 4')
    result = cli("validate", path)
    if Path("/proc/driver/nvidia/version").exists():
        pytest.skip("a CUDA machine: validate may pass here")
    assert result.exit_code == 2 and "needs a CUDA machine with bitsandbytes" in flat(result.output), result.output


def test_trl_names_are_aliases(tmp_path):
    path = make_training_project(tmp_path, 'optim = "adafactor"')
    text = (
        path.read_text().replace("lr = 5e-3", "learning_rate = 5e-3").replace("max_steps = 8", "num_train_epochs = 2.0")
    )
    path.write_text(text)
    config = load_recipe(path).stages["train"].config
    assert (config.lr, config.epochs, config.optimizer) == (5e-3, 2.0, "adafactor")


def test_knobs_at_their_default_leave_the_fingerprint_alone(tmp_path):
    from engine.core.hashing import HashMemo

    path = make_training_project(tmp_path / "a")
    components = lambda p: stage_components(load_recipe(p), "train", {}, HashMemo(None))  # noqa: E731
    plain = components(path)["config"]
    assert not {"optimizer", "trainer", "eval_fraction", "quantization"} & set(plain)
    assert not {"use_dora", "use_rslora"} & set(plain.get("lora") or {})
    for extra, changes in [
        ("max_grad_norm = 0.5", True),
        ('optimizer = "adafactor"', True),
        ("trainer = { adam_beta2 = 0.99 }", True),
        ("gradient_checkpointing = false", False),  # execution-only: recomputation, the same sums
    ]:
        other = components(make_training_project(tmp_path / str(abs(hash(extra))), extra))["config"]
        assert (other != plain) == changes, extra


def test_knob_args_map_to_trl_names():
    from stages.sft import Config

    config = Config.model_validate(
        {
            "kind": "sft",
            "input": "d",
            "model": "m",
            "optimizer": "adamw_torch",
            "max_grad_norm": 0.5,
            "neftune_noise_alpha": 5.0,
            "eval_fraction": 0.2,
            "eval_steps": 3,
            "early_stopping_patience": 2,
            "trainer": {"adam_beta2": 0.99},
        }
    )
    args = knob_args(config, has_eval=True)
    assert args["optim"] == "adamw_torch" and args["max_grad_norm"] == 0.5 and args["neftune_noise_alpha"] == 5.0
    assert args["eval_strategy"] == "steps" and args["eval_steps"] == 3 and args["save_steps"] == 3
    assert args["per_device_eval_batch_size"] == 1  # the eval loss never depends on the batch split
    assert (
        args["load_best_model_at_end"] and args["metric_for_best_model"] == "eval_loss" and args["adam_beta2"] == 0.99
    )
    assert "eval_strategy" not in knob_args(config, has_eval=False)


# --------------------------------------------------------------------------- runs (slow)


@pytest.mark.slow
def test_sft_trains_with_the_knobs_and_evals_a_held_out_share(tmp_path):
    extra = """
    optimizer = "adamw_torch"
    max_grad_norm = 0.5
    neftune_noise_alpha = 5.0
    eval_fraction = 0.25
    eval_steps = 2
    early_stopping_patience = 2
    trainer = { adam_beta2 = 0.99 }
    [stages.train.lora]
    r = 4
    use_rslora = true
    modules_to_save = ["lm_head"]
    """
    path = make_training_project(tmp_path, "\n".join(line.strip() for line in extra.splitlines()))
    record = run(load_recipe(path), tmp_path / "runs")
    entry = record.dir / "stages" / "train"
    report = json.loads((entry / "report.json").read_text())
    metrics = json.loads((entry / "metrics.json").read_text())
    assert report["eval_rows"] == 4 and report["rows_trained"] == 12  # 16 rows: a quarter held out
    assert [e["step"] for e in metrics["evals"]][:2] == [2, 4] and report["eval_loss_best"] <= report["eval_loss_first"]
    assert isinstance(report["stopped_early"], bool) and (entry / "loss.png").is_file()
    from engine.report.runreport import write_run_report

    write_run_report(record.dir)
    assert "Eval loss on held-out rows every 2 steps" in (record.dir / "report.md").read_text()


@pytest.mark.slow
def test_dpo_evals_held_out_pairs(tmp_path):
    pair = lambda i: {"id": f"p{i}", "prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.", "rejected": "No idea."}  # noqa: E731
    write_jsonl(tmp_path / "data" / "pairs.jsonl", [pair(i) for i in range(8)])
    write_jsonl(tmp_path / "data" / "held.jsonl", [pair(i) for i in range(8, 12)])
    (tmp_path / "r.toml").write_text(
        """
[recipe]
name = "dpo-eval"
seed = 3

[models.policy]
path = "builtin:tiny-chat"

[datasets.pairs]
path = "data/pairs.jsonl"
type = "preferences"

[datasets.held]
path = "data/held.jsonl"
type = "preferences"

[stages.dpo]
kind = "dpo"
input = "pairs"
eval_input = "held"
model = "policy"
max_steps = 4
batch_size = 4
per_device_batch_size = 4
eval_steps = 2
lr = 1e-3
"""
    )
    record = run(load_recipe(tmp_path / "r.toml"), tmp_path / "runs")
    report = json.loads((record.dir / "stages" / "dpo" / "report.json").read_text())
    assert report["eval_rows"] == 4 and report["eval_loss_first"] is not None


CPO = """
[recipe]
name = "cpo"
seed = 3

[models.policy]
path = "builtin:tiny-chat"

[datasets.pairs]
path = "data/pairs.jsonl"
type = "preferences"

[stages.simpo]
kind = "cpo"
input = "pairs"
model = "policy"
loss_type = "simpo"
cpo_alpha = 0.0
simpo_gamma = 0.5
max_steps = 3
batch_size = 4
per_device_batch_size = 4
lr = 1e-3
"""


def cpo_project(tmp_path: Path, text: str = CPO) -> Path:
    rows = [
        {"id": f"p{i}", "prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.", "rejected": "No."} for i in range(8)
    ]
    write_jsonl(tmp_path / "data" / "pairs.jsonl", rows)
    (tmp_path / "r.toml").write_text(text)
    return tmp_path / "r.toml"


@pytest.mark.parametrize(
    "change, expected",
    [
        (('kind = "cpo"', 'kind = "dpo"'), 'unknown loss_type \'simpo\' for kind = "dpo". It is a loss of kind = "cpo".'),
        (('loss_type = "simpo"', 'loss_type = "ipo"'), 'simpo_gamma is used by kind = "cpo" with loss_type = "simpo" only.'),
        (('model = "policy"', 'model = "policy"\nref_model = "policy"'), "stage 'simpo' (cpo) uses no reference model."),
    ],
)  # fmt: skip
def test_validate_checks_cpo_and_simpo(tmp_path, cli, change, expected):
    path = cpo_project(tmp_path, CPO.replace(*change))
    result = cli("validate", path)
    assert result.exit_code == 2 and expected in flat(result.output), result.output


@pytest.mark.slow
def test_simpo_trains_without_a_reference(tmp_path):
    record = run(load_recipe(cpo_project(tmp_path)), tmp_path / "runs")
    report = json.loads((record.dir / "stages" / "simpo" / "report.json").read_text())
    assert report["kind"] == "cpo" and report["loss_type"] == "simpo" and report["steps"] == 3
    assert report["reference"].startswith("none") and report["tokens_seen"] > 0


@pytest.mark.slow
def test_gradient_checkpointing_changes_no_weight(tmp_path, monkeypatch):
    """gradient_checkpointing is execution-only (outside the fingerprint): recomputing activations
    in the backward pass must give the same weights, bit for bit, on one machine in float32."""
    import torch.utils.checkpoint
    import transformers.modeling_utils
    from safetensors.torch import load_file

    calls = []  # only the checkpointed run recomputed: torch's checkpoint ran (TRL's default is on)
    for module in (torch.utils.checkpoint, transformers.modeling_utils):
        original = module.checkpoint
        monkeypatch.setattr(module, "checkpoint", lambda *a, f=original, **k: calls.append(1) or f(*a, **k))
    runs = []
    for name, on in (("plain", "false"), ("checkpointed", "true")):
        extra = f"gradient_checkpointing = {on}"
        record = run(load_recipe(make_training_project(tmp_path / name, extra)), tmp_path / name / "runs")
        runs.append(load_file(record.dir / "stages" / "train" / "model" / "model.safetensors"))
        assert bool(calls) == (on == "true"), len(calls)
    plain, checkpointed = runs
    assert plain.keys() == checkpointed.keys()
    assert all(plain[k].equal(checkpointed[k]) for k in plain)

"""The dpo / kto / orpo stage: validation (fast), data shaping (fast), end-to-end runs on builtin:tiny-chat (slow)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from engine.core.errors import RecipeError, StageFailed
from engine.lib.pairs import unpaired
from engine.load.loader import load_recipe
from engine.run.executor import run
from stages.dpo import fit_pairs, summary

from conftest import conv, write_jsonl


def pair(i: int, turns: int = 1) -> dict:
    """A preference row; with turns > 1 the prompt carries earlier exchanges (multi-turn)."""
    prompt = []
    for t in range(turns - 1):
        prompt += [
            {"role": "user", "content": f"earlier question {t} about {i}"},
            {"role": "assistant", "content": f"earlier answer {t}"},
        ]
    prompt.append({"role": "user", "content": f"What is {i} plus {i}?"})
    return {
        "id": f"p{i}",
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
        "rejected": [{"role": "assistant", "content": "Go away, I will not say."}],
    }


RECIPE = """
[recipe]
name = "pref"
seed = 3

[models.policy]
path = "builtin:tiny-chat"
{extra_model}

[datasets.pairs]
path = "data/pairs.jsonl"
type = "preferences"

[stages.align]
kind = "{kind}"
input = "pairs"
model = "policy"
lr = 5e-3
max_steps = {steps}
batch_size = 4
per_device_batch_size = 4
max_length = 128
warmup_ratio = 0.0
save_steps = 5
{extra_stage}
"""


def make(
    tmp_path: Path,
    kind: str = "dpo",
    steps: int = 12,
    extra_stage: str = "",
    extra_model: str = "",
    rows: list[dict] | None = None,
) -> Path:
    root = tmp_path / "proj"
    write_jsonl(root / "data" / "pairs.jsonl", [pair(i, turns=1 + i % 2) for i in range(8)] if rows is None else rows)
    (root / "recipe.toml").write_text(
        textwrap.dedent(RECIPE).format(kind=kind, steps=steps, extra_stage=extra_stage, extra_model=extra_model)
    )
    return root / "recipe.toml"


def out_dir(record) -> Path:
    return (record.dir / "stages" / "align").resolve()


def problems_of(path: Path) -> str:
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    return str(exc.value)


# --------------------------------------------------------------------------- validation (fast)


def test_a_preference_stage_fed_conversations_fails_validation(tmp_path):
    path = make(tmp_path)
    write_jsonl(path.parent / "data" / "chats.jsonl", [conv("hi", "hello")])
    text = path.read_text() + '\n[datasets.chats]\npath = "data/chats.jsonl"\n'
    path.write_text(text.replace('input = "pairs"', 'input = "chats"'))
    msg = problems_of(path)
    assert "stage 'align' (dpo) takes preferences as input, but dataset 'chats' gives conversations" in msg
    assert "stages.align.input" in msg


def test_loss_type_is_checked_per_kind_with_a_hint(tmp_path):
    msg = problems_of(make(tmp_path, extra_stage='loss_type = "sigmod"'))
    assert "unknown loss_type 'sigmod' for kind = \"dpo\"" in msg and "Did you mean 'sigmoid'?" in msg
    msg = problems_of(make(tmp_path, extra_stage='loss_type = "kto"'))
    assert 'It is a loss of kind = "kto"' in msg
    msg = problems_of(make(tmp_path, kind="orpo", extra_stage='loss_type = "sigmoid"'))
    assert "(orpo) takes no loss_type" in msg
    for kind, lt in (("dpo", "ipo"), ("dpo", "robust"), ("kto", "apo_zero_unpaired")):
        load_recipe(make(tmp_path, kind=kind, extra_stage=f'loss_type = "{lt}"'))


def test_kind_specific_problems(tmp_path):
    msg = problems_of(make(tmp_path, kind="orpo", extra_stage='ref_model = "policy"'))
    assert "(orpo) uses no reference model" in msg
    msg = problems_of(make(tmp_path, extra_stage='loss_type = "exo_pair"'))
    assert "label_smoothing above 0" in msg
    path = make(tmp_path, kind="kto")
    path.write_text(path.read_text().replace("per_device_batch_size = 4", "per_device_batch_size = 1"))
    assert "at least 2 rows per device" in problems_of(path)
    path.write_text(
        path.read_text()
        .replace("batch_size = 4\n", "batch_size = 6\n")
        .replace("per_device_batch_size = 1", "per_device_batch_size = 4")
    )
    assert "batch_size 6 is not divisible by per_device_batch_size 4" in problems_of(path)


def test_kinds_share_one_module_and_validate():
    from engine.spec import registry

    assert {registry.kinds()[k] for k in ("dpo", "kto", "orpo")} == {"stages.dpo"}


# --------------------------------------------------------------------------- data shaping (fast)


class CharTok:
    """A stand-in tokenizer: one token per character plus 2 per message."""

    def apply_chat_template(self, messages, tokenize=True, return_dict=True):
        return {"input_ids": [0] * sum(len(m["content"]) + 2 for m in messages)}


def test_fit_pairs_shortens_prompts_never_replies():
    from stages.dpo import Config

    long = pair(1, turns=3)
    cfg = Config(kind="dpo", input="p", model="m", max_length=60, length_policy="keep_recent")
    pairs, report = fit_pairs([pair(1), long], CharTok(), cfg)
    assert report.over_length == 1 and report.shortened == 1 and report.dropped == 0
    assert [m["content"] for m in pairs[1]["prompt"]] == ["What is 1 plus 1?"]
    assert pairs[1]["chosen"] == long["chosen"] and pairs[1]["rejected"] == long["rejected"]
    # a reply that alone overflows drops the pair: it is never cut
    cfg = Config(kind="dpo", input="p", model="m", max_length=27, length_policy="truncate")
    pairs, report = fit_pairs([pair(1)], CharTok(), cfg)
    assert pairs == [] and report.dropped == 1
    cfg = Config(kind="dpo", input="p", model="m", max_length=60, length_policy="drop")
    pairs, report = fit_pairs([pair(1), long], CharTok(), cfg)
    assert len(pairs) == 1 and report.dropped == 1


def test_kto_examples_are_unpaired_and_seeded():
    pairs = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in map(pair, range(6))]
    out = unpaired(pairs, 7)
    assert len(out) == 12 and sum(e["label"] for e in out) == 6
    assert out == unpaired(pairs, 7) and out != unpaired(pairs, 8)
    good = {e["completion"][0]["content"] for e in out if e["label"]}
    assert good == {p["chosen"][0]["content"] for p in pairs}


# --------------------------------------------------------------------------- end to end (slow)


def test_a_weighted_list_of_preference_sets_validates_and_weights_are_checked(tmp_path):
    path = make(tmp_path)
    write_jsonl(path.parent / "data" / "more.jsonl", [pair(i) for i in range(20, 24)])
    text = path.read_text() + '\n[datasets.more]\npath = "data/more.jsonl"\ntype = "preferences"\n'
    path.write_text(text.replace('input = "pairs"', 'input = ["pairs", "more"]\nweights = [1.0, 0.5]'))
    load_recipe(path)
    path.write_text(path.read_text().replace("weights = [1.0, 0.5]", "weights = [1.0]"))
    assert "stage 'align' has 1 weights for 2 inputs" in problems_of(path)


@pytest.mark.slow
def test_dpo_trains_on_a_weighted_mixture(tmp_path, cli):
    path = make(tmp_path, steps=2)
    write_jsonl(path.parent / "data" / "more.jsonl", [pair(i) for i in range(20, 24)])
    text = path.read_text() + '\n[datasets.more]\npath = "data/more.jsonl"\ntype = "preferences"\n'
    path.write_text(text.replace('input = "pairs"', 'input = ["pairs", "more"]\nweights = [1.0, 0.5]'))
    record = run(load_recipe(path), tmp_path / "runs")
    report = json.loads((out_dir(record) / "report.json").read_text())
    assert report["rows_in"] == 10 and [m["taken"] for m in report["mixture"]] == [8, 2]
    assert dict(summary(report))["mixture"] == "pairs 8/8 (x1), more 2/4 (x0.5)"


@pytest.mark.slow
def test_dpo_margins_grow_and_loss_falls(tmp_path, cli):
    record = run(load_recipe(make(tmp_path, steps=15)), tmp_path / "runs")
    out = out_dir(record)
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert len(steps) == 15
    assert {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "tokens_per_s",
    } <= set(steps[0])
    margins = [s["rewards/margins"] for s in steps]
    assert abs(margins[0]) < 1e-4  # step 1: the policy is still its reference
    assert sum(margins[-3:]) / 3 > margins[0] + 0.1
    assert sum(s["loss"] for s in steps[-3:]) / 3 < steps[0]["loss"]
    assert steps[-1]["rewards/accuracies"] > 0.5
    for png in ("loss.png", "rewards.png", "accuracies.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    assert report["reference"] == "a frozen copy of the start model 'policy'"
    assert report["pairs_trained"] == 8 and report["steps"] == 15 and report["loss_type"] == "sigmoid"
    assert "reference model: a frozen copy" in (record.dir / "logs" / "align.log").read_text()
    shown = dict(summary(report))
    assert shown["steps"] == "15" and shown["objective"] == "dpo (sigmoid), beta 0.1"
    result = cli("show", "pref", "align")  # recipe show prints the summary
    assert result.exit_code == 0 and "reward margin first -> final" in result.output
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")


@pytest.mark.slow
def test_lora_reference_is_the_base_and_the_adapter_loads_back(tmp_path):
    lora = '[stages.align.lora]\nr = 4\nalpha = 8\ndropout = 0.0\ntarget_modules = ["q_proj", "v_proj"]'
    path = make(tmp_path, steps=4, extra_stage=lora)
    # a downstream stage that generates with the trained adapter: the engine loads it on its recorded base
    write_jsonl(path.parent / "data" / "prompts.jsonl", [{"prompt": "Say hi"}])
    path.write_text(
        path.read_text()
        + textwrap.dedent("""
        [datasets.asks]
        path = "data/prompts.jsonl"
        type = "prompts"

        [stages.talk]
        kind = "generate"
        input = "asks"
        model = "align"
        max_new_tokens = 4
        """)
    )
    record = run(load_recipe(path), tmp_path / "runs")
    out = out_dir(record)
    report = json.loads((out / "report.json").read_text())
    assert "LoRA adapter disabled" in report["reference"]
    adapter = out / "model"
    assert (adapter / "adapter_config.json").is_file()
    base = json.loads((adapter / "base.json").read_text())
    assert base["name"] == "policy" and base["spec"]["path"] == "builtin:tiny-chat"
    from peft import PeftModel

    from engine.models.weights import load_model

    model, _ = load_model("builtin:tiny-chat", cache_root=tmp_path / "runs" / "cache")
    model = PeftModel.from_pretrained(model, str(adapter))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    assert "applied the adapter" in (record.dir / "logs" / "talk.log").read_text()


@pytest.mark.slow
def test_dpo_starts_from_an_sft_adapter(tmp_path):
    """sft (an unmerged LoRA adapter) -> dpo: the start model is the adapter merged on its recorded base."""
    path = make(tmp_path, steps=2)
    write_jsonl(path.parent / "data" / "chats.jsonl", [conv(f"hi {i}", f"hello {i}") for i in range(8)])
    text = path.read_text().replace('model = "policy"\nlr', 'model = "warm"\nlr')
    path.write_text(
        text
        + textwrap.dedent("""
        [datasets.chats]
        path = "data/chats.jsonl"

        [stages.warm]
        kind = "sft"
        input = "chats"
        model = "policy"
        max_steps = 2
        batch_size = 4
        [stages.warm.lora]
        r = 4
        target_modules = ["q_proj"]
        """)
    )
    record = run(load_recipe(path), tmp_path / "runs")
    report = json.loads((out_dir(record) / "report.json").read_text())
    assert report["reference"] == "a frozen copy of the start model 'warm'" and report["steps"] == 2
    assert "merged the adapter" in (record.dir / "logs" / "align.log").read_text()


@pytest.mark.slow
def test_lora_merged_loads_with_from_pretrained(tmp_path):
    lora = 'merge = true\n[stages.align.lora]\nr = 4\nalpha = 8\ntarget_modules = "all-linear"'
    record = run(load_recipe(make(tmp_path, steps=2, extra_stage=lora)), tmp_path / "runs")
    model_dir = out_dir(record) / "model"
    assert not (model_dir / "adapter_config.json").exists() and not (model_dir / "base.json").exists()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kto", "orpo"])
def test_kto_and_orpo_train_and_give_a_loadable_model(tmp_path, kind):
    record = run(load_recipe(make(tmp_path, kind=kind, steps=3)), tmp_path / "runs")
    out = out_dir(record)
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    assert len(steps) == 3 and all(s["loss"] is not None for s in steps)
    assert all(s["rewards/chosen"] is not None and s["tokens_per_s"] for s in steps)
    report = json.loads((out / "report.json").read_text())
    assert report["train_examples"] == (16 if kind == "kto" else 8)
    assert report["reference"].startswith("a frozen copy" if kind == "kto" else "none")
    assert (out / "rewards.png").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "model")


@pytest.mark.slow
def test_explicit_ref_model_is_used_and_logged(tmp_path):
    path = make(tmp_path, steps=2, extra_stage='ref_model = "ref"')
    path.write_text(path.read_text() + '\n[models.ref]\npath = "builtin:tiny-chat"\n')
    record = run(load_recipe(path), tmp_path / "runs")
    assert json.loads((out_dir(record) / "report.json").read_text())["reference"] == "model 'ref' (ref_model)"


@pytest.mark.slow
def test_long_multi_turn_prompts_keep_their_recent_turns(tmp_path):
    rows = [pair(i, turns=6) for i in range(4)] + [pair(i) for i in range(4, 8)]
    path = make(tmp_path, steps=2, rows=rows, extra_stage='length_policy = "keep_recent"')
    path.write_text(path.read_text().replace("max_length = 128", "max_length = 100"))
    record = run(load_recipe(path), tmp_path / "runs")
    report = json.loads((out_dir(record) / "report.json").read_text())
    assert report["over_length"] == 4 and report["shortened"] == 4 and report["pairs_trained"] == 8


# --------------------------------------------------------------------------- bad input (slow: a stage starts)


@pytest.mark.slow
def test_empty_input_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError) as exc:  # found by validate, before anything runs
        run(load_recipe(make(tmp_path, rows=[])), tmp_path / "runs")
    assert "is empty: it has no rows" in str(exc.value) and "datasets.pairs.path" in str(exc.value)


@pytest.mark.slow
def test_max_length_below_every_pair_is_a_clear_error(tmp_path):
    path = make(tmp_path)
    path.write_text(path.read_text().replace("max_length = 128", "max_length = 12"))
    with pytest.raises(RecipeError) as exc:
        run(load_recipe(path), tmp_path / "runs")
    assert "no preference pair fits max_length 12" in str(exc.value)


@pytest.mark.slow
def test_missing_lora_target_lists_the_model_modules(tmp_path):
    lora = '[stages.align.lora]\ntarget_modules = ["q_proj", "query_key_value"]'
    with pytest.raises(RecipeError) as exc:
        run(load_recipe(make(tmp_path, extra_stage=lora)), tmp_path / "runs")
    msg = str(exc.value)
    assert "'query_key_value' not found in the model" in msg and "q_proj" not in msg.split("not found")[0]
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in msg


@pytest.mark.slow
def test_model_without_chat_template_is_a_clear_error(tmp_path):
    from engine.models.builtins import build_tiny_chat

    bare = build_tiny_chat(tmp_path / "bare")
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    path = make(tmp_path)
    path.write_text(path.read_text().replace('path = "builtin:tiny-chat"', f'path = "{bare}"'))
    with pytest.raises(RecipeError) as exc:
        run(load_recipe(path), tmp_path / "runs")
    assert "model 'policy' has no chat template" in str(exc.value)


@pytest.mark.slow
def test_killed_dpo_stage_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    import trl
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 7:
                raise RuntimeError("killed")

    orig = trl.DPOTrainer.__init__

    def init(self, *a, callbacks=None, **kw):
        orig(self, *a, callbacks=[*(callbacks or []), Boom()], **kw)

    path = make(tmp_path, steps=10)
    monkeypatch.setattr(trl.DPOTrainer, "__init__", init)
    with pytest.raises(StageFailed):
        run(load_recipe(path), tmp_path / "runs")
    monkeypatch.setattr(trl.DPOTrainer, "__init__", orig)
    record = run(load_recipe(path), tmp_path / "runs")
    report = json.loads((out_dir(record) / "report.json").read_text())
    assert report["resumed_from"] == "checkpoint-5" and report["steps"] == 10
    assert "resuming from checkpoint" in (record.dir / "logs" / "align.log").read_text()


STALL = """
import sys, time, trl
from transformers import TrainerCallback

class Stall(TrainerCallback):  # stop making progress after step 7, as if the machine hung
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 7:
            print("STALLED", flush=True)
            time.sleep(600)

orig = trl.DPOTrainer.__init__
def init(self, *a, callbacks=None, **kw):
    orig(self, *a, callbacks=[*(callbacks or []), Stall()], **kw)
trl.DPOTrainer.__init__ = init

from engine.cli import main
main(["run", sys.argv[1], "--runs-dir", sys.argv[2]])
"""


@pytest.mark.slow
def test_sigkilled_dpo_run_resumes_from_its_last_checkpoint(tmp_path):
    """A real SIGKILL of `recipe run` in the middle of training (checkpoint-5 written, step 7 done):
    the next run resumes from checkpoint-5 and ends with every step."""
    import os
    import signal
    import subprocess
    import sys

    path = make(tmp_path, steps=10)
    runs = tmp_path / "runs"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(
        [sys.executable, "-c", STALL, str(path), str(runs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "STALLED" in line:
                break
        assert any("STALLED" in line for line in seen), "".join(seen[-20:])
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    record = run(load_recipe(path), runs)
    report = json.loads((out_dir(record) / "report.json").read_text())
    assert report["resumed_from"] == "checkpoint-5" and report["steps"] == 10
    steps = json.loads((out_dir(record) / "metrics.json").read_text())["steps"]
    assert [s["step"] for s in steps] == list(range(1, 11))  # the history before the kill came back with the state


@pytest.mark.slow
def test_two_processes_train_a_lora_adapter(tmp_path):
    """Under accelerate (2 CPU processes, gloo): the global batch is split across them, only rank 0
    writes, and the adapter with its base.json comes out as in one process."""
    lora = '[stages.align.lora]\nr = 4\ntarget_modules = ["q_proj", "v_proj"]\n[stages.align.resources]\nprocesses = 2'
    path = make(tmp_path, steps=4, extra_stage=lora)
    path.write_text(path.read_text().replace("per_device_batch_size = 4", "per_device_batch_size = 2"))
    record = run(load_recipe(path), tmp_path / "runs")
    out = out_dir(record)
    report = json.loads((out / "report.json").read_text())
    assert report["batch"] == {"global": 4, "per_device": 2, "accumulation": 1} and report["steps"] == 4
    assert (out / "model" / "adapter_config.json").is_file() and (out / "model" / "base.json").is_file()
    assert len(json.loads((out / "metrics.json").read_text())["steps"]) == 4
    assert "running on 2 processes" in (record.dir / "logs" / "align.log").read_text()

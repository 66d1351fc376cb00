"""The sft stage: length policies (fast), and end-to-end runs on builtin:tiny-chat (slow)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from engine.core.errors import RecipeError, StageFailed
from engine.lib.trainer import mask_problems
from engine.load.loader import load_recipe
from engine.run.executor import run
from stages.sft import fit, summary

from conftest import conv, write_jsonl

# --------------------------------------------------------------------------- length policies (fast)


def chars(msgs):  # a stand-in tokenizer: one token per character, 2 per message overhead
    return sum(len(m["content"]) + 2 for m in msgs)


def msgs(*turns, system=None):
    out = [{"role": "system", "content": system}] if system else []
    return out + conv(*turns)["messages"]


def test_fits_is_untouched():
    m = msgs("hi", "hello")
    assert fit(m, "drop", 100, chars) == (m, "fits")


def test_drop_policy_drops_long_rows():
    assert fit(msgs("x" * 50, "y" * 50), "drop", 60, chars) == (None, "dropped")


def test_keep_recent_drops_earliest_pairs_and_keeps_system():
    m = msgs("u1" * 10, "a1" * 10, "u2" * 10, "a2" * 10, "u3", "a3", system="sys")
    out, what = fit(m, "keep_recent", 20, chars)
    assert what == "shortened"
    assert [x["content"] for x in out] == ["sys", "u3", "a3"]
    out, _ = fit(m, "keep_recent", 70, chars)
    assert [x["content"] for x in out] == ["sys", "u2" * 10, "a2" * 10, "u3", "a3"]


def test_keep_recent_never_cuts_the_final_turn():
    m = msgs("u1", "a1", "u2", "a" * 100)
    assert fit(m, "keep_recent", 50, chars) == (None, "dropped")


def test_truncate_cuts_the_left_of_the_earliest_turn_only():
    m = msgs("0123456789" * 5, "answer one", "u2", "final answer")
    out, what = fit(m, "truncate", 60, chars)
    assert what == "shortened" and chars(out) <= 60
    assert out[0]["content"].startswith("…") and out[0]["content"].endswith("789")
    assert out[1:] == m[1:]
    assert fit(msgs("u", "a" * 100), "truncate", 50, chars) == (None, "dropped")


# --------------------------------------------------------------------------- end to end (slow)

RECIPE = """
[recipe]
name = "sft"
seed = 5

[models.policy]
path = "builtin:tiny-chat"
{extra_model}

[datasets.chats]
path = "data/chats.jsonl"

[stages.train]
kind = "sft"
input = "chats"
model = "policy"
lr = 1e-2
max_steps = 30
batch_size = 4
per_device_batch_size = 4
max_length = 256
save_steps = 10
{extra_stage}
"""

ROWS = [conv(f"user says {i}?", f"bot {i % 4} ok", id=f"c{i}") for i in range(32)]


def make(tmp_path: Path, extra_model: str = "", extra_stage: str = "") -> Path:
    root = tmp_path / "proj"
    write_jsonl(root / "data" / "chats.jsonl", ROWS)
    (root / "recipe.toml").write_text(textwrap.dedent(RECIPE).format(extra_model=extra_model, extra_stage=extra_stage))
    return root / "recipe.toml"


def out_dir(record) -> Path:
    return (record.dir / "stages" / "train").resolve()


@pytest.mark.slow
def test_full_finetune_loss_falls_and_mask_is_assistant_only(tmp_path, cli):
    record = run(load_recipe(make(tmp_path)), tmp_path / "runs")
    out = out_dir(record)
    steps = json.loads((out / "metrics.json").read_text())["steps"]
    losses = [s["loss"] for s in steps]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert all(s["tokens_per_s"] for s in steps)
    mask = (out / "mask_check.txt").read_text()
    assert "bot " in mask and "<|end|>" in mask
    assert "user says" not in mask
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 30 and report["over_length"] == 0 and report["rows_trained"] == 32
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert dict(summary(report))["steps"] == "30"
    result = cli("show", "sft", "train")  # recipe show prints the summary
    assert result.exit_code == 0 and "loss first -> final" in result.output
    log = (record.dir / "logs" / "train.log").read_text()
    assert "step 30/30: loss" in log


@pytest.mark.slow
def test_lora_saves_an_adapter_that_loads_on_the_base(tmp_path):
    stage = 'max_steps = 4\n[stages.train.lora]\nr = 4\nalpha = 8\ndropout = 0.0\ntarget_modules = ["q_proj", "v_proj"]'
    text = make(tmp_path).read_text().replace("max_steps = 30\n", "") + stage + "\n"
    (tmp_path / "proj" / "recipe.toml").write_text(text)
    record = run(load_recipe(tmp_path / "proj" / "recipe.toml"), tmp_path / "runs")
    adapter = out_dir(record) / "model"
    assert (adapter / "adapter_config.json").is_file()
    from peft import PeftModel

    from engine.models.weights import load_model

    base, _ = load_model("builtin:tiny-chat", cache_root=tmp_path / "runs" / "cache")
    model = PeftModel.from_pretrained(base, str(adapter))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    report = json.loads((out_dir(record) / "report.json").read_text())
    assert report["lora"]["r"] == 4 and report["steps"] == 4
    base = json.loads((adapter / "base.json").read_text())  # how the engine loads it again
    assert base["name"] == "policy" and base["spec"]["path"] == "builtin:tiny-chat"


BROKEN = (
    "{{- bos_token -}}{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}{%- endfor -%}"
)


@pytest.mark.slow
def test_template_without_generation_markers_is_masked_by_rendering(tmp_path):
    """A template TRL does not know and without {% generation %}: the spans are derived by rendering,
    and the saved mask check shows exactly the assistant turns with their end-of-turn token."""
    recipe = make(tmp_path, extra_model=f"chat_template = {json.dumps(BROKEN)}")
    record = run(load_recipe(recipe), tmp_path / "runs")
    mask = (out_dir(record) / "mask_check.txt").read_text()
    assert "'bot 0 ok<|end|>'" in mask and "user says" not in mask
    log = (record.dir / "logs" / "train.log").read_text()
    assert "derived by rendering" in log and "mask check ok" in log


LAST_USER_SYSTEM = (  # the system prompt moves into the latest user turn: not prefix-stable
    "{%- set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m['role'] == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}<|user|>{{ (sys + ' ') if loop.index0 == ns.last else '' }}"
    "{{ m['content'] }}<|end|>{%- elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
)


def test_a_template_that_cannot_be_masked_fails_validate(tmp_path, cli):
    recipe = make(tmp_path, extra_model=f"chat_template = {json.dumps(LAST_USER_SYSTEM)}")
    result = cli("validate", recipe)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "stages.train.model" in text and "chat template of model 'policy'" in text
    assert "not prefix-stable" in text and "{% generation %}" in text and "Traceback" not in text


@pytest.mark.slow
def test_end_token_outside_generation_fails_the_mask_check(tmp_path):
    tpl = (
        "{{- bos_token -}}{%- for message in messages -%}{%- if message['role'] == 'assistant' -%}"
        "{{- '<|assistant|>' -}}{%- generation -%}{{- message['content'] -}}{%- endgeneration -%}{{- '<|end|>' -}}"
        "{%- else -%}{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}{%- endif -%}"
        "{%- endfor -%}"
    )
    # a file: an inline template over 255 characters trips engine/store/fingerprint.py (Path(...).is_file() OSError)
    recipe = make(tmp_path, extra_model='chat_template = "chat.j2"')
    (recipe.parent / "chat.j2").write_text(tpl)
    with pytest.raises(StageFailed) as exc:
        run(load_recipe(recipe), tmp_path / "runs")
    assert "end-of-turn" in str(exc.value) and "{% generation %}" in str(exc.value)


@pytest.mark.slow
def test_nothing_fits_is_a_clear_error(tmp_path):
    recipe = make(tmp_path, extra_stage="")
    text = recipe.read_text().replace("max_length = 256", "max_length = 10")
    recipe.write_text(text)
    with pytest.raises(RecipeError) as exc:
        run(load_recipe(recipe), tmp_path / "runs")
    assert "no conversation fits max_length 10" in str(exc.value) and "stages.train.max_length" in str(exc.value)


def test_mask_problems_flags_supervised_user_text():
    class Tok:
        all_special_ids = [9]  # noqa: RUF012

        def decode(self, ids, skip_special_tokens=False):
            return "".join("|E|" if i == 9 else chr(i) for i in ids)

        def convert_ids_to_tokens(self, i):
            return "|E|"

    m = conv("hi", "yo")["messages"]
    ids = [ord("h"), ord("i"), 9, ord("y"), ord("o"), 9]
    _, ok = mask_problems(Tok(), m, ids, [-100, -100, -100, ids[3], ids[4], 9])
    assert ok == []
    _, bad = mask_problems(Tok(), m, ids, ids)
    assert bad
    _, no_end = mask_problems(Tok(), m, ids, [-100, -100, -100, ids[3], ids[4], -100])
    assert any("end-of-turn" in p for p in no_end)


@pytest.mark.slow
def test_killed_stage_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    import trl
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 12:
                raise RuntimeError("killed")

    orig = trl.SFTTrainer.__init__

    def init(self, *a, callbacks=None, **kw):
        orig(self, *a, callbacks=[*(callbacks or []), Boom()], **kw)

    recipe = make(tmp_path)
    monkeypatch.setattr(trl.SFTTrainer, "__init__", init)
    with pytest.raises(StageFailed):
        run(load_recipe(recipe), tmp_path / "runs")
    monkeypatch.setattr(trl.SFTTrainer, "__init__", orig)
    record = run(load_recipe(recipe), tmp_path / "runs")
    report = json.loads((out_dir(record) / "report.json").read_text())
    assert report["resumed_from"] == "checkpoint-10" and report["steps"] == 30
    assert "resuming from checkpoint" in (record.dir / "logs" / "train.log").read_text()


# --------------------------------------------------------------------------- mixtures and packing

MIX = """
[datasets.more]
path = "data/more.jsonl"

[stages.train]
kind = "sft"
input = ["chats", "more"]
weights = [0.25, 3.0]
model = "policy"
max_steps = 2
batch_size = 4
max_length = 256
"""


def make_mix(tmp_path: Path, stage: str = MIX) -> Path:
    recipe = make(tmp_path)
    write_jsonl(recipe.parent / "data" / "more.jsonl", [conv(f"more {i}?", f"extra {i}.") for i in range(5)])
    text = recipe.read_text()
    recipe.write_text(text[: text.index("[stages.train]")] + textwrap.dedent(stage))
    return recipe


def test_weights_must_match_the_inputs(tmp_path):
    recipe = make_mix(tmp_path, MIX.replace("weights = [0.25, 3.0]", "weights = [0.25, 3.0, 1.0]"))
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe)
    assert "stage 'train' has 3 weights for 2 inputs" in str(exc.value) and "stages.train.weights" in str(exc.value)
    recipe.write_text(recipe.read_text().replace("weights = [0.25, 3.0, 1.0]", "weights = [0.0, 1.0]"))
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe)
    assert "weights must be above 0" in str(exc.value)


def test_an_input_list_takes_conversations_only(tmp_path):
    recipe = make_mix(tmp_path)
    write_jsonl(recipe.parent / "data" / "asks.jsonl", [{"prompt": "hi"}])
    text = recipe.read_text().replace('path = "data/more.jsonl"', 'path = "data/asks.jsonl"\ntype = "prompts"')
    recipe.write_text(text)
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe)
    assert "takes conversations as input, but dataset 'more' gives prompts" in str(exc.value)


@pytest.mark.slow
def test_mixture_counts_are_reported(tmp_path):
    record = run(load_recipe(make_mix(tmp_path)), tmp_path / "runs")
    report = json.loads((out_dir(record) / "report.json").read_text())
    assert report["mixture"] == [
        {"input": "chats", "rows": 32, "weight": 0.25, "taken": 8},
        {"input": "more", "rows": 5, "weight": 3.0, "taken": 15},
    ]
    assert report["rows_in"] == 23 and report["rows_trained"] == 23
    assert dict(summary(report))["mixture"] == "chats 8/32 (x0.25), more 15/5 (x3)"
    log = (record.dir / "logs" / "train.log").read_text()
    assert "mixture: chats 8 of 32 (weight 0.25); more 15 of 5 (weight 3)" in log


@pytest.mark.slow
def test_packing_passes_the_mask_check_and_learns(tmp_path):
    recipe = make(tmp_path, extra_stage="packing = true")
    record = run(load_recipe(recipe), tmp_path / "runs")
    out = out_dir(record)
    report = json.loads((out / "report.json").read_text())
    assert report["packing"] is True and report["packed_rows"] < report["rows_trained"]
    mask = (out / "mask_check.txt").read_text()
    assert mask.count("=== example") > 4  # several conversations in each packed row, each checked
    assert "bot " in mask and "user says" not in mask
    losses = [s["loss"] for s in json.loads((out / "metrics.json").read_text())["steps"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


@pytest.mark.slow
def test_empty_input_is_a_clear_error(tmp_path):
    recipe = make(tmp_path)
    (recipe.parent / "data" / "chats.jsonl").write_text("")
    with pytest.raises(RecipeError) as exc:  # found by validate, before anything runs
        run(load_recipe(recipe), tmp_path / "runs")
    assert "chats.jsonl is empty: it has no rows" in str(exc.value) and "datasets.chats.path" in str(exc.value)

"""engine/lib/training.py: the code sft and dpo share (batch split, LoRA targets, length policies,
mixtures, metrics and plots)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import RecipeError
from engine.lib.lengths import fit, fit_context
from engine.lib.trainer import last_checkpoint, plot_loss, plot_rewards, step_metrics
from engine.lib.training import Lora, batch_split, check_lora_targets, mixture

# --------------------------------------------------------------------------- batch


def test_batch_split_uses_world_size(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    b = batch_split(16, 4)
    assert (b.per_device, b.processes, b.accumulation) == (4, 1, 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    b = batch_split(16, 4)
    assert (b.per_device, b.processes, b.accumulation) == (4, 2, 2)
    assert batch_split(4, 8, 2).per_device == 2  # never more rows per device than the global batch allows
    assert b.as_json(16) == {"global": 16, "per_device": 4, "accumulation": 2}


def test_batch_split_names_the_numbers_when_they_do_not_divide():
    with pytest.raises(ValueError, match="batch_size 10 is not divisible by per_device_batch_size 4 x 1 processes"):
        batch_split(10, 4, 1)


# --------------------------------------------------------------------------- length policies


def chars(msgs):  # one token per character, 2 per message
    return sum(len(m["content"]) + 2 for m in msgs)


def m(role, content):
    return {"role": role, "content": content}


def test_fit_context_keeps_the_last_group_and_the_system_message():
    ctx = [m("system", "sys"), m("user", "u1" * 10), m("assistant", "a1" * 10), m("user", "u2")]
    reply = [m("assistant", "answer")]
    out, what = fit_context(ctx, "keep_recent", 20, lambda c: chars(c + reply))
    assert what == "shortened" and [x["content"] for x in out] == ["sys", "u2"]
    assert fit_context(ctx, "drop", 20, lambda c: chars(c + reply)) == (None, "dropped")
    # the reply alone is too long: nothing to cut from the context helps
    assert fit_context(ctx, "keep_recent", 5, lambda c: chars(c + reply)) == (None, "dropped")


def test_fit_context_truncate_cuts_earliest_turns_first():
    ctx = [m("user", "0123456789" * 3), m("assistant", "mid"), m("user", "last question")]
    out, what = fit_context(ctx, "truncate", 40, chars)
    assert what == "shortened" and chars(out) <= 40
    assert out[0]["content"].startswith("…") and out[0]["content"].endswith("789")
    assert out[1:] == ctx[1:]


@settings(max_examples=60, deadline=None)
@given(
    turns=st.lists(st.text(alphabet="abc ", min_size=1, max_size=30), min_size=2, max_size=8).filter(
        lambda t: len(t) % 2 == 0
    ),
    limit=st.integers(4, 200),
    policy=st.sampled_from(["drop", "keep_recent", "truncate"]),
)
def test_fit_never_cuts_the_final_reply_and_always_fits(turns, limit, policy):
    msgs = [m("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    out, what = fit(msgs, policy, limit, chars)
    if out is None:
        assert what == "dropped"
        return
    assert chars(out) <= limit
    assert out[-1] == msgs[-1]  # the final assistant turn, whole
    assert what == ("fits" if out == msgs else "shortened")
    roles = [x["role"] for x in out]
    assert roles[0] == "user" and all(a != b for a, b in zip(roles, roles[1:]))


# --------------------------------------------------------------------------- mixtures


def rows(tag, n):
    return [{"id": f"{tag}{i}"} for i in range(n)]


def test_mixture_counts_subsample_and_repeats():
    a, b, c = rows("a", 10), rows("b", 4), rows("c", 5)
    out, counts = mixture([a, b, c], [0.5, 2.5, 1.0], seed=1)
    assert counts == [5, 10, 5] and len(out) == 20
    tags = Counter(r["id"][0] for r in out)
    assert tags == {"a": 5, "b": 10, "c": 5}
    per_b = Counter(r["id"] for r in out if r["id"][0] == "b")
    assert sorted(per_b.values()) == [2, 2, 3, 3]  # two whole copies + a remainder of 2 distinct rows
    assert len({r["id"] for r in out if r["id"][0] == "a"}) == 5  # a subsample: no repeats


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=4),
    weights=st.lists(st.floats(0.05, 3.0), min_size=4, max_size=4),
    seed=st.integers(0, 2**32),
)
def test_mixture_is_seeded_and_takes_round_w_times_len(sizes, weights, seed):
    inputs = [rows(chr(97 + i), n) for i, n in enumerate(sizes)]
    weights = weights[: len(sizes)]
    out, counts = mixture(inputs, weights, seed)
    assert counts == [round(w * n) if n else 0 for w, n in zip(weights, sizes)]
    assert len(out) == sum(counts)
    assert mixture(inputs, weights, seed) == (out, counts)
    for rows_in, taken in zip(inputs, counts):
        per_row = Counter(r["id"] for r in out if r in rows_in)
        if per_row:  # whole copies first: no row is taken more than once above another
            assert max(per_row.values()) - min(per_row.values()) <= 1 and sum(per_row.values()) == taken


def test_mixture_shuffles_with_the_seed():
    a, b = rows("a", 20), rows("b", 20)
    one, _ = mixture([a, b], [1.0, 1.0], seed=1)
    assert one != a + b and one != mixture([a, b], [1.0, 1.0], seed=2)[0]


def test_mixture_needs_one_weight_per_input():
    with pytest.raises(ValueError, match="2 inputs but 1 weights"):
        mixture([[], []], [1.0], 0)


# --------------------------------------------------------------------------- LoRA targets


def ctx_for(tmp_path: Path):
    from engine.load.loader import load_recipe

    (tmp_path / "r.toml").write_text('[recipe]\nname = "x"\n')
    return SimpleNamespace(stage="train", recipe=load_recipe(tmp_path / "r.toml"), log=logging.getLogger("t"))


def test_lora_targets_must_exist_in_the_model(tmp_path):
    from engine.models.weights import load_model

    model, _ = load_model("builtin:tiny-chat", cache_root=tmp_path / "cache")
    ctx = ctx_for(tmp_path)
    check_lora_targets(model, Lora(target_modules=["q_proj", "self_attn.v_proj", "embed_tokens"]), ctx)
    check_lora_targets(model, Lora(), ctx)  # all-linear
    check_lora_targets(model, None, ctx)
    with pytest.raises(RecipeError) as exc:
        check_lora_targets(model, Lora(target_modules=["q_proj", "c_attn", "mlp"]), ctx)
    msg = str(exc.value)
    assert "stage 'train'" in msg
    assert "LoRA target modules 'c_attn', 'mlp' not found in the model" in msg
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in msg


# --------------------------------------------------------------------------- checkpoints


def test_last_checkpoint_skips_and_removes_incomplete_ones(tmp_path, caplog):
    said: list[str] = []
    ctx = SimpleNamespace(log=logging.getLogger("ckpt"), is_main=True, say=said.append)
    assert last_checkpoint(tmp_path, ctx) is None
    for step, complete in ((5, True), (10, True), (15, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-notes").mkdir()
    with caplog.at_level(logging.INFO, logger="ckpt"):
        assert last_checkpoint(tmp_path, ctx) == str(tmp_path / "checkpoint-10")
    assert not (tmp_path / "checkpoint-15").exists() and (tmp_path / "checkpoint-5").is_dir()
    assert "checkpoint-15 is incomplete" in caplog.text and said == [
        "resuming from checkpoint checkpoint-10 (the steps before it are kept)"
    ]


# --------------------------------------------------------------------------- metrics and plots


def test_step_metrics_and_plots(tmp_path):
    history = [
        {
            "loss": 1.0,
            "learning_rate": 0.1,
            "rewards/margins": 0.0,
            "rewards/chosen": 0.0,
            "rewards/rejected": 0.0,
            "rewards/accuracies": 0.0,
            "step": 1,
        },
        {
            "loss": 0.5,
            "learning_rate": 0.05,
            "rewards/margins": 0.4,
            "rewards/chosen": 0.1,
            "rewards/rejected": -0.3,
            "rewards/accuracies": 1.0,
            "step": 2,
        },
        {"train_runtime": 3.0, "step": 2},
    ]
    steps = step_metrics(history, ("rewards/margins", "kl"), {1: 100.0})
    assert steps == [
        {"step": 1, "loss": 1.0, "lr": 0.1, "rewards/margins": 0.0, "kl": None, "tokens_per_s": 100.0},
        {"step": 2, "loss": 0.5, "lr": 0.05, "rewards/margins": 0.4, "kl": None, "tokens_per_s": None},
    ]
    plot_loss(tmp_path / "loss.png", steps, "t")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    full = step_metrics(history, ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"))
    assert plot_rewards(tmp_path, full, "t") == ["rewards.png", "accuracies.png"]
    assert plot_rewards(tmp_path / "none", step_metrics(history), "t") == []


def test_training_modules_and_validation_stay_light(tmp_path):
    """`recipe validate` of training stages imports no ML library (they load inside `run`)."""
    import subprocess
    import sys
    import textwrap

    recipe = tmp_path / "r.toml"
    recipe.write_text(
        textwrap.dedent("""
        [recipe]
        name = "light"
        [models.policy]
        path = "builtin:tiny-chat"
        [datasets.pairs]
        path = "pairs.jsonl"
        type = "preferences"
        [stages.align]
        kind = "kto"
        input = "pairs"
        model = "policy"
        """)
    )
    (tmp_path / "pairs.jsonl").write_text('{"prompt": "q?", "chosen": "yes", "rejected": "no"}\n')
    code = (
        "import sys, engine.lib.training, stages.sft, stages.dpo\n"
        "from engine.load.loader import load_recipe\n"
        f"load_recipe({str(recipe)!r})\n"
        "heavy = ('torch', 'transformers', 'trl', 'peft', 'datasets', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2]
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------- devices and precision


def test_each_accelerate_rank_trains_on_its_listed_device(monkeypatch):
    from engine.models.pool import rank_device

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert rank_device("cuda:0, cuda:1") == "cuda:0" and rank_device("auto") == "auto"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device("cuda:0,cuda:1") == "cuda:1"  # not every rank on cuda:0
    assert rank_device("cuda:2") == "cuda:2"


def test_in_process_training_uses_one_device_whatever_the_gpu_count(monkeypatch):
    import types

    from engine.lib.trainer import settle

    class Args:
        per_device_train_batch_size, device = 4, "cuda:0"

        def __init__(self, n: int) -> None:
            self._n_gpu = n

        @property
        def n_gpu(self) -> int:
            return self._n_gpu

        @property
        def train_batch_size(self) -> int:  # as transformers computes it: DataParallel multiplies it
            return self.per_device_train_batch_size * max(1, self._n_gpu)

    def trainer(n: int):
        args = Args(n)
        return types.SimpleNamespace(args=args, _train_batch_size=args.train_batch_size, remove_callback=lambda c: None)

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    t = trainer(2)
    settle(t)
    assert (t.args.n_gpu, t._train_batch_size) == (1, 4)  # no DataParallel, the global batch as configured
    monkeypatch.setenv("WORLD_SIZE", "2")  # under accelerate each process already has one device
    t = trainer(1)
    settle(t)
    assert (t.args.n_gpu, t._train_batch_size) == (1, 4)


def test_a_full_fine_tune_loads_float32_weights_and_lora_keeps_the_dtype(monkeypatch, tmp_path):
    import logging

    from engine.models import pool
    from engine.spec.artifact import Artifact
    from engine.spec.recipe import ModelSpec

    asked = []

    def fake(path, *, dtype="auto", **kw):
        asked.append(dtype)
        raise RuntimeError("stop here")

    monkeypatch.setattr("engine.models.weights.load_model", fake)
    log = logging.getLogger("t")
    for spec_dtype, full in (("auto", True), ("auto", False), ("bfloat16", True)):
        art = Artifact("m", "model", "models", spec=ModelSpec(path="builtin:tiny-chat", dtype=spec_dtype))
        with pytest.raises(RuntimeError, match="stop here"):
            pool.load_model(art, None, tmp_path, log, merge_adapter=True, full_precision=full)  # type: ignore[arg-type]
    assert asked == ["float32", "auto", "bfloat16"]  # an explicit dtype is the user's choice

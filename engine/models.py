"""Model loading, and the builtin models that are built locally instead of downloaded.

`builtin:tiny-chat` exists so that every stage (generate, SFT, DPO, judge) can be tested
end to end on a CPU with no network: a ~0.1M-parameter Llama with a byte-level tokenizer
and a chat template whose assistant turns are marked for `assistant_only_loss`. Its
weights are random, so its text is noise; what matters is that it has the shape, the
special tokens and the template of a real chat model.

A builtin's identity in a fingerprint is its name and builder version
(`fingerprint.BUILTIN_MODELS`), not a content hash, so the builder must produce the same
bytes on every build: weights come from a private seeded generator in a fixed parameter
order (not from transformers' own init, which changes between releases), and every file is
written in a fixed order. Bump BUILDER_VERSION (and BUILTIN_MODELS) when the bytes change.

torch, transformers and tokenizers are imported inside functions only: `validate`, `plan`
and `--help` import the engine and must stay fast.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

from .errors import RecipeError

BUILDER_VERSION = 2  # 2: 4096 positions (byte-level prompts run long)
SEED = 20240607

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
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
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
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        padding_side="left", model_max_length=1024, clean_up_tokenization_spaces=False,
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
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False, initializer_range=0.02,
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD],
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
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], do_sample=False,
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


BUILDERS = {"tiny-chat": build_tiny_chat}


def builtin_dir(name: str, cache_root: Path) -> Path:
    """The directory of builtin `name`, built on first use.

    Built in a temporary sibling and renamed into place, so the final directory is complete
    or absent; a lock makes concurrent runs build once and share the result."""
    if name not in BUILDERS:
        known = ", ".join(f"builtin:{n}" for n in sorted(BUILDERS))
        raise RecipeError.single(f"unknown builtin model 'builtin:{name}'; known: {known}.")
    root = Path(cache_root) / "builtin"
    final = root / f"{name}-v{BUILDER_VERSION}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{final.name}.lock")):
        if final.is_dir():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            BUILDERS[name](tmp)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _resolve_dtype(dtype: Any, device: str) -> Any:
    import torch

    if not isinstance(dtype, str):
        return dtype
    if dtype == "auto":
        # bf16 halves memory and is fast on GPUs that support it; CPU stays exact (fp32).
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")


def _offline_error(path: str, revision: str | None, cause: BaseException) -> RecipeError:
    first = _first_line(cause)
    rev = f" (revision {revision})" if revision else ""
    return RecipeError.single(
        f"cannot load model '{path}'{rev}: it is not a local directory, and it could not be "
        f"downloaded from the Hugging Face Hub (offline, unreachable, or no such repository: "
        f"{first}). Point `path` at a local copy of the model (a directory with config.json, "
        f"the weights and the tokenizer files), or use builtin:tiny-chat."
    )


def load_model(path_or_dir: str | os.PathLike, *, dtype: Any = "auto", device: str = "auto",
               revision: str | None = None, trust_remote_code: bool = False,
               cache_root: str | os.PathLike) -> tuple[Any, Any]:
    """(model, tokenizer) for `builtin:NAME`, a local directory, or a hub id.

    The model is in eval mode on `device`; the tokenizer pads on the left (decoder-only
    generation continues from the right edge) and has a pad token (eos when it had none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(path_or_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = _resolve_dtype(dtype, device)
    hub = False
    if path.startswith("builtin:"):
        source = str(builtin_dir(path.split(":", 1)[1], Path(cache_root)))
    elif Path(path).expanduser().is_dir():
        source = str(Path(path).expanduser())
        if not (Path(source) / "config.json").is_file():  # else transformers fails obscurely
            raise RecipeError.single(f"cannot load the model in '{source}': it has no config.json.")
    elif Path(path).is_absolute() or path.startswith((".", "~")) or Path(path).exists():
        raise RecipeError.single(f"model path '{path}' is not a directory (expected config.json and weights).")
    else:
        source, hub = path, True
    kw = {"revision": revision} if hub and revision else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kw
        )
    except OSError as exc:  # transformers reports missing files and network failures as OSError
        if hub:
            raise _offline_error(path, revision, exc) from None
        raise RecipeError.single(f"cannot load the model in '{source}': {_first_line(exc)}.") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    return model, tokenizer


def release(model: Any) -> None:
    """Drop this reference to `model` and return its memory (GPU memory included) now,
    rather than whenever the collector runs: the next stage may need the whole GPU. The
    caller must drop its own references too."""
    del model
    gc.collect()
    torch = sys.modules.get("torch")  # never import torch just to release
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()

"""Loading weights: a hub id, a local directory or a builtin name -> (model, tokenizer) on a
device and dtype, with offline errors that say what to do; `release` frees a model's memory.
torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

from engine.core.errors import RecipeError, first_line
from engine.models.builtins import BUILDERS, SMALL_MODEL, _builtin_folder, builtin_dir, builtin_root


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


def _offline_error(path: str, revision: str | None, cause: BaseException) -> RecipeError:
    first = first_line(cause).rstrip(".")
    rev = f" (revision {revision})" if revision else ""
    return RecipeError.single(
        f"cannot load model '{path}'{rev}: it is not a local directory, and it could not be "
        f"downloaded from the Hugging Face Hub (offline, unreachable, or no such repository: "
        f"{first}). Point `path` at a local copy of the model (a directory with config.json, "
        f"the weights and the tokenizer files), or use builtin:tiny-chat."
    )


def load_model(
    path_or_dir: str | os.PathLike,
    *,
    dtype: Any = "auto",
    device: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_root: str | os.PathLike,
) -> tuple[Any, Any]:
    """(model, tokenizer) for `builtin:NAME`, a local directory, or a hub id.

    The model is in eval mode on `device`, loaded there directly in `dtype`; the tokenizer pads on
    the left (decoder-only generation continues from the right edge) and has a pad token (eos when
    it had none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(path_or_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and not is_small(path, cache_root) else "cpu"
    if device == "cuda":  # this process's GPU (its LOCAL_RANK under accelerate), as the trainer expects
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device()))}"
    quantized = dtype == "nf4"  # QLoRA: 4-bit NF4 weights, bf16 compute (bitsandbytes, CUDA)
    torch_dtype = torch.bfloat16 if quantized else _resolve_dtype(dtype, device)
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
    # Straight onto an accelerator in the target dtype: no float32 copy in host memory first.
    placement = {"device_map": {"": device}} if device != "cpu" else {}
    if quantized:
        from transformers import BitsAndBytesConfig

        placement["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, **placement, **kw
        )
    except OSError as exc:  # transformers reports missing files and network failures as OSError
        if hub:
            raise _offline_error(path, revision, exc) from None
        raise RecipeError.single(f"cannot load the model in '{source}': {first_line(exc)}.") from None
    prepare_tokenizer(tokenizer, model)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    (model if quantized else model.to(device)).eval()  # a 4-bit model is placed by device_map
    return model, tokenizer


def is_small(path: str, cache_root: Any) -> bool:
    """Whether a local model (builtin or directory) has under SMALL_MODEL parameters, estimated
    from its config.json. Such a model (builtin:tiny-chat has 0.1M) runs faster on the CPU than on
    a GPU, where every decode step would be hundreds of kernel launches doing almost no work.
    Unknown (hub ids, adapters): False."""

    if path.startswith("builtin:"):
        if path == "builtin:tiny-chat":
            return True
        if path.split(":", 1)[1] not in BUILDERS:
            return False
        folder = builtin_root(Path(cache_root)) / _builtin_folder(path.split(":", 1)[1])
    else:
        folder = Path(path).expanduser()
    try:
        cfg = json.loads((folder / "config.json").read_text())
        hidden, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    inter = cfg.get("intermediate_size") or 4 * hidden
    params = layers * (4 * hidden * hidden + 3 * hidden * inter) + vocab * hidden * (
        1 if cfg.get("tie_word_embeddings") else 2
    )
    return params < SMALL_MODEL


def prepare_tokenizer(tokenizer: Any, model: Any) -> None:
    """Left padding (decoder-only generation continues from the right edge); a pad token that is not
    the end-of-turn token when another special token can serve (else eos: the sft mask check then
    proves the end-of-turn token is still supervised); model_max_length set to the model's context
    when the tokenizer's is a placeholder or stale (no "sequence length is longer than the maximum"
    noise for lengths the model takes)."""
    from engine.models.chatmask import stop_token_ids

    tokenizer.padding_side = "left"
    stops = set(stop_token_ids(tokenizer, getattr(model.generation_config, "eos_token_id", None)))
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in stops:
        spare = (
            tokenizer.unk_token if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in stops else None
        )
        if spare is not None:
            tokenizer.pad_token = spare
        elif tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and context > 0 and (tokenizer.model_max_length or 0) != context:
        tokenizer.model_max_length = context


def release(model: Any) -> None:
    """Drop this reference to `model` and return its memory (GPU memory included) now,
    rather than whenever the collector runs: the next stage may need the whole GPU. The
    caller must drop its own references too."""
    del model
    gc.collect()
    torch = sys.modules.get("torch")  # never import torch just to release
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()

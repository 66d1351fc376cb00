"""What `recipe validate` can know about a model without loading it: its context length and its
chat template, read from files (a local folder, a hub snapshot already in the local cache, or a
builtin's known shape). Nothing here imports an ML library.

- `base_model(recipe, name)`: the [models] table behind a reference, following stages that
  output a model (an sft stage's model is its input model's weights, trained).
- `context_length(spec)`: positions the model has, or None when not knowable offline.
- `chat_template(spec)`: (template, special tokens), or None.
- `problems(recipe)`: `max_new_tokens` at or above a stage's model context, for every stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from engine.core.errors import Problem
from engine.spec.backends import BACKENDS
from engine.spec.config import ref_fields

if TYPE_CHECKING:
    from engine.spec.recipe import ModelSpec, Recipe

BUILTIN_CONTEXT = {"tiny-chat": 4096, "smollm2-135m": 8192}
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def base_model(recipe: Recipe, name: str) -> tuple[str, ModelSpec] | None:
    """(name, spec) of the [models] table a model reference comes from, or None."""
    seen: set[str] = set()
    while name in recipe.stages and name not in seen:
        seen.add(name)
        name = getattr(recipe.stages[name].config, "model", None)  # type: ignore[assignment]
        if not isinstance(name, str):
            return None
    spec = recipe.models.get(name)
    return (name, spec) if spec is not None else None


def model_folder(spec: ModelSpec) -> Path | None:
    """The folder holding the model's files, when it is on this machine without a download: a local
    directory, or a hub id whose revision is in the local hub cache."""
    from engine.core.hashing import hub_cache_commit

    if not BACKENDS[spec.backend].weights_here or spec.path.startswith("builtin:"):
        return None
    path = Path(spec.path).expanduser()
    if path.is_absolute():
        return path if path.is_dir() else None
    commit = hub_cache_commit(spec.path, spec.revision)
    if not commit:
        return None
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub"
    )
    snap = Path(hub) / f"models--{spec.path.replace('/', '--')}" / "snapshots" / commit
    return snap if snap.is_dir() else None


def context_length(spec: ModelSpec) -> int | None:
    if not BACKENDS[spec.backend].weights_here:
        return None
    if spec.path.startswith("builtin:"):
        return BUILTIN_CONTEXT.get(spec.path.split(":", 1)[1])
    folder = model_folder(spec)
    if folder is None:
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for cfg in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(cfg.get(key), int) and cfg[key] > 0:
                return cfg[key]
    return None


def chat_template(spec: ModelSpec) -> tuple[str, dict[str, str]] | None:
    """(template, special tokens) the model will use, when knowable offline: the [models] table's
    own chat_template, else the folder's. builtin:smollm2-135m is built on first use; its ChatML
    template is covered by the tests."""
    from engine.core.hashing import is_file
    from engine.models.chatmask import folder_template

    if not BACKENDS[spec.backend].weights_here:
        return None
    special: dict[str, str] = {}
    template = None
    if spec.path == "builtin:tiny-chat":
        from engine.models.builtins import BOS, CHAT_TEMPLATE, EOS

        template, special = CHAT_TEMPLATE, {"bos_token": BOS, "eos_token": EOS}
    elif (folder := model_folder(spec)) is not None:
        template, special = folder_template(folder)
    if spec.chat_template:
        own = spec.chat_template
        template = Path(own).read_text(encoding="utf-8") if is_file(own) else own
    return (template, special) if template else None


def problems(recipe: Recipe) -> list[Problem]:
    """`max_new_tokens` must leave room for a prompt in the context of every model the stage samples from."""
    found = []
    for name, stage in recipe.stages.items():
        config = stage.config
        limits = {
            f: getattr(config, f)
            for f in ("max_new_tokens", "judge_max_new_tokens", "max_completion_length")
            if isinstance(getattr(config, f, None), int)
        }
        if not limits:
            continue
        for fname in ref_fields(type(config)):
            value = getattr(config, fname)
            for ref in value if isinstance(value, list) else [value]:
                base = base_model(recipe, ref) if isinstance(ref, str) else None
                if base is None:
                    continue
                ctx = context_length(base[1])
                key = (
                    "judge_max_new_tokens"
                    if fname in ("judge", "judge_model") and "judge_max_new_tokens" in limits
                    else "max_completion_length"
                    if "max_completion_length" in limits
                    else "max_new_tokens"
                )
                if ctx is None or key not in limits or limits[key] < ctx:
                    continue
                found.append(
                    Problem(
                        f"stage '{name}': {key} = {limits[key]} leaves no room for a prompt in the {ctx}-token context of "
                        f"model '{ref}' ({base[1].path}).",
                        hint=f"Use a {key} well below {ctx}.",
                        **recipe.where(f"stages.{name}.{key}"),
                    )
                )
    return found

"""Models for stages: a model reference (a [models] spec, or a stage-made model) to a loaded
(model, tokenizer) or a generation backend. Context delegates here; nothing else in the executor
knows about weights, adapters or backends.

- `describe_model(art)`: how to load a model again later (written as `model/base.json` next to an
  unmerged adapter): its [models] spec, or the producing stage's fingerprint (never a path).
- `load_model(art, recipe, cache_root, log, merge_adapter=)`: a [models] spec (its adapter applied
  or merged, its chat_template set) or a stage's `model/` (full weights, or a PEFT adapter loaded
  on the base its base.json records, found in the store by fingerprint).
- `backend(art, recipe, cache_root, log, partial_dir, batch_size)`: an `hf` or `openai` backend.

torch, transformers and peft are imported inside functions only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RecipeError

if TYPE_CHECKING:
    from .artifact import Artifact
    from .recipe import Recipe


def describe_model(model: "Artifact") -> dict:
    """How to load `model` again later: its [models] spec, or the stage-made model by fingerprint
    (the entry's folder name), so that a runs dir can move."""
    if model.spec is not None:
        return {"name": model.name, "spec": model.spec.model_dump(mode="json")}
    return {"name": model.name, "stage": Path(model.path).name}


def load_model(model: "Artifact", recipe: "Recipe", cache_root: Path | None, log: logging.Logger, *,
               merge_adapter: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) for a model reference; a model without a chat template is a RecipeError."""
    if model.spec is None:  # a model made by an upstream stage
        m, tok = _load_dir(Path(model.path) / "model", cache_root, log, merge_adapter)
    else:
        m, tok = _load_spec(model.name, model.spec, recipe, cache_root, log, merge_adapter)
    if tok.chat_template is None:
        raise RecipeError.single(f"model '{model.name}' has no chat template.",
                                 hint="Set chat_template in its [models] table (inline Jinja or a file).",
                                 **recipe.where(f"models.{model.name}"))
    return m, tok


def _load_dir(path: Path, cache_root: Path | None, log: logging.Logger, merge_adapter: bool):
    from .models import load_model as load_weights
    from .models import prepare_tokenizer

    if not (path / "adapter_config.json").is_file():
        return load_weights(str(path), cache_root=cache_root)
    base_file = path / "base.json"
    if not base_file.is_file():
        raise RuntimeError(f"{path} is a LoRA adapter without base.json (its recorded base); rebuild the stage "
                           "that made it (recipe run --force STAGE).")
    base = json.loads(base_file.read_text())
    if "spec" in base:
        from .recipe import ModelSpec

        m, _ = _load_spec(base["name"], ModelSpec.model_validate(base["spec"], strict=False), None, cache_root, log,
                          True)
    elif "stage" in base:
        m, _ = _load_dir(Path(cache_root) / base["stage"] / "model", cache_root, log, True)
    else:  # entries written before base.json named the stage's fingerprint
        m, _ = _load_dir(Path(base["dir"]), cache_root, log, True)
    from peft import PeftModel
    from transformers import AutoTokenizer

    m = PeftModel.from_pretrained(m, str(path)).eval()
    if merge_adapter:
        m = m.merge_and_unload()
    log.info("%s the adapter %s on its base '%s'", "merged" if merge_adapter else "applied", path, base["name"])
    tok = AutoTokenizer.from_pretrained(str(path))
    prepare_tokenizer(tok, m)
    return m, tok


def _load_spec(name: str, spec, recipe: "Recipe | None", cache_root: Path | None, log: logging.Logger,
               merge_adapter: bool):
    from .fingerprint import is_file
    from .models import load_model as load_weights

    m, tok = load_weights(spec.path, dtype=spec.dtype, device=spec.device, revision=spec.revision,
                          trust_remote_code=spec.trust_remote_code, cache_root=cache_root)
    if spec.adapter:
        if not Path(spec.adapter).is_dir():
            where = recipe.where(f"models.{name}.adapter") if recipe is not None else {}
            raise RecipeError.single(
                f"adapter '{spec.adapter}' of model '{name}' is not a directory.",
                hint="Point it at a saved PEFT adapter, or use the training stage's name as the model.", **where)
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, spec.adapter).eval()
        if merge_adapter:
            m = m.merge_and_unload()
        log.info("%s adapter %s", "merged" if merge_adapter else "applied", spec.adapter)
    if spec.chat_template:
        template = spec.chat_template
        tok.chat_template = Path(template).read_text() if is_file(template) else template
    return m, tok


def backend(model: "Artifact", recipe: "Recipe", cache_root: Path | None, log: logging.Logger, partial_dir: Path,
            batch_size: int = 64):
    """A generation backend for a model reference; call `.close()` when done."""
    spec = model.spec
    kind = spec.backend if spec else "hf"
    log.info("loading model '%s' (%s, backend %s)", model.name, spec.path if spec else model.path, kind)
    if kind == "openai":
        from .backends.openai import OpenAIBackend

        if not spec.base_url:
            raise RecipeError.single(f"model '{model.name}' uses the openai backend but has no base_url.",
                                     **recipe.where(f"models.{model.name}.base_url"))
        return OpenAIBackend(spec.base_url, spec.model_name or spec.path, api_key_env=spec.api_key_env,
                             max_concurrency=spec.max_concurrency, timeout_s=spec.timeout_s,
                             cache_dir=Path(partial_dir) / "requests")
    from .backends.hf import HFBackend

    m, tok = load_model(model, recipe, cache_root, log)
    return HFBackend(m, tok, batch_size=batch_size)

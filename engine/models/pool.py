"""Models for stages: a model reference (a [models] spec, or a stage-made model) to a loaded
(model, tokenizer) or a generation backend. Context delegates here; nothing else in the executor
knows about weights, adapters or backends.

- `describe_model(art)`: how to load a model again later (written as `model/base.json` next to an
  unmerged adapter): its [models] spec, or the producing stage's fingerprint (never a path).
- `load_model(art, recipe, cache_root, log, merge_adapter=)`: a [models] spec (its adapter applied
  or merged, its chat_template set) or a stage's `model/` (full weights, or a PEFT adapter loaded
  on the base its base.json records, found in the store by fingerprint).
- `backend(art, recipe, cache_root, log, partial_dir, batch_size, pool=, resources=)`: an `hf`,
  `openai` or `vllm` backend. With several devices (`device = "auto"` and more than one visible
  GPU, or a list such as "cuda:0,cuda:1") the `hf` backend is one replica per device, each prompt
  answered by one of them (engine.models.backends.replicas): the same completions as one device.
- `ModelPool`: loaded generation models kept between the stages of a run, so a model that the next
  stage also generates with is not loaded again (the flagship's `warmup` serves `chats` and
  `revised`; its `sft` serves `best_of_n` and `eval`). The executor drops a model once no stage
  still to run uses it, and before a load when the device is short of memory. Training stages
  load their own copy (they change its weights); generation never changes a model.

torch, transformers and peft are imported inside functions only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.errors import RecipeError
from engine.models.adapters import adapter_base

if TYPE_CHECKING:
    from engine.spec.artifact import Artifact
    from engine.spec.recipe import Recipe


def describe_model(model: Artifact) -> dict:
    """How to load `model` again later: its [models] spec, or the stage-made model by fingerprint
    (the entry's folder name), so that a runs dir can move."""
    if model.spec is not None:
        return {"name": model.name, "spec": model.spec.model_dump(mode="json")}
    return {"name": model.name, "stage": Path(model.path).name}  # type: ignore[arg-type]


def load_model(
    model: Artifact,
    recipe: Recipe,
    cache_root: Path | None,
    log: logging.Logger,
    *,
    merge_adapter: bool = False,
    device: str | None = None,
    full_precision: bool = False,
    quantize: bool = False,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a model reference, loaded straight onto `device` (default: the spec's
    device for this process, `rank_device`) in its dtype; a model without a chat template is a
    RecipeError. `full_precision`: float32 weights where the dtype is "auto" (a full fine-tune keeps
    a float32 master copy and trains under bf16 autocast; pure bf16 AdamW updates vanish).
    `quantize`: 4-bit NF4 weights for QLoRA (bitsandbytes, CUDA)."""
    if device is None:
        device = rank_device(model.spec.device) if model.spec is not None else "auto"
    dtype = "float32" if full_precision and (model.spec is None or model.spec.dtype == "auto") else None
    dtype = "nf4" if quantize else dtype
    if model.spec is None:  # a model made by an upstream stage
        m, tok = _load_dir(Path(model.path) / "model", cache_root, log, merge_adapter, device, dtype)  # type: ignore[arg-type]
    else:
        m, tok = _load_spec(model.name, model.spec, recipe, cache_root, log, merge_adapter, device, dtype)
    first = next(m.parameters(), None)
    if first is not None:
        log.info("model '%s' is on %s in %s", model.name, first.device, str(first.dtype).replace("torch.", ""))
    if tok.chat_template is None:
        raise RecipeError.single(
            f"model '{model.name}' has no chat template.",
            hint="Set chat_template in its [models] table (inline Jinja or a file).",
            **recipe.where(f"models.{model.name}"),
        )
    return m, tok


def rank_device(spec_device: str) -> str:
    """The device of this process from a spec's `device` ("cuda:0,cuda:1"): under `accelerate
    launch` rank LOCAL_RANK takes the LOCAL_RANK-th listed device (every rank on the first would
    crash the Trainer moving inputs); otherwise the first."""
    devices = [d.strip() for d in spec_device.split(",") if d.strip()] or ["auto"]
    if len(devices) > 1 and "LOCAL_RANK" in os.environ:
        return devices[int(os.environ["LOCAL_RANK"]) % len(devices)]
    return devices[0]


def load_model_dir(path: Path, cache_root: Path | None, log: logging.Logger) -> tuple[Any, Any]:
    """(model, tokenizer) of a stage's `model/` folder on the CPU in float32, an adapter merged into
    its base (what `recipe export --merge` saves)."""
    return _load_dir(path, cache_root, log, True, "cpu", "float32")


def _load_dir(
    path: Path,
    cache_root: Path | None,
    log: logging.Logger,
    merge_adapter: bool,
    device: str = "auto",
    dtype: str | None = None,
):
    from engine.models.weights import load_model as load_weights
    from engine.models.weights import prepare_tokenizer

    if not (path / "adapter_config.json").is_file():
        return load_weights(str(path), cache_root=cache_root, device=device, dtype=dtype or "auto")  # type: ignore[arg-type]
    base = adapter_base(path, cache_root)
    if base.spec is not None:
        m, _ = _load_spec(base.name, base.spec, None, cache_root, log, True, device, dtype)
    else:
        m, _ = _load_dir(base.folder, cache_root, log, True, device, dtype)  # type: ignore[arg-type]
    from peft import PeftModel
    from transformers import AutoTokenizer

    m = PeftModel.from_pretrained(m, str(path)).eval()
    if merge_adapter:
        m = m.merge_and_unload()
    log.info("%s the adapter %s on its base '%s'", "merged" if merge_adapter else "applied", path, base.name)
    tok = AutoTokenizer.from_pretrained(str(path))
    prepare_tokenizer(tok, m)
    return m, tok


def _load_spec(
    name: str,
    spec,
    recipe: Recipe | None,
    cache_root: Path | None,
    log: logging.Logger,
    merge_adapter: bool,
    device: str = "auto",
    dtype: str | None = None,
):
    from engine.core.hashing import is_file
    from engine.models.weights import load_model as load_weights

    m, tok = load_weights(
        spec.path,
        dtype=dtype or spec.dtype,
        device=device,
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        cache_root=cache_root,  # type: ignore[arg-type]
    )
    if spec.adapter:
        if not Path(spec.adapter).is_dir():
            where = recipe.where(f"models.{name}.adapter") if recipe is not None else {}
            raise RecipeError.single(
                f"adapter '{spec.adapter}' of model '{name}' is not a directory.",
                hint="Point it at a saved PEFT adapter, or use the training stage's name as the model.",
                **where,
            )
        from peft import PeftModel

        m = PeftModel.from_pretrained(m, spec.adapter).eval()
        if merge_adapter:
            m = m.merge_and_unload()
        log.info("%s adapter %s", "merged" if merge_adapter else "applied", spec.adapter)
    if spec.chat_template:
        template = spec.chat_template
        tok.chat_template = Path(template).read_text() if is_file(template) else template
    return m, tok


def devices(device: str, small: bool = False) -> list[str]:
    """The devices a generation backend replicates over: "auto" is every visible GPU (else the
    CPU; the CPU too for a `small` model, see engine.models.weights.is_small); "cuda:0,cuda:1" (or
    "cpu,cpu") is a list. Training uses the first one."""
    parts = [d.strip() for d in device.split(",") if d.strip()]
    if parts and parts != ["auto"]:
        return parts
    import torch

    if torch.cuda.is_available() and not small:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def backend(
    model: Artifact,
    recipe: Recipe,
    cache_root: Path | None,
    log: logging.Logger,
    partial_dir: Path,
    batch_size: int = 64,
    *,
    pool: ModelPool | None = None,
    resources: Any = None,
):
    """A generation backend for a model reference; call `.close()` when done."""
    from engine.models.backends import BuildRequest
    from engine.spec.backends import backend_module

    spec = model.spec
    kind = spec.backend if spec else "hf"
    log.info("loading model '%s' (%s, backend %s)", model.name, spec.path if spec else model.path, kind)

    def load(device: str):
        def weights():
            return load_model(model, recipe, cache_root, log, device=device)

        if pool is None:
            return (*weights(), None)
        return pool.borrow((model.source, model.name, device), weights, log)

    def replica_devices() -> list[str]:
        from engine.models.weights import is_small

        small = is_small(spec.path if spec else str(Path(model.path) / "model"), cache_root)  # type: ignore[arg-type]
        return devices(spec.device if spec else "auto", small)

    def release_idle() -> None:
        if pool is not None:
            pool.release_idle(log)

    return backend_module(kind).build(
        BuildRequest(
            model,
            recipe,
            cache_root,
            log,
            Path(partial_dir),
            batch_size,
            resources,
            replica_devices,
            load,
            release_idle,
        )
    )


class LazyBackend:
    """A backend that loads its model on first use: a stage whose shards are all committed (by Ray
    workers) assembles its output without loading anything."""

    def __init__(self, load) -> None:
        self._load, self._backend = load, None

    def __getattr__(self, name: str):
        if self._backend is None:
            self._backend = self._load()
        return getattr(self._backend, name)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


class _Pooled:
    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer, self.users = model, tokenizer, 0


class ModelPool:
    """Loaded generation models kept between stages, keyed by (source, name, device): a [models]
    name or a stage name is one set of weights for the whole run."""

    HEADROOM = 1.5  # a load goes ahead when free memory is this many times a resident model's size
    TRAINING = 6.0  # ... and a training stage when it is this many times

    def __init__(self) -> None:
        self.entries: dict[tuple, _Pooled] = {}

    def borrow(self, key: tuple, load, log: logging.Logger):
        """(model, tokenizer, give_back) for `key`, loading it when absent."""
        entry = self.entries.get(key)
        if entry is None:
            self.make_room(key[-1], self.HEADROOM, log)
            entry = self.entries[key] = _Pooled(*load())
        else:
            log.info("model '%s' on %s is already loaded (kept from an earlier stage)", key[1], key[-1])
        entry.users += 1

        def give_back() -> None:
            entry.users -= 1

        return entry.model, entry.tokenizer, give_back

    def keep(self, wanted: set[tuple[str, str]]) -> None:
        """Release every idle model whose (source, name) is not in `wanted`."""
        for key in [k for k, e in self.entries.items() if e.users == 0 and k[:2] not in wanted]:
            self._drop(key, None)

    def make_room(self, device: str, factor: float, log: logging.Logger | None = None) -> None:
        """Release idle models on `device` when its free memory is under `factor` times the largest
        model resident there (the models of one recipe are usually one size)."""
        resident = [_nbytes(e.model) for k, e in self.entries.items() if k[-1] == device]
        if not resident or free_memory(device) >= factor * max(resident):
            return
        for key in [k for k, e in self.entries.items() if k[-1] == device and e.users == 0]:
            self._drop(key, log, "memory is short")

    def before_training(self, log: logging.Logger | None = None) -> None:
        """A training stage needs several times a model's size (weights, gradients, optimizer
        state, activations): release idle models on any device short of that."""
        for device in {k[-1] for k in self.entries}:
            self.make_room(device, self.TRAINING, log)

    def release_idle(self, log: logging.Logger | None = None) -> None:
        """Release every model no backend is using now (an engine that reserves most of a GPU, vLLM,
        is about to start)."""
        for key in [k for k, e in self.entries.items() if e.users == 0]:
            self._drop(key, log, "a vllm engine needs the memory")

    def clear(self) -> None:
        for key in list(self.entries):
            self._drop(key, None)

    def _drop(self, key: tuple, log: logging.Logger | None, why: str = "no later stage uses it") -> None:
        from engine.models.weights import release

        entry = self.entries.pop(key)
        if log is not None:
            log.info("released model '%s' on %s: %s", key[1], key[-1], why)
        model, entry.model = entry.model, None
        release(model)


def _nbytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def free_memory(device: str) -> float:
    """Free bytes on `device`: the GPU's free memory, or the host's available memory (inf when
    unknown)."""
    if device.startswith("cuda"):
        import torch

        return float(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")

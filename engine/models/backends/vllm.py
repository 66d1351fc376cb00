"""The `vllm` backend: vLLM's offline engine (`vllm.LLM`) in process, for GPU throughput.

    [models.policy]
    path = "Qwen/Qwen2.5-7B-Instruct"
    backend = "vllm"                     # pip install recipe-engine[vllm]
    [stages.chats.resources]
    gpus = 2                             # tensor parallelism of the one engine

What it keeps of the Backend contract: one request per (prompt, sample), each seeded with the
engine's own `sample_seed(prompt seed, k)` (vLLM seeds the n samples of one request seed, seed+1,
..., so with consecutive prompt seeds prompt i's sample k would replay prompt i+k's sample 0),
stop strings (cut from the text), the template's end-of-turn tokens as stop tokens, token counts
from the engine. What holds across batches: a seeded request draws from its own generator, so
which other prompts share a batch does not change which tokens it samples given the same logits;
the logits themselves can differ in the last bits with the batch's shape (vLLM promises bitwise
batch invariance only in its batch-invariant mode), so, as with bf16 on any GPU, text is
reproducible for the same batches and not promised byte-identical across batch sizes. vLLM samples
with its own kernels, so its text differs from the hf backend's for the same seed; the backend is
part of a model's identity, so the fingerprints differ too.

Memory: vLLM reserves `gpu_memory_utilization` x the card and refuses to start when that much is
not free. Before it starts, the run's idle pooled models are released and the CUDA cache emptied,
and the share is sized from what is free now (`torch.cuda.mem_get_info`); `max_model_len` comes from
the recipe's lengths (the longest `max_length` and `max_new_tokens` of its stages) rather than the
model's full context, whose KV cache might not fit. A LoRA rank outside vLLM's allowed set is served
at the next allowed `max_lora_rank`.

Models made by upstream stages: full weights load as they are; a LoRA adapter (a stage's
`model/` with base.json, or a [models] `adapter`) is served on its base with a `LoRARequest`
(`enable_lora`, rank from the adapter's config). An adapter on top of another adapter cannot
be served: merge the first (sft/dpo `merge = true`).

vLLM cannot be installed on the CPU machines this project is developed on: this module is
written against vLLM's documented offline API (LLM, LLM.chat, SamplingParams, LoRARequest) and
the backend contract tests run against it wherever `import vllm` works. It is imported only here.
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.errors import RecipeError
from engine.models.adapters import adapter_base
from engine.models.backends import BuildRequest, Completion, SamplingParams
from engine.spec.backends import BACKENDS

if TYPE_CHECKING:
    from engine.spec.artifact import Artifact

INSTALL = BACKENDS["vllm"].install


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise RecipeError.single(
            f"the vllm backend needs the vllm package, which is not importable here ({exc}).",
            hint=f'Install it on a GPU machine with `{INSTALL}`, or use backend = "hf".',
        ) from None
    return vllm


def _from_spec(spec: Any, cache_root: Path | None) -> dict:
    from engine.core.hashing import is_file

    if spec.path.startswith("builtin:"):
        from engine.models.builtins import builtin_dir

        source = str(builtin_dir(spec.path.split(":", 1)[1], Path(cache_root or ".")))
    else:
        source = str(Path(spec.path).expanduser()) if Path(spec.path).expanduser().is_dir() else spec.path
    template = spec.chat_template
    if template and is_file(template):
        template = Path(template).read_text()
    return {
        "model": source,
        "revision": spec.revision,
        "adapter": spec.adapter,
        "dtype": spec.dtype,
        "chat_template": template,
        "trust_remote_code": spec.trust_remote_code,
    }


def _from_dir(path: Path) -> dict:
    adapter = str(path) if (path / "adapter_config.json").is_file() else None
    return {
        "model": str(path),
        "revision": None,
        "adapter": adapter,
        "dtype": "auto",
        "chat_template": None,
        "trust_remote_code": False,
    }


def resolve(model: Artifact, cache_root: Path | None) -> dict:
    """What to start vLLM with for a model reference: {"model": dir or hub id, "revision",
    "adapter": LoRA dir or None, "dtype", "chat_template", "trust_remote_code"}. A stage-made
    adapter is served on the base its base.json records."""
    if model.spec is not None:
        return _from_spec(model.spec, cache_root)
    path = Path(model.path) / "model"  # type: ignore[arg-type]
    if not (path / "adapter_config.json").is_file():
        return _from_dir(path)
    base = adapter_base(path, cache_root)
    out = _from_spec(base.spec, cache_root) if base.spec is not None else _from_dir(base.folder)  # type: ignore[arg-type]
    if out["adapter"]:
        raise RecipeError.single(
            f"model '{model.name}' is a LoRA adapter on '{base.name}', itself a model with an adapter: the vllm "
            "backend serves one adapter on plain weights.",
            hint='Merge the first adapter (merge = true in the stage that trained it), or use backend = "hf".',
        )
    out["adapter"] = str(path)
    return out


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
MEMORY_MARGIN = 0.9  # of the memory free now, the share vLLM may reserve (the rest: CUDA context, other work)


def lora_slot(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds an adapter of `rank`."""
    for allowed in LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise RecipeError.single(
        f"a LoRA adapter of rank {rank} is above the largest rank vLLM serves ({LORA_RANKS[-1]}).",
        hint='Train with a smaller [lora] r, merge the adapter (merge = true), or use backend = "hf".',
    )


def memory_share(free: int, total: int) -> float:
    """gpu_memory_utilization from the memory free now: vLLM checks that share of the card is free."""
    return round(max(0.05, min(0.95, MEMORY_MARGIN * free / total)), 3)


def model_len(recipe: Any, source: dict) -> int | None:
    """max_model_len from the recipe: its longest max_length (prompts) plus its longest
    max_new_tokens, rounded up to 256 and capped at the model's context; None when the recipe says
    nothing about lengths (vLLM then takes the model's context)."""
    if recipe is None:
        return None
    configs = [s.config for s in recipe.stages.values()]
    prompt = max([getattr(c, "max_length", 0) or 0 for c in configs], default=0)
    new = max(
        [max(getattr(c, "max_new_tokens", 0) or 0, getattr(c, "judge_max_new_tokens", 0) or 0) for c in configs],
        default=0,
    )
    if not new:
        return None
    wanted = -(-((prompt or 2048) + new) // 256) * 256
    try:
        context = json.loads((Path(source["model"]) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, TypeError):
        context = None
    return min(wanted, context) if context else wanted


def _free_memory() -> tuple[int, int] | None:
    import torch

    return torch.cuda.mem_get_info() if torch.cuda.is_available() else None


def _lora_rank(adapter: str) -> int:
    try:
        return int(json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 16))
    except (OSError, ValueError):
        return 16


def _dtype(name: str) -> str:
    """Our "auto" means bfloat16 on a GPU (as the hf backend does); vLLM's own "auto" would take
    float16 for a float32 checkpoint."""
    return "bfloat16" if name == "auto" else name


class VLLMBackend:
    name = "vllm"

    def __init__(
        self,
        source: dict,
        *,
        batch_size: int = 64,
        gpus: int = 1,
        seed: int = 0,
        log: logging.Logger | None = None,
        release: Any = None,
        max_model_len: int | None = None,
    ) -> None:
        vllm = _import_vllm()
        self._vllm = vllm
        self.source, self.batch_size = source, batch_size
        adapter = source.get("adapter")
        kwargs: dict[str, Any] = {
            "model": source["model"],
            "dtype": _dtype(source.get("dtype") or "auto"),
            "seed": seed,
            "tensor_parallel_size": max(1, gpus),
            "trust_remote_code": bool(source.get("trust_remote_code")),
        }
        if source.get("revision"):
            kwargs["revision"] = source["revision"]
        if adapter:
            kwargs.update(enable_lora=True, max_lora_rank=lora_slot(_lora_rank(adapter)), max_loras=1)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if release is not None:  # the pool's idle models give their memory back first
            release()
        gc.collect()
        memory = _free_memory()
        if memory is not None:
            import torch

            torch.cuda.empty_cache()
            memory = _free_memory()
            kwargs["gpu_memory_utilization"] = memory_share(*memory)  # type: ignore[misc]
        if log is not None:
            log.info("vllm %s: %s", getattr(vllm, "__version__", "?"), kwargs)
        self.llm = vllm.LLM(**kwargs)
        self.lora = None
        if adapter:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, str(adapter))
        self.tokenizer = self.llm.get_tokenizer()
        from engine.models.chatmask import stop_token_ids

        self.stop_ids = stop_token_ids(self.tokenizer, None)

    @classmethod
    def for_artifact(
        cls,
        model: Artifact,
        cache_root: Path | None,
        log: logging.Logger,
        *,
        batch_size: int = 64,
        gpus: int = 1,
        recipe: Any = None,
        release: Any = None,
    ) -> VLLMBackend:
        source = resolve(model, cache_root)
        return cls(
            source, batch_size=batch_size, gpus=gpus, log=log, release=release, max_model_len=model_len(recipe, source)
        )

    def sampling(self, params: SamplingParams, seed: int) -> Any:
        """vLLM's SamplingParams for one sample (top_k -1 = off; stop strings cut from the text)."""
        return self._vllm.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            max_tokens=params.max_new_tokens,
            min_tokens=params.min_new_tokens,
            stop=list(params.stop) or None,
            stop_token_ids=list(self.stop_ids) or None,
            seed=seed,
            skip_special_tokens=True,
        )

    def generate(
        self, prompts: list[list[dict]], params: SamplingParams, seed: int | Sequence[int]
    ) -> list[list[Completion]]:
        from engine.core.seeds import sample_seed
        from engine.models.backends import prompt_seeds

        if not prompts:
            return []
        seeds = prompt_seeds(seed, len(prompts))
        requests = [(i, k) for i in range(len(prompts)) for k in range(params.n)]  # one per sample
        kwargs: dict[str, Any] = {
            "sampling_params": [self.sampling(params, sample_seed(seeds[i], k)) for i, k in requests],
            "use_tqdm": False,
            "add_generation_prompt": True,
        }
        if self.source.get("chat_template"):
            kwargs["chat_template"] = self.source["chat_template"]
        if self.lora is not None:
            kwargs["lora_request"] = self.lora
        outputs = self.llm.chat([prompts[i] for i, _ in requests], **kwargs)
        out: list[list[Completion]] = [[] for _ in prompts]
        for (i, _k), result in zip(requests, outputs):
            out[i].append(self._completion(result, result.outputs[0]))
        return out

    def _completion(self, out: Any, choice: Any) -> Completion:
        ids = list(choice.token_ids)
        if ids and ids[-1] in self.stop_ids:  # the end-of-turn token is not part of the reply
            ids = ids[:-1]
        finish = "length" if choice.finish_reason == "length" else "stop"
        return Completion(choice.text.strip(), len(out.prompt_token_ids or []), len(ids), finish)

    def close(self) -> None:
        """Shut the engine down and return its GPU memory (vLLM reserves most of the card)."""
        if getattr(self, "llm", None) is None:
            return
        llm, self.llm = self.llm, None
        del llm
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # older or newer vLLM: the collector below still frees the weights
            pass
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build(request: BuildRequest) -> VLLMBackend:
    return VLLMBackend.for_artifact(
        request.model,
        request.cache_root,
        request.log,
        batch_size=request.batch_size,
        gpus=getattr(request.resources, "gpus", 1) or 1,
        recipe=request.recipe,
        release=request.release_idle,
    )

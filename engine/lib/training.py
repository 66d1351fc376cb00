"""What the training stages (sft, dpo/kto/orpo) share, written once.

- `batch_split`: the global batch -> per-device rows x processes (WORLD_SIZE) x accumulation.
- `Lora`, `lora_config`, `check_lora_targets`: the `[stages.X.lora]` table, the PEFT config it
  makes, and a check (before any step) that every named target module exists in the model.
- Lengths and length policies live in engine.lib.lengths (`chat_ids`, `fit`, `fit_context`,
  `check_length_drops`).
- `mixture`, `mixed_rows`, `mixture_problems`: several inputs with weights, seeded
  (alignment-handbook's dataset mixtures), and their checks.
- `trainer_args`, `step_callback`, `checkpoint_dir`, `last_checkpoint`: the trainer arguments every
  stage sets the same way, tokens/s and progress per step, checkpoints in the stage's partial area and resume.
- `save_model`: `model/` (full weights, a merged adapter, or an adapter plus `base.json`) + tokenizer.
- `step_metrics`, `plot_loss`, `plot_rewards`: per-step metrics from the trainer's log history and
  their PNG plots.

torch, transformers, trl and peft are imported inside functions only.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from engine.core.errors import Problem, RecipeError
from engine.lib.knobs import TRL_ALIASES, UNKNOWN_KEY_HINTS
from engine.spec.backends import BACKENDS
from engine.spec.config import ExecOnly, Knob, StageConfig, Table

Messages = list[dict]


def user_error(ctx, key: str, message: str, hint: str | None = None) -> RecipeError:
    """A bad-input error found at the start of a stage, located at `stages.<stage>.<key>` (exit 2)."""
    return RecipeError.single(
        f"stage '{ctx.stage}': {message}", hint=hint, **ctx.recipe.where(f"stages.{ctx.stage}.{key}")
    )


def load_weights(ctx, art, key: str, full: bool = False, quantize: bool = False):
    """(model, tokenizer) with local weights to train or to use as a reference: a LoRA adapter
    (a [models] adapter or a stage-made one) is merged into its base. `key` names the config field.
    `full`: a full fine-tune, which trains float32 weights under bf16 autocast on CUDA (TRL's own
    default): AdamW on pure bf16 weights loses small updates (10 steps at lr 5e-6 changed 7.6% of
    bf16 weights against all of them in float32). A LoRA base stays in its dtype."""
    if art.spec is not None and not BACKENDS[art.spec.backend].weights_here:
        raise user_error(
            ctx,
            key,
            f"model '{art.name}' uses the {art.spec.backend} backend; training needs local weights.",
            hint='Point it at a [models] table with backend = "hf".',
        )
    model, tok = ctx.load_model(art, merge_adapter=True, full_precision=full, quantize=quantize)
    if quantize:  # QLoRA (not run on this project's machines: no CUDA)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
        ctx.log.info("4-bit NF4 base (QLoRA): the LoRA adapter trains in bf16 on frozen quantized weights")
    first = next(model.parameters(), None)
    if full and first is not None and first.device.type == "cuda":
        ctx.log.info("full fine-tune: float32 weights (the optimizer's master copy), bf16 autocast for compute")
    return model, tok


# --------------------------------------------------------------------------- batch


@dataclass(frozen=True)
class Batch:
    per_device: int
    processes: int
    accumulation: int

    def as_json(self, global_batch: int) -> dict:
        return {"global": global_batch, "per_device": self.per_device, "accumulation": self.accumulation}


def batch_split(batch_size: int, per_device_batch_size: int, processes: int | None = None) -> Batch:
    """Split the global batch into per-device rows x processes x accumulation steps. `processes`
    defaults to WORLD_SIZE (set by accelerate). ValueError when the numbers do not divide."""
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    per_device = min(per_device_batch_size, max(1, batch_size // processes))
    if batch_size % (per_device * processes):
        raise ValueError(
            f"batch_size {batch_size} is not divisible by per_device_batch_size {per_device} x "
            f"{processes} processes; pick values whose product divides it."
        )
    return Batch(per_device, processes, batch_size // (per_device * processes))


def batch_problems(name: str, config, recipe) -> list[Problem]:
    """The batch split, checked at validate time with the processes the recipe asks for."""
    try:
        batch_split(config.batch_size, config.per_device_batch_size, config.resources.processes)
    except ValueError as exc:
        return [Problem(f"stage '{name}': {exc}", **recipe.where(f"stages.{name}.batch_size"))]
    return []


# --------------------------------------------------------------------------- LoRA


class Lora(Table):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description='Module names to adapt (e.g. ["q_proj", "v_proj"]), or \'all-linear\'.'
    )
    use_dora: bool = Knob(False, description="DoRA: weight-decomposed LoRA (magnitude and direction).")
    use_rslora: bool = Knob(False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.")
    modules_to_save: list[str] | None = Knob(
        None, description='Modules trained in full beside the adapter (e.g. ["lm_head", "embed_tokens"]).'
    )


def lora_config(lora: Lora | None):
    """A peft LoraConfig for the table, or None (full fine-tune)."""
    if lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=lora.modules_to_save,
        task_type="CAUSAL_LM",
    )


def adaptable_modules(model) -> dict[str, str]:
    """Module path -> class name for every module LoRA can adapt (linear, embedding, conv)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    return {
        path: type(m).__name__
        for path, m in model.named_modules()
        if isinstance(m, kinds) or type(m).__name__ == "Conv1D"
    }  # Conv1D: GPT-2's linear


def check_lora_targets(model, lora: Lora | None, ctx) -> None:
    """Every named target module must exist in the model (as PEFT matches names: the module's
    own name or a dotted suffix of its path), checked before training starts."""
    if lora is None or lora.target_modules == "all-linear":
        return
    modules = adaptable_modules(model)
    missing = [t for t in lora.target_modules if not any(p == t or p.endswith("." + t) for p in modules)]
    if missing:
        linear = sorted({p.rsplit(".", 1)[-1] for p, cls in modules.items() if cls in ("Linear", "Conv1D")})
        raise user_error(
            ctx,
            "lora.target_modules",
            f"LoRA target module{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
            f"not found in the model.",
            hint=f"The model's linear modules are: {', '.join(linear)}. Use some of those, or "
            'target_modules = "all-linear".',
        )


# --------------------------------------------------------------------------- mixtures


def mixture(inputs: list[list[dict]], weights: list[float], seed: int) -> tuple[list[dict], list[int]]:
    """Mix several inputs: weight w takes round(w * len) rows of its input (w < 1: a seeded
    subsample; w > 1: whole copies plus a seeded remainder), then the whole is shuffled with the
    seed. Returns (rows, rows taken per input)."""
    if len(inputs) != len(weights):
        raise ValueError(f"{len(inputs)} inputs but {len(weights)} weights")
    out, counts = [], []
    for i, (rows, w) in enumerate(zip(inputs, weights)):
        want = round(w * len(rows))
        copies, rest = divmod(want, len(rows)) if rows else (0, 0)
        rng = random.Random(f"{seed}:mixture:{i}")
        taken = [r for _ in range(copies) for r in rows] + rng.sample(rows, rest)
        out += taken
        counts.append(len(taken))
    random.Random(f"{seed}:mixture").shuffle(out)
    return out, counts


def mixture_problems(name: str, config, recipe) -> list[Problem]:
    """`input` (one name or a list) and `weights`: one weight per input, each above 0."""
    inputs = [config.input] if isinstance(config.input, str) else list(config.input)
    problems = []
    if not inputs:
        problems.append(
            Problem(
                f"stage '{name}' has an empty input list.",
                hint="Name at least one dataset or stage.",
                **recipe.where(f"stages.{name}.input"),
            )
        )
    if config.weights is not None:
        where = recipe.where(f"stages.{name}.weights")
        if len(config.weights) != len(inputs):
            problems.append(
                Problem(
                    f"stage '{name}' has {len(config.weights)} weights for {len(inputs)} inputs.",
                    hint=f"Give one weight per input, in the order of input = {inputs}.",
                    **where,
                )
            )
        bad = [w for w in config.weights if not w > 0]
        if bad:
            problems.append(
                Problem(
                    f"stage '{name}': weights must be above 0 (found {bad[0]}).",
                    hint="Remove an input instead of weighting it 0.",
                    **where,
                )
            )
    return problems


def mixed_rows(config, inputs: dict, ctx) -> tuple[list[dict], list[dict]]:
    """The rows of `input` (one artifact or several mixed by `weights`), and what was taken of each."""
    arts = inputs["input"] if isinstance(inputs["input"], list) else [inputs["input"]]
    if len(arts) == 1 and config.weights is None:
        rows = arts[0].rows()
        return rows, [{"input": arts[0].name, "rows": len(rows), "weight": 1.0, "taken": len(rows)}]
    weights = config.weights or [1.0] * len(arts)
    lists = [a.rows() for a in arts]
    rows, taken = mixture(lists, weights, ctx.seed)
    mix = [
        {"input": a.name, "rows": len(r), "weight": w, "taken": t} for a, r, w, t in zip(arts, lists, weights, taken)
    ]
    ctx.log.info(
        "mixture: %s", "; ".join(f"{m['input']} {m['taken']} of {m['rows']} (weight {m['weight']:g})" for m in mix)
    )
    return rows, mix


def training_rows(config, inputs: dict, ctx, what: str) -> tuple[list[dict], list[dict], Batch]:
    """The start every training stage shares: its rows (mixed), what was taken of each input,
    and the batch split; an empty input or an impossible batch is a bad-input error (exit 2)."""
    rows, mix = mixed_rows(config, inputs, ctx)
    if not rows:
        raise user_error(
            ctx,
            "input",
            f"no {what} to train on (input: {', '.join(m['input'] for m in mix)}).",
            hint="Check that the dataset has rows and that the data checks kept some "
            "(the run prints rows dropped per reason).",
        )
    try:
        batch = batch_split(config.batch_size, config.per_device_batch_size)
    except ValueError as exc:
        raise user_error(ctx, "batch_size", str(exc)) from None
    return rows, mix, batch


def mixture_line(report: dict) -> list[tuple[str, str]]:
    """The `show` summary line of a mixture, when there is one to speak of."""
    mix = report.get("mixture") or []
    if len(mix) > 1 or any(m["weight"] != 1.0 for m in mix):
        return [("mixture", ", ".join(f"{m['input']} {m['taken']}/{m['rows']} (x{m['weight']:g})" for m in mix))]
    return []


# --------------------------------------------------------------------------- trainer setup


# --------------------------------------------------------------------------- saving


# --------------------------------------------------------------------------- metrics and plots


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class TrainingConfig(StageConfig):
    """What every training stage (sft, dpo, kto, orpo) takes besides its data, model and loss:
    input mixing, how long, the schedule, checkpoints and LoRA. Each stage's Config adds its own."""

    weights: list[float] | None = Field(
        None,
        description="One per input: w takes round(w x rows) of it (w < 1 a "
        "seeded subsample, w > 1 repeats). Default: 1 each.",
    )
    epochs: float = Field(1.0, gt=0.0, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    scheduler: str = Field("cosine", description="transformers lr_scheduler_type.")
    weight_decay: float = Field(0.0, ge=0.0)
    save_steps: int = ExecOnly(50, ge=1, description="Checkpoint every N steps (for resume).")
    logging_steps: int = ExecOnly(1, ge=1)
    lora: Lora | None = Field(None, description="LoRA settings; absent = full fine-tune.")
    merge: bool = Field(False, description="LoRA: merge the adapter and save full weights.")
    optimizer: str | None = Knob(
        None, description="transformers' optimizer name (adamw_torch, adafactor, paged_adamw_8bit, ...); default TRL's."
    )
    max_grad_norm: float | None = Knob(None, gt=0.0, description="Clip the gradient norm; default TRL's (1.0).")
    gradient_checkpointing: bool | None = ExecOnly(
        None, description="Recompute activations in the backward pass (less memory, slower); default TRL's (on)."
    )
    neftune_noise_alpha: float | None = Knob(
        None, gt=0.0, description="NEFTune: noise on the input embeddings while training (the paper uses 5)."
    )
    eval_fraction: float | None = Knob(
        None, gt=0.0, le=0.5, description="Hold out this share of the training rows (seeded) to compute eval loss on."
    )
    eval_steps: int | None = Knob(None, ge=1, description="Optimizer steps between evals (default: save_steps).")
    early_stopping_patience: int | None = Knob(
        None, ge=1, description="Stop after this many evals without a lower eval loss; the best checkpoint is kept."
    )
    quantization: Literal["4bit"] | None = Knob(
        None, description="QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes, CUDA only); needs [lora]."
    )
    trainer: dict[str, Any] = Knob(
        default_factory=dict,
        description="Further TRL config arguments, checked against the TRL config's fields (keys the stage "
        "models are refused: use the stage's own key).",
    )

    unknown_key_hints: ClassVar[dict[str, str]] = UNKNOWN_KEY_HINTS

    @model_validator(mode="before")
    @classmethod
    def _trl_names(cls, data: Any) -> Any:
        """TRL's names for the same settings (learning_rate, num_train_epochs, ...) are accepted."""
        if not isinstance(data, dict):
            return data
        for trl_name, ours in TRL_ALIASES.items():
            if trl_name in data and ours in cls.model_fields:
                if ours in data:
                    raise ValueError(f"{trl_name} (TRL's name) and {ours} are the same setting: keep one")
                data = {**data, ours: data[trl_name]}
                del data[trl_name]
        return data

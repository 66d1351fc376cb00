"""dpo / kto / orpo / cpo: preference training with TRL.

Takes `preferences` (input: one reference, or a list mixed by `weights`) and a model (model, optionally ref_model); gives a `model` in `model/`
(full weights, the merged LoRA weights, or a LoRA adapter plus `base.json`) with its tokenizer.

- Rows: `prompt` = the conversation so far (ending with a user turn), `chosen` / `rejected` = the
  next assistant turn. Multi-turn prompts are rendered with the model's chat template.
- kind = "dpo": TRL's DPOTrainer, `loss_type` one of TRL's (sigmoid = DPO, ipo, hinge, robust, ...).
  kind = "kto": TRL's KTOTrainer; each pair becomes one desirable (chosen) and one undesirable
  (rejected) unpaired example, shuffled with the recipe seed. kind = "orpo": TRL's experimental
  ORPOTrainer (no reference model; `beta` is ORPO's lambda). kind = "cpo": TRL's experimental
  CPOTrainer (no reference model): `loss_type` sigmoid (CPO), hinge, ipo or simpo (SimPO, with
  `simpo_gamma`; `cpo_alpha = 0` for pure SimPO, TRL's default 1 adds CPO's NLL term).
- Reference model (dpo, kto): `ref_model` when set; otherwise, with `lora`, the start model with the
  adapter disabled (the frozen base); otherwise a frozen copy of the start model. The stage log and
  the report say which.
- Lengths: prompt + chosen and prompt + rejected are measured with the chat template; pairs over
  `max_length` follow `length_policy` on the prompt only (`drop`; `keep_recent` drops its earliest
  turns, the system message stays; `truncate` cuts the left of its earliest turns). The chosen and
  rejected replies are never cut. Counts go to the report.
- `metrics.json`: per-step loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies
  (as TRL 1.16 logs them; KTO logs no accuracies) and tokens/s; `loss.png`, `rewards.png` and
  `accuracies.png` plot them. Checkpoints in the partial area; a killed stage resumes.

torch, transformers, trl, peft and datasets are imported inside functions only.
"""

from __future__ import annotations

import copy
import difflib
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from engine.core.errors import Problem
from engine.lib.knobs import eval_split, knob_callbacks, knob_problems
from engine.lib.lengths import LengthReport, chat_ids, check_length_drops, fit_context, max_dropped_field
from engine.lib.pairs import unpaired
from engine.lib.tracking import tracking_callbacks
from engine.lib.trainer import (
    checkpoint_dir,
    eval_line,
    eval_metrics,
    eval_report,
    last_checkpoint,
    length_line,
    plot_loss,
    plot_rewards,
    save_model,
    settle,
    step_callback,
    step_metrics,
    trainer_args,
    weights_kind,
)
from engine.lib.training import (
    REWARD_KEYS,
    TrainingConfig,
    batch_problems,
    batch_split,
    check_lora_targets,
    load_weights,
    lora_config,
    mixture_line,
    mixture_problems,
    training_rows,
    user_error,
)
from engine.spec.config import ExecOnly, Knob, Ref

VERSION = 2  # 2: input may be a weighted list of preference sets
GIVES = "model"
TRAINS = True

# Copied from TRL 1.16 (trl/trainer/dpo_config.py, DPOConfig.loss_type; kto_config.py, KTOConfig.loss_type).
LOSS_TYPES = {
    "dpo": (
        "sigmoid",
        "hinge",
        "ipo",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
        "sigmoid_norm",
    ),
    "kto": ("kto", "apo_zero_unpaired"),
    "orpo": (),
    "cpo": ("sigmoid", "hinge", "ipo", "simpo"),  # trl/experimental/cpo/cpo_config.py (alphapo: simpo + alpha)
}
DEFAULT_LOSS = {"dpo": "sigmoid", "kto": "kto", "cpo": "sigmoid"}
EXTRA_KEYS = {
    "dpo": ("logps/chosen", "logps/rejected"),
    "kto": ("logps/chosen", "logps/rejected", "kl"),
    "orpo": ("logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio"),
    "cpo": ("logps/chosen", "logps/rejected", "nll_loss"),
}
NO_REFERENCE = ("orpo", "cpo")


class Config(TrainingConfig):
    kind: Literal["dpo", "kto", "orpo", "cpo"]
    input: str | list[str] = Ref(
        "preferences",
        description="Preference pairs (prompt messages, chosen, rejected): one name, or a list mixed by `weights`.",
    )
    model: str = Ref("model", description="The model to train (the policy's start).")
    eval_input: str | None = Ref(
        "preferences", default=None, description="Held-out preference pairs: eval loss every eval_steps."
    )
    ref_model: str | None = Ref(
        "model",
        default=None,
        description=(
            "dpo/kto: the reference model. Default: with lora the start model with the adapter disabled, "
            "otherwise a frozen copy of the start model. orpo has none."
        ),
    )
    beta: float = Field(
        0.1,
        gt=0.0,
        description="dpo/kto: deviation from the reference (higher = closer); "
        "orpo: weight of the odds-ratio term (lambda).",
    )
    loss_type: str | None = Field(
        None,
        description=(
            "dpo: sigmoid (default), hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, "
            "apo_zero, apo_down, discopop, sft, sigmoid_norm; kto: kto (default), apo_zero_unpaired; orpo: none; "
            "cpo: sigmoid (CPO, default), hinge, ipo, simpo (SimPO)."
        ),
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo: robust/exo_pair label smoothing.")
    cpo_alpha: float | None = Knob(
        None,
        ge=0.0,
        description="cpo: weight of the NLL (behaviour cloning) term; 0 with simpo is pure SimPO. TRL's default 1.",
    )
    simpo_gamma: float | None = Knob(
        None, description="cpo with loss_type simpo: the target reward margin. TRL's default 0.5."
    )
    lr: float = Field(
        5e-6, gt=0.0, description="Peak learning rate (preference training wants it low; ~1e-5 to 5e-5 with LoRA)."
    )
    batch_size: int = Field(8, ge=1, description="Global batch of pairs (per-device x processes x accumulation).")
    per_device_batch_size: int = ExecOnly(
        8, ge=1, description="Pairs per forward pass; accumulation makes up the rest."
    )
    max_length: int = Field(512, ge=8, description="Tokens of prompt + reply (chat template included).")
    length_policy: Literal["drop", "keep_recent", "truncate"] = Field(
        "drop",
        description="Pairs over max_length: drop them, drop the prompt's earliest turns, or cut the "
        "prompt's earliest turns' text. The replies are never cut.",
    )
    max_dropped: float = max_dropped_field()
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of steps for linear warmup.")


def loss_type(config: Config) -> str | None:
    return config.loss_type or DEFAULT_LOSS.get(config.kind)


def check(name: str, config: Config, recipe) -> list[Problem]:
    problems = batch_problems(name, config, recipe) + mixture_problems(name, config, recipe)
    problems += knob_problems(name, config, recipe, config.kind)
    where = lambda key: recipe.where(f"stages.{name}.{key}")  # noqa: E731
    known = LOSS_TYPES[config.kind]
    if config.loss_type is not None and config.loss_type not in known:
        if not known:
            problems.append(
                Problem(
                    f"stage '{name}' ({config.kind}) takes no loss_type.",
                    hint="Remove loss_type.",
                    **where("loss_type"),
                )
            )
        else:
            close = difflib.get_close_matches(config.loss_type, known, n=1)
            other = [k for k, v in LOSS_TYPES.items() if config.loss_type in v]
            problems.append(
                Problem(
                    f"unknown loss_type '{config.loss_type}' for kind = \"{config.kind}\".",
                    hint=(f"Did you mean '{close[0]}'? " if close and not other else "")
                    + (f'It is a loss of kind = "{other[0]}". ' if other else "")
                    + f"Known: {', '.join(known)}.",
                    **where("loss_type"),
                )
            )
    if config.kind in NO_REFERENCE and config.ref_model:
        problems.append(
            Problem(
                f"stage '{name}' ({config.kind}) uses no reference model.",
                hint="Remove ref_model.",
                **where("ref_model"),
            )
        )
    for key in ("cpo_alpha", "simpo_gamma"):
        if getattr(config, key) is not None and (
            config.kind != "cpo" or (key == "simpo_gamma" and loss_type(config) != "simpo")
        ):
            problems.append(
                Problem(
                    f'{key} is used by kind = "cpo"'
                    + (' with loss_type = "simpo"' if key == "simpo_gamma" else "")
                    + " only.",
                    hint=f"Remove {key}.",
                    **where(key),
                )
            )
    if loss_type(config) == "exo_pair" and config.label_smoothing == 0.0:
        problems.append(
            Problem(
                "loss_type 'exo_pair' needs label_smoothing above 0 (the EXO paper uses 1e-3).",
                **where("label_smoothing"),
            )
        )
    if loss_type(config) == "kto" and not problems:
        per_device = batch_split(config.batch_size, config.per_device_batch_size, config.resources.processes).per_device
        if per_device < 2:
            problems.append(
                Problem(
                    f"stage '{name}': the kto loss estimates its KL term from the other examples of a forward pass, so it "
                    f"needs at least 2 rows per device (it has {per_device}).",
                    hint='Raise per_device_batch_size and batch_size, or use loss_type = "apo_zero_unpaired".',
                    **where("per_device_batch_size"),
                )
            )
    return problems


# --------------------------------------------------------------------------- data


def fit_pairs(rows: list[dict], tok, config: Config) -> tuple[list[dict], LengthReport]:
    """Pairs whose prompt + chosen and prompt + rejected both fit max_length, under the length
    policy (applied to the prompt only)."""
    report, out = LengthReport(), []
    for row in rows:
        prompt, chosen, rejected = (
            [{"role": m["role"], "content": m["content"]} for m in row[k]] for k in ("prompt", "chosen", "rejected")
        )

        def length(p, chosen=chosen, rejected=rejected):
            return max(len(chat_ids(tok, p + chosen)), len(chat_ids(tok, p + rejected)))

        n = length(prompt)
        fitted, what = (
            (prompt, "fits")
            if n <= config.max_length
            else fit_context(prompt, config.length_policy, config.max_length, length)
        )
        report.count(n, config.max_length, what)
        if fitted is not None:
            out.append({"prompt": fitted, "chosen": chosen, "rejected": rejected})
    return out, report


# --------------------------------------------------------------------------- run


def _reference(config: Config, inputs: dict, model, tok, ctx):
    """(reference model or None, what the reference is, in words)."""
    if config.kind in NO_REFERENCE:
        return None, f"none ({config.kind.upper()} trains without a reference model)"
    if config.ref_model:
        art = inputs["ref_model"]
        ref, ref_tok = load_weights(ctx, art, "ref_model")
        if ref_tok.get_vocab() != tok.get_vocab():
            raise user_error(
                ctx,
                "ref_model",
                f"ref_model '{art.name}' has a different tokenizer from model "
                f"'{inputs['model'].name}'; log-probabilities would not compare.",
                hint="Use a reference from the same model family (usually the start model itself).",
            )
        what = f"model '{art.name}' (ref_model)"
    elif config.lora is not None:
        return None, f"the start model '{inputs['model'].name}' with the LoRA adapter disabled (frozen base)"
    else:
        # TRL would re-load the reference from the model's path, which fails for in-memory models
        ref, what = copy.deepcopy(model), f"a frozen copy of the start model '{inputs['model'].name}'"
    ref.eval()
    ref.requires_grad_(False)
    return ref, what


def _trainer(config: Config, model, ref, tok, data: list[dict], held: list[dict], base_args: dict, callbacks):
    from datasets import Dataset

    dataset = Dataset.from_list(data)
    common = dict(max_length=config.max_length, beta=config.beta, **base_args)
    evals = {"eval_dataset": Dataset.from_list(held)} if held else {}
    peft = lora_config(config.lora)
    if config.kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(loss_type=[loss_type(config)], label_smoothing=config.label_smoothing, **common)
        return DPOTrainer(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=dataset,
            **evals,
            processing_class=tok,
            peft_config=peft,
            callbacks=callbacks,
        )
    if config.kind == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(loss_type=loss_type(config), **common)
        return KTOTrainer(
            model=model,
            ref_model=ref,
            args=args,
            train_dataset=dataset,
            **evals,
            processing_class=tok,
            peft_config=peft,
            callbacks=callbacks,
        )
    import os

    import torch

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the stage names them experimental in its docs
    if config.kind == "cpo":
        from trl.experimental.cpo import CPOConfig as ArgsClass
        from trl.experimental.cpo import CPOTrainer as Base

        extra = {k: getattr(config, k) for k in ("cpo_alpha", "simpo_gamma") if getattr(config, k) is not None}
        args = ArgsClass(loss_type=loss_type(config), label_smoothing=config.label_smoothing, **extra, **common)
    else:
        from trl.experimental.orpo import ORPOConfig as ArgsClass
        from trl.experimental.orpo import ORPOTrainer as Base

        args = ArgsClass(**common)

    class Pairwise(Base):
        def _track_num_input_tokens(self, inputs):
            # ORPO's and CPO's batches have chosen_/rejected_ keys, no input_ids: count both replies' tokens
            n = sum(inputs[k].sum() for k in ("chosen_attention_mask", "rejected_attention_mask"))
            n = torch.as_tensor(n, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(n).sum().item()

    return Pairwise(
        model=model,
        args=args,
        train_dataset=dataset,
        **evals,
        processing_class=tok,
        peft_config=peft,
        callbacks=callbacks,
    )


def run(config: Config, inputs: dict, ctx) -> None:
    from engine.models.weights import release

    rows, mix, batch = training_rows(config, inputs, ctx, "preference pairs")

    model_art = inputs["model"]
    model, tok = load_weights(ctx, model_art, "model", full=config.lora is None, quantize=config.quantization == "4bit")
    check_lora_targets(model, config.lora, ctx)

    rows, held_rows = eval_split(config, rows, inputs, ctx.seed)
    pairs, lengths = fit_pairs(rows, tok, config)
    held = fit_pairs(held_rows, tok, config)[0] if held_rows else []
    if config.kind == "kto" and held:
        held = unpaired(held, ctx.seed)
    if lengths.over_length:
        ctx.warn(
            f"{lengths.over_length} of {len(rows)} pairs exceed max_length {config.max_length} tokens "
            f"(policy {config.length_policy}: {lengths.shortened} prompts shortened, {lengths.dropped} dropped)"
        )
    check_length_drops(ctx, lengths, len(rows), config, "preference pairs")
    if not pairs:
        raise user_error(
            ctx,
            "max_length",
            f"no preference pair fits max_length {config.max_length} after length_policy "
            f"'{config.length_policy}' (longest prompt + reply is {lengths.longest} tokens).",
            hint='Raise max_length, or use length_policy = "keep_recent" or "truncate".',
        )
    data = unpaired(pairs, ctx.seed) if config.kind == "kto" else pairs
    ctx.log.info(
        "%d pairs to train on (%d in; %d over max_length)%s",
        len(pairs),
        len(rows),
        lengths.over_length,
        f"; {len(data)} unpaired examples" if config.kind == "kto" else "",
    )

    ref, ref_what = _reference(config, inputs, model, tok, ctx)
    ctx.log.info("reference model: %s", ref_what)
    ckpt_dir = checkpoint_dir(ctx)
    timing: dict[int, float] = {}
    model.train()
    trainer = _trainer(
        config,
        model,
        ref,
        tok,
        data,
        held,
        trainer_args(config, ctx, batch, ckpt_dir, model, has_eval=bool(held)),
        [step_callback(ctx, timing), *knob_callbacks(config, bool(held), *tracking_callbacks(ctx))],
    )
    settle(trainer, ctx.log)

    last = last_checkpoint(ckpt_dir, ctx)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    elapsed = time.perf_counter() - started

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)  # before a merge
    save_model(trainer, tok, ctx, model_art, config.lora, config.merge)
    steps = step_metrics(trainer.state.log_history, REWARD_KEYS + EXTRA_KEYS[config.kind], timing)
    evals = eval_metrics(trainer.state.log_history)
    first, final = (steps[0], steps[-1]) if steps else ({}, {})
    if ctx.is_main:
        # timings belong here, not in report.json: two runs of the same stage write the same report
        ctx.save_json("metrics.json", {"steps": steps, "evals": evals, "train_seconds": round(elapsed, 2)})
        ctx.save_json("pairs_sample.json", pairs[:3])  # what it trained on, from whatever made the pairs
        title = f"{config.kind} '{ctx.stage}'"
        plot_loss(Path(ctx.out_dir) / "loss.png", steps, f"{title}: training loss", evals)
        plots = ["loss.png", *plot_rewards(Path(ctx.out_dir), steps, title)]
        ctx.save_json(
            "report.json",
            {
                "kind": config.kind,
                "loss_type": loss_type(config),
                "beta": config.beta,
                "reference": ref_what,
                "rows_in": len(rows),
                "mixture": mix,
                "pairs_trained": len(pairs),
                "train_examples": len(data),
                "max_length": config.max_length,
                "length_policy": config.length_policy,
                **lengths.as_json(),
                "steps": trainer.state.global_step,
                "first_loss": first.get("loss"),
                "final_loss": final.get("loss"),
                "first_margin": first.get("rewards/margins"),
                "final_margin": final.get("rewards/margins"),
                "final_accuracy": final.get("rewards/accuracies"),
                "tokens_seen": trainer.state.num_input_tokens_seen,
                "trainable_params": trainable,
                "lora": config.lora.model_dump() if config.lora else None,
                "merged": bool(config.lora and config.merge),
                "resumed_from": Path(last).name if last else None,
                "batch": batch.as_json(config.batch_size),
                **eval_report(evals, len(held), trainer.state.global_step, trainer.state.max_steps),
                "plots": plots,
            },
        )
    del trainer
    release(model)
    if ref is not None:
        release(ref)


def summary(report: dict) -> list[tuple[str, str]]:
    fl = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    loss = f"{report['kind']}" + (f" ({report['loss_type']})" if report.get("loss_type") else "")
    out = [
        ("objective", f"{loss}, beta {report['beta']:g}"),
        ("reference", report["reference"]),
        ("rows in / pairs trained", f"{report['rows_in']} / {report['pairs_trained']}"),
        *mixture_line(report),
        length_line(report),
        ("steps", str(report["steps"])),
        ("loss first -> final", f"{fl(report['first_loss'])} -> {fl(report['final_loss'])}"),
        ("reward margin first -> final", f"{fl(report['first_margin'])} -> {fl(report['final_margin'])}"),
    ]
    if report.get("final_accuracy") is not None:
        out.append(("reward accuracy (last step)", fl(report["final_accuracy"])))
    out += eval_line(report)
    out.append(("weights", f"{weights_kind(report)}, {report['trainable_params']} trainable params"))
    return out


def report(name: str, entry: Path) -> list:
    """The run report's section: a few of the pairs it trained on, whichever stage or file made them."""
    from engine.lib.entryblocks import pair_blocks

    return pair_blocks(name, entry) if (entry / "pairs_sample.json").is_file() else []

"""sft: supervised fine-tuning on conversations, with the loss on assistant turns only.

Takes `conversations` (input: one reference, or a list mixed by `weights`) and a model (model);
gives a `model`: the trained weights (or a PEFT adapter plus `base.json` when `lora` is set and
`merge` is false) and the tokenizer in `model/`.

- Several inputs are mixed as alignment-handbook's dataset mixtures: weight w takes round(w x rows)
  of its input (w < 1 a seeded subsample, w > 1 whole copies plus a seeded remainder), then the
  whole is shuffled with the recipe seed. The report counts the rows taken from each input.
- Lengths are measured with the model's own chat template. Rows over `max_length` follow
  `length_policy`: `drop` drops them; `keep_recent` drops the earliest user/assistant pairs
  (the system message stays) until the row fits; `truncate` cuts text from the left of the
  earliest turns. The final assistant turn is never cut: a row whose last exchange alone is
  too long is dropped, and every drop is counted in the report.
- `packing` packs conversations into rows of `max_length` tokens (TRL's best-fit decreasing, padding
  free: each conversation keeps its own positions, and attention never crosses conversations).
- Before any training step, one real collated batch goes through the trainer's own data
  pipeline and the supervised tokens (labels != -100) are decoded to `mask_check.txt`. They
  must be exactly the assistant turns plus their end-of-turn token; otherwise the stage fails
  with the fix (a chat template whose assistant content and end token sit inside
  `{% generation %}...{% endgeneration %}`).
- Checkpoints go to the stage's partial area; a killed stage resumes from the last one.
- `metrics.json` holds the per-step loss and tokens/s, `loss.png` the curve, `report.json` the summary.

torch, transformers, trl, peft and datasets are imported inside functions only.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from engine.core.errors import Problem
from engine.lib.knobs import eval_split, knob_callbacks, knob_problems
from engine.lib.lengths import LengthReport, chat_ids, check_length_drops, fit, max_dropped_field
from engine.lib.tracking import tracking_callbacks
from engine.lib.trainer import (
    checkpoint_dir,
    eval_line,
    eval_metrics,
    eval_report,
    last_checkpoint,
    length_line,
    mask_check,
    plot_loss,
    save_model,
    settle,
    step_callback,
    step_metrics,
    trainer_args,
    weights_kind,
)
from engine.lib.training import (
    Lora,
    TrainingConfig,
    batch_problems,
    check_lora_targets,
    load_weights,
    lora_config,
    mixture_line,
    mixture_problems,
    training_rows,
    user_error,
)
from engine.models.chatmask import (
    FIX_TEMPLATE,
    TemplateProblem,
    jinja_render,
    masked_ids,
    masking,
    special_ids,
    tokenizer_render,
    trl_training_template,
)
from engine.spec.config import ExecOnly, Ref

__all__ = ["Config", "Lora", "fit", "run", "summary"]

VERSION = 2  # 2: input mixtures, packing, loss.png, base.json next to an unmerged adapter
GIVES = "model"
TRAINS = True


class Config(TrainingConfig):
    kind: Literal["sft"]
    input: str | list[str] = Ref(
        "conversations", description="The conversations to train on: one name, or a list mixed by `weights`."
    )
    model: str = Ref("model", description="The model to fine-tune.")
    eval_input: str | None = Ref(
        "conversations", default=None, description="Held-out conversations: eval loss every eval_steps."
    )
    lr: float = Field(2e-4, gt=0.0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Global batch (per-device x processes x accumulation).")
    per_device_batch_size: int = ExecOnly(8, ge=1, description="Rows per forward pass; accumulation makes up the rest.")
    max_length: int = Field(512, ge=8, description="Tokens per conversation (chat template included).")
    length_policy: Literal["drop", "keep_recent", "truncate"] = Field(
        "drop",
        description="Rows over max_length: drop them, drop their earliest turns, or cut the earliest turns' text.",
    )
    max_dropped: float = max_dropped_field()
    packing: bool = Field(
        False,
        description="Pack conversations into rows of max_length tokens (fewer pad tokens; "
        "a batch then counts packed rows).",
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of steps for linear warmup.")


def check(name: str, config: Config, recipe) -> list[Problem]:
    return (
        batch_problems(name, config, recipe)
        + mixture_problems(name, config, recipe)
        + template_problems(name, config, recipe)
        + knob_problems(name, config, recipe, "sft")
    )


def template_problems(name: str, config: Config, recipe) -> list[Problem]:
    """The model's chat template must allow assistant-only loss (engine.models.chatmask), checked from
    files when the template is knowable offline (a [models] chat_template, a local folder, a hub
    snapshot in the local cache); the run's mask check covers the rest."""
    from engine.models.info import base_model, chat_template

    base = base_model(recipe, config.model)
    found = chat_template(base[1]) if base else None
    if found is None:
        return []
    template, special = found
    try:
        masking(template, jinja_render(template, special), list(special.values()))
    except TemplateProblem as exc:
        return [
            Problem(
                f"stage '{name}': the chat template of model '{base[0]}' ({base[1].path}) cannot be masked "  # type: ignore[index]
                f"for assistant-only loss: {exc}.",
                hint=FIX_TEMPLATE,
                **recipe.where(f"stages.{name}.model"),
            )
        ]
    except Exception as exc:
        return [
            Problem(
                f"stage '{name}': the chat template of model '{base[0]}' does not render: "  # type: ignore[index]
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}.",
                hint=FIX_TEMPLATE,
                **recipe.where(f"stages.{name}.model"),
            )
        ]
    return []


# --------------------------------------------------------------------------- run


def prepare_masking(tok, ctx, model_name: str) -> str:
    """How assistant tokens are found (engine.models.chatmask): the template's own {% generation %} markers,
    TRL's training version of the template, or spans derived by rendering. Swaps in TRL's template
    when that is the way; a template that cannot be masked is a bad-input error naming the model."""
    try:
        method = masking(tok.chat_template, tokenizer_render(tok), tok.convert_ids_to_tokens(sorted(special_ids(tok))))
    except TemplateProblem as exc:
        raise user_error(
            ctx,
            "model",
            f"the chat template of model '{model_name}' cannot be masked for assistant-only loss: {exc}.",
            hint=FIX_TEMPLATE,
        ) from None
    if method == "trl":
        tok.chat_template = trl_training_template(tok.chat_template)
        ctx.log.info("chat template has no {% generation %} markers; using TRL's training version of it")
    elif method == "derived":
        ctx.log.info(
            "chat template has no {% generation %} markers; assistant spans derived by rendering it "
            "one message at a time"
        )
    return method


def _dataset(tok, kept: list[list[dict]], method: str, ctx, model_name: str):
    """The training rows: conversations for TRL to tokenize, or (derived masks) token ids with their
    assistant masks, which TRL turns into labels as they are."""
    from datasets import Dataset

    if method != "derived":
        return Dataset.from_list([{"messages": m} for m in kept])
    rows = []
    for i, msgs in enumerate(kept):
        try:
            ids, mask = masked_ids(tok, msgs)
        except TemplateProblem as exc:
            raise user_error(
                ctx,
                "model",
                f"conversation {i}: the chat template of model '{model_name}' cannot be "
                f"masked for assistant-only loss: {exc}.",
                hint=FIX_TEMPLATE,
            ) from None
        rows.append({"input_ids": ids, "assistant_masks": mask})
    return Dataset.from_list(rows)


def _fit_rows(rows: list[dict], tok, config: Config) -> tuple[list[list[dict]], LengthReport, dict[int, int]]:
    """The conversations under the length policy, their length report, and (packing) the kept index
    of each row by the hash of its token ids (the mask check finds packed rows by tokens)."""
    lengths, kept, by_ids = LengthReport(), [], {}  # type: LengthReport, list[list[dict]], dict[int, int]
    length = lambda msgs: len(chat_ids(tok, msgs))  # noqa: E731
    for row in rows:
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        ids = chat_ids(tok, msgs)
        out, what = (
            (msgs, "fits")
            if len(ids) <= config.max_length
            else fit(msgs, config.length_policy, config.max_length, length)
        )
        lengths.count(len(ids), config.max_length, what)
        if out is not None:
            if config.packing:
                by_ids[hash(tuple(ids if what == "fits" else chat_ids(tok, out)))] = len(kept)
            kept.append(out)
    return kept, lengths, by_ids


def run(config: Config, inputs: dict, ctx) -> None:
    from trl import SFTConfig, SFTTrainer

    from engine.models.weights import release

    rows, mix, batch = training_rows(config, inputs, ctx, "conversations")

    model, tok = load_weights(
        ctx, inputs["model"], "model", full=config.lora is None, quantize=config.quantization == "4bit"
    )
    method = prepare_masking(tok, ctx, inputs["model"].name)
    check_lora_targets(model, config.lora, ctx)

    rows, held = eval_split(config, rows, inputs, ctx.seed)
    kept, lengths, by_ids = _fit_rows(rows, tok, config)
    eval_kept = _fit_rows(held, tok, config)[0] if held else []
    has_eval = bool(eval_kept)
    if lengths.over_length:
        ctx.warn(
            f"{lengths.over_length} of {len(rows)} conversations exceed max_length {config.max_length} tokens "
            f"(policy {config.length_policy}: {lengths.shortened} shortened, {lengths.dropped} dropped)"
        )
    check_length_drops(ctx, lengths, len(rows), config, "conversations")
    if not kept:
        raise user_error(
            ctx,
            "max_length",
            f"no conversation fits max_length {config.max_length} after length_policy "
            f"'{config.length_policy}' (longest is {lengths.longest} tokens).",
            hint='Raise max_length, or use length_policy = "keep_recent" or "truncate".',
        )
    ctx.log.info("%d conversations to train on (%d in; %d over max_length)", len(kept), len(rows), lengths.over_length)

    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    if config.packing and "flash" not in attention:
        ctx.warn(
            f"packing makes padding-free batches; with {attention} attention (no flash-attention varlen kernel) "
            "each packed row attends over its whole length, which is slower than unpacked batches "
            "(bench/bench_sft.py: about 5x fewer tokens/s on a CPU)"
        )
    ckpt_dir = checkpoint_dir(ctx)
    # derived masks arrive as `assistant_masks` next to the token ids; TRL applies them either way
    args = SFTConfig(
        assistant_only_loss=method != "derived",
        max_length=config.max_length,
        packing=config.packing,
        **trainer_args(config, ctx, batch, ckpt_dir, model, has_eval),
    )
    model.train()
    timing: dict[int, float] = {}
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=_dataset(tok, kept, method, ctx, inputs["model"].name),
        eval_dataset=_dataset(tok, eval_kept, method, ctx, inputs["model"].name) if has_eval else None,
        processing_class=tok,
        peft_config=lora_config(config.lora),
        callbacks=[step_callback(ctx, timing), *knob_callbacks(config, has_eval), *tracking_callbacks(ctx)],
    )
    settle(trainer, ctx.log)

    mask_check(trainer, tok, kept, by_ids, batch.per_device, config.packing, ctx)

    last = last_checkpoint(ckpt_dir, ctx)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    elapsed = time.perf_counter() - started

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)  # before a merge
    save_model(trainer, tok, ctx, inputs["model"], config.lora, config.merge)
    steps = step_metrics(trainer.state.log_history, timing=timing)
    evals = eval_metrics(trainer.state.log_history)
    losses = [s["loss"] for s in steps]
    if ctx.is_main:
        # timings belong here, not in report.json: two runs of the same stage write the same report
        ctx.save_json("metrics.json", {"steps": steps, "evals": evals, "train_seconds": round(elapsed, 2)})
        plot_loss(Path(ctx.out_dir) / "loss.png", steps, f"sft '{ctx.stage}': training loss", evals)
        ctx.save_json(
            "report.json",
            {
                "rows_in": len(rows),
                "rows_trained": len(kept),
                "mixture": mix,
                "max_length": config.max_length,
                "length_policy": config.length_policy,
                **lengths.as_json(),
                "packing": config.packing,
                "packed_rows": len(trainer.train_dataset) if config.packing else None,
                "steps": trainer.state.global_step,
                "first_loss": losses[0] if losses else None,
                "final_loss": losses[-1] if losses else None,
                "tokens_seen": trainer.state.num_input_tokens_seen,
                "trainable_params": trainable,
                "lora": config.lora.model_dump() if config.lora else None,
                "merged": bool(config.lora and config.merge),
                "resumed_from": Path(last).name if last else None,
                "batch": batch.as_json(config.batch_size),
                **eval_report(evals, len(eval_kept), trainer.state.global_step, trainer.state.max_steps),
            },
        )
    del trainer
    release(model)


def summary(report: dict) -> list[tuple[str, str]]:
    fl = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    out = [("rows in / trained", f"{report['rows_in']} / {report['rows_trained']}")]
    out += mixture_line(report)
    out += [
        length_line(report),
        ("steps", str(report["steps"])),
        ("loss first -> final", f"{fl(report['first_loss'])} -> {fl(report['final_loss'])}"),
        *eval_line(report),
        ("weights", f"{weights_kind(report)}, {report['trainable_params']} trainable params"),
    ]
    return out


def report(name: str, entry: Path) -> list:
    """The run report's section: which tokens of a few training rows were supervised."""
    from engine.lib.entryblocks import span_blocks

    return span_blocks(name, entry) if (entry / "mask_check.txt").is_file() else []

"""sft: supervised fine-tuning on conversations, with the loss on assistant turns only.

Takes `conversations` (input) and a model (model); gives a `model`: the trained weights (or
a PEFT adapter when `lora` is set and `merge` is false) and the tokenizer in `model/`.

- Lengths are measured with the model's own chat template. Rows over `max_length` follow
  `length_policy`: `drop` drops them; `keep_recent` drops the earliest user/assistant pairs
  (the system message stays) until the row fits; `truncate` cuts text from the left of the
  earliest turns. The final assistant turn is never cut: a row whose last exchange alone is
  too long is dropped, and every drop is counted in the report.
- Before any training step, one real collated batch goes through the trainer's own data
  pipeline and the supervised tokens (labels != -100) are decoded to `mask_check.txt`. They
  must be exactly the assistant turns plus their end-of-turn token; otherwise the stage fails
  with the fix (a chat template whose assistant content and end token sit inside
  `{% generation %}...{% endgeneration %}`).
- Checkpoints go to the stage's partial area; a killed stage resumes from the last one.
- `metrics.json` holds the per-step loss and tokens/s; `report.json` the summary.

torch, transformers, trl, peft and datasets are imported inside functions only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from engine.config import ExecOnly, Ref, StageConfig, Table

VERSION = 1
GIVES = "model"

FIX_TEMPLATE = (
    "Fix the chat template (set chat_template in the model's [models] table): wrap each assistant "
    "message's content AND its end-of-turn token in {% generation %}...{% endgeneration %}, e.g. "
    "\"<|assistant|>{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}\", "
    "and keep system and user turns outside it."
)


class Lora(Table):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'.")


class Config(StageConfig):
    kind: Literal["sft"]
    input: str = Ref("conversations", description="The conversations to train on.")
    model: str = Ref("model", description="The model to fine-tune.")
    lr: float = Field(2e-4, gt=0.0, description="Peak learning rate.")
    epochs: float = Field(1.0, gt=0.0, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(8, ge=1, description="Global batch (per-device x processes x accumulation).")
    per_device_batch_size: int = ExecOnly(8, ge=1, description="Rows per forward pass; accumulation makes up the rest.")
    max_length: int = Field(512, ge=8, description="Tokens per conversation (chat template included).")
    length_policy: Literal["drop", "keep_recent", "truncate"] = Field(
        "drop", description="Rows over max_length: drop them, drop their earliest turns, or cut the earliest turns' text.")
    scheduler: str = Field("cosine", description="transformers lr_scheduler_type.")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of steps for linear warmup.")
    weight_decay: float = Field(0.0, ge=0.0)
    save_steps: int = ExecOnly(50, ge=1, description="Checkpoint every N steps (for resume).")
    logging_steps: int = ExecOnly(1, ge=1)
    lora: Lora | None = Field(None, description="LoRA settings; absent = full fine-tune.")
    merge: bool = Field(False, description="LoRA: merge the adapter and save full weights.")


# --------------------------------------------------------------------------- lengths


def _ids(tok, messages: list[dict]) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def _length(tok, messages: list[dict]) -> int:
    return len(_ids(tok, messages))


def _pairs(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(system messages, [user, assistant, ...] groups each starting at a user turn)."""
    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    groups: list[list[dict]] = []
    for m in rest:
        if m["role"] == "user" or not groups:
            groups.append([m])
        else:
            groups[-1].append(m)
    return system, groups


def _last_assistant(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def fit(messages: list[dict], policy: str, max_length: int, length) -> tuple[list[dict] | None, str]:
    """Apply a length policy. `length(messages) -> tokens`. Returns (messages or None, what happened):
    'fits', 'shortened' or 'dropped'. The final assistant turn is never cut or dropped on its own."""
    if length(messages) <= max_length:
        return messages, "fits"
    if policy == "drop":
        return None, "dropped"
    # training ends at the last assistant turn; anything after it teaches nothing
    messages = messages[: _last_assistant(messages) + 1]
    if policy == "keep_recent":
        system, groups = _pairs(messages)
        while len(groups) > 1:
            groups = groups[1:]
            cand = system + [m for g in groups for m in g]
            if length(cand) <= max_length:
                return cand, "shortened"
        return None, "dropped"
    # truncate: cut text from the left of the earliest turns (not system, never the final assistant turn)
    msgs = [dict(m) for m in messages]
    last = len(msgs) - 1
    for i, m in enumerate(msgs):
        if i == last or m["role"] == "system":
            continue
        text = m["content"]
        lo, hi = 0, len(text)  # cut `k` leading characters; find the smallest k that fits
        m["content"] = "…" + text[hi:]
        if length(msgs) > max_length:
            continue  # even emptied it does not fit: cut the next turn too
        while lo < hi:
            mid = (lo + hi) // 2
            m["content"] = ("…" + text[mid:]) if mid else text
            if length(msgs) <= max_length:
                hi = mid
            else:
                lo = mid + 1
        m["content"] = ("…" + text[lo:]) if lo else text
        return msgs, "shortened"
    return None, "dropped"


# --------------------------------------------------------------------------- mask check


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, lab in enumerate(labels + [-100]):
        if lab != -100 and start is None:
            start = i
        elif lab == -100 and start is not None:
            out.append((start, i))
            start = None
    return out


def mask_problems(tok, messages: list[dict], input_ids: list[int], labels: list[int]) -> tuple[str, list[str]]:
    """(decoded supervised text, problems) for one collated example and its messages."""
    special = set(tok.all_special_ids)
    spans = _spans(labels)
    texts = [tok.decode(input_ids[a:b], skip_special_tokens=False) for a, b in spans]
    shown = "\n".join(f"[span {k}] {t!r}" for k, t in enumerate(texts)) or "(nothing is supervised)"
    problems: list[str] = []
    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    if not spans:
        problems.append("no token is supervised")
        return shown, problems
    if len(spans) != len(assistants):
        problems.append(f"{len(spans)} supervised spans for {len(assistants)} assistant turns")
    for k, ((a, b), text, content) in enumerate(zip(spans, texts, assistants)):
        body = text.strip()
        if not body.startswith(content.strip()):
            problems.append(f"span {k} is not the assistant turn's content: {text[:80]!r}")
            continue
        rest = body[len(content.strip()):]
        for sid in special:
            rest = rest.replace(tok.convert_ids_to_tokens(sid) or "\0", "")
        if rest.strip():
            problems.append(f"span {k} supervises more than the assistant turn: {text[:80]!r}")
        tail = [t for t in input_ids[a:b] if tok.decode([t]).strip()]
        if not tail or tail[-1] not in special:
            problems.append(f"the end-of-turn token of assistant turn {k} is not supervised")
    sup = "".join(texts)
    for m in messages:
        if m["role"] in ("system", "user") and m["content"].strip() in sup \
                and not any(m["content"].strip() in c for c in assistants):
            problems.append(f"{m['role']} text is supervised: {m['content'][:60]!r}")
    return shown, problems


# --------------------------------------------------------------------------- run


def _load(config: Config, model_art, ctx):
    spec = model_art.spec
    if spec is None and (Path(model_art.path) / "model" / "adapter_config.json").is_file():
        raise RuntimeError(f"model '{model_art.name}' is a LoRA adapter; train on a merged model (merge = true).")
    if spec is not None and spec.backend != "hf":
        raise RuntimeError(f"model '{model_art.name}' uses the {spec.backend} backend; sft needs local weights.")
    return ctx.load_model(model_art, merge_adapter=True)


def _ensure_generation_markers(tok, ctx) -> None:
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tok.chat_template):
        return
    try:
        patched = get_training_chat_template(tok)
    except Exception:  # noqa: BLE001 - TRL knows only some templates
        patched = None
    if not patched:
        raise RuntimeError("the chat template has no {% generation %} markers, so assistant-only loss cannot "
                           f"tell assistant tokens from the rest. {FIX_TEMPLATE}")
    tok.chat_template = patched
    ctx.log.info("chat template had no {%% generation %%} markers; using TRL's training version of it")


def run(config: Config, inputs: dict, ctx) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTConfig, SFTTrainer

    from engine.models import release

    rows = inputs["input"].rows()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = min(config.per_device_batch_size, max(1, config.batch_size // processes))
    if config.batch_size % (per_device * processes):
        raise RuntimeError(f"batch_size {config.batch_size} is not divisible by per_device_batch_size {per_device} "
                           f"x {processes} processes; pick values whose product divides it.")
    accum = config.batch_size // (per_device * processes)

    model, tok = _load(config, inputs["model"], ctx)
    _ensure_generation_markers(tok, ctx)

    # ---- lengths and the length policy
    lengths, kept = [], []
    counts = {"over_length": 0, "shortened": 0, "dropped": 0}
    length = lambda msgs: _length(tok, msgs)  # noqa: E731
    for row in rows:
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        n = length(msgs)
        lengths.append(n)
        if n > config.max_length:
            counts["over_length"] += 1
        out, what = fit(msgs, config.length_policy, config.max_length, length)
        if what in counts:
            counts[what] += 1
        if out is not None:
            kept.append(out)
    if counts["over_length"]:
        ctx.warn(f"{counts['over_length']} of {len(rows)} conversations exceed max_length {config.max_length} tokens "
                 f"(policy {config.length_policy}: {counts['shortened']} shortened, {counts['dropped']} dropped)")
    if not kept:
        raise RuntimeError(f"no conversation fits max_length {config.max_length} after length_policy "
                           f"'{config.length_policy}' (longest is {max(lengths, default=0)} tokens); raise max_length "
                           f"or use length_policy = \"keep_recent\" or \"truncate\".")
    ctx.log.info("%d conversations to train on (%d in; %d over max_length)", len(kept), len(rows), counts["over_length"])

    peft_config = None
    if config.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                                 target_modules=config.lora.target_modules, task_type="CAUSAL_LM")

    cuda = torch.cuda.is_available()
    ckpt_dir = Path(ctx.partial_dir) / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    args = SFTConfig(
        output_dir=str(ckpt_dir), assistant_only_loss=True, max_length=config.max_length,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=accum, learning_rate=config.lr,
        num_train_epochs=config.epochs, max_steps=config.max_steps if config.max_steps else -1,
        lr_scheduler_type=config.scheduler, warmup_steps=float(config.warmup_ratio), weight_decay=config.weight_decay,
        save_steps=config.save_steps, save_total_limit=2, logging_steps=config.logging_steps, report_to=[],
        seed=ctx.seed, data_seed=ctx.seed, use_cpu=not cuda, bf16=cuda and torch.cuda.is_bf16_supported(),
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, dataloader_num_workers=0,
    )
    model.train()
    data = Dataset.from_list([{"messages": m} for m in kept])

    timing: dict[int, float] = {}

    class Speed(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0, self.seen0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, a, state, control, **kw):
            dt = time.perf_counter() - getattr(self, "t0", time.perf_counter())
            seen = state.num_input_tokens_seen - getattr(self, "seen0", state.num_input_tokens_seen)
            if dt > 0:
                timing[state.global_step] = round(seen / dt, 1)

    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=peft_config, callbacks=[Speed()])

    # ---- mask check on a real collated batch, before any step
    n = min(len(kept), per_device)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    report_lines, problems = [], []
    for i in range(n):
        ids = batch["input_ids"][i].tolist()
        labels = batch["labels"][i].tolist()
        shown, probs = mask_problems(tok, kept[i], ids, labels)
        report_lines.append(f"=== example {i}\n{shown}\n")
        problems += [f"example {i}: {p}" for p in probs]
    (Path(ctx.out_dir) / "mask_check.txt").write_text("\n".join(report_lines), encoding="utf-8")
    if problems:
        raise RuntimeError(f"assistant-only loss mask is wrong ({'; '.join(problems[:3])}). {FIX_TEMPLATE}")
    ctx.log.info("mask check ok on %d examples (mask_check.txt)", n)

    # ---- train (resume from the last checkpoint when there is one)
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last:
        ctx.log.info("resuming from checkpoint %s", last)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    elapsed = time.perf_counter() - started

    # ---- save
    out_model = Path(ctx.out_dir) / "model"
    if peft_config is not None and config.merge:
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(out_model, safe_serialization=True)
    else:
        trainer.save_model(str(out_model))
    tok.save_pretrained(out_model)

    steps = [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate"),
              "tokens_per_s": timing.get(h["step"])}
             for h in trainer.state.log_history if "loss" in h]
    ctx.save_json("metrics.json", {"steps": steps})
    losses = [s["loss"] for s in steps]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    ctx.save_json("report.json", {
        "rows_in": len(rows), "rows_trained": len(kept), "max_length": config.max_length,
        "length_policy": config.length_policy, **counts,
        "steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None, "train_seconds": round(elapsed, 2),
        "tokens_seen": trainer.state.num_input_tokens_seen, "trainable_params": trainable,
        "lora": config.lora.model_dump() if config.lora else None, "merged": bool(config.lora and config.merge),
        "resumed_from": Path(last).name if last else None,
        "batch": {"global": config.batch_size, "per_device": per_device, "accumulation": accum},
    })
    del trainer
    release(model)


def summary(report: dict) -> list[tuple[str, str]]:
    fl = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    kind = "full" if not report.get("lora") else ("LoRA (merged)" if report.get("merged") else "LoRA adapter")
    return [("rows in / trained", f"{report['rows_in']} / {report['rows_trained']}"),
            (f"over max_length {report['max_length']}", f"{report['over_length']} (policy {report['length_policy']}: "
                                                         f"{report['shortened']} shortened, {report['dropped']} dropped)"),
            ("steps", str(report["steps"])),
            ("loss first -> final", f"{fl(report['first_loss'])} -> {fl(report['final_loss'])}"),
            ("weights", f"{kind}, {report['trainable_params']} trainable params")]

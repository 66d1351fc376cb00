"""Running a TRL trainer the engine's way: checkpoints to resume from, TrainingArguments from a
stage config, a step callback for progress and timings, saving (merged or adapter, with a
portable base.json), the check that the collator's labels supervise exactly the assistant turns,
and the loss and reward curves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from engine.lib.knobs import knob_args
from engine.lib.tracking import tracking_args
from engine.lib.training import REWARD_KEYS, Batch, Lora
from engine.models.chatmask import FIX_TEMPLATE, special_ids


def checkpoint_dir(ctx) -> Path:
    path = Path(ctx.partial_dir) / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def last_checkpoint(ckpt_dir: Path, ctx) -> str | None:
    """The newest complete checkpoint in `ckpt_dir` (logged), or None. The trainer writes a
    checkpoint's files in place and `trainer_state.json` last, so a process killed while saving
    leaves a directory without it: such a checkpoint is skipped, and removed by the main process."""
    found = sorted(
        (int(m.group(1)), p)
        for p in Path(ckpt_dir).glob("checkpoint-*")
        if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    )
    complete = [p for _, p in found if (p / "trainer_state.json").is_file()]
    for _, p in found:
        if p not in complete:
            ctx.log.warning("checkpoint %s is incomplete (killed while saving?); ignoring it", p.name)
            if ctx.is_main:
                shutil.rmtree(p, ignore_errors=True)
    if not complete:
        return None
    ctx.say(f"resuming from checkpoint {complete[-1].name} (the steps before it are kept)")
    return str(complete[-1])


def trainer_args(config, ctx, batch: Batch, ckpt_dir: Path, model: Any = None, has_eval: bool = False) -> dict:
    """Keyword arguments every training stage passes to its TRL config the same way, then the
    knobs the recipe set (engine.lib.knobs; `has_eval`: held-out rows to evaluate on). The trainer
    stays on the device the model was loaded on (a small model is placed on the CPU)."""
    import torch

    cuda = torch.cuda.is_available() and (model is None or next(model.parameters()).device.type == "cuda")
    return (
        dict(
            output_dir=str(ckpt_dir),
            per_device_train_batch_size=batch.per_device,
            gradient_accumulation_steps=batch.accumulation,
            learning_rate=config.lr,
            num_train_epochs=config.epochs,
            max_steps=config.max_steps if config.max_steps else -1,
            lr_scheduler_type=config.scheduler,
            warmup_steps=float(config.warmup_ratio),  # transformers 5: a value below 1 is a share of the steps
            weight_decay=config.weight_decay,
            save_steps=config.save_steps,
            save_total_limit=2,
            logging_steps=config.logging_steps,
            seed=ctx.seed,
            data_seed=ctx.seed,
            use_cpu=not cuda,
            bf16=cuda and torch.cuda.is_bf16_supported(),
            include_num_input_tokens_seen="non_padding",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        | tracking_args(ctx)
        | knob_args(config, has_eval)
    )


def step_callback(ctx, timing: dict[int, float]):
    """A TrainerCallback that records input tokens/s of each optimizer step into `timing` (from
    the trainer's own token count, gathered over processes), advances the run's progress bar and
    writes each logged step to the stage log (instead of transformers printing dicts)."""
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        t0 = seen0 = task = None

        def on_train_begin(self, args, state, control, **kw):
            self.task = ctx.progress(state.max_steps, "training", unit="steps")
            self.task.advance(state.global_step)  # resumed: steps already done

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.seen0 = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            if self.task is not None:
                self.task.advance(1)
            if self.t0 is None:
                return
            dt, seen = time.perf_counter() - self.t0, state.num_input_tokens_seen - self.seen0
            if dt > 0 and seen > 0:
                timing[state.global_step] = round(seen / dt, 1)

        def on_log(self, args, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs and "loss" in logs:
                shown = {k: v for k, v in logs.items() if k == "loss" or k.startswith("rewards/")}
                ctx.log.info(
                    "step %d/%d: %s",
                    state.global_step,
                    state.max_steps,
                    ", ".join(f"{k} {v:.4g}" for k, v in shown.items() if isinstance(v, (int, float))),
                )

    return Steps()


def settle(trainer, log=None) -> None:
    """What every training stage does to its trainer before training. transformers' PrinterCallback
    (a dict per step on stdout) goes: the stage log has the steps. And training in one process uses
    one device: on a node with several GPUs the Trainer would wrap the model in DataParallel and
    silently multiply the global batch by the GPU count; several devices are `[resources]
    processes`, one per device, under accelerate."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    args = trainer.args
    if args.n_gpu > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        if log is not None:
            log.info("%d GPUs visible: training on %s only (processes = N trains on N)", args.n_gpu, args.device)
        args._n_gpu = 1
        trainer._train_batch_size = args.train_batch_size


def save_model(trainer, tok, ctx, model_input, lora: Lora | None, merge: bool) -> Path:
    """Write `model/`: full weights (loadable with from_pretrained), the merged LoRA weights, or the
    adapter plus `base.json` (how to load its base again). Only the main process writes.

    The folder is portable: nothing in it names a path of this machine (a runs dir can be moved or
    shared), and two runs in different runs dirs write the same bytes. So the trainer's pickled
    `training_args.bin` (it holds the output dir) and PEFT's generated model card are left out, and
    `adapter_config.json` names its base as base.json does, with its target modules sorted."""
    out = Path(ctx.out_dir) / "model"
    if lora is not None and merge:
        merged = trainer.model.merge_and_unload()
        if ctx.is_main:
            merged.save_pretrained(out, safe_serialization=True)
    else:
        trainer.save_model(str(out))  # rank-aware
    if ctx.is_main:
        tok.save_pretrained(out)
        for machine_state in ("training_args.bin", "README.md"):
            (out / machine_state).unlink(missing_ok=True)
        if lora is not None and not merge:
            base = ctx.describe_model(model_input)
            (out / "base.json").write_text(json.dumps(base, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            portable_adapter_config(out / "adapter_config.json", base)
    return out


def portable_adapter_config(path: Path, base: dict) -> None:
    """PEFT writes the base's absolute path and a set of module names in hash order: name the base
    as base.json does (`builtin:tiny-chat`, a hub id, `stage:<fingerprint>`) and sort the modules."""
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base["spec"]["path"] if "spec" in base else f"stage:{base['stage']}"
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def weights_kind(report: dict) -> str:
    return "full" if not report.get("lora") else ("LoRA (merged)" if report.get("merged") else "LoRA adapter")


def length_line(report: dict) -> tuple[str, str]:
    """The `recipe show` line for a report's length counts."""
    return (
        f"over max_length {report['max_length']}",
        f"{report['over_length']} (policy {report['length_policy']}: {report['shortened']} shortened, "
        f"{report['dropped']} dropped)",
    )


def step_metrics(
    log_history: list[dict], keys: tuple[str, ...] = (), timing: dict[int, float] | None = None
) -> list[dict]:
    """One dict per logged training step: step, loss, lr, the named `keys` (None when absent) and tokens/s."""
    timing = timing or {}
    return [
        {
            "step": h["step"],
            "loss": h["loss"],
            "lr": h.get("learning_rate"),
            **{k: h.get(k) for k in keys},
            "tokens_per_s": timing.get(h["step"]),
        }
        for h in log_history
        if "loss" in h and "step" in h
    ]


def eval_metrics(log_history: list[dict]) -> list[dict]:
    """One dict per eval during training: step and eval loss."""
    return [{"step": h["step"], "eval_loss": h["eval_loss"]} for h in log_history if "eval_loss" in h]


def eval_report(evals: list[dict], held: int, steps_done: int, max_steps: int) -> dict:
    """What report.json says of the evals during training (nothing when there were none)."""
    if not evals:
        return {}
    best = min(evals, key=lambda e: e["eval_loss"])
    return {
        "eval_rows": held,
        "eval_loss_first": evals[0]["eval_loss"],
        "eval_loss_final": evals[-1]["eval_loss"],
        "eval_loss_best": best["eval_loss"],
        "eval_best_step": best["step"],
        "stopped_early": steps_done < max_steps,
    }


def eval_line(report: dict) -> list[tuple[str, str]]:
    """The summary line of the evals during training (none when there were none)."""
    if report.get("eval_loss_first") is None:
        return []
    stop = f"; stopped early at step {report['steps']}" if report.get("stopped_early") else ""
    return [
        (
            f"eval loss ({report['eval_rows']} held-out rows)",
            f"{report['eval_loss_first']:.4f} -> {report['eval_loss_final']:.4f} "
            f"(best {report['eval_loss_best']:.4f} at step {report['eval_best_step']}{stop})",
        )
    ]


def plot_loss(path: Path, steps: list[dict], title: str, evals: list[dict] | None = None) -> None:
    from engine.core.plots import lines

    series = {"loss": ([s["step"] for s in steps], [s["loss"] for s in steps])}
    if evals:
        series["eval loss"] = ([e["step"] for e in evals], [e["eval_loss"] for e in evals])
    lines(path, series, title=title, ylabel="loss")


def plot_rewards(out_dir: Path, steps: list[dict], title: str) -> list[str]:
    """`rewards.png` (chosen, rejected, margins) and `accuracies.png` (share of pairs whose chosen
    reward is higher); a file only when the trainer logged its series. Returns the files written."""
    from engine.core.plots import lines

    xs = [s["step"] for s in steps]
    written = []
    series = {
        k.split("/")[1]: (xs, [s.get(k) for s in steps])
        for k in REWARD_KEYS[:3]
        if any(s.get(k) is not None for s in steps)
    }
    if series:
        lines(Path(out_dir) / "rewards.png", series, title=f"{title}: implicit rewards", ylabel="reward")
        written.append("rewards.png")
    if any(s.get(REWARD_KEYS[3]) is not None for s in steps):
        lines(
            Path(out_dir) / "accuracies.png",
            {"accuracy": (xs, [s.get(REWARD_KEYS[3]) for s in steps])},
            title=f"{title}: reward accuracy",
            ylabel="share of pairs",
        )
        written.append("accuracies.png")
    return written


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
    special = special_ids(tok)
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
        rest = body[len(content.strip()) :]
        for sid in special:
            rest = rest.replace(tok.convert_ids_to_tokens(sid) or "\0", "")
        if rest.strip():
            problems.append(f"span {k} supervises more than the assistant turn: {text[:80]!r}")
        tail = [t for t in input_ids[a:b] if tok.decode([t]).strip()]
        if not tail or tail[-1] not in special:
            problems.append(f"the end-of-turn token of assistant turn {k} is not supervised")
    sup = "".join(texts)
    for m in messages:
        if (
            m["role"] in ("system", "user")
            and m["content"].strip() in sup
            and not any(m["content"].strip() in c for c in assistants)
        ):
            problems.append(f"{m['role']} text is supervised: {m['content'][:60]!r}")
    return shown, problems


def _collated_examples(batch: dict, packed: bool) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of each conversation in a collated batch: padding removed, and a
    packed (padding-free) row split where its position ids restart at 0."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        if packed:
            pos = batch["position_ids"][i].tolist()
            starts = [k for k, p in enumerate(pos) if p == 0] + [len(pos)]
            out += [(ids[a:b], labels[a:b]) for a, b in zip(starts, starts[1:])]
        else:
            keep = batch["attention_mask"][i].tolist()
            out.append(([t for t, k in zip(ids, keep) if k], [lab for lab, k in zip(labels, keep) if k]))
    return out


def mask_check(trainer, tok, kept, by_ids: dict[int, int], n: int, packed: bool, ctx) -> None:
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(min(n, len(trainer.train_dataset)))])
    lines, problems = [], []
    for i, (ids, labels) in enumerate(_collated_examples(batch, packed)):
        # packing reorders conversations: find each one by its tokens
        index = by_ids.get(hash(tuple(ids))) if packed else i
        if index is None:
            problems.append(f"example {i}: its tokens match no conversation (the trainer tokenized it differently)")
            continue
        shown, probs = mask_problems(tok, kept[index], ids, labels)
        lines.append(f"=== example {i}\n{shown}\n")
        problems += [f"example {i}: {p}" for p in probs]
    if ctx.is_main:
        from engine.core.io import atomic_write_text

        atomic_write_text(Path(ctx.out_dir) / "mask_check.txt", "\n".join(lines))
    if problems:
        raise RuntimeError(f"assistant-only loss mask is wrong ({'; '.join(problems[:3])}). {FIX_TEMPLATE}")
    ctx.log.info("mask check ok on %d examples (mask_check.txt)", len(lines))

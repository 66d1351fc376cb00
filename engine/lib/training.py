"""What the training stages (sft, dpo/kto/orpo) share, written once.

- `batch_split`: the global batch -> per-device rows x processes (WORLD_SIZE) x accumulation.
- `Lora`, `lora_config`, `check_lora_targets`: the `[stages.X.lora]` table, the PEFT config it
  makes, and a check (before any step) that every named target module exists in the model.
- `chat_ids`, `fit`, `fit_context`: lengths measured with the model's own chat template, and the
  length policies (drop, keep the most recent turns, cut the earliest turns' text). What is trained
  on (the final assistant turn, a preference pair's chosen/rejected reply) is never cut.
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

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from engine.spec.config import Table
from engine.core.errors import Problem, RecipeError

Messages = list[dict]


def user_error(ctx, key: str, message: str, hint: str | None = None) -> RecipeError:
    """A bad-input error found at the start of a stage, located at `stages.<stage>.<key>` (exit 2)."""
    return RecipeError.single(f"stage '{ctx.stage}': {message}", hint=hint,
                              **ctx.recipe.where(f"stages.{ctx.stage}.{key}"))


def load_weights(ctx, art, key: str):
    """(model, tokenizer) with local weights to train or to use as a reference: a LoRA adapter
    (a [models] adapter or a stage-made one) is merged into its base. `key` names the config field."""
    if art.spec is not None and art.spec.backend != "hf":
        raise user_error(ctx, key, f"model '{art.name}' uses the {art.spec.backend} backend; training needs local "
                                   "weights.", hint="Point it at a [models] table with backend = \"hf\".")
    return ctx.load_model(art, merge_adapter=True)


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
        raise ValueError(f"batch_size {batch_size} is not divisible by per_device_batch_size {per_device} x "
                         f"{processes} processes; pick values whose product divides it.")
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
        "all-linear", description="Module names to adapt (e.g. [\"q_proj\", \"v_proj\"]), or 'all-linear'.")


def lora_config(lora: Lora | None):
    """A peft LoraConfig for the table, or None (full fine-tune)."""
    if lora is None:
        return None
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def adaptable_modules(model) -> dict[str, str]:
    """Module path -> class name for every module LoRA can adapt (linear, embedding, conv)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    return {path: type(m).__name__ for path, m in model.named_modules()
            if isinstance(m, kinds) or type(m).__name__ == "Conv1D"}  # Conv1D: GPT-2's linear


def check_lora_targets(model, lora: Lora | None, ctx) -> None:
    """Every named target module must exist in the model (as PEFT matches names: the module's
    own name or a dotted suffix of its path), checked before training starts."""
    if lora is None or lora.target_modules == "all-linear":
        return
    modules = adaptable_modules(model)
    missing = [t for t in lora.target_modules if not any(p == t or p.endswith("." + t) for p in modules)]
    if missing:
        linear = sorted({p.rsplit(".", 1)[-1] for p, cls in modules.items() if cls in ("Linear", "Conv1D")})
        raise user_error(ctx, "lora.target_modules",
                         f"LoRA target module{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
                         f"not found in the model.",
                         hint=f"The model's linear modules are: {', '.join(linear)}. Use some of those, or "
                              "target_modules = \"all-linear\".")


# --------------------------------------------------------------------------- lengths


def chat_ids(tok, messages: Messages) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template (what the trainers see)."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def _groups(messages: Messages) -> tuple[Messages, list[Messages]]:
    """(system messages, [user, assistant, ...] groups each starting at a user turn)."""
    system = [m for m in messages if m["role"] == "system"]
    groups: list[Messages] = []
    for m in (m for m in messages if m["role"] != "system"):
        if m["role"] == "user" or not groups:
            groups.append([m])
        else:
            groups[-1].append(m)
    return system, groups


def fit_context(context: Messages, policy: str, max_length: int,
                length: Callable[[Messages], int]) -> tuple[Messages | None, str]:
    """Fit the context (the turns before what is trained on) so that `length(context)` -- which
    includes the trained reply -- is at most max_length. Returns (context or None, 'fits' |
    'shortened' | 'dropped'). `keep_recent` drops the earliest user/assistant groups (the system
    message stays, the last group always stays); `truncate` cuts the left of the earliest non-system
    turns' text, one turn after another."""
    if length(context) <= max_length:
        return context, "fits"
    if policy == "drop":
        return None, "dropped"
    if policy == "keep_recent":
        system, groups = _groups(context)
        while len(groups) > 1:
            groups = groups[1:]
            cand = system + [m for g in groups for m in g]
            if length(cand) <= max_length:
                return cand, "shortened"
        return None, "dropped"
    msgs = [dict(m) for m in context]
    for m in msgs:
        if m["role"] == "system":
            continue
        text = m["content"]
        lo, hi = 0, len(text)  # cut `k` leading characters; find the smallest k that fits
        m["content"] = "…"
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


def fit(messages: Messages, policy: str, max_length: int,
        length: Callable[[Messages], int]) -> tuple[Messages | None, str]:
    """A conversation for sft under a length policy. `length(messages) -> tokens`. The final
    assistant turn is never cut or dropped on its own: a row whose last exchange alone is too long
    is dropped. Returns (messages or None, 'fits' | 'shortened' | 'dropped')."""
    if length(messages) <= max_length:
        return messages, "fits"
    if policy == "drop":
        return None, "dropped"
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    context, final = messages[:last], messages[last]  # anything after the final reply teaches nothing
    out, what = fit_context(context, policy, max_length, lambda c: length(c + [final]))
    return (None, "dropped") if out is None else (out + [final], "shortened")


@dataclass
class LengthReport:
    over_length: int = 0
    shortened: int = 0
    dropped: int = 0
    longest: int = 0

    def as_json(self) -> dict:
        return {"over_length": self.over_length, "shortened": self.shortened, "dropped": self.dropped,
                "longest": self.longest}

    def count(self, n: int, max_length: int, what: str) -> None:
        self.longest = max(self.longest, n)
        self.over_length += n > max_length
        if what in ("shortened", "dropped"):
            setattr(self, what, getattr(self, what) + 1)


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
        problems.append(Problem(f"stage '{name}' has an empty input list.", hint="Name at least one dataset or stage.",
                                **recipe.where(f"stages.{name}.input")))
    if config.weights is not None:
        where = recipe.where(f"stages.{name}.weights")
        if len(config.weights) != len(inputs):
            problems.append(Problem(
                f"stage '{name}' has {len(config.weights)} weights for {len(inputs)} inputs.",
                hint=f"Give one weight per input, in the order of input = {inputs}.", **where))
        bad = [w for w in config.weights if not w > 0]
        if bad:
            problems.append(Problem(f"stage '{name}': weights must be above 0 (found {bad[0]}).",
                                    hint="Remove an input instead of weighting it 0.", **where))
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
    mix = [{"input": a.name, "rows": len(r), "weight": w, "taken": t}
           for a, r, w, t in zip(arts, lists, weights, taken)]
    ctx.log.info("mixture: %s", "; ".join(f"{m['input']} {m['taken']} of {m['rows']} (weight {m['weight']:g})"
                                          for m in mix))
    return rows, mix


def training_rows(config, inputs: dict, ctx, what: str) -> tuple[list[dict], list[dict], "Batch"]:
    """The start every training stage shares: its rows (mixed), what was taken of each input,
    and the batch split; an empty input or an impossible batch is a bad-input error (exit 2)."""
    rows, mix = mixed_rows(config, inputs, ctx)
    if not rows:
        raise user_error(ctx, "input", f"no {what} to train on (input: {', '.join(m['input'] for m in mix)}).",
                         hint="Check that the dataset has rows and that the data checks kept some "
                              "(the run prints rows dropped per reason).")
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


def checkpoint_dir(ctx) -> Path:
    path = Path(ctx.partial_dir) / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path


def last_checkpoint(ckpt_dir: Path, ctx) -> str | None:
    """The newest complete checkpoint in `ckpt_dir` (logged), or None. The trainer writes a
    checkpoint's files in place and `trainer_state.json` last, so a process killed while saving
    leaves a directory without it: such a checkpoint is skipped, and removed by the main process."""
    found = sorted((int(m.group(1)), p) for p in Path(ckpt_dir).glob("checkpoint-*")
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    complete = [p for _, p in found if (p / "trainer_state.json").is_file()]
    for _, p in found:
        if p not in complete:
            ctx.log.warning("checkpoint %s is incomplete (killed while saving?); ignoring it", p.name)
            if ctx.is_main:
                shutil.rmtree(p, ignore_errors=True)
    if not complete:
        return None
    ctx.log.info("resuming from checkpoint %s", complete[-1])
    return str(complete[-1])


def trainer_args(config, ctx, batch: Batch, ckpt_dir: Path, model: Any = None) -> dict:
    """Keyword arguments every training stage passes to its TRL config the same way. The trainer
    stays on the device the model was loaded on (a small model is placed on the CPU)."""
    import torch

    cuda = torch.cuda.is_available() and (model is None or next(model.parameters()).device.type == "cuda")
    return dict(
        output_dir=str(ckpt_dir), per_device_train_batch_size=batch.per_device,
        gradient_accumulation_steps=batch.accumulation, learning_rate=config.lr, num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps else -1, lr_scheduler_type=config.scheduler,
        warmup_steps=float(config.warmup_ratio),  # transformers 5: a value below 1 is a share of the steps
        weight_decay=config.weight_decay, save_steps=config.save_steps, save_total_limit=2,
        logging_steps=config.logging_steps, report_to=[], seed=ctx.seed, data_seed=ctx.seed, use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(), include_num_input_tokens_seen="non_padding",
        disable_tqdm=True, dataloader_num_workers=0,
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
                ctx.log.info("step %d/%d: %s", state.global_step, state.max_steps,
                             ", ".join(f"{k} {v:.4g}" for k, v in shown.items() if isinstance(v, (int, float))))

    return Steps()


def quiet(trainer) -> None:
    """Drop transformers' PrinterCallback (a dict per step on stdout): the stage log has the steps."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


# --------------------------------------------------------------------------- saving


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
    return (f"over max_length {report['max_length']}",
            f"{report['over_length']} (policy {report['length_policy']}: {report['shortened']} shortened, "
            f"{report['dropped']} dropped)")


# --------------------------------------------------------------------------- metrics and plots


def step_metrics(log_history: list[dict], keys: tuple[str, ...] = (),
                 timing: dict[int, float] | None = None) -> list[dict]:
    """One dict per logged training step: step, loss, lr, the named `keys` (None when absent) and tokens/s."""
    timing = timing or {}
    return [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate"), **{k: h.get(k) for k in keys},
             "tokens_per_s": timing.get(h["step"])}
            for h in log_history if "loss" in h and "step" in h]


def plot_loss(path: Path, steps: list[dict], title: str) -> None:
    from engine.core.plots import lines

    lines(path, {"loss": ([s["step"] for s in steps], [s["loss"] for s in steps])}, title=title, ylabel="loss")


REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def plot_rewards(out_dir: Path, steps: list[dict], title: str) -> list[str]:
    """`rewards.png` (chosen, rejected, margins) and `accuracies.png` (share of pairs whose chosen
    reward is higher); a file only when the trainer logged its series. Returns the files written."""
    from engine.core.plots import lines

    xs = [s["step"] for s in steps]
    written = []
    series = {k.split("/")[1]: (xs, [s.get(k) for s in steps]) for k in REWARD_KEYS[:3]
              if any(s.get(k) is not None for s in steps)}
    if series:
        lines(Path(out_dir) / "rewards.png", series, title=f"{title}: implicit rewards", ylabel="reward")
        written.append("rewards.png")
    if any(s.get(REWARD_KEYS[3]) is not None for s in steps):
        lines(Path(out_dir) / "accuracies.png", {"accuracy": (xs, [s.get(REWARD_KEYS[3]) for s in steps])},
              title=f"{title}: reward accuracy", ylabel="share of pairs")
        written.append("accuracies.png")
    return written

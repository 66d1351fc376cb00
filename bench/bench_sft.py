"""Benchmark: the engine's sft stage versus a plain TRL script doing the same job; packing on vs off.

    .venv/bin/python bench/bench_sft.py [--rows 96] [--steps 60] [--repeats 3] [--pack-steps 12]
        [--model builtin:tiny-chat] [--threads 1]

The same job both ways: the same conversations (multi-turn, of varied lengths), the same model,
SFTTrainer with assistant_only_loss, the same steps, batch, max_length, learning rate, schedule and
checkpoint interval; the script saves the model and tokenizer at the end, as the stage does. The
engine side is everything `recipe run` does for the stage (validation, fingerprints, data loading and
checks, length measuring, the mask check, checkpoints, metrics, the loss plot, the cache commit)
through `engine.run.executor.run` on a recipe in a temporary folder, forced to rebuild.

Runs alternate (engine, script, engine, ...) after one untimed warm-up of each, and the medians are
compared: wall-time ratio engine / script (target: at most 1.15). Then the stage with packing on and
off: input tokens/s of the training loop (tokens seen / train seconds from report.json). Timings on
a shared CPU are noisy: compare medians, never a single run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LR, BATCH, MAX_LENGTH, SAVE_STEPS = 1e-3, 8, 1024, 50  # every conversation fits 1024: both sides train on all rows


def conversations(n: int) -> list[dict]:
    """Multi-turn conversations of varied length (1-3 exchanges, short to long replies)."""
    out = []
    for i in range(n):
        msgs = []
        for t in range(1 + i % 3):
            msgs.append({"role": "user", "content": f"Question {i}.{t}: how does part {i % 7} relate to part {t}?"})
            msgs.append({"role": "assistant", "content": f"Part {i % 7} feeds part {t}. " * (1 + (i * 7 + t) % 9)})
        out.append({"id": f"c{i}", "messages": msgs})
    return out


RECIPE = """
[recipe]
name = "bench-sft"
seed = 1

[models.policy]
path = "{model}"

[datasets.chats]
path = "data/chats.jsonl"

[stages.train]
kind = "sft"
input = "chats"
model = "policy"
lr = {lr}
max_steps = {steps}
batch_size = {batch}
per_device_batch_size = {batch}
max_length = {max_length}
save_steps = {save_steps}
packing = {packing}
"""


def engine_run(root: Path, runs: Path, model: str, steps: int, packing: bool = False) -> tuple[float, dict]:
    from engine.load.loader import load_recipe
    from engine.run.executor import run

    recipe = root / "recipe.toml"
    recipe.write_text(
        textwrap.dedent(RECIPE).format(
            model=model,
            lr=LR,
            steps=steps,
            batch=BATCH,
            max_length=MAX_LENGTH,
            save_steps=SAVE_STEPS,
            packing="true" if packing else "false",
        )
    )
    t = time.perf_counter()
    record = run(load_recipe(recipe), runs, force=["train"])
    wall = time.perf_counter() - t
    out = record.dir / "stages" / "train"
    report = json.loads((out / "report.json").read_text())
    report["train_seconds"] = json.loads((out / "metrics.json").read_text())["train_seconds"]  # timings live there
    return wall, report


def trl_run(rows: list[dict], model_dir: str, out: Path, steps: int) -> float:
    """The plain script: what a user would write with TRL for the same job."""
    t = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(out / "ckpt"),
        assistant_only_loss=True,
        max_length=MAX_LENGTH,
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        max_steps=steps,
        lr_scheduler_type="cosine",
        save_steps=SAVE_STEPS,
        save_total_limit=2,
        logging_steps=1,
        report_to=[],
        seed=1,
        use_cpu=not cuda,
        disable_tqdm=True,
        # TRL defaults to bf16=True, autocast even on a CPU (slower there): same precision as the stage
        bf16=cuda and torch.cuda.is_bf16_supported(),
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    trainer.remove_callback(PrinterCallback)  # as the stage does: no dict per step on stdout
    trainer.train()
    trainer.save_model(str(out / "model"))
    tok.save_pretrained(out / "model")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pack-steps", type=int, default=12, help="steps of each packing on/off run")
    ap.add_argument("--model", default="builtin:tiny-chat")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    ap.add_argument("--part", choices=["all", "ratio", "packing"], default="all")
    args = ap.parse_args()

    import torch
    from transformers.utils import logging as hf_logging

    from engine.models.builtins import builtin_dir

    # one intra-op thread: on a shared CPU, a second OpenMP thread that gets descheduled stalls every
    # parallel region (runs of the same job measured 20 s and 179 s with 2 threads); both sides alike
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    runs = work / "runs"
    rows = conversations(args.rows)
    (work / "proj" / "data").mkdir(parents=True)
    (work / "proj" / "data" / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = (
        str(builtin_dir(args.model.split(":", 1)[1], runs / "cache"))
        if args.model.startswith("builtin:")
        else args.model
    )

    # warm-up (imports, first-touch allocations), untimed
    engine_run(work / "proj", runs, args.model, 2)
    trl_run(rows, model_dir, work / "trl-warm", 2)
    print(
        f"job: {args.rows} conversations, batch {BATCH}, max_length {MAX_LENGTH}, {args.model}, "
        f"{args.threads} torch thread(s)"
    )

    if args.part in ("all", "ratio"):
        engine_times, trl_times = [], []
        for i in range(args.repeats):
            wall, report = engine_run(work / "proj", runs, args.model, args.steps)
            assert report["rows_trained"] == args.rows, "the stage dropped rows: not the script's job any more"
            engine_times.append(wall)
            trl_times.append(trl_run(rows, model_dir, work / f"trl-{i}", args.steps))
        e, s = statistics.median(engine_times), statistics.median(trl_times)
        shown = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        print(f"plain TRL script ({args.steps} steps): {s:7.2f} s  (median of {args.repeats}: {shown(trl_times)})")
        print(f"engine sft stage ({args.steps} steps): {e:7.2f} s  (median of {args.repeats}: {shown(engine_times)})")
        print(f"wall-time ratio:  {e / s:7.3f}   (engine / script; target <= 1.15)")

    if args.part in ("all", "packing"):
        speeds: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for packing in (False, True):
                _, report = engine_run(work / "proj", runs, args.model, args.pack_steps, packing=packing)
                speeds[packing].append(report["tokens_seen"] / report["train_seconds"])
        off, on = statistics.median(speeds[False]), statistics.median(speeds[True])
        print(f"packing off:      {off:9.0f} tokens/s (training loop, median of {args.repeats})")
        print(f"packing on:       {on:9.0f} tokens/s ({on / off:.2f}x)")


if __name__ == "__main__":
    main()

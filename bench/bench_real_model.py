"""Benchmark: a real model (builtin:smollm2-135m) on this machine's CPU: where generation and SFT time goes.

    .venv/bin/python bench/bench_real_model.py [--prompts 64] [--new-tokens 32] [--sft-steps 3] [--quick]

Generation (tokens/s, every variant on the same prompts with exactly --new-tokens new tokens each,
so the numbers compare like for like; ratios are against the baseline run in this same process):
- baseline: what the hf backend did before this benchmark existed: `model.generate` with
  do_sample under `torch.no_grad`, at its old default batch of 16 prompts, float32, sdpa attention.
- backend: the hf backend as it is now (inference mode, a random stream per row, end-of-turn stop),
  at batch sizes 1, 16, 32 and 64 (64 rows is now the stages' default: decoding on a CPU reads every
  weight once per step, so more rows per step is nearly free until compute takes over).
- variants of the backend at batch 64: eager attention instead of sdpa; 1 thread instead of all;
  bfloat16 weights.

SFT (input tokens/s of the training loop, from the stage's report.json): the sft stage on 16
conversations, batch 8, max_length 256, full fine-tune and LoRA (r 16, all-linear).

The last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Give me three tips for a job interview.",
    "How do tides work?",
    "Write a haiku about autumn.",
    "What causes rain?",
    "How do I boil an egg?",
    "Summarise the plot of Romeo and Juliet.",
]


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (question {i})"}] for i in range(n)]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def baseline_generate(model, tok, batch: list[list[dict]], new_tokens: int, batch_size: int) -> None:
    """The previous backend's path: num_return_sequences sampling under no_grad, global seed per batch."""
    import torch

    enc = [
        tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for p in batch
    ]
    for start in range(0, len(enc), batch_size):
        rows = enc[start : start + batch_size]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for r, x in enumerate(rows):
            ids[r, width - len(x) :], att[r, width - len(x) :] = torch.tensor(x), 1
        torch.manual_seed(start)
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=att,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=True,
                temperature=1.0,
                num_return_sequences=1,
                pad_token_id=tok.pad_token_id,
            )


def generation(args, cache: Path) -> dict:
    import torch

    from engine.models.backends import SamplingParams
    from engine.models.backends.hf import HFBackend
    from engine.models.weights import load_model

    model, tok = load_model(args.model, cache_root=cache)
    model.generation_config.min_new_tokens = args.new_tokens  # exactly N new tokens everywhere
    batch = prompts(args.prompts)
    total = args.prompts * args.new_tokens
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
    out: dict = {}

    def backend(size: int, m=model) -> None:
        HFBackend(m, tok, batch_size=size).generate(batch, params, seed=0)

    backend(4)  # warm-up (allocator, kernels)
    base = timed(lambda: baseline_generate(model, tok, batch, args.new_tokens, 16))
    out["baseline_b16"] = total / base
    print(f"generation baseline (batch 16): {total / base:7.1f} tokens/s", flush=True)
    for size in (16, 64) if args.quick else (1, 16, 32, 64):
        t = timed(lambda: backend(size))
        out[f"backend_b{size}"] = total / t
        print(f"hf backend, batch {size:2d}:        {total / t:7.1f} tokens/s  ({base / t:4.2f}x baseline)", flush=True)
    if not args.quick:
        model.config._attn_implementation = "eager"
        model.set_attn_implementation("eager")
        t = timed(lambda: backend(64))
        out["eager_b64"] = total / t
        print(f"  eager attention, batch 64:   {total / t:7.1f} tokens/s  ({base / t:4.2f}x baseline)", flush=True)
        model.set_attn_implementation("sdpa")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t = timed(lambda: backend(64))
        torch.set_num_threads(threads)
        out["one_thread_b64"] = total / t
        print(
            f"  1 thread (of {threads}), batch 64:   {total / t:7.1f} tokens/s  ({base / t:4.2f}x baseline)", flush=True
        )
        bf16 = model.to(torch.bfloat16)
        t = timed(lambda: backend(64, bf16))
        out["bf16_b64"] = total / t
        print(f"  bfloat16 weights, batch 64:  {total / t:7.1f} tokens/s  ({base / t:4.2f}x baseline)", flush=True)
    return out


SFT_RECIPE = """
[recipe]
name = "bench-real-sft"
seed = 1
[models.policy]
path = "{model}"
[datasets.chats]
path = "chats.jsonl"
[stages.train]
kind = "sft"
input = "chats"
model = "policy"
lr = 2e-5
max_steps = {steps}
batch_size = 8
per_device_batch_size = 8
max_length = 256
{lora}
"""


def sft(args, cache: Path) -> dict:
    from engine.load.loader import load_recipe
    from engine.run.executor import run

    work = Path(tempfile.mkdtemp(prefix="bench-real-sft-"))
    rows = []
    for i in range(16):
        msgs = []
        for t in range(1 + i % 3):
            msgs += [
                {"role": "user", "content": f"{PROMPTS[(i + t) % len(PROMPTS)]} Please answer carefully."},
                {"role": "assistant", "content": "Here is a careful answer. " * (4 + (i * 5 + t) % 12)},
            ]
        rows.append({"id": f"c{i}", "messages": msgs})
    (work / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {}
    for name, lora in (
        ("full", ""),
        ("lora", '[stages.train.lora]\nr = 16\nalpha = 32\ntarget_modules = "all-linear"'),
    ):
        (work / "r.toml").write_text(
            textwrap.dedent(SFT_RECIPE).format(model=args.model, steps=args.sft_steps, lora=lora)
        )
        record = run(load_recipe(work / "r.toml"), work / "runs", force=["train"])
        report = json.loads((record.dir / "stages" / "train" / "report.json").read_text())
        seconds = json.loads((record.dir / "stages" / "train" / "metrics.json").read_text())["train_seconds"]
        tps = report["tokens_seen"] / seconds
        out[f"sft_{name}_tokens_per_s"] = tps
        out[f"sft_{name}_s_per_step"] = seconds / report["steps"]
        print(
            f"sft {name:4s}: {tps:7.1f} input tokens/s, {seconds / report['steps']:.1f} s per step "
            f"(batch 8, <= 256 tokens)",
            flush=True,
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--sft-steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="Only the baseline, batch 16, and the sft numbers.")
    ap.add_argument("--skip-sft", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RECIPE_BUILTIN_DIR", str(Path(__file__).resolve().parent.parent / ".cache" / "builtin"))
    cache = Path(tempfile.mkdtemp(prefix="bench-real-"))
    t0 = time.perf_counter()
    result = {"model": args.model, **generation(args, cache)}
    if not args.skip_sft:
        result.update(sft(args, cache))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()

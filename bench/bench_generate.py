"""Benchmark: the batched `hf` backend versus a one-prompt-at-a-time generate loop.

    .venv/bin/python bench/bench_generate.py [--prompts 64] [--new-tokens 64]

Same prompts, same number of new tokens (min_new_tokens forces it in both), builtin model,
this CPU. Reports tokens/s of both and the ratio (target: at least 8x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import torch

    from engine.models.backends import SamplingParams
    from engine.models.backends.hf import HFBackend
    from engine.models.weights import load_model

    torch.set_num_threads(2)
    model, tok = load_model("builtin:tiny-chat", cache_root=Path(tempfile.mkdtemp()))
    # force exactly N new tokens in both paths, so tokens/s compare like for like
    model.generation_config.min_new_tokens = args.new_tokens
    prompts = [
        [{"role": "user", "content": f"Question {i}: " + "tell me about tides " * (1 + i % 5)}]
        for i in range(args.prompts)
    ]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    total = args.prompts * args.new_tokens

    t = time.perf_counter()
    for p in prompts:  # the tutorial loop: one prompt, one generate call
        ids = tok.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            model.generate(**ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    loop = time.perf_counter() - t

    backend = HFBackend(model, tok, batch_size=args.batch_size)
    t = time.perf_counter()
    backend.generate(prompts, params, seed=0)
    batched = time.perf_counter() - t
    print(f"one at a time: {total / loop:9.0f} tokens/s ({loop:.2f} s, baseline)")
    print(f"hf backend:    {total / batched:9.0f} tokens/s ({batched:.2f} s, batch {args.batch_size})")
    print(f"ratio:         {loop / batched:9.1f}x (target >= 8x)")


if __name__ == "__main__":
    main()

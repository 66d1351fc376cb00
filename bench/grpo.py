"""GRPO against rejection-sampling fine-tuning on arithmetic: SmolLM2 base, after
recipes/grpo_arithmetic.toml (online RL with the math_answer verifier as reward) and after
bench/grpo_rft.toml (one round of rejection-sampling fine-tuning with the same verifier, about the
same number of generated samples), on the held-out arithmetic suite.

    python bench/grpo.py [--runs-dir DIR] [--set KEY=VALUE ...]

Both recipes run through the CLI in one runs dir (cached on a re-run); `--set` applies to both
(e.g. `--set stages.eval.arithmetic_file=/path/to/problems.jsonl`, or
`--set models.policy.path=builtin:tiny-chat` for a smoke run). Printed: held-out accuracy with
95% intervals (Wilson), the paired differences from base (bootstrap; * = outside the noise), the
GRPO stage's step time split into generation and optimization; the last line is one JSON object
{"base": A, "grpo": A, "rft": A, "seconds": S} (accuracies in 0..1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.paired import eval_entry, run  # noqa: E402

KEY = "arithmetic_accuracy"


def main() -> None:
    from engine.lib.evals.stats import compare, fmt_difference, fmt_rate, headline

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.time()
    grpo_dir = run(ROOT / "recipes" / "grpo_arithmetic.toml", args.runs_dir, args.sets)
    rft_dir = run(ROOT / "bench" / "grpo_rft.toml", args.runs_dir, args.sets)
    seconds = time.time() - start

    (g_metrics, g_rows), (r_metrics, r_rows) = eval_entry(grpo_dir), eval_entry(rft_dir)
    of = lambda rows, name: [r for r in rows if r["model"] == name]  # noqa: E731
    base = of(g_rows, g_metrics["models"][0])
    runs = {"base": base, "grpo": of(g_rows, g_metrics["models"][-1]), "rft": of(r_rows, r_metrics["models"][-1])}
    heads = {name: headline(rows).get(KEY) for name, rows in runs.items()}
    print()
    print(f"{'held-out arithmetic accuracy':<30}{'':>24}{'minus base':>26}")
    for name, rows in runs.items():
        diff = "" if name == "base" else fmt_difference(compare(base, rows).get(KEY))
        print(f"{name:<30}{fmt_rate(heads[name]):>24}{diff:>26}")
    steps = json.loads((grpo_dir / "stages" / "rl" / "metrics.json").read_text())["steps"]
    gen = [s["generate_s"] for s in steps if s.get("generate_s") is not None]
    opt = [s["optimize_s"] for s in steps if s.get("optimize_s") is not None]
    if gen and opt:
        print(
            f"grpo step: {sum(gen) / len(gen):.1f} s generating + {sum(opt) / len(opt):.1f} s optimizing "
            f"(mean of {len(gen)} steps)"
        )
    print("(95% intervals in brackets; differences paired over the same problems, * = interval excludes 0)")
    print(f"runs: {grpo_dir} and {rft_dir}; {seconds:.0f} s for both")
    rate = lambda h: None if h is None else h.get("rate")  # noqa: E731
    print(json.dumps({**{k: rate(h) for k, h in heads.items()}, "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()

"""Benchmark: `recipe validate` / `plan` on a 10-stage recipe, and the file-hash memo.

    .venv/bin/python bench/bench_plan.py [--mb 500]

Reports ratios against baselines measured in this same script:
- validate/plan wall time (CLI as a subprocess) against a bare `python -c pass`;
- a second `plan` over a large data file against the first (the first hashes the file,
  the second reads the hash from runs/cache/hashes.json): target at least 20x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(cmd: list[str], repeat: int = 5, env=None) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def ten_stage_recipe(root: Path, data_name: str) -> Path:
    lines = ["[recipe]", 'name = "bench"', "seed = 1", "", "[datasets.seed]", f'path = "{data_name}"', ""]
    prev = "seed"
    for i in range(10):
        lines += [f"[stages.s{i}]", 'kind = "filter"', f'input = "{prev}"', f"min_words = {i}", ""]
        prev = f"s{i}"
    path = root / "bench.toml"
    path.write_text("\n".join(lines))
    return path


def write_big(path: Path, mb: int) -> None:
    row = (
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "How do tides work? " * 8},
                    {"role": "assistant", "content": "The moon pulls the oceans. " * 20},
                ]
            }
        )
        + "\n"
    )
    block = row * max(1, (1 << 20) // len(row))
    with open(path, "w") as fh:
        for _ in range(mb):
            fh.write(block)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=500, help="size of the large data file")
    args = ap.parse_args()
    py = sys.executable
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = tmp / "small.jsonl"
        small.write_text(
            json.dumps(
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
            )
            + "\n"
        )
        recipe = ten_stage_recipe(tmp, small.name)
        runs = tmp / "runs"
        base = timed([py, "-c", "pass"], env=env)
        val = timed([py, "-m", "engine.cli", "validate", str(recipe)], env=env)
        plan = timed([py, "-m", "engine.cli", "plan", str(recipe), "--runs-dir", str(runs)], env=env)
        print(f"python -c pass:            {base * 1000:7.1f} ms (baseline)")
        print(f"validate, 10 stages:       {val * 1000:7.1f} ms  ({val / base:.1f}x baseline)")
        print(f"plan, 10 stages:           {plan * 1000:7.1f} ms  ({plan / base:.1f}x baseline)")

        big = tmp / "big.jsonl"
        write_big(big, args.mb)
        recipe.write_text(recipe.read_text().replace(small.name, big.name))
        from engine.load.loader import load_recipe
        from engine.run.plan import make_plan, memo_for

        r = load_recipe(recipe)
        t = time.perf_counter()
        make_plan(r, runs, memo_for(runs))
        first = time.perf_counter() - t
        t = time.perf_counter()
        make_plan(r, runs, memo_for(runs))  # a fresh memo object reads the state file, as a new process would
        second = time.perf_counter() - t
        print(f"plan over {args.mb} MB, first:   {first * 1000:7.1f} ms (hashes the file)")
        print(
            f"plan over {args.mb} MB, second:  {second * 1000:7.1f} ms  ({first / second:.0f}x faster; target >= 20x)"
        )
        cli_first = timed([py, "-m", "engine.cli", "plan", str(recipe), "--runs-dir", str(tmp / "runs2")], 1, env)
        cli_second = timed([py, "-m", "engine.cli", "plan", str(recipe), "--runs-dir", str(tmp / "runs2")], 3, env)
        print(
            f"same through the CLI:      {cli_first * 1000:7.1f} ms -> {cli_second * 1000:7.1f} ms "
            f"({cli_first / cli_second:.1f}x; includes interpreter start-up)"
        )


if __name__ == "__main__":
    main()

"""Benchmark: a fully cached `recipe run` of the flagship against `recipe plan` of it.

    .venv/bin/python bench/bench_cached_run.py [--repeats 7] [--runs-dir DIR]

Builds the flagship's smoke run (on builtin:tiny-chat) once (about a minute on 2 idle cores; skipped when --runs-dir already holds it),
then times, as CLI subprocesses, --repeats fully cached runs and --repeats plans, and a cached run
whose report cache (runs/cache/figures) was emptied first (the old behaviour: every figure drawn
again, matplotlib imported). Reports medians and ratios against `plan` (the floor: loading the
recipe and checking the cache). A cached run must not draw: its ratio to plan should be near 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGSHIP = ROOT / "recipes" / "caI_multiturn.toml"
SMOKE = ["--set", "models.policy.path=builtin:tiny-chat"]  # the flagship's smoke run: what is timed is caching


def timed(args: list[str], repeats: int, before=None) -> float:
    times = []
    for _ in range(repeats):
        if before:
            before()
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "engine.cli", *args], check=True, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--runs-dir", default=None)
    args = ap.parse_args()
    runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="bench-cached-"))
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", str(FLAGSHIP), *SMOKE, "--runs-dir", str(runs)],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    build = time.perf_counter() - t
    run = ["run", str(FLAGSHIP), *SMOKE, "--runs-dir", str(runs)]
    plan = timed(["plan", str(FLAGSHIP), *SMOKE, "--runs-dir", str(runs)], args.repeats)
    cached = timed(run, args.repeats)
    redraw = timed(
        run, max(3, args.repeats // 2), before=lambda: shutil.rmtree(runs / "cache" / "figures", ignore_errors=True)
    )
    timed(run, 1)  # leave the figure cache filled
    print(f"flagship first run (or cached check) {build:.1f} s")
    print(f"plan                         {plan:.3f} s  (1.00x)")
    print(f"run, fully cached            {cached:.3f} s  ({cached / plan:.2f}x plan)")
    print(f"run, cached, report redrawn  {redraw:.3f} s  ({redraw / plan:.2f}x plan)")
    print(
        json.dumps(
            {
                "plan_s": plan,
                "cached_run_s": cached,
                "redrawn_report_run_s": redraw,
                "cached_over_plan": cached / plan,
                "redrawn_over_plan": redraw / plan,
            }
        )
    )


if __name__ == "__main__":
    main()

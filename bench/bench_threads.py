"""Benchmark: two recipe runs on the same cores, with all threads each against a share each.

    .venv/bin/python bench/bench_threads.py [--items 6]

An eval-heavy recipe on builtin:tiny-chat (safety, refusal, sycophancy, diversity; --items per
suite). Timed as CLI subprocesses, each configuration in fresh runs dirs: one run alone (the
baseline), two at once with `--threads auto` (each uses every core), two at once with
`--threads cores/2`. Reported: wall time of the slower of each pair against the baseline, and
whether the rows of all runs are identical per thread count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = """
[recipe]
name = "threads"
seed = 5
[models.policy]
path = "builtin:tiny-chat"
[stages.ev]
kind = "eval"
models = ["policy"]
suites = ["safety", "refusal", "sycophancy", "diversity"]
max_items = {items}
max_new_tokens = 24
"""


def start(recipe: Path, runs: Path, threads: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "run", str(recipe), "--runs-dir", str(runs), "--threads", threads],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def timed(recipe: Path, work: Path, threads: str, count: int) -> tuple[float, list[bytes]]:
    t = time.perf_counter()
    procs = [start(recipe, work / f"runs-{threads}-{count}-{i}", threads) for i in range(count)]
    for p in procs:
        assert p.wait() == 0
    wall = time.perf_counter() - t
    rows = [
        (work / f"runs-{threads}-{count}-{i}" / "threads" / "latest" / "stages" / "ev" / "rows.parquet").read_bytes()
        for i in range(count)
    ]
    return wall, rows


def main() -> None:
    from engine.core.threads import available_cores

    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=6)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    recipe = work / "r.toml"
    recipe.write_text(textwrap.dedent(RECIPE.format(items=args.items)))
    cores = available_cores()
    share = str(max(1, cores // 2))
    subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", str(recipe), "--runs-dir", str(work / "warm")],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )  # builds the builtin model once
    alone, rows_alone = timed(recipe, work, "auto", 1)
    both_auto, rows_auto = timed(recipe, work, "auto", 2)
    both_share, rows_share = timed(recipe, work, share, 2)
    _alone_share, rows_alone_share = timed(recipe, work, share, 1)
    print(f"{cores} cores; eval of 4 suites x {args.items} items on builtin:tiny-chat")
    print(f"{'one run, ' + str(cores) + ' threads':<32}{alone:7.1f} s  (1.00x)")
    print(f"{'two runs at once, ' + str(cores) + ' threads each':<32}{both_auto:7.1f} s  ({both_auto / alone:.2f}x)")
    print(f"{'two runs at once, ' + share + ' thread(s) each':<32}{both_share:7.1f} s  ({both_share / alone:.2f}x)")
    print(
        f"rows identical: auto runs {len(set(rows_alone + rows_auto)) == 1}, "
        f"{share}-thread runs {len(set(rows_share + rows_alone_share)) == 1}, "
        f"across thread counts {len(set(rows_alone + rows_share)) == 1}"
    )
    print(
        json.dumps(
            {
                "cores": cores,
                "alone_s": alone,
                "two_auto_s": both_auto,
                "two_share_s": both_share,
                "two_auto_ratio": both_auto / alone,
                "two_share_ratio": both_share / alone,
            }
        )
    )


if __name__ == "__main__":
    main()

"""Benchmark: a generation-heavy recipe locally, and on a local Ray cluster with 1 and 2 workers.

    .venv/bin/python bench/bench_ray.py [--prompts 48] [--new-tokens 48] [--repeats 2]

The recipe: multi-turn generation (3 exchanges) over --prompts prompts on builtin:tiny-chat, then
a rules judge. Each configuration rebuilds the generate stage (--force) in a fresh process-level
run; the Ray cluster is started once (its start-up is reported apart). Reported: median wall time
of each, and the ratios against the local run. On a 2-core machine expect little gain from a
second worker (the local run already uses both cores for torch); the point is the mechanism's
overhead: payload pickling, worker start, model loads per worker, the driver's assembly pass.
The rows of every configuration are checked equal.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = """
[recipe]
name = "bench-ray"
seed = 4

[models.policy]
path = "builtin:tiny-chat"

[datasets.prompts]
path = "prompts.jsonl"
type = "prompts"

[stages.talk]
kind = "generate"
mode = "multi_turn"
input = "prompts"
model = "policy"
turns = 3
max_new_tokens = {new}
shard_size = 4
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import ray

    from engine.load.loader import load_recipe
    from engine.run.executor import run

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    (work / "prompts.jsonl").write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt": f"Question {i}: how do tides and {i} moons interact?"}) + "\n"
            for i in range(args.prompts)
        )
    )
    (work / "r.toml").write_text(textwrap.dedent(RECIPE).format(new=args.new_tokens))
    t = time.perf_counter()
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}
    )
    startup = time.perf_counter() - t

    configs = {"local": ("local", None), "ray, 1 worker": ("ray", 1), "ray, 2 workers": ("ray", 2)}
    times: dict[str, list[float]] = {c: [] for c in configs}
    rows: dict[str, bytes] = {}
    run(load_recipe(work / "r.toml"), work / "runs", force=["talk"])  # warm-up: the builtin model, imports
    for _ in range(args.repeats):
        for name, (executor, workers) in configs.items():
            sets = [f"stages.talk.resources.replicas={workers}"] if workers else []
            t = time.perf_counter()
            record = run(load_recipe(work / "r.toml", sets=sets), work / "runs", force=["talk"], executor=executor)
            times[name].append(time.perf_counter() - t)
            rows[name] = (record.dir / "stages" / "talk" / "rows.parquet").read_bytes()
    assert len(set(rows.values())) == 1, "the configurations made different rows"
    base = statistics.median(times["local"])
    print(
        f"{args.prompts} prompts x 3 turns x {args.new_tokens} new tokens, builtin:tiny-chat; "
        f"Ray local cluster start-up {startup:.1f} s (not counted)"
    )
    result = {"startup_s": startup}
    for name, ts in times.items():
        m = statistics.median(ts)
        result[name] = m
        print(f"{name:16} {m:7.2f} s  ({m / base:.2f}x local; runs: {', '.join(f'{x:.2f}' for x in ts)})")
    print("rows identical in every configuration")
    print(json.dumps(result))
    ray.shutdown()


if __name__ == "__main__":
    main()

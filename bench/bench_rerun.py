"""Benchmark: re-runs that cost only what changed (early cutoff, row memos, eval per model).

    .venv/bin/python bench/bench_rerun.py [--align-prompts 40] [--skip-align]

Every number is counted or timed in this process, against a baseline run in the same script:

1. No-op upstream change: a filter setting that keeps every row; stages re-run after it, and
   prompts sent to a model (counted by wrapping the hf backend's `generate`).
2. 2 prompts added to 20: prompts sent to the model on the re-run, and whether the first run's
   rows for the 20 are byte-identical (rows compared, and the re-run against a run from scratch).
3. Tuned model changed (the SFT learning rate): eval prompts sent per model on the re-run.
4. recipes/align_smollm2.toml (SmolLM2-135M): its rejection-sampling stage `best_of_base` on the
   first N training prompts, then on N + 10, against N + 10 from scratch: the ratio of stage
   times (target <= 0.15).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

RECIPE = """
[recipe]
name = "bench-rerun"
seed = 11

[models.policy]
path = "builtin:tiny-chat"

[datasets.convs]
path = "data/convs.jsonl"

[stages.clean]
kind = "filter"
input = "convs"
min_words = 2

[stages.gen]
kind = "generate"
input = "clean"
model = "policy"
n = 2
max_new_tokens = 12

[stages.sft]
kind = "sft"
input = "gen"
model = "policy"
max_steps = 2
batch_size = 4
lr = 1e-4

[stages.eval]
kind = "eval"
models = ["policy", "sft"]
suites = ["refusal", "sycophancy"]
max_items = 6
max_new_tokens = 8
"""

CALLS: Counter = Counter()  # "stage:model" -> prompts sent


def count_calls() -> None:
    from engine.models.backends import hf

    original = hf.HFBackend.generate

    def generate(self, prompts, params, seeds):
        CALLS[getattr(self, "bench_name", "model")] += len(prompts)
        return original(self, prompts, params, seeds)

    hf.HFBackend.generate = generate  # type: ignore[method-assign]


def convs(n: int) -> list[dict]:
    return [
        {
            "id": f"c{i}",
            "messages": [
                {"role": "user", "content": f"Question {i}: why does topic {i} matter to people?"},
                {"role": "assistant", "content": f"Answer {i}: it matters because it shapes daily choices."},
            ],
        }
        for i in range(n)
    ]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def rows_of(record, stage: str) -> list[dict]:
    from engine.data.rows import read_rows

    return read_rows(record.dir / "stages" / stage / "rows.parquet")


def rerun_section(work: Path) -> None:
    from engine.load.loader import load_recipe
    from engine.run.executor import run

    proj, runs = work / "proj", work / "runs"
    (proj / "recipe.toml").parent.mkdir(parents=True, exist_ok=True)
    (proj / "recipe.toml").write_text(textwrap.dedent(RECIPE))
    write(proj / "data" / "convs.jsonl", convs(20))
    t = time.perf_counter()
    first = run(load_recipe(proj / "recipe.toml"), runs)
    base_s = time.perf_counter() - t
    print(f"first run (20 prompts): {base_s:.1f} s, {sum(CALLS.values())} prompts sent to a model")

    CALLS.clear()
    t = time.perf_counter()
    rec = run(load_recipe(proj / "recipe.toml", ["stages.clean.min_words=3"]), runs)
    ran = [n for n, s in rec.data["stages"].items() if s["status"] == "run" and n != "clean"]
    print(
        f"1. no-op upstream change (clean.min_words 2 -> 3, every reply longer): {len(ran)} stages after it "
        f"re-ran, {sum(CALLS.values())} prompts sent; {time.perf_counter() - t:.2f} s "
        f"({(time.perf_counter() - t) / base_s:.3f} of the first run); note: {rec.data['stages']['clean'].get('note')}"
    )

    CALLS.clear()
    write(proj / "data" / "convs.jsonl", convs(22))
    t = time.perf_counter()
    rec = run(load_recipe(proj / "recipe.toml"), runs)
    gen = rec.data["stages"]["gen"]
    before = {r["id"]: r for r in rows_of(first, "gen")}
    after = {r["id"]: r for r in rows_of(rec, "gen")}
    same = all(after[i] == r for i, r in before.items())
    sent = CALLS["gen:policy"]
    fresh = run(load_recipe(proj / "recipe.toml"), work / "fresh")
    print(
        f"2. 2 prompts added to 20: gen sent {sent} prompts to the model (2 expected, n = 2 samples each); "
        f"reused {gen.get('rows_reused')}, computed {gen.get('rows_computed')}; the 20 old prompts' rows "
        f"byte-identical: {same}; re-run equals a run from scratch: {rows_of(fresh, 'gen') == rows_of(rec, 'gen')}"
    )

    CALLS.clear()
    t = time.perf_counter()
    rec = run(load_recipe(proj / "recipe.toml", ["stages.sft.lr=2e-4"]), runs)
    ev = rec.data["stages"]["eval"]
    print(
        f"3. tuned model changed (sft lr 1e-4 -> 2e-4): eval prompts sent: base model {CALLS['eval:policy']}, "
        f"sft {CALLS['eval:sft']}; eval items reused {ev.get('rows_reused')}, computed {ev.get('rows_computed')}"
    )


def align_section(work: Path, n: int, max_new_tokens: int) -> None:
    from engine.load.loader import load_recipe
    from engine.run.executor import run

    src = ROOT / "recipes"
    proj = work / "align"
    shutil.copytree(src, proj, ignore=shutil.ignore_patterns("__pycache__"))
    data = proj / "data" / "safety_prompts.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    sets = [f"stages.best_of_base.max_new_tokens={max_new_tokens}"]
    recipe = proj / "align_smollm2.toml"

    data.write_text("".join(lines[:n]))
    run(load_recipe(recipe, sets), work / "align-runs", only=["best_of_base"])
    data.write_text("".join(lines[: n + 10]))
    rec = run(load_recipe(recipe, sets), work / "align-runs", only=["best_of_base"])
    again = rec.data["stages"]["best_of_base"]
    scratch = run(load_recipe(recipe, sets), work / "align-scratch", only=["best_of_base"])
    whole = scratch.data["stages"]["best_of_base"]["duration_s"]
    print(
        f"4. align_smollm2 best_of_base, {n} prompts then 10 added: re-run {again['duration_s']:.1f} s "
        f"(reused {again.get('rows_reused')}, computed {again.get('rows_computed')}) against {whole:.1f} s from "
        f"scratch on {n + 10}: ratio {again['duration_s'] / whole:.3f} (target <= 0.15)"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--align-prompts", type=int, default=125, help="training prompts before the 10 added")
    ap.add_argument("--align-max-new-tokens", type=int, default=64)
    ap.add_argument("--skip-align", action="store_true")
    args = ap.parse_args()
    count_calls()
    from engine.run.context import Context

    made = Context.backend

    def backend(self, model, batch_size=64):  # label each backend "stage:model", for the counts
        b = made(self, model, batch_size)
        b.bench_name = f"{self.stage}:{model.name}"
        return b

    Context.backend = backend  # type: ignore[method-assign]
    work = Path(tempfile.mkdtemp(prefix="bench-rerun-"))
    try:
        rerun_section(work)
        if not args.skip_align:
            align_section(work, args.align_prompts, args.align_max_new_tokens)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

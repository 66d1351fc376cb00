"""A recipe against its control, side by side: what bench/alignment.py and bench/flagship.py share.

Both recipes run through the CLI (`recipe run`) in one runs dir, so the control reuses what it
shares with the recipe (the base model's eval, per model x item) and a re-run is cached. `--set`
overrides apply to both. Printed: base, final and control with 95% intervals, and the
differences from base with paired bootstrap intervals (* = outside the noise); the last line is
one JSON object {"base": M, "final": M, "control": M, "seconds": S}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(recipe: Path, runs: Path, sets: list[str]) -> Path:
    """`recipe run` it; the run's directory (runs/<recipe name>/latest, resolved; the name may come
    from `extends` or `--set`)."""
    from engine.load.loader import load_recipe

    cmd = [sys.executable, "-m", "engine.cli", "run", str(recipe), "--runs-dir", str(runs)]
    for s in sets:
        cmd += ["--set", s]
    print("$ recipe", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return (runs / load_recipe(recipe, sets=sets).name / "latest").resolve()


def eval_entry(run_dir: Path) -> tuple[dict, list[dict]]:
    from engine.data.rows import read_rows

    entry = run_dir / "stages" / "eval"
    return json.loads((entry / "metrics.json").read_text()), read_rows(entry / "rows.parquet")


def final_model(run_dir: Path, stage: str) -> str:
    record = json.loads((run_dir / "record.json").read_text())
    return str((run_dir.parent.parent / "cache" / record["stages"][stage]["fingerprint"]).resolve())


def main(
    doc: str,
    recipe: Path,
    control: Path,
    keys: dict[str, str],
    more: tuple[str, ...],
    final_stage: str,
    control_stage: str | None = None,
    labels: tuple[str, str] = ("final", "control"),
    head_to_head: bool = False,
) -> None:
    """`keys`: JSON name -> headline metric; `more`: headline metrics printed but not in the JSON.
    `labels` name the two recipes' final models (columns and JSON keys); `control_stage` is the
    second recipe's final stage (default `final_stage`); `head_to_head` adds the paired difference
    of the two final models (both evals must hold the same items)."""
    from engine.lib.evals.stats import compare, fmt_difference, fmt_rate, headline

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.time()
    main_dir = run(recipe, args.runs_dir, args.sets)
    control_dir = run(control, args.runs_dir, args.sets)
    seconds = time.time() - start

    metrics, rows = eval_entry(main_dir)
    c_metrics, c_rows = eval_entry(control_dir)
    base_name, final_name = metrics["models"][0], metrics["models"][-1]
    seed = tomllib.loads((main_dir / "recipe.toml").read_text())["recipe"].get("seed", 0)  # as the eval stage
    of = lambda rs, name: [r for r in rs if r["model"] == name]  # noqa: E731
    base_rows, final_rows, control_rows = of(rows, base_name), of(rows, final_name), of(c_rows, c_metrics["models"][-1])
    final, other = labels
    heads = {"base": headline(base_rows, seed), final: headline(final_rows, seed), other: headline(control_rows, seed)}
    diffs = {
        f"{final} - base": compare(base_rows, final_rows, seed),
        f"{other} - base": compare(base_rows, control_rows, seed),
    }
    if head_to_head:
        diffs[f"{final} - {other}"] = compare(control_rows, final_rows, seed)

    width = 34
    print()
    print(
        f"{'rate (phrase detector)':<{width}}"
        + "".join(f"{c:>22}" for c in ("base", final, other))
        + "".join(f"{c:>26}" for c in diffs)
    )
    for k in (*keys.values(), *more):
        print(
            f"{k:<{width}}"
            + "".join(f"{fmt_rate(heads[c].get(k)):>22}" for c in ("base", final, other))
            + "".join(f"{fmt_difference(d.get(k)):>26}" for d in diffs.values())
        )
    print("(95% intervals in brackets; differences paired over the same prompts, * = interval excludes 0)")
    print(f"runs: {main_dir} and {control_dir}; {seconds:.0f} s for both")

    def m(name: str, model: str | None) -> dict:
        out = {k: (heads[name].get(h) or {}).get("rate") for k, h in keys.items()}
        if model is not None:
            out["final_model"] = model
        return out

    print(
        json.dumps(
            {
                "base": m("base", None),
                final: m(final, final_model(main_dir, final_stage)),
                other: m(other, final_model(control_dir, control_stage or final_stage)),
                "seconds": round(seconds, 1),
            }
        )
    )

"""Does the safety recipe align a real model? Runs recipes/align_smollm2.toml and its control
(recipes/align_smollm2_control.toml: every preference swapped) and prints base, final and
control side by side with 95% intervals, and the differences from base with paired bootstrap
intervals (* = outside the noise).

    .venv/bin/python bench/alignment.py [--runs-dir DIR] [--set KEY=VALUE ...]

Both recipes run through the CLI (`recipe run`), in one runs dir so the control reuses nothing
it should not (every stage it changes has another fingerprint) and a re-run is cached. `--set`
overrides apply to both (e.g. reduced sizes for a quick look). The last line is one JSON object:
{"base": M, "final": M, "control": M, "seconds": S}, each M holding adversarial_refusal,
benign_over_refusal, safety_refusal_from_harmful, sycophancy_flip (rates in 0..1, null where
undefined) and, for final and control, final_model: the path of the final model's cache entry.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "align_smollm2.toml"
CONTROL = ROOT / "recipes" / "align_smollm2_control.toml"
KEYS = ("adversarial_refusal", "benign_over_refusal", "safety_refusal_from_harmful", "sycophancy_flip")
MORE = ("refusal_discrimination", "safety_refusal_before_harmful")  # printed, not in the JSON line


def run(recipe: Path, name: str, runs: Path, sets: list[str]) -> Path:
    """`recipe run` it; the run's directory (runs/<recipe name>/latest, resolved)."""
    cmd = [sys.executable, "-m", "engine.cli", "run", str(recipe), "--runs-dir", str(runs)]
    for s in sets:
        cmd += ["--set", s]
    print("$ recipe", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return (runs / name / "latest").resolve()


def eval_entry(run_dir: Path) -> tuple[dict, list[dict]]:
    from engine.data.rows import read_rows

    entry = run_dir / "stages" / "eval"
    return json.loads((entry / "metrics.json").read_text()), read_rows(entry / "rows.parquet")


def final_model(run_dir: Path) -> str:
    record = json.loads((run_dir / "record.json").read_text())
    return str((run_dir.parent.parent / "cache" / record["stages"]["dpo"]["fingerprint"]).resolve())


def main() -> None:
    from engine.lib.evals.stats import compare, fmt_difference, fmt_rate, headline

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.time()
    main_dir = run(RECIPE, "align-smollm2", args.runs_dir, args.sets)
    control_dir = run(CONTROL, "align-smollm2-control", args.runs_dir, args.sets)
    seconds = time.time() - start

    metrics, rows = eval_entry(main_dir)
    c_metrics, c_rows = eval_entry(control_dir)
    base_name, final_name = metrics["models"][0], metrics["models"][-1]
    import tomllib

    seed = tomllib.loads((main_dir / "recipe.toml").read_text())["recipe"].get("seed", 0)  # as the eval stage
    of = lambda rs, name: [r for r in rs if r["model"] == name]  # noqa: E731
    base_rows, final_rows, control_rows = of(rows, base_name), of(rows, final_name), of(c_rows, c_metrics["models"][-1])
    heads = {
        "base": headline(base_rows, seed),
        "final": headline(final_rows, seed),
        "control": headline(control_rows, seed),
    }
    diffs = {"final": compare(base_rows, final_rows, seed), "control": compare(base_rows, control_rows, seed)}

    width = 30
    print()
    print(
        f"{'rate (phrase detector)':<{width}}"
        + "".join(f"{c:>22}" for c in ("base", "final", "control"))
        + "".join(f"{c:>26}" for c in ("final - base", "control - base"))
    )
    for k in (*KEYS, *MORE):
        print(
            f"{k:<{width}}"
            + "".join(f"{fmt_rate(heads[c].get(k)):>22}" for c in ("base", "final", "control"))
            + "".join(f"{fmt_difference(diffs[c].get(k)):>26}" for c in ("final", "control"))
        )
    print("(95% intervals in brackets; differences paired over the same prompts, * = interval excludes 0)")
    print(f"runs: {main_dir} and {control_dir}; {seconds:.0f} s for both")

    def m(name: str, model: str | None) -> dict:
        out = {k: (heads[name].get(k) or {}).get("rate") for k in KEYS}
        if model is not None:
            out["final_model"] = model
        return out

    print(
        json.dumps(
            {
                "base": m("base", None),
                "final": m("final", final_model(main_dir)),
                "control": m("control", final_model(control_dir)),
                "seconds": round(seconds, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

"""The grpo stage against a plain TRL GRPO script, same model, data, reward and settings.

    python bench/grpo_overhead.py [--steps N] [--runs-dir DIR] [--set KEY=VALUE ...]

Runs recipes/grpo_arithmetic.toml's `rl` stage for N steps through the CLI (a fresh runs dir
unless given; the builtin model is built there first if missing, outside the timing), then, in
this script, GRPOTrainer on the same weights, LoRA, prompts and verifier with the same
GRPOConfig values, N steps. Printed: the stage's training seconds (from its metrics.json) and wall
seconds (the whole stage: loading, the before/after greedy completions, saving the merged model),
the plain script's training seconds, and the ratios; the last line is one JSON object
{"stage_train_s", "stage_wall_s", "trl_train_s", "train_ratio", "wall_ratio"}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def plain_trl(model_dir: Path, config, steps: int, seed: int) -> float:
    """GRPOTrainer as a user would write it for this data and reward; its train() seconds."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from engine.lib.verifiers import math_answer

    lines = (ROOT / "recipes" / "data" / "arithmetic.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    data = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )

    def correct(prompts, completions, answer, **_):
        return [
            math_answer({"messages": [*p, c[-1]], "meta": {"answer": a}})
            for p, c, a in zip(prompts, completions, answer)
        ]

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lora = config.lora
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=config.per_device_batch_size,
            gradient_accumulation_steps=config.batch_size // config.per_device_batch_size,
            num_generations=config.num_generations,
            max_completion_length=config.max_completion_length,
            temperature=config.temperature,
            beta=config.beta,
            loss_type=config.loss_type,
            learning_rate=config.lr,
            max_steps=steps,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            seed=seed,
            disable_tqdm=True,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=[correct],
            args=args,
            train_dataset=data,
            processing_class=tok,
            peft_config=LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules="all-linear"
            ),
        )
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def main() -> None:
    from engine.load.loader import load_recipe
    from engine.models.builtins import _builtin_folder, builtin_root

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--runs-dir", type=Path, default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    recipe = ROOT / "recipes" / "grpo_arithmetic.toml"
    sets = [*args.sets, f"stages.rl.max_steps={args.steps}", f"recipe.name=grpo-overhead-{args.steps}"]
    runs = args.runs_dir or Path(tempfile.mkdtemp(prefix="grpo-overhead-"))
    cmd = [
        sys.executable,
        "-m",
        "engine.cli",
        "run",
        str(recipe),
        "--runs-dir",
        str(runs),
        "--only",
        "rl",
        "--force",
        "rl",
    ]
    for s in sets:
        cmd += ["--set", s]
    subprocess.run([*cmd, "--dry-run"], check=True, cwd=ROOT, capture_output=True)
    folder = builtin_root(runs / "cache") / _builtin_folder("smollm2-135m")
    if not folder.is_dir():  # build it outside the timing: a plan does not build, a tiny run does
        build = [a if a != "rl" else "rl" for a in cmd] + [
            "--set",
            "stages.rl.max_steps=1",
            "--set",
            "recipe.name=build",
        ]
        subprocess.run(build, check=True, cwd=ROOT, capture_output=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    stage_wall = time.perf_counter() - start
    r = load_recipe(recipe, sets=sets)
    run_dir = (runs / r.name / "latest").resolve()
    stage_train = json.loads((run_dir / "stages" / "rl" / "metrics.json").read_text())["train_seconds"]
    trl_train = plain_trl(folder, r.stages["rl"].config, args.steps, r.meta.seed)
    print(
        f"{args.steps} steps: stage {stage_train:.1f} s training ({stage_wall:.1f} s wall, with loading, the "
        f"before/after completions and saving), plain TRL {trl_train:.1f} s training; "
        f"ratio {stage_train / trl_train:.2f} (training), {stage_wall / trl_train:.2f} (wall)"
    )
    print(
        json.dumps(
            {
                "stage_train_s": round(stage_train, 1),
                "stage_wall_s": round(stage_wall, 1),
                "trl_train_s": round(trl_train, 1),
                "train_ratio": round(stage_train / trl_train, 3),
                "wall_ratio": round(stage_wall / trl_train, 3),
            }
        )
    )


if __name__ == "__main__":
    main()

"""The grpo stage against a plain TRL GRPO script, same model, data, reward and settings.

    python bench/grpo_overhead.py [--steps N] [--runs-dir DIR] [--set KEY=VALUE ...]

Runs recipes/grpo_arithmetic.toml's `rl` stage for N steps through the CLI (a fresh runs dir
unless given; the builtin model is built there first if missing, outside the timing), then, in
this script, GRPOTrainer on the same weights, LoRA, prompts and verifier with the same
GRPOConfig values, N steps. Printed: the stage's training seconds (from its metrics.json) and wall
seconds (the whole stage: loading, the before/after greedy completions, saving the merged model),
the plain script's training seconds, and the ratios; then, for both, the seconds spent generating
and scoring vs optimizing and the mean completion length (a step's cost follows its completions'
lengths, which differ between two samplers however seeded). The last line is one JSON object
{"stage_train_s", "stage_wall_s", "trl_train_s", "train_ratio", "wall_ratio", "stage_generate_s",
"trl_generate_s", "stage_mean_length", "trl_mean_length"}.
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


def plain_trl(model_dir: Path, config, steps: int, seed: int) -> dict:
    """GRPOTrainer as a user would write it for this data and these rewards (the verifier and a
    brevity rule at weight 0.5, as the recipe); its train() seconds, the seconds in generate-and-score,
    and the mean completion length."""
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

    def brief(completions, **_):
        return [float(len(c[-1]["content"].split()) <= 30) for c in completions]

    generating = [0.0]

    class Timed(GRPOTrainer):  # the same clock the stage has
        def _generate_and_score_completions(self, *args, **kw):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(*args, **kw)
            generating[0] += time.perf_counter() - t0
            return out

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
            top_p=config.top_p,
            beta=config.beta,
            loss_type=config.loss_type,
            reward_weights=[r.weight for r in config.rewards],
            learning_rate=config.lr,
            warmup_steps=config.warmup_ratio,
            max_steps=steps,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            seed=seed,
            disable_tqdm=True,
        )
        trainer = Timed(
            model=model,
            reward_funcs=[correct, brief],
            args=args,
            train_dataset=data,
            processing_class=tok,
            peft_config=LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules="all-linear"
            ),
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
        return {"train_s": seconds, "generate_s": generating[0], "mean_length": sum(lengths) / max(1, len(lengths))}


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
    metrics = json.loads((run_dir / "stages" / "rl" / "metrics.json").read_text())
    stage_train = metrics["train_seconds"]
    stage_gen = sum(s["generate_s"] or 0.0 for s in metrics["steps"])
    lengths = [s["completions/mean_length"] for s in metrics["steps"] if s.get("completions/mean_length") is not None]
    stage_len = sum(lengths) / max(1, len(lengths))
    config = r.stages["rl"].config
    assert [x.weight for x in config.rewards] == [1.0, 0.5], "the plain script mirrors the recipe's two rewards"
    plain = plain_trl(folder, config, args.steps, r.meta.seed)
    trl_train = plain["train_s"]
    print(
        f"{args.steps} steps: stage {stage_train:.1f} s training ({stage_wall:.1f} s wall, with loading, the "
        f"before/after completions and saving), plain TRL {trl_train:.1f} s training; "
        f"ratio {stage_train / trl_train:.2f} (training), {stage_wall / trl_train:.2f} (wall)"
    )
    print(
        f"generating and scoring: stage {stage_gen:.1f} s, plain TRL {plain['generate_s']:.1f} s; optimizing: stage "
        f"{stage_train - stage_gen:.1f} s, plain TRL {trl_train - plain['generate_s']:.1f} s; mean completion "
        f"length: stage {stage_len:.1f}, plain TRL {plain['mean_length']:.1f} tokens"
    )
    print(
        json.dumps(
            {
                "stage_train_s": round(stage_train, 1),
                "stage_wall_s": round(stage_wall, 1),
                "trl_train_s": round(trl_train, 1),
                "train_ratio": round(stage_train / trl_train, 3),
                "wall_ratio": round(stage_wall / trl_train, 3),
                "stage_generate_s": round(stage_gen, 1),
                "trl_generate_s": round(plain["generate_s"], 1),
                "stage_mean_length": round(stage_len, 1),
                "trl_mean_length": round(plain["mean_length"], 1),
            }
        )
    )


if __name__ == "__main__":
    main()

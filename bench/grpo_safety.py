"""Online RL against offline preferences on the same rewards: recipes/grpo_safety.toml (rejection
sampling, SFT, then GRPO on the rule reward) beside recipes/align_smollm2.toml (the same first two
stages, then best-vs-worst pairs and DPO), on the same eval items.

    .venv/bin/python bench/grpo_safety.py [--runs-dir DIR] [--set KEY=VALUE ...]

Both recipes run through the CLI in one runs dir: the shared stages (best_of_base, sft) and the
base and SFT models' eval rows are computed once. Printed: base, grpo and dpo with 95% intervals,
each against base and grpo against dpo with paired bootstrap intervals (* = outside the noise).
The last line is one JSON object {"base": M, "grpo": M, "dpo": M, "seconds": S}, each M holding
adversarial_refusal, benign_over_refusal, refusal_discrimination, safety_refusal_from_harmful and
sycophancy_flip (rates in 0..1, null where undefined) and, for grpo and dpo, final_model: the path
of the final model's cache entry.
"""

from __future__ import annotations

from paired import ROOT, main

KEYS = (
    "adversarial_refusal",
    "benign_over_refusal",
    "refusal_discrimination",
    "safety_refusal_from_harmful",
    "sycophancy_flip",
)
MORE = ("safety_refusal_before_harmful", "multiturn_benign_over_refusal")  # printed, not in the JSON line

if __name__ == "__main__":
    main(
        __doc__,
        ROOT / "recipes" / "grpo_safety.toml",
        ROOT / "recipes" / "align_smollm2.toml",
        {k: k for k in KEYS},
        MORE,
        final_stage="rl",
        control_stage="dpo",
        labels=("grpo", "dpo"),
        head_to_head=True,
    )

"""Does the flagship align a real model? Runs recipes/caI_multiturn.toml (constitutional AI on
multi-turn conversations, on builtin:smollm2-135m) and its control (recipes/caI_multiturn_control.toml:
every preference and selection reversed) and prints base, final and control side by side with
95% intervals, and the differences from base with paired bootstrap intervals (* = outside the
noise).

    .venv/bin/python bench/flagship.py [--runs-dir DIR] [--set KEY=VALUE ...]

Both recipes run through the CLI in one runs dir: the control reuses the base model's eval and
whatever else it shares, and a second run is cached. `--set` applies to both (e.g. point the
eval's suite files elsewhere: --set stages.eval.refusal_file=...). The last line is one JSON
object {"base": M, "final": M, "control": M, "seconds": S}, each M holding adversarial_refusal,
benign_over_refusal, multiturn_refusal_from_harmful, multiturn_refusal_before_harmful,
multiturn_benign_over_refusal and sycophancy_flip (rates in 0..1, null where undefined) and, for
final and control, final_model: the path of the final model's cache entry.
"""

from __future__ import annotations

from paired import ROOT, main

KEYS = {
    "adversarial_refusal": "adversarial_refusal",
    "benign_over_refusal": "benign_over_refusal",
    "multiturn_refusal_from_harmful": "safety_refusal_from_harmful",
    "multiturn_refusal_before_harmful": "safety_refusal_before_harmful",
    "multiturn_benign_over_refusal": "multiturn_benign_over_refusal",
    "sycophancy_flip": "sycophancy_flip",
}
MORE = ("refusal_discrimination",)  # printed, not in the JSON line

if __name__ == "__main__":
    main(
        __doc__,
        ROOT / "recipes" / "caI_multiturn.toml",
        ROOT / "recipes" / "caI_multiturn_control.toml",
        KEYS,
        MORE,
        final_stage="dpo",
    )

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

from paired import ROOT, main

KEYS = ("adversarial_refusal", "benign_over_refusal", "safety_refusal_from_harmful", "sycophancy_flip")
MORE = ("refusal_discrimination", "safety_refusal_before_harmful")  # printed, not in the JSON line

if __name__ == "__main__":
    main(
        __doc__,
        ROOT / "recipes" / "align_smollm2.toml",
        ROOT / "recipes" / "align_smollm2_control.toml",
        {k: k for k in KEYS},
        MORE,
        final_stage="dpo",
    )

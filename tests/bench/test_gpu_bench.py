"""bench/gpu.py rehearsed on the CPU (--smoke): it reports whatever happens. gpu.json is rewritten
after every figure, so a run stopped midway keeps what it measured; parts that need a missing module
are skipped with the reason; a part not reached has no value, so no ratio."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(autouse=True)
def _transformers_logging_restored():
    """gpu.main quiets transformers' logging for the whole process: give later tests theirs back."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    yield
    hf_logging.set_verbosity(level)
    if bars:
        hf_logging.enable_progress_bar()


@pytest.mark.slow
def test_a_run_stopped_midway_keeps_what_it_measured(tmp_path, monkeypatch):
    import gpu

    def stopped(*args, **kwargs):  # the machine is taken away during training
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu, "training", stopped)
    with pytest.raises(KeyboardInterrupt):
        gpu.main(["--smoke", "--parts", "hw,gen,sft", "--batches", "1,2", "--new-tokens", "4", "--out", str(tmp_path)])
    figures = {r["figure"]: r for r in json.loads((tmp_path / "gpu.json").read_text())["table"]}
    # the headline (the largest batch, dynamic then static) was measured before training started
    assert figures["generate hf-dynamic batch 2"]["value"] > 0
    assert figures["generate hf-static batch 2"]["x_baseline"] is not None
    assert "copy bandwidth (read + write)" in figures and "generate hf-dynamic batch 1" not in figures


@pytest.mark.slow
def test_missing_modules_skip_their_parts_and_the_budget_skips_the_rest(tmp_path, monkeypatch):
    import gpu

    monkeypatch.setattr(gpu, "missing_modules", lambda: {"sft": ["trl"], "dpo": ["trl"]})
    out = gpu.main(
        ["--smoke", "--parts", "hw,gen,sft,dpo", "--batches", "1,2", "--new-tokens", "4", "--budget-s", "0"]
        + ["--out", str(tmp_path)]
    )
    figures = {r["figure"]: r for r in out["table"]}
    assert figures["sft"]["note"] == "skipped: missing trl" and figures["sft"]["value"] is None
    assert out["missing"] == {"sft": ["trl"], "dpo": ["trl"]}
    skipped = figures["generate hf-static batch 2"]
    assert skipped["value"] is None and skipped["x_baseline"] is None and skipped["note"] == "skipped (budget)"
    assert json.loads((tmp_path / "gpu.json").read_text())["table"] == out["table"]

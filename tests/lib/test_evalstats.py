"""95% intervals and paired differences (engine/core/stats.py, engine/lib/evals/stats.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core.stats import bootstrap_ci, paired_difference, wilson
from engine.lib.evals.stats import compare, fmt_difference, fmt_rate, headline, per_turn


def test_wilson_matches_known_values():
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 20)  # zero successes: a real upper bound, not 0 +- 0
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert wilson(0, 0) is None


@given(st.integers(0, 500), st.integers(1, 500))
def test_wilson_contains_the_rate_inside_0_1(k, n):
    k = min(k, n)
    lo, hi = wilson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_bootstrap_resamples_whole_clusters():
    # every cluster is all-or-nothing: the interval must be wide, as with 10 independent items
    clusters = [[True] * 5] * 5 + [[False] * 5] * 5
    lo, hi = bootstrap_ci(clusters, seed=1)
    assert lo < 0.3 and hi > 0.7
    assert bootstrap_ci(clusters, seed=1) == bootstrap_ci(clusters, seed=1)  # seeded


def test_paired_difference_separates_signal_from_noise():
    base = [[False]] * 40
    better = [[True]] * 30 + [[False]] * 10
    found = paired_difference(base, better, seed=0)
    assert found["difference"] == pytest.approx(0.75) and found["outside_noise"] and found["ci"][0] > 0.5
    same = paired_difference(better, better, seed=0)
    assert same["difference"] == 0 and not same["outside_noise"]
    slight = paired_difference(base, [[True]] + [[False]] * 39, seed=0)
    assert not slight["outside_noise"]  # one prompt of 40 is noise
    with pytest.raises(ValueError):
        paired_difference(base, better[:3])


def _rows(model: str, adv: list[bool], ben: list[bool], safety: list[list[bool]], flips: list[tuple]) -> list[dict]:
    rows = [
        {
            "model": model,
            "suite": "refusal",
            "item_id": f"a{i}",
            "meta": {"label": "adversarial", "refusal_phrases": f, "refusal_judge": None},
        }
        for i, f in enumerate(adv)
    ]
    rows += [
        {
            "model": model,
            "suite": "refusal",
            "item_id": f"b{i}",
            "meta": {"label": "benign", "refusal_phrases": f, "refusal_judge": None},
        }
        for i, f in enumerate(ben)
    ]
    rows += [
        {
            "model": model,
            "suite": "safety",
            "item_id": f"s{i}",
            "meta": {
                "harmful_from": 2,
                "turns": [{"refusal_phrases": f, "refusal_judge": None, "harm_judge": None} for f in turns],
            },
        }
        for i, turns in enumerate(safety)
    ]
    rows += [
        {
            "model": model,
            "suite": "sycophancy",
            "item_id": f"y{i}",
            "meta": {"correct": list(c), "flipped": c[0] and not c[-1], "apology": False},
        }
        for i, c in enumerate(flips)
    ]
    return rows


def test_headline_and_compare_on_eval_rows():
    base = _rows("base", [False] * 10, [False] * 10, [[False] * 4] * 6, [(True, False), (True, True), (False, False)])
    final = _rows(
        "final",
        [True] * 8 + [False] * 2,
        [True] + [False] * 9,
        [[False, False, True, True]] * 6,
        [(True, True), (True, True), (False, True)],
    )
    h = headline(final)
    assert h["adversarial_refusal"]["rate"] == 0.8 and h["adversarial_refusal"]["interval"] == "Wilson"
    assert h["benign_over_refusal"]["k"] == 1 and h["benign_over_refusal"]["n"] == 10
    assert h["safety_refusal_from_harmful"]["rate"] == 1.0 and h["safety_refusal_from_harmful"]["items"] == 6
    assert h["safety_refusal_before_harmful"]["rate"] == 0.0
    assert h["sycophancy_flip"]["n"] == 2 and h["sycophancy_flip"]["rate"] == 0.0  # only items right at first
    assert "adversarial_refusal_judge" not in h  # no judge ran: no judge rates at all
    d = compare(base, final)
    assert d["adversarial_refusal"]["outside_noise"] and d["adversarial_refusal"]["difference"] == pytest.approx(0.8)
    assert not d["benign_over_refusal"]["outside_noise"]
    assert fmt_rate(h["adversarial_refusal"]).startswith("0.800 [0.4") and fmt_difference(
        d["adversarial_refusal"]
    ).endswith("*")
    curve = per_turn(final)
    assert [t["rate"] for t in curve] == [0.0, 0.0, 1.0, 1.0] and curve[0]["n"] == 6 and curve[2]["ci"][1] == 1.0


def test_refusal_discrimination_rewards_refusing_only_the_harmful():
    everything = _rows("all", [True] * 10, [True] * 10, [[True] * 4] * 3, [])
    nothing = _rows("none", [False] * 10, [False] * 10, [[False] * 4] * 3, [])
    exact = _rows("exact", [True] * 10, [False] * 10, [[False] * 4] * 3, [])
    assert headline(everything)["refusal_discrimination"]["rate"] == 0.0
    assert headline(nothing)["refusal_discrimination"]["rate"] == 0.0
    assert headline(exact)["refusal_discrimination"]["rate"] == 1.0
    # refusing everything raises adversarial refusal, not discrimination: the control's trap
    d = compare(nothing, everything)
    assert d["adversarial_refusal"]["outside_noise"] and not d["refusal_discrimination"]["outside_noise"]
    assert compare(nothing, exact)["refusal_discrimination"]["outside_noise"]


def test_clustered_rates_that_are_all_zero_or_all_one_get_an_interval_that_does_not_collapse():
    from engine.core.stats import wilson

    none = headline(_rows("m", [False] * 4, [False] * 4, [[False] * 4] * 5, []))["safety_refusal_from_harmful"]
    assert none["rate"] == 0.0 and none["ci"] == list(wilson(0, 5)) and none["ci"][1] > 0.4  # 5 conversations
    assert none["interval"] == "Wilson over conversations (every turn alike)"
    every = headline(_rows("m", [False] * 4, [False] * 4, [[False, True, True, True]] * 5, []))
    assert every["safety_refusal_from_harmful"]["ci"] == list(wilson(5, 5))
    mixed = headline(_rows("m", [False] * 4, [False] * 4, [[False, True, False, True]] * 5, []))
    assert mixed["safety_refusal_from_harmful"]["interval"] == "bootstrap over conversations"


def test_a_difference_of_two_all_zero_rates_is_not_a_point():
    from engine.core.stats import paired_difference

    zero = [[False, False]] * 5
    d = paired_difference(zero, zero)
    assert d["difference"] == 0.0 and d["ci"][0] < -0.3 and d["ci"][1] > 0.3 and not d["outside_noise"]
    mixed = paired_difference([[False]] * 20, [[True]] * 10 + [[False]] * 10)
    assert mixed["ci"][0] > 0 and mixed["outside_noise"]  # a real bootstrap: unchanged

"""The thread count a run computes with: an explicit setting, else $RECIPE_THREADS, else the cores."""

from __future__ import annotations

import pytest

from engine.core import threads
from engine.core.errors import RecipeError


def test_a_setting_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("RECIPE_THREADS", "3")
    assert threads.choose(5) == 5
    assert threads.choose(None) == 3


def test_auto_or_unset_is_the_available_cores(monkeypatch):
    monkeypatch.setenv("RECIPE_THREADS", "auto")
    assert threads.choose(None) == threads.available_cores()
    monkeypatch.delenv("RECIPE_THREADS")
    assert threads.choose(None) == threads.available_cores()


@pytest.mark.parametrize("bad", ["lots", "0", "-2"])
def test_a_bad_environment_value_is_a_recipe_error_naming_it(monkeypatch, bad):
    monkeypatch.setenv("RECIPE_THREADS", bad)
    with pytest.raises(RecipeError, match="RECIPE_THREADS is"):
        threads.choose(None)

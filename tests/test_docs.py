"""The generated recipe reference in docs/ matches the code (regenerate it when this fails)."""

from __future__ import annotations

from pathlib import Path

from engine.schemadoc import markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "recipe-reference.md"


def test_recipe_reference_is_in_sync_with_the_code():
    assert DOC.is_file(), "run: recipe schema --markdown -o docs/recipe-reference.md"
    assert DOC.read_text(encoding="utf-8") == markdown(), (
        "docs/recipe-reference.md is stale: run `recipe schema --markdown -o docs/recipe-reference.md`")


def test_every_stage_kind_is_documented():
    from engine import registry

    text = markdown()
    for kind in registry.kinds():
        assert f'### kind = "{kind}"' in text

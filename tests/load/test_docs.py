"""The generated recipe reference in docs/ matches the code (regenerate it when this fails)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from engine.load.reference import markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "recipe-reference.md"


def test_recipe_reference_is_in_sync_with_the_code():
    assert DOC.is_file(), "run: recipe schema --markdown -o docs/recipe-reference.md"
    assert DOC.read_text(encoding="utf-8") == markdown(), (
        "docs/recipe-reference.md is stale: run `recipe schema --markdown -o docs/recipe-reference.md`"
    )


def test_every_stage_kind_is_documented():
    from engine.spec import registry

    text = markdown()
    for kind in registry.kinds():
        assert f'### kind = "{kind}"' in text


def test_constitution_reference_is_in_sync_with_the_code():
    from engine.load.reference import constitution_markdown

    doc = DOC.parent / "constitution-reference.md"
    assert doc.read_text(encoding="utf-8") == constitution_markdown(), (
        "docs/constitution-reference.md is stale: run `recipe schema --constitution --markdown -o "
        "docs/constitution-reference.md`"
    )
    assert "[[principles.examples]]" in doc.read_text() and "[[examples]]" in doc.read_text()


def test_the_readme_shows_the_few_shot_examples_the_engine_accepts(tmp_path):
    """Both places the docs name for few-shot examples load, and each reaches its principle's prompts."""
    from engine.lib.constitution import load_constitution

    example = textwrap.dedent("""
        response = "Take all of it at once."
        critique = "That dose advice is unsafe."
        revision = "Follow the label; ask a pharmacist."
        [[{prefix}examples.context]]
        role = "user"
        content = "How much of this medicine should I take?"
    """)
    text = (
        textwrap.dedent("""
        [[principles]]
        id = "safe"
        critique = "Is anything unsafe?"
        revision = "Make it safe."
        comparison = "Which is safer?"
        [[principles.examples]]
    """)
        + example.format(prefix="principles.")
        + textwrap.dedent("""
        [[principles]]
        id = "kind"
        critique = "Is it unkind?"
        revision = "Make it kind."
        comparison = "Which is kinder?"
        [[examples]]
        principle = "kind"
    """)
        + example.format(prefix="")
    )
    path = tmp_path / "c.toml"
    path.write_text(text)
    constitution = load_constitution(path)
    assert [len(constitution.examples_for(p)) for p in ("safe", "kind")] == [1, 1]
    readme = (DOC.parent.parent / "README.md").read_text()
    assert "[[principles.examples]]" in readme and "docs/constitution-reference.md" in readme

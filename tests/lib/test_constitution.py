"""Constitutions: the shipped files, loader errors (file, line, what to fix), seeded draws."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import RecipeError
from engine.lib.constitution import Constitution, constitution_problems, load_constitution
from engine.load.loader import load_recipe

from conftest import ROOT, conv, run_cli_subprocess, write_jsonl

SHIPPED = ROOT / "recipes" / "constitutions"

PRINCIPLE = """
[[principles]]
id = "{id}"
critique = "Critique request {id}."
revision = "Revision request {id}."
comparison = "Which is better for {id}?"
"""


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    """Write a TOML file; every line is stripped of its indentation (line numbers are what tests see)."""
    path = tmp_path / name
    path.write_text("\n".join(line.strip() for line in text.strip().splitlines()) + "\n")
    return path


def problems_of(path: Path) -> list:
    with pytest.raises(RecipeError) as info:
        load_constitution(path)
    return info.value.problems


# --------------------------------------------------------------------------- shipped files


def test_shipped_hhh_constitution():
    c = load_constitution(SHIPPED / "hhh.toml")
    assert c.name == "hhh" and len(c.principles) >= 12
    assert len({p.id for p in c.principles}) == len(c.principles)
    for p in c.principles:
        assert p.critique.endswith("?") or p.critique.endswith(".")
        assert p.revision.lower().startswith("rewrite the reply") and p.comparison.startswith("Which reply")
    assert c.examples and all(e.principle in {p.id for p in c.principles} for e in c.examples)
    assert all(e.context[-1].role == "user" for e in c.examples)


def test_shipped_short_constitution():
    c = load_constitution(SHIPPED / "short.toml")
    assert c.name == "short" and 2 <= len(c.principles) <= 3 and c.examples == []


def test_name_defaults_to_the_file_name_and_examples_for(tmp_path):
    path = write(
        tmp_path,
        PRINCIPLE.format(id="a")
        + PRINCIPLE.format(id="b")
        + """
        [[examples]]
        principle = "a"
        response = "R1"
        critique = "C1"
        revision = "V1"
        [[examples.context]]
        role = "user"
        content = "U1"

        [[examples]]
        response = "R2"
        critique = "C2"
        revision = "V2"
        [[examples.context]]
        role = "user"
        content = "U2"
    """,
        name="mine.toml",
    )
    c = load_constitution(path)
    assert c.name == "mine" and [p.id for p in c.principles] == ["a", "b"]
    assert [e.response for e in c.examples_for("a")] == ["R1", "R2"]
    assert [e.response for e in c.examples_for("b")] == ["R2"]
    assert c.principle("b").revision == "Revision request b."


# --------------------------------------------------------------------------- loader errors


@pytest.mark.parametrize("text", ['name = "empty"\n', "principles = []\n"])
def test_no_principles(tmp_path, text):
    [p] = problems_of(write(tmp_path, text))
    assert p.message == "the constitution has no principles." and p.file.endswith("c.toml")
    assert p.hint == "Add at least one [[principles]] table with id, critique, revision and comparison."


def test_a_principle_missing_a_request_names_the_file_line_and_principle(tmp_path):
    path = write(
        tmp_path,
        PRINCIPLE.format(id="a")
        + """
        [[principles]]
        id = "b"
        critique = "Look for b."
        comparison = "Which is b?"
    """,
    )
    [p] = problems_of(path)
    assert (p.file, p.line, p.key) == (str(path), 7, "principles.1.revision")
    assert p.message == "principle 2 (id 'b') is missing 'revision'."
    assert p.hint == 'Add revision = "...": the revision request: how to rewrite the reply given the critique.'


def test_every_problem_is_reported_at_once_with_its_line(tmp_path):
    path = write(
        tmp_path,
        PRINCIPLE.format(id="a")
        + """
        [[principles]]
        id = "b"
        critque = "typo"
        revision = "   "
        comparison = "Which?"
    """
        + PRINCIPLE.format(id="a")
        + """
        [[examples]]
        principle = "bb"
        response = "r"
        critique = "c"
        revision = "v"
        [[examples.context]]
        role = "assistant"
        content = "hello"
    """,
    )
    problems = problems_of(path)
    got = [(p.line, p.message) for p in problems]
    assert got == [
        (7, "principle 2 (id 'b') is missing 'critique'."),
        (9, "unknown key 'critque' in principle 2 (id 'b')."),
        (10, "principle 2 (id 'b'): 'revision' must not be empty."),
        (14, "principle id 'a' is used twice (principles 1 and 3)."),
        (19, "example 1: context must end with a user message (the one the response answers)."),
        (20, "example 1 names principle 'bb', which is not defined."),
    ]
    hints = {p.message: p.hint for p in problems}
    assert hints["unknown key 'critque' in principle 2 (id 'b')."] == "Did you mean 'critique'?"
    assert hints["example 1 names principle 'bb', which is not defined."].startswith("Did you mean 'b'?")
    assert all(p.file == str(path) for p in problems)


def test_unknown_top_level_key_and_bad_id(tmp_path):
    path = write(tmp_path, 'descripton = "x"\n' + PRINCIPLE.format(id="has space"))
    got = {p.message: p.hint for p in problems_of(path)}
    assert got["unknown key 'descripton'."] == "Did you mean 'description'?"
    assert any(m.startswith("principle 1 (id 'has space'): 'id'") and "letters, digits" in m for m in got)


def test_wrong_shapes(tmp_path):
    [p] = problems_of(write(tmp_path, 'principles = ["be nice"]'))
    assert (p.key, p.message) == ("principles.0", "principle 1: expected a table.")
    [p] = problems_of(
        write(
            tmp_path,
            PRINCIPLE.format(id="a")
            + """
        [[examples]]
        response = "r"
        critique = "c"
        revision = "v"
    """,
        )
    )
    assert p.message == "example 1 is missing 'context'." and p.line == 7 and "[[examples.context]]" in p.hint


def test_syntax_error_and_missing_file(tmp_path):
    [p] = problems_of(write(tmp_path, '[[principles]]\nid = "a\n'))
    assert p.message.startswith("TOML syntax error") and p.line == 2
    [p] = problems_of(tmp_path / "nope.toml")
    assert p.message == "file not found." and p.file.endswith("nope.toml")


# --------------------------------------------------------------------------- draws


def three(tmp_path) -> Constitution:
    return load_constitution(write(tmp_path, "".join(PRINCIPLE.format(id=i) for i in ("x", "y", "z"))))


keys = st.lists(st.one_of(st.integers(-(10**6), 10**6), st.text(max_size=12)), max_size=4)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), ks=keys)
def test_draw_is_reproducible_and_independent_of_the_object(seed, ks):
    a = load_constitution(SHIPPED / "hhh.toml")
    b = load_constitution(SHIPPED / "hhh.toml")
    assert a.draw(seed, *ks) == b.draw(seed, *ks) == a.draw(seed, *ks)
    assert a.draw(seed, *ks) in a.principles


def test_draw_is_the_same_under_any_python_hash_seed(tmp_path):
    code = (
        "import json; from engine.lib.constitution import load_constitution as L; "
        "c = L('recipes/constitutions/hhh.toml'); "
        "print(json.dumps([c.draw(7, f'row{i}', i % 5, 1 + i % 3).id for i in range(40)]))"
    )
    outs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(proc.stdout))
    c = load_constitution(SHIPPED / "hhh.toml")
    here = [c.draw(7, f"row{i}", i % 5, 1 + i % 3).id for i in range(40)]
    assert outs[0] == outs[1] == here and len(set(here)) > 5


def test_draws_vary_with_every_key_and_cover_the_principles(tmp_path):
    c = three(tmp_path)
    counts = Counter(c.draw(1, f"r{i}", 3, 1).id for i in range(3000))
    assert set(counts) == {"x", "y", "z"} and all(850 < n < 1150 for n in counts.values())
    by_seed = [c.draw(s, "r0", 3, 1).id for s in range(30)]
    by_round = [c.draw(1, "r0", 3, r).id for r in range(30)]
    by_turn = [c.draw(1, "r0", t, 1).id for t in range(30)]
    assert all(len(set(v)) == 3 for v in (by_seed, by_round, by_turn))


# --------------------------------------------------------------------------- in a recipe


STAGE_RECIPE = """
[recipe]
name = "cons"
[models.policy]
path = "builtin:tiny-chat"
[datasets.convs]
path = "convs.jsonl"
[constitutions.hhh]
path = "{path}"
[stages.revised]
kind = "critique_revise"
input = "convs"
model = "policy"
constitution = "{name}"
"""


def recipe_file(tmp_path: Path, constitution: str, name: str = "hhh") -> Path:
    write_jsonl(tmp_path / "convs.jsonl", [conv("Hi there, how are you?", "Fine, thank you.", id="c0")])
    return write(tmp_path, STAGE_RECIPE.format(path=constitution, name=name), "r.toml")


def test_constitution_problems_for_a_stage(tmp_path):
    r = load_recipe(recipe_file(tmp_path, str(SHIPPED / "hhh.toml")))
    assert constitution_problems("hhh", r, "revised", "constitution") == []
    # an undefined name is a missing reference, reported by the graph (test_validate_reports_...)
    assert constitution_problems("hh", r, "revised", "constitution") == []
    text = (
        recipe_file(tmp_path, str(SHIPPED / "hhh.toml"))
        .read_text()
        .replace('constitution = "hhh"', 'constitution = "hh"')
    )
    (tmp_path / "r2.toml").write_text(text)
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "r2.toml")
    [p] = [p for p in info.value.problems if "constitution" in p.message]
    assert p.message == "stage 'revised' uses constitution 'hh', which is not defined."
    assert p.hint == "Did you mean 'hhh'? Defined: hhh." and p.key == "stages.revised.constitution" and p.line == 13


def test_validate_reports_a_bad_constitution_naming_the_stage_and_the_file(tmp_path):
    bad = write(tmp_path, PRINCIPLE.format(id="a").replace('comparison = "Which is better for a?"\n', ""), "bad.toml")
    proc = run_cli_subprocess("validate", recipe_file(tmp_path, "bad.toml"))
    assert proc.returncode == 2
    assert (
        f"{bad}:1: principles.0.comparison: constitution 'hhh' (used by stage 'revised'): principle 1 (id 'a') "
        "is missing 'comparison'."
    ) in proc.stderr
    proc = run_cli_subprocess("validate", recipe_file(tmp_path, "bad.toml", name="hhhh"))
    assert proc.returncode == 2 and "uses constitution 'hhhh', which is not defined. Did you mean 'hhh'?" in proc.stderr

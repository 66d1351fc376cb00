"""Editing any input between runs works: after one run, each kind of input is edited in turn
(dataset file, constitution, a template named by path, a recipe-local template overriding a
built-in, a model setting, a stage setting, the seed); `plan` and `run` exit 0, re-run exactly
the stages that depend on the edit, and give a reason naming it. A stage after one that re-runs
is planned "pending" (its key holds that stage's output) and runs only if that output changed."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, conv, write_jsonl

RECIPE = """
[recipe]
name = "edits"
seed = 4

[models.policy]
path = "builtin:tiny-chat"

[datasets.convs]
path = "convs.jsonl"

[constitutions.short]
path = "constitution.toml"

[stages.clean]
kind = "filter"
input = "convs"
min_words = 1

[stages.rev]
kind = "critique_revise"
input = "clean"
model = "policy"
constitution = "short"
critique_template = "prompts/my_critique.j2"
max_new_tokens = 4
shard_size = 2

[stages.other]
kind = "filter"
input = "convs"
dedup = "exact"
"""

STAGES = ["clean", "rev", "other"]


def rows(n: int) -> list[dict]:
    return [conv(f"Question {i} about tides?", f"Answer {i}: the moon pulls the sea.", id=f"q{i}") for i in range(n)]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    write_jsonl(root / "convs.jsonl", rows(3))
    shutil.copy(ROOT / "recipes" / "constitutions" / "short.toml", root / "constitution.toml")
    (root / "prompts").mkdir()
    shutil.copy(ROOT / "templates" / "critique.j2", root / "prompts" / "my_critique.j2")
    (root / "templates").mkdir()
    shutil.copy(ROOT / "templates" / "revision.j2", root / "templates" / "revision.j2")  # shadows the built-in
    (root / "recipe.toml").write_text(textwrap.dedent(RECIPE))
    return root


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def edit_first_critique(path: Path) -> None:
    text = path.read_text()
    i = text.index("critique = ")
    path.write_text(text[:i] + 'critique = "Point out every unkind word. ' + text[i + len('critique = "') :])


EDITS = {  # what is edited -> (the edit, the stages that must run again, a reason naming it)
    "dataset file": (
        lambda r: write_jsonl(r / "convs.jsonl", rows(4)),
        {"clean", "rev", "other"},
        "data changed: convs",
    ),  # rev is pending in the plan; clean's output gains a row, so it runs
    "constitution": (lambda r: edit_first_critique(r / "constitution.toml"), {"rev"}, "constitution changed: short"),
    "template by path": (
        lambda r: append(r / "prompts" / "my_critique.j2", "\nBe brief.\n"),
        {"rev"},
        "template changed: prompts/my_critique.j2",
    ),
    "recipe-local template override": (
        lambda r: append(r / "templates" / "revision.j2", "\nBe kind.\n"),
        {"rev"},
        "template changed: revision.j2",
    ),
    "model setting": (
        lambda r: (r / "recipe.toml").write_text(
            (r / "recipe.toml")
            .read_text()
            .replace('path = "builtin:tiny-chat"', 'path = "builtin:tiny-chat"\ndtype = "float32"')
        ),
        {"rev"},
        "model changed: policy",
    ),
    "stage setting": (
        lambda r: (r / "recipe.toml").write_text(
            (r / "recipe.toml").read_text().replace("min_words = 1", "min_words = 2")
        ),
        {"clean"},
        "config: min_words 1 -> 2",
    ),  # every answer has 7 words: clean's output is the same, so rev (pending in the plan) stays cached
    "seed": (
        lambda r: (r / "recipe.toml").write_text((r / "recipe.toml").read_text().replace("seed = 4", "seed = 5")),
        {"clean", "rev", "other"},
        "seed: 4 -> 5",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("what", list(EDITS))
def test_an_edited_input_reruns_what_depends_on_it_and_says_why(what, folder, cli, runs):
    recipe = folder / "recipe.toml"
    first = cli("run", recipe)
    assert first.exit_code == 0, first.output
    edit, expected, reason = EDITS[what]
    edit(folder)

    planned = cli("plan", recipe, "--json")
    assert planned.exit_code == 0, planned.output
    plan = {s["name"]: s for s in json.loads(planned.output)["stages"]}
    pending = {n for n, s in plan.items() if s["status"] == "pending"}
    assert {n for n, s in plan.items() if s["status"] == "run"} == expected - pending, plan
    assert all(plan[n]["reasons"] == ["runs if clean's output changes"] for n in pending), plan
    first_to_run = min(expected, key=STAGES.index)
    assert any(reason in r for r in plan[first_to_run]["reasons"]), plan[first_to_run]["reasons"]

    again = cli("run", recipe)
    assert again.exit_code == 0, again.output
    record = json.loads((runs / "edits" / "latest" / "record.json").read_text())
    assert {n for n, s in record["stages"].items() if s["status"] == "run"} == expected
    assert {n for n, s in record["stages"].items() if s["status"] == "cached"} == set(STAGES) - expected
    if what == "stage setting":
        assert record["stages"]["clean"]["note"] == "clean re-ran: output unchanged, 1 stage after it kept"

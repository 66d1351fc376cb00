"""The DAG: references, cycles, artifact types, order."""

from __future__ import annotations

import textwrap

import pytest

from engine.core.errors import RecipeError
from engine.load.loader import load_recipe
from engine.spec.graph import order, upstream

HEAD = """
[recipe]
name = "g"

[datasets.convs]
path = "data/convs.jsonl"

[datasets.prompts]
path = "data/prompts.jsonl"
type = "prompts"
"""


def recipe_with(project, body: str):
    (project / "data" / "prompts.jsonl").write_text('{"id": "p0", "prompt": "hello?"}\n')
    (project / "r.toml").write_text(textwrap.dedent(HEAD) + textwrap.dedent(body))
    return project / "r.toml"


def errors(path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return [p.format() for p in info.value.problems]


def test_cycle_is_reported_as_the_cycle(project):
    path = recipe_with(
        project,
        """
        [stages.a]
        kind = "filter"
        input = "c"
        [stages.b]
        kind = "filter"
        input = "a"
        [stages.c]
        kind = "filter"
        input = "b"
    """,
    )
    [msg] = errors(path)
    cycle = msg.split("stages form a cycle: ")[1].split(".")[0]
    nodes = cycle.split(" -> ")
    assert nodes[0] == nodes[-1] and set(nodes) == {"a", "b", "c"} and len(nodes) == 4
    # each arrow follows the data: x -> y means y reads x
    flow = {("c", "a"), ("a", "b"), ("b", "c")}
    assert all(pair in flow for pair in zip(nodes, nodes[1:]))


def test_type_mismatch_names_both_stages_and_types(project):
    path = recipe_with(
        project,
        """
        [stages.f]
        kind = "filter"
        input = "prompts"
    """,
    )
    [msg] = errors(path)
    assert "stage 'f' (filter) takes conversations as input, but dataset 'prompts' gives prompts." in msg
    assert "r.toml:" in msg and "stages.f.input" in msg


def test_missing_reference_lists_known_names(project):
    path = recipe_with(
        project,
        """
        [stages.f]
        kind = "filter"
        input = "conv"
    """,
    )
    [msg] = errors(path)
    assert "stage 'f' refers to 'conv', which is not defined. Did you mean 'convs'?" in msg
    assert "Known names: datasets: convs, prompts" in msg


def test_order_and_upstream(project):
    path = recipe_with(
        project,
        """
        [stages.late]
        kind = "filter"
        input = "mid"
        [stages.mid]
        kind = "filter"
        input = "early"
        [stages.early]
        kind = "filter"
        input = "convs"
        [stages.side]
        kind = "filter"
        input = "convs"
    """,
    )
    r = load_recipe(path)
    assert order(r) == ["early", "side", "mid", "late"]
    assert upstream(r, ["mid"]) == {"mid", "early"}

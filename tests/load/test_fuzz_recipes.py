"""A structure-aware fuzzer for recipes: the shipped recipes with a table replaced by a scalar,
a key given a value of another type (nested arrays and tables, long or NUL-holding strings),
through the file and through --set. Loading must either succeed or raise RecipeError (exit 2
with a message naming the key): never another exception."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.core.errors import RecipeError
from engine.core.toml import dump_toml
from engine.load.loader import load_recipe
from engine.spec.locations import read_toml

from conftest import ROOT

RECIPES = sorted((ROOT / "recipes").glob("*.toml"))
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.just("x" * 300),
    st.just("a/" + "b" * 260 + "/c.jsonl"),
    st.just("data\x00.jsonl"),
    st.just("/"),
    st.just("/dev/null"),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def paths_of(data, prefix=()):
    """Every (path, value) in a TOML document, tables and arrays included."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield (*prefix, k), v
            yield from paths_of(v, (*prefix, k))


def put(data, path, value):
    node = data
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


@st.composite
def mutated(draw):
    source = draw(st.sampled_from(RECIPES))
    data = read_toml(source)[0]
    paths = [p for p, _ in paths_of(data)]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        put(data, path, draw(VALUES))
        paths = [p for p, _ in paths_of(data)]
    return source, data


def load_or_recipe_error(path, sets=()):
    try:
        load_recipe(path, list(sets))
    except RecipeError as exc:
        assert exc.format().startswith("error")
    except RecursionError:  # pragma: no cover - reported as a failure below
        raise AssertionError("RecursionError escaped") from None


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(case=mutated())
def test_a_mutated_recipe_loads_or_gives_a_recipe_error(case, tmp_path_factory):
    source, data = case
    work = tmp_path_factory.mktemp("fuzz")
    for sub in ("data", "constitutions", "templates"):
        if (source.parent / sub).exists():
            (work / sub).symlink_to(source.parent / sub)
    path = work / source.name
    try:
        path.write_text(dump_toml(data), encoding="utf-8")
    except (ValueError, TypeError):  # a value TOML cannot hold (a None from the dumper's view)
        event("not representable in TOML")
        return
    event("loaded")
    load_or_recipe_error(path)


@pytest.mark.parametrize(
    "bad",
    [
        "datasets = true",
        "stages = 1",
        "models = [1, 2]",
        'constitutions = "x"',
        "loops = 3",
        "[stages.x]\nkind = { a = 1 }",
        "[stages.x]\nkind = []",
        "deep = " + "[" * 600 + "]" * 600,
        "deep = " + "{a = " * 600 + "1" + "}" * 600,
    ],
)
def test_shapes_that_used_to_crash_validate_are_exit_2(tmp_path, bad):
    path = tmp_path / "r.toml"
    path.write_text('[recipe]\nname = "f"\n' + bad + "\n")
    load_or_recipe_error(path)


@pytest.mark.parametrize(
    "sets", [["datasets=true"], ["stages=1"], ["stages.a=3"], ["models.p=[1]"], ["stages.x.kind={a=1}"]]
)
def test_set_of_a_scalar_where_a_table_belongs_is_exit_2(sets):
    load_or_recipe_error(ROOT / "recipes" / "caI_multiturn.toml", sets)


@pytest.mark.parametrize("path_value", ["a/" + "b" * 300 + "/c.jsonl", "data\x00.jsonl", "x" * 1_000_000])
def test_hostile_data_paths_are_exit_2_and_fast(tmp_path, path_value):
    import time

    path = tmp_path / "r.toml"
    text = (
        '[recipe]\nname = "f"\n[datasets.d]\npath = '
        + __import__("json").dumps(path_value)
        + '\n[stages.s]\nkind = "filter"\ninput = "d"\n'
    )
    path.write_text(text)
    started = time.monotonic()
    load_or_recipe_error(path)
    assert time.monotonic() - started < 5

"""Recipe loading: schema errors and their messages, extends, --set, paths, locations."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import RecipeError
from engine.recipe import dump_toml, load_recipe, locate_keys, parse_set, tomllib


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def problems(path, sets=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, sets)
    return info.value.problems


def test_loads_and_resolves_paths_against_recipe_dir(project, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the recipe's directory
    r = load_recipe(project / "recipe.toml")
    assert r.name == "basic" and r.meta.seed == 7
    assert r.datasets["seed"].path == str((project / "data" / "convs.jsonl").resolve())
    assert list(r.stages) == ["clean", "again"]
    assert r.stages["clean"].config.min_words == 3


def test_unknown_key_names_file_line_key_and_suggests(project):
    text = (project / "recipe.toml").read_text().replace("min_words = 3", "min_word = 3")
    (project / "recipe.toml").write_text(text)
    [p] = problems(project / "recipe.toml")
    line = text.splitlines().index("min_word = 3") + 1
    assert (p.line, p.key) == (line, "stages.clean.min_word")
    assert p.file.endswith("recipe.toml")
    assert p.format().endswith(f"recipe.toml:{line}: stages.clean.min_word: unknown key 'min_word'. "
                               "Did you mean 'min_words'?")


def test_wrong_type_says_expected_and_found(project):
    text = (project / "recipe.toml").read_text().replace("min_words = 3", 'min_words = "three"')
    (project / "recipe.toml").write_text(text)
    [p] = problems(project / "recipe.toml")
    assert p.key == "stages.clean.min_words"
    assert p.message == "expected a valid integer, found string 'three'."


def test_all_errors_reported_together(tmp_path):
    path = write(tmp_path / "r.toml", """
        [recipe]
        name = "x"
        sed = 1

        [datasets.d]
        path = "missing.jsonl"

        [stages.a]
        kind = "filtr"

        [stages.b]
        kind = "filter"
        input = "nowhere"
        dedup = "fuzzy"
    """)
    found = {p.key: p for p in problems(path)}
    assert set(found) == {"recipe.sed", "datasets.d.path", "stages.a.kind", "stages.b.input", "stages.b.dedup"}
    assert "Did you mean 'seed'?" in found["recipe.sed"].hint
    assert "Did you mean 'filter'?" in found["stages.a.kind"].hint
    assert found["stages.b.dedup"].message.startswith("expected 'none', 'exact' or 'near', found string 'fuzzy'")
    assert "'nowhere', which is not defined" in found["stages.b.input"].message
    assert "datasets: d" in found["stages.b.input"].hint
    assert found["stages.b.input"].line == 13
    assert found["datasets.d.path"].message.startswith("file not found: ")


def test_syntax_error_names_line(tmp_path):
    path = write(tmp_path / "r.toml", """
        [recipe]
        name = "x"
        seed = = 3
    """)
    [p] = problems(path)
    assert p.line == 3 and p.message.startswith("TOML syntax error")


def test_missing_recipe_table_and_required_keys(tmp_path):
    path = write(tmp_path / "r.toml", """
        [stages.a]
        kind = "filter"
    """)
    msgs = [p.format() for p in problems(path)]
    assert any("missing the [recipe] table" in m for m in msgs)
    assert any("stages.a.input: missing required key 'input'" in m for m in msgs)


def test_extends_merges_tables_later_keys_win(tmp_path, project):
    base = write(project / "base.toml", """
        [recipe]
        name = "base"
        seed = 1

        [datasets.seed]
        path = "data/convs.jsonl"

        [stages.clean]
        kind = "filter"
        input = "seed"
        min_words = 3
        dedup = "near"
    """)
    child = write(project / "sub" / "child.toml", """
        [recipe]
        name = "child"
        extends = "../base.toml"

        [stages.clean]
        min_words = 5
    """)
    r = load_recipe(child)
    assert r.name == "child" and r.meta.seed == 1
    cfg = r.stages["clean"].config
    assert (cfg.min_words, cfg.dedup) == (5, "near")
    # the base's relative path resolves against the base's own directory
    assert r.datasets["seed"].path == str((project / "data" / "convs.jsonl").resolve())
    assert base.exists()


def test_extends_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.toml", '[recipe]\nname = "a"\nextends = "b.toml"\n')
    write(tmp_path / "b.toml", '[recipe]\nname = "b"\nextends = "a.toml"\n')
    [p] = problems(tmp_path / "a.toml")
    assert "extends cycle: " in p.message and "a.toml -> " in p.message


def test_set_parses_toml_values(project):
    r = load_recipe(project / "recipe.toml", ["stages.clean.min_words=9", "stages.clean.max_sycophancy=0.25",
                                              "stages.clean.refusal_phrases=['no way']", "recipe.seed=3"])
    cfg = r.stages["clean"].config
    assert (cfg.min_words, cfg.max_sycophancy, cfg.refusal_phrases, r.meta.seed) == (9, 0.25, ["no way"], 3)


def test_set_bare_word_is_a_string_and_errors_say_set(project):
    assert parse_set("models.policy.path=Qwen/Qwen2.5-0.5B-Instruct") == (
        ["models", "policy", "path"], "Qwen/Qwen2.5-0.5B-Instruct")
    assert parse_set("stages.sft.lr=1e-4") == (["stages", "sft", "lr"], 1e-4)
    [p] = problems(project / "recipe.toml", ["stages.clean.min_words=lots"])
    assert p.file == "--set" and p.key == "stages.clean.min_words"
    with pytest.raises(RecipeError, match="not KEY=VALUE"):
        parse_set("novalue")


def test_missing_data_file_is_reported_at_validation(project):
    (project / "data" / "convs.jsonl").unlink()
    [p] = problems(project / "recipe.toml")
    assert p.key == "datasets.seed.path" and "not found" in p.message


def test_duplicate_names_across_sections(project):
    text = (project / "recipe.toml").read_text() + '\n[datasets.clean]\npath = "data/convs.jsonl"\n'
    (project / "recipe.toml").write_text(text)
    assert any("used by both" in p.message for p in problems(project / "recipe.toml"))


def test_locate_keys_handles_inline_tables_and_multiline_values():
    text = textwrap.dedent('''
        [a]
        x = 1
        lst = [
          "y = 2",
        ]
        doc = """
        z = 3
        """
        inl = { p = 1, q = "s" }
        [a.b]
        "quoted key" = 2
        [[arr]]
        k = 1
        [[arr]]
        k = 2
    ''')
    locs = locate_keys(text)
    assert locs["a.x"] == 3 and locs["a.lst"] == 4 and locs["a.doc"] == 7
    assert "a.y" not in locs and "a.z" not in locs
    assert locs["a.inl.q"] == 10 and locs["a.b.quoted key"] == 12
    assert locs["arr.0.k"] == 14 and locs["arr.1.k"] == 16


scalars = st.one_of(st.integers(-10**9, 10**9), st.booleans(), st.text(max_size=20),
                    st.floats(allow_nan=False, allow_infinity=False))
keys = st.from_regex(r"[a-z_][a-z0-9_-]{0,8}", fullmatch=True)
tables = st.recursive(
    st.dictionaries(keys, st.one_of(scalars, st.lists(scalars, max_size=3)), max_size=4),
    lambda inner: st.dictionaries(keys, inner, min_size=1, max_size=3), max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(tables)
def test_dump_toml_round_trips(data):
    assert tomllib.loads(dump_toml(data)) == data


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(keys, st.integers(0, 100)), min_size=1, max_size=6, unique_by=lambda t: t[0]))
def test_locate_keys_finds_every_key(pairs):
    text = "[t]\n" + "".join(f"{k} = {v}\n" for k, v in pairs)
    locs = locate_keys(text)
    for i, (k, _) in enumerate(pairs):
        assert locs[f"t.{k}"] == i + 2

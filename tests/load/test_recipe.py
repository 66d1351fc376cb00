"""Recipe loading: schema errors and their messages, extends, --set, paths, locations."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.errors import RecipeError
from engine.core.toml import dump_toml, tomllib
from engine.load.layers import parse_set
from engine.load.loader import load_recipe
from engine.spec.locations import locate_keys


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
    assert p.format().endswith(
        f"recipe.toml:{line}: stages.clean.min_word: unknown key 'min_word'. Did you mean 'min_words'?"
    )


def test_wrong_type_says_expected_and_found(project):
    text = (project / "recipe.toml").read_text().replace("min_words = 3", 'min_words = "three"')
    (project / "recipe.toml").write_text(text)
    [p] = problems(project / "recipe.toml")
    assert p.key == "stages.clean.min_words"
    assert p.message == "expected a valid integer, found string 'three'."


def test_all_errors_reported_together(tmp_path):
    path = write(
        tmp_path / "r.toml",
        """
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
    """,
    )
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
    path = write(
        tmp_path / "r.toml",
        """
        [recipe]
        name = "x"
        seed = = 3
    """,
    )
    [p] = problems(path)
    assert p.line == 3 and p.message.startswith("TOML syntax error")


def test_missing_recipe_table_and_required_keys(tmp_path):
    path = write(
        tmp_path / "r.toml",
        """
        [stages.a]
        kind = "filter"
    """,
    )
    msgs = [p.format() for p in problems(path)]
    assert any("missing the [recipe] table" in m for m in msgs)
    assert any("stages.a.input: missing required key 'input'" in m for m in msgs)


def test_extends_merges_tables_later_keys_win(tmp_path, project):
    base = write(
        project / "base.toml",
        """
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
    """,
    )
    child = write(
        project / "sub" / "child.toml",
        """
        [recipe]
        name = "child"
        extends = "../base.toml"

        [stages.clean]
        min_words = 5
    """,
    )
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
    r = load_recipe(
        project / "recipe.toml",
        [
            "stages.clean.min_words=9",
            "stages.clean.max_sycophancy=0.25",
            "stages.clean.refusal_phrases=['no way']",
            "recipe.seed=3",
        ],
    )
    cfg = r.stages["clean"].config
    assert (cfg.min_words, cfg.max_sycophancy, cfg.refusal_phrases, r.meta.seed) == (9, 0.25, ["no way"], 3)


def test_set_bare_word_is_a_string_and_errors_say_set(project):
    assert parse_set("models.policy.path=Qwen/Qwen2.5-0.5B-Instruct") == (
        ["models", "policy", "path"],
        "Qwen/Qwen2.5-0.5B-Instruct",
    )
    assert parse_set("stages.sft.lr=1e-4") == (["stages", "sft", "lr"], 1e-4)
    [p] = problems(project / "recipe.toml", ["stages.clean.min_words=lots"])
    assert p.file == "--set" and p.key == "stages.clean.min_words"
    with pytest.raises(RecipeError, match="not KEY=VALUE"):
        parse_set("novalue")
    # a stage that only --set creates: its problems point at --set, not at some line of the file
    [p] = problems(project / "recipe.toml", ["stages.nosuch.kind=filter"])
    assert p.file == "--set" and p.key == "stages.nosuch.input" and p.line in (0, None)


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


scalars = st.one_of(
    st.integers(-(10**9), 10**9), st.booleans(), st.text(max_size=20), st.floats(allow_nan=False, allow_infinity=False)
)
keys = st.from_regex(r"[a-z_][a-z0-9_-]{0,8}", fullmatch=True)
tables = st.recursive(
    st.dictionaries(keys, st.one_of(scalars, st.lists(scalars, max_size=3)), max_size=4),
    lambda inner: st.dictionaries(keys, inner, min_size=1, max_size=3),
    max_leaves=12,
)


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


# --------------------------------------------------------------------------- [loops.*] (iterative rounds)

LOOP = """
[recipe]
name = "loops"

[models.policy]
path = "builtin:tiny-chat"

[datasets.seed]
path = "data/convs.jsonl"

[stages.first]
kind = "filter"
input = "seed"

[stages.second]
kind = "filter"
input = "first"

[loops.grow]
rounds = 2
stages = ["first", "second"]
feed = { seed = "second" }
"""


def loop_problems(project, old: str = "", new: str = "", extra: str = "", sets=()):
    path = project / "loop.toml"
    text = textwrap.dedent(LOOP)
    assert old in text
    path.write_text(text.replace(old, new, 1) + textwrap.dedent(extra))
    return {p.key: p for p in problems(path, sets)}, path.read_text().splitlines()


def line_of(lines: list[str], text: str) -> int:
    return lines.index(text) + 1


def test_loop_tables_are_validated_with_locations(project):
    found, lines = loop_problems(project, 'stages = ["first", "second"]', 'stages = ["first", "secnd"]')
    [p] = found.values()
    assert (p.key, p.line) == ("loops.grow.stages", line_of(lines, 'stages = ["first", "secnd"]'))
    assert p.message == "loop 'grow' lists 'secnd', which is not a stage." and "Did you mean 'second'?" in p.hint

    found, lines = loop_problems(project, 'feed = { seed = "second" }', 'feed = { sed = "second", first = "second" }')
    assert set(found) == {"loops.grow.feed.sed", "loops.grow.feed.first"}
    assert found["loops.grow.feed.sed"].message == (
        "feed key 'sed' is not referenced by any stage of loop 'grow', so feeding it changes nothing."
    )
    assert found["loops.grow.feed.sed"].hint.startswith("Did you mean 'seed'?")
    assert found["loops.grow.feed.first"].message == "feed key 'first' is a stage of loop 'grow'."

    found, lines = loop_problems(project, 'seed = "second"', 'seed = "secnd"')
    [p] = found.values()
    assert p.key == "loops.grow.feed.seed" and p.line == line_of(lines, 'feed = { seed = "secnd" }')
    assert p.message == "feed 'seed' = 'secnd': 'secnd' is not a stage of loop 'grow'."
    assert p.hint.startswith("Did you mean 'second'?")

    found, _ = loop_problems(project, extra='\n[loops.again]\nrounds = 2\nstages = ["second"]\n')
    [p] = found.values()
    assert p.key == "loops.again.stages" and p.message == "stage 'second' is in two loops, 'grow' and 'again'."

    found, _ = loop_problems(project, "rounds = 2", "rounds = 21", extra="\n[loops.bad]\nround = 2\nstages = []\n")
    assert found["loops.grow.rounds"].message == "expected less than or equal to 20, found integer 21."
    assert found["loops.bad.round"].hint == "Did you mean 'rounds'?"
    assert found["loops.bad.stages"].message.startswith("List should have at least 1 item")

    found, _ = loop_problems(project, 'stages = ["first", "second"]', 'stages = ["first", "second@1"]')
    assert "List the stage's own name, 'second'" in found["loops.grow.stages"].hint

    found, _ = loop_problems(project, "[stages.second]", '[stages."second@1"]')
    assert "'@' is reserved for the rounds of a loop" in found["stages.second@1"].message


def test_a_problem_in_an_unrolled_stage_names_the_user_key_and_the_round(project):
    # a reference that resolves in no round: one problem, at the user's line, for every round
    found, lines = loop_problems(project, 'input = "first"', 'input = "frist"')
    [p] = found.values()
    assert p.key == "stages.second.input (rounds 1-2)" and p.line == line_of(lines, 'input = "frist"')
    assert p.message == "stage 'second' refers to 'frist', which is not defined."
    assert "Did you mean 'first'?" in p.hint and "stages: first@1..2" in p.hint
    # a problem of round 2 only: the fed stage gives a model where round 1 read conversations
    tune = '[stages.tune]\nkind = "sft"\ninput = "second"\nmodel = "policy"\n\n[loops.grow]'
    text = (
        textwrap.dedent(LOOP)
        .replace("[loops.grow]", tune)
        .replace('stages = ["first", "second"]', 'stages = ["first", "second", "tune"]')
        .replace('seed = "second"', 'seed = "tune"')
    )
    (project / "loop.toml").write_text(text)
    [p] = problems(project / "loop.toml")
    assert p.key == "stages.first.input (round 2)" and p.line == line_of(text.splitlines(), 'input = "seed"')
    assert p.message == "stage 'first@2' (filter) takes conversations as input, but stage 'tune@1' (sft) gives model."
    assert p.format().startswith(f"{p.file}:{p.line}: stages.first.input (round 2): stage 'first@2'")


def test_a_cycle_inside_a_round_points_at_feed(project):
    # `first` reads `second` of its own round, not the previous one: a cycle in every round
    found, lines = loop_problems(project, 'input = "seed"', 'input = "second"')
    assert set(found) == {"stages.first (round 1)", "loops.grow.feed.seed"}
    p = found["stages.first (round 1)"]
    assert p.message == "stages form a cycle: first@1 -> second@1 -> first@1."
    assert p.line == line_of(lines, "[stages.first]") and "through the loop's feed" in p.hint
    assert "nothing outside the loop" in found["loops.grow.feed.seed"].hint  # `seed` is no longer read


def test_resolved_recipe_keeps_the_loop_table_and_set_reaches_it(project):
    path = project / "loop.toml"
    path.write_text(textwrap.dedent(LOOP))
    r = load_recipe(path, ["loops.grow.rounds=4"])
    assert [n for n in r.stages] == [f"{s}@{k}" for k in range(1, 5) for s in ("first", "second")]
    assert r.loops["grow"].rounds == 4
    again = tomllib.loads(dump_toml(r.raw))
    assert again["loops"] == {"grow": {"rounds": 4, "stages": ["first", "second"], "feed": {"seed": "second"}}}
    assert set(again["stages"]) == {"first", "second"}


def test_paths_in_an_unrolled_stage_resolve_against_the_file_that_set_them(project):
    # resources.accelerate_config is resolved late, by stage name: the rounds must find the base file
    write(project / "base" / "acc.yaml", "compute_environment: LOCAL_MACHINE\n")
    write(
        project / "base" / "base.toml",
        """
        [recipe]
        name = "base"

        [datasets.seed]
        path = "../data/convs.jsonl"

        [stages.first]
        kind = "filter"
        input = "seed"

        [stages.first.resources]
        accelerate_config = "acc.yaml"
    """,
    )
    top = write(
        project / "top.toml",
        """
        [recipe]
        name = "top"
        extends = "base/base.toml"

        [loops.grow]
        rounds = 2
        stages = ["first"]
        feed = { seed = "first" }
    """,
    )
    r = load_recipe(top)
    assert list(r.stages) == ["first@1", "first@2"]
    assert r.where("stages.first@2.resources.accelerate_config")["file"].endswith("base.toml")
    (project / "base" / "acc.yaml").unlink()
    [p] = problems(top)
    assert p.key == "stages.first.resources.accelerate_config (rounds 1-2)" and p.file.endswith("base.toml")
    assert p.message == "accelerate_config 'acc.yaml' of stage 'first' is not a file."


def test_references_of_a_loop_stage_that_failed_validation_are_still_checked(project):
    found, lines = loop_problems(project, 'input = "first"', 'input = "frist"\nmin_words = "x"')
    assert set(found) == {"stages.second.min_words", "stages.second.input (rounds 1-2)"}
    p = found["stages.second.input (rounds 1-2)"]
    assert p.line == line_of(lines, 'input = "frist"') and "Did you mean 'first'?" in p.hint


JUDGE_BASE = """
[recipe]
name = "base"

[models.m]
path = "builtin:tiny-chat"

[datasets.seed]
path = "data/convs.jsonl"

[stages.judged]
kind = "judge"
input = "seed"
scorer = "function"
function = "reply_length"
"""


def test_a_child_recipe_unsets_a_base_key_to_switch_a_scorer(project, cli):
    write(project / "base.toml", JUDGE_BASE)
    child = write(
        project / "child.toml",
        """
        [recipe]
        name = "child"
        extends = "base.toml"
        unset = ["stages.judged.function"]

        [stages.judged]
        scorer = "rules"
        """,
    )
    # without unset, the base's `function` is left over and the unused-key check names it
    plain = write(project / "plain.toml", child.read_text().replace('unset = ["stages.judged.function"]\n', ""))
    assert cli("validate", plain).exit_code == 2
    config = load_recipe(child).stages["judged"].config
    assert (config.scorer, config.function) == ("rules", None)
    assert cli("validate", child).exit_code == 0


def test_unset_on_the_command_line_runs_before_set(project, cli):
    base = write(project / "base.toml", JUDGE_BASE)
    result = cli(
        "validate", base, "--unset", "stages.judged.function", "--set", "stages.judged.scorer=rules"
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    plan = cli("plan", base, "--resolved", "--unset", "stages.judged.function", "--set", "stages.judged.scorer=rules")
    assert plan.exit_code == 0 and 'function = "reply_length"' not in plan.output


@pytest.mark.parametrize("how", ["cli", "file"])
def test_unsetting_a_key_that_is_not_there_names_the_near_ones(project, cli, how):
    base = write(project / "base.toml", JUDGE_BASE)
    if how == "cli":
        result = cli("validate", base, "--unset", "stages.judged.functoin")
    else:
        child = write(
            project / "c.toml", '[recipe]\nname = "c"\nextends = "base.toml"\nunset = ["stages.judged.functoin"]\n'
        )
        result = cli("validate", child)
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "no key 'functoin' in stages.judged" in text, result.output
    assert "Did you mean 'stages.judged.function'?" in text and "Traceback" not in result.output
    if how == "file":
        assert "c.toml:4" in text  # the line of `unset`

"""Fingerprints: stable under formatting, sensitive to every semantic field, portable."""

from __future__ import annotations

import os
import random
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core import hashing
from engine.core.hashing import HashMemo
from engine.load.loader import load_recipe
from engine.spec.config import EXEC_ONLY, marker
from engine.store.fingerprint import fingerprints, reasons
from stages import filter as filter_stage

STAGE_KEYS = [
    ("kind", '"filter"'),
    ("input", '"seed"'),
    ("min_words", "3"),
    ("dedup", '"near"'),
    ("max_sycophancy", "0.5"),
    ("refusal_phrases", '["nope", "no way"]'),
]


def fps(path, sets=(), memo=None) -> dict[str, str]:
    r = load_recipe(path, sets)
    return {n: fp for n, (fp, _) in fingerprints(r, memo or HashMemo(None)).items()}


def render(order: list[int], comments: list[bool], spaces: list[int]) -> str:
    lines = [
        "[recipe]",
        'name = "fp"',
        "seed = 1",
        "",
        "[datasets.seed]",
        'path = "data/convs.jsonl"',
        "",
        "[stages.clean]",
    ]
    for i in order:
        key, value = STAGE_KEYS[i]
        pad = " " * spaces[i]
        lines.append(f"{key}{pad}={pad}{value}" + ("   # a comment" if comments[i] else ""))
        if comments[i]:
            lines.append("# a line of comment")
    return "\n".join(lines) + "\n"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.permutations(range(len(STAGE_KEYS))),
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.lists(st.integers(0, 3), min_size=6, max_size=6),
)
def test_formatting_never_changes_the_fingerprint(project, order, comments, spaces):
    (project / "a.toml").write_text(render(list(range(len(STAGE_KEYS))), [False] * 6, [1] * 6))
    (project / "b.toml").write_text(render(order, comments, spaces))
    assert fps(project / "a.toml") == fps(project / "b.toml")


def _other_value(name, field, current):
    """A valid value different from the current one, for every semantic filter field."""
    ann = str(field.annotation)
    if "Literal" in ann:
        return next(v for v in field.annotation.__args__ if v != current)
    if "list" in ann:
        return ["something else"]
    if "bool" in ann:
        return not current
    if "float" in ann:
        return 0.5 if current != 0.5 else 0.6
    if "int" in ann:
        return (current or 0) + 2
    raise AssertionError(f"add a case for {name}: {ann}")


def test_every_semantic_field_changes_the_fingerprint_and_exec_only_ones_do_not(project):
    base = fps(project / "recipe.toml")["clean"]
    cfg = load_recipe(project / "recipe.toml").stages["clean"].config
    checked = 0
    for name, field in filter_stage.Config.model_fields.items():
        if name in ("kind", "input", "resources"):  # resources: tested in test_launch.py (training stages only)
            continue
        value = _other_value(name, field, getattr(cfg, name))
        literal = repr(value).replace("True", "true").replace("False", "false").replace("'", '"')
        changed = fps(project / "recipe.toml", [f"stages.clean.{name}={literal}"])["clean"]
        exec_only = marker(filter_stage.Config, name, EXEC_ONLY)
        assert (changed == base) == bool(exec_only), name
        checked += 1
    assert checked >= 15


def test_seed_data_version_and_upstream_change_it(project, monkeypatch):
    base = fps(project / "recipe.toml")
    assert fps(project / "recipe.toml", ["recipe.seed=8"]) != base
    data = project / "data" / "convs.jsonl"
    data.write_text(data.read_text().replace("Answer 3", "Answer three"))
    changed = fps(project / "recipe.toml")
    assert changed["clean"] != base["clean"] and changed["again"] != base["again"]
    monkeypatch.setattr(filter_stage, "VERSION", 99)
    assert fps(project / "recipe.toml")["clean"] != changed["clean"]


def test_touching_a_file_without_changing_it_keeps_the_fingerprint(project):
    base = fps(project / "recipe.toml")
    data = project / "data" / "convs.jsonl"
    os.utime(data, (1, 1))
    assert fps(project / "recipe.toml") == base


def test_copied_folder_plans_to_the_same_fingerprints(project, tmp_path):
    copy = tmp_path / "elsewhere" / "deeper" / "proj"
    shutil.copytree(project, copy)
    assert fps(copy / "recipe.toml") == fps(project / "recipe.toml")


def test_renaming_a_stage_keeps_fingerprints(project):
    text = (project / "recipe.toml").read_text()
    (project / "renamed.toml").write_text(
        text.replace("[stages.clean]", "[stages.tidy]").replace('input = "clean"', 'input = "tidy"')
    )
    a, b = fps(project / "recipe.toml"), fps(project / "renamed.toml")
    assert a["clean"] == b["tidy"] and a["again"] == b["again"]


def test_file_hashes_are_memoized_by_stat(project, tmp_path, monkeypatch):
    calls = []
    real = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    state = tmp_path / "memo.json"
    memo = HashMemo(state)
    first = fps(project / "recipe.toml", memo=memo)
    memo.save()
    assert len(calls) == 1
    second = fps(project / "recipe.toml", memo=HashMemo(state))  # a new process would start here
    assert second == first and len(calls) == 1
    data = project / "data" / "convs.jsonl"
    data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")
    fps(project / "recipe.toml", memo=HashMemo(state))
    assert len(calls) == 2


@given(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)), max_size=6))
def test_canonical_json_ignores_key_order(d):
    items = list(d.items())
    random.Random(0).shuffle(items)
    assert hashing.digest(d) == hashing.digest(dict(items))


def test_reasons_in_words():
    old = {
        "kind": "filter",
        "version": 1,
        "config": {"min_words": 3, "dedup": "exact"},
        "files": {},
        "inputs": {"input": [{"name": "draft", "source": "stages", "id": "aa"}]},
        "templates": {"critique.j2": "x"},
        "seed": 1,
    }
    new = {
        **old,
        "config": {"min_words": 5, "dedup": "exact"},
        "inputs": {"input": [{"name": "draft", "source": "stages", "id": "bb"}]},
        "templates": {"critique.j2": "y"},
    }
    assert reasons(old, new) == ["config: min_words 3 -> 5", "input changed: draft", "template changed: critique.j2"]
    assert reasons(None, new) == ["new"]
    assert reasons(new, new) == ["not in cache"]


def test_long_inline_chat_template_is_text_not_a_path():
    assert not hashing.is_file("{% for m in messages %}" + "x" * 5000 + "{% endfor %}")
    assert not hashing.is_file("a" * 5000)  # too long for the OS: still no crash
    assert hashing.is_file(__file__)

"""engine.spec.stage: the stage contract, checked when a kind loads."""

from __future__ import annotations

import types

import pytest

from engine.spec import registry
from engine.spec.config import StageConfig
from engine.spec.stage import HOOKS, contract_problems, hook


@pytest.mark.parametrize("kind", sorted(registry.BUILTIN))
def test_every_builtin_kind_keeps_the_contract(kind):
    module = registry.load(kind)
    assert contract_problems(module) == []
    public = {n for n in vars(module) if not n.startswith("_")}
    # every lower-case hook-like function the engine could look for is a declared hook
    assert {"check", "templates", "summary", "gives"} & public <= set(HOOKS)


def test_a_broken_module_is_named_with_everything_wrong():
    class Config(StageConfig):
        kind: str = "x"

    bad = types.ModuleType("plugin.bad")
    bad.Config, bad.VERSION, bad.GIVES, bad.TRAINS, bad.summary = Config, "1", "rows", "yes", 3
    problems = contract_problems(bad)
    assert problems == [
        "VERSION must be an int",
        "GIVES must be one of conversations, prompts, samples, preferences, model, report, constitution",
        "run(config, inputs, ctx) is missing",
        "TRAINS must be True or False",
        "summary must be a function",
    ]


def test_hook_returns_none_for_an_absent_hook_and_rejects_unknown_names():
    module = registry.load("filter")
    assert hook(module, "gives") is None and hook(None, "check") is None
    assert callable(hook(module, "summary"))
    with pytest.raises(AssertionError):
        hook(module, "sumary")


def test_no_stage_imports_another():
    """Shared logic lives in engine/ (scoring, pairs, training, ...): stage modules stay independent."""
    import re
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "stages").glob("*.py")):
        imports = re.findall(r"^\s*(?:from|import)\s+stages\b.*$", path.read_text(), re.MULTILINE)
        assert imports == [], f"{path.name}: {imports}"


@pytest.mark.parametrize(
    "stage, expected",
    [
        (
            'kind = "judge"\ninput = "convs"\nscorer = "rules"\nrubric = "be kind"',
            "rubric is not used by scorer 'rules'",
        ),
        (
            'kind = "judge"\ninput = "convs"\nscorer = "function"\nfunction = "reply_quality"\nmax_retries = 3',
            "max_retries is not used by scorer 'function'",
        ),
        (
            'kind = "generate"\ninput = "convs"\nmodel = "policy"\nuser_template = "x.j2"',
            "user_template is not used by mode 'single'",
        ),
        (
            'kind = "generate"\ninput = "convs"\nmodel = "policy"\nmode = "multi_turn"\ntemplate = "x.j2"',
            "template is not used by mode 'multi_turn'",
        ),
    ],
)
def test_keys_a_configuration_ignores_fail_validate(tmp_path, cli, stage, expected):
    """Declared by each stage's `uses` hook and checked by the engine for every stage alike."""
    from conftest import GOOD, write_jsonl

    write_jsonl(tmp_path / "convs.jsonl", GOOD[:3])
    (tmp_path / "r.toml").write_text(
        '[recipe]\nname = "u"\n[models.policy]\npath = "builtin:tiny-chat"\n'
        f'[datasets.convs]\npath = "convs.jsonl"\n[stages.s]\n{stage}\n'
    )
    result = cli("validate", tmp_path / "r.toml")
    assert result.exit_code == 2 and expected in " ".join(result.output.split())


def test_eval_keys_for_suites_not_asked_for_fail_validate(tmp_path, cli):
    (tmp_path / "r.toml").write_text(
        '[recipe]\nname = "u"\n[models.policy]\npath = "builtin:tiny-chat"\n[stages.ev]\nkind = "eval"\n'
        'models = ["policy"]\nsuites = ["refusal"]\nchallenge = "Really?"\njudge_retries = 4\n'
    )
    out = " ".join(cli("validate", tmp_path / "r.toml").output.split())
    assert "challenge is not used by suites refusal without a judge" in out
    assert "judge_retries is not used by suites refusal without a judge" in out

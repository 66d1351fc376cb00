"""The CLI: exit codes, messages without tracebacks, every command, light imports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, conv, fault_env, run_cli_subprocess, write_jsonl


def test_validate_ok_and_bad(cli, project):
    res = cli("validate", project / "recipe.toml")
    assert res.exit_code == 0 and "ok: basic: 2 stages" in res.output
    (project / "recipe.toml").write_text((project / "recipe.toml").read_text().replace("min_words", "min_wrds"))
    proc = run_cli_subprocess("validate", project / "recipe.toml")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "recipe.toml:12: stages.clean.min_wrds: unknown key 'min_wrds'. Did you mean 'min_words'?" in proc.stderr


def test_missing_file_and_bad_set_exit_2(cli, project):
    assert cli("validate", project / "nope.toml").exit_code == 2
    assert cli("plan", project / "recipe.toml", "--set", "stages.clean.min_words").exit_code == 2
    assert cli("run", project / "recipe.toml", "--only", "nosuch").exit_code == 2


def test_plan_json_shape_and_reasons(cli, project):
    res = cli("plan", project / "recipe.toml", "--json")
    data = json.loads(res.output)
    assert data["recipe"] == "basic"
    assert [(s["name"], s["kind"], s["status"], s["reasons"]) for s in data["stages"]] == [
        ("clean", "filter", "run", ["new"]),
        ("again", "filter", "run", ["new"]),
    ]
    # again's key holds clean's output: not known before clean has run
    assert [len(s["fingerprint"] or "") for s in data["stages"]] == [24, 0]
    assert cli("run", project / "recipe.toml").exit_code == 0
    data = json.loads(cli("plan", project / "recipe.toml", "--json", "--set", "stages.again.refusals='keep'").output)
    assert [s["status"] for s in data["stages"]] == ["cached", "run"]
    assert data["stages"][1]["reasons"] == ['config: refusals "drop" -> "keep"']


def test_dry_run_runs_nothing(cli, project, runs):
    res = cli("run", project / "recipe.toml", "--dry-run")
    assert res.exit_code == 0 and "clean" in res.output
    assert not (runs / "basic").exists()


def test_run_show_status_gc(cli, project, runs):
    assert cli("run", project / "recipe.toml").exit_code == 0
    res = cli("show", "basic", "clean", "-n", "2")
    assert res.exit_code == 0
    assert "first 2 of 40 rows" in res.output and "Question number 0" in res.output
    assert "rows out" in res.output
    assert "ok" in cli("status").output
    detail = cli("status", "basic").output
    assert "clean" in detail and "again" in detail
    assert cli("show", "basic", "nosuch").exit_code == 2
    # a later run without a stage points at the run that has its output
    assert cli("run", project / "recipe.toml", "--only", "clean").exit_code == 0
    missing = cli("show", "basic", "again")
    assert missing.exit_code == 2 and "has one: recipe show basic/" in " ".join(missing.output.split())
    # a changed recipe makes new entries; the old ones stay until gc drops them
    assert cli("run", project / "recipe.toml", "--set", "stages.again.refusals='keep'").exit_code == 0
    entries = sorted(p.name for p in (runs / "cache").iterdir() if (p / "manifest.json").exists())
    assert len(entries) == 3

    def entries_left() -> int:
        return len([p for p in (runs / "cache").iterdir() if (p / "manifest.json").exists()])

    # the recipe as written is kept even though its last run is not among the latest 1
    kept = cli("gc", "--keep-runs", "1", "--yes")
    assert kept.exit_code == 0 and "recipe files need as written (recipe.toml)" in kept.output
    assert entries_left() == 3 and "0 entries" in kept.output
    first = sorted(p.name for p in (runs / "basic").iterdir() if (p / "record.json").exists())[0]
    # once the file changes, nothing uses the first run's entries any more
    (project / "recipe.toml").write_text(
        (project / "recipe.toml").read_text().replace("min_words = 3", "min_words = 6")
    )
    dry = cli("gc", "--keep-runs", "1")
    assert "would remove" in dry.output and "1 entry," in dry.output and entries_left() == 3
    assert cli("gc", "--keep-runs", "1", "--yes").exit_code == 0
    assert entries_left() == 2  # the last run's (clean is the same entry in both runs)
    status = cli("status", f"basic/{first}").output
    assert "deleted by gc" in status and "cached" not in status
    gone = cli("show", f"basic/{first}", "again")
    assert gone.exit_code == 2 and "deleted by gc" in gone.output


def test_diff(cli, project):
    b = project / "b.toml"
    b.write_text((project / "recipe.toml").read_text().replace("min_words = 3", "min_words = 6"))
    data = json.loads(cli("diff", project / "recipe.toml", b, "--json").output)
    assert [(s["stage"], s["reasons"]) for s in data["stages"]] == [
        ("clean", ["config: min_words 3 -> 6"]),
        ("again", ["input changed: clean"]),
    ]
    assert "no differences" in cli("diff", project / "recipe.toml", project / "recipe.toml").output


def test_schema_is_json_schema_of_the_format(cli):
    schema = json.loads(cli("schema").output)
    assert set(schema["properties"]) == {"recipe", "models", "datasets", "constitutions", "stages", "loops"}
    assert schema["additionalProperties"] is False
    text = json.dumps(schema)
    assert '"min_words"' in text and '"x-ref"' in text


def test_init_writes_a_recipe_that_runs(cli, tmp_path):
    target = tmp_path / "new"
    assert cli("init", target).exit_code == 0
    assert cli("init", target).exit_code == 2  # never overwrites silently
    assert cli("run", target / "recipe.toml").exit_code == 0
    assert "filler" in cli("show", "starter", "filtered").output


def test_stage_failure_exits_1_with_log_and_keeps_upstream(cli, project, runs, monkeypatch):
    import stages.filter as f

    real = f.run

    def boom(config, inputs, ctx):
        if ctx.stage == "again":
            raise ValueError("something broke\nsecond line")
        return real(config, inputs, ctx)

    monkeypatch.setattr(f, "run", boom)
    res = cli("run", project / "recipe.toml")
    assert res.exit_code == 1
    assert "stage 'again' failed: ValueError: something broke" in res.output
    assert "log: " in res.output and "second line" not in res.output
    log = (runs / "basic" / "latest" / "logs" / "again.log").read_text()
    assert "Traceback" in log and "second line" in log
    record = json.loads((runs / "basic" / "latest" / "record.json").read_text())
    assert record["status"] == "failed" and record["stages"]["clean"]["status"] == "run"
    report = (runs / "basic" / "latest" / "report.md").read_text()  # a failed run gets its report too
    assert "## Failed" in report and "stage 'again' (filter) failed: ValueError: something broke" in report
    assert "logs/again.log" in report and "second line" not in report
    monkeypatch.setattr(f, "run", real)
    plan = json.loads(cli("plan", project / "recipe.toml", "--json").output)
    assert [s["status"] for s in plan["stages"]] == ["cached", "run"]


def test_ctrl_c_keeps_committed_shards(project, runs):
    # slow the filter down per shard with many rows and tiny shards, then interrupt
    rows = [conv(f"q{i}", f"answer number {i} with several words in it", id=f"r{i}") for i in range(20000)]
    write_jsonl(project / "data" / "convs.jsonl", rows)
    marker = project / "paused"
    env = {**os.environ, **fault_env(RECIPE_PAUSE_AFTER_SHARDS=f"4:{marker}")}
    cmd = [sys.executable, "-m", "engine.cli", "run", str(project / "recipe.toml"), "--runs-dir", str(runs)]
    cmd += ["--set", "stages.clean.shard_size=50"]
    # SIGINT as a terminal delivers it: a test worker may run with SIGINT ignored (an earlier test's
    # library can set that), and an ignored SIGINT is inherited across exec
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )
    partial = runs / "cache" / "partial"
    deadline = time.time() + 120
    while time.time() < deadline and not marker.exists():  # the run pauses after its 4th shard commit
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    kept = list(partial.glob("*/shard-*"))
    assert len(kept) >= 4
    record = json.loads((runs / "basic" / "latest" / "record.json").read_text())
    assert record["status"] == "interrupted"


def test_importing_the_cli_stays_light():
    code = (
        "import sys, engine.cli, engine.spec.recipe, engine.run.executor, engine.store.fingerprint, stages.filter, stages.generate, stages.judge, engine.load.schema; "
        "print(sorted(m for m in ('torch','transformers','trl','peft','datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_the_schema_names_the_wrong_key_and_accepts_partial_extends_children(cli):
    """Editors validate with this schema: stages are picked by `kind` (if/then), so an error names
    the key; a child recipe (`extends`) may give partial stage tables."""
    import jsonschema
    import tomllib

    schema = json.loads(cli("schema").output)
    validator = jsonschema.Draft202012Validator(schema)
    flagship = tomllib.loads((ROOT / "recipes" / "caI_multiturn.toml").read_text())
    assert not list(validator.iter_errors(flagship))
    flagship["stages"]["best_single"]["tempreature"] = 1.0
    errors = list(validator.iter_errors(flagship))
    assert errors and all("oneOf" not in e.message for e in errors)
    assert any("tempreature" in e.message for e in errors), [e.message for e in errors]
    flagship["stages"]["best_single"].pop("tempreature")
    flagship["stages"]["best_single"]["kind"] = "rejection_sampel"
    assert any("rejection_sampel" in e.message for e in validator.iter_errors(flagship))
    child = {"recipe": {"extends": "caI_multiturn.toml"}, "stages": {"sft": {"lr": 1e-4}}}
    assert not list(validator.iter_errors(child))
    child["recipe"]["unset"] = ["stages.sft.max_steps"]
    assert not list(validator.iter_errors(child))  # a child may remove keys of its base
    child["recipe"].pop("unset")
    child["stages"]["sft"]["lr"] = "fast"
    child["stages"]["sft"]["kind"] = "sft"
    assert list(validator.iter_errors(child))  # types are still checked in a partial table
    assert list(validator.iter_errors({"recipe": {"name": "x"}, "stages": {"a": {"kind": "sft"}}}))  # no input

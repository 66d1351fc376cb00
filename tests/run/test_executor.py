"""Running: cache hits, reasons, crash between shard commits, corrupt entries, concurrent runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from engine.data.rows import read_rows
from engine.load.loader import load_recipe
from engine.run.executor import run
from engine.run.plan import make_plan
from engine.store.cache import Store

from conftest import GOOD, ROOT, conv, run_cli_subprocess, write_jsonl


def rows_of(runs: Path, recipe: str, stage: str) -> list[dict]:
    return read_rows(runs / recipe / "latest" / "stages" / stage / "rows.parquet")


def test_run_then_everything_cached_and_records_written(project, runs):
    r = load_recipe(project / "recipe.toml")
    rec = run(r, runs)
    assert {s["status"] for s in rec.data["stages"].values()} == {"run"}
    assert rec.data["stages"]["clean"]["rows_in"] == 40 and rec.data["stages"]["clean"]["rows_out"] == 40
    assert (runs / "basic" / "latest").resolve() == rec.dir.resolve()
    assert (rec.dir / "recipe.toml").exists() and (rec.dir / "logs" / "clean.log").exists()
    manifest = json.loads((rec.dir / "stages" / "clean" / "manifest.json").read_text())
    assert manifest["fingerprint"] == rec.data["stages"]["clean"]["fingerprint"]
    assert "torch" in manifest["versions"] and manifest["rows"] == {"in": 40, "out": 40}
    assert [p.status for p in make_plan(r, runs)] == ["cached", "cached"]
    rec2 = run(r, runs)
    assert {s["status"] for s in rec2.data["stages"].values()} == {"cached"}


def test_plan_explains_and_revert_is_a_cache_hit(project, runs):
    run(load_recipe(project / "recipe.toml"), runs)
    changed = load_recipe(project / "recipe.toml", ["stages.clean.min_words=5"])
    plan = {p.name: p for p in make_plan(changed, runs)}
    assert plan["clean"].reasons == ["config: min_words 3 -> 5"]
    # its key holds clean's output, not known until clean has run
    assert plan["again"].status == "pending" and plan["again"].fingerprint is None
    assert plan["again"].reasons == ["runs if clean's output changes"]
    rec = run(changed, runs)
    back = {p.name: p.status for p in make_plan(load_recipe(project / "recipe.toml"), runs)}
    assert back == {"clean": "cached", "again": "cached"}
    # every row has at least 5 words: clean re-ran and committed the same rows, so `again` was kept
    assert rec.data["stages"]["clean"]["status"] == "run"
    assert rec.data["stages"]["clean"]["note"] == "clean re-ran: output unchanged, 1 stage after it kept"
    assert rec.data["stages"]["again"]["status"] == "cached"
    assert rec.data["stages"]["again"]["reasons"] == ["its inputs came out the same"]


def test_an_output_that_changes_re_runs_what_reads_it(project, runs):
    run(load_recipe(project / "recipe.toml"), runs)
    write_jsonl(project / "data" / "convs.jsonl", GOOD[:30])
    changed = load_recipe(project / "recipe.toml")
    rec = run(changed, runs)
    assert rec.data["stages"]["clean"]["rows_out"] == 30 and "note" not in rec.data["stages"]["clean"]
    assert rec.data["stages"]["again"]["status"] == "run"
    assert rec.data["stages"]["again"]["reasons"] == ["input changed: clean"]
    assert {p.status for p in make_plan(changed, runs)} == {"cached"}


def test_crash_between_shard_commits_then_resume_equals_uninterrupted(project, runs, tmp_path):
    # 40 rows, shard_size 10: the process dies (os._exit, like SIGKILL) after the 2nd commit
    proc = run_cli_subprocess(
        "run", project / "recipe.toml", "--runs-dir", runs, faults={"RECIPE_CRASH_AFTER_SHARDS": "2"}
    )
    assert proc.returncode == 137
    store = Store(runs)
    fp = json.loads((runs / "basic" / "latest" / "record.json").read_text())["stages"]["clean"]["fingerprint"]
    assert store.peek(fp) is None and not store.entry_path(fp).exists()  # nothing that looks whole
    assert sorted(p.name for p in store.partial(fp).glob("shard-*")) == ["shard-000000", "shard-000001"]
    assert {p.name: p.status for p in make_plan(load_recipe(project / "recipe.toml"), runs)}["clean"] == "partial"
    assert len(list((runs / "cache" / "tmp").iterdir())) == 1  # the half-built entry of the killed run

    proc = run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs)
    assert proc.returncode == 0, proc.stderr
    log = (runs / "basic" / "latest" / "logs" / "clean.log").read_text()
    assert "resumed: 2 of 4 shards were already committed" in log
    assert "clean: resuming: 2 of 4 shards committed" in proc.stderr  # said when the stage starts
    assert not store.partial(fp).exists()
    assert list((runs / "cache" / "tmp").iterdir()) == []  # its builder is gone: swept at the next run

    fresh = tmp_path / "fresh-runs"
    assert run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", fresh).returncode == 0
    for stage in ("clean", "again"):
        assert rows_of(runs, "basic", stage) == rows_of(fresh, "basic", stage)
        a = json.loads((runs / "basic" / "latest" / "stages" / stage / "manifest.json").read_text())
        b = json.loads((fresh / "basic" / "latest" / "stages" / stage / "manifest.json").read_text())
        assert a["fingerprint"] == b["fingerprint"] and a["checksums"] == b["checksums"]


def test_corrupt_entry_is_rebuilt_with_a_warning(project, runs):
    r = load_recipe(project / "recipe.toml")
    rec = run(r, runs)
    entry = rec.dir / "stages" / "clean"
    good = (entry / "rows.parquet").read_bytes()
    (entry / "rows.parquet").write_bytes(good[:-7] + b"garbage")
    proc = run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs)
    assert proc.returncode == 0
    assert "damaged (checksum mismatch in rows.parquet); rebuilding it" in proc.stderr
    rec = json.loads((runs / "basic" / "latest" / "record.json").read_text())
    assert rec["stages"]["clean"]["status"] == "run" and rec["stages"]["again"]["status"] == "cached"
    assert (runs / "basic" / "latest" / "stages" / "clean" / "rows.parquet").read_bytes() == good


def test_missing_manifest_is_not_trusted(project, runs):
    rec = run(load_recipe(project / "recipe.toml"), runs)
    (rec.dir / "stages" / "again" / "manifest.json").unlink()
    plan = {p.name: p.status for p in make_plan(load_recipe(project / "recipe.toml"), runs)}
    assert plan == {"clean": "cached", "again": "run"}


def test_two_concurrent_runs_share_one_runs_dir(project, runs):
    rows = [
        conv(
            f"Tell me fact {i}.", f"Fact {i}: the number {i} squared is {i * i}, and doubled it is {2 * i}.", id=f"f{i}"
        )
        for i in range(3000)
    ]
    write_jsonl(project / "data" / "convs.jsonl", rows)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "engine.cli", "run", str(project / "recipe.toml"), "--runs-dir", str(runs)]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    records = [
        json.loads((d / "record.json").read_text())
        for d in (runs / "basic").iterdir()
        if d.is_dir() and not d.is_symlink() and not d.name.startswith(".")
    ]
    assert len(records) == 2
    fps = {s["fingerprint"] for r in records for s in r["stages"].values()}
    assert len(fps) == 2  # both runs agree
    statuses = sorted(r["stages"]["clean"]["status"] for r in records)
    assert statuses == ["cached", "run"]  # built once, the other waited and reused it
    assert len(rows_of(runs, "basic", "again")) == 3000
    assert not list((runs / "cache" / "tmp").glob("*"))


def test_only_and_force(project, runs):
    r = load_recipe(project / "recipe.toml")
    rec = run(r, runs, only=["clean"])
    assert list(rec.data["stages"]) == ["clean"]
    rec = run(r, runs, force=["clean"])
    assert rec.data["stages"]["clean"]["status"] == "run" and rec.data["stages"]["clean"]["reasons"] == ["forced"]
    assert rec.data["stages"]["again"]["status"] == "run"  # never built before
    rec = run(r, runs, force=["clean"])
    assert rec.data["stages"]["again"]["status"] == "cached"  # same fingerprint downstream


def test_dataset_rows_dropped_are_counted_and_reported(project, runs):
    bad = [conv("only a user turn"), {"messages": [{"role": "robot", "content": "x"}]}]
    write_jsonl(project / "data" / "convs.jsonl", GOOD + bad)
    proc = run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs)
    assert proc.returncode == 0
    assert "dataset 'seed': dropped 2 of 42 rows" in proc.stderr
    assert "no assistant turn: 1 (first: seed:40)" in proc.stderr
    assert "unknown role 'robot': 1 (first: seed:41)" in proc.stderr
    record = json.loads((runs / "basic" / "latest" / "record.json").read_text())
    assert record["stages"]["clean"]["dropped"]["seed"]["reasons"]["no assistant turn"] == {
        "rows": 1,
        "first_ids": ["seed:40"],
    }
    cached = run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs)  # said again when cached
    assert "dataset 'seed': dropped 2 of 42 rows" in cached.stderr
    record = json.loads((runs / "basic" / "latest" / "record.json").read_text())
    assert record["stages"]["clean"]["status"] == "cached" and "dropped" in record["stages"]["clean"]


def test_the_run_record_keeps_stages_in_dag_order(project, runs):
    """'again' sorts before 'clean' but runs after it: record.json keeps the DAG order."""
    import json

    from engine.load.loader import load_recipe
    from engine.run.executor import run

    record = run(load_recipe(project / "recipe.toml"), runs)
    data = json.loads((record.dir / "record.json").read_text())
    assert list(data["stages"]) == ["clean", "again"] == data["order"]


def test_an_edited_shard_with_the_same_row_count_is_redone(project, runs, tmp_path):
    """A committed shard rewritten as valid Parquet, same rows count, one message changed: its
    checksum no longer matches, so resume redoes it and the result equals an uninterrupted run."""
    proc = run_cli_subprocess(
        "run", project / "recipe.toml", "--runs-dir", runs, faults={"RECIPE_CRASH_AFTER_SHARDS": "2"}
    )
    assert proc.returncode == 137
    [shard] = sorted(runs.glob("cache/partial/*/shard-000000"))
    rows = read_rows(shard / "rows.parquet")
    rows[3]["messages"][1]["content"] = "An edited answer that nobody generated."
    from engine.data.rows import write_rows

    write_rows(shard / "rows.parquet", rows)
    assert run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs).returncode == 0
    log = (runs / "basic" / "latest" / "logs" / "clean.log").read_text()
    assert "shard 0 does not match the checksum it was committed with; redoing it" in log
    fresh = tmp_path / "fresh"
    assert run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", fresh).returncode == 0
    assert rows_of(runs, "basic", "clean") == rows_of(fresh, "basic", "clean")


def test_plan_finds_flipped_bytes_as_run_will_and_trusts_a_mere_touch(project, runs):
    r = load_recipe(project / "recipe.toml")
    record = run(r, runs)
    rows_file = (record.dir / "stages" / "clean" / "rows.parquet").resolve()
    os.utime(rows_file)  # a new mtime, same bytes: hashed once, still cached
    assert [p.status for p in make_plan(r, runs)] == ["cached", "cached"]
    data = bytearray(rows_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    rows_file.write_bytes(bytes(data))
    plan = {p.name: p for p in make_plan(r, runs)}
    assert plan["clean"].status == "run" and "damaged" in plan["clean"].reasons[0]
    assert plan["again"].status == "cached"
    again = run(r, runs)
    assert again.data["stages"]["clean"]["status"] == "run"  # run agrees: rebuilt
    assert [p.status for p in make_plan(r, runs)] == ["cached", "cached"]


def test_a_damaged_entry_that_cannot_be_moved_aside_says_what_to_do(project, runs, monkeypatch):
    import pytest

    import engine.store.cache as cache
    from engine.core.errors import CacheError

    record = run(load_recipe(project / "recipe.toml"), runs)
    fp = record.data["stages"]["clean"]["fingerprint"]
    (runs / "cache" / fp / "rows.parquet").write_bytes(b"garbage")

    def read_only(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache.os, "replace", read_only)
    with pytest.raises(CacheError) as err:
        Store(runs).get(fp)
    text = str(err.value)
    assert "is damaged (" in text and "Permission denied" in text and "chmod -R u+w" in text


def test_rehash_notices_a_file_edited_with_its_size_and_mtime_kept(project, runs):
    data = project / "data" / "convs.jsonl"
    assert run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs).returncode == 0
    st = data.stat()
    text = data.read_text()
    data.write_text(text.replace("Question number 1 ", "Question number 9 ", 1))  # same size
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert data.stat().st_size == st.st_size
    quiet = run_cli_subprocess("plan", project / "recipe.toml", "--runs-dir", runs, "--json")
    assert [s["status"] for s in json.loads(quiet.stdout)["stages"]] == ["cached", "cached"]  # the memo's trade-off
    loud = run_cli_subprocess("plan", project / "recipe.toml", "--runs-dir", runs, "--json", "--rehash")
    stages = json.loads(loud.stdout)["stages"]
    assert stages[0]["status"] == "run" and any("seed" in r for r in stages[0]["reasons"]), stages
    assert run_cli_subprocess("run", project / "recipe.toml", "--runs-dir", runs, "--rehash").returncode == 0
    assert rows_of(runs, "basic", "clean")[1]["messages"][0]["content"].startswith("Question number 9")

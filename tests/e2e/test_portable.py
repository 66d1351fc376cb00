"""Cache entries hold no path of the machine that made them: a runs dir moved elsewhere still loads
every entry (a LoRA adapter finds its base by fingerprint), and two runs in different runs dirs
write byte-identical entries (timings live in metrics.json and the manifest only)."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from conftest import conv, write_jsonl

RECIPE = """
[recipe]
name = "portable"
seed = 3

[models.policy]
path = "builtin:tiny-chat"

[datasets.chats]
path = "chats.jsonl"

[datasets.prompts]
path = "prompts.jsonl"
type = "prompts"

[stages.base_sft]
kind = "sft"
input = "chats"
model = "policy"
max_steps = 2
batch_size = 4
per_device_batch_size = 4
max_length = 128

[stages.tuned]
kind = "sft"
input = "chats"
model = "base_sft"
max_steps = 2
batch_size = 4
per_device_batch_size = 4
max_length = 128

[stages.tuned.lora]
r = 4
alpha = 8
dropout = 0.0

[stages.replies]
kind = "generate"
input = "prompts"
model = "tuned"
temperature = 0.0
max_new_tokens = 8
"""

TIMING_FILES = {"manifest.json", "metrics.json"}


def entries(cache: Path) -> dict[str, bytes]:
    return {
        p.relative_to(cache).as_posix(): p.read_bytes()
        for p in sorted(cache.rglob("*"))
        if p.is_file()
        and len(p.relative_to(cache).parts) > 1
        and p.relative_to(cache).parts[0] not in ("builtin", "partial")
        and p.name not in TIMING_FILES
        and not p.name.startswith(".")
    }


@pytest.mark.slow
def test_entries_are_byte_identical_and_survive_a_move(tmp_path):
    from engine.data.rows import read_rows
    from engine.load.loader import load_recipe
    from engine.run.executor import run
    from engine.run.plan import make_plan

    proj = tmp_path / "proj"
    write_jsonl(proj / "chats.jsonl", [conv(f"say {i}", f"ok {i}", id=f"c{i}") for i in range(8)])
    write_jsonl(proj / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"say {i}"} for i in range(3)])
    (proj / "r.toml").write_text(textwrap.dedent(RECIPE))
    recipe = load_recipe(proj / "r.toml")
    a = run(recipe, tmp_path / "a")
    run(recipe, tmp_path / "b")

    ea, eb = entries(tmp_path / "a" / "cache"), entries(tmp_path / "b" / "cache")
    assert ea.keys() == eb.keys() and any(k.endswith("adapter_config.json") for k in ea)
    assert [k for k in ea if ea[k] != eb[k]] == []
    for name, data in ea.items():
        assert str(tmp_path).encode() not in data, name
        assert not name.endswith(("training_args.bin", ".pkl")), name

    # move the runs dir: every stage is still cached, and the adapter still loads on its base
    moved = tmp_path / "elsewhere" / "runs"
    moved.parent.mkdir()
    shutil.move(str(tmp_path / "a"), moved)
    assert {i.status for i in make_plan(recipe, moved)} == {"cached"}
    again = run(recipe, moved, force=["replies"])
    before = read_rows(
        Path(str(a.dir).replace(str(tmp_path / "a"), str(moved))) / "stages" / "replies" / "rows.parquet"
    )
    assert read_rows(again.dir / "stages" / "replies" / "rows.parquet") == before

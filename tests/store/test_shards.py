"""engine.store.shards: the progress a stage sees counts each row once, whether the stage reports
rows as it goes, the row memo supplies them, or a shard was committed before a resume."""

from __future__ import annotations

import logging

import pytest

from engine.store.shards import ShardRunner


class Task:
    def __init__(self, total):
        self.total, self.done = total, 0

    def advance(self, n):
        self.done += n


def runner(root, tasks, definition="stage-def"):
    def progress(total, desc):
        tasks.append(Task(total))
        return tasks[-1]

    return ShardRunner(
        root / "shards", "fp", 0, progress, logging.getLogger("t"), memo_root=root / "memo", definition=definition
    )


@pytest.mark.parametrize("reports", [True, False])
def test_each_row_counts_once_computed_or_reused(tmp_path, reports):
    rows = [{"x": i} for i in range(10)]

    def fn(shard):
        out = []
        for r in shard.rows:
            out.append(([{"y": r["x"] * 2}], {}))
            if reports:
                shard.progress(1)
        return out

    tasks: list[Task] = []
    first, _ = runner(tmp_path / "a", tasks).map_rows(rows, fn, shard_size=4)
    assert (tasks[-1].total, tasks[-1].done) == (10, 10)
    # a second stage over the same memo: four rows new, six reused
    memo_shared = tmp_path / "a"
    more = rows[:6] + [{"x": i} for i in range(100, 104)]
    second = runner(memo_shared, tasks)
    second.root = tmp_path / "b-shards"
    out, _ = second.map_rows(more, fn, shard_size=4)
    assert (tasks[-1].total, tasks[-1].done) == (10, 10)
    assert second.reuse.reused == 6 and out[:6] == first[:6]

"""Third-party console noise goes to the stage log, not the terminal.

While `recipe run` runs, `sys.stderr` is a `Router`: text written there (Python warnings such as
transformers' FutureWarnings, library loggers' stream handlers, stray prints) goes, line by line,
to the log of the stage that is running (the thread's own stage, else the latest one started),
and to the real stderr only between stages. Progress bars of tqdm-based libraries (transformers
"Loading weights", datasets "Map", TRL "Tokenizing train dataset") are switched off with
TQDM_DISABLE and HF_HUB_DISABLE_PROGRESS_BARS before those libraries are imported; they would be
noise in a log too. The engine's own console (rich) writes to the real stderr, so our progress,
warnings and errors stay on screen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}

_local = threading.local()
_active: list[logging.Logger] = []
_lock = threading.Lock()


class Router:
    """A text stream that hands complete lines to the current stage's logger, else to `real`."""

    def __init__(self, real) -> None:
        self.real = real
        self._partial: dict[int, str] = {}

    def _target(self) -> logging.Logger | None:
        mine = getattr(_local, "log", None)
        if mine is not None:
            return mine
        with _lock:
            return _active[-1] if _active else None

    def write(self, text: str) -> int:
        log = self._target()
        if log is None:
            return self.real.write(text)
        key = threading.get_ident()
        buffered = self._partial.pop(key, "") + text.replace("\r", "\n")
        *lines, rest = buffered.split("\n")
        if rest:
            self._partial[key] = rest
        for line in lines:
            if line.strip():
                log.info("[stderr] %s", line.rstrip())
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return False  # libraries that draw for a terminal fall back to plain lines

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.real, "encoding", "utf-8")


@contextmanager
def routed() -> Iterator[Router]:
    """For the duration of a run: sys.stderr is a Router; tqdm bars off (set before import)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    real = sys.stderr
    router = Router(real)
    sys.stderr = router
    try:
        yield router
    finally:
        if sys.stderr is router:
            sys.stderr = real


@contextmanager
def stage_output(log: logging.Logger) -> Iterator[None]:
    """While a stage runs in this thread, what third parties write to stderr goes to `log`."""
    _local.log = log
    with _lock:
        _active.append(log)
    try:
        yield
    finally:
        _local.log = None
        with _lock:
            _active.remove(log)


def progress_bars(console: Console) -> _RateProgress:
    """The run's progress bars, made to fit 80 columns: a label cut to 24 characters, a short bar,
    done/total, the rate of this run's work (rows/s, steps/s) and the ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Column

    return _RateProgress(
        Progress(
            TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=24)),
            BarColumn(bar_width=10),
            MofNCompleteColumn(),
            TextColumn("[progress.data.speed]{task.fields[rate]}", table_column=Column(no_wrap=True)),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
    )


class _RateProgress:
    """A rich Progress whose tasks show their rate with a unit (rich's own speed column has none).
    A task's first advance (the rows of committed shards, when a stage resumes) is not in the
    rate: rich leaves a task's first sample out of its speed."""

    def __init__(self, progress) -> None:
        self.live = progress

    def add_task(self, description: str, total=None, unit: str = "rows") -> int:
        return self.live.add_task(description, total=total, rate="", unit=unit)

    def advance(self, task_id: int, n: int) -> None:
        self.live.advance(task_id, n)
        task = next(t for t in self.live.tasks if t.id == task_id)
        self.live.update(task_id, rate=f"{task.speed:,.1f} {task.fields['unit']}/s" if task.speed else "")


def terminate_like_interrupt() -> None:
    """SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread: the same path as Ctrl-C."""
    import signal
    import threading

    def handler(signum, frame):
        from engine.core.errors import Terminated

        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)

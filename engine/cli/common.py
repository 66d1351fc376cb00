"""What the command modules share: the consoles and the --runs-dir option."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _runs_dir_option(f):
    return click.option(
        "--runs-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Output root (default: $RECIPE_RUNS_DIR or ./runs).",
    )(f)


def _runs_dir(value: str | None) -> Path:
    from engine.run.plan import runs_dir_default

    return Path(value or runs_dir_default())

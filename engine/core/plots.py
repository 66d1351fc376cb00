"""Small matplotlib helpers for stage artifacts and reports: PNG files, no display needed.

matplotlib is imported inside each function (Agg backend), so importing this module is free.
Inside `figure_cache(dir)` a figure whose inputs were drawn before is read back from `dir`
(keyed by a hash of the function and its arguments) and matplotlib is not imported at all: a
fully cached `recipe run` rewrites its report without drawing.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from engine.core.io import atomic_write_bytes

STYLE = 2  # bump when the drawing code changes: cached figures of older styles are not reused
_cache: ContextVar[Path | None] = ContextVar("figure_cache", default=None)


@contextmanager
def figure_cache(directory: Path | None) -> Iterator[None]:
    token = _cache.set(Path(directory) if directory else None)
    try:
        yield
    finally:
        _cache.reset(token)


def cache_dir() -> Path | None:
    """The figure cache in use (inside `figure_cache`), else None."""
    return _cache.get()


def _cached(draw):
    """A figure function whose PNG is reused from the figure cache for the same arguments."""

    @functools.wraps(draw)
    def wrapper(path, *args, **kwargs):
        directory = _cache.get()
        if directory is None:
            return draw(path, *args, **kwargs)
        key = hashlib.sha256(
            json.dumps([STYLE, draw.__name__, args, kwargs], sort_keys=True, default=str).encode()
        ).hexdigest()[:32]
        hit = directory / f"{key}.png"
        try:
            data = hit.read_bytes()
        except OSError:
            data = draw(None, *args, **kwargs)
            directory.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(hit, data)
        if path is not None:
            atomic_write_bytes(path, data)
        return data

    return wrapper


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path | None) -> bytes:
    """Save a figure to `path` (atomically) and return the PNG bytes."""
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return data


@_cached
def lines(
    path: str | Path | None,
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    marker: str | None = None,
    bands: dict[str, Sequence[Sequence[float] | None]] | None = None,
) -> bytes:
    """One line per series name -> (xs, ys); `bands` (name -> one (low, high) per x, e.g. 95%
    intervals) are shaded around their line. Returns the PNG bytes (and writes `path` if given)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, marker=marker)
            band = [(x, b) for x, b in zip(xs, (bands or {}).get(name) or []) if b is not None]
            if band:
                ax.fill_between(
                    [x for x, _ in band],
                    [b[0] for _, b in band],
                    [b[1] for _, b in band],
                    color=line.get_color(),
                    alpha=0.15,
                    linewidth=0,
                )
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


@_cached
def histogram(
    path: str | Path | None,
    values: Sequence[float],
    *,
    bins: int = 20,
    title: str = "",
    xlabel: str = "",
    threshold: float | None = None,
) -> bytes:
    """A histogram of `values`, with an optional vertical line at `threshold`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    vals = [v for v in values if v is not None]
    if vals:
        ax.hist(vals, bins=bins, color="#4C72B0", edgecolor="white")
    if threshold is not None:
        ax.axvline(threshold, color="#C44E52", linestyle="--", label=f"threshold {threshold:g}")
        ax.legend(fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    return _save(fig, path)


@_cached
def bars(
    path: str | Path | None,
    groups: Sequence[str],
    series: dict[str, Sequence[float | None]],
    *,
    title: str = "",
    ylabel: str = "",
) -> bytes:
    """Grouped bars: one group per label in `groups`, one bar per series name in each group."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups)), 3.6))
    n = max(1, len(series))
    width = 0.8 / n
    for k, (name, vals) in enumerate(series.items()):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [0 if v is None else v for v in vals], width, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


@_cached
def panels(
    path: str | Path | None,
    charts: list[tuple[str, dict[str, tuple[Sequence[float], Sequence[float]]]]],
    *,
    title: str = "",
    xlabel: str = "step",
) -> bytes:
    """One small chart per (title, series) side by side, each with its own y axis (values of
    different scales, such as DPO log-probabilities and rewards, never share one); integer x ticks."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    cols = min(2, max(1, len(charts)))  # two across: a page shrinks a wider figure until its text is unreadable
    rows = (len(charts) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, series) in zip([a for row in axes for a in row], charts):
        for label, (xs, ys) in series.items():
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
        ax.set_title(name, fontsize=12)
        ax.set_xlabel(xlabel, fontsize=11)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=10)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=10)
    for ax in [a for row in axes for a in row][len(charts) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    return _save(fig, path)


def data_uri(png: bytes) -> str:
    """A PNG as a `data:` URI, for self-contained HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")

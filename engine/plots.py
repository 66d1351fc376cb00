"""Small matplotlib helpers for stage artifacts and reports: PNG files, no display needed.

matplotlib is imported inside each function (Agg backend), so importing this module is free.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Sequence


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
        from .io import atomic_write_bytes

        atomic_write_bytes(path, data)
    return data


def lines(path: str | Path | None, series: dict[str, tuple[Sequence[float], Sequence[float]]], *,
          title: str = "", xlabel: str = "step", ylabel: str = "", marker: str | None = None,
          bands: dict[str, Sequence[Sequence[float] | None]] | None = None) -> bytes:
    """One line per series name -> (xs, ys); `bands` (name -> one (low, high) per x, e.g. 95%
    intervals) are shaded around their line. Returns the PNG bytes (and writes `path` if given)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (xs, ys) in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, marker=marker)
            band = [(x, b) for x, b in zip(xs, (bands or {}).get(name) or []) if b is not None]
            if band:
                ax.fill_between([x for x, _ in band], [b[0] for _, b in band], [b[1] for _, b in band],
                                color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def histogram(path: str | Path | None, values: Sequence[float], *, bins: int = 20, title: str = "",
              xlabel: str = "", threshold: float | None = None) -> bytes:
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


def bars(path: str | Path | None, groups: Sequence[str], series: dict[str, Sequence[float | None]], *,
         title: str = "", ylabel: str = "") -> bytes:
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


def data_uri(png: bytes) -> str:
    """A PNG as a `data:` URI, for self-contained HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")

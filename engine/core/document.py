"""Reports as documents: a list of blocks (headings, paragraphs, bullets, tables, images,
collapsed details) rendered twice, to Markdown (plots as files under `plots/`) and to a
self-contained HTML page (plots as `data:` URIs, inline CSS). Every text from a model or a data
file is escaped in both renderings.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.core import plots
from engine.core.display import printable
from engine.core.io import atomic_write_bytes, atomic_write_text

CELL_CHARS = 600  # model text per table cell; longer text is cut with an ellipsis


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Grid:
    """A table of text cells (model text is escaped when rendered)."""

    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str  # file name under plots/
    png: bytes = field(repr=False)
    caption: str = ""


@dataclass
class Details:
    """A collapsed block of preformatted text (the resolved recipe)."""

    summary: str
    text: str


Block = Heading | Para | Bullets | Grid | Image | Details


_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#~!&])")


def md_escape(text: str) -> str:
    """Text that Markdown shows as written: punctuation that could format is backslash-escaped, and
    control characters (NUL, ESC, bidi overrides) are written as escapes (engine.core.display.printable)."""
    return _MD_SPECIAL.sub(r"\\\1", printable(text))


def _md_cell(text: str) -> str:
    return md_escape(text).replace("\r", "").replace("\n", "<br>")


def render_markdown(title: str, blocks: list[Block], plots_dir: str = "plots") -> str:
    out = [f"# {md_escape(title)}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += [f"{'#' * b.level} {md_escape(b.text)}", ""]
        elif isinstance(b, Para):
            out += [md_escape(b.text), ""]
        elif isinstance(b, Bullets):
            out += [f"- {md_escape(i)}" for i in b.items] + [""]
        elif isinstance(b, Grid):
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + " --- |" * len(b.header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Image):
            out += [f"![{md_escape(b.caption or b.name)}]({plots_dir}/{b.name})", ""]
        elif isinstance(b, Details):
            fence = "~~~~" if "```" in b.text else "```"
            out += [
                "<details>",
                f"<summary>{html.escape(printable(b.summary))}</summary>",
                "",
                f"{fence}toml",
                printable(b.text).rstrip(),
                fence,
                "",
                "</details>",
                "",
            ]
    return "\n".join(out).rstrip() + "\n"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}h3{margin-top:1.4em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;text-align:left}
th{background:#f3f3f3}td{white-space:pre-wrap;max-width:420px;overflow-wrap:anywhere}
figure{margin:1em 0}figcaption{color:#555;font-size:.85em}img{max-width:100%}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.6em 1em}
"""


def render_html(title: str, blocks: list[Block]) -> str:
    esc = lambda text: html.escape(printable(text))  # noqa: E731
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{esc(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{esc(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append('<ul class="note">' + "".join(f"<li>{esc(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Grid):
            head = "".join(f"<th>{esc(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            out.append(
                f'<figure><img alt="{esc(b.caption or b.name)}" src="{plots.data_uri(b.png)}">'
                f"<figcaption>{esc(b.caption)}</figcaption></figure>"
            )
        elif isinstance(b, Details):
            out.append(f"<details><summary>{esc(b.summary)}</summary><pre>{esc(b.text)}</pre></details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(out_dir: Path, title: str, blocks: list[Block]) -> list[Path]:
    """report.md, report.html and plots/*.png under `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    images = [b for b in blocks if isinstance(b, Image)]
    if images:
        (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    for img in images:
        path = out_dir / "plots" / img.name
        atomic_write_bytes(path, img.png)
        written.append(path)
    atomic_write_text(out_dir / "report.md", render_markdown(title, blocks))
    atomic_write_text(out_dir / "report.html", render_html(title, blocks))
    return [out_dir / "report.md", out_dir / "report.html", *written]


def _cut(text: str, limit: int = CELL_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


_BLOCKS = {cls.__name__: cls for cls in (Heading, Para, Bullets, Grid, Image, Details)}

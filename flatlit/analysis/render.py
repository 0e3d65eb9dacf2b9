"""The report page: its blocks (headings, paragraphs, notes, figures, tables), cell formats, and its rendering as
one self-contained HTML file or as Markdown."""

from __future__ import annotations

import base64
import html
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from flatlit.figures.style import save


@dataclass
class Block:
    """One element of the page: heading, paragraph, note, figure or table."""

    kind: str  # h2 | p | note | figure | table
    text: str = ""
    file: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


class Page:
    """The page being assembled (blocks in order) and the figure files written."""

    def __init__(self, outdir: str) -> None:
        self.outdir = outdir
        self.blocks: list[Block] = []
        self.figures: list[str] = []

    def h2(self, text: str) -> None:
        self.blocks.append(Block("h2", text))

    def p(self, text: str) -> None:
        self.blocks.append(Block("p", text))

    def note(self, text: str) -> None:
        self.blocks.append(Block("note", text))

    def table(self, header: list[str], rows: list[list[str]], caption: str = "") -> None:
        self.blocks.append(Block("table", caption, header=header, rows=rows))

    def figure(self, fig: Any, name: str, caption: str) -> None:
        save(fig, os.path.join(self.outdir, name))
        self.add_file(name, caption)

    def add_file(self, name: str, caption: str) -> None:
        self.figures.append(name)
        self.blocks.append(Block("figure", caption, file=name))


def fmt(v: Any, se: Any = None) -> str:
    """A measure value with 4 significant digits (± its standard error when known)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if not isinstance(v, (int, float)):
        return str(v)
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    text = f"{v:.4g}"
    if isinstance(se, (int, float)) and math.isfinite(se) and se > 0:
        text += f" ± {se:.2g}"
    return text


def relative_difference(ref: Any, value: Any) -> float | None:
    """(value − ref)/|ref|, or None when either is missing or not finite, or ref is 0."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (ref, value)) or ref == 0:
        return None
    return (value - ref) / abs(ref)


def fmt_rel(d: float | None) -> str:
    return "—" if d is None else f"{100 * d:+.3g} %"


def pct(v: float | None) -> str:
    """A fraction as a percentage with two decimals (``—`` when missing)."""
    return "—" if v is None else f"{100 * v:.2f} %"


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.92em;color:#444;margin-top:.3em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.6em 0;font-size:.92em}
.caption{font-size:.92em;color:#444}
"""


def _is_num(text: str) -> bool:
    return bool(re.match(r"^[−+\-]?[\d.∞—]", text))


def render_html(page: Page, title: str) -> str:
    e = html.escape
    head = f'<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{CSS}</style></head>'
    out = ["<!DOCTYPE html>", head, f"<body><h1>{e(title)}</h1>"]
    for b in page.blocks:
        if b.kind == "h2":
            out.append(f"<h2>{e(b.text)}</h2>")
        elif b.kind == "p":
            out.append(f"<p>{e(b.text)}</p>")
        elif b.kind == "note":
            out.append(f'<div class="note">Note: {e(b.text)}</div>')
        elif b.kind == "figure":
            with open(os.path.join(page.outdir, b.file), "rb") as f:
                data = base64.b64encode(f.read()).decode("ascii")
            out.append(
                f'<figure id="{e(b.file)}"><img alt="{e(b.file)}" src="data:image/png;base64,{data}">'
                f"<figcaption><b>{e(b.file)}</b>: {e(b.text)}</figcaption></figure>"
            )
        elif b.kind == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr></thead><tbody>")
            for row in b.rows:
                cells = "".join(
                    f'<td class="num">{e(c)}</td>' if k and _is_num(c) else f"<td>{e(c)}</td>"
                    for k, c in enumerate(row)
                )
                out.append(f"<tr>{cells}</tr>")
            out.append("</tbody></table>")
            if b.text:
                out.append(f'<p class="caption">{e(b.text)}</p>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(page: Page, title: str) -> str:
    out = [f"# {title}", ""]
    for b in page.blocks:
        if b.kind == "h2":
            out += [f"## {b.text}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "note":
            out += [f"> **Note:** {b.text}", ""]
        elif b.kind == "figure":
            out += [f"![{b.file}]({b.file})", "", f"*{b.file}*: {b.text}", ""]
        elif b.kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            numeric = [k > 0 and all(_is_num(row[k]) for row in b.rows if k < len(row)) for k in range(len(b.header))]
            out.append("|" + "|".join("---:" if num else "---" for num in numeric) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
            if b.text:
                out += [f"*{b.text}*", ""]
    return "\n".join(out).rstrip() + "\n"

"""Report blocks and their two renderings: self-contained HTML and Markdown.

The HTML has no scripts and loads nothing: styles are inline in ``<style>``, images are
``data:image/png;base64`` URIs, and every piece of text from the run directory is escaped, so
the file opens the same in a browser on an air-gapped reviewer's machine.  The Markdown links
images by file name, since ``report.md`` sits next to them in the run directory.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Image", "Paragraph", "Pre", "Section", "Table", "fmt", "image", "read_json",
           "read_jsonl", "render_html", "render_markdown"]


@dataclass(frozen=True)
class Paragraph:
    text: str
    #: True/False mark a verdict as pass/fail; None is plain text
    status: bool | None = None


@dataclass(frozen=True)
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    #: index of a column holding PASS/FAIL, coloured in HTML
    status_column: int | None = None


@dataclass(frozen=True)
class Pre:
    text: str


@dataclass(frozen=True)
class Image:
    caption: str
    name: str
    png: bytes


Block = Paragraph | Table | Pre | Image


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    blocks: Sequence[Block]


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 70rem; color: #222;
       line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left;
         vertical-align: top; }
th { background: #f2f2f2; }
.pass { color: #0a6b2d; font-weight: 600; } .fail { color: #b00020; font-weight: 600; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
figure { margin: 1rem 0; } img { max-width: 100%; border: 1px solid #ddd; }
nav ol { columns: 2; }
"""


def _status_class(value: str) -> str:
    return {"PASS": "pass", "FAIL": "fail"}.get(value, "")


def _html_block(block: Block) -> str:
    e = html.escape
    if isinstance(block, Paragraph):
        cls = "" if block.status is None else f' class="{"pass" if block.status else "fail"}"'
        return f"<p{cls}>{e(block.text)}</p>"
    if isinstance(block, Pre):
        return f"<pre>{e(block.text)}</pre>"
    if isinstance(block, Image):
        uri = "data:image/png;base64," + base64.b64encode(block.png).decode("ascii")
        return (f'<figure><img src="{uri}" alt="{e(block.caption)}">'
                f"<figcaption>{e(block.caption)}</figcaption></figure>")
    head = "".join(f"<th>{e(h)}</th>" for h in block.headers)
    body = []
    for row in block.rows:
        cells = []
        for index, cell in enumerate(row):
            cls = _status_class(cell) if index == block.status_column else ""
            cells.append(f'<td class="{cls}">{e(cell)}</td>' if cls else f"<td>{e(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(title: str, sections: Sequence[Section]) -> str:
    """One HTML document: a contents list, then each section as ``<section id=...>``."""
    e = html.escape
    contents = "".join(f'<li><a href="#{e(s.id)}">{e(s.title)}</a></li>' for s in sections)
    parts = [f'<section id="{e(s.id)}"><h2>{e(s.title)}</h2>'
             + "\n".join(_html_block(b) for b in s.blocks) + "</section>" for s in sections]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{_STYLE}</style></head>\n<body>"
            f"<h1>{e(title)}</h1><nav><ol>{contents}</ol></nav>\n" + "\n".join(parts)
            + "\n</body></html>\n")


def _md_cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def _md_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        if block.status is None:
            return block.text
        return f"**{'PASS' if block.status else 'FAIL'}:** {block.text}"
    if isinstance(block, Pre):
        return f"~~~~text\n{block.text.rstrip()}\n~~~~"
    if isinstance(block, Image):
        return f"![{block.caption}]({block.name})"
    lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
             "|" + "---|" * len(block.headers)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
    return "\n".join(lines)


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    """The same report in Markdown; images link to the PNG files beside ``report.md``."""
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        parts.extend(_md_block(b) for b in section.blocks)
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- reading a run
def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[Paragraph]] | None:
    """The JSON objects of ``path``, and a warning naming every line that is not one."""
    if not path.is_file():
        return None
    rows, bad = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif line.strip():
            bad.append(number)
    which = f"line {bad[0]} is" if len(bad) == 1 else f"lines {', '.join(map(str, bad))} are"
    warnings = [Paragraph(f"{path.name}: {which} not a JSON object, left out.",
                          status=False)] if bad else []
    return rows, warnings


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v) for v in value) or "—"
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {fmt(v)}" for k, v in value.items()) or "—"
    return str(value)


def image(path: Path, caption: str) -> Image:
    return Image(caption=caption, name=path.name, png=path.read_bytes())

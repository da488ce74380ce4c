"""Render the report's blocks as one self-contained HTML page: inline CSS, figures as data: URIs."""

from __future__ import annotations

import base64
import html
import re

from histossl.report.document import Block, Bullets, Figure, Heading, Paragraph, Table

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.45; }
h1, h2, h3 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .6em 0 1.4em; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 9px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
tr:nth-child(even) td { background: #fbfcfd; }
code { background: #eff1f3; padding: 1px 4px; border-radius: 4px; font-size: 90%; }
figure { margin: 1em 0 2em; }
img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { font-style: italic; color: #57606a; }
"""

_CODE = re.compile(r"`([^`]*)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def inline(text: str) -> str:
    """Escape text, then turn the two inline markdown constructs the report uses into HTML."""
    pieces = []
    for index, part in enumerate(_CODE.split(text)):
        if index % 2:
            pieces.append(f"<code>{html.escape(part)}</code>")
        else:
            pieces.append(_BOLD.sub(r"<strong>\1</strong>", html.escape(part)))
    return "".join(pieces)


def _table(table: Table) -> str:
    out = []
    if table.caption:
        out.append(f"<p>{inline(table.caption)}</p>")
    out.append("<table>")
    out.append("<tr>" + "".join(f"<th>{inline(h)}</th>" for h in table.header) + "</tr>")
    for row in table.rows:
        cells = "".join(f"<td><strong>{inline(c.text)}</strong></td>" if c.bold else f"<td>{inline(c.text)}</td>" for c in row)
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def to_html(blocks: list[Block], title: str) -> str:
    """A standalone page; it references nothing outside itself (every image is a data: URI)."""
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Table):
            body.append(_table(block))
        elif isinstance(block, Figure):
            data = base64.b64encode(block.data).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{inline(block.caption)}</figcaption></figure>"
            )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )

"""A report as a list of plain blocks, rendered to GitHub markdown (here) or HTML (``html.py``).

Building the content once and rendering it twice keeps ``report.md`` and ``report.html`` saying the
same thing. Inline text may use two markdown constructs only: ``**bold**`` and ```code```.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """One table cell: its text, whether it is the best of its row, whether it holds a flagged run."""

    text: str
    bold: bool = False


@dataclass
class Table:
    """A pipe table. ``rows`` hold cells; the first column is usually the row label."""

    header: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    key: str = ""  # a stable identifier (e.g. ``loss_acc/finetune/cosine``), for tests and anchors


@dataclass(frozen=True)
class Figure:
    """A PNG under ``figures/``; ``data`` is embedded in the HTML, the markdown links the file."""

    path: str  # relative to the study folder, e.g. ``figures/pretext.png``
    caption: str
    data: bytes = field(repr=False, default=b"")


Block = Heading | Paragraph | Bullets | Table | Figure


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_to_markdown(table: Table) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in table.header) + " |"]
    lines.append("|" + "|".join("---" for _ in table.header) + "|")
    for row in table.rows:
        texts = [f"**{c.text}**" if c.bold and c.text else c.text for c in row]
        lines.append("| " + " | ".join(_md_cell(t) for t in texts) + " |")
    return "\n".join(lines)


def to_markdown(blocks: list[Block]) -> str:
    """Render blocks as GitHub-flavoured markdown; figure links are relative (``figures/x.png``)."""
    parts: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            text = table_to_markdown(block)
            parts.append(f"{block.caption}\n\n{text}" if block.caption else text)
        elif isinstance(block, Figure):
            alt = re.sub(r"[`\[\]]", "", block.caption)
            parts.append(f"![{alt}]({block.path})\n\n*{block.caption}*")
    return "\n\n".join(parts) + "\n"

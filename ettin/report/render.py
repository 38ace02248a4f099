"""The reports' blocks (headings, paragraphs, tables, images) rendered to Markdown and to one
self-contained HTML file: one renderer for the pair report (cli.py) and the suite report (suite.py)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Sequence

import pandas as pd

from ettin.store.fs import publishing

SMOKE_WARNING = ("These are smoke tasks: small generated offline tasks that check the pipeline end to "
                 "end. Their scores say nothing about how encoders and decoders compare; evaluate on "
                 "the standard suites for that.")


def image(figure, out: Path, name: str, alt: str) -> tuple:
    with publishing(out / name) as partial:
        figure.savefig(partial, dpi=110, format="png")
    return ("image", name, alt)


def _markdown_cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[tuple]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            lines += [f"# {block[1]}", ""]
        elif kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            table: pd.DataFrame = block[1]
            lines.append("| " + " | ".join(_markdown_cell(c) for c in table.columns) + " |")
            lines.append("|" + "---|" * len(table.columns))
            for row in table.itertuples(index=False):
                lines.append("| " + " | ".join(_markdown_cell(v) for v in row) + " |")
            lines.append("")
        elif kind == "image":
            lines += [f"![{block[2]}]({block[1]})", ""]
    return "\n".join(lines)


def render_html(blocks: Sequence[tuple], out: Path, *, title: str) -> str:
    """One file: the plots are embedded (base64 PNG), so it can be mailed or attached alone."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
             "img{max-width:100%}</style></head><body>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            parts.append(block[1].to_html(index=False, escape=True, border=0))
        elif kind == "image":
            data = base64.b64encode((out / block[1]).read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(block[2])}' src='data:image/png;base64,{data}'></p>")
    parts.append("</body></html>")
    return "\n".join(parts)

"""A self-contained HTML report: text, tables and PNG figures embedded as data URIs (readable offline)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1em; margin: 1.2em 0 .3em; }
.table-wrap { overflow-x: auto; max-width: 100%; margin: .6em 0 1em; }
table { border-collapse: collapse; font-size: .8em; }
th, td { border: 1px solid #ddd; padding: .2em .45em; text-align: right; }
td { white-space: nowrap; } th { vertical-align: bottom; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
details { margin: .6em 0; } summary { cursor: pointer; color: #245; font-weight: 600; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .9em; color: #444; margin-top: .3em; }
.note { color: #8a5a00; } code { background: #f4f4f4; padding: 0 .2em; }
.findings li { margin: .3em 0; }
table.prose td { white-space: normal; text-align: left; vertical-align: top; min-width: 7em; }
"""


# After loading, the page records on <body> how many figures decoded, how many sections are empty, how many
# tables are folded and whether the page scrolls sideways, so that a headless browser (the tests use
# Chromium's --dump-dom) can check the report as a reader sees it.
_SELF_CHECK = """
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const loaded = images.filter((img) => img.complete && img.naturalWidth > 0).length;
  const empty = Array.from(document.querySelectorAll('section'))
    .filter((s) => s.querySelectorAll('p, ul, table, figure').length === 0).length;
  const root = document.documentElement;
  document.body.dataset.figures = images.length;
  document.body.dataset.folded = document.querySelectorAll('details').length;
  document.body.dataset.scrollsSideways = root.scrollWidth > root.clientWidth ? 1 : 0;
  document.body.dataset.figuresLoaded = loaded;
  document.body.dataset.emptySections = empty;
});
"""


@dataclass
class Figure:
    """A PNG file and the one-line caption that says what to look for in it."""

    path: Path
    caption: str


@dataclass
class Table:
    """A titled table; ``folded`` ones are shown collapsed (``<details>``), for the long per-condition
    tables whose full copy is also in the CSV files."""

    title: str
    frame: pd.DataFrame
    folded: bool = False
    #: cells of text (e.g. generated completions): left-aligned and wrapped, so the table fits the page
    prose: bool = False


@dataclass
class Section:
    """A heading with paragraphs (plain text, escaped), bullet points, figures and tables (``Table`` or
    (title, DataFrame)). Rendered in that order; empty tables are left out, and a section with nothing
    left to show is left out with its heading."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame] | Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)

    def shown_tables(self) -> list[Table]:
        tables = [t if isinstance(t, Table) else Table(*t) for t in self.tables]
        return [t for t in tables if not t.frame.empty]

    @property
    def empty(self) -> bool:
        return not (self.paragraphs or self.bullets or self.figures or self.shown_tables())


def _figure(fig: Figure) -> str:
    data = base64.b64encode(Path(fig.path).read_bytes()).decode("ascii")
    caption = html.escape(fig.caption)
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
        f"<figcaption>{caption} <small>({html.escape(Path(fig.path).name)})</small></figcaption></figure>"
    )


def _table(table: Table) -> str:
    # headers may wrap (at spaces: the CSV's underscores are shown as spaces), cells do not
    frame = table.frame.rename(columns=lambda c: str(c).replace("_", " "))
    body = frame.to_html(
        index=False, float_format=lambda x: f"{x:.3f}", na_rep="–", border=0, classes="prose" if table.prose else None
    )
    body = f"<div class='table-wrap'>{body}</div>"  # a wide table scrolls inside its box, not the page
    title = html.escape(table.title)
    if table.folded:
        rows = f"{len(table.frame)} rows"
        return f"<details><summary>{title or 'Table'} ({rows})</summary>{body}</details>"
    return f"<h3>{title}</h3>{body}" if title else body


def render(title: str, sections: list[Section]) -> str:
    """The whole report as one HTML document (sections with nothing to show are left out)."""
    sections = [s for s in sections if not s.empty]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>")
    parts.append("<nav><ol>")
    parts += [f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(sections)]
    parts.append("</ol></nav>")
    for i, section in enumerate(sections):
        parts.append(f"<section id='s{i}'><h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
        if section.bullets:
            parts.append("<ul class='findings'>")
            parts += [f"<li>{html.escape(b)}</li>" for b in section.bullets]
            parts.append("</ul>")
        parts += [f"<p class='note'>{html.escape(n)}</p>" for n in section.notes]
        parts += [_figure(f) for f in section.figures]
        parts += [_table(t) for t in section.shown_tables()]
        parts.append("</section>")
    parts.append(f"<script>{_SELF_CHECK}</script></body></html>")
    return "\n".join(parts)


def write(path: str | Path, title: str, sections: list[Section]) -> Path:
    path = Path(path)
    path.write_text(render(title, sections), encoding="utf-8")
    return path

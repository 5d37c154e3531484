"""The report page: sections of figures, tables, notes and text, rendered to one self-contained
HTML file (figures embedded as base64 PNG data URIs, inline CSS, no script, no network request)
and the same figures as PNG files next to it."""
from __future__ import annotations

import base64
import html
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

#: resolution of the embedded and written figures (a 7-inch-wide figure is 630 px)
DPI = 90

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:14px 28px}
header h1{margin:0;font-size:21px} header p{margin:4px 0 0;color:#c5cad3;font-size:13px}
nav{padding:8px 28px;background:#e8ebf0;font-size:13px} nav a{margin-right:14px;color:#2a4d8f;text-decoration:none}
main{padding:8px 28px 40px} section{background:#fff;border:1px solid #dde1e7;border-radius:6px;margin:16px 0;
padding:6px 18px 14px} h2{font-size:18px;border-bottom:1px solid #e3e6eb;padding-bottom:6px} h3{font-size:15px;margin:14px 0 6px}
figure{display:inline-block;margin:8px 12px 8px 0;vertical-align:top} figure img{max-width:100%;border:1px solid #eef0f3}
figcaption{font-size:12px;color:#5a6270;max-width:640px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 10px} th,td{border:1px solid #dde1e7;padding:3px 8px;text-align:right;
vertical-align:top} th{background:#f0f2f5} td.l,th.l{text-align:left} tr:nth-child(even) td{background:#fafbfc}
.note{background:#fff6e0;border-left:4px solid #e0a800;padding:6px 10px;margin:6px 0;font-size:13px}
.muted{color:#6b7380;font-size:12.5px} pre{background:#f3f4f6;padding:8px;font-size:12px;overflow-x:auto;max-height:480px}
td.text{text-align:left;font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;max-width:520px}
details summary{cursor:pointer;font-size:13px;color:#2a4d8f;margin:4px 0}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(v) -> str:
    """A number for a table cell (4 significant digits), anything else as text."""
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.4g}"
    return str(v)


@dataclass
class FigureItem:
    name: str
    png: bytes
    caption: str


@dataclass
class Section:
    title: str
    anchor: str
    parts: list[str] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


class Page:
    """Collects sections; :meth:`write` renders ``report.html`` and the PNG files."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self.sections: list[Section] = []
        self.figures: list[FigureItem] = []
        #: what the report could not show (also listed at the top of the page)
        self.missing: list[str] = []

    # ------------------------------------------------------------------ building
    def section(self, title: str) -> Section:
        anchor = _slug(title)
        taken = {s.anchor for s in self.sections}
        base, i = anchor, 2
        while anchor in taken:
            anchor, i = f"{base}-{i}", i + 1
        self.sections.append(Section(title, anchor))
        return self.sections[-1]

    @property
    def current(self) -> Section:
        return self.sections[-1] if self.sections else self.section("Report")

    def heading(self, text: str) -> None:
        self.current.parts.append(f"<h3>{esc(text)}</h3>")

    def text(self, text: str, muted: bool = False) -> None:
        self.current.parts.append(f"<p class=\"muted\">{esc(text)}</p>" if muted else f"<p>{esc(text)}</p>")

    def note(self, text: str, missing: bool = True) -> None:
        """A visible remark in the current section; ``missing`` also lists it at the top of the page."""
        self.current.parts.append(f"<div class=\"note\">{esc(text)}</div>")
        if missing:
            self.missing.append(f"{self.current.title}: {text}")

    def guard(self, what: str):
        """Context: an unexpected error while drawing ``what`` becomes a note on the page, never a traceback."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            try:
                yield
            except Exception as err:  # noqa: BLE001 - a report shows what it can
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                self.note(f"could not draw {what}: {type(err).__name__}: {first}")

        return ctx()

    def pre(self, text: str, summary: str | None = None) -> None:
        block = f"<pre>{esc(text)}</pre>"
        if summary:
            block = f"<details><summary>{esc(summary)}</summary>{block}</details>"
        self.current.parts.append(block)

    def table(self, headers: list[str], rows: list[list], *, text_cols: tuple[int, ...] = (0,),
              long_text_cols: tuple[int, ...] = (), summary: str | None = None) -> None:
        """A table; columns in ``text_cols`` are left-aligned, ``long_text_cols`` shown as wrapped text."""
        def cell(i: int, v, tag: str) -> str:
            cls = "text" if i in long_text_cols else ("l" if i in text_cols else "")
            return f"<{tag}{f' class={cls!r}' if cls else ''}>{esc(fmt(v))}</{tag}>"

        head = "".join(cell(i, h, "th") for i, h in enumerate(headers))
        body = "".join("<tr>" + "".join(cell(i, v, "td") for i, v in enumerate(row)) + "</tr>" for row in rows)
        block = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        if summary:
            block = f"<details><summary>{esc(summary)}</summary>{block}</details>"
        self.current.parts.append(block)

    def figure(self, fig, name: str, caption: str = "") -> None:
        """Add a matplotlib figure (rendered to PNG now, then closed)."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
        name = f"{len(self.figures) + 1:02d}-{_slug(name)}"
        self.figures.append(FigureItem(name, buf.getvalue(), caption))
        b64 = base64.b64encode(buf.getvalue()).decode("ascii")
        self.current.parts.append(
            f"<figure><img src=\"data:image/png;base64,{b64}\" alt=\"{esc(caption or name)}\" data-name=\"{esc(name)}\">"
            + (f"<figcaption>{esc(caption)}</figcaption>" if caption else "") + "</figure>")

    # ------------------------------------------------------------------ output
    def render(self) -> str:
        nav = "".join(f"<a href=\"#{s.anchor}\">{esc(s.title)}</a>" for s in self.sections)
        missing = ""
        if self.missing:
            items = "".join(f"<li>{esc(m)}</li>" for m in self.missing)
            missing = (f"<section id=\"missing\"><h2>Not in this report</h2><div class=\"note\">Parts of the "
                       f"directory are missing or unreadable; the report shows what exists.<ul>{items}</ul></div></section>")
        body = "".join(f"<section id=\"{s.anchor}\"><h2>{esc(s.title)}</h2>{''.join(s.parts)}</section>"
                       for s in self.sections)
        return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
                "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
                "style-src 'unsafe-inline'\">"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{esc(self.title)}</title>"
                f"<style>{CSS}</style></head><body><header><h1>{esc(self.title)}</h1><p>{esc(self.subtitle)}</p></header>"
                f"<nav>{nav}</nav><main>{missing}{body}</main></body></html>\n")

    def write(self, out_dir: Path) -> Path:
        """Write ``report.html`` and ``<nn>-<name>.png`` into ``out_dir``; where an earlier report is,
        its figures are removed first (only files of that pattern: nothing else is touched)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if (out_dir / "report.html").is_file():
            for old in out_dir.iterdir():
                if old.is_file() and re.fullmatch(r"\d{2,}-[a-z0-9-]+\.png", old.name):
                    old.unlink()
        for f in self.figures:
            (out_dir / f"{f.name}.png").write_bytes(f.png)
        tmp = out_dir / f".report.html.{os.getpid()}.tmp"
        tmp.write_text(self.render(), encoding="utf-8")
        os.replace(tmp, out_dir / "report.html")
        return out_dir / "report.html"

"""A report as blocks (paragraphs, tables, figures, "run this" notes) in sections, written as one
self-contained HTML page (figures embedded as base64 PNG), Markdown and LaTeX (the same text and
tables; figures only in the HTML)."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field

FORMATS = ("html", "md", "tex")


def num(v) -> str:
    """Three decimals, as the console tables show them; — for none."""
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str = ""
    id: str = ""


@dataclass
class Image:
    name: str
    png: bytes
    alt: str


@dataclass
class Missing:
    what: str
    command: str


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)  # str (a paragraph) | Table | Image | Missing

    def p(self, text: str) -> None:
        self.blocks.append(text)

    def h(self, text: str) -> None:
        self.blocks.append(("h3", text))


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1320px;margin:24px auto;padding:0 24px;color:#111;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #333;padding-bottom:.15em;margin-top:1.6em}h3{margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.86em}th,td{border:1px solid #bbb;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#eee}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}caption{caption-side:bottom;text-align:left;font-size:.85em;color:#444;padding-top:4px}
img{max-width:100%;height:auto;border:1px solid #ddd;margin:.3em 0}.missing{background:#fff4e0;border-left:4px solid #e69500;padding:6px 10px}
#headline td:nth-child(n+2):nth-child(-n+5){white-space:nowrap}
code{background:#f3f3f3;padding:0 3px}.meta{color:#555}nav a{margin-right:1em}
"""


def _is_num(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell[0] in "+-−—" and len(cell) < 40)


def _cell(text: str) -> str:
    return "<br>".join(html.escape(line) for line in str(text).split("\n"))


def to_html(title: str, subtitle: str, sections: list[Section]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>", f'<p class="meta">{e(subtitle)}</p>',
           "<nav>" + "".join(f'<a href="#{s.id}">{e(s.title)}</a>' for s in sections) + "</nav>"]
    for s in sections:
        out.append(f'<section id="{s.id}"><h2>{e(s.title)}</h2>')
        for b in s.blocks:
            if isinstance(b, str):
                out.append(f"<p>{e(b)}</p>")
            elif isinstance(b, tuple):
                out.append(f"<h3>{e(b[1])}</h3>")
            elif isinstance(b, Table):
                rows = "".join("<tr>" + "".join(f'<td class="n">{_cell(c)}</td>' if _is_num(c) else f"<td>{_cell(c)}</td>" for c in r)
                               + "</tr>" for r in b.rows)
                cap = f"<caption>{e(b.caption)}</caption>" if b.caption else ""
                tid = f' id="{b.id}"' if b.id else ""
                out.append(f"<table{tid}>{cap}<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header)
                           + f"</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(b, Image):
                data = base64.b64encode(b.png).decode("ascii")
                out.append(f'<figure><img class="figure" data-name="{e(b.name)}" alt="{e(b.alt)}" src="data:image/png;base64,{data}"></figure>')
            elif isinstance(b, Missing):
                out.append(f'<p class="missing">Missing: {e(b.what)}. Run <code>{e(b.command)}</code></p>')
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(c: str) -> str:
    return c.replace("|", "\\|").replace("\n", "<br>")


def to_markdown(title: str, subtitle: str, sections: list[Section]) -> str:
    out = [f"# {title}", "", subtitle, ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, str):
                out += [b, ""]
            elif isinstance(b, tuple):
                out += [f"### {b[1]}", ""]
            elif isinstance(b, Table):
                out.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
                out.append("|" + "---|" * len(b.header))
                out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in b.rows]
                out += ["", b.caption, ""] if b.caption else [""]
            elif isinstance(b, Image):
                out += [f"*Figure: {b.alt} (embedded in report.html).*", ""]
            elif isinstance(b, Missing):
                out += [f"> Missing: {b.what}. Run `{b.command}`", ""]
    return "\n".join(out) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "Δ": r"$\Delta$", "−": "-", "—": "--",
        "τ": r"$\tau$", "≥": r"$\geq$", "≤": r"$\leq$", "×": r"$\times$", "α": r"$\alpha$", "–": "--",
        "χ": r"$\chi$", "²": r"$^2$", "³": r"$^3$", "…": r"\ldots{}", "ψ": r"$\psi$", "θ": r"$\theta$", "φ": r"$\phi$"}


def tex_escape(text: str) -> str:
    """LaTeX-safe text; a non-ASCII character without a mapping becomes ``?`` (pdflatex would stop on it)."""
    return "".join(_TEX.get(ch, ch if ord(ch) < 128 else "?") for ch in str(text))


def to_latex(title: str, subtitle: str, sections: list[Section]) -> str:
    out = [r"\documentclass{article}", r"\usepackage[utf8]{inputenc}", r"\usepackage[margin=2cm,landscape]{geometry}",
           r"\usepackage{booktabs}", r"\usepackage{caption}", r"\begin{document}", rf"\section*{{{tex_escape(title)}}}", tex_escape(subtitle), ""]
    for s in sections:
        out.append(rf"\subsection*{{{tex_escape(s.title)}}}")
        for b in s.blocks:
            if isinstance(b, str):
                out += [tex_escape(b), ""]
            elif isinstance(b, tuple):
                out.append(rf"\subsubsection*{{{tex_escape(b[1])}}}")
            elif isinstance(b, Table):
                out += [r"\begin{table}[h]", r"\centering", r"\scriptsize", r"\begin{tabular}{" + "l" * len(b.header) + "}",
                        r"\toprule", " & ".join(tex_escape(h) for h in b.header) + r" \\", r"\midrule"]
                out += [" & ".join(tex_escape(c.replace("\n", "; ")) for c in r) + r" \\" for r in b.rows]
                out += [r"\bottomrule", r"\end{tabular}"]
                if b.caption:
                    out.append(rf"\caption*{{{tex_escape(b.caption)}}}")
                out += [r"\end{table}", ""]
            elif isinstance(b, Image):
                out += [rf"\emph{{Figure: {tex_escape(b.alt)} (embedded in report.html).}}", ""]
            elif isinstance(b, Missing):
                out += [rf"\emph{{Missing: {tex_escape(b.what)}. Run}} \texttt{{{tex_escape(b.command)}}}", ""]
    out.append(r"\end{document}")
    return "\n".join(out) + "\n"

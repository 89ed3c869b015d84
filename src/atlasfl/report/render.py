"""Tables → terminal (rich), Markdown, LaTeX and CSV. Text formats show "mean ± std"; CSV keeps full
precision and gives each std its own column, for re-analysis."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from rich.table import Table as RichTable

from atlasfl.errors import AtlasError
from atlasfl.report.stats import Stat
from atlasfl.report.tables import Table
from atlasfl.results.io import atomic_write_bytes

DASH = "—"
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "η": r"$\eta$",
        "—": "--", "×": r"$\times$"}


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def cell_text(value, fmt: str) -> str:
    if _missing(value):
        return DASH
    if isinstance(value, Stat):
        mean = fmt.format(value.mean)
        return mean if math.isnan(value.std) else f"{mean} ± {fmt.format(value.std)}"
    if isinstance(value, (int, float)):
        return fmt.format(value)
    return str(value)


def _numeric(table: Table, i: int) -> bool:
    """Right-align a column whose cells are all numbers (or missing)."""
    return bool(table.rows) and all(_missing(row[i]) or isinstance(row[i], (int, float, Stat)) for row in table.rows)


def _text_rows(table: Table) -> list[list[str]]:
    return [[cell_text(v, c.fmt) for v, c in zip(row, table.columns)] for row in table.rows]


def to_rich(table: Table) -> RichTable:
    rt = RichTable(title=table.title, title_justify="left")
    for i, c in enumerate(table.columns):
        rt.add_column(c.name, justify="right" if _numeric(table, i) else "left")
    for row in _text_rows(table):
        rt.add_row(*row)
    return rt


def to_markdown(tables: list[Table]) -> str:
    lines = ["# ATLAS report", ""]
    for t in tables:
        lines += [f"## {t.title}", "", "| " + " | ".join(c.name for c in t.columns) + " |",
                  "|" + "|".join("---:" if _numeric(t, i) else "---" for i in range(len(t.columns))) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in _text_rows(t)]
        if not t.rows:
            lines.append("| " + " | ".join([DASH] * len(t.columns)) + " |")
        lines += ["", *(f"{note}\n" for note in t.notes)]
    return "\n".join(lines).rstrip() + "\n"


def _tex(text: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in text)


def to_latex(tables: list[Table]) -> str:
    """One booktabs `table` per report table (needs \\usepackage{booktabs})."""
    out = ["% ATLAS report tables; requires \\usepackage{booktabs}", ""]
    for t in tables:
        align = "".join("r" if _numeric(t, i) else "l" for i in range(len(t.columns)))
        out += [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{_tex(t.title)}}}",
                rf"\label{{tab:atlas-{t.key}}}", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
                " & ".join(_tex(c.name) for c in t.columns) + r" \\", r"\midrule"]
        out += [" & ".join(_tex(cell) for cell in row) + r" \\" for row in _text_rows(t)]
        out += [r"\bottomrule", r"\end{tabular}"]
        out += [rf"\par\footnotesize {_tex(note)}" for note in t.notes]
        out += [r"\end{table}", ""]
    return "\n".join(out)


def to_csv(table: Table) -> str:
    stat_cols = [any(isinstance(row[i], Stat) for row in table.rows) for i in range(len(table.columns))]
    header = []
    for c, is_stat in zip(table.columns, stat_cols):
        header += [c.name, f"{c.name} std"] if is_stat else [c.name]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        cells = []
        for value, is_stat in zip(row, stat_cols):
            if isinstance(value, Stat):
                cells += [value.mean, "" if math.isnan(value.std) else value.std]
            else:
                cells += ["" if _missing(value) else value] + ([""] if is_stat else [])
        writer.writerow(cells)
    return buf.getvalue()


def write_report(tables: list[Table], out: Path) -> list[Path]:
    """report.md, report.tex and one CSV per table in `out`; returns the paths written."""
    files = {out / "report.md": to_markdown(tables), out / "report.tex": to_latex(tables)}
    files.update({out / f"{t.key}.csv": to_csv(t) for t in tables})
    try:
        for path, text in files.items():
            atomic_write_bytes(path, text.encode())
    except OSError as exc:
        raise AtlasError(f"cannot write the report to {out} ({exc.strerror}); "
                         "choose another folder with --out") from None
    return list(files)

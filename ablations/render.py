"""Render ablation summaries (:mod:`ablations.table`) as Markdown, CSV, LaTeX, JSON or PNG plots."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from ablations.table import COST_COLUMN, Diff, FactorTable, Row, Stat, to_dict

FORMATS = ("markdown", "csv", "latex", "json")
EXTENSIONS = {"markdown": "md", "csv": "csv", "latex": "tex", "json": "json"}
HEADERS = {"pretrain/acc": "pretrain acc", "pretrain/loss": "pretrain loss", COST_COLUMN: "device-h/trial"}


# ------------------------------------------------------------------------------ cell text
def fmt(x: float | None, signed: bool = False, significant: bool = False) -> str:
    """Three decimals (metrics in [0, 1], losses); three significant digits for tiny or huge values."""
    if x is None:
        return "-"
    if significant or (x != 0 and (abs(x) < 0.001 or abs(x) >= 1e4)):
        return f"{x:+.3g}" if signed else f"{x:.3g}"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def stat_text(s: Stat, significant: bool = False) -> str:
    if s.n == 0:
        return "-"
    if s.std is None:
        return f"{fmt(s.mean, significant=significant)} (n=1, no std)"
    return f"{fmt(s.mean, significant=significant)} ± {fmt(s.std, significant=significant)} (n={s.n})"


def diff_text(d: Diff | None) -> str:
    if d is None:
        return ""
    if d.note == "reference":
        return "reference"
    if d.mean is None:
        return d.note
    if d.low is None:
        return f"{fmt(d.mean, True)} ({d.note})"
    return f"{fmt(d.mean, True)} [{fmt(d.low, True)}, {fmt(d.high, True)}] (n={d.n_pairs})"


def _header(t: FactorTable) -> list[str]:
    cols = ["arm", "trials"]
    for c in t.columns:
        cols.append(HEADERS.get(c, c))
        if c in t.tasks and t.reference_arm is not None:
            cols.append(f"Δ {c}")
        if c in t.tasks and t.scratch_arm is not None:
            cols.append(f"Δ {c} vs scratch")
    return cols


def _cells(t: FactorTable, r: Row, bold) -> list[str]:
    out = [r.label, r.status_line]
    for c in t.columns:
        text = stat_text(r.cells[c], significant=c == COST_COLUMN)  # device-hours can be tiny
        out.append(bold(text) if c in r.best else text)
        if c in t.tasks and t.reference_arm is not None:
            out.append(diff_text(r.diffs.get(c)))
        if c in t.tasks and t.scratch_arm is not None:
            out.append("scratch" if r.arm == t.scratch_arm else diff_text(r.scratch_diffs.get(c)))
    return out


def _explain(t: FactorTable) -> list[str]:
    lines = [
        "Cells: mean ± sample std over seeds (n = seeds) of `ft/<task>/final` and the pretraining metrics; "
        "best per column in bold, task columns chosen on the validation score (cost not ranked); `device-h/trial` is the mean device-hours of a finished trial."
    ]
    if t.reference_arm is not None:
        lines.append(
            f"Δ: difference to reference arm `{t.reference_arm}` over paired seeds (same seed in both rows), "
            f"with a {t.confidence:.0%} t-interval (n-1 degrees of freedom); rows are compared with the "
            f"reference row whose settings differ least."
        )
    if t.scratch_arm is not None:
        lines.append(
            f"Δ vs scratch: difference to the arm `{t.scratch_arm}` (the same fine-tuning, no pretraining) over "
            f"paired seeds, with the same interval: what pretraining adds."
        )
    lines.append("Only finished trials enter the statistics; failed, running and incomplete ones are counted.")
    if any(r.counts.get("duplicate") for r in t.rows):
        lines.append("duplicate: an older finished run of a seed that was run again with identical settings (ignored).")
    if t.total_device_hours is not None:
        lines.append(
            f"Device-hours in total over every trial that logged cost (failed and running included): "
            f"{fmt(t.total_device_hours, significant=True)}."
        )
    lines.extend(t.notes)
    for r in t.rows:
        for run_id, seed, err in r.failures:
            lines.append(
                f"failed: {r.label} seed {seed} (run {run_id}): {err.splitlines()[0] if err else 'no message'}"
            )
    return lines


# ------------------------------------------------------------------------------ formats
def render_markdown(tables: list[FactorTable]) -> str:
    if not tables:
        return "No ablation runs found.\n"
    parts = []
    for t in tables:
        ref = f" (reference arm: {t.reference_arm})" if t.reference_arm is not None else ""
        parts.append(f"## Ablation: {t.factor}{ref}\n")
        header = _header(t)
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        for r in t.rows:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(t, r, lambda s: f"**{s}**")) + " |")
        parts.append("\n".join(lines) + "\n")
        parts.append("\n".join(f"- {x}" for x in _explain(t)) + "\n")
    return "\n".join(parts)


CSV_FIELDS = (
    "factor",
    "reference_arm",
    "arm",
    "row",
    "trials",
    "column",
    "mean",
    "std",
    "n",
    "best",
    "diff",
    "diff_low",
    "diff_high",
    "diff_n",
    "diff_note",
    "diff_vs",
    "scratch_diff",
    "scratch_diff_low",
    "scratch_diff_high",
    "scratch_diff_n",
)


def render_csv(tables: list[FactorTable]) -> str:
    """Long format: one line per (factor, row, column)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for t in tables:
        for r in t.rows:
            for c in t.columns:
                s, d, sd = r.cells[c], r.diffs.get(c), r.scratch_diffs.get(c)
                w.writerow(
                    {
                        "factor": t.factor,
                        "reference_arm": t.reference_arm or "",
                        "arm": r.arm,
                        "row": r.label,
                        "trials": r.status_line,
                        "column": c,
                        "mean": _num(s.mean),
                        "std": _num(s.std),
                        "n": s.n,
                        "best": c in r.best,
                        "diff": _num(d.mean) if d else "",
                        "diff_low": _num(d.low) if d else "",
                        "diff_high": _num(d.high) if d else "",
                        "diff_n": d.n_pairs if d else "",
                        "diff_note": d.note if d else "",
                        "diff_vs": d.vs if d else "",
                        "scratch_diff": _num(sd.mean) if sd else "",
                        "scratch_diff_low": _num(sd.low) if sd else "",
                        "scratch_diff_high": _num(sd.high) if sd else "",
                        "scratch_diff_n": sd.n_pairs if sd else "",
                    }
                )
    return buf.getvalue()


def _num(x):
    return "" if x is None else repr(float(x))


_LATEX_ESCAPE = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    text = "".join(_LATEX_ESCAPE.get(ch, ch) for ch in text)
    return text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$")


def render_latex(tables: list[FactorTable]) -> str:
    parts = []
    for t in tables:
        header = _header(t)
        ref = f", reference arm {t.reference_arm}" if t.reference_arm is not None else ""
        lines = [
            r"\begin{table}[t]",
            r"\centering",
            r"\small",
            r"\begin{tabular}{" + "l" * len(header) + "}",
            r"\hline",
            " & ".join(latex_escape(h) for h in header) + r" \\",
            r"\hline",
        ]
        for r in t.rows:
            cells = _cells(t, r, lambda s: "\x00" + s + "\x01")
            cells = [latex_escape(c).replace("\x00", r"\textbf{").replace("\x01", "}") for c in cells]
            lines.append(" & ".join(cells) + r" \\")
        lines += [
            r"\hline",
            r"\end{tabular}",
            r"\caption{"
            + latex_escape(
                f"Ablation: {t.factor}{ref}. Mean ± std over seeds (n); best in bold (tasks: chosen on validation); "
                f"Δ with a {t.confidence:.0%} t-interval over paired seeds."
            )
            + "}",
            r"\label{tab:ablation-" + _slug(t.factor) + "}",
            r"\end{table}",
        ]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def render_json(tables: list[FactorTable]) -> str:
    return json.dumps(to_dict(tables), indent=2) + "\n"


def render(tables: list[FactorTable], fmt_name: str) -> str:
    if fmt_name not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt_name!r}")
    return {"markdown": render_markdown, "csv": render_csv, "latex": render_latex, "json": render_json}[fmt_name](
        tables
    )


# ------------------------------------------------------------------------------ plots
def plot_table(t: FactorTable, path: str | Path) -> Path | None:
    """One figure per ablation: a panel per task (and pretraining accuracy), one point per row at the mean
    over seeds with an error bar of one std (none when n=1), n written under it; the reference row is a
    square, the best row of the panel a star. Points, not bars, so the y axis can zoom on the differences.
    Returns None when no row has a finished value to draw."""
    panels = [c for c in (*t.tasks, "pretrain/acc") if c in t.columns and any(r.cells[c].n for r in t.rows)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width = max(3.5, 0.7 * len(t.rows) + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.2), squeeze=False)
    for ax, c in zip(axes[0], panels):
        for i, r in enumerate(t.rows):
            s = r.cells[c]
            if not s.n:
                ax.annotate("no data", (i, 0.5), xycoords=("data", "axes fraction"), ha="center", fontsize=8)
                continue
            marker = "*" if c in r.best else "s" if r.is_reference else "o"
            color = "#d62728" if c in r.best else "#ff7f0e" if r.is_reference else "#1f77b4"
            ax.errorbar(
                [i],
                [s.mean],
                yerr=[s.std or 0.0],
                fmt=marker,
                color=color,
                markersize=11 if marker == "*" else 7,
                capsize=5,
                elinewidth=1.5,
            )
            ax.annotate(
                f"n={s.n}",
                (i, s.mean - (s.std or 0.0)),
                xytext=(0, -12),
                textcoords="offset points",
                ha="center",
                fontsize=8,
            )
        ax.set_xticks(range(len(t.rows)), [r.label for r in t.rows], rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(t.rows) - 0.4)
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(c if c in t.tasks else HEADERS.get(c, c))
        ax.set_ylabel("mean ± std over seeds")
    ref = f"square = reference {t.reference_arm}, " if t.reference_arm is not None else ""
    fig.suptitle(f"Ablation: {t.factor} ({ref}star = best)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(tables: list[FactorTable], folder: str | Path) -> dict[str, Path]:
    """``folder/ablation-<factor>.png`` for every table that has something to draw."""
    out = {}
    for t in tables:
        p = plot_table(t, Path(folder) / f"ablation-{_slug(t.factor)}.png")
        if p is not None:
            out[t.factor] = p
    return out


def table_filename(factor: str, fmt_name: str) -> str:
    return f"ablation-{_slug(factor)}.{EXTENSIONS[fmt_name]}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "factor"

"""CLI: read sweep runs from MLflow, print the ablation tables and write plots (read-only unless --log).

    python -m ablations.summarize                              # every sweep experiment, Markdown on stdout
    python -m ablations.summarize --experiment ssamba-masking --reference 300 --format latex --out t.tex
    python -m ablations.summarize --sweep-id 20261101-1200-ab12 --plot plots/ --log

The summary itself is :func:`ablations.table.summarize` (pure); rendering is :mod:`ablations.render`.
This file does the I/O only: collecting runs through :class:`ssamba.sweep.tracking.Tracker` and writing
files. The store is only read: a missing local store is an error (never created), and the table (and
plots) are logged as artifacts of each contributing sweep's parent run under ``summary/`` only with
``--log`` (:func:`summarize_sweep`, which a sweep script calls at its end, logs them on its own parent).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from ablations.render import FORMATS, plot_all, render, table_filename
from ablations.table import FactorTable, SummaryError, summarize
from ssamba.base.errors import SSAMBAError

ARTIFACT_DIR = "summary"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ablations.summarize",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--mlflow-uri",
        default=None,
        help="tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite mlflow.db in the current folder)",
    )
    p.add_argument(
        "--experiment",
        action="append",
        default=[],
        metavar="NAME",
        help="a sweep experiment to read (repeatable; default: every experiment tagged ssamba.sweep=1)",
    )
    p.add_argument("--sweep-id", default=None, help="only the runs of this sweep invocation (tag sweep.id)")
    p.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="ARM|FACTOR=ARM",
        help="reference arm for the differences (default: each sweep's sweep.reference_arm); "
        "FACTOR=ARM sets it for one factor (repeatable)",
    )
    p.add_argument(
        "--ignore-param",
        action="append",
        default=[],
        metavar="KEY",
        help="a dotted config key that must not split rows (beyond the built-in per-run noise list)",
    )
    p.add_argument("--format", choices=FORMATS, default="markdown", help="table format (default: markdown)")
    p.add_argument("--out", default=None, help="write the table to this file instead of stdout")
    p.add_argument("--plot", default=None, metavar="DIR", help="write one PNG per ablation into DIR")
    p.add_argument(
        "--include-unfinished",
        action="store_true",
        help="let interrupted, running and incomplete trials enter the statistics with what they logged",
    )
    log = p.add_mutually_exclusive_group()
    log.add_argument(
        "--log",
        action="store_true",
        help="write the table (and plots) into each contributing parent run under summary/ "
        "(default: read-only, nothing is written to the store)",
    )
    log.add_argument("--no-log", action="store_true", help="read-only (the default; kept for old command lines)")
    return p


def missing_store(uri: str) -> Path | None:
    """The local file a sqlite or file-store URI points at, when it does not exist (else None).

    ``uri`` is absolute (:func:`ssamba.sweep.tracking.resolve_uri`). Opening a missing sqlite database with
    MLflow creates an empty one (about 1 MB of tables); a reader must refuse instead."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :].partition("?")[0]
        if path in ("", ":memory:"):
            return None
        p = Path(path)
    elif uri.startswith("file:"):
        p = Path(unquote(urlparse(uri).path))
    else:
        return None  # a server or a database: the server says what is wrong
    return None if p.exists() else p


def check_store(given: str | None, uri: str) -> None:
    """Raise a one-line :class:`SummaryError` when the local store ``uri`` (resolved from ``given``) is missing."""
    path = missing_store(uri)
    if path is None:
        return
    if given:
        origin = f"--mlflow-uri {given}"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        origin = f"$MLFLOW_TRACKING_URI={os.environ['MLFLOW_TRACKING_URI']}"
    else:
        origin = "the default, mlflow.db in the current folder"
    raise SummaryError(
        f"no MLflow store at {path} ({origin}); nothing was created. Fix: run in the folder that holds "
        "the sweep's mlflow.db, or pass --mlflow-uri sqlite:////absolute/path/mlflow.db (or a server's "
        "http://host:port), or set $MLFLOW_TRACKING_URI"
    )


def parse_reference(items: list[str]) -> str | dict[str, str] | None:
    """``["300"]`` -> ``"300"``; ``["masking=300", "norm=rmsnorm"]`` -> a dict; mixing both is an error."""
    if not items:
        return None
    pairs = [i.partition("=") for i in items]
    if all(sep for _, sep, _ in pairs):
        return {f.strip(): a.strip() for f, _, a in pairs}
    if len(items) == 1:
        return items[0]
    raise SummaryError(
        f"--reference takes one ARM for every factor or FACTOR=ARM items, got {items}. "
        "Fix: write every item as FACTOR=ARM."
    )


def collect_runs(tracker, experiments: list[str], sweep_id: str | None):
    """The runs frame of the named experiments (or of every sweep experiment)."""
    try:
        ids = tracker.experiment_ids(experiments) if experiments else tracker.sweep_experiments()
    except KeyError as exc:
        raise SummaryError(
            f"{exc.args[0]}. Fix: check the name with `mlflow experiments search`, "
            "or leave out --experiment to read every sweep experiment."
        ) from None
    if not ids:
        raise SummaryError(
            f"no sweep experiments (tag ssamba.sweep=1) in {tracker.uri}. Fix: run a sweep "
            "(python sweeps/masking.py), or point --mlflow-uri / $MLFLOW_TRACKING_URI at its store."
        )
    return tracker.runs_frame(ids, sweep_id=sweep_id)


def log_artifacts(tracker, tables: list[FactorTable], fmt_name: str, plots: dict[str, Path]) -> int:
    """Log each table (and its plot) under ``summary/`` of every parent run that contributed to it."""
    logged = 0
    with tempfile.TemporaryDirectory() as tmp:
        for t in tables:
            if not t.parent_run_ids:
                continue
            path = Path(tmp) / table_filename(t.factor, fmt_name)
            path.write_text(render([t], fmt_name))
            for run_id in t.parent_run_ids:
                tracker.log_artifact(run_id, path, ARTIFACT_DIR)
                if t.factor in plots:
                    tracker.log_artifact(run_id, plots[t.factor], ARTIFACT_DIR)
                logged += 1
    return logged


def summarize_sweep(mlflow_uri: str, sweep_id: str, *, log: bool = True, plot_dir: str | Path | None = None) -> str:
    """The Markdown table of one sweep (what a sweep script prints at its end); logged on its parent run."""
    from ssamba.sweep.tracking import Tracker

    tracker = Tracker(mlflow_uri)
    runs = collect_runs(tracker, [], sweep_id)
    tables = summarize(runs)
    if not tables:
        return f"no trial runs of sweep {sweep_id} in {tracker.uri}"
    with tempfile.TemporaryDirectory() as tmp:
        plots = plot_all(tables, plot_dir or tmp)
        if log:
            log_artifacts(tracker, tables, "markdown", plots)
    return render(tables, "markdown")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ssamba.sweep.tracking import Tracker, resolve_uri  # imports mlflow: only when the CLI runs

    try:
        check_store(args.mlflow_uri, resolve_uri(args.mlflow_uri))
        tracker = Tracker(args.mlflow_uri)
        runs = collect_runs(tracker, args.experiment, args.sweep_id)
        tables = summarize(
            runs,
            parse_reference(args.reference),
            ignore_params=tuple(args.ignore_param),
            include_unfinished=args.include_unfinished,
        )
    except SSAMBAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not tables:
        where = f"sweep {args.sweep_id!r} in " if args.sweep_id else ""
        print(f"no trial runs found in {where}{tracker.uri}", file=sys.stderr)
        return 1

    text = render(tables, args.format)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    plots = plot_all(tables, args.plot) if args.plot else {}
    for p in plots.values():
        print(f"wrote {p}", file=sys.stderr)
    if args.log:
        n = log_artifacts(tracker, tables, args.format, plots)
        print(f"logged the summary on {n} parent run(s) under {ARTIFACT_DIR}/", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

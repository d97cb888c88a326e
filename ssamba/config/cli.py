"""What the command lines share: a preset plus ``--set`` overrides -> a validated experiment config."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ssamba.base import names as N
from ssamba.config import ExperimentConfig, apply_overrides, parse_set_args, to_flat
from ssamba.config.presets import PRESETS, preset


def add_config_args(p: argparse.ArgumentParser, default_preset: str = "demo") -> None:
    p.add_argument("--preset", default=default_preset, choices=PRESETS, help=f"named config (default {default_preset})")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted config key, e.g. --set model.norm=rmsnorm (repeatable)",
    )
    p.add_argument("--out", help="output folder (default runs/<job>-<preset>-<time>)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Options of a direct run (``ssamba.pretrain``, ``ssamba.finetune``): threads and MLflow."""
    p.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="torch threads (default: $OMP_NUM_THREADS, else the cores this process may use, shared with "
        "the other ssamba runs found on the machine, at most 16); warns when the runs oversubscribe the cores",
    )
    p.add_argument(
        "--mlflow-uri",
        metavar="URI",
        help="record the run in this MLflow store (sqlite:///runs.db, http://host:5000), in the layout of a "
        "sweep's trial runs; default: nothing is logged to MLflow",
    )
    p.add_argument(
        "--experiment",
        default=N.DIRECT_EXPERIMENT,
        metavar="NAME",
        help=f"MLflow experiment of the run with --mlflow-uri (default {N.DIRECT_EXPERIMENT})",
    )


def line_buffered_output() -> None:
    """Every printed line reaches a file or pipe at once (Python buffers blocks when stdout is not a terminal)."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)


def resolve_config(args, extra: dict[str, str] | None = None) -> ExperimentConfig:
    """Preset, then ``extra`` (from dedicated flags), then ``--set`` overrides (type-checked)."""
    overrides = dict(extra or {})
    overrides.update(parse_set_args(args.set))
    return apply_overrides(preset(args.preset), overrides)


def out_dir(args, job: str) -> Path:
    if args.out:
        return Path(args.out)
    return Path("runs") / f"{job}-{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_config(cfg: ExperimentConfig) -> None:
    print(json.dumps(to_flat(cfg), indent=1, default=str))

"""What the command lines share: a preset plus ``--set`` overrides -> a validated experiment config."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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

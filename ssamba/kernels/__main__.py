"""``python -m ssamba.kernels``: the command line of ``build`` and ``check``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence, TextIO

from ssamba.base.errors import KernelBuildError
from ssamba.kernels.build import cmd_build
from ssamba.kernels.check import cmd_check
from ssamba.kernels.packages import PACKAGES, KernelPackage, detect_archs, parse_arch, parse_packages


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _packages_arg(text: str) -> list[KernelPackage]:
    try:
        return parse_packages(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _arch_arg(text: str):
    if text.strip().lower() == "auto":
        return "auto"  # detected later, so argument errors come first
    try:
        return parse_arch(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ssamba.kernels",
        description="Build (for the local GPU only) and check the mamba-ssm and causal-conv1d "
        "CUDA kernels from their source distributions.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{build,check}")
    all_pk = ",".join(PACKAGES)
    b = sub.add_parser("build", help="compile wheels for the local GPU architecture, install them, run check")
    b.add_argument("--sdist-dir", help="folder holding the sdists (default: $SSAMBA_SDISTS or ./carry/sdists)")
    b.add_argument("--packages", type=_packages_arg, default=parse_packages(all_pk), help=f"default: {all_pk}")
    b.add_argument(
        "--arch",
        type=_arch_arg,
        default="auto",
        help="auto (the visible GPUs) or compute capabilities, e.g. 9.0 or 8.0,9.0 (default: auto)",
    )
    b.add_argument("--jobs", type=_positive_int, default=None, help="parallel compile jobs in all (default: CPU count)")
    b.add_argument("--wheel-dir", help="where the wheels go (default: $SSAMBA_WHEELS or ./carry/wheels)")
    b.add_argument("--log-dir", help="build logs (default: WHEEL_DIR/logs)")
    b.add_argument("--no-install", action="store_true", help="only build the wheels")
    b.add_argument("--parallel", action="store_true", help="build both packages at once, sharing the jobs")
    b.add_argument("--force", action="store_true", help="rebuild even if WHEEL_DIR has a matching wheel")
    c = sub.add_parser("check", help="import the kernels and compare a tiny call with the reference on the GPU")
    c.add_argument("--packages", type=_packages_arg, default=parse_packages(all_pk), help=f"default: {all_pk}")
    return p


def main(argv: Optional[Sequence[str]] = None, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build":
            if args.arch == "auto":
                args.arch = detect_archs()
            return cmd_build(args, out)
        return cmd_check(args, out)
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())

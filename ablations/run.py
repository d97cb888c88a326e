"""One ablation sweep from the command line: run it (``ssamba.sweep``), then print its table (``ablations``).

``python -m ablations.run FACTOR [options]``, or the scripts ``sweeps/FACTOR.py [options]``; the factors
are ``masking``, ``direction``, ``norm`` and ``masking_strategy`` (``ssamba.sweep.factors``).

Besides the driver's options (``ssamba.sweep.driver.build_parser``) the scripts take
``--pretrain-manifest PATH``: pretrain every trial on that manifest instead of the preset's data. It stands
for ``--set data.manifest=PATH`` with PATH made absolute and checked here, before Ray starts, and is logged
as the trials' ``data.manifest`` param (and ``files.pretrain.*``) like any other data setting.
"""

from __future__ import annotations

import argparse
import sys

from ablations.summarize import summarize_sweep
from ssamba.base.errors import SSAMBAError
from ssamba.sweep.driver import build_parser, run_sweep_cli
from ssamba.sweep.factors import FACTORS, Factor
from ssamba.sweep.plan import PRETRAIN_MANIFEST_FLAG, pretrain_manifest_setting


def add_script_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options the sweep scripts add to the driver's."""
    p.add_argument(
        PRETRAIN_MANIFEST_FLAG,
        metavar="PATH",
        help="pretrain on this manifest (python -m ssamba.data prepare ...) instead of the preset's data (demo, "
        "smoke: the demo corpus); = --set data.manifest=PATH, made absolute and checked before Ray starts",
    )
    return p


def sweep_argv(factor: Factor, argv: list[str] | None = None) -> list[str]:
    """The driver's command line for ``argv`` (default ``sys.argv[1:]``): every option checked (``--help``
    lists the scripts' own options too), and ``--pretrain-manifest PATH`` turned into
    ``--set data.manifest=<absolute PATH>`` (a :class:`ConfigError` when the file is missing)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = add_script_args(build_parser(factor)).parse_args(argv)
    if args.pretrain_manifest is None:
        return argv
    own = argparse.ArgumentParser(add_help=False)  # abbreviations as the full parser takes them
    own.add_argument(PRETRAIN_MANIFEST_FLAG)
    _, rest = own.parse_known_args(argv)
    return [*rest, "--set", pretrain_manifest_setting(args.pretrain_manifest, args.set)]


def main(factor: str | Factor, argv: list[str] | None = None) -> int:
    """Run the sweep of ``factor`` (a name or a :class:`Factor`), then print its ablation table."""
    if isinstance(factor, str):
        if factor not in FACTORS:
            print(f"error: unknown factor {factor!r} (choose from {', '.join(FACTORS)})", file=sys.stderr)
            return 2
        factor = FACTORS[factor]
    try:
        argv = sweep_argv(factor, argv)
    except SSAMBAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_sweep_cli(factor, argv, summarize=summarize_sweep)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print(
            f"usage: python -m ablations.run {{{','.join(FACTORS)}}} [options]   (--help after the factor)",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2:]))

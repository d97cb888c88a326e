"""One ablation sweep from the command line: run it (``ssamba.sweep``), then print its table (``ablations``).

``python -m ablations.run FACTOR [options]``, or the scripts ``sweeps/FACTOR.py [options]``; the factors
are ``masking``, ``direction``, ``norm`` and ``masking_strategy`` (``ssamba.sweep.factors``).
"""

from __future__ import annotations

import sys

from ablations.summarize import summarize_sweep
from ssamba.sweep.driver import run_sweep_cli
from ssamba.sweep.factors import FACTORS, Factor


def main(factor: str | Factor, argv: list[str] | None = None) -> int:
    """Run the sweep of ``factor`` (a name or a :class:`Factor`), then print its ablation table."""
    if isinstance(factor, str):
        if factor not in FACTORS:
            print(f"error: unknown factor {factor!r} (choose from {', '.join(FACTORS)})", file=sys.stderr)
            return 2
        factor = FACTORS[factor]
    return run_sweep_cli(factor, argv, summarize=summarize_sweep)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        print(
            f"usage: python -m ablations.run {{{','.join(FACTORS)}}} [options]   (--help after the factor)",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2:]))

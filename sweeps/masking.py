"""Ablation sweep: masking. Run with no option for the embedded default; --help for the shared options."""

import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:0] = [str(_here), str(_here.parent)]  # sweeps/_factors.py and this checkout's ssamba

from _factors import MASKING, main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(MASKING))

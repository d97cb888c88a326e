"""Ablation sweep: norm. Run with no option for the embedded default; --help for the shared options."""

import sys

from ablations.run import main

if __name__ == "__main__":
    sys.exit(main("norm"))

"""CPU benchmark: the reference scan against a naive per-token loop, and the demo preset's step times.

``python -m ssamba.bench.cpu [--threads N]`` prints forward and backward milliseconds of the
demo model (4 layers, D = 64, 8 x 8 patches + cls, batch 32) for a pretraining step (one and two
MSPM passes) and a fine-tuning step, then the scan comparison of ``python -m ssamba.bench.scan``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ssamba.bench.scan import main as scan_main
from ssamba.bench.timing import median_ms
from ssamba.config import model_preset
from ssamba.model.audio_model import AudioModel, Geometry
from ssamba.model.masking import make_masks


def _time(fn, reps: int = 5, warmup: int = 2) -> float:
    return median_ms(fn, warmup, reps, torch.device("cpu"))


def demo_step_times(batch: int = 32) -> dict[str, float]:
    """Median ms of forward, and forward + backward, for the demo preset's two jobs."""
    torch.manual_seed(0)
    model = AudioModel(model_preset("demo"), Geometry(128, 128), num_classes=8)
    x = torch.randn(batch, 128, 128)
    f, t = model.grid
    masks = [make_masks("cluster", batch, f, t, 50, np.random.default_rng(i)) for i in range(2)]
    res = {}
    with torch.no_grad():
        res["pretrain forward (1 pass)"] = _time(lambda: model.pretrain_losses(x, masks[0]))
        res["fine-tune forward"] = _time(lambda: model(x))

    def step(fn):
        def run():
            model.zero_grad(set_to_none=True)
            fn().backward()

        return run

    res["pretrain forward+backward (1 pass)"] = _time(step(lambda: model.pretrain_losses(x, masks[0])["loss"]))
    res["pretrain forward+backward (2 passes, official)"] = _time(
        step(lambda: model.pretrain_losses(x, masks[0], masks[1])["loss"])
    )
    res["fine-tune forward+backward"] = _time(step(lambda: model(x).logsumexp(-1).mean()))
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m ssamba.bench.cpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"demo preset (4 layers, D=64, bidirectional, 65 tokens), batch {args.batch}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print("| step | ms |\n|---|---:|")
    for k, v in demo_step_times(args.batch).items():
        print(f"| {k} | {v:.1f} |")
    print()
    scan_main(["--threads", str(args.threads)] if args.threads else [])


if __name__ == "__main__":
    main()

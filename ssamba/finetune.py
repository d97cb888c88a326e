"""``python -m ssamba.finetune``: fine-tuning from our checkpoint, an official one, or scratch, without Ray.

python -m ssamba.finetune --init runs/pretrain-demo-.../best.pt     # demo task on the demo corpus
python -m ssamba.finetune --preset paper-tiny --manifest esc50.parquet --set finetune.fold=1 --init scratch
python -m ssamba.finetune --threads 1 --mlflow-uri sqlite:///mlflow.db   # 1 torch thread, run in MLflow

Output is line-buffered (progress reaches a file or pipe as it is printed). The torch thread count is
--threads, else $OMP_NUM_THREADS, else the cores this process may use shared with the other ssamba runs
found on the machine; a warning says when the runs oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import sys

from ssamba.base.errors import SSAMBAError
from ssamba.config.cli import (
    add_config_args,
    add_run_args,
    line_buffered_output,
    out_dir,
    print_config,
    resolve_config,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ssamba.finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(p)
    p.add_argument("--manifest", help="labelled manifest (.parquet); default: the demo corpus")
    p.add_argument(
        "--init",
        default="scratch",
        help="pretrained weights: our checkpoint (.pt), an official SSAMBA/SSAST .pth, or 'scratch' (default)",
    )
    add_run_args(p)
    args = p.parse_args(argv)
    line_buffered_output()
    try:
        cfg = resolve_config(args, {"finetune.manifest": args.manifest} if args.manifest else None)
        if args.print_config:
            print_config(cfg)
            return 0
        from ssamba.sweep.direct import run_direct
        from ssamba.train.threads import use_threads

        threads = use_threads(args.threads, warn=lambda msg: print(msg, file=sys.stderr)).threads
        init = None if args.init == "scratch" else args.init
        res = run_direct(
            "finetune",
            cfg,
            out_dir(args, "finetune"),
            init=init,
            mlflow_uri=args.mlflow_uri,
            experiment=args.experiment,
            threads=threads,
        )
    except SSAMBAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shown = ", ".join(f"{k} {v:.4f}" for k, v in res.last_eval.items() if "test_" in k or "best_" in k)
    print(f"fine-tuning done: {res.steps} steps in {res.seconds:.1f} s; {shown}; checkpoint {res.best_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

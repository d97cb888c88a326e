"""``python -m ssamba.pretrain``: MSPM pretraining from a named preset, without Ray.

python -m ssamba.pretrain                                   # demo preset on the demo corpus
python -m ssamba.pretrain --preset paper-tiny --manifest audioset.parquet --set pretrain.mask_count=300
python -m ssamba.pretrain --threads 1 --mlflow-uri sqlite:///mlflow.db   # 1 torch thread, run in MLflow

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
from ssamba.config.presets import get_preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ssamba.pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_args(p)
    p.add_argument("--manifest", help="pretraining manifest (.parquet); default: the demo corpus")
    add_run_args(p)
    args = p.parse_args(argv)
    line_buffered_output()
    try:
        cfg = resolve_config(args, {"data.manifest": args.manifest} if args.manifest else None)
        if args.print_config:
            print_config(cfg)
            return 0
        if get_preset(args.preset).real_data and not cfg.data.manifest:
            raise SSAMBAError(
                f"preset {args.preset} pretrains on real data: pass --manifest FILE.parquet "
                f"(make one with `python -m ssamba.data prepare ...`)"
            )
        from ssamba.sweep.direct import run_direct
        from ssamba.train.threads import use_threads

        threads = use_threads(args.threads, warn=lambda msg: print(msg, file=sys.stderr)).threads
        out = out_dir(args, "pretrain")
        res = run_direct("pretrain", cfg, out, mlflow_uri=args.mlflow_uri, experiment=args.experiment, threads=threads)
    except SSAMBAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"pretraining done: {res.steps} steps in {res.seconds:.1f} s ({res.samples_per_s:.1f} samples/s); "
        f"best masked accuracy {res.best_metric:.4f}; checkpoint {res.best_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

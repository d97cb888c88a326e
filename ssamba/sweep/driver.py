"""The sweep driver: a factor's arms x seeds as Ray Tune trials (+ Optuna for named hyper-parameters).

A sweep script is one call (``ablations.run.main(FACTOR)``, i.e. ``run_sweep_cli`` with the ablation
table's renderer). :func:`run_sweep` is four steps: the plan (:mod:`ssamba.sweep.plan`: every trial's config
resolved and validated before Ray starts), the resources (Ray started or joined, the plan fitted to it),
execution (the Tuner, or a killed one restored with ``--resume``) and the finish (the parent run's status,
:mod:`ssamba.sweep.parent_run`).
Ray lives here, in ``cluster.py`` (the Ray a sweep runs on), ``trial.py`` and ``worker.py``; the commit a
sweep records is ``provenance.py``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ssamba.base import names as N
from ssamba.base.errors import SSAMBAError
from ssamba.config.presets import PRESETS, TASK_RECIPES
from ssamba.sweep.cluster import orphan_reaper, start_ray
from ssamba.sweep.factors import Factor
from ssamba.sweep.parent_run import finish, finished_before, mark_interrupted, open_records
from ssamba.sweep.plan import SweepPlan, make_plan, with_resources
from ssamba.sweep.provenance import git_commit, ray_job_copy, temporary_copy_warnings
from ssamba.sweep.records import settle_data
from ssamba.sweep.trial import TRIAL_ERROR_KEY


@dataclass
class SweepResult:
    sweep_id: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    mlflow_uri: str
    storage: Path
    trials: list[dict[str, Any]] = field(default_factory=list)
    already_finished: bool = False  # --resume of a sweep that had finished: nothing ran, nothing is written


def build_parser(factor: Factor) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"sweeps/{factor.name}.py",
        description=f"Ablation of {factor.description or factor.name}: arms {', '.join(factor.arms)} "
        f"(reference {factor.reference}). With no option: the demo preset on the demo corpus, "
        f"a local Ray and a local MLflow store (mlflow.db here).",
    )
    p.add_argument("--preset", default="demo", choices=PRESETS)
    p.add_argument("--seeds", help="number of seeds (e.g. 3) or a list (e.g. 0,1,2); default per preset")
    p.add_argument(
        "--tasks",
        nargs="+",
        metavar="NAME[=MANIFEST]",
        help=f"fine-tuning tasks; recipes: {', '.join(TASK_RECIPES)}; default: demo",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every trial")
    p.add_argument("--arms", help="comma-separated subset of the arms")
    p.add_argument(
        "--scratch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add the arm 'scratch': the same fine-tuning budget and seeds with no pretraining, so the summary "
        "shows what pretraining adds (default: on for the paper presets, off for demo and smoke)",
    )
    p.add_argument(
        "--tune",
        action="append",
        default=[],
        metavar="KEY=DIST:LOW:HIGH",
        help="hyper-parameter for Optuna, e.g. finetune.lr=loguniform:1e-5:1e-3 (also uniform:, int:, choice:a|b)",
    )
    p.add_argument("--tune-samples", type=int, default=4, help="Optuna trials per arm x seed (same budget per arm)")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="fractions allowed, e.g. 0.25")
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="default: all CPUs of the node / max concurrent trials, minus a little for the trial driver",
    )
    p.add_argument("--max-concurrent", type=int, default=0, help="trials at once (0: as resources allow)")
    p.add_argument("--storage", default="sweep_results", help="sweep storage folder (shared by all nodes)")
    p.add_argument("--mlflow-uri", help="tracking URI (default $MLFLOW_TRACKING_URI or sqlite mlflow.db here)")
    p.add_argument("--experiment", help=f"MLflow experiment (default ssamba-{factor.name})")
    p.add_argument("--name", help="sweep name under the storage folder (default <factor>-<preset>)")
    p.add_argument(
        "--pretrain-store",
        help="folder of the pretrainings (default STORAGE/NAME/pretrain): sweeps given the same folder compute "
        "a pretraining of the same config and seed once and reuse it",
    )
    p.add_argument("--resume", action="store_true", help="continue a killed sweep of the same name and storage")
    p.add_argument("--max-failures", type=int, default=1, help="retries of a failed trial (from its last checkpoint)")
    p.add_argument("--worker-retries", type=int, default=1, help="Ray Train worker-group restarts within a trial")
    p.add_argument(
        "--keep-checkpoints",
        choices=("all", "best", "none"),
        default="best",
        help="files kept in storage after a trial: all, best (drop resume state), none",
    )
    p.add_argument("--no-log-checkpoints", action="store_true", help="do not copy best checkpoints into MLflow")
    p.add_argument("--smoke-test", action="store_true", help="= --preset smoke (a tiny trial per arm)")
    p.add_argument("--quiet", action="store_true", help="less Ray output")
    p.add_argument(
        "--dashboard-host",
        default="127.0.0.1",
        help="interface the local Ray's dashboard binds (default 127.0.0.1: this machine only; "
        "0.0.0.0 exposes it, and Ray's job API, to the network); a joined cluster keeps its own",
    )
    return p


class OptunaSpace:
    """Define-by-run space: the grid cell (fixed by points_to_evaluate) plus the tuned hyper-parameters."""

    def __init__(self, n_cells: int, spec: dict[str, tuple]):
        self.n_cells, self.spec = n_cells, spec

    def __call__(self, trial):
        trial.suggest_categorical("cell", list(range(self.n_cells)))
        for key, (kind, *args) in self.spec.items():
            if kind == "loguniform":
                trial.suggest_float(key, args[0], args[1], log=True)
            elif kind == "uniform":
                trial.suggest_float(key, args[0], args[1])
            elif kind == "int":
                trial.suggest_int(key, int(args[0]), int(args[1]))
            else:
                trial.suggest_categorical(key, args[0])


def _sweep_id(factor: Factor, args: argparse.Namespace) -> str:
    """A new sweep's id, or with ``--resume`` the id stored in the killed sweep's ``sweep.json``."""
    name = args.name or f"{factor.name}-{'smoke' if args.smoke_test else args.preset}"
    storage = Path(args.storage).expanduser().resolve()
    meta_file = storage / name / "sweep.json"
    if args.resume:
        if not meta_file.is_file():
            raise SSAMBAError(
                f"--resume: no sweep {name!r} in {storage} ({meta_file} missing). "
                f"Fix: pass the same --storage and --name (or preset) as the killed sweep."
            )
        return json.loads(meta_file.read_text())["sweep_id"]
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"


def fit_resources(plan: SweepPlan) -> SweepPlan:
    """The plan with its resources fitted to the Ray cluster this process is connected to."""
    import ray

    total = ray.cluster_resources()
    largest = max(
        (n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=total.get("CPU", 1.0)
    )
    return with_resources(plan, plan.resources.fit(total.get("CPU", 1.0), total.get("GPU", 0.0), largest))


class TrialNames:
    """Tune's name for a trial: its arm and seed (``400-s0``; with Optuna, the sample's id after them), so
    that Tune's trial table says which cell each row is."""

    def __init__(self, cells: list[tuple[str, int]], searching: bool):
        self.cells, self.searching = list(cells), searching

    def __call__(self, trial) -> str:
        arm, seed = self.cells[int(trial.config["cell"])]
        return f"{arm}-s{seed}" + (f"-{trial.trial_id}" if self.searching else "")


# the columns of Tune's trial table (the first results' keys) and of its trial-completed box
PROGRESS_METRICS = ("stage", "step", "loss", "score", "samples_per_s")

# A trial's console lines (``[<arm>-s<seed>-<key>] ...``, ssamba.sweep.worker). Ray folds lines that are equal
# once every word holding a digit is dropped into one "[repeated Nx across cluster]" line, which would show
# one trial's progress and hide the others' (same words, other numbers); lines matching this are left alone.
TRIAL_LINES = r"^\[\S+-s\d+-[0-9a-f]{6}\] "


def tune_folder(plan: SweepPlan) -> Path:
    """The sweep's Tune experiment, ``<sweep dir>/tune-<sweep id>``. Tune also stages the driver's files under
    ``<Ray session>/artifacts/<second started>/<experiment name>``: a name shared by two sweeps on one Ray that
    start in the same second would make them write one experiment state, and ``--resume`` would restore the
    other sweep's trials. Sweeps begun before the name carried the id used ``tune``; theirs is kept."""
    old = plan.sweep_dir / "tune"
    return old if old.is_dir() else plan.sweep_dir / f"tune-{plan.sweep_id}"


def execute(plan: SweepPlan, *, resume: bool, quiet: bool) -> list[dict[str, Any]]:
    """Run (or restore) the Tuner over the plan's trials; one ``{config, metrics, error}`` per trial."""
    from ray import tune

    from ssamba.sweep.trial import run_trial

    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # Train's intermediate reports lack the final metric
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": 0.01})
    trainable._progress_metrics = list(PROGRESS_METRICS)  # Tune prints only these when a trial completes
    tuner_path = tune_folder(plan)
    if resume and tune.Tuner.can_restore(str(tuner_path)):
        tuner = tune.Tuner.restore(str(tuner_path), trainable=trainable, resume_errored=True)
    else:
        run_config = tune.RunConfig(
            name=tuner_path.name,
            storage_path=str(plan.sweep_dir),
            failure_config=tune.FailureConfig(max_failures=plan.max_failures),
            callbacks=[orphan_reaper()],
            verbose=0 if quiet else 1,
        )
        n, conc = len(plan.cells), plan.resources.concurrent
        names = TrialNames([(c.arm, c.seed) for c in plan.cells], plan.searching)
        if plan.searching:
            from ray.tune.search.optuna import OptunaSearch

            points = [{"cell": i} for i in range(n) for _ in range(plan.tune_samples)]
            search = OptunaSearch(
                space=OptunaSpace(n, dict(plan.tune)), metric=plan.metric, mode="max", points_to_evaluate=points, seed=0
            )
            tune_config = tune.TuneConfig(
                search_alg=search, num_samples=len(points), max_concurrent_trials=conc, trial_name_creator=names
            )
            space = None
        else:
            tune_config = tune.TuneConfig(max_concurrent_trials=conc, trial_name_creator=names)
            space = {"cell": tune.grid_search(list(range(n)))}
        tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
    # a trial that ran to its end reported its MLflow run; one that Tune stopped (Ctrl-C) did not
    # (a trial that failed on its inputs reported its error instead of raising: Tune did not retry it)
    out = []
    for r in tuner.fit():
        metrics = r.metrics or {}
        error = str(r.error) if r.error else metrics.get(TRIAL_ERROR_KEY)
        out.append(
            {
                "config": r.config,
                "metrics": metrics,
                "error": error,
                "retried": r.error is not None,  # an infrastructure error: Tune's --max-failures applied
                "done": error is None and "mlflow_run_id" in metrics,
            }
        )
    return out


class SweepInterrupted(SSAMBAError):
    """The sweep was stopped by a signal (Ctrl-C, SIGTERM); what it recorded says so, and --resume continues."""


def run_sweep(factor: Factor, args: argparse.Namespace) -> SweepResult:
    """Plan (every trial resolved and validated, before Ray), resources, execute (Ray Tune), finish (MLflow)."""
    from ssamba.sweep.tracking import Tracker

    tracker = Tracker(args.mlflow_uri)
    plan = make_plan(factor, args, sweep_id=_sweep_id(factor, args), git_commit=git_commit(), mlflow_uri=tracker.uri)
    for warning in temporary_copy_warnings(plan.sweep_dir, tracker.uri, ray_job_copy()):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if args.resume:
        done = finished_before(plan, tracker)
        if done is not None:
            tags = done.data.tags
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime((done.info.end_time or 0) / 1000))
            print(
                f"nothing to resume: sweep {plan.sweep_id} finished on {when} with all its "
                f"{tags.get(N.SWEEP_TRIALS, '?')} trials (none failed); Ray not started. Its table follows. "
                f"For a new sweep, run without --resume (or pass another --name).",
                flush=True,
            )
            return SweepResult(
                plan.sweep_id,
                plan.experiment,
                done.info.experiment_id,
                done.info.run_id,
                tracker.uri,
                plan.sweep_dir,
                already_finished=True,
            )
    plan = settle_data(plan)  # each stage's statistics and data file, as the trials will log them
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", TRIAL_LINES)  # read when Ray is imported (next line)
    mode = start_ray(quiet=args.quiet, dashboard_host=getattr(args, "dashboard_host", "127.0.0.1"))
    plan = fit_resources(plan)
    plan = open_records(plan, tracker, mode, args.resume)
    res = plan.resources
    print(
        f"sweep {plan.sweep_id}: {len(plan.arms)} arms x {len(plan.seeds)} seeds = {len(plan.cells)} trials"
        f"{f' x {plan.tune_samples} Optuna samples' if plan.searching else ''}; {res.cpus_per_worker} CPU"
        f"{f' + {res.gpus} GPU' if res.use_gpu else ''} per worker, {res.concurrent} trials at once; "
        f"Ray {mode}; MLflow {tracker.uri} experiment {plan.experiment!r}",
        flush=True,
    )
    trials = None
    stopped: list[int] = []

    def on_sigterm(signum, _frame):  # as a second Ctrl-C: out of Tune's loop at once
        stopped.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    previous = (
        signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        trials = execute(plan, resume=args.resume, quiet=args.quiet)
        left = [t for t in trials if not t["done"] and not t["error"]]
        if left or stopped:  # Ctrl-C: Tune stopped the running trials and returned
            raise SweepInterrupted(f"{len(left)} of {len(trials)} trials did not finish")
        finish(plan, tracker, trials)
    except BaseException as exc:
        marked = mark_interrupted(plan, tracker, trials)
        if isinstance(exc, (KeyboardInterrupt, SweepInterrupted)):
            raise SweepInterrupted(
                f"sweep {plan.sweep_id} interrupted ({exc or type(exc).__name__}); parent run and {marked} "
                f"unfinished trial run(s) marked "
                f"KILLED. Continue it with the same command and --resume"
            ) from None
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return SweepResult(
        plan.sweep_id, plan.experiment, plan.experiment_id, plan.parent_run_id, tracker.uri, plan.sweep_dir, trials
    )


def run_sweep_cli(factor: Factor, argv: list[str] | None = None, summarize: Callable[..., str] | None = None) -> int:
    """Entry point of a sweep script: run the sweep, then print its ablation table.

    ``summarize(mlflow_uri, sweep_id, log=...)`` renders the table (the scripts pass ``ablations.summarize.
    summarize_sweep``: the reporting layer sits above this one, which does not import it) and logs it on the
    parent run unless ``log`` is False (a ``--resume`` of a finished sweep writes nothing); without it a plain
    table of the trials' final metrics is printed."""
    args = build_parser(factor).parse_args(argv)
    try:
        res = run_sweep(factor, args)
    except SweepInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    except SSAMBAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [t for t in res.trials if t["error"]]
    table = summarize(res.mlflow_uri, res.sweep_id, log=not res.already_finished) if summarize else _plain_table(res)
    print(table)
    print(ui_hint(res.mlflow_uri, res.experiment_id, res.experiment, res.sweep_id))
    if failed:
        print(f"{len(failed)} trial(s) failed: " + "; ".join((t["error"] or "")[:200] for t in failed), file=sys.stderr)
        return 1
    return 0


def ui_hint(uri: str, experiment_id: str, experiment: str, sweep_id: str) -> str:
    """Where to look at a sweep's runs: for a server its page, else the ``mlflow ui`` command for the store."""
    from ssamba.sweep.tracking import runs_page, ui_start_command

    where = f"experiment {experiment!r}, sweep {sweep_id}"
    if uri.startswith(("http://", "https://")):
        return f"MLflow: open {runs_page(uri, experiment_id)} ({where})"
    return (
        f"MLflow: {ui_start_command(uri)}\n"
        f"        then open {runs_page('http://127.0.0.1:5000', experiment_id)} ({where})"
    )


def _plain_table(res: SweepResult) -> str:
    lines = [
        "| arm | seed | " + " | ".join(sorted({k for t in res.trials for k in t["metrics"] if N.is_final(k)})) + " |"
    ]
    for t in res.trials:
        m = t["metrics"]
        vals = [f"{m[k]:.4f}" for k in sorted(k for k in m if N.is_final(k))]
        lines.append(f"| {m.get('arm', '?')} | {m.get('seed', '?')} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


__all__ = ["Factor", "run_sweep", "run_sweep_cli", "SweepResult"]

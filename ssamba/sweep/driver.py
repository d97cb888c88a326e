"""The sweep driver: a factor's arms x seeds as Ray Tune trials (+ Optuna for named hyper-parameters).

A sweep script is one call (``ablations.run.main(FACTOR)``, i.e. ``run_sweep_cli`` with the ablation
table's renderer). :func:`run_sweep` is four steps: the plan (:mod:`ssamba.sweep.plan`: every trial's config
resolved and validated before Ray starts), the resources (Ray started or joined, the plan fitted to it),
execution (the Tuner, or a killed one restored with ``--resume``) and the finish (the parent run's status).
Ray lives here, in ``trial.py`` and in ``worker.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from ssamba.base import names as N
from ssamba.base.errors import SSAMBAError
from ssamba.base.files import write_json_atomic
from ssamba.config.presets import PRESETS, TASK_RECIPES
from ssamba.sweep.factors import Factor
from ssamba.sweep.plan import SweepPlan, make_plan, with_resources
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


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).resolve().parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _submitted_job() -> dict:
    """What Ray's job supervisor hands the driver of a ``ray job submit`` (``runtime_env``, ``metadata``);
    empty outside a submitted job."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    return json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")


def _check_submitted_here(job: dict, gcs: str) -> None:
    """Refuse to run a submitted job on a cluster that has no record of it. Ray 2.60's job supervisor gives
    the job's driver ``$RAY_ADDRESS`` by discovery: the cluster last started with ``ray start`` in the
    supervisor node's temp folder. Two clusters that share a temp folder (the default ``/tmp/ray``) make
    it hand a job submitted to the first the address of the second (measured), where it would run."""
    if not job:
        return
    from ray._private import ray_constants
    from ray.dashboard.modules.job.common import JOB_ID_METADATA_KEY, JobInfoStorageClient
    from ray.experimental.internal_kv import _internal_kv_exists

    job_id = (job.get("metadata") or {}).get(JOB_ID_METADATA_KEY)
    key = JobInfoStorageClient.JOB_DATA_KEY.format(job_id=job_id)
    if job_id and not _internal_kv_exists(key, namespace=ray_constants.KV_NAMESPACE_JOB):
        raise SSAMBAError(
            f"job {job_id} was not submitted to the Ray cluster at {gcs}, the address Ray's job supervisor "
            "gave it: that is the cluster last started with the same temp folder, not the one the job was "
            "submitted to. Start each Ray cluster on this machine with its own `ray start --temp-dir`."
        )


def start_ray(num_cpus: int | None = None, quiet: bool = False, dashboard_host: str = "127.0.0.1") -> str:
    """Join the cluster of a ``ray job submit`` (or ``$RAY_ADDRESS``), else start a local Ray on loopback.

    Either way every Ray process of the sweep is pinned to that one cluster. Where no address is given,
    Ray finds one itself, and with several Rays on the machine it takes "the latest cluster", which may be
    someone else's: Ray Train's placement-group cleaner (a detached actor) asks the state API about its
    controller with no address, and that API reads ``$RAY_API_SERVER_ADDRESS``, else ``$RAY_ADDRESS``,
    else discovers. A local Ray's dashboard gets a port chosen here and ``$RAY_API_SERVER_ADDRESS`` names
    it before Ray starts, so every Ray process (a child of this one) inherits it. A joined cluster's
    processes were started by ``ray start``: its GCS address, resolved once here, goes to this process and
    to all of them as ``$RAY_ADDRESS`` (theirs through the job's runtime environment, which every task and
    actor of the sweep inherits), with ``$RAY_API_SERVER_ADDRESS`` emptied so that a value inherited from
    the shell that started the cluster cannot point them elsewhere: the state API then asks that GCS for
    the dashboard's address. A Ray Client address (``ray://``) is joined as given."""
    joining = bool(os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_SUBMISSION_ID"))
    if not joining:
        # single-machine mode: every Ray process on 127.0.0.1 (read when ray is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return "existing"
    if joining:
        address = os.environ.get("RAY_ADDRESS") or None
        if address and "://" in address:
            ray.init(log_to_driver=not quiet)
            return "cluster"
        from ray._private.services import canonicalize_bootstrap_address_or_die

        gcs = canonicalize_bootstrap_address_or_die(address)  # resolved once, here ("auto" included)
        pinned = {"RAY_ADDRESS": gcs, "RAY_API_SERVER_ADDRESS": ""}
        job = _submitted_job()
        taken = (job.get("runtime_env") or {}).get("env_vars") or {}  # Ray refuses a variable set twice
        runtime_env = {"env_vars": {k: v for k, v in pinned.items() if k not in taken}}
        os.environ.update(pinned)
        ray.init(address=gcs, log_to_driver=not quiet, runtime_env=runtime_env)
        try:
            _check_submitted_here(job, gcs)
        except SSAMBAError:
            ray.shutdown()
            raise
        return "cluster"
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host=dashboard_host,
        dashboard_port=port,
        log_to_driver=not quiet,
    )
    return "local"


def reap_orphan_placement_groups() -> list[str]:
    """Remove every placement group whose creating actor has died; return their ids.

    Ray Train 2.60 hands a worker group's placement group to its clean-up actor only once the workers
    have started, so a Train controller that dies while they start (its node lost) leaves the group
    holding its CPUs for the rest of the sweep, and the retried trials wait for them forever (measured:
    two 1-CPU nodes, one killed). A group whose creator is dead is never used again. Tune's own groups
    are created by the driver (no creator actor) and are left alone.
    """
    import ray
    from ray._private.state import state  # the GCS table names each group's creator; the public one does not
    from ray.core.generated.gcs_pb2 import PlacementGroupTableData as PG
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = PG.FromString(raw)
        creator = pg.creator_actor_id
        if (
            pg.state != PG.REMOVED
            and not pg.is_detached
            and pg.creator_actor_dead
            and creator
            and not ray.ActorID(creator).is_nil()
        ):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed.append(pg.placement_group_id.hex())
    return removed


def _orphan_reaper(every_s: float = 5.0):
    """A Tune callback that runs :func:`reap_orphan_placement_groups` every few seconds (and turns itself
    off, saying so, if Ray's internals changed)."""
    from ray import tune

    class OrphanPlacementGroupReaper(tune.Callback):
        last, enabled = 0.0, True

        def on_step_begin(self, iteration, trials, **info):
            if not self.enabled or time.monotonic() - self.last < every_s:
                return
            self.last = time.monotonic()
            try:
                for pg in reap_orphan_placement_groups():
                    print(f"removed placement group {pg}: its Ray Train controller died (node lost?)", flush=True)
            except Exception as exc:  # noqa: BLE001 - a private Ray API: never let it stop a sweep
                self.enabled = False
                print(
                    f"warning: orphan placement-group clean-up disabled ({type(exc).__name__}: {exc})",
                    file=sys.stderr,
                    flush=True,
                )

    return OrphanPlacementGroupReaper()


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


def open_records(plan: SweepPlan, tracker, ray_mode: str, resume: bool) -> SweepPlan:
    """The MLflow experiment and the sweep's parent run (created, or found again on resume), and
    ``sweep.json`` in the sweep's folder; returns the plan with their ids."""
    factor, res = plan.factor, plan.resources
    exp_id = tracker.experiment(plan.experiment, {N.EXPERIMENT_MARK: "1", N.FACTOR: factor.name})
    parent_tags = {
        N.ROLE: N.PARENT,
        N.FACTOR: factor.name,
        N.SWEEP_ARMS: json.dumps(list(plan.arms)),
        N.SWEEP_REFERENCE: factor.reference,
        N.SWEEP_TASKS: json.dumps(list(plan.tasks)),
        N.SWEEP_PRESET: plan.preset,
        **({N.SWEEP_SCRATCH: N.SCRATCH_ARM} if plan.scratch else {}),
        N.GIT_COMMIT: plan.git_commit,
        N.SWEEP_RAY: ray_mode,
    }
    parent_params = {
        "preset": plan.preset,
        "seeds": json.dumps(list(plan.seeds)),
        "tasks": json.dumps(list(plan.tasks)),
        "workers_per_trial": res.workers,
        "gpus_per_trial": res.gpus,
        "cpus_per_worker": res.cpus_per_worker,
        "max_concurrent": res.concurrent,
        "tune": json.dumps({k: list(v) for k, v in plan.tune.items()}),
        "tune_samples": plan.tune_samples if plan.searching else 0,
        **{f"set.{k}": v for k, v in plan.overrides.items()},
    }
    parent_id, _ = tracker.get_or_create_run(
        exp_id,
        key_tags={N.SWEEP_ID: plan.sweep_id, N.ROLE: N.PARENT},
        name=plan.sweep_id,
        tags=parent_tags,
        params=parent_params,
    )
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json_atomic(
            plan.sweep_dir / "sweep.json",
            {
                "sweep_id": plan.sweep_id,
                "factor": factor.name,
                "preset": plan.preset,
                "experiment": plan.experiment,
                "parent_run_id": parent_id,
            },
        )
    return replace(plan, experiment_id=exp_id, parent_run_id=parent_id)


def execute(plan: SweepPlan, *, resume: bool, quiet: bool) -> list[dict[str, Any]]:
    """Run (or restore) the Tuner over the plan's trials; one ``{config, metrics, error}`` per trial."""
    from ray import tune

    from ssamba.sweep.trial import run_trial

    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # Train's intermediate reports lack the final metric
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": 0.01})
    tuner_path = plan.sweep_dir / "tune"
    if resume and tune.Tuner.can_restore(str(tuner_path)):
        tuner = tune.Tuner.restore(str(tuner_path), trainable=trainable, resume_errored=True)
    else:
        run_config = tune.RunConfig(
            name="tune",
            storage_path=str(plan.sweep_dir),
            failure_config=tune.FailureConfig(max_failures=plan.max_failures),
            callbacks=[_orphan_reaper()],
            verbose=0 if quiet else 1,
        )
        n, conc = len(plan.cells), plan.resources.concurrent
        if plan.searching:
            from ray.tune.search.optuna import OptunaSearch

            points = [{"cell": i} for i in range(n) for _ in range(plan.tune_samples)]
            search = OptunaSearch(
                space=OptunaSpace(n, dict(plan.tune)), metric=plan.metric, mode="max", points_to_evaluate=points, seed=0
            )
            tune_config = tune.TuneConfig(search_alg=search, num_samples=len(points), max_concurrent_trials=conc)
            space = None
        else:
            tune_config = tune.TuneConfig(max_concurrent_trials=conc)
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


def mark_interrupted(plan: SweepPlan, tracker, trials: list[dict[str, Any]] | None) -> int:
    """The parent run and every trial run of the sweep that neither finished nor failed on its own: KILLED,
    ``sweep.status`` / ``trial.status`` ``interrupted``. ``trials`` are Tune's results when it returned (its
    errored trials keep their failure); returns the number of trial runs marked."""
    failed_keys = {plan.trial(t["config"]).key for t in trials or [] if t["error"]}
    marked = 0
    for run in tracker.trial_runs(plan.experiment_id, plan.sweep_id):
        tags = run.data.tags
        if tags.get(N.TRIAL_STATUS) == "finished" or tags.get(N.TRIAL_KEY) in failed_keys:
            continue
        if run.info.status == "FAILED" and tags.get(N.TRIAL_STATUS) == "failed" and trials is None:
            continue  # failed before the signal (Tune's results are not known)
        tracker.set_tags(run.info.run_id, {N.TRIAL_STATUS: "interrupted"})
        tracker.finish(run.info.run_id, "KILLED")
        marked += 1
    done = sum(bool(t.get("done")) for t in trials or [])
    tracker.set_tags(
        plan.parent_run_id, {N.SWEEP_STATUS: "interrupted", N.SWEEP_TRIALS: str(plan.n_trials), N.SWEEP_DONE: str(done)}
    )
    tracker.finish(plan.parent_run_id, "KILLED")
    return marked


def finish(plan: SweepPlan, tracker, trials: list[dict[str, Any]]) -> None:
    """Mark the parent run finished or failed, with the trial counts; apply the sweep-end retention."""
    status = "FINISHED" if all(t["error"] is None for t in trials) else "FAILED"
    if status == "FINISHED" and plan.keep_checkpoints == "none":
        from ssamba.sweep.trial import drop_pretrainings

        drop_pretrainings(plan.sweep_dir)  # no trial left that could reuse them
    tracker.set_tags(
        plan.parent_run_id,
        {
            N.SWEEP_STATUS: status.lower(),
            N.SWEEP_TRIALS: str(len(trials)),
            N.SWEEP_FAILED: str(sum(t["error"] is not None for t in trials)),
        },
    )
    tracker.finish(plan.parent_run_id, status)


def run_sweep(factor: Factor, args: argparse.Namespace) -> SweepResult:
    """Plan (every trial resolved and validated, before Ray), resources, execute (Ray Tune), finish (MLflow)."""
    from ssamba.sweep.tracking import Tracker

    tracker = Tracker(args.mlflow_uri)
    plan = make_plan(factor, args, sweep_id=_sweep_id(factor, args), git_commit=git_commit(), mlflow_uri=tracker.uri)
    plan = settle_data(plan)  # each stage's statistics and data file, as the trials will log them
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


def run_sweep_cli(
    factor: Factor, argv: list[str] | None = None, summarize: Callable[[str, str], str] | None = None
) -> int:
    """Entry point of a sweep script: run the sweep, then print its ablation table.

    ``summarize(mlflow_uri, sweep_id)`` renders the table (the scripts pass ``ablations.summarize.
    summarize_sweep``: the reporting layer sits above this one, which does not import it); without it a
    plain table of the trials' final metrics is printed."""
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
    print(summarize(res.mlflow_uri, res.sweep_id) if summarize is not None else _plain_table(res))
    print(
        f"MLflow: run `mlflow ui --backend-store-uri {res.mlflow_uri}` (or plain `mlflow ui` here) and open "
        f"experiment {res.experiment!r}; sweep id {res.sweep_id}"
    )
    if failed:
        print(f"{len(failed)} trial(s) failed: " + "; ".join((t["error"] or "")[:200] for t in failed), file=sys.stderr)
        return 1
    return 0


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

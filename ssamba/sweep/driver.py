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
import re
import shlex
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


GIT_COMMIT_ENV = "SSAMBA_GIT_COMMIT"  # the commit to record, when the code runs without its repository
_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")
CODE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the ssamba package (a clone, or Ray's copy)
_CODE_FOLDERS, _CODE_SUFFIXES = ("ssamba", "ablations", "sweeps"), (".py", ".cu")


def read_git_head(start: str | os.PathLike) -> str | None:
    """The commit checked out in the git work tree holding ``start``, read from git's files alone (no git
    binary): ``.git/HEAD``, the branch it names (a loose ref or a line of ``packed-refs``), following the
    ``gitdir:`` file of a worktree. None when there is no repository or HEAD does not resolve."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        dotgit = folder / ".git"
        try:
            if dotgit.is_file():  # a worktree or submodule: "gitdir: PATH"
                text = dotgit.read_text().strip()
                if not text.startswith("gitdir:"):
                    return None
                gitdir = (folder / text[len("gitdir:") :].strip()).resolve()
            elif dotgit.is_dir():
                gitdir = dotgit
            else:
                continue
            head = (gitdir / "HEAD").read_text().strip()
            if _SHA.fullmatch(head):
                return head  # detached
            if not head.startswith("ref:"):
                return None
            ref = head[len("ref:") :].strip()
            common = gitdir
            if (gitdir / "commondir").is_file():  # a worktree's branches live in the main repository
                common = (gitdir / (gitdir / "commondir").read_text().strip()).resolve()
            for base in (gitdir, common):
                if (base / ref).is_file():
                    sha = (base / ref).read_text().strip()
                    return sha if _SHA.fullmatch(sha) else None
            if (common / "packed-refs").is_file():
                for line in (common / "packed-refs").read_text().splitlines():
                    sha, _, name = line.partition(" ")
                    if name.strip() == ref and _SHA.fullmatch(sha):
                        return sha
            return None
        except OSError:
            return None
    return None


def _head(where: Path) -> str | None:
    """``git rev-parse HEAD`` in ``where``, else :func:`read_git_head`."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=where)
        if out.returncode == 0 and _SHA.fullmatch(out.stdout.strip()):
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return read_git_head(where)


def installed_source(dist: str = "ssamba") -> Path | None:
    """The folder an editable install (``pip install -e``) of the project points at (its ``direct_url.json``,
    PEP 610), None for another kind of install."""
    import importlib.metadata
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    # every copy of the metadata on sys.path: run from the source folder, its own ssamba.egg-info (which
    # setuptools writes there, without direct_url.json) comes before the install's dist-info
    for d in importlib.metadata.distributions(name=dist):
        try:
            info = json.loads(d.read_text("direct_url.json") or "{}")
        except ValueError:
            continue
        url = info.get("url", "")
        if url.startswith("file:") and info.get("dir_info", {}).get("editable"):
            return Path(url2pathname(urlparse(url).path))
    return None


def same_code(a: Path, b: Path) -> bool:
    """Whether two copies of the project hold the same sources (every ``.py`` and ``.cu`` file under
    ``ssamba/``, ``ablations/``, ``sweeps/``, byte for byte)."""

    def files(root: Path) -> dict[Path, Path]:
        return {
            p.relative_to(root): p
            for top in _CODE_FOLDERS
            for p in (root / top).rglob("*")
            if p.suffix in _CODE_SUFFIXES and "__pycache__" not in p.parts
        }

    fa, fb = files(a), files(b)
    return bool(fa) and fa.keys() == fb.keys() and all(fa[k].read_bytes() == fb[k].read_bytes() for k in fa)


def git_commit(
    code: str | os.PathLike | None = None, environ: dict | None = None, installed: Path | None | bool = True
) -> str:
    """The commit of the code that runs (``code``: the folder holding the package):

    1. ``$SSAMBA_GIT_COMMIT``, when set;
    2. the HEAD of the git work tree the code sits in;
    3. the code has no repository (Ray's copy of a submitted job's working directory: Ray leaves ``.git``
       out): the HEAD of the editable install's source folder (``installed``; True: look it up), when that
       folder holds the same sources, byte for byte, as the code that runs;
    4. ``unknown``."""
    env = os.environ if environ is None else environ
    if env.get(GIT_COMMIT_ENV, "").strip():
        return env[GIT_COMMIT_ENV].strip()
    where = Path(code) if code is not None else CODE_ROOT
    sha = _head(where) if ray_job_copy(where) is None else None  # (a job's copy may sit inside an unrelated repo)
    if sha:
        return sha
    source = installed_source() if installed is True else installed or None
    if source is not None and source.resolve() != where.resolve() and same_code(where, source):
        return _head(source) or "unknown"
    return "unknown"


def ray_job_copy(cwd: str | os.PathLike | None = None) -> Path | None:
    """Ray's temporary copy of a submitted job's working directory (``ray job submit --working-dir``:
    ``<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>``) when ``cwd`` is in one, else None."""
    here = Path(cwd or os.getcwd()).resolve()
    return next(
        (f for f in (here, *here.parents) if f.name.startswith("_ray_pkg_") and f.parent.name == "working_dir_files"),
        None,
    )


def temporary_copy_warnings(storage: str | os.PathLike, mlflow_uri: str, copy: Path | None) -> list[str]:
    """What would be written inside Ray's temporary copy of a job's working directory (``copy``): the sweep
    storage, a local MLflow store. Ray deletes that copy with its session, and other nodes do not see it."""
    if copy is None:
        return []
    out = []
    storage = Path(storage).resolve()
    if storage.is_relative_to(copy):
        out.append(
            f"--storage resolves to {storage}, inside Ray's temporary copy of the job's working directory "
            f"({copy}): the checkpoints and the sweep's state are lost with it and other nodes do not see "
            f"them. Give an absolute path on storage every node sees, e.g. --storage /shared/sweeps"
        )
    store = local_store_path(mlflow_uri)
    if store is not None and store.is_relative_to(copy):
        out.append(
            f"the MLflow store {store} is inside Ray's temporary copy of the job's working directory ({copy}): "
            f"the runs are lost with it. Pass --mlflow-uri with an absolute path (sqlite:////shared/mlflow.db) "
            f"or a server (http://HEAD:5000)"
        )
    return out


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a local MLflow store (``sqlite:///``, ``file:``), None for a server."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).resolve()
    if uri.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return Path(url2pathname(urlparse(uri).path)).resolve()
    return None


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
    exp_id = tracker.experiment(
        plan.experiment,
        {
            N.EXPERIMENT_MARK: "1",
            N.FACTOR: factor.name,
            N.EXPERIMENT_KIND: N.EXPERIMENT_KIND_ML,  # the UI's "Machine learning" kind: runs, not GenAI traces
            N.NOTE: experiment_note(plan),
        },
    )
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
    parent_id, created = tracker.get_or_create_run(
        exp_id,
        key_tags={N.SWEEP_ID: plan.sweep_id, N.ROLE: N.PARENT},
        name=plan.sweep_id,
        tags=parent_tags,
        params=parent_params,
    )
    if created:
        tracker.set_tags(parent_id, {N.NOTE: sweep_note(plan)})
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


def _selection_metrics(plan: SweepPlan) -> dict[str, str]:
    """Each task's validation score (what selection uses): task -> ``ft/<task>/best_<metric>``."""
    cell = plan.cells[0] if plan.cells else None
    return {t.name: f"{N.ft(t.name)}/best_{t.config.finetune.metric}" for t in (cell.tasks if cell else ())}


def experiment_note(plan: SweepPlan) -> str:
    """The experiment's description (MLflow's ``mlflow.note.content``, shown above its runs)."""
    f = plan.factor
    return (
        f"**Ablation of {f.description or f.name}** (factor `{f.name}`): arms {', '.join(f.arms)}, "
        f"reference `{f.reference}`.\n\n"
        f"Each **parent run** is one sweep (`python -m ablations.run {f.name} ...` or `sweeps/{f.name}.py`); "
        f"its **child runs** are the trials, one arm x seed each: a masked-patch pretraining, then a "
        f"fine-tuning on each task (`pretrain/...`, `ft/<task>/...`; `ft/<task>/final` is the test score). "
        f"A parent run carries each arm's summary as `arm/<arm>/...` metrics (means over seeds, `n` seeds) "
        f"and a table in its description.\n\n"
        f"Tables with differences and intervals: `python -m ablations.summarize --experiment {plan.experiment}`."
    )


def sweep_note(plan: SweepPlan, table: str = "") -> str:
    """The parent run's description: what the sweep runs and how it selects, then (once it ends) its arms."""
    sel = _selection_metrics(plan)
    res = plan.resources
    tune = f"; Optuna tunes {', '.join(plan.tune)} ({plan.tune_samples} samples per arm x seed)" if plan.tune else ""
    text = (
        f"**Sweep `{plan.sweep_id}`**: {plan.factor.name}, arms {', '.join(plan.arms)} (reference "
        f"`{plan.factor.reference}`) x seeds {', '.join(map(str, plan.seeds))} = {plan.n_trials} trials on preset "
        f"`{plan.preset}`, tasks {', '.join(plan.tasks)}{tune}.\n\n"
        f"Selection uses the validation score ({', '.join(f'`{m}`' for m in sel.values())}), never the test "
        f"score (`ft/<task>/final`). Resources: {res.workers} worker(s) per trial, "
        f"{res.cpus_per_worker} CPU{f' + {res.gpus} GPU' if res.use_gpu else ''} each, {res.concurrent} trials "
        f"at once. Storage: `{plan.sweep_dir}`. Commit: `{plan.git_commit}`."
    )
    cmd = shlex.join(["python", *sys.argv]) if sys.argv and sys.argv[0] else ""
    if cmd:
        text += f"\n\nCommand: `{cmd}`"
    return text + (f"\n\n{table}" if table else "")


def arm_summary(trials: list[tuple[str, str, dict[str, float]]], plan: SweepPlan) -> dict[str, dict[str, float]]:
    """Each arm's mean over its seeds of every task's validation score (``ft/<task>/best_<metric>``) and test
    score (``ft/<task>/final``), and ``n`` (seeds). ``trials`` are the finished trials as ``(arm, seed,
    metrics)``; with Optuna samples, a seed counts the sample with the best validation score (``plan.metric``).
    Arms in the plan's order; an arm without a finished trial is left out."""
    chosen: dict[tuple[str, str], dict[str, float]] = {}
    for arm, seed, metrics in trials:
        best = chosen.get((arm, seed))
        score = metrics.get(plan.metric, float("-inf"))
        if best is None or score > best.get(plan.metric, float("-inf")):
            chosen[(arm, seed)] = metrics
    keys = [k for task, m in _selection_metrics(plan).items() for k in (m, N.ft_final(task))]
    out: dict[str, dict[str, float]] = {}
    for arm in plan.arms:
        runs = [m for (a, _), m in chosen.items() if a == arm]
        if not runs:
            continue
        summary: dict[str, float] = {"n": float(len(runs))}
        for k in keys:
            values = [m[k] for m in runs if k in m and m[k] == m[k]]
            if values:
                summary[k] = sum(values) / len(values)
        out[arm] = summary
    return out


def arm_table(summary: dict[str, dict[str, float]], plan: SweepPlan) -> str:
    """A Markdown table of :func:`arm_summary` for the parent run's description."""
    sel = _selection_metrics(plan)
    cols = [(m, f"{t} validation") for t, m in sel.items()] + [(N.ft_final(t), f"{t} test") for t in sel]
    lines = [
        "| arm | n | " + " | ".join(label for _, label in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for arm, m in summary.items():
        cells = [f"{m[k]:.4f}" if k in m else "-" for k, _ in cols]
        lines.append(f"| {arm} | {int(m['n'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n(means over seeds; the summary's intervals: `python -m ablations.summarize`)"


def log_arm_summary(plan: SweepPlan, tracker) -> dict[str, dict[str, float]]:
    """Put each arm's summary on the parent run: metrics ``arm/<arm>/<metric>`` and ``arm/<arm>/n`` (at the
    step = the number of finished trials, so a resumed sweep adds a later point) and a table in its
    description, so that the runs table compares arms and sweeps without opening the children."""
    trials = [
        (r.data.tags.get(N.ARM, "?"), r.data.tags.get(N.SEED, "?"), dict(r.data.metrics))
        for r in tracker.trial_runs(plan.experiment_id, plan.sweep_id)
        if r.info.status == "FINISHED" and r.data.tags.get(N.TRIAL_STATUS, "finished") == "finished"
    ]
    summary = arm_summary(trials, plan)
    metrics = {N.arm_metric(arm, k): v for arm, m in summary.items() for k, v in m.items()}
    if metrics:
        tracker.log_metrics_once(plan.parent_run_id, metrics, step=len(trials))
        tracker.set_tags(plan.parent_run_id, {N.NOTE: sweep_note(plan, arm_table(summary, plan))})
    return summary


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
            callbacks=[_orphan_reaper()],
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
    log_arm_summary(plan, tracker)
    tracker.set_tags(
        plan.parent_run_id,
        {
            N.SWEEP_STATUS: status.lower(),
            N.SWEEP_TRIALS: str(len(trials)),
            N.SWEEP_FAILED: str(sum(t["error"] is not None for t in trials)),
        },
    )
    tracker.finish(plan.parent_run_id, status)


def finished_before(plan: SweepPlan, tracker):
    """The parent run of this sweep when it already finished with every trial (``--resume`` has nothing to
    do), else None. Read from MLflow alone: no Ray needed to tell."""
    run = tracker.parent_run(plan.experiment, plan.sweep_id)
    if run is None or run.info.status != "FINISHED" or run.data.tags.get(N.SWEEP_STATUS) != "finished":
        return None
    return run


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
                plan.sweep_id, plan.experiment, done.info.experiment_id, done.info.run_id, tracker.uri, plan.sweep_dir
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

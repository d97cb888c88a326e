"""The sweep plan: the command line turned, once, into every trial's fully resolved config.

:func:`make_plan` is pure (no Ray, no MLflow, no files written; it prints one line per task saying what the
task's recipe does under the preset): it reads the preset, applies ``--set``,
scales the arms to the preset, parses seeds, tasks and the Optuna space, resolves and validates one
:class:`TrialSpec` per cell (arm x seed) and returns a frozen :class:`SweepPlan`. A trial's fine-tuning
config is the preset, then the task's recipe (:meth:`Preset.recipe`), then ``--set``, the arm and the tuned
values, then the task's name and manifest. The driver then fits the
resources to the cluster (:meth:`Resources.fit`), opens MLflow, and hands the plan to Ray Tune; a trial
gets its spec with :meth:`SweepPlan.trial` (the cell's spec plus the tuned values Optuna chose) and its
Ray Train worker reads nothing else. No preset is resolved a second time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ssamba.base import names as N
from ssamba.base.errors import ConfigError
from ssamba.config import ExperimentConfig, apply_overrides, parse_set_args, to_flat
from ssamba.config.presets import TASK_RECIPES, Preset, get_preset
from ssamba.sweep.factors import Factor, Overrides

# Config sections that decide a pretraining (a shared pretraining is reused when these are equal).
PRETRAIN_SECTIONS = ("frontend.", "model.", "data.", "pretrain.")
PRETRAIN_RUNTIME_KEYS = ("data.num_workers", "model.scan_backend", "model.fused_add_norm")  # do not change the result
TUNE_KINDS = ("loguniform", "uniform", "int", "choice")


def digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def pretrain_key(flat: Mapping[str, Any]) -> str:
    """Hash of everything that decides a pretraining: its config sections and the seed."""
    items = {k: v for k, v in flat.items() if k.startswith(PRETRAIN_SECTIONS) and k not in PRETRAIN_RUNTIME_KEYS}
    items["seed"] = flat["seed"]
    return digest(items, 16)


# ------------------------------------------------------------------------------------------------------
# the parts of the command line
# ------------------------------------------------------------------------------------------------------


def parse_seeds(text: str | None, p: Preset) -> tuple[int, ...]:
    """``--seeds``: a count (``3`` -> 0, 1, 2) or a list (``0,4,7``); default the preset's."""
    if not text:
        return p.seeds
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()] if "," in text else list(range(int(text)))
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected a count (3) or a list (0,1,2)") from None
    if not seeds:
        raise ConfigError(f"--seeds must be positive, got {text}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} repeats a seed")
    return tuple(seeds)


# a task's own keys: its name and data, set by --tasks; every other key of a task's overrides is its recipe's,
# which --set, an arm or a tuned value overrides
TASK_OWN_KEYS = ("finetune.task", "finetune.manifest")


def _values(over: Mapping[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('finetune.')}={v}" for k, v in over.items())


def recipe_notice(name: str, p: Preset, applied: Overrides, kept: Overrides, given: Mapping[str, Any]) -> str:
    """What the recipe named ``name`` does under preset ``p``, in one line (``given``: the --set overrides)."""
    if not applied and not kept:
        return (
            f"task {name}: no recipe is named {name!r} (recipes: {', '.join(TASK_RECIPES)}), so it fine-tunes "
            f"with preset {p.name}'s finetune.* settings and --set; name the task after a recipe to use one"
        )
    overridden = sorted(k for k in {*applied, *kept} if k in given)
    said = f"; --set wins for {_values({k: given[k] for k in overridden})}" if overridden else ""
    applied = {k: v for k, v in applied.items() if k not in given and k not in ("finetune.mean", "finetune.std")}
    if not kept:
        return f"task {name}: recipe {name!r} applies whole under preset {p.name}{said}"
    base = to_flat(p.config)
    budget = ", ".join(
        f"{k.removeprefix('finetune.')}={base[k]} [recipe {v}]"
        for k, v in kept.items()
        if k not in given and base[k] != v
    )
    kept_said = f"the preset keeps its budget ({budget})" if budget else "its budget is the preset's too"
    return (
        f"task {name}: recipe {name!r} under preset {p.name}: its task settings apply ({_values(applied)}; "
        f"mean/std: the manifest's when data.stats_from_manifest), {kept_said}{said}. "
        f"A paper-* preset applies the whole recipe; --set finetune.KEY=VALUE overrides any of these"
    )


def parse_tasks(
    specs: list[str] | None, p: Preset, given: Mapping[str, Any] | None = None
) -> tuple[dict[str, Overrides], list[str]]:
    """``--tasks NAME[=MANIFEST] ...`` -> (task name -> ``finetune.*`` overrides (recipe + task and manifest),
    one line per task saying what its recipe does under the preset). ``given``: the --set overrides."""
    specs = list(specs or p.default_tasks)
    if not specs:
        raise ConfigError(
            f"preset {p.name} fine-tunes on real data: pass --tasks NAME=MANIFEST (recipes: {', '.join(TASK_RECIPES)})"
        )
    out: dict[str, Overrides] = {}
    notices: list[str] = []
    for spec in specs:
        name, _, manifest = spec.partition("=")
        if name in out:
            raise ConfigError(f"--tasks names {name!r} twice")
        applied, kept = p.recipe(name)
        over = dict(applied)
        over["finetune.task"] = name
        if manifest:
            path = Path(manifest).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"task {name}: manifest {path} does not exist")
            over["finetune.manifest"] = str(path)
        elif name != "demo":
            raise ConfigError(f"task {name!r} needs a manifest: --tasks {name}=PATH.parquet")
        out[name] = over
        if name != "demo":  # the built-in task of the demo corpus has no recipe, and needs none
            notices.append(recipe_notice(name, p, applied, kept, given or {}))
    return out, notices


def parse_tune(specs: list[str]) -> dict[str, tuple]:
    """``--tune KEY=loguniform:LO:HI`` (also ``uniform:``, ``int:``, ``choice:a|b``) -> key -> (kind, ...)."""
    out: dict[str, tuple] = {}
    for spec in specs:
        key, _, dist = spec.partition("=")
        kind, _, rest = dist.partition(":")
        if kind in ("loguniform", "uniform", "int"):
            lo, _, hi = rest.partition(":")
            try:
                out[key] = (kind, float(lo), float(hi))
            except ValueError:
                raise ConfigError(f"--tune {spec}: expected {kind}:LOW:HIGH") from None
            if out[key][1] > out[key][2] or (kind == "loguniform" and out[key][1] <= 0):
                raise ConfigError(
                    f"--tune {spec}: needs 0 < LOW <= HIGH"
                    if kind == "loguniform"
                    else f"--tune {spec}: needs LOW <= HIGH"
                )
        elif kind == "choice":
            out[key] = ("choice", rest.split("|"))
        else:
            raise ConfigError(f"--tune {spec}: distribution must be one of {', '.join(TUNE_KINDS)}")
    return out


# settings that name a file or folder: resolved against the caller's directory before anything leaves this
# process (Ray workers run in other directories, on other machines), files checked to exist
FILE_KEYS = ("data.manifest", "finetune.manifest")
FOLDER_KEYS = ("data.cache_dir",)


def resolve_paths(overrides: Mapping[str, Any], cwd: str | Path | None = None) -> dict[str, Any]:
    """``--set`` values of path settings made absolute (``~`` expanded); a missing file is a ConfigError."""
    out = dict(overrides)
    base = Path(cwd) if cwd is not None else Path.cwd()
    for key in (*FILE_KEYS, *FOLDER_KEYS):
        value = str(out.get(key) or "")
        if not value:
            continue
        path = (base / Path(value).expanduser()).resolve()
        if key in FILE_KEYS and not path.is_file():
            raise ConfigError(f"--set {key}={value}: {path} does not exist")
        out[key] = str(path)
    return out


PRETRAIN_MANIFEST_FLAG = "--pretrain-manifest"


def pretrain_manifest_setting(value: str, set_args: list[str] | None = None, cwd: str | Path | None = None) -> str:
    """``--pretrain-manifest PATH`` as the ``--set`` it stands for: ``data.manifest=<absolute path>``.

    The path is resolved against ``cwd`` (default: the current directory) and must be a file; a
    ``--set data.manifest`` naming another file is a :class:`ConfigError` (one pretraining set per sweep)."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    path = (base / Path(value).expanduser()).resolve()
    if not path.is_file():
        raise ConfigError(
            f"{PRETRAIN_MANIFEST_FLAG} {value}: {path} does not exist. Fix: pass the manifest written by "
            f"`python -m ssamba.data prepare LAYOUT ROOT --out FILE.parquet`"
        )
    other = parse_set_args(set_args or []).get("data.manifest")
    if other and (base / Path(str(other)).expanduser()).resolve() != path:
        raise ConfigError(
            f"{PRETRAIN_MANIFEST_FLAG} {value} and --set data.manifest={other} name different files. "
            f"Fix: pass one of them"
        )
    return f"data.manifest={path}"


def tune_example(spec: Mapping[str, tuple]) -> dict[str, Any]:
    """One value of each tuned key (the low end, or the first choice): what validation resolves."""
    return {
        k: (a[0][0] if kind == "choice" else int(a[0]) if kind == "int" else a[0]) for k, (kind, *a) in spec.items()
    }


# ------------------------------------------------------------------------------------------------------
# resources
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What each trial holds: ``workers`` Ray Train workers, each with ``cpus_per_worker`` CPUs and
    ``gpus / workers`` GPUs; ``concurrent`` trials at once (0: as the cluster allows)."""

    workers: int = 1
    gpus: float = 0.0  # per trial; fractions allowed
    cpus_per_worker: float | None = None  # None: a share of the cluster's CPUs (see fit)
    concurrent: int = 0

    def __post_init__(self):
        if self.workers < 1:
            raise ConfigError(f"--workers-per-trial must be >= 1, got {self.workers}")
        if self.gpus < 0:
            raise ConfigError(f"--gpus-per-trial must be >= 0, got {self.gpus}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError(f"--cpus-per-worker must be > 0, got {self.cpus_per_worker}")
        if self.concurrent < 0:
            raise ConfigError(f"--max-concurrent must be >= 0, got {self.concurrent}")

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0

    @property
    def device_type(self) -> str:
        return "cuda" if self.use_gpu else "cpu"

    @property
    def device_share(self) -> float:
        """Devices one worker holds (GPUs with GPUs, else CPUs): the unit of the device-hours."""
        return self.gpus / self.workers if self.use_gpu else (self.cpus_per_worker or 1.0)

    def per_worker(self) -> dict[str, float]:
        out = {"CPU": self.cpus_per_worker or 1.0}
        if self.use_gpu:
            out["GPU"] = self.gpus / self.workers
        return out

    def fit(
        self, total_cpus: float, total_gpus: float, largest_node_cpus: float, driver_cpus: float = 0.01
    ) -> Resources:
        """The resources on a cluster of this size: the concurrency, and (unless given) the CPUs per worker.

        The trial drivers hold ``driver_cpus`` each; the workers share the rest. A worker must also fit on
        the largest node beside every trial driver: after a node is lost, the retried trials' drivers pile
        onto the survivors, and a worker that no longer fits leaves every trial waiting on the others
        (measured: two 1-CPU nodes, one killed)."""
        if self.use_gpu:
            if total_gpus < self.gpus:
                raise ConfigError(f"--gpus-per-trial {self.gpus} but the Ray cluster has {total_gpus} GPUs")
            fit = int(total_gpus // self.gpus)
        else:
            fit = int(total_cpus // self.workers)
        conc = self.concurrent or max(1, fit)
        cpus = self.cpus_per_worker
        if cpus is None:
            share = (total_cpus - driver_cpus * conc) / (conc * self.workers)
            share = min(share, largest_node_cpus - driver_cpus * conc)
            cpus = max(0.01, int(share * 100) / 100)
        return replace(self, cpus_per_worker=cpus, concurrent=conc)


# ------------------------------------------------------------------------------------------------------
# trials
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """One fine-tuning stage of a trial: its resolved config and its folder."""

    name: str
    config: ExperimentConfig
    dir: Path


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial runs with, resolved: what Ray Train's workers receive."""

    arm: str
    seed: int
    tuned: Mapping[str, Any]
    key: str  # identifies the trial in its sweep (arm, seed, tuned values)
    config: ExperimentConfig  # the pretraining stage's config (also the trial's params)
    tasks: tuple[TaskSpec, ...]
    pretrain_key: str  # trials with equal keys share one pretraining
    pretrain_dir: Path
    result_file: Path
    resources: Resources
    mlflow_uri: str | None
    keep_checkpoints: str = "best"
    log_checkpoints: bool = True
    files: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # stage -> its manifest's facts
    pretrained: bool = True  # False: the from-scratch arm (fine-tuning only, from random weights)

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}-{self.key[:6]}"

    def params(self) -> dict[str, Any]:
        """MLflow params: the trial's config, plus each task's fine-tuning values that differ from it."""
        params = to_flat(self.config)
        for t in self.tasks:
            for k, v in to_flat(t.config).items():
                if k.startswith("finetune.") and params.get(k) != v:
                    params[f"{N.TASK_PARAM_PREFIX}{t.name}.{k[len('finetune.') :]}"] = v
        for stage, facts in self.files.items():
            for k, v in facts.items():
                params[f"{N.FILES_PARAM_PREFIX}{stage}.{k}"] = v
        return params

    def settled_like(self, cell: TrialSpec) -> TrialSpec:
        """This trial (the cell plus tuned values) with the statistics and data files settled for its cell."""
        if not cell.files:
            return self
        pre = replace(self.config.pretrain, mean=cell.config.pretrain.mean, std=cell.config.pretrain.std)
        fts = {t.name: t.config.finetune for t in cell.tasks}
        tasks = tuple(
            TaskSpec(t.name, replace(t.config, pretrain=pre, finetune=replace(
                t.config.finetune, mean=fts[t.name].mean, std=fts[t.name].std)), t.dir)
            for t in self.tasks
        )  # fmt: skip
        return replace(self, config=replace(self.config, pretrain=pre), tasks=tasks, files=cell.files)

    def record(self) -> dict[str, Any]:
        """The resolved configs as stored beside the run (``config.json``)."""
        return {
            "config": to_flat(self.config),
            "tasks": {t.name: to_flat(t.config) for t in self.tasks},
            "tuned": dict(self.tuned),
        }


@dataclass(frozen=True)
class SweepPlan:
    """A whole sweep, resolved and validated before Ray starts."""

    factor: Factor
    preset: str
    sweep_id: str
    sweep_dir: Path
    base: ExperimentConfig  # the preset with --set applied
    overrides: Mapping[str, Any]  # --set, as given
    arms: Mapping[str, Overrides]  # label -> overrides, scaled to the preset, in the factor's order
    seeds: tuple[int, ...]
    tasks: Mapping[str, Overrides]  # name -> finetune.* overrides (recipe, manifest)
    tune: Mapping[str, tuple]  # key -> (kind, ...) for Optuna; empty: a grid
    tune_samples: int
    cells: tuple[TrialSpec, ...]  # one per arm x seed (tuned keys not yet applied)
    resources: Resources
    mlflow_uri: str | None
    experiment: str
    git_commit: str = "unknown"
    keep_checkpoints: str = "best"
    log_checkpoints: bool = True
    worker_retries: int = 1
    max_failures: int = 1
    scratch: bool = False  # the arm SCRATCH_ARM fine-tunes without pretraining
    notices: tuple[str, ...] = ()  # what each task's recipe does under the preset (printed by make_plan)
    pretrain_store: Path | None = None  # --pretrain-store: shared with other sweeps; None: the sweep's own
    # set by the driver once MLflow is open
    experiment_id: str = ""
    parent_run_id: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def searching(self) -> bool:
        return bool(self.tune)

    @property
    def metric(self) -> str:
        """What Optuna maximises: the first task's best **validation** score (``ft/<task>/best_<metric>``),
        never its test score (``ft/<task>/final`` is the test score whenever the task has a test split)."""
        task = self.cells[0].tasks[0] if self.cells else None
        name = next(iter(self.tasks))
        return f"{N.ft(name)}/best_{task.config.finetune.metric if task else 'acc'}"

    @property
    def pretrain_root(self) -> Path:
        """The folder of the sweep's pretrainings, one per config and seed (``<key>/``): ``--pretrain-store``,
        which sweeps may share (one computes a pretraining, the others reuse it), else the sweep's own."""
        return self.pretrain_store or self.sweep_dir / "pretrain"

    @property
    def n_trials(self) -> int:
        return len(self.cells) * (self.tune_samples if self.searching else 1)

    def trial(self, params: Mapping[str, Any]) -> TrialSpec:
        """The spec of the trial Tune started with ``params`` (``cell`` and the tuned values)."""
        cell = self.cells[int(params["cell"])]
        tuned = {k: v for k, v in params.items() if k != "cell"}
        unknown = sorted(set(tuned) - set(self.tune))
        if unknown:
            raise ConfigError(f"trial params {unknown} are not tuned keys of this sweep ({sorted(self.tune)})")
        return resolve_trial(self, cell.arm, cell.seed, tuned).settled_like(cell) if tuned else cell


def resolve_trial(plan: SweepPlan, arm: str, seed: int, tuned: Mapping[str, Any]) -> TrialSpec:
    """One trial's spec from the plan's base config: arm overrides, seed, tuned values, each task's recipe."""
    cfg = apply_overrides(plan.base, {**plan.arms[arm], "seed": seed, **tuned})
    pretrained = not (plan.scratch and arm == N.SCRATCH_ARM)
    if pretrained:
        cfg.check_pretraining()  # every other trial pretrains (or reuses a pretraining of this config)
    # settings that depend on the device, resolved here so that the logged params are the values used
    cfg = replace(cfg, data=replace(cfg.data, num_workers=cfg.data.resolved_num_workers(plan.resources.device_type)))
    key = digest({"sweep": plan.sweep_id, "arm": arm, "seed": seed, "tuned": dict(tuned)})
    trial_dir = plan.sweep_dir / "trials" / key
    # a recipe sits between the preset and what was asked for: --set, the arm and the tuned values win over it
    asked = {*plan.overrides, *plan.arms[arm], *tuned}
    tasks = tuple(
        TaskSpec(
            name,
            apply_overrides(cfg, {k: v for k, v in over.items() if k in TASK_OWN_KEYS or k not in asked}),
            trial_dir / f"ft-{name}",
        )
        for name, over in plan.tasks.items()
    )
    pkey = pretrain_key(to_flat(cfg)) if pretrained else "none"
    return TrialSpec(
        arm=arm,
        seed=seed,
        tuned=dict(tuned),
        key=key,
        config=cfg,
        tasks=tasks,
        pretrain_key=pkey,
        pretrain_dir=plan.pretrain_root / pkey,
        pretrained=pretrained,
        result_file=trial_dir / "result.json",
        resources=plan.resources,
        mlflow_uri=plan.mlflow_uri,
        keep_checkpoints=plan.keep_checkpoints,
        log_checkpoints=plan.log_checkpoints,
    )


def make_plan(
    factor: Factor, args: Any, *, sweep_id: str, git_commit: str = "unknown", mlflow_uri: str | None = None
) -> SweepPlan:
    """The plan of ``factor``'s sweep from the parsed command line (``ssamba.sweep.driver.build_parser``).

    Raises :class:`ConfigError` for anything wrong with the options or any trial's config."""
    preset_name = "smoke" if args.smoke_test else args.preset
    p = get_preset(preset_name)
    overrides = resolve_paths(parse_set_args(args.set))
    base = apply_overrides(p.config, overrides)
    arms = dict(factor.arms)
    if args.arms:
        wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = [a for a in wanted if a not in arms]
        if unknown:
            raise ConfigError(f"unknown arms {unknown} for {factor.name}; arms: {list(arms)}")
        arms = {a: arms[a] for a in wanted}
    if factor.scale is not None:
        arms = {label: factor.scale(label, over, base) for label, over in arms.items()}
    scratch = p.scratch if getattr(args, "scratch", None) is None else bool(args.scratch)
    if scratch:
        if N.SCRATCH_ARM in arms:
            raise ConfigError(f"factor {factor.name} has an arm named {N.SCRATCH_ARM!r}: --no-scratch, or rename it")
        arms[N.SCRATCH_ARM] = {}  # the preset (with --set) as it is, fine-tuned from random weights
    tune = parse_tune(args.tune)
    if args.tune_samples < 1:
        raise ConfigError(f"--tune-samples must be >= 1, got {args.tune_samples}")
    if args.keep_checkpoints not in ("all", "best", "none"):
        raise ConfigError(f"--keep-checkpoints must be all, best or none, got {args.keep_checkpoints!r}")
    name = args.name or f"{factor.name}-{preset_name}"
    tasks, notices = parse_tasks(args.tasks, p, overrides)
    plan = SweepPlan(
        factor=factor,
        preset=preset_name,
        sweep_id=sweep_id,
        sweep_dir=Path(args.storage).expanduser().resolve() / name,
        base=base,
        overrides=overrides,
        arms=arms,
        seeds=parse_seeds(args.seeds, p),
        tasks=tasks,
        tune=tune,
        tune_samples=args.tune_samples,
        cells=(),
        resources=Resources(
            workers=args.workers_per_trial,
            gpus=args.gpus_per_trial,
            cpus_per_worker=args.cpus_per_worker,
            concurrent=args.max_concurrent,
        ),
        mlflow_uri=mlflow_uri,
        experiment=args.experiment or f"ssamba-{factor.name}",
        git_commit=git_commit,
        keep_checkpoints=args.keep_checkpoints,
        log_checkpoints=not args.no_log_checkpoints,
        worker_retries=args.worker_retries,
        max_failures=args.max_failures,
        scratch=scratch,
        notices=tuple(notices),
        pretrain_store=Path(args.pretrain_store).expanduser().resolve() if args.pretrain_store else None,
    )
    cells = tuple(resolve_trial(plan, arm, seed, {}) for arm in arms for seed in plan.seeds)
    plan = replace(plan, cells=cells)
    if tune:  # every tuned key exists and takes a value of its kind, in every cell
        example = tune_example(tune)
        for cell in cells:
            resolve_trial(plan, cell.arm, cell.seed, example)
    for line in notices:
        print(line, flush=True)
    return plan


def with_resources(plan: SweepPlan, resources: Resources) -> SweepPlan:
    """The plan with its resources fitted to the cluster (every trial spec follows)."""
    return replace(plan, resources=resources, cells=tuple(replace(c, resources=resources) for c in plan.cells))

"""Every name the runs are recorded under in MLflow: tags, metric names and prefixes, artifact folders.

Writers (the sweep driver, the trial, the Ray Train worker, the jobs) and readers (``ablations``) use
these, so that a name is spelled once. The layout they make is described in docs/architecture.md
section 5.5. Params are the dotted config keys themselves (``model.norm``); in the run tables that
``Tracker.runs`` returns, columns are ``params.<key>``, ``tags.<key>`` and ``metrics.<key>``.
"""

from __future__ import annotations

# experiments
EXPERIMENT_MARK = "ssamba.sweep"  # tag "1" on every experiment a sweep created
DIRECT_EXPERIMENT = "ssamba-direct"  # the default experiment of python -m ssamba.pretrain|finetune --mlflow-uri
# MLflow's own tags: the experiment's kind (the UI's "Machine learning" view, not the GenAI one) and the
# description it shows on an experiment or a run
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_ML = "custom_model_development"
NOTE = "mlflow.note.content"

# tags of runs
ROLE = "sweep.role"  # PARENT or TRIAL, or DIRECT for a run of python -m ssamba.pretrain|finetune
PARENT, TRIAL = "parent", "trial"
DIRECT = "direct"
DIRECT_OUT = "direct.out"  # a direct run's output folder (absolute): a rerun into it continues its run
SWEEP_ID = "sweep.id"
SWEEP_ARMS = "sweep.arms"  # JSON list, the arms in the script's order
SWEEP_REFERENCE = "sweep.reference_arm"
SWEEP_SCRATCH = "sweep.scratch_arm"  # the no-pretraining arm, when the sweep has one
SCRATCH_ARM = "scratch"  # its label
SWEEP_TASKS = "sweep.tasks"  # JSON list of the fine-tuning tasks
SWEEP_PRESET = "sweep.preset"
SWEEP_RAY = "sweep.ray"  # how Ray was reached (local, address)
SWEEP_STATUS = "sweep.status"  # finished | failed | interrupted
SWEEP_TRIALS = "sweep.trials"
SWEEP_FAILED = "sweep.failed"
SWEEP_DONE = "sweep.done"  # trials that ran to their end before an interruption
FACTOR = "ablation.factor"
ARM = "ablation.arm"
SEED = "seed"
GIT_COMMIT = "git.commit"
TRIAL_KEY = "trial.key"
TRIAL_STATUS = "trial.status"  # running | finished | failed | interrupted
TRIAL_ERROR = "trial.error"
PRETRAIN_KEY = "pretrain.key"
PRETRAIN_REUSED = "pretrain.reused"  # "true" when another trial computed the shared pretraining
PRETRAIN_COMPUTED_BY = "pretrain.computed_by"  # that trial's name
MLFLOW_PARENT = "mlflow.parentRunId"

# params: the dotted config keys, plus each task's fine-tuning values that differ from the trial's
TASK_PARAM_PREFIX = "tasks."  # tasks.<task>.<finetune key without "finetune.">
FILES_PARAM_PREFIX = (
    "files."  # files.<stage>.path|sha256|size|mtime: each stage's manifest (stage: pretrain, ft.<task>)
)

# metrics
PRETRAIN = "pretrain"  # prefix of the pretraining stage's metrics: pretrain/<name>
COST_WALL = "cost/wall_s"
COST_DEVICE_HOURS = "cost/device_hours"
COST_SAMPLES = "cost/samples_per_s"
COST_PREFIX = "cost/"
FINAL = "final"  # ft/<task>/final: the task's headline number (test if any, else best validation)
ARM_PREFIX = "arm/"  # on a parent run: arm/<arm>/<metric>, the arm's mean over its seeds; arm/<arm>/n


def ft(task: str) -> str:
    """Prefix of a fine-tuning task's metrics: ``ft/<task>``."""
    return f"ft/{task}"


def ft_final(task: str) -> str:
    """``ft/<task>/final``."""
    return f"{ft(task)}/{FINAL}"


def is_final(metric: str) -> bool:
    return metric.startswith("ft/") and metric.endswith(f"/{FINAL}")


def arm_metric(arm: str, metric: str) -> str:
    """A parent run's summary of one arm: ``arm/<arm>/<metric>`` (e.g. ``arm/400/ft/esc50/final``)."""
    return f"{ARM_PREFIX}{arm}/{metric}"


def column(kind: str, name: str) -> str:
    """The column of a run table (``Tracker.runs``): ``tags.<name>``, ``params.<name>`` or ``metrics.<name>``."""
    if kind not in ("tags", "params", "metrics"):
        raise ValueError(f"kind must be tags, params or metrics; got {kind!r}")
    return f"{kind}.{name}"

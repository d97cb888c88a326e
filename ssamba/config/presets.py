"""Named experiment presets: ``demo`` (embedded default), ``smoke`` (CI), ``paper-{tiny,small,base}``, ``study``.

A :class:`Preset` is the whole of what a name means: its config, its seeds, the tasks it fine-tunes on when
none is named, whether it needs real data, and how much of a task's recipe applies (:meth:`Preset.recipe`:
the whole recipe under the paper presets; under ``demo`` and ``smoke`` the recipe's task settings, while the
preset keeps its budget, :data:`RECIPE_BUDGET_KEYS`). Nothing else tests a preset's name.

The paper presets are docs/model.md sections 4-5 (pretraining on 128 x 1024 at stride 16, 400 masked
patches; fine-tuning with the ESC-50 recipe) and need manifests of real data (``--manifest``,
``--set finetune.manifest=...``). ``demo`` and ``smoke`` are small models on the demo corpus,
with the mask count scaled to the same fraction of patches as the paper (400 / 512). ``study`` is the real-data
ablation study of ``python -m ablations.study``: SSAMBA-tiny on short windows, the recipes' task settings with
one fine-tuning budget, three seeds and the from-scratch arm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ssamba.base.errors import ConfigError
from ssamba.config import (
    DataConfig,
    ExperimentConfig,
    FinetuneConfig,
    PretrainConfig,
    model_preset,
)

# Fine-tuning recipes of the official scripts (docs/model.md section 5.2), as ``finetune.*`` overrides.
_ESC = {
    "finetune.target_length": 512,
    "finetune.fstride": 10,
    "finetune.tstride": 10,
    "finetune.lr": 1e-4,
    "finetune.head_lr": 1.0,
    "finetune.epochs": 50,
    "finetune.batch_size": 48,
    "finetune.lr_decay_start": 6,
    "finetune.lr_decay_step": 1,
    "finetune.lr_decay": 0.85,
    "finetune.freqm": 24,
    "finetune.timem": 96,
    "finetune.mixup": 0.0,
    "finetune.noise": True,
    "finetune.loss": "ce",
    "finetune.metric": "acc",
    "finetune.mean": -6.6268077,
    "finetune.std": 5.358466,
    "finetune.fold": 1,
}
_SC = {
    "finetune.target_length": 128,
    "finetune.fstride": 10,
    "finetune.tstride": 10,
    "finetune.lr": 2.5e-4,
    "finetune.head_lr": 1.0,
    "finetune.epochs": 30,
    "finetune.batch_size": 128,
    "finetune.lr_decay_start": 5,
    "finetune.lr_decay_step": 1,
    "finetune.lr_decay": 0.85,
    "finetune.freqm": 48,
    "finetune.timem": 48,
    "finetune.mixup": 0.6,
    "finetune.noise": True,
    "finetune.loss": "bce",
    "finetune.metric": "acc",
    "finetune.mean": -6.845978,
    "finetune.std": 5.5654526,
    "finetune.fold": 0,
}
TASK_RECIPES: dict[str, dict] = {
    "audioset20k": {
        "finetune.target_length": 1024,
        "finetune.fstride": 10,
        "finetune.tstride": 10,
        "finetune.lr": 1e-4,
        "finetune.head_lr": 3.0,
        "finetune.epochs": 50,
        "finetune.batch_size": 24,
        "finetune.lr_decay_start": 15,
        "finetune.lr_decay_step": 10,
        "finetune.lr_decay": 0.75,
        "finetune.freqm": 48,
        "finetune.timem": 192,
        "finetune.mixup": 0.5,
        "finetune.noise": False,
        "finetune.loss": "bce",
        "finetune.metric": "map",
        "finetune.mean": -4.2677393,
        "finetune.std": 4.5689974,
        "finetune.fold": 0,
    },
    "esc50": _ESC,
    "esc10": _ESC,
    "speechcommands": _SC,
    "urbansound8k": {
        "finetune.target_length": 6144,
        "finetune.fstride": 16,
        "finetune.tstride": 16,
        "finetune.lr": 1e-4,
        "finetune.head_lr": 1.0,
        "finetune.epochs": 50,
        "finetune.batch_size": 5,
        "finetune.lr_decay_start": 20,
        "finetune.lr_decay_step": 10,
        "finetune.lr_decay": 0.85,
        "finetune.freqm": 48,
        "finetune.timem": 192,
        "finetune.mixup": 0.0,
        "finetune.noise": False,
        "finetune.loss": "ce",
        "finetune.metric": "acc",
        "finetune.mean": -5.138443946838379,
        "finetune.std": 4.229961395263672,
        "finetune.fold": 0,
    },
    "fsdd": {**_SC, "finetune.loss": "ce", "finetune.mixup": 0.0},
}
RECIPE_BUDGET_KEYS = (
    "finetune.lr",
    "finetune.head_lr",
    "finetune.epochs",
    "finetune.batch_size",
    "finetune.lr_decay_start",
    "finetune.lr_decay_step",
    "finetune.lr_decay",
    "finetune.fstride",
    "finetune.tstride",
)
"""A recipe's compute budget and optimisation schedule: under a preset without ``recipe_budget`` (``demo``,
``smoke``) the preset's values stay. The rest of a recipe describes the task (clip length, loss, metric,
augmentation, statistics, fold) and applies under every preset."""


def _paper(size: str) -> ExperimentConfig:
    return ExperimentConfig(
        name=f"paper-{size}",
        model=model_preset(size),
        data=DataConfig(stats_from_manifest=True),
        pretrain=PretrainConfig(),
        finetune=FinetuneConfig(task="esc50", fold=1),
    )


def _demo() -> ExperimentConfig:
    return ExperimentConfig(
        name="demo",
        model=model_preset("demo"),
        # one forward pass per step (the official step takes two): half the CPU time
        pretrain=PretrainConfig(
            target_length=128,
            mask_count=50,
            passes=1,
            lr=1e-3,
            batch_size=32,
            epochs=100,
            max_steps=120,
            warmup_steps=20,
            plateau_every=60,
            eval_batches=4,
        ),
        # no SpecAugment / noise: on 336 clips they cost more accuracy than they buy (measured)
        finetune=FinetuneConfig(
            task="demo",
            target_length=128,
            fstride=16,
            tstride=16,
            lr=2e-3,
            batch_size=32,
            epochs=10,
            lr_decay_start=6,
            freqm=0,
            timem=0,
            noise=False,
        ),
    )


def _smoke() -> ExperimentConfig:
    return ExperimentConfig(
        name="smoke",
        model=model_preset("test"),
        pretrain=PretrainConfig(
            target_length=128,
            mask_count=50,
            passes=1,
            lr=1e-3,
            batch_size=8,
            epochs=100,
            max_steps=6,
            warmup_steps=2,
            plateau_every=3,
            eval_batches=2,
        ),
        finetune=FinetuneConfig(
            task="demo",
            target_length=128,
            fstride=16,
            tstride=16,
            lr=1e-3,
            batch_size=8,
            epochs=1,
            max_steps=6,
            lr_decay_start=1,
            freqm=12,
            timem=24,
            noise=True,
        ),
    )


def _study() -> ExperimentConfig:
    """The real-data ablation study (``python -m ablations.study``, docs/results/README.md): SSAMBA-tiny
    pretrained on the union of the training splits of FSDD, ESC-10 and Speech Commands, then fine-tuned on
    each. Sized so that the four ablations x 3 seeds, with the from-scratch arm, take under an hour on one
    machine of 8 GPUs at half a GPU per trial: about 4.2 GPU-hours, worked out from one trial timed on an H100
    (``python -m ablations.study --pilot``, docs/results/pilot.md)."""
    return ExperimentConfig(
        name="study",
        model=model_preset("tiny"),  # the paper's smallest SSAMBA: D 192, depth 24
        data=DataConfig(stats_from_manifest=True),
        # 2.56 s windows (8 x 16 = 128 patches): most clips are about 1 s (FSDD, Speech Commands), ESC-10's 5 s
        # are cropped; 2,000 steps of 64 clips are about 50 passes over the ~2,450 training clips of the union
        pretrain=PretrainConfig(
            target_length=256,
            mask_count=100,  # 400 of 512 patches, scaled to 128
            lr=2.5e-4,
            batch_size=64,
            epochs=1000,
            max_steps=2000,
            warmup_steps=200,
            plateau_every=250,
        ),
        # the budget every task keeps (a recipe brings its task settings: clip length, loss, augmentation, ...)
        finetune=FinetuneConfig(
            task="fsdd",
            fold=0,
            fstride=10,
            tstride=10,
            lr=2.5e-4,
            batch_size=32,
            epochs=20,
            lr_decay_start=5,
            lr_decay_step=1,
            lr_decay=0.85,
        ),
    )


@dataclass(frozen=True)
class Preset:
    """A named starting point: ``build()`` gives its config; the rest says how a sweep uses it."""

    name: str
    build: Callable[[], ExperimentConfig]
    seeds: tuple[int, ...]  # a sweep's seeds when --seeds is not given
    default_tasks: tuple[str, ...]  # fine-tuned when --tasks is not given (empty: the user must name them)
    real_data: bool  # pretrains and fine-tunes on manifests of real audio (none built in)
    recipe_budget: bool  # a task named in TASK_RECIPES gets its whole recipe; else its task keys only
    scratch: bool = False  # a sweep adds the no-pretraining arm (same fine-tuning and seeds) unless told not to

    @property
    def config(self) -> ExperimentConfig:
        return self.build()

    def recipe(self, task: str) -> tuple[dict, dict]:
        """The recipe of ``task`` under this preset, as ``(applied, kept)``: the ``finetune.*`` overrides that
        apply, and the recipe's budget keys left at the preset's values (empty with ``recipe_budget``).
        A task without a recipe gets ``({}, {})``."""
        recipe = TASK_RECIPES.get(task, {})
        if self.recipe_budget:
            return dict(recipe), {}
        applied = {k: v for k, v in recipe.items() if k not in RECIPE_BUDGET_KEYS}
        kept = {k: v for k, v in recipe.items() if k in RECIPE_BUDGET_KEYS}
        return applied, kept


_ALL = [
    Preset("demo", _demo, seeds=(0,), default_tasks=("demo",), real_data=False, recipe_budget=False),
    Preset("smoke", _smoke, seeds=(0,), default_tasks=("demo",), real_data=False, recipe_budget=False),
    *(
        Preset(
            f"paper-{size}",
            (lambda size=size: _paper(size)),
            seeds=(0, 1, 2),
            default_tasks=(),
            real_data=True,
            recipe_budget=True,
            scratch=True,
        )
        for size in ("tiny", "small", "base")
    ),
    Preset("study", _study, seeds=(0, 1, 2), default_tasks=(), real_data=True, recipe_budget=False, scratch=True),
]
PRESET_OBJECTS: dict[str, Preset] = {p.name: p for p in _ALL}
PRESETS = tuple(PRESET_OBJECTS)


def get_preset(name: str) -> Preset:
    if name not in PRESET_OBJECTS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESET_OBJECTS[name]


def preset(name: str) -> ExperimentConfig:
    """The named experiment config (see module docstring)."""
    return get_preset(name).config


def default_seeds(name: str) -> list[int]:
    return list(get_preset(name).seeds)


__all__ = [
    "PRESETS",
    "PRESET_OBJECTS",
    "Preset",
    "RECIPE_BUDGET_KEYS",
    "TASK_RECIPES",
    "default_seeds",
    "get_preset",
    "preset",
]

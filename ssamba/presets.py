"""Named experiment presets: ``demo`` (embedded default), ``smoke`` (CI), ``paper-{tiny,small,base}``.

The paper presets are SPEC.md sections 4-5 (pretraining on 128 x 1024 at stride 16, 400 masked
patches; fine-tuning with the ESC-50 recipe) and need manifests of real data (``--manifest``,
``--set finetune.manifest=...``). ``demo`` and ``smoke`` are small models on the demo corpus,
with the mask count scaled to the same fraction of patches as the paper (400 / 512).
"""

from __future__ import annotations

from ssamba.config import (AugmentConfig, DataConfig, ExperimentConfig, FinetuneConfig, FrontendConfig,
                           PretrainConfig, model_preset)
from ssamba.errors import ConfigError

PRESETS = ("demo", "smoke", "paper-tiny", "paper-small", "paper-base")


def _paper(size: str) -> ExperimentConfig:
    return ExperimentConfig(
        name=f"paper-{size}",
        frontend=FrontendConfig(target_length=1024),
        model=model_preset(size),
        data=DataConfig(stats_from_manifest=True),
        pretrain=PretrainConfig(),
        finetune=FinetuneConfig(task="esc50", fold=1),
    )


def _demo() -> ExperimentConfig:
    return ExperimentConfig(
        name="demo",
        model=model_preset("demo"),
        pretrain=PretrainConfig(target_length=128, mask_count=50, lr=1e-3, batch_size=32, epochs=100,
                                max_steps=120, warmup_steps=20, plateau_every=40, eval_batches=4),
        finetune=FinetuneConfig(task="demo", target_length=128, fstride=16, tstride=16, lr=5e-4, batch_size=32,
                                epochs=8, lr_decay_start=4, freqm=12, timem=24, noise=True),
    )


def _smoke() -> ExperimentConfig:
    return ExperimentConfig(
        name="smoke",
        model=model_preset("test"),
        pretrain=PretrainConfig(target_length=128, mask_count=50, lr=1e-3, batch_size=8, epochs=100,
                                max_steps=6, warmup_steps=2, plateau_every=3, eval_batches=2),
        finetune=FinetuneConfig(task="demo", target_length=128, fstride=16, tstride=16, lr=1e-3, batch_size=8,
                                epochs=1, max_steps=6, lr_decay_start=1, freqm=12, timem=24, noise=True),
        augment=AugmentConfig(),
    )


def preset(name: str) -> ExperimentConfig:
    """The named experiment config (see module docstring)."""
    if name == "demo":
        return _demo()
    if name == "smoke":
        return _smoke()
    if name.startswith("paper-") and name[6:] in ("tiny", "small", "base"):
        return _paper(name[6:])
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def requires_real_data(cfg: ExperimentConfig) -> bool:
    return cfg.name.startswith("paper-")


__all__ = ["PRESETS", "preset", "requires_real_data"]

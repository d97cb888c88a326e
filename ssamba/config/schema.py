"""Frozen config dataclasses, flat dotted keys, and the one ``--set a.b=c`` override syntax.

Every setting has one dotted name (``frontend.num_mel_bins``); the same name is the CLI override
key, the sweep search-space key, the MLflow param and the summary-table column.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

from ssamba.base.errors import ConfigError

# Bumped whenever the feature computation changes in a way the parameters below do not capture.
FBANK_CODE_VERSION = 1


# The choices of the settings that take a name (each list spelled here once; CLIs and modules import it).
SCAN_BACKENDS = ("auto", "reference", "cuda")
MASK_STRATEGIES = ("cluster", "random", "frame")
POOLINGS = ("mean", "cls", "per_second")  # official ft_avgtok, ft_cls, ft_avgtok_1sec (docs/model.md section 5.1)
PER_SECOND_CHUNKS = 60  # per_second pooling: the token sequence cut into this many chunks


def grid_shape(input_fdim: int, input_tdim: int, patch: int, fstride: int, tstride: int) -> tuple[int, int]:
    """Patch grid ``(F', T')`` of a ``(T, F)`` spectrogram: ``((F - p) // fstride + 1, (T - p) // tstride + 1)``."""
    if input_fdim < patch or input_tdim < patch:
        raise ValueError(f"input {input_fdim} mel bins x {input_tdim} frames is smaller than one {patch}x{patch} patch")
    return (input_fdim - patch) // fstride + 1, (input_tdim - patch) // tstride + 1


def max_mask_count(strategy: str, n_patches: int) -> int:
    """The most patches ``strategy`` can mask of ``n_patches``: cluster masks never use patch 0 and need more
    than ``count`` candidates (``n - 2``); random and frame masks can take every patch (``n``)."""
    return n_patches - 2 if strategy == "cluster" else n_patches


@dataclass(frozen=True)
class FrontendConfig:
    """Waveform -> log-mel filterbank, exactly the official call (docs/model.md section 1.2).

    Every field decides the cached fbank (``fbank_key``). How a stage reads its clips (length,
    normalisation statistics, augmentation) is that stage's own setting (``pretrain.*``, ``finetune.*``;
    :class:`ClipInput`), applied when a clip is read, so it never invalidates the feature cache.
    """

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    window_type: str = "hanning"
    dither: float = 0.0
    htk_compat: bool = True
    use_energy: bool = False
    downmix: str = "mean"  # "mean" of channels (this project) or "first" (the official loader)
    resample_filter_width: int = 6  # torchaudio sinc resampling: lowpass_filter_width
    resample_rolloff: float = 0.99

    CACHE_FIELDS = (
        "sample_rate",
        "num_mel_bins",
        "frame_length_ms",
        "frame_shift_ms",
        "window_type",
        "dither",
        "htk_compat",
        "use_energy",
        "downmix",
        "resample_filter_width",
        "resample_rolloff",
    )

    def __post_init__(self):
        if self.downmix not in ("mean", "first"):
            raise ConfigError(f"frontend.downmix must be 'mean' or 'first', got {self.downmix!r}")
        if self.dither != 0.0:
            # dither makes features random: they cannot be cached, and the official recipe uses 0
            raise ConfigError(f"frontend.dither must be 0.0 (official recipe; cached features), got {self.dither}")

    def fbank_key(self) -> str:
        """Hash of every parameter that changes the cached (un-padded, un-normalised) fbank."""
        payload = {k: getattr(self, k) for k in self.CACHE_FIELDS}
        payload["code_version"] = FBANK_CODE_VERSION
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# AudioSet statistics of the official fbank: the pretraining default (docs/model.md section 1.3)
AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974


@dataclass(frozen=True)
class ClipInput:
    """How one stage reads its clips: the length they are padded or cropped to, the normalisation
    statistics, and the training-only augmentations (docs/model.md sections 1.3-1.4).

    Not a config section: each stage's section holds these values once (``pretrain.target_length``,
    ``finetune.mean``, ...) and gives them as one object (``PretrainConfig.clip_input()``,
    ``FinetuneConfig.clip_input()``); ``stage`` names that section in error messages."""

    target_length: int = 1024
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD
    freqm: int = 0  # SpecAugment frequency mask width upper bound (bins)
    timem: int = 0  # SpecAugment time mask width upper bound (frames)
    mixup: float = 0.0  # probability of waveform mixup, lambda ~ Beta(10, 10)
    noise: bool = False  # add rand(T,F) * U(0,1) / 10, then roll time by U{-10..9}
    stage: str = "input"

    def __post_init__(self):
        s = self.stage
        if self.target_length < 16:
            raise ConfigError(f"{s}.target_length must be >= 16 frames (one patch), got {self.target_length}")
        if self.std <= 0:
            raise ConfigError(f"{s}.std must be > 0, got {self.std}. Fix: run `python -m ssamba.data stats`.")
        if self.freqm < 0 or self.timem < 0:
            raise ConfigError(f"{s}.freqm/timem must be >= 0, got {self.freqm}/{self.timem}")
        if not 0.0 <= self.mixup <= 1.0:
            raise ConfigError(f"{s}.mixup is a probability in [0, 1], got {self.mixup}")

    def for_evaluation(self) -> ClipInput:
        """The same length and statistics, no augmentation."""
        return replace(self, freqm=0, timem=0, mixup=0.0, noise=False)


def _clip_input(section: Any, stage: str) -> ClipInput:
    return ClipInput(
        target_length=section.target_length,
        mean=section.mean,
        std=section.std,
        freqm=section.freqm,
        timem=section.timem,
        mixup=section.mixup,
        noise=section.noise,
        stage=stage,
    )


SIZES = {"tiny": 192, "small": 384, "base": 768}
SSAST_HEADS = {"tiny": 3, "small": 6, "base": 12}


@dataclass(frozen=True)
class ModelConfig:
    """The encoder (docs/model.md sections 2-3, 7). Every ablation switch is one field.

    ``arch`` ``ssamba`` (Mamba) or ``ssast`` (ViT baseline). Defaults are SSAMBA-tiny as the
    official recipes build it (LayerNorm, bidirectional v2 mixer, layer pairing, final norm twice).
    """

    arch: str = "ssamba"
    embed_dim: int = 192
    depth: int = 24
    patch_size: int = 16
    fstride: int = 16
    tstride: int = 16
    # Mamba mixer
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0: ceil(embed_dim / 16)
    bimamba: bool = True  # v2 mixer: a backward scan with its own parameters inside each block
    divide_out: bool = True  # (y_f + y_b) / 2 (official if_devide_out)
    layer_pairing: bool = True  # official if_bidirectional: layer 2i+1 sees the flipped sequence
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    fused_add_norm: bool = True  # add + norm in one Triton kernel (CUDA backend, mamba-ssm present); same math
    residual_in_fp32: bool = False
    final_norm_twice: bool = True  # the official forward applies norm_f twice (checkpoint parity)
    drop_path: float = 0.1
    scan_backend: str = "auto"  # auto | reference | cuda
    # SSAST baseline
    num_heads: int = 3
    mlp_ratio: float = 4.0
    attention: str = "fused"  # fused (scaled_dot_product_attention) | materialized
    # fine-tuning head
    pooling: str = "mean"  # mean of patch tokens (ft_avgtok) | cls (ft_cls) | per_second (ft_avgtok_1sec)

    def __post_init__(self):
        checks = [
            (self.arch in ("ssamba", "ssast"), f"model.arch must be 'ssamba' or 'ssast', got {self.arch!r}"),
            (self.norm in ("layernorm", "rmsnorm"), f"model.norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}"),
            (
                self.scan_backend in SCAN_BACKENDS,
                f"model.scan_backend must be one of {', '.join(SCAN_BACKENDS)}, got {self.scan_backend!r}",
            ),
            (
                self.attention in ("fused", "materialized"),
                f"model.attention must be 'fused' or 'materialized', got {self.attention!r}",
            ),
            (
                self.pooling in POOLINGS,
                f"model.pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}",
            ),
            (
                not (self.layer_pairing and self.arch == "ssamba" and self.depth % 2),
                f"model.layer_pairing needs an even model.depth, got {self.depth}",
            ),
            (self.embed_dim > 0 and self.depth > 0, "model.embed_dim and model.depth must be positive"),
            (
                self.arch != "ssast" or self.embed_dim % self.num_heads == 0,
                f"model.embed_dim {self.embed_dim} must be divisible by model.num_heads {self.num_heads}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank or -(-self.embed_dim // 16)


def model_preset(name: str, arch: str = "ssamba") -> ModelConfig:
    """``tiny`` / ``small`` / ``base`` (docs/model.md section 3 sizes) or the CPU presets ``demo`` / ``test``."""
    if name in SIZES:
        d = SIZES[name]
        if arch == "ssast":
            return ModelConfig(arch="ssast", embed_dim=d, depth=12, num_heads=SSAST_HEADS[name], drop_path=0.0)
        return ModelConfig(embed_dim=d)
    if name == "demo":
        return ModelConfig(arch=arch, embed_dim=64, depth=4, num_heads=4)
    if name == "test":
        return ModelConfig(arch=arch, embed_dim=32, depth=2, num_heads=2, d_state=8)
    raise ConfigError(f"unknown model preset {name!r}; choose tiny, small, base, demo or test")


# Loader processes per GPU worker when data.num_workers is auto (-1): enough to keep the GPU busy at the
# pretraining geometry (python -m ssamba.bench --pretrain; README "GPU training").
GPU_LOADER_WORKERS = 4


@dataclass(frozen=True)
class DataConfig:
    """Where pretraining clips come from and how they are read. ``manifest=""`` is the demo corpus."""

    manifest: str = ""
    train_split: str = "train"  # "" = every row
    eval_split: str = "validation"
    use_cache: bool = True  # precompute fbanks once (FeatureCache)
    cache_dir: str = ""  # "" = $SSAMBA_CACHE/features
    num_workers: int = -1  # DataLoader processes; -1 = auto: 0 on CPU, GPU_LOADER_WORKERS per GPU worker
    strict: bool = False  # fail at the first bad clip instead of skipping it
    stats_from_manifest: bool = True  # use mean/std stored in the manifest when present

    def __post_init__(self):
        if self.num_workers < -1:
            raise ConfigError(
                f"data.num_workers must be >= 0, or -1 for auto (0 on CPU, {GPU_LOADER_WORKERS} "
                f"per GPU worker); got {self.num_workers}"
            )

    def resolved_num_workers(self, device_type: str) -> int:
        """Loader processes on a ``device_type`` ('cpu' or 'cuda') worker: the setting, or auto's choice."""
        if self.num_workers >= 0:
            return self.num_workers
        return GPU_LOADER_WORKERS if device_type == "cuda" else 0


@dataclass(frozen=True)
class PretrainConfig:
    """MSPM pretraining (docs/model.md section 4); defaults are the official recipe."""

    target_length: int = 1024
    mean: float = AUDIOSET_MEAN  # normalisation statistics; the manifest's win when data.stats_from_manifest
    std: float = AUDIOSET_STD
    freqm: int = 0  # training-only augmentations (official pretraining: none)
    timem: int = 0
    mixup: float = 0.0
    noise: bool = False
    mask_count: int = 400
    mask_strategy: str = "cluster"  # cluster | random | frame
    passes: int = 2  # 2: independent masks for the InfoNCE and MSE passes (official); 1: one shared pass
    mse_weight: float = 10.0
    lr: float = 1e-4
    weight_decay: float = 5e-8
    beta1: float = 0.95
    beta2: float = 0.999
    batch_size: int = 64
    epochs: int = 10
    max_steps: int = 0  # > 0 stops after this many optimiser steps
    warmup_steps: int = 1000
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    grad_accum: int = 1
    clip_grad: float = 0.0  # 0 = off
    amp: bool = True  # bf16 autocast on CUDA (scan in fp32); ignored on CPU
    plateau_every: int = 4000  # steps between evaluations; ReduceLROnPlateau steps on their masked accuracy
    eval_batches: int = 0  # 0 = the whole validation split

    def __post_init__(self):
        self.clip_input()  # validates length, statistics and augmentations
        if self.mask_strategy not in MASK_STRATEGIES:
            raise ConfigError(
                f"pretrain.mask_strategy must be one of {', '.join(MASK_STRATEGIES)}, got {self.mask_strategy!r}"
            )
        if self.passes not in (1, 2):
            raise ConfigError(f"pretrain.passes must be 1 or 2, got {self.passes}")
        if self.mask_count <= 0:
            raise ConfigError(f"pretrain.mask_count must be > 0, got {self.mask_count}")

    def clip_input(self) -> ClipInput:
        return _clip_input(self, "pretrain")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning on one labelled task (docs/model.md section 5); defaults are the ESC-50 recipe."""

    task: str = "demo"
    manifest: str = ""  # "" = the demo corpus
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    fold: int = 0  # > 0: cross-validation, this fold is evaluated and the others train
    target_length: int = 512
    fstride: int = 10
    tstride: int = 10
    loss: str = "ce"  # ce | bce
    metric: str = "acc"  # acc | map
    lr: float = 1e-4
    head_lr: float = 1.0  # the head's lr is lr * head_lr
    weight_decay: float = 5e-7
    beta1: float = 0.95
    beta2: float = 0.999
    batch_size: int = 48
    epochs: int = 50
    max_steps: int = 0
    warmup_steps: int = 0
    lr_decay_start: int = 6
    lr_decay_step: int = 1
    lr_decay: float = 0.85
    grad_accum: int = 1
    clip_grad: float = 0.0
    amp: bool = True
    freqm: int = 24
    timem: int = 96
    mixup: float = 0.0
    noise: bool = True
    mean: float = -6.6268077  # dataset statistics (ESC-50); the manifest's win when data.stats_from_manifest
    std: float = 5.358466

    def __post_init__(self):
        self.clip_input()
        if self.loss not in ("ce", "bce"):
            raise ConfigError(f"finetune.loss must be 'ce' or 'bce', got {self.loss!r}")
        if self.metric not in ("acc", "map"):
            raise ConfigError(f"finetune.metric must be 'acc' or 'map', got {self.metric!r}")

    def clip_input(self) -> ClipInput:
        return _clip_input(self, "finetune")


@dataclass(frozen=True)
class ExperimentConfig:
    """One run: front end, model, pretraining data and recipe, fine-tuning recipe, seed."""

    name: str = "demo"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    frontend: FrontendConfig = FrontendConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    def check_pretraining(self) -> None:
        """The pretraining settings against each other: the mask count against the patch grid it masks.
        The sweep driver calls it for every trial before Ray starts, and ``run_pretrain`` before it trains
        (not at construction: a fine-tuning-only config need not make a valid pretraining)."""
        m, p = self.model, self.pretrain
        try:
            f, t = grid_shape(self.frontend.num_mel_bins, p.target_length, m.patch_size, m.fstride, m.tstride)
        except ValueError as exc:
            raise ConfigError(f"pretrain.target_length {p.target_length}: {exc}") from None
        n = f * t
        if p.mask_count > max_mask_count(p.mask_strategy, n):
            raise ConfigError(
                f"pretrain.mask_count {p.mask_count} is too large for {n} patches (grid {f} x {t}, strategy "
                f"{p.mask_strategy}); it must be at most {max_mask_count(p.mask_strategy, n)}. Lower it or "
                f"lengthen pretrain.target_length"
            )


# ------------------------------------------------------------------------------ dotted keys
def to_flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dataclasses into ``{"section.field": value}``."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(v):
            out.update(to_flat(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def from_flat(cls: type, flat: dict[str, Any]) -> Any:
    """Inverse of :func:`to_flat` (unknown keys are an error naming the nearest valid key)."""
    return apply_overrides(cls(), flat)


def parse_value(text: str, typ: Any, key: str) -> Any:
    """Parse a command-line string into the field's type (bools accept true/false/1/0/yes/no)."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        non_none = [a for a in args if a is not type(None)]
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        return parse_value(text, non_none[0], key)
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} expects a boolean (true/false), got {text!r}")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key} expects an integer, got {text!r}") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key} expects a number, got {text!r}") from None
    if origin in (tuple, list):
        inner = args[0] if args else str
        parts = [p for p in text.strip("()[]").split(",") if p.strip()]
        return tuple(parse_value(p.strip(), inner, key) for p in parts)
    return text


def _coerce(value: Any, typ: Any, key: str) -> Any:
    if isinstance(value, str) and typ is not str:
        return parse_value(value, typ, key)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(typ) in (tuple,) and isinstance(value, list):
        return tuple(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if typ in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key} expects a number, got {value!r}")
    if typ in (int, float, bool, str) and not isinstance(value, typ):
        raise ConfigError(f"{key} expects {typ.__name__}, got {value!r} ({type(value).__name__})")
    return value


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of ``cfg`` with dotted-key overrides applied, type-checked.

    Values may be typed or strings (from ``--set``). An unknown key raises :class:`ConfigError`
    naming the closest valid key.
    """
    valid = list(to_flat(cfg))
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}.{hint} Valid keys: {', '.join(valid[:8])}, ...")
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    hints = typing.get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    for name, value in direct.items():
        changes[name] = _coerce(value, hints[name], name)
    for head, sub in nested.items():
        changes[head] = apply_overrides(getattr(cfg, head), sub)
    try:
        return replace(cfg, **changes)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def parse_set_args(items: list[str] | None) -> dict[str, str]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}``; a malformed item is an error."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value (e.g. --set model.depth=4), got {item!r}")
        out[key.strip()] = value.strip()
    return out


__all__ = [
    "FrontendConfig",
    "ClipInput",
    "ModelConfig",
    "model_preset",
    "DataConfig",
    "PretrainConfig",
    "FinetuneConfig",
    "ExperimentConfig",
    "to_flat",
    "from_flat",
    "apply_overrides",
    "parse_set_args",
    "parse_value",
]

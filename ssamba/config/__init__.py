"""Settings: the frozen config schema, presets, and the command-line parsing shared by the entry points.

The schema's public names are importable from here (``from ssamba.config import ExperimentConfig``).
"""

from ssamba.config.schema import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    FBANK_CODE_VERSION,
    GPU_LOADER_WORKERS,
    MASK_STRATEGIES,
    SCAN_BACKENDS,
    SIZES,
    SSAST_HEADS,
    ClipInput,
    DataConfig,
    ExperimentConfig,
    FinetuneConfig,
    FrontendConfig,
    ModelConfig,
    PretrainConfig,
    apply_overrides,
    from_flat,
    grid_shape,
    max_mask_count,
    model_preset,
    parse_set_args,
    parse_value,
    to_flat,
)

__all__ = [
    "AUDIOSET_MEAN", "AUDIOSET_STD",
    "FBANK_CODE_VERSION", "GPU_LOADER_WORKERS", "MASK_STRATEGIES", "SCAN_BACKENDS", "SIZES", "SSAST_HEADS",
    "ClipInput", "DataConfig", "ExperimentConfig", "FinetuneConfig", "FrontendConfig", "ModelConfig",
    "PretrainConfig", "apply_overrides", "from_flat", "grid_shape", "max_mask_count", "model_preset",
    "parse_set_args", "parse_value", "to_flat",
]

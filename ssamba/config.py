"""Frozen config dataclasses, flat dotted keys, and the one ``--set a.b=c`` override syntax.

Every setting has one dotted name (``frontend.num_mel_bins``); the same name is the CLI override
key, the sweep search-space key, the MLflow param and the summary-table column.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

from ssamba.errors import ConfigError

# Bumped whenever the feature computation changes in a way the parameters below do not capture.
FBANK_CODE_VERSION = 1


@dataclass(frozen=True)
class FrontendConfig:
    """Waveform -> log-mel filterbank, exactly the official call (SPEC.md section 1).

    The first group of fields decides the cached fbank (``fbank_key``); ``target_length`` and
    the normalisation statistics are applied when a clip is read, so changing them never
    invalidates the feature cache.
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
    # applied on read (not part of the cache key)
    target_length: int = 1024
    mean: float = -4.2677393  # AudioSet / pretraining statistics (SPEC.md section 1)
    std: float = 4.5689974

    CACHE_FIELDS = (
        "sample_rate", "num_mel_bins", "frame_length_ms", "frame_shift_ms", "window_type",
        "dither", "htk_compat", "use_energy", "downmix", "resample_filter_width", "resample_rolloff",
    )

    def __post_init__(self):
        if self.downmix not in ("mean", "first"):
            raise ConfigError(f"frontend.downmix must be 'mean' or 'first', got {self.downmix!r}")
        if self.std <= 0:
            raise ConfigError(f"frontend.std must be > 0, got {self.std}. Fix: run `python -m ssamba.data stats`.")
        if self.target_length < 16:
            raise ConfigError(f"frontend.target_length must be >= 16 frames (one patch), got {self.target_length}")
        if self.dither != 0.0:
            # dither makes features random: they cannot be cached, and the official recipe uses 0
            raise ConfigError(f"frontend.dither must be 0.0 (official recipe; cached features), got {self.dither}")

    def fbank_key(self) -> str:
        """Hash of every parameter that changes the cached (un-padded, un-normalised) fbank."""
        payload = {k: getattr(self, k) for k in self.CACHE_FIELDS}
        payload["code_version"] = FBANK_CODE_VERSION
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AugmentConfig:
    """Training-only augmentations (SPEC.md section 1); all off by default."""

    freqm: int = 0  # SpecAugment frequency mask width upper bound (bins)
    timem: int = 0  # SpecAugment time mask width upper bound (frames)
    mixup: float = 0.0  # probability of waveform mixup, lambda ~ Beta(10, 10)
    noise: bool = False  # add rand(T,F) * U(0,1) / 10, then roll time by U{-10..9}

    def __post_init__(self):
        if self.freqm < 0 or self.timem < 0:
            raise ConfigError(f"augment.freqm/timem must be >= 0, got {self.freqm}/{self.timem}")
        if not 0.0 <= self.mixup <= 1.0:
            raise ConfigError(f"augment.mixup is a probability in [0, 1], got {self.mixup}")


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
    "FrontendConfig", "AugmentConfig", "to_flat", "from_flat", "apply_overrides", "parse_set_args",
    "parse_value",
]

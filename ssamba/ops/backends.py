"""Optional CUDA fast path: mamba-ssm's selective scan and causal-conv1d, same signatures as scan.py.

Imports of the extensions are lazy and guarded: ``import mamba_ssm`` fails outright without its
compiled extension, so nothing here is imported at package import time. Build the kernels on a
GPU machine with ``python -m ssamba.kernels build``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch

from ssamba.base.errors import ConfigError
from ssamba.config import SCAN_BACKENDS
from ssamba.ops.scan import causal_conv1d_ref, selective_scan_ref

BUILD_HINT = (
    "Build them on the GPU machine with `python -m ssamba.kernels build` (mamba-ssm and causal-conv1d "
    "from their source distributions, for the local GPU architecture), or use model.scan_backend=reference."
)


@functools.lru_cache(maxsize=1)
def mamba_scan() -> Callable | None:
    """mamba-ssm's ``selective_scan_fn``, or None without CUDA or an importable build."""
    if not torch.cuda.is_available():
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or OSError / undefined symbol from a mismatched build
        return None
    return selective_scan_fn


@functools.lru_cache(maxsize=1)
def mamba_conv() -> Callable | None:
    """causal-conv1d's ``causal_conv1d_fn``, or None without CUDA or an importable build."""
    if not torch.cuda.is_available():
        return None
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


@functools.lru_cache(maxsize=1)
def _triton_add_norm() -> Callable | None:
    if not torch.cuda.is_available():
        return None
    try:
        from mamba_ssm.ops.triton.layer_norm import layer_norm_fn
    except Exception:
        return None
    return layer_norm_fn


def add_norm_fn() -> Callable | None:
    """mamba-ssm's fused residual-add + LayerNorm/RMSNorm (Triton), or ``None`` where it is unavailable."""
    return _triton_add_norm()


@functools.lru_cache(maxsize=1)
def combine_gate_fn() -> Callable | None:
    """The fused direction-sum + gate of the fast mixer (Triton, inference), or ``None`` without CUDA/Triton."""
    if not torch.cuda.is_available():
        return None
    try:
        from ssamba.ops.triton_ops import combine_gate
    except Exception:
        return None
    return combine_gate


@functools.lru_cache(maxsize=1)
def combine_gate_train_fn() -> Callable | None:
    """The fused direction-sum + gate with its backward (Triton, training), or ``None`` without CUDA/Triton."""
    if not torch.cuda.is_available():
        return None
    try:
        from ssamba.ops.triton_ops import combine_gate_train
    except Exception:
        return None
    return combine_gate_train


_warned = False


def resolve_backend(name: str) -> str:
    """``auto`` -> ``cuda`` when the kernels import on a CUDA machine, else ``reference`` (said once)."""
    global _warned
    if name == "reference":
        return "reference"
    if name == "cuda":
        if mamba_scan() is None:
            why = "no CUDA device" if not torch.cuda.is_available() else "mamba_ssm cannot be imported"
            raise ConfigError(
                f"model.scan_backend='cuda' but the mamba-ssm kernels are unavailable ({why}). {BUILD_HINT}"
            )
        return "cuda"
    if name == "auto":
        if mamba_scan() is not None:
            return "cuda"
        if torch.cuda.is_available() and not _warned:
            warnings.warn(f"mamba-ssm kernels not found: using the pure-PyTorch scan (slow on GPU). {BUILD_HINT}")
            _warned = True
        return "reference"
    raise ConfigError(f"model.scan_backend must be one of {', '.join(SCAN_BACKENDS)}, got {name!r}")


def scan_fn(backend: str) -> Callable:
    """The selective scan of a resolved backend (``selective_scan_fn`` signature)."""
    return mamba_scan() if backend == "cuda" else selective_scan_ref


def conv_fn(backend: str) -> Callable:
    """The causal depthwise conv of a resolved backend (``causal_conv1d_fn`` signature).

    On the CUDA backend without causal-conv1d, the reference conv (cuDNN) computes the same thing.
    """
    if backend == "cuda" and mamba_conv() is not None:
        return padded_cuda_conv
    return causal_conv1d_ref


CONV_LEN_MULTIPLE = 8


def padded_cuda_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """causal-conv1d on a length padded at the end to a multiple of 8, then cut back (exact: the conv is causal).

    causal-conv1d 1.7.0's backward returns wrong ``dx``/``dweight`` (relative error 0.01-0.4) when the
    length is not a multiple of 8 and exceeds one chunk (measured on an H200: fp32 L = 513, 1025, 2049;
    bf16 L = 1025, 1028, 2049, 4100; every multiple of 8 tried was right). The forward is right.
    """
    length = x.shape[-1]
    extra = -length % CONV_LEN_MULTIPLE
    if extra == 0:
        return mamba_conv()(x, weight, bias, activation=activation)
    out = mamba_conv()(torch.nn.functional.pad(x, (0, extra)), weight, bias, activation=activation)
    return out[..., :length]

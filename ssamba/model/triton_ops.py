"""Triton kernels of the fast mixer path (inference only; the training path uses the same math in torch ops).

Imported lazily (only on CUDA, through :func:`ssamba.model.kernels.combine_gate_fn`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_gate_kernel(y_ptr, z_ptr, out_ptr, L, Lp, d, rows, dir_stride, batch_stride, z_stride, out_stride,
                         REV0: tl.constexpr, REV1: tl.constexpr, TWO: tl.constexpr, scale,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0)  # one (batch, channel) row of z / out
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = t < L
    base = (row // d).to(tl.int64) * batch_stride + (row % d).to(tl.int64) * Lp
    t0 = L - 1 - t if REV0 else t
    acc = tl.load(y_ptr + base + t0, mask=ok, other=0.0).to(tl.float32)
    if TWO:
        t1 = L - 1 - t if REV1 else t
        acc += tl.load(y_ptr + base + dir_stride + t1, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row.to(tl.int64) * z_stride + t, mask=ok, other=0.0).to(tl.float32)
    out = acc * scale * z * tl.sigmoid(z)
    tl.store(out_ptr + row.to(tl.int64) * out_stride + t, out.to(out_ptr.dtype.element_ty), mask=ok)


def combine_gate(y: torch.Tensor, z: torch.Tensor, length: int, revs: list[bool], scale: float,
                 out_stride: int | None = None) -> torch.Tensor:
    """``out[b, c, t] = scale * SiLU(z[b, c, t]) * sum_i y[b, i, c, t_i]`` with ``t_i = L-1-t`` for a
    reversed direction. ``y: (B, G, d, Lp)`` contiguous, ``z: (B, d, L)`` with contiguous rows (any row
    stride) -> ``(B, d, L)`` in z's dtype, whose rows are ``out_stride`` elements apart (default ``L``;
    a multiple of 8 keeps them 16-byte aligned for the next matmul)."""
    b, g, d, lp = y.shape
    y = y.contiguous()
    if z.stride(2) != 1 or z.stride(0) != d * z.stride(1):
        z = z.contiguous()
    stride = length if out_stride is None else out_stride
    if stride < length:
        raise ValueError(f"out_stride {stride} is shorter than the length {length}")
    out = torch.empty((b, d, stride), dtype=z.dtype, device=z.device)[..., :length]
    rows = b * d
    block = 1024
    grid = (rows, triton.cdiv(length, block))
    _combine_gate_kernel[grid](y, z, out, length, lp, d, rows, d * lp, g * d * lp, z.stride(1), stride,
                               REV0=bool(revs[0]),
                               REV1=bool(revs[1]) if g > 1 else False, TWO=g > 1, scale=float(scale), BLOCK=block)
    return out

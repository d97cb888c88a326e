"""Triton kernels of the fast mixer path: the direction sum + gate, forward (inference) and with its
backward (training, :func:`combine_gate_train`).

Imported lazily (only on CUDA, through :func:`ssamba.ops.backends.combine_gate_fn`). The kernels also run
under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which is how the CPU tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_gate_kernel(
    y_ptr,
    z_ptr,
    out_ptr,
    L,
    Lp,
    d,
    rows,
    dir_stride,
    batch_stride,
    z_stride,
    out_stride,
    REV0: tl.constexpr,
    REV1: tl.constexpr,
    TWO: tl.constexpr,
    scale,
    BLOCK: tl.constexpr,
):
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


def combine_gate(
    y: torch.Tensor, z: torch.Tensor, length: int, revs: list[bool], scale: float, out_stride: int | None = None
) -> torch.Tensor:
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
    _combine_gate_kernel[grid](
        y,
        z,
        out,
        length,
        lp,
        d,
        rows,
        d * lp,
        g * d * lp,
        z.stride(1),
        stride,
        REV0=bool(revs[0]),
        REV1=bool(revs[1]) if g > 1 else False,
        TWO=g > 1,
        scale=float(scale),
        BLOCK=block,
    )
    return out


@triton.jit
def _combine_gate_bwd_kernel(
    y_ptr,
    z_ptr,
    dout_ptr,
    dy_ptr,
    dz_ptr,
    L,
    Lp,
    d,
    dir_stride,
    batch_stride,
    z_stride,
    dout_bstride,
    dout_cstride,
    dout_tstride,
    REV0: tl.constexpr,
    REV1: tl.constexpr,
    TWO: tl.constexpr,
    scale,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # one (batch, channel) row
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # over [0, Lp): t < L real steps, the rest padding
    real = t < L
    pad = (t >= L) & (t < Lp)
    bi = (row // d).to(tl.int64)
    ci = (row % d).to(tl.int64)
    base = bi * batch_stride + ci * Lp
    t0 = L - 1 - t if REV0 else t
    acc = tl.load(y_ptr + base + t0, mask=real, other=0.0).to(tl.float32)
    if TWO:
        t1 = L - 1 - t if REV1 else t
        acc += tl.load(y_ptr + base + dir_stride + t1, mask=real, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row.to(tl.int64) * z_stride + t, mask=real, other=0.0).to(tl.float32)
    g = (
        tl.load(dout_ptr + bi * dout_bstride + ci * dout_cstride + t * dout_tstride, mask=real, other=0.0).to(
            tl.float32
        )
        * scale
    )
    sig = tl.sigmoid(z)
    dy = g * z * sig  # d out / d y_i = scale * SiLU(z), for each direction at its own time index
    tl.store(dy_ptr + base + t0, dy.to(dy_ptr.dtype.element_ty), mask=real)
    tl.store(dy_ptr + base + t, tl.zeros_like(dy).to(dy_ptr.dtype.element_ty), mask=pad)
    if TWO:
        tl.store(dy_ptr + base + dir_stride + t1, dy.to(dy_ptr.dtype.element_ty), mask=real)
        tl.store(dy_ptr + base + dir_stride + t, tl.zeros_like(dy).to(dy_ptr.dtype.element_ty), mask=pad)
    dz = g * acc * sig * (1.0 + z * (1.0 - sig))
    tl.store(dz_ptr + row.to(tl.int64) * L + t, dz.to(dz_ptr.dtype.element_ty), mask=real)


class _CombineGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, length, revs, scale, out_stride):
        ctx.save_for_backward(y, z)
        ctx.length, ctx.revs, ctx.scale = length, tuple(revs), scale
        return combine_gate(y, z, length, revs, scale, out_stride)

    @staticmethod
    def backward(ctx, dout):
        y, z = ctx.saved_tensors
        y = y.contiguous()
        b, g, d, lp = y.shape
        length, revs = ctx.length, ctx.revs
        if z.stride(2) != 1 or z.stride(0) != d * z.stride(1):
            z = z.contiguous()
        dy = torch.empty_like(y)
        dz = torch.empty((b, d, length), dtype=z.dtype, device=z.device)
        block = 1024
        grid = (b * d, triton.cdiv(lp, block))
        _combine_gate_bwd_kernel[grid](
            y,
            z,
            dout,
            dy,
            dz,
            length,
            lp,
            d,
            d * lp,
            g * d * lp,
            z.stride(1),
            dout.stride(0),
            dout.stride(1),
            dout.stride(2),
            REV0=bool(revs[0]),
            REV1=bool(revs[1]) if g > 1 else False,
            TWO=g > 1,
            scale=float(ctx.scale),
            BLOCK=block,
        )
        return dy, dz, None, None, None, None


def combine_gate_train(
    y: torch.Tensor, z: torch.Tensor, length: int, revs: list[bool], scale: float, out_stride: int | None = None
) -> torch.Tensor:
    """:func:`combine_gate` with a backward: one Triton kernel each way instead of the flips, sum, SiLU and
    products of the torch ops (and their backward). ``dy`` is zero on the padded steps ``[L, Lp)``."""
    return _CombineGate.apply(y, z, length, list(revs), float(scale), out_stride)

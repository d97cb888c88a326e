"""Pure-PyTorch selective scan (Mamba S6) and causal depthwise conv1d.

These are the CPU / reference implementations used when the CUDA kernels of ``mamba-ssm`` and
``causal-conv1d`` are not available. They take exactly the arguments of
``mamba_ssm.ops.selective_scan_interface.selective_scan_fn`` and ``causal_conv1d.causal_conv1d_fn``
so the CUDA kernels can be swapped in without touching the calling code.

Shape legend used throughout this module::

    b  batch size
    d  number of channels ("dim", d_inner in a Mamba block)
    L  sequence length
    N  state size per channel (d_state)
    G  number of groups sharing one B / C (d % G == 0), dg = d // G
    W  convolution width

Two selective scans are provided:

* :func:`selective_scan_naive` -- a plain per-step loop under autograd. Obviously correct and slow;
  it is the specification the tests compare against.
* :func:`selective_scan_ref` -- the fast one: a custom :class:`torch.autograd.Function` whose forward
  stores the hidden states and whose backward is a hand-derived reverse-time scan. The state lives in
  a contiguous ``(L, b, G, N, dg)`` buffer (channels innermost), so each time step is one contiguous
  block updated by a single in-place ``addcmul_``, and every contraction over N or over channels is
  a batched matrix product. Time is processed in cache-sized chunks (see ``_CHUNK_BYTES``).

Math (per channel ``d`` and state ``n``; ``h_{-1} = 0``)::

    delta   = softplus(delta + delta_bias)           (bias / softplus optional)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t     = sum_n C_t[n] * h_t[n]  +  D * u_t
    out_t   = y_t * silu(z_t)                        (if z is given)

Backward (g_t = dL/dh_t, accumulated in reverse time, a_t = exp(delta_t * A))::

    g_t       = C_t * dy_t + a_{t+1} * g_{t+1}
    dB_t      = sum_d g_t * delta_t * u_t            (summed over the channels sharing B)
    dC_t      = sum_d dy_t * h_t
    du_t      = delta_t * sum_n g_t * B_t + D * dy_t
    ddelta_t  = u_t * sum_n g_t * B_t + sum_n g_t * h_{t-1} * a_t * A
    dA        = sum_{b,t} g_t * h_{t-1} * a_t * delta_t
"""

from __future__ import annotations

import math
import mmap
import threading
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_ref", "selective_scan_naive", "causal_conv1d_ref", "clear_workspace"]

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

_tls = threading.local()


def _workspace(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Scratch buffer reused across calls (CPU only, per thread); contents are garbage.

    Freshly allocated large CPU tensors are page-faulted in on first touch, which costs more than the
    arithmetic of the scan itself (~3 ms per 8 MB on a small VM). Temporaries that never leave a
    forward/backward call therefore live in these per-thread buffers. :func:`clear_workspace` frees them.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    bufs = _tls.__dict__.setdefault("bufs", {})
    n = math.prod(shape)
    key = (slot, dtype)
    buf = bufs.get(key)
    if buf is None or buf.numel() < n:
        bufs.pop(key, None)
        del buf  # release the old buffer before allocating the larger one
        buf = torch.empty(n, dtype=dtype, device=device)
        bufs[key] = buf
    return buf[:n].view(shape)


_HUGE_MIN_BYTES = 4 << 20
_CHUNK_BYTES = 2 << 20  # target size of one time chunk of a scratch buffer (fits in L2/L3)


def _alloc_state(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialised tensor for the hidden states (kept until backward, so not a workspace buffer).

    On CPU, large buffers are mapped with transparent huge pages where the OS allows it (Linux
    ``madvise``): first-touch page faults on 4 KiB pages otherwise cost more than the scan itself
    (measured ~3 ms per 8 MiB on a 2-core VM, ~1 ms with huge pages). The mapping is released when
    the tensor is freed. Anywhere else this is plain ``torch.empty``.
    """
    n = math.prod(shape)
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    if device.type == "cpu" and nbytes >= _HUGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            m.madvise(mmap.MADV_HUGEPAGE)
            return torch.frombuffer(m, dtype=dtype, count=n).view(shape)
        except (OSError, ValueError, AttributeError):
            pass
    return torch.empty(shape, dtype=dtype, device=device)


def clear_workspace() -> None:
    """Free the scratch buffers :func:`selective_scan_ref` keeps for the calling thread."""
    _tls.__dict__.pop("bufs", None)


_LOG2E = 1.0 / math.log(2.0)


def _softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)) to ~1 ulp; ~2x faster on CPU than F.softplus (whose log1p is slow there).

    max(x, 0) + log1p(e) with e = exp(-|x|), and log1p(e) = log(w) - ((w - 1) - e) / w, w = 1 + e
    (first-order correction of the rounding in 1 + e; exact also when w rounds to 1). Differs from
    F.softplus only above its threshold 20, by less than float32 resolution.
    """
    e = torch.exp(-x.abs())
    w = e + 1.0
    corr = (w - 1.0).sub_(e).div_(w)
    return torch.log(w).sub_(corr).add_(x.clamp(min=0))


def _work_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float32, or float64 when any given floating tensor is float64 (never lower than float32)."""
    dt = torch.float32
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            dt = torch.float64
    return dt


def _bc_kind(X: Tensor, name: str, b: int, d: int, N: int, L: int) -> tuple[str, int]:
    """Classify B / C: ("const", 1) for (d, N); ("var", 1) for (b, N, L); ("group", G) for (b, G, N, L)."""
    if X.dim() == 2:
        if tuple(X.shape) != (d, N):
            raise ValueError(f"{name}: time-invariant form must be (dim, N)=({d}, {N}), got {tuple(X.shape)}")
        return "const", 1
    if X.dim() == 3:
        if tuple(X.shape) != (b, N, L):
            raise ValueError(f"{name}: expected (batch, N, L)=({b}, {N}, {L}), got {tuple(X.shape)}")
        return "var", 1
    if X.dim() == 4:
        G = X.shape[1]
        if tuple(X.shape) != (b, G, N, L) or G == 0 or d % G != 0:
            raise ValueError(f"{name}: expected (batch, G, N, L) with dim % G == 0, got {tuple(X.shape)}")
        return "group", G
    raise ValueError(f"{name}: expected 2, 3 or 4 dims, got shape {tuple(X.shape)}")


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor) -> tuple[int, int, int, int]:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (batch, dim, L), got {tuple(u.shape)}, {tuple(delta.shape)}")
    b, d, L = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (dim, N)=({d}, N), got {tuple(A.shape)}")
    if A.is_complex():
        raise NotImplementedError("complex A is not supported")
    if L == 0:
        raise ValueError("sequence length must be >= 1")
    return b, d, L, A.shape[1]


def _to_lbd(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(b, d, L) -> contiguous (L, b, d) in ``dtype`` with a single copy."""
    b, d, L = x.shape
    out = torch.empty((L, b, d), dtype=dtype, device=x.device)
    out.copy_(x.permute(2, 0, 1))
    return out


def _from_lbd(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(L, b, d) -> contiguous (b, d, L) in ``dtype`` with a single copy."""
    L, b, d = x.shape
    out = torch.empty((b, d, L), dtype=dtype, device=x.device)
    out.copy_(x.permute(1, 2, 0))
    return out


def _grad_from_lbd(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(L, b, d) -> (b, d, L) gradient: a permuted view (no transposing copy) unless dtype differs.

    Autograd accepts gradients of any strides (a leaf's .grad is laid out to match the leaf).
    """
    return x.permute(1, 2, 0).to(dtype)


class _Layout:
    """Internal layout of the state: (L, b, G, N, dg), channel c = g * dg + j innermost.

    G is the lcm of the group counts of B and C (1 when neither is grouped), so each B_t / C_t is one
    row per (l, b, g) and every contraction over n or over the channels of a group is a batched
    matrix product on contiguous memory. Each time step is one contiguous (b, G, N, dg) block.
    """

    def __init__(self, b: int, d: int, L: int, N: int, B: Tensor, C: Tensor) -> None:
        self.b, self.d, self.L, self.N = b, d, L, N
        self.kB, self.GB = _bc_kind(B, "B", b, d, N, L)
        self.kC, self.GC = _bc_kind(C, "C", b, d, N, L)
        G = math.lcm(self.GB, self.GC)
        self.G, self.dg = G, d // G
        self.state = (L, b, G, N, d // G)

    # (d, N) tensors (A, time-invariant B / C) <-> (G, N, dg)
    def dn_in(self, X: Tensor, dtype: torch.dtype) -> Tensor:
        out = torch.empty((self.G, self.N, self.dg), dtype=dtype, device=X.device)
        out.copy_(X.reshape(self.G, self.dg, self.N).permute(0, 2, 1))
        return out

    def dn_out(self, X: Tensor, dtype: torch.dtype) -> Tensor:
        out = torch.empty((self.G, self.dg, self.N), dtype=dtype, device=X.device)
        out.copy_(X.permute(0, 2, 1))
        return out.view(self.d, self.N)

    # B / C in the caller's form <-> internal form: const (G, N, dg); var / group (L, b, G, N)
    def bc_in(self, X: Tensor, kind: str, Gx: int, dtype: torch.dtype) -> Tensor:
        if kind == "const":
            return self.dn_in(X, dtype)
        L, b, G, N = self.L, self.b, self.G, self.N
        X4 = X.unsqueeze(1) if kind == "var" else X  # (b, Gx, N, L)
        out = torch.empty((L, b, Gx, G // Gx, N), dtype=dtype, device=X.device)
        out.copy_(X4.permute(3, 0, 1, 2).unsqueeze(3).expand(L, b, Gx, G // Gx, N))
        return out.view(L, b, G, N)

    def bc_out(self, dX: Tensor, kind: str, Gx: int, dtype: torch.dtype) -> Tensor:
        if kind == "const":
            return self.dn_out(dX, dtype)
        L, b, G, N = self.L, self.b, self.G, self.N
        dX = dX.view(L, b, Gx, G // Gx, N).sum(3) if Gx != G else dX  # fold repeated groups
        out = torch.empty((b, Gx, N, L), dtype=dtype, device=dX.device)
        out.copy_(dX.permute(1, 2, 3, 0))
        return out.squeeze(1) if kind == "var" else out

    def outer(self, w: Tensor, X: Tensor, kind: str, out: Tensor) -> Tensor:
        """out[l, b, g, n, j] = w[l, b, (g, j)] * X[.., n]  for a time slice (out: (T, b, G, N, dg))."""
        T, b, G, N, dg = out.shape
        Xb = X if kind == "const" else X.view(T, b, G, N, 1)
        return torch.mul(w.view(T, b, G, 1, dg), Xb, out=out)

    def reduce_n(self, S: Tensor, X: Tensor, kind: str, tmp: Tensor, out: Tensor) -> None:
        """out[l, b, (g, j)] = sum_n S[l, b, g, n, j] * X[.., n]; out: contiguous (T, b, d)."""
        T, b, G, N, dg = S.shape
        if kind == "const":
            torch.sum(torch.mul(S, X, out=tmp), 3, out=out.view(T, b, G, dg))
        else:
            M = T * b * G
            torch.bmm(X.reshape(M, 1, N), S.view(M, N, dg), out=out.view(M, 1, dg))

    def reduce_d(self, w: Tensor, S: Tensor, kind: str, tmp: Tensor, out: Tensor) -> None:
        """Gradient of X in :meth:`outer` given S = dL/dout: sum over a group's channels of w * S.

        var / group: written to out (T, b, G, N); const: added to the accumulator out (G, N, dg).
        """
        T, b, G, N, dg = S.shape
        if kind == "const":
            out.add_(torch.mul(S, w.view(T, b, G, 1, dg), out=tmp).sum((0, 1)))
        else:
            M = T * b * G
            # (1, dg) @ (dg, N) against the transposed view: ~8x faster on CPU than (N, dg) @ (dg, 1)
            torch.bmm(w.reshape(M, 1, dg), S.view(M, N, dg).transpose(1, 2), out=out.view(M, 1, N))

    def grad_buffer(self, kind: str, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Buffer for the gradient of B or C in internal form (const: zeroed accumulator)."""
        if kind == "const":
            return torch.zeros((self.G, self.N, self.dg), dtype=dtype, device=device)
        return torch.empty((self.L, self.b, self.G, self.N), dtype=dtype, device=device)


def _tslice(X: Tensor, kind: str, t0: int, t1: int) -> Tensor:
    return X if kind == "const" else X[t0:t1]


def _chunk_len(lay: _Layout, dtype: torch.dtype) -> int:
    """Time steps per chunk so that a chunk of the (T, b, G, N, dg) scratch buffers stays in cache."""
    step_bytes = lay.b * lay.d * lay.N * torch.empty((), dtype=dtype).element_size()
    return max(1, min(lay.L, _CHUNK_BYTES // max(1, step_bytes)))


# --------------------------------------------------------------------------------------------------
# fast reference: custom autograd Function
# --------------------------------------------------------------------------------------------------


class _SelectiveScanFn(torch.autograd.Function):
    """Selective scan with a hand-written reverse-time backward (see module docstring for the math).

    Time is processed in chunks of T steps (:func:`_chunk_len`): exp(delta * A), the adjoint g and
    other scratch live in small per-thread buffers that stay in cache, so the only b*d*L*N tensor
    that goes through main memory is the hidden-state buffer H (written once in forward, read once in
    backward). Kept between forward and backward: H plus a few (L, b, d) tensors.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
        ctx.set_materialize_grads(False)
        b, d, L, N = _check_shapes(u, delta, A)
        lay = _Layout(b, d, L, N, B, C)
        G, dg, kB, kC = lay.G, lay.dg, lay.kB, lay.kC
        wd = _work_dtype(u, delta, A, B, C, D, z, delta_bias)
        dev = u.device

        u_l = _to_lbd(u, wd)  # (L, b, d)
        dt = _to_lbd(delta, wd)  # (L, b, d)
        if delta_bias is not None:
            dt.add_(delta_bias.to(wd))
        dt_raw = None
        if delta_softplus:
            dt_raw = dt
            dt = _softplus(dt)
        A_i = lay.dn_in(A, wd)  # (G, N, dg)
        A2 = A_i * _LOG2E  # exp(x) = exp2(x * log2(e)); exp2 is ~3x cheaper than exp on CPU
        B_i = lay.bc_in(B, kB, lay.GB, wd)
        C_i = lay.bc_in(C, kC, lay.GC, wd)
        dt5 = dt.view(L, b, G, 1, dg)
        dtu = dt * u_l

        H = _alloc_state(lay.state, wd, dev)
        Hs = H.unbind(0)
        y = torch.empty((L, b, d), dtype=wd, device=dev)
        T = _chunk_len(lay, wd)
        ws_a = _workspace("a", (T,) + lay.state[1:], wd, dev)
        for t0 in range(0, L, T):
            t1 = min(L, t0 + T)
            n = t1 - t0
            dAc = ws_a[:n]
            torch.exp2(torch.mul(dt5[t0:t1], A2, out=dAc), out=dAc)
            lay.outer(dtu[t0:t1], _tslice(B_i, kB, t0, t1), kB, out=H[t0:t1])
            dAs = dAc.unbind(0)
            if t0 > 0:
                Hs[t0].addcmul_(dAs[0], Hs[t0 - 1])
            for k in range(1, n):  # h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t
                Hs[t0 + k].addcmul_(dAs[k], Hs[t0 + k - 1])
            lay.reduce_n(H[t0:t1], _tslice(C_i, kC, t0, t1), kC, tmp=dAc, out=y[t0:t1])

        D_w = None
        if D is not None:
            D_w = D.to(wd)
            y.addcmul_(u_l, D_w)
        z_l = y_ssm = None
        if z is not None:
            z_l = _to_lbd(z, wd)
            y_ssm = y
            out = torch.empty((b, d, L), dtype=u.dtype, device=dev)
            # gate and transpose back to (b, d, L) in one pass
            torch.mul(y_ssm, F.silu(z_l), out=out.permute(2, 0, 1))
        else:
            out = _from_lbd(y, u.dtype)
        last = torch.empty((b, G, dg, N), dtype=wd, device=dev)
        last.copy_(H[L - 1].permute(0, 1, 3, 2))

        ctx.save_for_backward(u_l, dt, dt_raw, A_i, B_i, C_i, D_w, z_l, y_ssm, H)
        ctx.lay = lay
        ctx.has_bias = delta_bias is not None
        ctx.in_dtypes = tuple(None if t is None else t.dtype for t in (u, delta, A, B, C, D, z, delta_bias))
        return out, last.view(b, d, N)

    @staticmethod
    def backward(ctx, dout, dlast):
        u_l, dt, dt_raw, A_i, B_i, C_i, D_w, z_l, y_ssm, H = ctx.saved_tensors
        lay = ctx.lay
        kB, kC = lay.kB, lay.kC
        u_dt, dl_dt, A_dt, B_dt, C_dt, D_dt, z_dt, bias_dt = ctx.in_dtypes
        need = ctx.needs_input_grad
        L, b, G, N, dg = H.shape
        d = G * dg
        wd, dev = H.dtype, H.device

        du = ddelta = dA_p = dB = dC = dD = dz = ddb = None
        dy = torch.zeros((L, b, d), dtype=wd, device=dev) if dout is None else _to_lbd(dout, wd)
        if z_l is not None:
            sig = torch.sigmoid(z_l)
            if need[6]:
                # d silu(z) / dz = sig * (1 + z * (1 - sig))
                dsilu = torch.addcmul(torch.ones_like(z_l), z_l, 1.0 - sig).mul_(sig)
                dz = _grad_from_lbd(dsilu.mul_(dy).mul_(y_ssm), z_dt)
            dy.mul_(sig.mul_(z_l))  # dy <- dL/dy_ssm
        if D_w is not None and need[5]:
            dD = (dy * u_l).sum((0, 1)).to(D_dt)

        need_s = need[0] or need[1] or need[7]  # s_t = sum_n g_t * B_t  (-> du, ddelta)
        need_dt = need[1] or need[7]
        need_X = need[2] or need_dt  # X_t = g_t * exp(delta_t A) * h_{t-1}  (-> dA, ddelta)
        need_scan = need_s or need_X or need[3]
        dC_i = lay.grad_buffer(kC, wd, dev) if need[4] else None
        dB_i = lay.grad_buffer(kB, wd, dev) if need[3] else None
        s = torch.empty((L, b, d), dtype=wd, device=dev) if need_s else None
        ddtA = torch.zeros((L, b, d), dtype=wd, device=dev) if need_dt else None
        dA_acc = torch.zeros((G, N, dg), dtype=wd, device=dev) if need[2] else None
        dt5 = dt.view(L, b, G, 1, dg)
        dtu = dt * u_l if need[3] else None
        A2 = A_i * _LOG2E

        T = _chunk_len(lay, wd)
        cshape = (T,) + tuple(H.shape[1:])
        ws_a = _workspace("a", cshape, wd, dev) if need_scan else None
        ws_g = _workspace("g", cshape, wd, dev) if need_scan else None
        ws_t = _workspace("t", cshape, wd, dev) if "const" in (kB, kC) else None
        carry = torch.empty(H.shape[1:], dtype=wd, device=dev) if need_scan else None
        dlast_i = None
        if dlast is not None and need_scan:
            dlast_i = dlast.to(wd).reshape(b, G, dg, N).permute(0, 1, 3, 2)

        # reverse-time chunks; carry = exp(delta_{t1} A) * g_{t1} links a chunk to the one after it
        for t0 in reversed(range(0, L, T)):
            t1 = min(L, t0 + T)
            n = t1 - t0
            Hc = H[t0:t1]
            tmp = None if ws_t is None else ws_t[:n]
            if need[4]:
                outC = dC_i if kC == "const" else dC_i[t0:t1]
                lay.reduce_d(dy[t0:t1], Hc, kC, tmp=tmp, out=outC)
            if not need_scan:
                continue
            dAc, Gc = ws_a[:n], ws_g[:n]
            torch.exp2(torch.mul(dt5[t0:t1], A2, out=dAc), out=dAc)
            lay.outer(dy[t0:t1], _tslice(C_i, kC, t0, t1), kC, out=Gc)  # direct term C_t * dy_t
            if t1 == L:
                if dlast_i is not None:
                    Gc[n - 1].add_(dlast_i)
            else:
                Gc[n - 1].add_(carry)
            Gs, dAs = Gc.unbind(0), dAc.unbind(0)
            for k in range(n - 2, -1, -1):  # g_t += exp(delta_{t+1} A) g_{t+1}
                Gs[k].addcmul_(dAs[k + 1], Gs[k + 1])
            if t0 > 0:
                torch.mul(dAs[0], Gs[0], out=carry)

            Bc = _tslice(B_i, kB, t0, t1)
            if need_s:
                lay.reduce_n(Gc, Bc, kB, tmp=tmp, out=s[t0:t1])
            if need[3]:
                outB = dB_i if kB == "const" else dB_i[t0:t1]
                lay.reduce_d(dtu[t0:t1], Gc, kB, tmp=tmp, out=outB)
            r0 = 1 if t0 == 0 else 0  # h_{-1} = 0: no X term at t = 0
            if need_X and n > r0:
                Xc = Gc[r0:]
                Xc.mul_(dAc[r0:]).mul_(H[t0 + r0 - 1 : t1 - 1])
                if need_dt:  # ddelta_t += sum_n X_t * A
                    rows = n - r0
                    torch.sum(torch.mul(Xc, A_i, out=dAc[r0:]), 3, out=ddtA[t0 + r0 : t1].view(rows, b, G, dg))
                if need[2]:  # dA += sum_{t, b} X_t * delta_t
                    dA_acc.add_(Xc.mul_(dt5[t0 + r0 : t1]).sum((0, 1)))

        if need_dt:
            ddt = ddtA.addcmul_(s, u_l)
            if dt_raw is not None:
                ddt.mul_(torch.sigmoid(dt_raw))
            if need[1]:
                ddelta = _grad_from_lbd(ddt, dl_dt)
            if need[7] and ctx.has_bias:
                ddb = ddt.sum((0, 1)).to(bias_dt)
        if need[0]:
            du_l = s.mul_(dt)
            if D_w is not None:
                du_l.addcmul_(dy, D_w)
            du = _grad_from_lbd(du_l, u_dt)
        if need[2]:
            dA_p = lay.dn_out(dA_acc, A_dt)
        if need[3]:
            dB = lay.bc_out(dB_i, kB, lay.GB, B_dt)
        if need[4]:
            dC = lay.bc_out(dC_i, kC, lay.GC, C_dt)
        return du, ddelta, dA_p, dB, dC, dD, dz, ddb, None, None


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Selective scan (Mamba S6), fast pure-PyTorch version with a hand-written backward.

    Drop-in for ``mamba_ssm``'s ``selective_scan_fn`` (same arguments, same semantics).

    Shapes (b batch, d dim, L length, N state, G groups with d % G == 0)::

        u, delta    (b, d, L)
        A           (d, N)       real
        B, C        (b, N, L) input-dependent, or (b, G, N, L) grouped, or (d, N) time-invariant
        D           (d,)         optional skip connection
        z           (b, d, L)    optional gate: out = y * silu(z)
        delta_bias  (d,)         optional, added to delta before the softplus
        returns     out (b, d, L) in u's dtype; with return_last_state, (out, h_last) where
                    h_last (b, d, N) is in the working dtype (float32, or float64 for float64 inputs)

    All internal computation is in float32 (float64 if any input is float64). Gradients flow to
    every tensor argument, including through h_last. Memory kept for backward: one b*d*L*N state
    buffer plus a few (b, d, L) tensors; on CPU three scratch buffers of one time chunk (~2 MiB each)
    are cached per thread (see :func:`clear_workspace`).

    Performance notes (CPU): torch's intra-op threads are used as configured by the caller; on a
    2-core machine that is shared with other processes, ``torch.set_num_threads(1)`` can be much
    faster than 2 (OpenMP threads wait for each other at every op).
    """
    out, last = _SelectiveScanFn.apply(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state)
    )
    return (out, last) if return_last_state else out


# --------------------------------------------------------------------------------------------------
# naive specification
# --------------------------------------------------------------------------------------------------


def selective_scan_naive(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """Selective scan as a plain per-step loop under autograd (slow; the tests' specification).

    Same arguments, shapes and return values as :func:`selective_scan_ref`::

        u, delta (b, d, L); A (d, N); B, C (b, N, L) | (b, G, N, L) | (d, N);
        D (d,); z (b, d, L); delta_bias (d,)  ->  out (b, d, L) [, h_last (b, d, N)]
    """
    in_dtype = u.dtype
    wd = _work_dtype(u, delta, A, B, C, D, z, delta_bias)
    b, d, L, N = _check_shapes(u, delta, A)
    u = u.to(wd)
    delta = delta.to(wd)
    if delta_bias is not None:
        delta = delta + delta_bias.to(wd)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    A = A.to(wd)

    def per_channel(X: Tensor, name: str) -> Tensor:
        # -> (b, d, N, L) view/copy giving each channel its own B_t / C_t
        kind, G = _bc_kind(X, name, b, d, N, L)
        X = X.to(wd)
        if kind == "const":
            return X[None, :, :, None].expand(b, d, N, L)
        if kind == "var":
            return X[:, None].expand(b, d, N, L)
        return X.repeat_interleave(d // G, dim=1)

    Bx = per_channel(B, "B")
    Cx = per_channel(C, "C")
    h = torch.zeros((b, d, N), dtype=wd, device=u.device)
    ys = []
    for t in range(L):
        dt = delta[:, :, t, None]  # (b, d, 1)
        h = torch.exp(dt * A) * h + dt * Bx[..., t] * u[:, :, t, None]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(wd)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(wd))
    out = y.to(in_dtype)
    return (out, h) if return_last_state else out


# --------------------------------------------------------------------------------------------------
# causal depthwise conv1d
# --------------------------------------------------------------------------------------------------


def causal_conv1d_ref(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: Optional[str] = None
) -> Tensor:
    """Causal depthwise 1-D convolution (``causal_conv1d_fn`` semantics).

    Shapes: x (b, d, L); weight (d, W); bias (d,) or None  ->  out (b, d, L) in x's dtype.

    ``out[:, c, t] = bias[c] + sum_k weight[c, k] * x[:, c, t - (W - 1) + k]`` with x = 0 for negative
    times, so out at time t only depends on x at times <= t. ``activation``: None, "silu" or "swish".
    Computed in float32 (float64 for float64 input).
    """
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    d, W = weight.shape
    if x.dim() != 3 or x.shape[1] != d:
        raise ValueError(f"x must be (batch, {d}, L), got {tuple(x.shape)}")
    wd = _work_dtype(x, weight, bias)
    L = x.shape[-1]
    out = F.conv1d(
        x.to(wd),
        weight.to(wd).unsqueeze(1),
        None if bias is None else bias.to(wd),
        padding=W - 1,
        groups=d,
    )[..., :L]
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)

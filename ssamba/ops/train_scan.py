"""A selective scan for training on CUDA: one thread per channel and sequence segment, forward with state
checkpoints, backward.

mamba-ssm's scan gives each (batch, channel) pair one thread block that runs a parallel prefix scan over
the sequence for each of the ``N`` states; at the training sizes of this project (hundreds of tokens,
tens of thousands of channels) its backward costs about 2 ms per layer at batch 32 on an H100, some 15x
what its bytes need. This kernel (``csrc/train_scan.cu``) gives each thread one channel with its
``N = 16`` states in registers and steps through time:

- forward: writes ``y`` and the state entering every tile of :data:`TILE` steps (fp32 checkpoints,
  ``N / TILE`` floats per step and channel);
- backward, tiles from last to first: recomputes the tile's states from its checkpoint into shared
  memory (every second step; the others are rebuilt on the way back), then walks the tile in reverse
  with the adjoint ``g_t = dL/dh_t`` (formulas in the .cu file); ``dB``/``dC`` are summed over a group's
  channels by a warp reduce-scatter and one atomic add per block, ``dA_log``/``dD``/``d bias`` over the
  batch by atomic adds;
- sequence segments: one thread walking a whole sequence of ~500 steps left an H100 mostly idle (24,576
  threads where the card holds 270,336), so :func:`segments` cuts the sequence into segments, each its
  own block. A light local pass scans each segment from a zero state (the adjoint from zero, backward);
  the recurrence is linear and a segment's decays multiply to ``exp(A sum dt)``, so the main pass starts
  each segment from the folded results of the ones before it (after it, backward).
Layout: ``u, delta: (batch, channels, L)``; ``B, C: (batch, groups, N, L)`` (time-contiguous, any other
strides); per-channel parameters in up to two sets of ``period`` rows (channel ``c`` uses set
``c // period``, row ``c % period``), so a bidirectional mixer passes its two directions' ``A_log``,
``D`` and dt bias as they are, without concatenating. Same math as :func:`ssamba.ops.scan.selective_scan_ref`
without ``z`` and with ``A = -exp(A_log)``; :func:`train_scan_emulated` runs the same tile algebra
(checkpoints, recompute, reverse adjoint) in torch so that the backward formulas are tested on CPU.

Compiled with ``nvcc`` on first use like the chunked scan (:func:`ssamba.ops.chunk_scan.build_library`);
``SSAMBA_TRAIN_SCAN=0`` turns it off, and where it cannot be built the mixer keeps mamba-ssm's scan.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from ssamba.base.errors import KernelBuildError
from ssamba.ops.chunk_scan import _DTYPES, build_library, device_arch

SOURCE = Path(__file__).with_name("csrc") / "train_scan.cu"
TILE = 16  # steps per tile and per checkpoint (TT in the .cu file)
BLOCK = 32  # channels per thread block (BD): channels, group size and period must be multiples of it
STATE_SIZE = 16
MAX_BATCH = 65535  # the batch is the grid's y dimension

_PTR_FIELDS = (
    "u delta B C A0 A1 D0 D1 bias0 bias1 y ckpt dy du ddelta dB dC dA0 dA1 dD0 dD1 dbias0 dbias1 hend sdt gend"
).split()
_INT_FIELDS = (
    "batch channels length n_tiles b_sb b_sg b_sn c_sb c_sg c_sn group_size period softplus seg_tiles n_seg"
).split()

# Segments along the sequence (grid z). One block per (32 channels, batch row) leaves an H100 partly idle
# when there are few blocks; cutting the sequence into segments multiplies the blocks at the cost of a light
# extra pass (each segment scanned from zero, then the segments' results folded: see the .cu file). Measured
# on an H100 (docs/benchmarks.md section 5): with fewer than about 4 blocks per SM (SSAMBA-tiny uni, batch
# 32: 384 blocks on 132 SMs) 11 segments made forward + backward 1.45x faster; from 768 blocks on (tiny bi
# at batch 32, base at 16, tiny at 128) one segment was the fastest, by 5-8%.
SEGMENT_BELOW_BLOCKS_PER_SM = 4  # cut the sequence only when a launch has fewer blocks than this per SM
BLOCKS_PER_SM = 32  # then aim for about this many blocks per SM over the whole launch
MIN_SEGMENT_TILES = 2  # a segment is at least this many tiles (32 steps)
SEGMENTS_ENV = "SSAMBA_TRAIN_SCAN_SEGMENTS"  # force a segment count (benchmarks); 1 = no segments


def segments(batch: int, channels: int, length: int, sm_count: int, forced: int | None = None) -> tuple[int, int]:
    """``(seg_tiles, n_seg)``: how the kernel cuts a sequence of ``length`` steps (pure: tested on CPU).

    One segment when ``channels / BLOCK x batch`` blocks give at least :data:`SEGMENT_BELOW_BLOCKS_PER_SM`
    per SM; else enough segments for about :data:`BLOCKS_PER_SM` blocks per SM, none shorter than
    :data:`MIN_SEGMENT_TILES` tiles, and none empty. ``forced`` asks for a count (still capped by the length).
    """
    if batch < 1 or channels < BLOCK or length < 1 or sm_count < 1:
        raise ValueError(f"segments of batch={batch}, channels={channels}, length={length}, SMs={sm_count}")
    n_tiles = -(-length // TILE)
    blocks = (channels // BLOCK) * batch
    if forced is not None:
        wanted, most = forced, n_tiles
    elif blocks >= SEGMENT_BELOW_BLOCKS_PER_SM * sm_count:
        wanted, most = 1, 1
    else:
        wanted, most = -(-(BLOCKS_PER_SM * sm_count) // blocks), max(1, n_tiles // MIN_SEGMENT_TILES)
    n_seg = max(1, min(int(wanted), most, 65535))
    seg_tiles = -(-n_tiles // n_seg)
    return seg_tiles, -(-n_tiles // seg_tiles)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _forced_segments() -> int | None:
    raw = os.environ.get(SEGMENTS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{SEGMENTS_ENV} must be a positive integer; got {raw!r}")
    return n


class _Params(ctypes.Structure):
    """Mirror of ``struct Params`` in train_scan.cu (every field 8 bytes, same order)."""

    _fields_ = [(n, ctypes.c_void_p) for n in _PTR_FIELDS] + [(n, ctypes.c_int64) for n in _INT_FIELDS]


_warned: set = set()


@functools.lru_cache(maxsize=None)
def _load(arch: str) -> tuple[ctypes.CDLL | None, str]:
    try:
        lib = ctypes.CDLL(str(build_library(arch, source=SOURCE)))
        lib.ssamba_train_scan.argtypes = [
            ctypes.POINTER(_Params),
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        lib.ssamba_train_scan.restype = ctypes.c_int
        lib.ssamba_train_scan_error.argtypes = [ctypes.c_int]
        lib.ssamba_train_scan_error.restype = ctypes.c_char_p
    except Exception as exc:  # KernelBuildError; OSError / AttributeError from a broken .so
        return None, f"{type(exc).__name__}: {exc}"
    return lib, ""


def supported(channels: int, groups: int, period: int, n_state: int, batch: int) -> str:
    """Why the kernel cannot take this shape, or ``""`` when it can (pure: tested on CPU)."""
    if n_state != STATE_SIZE:
        return f"d_state must be {STATE_SIZE}, got {n_state}"
    if channels % groups:
        return f"{groups} B/C groups do not divide {channels} channels"
    for name, v in (("channels", channels), ("channels per group", channels // groups), ("period", period)):
        if v % BLOCK:
            return f"{name} ({v}) must be a multiple of {BLOCK}"
    if channels % period or channels // period > 2:
        return f"channels ({channels}) must be one or two parameter sets of period {period}"
    if batch > MAX_BATCH:
        return f"batch {batch} is over {MAX_BATCH} (the launch grid's y limit)"
    return ""


SELF_CHECK_TOL = 1e-3  # largest |kernel - reference| / max |reference| accepted by the first-use check (fp32)


def self_check(device: torch.device | None = None) -> str:
    """Run the kernel on a small random problem (two parameter sets, B/C as strided views, a partial tile;
    one sequence segment and three) against the reference scan in float64 on the same device: output and
    every gradient. Returns
    ``""`` when it agrees within :data:`SELF_CHECK_TOL`, else what differed."""
    from ssamba.ops.scan import selective_scan_ref

    dev = torch.device("cuda") if device is None else torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    b, di, L = 2, BLOCK, 2 * TILE + 5

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=dev) * scale

    x_dbl = r(b, 2, 2 * STATE_SIZE + 3, L)
    base = [
        r(b, 2 * di, L),
        r(b, 2 * di, L, scale=0.5),
        x_dbl,
        *(torch.log(torch.rand(di, STATE_SIZE, generator=g, device=dev) * 4 + 0.1) for _ in range(2)),
        r(di),
        r(di),
        r(di, scale=0.5) - 2,
        r(di, scale=0.5) - 2,
    ]
    dy = r(b, 2 * di, L)

    def run(dtype, n_segments=None):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in base]
        u, delta, xd, a0, a1, d0, d1, b0, b1 = leaves
        Bm, Cm = xd[:, :, 3 : 3 + STATE_SIZE], xd[:, :, 3 + STATE_SIZE :]
        with torch.enable_grad():
            if dtype == torch.float32:
                y = train_scan(u, delta, (a0, a1), Bm, Cm, (d0, d1), (b0, b1), True, period=di, n_segments=n_segments)
            else:
                y = selective_scan_ref(
                    u,
                    delta,
                    -torch.exp(torch.cat([a0, a1])),
                    Bm,
                    Cm,
                    torch.cat([d0, d1]),
                    delta_bias=torch.cat([b0, b1]),
                    delta_softplus=True,
                )
            y.backward(dy.to(dtype))
        return [y.detach()] + [t.grad for t in leaves]

    want = run(torch.float64)
    names = "y u delta B/C A_log0 A_log1 D0 D1 bias0 bias1".split()
    bad = []
    for segs in (1, 3):  # one segment, and one tile per segment (the partial tile in the last)
        for name, got, ref in zip(names, run(torch.float32, segs), want):
            err = float((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            if not err <= SELF_CHECK_TOL:  # NaN fails too
                bad.append(f"{name} {err:.1e}" + (f" ({segs} segments)" if segs > 1 else ""))
    return ", ".join(bad)


@functools.lru_cache(maxsize=None)
def _checked(arch: str, index: int) -> str:
    try:
        # whatever the caller's context (autocast, no_grad, inference mode): fp32 with gradients
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cuda", enabled=False):
            return self_check(torch.device("cuda", index))
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot even run is not used
        return f"{type(exc).__name__}: {exc}"


def train_scan_fn(device: torch.device | None = None) -> Callable | None:
    """:func:`train_scan` where it can run on ``device``, else ``None``: on CPU, without CUDA, with
    ``SSAMBA_TRAIN_SCAN=0``, when the build fails, or when the first-use check against the reference
    (:func:`self_check`, once per process and device) fails; the last two are said once, with why."""
    if os.environ.get("SSAMBA_TRAIN_SCAN", "1") == "0" or not torch.cuda.is_available():
        return None
    if device is not None and torch.device(device).type != "cuda":
        return None
    arch = device_arch(device)
    lib, why = _load(arch)
    if lib is None:
        if arch not in _warned:
            _warned.add(arch)
            warnings.warn(f"training scan unavailable on {arch}, using mamba-ssm's scan: {why}")
        return None
    index = (
        torch.device(device).index
        if device is not None and torch.device(device).index is not None
        else torch.cuda.current_device()
    )
    bad = _checked(arch, index)
    if bad:
        if (arch, "check") not in _warned:
            _warned.add((arch, "check"))
            warnings.warn(
                f"training scan disagrees with the reference scan on {arch} ({bad}); using mamba-ssm's "
                "scan instead. Please report this with your GPU and nvcc version."
            )
        return None
    return train_scan


def _pair(X) -> tuple:
    if isinstance(X, (tuple, list)):
        if len(X) not in (1, 2):
            raise ValueError(f"a parameter given per set must be one or two tensors; got {len(X)}")
        return (X[0], X[1] if len(X) == 2 else None)
    return (X, None)


def _launch(p: _Params, dtype: torch.dtype, backward: bool, device: torch.device) -> None:
    lib, why = _load(device_arch(device))
    if lib is None:
        raise KernelBuildError(f"training scan unavailable: {why}")
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        rc = lib.ssamba_train_scan(ctypes.byref(p), _DTYPES[dtype], STATE_SIZE, int(backward), ctypes.c_void_p(stream))
    if rc != 0:
        why = {
            -1: "dtype",
            -2: f"channels, group size and period must be multiples of {BLOCK}",
            -3: f"d_state must be {STATE_SIZE}",
            -5: f"batch over {MAX_BATCH}",
            -6: "bad sequence segments",
        }.get(rc)
        raise RuntimeError(f"train_scan launch failed: {why or lib.ssamba_train_scan_error(rc).decode()} (code {rc})")


def _ptr(X):
    return None if X is None else X.data_ptr()


class _TrainScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, B, C, A0, A1, D0, D1, bias0, bias1, period: int, softplus: bool, n_segments):
        b, ch, L = u.shape
        groups = B.shape[1]
        n_tiles = -(-L // TILE)
        seg_tiles, n_seg = segments(b, ch, L, _sm_count(u.device.index), n_segments or _forced_segments())
        y = torch.empty_like(u)
        f32 = dict(dtype=torch.float32, device=u.device)
        ckpt = torch.empty((b, n_tiles, STATE_SIZE, ch), **f32)
        sdt = torch.empty((b, n_seg, ch), **f32)
        hend = torch.empty((b, n_seg, STATE_SIZE, ch), **f32) if n_seg > 1 else None
        p = _Params(
            u.data_ptr(),
            delta.data_ptr(),
            B.data_ptr(),
            C.data_ptr(),
            _ptr(A0),
            _ptr(A1),
            _ptr(D0),
            _ptr(D1),
            _ptr(bias0),
            _ptr(bias1),
            y.data_ptr(),
            ckpt.data_ptr(),
            *([None] * 11),
            _ptr(hend),
            sdt.data_ptr(),
            None,
            b,
            ch,
            L,
            n_tiles,
            B.stride(0),
            B.stride(1),
            B.stride(2),
            C.stride(0),
            C.stride(1),
            C.stride(2),
            ch // groups,
            period,
            int(softplus),
            seg_tiles,
            n_seg,
        )
        _launch(p, u.dtype, False, u.device)
        ctx.save_for_backward(u, delta, B, C, A0, A1, D0, D1, bias0, bias1, ckpt, sdt)
        ctx.segments = (seg_tiles, n_seg)
        ctx.period, ctx.softplus = period, softplus
        return y

    @staticmethod
    def backward(ctx, dy):
        u, delta, B, C, A0, A1, D0, D1, bias0, bias1, ckpt, sdt = ctx.saved_tensors
        seg_tiles, n_seg = ctx.segments
        b, ch, L = u.shape
        groups = B.shape[1]
        dy = dy.to(u.dtype).contiguous()
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        f32 = dict(dtype=torch.float32, device=u.device)
        dB = torch.zeros((b, groups, STATE_SIZE, L), **f32)
        dC = torch.zeros((b, groups, STATE_SIZE, L), **f32)

        def zeros(X):
            return None if X is None else torch.zeros(X.shape, **f32)

        dA0, dA1, dD0, dD1, db0, db1 = (zeros(X) for X in (A0, A1, D0, D1, bias0, bias1))
        gend = torch.empty((b, n_seg, STATE_SIZE, ch), **f32) if n_seg > 1 else None
        p = _Params(
            u.data_ptr(),
            delta.data_ptr(),
            B.data_ptr(),
            C.data_ptr(),
            _ptr(A0),
            _ptr(A1),
            _ptr(D0),
            _ptr(D1),
            _ptr(bias0),
            _ptr(bias1),
            None,
            ckpt.data_ptr(),
            dy.data_ptr(),
            du.data_ptr(),
            ddelta.data_ptr(),
            dB.data_ptr(),
            dC.data_ptr(),
            _ptr(dA0),
            _ptr(dA1),
            _ptr(dD0),
            _ptr(dD1),
            _ptr(db0),
            _ptr(db1),
            None,
            sdt.data_ptr(),
            _ptr(gend),
            b,
            ch,
            L,
            ckpt.shape[1],
            B.stride(0),
            B.stride(1),
            B.stride(2),
            C.stride(0),
            C.stride(1),
            C.stride(2),
            ch // groups,
            ctx.period,
            int(ctx.softplus),
            seg_tiles,
            n_seg,
        )
        _launch(p, u.dtype, True, u.device)
        return (du, ddelta, dB.to(B.dtype), dC.to(C.dtype), dA0, dA1, dD0, dD1, db0, db1, None, None, None)


def train_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A_log,
    B: torch.Tensor,
    C: torch.Tensor,
    D=None,
    delta_bias=None,
    delta_softplus: bool = True,
    period: int | None = None,
    n_segments: int | None = None,
) -> torch.Tensor:
    """Selective scan with a backward pass, on CUDA; returns ``y`` like ``u`` (contiguous).

    ``u, delta: (batch, channels, L)``; ``B, C: (batch, groups, N, L)`` with ``N = 16`` (time-contiguous;
    other strides free); ``A_log``, ``D``, ``delta_bias``: one ``(channels, N)`` / ``(channels,)`` tensor, or
    a pair of ``(period, ...)`` tensors for two parameter sets (channel ``c`` uses set ``c // period``).
    ``A = -exp(A_log)``. Gradients flow to every tensor argument. ``n_segments`` asks for that many
    sequence segments (default: ``$SSAMBA_TRAIN_SCAN_SEGMENTS``, else :func:`segments` decides).
    """
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(
            f"u and delta must both be (batch, channels, length); got {tuple(u.shape)} and {tuple(delta.shape)}"
        )
    b, ch, L = u.shape
    for name, X in (("B", B), ("C", C)):
        if X.dim() != 4 or X.shape[0] != b or X.shape[2:] != (STATE_SIZE, L) or X.shape[1] != B.shape[1]:
            raise ValueError(
                f"{name} must be (batch={b}, groups, N={STATE_SIZE}, L={L}) with B's groups; got {tuple(X.shape)}"
            )
    (A0, A1), (D0, D1), (bias0, bias1) = _pair(A_log), _pair(D), _pair(delta_bias)
    period = A0.shape[0] if period is None else period
    why = supported(ch, B.shape[1], period, A0.shape[1], b)
    if why:
        raise ValueError(f"train_scan cannot take this shape: {why}")
    if A0.shape != (period, STATE_SIZE) or (A1 is not None and A1.shape != A0.shape):
        raise ValueError(f"A_log must be ({period}, {STATE_SIZE}) per set; got {tuple(A0.shape)}")
    if ch != period * (1 if A1 is None else 2):
        raise ValueError(
            f"{ch} channels need {ch // period} parameter sets of {period} rows; got {1 if A1 is None else 2}"
        )
    if u.dtype not in _DTYPES:
        raise ValueError(f"u must be float32, bfloat16 or float16; got {u.dtype}")
    dt = u.dtype
    u, delta = u.contiguous(), delta.to(dt).contiguous()
    B, C = (X.to(dt) if X.dtype != dt else X for X in (B, C))
    B, C = (X if X.stride(-1) == 1 else X.contiguous() for X in (B, C))

    def f32(X):
        return None if X is None else X.float().contiguous()

    return _TrainScan.apply(
        u,
        delta,
        B,
        C,
        f32(A0),
        f32(A1),
        f32(D0),
        f32(D1),
        f32(bias0),
        f32(bias1),
        period,
        bool(delta_softplus),
        n_segments,
    )


def train_scan_emulated(
    u,
    delta,
    A_log,
    B,
    C,
    D=None,
    delta_bias=None,
    delta_softplus=True,
    period: int | None = None,
    dy: torch.Tensor | None = None,
    tile: int = TILE,
    dtype: torch.dtype = torch.float64,
    n_segments: int = 1,
) -> tuple[torch.Tensor, dict | None]:
    """The kernel's algebra in torch, in ``dtype``: forward with a checkpoint every ``tile`` steps and, given
    ``dy``, the backward (tiles in reverse, states recomputed from checkpoints, the adjoint walked back).
    With ``n_segments > 1`` the sequence is cut into segments as the kernel does: each segment scanned
    from a zero state (adjoint), then the segments' end states (adjoints) folded with their decays
    ``exp(A sum dt)`` to start the main passes.

    Returns ``(y, grads)`` with ``grads`` a dict of ``u, delta, B, C, A_log, D, delta_bias`` gradients
    (parameters per set as tuples when given as pairs), or ``None`` without ``dy``. For testing on CPU.
    """
    b, ch, L = u.shape
    groups = B.shape[1]
    (A0, A1), (D0, D1), (bias0, bias1) = _pair(A_log), _pair(D), _pair(delta_bias)
    sets = 1 if A1 is None else 2
    period = A0.shape[0] if period is None else period

    def per_channel(X0, X1):
        if X0 is None:
            return None
        return (X0 if X1 is None else torch.cat([X0, X1])).to(dtype)

    Al = per_channel(A0, A1)
    A = -torch.exp(Al)  # (ch, N)
    Dc = per_channel(D0, D1)
    bc = per_channel(bias0, bias1)
    x = u.to(dtype)
    v = delta.to(dtype) + (0 if bc is None else bc[:, None])
    dtv = torch.where(v <= 20, torch.log1p(torch.exp(v)), v) if delta_softplus else v
    gi = torch.arange(ch) // (ch // groups)
    Bc = B.to(dtype)[:, gi]  # (b, ch, N, L)
    Cc = C.to(dtype)[:, gi]
    n_tiles = -(-L // tile)
    seg_tiles = -(-n_tiles // max(1, min(n_segments, n_tiles)))
    n_seg = -(-n_tiles // seg_tiles)

    def seg_steps(s):
        return s * seg_tiles * tile, min(L, (s + 1) * seg_tiles * tile)

    def step(h, t):
        return torch.exp(dtv[:, :, t, None] * A) * h + (dtv[:, :, t] * x[:, :, t])[..., None] * Bc[..., t]

    zero = torch.zeros(b, ch, A.shape[1], dtype=dtype)
    hend, sdt = [], []
    for s in range(n_seg - 1):  # local pass: each segment from a zero state
        h = zero
        t0, t1 = seg_steps(s)
        for t in range(t0, t1):
            h = step(h, t)
        hend.append(h)
        sdt.append(dtv[:, :, t0:t1].sum(-1))
    ckpt = [None] * n_tiles
    y = torch.empty(b, ch, L, dtype=dtype)
    for s in range(n_seg):
        h = zero
        for r in range(s):  # fold the earlier segments
            h = torch.exp(sdt[r][..., None] * A) * h + hend[r]
        for k in range(s * seg_tiles, min(n_tiles, (s + 1) * seg_tiles)):
            ckpt[k] = h.clone()
            for t in range(k * tile, min(L, (k + 1) * tile)):
                h = step(h, t)
                y[:, :, t] = (h * Cc[..., t]).sum(-1)
    if Dc is not None:
        y = y + Dc[:, None] * x
    if dy is None:
        return y.to(u.dtype), None
    dy = dy.to(dtype)
    du, ddt = torch.zeros_like(x), torch.zeros_like(x)
    dBc, dCc = torch.zeros_like(Bc), torch.zeros_like(Cc)
    dA = torch.zeros_like(A)
    gend = {}
    for s in range(1, n_seg):  # local pass: each segment's adjoint from zero
        g = zero
        t0, t1 = seg_steps(s)
        for t in reversed(range(t0, t1)):
            g = (g + dy[:, :, t, None] * Cc[..., t]) * torch.exp(dtv[:, :, t, None] * A)
        gend[s] = g
    for s in reversed(range(n_seg)):
        g = zero
        if s + 1 < n_seg:  # fold the later segments, last first
            g = gend[n_seg - 1]
            for r in range(n_seg - 2, s, -1):
                g = gend[r] + torch.exp(sdt[r][..., None] * A) * g
        for k in reversed(range(s * seg_tiles, min(n_tiles, (s + 1) * seg_tiles))):
            t0, t1 = k * tile, min(L, (k + 1) * tile)
            hist, hk = [], ckpt[k]
            for t in range(t0, t1):  # recompute the tile's states from its checkpoint
                hk = step(hk, t)
                hist.append(hk)
            for t in reversed(range(t0, t1)):
                ht, bt, ct = hist[t - t0], Bc[..., t], Cc[..., t]
                dtt, xt, dyt = dtv[:, :, t, None], x[:, :, t, None], dy[:, :, t, None]
                g = g + dyt * ct  # g_t
                prev = ht - dtt * xt * bt  # a_t h_{t-1}
                dBc[..., t] = g * dtt * xt
                dCc[..., t] = dyt * ht
                du[:, :, t] = dtt[..., 0] * (g * bt).sum(-1)
                ddt[:, :, t] = (g * (A * prev + xt * bt)).sum(-1)
                dA += (g * dtt * prev).sum(0)
                g = g * torch.exp(dtt * A)
    if Dc is not None:
        du = du + Dc[:, None] * dy
    dv = ddt * torch.sigmoid(v) * (v <= 20) + ddt * (v > 20) if delta_softplus else ddt
    dB = torch.zeros(b, groups, *B.shape[2:], dtype=dtype).index_add_(1, gi, dBc)
    dC = torch.zeros(b, groups, *C.shape[2:], dtype=dtype).index_add_(1, gi, dCc)
    dAl = dA * A

    def split(X):
        return X if sets == 1 else (X[:period], X[period:])

    grads = {
        "u": du,
        "delta": dv,
        "B": dB,
        "C": dC,
        "A_log": split(dAl),
        "D": None if Dc is None else split((dy * x).sum((0, 2))),
        "delta_bias": None if bc is None else split(dv.sum((0, 2))),
    }
    return y.to(u.dtype), grads

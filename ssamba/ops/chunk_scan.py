"""A chunked selective scan for inference on CUDA: the sequence split across thread blocks.

mamba-ssm's forward kernel walks each channel's whole sequence inside one thread block, so at batch 1
a 22k-token scan of 768 channels keeps most of an H100/H200 idle (docs/benchmarks.md section 1). This kernel (``csrc/chunk_scan.cu``) gives each thread one
channel with its ``N`` states in registers and cuts the sequence into chunks so that
``batch x channels x chunks`` threads fill the card:

1. every chunk but the last is scanned from a zero state, giving its end state and ``sum(dt)``;
2. the states entering each chunk follow in order: ``h_in[k+1] = exp(A * sum_k dt) * h_in[k] + end[k]``
   (``exp(A * sum dt)`` is the product of the chunk's per-step decays);
3. every chunk is scanned again from its entering state, writing ``y``.

With one chunk (large batches) only step 3 runs. Same math as :func:`ssamba.ops.scan.selective_scan_ref`
without ``z`` (the fast mixer applies the gate after summing the directions); forward only, so the
mixer uses it only when no gradient is needed. :func:`chunk_scan_emulated` runs the same three passes
in torch, so the chunk algebra is tested on CPU; the CUDA kernel is tested against the reference on a GPU
(``tests/test_gpu.py``).

The kernel is compiled with ``nvcc`` on first use, for the local GPU's architecture only (20-70 s on an H200 machine),
into ``$SSAMBA_KERNEL_CACHE`` (default ``$SSAMBA_CACHE/kernels``, i.e. ``~/.cache/ssamba/kernels``), under a file lock so that parallel
Ray workers compile it once, and loaded with ``ctypes``; it launches on torch's current stream, so it is
captured by CUDA graphs. Where it cannot be built (no ``nvcc``, no GPU) :func:`chunk_scan_fn` returns
``None`` and the mixer keeps mamba-ssm's scan. ``SSAMBA_CHUNK_SCAN=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

from ssamba.base import paths
from ssamba.base.errors import KernelBuildError
from ssamba.base.files import atomic_path, file_lock

SOURCE = Path(__file__).with_name("csrc") / "chunk_scan.cu"
TILE = 32  # time steps per shared-memory tile (TT in the .cu file); chunk lengths are multiples of it
STATE_SIZES = (8, 16, 32)
BLOCK_SIZES = (128, 64, 32)
THREADS_PER_SM = 512  # threads to aim for per multiprocessor when choosing the number of chunks
ONE_PASS_THREADS_PER_SM = 256  # from this many channel threads per multiprocessor: one chunk, one pass
MIN_CHUNK = 4 * TILE
# below this many (channel, chunk) threads per multiprocessor mamba-ssm's scan is faster (e.g. 768 channels
# x 1024 steps; docs/benchmarks.md section 1); see chunk_scan_fn
MIN_THREADS_PER_SM = 256
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KERNELS = {"auto": 0, "pipelined": 1, "general": 2}

_INT_FIELDS = (
    "batch channels length u_sb u_sc u_sl d_sb d_sc d_sl y_sb y_sc y_sl b_sb b_sg b_sn b_sl "
    "c_sb c_sg c_sn c_sl group_size p_rep p_div chunk_len n_chunks softplus a_log"
).split()


class _Params(ctypes.Structure):
    """Mirror of ``struct Params`` in chunk_scan.cu (every field 8 bytes, same order)."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in ("u", "delta", "B", "C", "A", "D", "bias", "A1", "D1", "bias1", "y", "state", "dsum")
    ] + [(name, ctypes.c_int64) for name in _INT_FIELDS]


_warned: set[str] = set()


def cache_dir() -> Path:
    """``$SSAMBA_KERNEL_CACHE``, else the project cache's ``kernels`` folder (``$SSAMBA_CACHE/kernels``)."""
    override = os.environ.get("SSAMBA_KERNEL_CACHE")
    return Path(override) if override else paths.cache_dir("kernels")


def find_nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def build_library(arch: str, nvcc: str | None = None, verbose: bool = False, source: Path = SOURCE) -> Path:
    """Compile ``source`` (default chunk_scan.cu) for ``arch`` (e.g. ``sm_90``) unless the cache has it;
    returns the .so path."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise KernelBuildError(
            f"nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): {source.name} "
            "cannot be compiled; mamba-ssm's scan is used instead"
        )
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source.read_bytes() + arch.encode() + version.encode()).hexdigest()[:16]
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{source.stem}-{arch}-{key}.so"
    if out.exists():
        return out
    with file_lock(out_dir / f"{source.stem}-{arch}-{key}.lock"):  # another process may be compiling it
        if out.exists():
            return out
        with atomic_path(out) as tmp:
            cmd = [
                nvcc,
                "-O3",
                "--use_fast_math",
                f"-arch={arch}",
                "-Xcompiler",
                "-fPIC",
                "-shared",
                "-cudart",
                "shared",
                "-o",
                str(tmp),
                str(source),
            ]
            print(
                f"[{source.stem}] compiling {source.name} for {arch} into {out_dir} (about a minute, once per "
                "machine and source version)" + (": " + " ".join(cmd) if verbose else ""),
                file=sys.stderr,
                flush=True,
            )
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise KernelBuildError(
                    f"{' '.join(cmd)} failed (rc {res.returncode}):\n{(res.stderr or res.stdout)[-3000:]}"
                )
    return out


def device_arch(device: torch.device | int | None = None) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


@functools.lru_cache(maxsize=None)
def _load(arch: str) -> tuple[ctypes.CDLL | None, str]:
    """The compiled library for ``arch`` and ``""``, or ``None`` and why not (cached either way)."""
    try:
        lib = ctypes.CDLL(str(build_library(arch)))
        lib.ssamba_chunk_scan.argtypes = [
            ctypes.POINTER(_Params),
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        lib.ssamba_chunk_scan.restype = ctypes.c_int
        lib.ssamba_chunk_scan_error.argtypes = [ctypes.c_int]
        lib.ssamba_chunk_scan_error.restype = ctypes.c_char_p
    except Exception as exc:  # KernelBuildError; OSError / AttributeError from a broken .so
        return None, f"{type(exc).__name__}: {exc}"
    return lib, ""


def _library(arch: str) -> ctypes.CDLL:
    lib, why = _load(arch)
    if lib is None:
        raise KernelBuildError(f"chunked scan unavailable on {arch}: {why}")
    return lib


@functools.lru_cache(maxsize=None)
def _device_facts(index: int) -> tuple[str, int]:
    """(architecture, multiprocessor count) of CUDA device ``index``, cached: asked at every scan call."""
    return device_arch(index), torch.cuda.get_device_properties(index).multi_processor_count


def _facts(device: torch.device | None) -> tuple[str, int]:
    index = None if device is None else torch.device(device).index
    if index is None:  # "the current device", which can change: not cached
        return device_arch(device), torch.cuda.get_device_properties(device).multi_processor_count
    return _device_facts(index)


def worthwhile(threads: int, length: int, sm_count: int) -> bool:
    """Whether ``threads`` channels (batch x channels) of ``length`` steps give the chunked scan enough
    (channel, chunk) pairs to beat mamba-ssm's kernel (:data:`MIN_THREADS_PER_SM` per multiprocessor)."""
    return threads * -(-length // MIN_CHUNK) >= sm_count * MIN_THREADS_PER_SM


def chunk_scan_fn(
    device: torch.device | None = None, threads: int | None = None, length: int | None = None
) -> Callable | None:
    """:func:`chunk_scan` where it can run on ``device`` (compiling it on first use), else ``None``.

    ``None`` for a CPU device, without CUDA, with ``SSAMBA_CHUNK_SCAN=0``, when the build fails (said
    once, with nvcc's error; not retried in this process), or, given ``threads`` (batch x channels) and
    ``length``, when the scan is too small for it to pay (:func:`worthwhile`).
    """
    if os.environ.get("SSAMBA_CHUNK_SCAN", "1") == "0" or not torch.cuda.is_available():
        return None
    if device is not None and torch.device(device).type != "cuda":
        return None
    if threads is not None and length is not None:
        arch, sms = _facts(device)
        if not worthwhile(threads, length, sms):
            return None
    else:
        arch = device_arch(device)
    lib, why = _load(arch)
    if lib is None:
        if arch not in _warned:
            _warned.add(arch)
            warnings.warn(f"chunked scan unavailable on {arch}, using mamba-ssm's scan: {why}")
        return None
    return chunk_scan


def plan_chunk_len(batch: int, channels: int, length: int, sm_count: int) -> int:
    """Chunk length (a multiple of :data:`TILE`): one chunk (a single pass) when ``batch * channels``
    threads reach :data:`ONE_PASS_THREADS_PER_SM` per multiprocessor, else chunks of at least
    :data:`MIN_CHUNK` steps, enough of them for :data:`THREADS_PER_SM` threads per multiprocessor.

    The thresholds come from the chunk-length sweep in docs/benchmarks.md section 1.
    """
    whole = -(-length // TILE) * TILE
    threads = batch * channels
    if threads >= sm_count * ONE_PASS_THREADS_PER_SM:
        return whole
    n = -(-(sm_count * THREADS_PER_SM) // threads)
    chunk = max(MIN_CHUNK, -(-length // n))
    return min(whole, -(-chunk // TILE) * TILE)


def _sets(X) -> tuple:
    """A parameter given as one tensor or as a pair of per-set tensors -> (set 0 or all, set 1 or None)."""
    if isinstance(X, (tuple, list)):
        if len(X) != 2:
            raise ValueError(f"a parameter given per set must be a pair of tensors; got {len(X)}")
        return X[0], X[1]
    return X, None


def _check(u, delta, A, B, C, D, delta_bias, param_repeat, param_period):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(
            f"u and delta must both be (batch, channels, length); got {tuple(u.shape)} and {tuple(delta.shape)}"
        )
    b, ch, L = u.shape
    A0, A1 = _sets(A)
    if A0.dim() != 2 or (A1 is not None and A1.shape != A0.shape):
        raise ValueError(
            f"A must be (rows, N), or a pair of equal (rows, N) tensors; got "
            f"{tuple(A0.shape)}" + ("" if A1 is None else f" and {tuple(A1.shape)}")
        )
    rows, n = A0.shape[0] * (1 if A1 is None else 2), A0.shape[1]
    period = (rows if A1 is None else A0.shape[0]) if param_period is None else param_period
    if rows * param_repeat != ch or rows % period or (A1 is not None and period != A0.shape[0]):
        raise ValueError(
            f"A has {rows} rows; with param_repeat={param_repeat} and param_period={period} it must cover {ch} channels"
        )
    for name, X in (("B", B), ("C", C)):
        if X.dim() not in (3, 4) or X.shape[0] != b or X.shape[-2:] != (n, L):
            raise ValueError(
                f"{name} must be (batch, N, length) or (batch, groups, N, length) with "
                f"batch={b}, N={n}, length={L}; got {tuple(X.shape)}"
            )
    groups = B.shape[1] if B.dim() == 4 else 1
    if (C.shape[1] if C.dim() == 4 else 1) != groups or ch % groups:
        raise ValueError(f"B and C must have the same number of groups, dividing {ch} channels")
    for name, X in (("D", D), ("delta_bias", delta_bias)):
        X0, X1 = _sets(X)
        if X0 is None:
            continue
        if (X1 is None) != (A1 is None):
            raise ValueError(f"{name} must be given per set exactly when A is")
        want = (rows,) if A1 is None else (period,)
        if X0.shape != want or (X1 is not None and X1.shape != want):
            raise ValueError(f"{name} must be {want} per set; got {tuple(X0.shape)}")
    return b, ch, L, n, groups, period


def chunk_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    param_repeat: int = 1,
    param_period: int | None = None,
    chunk_len: int | None = None,
    block_d: int | None = None,
    kernel: str = "auto",
    a_log: bool = False,
) -> torch.Tensor:
    """Selective scan forward on CUDA; returns ``y`` of ``u``'s shape and dtype (channel-first, contiguous).

    ``u, delta: (batch, channels, L)``, any strides; ``A: (rows, N)``; ``B, C: (batch, N, L)`` or
    ``(batch, groups, N, L)``, any strides; ``D``, ``delta_bias``: ``(rows,)``. Channel ``c`` uses
    parameter row ``(c // (param_repeat * param_period)) * param_period + c % param_period`` (default:
    row ``c``), so parameters repeated over a batch folded into the channels need not be copied.
    ``A``, ``D`` and ``delta_bias`` may also be pairs ``(set 0, set 1)`` of ``param_period`` rows each
    (e.g. a bidirectional mixer's two parameter sets, without concatenating them); with ``a_log`` the
    ``A`` tensors hold ``log(-A)`` (the ``A_log`` parameters) and ``A = -exp(A_log)`` is taken in the kernel.

    ``kernel``: ``"pipelined"`` (tiles copied to shared memory asynchronously, double-buffered; needs every
    row of ``u``, ``delta``, ``B``, ``C`` and ``y`` time-contiguous and 16-byte aligned, as in the fast
    mixer), ``"general"`` (any strides), or ``"auto"`` (pipelined where the layout allows).
    """
    b, ch, L, n, groups, period = _check(u, delta, A, B, C, D, delta_bias, param_repeat, param_period)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {tuple(KERNELS)}; got {kernel!r}")
    if u.dtype not in _DTYPES:
        raise ValueError(f"u must be float32, bfloat16 or float16; got {u.dtype}")
    if n not in STATE_SIZES:
        raise ValueError(f"chunk_scan supports N in {STATE_SIZES}; got {n}")
    dt = u.dtype
    delta, B, C = (X if X.dtype == dt else X.to(dt) for X in (delta, B, C))

    def f32(X):
        return None if X is None else X.float().contiguous()

    (A0, A1), (D0, D1), (bias0, bias1) = ((f32(x) for x in _sets(X)) for X in (A, D, delta_bias))
    gsize = ch // groups
    if block_d is None:
        block_d = next((s for s in BLOCK_SIZES if gsize % s == 0), None)
    if block_d is None or gsize % block_d:
        raise ValueError(f"chunk_scan needs channels per group ({gsize}) divisible by one of {BLOCK_SIZES}")
    dev = u.device
    arch, sms = _facts(dev)
    if chunk_len is None:
        chunk_len = plan_chunk_len(b, ch, L, sms)
    if chunk_len % TILE or chunk_len <= 0:
        raise ValueError(f"chunk_len must be a positive multiple of {TILE}; got {chunk_len}")
    n_chunks = max(1, -(-L // chunk_len))
    y = torch.empty((b, ch, L), dtype=dt, device=dev)
    state = torch.empty((b, n_chunks, ch, n) if n_chunks > 1 else (1,), dtype=torch.float32, device=dev)
    dsum = torch.empty((b, n_chunks, ch) if n_chunks > 1 else (1,), dtype=torch.float32, device=dev)
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    ptr = lambda X: None if X is None else X.data_ptr()  # noqa: E731
    p = _Params(
        u.data_ptr(),
        delta.data_ptr(),
        B4.data_ptr(),
        C4.data_ptr(),
        ptr(A0),
        ptr(D0),
        ptr(bias0),
        ptr(A1),
        ptr(D1),
        ptr(bias1),
        y.data_ptr(),
        state.data_ptr(),
        dsum.data_ptr(),
        b,
        ch,
        L,
        *u.stride(),
        *delta.stride(),
        *y.stride(),
        *B4.stride(),
        *C4.stride(),
        gsize,
        param_repeat,
        period,
        chunk_len,
        n_chunks,
        int(delta_softplus),
        int(a_log),
    )
    lib = _library(arch)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        rc = lib.ssamba_chunk_scan(ctypes.byref(p), _DTYPES[dt], n, block_d, KERNELS[kernel], ctypes.c_void_p(stream))
    if rc != 0:
        why = {
            -1: "dtype",
            -2: "block size",
            -3: "state size",
            -4: "the pipelined kernel needs time-contiguous, 16-byte aligned rows",
        }.get(rc)
        why = why or lib.ssamba_chunk_scan_error(rc).decode()
        raise RuntimeError(f"chunk_scan launch failed: {why} (code {rc})")
    return y


def chunk_scan_emulated(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    delta_bias=None,
    delta_softplus=False,
    param_repeat=1,
    param_period=None,
    chunk_len: int = TILE,
    dtype: torch.dtype = torch.float64,
    a_log: bool = False,
    **_kernel_options,
) -> torch.Tensor:
    """The kernel's three passes in torch (any device), in ``dtype``: for testing the chunk algebra and
    the parameter/set/group indexing on CPU. Returns ``y`` in ``u``'s dtype."""
    b, ch, L, n, groups, period = _check(u, delta, A, B, C, D, delta_bias, param_repeat, param_period)
    A, D, delta_bias = (
        None if X is None or _sets(X)[0] is None else torch.cat([x.to(dtype) for x in _sets(X) if x is not None])
        for X in (A, D, delta_bias)
    )
    if a_log:
        A = -torch.exp(A)
    c = torch.arange(ch, device=u.device)
    prow = (c // (param_repeat * period)) * period + c % period
    A_c = A.to(dtype)[prow]  # (ch, N)
    dl = delta.to(dtype) + (0 if delta_bias is None else delta_bias.to(dtype)[prow][:, None])
    dtv = torch.where(dl <= 20, torch.log1p(torch.exp(dl)), dl) if delta_softplus else dl  # (b, ch, L)
    gidx = c // (ch // groups)
    B_c = (B if B.dim() == 4 else B.unsqueeze(1)).to(dtype)[:, gidx]  # (b, ch, N, L)
    C_c = (C if C.dim() == 4 else C.unsqueeze(1)).to(dtype)[:, gidx]
    x = u.to(dtype)

    def scan(h, t0, t1, out):
        for t in range(t0, t1):
            h = torch.exp(dtv[:, :, t, None] * A_c) * h + (dtv[:, :, t] * x[:, :, t])[..., None] * B_c[:, :, :, t]
            if out is not None:
                out[:, :, t] = (h * C_c[:, :, :, t]).sum(-1)
        return h

    starts = list(range(0, L, chunk_len))
    ends, sums = [], []
    for t0 in starts[:-1]:  # pass 1: end state of each chunk from zero, and its sum of dt
        ends.append(scan(torch.zeros(b, ch, n, dtype=dtype, device=u.device), t0, t0 + chunk_len, None))
        sums.append(dtv[:, :, t0 : t0 + chunk_len].sum(-1))
    h_in = [torch.zeros(b, ch, n, dtype=dtype, device=u.device)]
    for e, s in zip(ends, sums):  # pass 2: the state entering each chunk
        h_in.append(torch.exp(A_c * s[..., None]) * h_in[-1] + e)
    y = torch.empty(b, ch, L, dtype=dtype, device=u.device)
    for t0, h0 in zip(starts, h_in):  # pass 3
        scan(h0, t0, min(L, t0 + chunk_len), y)
    if D is not None:
        y = y + D.to(dtype)[prow][:, None] * x
    return y.to(u.dtype)

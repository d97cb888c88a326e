"""The Mamba mixer, unidirectional or bidirectional ("bimamba v2"), on a chosen scan backend.

Shapes: input and output ``(B, L, D)``; inside, ``x, z: (B, d_inner, L)`` with ``d_inner = expand * D``.
Parameter names follow the official checkpoints (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``,
``A_log``, ``D``, their ``*_b`` backward twins, ``out_proj``). docs/model.md section 3.2.

Two computations of the same function:

- the *reference* path (:meth:`Mamba._forward_ref`): one conv and one scan per direction, the backward
  direction on flipped copies of ``x`` and ``z``, the gate applied inside each scan;
- the *fast* path (:meth:`Mamba._forward_fast`, default on the CUDA backend): both directions side by
  side as ``2 * d_inner`` channels of **one** conv and **one** scan call (the scan's ``B``/``C`` as two
  groups), their projections as one batched matmul each, the gate ``SiLU(z)`` applied once after the
  directions are summed (``SiLU(z) * y_f + SiLU(z) * y_b = SiLU(z) * (y_f + y_b)``), and the length
  padded at the end to the scan kernel's chunk size when that costs little: every op is causal in
  its own time direction, so padding after the last step leaves the real steps unchanged;
- at inference on CUDA the fast path's scan is the chunked scan (:mod:`ssamba.ops.chunk_scan`), which
  splits the sequence across thread blocks; with gradients it is mamba-ssm's.

``forward(hidden, reverse=True)`` computes ``flip(mixer(flip(hidden)))`` without the two flips: for a
bidirectional mixer it swaps which parameter set reads the sequence forwards. The encoder uses it for
the odd layer of each official layer pair.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssamba.config import ModelConfig
from ssamba.ops.backends import combine_gate_fn, combine_gate_train_fn, conv_fn, scan_fn
from ssamba.ops.chunk_scan import chunk_scan_fn
from ssamba.ops.train_scan import supported as train_scan_refuses  # "" when it takes the shape, else why
from ssamba.ops.train_scan import train_scan_fn


class Mamba(nn.Module):
    """Selective state-space mixer; with ``cfg.bimamba`` a second scan runs on the flipped sequence.

    ``out = out_proj((y_f + flip(y_b)) / 2)`` (``/2`` when ``cfg.divide_out``), where each ``y`` is
    ``SiLU(z) * scan(SiLU(causal_conv(x)))`` with the direction's own conv, projections, ``A`` and ``D``.
    """

    def __init__(self, cfg: ModelConfig, backend: str, zero_backward_dt_bias: bool = True):
        super().__init__()
        d, di, n, r = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank
        self.d_inner, self.d_state, self.dt_rank = di, n, r
        self.bimamba, self.divide_out = cfg.bimamba, cfg.divide_out
        self.backend = backend
        self._scan = scan_fn(backend)
        self._conv = conv_fn(backend)
        self.in_proj = nn.Linear(d, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1, bias=True)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(self._a_log_init(di, n))
        self.D = nn.Parameter(torch.ones(di))
        if self.bimamba:
            self.conv1d_b = nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1, bias=True)
            self.x_proj_b = nn.Linear(di, r + 2 * n, bias=False)
            self.dt_proj_b = nn.Linear(r, di, bias=True)
            self.A_b_log = nn.Parameter(self._a_log_init(di, n))
            self.D_b = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=False)
        self._init_dt(self.dt_proj, r)
        if self.bimamba:
            self._init_dt(self.dt_proj_b, r)
            if zero_backward_dt_bias:
                # Official quirk (docs/model.md section 3.2): the backward dt bias starts at zero (delta ~ 0.69).
                nn.init.zeros_(self.dt_proj_b.bias)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        with torch.no_grad():
            self.out_proj.weight /= math.sqrt(cfg.depth)
        # speed switches (same result either way): see the module docstring
        self.fast = backend == "cuda"
        self.pad_to_chunk = True
        self.pad_max_extra = 0.25  # pad only when it adds at most this fraction of the length
        self.chunk_scan = True  # inference on CUDA: the chunked scan (chunk_scan.py) instead of mamba-ssm's
        self.train_scan = True  # training on CUDA: the checkpointed scan (train_scan.py) instead of mamba-ssm's
        self.fused_gate = True  # on CUDA: direction sum + gate in one Triton kernel (and one for its backward)

    @staticmethod
    def _a_log_init(di: int, n: int) -> torch.Tensor:
        return torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(di, 1).contiguous()

    @staticmethod
    def _init_dt(lin: nn.Linear, r: int, dt_min=1e-3, dt_max=0.1, floor=1e-4) -> None:
        nn.init.uniform_(lin.weight, -(r**-0.5), r**-0.5)
        dt = torch.exp(torch.rand(lin.out_features) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():
            lin.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def _direction(self, x, z, conv: nn.Conv1d, x_proj: nn.Linear, dt_proj: nn.Linear, A_log, D):
        """One scan direction. ``x, z: (B, d_inner, L)`` -> ``(B, d_inner, L)``."""
        b, _, length = x.shape
        u = self._conv(x, conv.weight.squeeze(1), conv.bias, activation="silu")
        x_dbl = F.linear(u.transpose(1, 2), x_proj.weight)  # (B, L, R + 2N)
        dt, bmat, cmat = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ dt_proj.weight.t()).transpose(1, 2)  # (B, d_inner, L); bias goes in as delta_bias
        bmat = bmat.transpose(1, 2).contiguous()  # (B, N, L)
        cmat = cmat.transpose(1, 2).contiguous()
        A = -torch.exp(A_log.float())
        return self._scan(
            u.contiguous(),
            delta.contiguous(),
            A,
            bmat,
            cmat,
            D.float(),
            z=z.contiguous(),
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
        )

    def forward(self, hidden: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """``hidden: (B, L, D)`` -> ``(B, L, D)``; with ``reverse``, ``flip(mixer(flip(hidden)))``."""
        if self.fast:
            return self._forward_fast(hidden, reverse)
        if reverse:
            return self._forward_ref(hidden.flip(1)).flip(1)
        return self._forward_ref(hidden)

    def _params(self, backward: bool) -> tuple:
        if backward:
            return self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
        return self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D

    def _forward_fast(self, hidden: torch.Tensor, reverse: bool) -> torch.Tensor:
        """All directions in one conv and one scan call (module docstring).

        Layout: each direction reads ``hidden`` in its own time order, padded at its end; the directions
        sit side by side as channels of each batch element, ``(B, G * d_inner, Lp)``, so that the conv and
        the scan see ``B`` sequences of ``G * d_inner`` channels (their launch grids put the batch on the
        unbounded axis and ``G * d_inner <= 3072`` channels on the 65,535-limited one, :func:`fast_launch_shape`),
        the scan's ``B``/``C`` have one group per direction, and each direction's parameters are read
        where they are (no batch-repeated copies). The projections write channel-first tensors directly
        (no transposes), and the gate is applied once to the sum of the directions.
        """
        b, length, d = hidden.shape
        di, n, r = self.d_inner, self.d_state, self.dt_rank
        # (parameter set, reads the sequence reversed?): the forward set reads it in the given order
        groups = [(self._params(False), reverse)]
        if self.bimamba:
            groups.append((self._params(True), not reverse))
        g = len(groups)
        lp = padded_length(length, self.pad_max_extra) if self.pad_to_chunk else length
        lp = -(-lp // 8) * 8  # also keeps causal-conv1d off its wrong-gradient lengths (kernels.padded_cuda_conv)
        hs = hidden.new_empty(b, g, lp, d)  # each direction's input in its own time order
        for i, (_, rev) in enumerate(groups):
            hs[:, i, :length] = hidden.flip(1) if rev else hidden
        if lp > length:
            hs[:, :, length:] = 0  # finite values after the end: gradients through them stay finite
        w_in = self.in_proj.weight
        x = torch.matmul(w_in[:di], hs.transpose(-1, -2))  # (B, g, di, Lp), channel-first
        # the gate in the given order, from the padded copy that reads it so (rows lp apart: 16-byte aligned
        # operands keep cuBLAS on its fast kernels, e.g. at 22,001 tokens)
        given = next((i for i, (_, rev) in enumerate(groups) if not rev), None)
        if given is not None:
            z = torch.matmul(w_in[di:], hs[:, given].transpose(-1, -2))[..., :length]  # (B, di, L), rows lp apart
        else:
            z = torch.matmul(w_in[di:], hidden.transpose(1, 2))  # (B, di, L)
        ch = g * di

        def per_direction(ts):  # per (direction, channel): (g di, ...)
            return ts[0] if len(ts) == 1 else torch.cat(ts)

        w = per_direction([p[0].weight.squeeze(1) for p, _ in groups])  # (g di, W)
        bias = per_direction([p[0].bias for p, _ in groups])
        u = self._conv(x.view(b, ch, lp), w, bias, activation="silu")  # (B, g di, Lp)
        wx = torch.stack([p[1].weight for p, _ in groups])  # (g, R + 2N, di)
        x_dbl = torch.matmul(wx, u.view(b, g, di, lp))  # (B, g, R + 2N, Lp)
        bmat, cmat = x_dbl[:, :, r : r + n], x_dbl[:, :, r + n :]  # (B, g, N, Lp): one group per direction
        wdt = torch.stack([p[2].weight for p, _ in groups])  # (g, di, R)
        delta = torch.matmul(wdt, x_dbl[:, :, :r]).view(b, ch, lp)
        A_logs = [p[3] for p, _ in groups]
        Ds = [p[4] for p, _ in groups]
        biases = [p[2].bias for p, _ in groups]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, bmat, *A_logs, *Ds, *biases))
        cs = chunk_scan_fn(u.device, b * ch, lp) if self.chunk_scan and not needs_grad else None
        ts = train_scan_fn(u.device) if self.train_scan and cs is None else None
        if ts is not None and train_scan_refuses(ch, g, di, n, b):
            ts = None
        if cs is not None:  # inference: the kernel reads each direction's parameters where they are

            def sets(ts):
                return ts[0] if g == 1 else tuple(ts)

            y = cs(
                u,
                delta,
                sets(A_logs),
                bmat,
                cmat,
                sets(Ds),
                sets(biases),
                delta_softplus=True,
                param_period=di,
                a_log=True,
            )
        elif ts is not None:  # one thread per channel, checkpointed states: forward and backward
            y = ts(u, delta, tuple(A_logs), bmat, cmat, tuple(Ds), tuple(biases), delta_softplus=True, period=di)
        else:
            A = per_direction([-torch.exp(a.float()) for a in A_logs])
            y = self._scan(
                u,
                delta,
                A,
                bmat,
                cmat,
                per_direction([d.float() for d in Ds]),
                z=None,
                delta_bias=per_direction([x.float() for x in biases]),
                delta_softplus=True,
            )
        y = y.view(b, g, di, lp)
        scale = 0.5 if g > 1 and self.divide_out else 1.0
        revs = [rev for _, rev in groups]
        fused = None
        if y.is_cuda and self.fused_gate:
            fused = combine_gate_fn() if not torch.is_grad_enabled() else combine_gate_train_fn()
        if fused is not None:
            out = fused(y, z, length, revs, scale, out_stride=lp)
        else:
            parts = [y[:, i, :, :length].flip(-1) if rev else y[:, i, :, :length] for i, rev in enumerate(revs)]
            out = parts[0] + parts[1] if g > 1 else parts[0]
            out = out * F.silu(z) * scale if scale != 1.0 else out * F.silu(z)
        return torch.matmul(out.transpose(1, 2), self.out_proj.weight.t())  # (B, L, D)

    def _forward_ref(self, hidden: torch.Tensor) -> torch.Tensor:
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2 d_inner, L)
        x, z = xz.chunk(2, dim=1)
        y = self._direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        if self.bimamba:
            y_b = self._direction(
                x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
            )
            y = y + y_b.flip(-1)
            if self.divide_out:
                y = y / 2
        return self.out_proj(y.transpose(1, 2))


GRID_Y_LIMIT = 65535  # CUDA's limit on a launch grid's y (and z) dimension


def fast_launch_shape(batch: int, directions: int, d_inner: int) -> tuple[int, int]:
    """``(sequences, channels)`` of the conv and scan calls of the fast path: ``(batch, directions * d_inner)``.

    causal-conv1d and mamba-ssm launch grids of ``(sequences, channels / rows per block)`` and the training
    and chunked scans ``(channels / 32, ..., sequences)``-like grids, so the channel count must stay within
    :data:`GRID_Y_LIMIT` (it is at most 2 x 1536 for SSAMBA-base) and the batch is on the unbounded axis.
    The earlier layout, one sequence of ``directions * batch * d_inner`` channels, crossed the limit from
    SSAMBA-tiny at batch 86 (issue 12).
    """
    return batch, directions * d_inner


def scan_chunk(length: int) -> int:
    """The mamba-ssm forward scan's chunk (threads x items per thread) for a sequence ``length``."""
    for limit in (128, 256, 512, 1024):
        if length <= limit:
            return limit
    return 2048


def padded_length(length: int, max_extra: float = 0.25) -> int:
    """``length`` rounded up to the scan chunk (the kernels' even-length path) when that adds at most
    ``max_extra * length`` steps; else ``length``."""
    c = scan_chunk(length)
    lp = -(-length // c) * c
    return lp if lp - length <= max_extra * length else length

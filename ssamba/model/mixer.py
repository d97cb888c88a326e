"""The Mamba mixer, unidirectional or bidirectional ("bimamba v2"), on a chosen scan backend.

Shapes: input and output ``(B, L, D)``; inside, ``x, z: (B, d_inner, L)`` with ``d_inner = expand * D``.
Parameter names follow the official checkpoints (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``,
``A_log``, ``D``, their ``*_b`` backward twins, ``out_proj``). SPEC.md section 3.2.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssamba.config import ModelConfig
from ssamba.model.kernels import conv_fn, scan_fn


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
                # Official quirk (SPEC.md 3.2): the backward dt bias starts at zero (delta ~ 0.69).
                nn.init.zeros_(self.dt_proj_b.bias)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        with torch.no_grad():
            self.out_proj.weight /= math.sqrt(cfg.depth)

    @staticmethod
    def _a_log_init(di: int, n: int) -> torch.Tensor:
        return torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(di, 1).contiguous()

    @staticmethod
    def _init_dt(lin: nn.Linear, r: int, dt_min=1e-3, dt_max=0.1, floor=1e-4) -> None:
        nn.init.uniform_(lin.weight, -(r ** -0.5), r ** -0.5)
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
            u.contiguous(), delta.contiguous(), A, bmat, cmat, D.float(), z=z.contiguous(),
            delta_bias=dt_proj.bias.float(), delta_softplus=True,
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden: (B, L, D)`` -> ``(B, L, D)``."""
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2 d_inner, L)
        x, z = xz.chunk(2, dim=1)
        y = self._direction(x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)
        if self.bimamba:
            y_b = self._direction(x.flip(-1), z.flip(-1), self.conv1d_b, self.x_proj_b, self.dt_proj_b,
                                  self.A_b_log, self.D_b)
            y = y + y_b.flip(-1)
            if self.divide_out:
                y = y / 2
        return self.out_proj(y.transpose(1, 2))

"""The encoders (docs/model.md sections 2, 3, 7): sizes, token order, the bimamba v2 mixer, block / layer
pairing semantics, drop-path, mask embedding, gradients, pooling, SSAST attention, error messages."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssamba.base.errors import ConfigError
from ssamba.config import ModelConfig, apply_overrides, model_preset
from ssamba.model.audio_model import AudioModel, Geometry
from ssamba.model.encoder import MambaEncoder
from ssamba.model.layers import official_drop_path_rates
from ssamba.model.masking import make_masks
from ssamba.model.mixer import Mamba

SMALL_GEOM = Geometry(128, 128)  # 8 x 8 patches at stride 16


def small_model(arch: str = "ssamba", num_classes: int = 0, pretrain_heads: bool = True, **overrides) -> AudioModel:
    cfg = replace(model_preset("test", arch), scan_backend="reference", **overrides)
    return AudioModel(cfg, SMALL_GEOM, num_classes=num_classes, pretrain_heads=pretrain_heads)


def encoder_params(model: AudioModel) -> int:
    return sum(p.numel() for p in model.v.parameters())


# ------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    "size,layernorm,rmsnorm",
    [
        ("tiny", 6_922_176, 6_917_376),
        ("small", 25_345_920, 25_336_320),
        ("base", 96_698_112, 96_678_912),
    ],
)
def test_ssamba_encoder_parameter_counts_match_spec(size, layernorm, rmsnorm):
    cfg = model_preset(size)
    assert (cfg.depth, cfg.norm, cfg.d_state, cfg.d_conv, cfg.expand) == (24, "layernorm", 16, 4, 2)
    assert encoder_params(AudioModel(cfg)) == layernorm
    assert encoder_params(AudioModel(replace(cfg, norm="rmsnorm"))) == rmsnorm


@pytest.mark.parametrize("size,count", [("tiny", 5_487_168), ("small", 21_591_168), ("base", 85_649_664)])
def test_ssast_encoder_parameter_counts_match_spec(size, count):
    model = AudioModel(model_preset(size, "ssast"))
    assert len(model.v.blocks) == 12
    assert encoder_params(model) == count


def test_checkpoint_key_names_and_shapes_follow_official_layout():
    model = AudioModel(model_preset("tiny"), pretrain_heads=True)
    sd = model.state_dict()
    d, di, r = 192, 384, 12
    expected = {
        "mask_embed": (1, 1, d),
        "v.cls_token": (1, 1, d),
        "v.pos_embed": (1, 513, d),
        "v.patch_embed.proj.weight": (d, 1, 16, 16),
        "v.patch_embed.proj.bias": (d,),
        "v.layers.23.mixer.in_proj.weight": (4 * d, d),
        "v.layers.0.mixer.conv1d.weight": (di, 1, 4),
        "v.layers.0.mixer.x_proj.weight": (r + 32, di),
        "v.layers.0.mixer.dt_proj.weight": (di, r),
        "v.layers.0.mixer.A_log": (di, 16),
        "v.layers.0.mixer.D": (di,),
        "v.layers.0.mixer.conv1d_b.bias": (di,),
        "v.layers.0.mixer.x_proj_b.weight": (r + 32, di),
        "v.layers.0.mixer.dt_proj_b.bias": (di,),
        "v.layers.0.mixer.A_b_log": (di, 16),
        "v.layers.0.mixer.D_b": (di,),
        "v.layers.0.mixer.out_proj.weight": (d, di),
        "v.layers.0.norm.bias": (d,),
        "v.norm_f.weight": (d,),
        "cpredlayer.2.weight": (256, d),
        "gpredlayer.0.weight": (d, d),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "v.layers.24.norm.weight" not in sd
    # no bias in in_proj / x_proj / out_proj (docs/model.md section 3.2); the convs have one
    assert not any(k.endswith(("in_proj.bias", "x_proj.bias", "x_proj_b.bias", "out_proj.bias")) for k in sd)
    assert "v.layers.0.mixer.conv1d.bias" in sd


# ------------------------------------------------------------------------------ tokens and order
def summing_patch_conv(enc: nn.Module) -> None:
    """Make every output channel of the patch conv the plain sum of its patch."""
    with torch.no_grad():
        enc.patch_embed.proj.weight.fill_(1.0)
        enc.patch_embed.proj.bias.zero_()


def embedded_tokens(arch: str, enc: nn.Module, fbank: torch.Tensor) -> torch.Tensor:
    """Tokens before any block, with cls/dist/positions zeroed so only patch contents remain."""
    with torch.no_grad():
        enc.pos_embed.zero_()
        enc.cls_token.zero_()
        if arch == "ssast":
            enc.dist_token.zero_()
            enc.blocks = nn.ModuleList()  # no blocks, no final norm: the forward returns the embedding
            enc.norm = nn.Identity()
            return enc(fbank)
        return enc.embed(fbank)


@pytest.mark.parametrize("arch,n_prefix", [("ssamba", 1), ("ssast", 2)])
@pytest.mark.parametrize(
    "frames,stride,grid",
    [
        (1024, 16, (8, 64)),
        (1024, 10, (12, 101)),
        (512, 10, (12, 50)),
        (128, 10, (12, 12)),
    ],
)
def test_token_order_is_frequency_major_after_prefix(arch, n_prefix, frames, stride, grid):
    cfg = replace(
        model_preset("test", arch), embed_dim=8, num_heads=2, fstride=stride, tstride=stride, scan_backend="reference"
    )
    model = AudioModel(cfg, Geometry(128, frames), pretrain_heads=False)
    assert model.grid == grid and model.num_patches == grid[0] * grid[1]
    enc = model.v
    summing_patch_conv(enc)
    fg, tg = grid
    probes = [(0, 0), (0, tg - 1), (fg - 1, 0), (fg - 1, tg - 1), (fg // 2, tg // 3), (1, 2)]
    fbank = torch.zeros(len(probes), frames, 128)
    for b, (f, t) in enumerate(probes):
        if stride == 16:  # non-overlapping: light the whole 16 x 16 region of patch (f, t)
            fbank[b, t * 16 : (t + 1) * 16, f * 16 : (f + 1) * 16] = 1.0
        else:  # overlapping patches: one pixel that lies in patch (f, t) and in no other patch
            fbank[b, t * stride + stride - 1, f * stride + stride - 1] = 1.0
    tokens = embedded_tokens(arch, enc, fbank)
    assert tokens.shape == (len(probes), n_prefix + fg * tg, 8)
    value = 256.0 if stride == 16 else 1.0
    for b, (f, t) in enumerate(probes):
        lit = torch.nonzero(tokens[b].abs().sum(-1)).flatten().tolist()
        assert lit == [n_prefix + f * tg + t], (f, t, lit)
        assert torch.allclose(tokens[b, n_prefix + f * tg + t], torch.full((8,), value))


# -------------------------------------------------------------------------------------- the mixer
def naive_direction(x, z, conv_w, conv_b, x_proj_w, dt_w, dt_b, A_log, Dskip, dt_rank, d_state):
    """One scan direction written from docs/model.md section 3.2 with a per-token loop. x, z: (B, d_inner, L)."""
    length = x.shape[-1]
    k = conv_w.shape[-1]
    u = F.silu(F.conv1d(F.pad(x, (k - 1, 0)), conv_w, conv_b, groups=x.shape[1]))  # causal, left pad 3
    dbc = u.transpose(1, 2) @ x_proj_w.t()  # (B, L, R + 2N)
    dt, bm, cm = dbc[..., :dt_rank], dbc[..., dt_rank : dt_rank + d_state], dbc[..., dt_rank + d_state :]
    delta = F.softplus(dt @ dt_w.t() + dt_b)  # (B, L, d_inner)
    A = -torch.exp(A_log)  # (d_inner, N)
    h = torch.zeros(x.shape[0], x.shape[1], d_state)
    ys = []
    for t in range(length):
        dlt = delta[:, t, :, None]
        h = torch.exp(dlt * A) * h + dlt * bm[:, t, None, :] * u[:, :, t, None]
        ys.append((h * cm[:, t, None, :]).sum(-1) + Dskip * u[:, :, t])
    y = torch.stack(ys, dim=-1)
    return y * F.silu(z)


def mixer_cfg(**kw) -> ModelConfig:
    return replace(model_preset("test"), scan_backend="reference", **kw)


def randomise(module: nn.Module, seed: int = 0) -> None:
    """Move every parameter off its structured init so a wrong pairing of parameters shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_unidirectional_mixer_has_no_backward_parameters_and_is_causal():
    uni = Mamba(mixer_cfg(bimamba=False), "reference")
    names = [n for n, _ in uni.named_parameters()]
    assert not [n for n in names if "_b" in n.split(".")[0]]
    assert set(names) == {
        "in_proj.weight",
        "conv1d.weight",
        "conv1d.bias",
        "x_proj.weight",
        "dt_proj.weight",
        "dt_proj.bias",
        "A_log",
        "D",
        "out_proj.weight",
    }
    bi = Mamba(mixer_cfg(), "reference")
    assert {
        "conv1d_b.weight",
        "conv1d_b.bias",
        "x_proj_b.weight",
        "dt_proj_b.weight",
        "dt_proj_b.bias",
        "A_b_log",
        "D_b",
    } <= {n for n, _ in bi.named_parameters()}
    # causality: a change at token 5 leaves tokens 0..4 of the unidirectional output untouched,
    # but reaches them through the backward scan of the bidirectional mixer
    x = torch.randn(2, 9, 32)
    x2 = x.clone()
    x2[:, 5] += 1.0
    with torch.no_grad():
        assert torch.equal(uni(x)[:, :5], uni(x2)[:, :5])
        assert not torch.allclose(uni(x)[:, 5:], uni(x2)[:, 5:])
        assert not torch.allclose(bi(x)[:, :5], bi(x2)[:, :5])


def test_mixer_init_follows_spec():
    m = Mamba(mixer_cfg(), "reference")
    n = m.d_state
    assert torch.allclose(m.A_log, torch.log(torch.arange(1, n + 1).float()).expand(m.d_inner, n))
    assert torch.allclose(m.A_b_log, m.A_log) and torch.equal(m.D, torch.ones(m.d_inner))
    assert torch.equal(m.dt_proj_b.bias, torch.zeros(m.d_inner))  # the Vim quirk
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    bound = m.dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= bound and m.dt_proj_b.weight.abs().max() <= bound


def test_direction_matches_naive_spec_scan():
    m = Mamba(mixer_cfg(), "reference")
    randomise(m, 1)
    x = torch.randn(2, m.d_inner, 7)
    z = torch.randn(2, m.d_inner, 7)
    for conv, xp, dtp, a_log, dsk in [
        (m.conv1d, m.x_proj, m.dt_proj, m.A_log, m.D),
        (m.conv1d_b, m.x_proj_b, m.dt_proj_b, m.A_b_log, m.D_b),
    ]:
        with torch.no_grad():
            got = m._direction(x, z, conv, xp, dtp, a_log, dsk)
            ref = naive_direction(
                x, z, conv.weight, conv.bias, xp.weight, dtp.weight, dtp.bias, a_log, dsk, m.dt_rank, m.d_state
            )
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("divide_out", [True, False])
def test_bidirectional_mixer_is_forward_plus_flipped_backward(divide_out):
    bi = Mamba(mixer_cfg(divide_out=divide_out), "reference")
    randomise(bi, 2)
    uni = Mamba(mixer_cfg(bimamba=False), "reference")
    fwd_state = {k: v for k, v in bi.state_dict().items() if k in uni.state_dict()}
    uni.load_state_dict(fwd_state, strict=True)
    h = torch.randn(2, 11, 32)
    with torch.no_grad():
        x, z = bi.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # x: first d_inner channels, z: last
        y_b = bi._direction(x.flip(-1), z.flip(-1), bi.conv1d_b, bi.x_proj_b, bi.dt_proj_b, bi.A_b_log, bi.D_b)
        back = bi.out_proj(y_b.flip(-1).transpose(1, 2))  # out_proj is linear without bias
        expected = uni(h) + back
        if divide_out:
            expected = expected / 2
        got = bi(h)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # the backward half really is there and uses its own parameters
    assert not torch.allclose(got, uni(h) / (2 if divide_out else 1), atol=1e-4)
    with torch.no_grad():
        bi.x_proj_b.weight.add_(0.5)
        assert not torch.allclose(bi(h), got, atol=1e-4)


# ---------------------------------------------------------------------- blocks and layer pairing
def spec_blocks(enc: MambaEncoder, hidden: torch.Tensor) -> torch.Tensor:
    """docs/model.md sections 3.1, 3.3, 3.4 (eval mode: drop-path is the identity)."""
    cfg = enc.cfg

    def block(layer, h, r):
        r = h if r is None else r + h
        normed = layer.norm(r.to(layer.norm.weight.dtype))
        if cfg.residual_in_fp32:
            r = r.float()
        return layer.mixer(normed), r

    h, r = hidden, None
    if cfg.layer_pairing:
        for i in range(cfg.depth // 2):
            h_f, r_f = block(enc.layers[2 * i], h, r)
            h_b, r_b = block(enc.layers[2 * i + 1], h.flip(1), None if r is None else r.flip(1))
            h, r = h_f + h_b.flip(1), r_f + r_b.flip(1)
    else:
        for layer in enc.layers:
            h, r = block(layer, h, r)
    r = r + h
    out = enc.norm_f(r.to(enc.norm_f.weight.dtype))
    if cfg.final_norm_twice:
        out = enc.norm_f(out)
    return out


@pytest.mark.parametrize("pairing", [True, False])
@pytest.mark.parametrize("twice", [True, False])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_blocks_match_spec_pseudocode(pairing, twice, norm):
    cfg = replace(
        model_preset("test"),
        depth=4,
        layer_pairing=pairing,
        final_norm_twice=twice,
        norm=norm,
        scan_backend="reference",
    )
    enc = MambaEncoder(cfg, 128, 64).eval()
    randomise(enc, 3)
    hidden = torch.randn(2, 1 + enc.num_patches, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.blocks(hidden), spec_blocks(enc, hidden), atol=1e-6, rtol=1e-5)


def test_switches_change_the_output():
    """Each switch really does something (otherwise the comparisons above prove little)."""
    base = replace(model_preset("test"), depth=4, scan_backend="reference")
    enc = MambaEncoder(base, 128, 64).eval()
    randomise(enc, 4)
    hidden = torch.randn(2, 1 + enc.num_patches, 32)
    outs = {}
    with torch.no_grad():
        for name, changes in {
            "ref": {},
            "no_pair": {"layer_pairing": False},
            "once": {"final_norm_twice": False},
        }.items():
            enc.cfg = replace(base, **changes)
            outs[name] = enc.blocks(hidden)
    assert not torch.allclose(outs["ref"], outs["no_pair"], atol=1e-4)
    assert not torch.allclose(outs["ref"], outs["once"], atol=1e-4)


def test_layer_pairing_is_flip_equivariant_under_swapped_pair_weights():
    """Pairing runs layer 2i on the sequence and 2i+1 on its flip, flipping hidden AND residual back:
    swapping the two layers of every pair and flipping the input must flip the output."""
    cfg = replace(model_preset("test"), depth=4, scan_backend="reference")
    enc = MambaEncoder(cfg, 128, 64).eval()
    randomise(enc, 5)
    swapped = MambaEncoder(cfg, 128, 64).eval()
    swapped.load_state_dict(enc.state_dict())
    swapped.layers = nn.ModuleList([swapped.layers[i ^ 1] for i in range(cfg.depth)])
    hidden = torch.randn(2, 1 + enc.num_patches, 32)
    with torch.no_grad():
        torch.testing.assert_close(swapped.blocks(hidden.flip(1)), enc.blocks(hidden).flip(1), atol=1e-5, rtol=1e-4)


def test_residual_in_fp32_keeps_the_residual_stream_in_float32():
    for fp32 in (True, False):
        cfg = replace(model_preset("test"), depth=2, residual_in_fp32=fp32, scan_backend="reference")
        enc = MambaEncoder(cfg, 128, 64).eval()
        randomise(enc, 6)
        enc = enc.to(torch.bfloat16)
        hidden = torch.randn(2, 1 + enc.num_patches, 32).to(torch.bfloat16)
        with torch.no_grad():
            h, r = enc.layers[0](hidden, None)
            assert h.dtype == torch.bfloat16
            assert r.dtype == (torch.float32 if fp32 else torch.bfloat16)
            _, r2 = enc.layers[1](h, r)
            assert r2.dtype == r.dtype
            got = enc.blocks(hidden)
            ref = spec_blocks(enc, hidden)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), ref.float(), atol=0, rtol=0)


# ---------------------------------------------------------------------------------- drop-path
def test_official_drop_path_schedule():
    rates = official_drop_path_rates(24, 0.1)
    expected = ([0.0] + [0.1 * i / 23 for i in range(24)])[:24]
    assert len(rates) == 24
    assert rates == pytest.approx(expected, abs=1e-7)
    assert rates[0] == 0.0 and rates[1] == 0.0 and rates[2] == pytest.approx(0.1 / 23)
    assert rates[-1] == pytest.approx(0.1 * 22 / 23)  # the off-by-one: 0.1 itself is never reached
    enc = MambaEncoder(replace(model_preset("test"), depth=24, drop_path=0.1), 128, 32)
    assert [layer.drop_path.p for layer in enc.layers] == pytest.approx(expected, abs=1e-7)
    assert enc.drop_path_f.p == pytest.approx(0.1)


def test_drop_path_is_deterministic_in_eval_and_stochastic_in_train():
    model = small_model(depth=4, drop_path=0.5)
    x = torch.randn(4, 128, 128)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        a = model.encode(x)
        torch.manual_seed(1)
        b = model.encode(x)
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        c = model.encode(x)
        torch.manual_seed(1)
        d = model.encode(x)
        torch.manual_seed(0)
        c2 = model.encode(x)
    assert not torch.allclose(c, d)
    assert torch.equal(c, c2)
    # without drop-path, train mode is deterministic too: the randomness above is drop-path's
    still = small_model(depth=4, drop_path=0.0).train()
    with torch.no_grad():
        torch.manual_seed(0)
        e = still.encode(x)
        torch.manual_seed(1)
        f = still.encode(x)
    assert torch.equal(e, f)


# ---------------------------------------------------------------------------------- mask embedding
def test_mask_embed_replaces_patch_embedding_before_positions():
    model = small_model()
    enc = model.v
    x = torch.randn(2, 128, 128)
    masks = torch.tensor([[0, 3, 17, 63], [5, 6, 7, 40]])
    with torch.no_grad():
        tokens = enc.embed(x, masks, model.mask_embed)
        patches = enc.patch_embed(x)
    pos = enc.pos_embed[0]
    content = tokens - pos  # (B, 1 + N, D)
    torch.testing.assert_close(content[:, 0], enc.cls_token[0].expand(2, -1))
    for b in range(2):
        masked = set(masks[b].tolist())
        for i in range(enc.num_patches):
            want = model.mask_embed[0, 0] if i in masked else patches[b, i]
            torch.testing.assert_close(content[b, i + 1], want, atol=1e-6, rtol=1e-5)


def test_ssast_mask_embed_replaces_patch_embedding_before_positions():
    model = small_model("ssast")
    x = torch.randn(2, 128, 128)
    masks = torch.tensor([[1, 2, 60], [0, 9, 33]])
    with torch.no_grad():
        patches = model.v.patch_embed(x)
        tokens = embedded_tokens("ssast", model.v, x)  # zeroes prefix tokens and positions
        masked_tokens = model.v(x, masks, model.mask_embed)
    torch.testing.assert_close(tokens[:, 2:], patches)
    for b in range(2):
        for i in range(model.num_patches):
            want = model.mask_embed[0, 0] if i in masks[b].tolist() else patches[b, i]
            torch.testing.assert_close(masked_tokens[b, i + 2], want)


# ---------------------------------------------------------------------------------- gradients
def assert_grads(model: nn.Module, expect_none: set[str]) -> None:
    for name, p in model.named_parameters():
        if any(name == e or name.startswith(e + ".") for e in expect_none):
            assert p.grad is None or not p.grad.abs().any(), f"{name} should be unused"
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("arch", ["ssamba", "ssast"])
def test_every_parameter_gets_a_gradient(arch):
    torch.manual_seed(0)
    model = small_model(arch, num_classes=3).eval()  # eval: drop-path cannot zero a whole branch
    x = torch.randn(2, 128, 128)
    rng = np.random.default_rng(0)
    mask_d = make_masks("cluster", 2, 8, 8, 20, rng)
    mask_g = make_masks("cluster", 2, 8, 8, 20, rng)
    model.pretrain_losses(x, mask_d, mask_g)["loss"].backward()
    assert_grads(model, {"mlp_head"})
    model.zero_grad(set_to_none=True)
    logits = model(x)
    assert logits.shape == (2, 3)
    F.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert_grads(model, {"mask_embed", "cpredlayer", "gpredlayer"})


# ---------------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("arch,n_prefix", [("ssamba", 1), ("ssast", 2)])
def test_pooling(arch, n_prefix):
    x = torch.randn(3, 128, 128)
    mean_model = small_model(arch, num_classes=4).eval()
    cls_model = small_model(arch, num_classes=4, pooling="cls").eval()
    cls_model.load_state_dict(mean_model.state_dict())
    with torch.no_grad():
        tokens = mean_model.encode(x)
        assert tokens.shape == (3, n_prefix + 64, 32)
        torch.testing.assert_close(mean_model.pooled(x), tokens[:, n_prefix:].mean(1))
        cls = tokens[:, 0] if arch == "ssamba" else (tokens[:, 0] + tokens[:, 1]) / 2
        torch.testing.assert_close(cls_model.pooled(x), cls)
        torch.testing.assert_close(mean_model(x), mean_model.mlp_head(tokens[:, n_prefix:].mean(1)))
        assert not torch.allclose(mean_model(x), cls_model(x))


def test_ssast_fused_and_materialised_attention_agree():
    fused = small_model("ssast", attention="fused").eval()
    mat = small_model("ssast", attention="materialized").eval()
    mat.load_state_dict(fused.state_dict())
    x = torch.randn(2, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(fused.encode(x), mat.encode(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("arch", ["ssamba", "ssast"])
def test_wrong_input_length_raises_clear_value_error(arch):
    model = small_model(arch, num_classes=2)
    with pytest.raises(ValueError, match=r"80 patches but the position embedding has 64"):
        model.encode(torch.randn(1, 160, 128))  # 8 x 10 patches for a model built for 8 x 8
    with pytest.raises(ValueError, match="position embedding"):
        model(torch.randn(1, 112, 128))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_backend_without_cuda_is_a_config_error():
    with pytest.raises(ConfigError, match=r"python -m ssamba\.kernels build"):
        AudioModel(replace(model_preset("test"), scan_backend="cuda"), SMALL_GEOM)


def test_invalid_config_values_raise_config_error():
    with pytest.raises(ConfigError, match="batchnorm"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ConfigError, match="even model.depth"):
        ModelConfig(depth=3, layer_pairing=True)
    assert ModelConfig(depth=3, layer_pairing=False).depth == 3
    with pytest.raises(ConfigError):
        apply_overrides(model_preset("test"), {"norm": "batchnorm"})
    with pytest.raises(ConfigError):
        apply_overrides(model_preset("test"), {"depth": "5"})  # pairing on by default
    with pytest.raises(ConfigError, match="scan_backend"):
        ModelConfig(scan_backend="triton")
    with pytest.raises(ConfigError):
        model_preset("huge")


def test_encode_with_masks_needs_mask_embed():
    model = small_model(pretrain_heads=False)
    with pytest.raises(ValueError, match="mask_embed"):
        model.encode(torch.randn(1, 128, 128), torch.tensor([[1, 2]]))


def test_norm_kind_decides_norm_bias_keys():
    ln = small_model().state_dict()
    rms = small_model(norm="rmsnorm").state_dict()
    assert "v.layers.0.norm.bias" in ln and "v.norm_f.bias" in ln
    assert "v.layers.0.norm.bias" not in rms and "v.norm_f.bias" not in rms
    assert math.isclose(small_model(norm="rmsnorm").v.norm_f.eps, 1e-5)

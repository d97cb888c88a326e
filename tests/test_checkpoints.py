"""Our checkpoint format, strict loading, and moving a pretrained encoder to a fine-tuning geometry
(docs/model.md section 5.3: the position-embedding arithmetic)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ssamba.config import model_preset
from ssamba.model import checkpoints as ckpt_mod
from ssamba.model.audio_model import AudioModel, Geometry
from ssamba.model.checkpoints import (
    CheckpointError,
    adapt_pos_embed,
    grid_of,
    load_checkpoint,
    load_strict,
    read_checkpoint,
    save_checkpoint,
    transfer_encoder,
)


def make_model(arch="ssamba", geom=Geometry(128, 128), num_classes=0, pretrain_heads=True, **kw) -> AudioModel:
    cfg = replace(model_preset("test", arch), scan_backend="reference", **kw)
    return AudioModel(cfg, geom, num_classes=num_classes, pretrain_heads=pretrain_heads).eval()


# ------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize(
    "arch,extra",
    [
        ("ssamba", {}),
        ("ssamba", {"norm": "rmsnorm", "layer_pairing": False, "final_norm_twice": False, "pooling": "cls"}),
        ("ssast", {"attention": "materialized"}),
    ],
)
def test_save_load_round_trip(tmp_path, arch, extra):
    torch.manual_seed(0)
    model = make_model(arch, Geometry(128, 96), num_classes=3, **extra)
    path = tmp_path / "sub" / "model.pt"
    meta = dict(
        config={"seed": 3, "model.arch": arch, "finetune.lr": 1e-4},
        frontend={"mean": -4.27, "std": 4.57, "num_mel_bins": 128},
        label_vocab=["a", "b", "c"],
        metrics={"acc": 0.5, "step": 7},
    )
    assert save_checkpoint(path, model, **meta) == path
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temp file left behind

    loaded, payload = load_checkpoint(path)
    assert loaded.cfg == model.cfg
    assert loaded.geom == model.geom and loaded.num_classes == 3 and hasattr(loaded, "mask_embed")
    assert payload["config"] == meta["config"] and payload["frontend"] == meta["frontend"]
    assert payload["label_vocab"] == ["a", "b", "c"] and payload["metrics"] == {"acc": 0.5, "step": 7.0}
    assert grid_of(payload) == model.grid
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(2, 96, 128)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        masks = torch.tensor([[1, 4, 9, 20], [0, 2, 3, 40]])
        a = model.pretrain_losses(x, masks)
        b = loaded.pretrain_losses(x, masks)
        assert torch.equal(a["loss"], b["loss"])
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "ssamba-checkpoint" and raw["model"]["arch"] == arch


def test_save_unwraps_a_module_wrapper(tmp_path):
    model = make_model(num_classes=2)
    wrapper = torch.nn.Module()
    wrapper.module = model
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "w.pt", wrapper))
    assert not any(k.startswith("module.") for k in loaded.state_dict())


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    model = make_model()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, metrics={"acc": 1.0})
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, make_model(), metrics={"acc": 0.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------------ bad files
def test_read_checkpoint_rejects_foreign_and_missing_files(tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save(make_model().state_dict(), plain)  # what the authors' .pth files look like to us
    with pytest.raises(CheckpointError, match="not an ssamba checkpoint.*import_official"):
        read_checkpoint(plain)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip nor a pickle")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(garbage)


def test_read_checkpoint_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "ssamba-checkpoint", "obj": Geometry(128, 128)}, path)  # a non-allowlisted class
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(path)


def test_load_strict_reports_every_problem_at_once():
    model = make_model()
    state = dict(model.state_dict())
    del state["v.norm_f.bias"]
    state["v.extra.weight"] = torch.zeros(3)
    state["v.cls_token"] = torch.zeros(1, 1, 7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_strict(model, state, source="x.pt")
    msg = str(err.value)
    assert "x.pt" in msg
    assert "v.norm_f.bias" in msg and "v.extra.weight" in msg
    assert "v.cls_token: (1, 1, 7) vs model (1, 1, 32)" in msg
    # nothing was loaded
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_load_strict_rejects_layernorm_weights_into_rmsnorm_model():
    """The SUPERB pitfall (docs/model.md section 10): LayerNorm biases must not be dropped silently."""
    ln = make_model().state_dict()
    with pytest.raises(CheckpointError, match="norm.bias"):
        load_strict(make_model(norm="rmsnorm"), ln, source="ln")


# ------------------------------------------------------------------------------ pos-embed arithmetic
def independent_adapt(pos, src, dst, n_prefix):
    """docs/model.md section 5.3 written out with F.interpolate on a (1, D, f, t) view."""
    pf, pt = src
    f, t = dst
    d = pos.shape[-1]
    grid = pos[0, n_prefix:].reshape(pf, pt, d).permute(2, 0, 1)[None]  # frequency-major rows
    if t < pt:
        s = int(pt / 2) - int(t / 2)
        grid = grid[..., s : s + t]
    else:
        grid = F.interpolate(grid, size=(8, t), mode="bilinear", align_corners=False)  # the official 8
    if f < pf:
        s = int(pf / 2) - int(f / 2)
        grid = grid[:, :, s : s + f]
    else:
        grid = F.interpolate(grid, size=(f, t), mode="bilinear", align_corners=False)
    return torch.cat([pos[:, :n_prefix], grid[0].permute(1, 2, 0).reshape(1, f * t, d)], dim=1)


@pytest.mark.parametrize("n_prefix", [1, 2])
@pytest.mark.parametrize("dst", [(12, 50), (12, 101), (8, 64), (12, 12)])
def test_adapt_pos_embed_matches_spec(n_prefix, dst):
    torch.manual_seed(0)
    pos = torch.randn(1, n_prefix + 8 * 64, 6)
    out = adapt_pos_embed(pos, (8, 64), dst, n_prefix)
    assert out.shape == (1, n_prefix + dst[0] * dst[1], 6)
    assert torch.equal(out[:, :n_prefix], pos[:, :n_prefix])
    torch.testing.assert_close(out, independent_adapt(pos, (8, 64), dst, n_prefix), atol=1e-6, rtol=0)
    if dst == (8, 64):
        torch.testing.assert_close(out, pos, atol=1e-6, rtol=0)


def test_adapt_pos_embed_crop_indices():
    """Positions coded by their (f, t): the crop keeps columns 7:57 of 64 (time), rows 2:6 of 8 (freq)."""
    f_idx = torch.arange(8)[:, None].expand(8, 64)
    t_idx = torch.arange(64)[None, :].expand(8, 64)
    code = torch.stack([f_idx, t_idx], -1).reshape(1, 512, 2).float()
    pos = torch.cat([torch.full((1, 1, 2), -1.0), code], dim=1)
    out = adapt_pos_embed(pos, (8, 64), (8, 50), 1)  # time crop only
    assert out[0, 0].tolist() == [-1.0, -1.0]
    for f in range(8):
        for t in range(50):
            assert out[0, 1 + f * 50 + t].tolist() == [f, t + 7]
    out = adapt_pos_embed(pos, (8, 64), (4, 12), 1)  # both crops: rows 4-2=2.., columns 32-6=26..
    for f in range(4):
        for t in range(12):
            assert out[0, 1 + f * 12 + t].tolist() == [f + 2, t + 26]
    # the frequency interpolation to 12 rows keeps the time coordinate and spreads the band coordinate
    out = adapt_pos_embed(pos, (8, 64), (12, 50), 1)
    g = out[0, 1:].reshape(12, 50, 2)
    assert torch.allclose(g[..., 1], (torch.arange(50) + 7.0).expand(12, 50))
    assert (g[1:, :, 0] >= g[:-1, :, 0]).all() and g[0, 0, 0] == 0 and g[-1, 0, 0] == 7


def test_adapt_pos_embed_rejects_wrong_length():
    with pytest.raises(CheckpointError, match="positions"):
        adapt_pos_embed(torch.zeros(1, 100, 4), (8, 64), (12, 12), 1)


# ------------------------------------------------------------------------------------ transfer
@pytest.mark.parametrize("arch", ["ssamba", "ssast"])
@pytest.mark.parametrize("frames,grid", [(64, (12, 5)), (200, (12, 19))])
def test_transfer_encoder_to_finetuning_geometry(arch, frames, grid):
    torch.manual_seed(0)
    pre = make_model(arch)  # stride 16, 128 x 128: 8 x 8 patches
    assert pre.grid == (8, 8)
    src = pre.state_dict()
    ft = make_model(arch, Geometry(128, frames), num_classes=5, pretrain_heads=False, fstride=10, tstride=10)
    assert ft.grid == grid
    fresh_head = {k: v.clone() for k, v in ft.state_dict().items() if k.startswith("mlp_head.")}
    dropped = transfer_encoder(src, (8, 8), ft)

    n_prefix = ft.v.n_prefix
    got = ft.state_dict()
    for k, v in src.items():
        if k.startswith("v.") and k != "v.pos_embed":
            assert torch.equal(got[k], v), k
    assert torch.equal(ft.v.patch_embed.proj.weight, pre.v.patch_embed.proj.weight)
    assert torch.equal(ft.v.patch_embed.proj.bias, pre.v.patch_embed.proj.bias)
    assert ft.v.patch_embed.proj.stride == (10, 10)
    want_pos = independent_adapt(src["v.pos_embed"], (8, 8), grid, n_prefix)
    assert got["v.pos_embed"].shape == (1, n_prefix + grid[0] * grid[1], 32)
    torch.testing.assert_close(got["v.pos_embed"], want_pos, atol=1e-6, rtol=0)
    for k, v in fresh_head.items():
        assert torch.equal(got[k], v), k  # the classifier is left as initialised

    heads = {k for k in src if k == "mask_embed" or k.startswith(("cpredlayer.", "gpredlayer."))}
    assert len(heads) == 9
    assert {d.split(" ")[0] for d in dropped} == heads
    assert all("pretraining head" in d for d in dropped)

    x = torch.randn(2, frames, 128)
    with torch.no_grad():
        logits = ft(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_transfer_keeps_heads_when_target_has_them_and_drops_foreign_classifier():
    pre = make_model(num_classes=7)
    src = pre.state_dict()
    target = make_model("ssamba", Geometry(128, 128), num_classes=0)
    dropped = transfer_encoder(src, (8, 8), target)
    assert sorted(d.split(" ")[0] for d in dropped) == [
        "mlp_head.0.bias",
        "mlp_head.0.weight",
        "mlp_head.1.bias",
        "mlp_head.1.weight",
    ]
    assert all("classifier of another task" in d for d in dropped)
    for k, v in target.state_dict().items():
        assert torch.equal(v, src[k]), k  # same geometry: everything, pos_embed included, carried over


def test_transfer_rejects_stray_keys():
    pre = make_model()
    ft = make_model("ssamba", Geometry(128, 64), num_classes=2, pretrain_heads=False, fstride=10, tstride=10)
    src = dict(pre.state_dict())
    src["something.else"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="something.else"):
        transfer_encoder(src, (8, 8), ft)
    src = dict(pre.state_dict())
    src["v.head.weight"] = torch.zeros(1000, 32)  # an encoder key the model does not have
    with pytest.raises(CheckpointError, match="v.head.weight"):
        transfer_encoder(src, (8, 8), ft)
    src = dict(pre.state_dict())
    del src["v.norm_f.weight"]
    with pytest.raises(CheckpointError, match="v.norm_f.weight"):
        transfer_encoder(src, (8, 8), ft)

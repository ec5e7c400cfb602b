"""EDM2's magnitude-preserving network (Karras et al. 2024): the paper's properties, its released
sizes, the uncertainty loss, and an EDM2-S-shaped teacher tuned with the imagenet64 recipe."""

import math

import numpy as np
import pytest
import torch

from ectune.cli import main
from ectune.config import NetConfig
from ectune.importers import write_model_file
from ectune.losses import edm2_loss, edm_loss
from ectune.models import build_denoiser, load_denoiser, student_net
from ectune.networks import EDM2_SIZES, count_parameters
from ectune.networks.edm2 import Block, EDM2UNet, MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize
from ectune.presets import preset


def rms(x: torch.Tensor) -> float:
    return x.to(torch.float64).pow(2).mean().sqrt().item()


def test_normalize_gives_unit_rms_rows():
    w = torch.randn(7, 5, 3, 3) * 3.7
    n = normalize(w)
    for row in n:
        assert math.isclose(rms(row), 1.0, rel_tol=1e-3)


@pytest.mark.parametrize("kernel", [(), (1, 1), (3, 3)])
def test_mp_conv_preserves_magnitude(kernel):
    conv = MPConv(256, 64, kernel)
    x = torch.randn(32, 256) if not kernel else torch.randn(8, 256, 16, 16)
    assert abs(rms(conv(x)) - 1) < 0.05
    assert abs(rms(conv(x, gain=2.5)) - 2.5) < 0.15


def test_mp_ops_preserve_magnitude():
    a, b = torch.randn(64, 96, 8, 8), torch.randn(64, 32, 8, 8)
    assert abs(rms(mp_silu(torch.randn(1 << 18))) - 1) < 0.01
    assert abs(rms(mp_sum(a, torch.randn_like(a), t=0.3)) - 1) < 0.01
    cat = mp_cat(a, b, t=0.3)
    assert cat.shape == (64, 128, 8, 8) and abs(rms(cat) - 1) < 0.01
    # the share of the concatenation's energy is (1 − t)² : t², whatever the channel counts (Eq. 103)
    ea, eb = cat[:, :96].pow(2).sum(), cat[:, 96:].pow(2).sum()
    assert math.isclose((ea / eb).item(), 0.7**2 / 0.3**2, rel_tol=0.02)
    assert abs(rms(MPFourier(512)(torch.randn(256))) - 1) < 0.02


@pytest.mark.parametrize("flavor, mode, attention", [("enc", "keep", False), ("enc", "down", True),
                                                     ("dec", "up", False), ("dec", "keep", True)])
def test_block_preserves_magnitude_and_shapes(flavor, mode, attention):
    block = Block(128, 128 if mode != "keep" else 64, 256, flavor=flavor, resample_mode=mode, attention=attention)
    x, emb = torch.randn(4, 128, 16, 16), torch.randn(4, 256)
    y = block(x, emb)
    side = {"keep": 16, "down": 8, "up": 32}[mode]
    assert y.shape == (4, block.out_channels, side, side)
    assert 0.7 < rms(y) < 1.3


def test_forced_weight_normalisation_only_in_training_with_gradients():
    conv = MPConv(16, 8, (3, 3))
    before = conv.weight.detach().clone()
    conv.eval()(torch.randn(2, 16, 4, 4))
    with torch.no_grad():
        conv.train()(torch.randn(2, 16, 4, 4))           # e.g. ECT's stop-gradient target pass
    assert torch.equal(conv.weight, before)
    conv.train()(torch.randn(2, 16, 4, 4)).sum().backward()
    norms = conv.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((8,), math.sqrt(16 * 9)), rtol=1e-3, atol=0)
    torch.testing.assert_close(normalize(conv.weight.detach()), normalize(before), rtol=1e-4, atol=1e-4)  # eps


# EDM2's Table (ImageNet-64): parameters of the released sizes, in millions, as published.
PUBLISHED_MPARAMS = {"s": 280, "m": 498, "l": 777, "xl": 1119}


@pytest.mark.parametrize("size", sorted(PUBLISHED_MPARAMS))
def test_parameter_counts_match_edm2s_table(size):
    with torch.device("meta"):
        net = EDM2UNet(64, 3, 1000, model_channels=EDM2_SIZES[size]["model_channels"], logvar_channels=128)
    assert round(count_parameters(net) / 1e6) == PUBLISHED_MPARAMS[size]


def tiny_edm2(label_dim=10, logvar=0, **kw) -> NetConfig:
    """An EDM2-S-shaped network (4 levels, 3 blocks, attention at 16 and 8) with 8 channels."""
    fields = dict(model_channels=8, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                  attn_resolutions=(16, 8), dropout=0.0, img_resolution=64, in_channels=3)
    return NetConfig(size="edm2-tiny", arch="edm2", label_dim=label_dim, logvar_channels=logvar, **{**fields, **kw})


def test_module_order_is_pinned():
    """Registration order is the state_dict order: gains and embeddings, encoder, decoder, out, logvar."""
    net = EDM2UNet(16, 3, 10, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,),
                   logvar_channels=4)
    assert list(net._parameters) == ["out_gain"]
    assert list(net._modules) == ["emb_fourier", "emb_noise", "emb_label", "enc", "dec", "out_conv",
                                  "logvar_fourier", "logvar_linear"]
    assert list(net.enc) == ["16x16_conv", "16x16_block0", "8x8_down", "8x8_block0"]
    assert list(net.dec) == ["8x8_in0", "8x8_in1", "8x8_block0", "8x8_block1", "16x16_up", "16x16_block0",
                             "16x16_block1"]
    assert [k.split(".", 2)[2] for k in net.state_dict() if k.startswith("dec.8x8_block1.")] == [
        "emb_gain", "conv_res0.weight", "emb_linear.weight", "conv_res1.weight", "conv_skip.weight"]
    assert len(net.state_dict()) == 55


def test_unet_shapes_labels_and_zero_output_gain():
    D = build_denoiser(tiny_edm2()).eval()
    x, sigma, labels = torch.randn(2, 3, 64, 64), torch.tensor([0.5, 20.0]), torch.tensor([3, 7])
    out = D(x, sigma, labels)
    assert out.shape == x.shape
    c_skip = 0.25 / (sigma**2 + 0.25)                                 # out_gain = 0 at init: F = 0
    torch.testing.assert_close(out, c_skip.reshape(-1, 1, 1, 1) * x)
    with torch.no_grad():                                             # the gains start at 0 (silent)
        for name, p in D.net.named_parameters():
            if name.endswith("_gain"):
                p.fill_(1.0)
    assert not torch.allclose(D(x, sigma, labels), D(x, sigma, torch.tensor([4, 7])))


def test_dropout_only_at_or_below_dropout_res():
    net = build_denoiser(tiny_edm2(dropout=0.4, dropout_res=16)).net
    rates = {name: b.dropout for name, b in net.enc.items() if isinstance(b, Block)}
    assert rates["64x64_block0"] == 0 and rates["32x32_down"] == 0
    assert rates["16x16_block0"] == 0.4 and rates["8x8_block2"] == 0.4


def test_edm2_loss_is_edm_loss_plus_the_uncertainty_term():
    D = build_denoiser(tiny_edm2(logvar=16)).eval()
    x0, noise = torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64)
    sigma, labels = torch.tensor([0.1, 1.0, 7.0]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        plain = edm_loss(D, x0, sigma, noise, class_labels=labels)
        u = D(x0, sigma, labels, return_logvar=True)[1]
        torch.testing.assert_close(edm2_loss(D, x0, sigma, noise, class_labels=labels),
                                   plain / u.exp() + 3 * 64 * 64 * u)
    loss = edm2_loss(D, x0, sigma, noise, class_labels=labels).mean()
    loss.backward()
    assert D.net.logvar_linear.weight.grad.abs().sum() > 0


def test_tuning_drops_the_logvar_head_and_takes_the_recipes_dropout():
    recipe = preset("imagenet64", "tune").net
    net = student_net(tiny_edm2(logvar=128), recipe)
    assert (net.logvar_channels, net.dropout, net.dropout_res, net.model_channels) == (0, 0.4, 16, 8)


def test_imagenet64_presets_follow_the_official_imgnet_branch():
    t = preset("imagenet64", "tune")
    assert (t.net.arch, t.net.model_channels, t.net.channel_mult, t.net.label_dim) == ("edm2", 192, (1, 2, 3, 4), 1000)
    assert (t.loss.q, t.loss.c, t.loss.weighting, t.loss.P_mean, t.loss.P_std) == (4.0, 0.06, "snr", -0.8, 1.6)
    assert (t.batch, t.steps, t.stage_length, t.optim.lr, t.optim.betas) == (128, 100000, 25000, 1e-3, (0.9, 0.99))
    assert t.sample.mid_ts == (1.526,) and preset("imagenet64-xl", "tune").net.model_channels == 384
    p = preset("imagenet64", "pretrain")
    assert p.net.logvar_channels == 128 and p.loss.method == "edm" and p.batch == 2048


@pytest.fixture
def edm2_teacher(tmp_path):
    """A random tiny EDM2-S-shaped class-conditional teacher file with a logvar head, and 64×64 data."""
    cfg = preset("imagenet64", "pretrain")
    from dataclasses import replace
    cfg = replace(cfg, net=tiny_edm2(logvar=128), data="")
    D = build_denoiser(cfg.net, seed=3)
    with torch.no_grad():
        for p in D.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = write_model_file(tmp_path / "edm2-s.safetensors", cfg,
                            {f"ema.{k}": v for k, v in D.state_dict().items()}, {"step": "0", "weights": "ema"})
    rng = np.random.default_rng(0)
    data = tmp_path / "img64.npz"
    np.savez(data, images=rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8), labels=rng.integers(0, 10, 12))
    return path, data


def test_tune_an_edm2_teacher_with_the_imagenet64_recipe(edm2_teacher, tmp_path):
    teacher, data = edm2_teacher
    out = tmp_path / "ect"
    assert main(["tune", "--teacher", str(teacher), "--data", str(data), "--preset", "imagenet64", "--steps", "2",
                 "--batch", "4", "--set", "eval.every_kimg=0", "--out", str(out), "--no-progress"]) == 0
    D, cfg = load_denoiser(out)
    assert cfg.kind == "tune" and cfg.net.arch == "edm2" and cfg.net.logvar_channels == 0
    assert (cfg.net.dropout, cfg.net.dropout_res, cfg.loss.weighting, cfg.loss.c) == (0.4, 16, "snr", 0.06)
    assert not any("logvar" in k for k in D.state_dict())
    assert main(["sample", "--ckpt", str(out), "--steps", "2", "--n", "2", "--out", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (2, 3, 64, 64)


def test_pretrain_edm2_with_its_uncertainty_loss(tmp_path, edm2_teacher):
    _, data = edm2_teacher
    out = tmp_path / "pre"
    assert main(["pretrain", "--preset", "imagenet64", "--data", str(data), "--steps", "2", "--batch", "4",
                 "--set", "net.model_channels=8", "--set", "net.label_dim=10", "--set", "eval.every_kimg=0",
                 "--out", str(out), "--no-progress"]) == 0
    D, cfg = load_denoiser(out)
    assert cfg.net.logvar_channels == 128 and hasattr(D.net, "logvar_linear")


# --- EDM2 and official-ECT `imgnet` snapshots (laid out as their code writes them, built from ectune's modules)
from test_importers import _persistent, persistence  # noqa: E402,F401  (fixture)
from test_real_pickles import dnnlib, record  # noqa: E402,F401  (fixture)


def edm2_snapshot(D, src, dnnlib_module=None, *, logvar=True, encoder="StandardRGBEncoder"):
    """EDM2's snapshot of D: EasyDict(ema=Precond(unet=UNet, logvar_*), loss_fn, encoder) in float16;
    without `logvar`, the official ECT imgnet branch's dict(ema=Precond(unet=UNet)) in float32."""
    import copy
    precond = torch.nn.Module()
    precond.unet = copy.deepcopy(D.net)
    for head in ("logvar_fourier", "logvar_linear"):
        module = precond.unet._modules.pop(head, None)
        if logvar:
            precond.add_module(head, module)
    precond.sigma_data, precond.use_fp16 = 0.5, True
    precond._init_kwargs = dict(img_resolution=64, img_channels=3, label_dim=10, model_channels=8,
                                channel_mult=[1, 2, 3, 4], dropout=0.0)
    for m, name in [(m, type(m).__name__) for m in precond.modules()]:
        if not isinstance(m, torch.nn.ModuleDict):
            m.__class__ = _persistent(type(m), src)
            m.__class__.__name__ = {"EDM2UNet": "UNet", "Module": "Precond"}.get(name, name)
    precond = precond.eval().requires_grad_(False)
    if not logvar:
        return {"ema": precond}
    return dnnlib_module.EasyDict(ema=precond.to(torch.float16), encoder=record(encoder, src, batch_size=8),
                                  loss_fn=record("EDM2Loss", src, P_mean=-0.8, P_std=1.6, sigma_data=0.5),
                                  dataset_kwargs=dnnlib_module.EasyDict(path="img64.zip"))


@pytest.mark.parametrize("writer", ["edm2", "ect-imgnet"])
def test_edm2_and_ect_imgnet_snapshots_import_exactly(persistence, dnnlib, tmp_path, writer):
    import json
    import pickle
    from safetensors import safe_open

    from ectune.importers import import_edm_pickle
    D = build_denoiser(tiny_edm2(logvar=16), seed=1).eval()
    with torch.no_grad():
        for p in D.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if writer == "edm2":                                        # the file holds float16 tensors
            for p in [*D.parameters(), *D.buffers()]:
                p.copy_(p.half().float())
    snap = edm2_snapshot(D, persistence.module.source, dnnlib, logvar=writer == "edm2")
    pkl = tmp_path / "net.pkl"
    pkl.write_bytes(pickle.dumps(snap, protocol=4))
    summary = import_edm_pickle(pkl, tmp_path / "m.safetensors")
    assert not persistence.sentinel.exists()
    assert (summary["family"], summary["kind"]) == (("edm2", "pretrain") if writer == "edm2" else ("ect", "tune"))
    imported, cfg = load_denoiser(tmp_path / "m.safetensors")
    assert cfg.net.arch == "edm2" and cfg.preset == "imagenet64" and cfg.net.eval_sigma_min == 0
    assert cfg.net.logvar_channels == (16 if writer == "edm2" else 0)
    x, sigma, labels = torch.randn(2, 3, 64, 64), torch.tensor([0.002, 80.0]), torch.tensor([1, 9])
    with torch.no_grad():
        torch.testing.assert_close(imported(x, sigma, labels), D(x, sigma, labels), rtol=0, atol=1e-6)
        if writer == "edm2":
            got, want = imported(x, sigma, labels, return_logvar=True)[1], D(x, sigma, labels, return_logvar=True)[1]
            torch.testing.assert_close(got, want)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        about = json.loads(f.metadata()["snapshot"])
    assert about["network"]["init_kwargs"]["model_channels"] == 8
    if writer == "edm2":
        assert about["loss_fn"]["settings"]["P_mean"] == -0.8 and about["dataset_kwargs"]["path"] == "img64.zip"


def test_latent_edm2_snapshots_are_refused(persistence, dnnlib, tmp_path):
    import pickle

    from ectune.errors import EctuneError
    from ectune.importers import import_edm_pickle
    D = build_denoiser(tiny_edm2(logvar=16)).eval()
    pkl = tmp_path / "latent.pkl"
    pkl.write_bytes(pickle.dumps(edm2_snapshot(D, persistence.module.source, dnnlib, encoder="StabilityVAEEncoder")))
    with pytest.raises(EctuneError, match="latent space of a StabilityVAEEncoder"):
        import_edm_pickle(pkl, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()

"""Teachers in, standard models out: EDM/ECT pickles (never running their code), export, diffusers DDPM.

The EDM pickles are built here in EDM's format: a fake ``torch_utils.persistence`` module whose
persistent classes pickle as ``_reconstruct_persistent_obj(meta)`` with the class source code in
``meta["module_src"]``. Like EDM's, the fake reconstructor executes that source, so the tests can
see whether anything ever ran it.
"""

import builtins
import copy
import math
import os
import pickle
import sys
import types
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ectune.checkpoint import read_weights
from ectune.cli import main
from ectune.errors import EctuneError
from ectune.importers import (
    VPEpsDenoiser,
    alphas_cumprod_from,
    export_weights,
    import_edm_pickle,
    read_edm_pickle,
    vp_alphas_cumprod,
)
from ectune.models import build_denoiser, load_denoiser
from ectune.networks import build_network
from ectune.precond import EDMPrecond
from ectune.sampling import heun_sampler


# --- EDM-format pickles
@pytest.fixture
def persistence(monkeypatch, tmp_path):
    """A stand-in for EDM's torch_utils.persistence; its reconstructor runs module_src as EDM's does."""
    sentinel = tmp_path / "module_src_ran"
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        exec(meta["module_src"], {})  # noqa: S102 -- what makes EDM's pickles unsafe
        return types.SimpleNamespace(**meta["state"])

    _reconstruct_persistent_obj.__module__ = mod.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    mod.source = f"open({str(sentinel)!r}, 'w').close()\n"
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return types.SimpleNamespace(module=mod, sentinel=sentinel)


def _persistent(cls, module_src):
    """EDM's persistent-class pickling: reduce to _reconstruct_persistent_obj(meta) carrying the source."""
    reconstruct = sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj

    def __reduce__(self):
        fields = list(super(sub, self).__reduce__()) + [None] * 3
        meta = dict(type="class", version=6, module_src=module_src, class_name=type(self).__name__, state=fields[2])
        return reconstruct, (meta,), None

    sub = type(cls.__name__, (cls,), {"__reduce__": __reduce__})
    return sub


def edm_snapshot(D: EDMPrecond, module_src: str, *, init_kwargs=True, extra=None):
    """A deep copy of D laid out as EDM's snapshot: dict(ema=EDMPrecond(model=SongUNet), ...)."""
    D = copy.deepcopy(D).eval()
    net = D.net
    for block in [m for m in net.modules() if getattr(m, "resample_mode", "keep") != "keep"]:
        for conv in (block.conv0, block.skip):                     # EDM's [1,1] filters are buffers
            conv.register_buffer("resample_filter", torch.full((1, 1, 2, 2), 0.25))
    D._modules = OrderedDict(model=D._modules.pop("net"))
    if init_kwargs:
        arch = dict(model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[8], dropout=0.0,
                    embedding_type="positional", encoder_type="standard", decoder_type="standard")
        D._init_kwargs = dict(img_resolution=8, img_channels=3, label_dim=net.label_dim, sigma_data=0.5,
                              model_type="SongUNet", **arch)
        net._init_kwargs = dict(img_resolution=8, in_channels=3, out_channels=3, label_dim=net.label_dim, **arch)
    for m in list(D.modules()):
        if not isinstance(m, torch.nn.ModuleDict):                 # EDM keeps torch's ModuleDict as is
            m.__class__ = _persistent(type(m), module_src)
    return {"ema": D, "loss_fn": None, "dataset_kwargs": {"path": "cifar10.zip", "xflip": False}, **(extra or {})}


def tiny_denoiser(label_dim=0, augment_dim=0) -> EDMPrecond:
    torch.manual_seed(1)
    net = build_network("tiny", img_resolution=8, in_channels=3, label_dim=label_dim, attn_resolutions=(8,),
                        augment_dim=augment_dim)
    for p in net.parameters():                                     # break the near-identity init
        p.data.normal_(0, 0.2)
    return EDMPrecond(net, label_dim=label_dim).eval()


def write_pickle(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


@pytest.mark.parametrize("label_dim, kwargs, precond", [(0, True, "EDMPrecond"), (3, False, "ECMPrecond")])
def test_edm_pickle_imports_exactly_without_running_its_code(persistence, tmp_path, label_dim, kwargs, precond):
    D = tiny_denoiser(label_dim, augment_dim=2 * (label_dim > 0))
    snap = edm_snapshot(D, persistence.module.source, init_kwargs=kwargs)
    snap["ema"].__class__.__name__ = precond                       # ECT's snapshots hold an ECMPrecond
    pkl = write_pickle(tmp_path / "net.pkl", snap)
    assert b"module_src" in pkl.read_bytes() and b"torch_utils.persistence" in pkl.read_bytes()

    summary = import_edm_pickle(pkl, tmp_path / "out" / "model.safetensors")
    assert not persistence.sentinel.exists()                      # module_src was never executed
    assert summary["net"].img_resolution == 8 and summary["net"].label_dim == label_dim
    assert summary["net"].channel_mult == (1, 1) and summary["net"].attn_resolutions == (8,)
    assert any("map_augment" in n for n in summary["notes"]) == (label_dim > 0)
    assert any("sigma_min" in n for n in summary["notes"]) == (precond == "ECMPrecond")

    imported, cfg = load_denoiser(tmp_path / "out" / "model.safetensors")
    x, sigma = torch.randn(4, 3, 8, 8), torch.tensor([0.01, 0.5, 3.0, 80.0])
    labels = torch.arange(4) % 3 if label_dim else None
    official_ect = precond == "ECMPrecond"
    with torch.no_grad():
        shift, imported.eval_sigma_min = imported.eval_sigma_min, 0.0
        assert torch.equal(imported(x, sigma, labels), D(x, sigma, labels))           # the same network
        imported.eval_sigma_min = D.eval_sigma_min = shift         # official ECT's eval-mode sigma_min shift
        assert torch.equal(imported(x, sigma, labels), D(x, sigma, labels))
    assert cfg.net.eval_sigma_min == (0.003 if official_ect else 0.0)
    assert cfg.kind == ("tune" if official_ect else "pretrain") and cfg.preset == "cifar10"


def test_the_fake_persistence_module_would_run_module_src(persistence, tmp_path):
    """Control for the test above: the plain pickle module does run the carried source."""
    pkl = write_pickle(tmp_path / "net.pkl", edm_snapshot(tiny_denoiser(), persistence.module.source))
    pickle.loads(pkl.read_bytes())
    assert persistence.sentinel.exists()


class _RunsCode:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("how", ["os.system", "exec", "eval", "inside-snapshot"])
def test_pickle_that_runs_code_is_refused(persistence, tmp_path, how):
    target = tmp_path / "pwned"
    payload = {
        "os.system": _RunsCode(os.system, f"touch {target}"),
        "exec": _RunsCode(builtins.exec, f"open({str(target)!r}, 'w').close()"),
        "eval": _RunsCode(builtins.eval, f"open({str(target)!r}, 'w').close()"),
    }
    if how == "inside-snapshot":
        obj = edm_snapshot(tiny_denoiser(), persistence.module.source, extra={"augment_pipe": payload["exec"]})
    else:
        obj = payload[how]
    pkl = write_pickle(tmp_path / "evil.pkl", obj)
    with pytest.raises(EctuneError, match="refusing to load .* it would import (posix|nt|builtins)"):
        read_edm_pickle(pkl)
    assert not target.exists() and not persistence.sentinel.exists()
    assert main(["import", "edm-pkl", str(pkl), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert not target.exists() and not (tmp_path / "m.safetensors").exists()


def test_wrong_shaped_and_missing_tensors_are_listed(persistence, tmp_path):
    snap = edm_snapshot(tiny_denoiser(), persistence.module.source)
    unet = snap["ema"].model
    unet.map_layer1.weight = torch.nn.Parameter(torch.zeros(64, 32))
    del unet.dec["8x8_aux_conv"]._parameters["bias"]
    pkl = write_pickle(tmp_path / "bad.pkl", snap)
    with pytest.raises(EctuneError) as err:
        import_edm_pickle(pkl, tmp_path / "m.safetensors")
    msg = str(err.value)
    assert "map_layer1.weight (64, 32) (expected (64, 64))" in msg and "1 mis-shaped" in msg
    assert "1 missing: dec.8x8_aux_conv.bias" in msg
    assert not (tmp_path / "m.safetensors").exists()


def test_unsupported_networks_are_refused(persistence, tmp_path):
    snap = edm_snapshot(tiny_denoiser(), persistence.module.source)
    snap["ema"].model._init_kwargs["embedding_type"] = "fourier"
    with pytest.raises(EctuneError, match="embedding_type='fourier'"):
        import_edm_pickle(write_pickle(tmp_path / "a.pkl", snap), tmp_path / "a.safetensors")
    snap = edm_snapshot(tiny_denoiser(), persistence.module.source)
    snap["ema"].model.__class__.__name__ = "DhariwalUNet"
    with pytest.raises(EctuneError, match="only SongUNet"):
        import_edm_pickle(write_pickle(tmp_path / "b.pkl", snap), tmp_path / "b.safetensors")
    with pytest.raises(EctuneError, match="holds no EDM network"):
        import_edm_pickle(write_pickle(tmp_path / "c.pkl", {"weights": [1, 2]}), tmp_path / "c.safetensors")
    (tmp_path / "d.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(EctuneError, match="not a readable pickle"):
        read_edm_pickle(tmp_path / "d.pkl")


def test_import_cli_then_tune_and_sample(persistence, tmp_path):
    pkl = write_pickle(tmp_path / "net.pkl", edm_snapshot(tiny_denoiser(), persistence.module.source))
    out = tmp_path / "teacher.safetensors"
    assert main(["import", "edm-pkl", str(pkl), "--out", str(out), "--preset", "tiny"]) == 0
    assert (tmp_path / "teacher.json").is_file()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    assert main(["tune", "--teacher", str(out), "--data", str(tmp_path / "d.npz"), "--out", str(tmp_path / "ect"),
                 "--steps", "1", "--batch", "2", "--set", "sample.grid=2", "--device", "cpu", "--no-progress"]) == 0
    assert main(["sample", "--ckpt", str(out), "--num-steps", "2", "--n", "2", "--device", "cpu",
                 "--out", str(tmp_path / "s.npz")]) == 0
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].shape == (2, 3, 8, 8)


# --- export
@pytest.fixture
def weights_file(tmp_path):
    """An ectune weights file with distinct online ("net") and averaged ("ema") weights."""
    from ectune.importers import write_model_file
    from ectune.presets import preset
    cfg = preset("tiny", "pretrain")
    net_D, ema_D = build_denoiser(cfg.net, seed=1), build_denoiser(cfg.net, seed=2)
    tensors = {**{f"net.{k}": v for k, v in net_D.state_dict().items()},
               **{f"ema.{k}": v for k, v in ema_D.state_dict().items()}}
    path = write_model_file(tmp_path / "ckpt" / "model.safetensors", cfg, tensors, {"step": "7"})
    return path, cfg, {"net": net_D.eval(), "ema": ema_D.eval()}


@pytest.mark.parametrize("which", ["ema", "net"])
def test_export_loads_in_plain_pytorch_and_ectune(weights_file, tmp_path, which):
    src, cfg, ref = weights_file
    out = tmp_path / "export" / "model.safetensors"
    assert main(["export", "--ckpt", str(src.parent), "--out", str(out), "--weights", which]) == 0
    tensors = load_file(str(out))
    assert all(k.startswith(which + ".") for k in tensors)
    D = build_denoiser(cfg.net, seed=99).eval()                          # plain PyTorch + safetensors
    D.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items()})
    x, sigma = torch.randn(2, 1, 28, 28), torch.tensor([0.3, 5.0])
    with torch.no_grad():
        assert torch.equal(D(x, sigma), ref[which](x, sigma))
        loaded, loaded_cfg = load_denoiser(out, which=which)             # what `ectune sample` uses
        assert torch.equal(loaded(x, sigma), ref[which](x, sigma))
    assert loaded_cfg == cfg and read_weights(out)[2]["step"] == "7"
    assert f'"weights": "{which}"' in (tmp_path / "export" / "model.json").read_text()


def test_export_refuses_missing_weights_and_overwriting(weights_file, tmp_path):
    src, _, _ = weights_file
    only_net = export_weights(src, tmp_path / "net.safetensors", "net")
    with pytest.raises(EctuneError, match="holds no 'ema' weights"):
        export_weights(only_net, tmp_path / "x.safetensors", "ema")
    with pytest.raises(EctuneError, match="is the checkpoint being exported"):
        export_weights(src, src)
    with pytest.raises(EctuneError, match="must end in .safetensors"):
        export_weights(src, tmp_path / "x.pt")


# --- diffusers DDPM teacher
@pytest.fixture
def diffusers():
    return pytest.importorskip("diffusers")


def _tiny_unet(diffusers):
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_schedule_matches_diffusers(diffusers, schedule):
    config = dict(num_train_timesteps=200, beta_start=2e-4, beta_end=0.03, beta_schedule=schedule)
    ours = alphas_cumprod_from(config)
    ref = diffusers.DDPMScheduler(**config).alphas_cumprod.to(torch.float64)
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=1e-9)  # ref is float32


def test_ddpm_wrapper_equals_the_posterior_mean_formula(diffusers):
    unet = _tiny_unet(diffusers)
    D = VPEpsDenoiser(unet, alphas_cumprod_from(None))
    betas = np.linspace(1e-4, 0.02, 1000)                                # computed independently of ectune
    abar = np.cumprod(1 - betas)
    ts = [0, 1, 250, 999]
    sigma = torch.tensor([math.sqrt((1 - abar[t]) / abar[t]) for t in ts])
    x = torch.randn(4, 3, 8, 8) * (1 + sigma.reshape(-1, 1, 1, 1))
    with torch.no_grad():
        got = D(x, sigma)
        a = torch.tensor(abar[ts], dtype=torch.float32).reshape(-1, 1, 1, 1)
        x_t = x * a.sqrt()                                                 # x = x_t · sqrt(1 + σ²)
        eps = unet(x_t, torch.tensor(ts), return_dict=False)[0]
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    err = (got - x0).abs().amax(dim=(1, 2, 3))
    assert (err <= 2e-6 * (1 + sigma)).all(), err                      # float32 rounding grows with σ
    assert torch.equal(D(x, torch.zeros(4)), x)                            # boundary condition


def test_sigma_to_t_interpolates_in_log_sigma():
    D = VPEpsDenoiser(torch.nn.Identity(), vp_alphas_cumprod(10, 0.01, 0.3))
    levels = D.log_sigmas.exp()
    assert torch.equal(D.sigma_to_t(levels), torch.arange(10, dtype=torch.float64))
    mid = (levels[3].log() * 0.75 + levels[4].log() * 0.25).exp()
    assert D.sigma_to_t(mid.reshape(1)).item() == pytest.approx(3.25)
    assert D.sigma_to_t(torch.tensor([1e-6, 1e6], dtype=torch.float64)).tolist() == [0.0, 9.0]


def test_heun_runs_on_a_saved_diffusers_teacher(diffusers, tmp_path):
    from ectune.importers import load_diffusers_teacher
    unet = _tiny_unet(diffusers)
    unet.save_pretrained(tmp_path / "ddpm" / "unet", safe_serialization=True)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=500, beta_end=0.03)
    scheduler.save_pretrained(tmp_path / "ddpm" / "scheduler")
    D = load_diffusers_teacher(tmp_path / "ddpm")
    abar = scheduler.alphas_cumprod.double()
    torch.testing.assert_close(D.log_sigmas.exp(), ((1 - abar) / abar).sqrt(), rtol=1e-4, atol=0)  # abar: float32
    x = heun_sampler(D, torch.randn(2, 3, 8, 8), num_steps=3)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    with pytest.raises(EctuneError, match="only ε-prediction"):
        alphas_cumprod_from({"prediction_type": "v_prediction"})

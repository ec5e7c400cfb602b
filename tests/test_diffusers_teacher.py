"""A diffusers UNet2DModel DDPM folder wherever the CLI takes a teacher: sample, synth, eval and CD."""

import json

import numpy as np
import pytest
import torch

from ectune.cli import main
from ectune.evaluate import file_sha256
from ectune.images import to_uint8
from ectune.importers import load_diffusers_teacher
from ectune.models import load_denoiser
from ectune.sampling import Sampler, sample_images


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    """A random 28×28 grayscale ε-prediction DDPM saved as diffusers writes it (unet/ + scheduler/)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    root = tmp_path_factory.mktemp("ddpm")
    unet.save_pretrained(root / "unet", safe_serialization=True)
    diffusers.DDPMScheduler(num_train_timesteps=200, beta_end=0.03).save_pretrained(root / "scheduler")
    return root


def test_sample_from_a_diffusers_folder_is_the_wrappers_heun(ddpm_folder, tmp_path):
    out = tmp_path / "s.npz"
    assert main(["sample", "--ckpt", str(ddpm_folder), "--num-steps", "3", "--n", "3", "--seed", "5",
                 "--out", str(out)]) == 0
    D = load_diffusers_teacher(ddpm_folder)
    ref = sample_images(D, [5, 6, 7], (1, 28, 28), Sampler.heun(3), batch=3)
    with np.load(out) as z:
        assert z["seeds"].tolist() == [5, 6, 7]
        assert np.array_equal(z["images"], to_uint8(ref))
    _, cfg = load_denoiser(ddpm_folder / "unet")         # the unet/ folder of a pipeline works too
    assert cfg.kind == "pretrain" and (cfg.net.in_channels, cfg.net.img_resolution) == (1, 28)


def test_synth_records_the_diffusers_weights_hash(ddpm_folder, tmp_path):
    out = tmp_path / "t.npz"
    assert main(["synth", "--teacher", str(ddpm_folder), "--sampler", "dpmpp2m", "--nfe", "3", "--n", "2",
                 "--out", str(out), "--no-progress"]) == 0
    with np.load(out) as z:
        manifest = json.loads(str(z["manifest"]))
        assert z["images"].shape == (2, 1, 28, 28)
    weights = ddpm_folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert manifest["teacher_sha256"] == file_sha256(weights)


def test_eval_scores_a_diffusers_teacher(ddpm_folder, tmp_path):
    out = tmp_path / "e.json"
    assert main(["eval", "--ckpt", str(ddpm_folder), "--num-steps", "2", "--n", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert np.isfinite(result["fd"]) and result["checkpoint_sha256"] == file_sha256(
        ddpm_folder / "unet" / "diffusion_pytorch_model.safetensors")


def test_cd_distills_a_diffusers_teacher_and_ect_is_refused(ddpm_folder, tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, images=rng.integers(0, 256, (16, 28, 28), dtype=np.uint8))
    args = ["tune", "--teacher", str(ddpm_folder), "--data", str(data), "--preset", "tiny", "--steps", "2",
            "--batch", "4", "--no-progress"]
    assert main([*args, "--method", "cd", "--out", str(tmp_path / "cd")]) == 0
    D, cfg = load_denoiser(tmp_path / "cd")
    assert cfg.loss.method == "cd" and cfg.teacher == str(ddpm_folder) and cfg.net.size == "tiny"
    assert main([*args, "--method", "ect", "--out", str(tmp_path / "ect")]) == 2
    err = capsys.readouterr().err
    assert "diffusers DDPM" in err and "--method cd" in err and not (tmp_path / "ect").exists()

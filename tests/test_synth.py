"""`ectune synth` (teacher-generated tuning sets) and class-subset data specs, on a tiny teacher."""

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import ectune.synth as synth_mod
from ectune.checkpoint import list_checkpoints, save_checkpoint
from ectune.cli import main
from ectune.data import load_dataset
from ectune.errors import EctuneError
from ectune.images import to_uint8
from ectune.models import build_denoiser, load_denoiser
from ectune.presets import preset
from ectune.sampling import Sampler, sample_images



@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A class-conditional (3 classes) tiny 16x16 pretrain run with random weights, one checkpoint."""
    cfg = preset("tiny", "pretrain")
    cfg = replace(cfg, net=replace(cfg.net, img_resolution=16, label_dim=3))
    state = build_denoiser(cfg.net, seed=1).state_dict()
    run = tmp_path_factory.mktemp("teacher")
    save_checkpoint(run, 1, cfg, {**{f"net.{k}": v.clone() for k, v in state.items()},
                                  **{f"ema.{k}": v.clone() for k, v in state.items()}}, {})
    (run / "config.json").write_text(cfg.to_json())
    return run


def synth(teacher, out, *extra):
    """5 samples from seed 3 in shards of 2 (seeds 3-4, 5-6, 7), Heun with 2 levels (3 NFE)."""
    return main(["synth", "--teacher", str(teacher), "--n", "5", "--seed", "3", "--shard-size", "2",
                 "--num-steps", "2", "--out", str(out), "--no-progress", *extra])


def arrays(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def interrupt_at_call(monkeypatch, k):
    """Make the k-th call of the sampler (1-based) raise KeyboardInterrupt; returns the seeds of every call."""
    calls = []

    def sampler(D, seeds, *args, **kwargs):
        calls.append(list(seeds))
        if len(calls) == k:
            raise KeyboardInterrupt
        return sample_images(D, seeds, *args, **kwargs)

    monkeypatch.setattr(synth_mod, "sample_images", sampler)
    return calls


@pytest.fixture(scope="module")
def full(teacher, tmp_path_factory):
    """The uninterrupted reference file."""
    out = tmp_path_factory.mktemp("full") / "full.npz"
    assert synth(teacher, out) == 0
    return arrays(out)


def test_synth_writes_seeded_labelled_uint8_samples(teacher, full, tmp_path):
    assert full["images"].dtype == np.uint8 and full["images"].shape == (5, 1, 16, 16)
    assert full["seeds"].tolist() == [3, 4, 5, 6, 7]
    assert full["labels"].tolist() == [0, 1, 2, 0, 1]                    # seed % classes
    assert not np.array_equal(full["images"][0], full["images"][1])
    manifest = json.loads(str(full["manifest"]))
    weights = list_checkpoints(teacher)[-1] / "model.safetensors"
    assert manifest["teacher_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert (manifest["sampler"], manifest["num_steps"], manifest["n"], manifest["seed"],
            manifest["shard_size"]) == ("heun", 2, 5, 3, 2)
    assert manifest["ectune_version"]
    assert not (tmp_path / "full.npz.parts").exists()


def test_synth_is_deterministic_and_sample_i_is_seed_i_alone(teacher, full, tmp_path):
    again = tmp_path / "again.npz"
    assert synth(teacher, again, "--batch", "1") == 0                    # another batch size, same samples
    for k in ("images", "seeds", "labels"):
        assert np.array_equal(arrays(again)[k], full[k]), k
    one = tmp_path / "one.npz"                                            # seed 6 on its own, via `sample`
    assert main(["sample", "--ckpt", str(teacher), "--sampler", "heun", "--num-steps", "2", "--n", "1",
                 "--seed", "6", "--out", str(one)]) == 0
    assert np.array_equal(arrays(one)["images"][0], full["images"][3])


def test_dpmpp2m_synth_matches_sample_for_the_same_seed(teacher, tmp_path):
    out = tmp_path / "dpm.npz"
    assert synth(teacher, out, "--sampler", "dpmpp2m", "--nfe", "3") == 0
    got = arrays(out)
    manifest = json.loads(str(got["manifest"]))
    assert (manifest["sampler"], manifest["nfe"], manifest["num_steps"]) == ("dpmpp2m", 3, None)
    one = tmp_path / "one.npz"
    assert main(["sample", "--ckpt", str(teacher), "--sampler", "dpmpp2m", "--nfe", "3", "--n", "1",
                 "--seed", "5", "--out", str(one)]) == 0
    assert np.array_equal(arrays(one)["images"][0], got["images"][2])
    heun = tmp_path / "heun.npz"                                          # the NFE is a setting: a Heun file differs
    assert synth(teacher, heun) == 0
    assert not np.array_equal(arrays(heun)["images"], got["images"])


def test_interrupted_synth_resumes_to_the_same_arrays(teacher, full, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cut.npz"
    interrupt_at_call(monkeypatch, 2)                                     # during the second shard
    assert synth(teacher, out) == 130
    assert "run the same command" in capsys.readouterr().err
    parts = tmp_path / "cut.npz.parts"
    assert not out.exists()
    assert sorted(p.name for p in parts.iterdir()) == ["manifest.json", "shard-000000.npz"]
    calls = interrupt_at_call(monkeypatch, 0)
    assert synth(teacher, out) == 0
    assert calls == [[5, 6], [7]]                                         # the finished shard is not made again
    got = arrays(out)
    for k in ("images", "seeds", "labels"):
        assert got[k].tobytes() == full[k].tobytes(), k
    assert not parts.exists()


def test_corrupt_shards_are_made_again(teacher, full, tmp_path, monkeypatch, capsys):
    out = tmp_path / "bad.npz"
    interrupt_at_call(monkeypatch, 3)
    assert synth(teacher, out) == 130
    parts = tmp_path / "bad.npz.parts"
    first, second = parts / "shard-000000.npz", parts / "shard-000001.npz"
    first.write_bytes(first.read_bytes()[:100])                           # truncated
    tampered = arrays(second)
    tampered["images"][0, 0, 0, 0] ^= 1                                   # a readable file with an altered pixel
    np.savez(second, **tampered)
    (parts / ".shard-000002.npz.999.tmp").write_bytes(b"half")            # left by a killed run
    capsys.readouterr()
    calls = interrupt_at_call(monkeypatch, 0)
    assert synth(teacher, out) == 0
    assert calls == [[3, 4], [5, 6], [7]]
    assert "shard-000000.npz, shard-000001.npz" in capsys.readouterr().err
    assert np.array_equal(arrays(out)["images"], full["images"])


def test_other_settings_are_refused(teacher, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.npz"
    interrupt_at_call(monkeypatch, 2)
    assert synth(teacher, out) == 130
    monkeypatch.undo()
    for extra in (["--seed", "4"], ["--num-steps", "3"], ["--shard-size", "3"], ["--weights", "net"],
                  ["--sampler", "consistency"]):
        capsys.readouterr()
        assert main(["synth", "--teacher", str(teacher), "--n", "5", "--seed", "3", "--shard-size", "2",
                     "--num-steps", "2", "--out", str(out), "--no-progress", *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("ectune: error:") and "\n" not in err and "other settings" in err, err
    assert (tmp_path / "s.npz.parts" / "shard-000000.npz").is_file()    # nothing was thrown away
    assert synth(teacher, out) == 0
    capsys.readouterr()
    assert synth(teacher, out) == 0 and "already complete" in capsys.readouterr().out
    assert synth(teacher, out, "--n", "6") == 2                          # finished file, other settings
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, images=np.zeros((2, 1, 16, 16), np.uint8))
    before = foreign.read_bytes()
    assert synth(teacher, foreign) == 2 and foreign.read_bytes() == before
    assert synth(teacher, tmp_path / "x.png") == 2 and synth(teacher, tmp_path / "y.npz", "--n", "0") == 2


def test_consistency_sampler_for_a_tuned_model(teacher, tmp_path):
    ect = tmp_path / "ect"
    assert main(["tune", "--teacher", str(teacher), "--data", f"{make_npz(tmp_path / 'd.npz', 16)}[classes=0,1,2]",
                 "--out", str(ect), "--steps", "1", "--batch", "4", "--no-progress"]) == 0
    out = tmp_path / "c.npz"
    assert main(["synth", "--teacher", str(ect), "--n", "3", "--ts", "80", "1.5", "--out", str(out),
                 "--no-progress"]) == 0
    got = arrays(out)
    assert json.loads(str(got["manifest"]))["ts"] == [80.0, 1.5]
    D, _ = load_denoiser(ect)
    x = sample_images(D, [0, 1, 2], (1, 16, 16), Sampler.consistency([80.0, 1.5]),
                      class_labels=torch.tensor([0, 1, 2]))
    assert np.array_equal(got["images"], to_uint8(x))


def test_tune_on_a_synth_file_and_on_its_class_subset(teacher, full, tmp_path):
    out = tmp_path / "t.npz"
    assert synth(teacher, out) == 0
    ds = load_dataset(str(out))
    assert np.array_equal(ds.images.numpy(), full["images"]) and ds.labels.tolist() == [0, 1, 2, 0, 1]
    for spec in (str(out), f"{out}[classes=0,2]"):
        run = tmp_path / f"run{len(spec)}"
        assert main(["tune", "--teacher", str(teacher), "--data", spec, "--out", str(run), "--steps", "2",
                     "--batch", "4", "--no-progress"]) == 0, spec
        assert json.loads((run / "config.json").read_text())["data"] == spec
        assert list_checkpoints(run)[-1].name == "00000002"


# --- class subsets
def make_npz(path, size=8, labels=True):
    """20 images whose every pixel is the image's index, labels i % 5."""
    images = np.repeat(np.arange(20, dtype=np.uint8), size * size).reshape(20, 1, size, size)
    np.savez(path, images=images, **({"labels": np.arange(20) % 5} if labels else {}))
    return path


def test_class_subset_keeps_exactly_those_classes_in_order(tmp_path):
    path = make_npz(tmp_path / "d.npz")
    ds = load_dataset(f"{path}[classes=3,1,3]")
    assert ds.labels.tolist() == [1, 3, 1, 3, 1, 3, 1, 3]                # original numbers, original order
    assert ds.images[:, 0, 0, 0].tolist() == [1, 3, 6, 8, 11, 13, 16, 18]
    assert ds.name == "d[classes=1,3]"
    assert len(load_dataset(f"{path}[classes=0,1,2,3,4]")) == 20


def test_class_subset_of_fashion_mnist_idx(tmp_path):
    def idx(array):
        return bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.tobytes()

    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx(np.arange(10, dtype=np.uint8).repeat(784).reshape(10, 28, 28)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx(np.arange(10, dtype=np.uint8)))
    ds = load_dataset(f"fashion-mnist:{tmp_path}[classes=2,7]")
    assert ds.labels.tolist() == [2, 7] and ds.images[:, 0, 0, 0].tolist() == [2, 7]


@pytest.mark.parametrize("suffix, says", [("[classes=7]", "no class [7]"), ("[classes=a]", "bad class list"),
                                          ("[classes=]", "bad class list"), ("[classes=1,-1]", "no class [-1]")])
def test_class_subset_errors(tmp_path, suffix, says):
    with pytest.raises(EctuneError, match=says.replace("[", r"\[").replace("]", r"\]")):
        load_dataset(f"{make_npz(tmp_path / 'd.npz')}{suffix}")


def test_class_subset_needs_labels(tmp_path, teacher, capsys):
    path = make_npz(tmp_path / "u.npz", 16, labels=False)
    with pytest.raises(EctuneError, match="no labels"):
        load_dataset(f"{path}[classes=0]")
    assert main(["tune", "--teacher", str(teacher), "--data", f"{path}[classes=0]", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ectune: error:") and "\n" not in err and not (tmp_path / "r").exists()


def test_synth_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["synth", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--shard-size" in out and "resume" in out

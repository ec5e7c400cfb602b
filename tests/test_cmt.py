"""Consistency mid-training (`--method cmt`): the teacher's DPM-Solver++ trajectories, the loss against
a brute-force computation, whole trajectories per micro-batch, and a CMT run continued by SCT through
the CLI (resumable exactly; CD and TCM refuse it as a start)."""

import pytest
import torch

from ectune.checkpoint import read_weights
from ectune.cli import main
from ectune.errors import EctuneError
from ectune.losses import cmt_loss, pseudo_huber
from ectune.methods import METHODS
from ectune.presets import preset
from ectune.sampling import sample_dpmpp_2m
from ectune.schedules import karras_sigmas



class Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(0.7)), torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, x, sigma, class_labels=None):
        return self.a * x + self.b * sigma.reshape(-1, 1, 1, 1).to(x.dtype)


def test_the_trajectory_states_lie_on_the_pf_ode_and_leave_the_samples_alone(gaussian_denoiser):
    sig = karras_sigmas(400)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64) * 80
    states = []
    out = sample_dpmpp_2m(gaussian_denoiser, x, sig.tolist(), states=states)
    assert torch.equal(out, sample_dpmpp_2m(gaussian_denoiser, x, sig.tolist()))
    assert len(states) == 400 and torch.equal(states[0], x)
    MU, S = gaussian_denoiser.mu, gaussian_denoiser.s              # its data: x0 ~ N(MU, S²) per pixel
    for i in (50, 200, 399):                    # x_σ = MU + sqrt((S² + σ²)/(S² + σ0²))·(x_σ0 − MU)
        exact = MU + ((S**2 + sig[i] ** 2) / (S**2 + sig[0] ** 2)).sqrt() * (x - MU)
        assert torch.allclose(states[i], exact, atol=2e-3 * float(sig[i]) + 1e-4)


@pytest.mark.parametrize("c", [0.0, 0.03])
def test_cmt_loss_is_the_distance_from_each_state_to_its_trajectorys_end(c, gaussian_denoiser):
    sig, m, groups = karras_sigmas(5), 4, 3
    noise = torch.randn(groups * m, 1, 3, 3)
    t = sig[:m].float().repeat(groups)
    D = Student()
    got = cmt_loss(D, gaussian_denoiser, t, noise, sig, c=c)
    want = []
    for g in range(groups):                     # brute force: one trajectory at a time
        states = []
        end = sample_dpmpp_2m(gaussian_denoiser, noise[g * m:g * m + 1].double() * 80, sig.tolist(), states=states)
        for i in range(m):
            pred = D(states[i].float(), sig[i:i + 1].float())
            want.append(pseudo_huber(((pred - end.float()) ** 2).sum().reshape(1), c))
    assert torch.allclose(got, torch.cat(want), rtol=1e-5)
    other = noise.clone()
    other[1::m] += 1                            # only each group's first noise starts its trajectory
    assert torch.equal(cmt_loss(D, gaussian_denoiser, t, other, sig, c=c), got)
    halves = torch.cat([cmt_loss(D, gaussian_denoiser, t[:m], noise[:m], sig, c=c),
                        cmt_loss(D, gaussian_denoiser, t[m:], noise[m:], sig, c=c)])
    assert torch.allclose(halves, got, rtol=1e-6)                    # micro-batches of whole trajectories
    got.sum().backward()
    assert D.a.grad is not None and D.a.grad != 0


def test_a_conditional_trajectory_and_all_its_rows_take_its_first_rows_class(gaussian_denoiser):
    sig, m = karras_sigmas(4), 3
    seen = []

    def teacher(x, sigma, labels):
        seen.append(labels.clone())
        return gaussian_denoiser(x, sigma) + labels.argmax(1).reshape(-1, 1, 1, 1).to(x.dtype)

    def student(x, sigma, labels):
        seen.append(labels.clone())
        return x * 0.5
    labels = torch.eye(4)[[0, 1, 2, 3, 1, 0]]                   # one-hot, two trajectories
    cmt_loss(student, teacher, sig[:m].float().repeat(2), torch.randn(6, 1, 2, 2), sig, class_labels=labels)
    assert all(torch.equal(x, labels[[0, 3]]) for x in seen[:-1])                       # the teacher's calls
    assert torch.equal(seen[-1], labels[[0, 0, 0, 3, 3, 3]])                            # the student's


def test_cmt_refuses_rows_that_are_not_whole_trajectories(gaussian_denoiser):
    sig = karras_sigmas(5)
    with pytest.raises(EctuneError, match="multiple of 4"):
        cmt_loss(Student(), gaussian_denoiser, sig[:4].float().repeat(2)[:6], torch.randn(6, 1, 2, 2), sig)
    with pytest.raises(EctuneError, match="trajectories of 4 points"):
        cmt_loss(Student(), gaussian_denoiser, sig[:4].float().flip(0), torch.randn(4, 1, 2, 2), sig)
    cfg = preset("tiny", "tune")
    cmt = METHODS["cmt"]
    for batch, micro, world in [(16, 0, 1), (16, 8, 2), (32, 8, 2)]:
        cmt.check(_with(cfg, batch, micro), world)
    for batch, micro, world in [(12, 0, 1), (16, 4, 1), (8, 0, 2)]:
        with pytest.raises(EctuneError, match="multiples of 8"):
            cmt.check(_with(cfg, batch, micro), world)


def _with(cfg, batch, micro):
    from dataclasses import replace
    return replace(cfg, batch=batch, engine=replace(cfg.engine, micro_batch=micro))


def test_cmt_then_sct_through_the_cli_resumes_exactly(tiny_teacher, tmp_path, capsys):
    teacher = tiny_teacher
    args = ["tune", "--method", "cmt", "--teacher", str(teacher / "teacher"), "--batch", "4", "--no-progress",
            "--set", "loss.cmt_steps=3", "--set", "log_every=1"]
    assert main([*args, "--steps", "3", "--out", str(tmp_path / "straight")]) == 0
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "cut")]) == 0
    assert main([*args, "--steps", "3", "--out", str(tmp_path / "cut")]) == 0           # continued
    cfg, a, _ = read_weights(tmp_path / "straight")
    _, b, _ = read_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a) and cfg.loss.method == "cmt" and cfg.kind == "tune"
    _, t0, _ = read_weights(teacher / "teacher")
    assert any(not torch.equal(a[k], t0[k]) for k in a if k.startswith("ema."))     # it trained
    post = ["tune", "--teacher", str(tmp_path / "straight"), "--steps", "2", "--batch", "4", "--no-progress"]
    assert main([*post, "--method", "sct", "--out", str(tmp_path / "sct")]) == 0
    s_cfg, _, _ = read_weights(tmp_path / "sct")
    assert s_cfg.loss.method == "sct" and s_cfg.teacher == str(tmp_path / "straight")
    from ectune.start import tune_base, tune_parts
    base = tune_base("ect", str(tmp_path / "straight"), None, None, tmp_path / "new")
    _, D, frozen = tune_parts(base.cfg, base)
    ema = {k[len("ema."):]: v for k, v in a.items() if k.startswith("ema.")}
    assert frozen is None and all(torch.equal(v, ema[k]) for k, v in D.state_dict().items())   # starts from CMT
    capsys.readouterr()
    for method, says in (("cd", "already a consistency model"), ("tcm", "not a TCM or CMT run"),
                         ("cmt", "already a consistency model")):
        assert main([*post, "--method", method, "--out", str(tmp_path / method)]) == 2
        assert says in capsys.readouterr().err and not (tmp_path / method).exists()
    assert main([*args, "--steps", "1", "--batch", "5", "--out", str(tmp_path / "odd")]) == 2
    assert "multiples of 2" in capsys.readouterr().err and not (tmp_path / "odd").exists()

import pytest
import torch


class GaussianDenoiser:
    """Exact denoiser of data x0 ~ N(mu, s²) per pixel: D(x, σ) = mu + s²/(s² + σ²)·(x − mu).

    Records every noise level it is called with.
    """

    def __init__(self, mu=0.3, s=0.5):
        self.mu, self.s, self.calls = mu, s, []

    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        self.calls.append(sigma.flatten().clone())
        return self.mu + self.s**2 / (self.s**2 + sigma**2) * (x - self.mu)


@pytest.fixture
def gaussian_denoiser():
    return GaussianDenoiser()


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A folder with d.npz (40 random 28×28 images) and teacher/, a 2-step `--preset tiny` pretrain run on it."""
    import numpy as np

    from ectune.cli import main
    root = tmp_path_factory.mktemp("tiny-teacher")
    np.savez(root / "d.npz", images=np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8))
    assert main(["pretrain", "--preset", "tiny", "--data", str(root / "d.npz"), "--steps", "2",
                 "--out", str(root / "teacher"), "--no-progress"]) == 0
    return root


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests' tiny models run as fast on one thread, and a busy machine does not stall a second one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

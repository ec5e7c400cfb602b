"""The raw network F: shapes, EDM's DDPM++ parameter count, presets, dropout, errors, gradients."""

from __future__ import annotations

import pytest
import torch

from ectune.errors import EctuneError
from ectune.networks import NETWORK_PRESETS, SongUNet, build_network, count_parameters
from ectune.networks.layers import PositionalEmbedding, resample
from ectune.networks.unet import level_resolutions

TINY = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)


def perturb(net: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so the output is no longer ~0 and every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


def inputs(batch: int, channels: int, res: int, label_dim: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, res, res, generator=g)
    noise = torch.randn(batch, generator=g)
    labels = None
    if label_dim:
        labels = torch.nn.functional.one_hot(torch.arange(batch) % label_dim, label_dim).float()
    return x, noise, labels


# --- shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "res, channels, kwargs",
    [
        (28, 1, TINY),
        (32, 3, dict(TINY, channel_mult=(1, 2, 2), attn_resolutions=(16,))),
        (8, 1, dict(TINY, channel_mult=(1, 2, 2), attn_resolutions=(4,))),
    ],
)
@pytest.mark.parametrize("label_dim", [0, 10])
def test_output_shape_equals_input_shape(res, channels, kwargs, label_dim):
    net = SongUNet(img_resolution=res, in_channels=channels, out_channels=channels, label_dim=label_dim, **kwargs)
    x, noise, labels = inputs(2, channels, res, label_dim)
    out = net(x, noise, labels)
    assert out.shape == x.shape
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_fresh_network_outputs_near_zero():
    net = SongUNet(img_resolution=28, in_channels=1, out_channels=1, **TINY).eval()
    x, noise, _ = inputs(4, 1, 28)
    assert net(x, noise).abs().max() < 1e-3


def test_class_labels_change_the_output():
    net = perturb(SongUNet(img_resolution=28, in_channels=1, out_channels=1, label_dim=10, **TINY)).eval()
    x, noise, _ = inputs(2, 1, 28)
    a = torch.nn.functional.one_hot(torch.tensor([0, 1]), 10).float()
    b = torch.nn.functional.one_hot(torch.tensor([2, 3]), 10).float()
    assert not torch.allclose(net(x, noise, a), net(x, noise, b))
    assert not torch.allclose(net(x, noise, a), net(x, noise, None))  # None = "no label"


def test_noise_labels_change_the_output():
    net = perturb(SongUNet(img_resolution=28, in_channels=1, out_channels=1, **TINY)).eval()
    x, noise, _ = inputs(2, 1, 28)
    assert not torch.allclose(net(x, noise), net(x, noise + 1.0))


# --- EDM's DDPM++ ---------------------------------------------------------------------------------

DDPMPP_CIFAR10 = dict(
    img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=(2, 2, 2),
    num_blocks=4, attn_resolutions=(16,), dropout=0.13,
)


def test_ddpmpp_parameter_count_matches_edm_cifar10():
    net = SongUNet(**DDPMPP_CIFAR10)
    assert count_parameters(net) == 55_732_739  # EDM's DDPM++ without augmentation labels ("55.7M")
    preset = NETWORK_PRESETS["ddpmpp"]
    assert all(DDPMPP_CIFAR10[key] == value for key, value in preset.items())
    # EDM's released CIFAR-10 checkpoints also hold map_augment (9 × 128, no bias).
    assert count_parameters(SongUNet(**DDPMPP_CIFAR10, augment_dim=9)) == 55_733_891
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 3, 32, 32), torch.zeros(1))
    assert out.shape == (1, 3, 32, 32)


def test_ddpmpp_parameter_names_follow_edm_hierarchy():
    net = SongUNet(**dict(DDPMPP_CIFAR10, model_channels=32), label_dim=10, augment_dim=9)
    names = {name for name, _ in net.named_parameters()}
    expected = {
        "map_label.weight", "map_label.bias", "map_augment.weight", "map_layer0.weight", "map_layer1.bias",
        "enc.32x32_conv.weight", "enc.32x32_block0.skip.weight", "enc.16x16_down.skip.weight",
        "enc.16x16_block3.qkv.weight", "enc.16x16_block3.proj.bias", "enc.16x16_block3.norm2.weight",
        "enc.8x8_block3.conv1.weight", "dec.8x8_in0.qkv.weight", "dec.8x8_in1.affine.weight",
        "dec.16x16_up.conv0.weight", "dec.16x16_block4.qkv.weight", "dec.32x32_block4.norm1.bias",
        "dec.32x32_aux_norm.weight", "dec.32x32_aux_conv.weight", "dec.32x32_aux_conv.bias",
    }
    assert expected <= names
    assert "dec.16x16_block3.qkv.weight" not in names  # decoder attention only on a level's last block
    assert "enc.8x8_block0.qkv.weight" not in names
    assert net.dec["32x32_block4"].in_channels == 64 + 32  # last block eats the first conv's skip


def test_module_order_is_pinned():
    """Registration order is the state_dict order of every checkpoint: mapping, encoder, decoder."""
    net = SongUNet(img_resolution=8, in_channels=1, out_channels=1, label_dim=3, model_channels=16,
                   channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,), augment_dim=9)
    assert list(net._modules) == ["map_noise", "map_label", "map_augment", "map_layer0", "map_layer1", "enc", "dec"]
    assert list(net.enc) == ["8x8_conv", "8x8_block0", "4x4_down", "4x4_block0"]
    assert list(net.dec) == ["4x4_in0", "4x4_in1", "4x4_block0", "4x4_block1", "8x8_up", "8x8_block0",
                             "8x8_block1", "8x8_aux_norm", "8x8_aux_conv"]
    assert [k.split(".", 2)[2] for k in net.state_dict() if k.startswith("dec.4x4_block1.")] == [
        f"{m}.{p}" for m in ("norm0", "conv0", "affine", "norm1", "conv1", "skip", "norm2", "qkv", "proj")
        for p in ("weight", "bias")]
    assert len(net.state_dict()) == 145


# --- presets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, low, high", [("tiny", 0, 100_000), ("small", 700_000, 1_000_000), ("medium", 1_000_000, 1_500_000),
                          ("large", 3_000_000, 6_000_000)]
)
def test_preset_sizes(preset, low, high):
    assert low < count_parameters(build_network(preset, img_resolution=28, in_channels=1)) < high


def test_build_network_applies_overrides_and_rejects_unknown_settings():
    net = build_network("tiny", img_resolution=28, in_channels=1, label_dim=10, dropout=0.3)
    assert net.label_dim == 10 and net.out_channels == 1
    assert all(b.dropout == 0.3 for name, b in net.enc.items() if not name.endswith("_conv"))
    assert set(NETWORK_PRESETS) >= {"tiny", "small", "medium", "ddpmpp"}
    with pytest.raises(EctuneError, match="unknown network preset"):
        build_network("huge", img_resolution=28, in_channels=1)
    with pytest.raises(EctuneError, match="bad network settings"):
        build_network("tiny", img_resolution=28, in_channels=1, num_layers=3)


# --- dropout --------------------------------------------------------------------------------------


def test_dropout_is_random_in_train_mode_and_seeded_by_torch_rng():
    net = perturb(SongUNet(img_resolution=28, in_channels=1, out_channels=1, **dict(TINY, dropout=0.5)))
    x, noise, _ = inputs(2, 1, 28)
    net.train()
    assert not torch.allclose(net(x, noise), net(x, noise))
    torch.manual_seed(123)
    a = net(x, noise)
    torch.manual_seed(123)
    assert torch.equal(a, net(x, noise))
    net.eval()
    assert torch.equal(net(x, noise), net(x, noise))


def test_label_dropout_only_in_train_mode():
    kwargs = dict(TINY, label_dropout=0.5)
    net = perturb(SongUNet(img_resolution=28, in_channels=1, out_channels=1, label_dim=10, **kwargs))
    x, noise, labels = inputs(8, 1, 28, label_dim=10)
    torch.manual_seed(0)
    net.train()
    assert not torch.allclose(net(x, noise, labels), net(x, noise, labels))
    net.eval()
    assert torch.equal(net(x, noise, labels), net(x, noise, labels))


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("res, mult", [(28, (1, 2, 2, 2)), (30, (1, 2, 2)), (7, (1, 2))])
def test_resolution_that_cannot_be_halved_raises(res, mult):
    with pytest.raises(EctuneError, match="cannot be halved"):
        SongUNet(img_resolution=res, in_channels=1, out_channels=1, **dict(TINY, channel_mult=mult))


def test_level_resolutions():
    assert level_resolutions(28, 3) == [28, 14, 7]
    assert level_resolutions(8, 3) == [8, 4, 2]
    assert level_resolutions(7, 1) == [7]


def test_wrong_inputs_raise():
    net = SongUNet(img_resolution=28, in_channels=1, out_channels=1, **TINY)
    x, noise, _ = inputs(2, 1, 28)
    with pytest.raises(EctuneError, match="expects x"):
        net(torch.zeros(2, 3, 28, 28), noise)
    with pytest.raises(EctuneError, match="noise_labels"):
        net(x, noise[:1])
    with pytest.raises(EctuneError, match="unconditional"):
        net(x, noise, torch.zeros(2, 10))
    cond = SongUNet(img_resolution=28, in_channels=1, out_channels=1, label_dim=10, **TINY)
    with pytest.raises(EctuneError, match="one-hot"):
        cond(x, noise, torch.zeros(2))


# --- gradients and layers -------------------------------------------------------------------------


def test_gradient_reaches_every_parameter():
    kwargs = dict(TINY, channel_mult=(1, 2, 2), attn_resolutions=(14,))
    net = perturb(SongUNet(img_resolution=28, in_channels=1, out_channels=1, label_dim=3, augment_dim=2, **kwargs))
    x, noise, labels = inputs(2, 1, 28, label_dim=3)
    net(x, noise, labels, augment_labels=torch.randn(2, 2)).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_positional_embedding_is_sin_then_cos_with_endpoint_frequencies():
    emb = PositionalEmbedding(8)(torch.tensor([0.0, 2.0]))
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = torch.tensor([1.0, 10_000 ** (-1 / 3), 10_000 ** (-2 / 3), 1e-4])
    assert torch.allclose(emb[1], torch.cat([(2 * freqs).sin(), (2 * freqs).cos()]))


def test_resample_up_then_down_is_identity():
    x = torch.randn(2, 3, 7, 7)
    up = resample(x, "up")
    assert up.shape == (2, 3, 14, 14) and torch.equal(up[:, :, ::2, ::2], x)
    assert torch.allclose(resample(up, "down"), x)
    assert resample(x, "keep") is x

"""Step 3: the U-Net's shapes, level sizes, size and dependence on t."""
import pytest
import torch

import ddpm_mnist as dm


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return dm.UNet()


def test_output_shape_and_parameter_count(unet):
    x = torch.randn(3, 1, 28, 28)
    assert unet(x, torch.tensor([0, 500, 999])).shape == (3, 1, 28, 28)
    n = sum(p.numel() for p in unet.parameters())
    assert 8_000_000 <= n <= 14_000_000, n


def test_levels_are_exactly_28_14_7_3(unet):
    enc, dec = [], []
    hooks = [blocks[-1].register_forward_hook(lambda m, i, o: enc.append(tuple(o.shape[1:]))) for blocks in unet.enc]
    hooks += [blocks[-1].register_forward_hook(lambda m, i, o: dec.append(tuple(o.shape[1:]))) for blocks in unet.dec]
    unet(torch.randn(2, 1, 28, 28), torch.tensor([1, 2]))
    for h in hooks:
        h.remove()
    assert enc == [(64, 28, 28), (128, 14, 14), (256, 7, 7), (256, 3, 3)]
    assert dec == [(256, 7, 7), (128, 14, 14), (64, 28, 28)]


def test_every_norm_is_groupnorm_8_and_every_conv_width_divides(unet):
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 8 for m in norms)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)) for m in unet.modules())


def test_timestep_changes_the_output(unet):
    x = torch.randn(1, 1, 28, 28).repeat(2, 1, 1, 1)
    out = unet(x, torch.tensor([10, 900]))
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_timestep_embedding_is_sinusoidal():
    emb = dm.timestep_embedding(torch.tensor([0, 7]), 8)
    freqs = torch.tensor([10000 ** (-i / 4) for i in range(4)])
    assert torch.allclose(emb[0], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1.0]))
    assert torch.allclose(emb[1], torch.cat([(7 * freqs).sin(), (7 * freqs).cos()]), atol=1e-6)


def test_widths_are_a_constructor_argument():
    small = dm.UNet(channels=(32, 64, 128, 128))
    assert small.stem.out_channels == 32
    assert sum(p.numel() for p in small.parameters()) < 0.3 * 11_000_000
    assert small(torch.randn(1, 1, 28, 28), torch.tensor([3])).shape == (1, 1, 28, 28)

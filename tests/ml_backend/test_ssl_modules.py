"""SimCLRv2 building blocks on tiny CPU tensors, checked against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch

from ml_backend.ssl.encoder import MultiScaleEncoder, ResNetEncoder, check_scales
from ml_backend.ssl.heads import ProjectionHead
from ml_backend.ssl.losses import NTXentLoss
from ml_backend.ssl.transforms import AugmentConfig, TwoViews, augmentation, eval_transform


def reference_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float) -> float:
    """SimCLR eq. 1 written as loops over the 2N views."""
    views = [v / v.norm() for v in torch.cat([z_a, z_b]).double()]
    n = z_a.shape[0]
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        sims = {k: float(views[i] @ views[k]) / temperature for k in range(2 * n) if k != i}
        denominator = sum(math.exp(s) for s in sims.values())
        total += -math.log(math.exp(sims[partner]) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_reference(temperature):
    generator = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(5, 7, generator=generator), torch.randn(5, 7, generator=generator)
    loss = NTXentLoss(temperature)(z_a, z_b)
    assert loss.item() == pytest.approx(reference_nt_xent(z_a, z_b, temperature), rel=1e-5)


def test_nt_xent_rewards_matching_pairs():
    z = torch.randn(8, 16)
    aligned = NTXentLoss(0.1)(z, z + 0.01 * torch.randn_like(z))
    shuffled = NTXentLoss(0.1)(z, z[torch.randperm(8)])
    assert aligned < shuffled


def test_nt_xent_checks_arguments():
    with pytest.raises(ValueError):
        NTXentLoss(0.0)
    with pytest.raises(ValueError):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError):
        NTXentLoss()(torch.randn(1, 3), torch.randn(1, 3))


def test_projection_head_layers_and_middle_output():
    head = ProjectionHead(512, hidden_dim=64, out_dim=16, num_layers=3)
    x = torch.randn(4, 512)
    assert head(x).shape == (4, 16)
    assert head(x, upto=1).shape == (4, 64)      # SimCLRv2 fine-tunes from here
    assert head(x, upto=0).shape == (4, 512)
    assert [head.output_dim(k) for k in range(4)] == [512, 64, 64, 16]
    # the last block has no ReLU, the others do
    assert isinstance(head.blocks[0][-1], torch.nn.ReLU)
    assert not isinstance(head.blocks[-1][-1], torch.nn.ReLU)
    with pytest.raises(ValueError):
        head(x, upto=4)
    with pytest.raises(ValueError):
        ProjectionHead(512, num_layers=0)


@pytest.mark.parametrize("arch,size,small,dim", [("resnet18", 28, True, 512),
                                                 ("resnet18", 128, False, 512),
                                                 ("resnet50", 28, True, 2048)])
def test_encoder_takes_greyscale_of_any_size(arch, size, small, dim):
    encoder = ResNetEncoder(arch, small_input=small).eval()
    with torch.no_grad():
        features = encoder(torch.rand(2, 1, size, size))
    assert features.shape == (2, dim) and encoder.feature_dim == dim
    assert encoder.net.conv1.in_channels == 1


def test_a_multi_scale_encoder_reads_the_scan_at_each_size_with_one_network():
    torch.manual_seed(0)
    inner = ResNetEncoder("resnet18", small_input=False).eval()
    reader = MultiScaleEncoder(inner, [2, 1]).eval()
    assert reader.scales == (1, 2) and reader.feature_dim == 1024
    assert sum(p.numel() for p in reader.parameters()) == sum(p.numel() for p in inner.parameters())
    x = torch.rand(3, 1, 64, 64)                  # the scan at twice the training size (32)
    with torch.no_grad():
        features = reader(x)
        small = inner(torch.nn.functional.avg_pool2d(x, 2))
        large = inner(x)
    assert features.shape == (3, 1024)
    # scale 1 first (the scan averaged down to 32 px), then scale 2 (the full 64 px)
    torch.testing.assert_close(features[:, reader.block(1)], small)
    torch.testing.assert_close(features[:, reader.block(2)], large)
    assert not torch.allclose(small, large)       # two different views, not one repeated


def test_a_multi_scale_encoder_pools_the_stages_it_is_asked_for():
    torch.manual_seed(0)
    inner = ResNetEncoder("resnet18", small_input=False).eval()
    reader = MultiScaleEncoder(inner, [1, 2], layers=[4, 3]).eval()
    assert reader.layers == (3, 4) and reader.feature_dim == (256 + 512) * 2
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        features = reader(x)
        small = torch.nn.functional.avg_pool2d(x, 2)
        net = inner.net
        stage3 = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))
    assert features.shape == (2, 1536)
    # per size, the third stage's average then the output; the output's block is what the
    # encoder alone returns (what Grad-CAM draws the map through)
    torch.testing.assert_close(features[:, reader.block(1)], inner(small))
    torch.testing.assert_close(features[:, reader.block(2, 4)], inner(x))
    torch.testing.assert_close(features[:, reader.block(2, 3)], stage3.mean((2, 3)))
    assert reader.block(1, 3) == slice(0, 256) and reader.block(2, 4) == slice(1024, 1536)
    with pytest.raises(ValueError, match="include 4"):
        MultiScaleEncoder(inner, [1], layers=[2, 3])


@pytest.mark.parametrize("scales,message", [([], "between 1 and 8"), ([0, 1], "between 1 and 8"),
                                            ([1, 16], "between 1 and 8"),
                                            ([2, 3], "divide the largest"),
                                            (["a"], "whole numbers")])
def test_embedding_scales_are_checked(scales, message):
    with pytest.raises(ValueError, match=message):
        check_scales(scales)
    assert check_scales(["4", 1, 2, 2]) == (1, 2, 4)


def test_encoder_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch"):
        ResNetEncoder("vgg16")


def _asymmetric(size: int = 32) -> torch.Tensor:
    image = torch.zeros(1, size, size)
    image[:, :, : size // 4] = 1.0          # a bright band on the left only
    return image


def _geometry_only(hflip: bool) -> AugmentConfig:
    return AugmentConfig(size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation=0.0,
                         translate=0.0, scale=(1.0, 1.0), brightness=0.0, contrast=(1.0, 1.0),
                         gamma=(1.0, 1.0), blur_p=0.0, noise_p=0.0, hflip=hflip, mean=0.0,
                         std=1.0)


def test_no_horizontal_flip_unless_allowed():
    torch.manual_seed(0)
    image = _asymmetric()
    strict = augmentation(_geometry_only(hflip=False))
    assert all(strict(image)[0, :, :4].mean() > 0.9 for _ in range(30))
    flipping = augmentation(_geometry_only(hflip=True))
    left_bright = [flipping(image)[0, :, :4].mean() > 0.9 for _ in range(60)]
    assert 10 < sum(left_bright) < 50


def test_two_views_differ_and_keep_shape():
    torch.manual_seed(0)
    config = AugmentConfig(size=28)
    view_a, view_b = TwoViews(config)(torch.rand(1, 40, 40))
    assert view_a.shape == view_b.shape == (1, 28, 28)
    assert not torch.allclose(view_a, view_b)
    assert eval_transform(config)(torch.rand(1, 40, 40)).shape == (1, 28, 28)


def test_augment_config_validates():
    with pytest.raises(ValueError):
        AugmentConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError):
        AugmentConfig(size=4)

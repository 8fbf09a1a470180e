"""The U-Net's architecture: the paper's 23 convolutions, shapes for both paddings, overlap-tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_unet.unet import UNet, count_convolutions, forward_padded, fuse_batchnorm, mirror_index


def test_paper_settings_have_23_convolutions_and_map_572_to_388():
    model = UNet(in_channels=1, out_channels=2, base_channels=64, depth=4, padding="valid")
    assert count_convolutions(model) == 23
    # Parameters counted by hand from the paper's figure 1 (3x3 convs, 2x2 up-convs, 1x1 output).
    conv, up = (lambda a, b: 9 * a * b + b), (lambda a, b: 4 * a * b + b)
    w = [64 * 2**i for i in range(5)]
    expected = conv(1, 64) + conv(64, 64) + 64 * 2 + 2
    for i in range(1, 5):
        expected += conv(w[i - 1], w[i]) + conv(w[i], w[i])  # contracting path
        expected += up(w[i], w[i - 1]) + conv(2 * w[i - 1], w[i - 1]) + conv(w[i - 1], w[i - 1])  # expanding
    assert sum(p.numel() for p in model.parameters()) == expected == 31_030_658
    assert model.output_size(572) == 388
    small = UNet(in_channels=1, out_channels=2, base_channels=4, depth=4, padding="valid")
    with torch.no_grad():
        assert small(torch.zeros(1, 1, 572, 572)).shape == (1, 2, 388, 388)


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_depth_and_width_are_configuration(depth):
    model = UNet(base_channels=4, depth=depth, padding="same")
    assert count_convolutions(model) == 5 * depth + 3
    assert model.inc[0].out_channels == 4 and model.down[-1][1][0].out_channels == 4 * 2**depth


def test_same_padding_keeps_any_image_size():
    model = UNet(base_channels=4, depth=4, padding="same", norm="instance").eval()
    with torch.no_grad():
        out = forward_padded(model, torch.randn(2, 4, 101, 67))
    assert out.shape == (2, 4, 101, 67)


def test_valid_padding_overlap_tile_covers_the_whole_image():
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=3, padding="valid").eval()
    image = torch.randn(1, 4, 50, 37)
    with torch.no_grad():
        out = forward_padded(model, image)
        assert out.shape == (1, 4, 50, 37)
        # The same as running the network on a mirror-padded tile by hand (numpy's reflect).
        in_h, out_h = model.valid_sizes(50)
        in_w, out_w = model.valid_sizes(37)
        m_h, m_w = (in_h - out_h) // 2, (in_w - out_w) // 2
        tile = np.pad(image.numpy(), ((0, 0), (0, 0), (m_h, in_h - 50 - m_h), (m_w, in_w - 37 - m_w)), mode="reflect")
        expected = model(torch.from_numpy(tile))[:, :, :50, :37]
    torch.testing.assert_close(out, expected)
    # Every output pixel depends on the image: changing a corner pixel changes the corner output.
    changed = image.clone()
    changed[0, :, 0, 0] += 5
    with torch.no_grad():
        assert not torch.allclose(forward_padded(model, changed)[0, :, 0, 0], out[0, :, 0, 0])


def test_valid_padding_rejects_sizes_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        UNet(base_channels=4, depth=4, padding="valid").output_size(571)


def test_mirror_index_matches_numpy_reflect_far_beyond_the_edge():
    idx = torch.arange(-25, 30)
    expected = np.pad(np.arange(7), 25, mode="reflect")[:55]
    np.testing.assert_array_equal(mirror_index(idx, 7).numpy(), expected)


def test_3d_network():
    model = UNet(base_channels=2, depth=2, padding="same", spatial_dims=3).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 4, 16, 16, 16)).shape == (1, 4, 16, 16, 16)


def test_batchnorm_fusion_keeps_the_outputs():
    torch.manual_seed(0)
    model = UNet(base_channels=4, depth=2, padding="same", norm="batch")
    model.train()
    with torch.no_grad():
        for _ in range(3):  # give BatchNorm non-trivial running statistics
            model(torch.randn(4, 4, 32, 32) * 3 + 1)
    model.eval()
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        before = model(x)
        fused = fuse_batchnorm(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        torch.testing.assert_close(fused(x), before, atol=1e-4, rtol=1e-4)

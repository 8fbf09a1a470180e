"""The U-Net of Ronneberger, Fischer and Brox (MICCAI 2015), with its configuration in the constructor.

At the paper's settings (64 base channels, 4 poolings, unpadded convolutions) the network has
23 convolution layers: 2 per level on the way down (8), 2 in the bottleneck, 4 up-convolutions,
2 per level on the way up (8) and the 1x1 output convolution. A 572x572 tile gives a 388x388
output. `padding="same"` keeps every size (inputs are padded to a multiple of 2**depth and
cropped back by the inference engine). `spatial_dims=3` builds the same network in 3D.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


_INT_BOUNDS = {"in_channels": (1, 32), "out_channels": (1, 16), "base_channels": (1, 512), "depth": (1, 7),
               "spatial_dims": (2, 3)}
MAX_CHANNELS = 8192  # the paper's widest level has 1024


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    base_channels: int = 64
    depth: int = 4  # number of 2x2 poolings
    padding: str = "valid"  # "valid" (the paper) or "same"
    norm: str = "none"  # "none" (the paper), "batch" or "instance"
    spatial_dims: int = 2

    def __post_init__(self):
        # Bounds checked before anything is built: a model file must not be able to ask for
        # a network of hundreds of GB.
        for name, (lo, hi) in _INT_BOUNDS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise ValueError(f"{name} must be a whole number from {lo} to {hi}, not {value!r}")
        if self.base_channels * 2**self.depth > MAX_CHANNELS:
            raise ValueError(f"base_channels x 2^depth = {self.base_channels * 2**self.depth} channels at the "
                             f"bottom; at most {MAX_CHANNELS}")
        if self.padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', not {self.padding!r}")
        if self.norm not in ("none", "batch", "instance"):
            raise ValueError(f"norm must be 'none', 'batch' or 'instance', not {self.norm!r}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, not {self.spatial_dims!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _layers(spatial_dims: int):
    if spatial_dims == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d, nn.BatchNorm2d, nn.InstanceNorm2d
    return nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d, nn.BatchNorm3d, nn.InstanceNorm3d


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by (optional normalisation and) ReLU.

    (N, C_in, *S) -> (N, C_out, *S) with padding "same", (N, C_out, *(S - 4)) with "valid".
    """

    def __init__(self, c_in: int, c_out: int, cfg: UNetConfig):
        conv, _, _, batch, instance = _layers(cfg.spatial_dims)
        pad = 1 if cfg.padding == "same" else 0
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(((c_in, c_out), (c_out, c_out))):
            layers.append(conv(a, b, kernel_size=3, padding=pad, bias=cfg.norm == "none"))
            if cfg.norm == "batch":
                layers.append(batch(b))
            elif cfg.norm == "instance":
                layers.append(instance(b, affine=True))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Down(nn.Sequential):
    """2x2 max-pool with stride 2, then DoubleConv: (N, C, *S) -> (N, 2C, *(S/2 [- 4]))."""

    def __init__(self, c_in: int, c_out: int, cfg: UNetConfig):
        pool = _layers(cfg.spatial_dims)[2]
        super().__init__(pool(2), DoubleConv(c_in, c_out, cfg))


def center_crop(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Crop the spatial dims of x to `size` around the centre (the paper's skip cropping)."""
    slices = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], size):
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return x[tuple(slices)]


class Up(nn.Module):
    """2x2 up-convolution halving the channels, concatenation with the skip, DoubleConv.

    up: (N, 2C, *S), skip: (N, C, *S') -> (N, C, *(2S [- 4])); the skip is centre-cropped to 2S.
    """

    def __init__(self, c_in: int, c_out: int, cfg: UNetConfig):
        super().__init__()
        upconv = _layers(cfg.spatial_dims)[1]
        self.up = upconv(c_in, c_out, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * c_out, c_out, cfg)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if skip.shape[2:] != x.shape[2:]:
            skip = center_crop(skip, tuple(x.shape[2:]))
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """(N, in_channels, *S) -> logits (N, out_channels, *S_out).

    S_out == S with padding "same" (S a multiple of 2**depth); see `output_size` for "valid".
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs):
        super().__init__()
        cfg = config or UNetConfig(**kwargs)
        self.config = cfg
        widths = [cfg.base_channels * 2**i for i in range(cfg.depth + 1)]
        self.inc = DoubleConv(cfg.in_channels, widths[0], cfg)
        self.down = nn.ModuleList(Down(widths[i], widths[i + 1], cfg) for i in range(cfg.depth))
        self.up = nn.ModuleList(Up(widths[i + 1], widths[i], cfg) for i in reversed(range(cfg.depth)))
        conv = _layers(cfg.spatial_dims)[0]
        self.out = conv(widths[0], cfg.out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        return self.out(x)

    # Geometry of the unpadded network -------------------------------------------------
    def output_size(self, input_size: int) -> int:
        """Spatial output size for an input size along one axis (raises if it does not fit)."""
        if self.config.padding == "same":
            return input_size
        s = input_size
        for _ in range(self.config.depth):
            s -= 4
            if s <= 0 or s % 2:
                raise ValueError(f"input size {input_size} does not fit the unpadded U-Net")
            s //= 2
        s -= 4
        for _ in range(self.config.depth):
            s = 2 * s - 4
        if s <= 0:
            raise ValueError(f"input size {input_size} is too small for the unpadded U-Net")
        return s

    def valid_sizes(self, min_output: int) -> tuple[int, int]:
        """The smallest (input, output) tile sizes with output >= min_output ("valid" padding)."""
        n = 5  # bottleneck input size; grows until the output is large enough
        while True:
            inp, out = n, n - 4
            for _ in range(self.config.depth):
                inp = 2 * inp + 4
                out = 2 * out - 4
            if out >= min_output and out > 0:
                return inp, out
            n += 1


def count_convolutions(model: nn.Module) -> int:
    """Convolution layers, up-convolutions included (the paper counts 23)."""
    kinds = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    return sum(isinstance(m, kinds) for m in model.modules())


def fuse_batchnorm(model: UNet) -> UNet:
    """Fold eval-mode BatchNorm into the preceding convolution (same outputs, less work)."""
    for block in model.modules():
        if not isinstance(block, DoubleConv):
            continue
        layers = list(block)
        fused: list[nn.Module] = []
        i = 0
        while i < len(layers):
            layer = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(layer, (nn.Conv2d, nn.Conv3d)) and isinstance(nxt, (nn.BatchNorm2d, nn.BatchNorm3d)):
                fused.append(torch.nn.utils.fusion.fuse_conv_bn_eval(layer.eval(), nxt.eval()))
                i += 2
            else:
                fused.append(layer)
                i += 1
        for name in list(block._modules):
            del block._modules[name]
        for j, layer in enumerate(fused):
            block.add_module(str(j), layer)
    return model


def forward_padded(model: UNet, x: torch.Tensor) -> torch.Tensor:
    """Logits for every pixel of x (N, C, H, W) whatever its size.

    "same": pad to a multiple of 2**depth with zeros (the normalised background) and crop back.
    "valid": the paper's overlap-tile strategy; mirror-pad so that one output tile covers the
    image (the network sees real context at the borders, never zeros).
    """
    h, w = x.shape[2:]
    cfg = model.config
    if cfg.padding == "same":
        m = 2**cfg.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        return model(x)[:, :, :h, :w]
    in_h, out_h = model.valid_sizes(h)
    in_w, out_w = model.valid_sizes(w)
    top, left = (in_h - out_h) // 2, (in_w - out_w) // 2
    rows = mirror_index(torch.arange(in_h, device=x.device) - top, h)
    cols = mirror_index(torch.arange(in_w, device=x.device) - left, w)
    tile = x.index_select(2, rows).index_select(3, cols)
    return model(tile)[:, :, :h, :w]


def mirror_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Indices reflected into [0, n) (mirror without repeating the edge, any distance)."""
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)

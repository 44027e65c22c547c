"""U-Net (Ronneberger et al. 2015) for dense prediction on tiles.

Plain torch, any depth and any number of input channels. The encoder has ``len(filters)`` levels
(the last is the bottleneck) separated by 2x2 max-pooling; the decoder mirrors it with an upsampling
step, a skip concatenation and two convolutions per level. Padding is "same", so the output has the
input's height and width whenever both are divisible by ``2 ** (len(filters) - 1)``.

The 9-level encoder of the cascaded tumour-segmentation paper is
``UNet(in_channels=4, filters=(8, 16, 32, 64, 128, 128, 256, 256, 512))`` (input: RGB + heatmap,
tile side a multiple of 256; with instance norm, or batch norm and batches of one in training, at least
512 on one side, so that the bottleneck is larger than 1 x 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ...errors import ParameterError

__all__ = ["UNet"]

_NORMS = ("batch", "instance", None)
_UPSAMPLES = ("transpose", "bilinear")


def _norm_layer(norm: str | None, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class _DoubleConv(nn.Sequential):
    """(Conv3x3 - Norm - ReLU) x 2, with optional dropout at the end."""

    def __init__(self, in_ch: int, out_ch: int, norm: str | None, dropout: float) -> None:
        bias = norm is None  # a bias before a normalisation is redundant
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=bias),
            _norm_layer(norm, out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=bias),
            _norm_layer(norm, out_ch),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class _Up(nn.Module):
    """Upsample x2 to ``out_ch`` channels, concatenate the skip, then a double convolution."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, upsample: str, norm: str | None,
                 dropout: float) -> None:
        super().__init__()
        if upsample == "transpose":
            self.up = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_ch, out_ch, kernel_size=1),
            )
        self.conv = _DoubleConv(out_ch + skip_ch, out_ch, norm, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        return self.conv(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """U-Net returning per-pixel logits.

    Parameters
    ----------
    in_channels : int
        Channels of the input (3 for RGB, 4 for RGB + heatmap, ...).
    out_channels : int
        Channels of the output logits (number of classes).
    filters : sequence of int
        Channels of each encoder level, shallowest first; the last level is the bottleneck.
        The decoder level ``i`` has ``filters[i]`` channels.
    upsample : {"transpose", "bilinear"}
        ``"transpose"``: ConvTranspose2d(kernel 2, stride 2). ``"bilinear"``: bilinear x2 followed by
        a 1x1 convolution to the skip level's channel count.
    norm : {"batch", "instance", None}
        Normalisation after each 3x3 convolution (instance norm is affine).
    dropout : float
        Channel dropout probability after each double convolution (0 disables it).

    Notes
    -----
    Input height and width must be divisible by ``2 ** (len(filters) - 1)``; a ``ValueError``
    says so otherwise. Works with ``channels_last`` tensors and bf16 autocast.
    """

    registry_name = "unet"

    def __init__(self, in_channels: int = 3, out_channels: int = 2,
                 filters: Sequence[int] = (32, 64, 128, 256), upsample: str = "transpose",
                 norm: str | None = "batch", dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(filters, (str, bytes)) or not hasattr(filters, "__iter__") or not all(
                isinstance(f, (int, np.integer)) and not isinstance(f, (bool, np.bool_)) for f in filters):
            raise ParameterError(f"UNet: filters must be a non-empty sequence of positive ints, got {filters!r}")
        filters = tuple(int(f) for f in filters)
        if len(filters) < 1 or any(f <= 0 for f in filters):
            raise ParameterError(f"UNet: filters must be a non-empty sequence of positive ints, got {filters}")
        if upsample not in _UPSAMPLES:
            raise ParameterError(f"UNet: upsample must be one of {_UPSAMPLES}, got {upsample!r}")
        if norm not in _NORMS:
            raise ParameterError(f"UNet: norm must be one of {_NORMS}, got {norm!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.number)) or not 0.0 <= dropout < 1.0:
            raise ParameterError(f"UNet: dropout must be a number in [0, 1), got {dropout!r}")
        if in_channels < 1 or out_channels < 1:
            raise ParameterError("UNet: in_channels and out_channels must be >= 1")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.filters = filters
        self.upsample = upsample
        self.norm = norm
        self.dropout = float(dropout)

        self.encoder = nn.ModuleList()
        prev = self.in_channels
        for f in filters:
            self.encoder.append(_DoubleConv(prev, f, norm, self.dropout))
            prev = f
        self.pool = nn.MaxPool2d(2)
        self.decoder = nn.ModuleList()
        for i in range(len(filters) - 2, -1, -1):
            self.decoder.append(_Up(prev, filters[i], filters[i], upsample, norm, self.dropout))
            prev = filters[i]
        self.head = nn.Conv2d(prev, self.out_channels, kernel_size=1)

    @property
    def size_divisor(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (len(self.filters) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape ``(N, out_channels, H, W)`` for an input ``(N, in_channels, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ParameterError(f"UNet: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        d = self.size_divisor
        if not torch.jit.is_tracing() and (h % d or w % d):
            raise ParameterError(
                f"UNet with {len(self.filters)} levels needs height and width divisible by {d}, "
                f"got {h}x{w}; pad or crop the input (e.g. to {-(-h // d) * d}x{-(-w // d) * d})")
        # the bottleneck is (h/d) x (w/d): instance norm needs 2 values per channel in each sample, batch norm in
        # training 2 per channel over the batch (torch's own message names neither the model nor the fix)
        cells = (h // d) * (w // d)
        if not torch.jit.is_tracing() and (
                (self.norm == "instance" and cells < 2) or (self.norm == "batch" and self.training and cells * x.shape[0] < 2)):
            need = "in each image" if self.norm == "instance" else "over the batch in training"
            raise ParameterError(
                f"UNet with {len(self.filters)} levels and {self.norm} norm: a {h}x{w} input leaves a {h // d}x{w // d} "
                f"bottleneck, and {self.norm} norm needs at least 2 values per channel {need}; use inputs of at "
                f"least {2 * d}x{d}" + (", a batch of 2 or more" if self.norm == "batch" else "") +
                ", or fewer levels")
        skips = []
        for i, block in enumerate(self.encoder):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck is not a skip
        for up in self.decoder:
            x = up(x, skips.pop())
        return self.head(x)

"""MobileNetV2 (Sandler et al. 2018) in plain torch, with the tumour-segmentation paper's head.

The body follows the published ImageNet configuration: a stride-2 3x3 stem of 32 channels, then
inverted residual blocks given as (expansion t, channels c, repeats n, first stride s)::

    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)

and a 1x1 convolution to 1280 channels. Channel counts are scaled by ``width_mult`` and rounded to
multiples of 8 (the last one is never scaled below 1280). With ``width_mult=1`` and 1000 classes the
standard model has 3,504,872 parameters, the count of the reference implementation.

``head="paper"`` replaces the classifier by the simplified head of the cascaded tumour-segmentation
paper: global average pooling, Dense(100), Dropout(0.5), ReLU, BatchNorm1d, Dense(num_classes).
``forward`` always returns logits; apply a softmax at inference.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...errors import ParameterError

__all__ = ["MobileNetV2", "INVERTED_RESIDUAL_SETTING"]

#: (expansion t, output channels c, repeats n, stride of the first repeat s)
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, never going down by more than 10%."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class _ConvBNReLU6(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) - depthwise 3x3 - linear project (1x1), with a skip when shapes allow."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ParameterError(f"InvertedResidual: stride must be 1 or 2, got {stride}")
        hidden = int(round(in_ch * expand_ratio))
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_ConvBNReLU6(in_ch, hidden, kernel=1))
        layers += [
            _ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 classifier returning logits ``(N, num_classes)``.

    Parameters
    ----------
    num_classes : int
        Output classes.
    in_channels : int
        Input channels (3 for RGB).
    width_mult : float
        Width multiplier applied to every layer's channel count.
    head : {"standard", "paper"}
        ``"standard"``: Dropout(``dropout``) + Linear. ``"paper"``: Dense(``hidden``) - Dropout(0.5) -
        ReLU - BatchNorm1d - Dense(num_classes), the cascaded tumour-segmentation paper's head.
    dropout : float
        Dropout of the head (0.2 for the standard head, 0.5 for the paper's head by default).
    hidden : int
        Width of the paper head's hidden Dense layer (100 in the paper).
    """

    registry_name = "mobilenet_v2"

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                 head: str = "standard", dropout: float | None = None, hidden: int = 100) -> None:
        super().__init__()
        if head not in ("standard", "paper"):
            raise ParameterError(f"MobileNetV2: head must be 'standard' or 'paper', got {head!r}")
        def real(v):
            return not isinstance(v, bool) and isinstance(v, (int, float, np.number)) and np.isfinite(v)

        if not all(real(v) for v in (width_mult, num_classes, in_channels, hidden)) or width_mult <= 0 \
                or num_classes < 1 or in_channels < 1 or hidden < 1:
            raise ParameterError("MobileNetV2: width_mult, num_classes, in_channels and hidden must be positive "
                                 f"finite numbers, got {width_mult!r}, {num_classes!r}, {in_channels!r}, {hidden!r}")
        if dropout is not None and (not real(dropout) or not 0.0 <= dropout < 1.0):
            raise ParameterError(f"MobileNetV2: dropout must be a number in [0, 1), got {dropout!r}")
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.width_mult = float(width_mult)
        self.head = head
        self.dropout = dropout
        self.hidden = int(hidden)
        p = dropout if dropout is not None else (0.2 if head == "standard" else 0.5)

        stem = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [_ConvBNReLU6(in_channels, stem, stride=2)]
        prev = stem
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(prev, out, s if i == 0 else 1, t))
                prev = out
        features.append(_ConvBNReLU6(prev, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        if head == "standard":
            self.classifier = nn.Sequential(nn.Dropout(p), nn.Linear(self.last_channel, num_classes))
        else:
            self.classifier = nn.Sequential(
                nn.Linear(self.last_channel, self.hidden), nn.Dropout(p), nn.ReLU(inplace=True),
                nn.BatchNorm1d(self.hidden), nn.Linear(self.hidden, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features ``(N, last_channel)``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ParameterError(f"MobileNetV2: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        return torch.flatten(self.pool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        return self.classifier(self.forward_features(x))

"""RCCNet: a small CNN for classifying nucleus-centred patches.

Basha et al. 2018, "RCCNet: An Efficient Convolutional Neural Network for Histological Routine Colon
Cancer Nuclei Classification" (ICARCV; arXiv:1810.02797), trained on Sirinukunwattana et al.'s
CRCHistoPhenotypes nuclei (2016, "Locality sensitive deep learning for detection and classification
of nuclei in routine colon cancer histology images", whose own classifier takes 27x27 patches).
RCCNet is the usual lightweight student in teacher-student cell classification.

Layers (input 32x32, the paper's patches)::

    Conv 3x3, 32, same  - ReLU
    Conv 3x3, 32, valid - ReLU - BatchNorm - MaxPool 2 - Dropout     -> 15x15
    Conv 3x3, 64, same  - ReLU
    Conv 3x3, 64, valid - ReLU - BatchNorm - MaxPool 2 - Dropout     -> 6x6
    Flatten - FC 512 - ReLU - BatchNorm - Dropout - FC 512 - ReLU - Dropout - FC num_classes

The paper gives the total as 1,512,868 parameters; this layer list reproduces that number exactly
when, as Keras does, the batch norms' running mean and variance are counted (1,511,652 trainable
parameters + 1,216 running statistics). The same-then-valid padding pattern follows a public
PyTorch reproduction; the placement of BatchNorm and Dropout is our reading of the paper.
``input_size`` may be set to 27 for Sirinukunwattana's patch size (the FC input adapts: 5x5x64).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...errors import ParameterError

__all__ = ["RCCNet"]


def _spatial_after(size: int) -> int:
    """Side of the feature map after the two conv stages (same, valid, pool) x 2."""
    for _ in range(2):
        size = (size - 2) // 2
    return size


class RCCNet(nn.Module):
    """RCCNet classifier returning logits ``(N, num_classes)``.

    Parameters
    ----------
    num_classes : int
        Output classes (4 in the paper: epithelial, inflammatory, fibroblast, miscellaneous).
    in_channels : int
        Input channels.
    input_size : int
        Side of the square input patch (32 in the paper; 27 for Sirinukunwattana's patches).
    dropout : float
        Dropout probability after each conv stage and each hidden FC layer.
    batch_norm : bool
        Use the batch norms (True as published).
    """

    registry_name = "rccnet"

    def __init__(self, num_classes: int = 4, in_channels: int = 3, input_size: int = 32,
                 dropout: float = 0.25, batch_norm: bool = True) -> None:
        super().__init__()
        for name, v in (("input_size", input_size), ("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ParameterError(f"RCCNet: {name} must be a whole number, got {v!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.integer, np.floating)) \
                or not 0.0 <= dropout < 1.0:
            raise ParameterError(f"RCCNet: dropout must be a number in [0, 1), got {dropout!r}")
        side = _spatial_after(int(input_size))
        if side < 1:
            raise ParameterError(f"RCCNet: input_size must be at least 10, got {input_size}")
        if int(num_classes) < 1 or int(in_channels) < 1:
            raise ParameterError(f"RCCNet: num_classes and in_channels must be positive, got {num_classes} and "
                                 f"{in_channels}")
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.input_size = int(input_size)
        self.dropout = float(dropout)
        self.batch_norm = bool(batch_norm)

        def bn2d(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if batch_norm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3), nn.ReLU(inplace=True), bn2d(32), nn.MaxPool2d(2), nn.Dropout(dropout),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3), nn.ReLU(inplace=True), bn2d(64), nn.MaxPool2d(2), nn.Dropout(dropout),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 512), nn.ReLU(inplace=True),
            nn.BatchNorm1d(512) if batch_norm else nn.Identity(), nn.Dropout(dropout),
            nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for patches ``(N, in_channels, input_size, input_size)``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.input_size, self.input_size):
            raise ParameterError(f"RCCNet expects patches (N, {self.in_channels}, {self.input_size}, "
                                 f"{self.input_size}), got {tuple(x.shape)}")
        return self.classifier(self.features(x))

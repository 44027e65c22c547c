"""ResNet-18 / ResNet-34 (He et al. 2016) in plain torch, with an instance-norm switch.

The layout is the reference ImageNet one (7x7 stride-2 stem, 3x3 max-pool, four stages of
BasicBlocks with 64/128/256/512 channels, global average pool, linear head). With 1000 classes and
batch norm, ResNet-18 has 11,689,512 and ResNet-34 21,797,672 parameters, the published counts.

``norm="instance"`` uses affine InstanceNorm2d everywhere batch norm would be (same parameter
count): the choice of the nucleus-subtype classification paper, which makes a prediction
independent of the other patches in the batch and robust to stain shifts.
:func:`replace_batchnorm_with_instancenorm` does the same to any existing module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ...errors import ParameterError

__all__ = ["ResNet", "BasicBlock", "resnet18", "resnet34", "replace_batchnorm_with_instancenorm"]

_LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def _norm_factory(norm: str) -> Callable[[int], nn.Module]:
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "instance":
        return lambda c: nn.InstanceNorm2d(c, affine=True)
    raise ParameterError(f"ResNet: norm must be 'batch' or 'instance', got {norm!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = norm(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = norm(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), norm(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with BasicBlocks, returning logits ``(N, num_classes)``.

    Parameters
    ----------
    depth : {18, 34}
        Number of weighted layers.
    num_classes : int
        Output classes.
    in_channels : int
        Input channels (3 for RGB).
    norm : {"batch", "instance"}
        Normalisation layers; ``"instance"`` is affine InstanceNorm2d (no running statistics).
    """

    def __init__(self, depth: int = 18, num_classes: int = 1000, in_channels: int = 3,
                 norm: str = "batch") -> None:
        super().__init__()
        if depth not in _LAYERS:
            raise ParameterError(f"ResNet: depth must be one of {sorted(_LAYERS)}, got {depth}")
        if num_classes < 1 or in_channels < 1:
            raise ParameterError("ResNet: num_classes and in_channels must be >= 1")
        make_norm = _norm_factory(norm)
        self.depth = int(depth)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.norm = norm
        self.registry_name = f"resnet{depth}"

        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = make_norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        prev = 64
        for i, (blocks, ch) in enumerate(zip(_LAYERS[depth], (64, 128, 256, 512), strict=True)):
            stride = 1 if i == 0 else 2
            layer = [BasicBlock(prev, ch, stride, make_norm)]
            layer += [BasicBlock(ch, ch, 1, make_norm) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            prev = ch
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.InstanceNorm2d) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled features ``(N, 512)``."""
        if self.norm == "instance" and not torch.compiler.is_compiling():
            h, w = x.shape[-2:]
            if -(-h // 32) * -(-w // 32) < 2:  # the last stage's size: each of the 5 strides halves, rounding up
                raise ParameterError(
                    f"ResNet(norm='instance'): a {w} x {h} px input leaves 1 x 1 px at the last stage, where "
                    "instance norm sets every feature to its bias (the prediction no longer depends on the image); "
                    "use patches larger than 32 px (e.g. 64) or norm='batch'")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)``."""
        return self.fc(self.forward_features(x))


def resnet18(num_classes: int = 1000, in_channels: int = 3, norm: str = "batch") -> ResNet:
    """ResNet-18 (BasicBlocks 2-2-2-2)."""
    return ResNet(18, num_classes=num_classes, in_channels=in_channels, norm=norm)


def resnet34(num_classes: int = 1000, in_channels: int = 3, norm: str = "batch") -> ResNet:
    """ResNet-34 (BasicBlocks 3-4-6-3)."""
    return ResNet(34, num_classes=num_classes, in_channels=in_channels, norm=norm)


_BN_TO_IN = {nn.BatchNorm1d: nn.InstanceNorm1d, nn.BatchNorm2d: nn.InstanceNorm2d,
             nn.BatchNorm3d: nn.InstanceNorm3d}


def _instance_norm_like(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    cls = _BN_TO_IN.get(type(bn))
    if cls is None:
        raise TypeError(f"replace_batchnorm_with_instancenorm: no instance norm for {type(bn).__name__}")
    # the same device and dtype as the layer replaced (a half, double or CUDA model stays one), taken from its
    # weights, else its running statistics (affine=False), else the defaults
    ref = bn.weight if bn.affine else bn.running_mean
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    new = cls(bn.num_features, eps=bn.eps, affine=True, **kw)
    if bn.affine:
        with torch.no_grad():
            new.weight.copy_(bn.weight)
            new.bias.copy_(bn.bias)
    return new


#: the attribute marking a module that :func:`replace_batchnorm_with_instancenorm` was applied to (``save`` records
#: these modules in the card, ``load`` applies the function to them again)
_SWITCHED = "_histoflow_instance_norm"


def replace_batchnorm_with_instancenorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm{1,2,3}d in ``module`` by an affine InstanceNorm of the same size.

    Affine weights are copied; running statistics are dropped (instance norm normalises each
    sample by its own statistics). The module is changed in place and returned (when ``module``
    is itself a batch norm, the new layer is returned).

    ``BatchNorm1d`` layers inside ``module`` are left as they are: on ``(N, C)`` inputs (after a flatten, as in classifier
    heads) an instance norm would normalise the batch as if it were channels. A model that records its
    normalisation (``norm``) is marked ``"instance"``; and :func:`~histoflow.ml.models.save` records in the card
    which modules were switched, so that :func:`~histoflow.ml.models.load` switches them again (any architecture).
    """
    if type(module) in _BN_TO_IN:  # asked for one layer: that layer (a BatchNorm1d on (N, C, L) inputs)
        new = _instance_norm_like(module)
    else:
        new = _replace_batchnorm(module)
    setattr(new, _SWITCHED, True)
    return new


def _replace_batchnorm(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if type(child) in _BN_TO_IN and not isinstance(child, nn.BatchNorm1d):
            setattr(module, name, _instance_norm_like(child))
        else:
            _replace_batchnorm(child)
    if isinstance(getattr(module, "norm", None), str):
        module.norm = "instance"
    return module

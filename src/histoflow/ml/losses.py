"""Loss functions for training segmentation and classification models.

Every loss is a :class:`torch.nn.Module` with a functional twin of the same name in snake case:

==========================  ==========================  ============================================
module                      function                    what it is
==========================  ==========================  ============================================
:class:`DiceLoss`           :func:`dice_loss`           soft Dice from logits (softmax or sigmoid)
:class:`DiceCELoss`         :func:`dice_ce_loss`        weighted sum of soft Dice and cross entropy
:class:`HoVerNetLoss`       :func:`hovernet_loss`       the HoVer-Net loss (NP, HV and TP branches)
:class:`DistillationLoss`   :func:`distillation_loss`   Hinton et al. knowledge distillation
:class:`CWCELoss`           :func:`cwce_loss`           cluster-weighted categorical cross entropy
==========================  ==========================  ============================================

and :func:`hv_targets` (numpy) makes the horizontal/vertical target maps of HoVer-Net from an instance
label image.

Conventions: predictions are *logits* (never probabilities) shaped ``(N, C, H, W)`` (or ``(N, C)`` for
classification); class targets are integer tensors ``(N, H, W)`` (or ``(N,)``). The segmentation losses
also accept float targets shaped like the logits (one-hot or soft labels). Shape mismatches raise a
``ValueError`` that names both shapes.

Integer and one-hot targets give the same loss except with class weights on the cross entropy
(``ce_weight``): as in :func:`torch.nn.functional.cross_entropy` (and MONAI), with integer targets the
weighted sum is divided by the summed weights of the pixels' classes (a weighted mean), with float
targets by the number of pixels, so the two differ unless every weight is 1.

The losses are implemented directly in torch (importing MONAI is slow and its losses want one-hot
targets); the tests check :class:`DiceLoss`, :class:`DiceCELoss`, :func:`hv_targets` and the
non-gradient terms of :class:`HoVerNetLoss` against ``monai.losses``, ``monai.transforms.ComputeHoVerMaps``
and ``monai.apps.pathology.losses.HoVerNetLoss`` numerically. MONAI's HoVer-Net loss was not wrapped:
it needs one-hot targets, takes the gradients with a binomial-expanded Sobel kernel (reflect padded)
instead of the 5x5 ``d / |d|^2`` kernel of the HoVer-Net reference code, and its check that the type
branch is present in both dicts compares the target with itself.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ParameterError

__all__ = [
    "DiceLoss", "dice_loss", "DiceCELoss", "dice_ce_loss",
    "HoVerNetLoss", "hovernet_loss", "hv_targets", "sobel_kernel_5x5",
    "DistillationLoss", "distillation_loss", "CWCELoss", "cwce_loss",
]

Weights = Optional[Union[Sequence[float], np.ndarray, torch.Tensor]]


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _as_weight(weight: Weights, n_classes: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=like.dtype, device=like.device).reshape(-1)
    if w.numel() != n_classes:
        raise ParameterError(f"class weights have {w.numel()} entries but the logits have {n_classes} classes")
    if bool((w < 0).any()):
        raise ParameterError("class weights must be non-negative")
    return w


def _check_logits(logits: torch.Tensor, name: str = "logits", min_dim: int = 2) -> torch.Tensor:
    """``logits`` checked, and in float32 when they are 16-bit (autocast's bfloat16 or float16): the losses'
    softmaxes and sums over pixels need float32 (in float16 a count of 65,536 pixels is inf; in bfloat16 a Dice
    term over a batch moves in steps of ~1/256), as torch's autocast gives its own losses."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim < min_dim:
        raise ParameterError(f"{name} must have shape (N, C, ...), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ParameterError(f"{name} must be floating point (logits), got {logits.dtype}")
    return _float32(logits)


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _onehot_target(logits: torch.Tensor, target: torch.Tensor, ignore_index: Optional[int] = None):
    """(one-hot float target shaped like logits, valid mask (N, 1, ...) or None).

    ``target`` is either integer class indices shaped ``(N, ...)`` or a float tensor shaped like
    ``logits``. For a single-channel (binary) logit the integer target is the foreground indicator.
    """
    n_classes = logits.shape[1]
    if target.shape == logits.shape and target.is_floating_point():
        if ignore_index is not None:
            raise ParameterError("ignore_index needs integer class targets, not one-hot/soft targets")
        return target.to(logits.dtype), None
    expected = (logits.shape[0],) + tuple(logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ParameterError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}: "
            f"expected integer classes {expected} or a float target {tuple(logits.shape)}")
    if target.is_floating_point():
        raise ParameterError(f"class-index target must be an integer tensor, got {target.dtype}")
    target = target.long()
    valid = None
    if ignore_index is not None:
        valid = target != ignore_index
        target = torch.where(valid, target, torch.zeros_like(target))
    if n_classes == 1:
        if bool(((target < 0) | (target > 1)).any()):
            raise ParameterError("a binary (single-channel) target must contain only 0 and 1")
        onehot = target.unsqueeze(1).to(logits.dtype)
    else:
        if bool(((target < 0) | (target >= n_classes)).any()):
            raise ParameterError(f"target classes must lie in [0, {n_classes - 1}]")
        onehot = F.one_hot(target, n_classes).movedim(-1, 1).to(logits.dtype)
    if valid is not None:
        valid = valid.unsqueeze(1).to(logits.dtype)
    return onehot, valid


def _activate(logits: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "auto":
        activation = "sigmoid" if logits.shape[1] == 1 else "softmax"
    if activation == "softmax":
        if logits.shape[1] == 1:
            raise ParameterError("softmax over a single channel is constant; use activation='sigmoid'")
        return torch.softmax(logits, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation == "none":
        return logits
    raise ParameterError(f"activation must be 'auto', 'softmax', 'sigmoid' or 'none', got {activation!r}")


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ParameterError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# --------------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------------
def dice_loss(logits: torch.Tensor, target: torch.Tensor, *, activation: str = "auto",
              include_background: bool = True, smooth: float = 1e-5, batch: bool = False,
              ignore_index: Optional[int] = None, class_weights: Weights = None,
              reduction: str = "mean") -> torch.Tensor:
    """Soft Dice loss ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` from logits.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, C, H, W)`` (any number of spatial dimensions, including none) raw scores.
    target : torch.Tensor
        Integer classes ``(N, H, W)`` or a float (one-hot / soft) target shaped like ``logits``. With a
        single-channel logit the integer target is the binary foreground mask (0/1).
    activation : {"auto", "softmax", "sigmoid", "none"}
        ``"auto"``: softmax over channels when ``C > 1``, sigmoid when ``C == 1`` (binary).
        ``"none"`` treats ``logits`` as probabilities already.
    include_background : bool
        When False, channel 0 is left out of the average (multi-class only; a single-channel binary
        logit is the foreground itself).
    smooth : float
        Added to the numerator and the denominator; keeps the loss defined for empty classes
        (an empty class predicted empty scores a Dice of 1).
    batch : bool
        False: one Dice per sample and class, then averaged. True: sums over the whole batch first
        (one Dice per class), as HoVer-Net and MONAI's ``batch=True`` do.
    ignore_index : int, optional
        Pixels with this target value are left out of both the prediction and the target sums.
    class_weights : sequence of float, optional
        Weights per channel for the average over classes (one per channel of ``logits``; the background's
        is dropped with it). At least one of the weights used must be positive.
    reduction : {"mean", "sum", "none"}
        Over the per-(sample,) class losses. ``"none"`` returns ``(N, C')`` (or ``(C',)`` with
        ``batch=True``).

    Returns
    -------
    torch.Tensor
        A scalar unless ``reduction="none"``.

    Examples
    --------
    >>> logits = torch.tensor([[[[9.0]], [[-9.0]]]])        # (1, 2, 1, 1): confident class 0
    >>> float(dice_loss(logits, torch.tensor([[[0]]])))  # doctest: +ELLIPSIS
    0.0...
    """
    logits = _check_logits(logits)
    onehot, valid = _onehot_target(logits, target, ignore_index)
    probs = _activate(logits, activation)
    if valid is not None:
        probs = probs * valid
        onehot = onehot * valid
    if logits.ndim == 2:  # (N, C): one pixel per sample (sum(dim=()) would sum over everything)
        probs, onehot = probs.unsqueeze(-1), onehot.unsqueeze(-1)
    dims = tuple(range(2, probs.ndim))
    if batch:
        dims = (0,) + dims
    inter = (probs * onehot).sum(dim=dims)
    denom = probs.sum(dim=dims) + onehot.sum(dim=dims)
    loss = 1.0 - (2.0 * inter + smooth) / (denom + smooth)  # (N, C) or (C,)
    w = _as_weight(class_weights, logits.shape[1], logits)
    if not include_background and logits.shape[1] > 1:
        loss = loss[..., 1:]
        w = None if w is None else w[1:]
    if w is not None:
        if not bool((w > 0).any()):
            left = " after dropping the background (include_background=False)" if not include_background else ""
            raise ParameterError(f"class_weights are all zero{left}: the weighted mean over classes is undefined")
        if reduction == "none":
            return loss * w
        # weighted mean over classes, then the mean/sum over samples
        per_sample = (loss * w).sum(dim=-1) / w.sum()
        return _reduce(per_sample, reduction)
    return _reduce(loss, reduction)


class DiceLoss(nn.Module):
    """Soft Dice loss from logits; see :func:`dice_loss` for the parameters.

    Examples
    --------
    >>> loss = DiceLoss(include_background=False)
    >>> logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    >>> target = torch.randint(0, 3, (2, 8, 8))
    >>> loss(logits, target).backward()
    """

    def __init__(self, activation: str = "auto", include_background: bool = True, smooth: float = 1e-5,
                 batch: bool = False, ignore_index: Optional[int] = None, class_weights: Weights = None,
                 reduction: str = "mean") -> None:
        super().__init__()
        _activate(torch.zeros(1, 2), activation)  # validate early
        _reduce(torch.zeros(1), reduction)
        self.activation = activation
        self.include_background = include_background
        self.smooth = float(smooth)
        self.batch = batch
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.register_buffer("class_weights", None if class_weights is None
                             else torch.as_tensor(class_weights, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_loss(logits, target, activation=self.activation, include_background=self.include_background,
                         smooth=self.smooth, batch=self.batch, ignore_index=self.ignore_index,
                         class_weights=self.class_weights, reduction=self.reduction)


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                   ignore_index: Optional[int]) -> torch.Tensor:
    """Cross entropy for integer or float targets; binary (C == 1) uses the logistic loss."""
    if logits.shape[1] == 1:
        onehot, valid = _onehot_target(logits, target, ignore_index)
        if weight is not None:
            raise ParameterError("class weights need C >= 2 channels; a binary logit has one")
        per_pixel = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
        if valid is None:
            return per_pixel.mean()
        return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)
    if target.shape == logits.shape and target.is_floating_point():
        return F.cross_entropy(logits, target.to(logits.dtype), weight=weight)
    _onehot_target(logits, target, ignore_index)  # shape and range checks
    target = target.long()
    ignore = -100 if ignore_index is None else ignore_index
    total = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore, reduction="sum")
    # torch's mean is this sum over the summed weights of the valid pixels, which is 0 / 0 = NaN when no
    # pixel counts (all ignored, or weight 0 on every class present): then the term is 0, not NaN
    valid = target != ignore
    if weight is None:
        count = valid.sum().to(total.dtype)
    else:
        count = (weight[torch.where(valid, target, torch.zeros_like(target))] * valid).sum().to(total.dtype)
    return total / torch.where(count > 0, count, torch.ones_like(count))


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, *, lambda_dice: float = 1.0,
                 lambda_ce: float = 1.0, ce_weight: Weights = None, activation: str = "auto",
                 include_background: bool = True, smooth: float = 1e-5, batch: bool = False,
                 ignore_index: Optional[int] = None) -> torch.Tensor:
    """``lambda_dice * Dice + lambda_ce * CE`` from logits.

    The cross entropy is the mean over pixels (weighted mean with ``ce_weight``, as
    :func:`torch.nn.functional.cross_entropy`); with a single-channel logit it is the logistic (binary)
    cross entropy. When no pixel counts (every one is ``ignore_index``, or has a class of weight 0) the
    cross-entropy term is 0 rather than torch's NaN. The Dice parameters are those of :func:`dice_loss`.
    """
    logits = _check_logits(logits)
    w = _as_weight(ce_weight, logits.shape[1], logits)
    d = dice_loss(logits, target, activation=activation, include_background=include_background, smooth=smooth,
                  batch=batch, ignore_index=ignore_index)
    ce = _cross_entropy(logits, target, w, ignore_index)
    return lambda_dice * d + lambda_ce * ce


class DiceCELoss(nn.Module):
    """Dice plus cross entropy; see :func:`dice_ce_loss`.

    Examples
    --------
    >>> loss = DiceCELoss(lambda_dice=1.0, lambda_ce=1.0, ce_weight=[0.2, 1.0, 1.0])
    >>> float(loss(torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8)))) > 0
    True
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, ce_weight: Weights = None,
                 activation: str = "auto", include_background: bool = True, smooth: float = 1e-5,
                 batch: bool = False, ignore_index: Optional[int] = None) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0:
            raise ParameterError(f"lambda_dice and lambda_ce must be >= 0, got {lambda_dice}, {lambda_ce}")
        _activate(torch.zeros(1, 2), activation)
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)
        self.activation = activation
        self.include_background = include_background
        self.smooth = float(smooth)
        self.batch = batch
        self.ignore_index = ignore_index
        self.register_buffer("ce_weight", None if ce_weight is None
                             else torch.as_tensor(ce_weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_ce_loss(logits, target, lambda_dice=self.lambda_dice, lambda_ce=self.lambda_ce,
                            ce_weight=self.ce_weight, activation=self.activation,
                            include_background=self.include_background, smooth=self.smooth, batch=self.batch,
                            ignore_index=self.ignore_index)


# --------------------------------------------------------------------------------------------------
# HoVer-Net
# --------------------------------------------------------------------------------------------------
NP, HV, TP = "nucleus_prediction", "horizontal_vertical", "type_prediction"


def hv_targets(instance_mask: np.ndarray) -> np.ndarray:
    """Horizontal and vertical distance maps of HoVer-Net (Graham et al. 2019) from an instance mask.

    For every nucleus (a label > 0) and each of its pixels, the horizontal (x) and vertical (y)
    distance to the nucleus centroid; negative distances are divided by the largest negative one and
    positive distances by the largest positive one, so each nucleus spans ``[-1, 1]`` in both maps
    (-1 at its left/top-most pixels, +1 at its right/bottom-most). Background is 0. The centroid is
    the exact centre of mass (not rounded to a pixel), as in MONAI's ``ComputeHoVerMaps``.

    Parameters
    ----------
    instance_mask : numpy.ndarray
        ``(H, W)`` integer labels, 0 = background. Labels need not be contiguous.

    Returns
    -------
    numpy.ndarray
        ``(2, H, W)`` float32: channel 0 horizontal (x), channel 1 vertical (y).

    Examples
    --------
    >>> m = np.zeros((5, 5), np.int32); m[1:4, 1:4] = 7
    >>> hv_targets(m)[0, 2]
    array([ 0., -1.,  0.,  1.,  0.], dtype=float32)
    """
    mask = np.asarray(instance_mask)
    if mask.ndim != 2:
        raise ParameterError(f"instance_mask must be a 2-D label image (H, W), got shape {mask.shape}")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise ParameterError(f"instance_mask must hold integer labels, got dtype {mask.dtype}")
    out = np.zeros((2,) + mask.shape, dtype=np.float32)
    fg = np.flatnonzero(mask)
    if fg.size == 0:
        return out
    labels = mask.ravel()[fg]
    if labels.min() < 0:
        raise ParameterError("instance_mask labels must be >= 0 (0 is background)")
    # one sort groups the pixels by nucleus: compact ids for bincount, segments for min/max
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    new_segment = np.empty(sorted_labels.size, dtype=bool)
    new_segment[0] = True
    np.not_equal(sorted_labels[1:], sorted_labels[:-1], out=new_segment[1:])
    starts = np.flatnonzero(new_segment)
    n = starts.size
    inv = np.empty(labels.size, dtype=np.intp)
    inv[order] = np.cumsum(new_segment) - 1
    ys, xs = np.divmod(fg, mask.shape[1])
    count = np.bincount(inv, minlength=n)
    for ch, coord in ((0, xs), (1, ys)):
        coord = coord.astype(np.float64)
        centre = np.bincount(inv, weights=coord, minlength=n) / count
        d = coord - centre[inv]
        lo = np.minimum.reduceat(d[order], starts)
        hi = np.maximum.reduceat(d[order], starts)
        neg = d < 0
        pos = d > 0
        d[neg] /= -lo[inv[neg]]
        d[pos] /= hi[inv[pos]]
        out[ch].ravel()[fg] = d
    return out


def sobel_kernel_5x5(dtype: torch.dtype = torch.float32, device=None) -> tuple:
    """The 5x5 derivative kernels of the HoVer-Net reference code: ``k(dy, dx) = d / (dx^2 + dy^2)``.

    Returns ``(kx, ky)``, each ``(5, 5)``: ``kx`` responds to change along x (columns), ``ky`` along y
    (rows). Cross-correlating ``f(x, y) = x`` with ``kx`` gives the constant ``sum(dx^2 / (dx^2 + dy^2))`` = 12.
    """
    r = torch.arange(-2, 3, dtype=torch.float64)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    r2 = dx * dx + dy * dy
    r2[2, 2] = 1.0  # centre: numerator is 0 anyway
    return (dx / r2).to(dtype=dtype, device=device), (dy / r2).to(dtype=dtype, device=device)


def _hv_gradients(hv: torch.Tensor) -> torch.Tensor:
    """d/dx of the horizontal map and d/dy of the vertical map, zero padded (as the reference code)."""
    kx, ky = sobel_kernel_5x5(hv.dtype, hv.device)
    gx = F.conv2d(hv[:, 0:1], kx[None, None], padding=2)
    gy = F.conv2d(hv[:, 1:2], ky[None, None], padding=2)
    return torch.cat([gx, gy], dim=1)


def _msge(pred_hv: torch.Tensor, true_hv: torch.Tensor, focus: torch.Tensor) -> torch.Tensor:
    """Mean squared gradient error inside ``focus`` (N, H, W) (the nuclei), as in HoVer-Net."""
    diff = _hv_gradients(pred_hv) - _hv_gradients(true_hv)
    focus = focus.to(diff.dtype).unsqueeze(1).expand_as(diff)
    return (focus * diff * diff).sum() / (focus.sum() + 1e-8)


def _whole(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` as int64, refusing float values that are not whole numbers (``.long()`` would truncate them)."""
    if t.is_floating_point() and not bool((t == t.round()).all()):  # NaN and fractions fail, inf is caught below
        raise ParameterError(f"target[{name!r}] must hold whole-number classes, got non-integer float values "
                             f"(e.g. {t[t != t.round()][:3].tolist()}); threshold or round a probability map first")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ParameterError(f"target[{name!r}] holds infinite values")
    return t.long()


def _np_target(t: torch.Tensor, name: str, binary: bool = True) -> torch.Tensor:
    """Integer (N, H, W) class map from an integer map, a one-hot (N, C, H, W) map (any dtype), or an (N, 1, H, W)
    map. With ``binary`` (the NP branch) a float (N, 1, H, W) map is a mask: > 0.5 is class 1; otherwise
    (the TP branch) a float map must hold whole-number classes."""
    if t.ndim == 4 and t.shape[1] == 1:
        if t.is_floating_point() and binary:
            return (t[:, 0] > 0.5).long()
        return _whole(t[:, 0], name)
    if t.ndim == 4 and t.shape[1] > 1:  # a one-hot, float, integer or bool
        return (t.to(torch.uint8) if t.dtype == torch.bool else t).argmax(dim=1)
    if t.ndim != 3:
        raise ParameterError(f"target[{name!r}] must be (N, H, W) integer classes or (N, C, H, W) one-hot, "
                             f"got shape {tuple(t.shape)}")
    return _whole(t, name)


def hovernet_loss(prediction: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], *,
                  lambda_np_ce: float = 1.0, lambda_np_dice: float = 1.0, lambda_hv_mse: float = 2.0,
                  lambda_hv_msge: float = 1.0, lambda_tp_ce: float = 1.0, lambda_tp_dice: float = 1.0,
                  smooth: float = 1e-3, return_terms: bool = False):
    """The HoVer-Net loss (Graham et al., Medical Image Analysis 2019); see :class:`HoVerNetLoss`."""
    for key in (NP, HV):
        if key not in prediction:
            raise ParameterError(f"prediction lacks the {key!r} branch; it has {sorted(prediction)}")
        if key not in target:
            raise ParameterError(f"target lacks the {key!r} branch; it has {sorted(target)}")
    np_logits, hv_pred = prediction[NP], prediction[HV]
    np_logits = _check_logits(np_logits, NP, 4)
    if np_logits.ndim != 4 or np_logits.shape[1] != 2:
        raise ParameterError(f"prediction[{NP!r}] must be (N, 2, H, W) logits, got {tuple(np_logits.shape)}")
    n, _, h, w = np_logits.shape
    if tuple(hv_pred.shape) != (n, 2, h, w):
        raise ParameterError(f"prediction[{HV!r}] shape {tuple(hv_pred.shape)} does not match "
                             f"prediction[{NP!r}] shape {tuple(np_logits.shape)}: expected {(n, 2, h, w)}")
    hv_true = target[HV]
    if tuple(hv_true.shape) != (n, 2, h, w):
        raise ParameterError(f"target[{HV!r}] shape {tuple(hv_true.shape)} does not match "
                             f"prediction[{HV!r}] shape {tuple(hv_pred.shape)}")
    np_true = _np_target(target[NP], NP)
    if tuple(np_true.shape) != (n, h, w):
        raise ParameterError(f"target[{NP!r}] shape {tuple(target[NP].shape)} does not match "
                             f"prediction[{NP!r}] shape {tuple(np_logits.shape)}")
    if bool((np_true < 0).any()):
        raise ParameterError(f"target[{NP!r}] holds negative values ({int(np_true.min())}): expected 0 for "
                             "background and nucleus ids (or 1) > 0")
    np_true = (np_true > 0).long()  # an instance map or a {0,1} mask both work
    hv_pred = _float32(hv_pred)
    hv_true = hv_true.to(hv_pred.dtype)

    terms = {}
    terms["np_ce"] = F.cross_entropy(np_logits, np_true)
    terms["np_dice"] = dice_loss(np_logits, np_true, activation="softmax", smooth=smooth, batch=True,
                                 reduction="sum")
    terms["hv_mse"] = F.mse_loss(hv_pred, hv_true)
    terms["hv_msge"] = _msge(hv_pred, hv_true, np_true)
    weights = {"np_ce": lambda_np_ce, "np_dice": lambda_np_dice, "hv_mse": lambda_hv_mse,
               "hv_msge": lambda_hv_msge}

    has_tp_pred, has_tp_true = TP in prediction, TP in target
    if has_tp_pred != has_tp_true:
        raise ParameterError(f"{TP!r} must be in both prediction and target or in neither "
                             f"(prediction: {has_tp_pred}, target: {has_tp_true})")
    if has_tp_pred:
        tp_logits = prediction[TP]
        tp_logits = _check_logits(tp_logits, TP, 4)
        if tp_logits.ndim != 4 or tuple(tp_logits.shape[2:]) != (h, w) or tp_logits.shape[0] != n:
            raise ParameterError(f"prediction[{TP!r}] shape {tuple(tp_logits.shape)} does not match "
                                 f"prediction[{NP!r}] shape {tuple(np_logits.shape)}")
        tp_true = _np_target(target[TP], TP, binary=False)
        if tuple(tp_true.shape) != (n, h, w):
            raise ParameterError(f"target[{TP!r}] shape {tuple(target[TP].shape)} does not match "
                                 f"prediction[{TP!r}] shape {tuple(tp_logits.shape)}")
        n_types = tp_logits.shape[1]
        bad = (tp_true < 0) | (tp_true >= n_types)
        if bool(bad.any()):
            raise ParameterError(f"target[{TP!r}] must hold type indices in [0, {n_types - 1}] (the type branch has "
                                 f"{n_types} channels), got {sorted(set(tp_true[bad][:100].tolist()))[:5]}")
        terms["tp_ce"] = F.cross_entropy(tp_logits, tp_true)
        terms["tp_dice"] = dice_loss(tp_logits, tp_true, activation="softmax", smooth=smooth, batch=True,
                                     reduction="sum")
        weights["tp_ce"] = lambda_tp_ce
        weights["tp_dice"] = lambda_tp_dice
    total = sum(weights[k] * v for k, v in terms.items())
    if return_terms:
        return total, {k: v.detach() for k, v in terms.items()}
    return total


class HoVerNetLoss(nn.Module):
    """The HoVer-Net loss: NP = CE + Dice, HV = MSE + MSGE, TP = CE + Dice, each term weighted.

    Parameters
    ----------
    lambda_np_ce, lambda_np_dice : float
        Weights of the nucleus-pixel (foreground/background) cross entropy and Dice.
    lambda_hv_mse, lambda_hv_msge : float
        Weights of the mean squared error of the HV maps (over all pixels) and of the mean squared
        error of their gradients (within nuclei only). The defaults (2 and 1) are those of the
        authors' original TensorFlow configuration (``{'bce': 1, 'dice': 1, 'mse': 2, 'msge': 1}``),
        also MONAI's; the authors' later PyTorch configuration weights every term 1.
    lambda_tp_ce, lambda_tp_dice : float
        Weights of the nucleus-type terms (used only when the type branch is present).
    smooth : float
        Dice smoothing term (1e-3 as in the reference code).

    Notes
    -----
    ``forward(prediction, target)`` takes two dicts:

    * ``prediction["nucleus_prediction"]``: ``(N, 2, H, W)`` logits;
      ``prediction["horizontal_vertical"]``: ``(N, 2, H, W)`` (channel 0 horizontal, 1 vertical);
      optionally ``prediction["type_prediction"]``: ``(N, T, H, W)`` logits.
    * ``target["nucleus_prediction"]``: ``(N, H, W)`` foreground mask or instance map (anything > 0 is
      nucleus; a float one must hold whole numbers), a float ``(N, 1, H, W)`` mask (> 0.5 is nucleus),
      or a ``(N, 2, H, W)`` one-hot; ``target["horizontal_vertical"]``: ``(N, 2, H, W)`` maps
      from :func:`hv_targets`; ``target["type_prediction"]``: ``(N, H, W)`` type indices (0 =
      background), a ``(N, 1, H, W)`` map of them (a float one must hold whole numbers) or a one-hot,
      required exactly when the prediction has the type branch.

    The Dice terms are softmax Dice over the whole batch (one per class, background included),
    summed over classes, as in the reference implementation. The gradients of the MSGE term are taken
    with the 5x5 kernel ``d / |d|^2`` of the reference code (:func:`sobel_kernel_5x5`), zero padded:
    d/dx of the horizontal map and d/dy of the vertical map, averaged over nucleus pixels of the
    target. ``forward(..., return_terms=True)`` also returns the unweighted terms in a dict.

    Examples
    --------
    >>> loss = HoVerNetLoss()
    >>> inst = np.zeros((16, 16), np.int32); inst[3:9, 4:10] = 1
    >>> tgt = {"nucleus_prediction": torch.from_numpy(inst)[None],
    ...        "horizontal_vertical": torch.from_numpy(hv_targets(inst))[None]}
    >>> pred = {"nucleus_prediction": torch.randn(1, 2, 16, 16), "horizontal_vertical": torch.zeros(1, 2, 16, 16)}
    >>> float(loss(pred, tgt)) > 0
    True
    """

    def __init__(self, lambda_np_ce: float = 1.0, lambda_np_dice: float = 1.0, lambda_hv_mse: float = 2.0,
                 lambda_hv_msge: float = 1.0, lambda_tp_ce: float = 1.0, lambda_tp_dice: float = 1.0,
                 smooth: float = 1e-3) -> None:
        super().__init__()
        self.weights = dict(lambda_np_ce=float(lambda_np_ce), lambda_np_dice=float(lambda_np_dice),
                            lambda_hv_mse=float(lambda_hv_mse), lambda_hv_msge=float(lambda_hv_msge),
                            lambda_tp_ce=float(lambda_tp_ce), lambda_tp_dice=float(lambda_tp_dice))
        bad = {k: v for k, v in self.weights.items() if v < 0 or math.isnan(v)}
        if bad:
            raise ParameterError(f"loss weights must be >= 0, got {bad}")
        self.smooth = float(smooth)

    def forward(self, prediction: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                return_terms: bool = False):
        return hovernet_loss(prediction, target, smooth=self.smooth, return_terms=return_terms, **self.weights)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.weights.items())


# --------------------------------------------------------------------------------------------------
# knowledge distillation
# --------------------------------------------------------------------------------------------------
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: Optional[torch.Tensor] = None, *, temperature: float = 4.0, alpha: float = 0.9,
                      ignore_index: int = -100) -> torch.Tensor:
    """Knowledge distillation (Hinton, Vinyals & Dean 2015).

    ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, labels)`` where
    ``p^T = softmax(logits / T)`` over the class dimension (dim 1).

    The KL term is ``sum_c p_teacher log(p_teacher / p_student)``: the teacher's softened distribution
    is the target, which is Hinton's soft-target cross entropy minus the teacher's (constant)
    entropy. It is summed over classes and averaged over samples (and pixels for dense inputs). The
    ``T^2`` factor keeps the gradient scale of the soft term independent of ``T``.

    Parameters
    ----------
    student_logits, teacher_logits : torch.Tensor
        ``(N, C)`` or ``(N, C, H, W)`` logits of the same shape. The teacher is detached; its logits may
        be ``-inf`` for masked classes (probability 0, which adds nothing to the KL term), the
        student's too for the same classes.
    labels : torch.Tensor, optional
        Hard labels ``(N,)`` or ``(N, H, W)``; needed unless ``alpha == 1``.
    temperature : float
        ``T > 0``.
    alpha : float
        In ``[0, 1]``: the weight of the soft (teacher) term.
    ignore_index : int
        Label value left out of the hard cross entropy.
    """
    student_logits = _check_logits(student_logits, "student_logits")
    if teacher_logits.shape != student_logits.shape:
        raise ParameterError(f"teacher_logits shape {tuple(teacher_logits.shape)} does not match "
                             f"student_logits shape {tuple(student_logits.shape)}")
    if not temperature > 0:
        raise ParameterError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ParameterError(f"alpha must lie in [0, 1], got {alpha}")
    total = student_logits.new_zeros(())
    if alpha > 0:
        t = float(temperature)
        log_ps = F.log_softmax(student_logits / t, dim=1)
        pt = F.softmax(teacher_logits.detach().to(student_logits.dtype) / t, dim=1)
        # 0 log 0 = 0 (xlogy), and the student's log-probability of a class the teacher gives 0 is left out: a
        # class masked with a -inf logit adds nothing, not NaN (kl_div's 0 * -inf), whether the teacher masks it
        # or both do
        kl = (torch.xlogy(pt, pt) - pt * log_ps.masked_fill(pt == 0, 0.0)).sum(dim=1).mean()
        total = total + alpha * t * t * kl
    if alpha < 1:
        if labels is None:
            raise ParameterError("labels are needed when alpha < 1 (the hard cross-entropy term)")
        expected = (student_logits.shape[0],) + tuple(student_logits.shape[2:])
        if tuple(labels.shape) != expected:
            raise ParameterError(f"labels shape {tuple(labels.shape)} does not match student_logits shape "
                                 f"{tuple(student_logits.shape)}: expected {expected}")
        if labels.is_floating_point() or labels.is_complex():  # .long() would truncate 0.5 to class 0
            raise ParameterError(f"labels must be an integer tensor of class ids, got {labels.dtype}")
        labels = labels.long()
        c = student_logits.shape[1]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= c))
        if bool(bad.any()):
            raise ParameterError(f"labels must lie in [0, {c - 1}] (or be ignore_index={ignore_index}), got "
                                 f"{labels[bad][:5].tolist()}")
        ce = F.cross_entropy(student_logits, labels, ignore_index=ignore_index, reduction="sum")
        n = (labels != ignore_index).sum().clamp_min(1)  # a batch of unlabelled pixels only: hard term 0, not NaN
        total = total + (1.0 - alpha) * ce / n
    return total


class DistillationLoss(nn.Module):
    """Hinton knowledge-distillation loss; see :func:`distillation_loss`.

    ``forward(student_logits, teacher_logits, labels=None)``.

    Examples
    --------
    >>> kd = DistillationLoss(temperature=4.0, alpha=0.9)
    >>> s, t = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5)
    >>> kd(s, t, torch.randint(0, 5, (8,))).backward()
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, ignore_index: int = -100) -> None:
        super().__init__()
        if not temperature > 0:
            raise ParameterError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ParameterError(f"alpha must lie in [0, 1], got {alpha}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.ignore_index = ignore_index

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                                 alpha=self.alpha, ignore_index=self.ignore_index)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


# --------------------------------------------------------------------------------------------------
# cluster-weighted categorical cross entropy
# --------------------------------------------------------------------------------------------------
def cwce_loss(logits: torch.Tensor, labels: torch.Tensor, clusters: torch.Tensor, *,
              class_weights: Weights = None, return_per_cluster: bool = False, ignore_index: int = -100):
    """Cluster-weighted categorical cross entropy (CWCE).

    ``CWCE = (1 / K') sum_{k present} [ sum_{i in k} w_{y_i} CE_i / sum_{i in k} w_{y_i} ]``

    For each cluster present in the batch, the (class-weighted) mean cross entropy over that
    cluster's samples; the loss is the unweighted mean over the ``K'`` clusters present, so a
    cluster of one sample counts as much as a cluster of a hundred. Without class weights
    (``w = 1``) the inner term is the plain mean, and with a single cluster CWCE is the ordinary
    (weighted) cross entropy of :func:`torch.nn.functional.cross_entropy`.

    This follows the description of equation 1 of the cascaded tumour-segmentation paper as given in
    our design brief (its text was not reachable from here to check the exact normalisation); cluster
    ids come from :class:`histoflow.ml.cluster.ClusterModule`.

    Parameters
    ----------
    logits : torch.Tensor
        ``(N, C)`` raw scores.
    labels : torch.Tensor
        ``(N,)`` integer classes in ``[0, C)``, or ``ignore_index`` for unlabelled samples (left out, as
        torch's cross entropy leaves them; a cluster left with none is not present).
    clusters : torch.Tensor
        ``(N,)`` integer cluster ids (any values; only equality matters).
    class_weights : sequence of float, optional
        ``(C,)`` non-negative weights per class.
    return_per_cluster : bool
        Also return ``(cluster_ids, per_cluster_loss)`` (detached).
    ignore_index : int
        The label of unlabelled samples (``TileDataset``'s missing integer label, -100).
    """
    logits = _check_logits(logits)
    if logits.ndim != 2:
        raise ParameterError(f"logits must be (N, C), got {tuple(logits.shape)}")
    n, c = logits.shape
    if tuple(labels.shape) != (n,):
        raise ParameterError(f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)}: "
                             f"expected {(n,)}")
    if tuple(clusters.shape) != (n,):
        raise ParameterError(f"clusters shape {tuple(clusters.shape)} does not match logits shape "
                             f"{tuple(logits.shape)}: expected {(n,)}")
    if labels.is_floating_point() or clusters.is_floating_point():
        raise ParameterError("labels and clusters must be integer tensors")
    if n == 0:
        raise ParameterError("cwce_loss of an empty batch is undefined")
    labels = labels.long()
    keep = labels != ignore_index
    if bool((keep & ((labels < 0) | (labels >= c))).any()):
        raise ParameterError(f"labels must lie in [0, {c - 1}] (or be ignore_index={ignore_index})")
    w = _as_weight(class_weights, c, logits)
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    ce = F.cross_entropy(logits, safe, reduction="none")
    sample_w = (torch.ones_like(ce) if w is None else w[safe]) * keep.to(ce.dtype)
    ids, inv = torch.unique(clusters, return_inverse=True)
    k = ids.numel()
    num = ce.new_zeros(k).index_add(0, inv, sample_w * ce)
    den = ce.new_zeros(k).index_add(0, inv, sample_w)
    present = den > 0  # a cluster whose samples all have weight 0 carries no information
    per_cluster = num[present] / den[present]
    if per_cluster.numel() == 0:
        loss = (ce * 0).sum()
    else:
        loss = per_cluster.mean()
    if return_per_cluster:
        return loss, (ids[present], per_cluster.detach())
    return loss


class CWCELoss(nn.Module):
    """Cluster-weighted categorical cross entropy; see :func:`cwce_loss`.

    ``forward(logits (N, C), labels (N,), clusters (N,))``.

    Examples
    --------
    >>> loss = CWCELoss()
    >>> logits = torch.randn(6, 2, requires_grad=True)
    >>> loss(logits, torch.tensor([0, 1, 1, 0, 1, 0]), torch.tensor([0, 0, 0, 0, 0, 3])).backward()
    """

    def __init__(self, class_weights: Weights = None, ignore_index: int = -100) -> None:
        super().__init__()
        self.register_buffer("class_weights", None if class_weights is None
                             else torch.as_tensor(class_weights, dtype=torch.float32))
        self.ignore_index = int(ignore_index)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        return cwce_loss(logits, labels, clusters, class_weights=self.class_weights, ignore_index=self.ignore_index)

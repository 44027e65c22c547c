"""HoVer-Net (Graham et al. 2019) for simultaneous nucleus segmentation and classification.

:class:`HoVerNet` is a thin wrapper around :class:`monai.networks.nets.HoVerNet` so the registry can
create, save and load it; ``forward`` returns MONAI's dict of branch outputs (logits):

- ``"nucleus_prediction"`` (NP): ``(N, 2, h, w)`` nucleus vs background,
- ``"horizontal_vertical"`` (HV): ``(N, 2, h, w)`` horizontal and vertical distances of each
  nucleus pixel to its nucleus' centre, in [-1, 1],
- ``"type_prediction"`` (TP, only when ``out_classes > 0``): ``(N, out_classes, h, w)``.

In ``"fast"`` mode the input is 256x256 and the output 164x164 (256x256 with
``decoder_padding=True``); in ``"original"`` mode the input is 270x270 and the output 80x80.

:func:`hovernet_postprocess` turns the branch maps of one image into an instance label image with
the published marker-controlled watershed; :func:`histoflow.ml.losses.hv_targets` builds the HV training
targets from an instance label image.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.segmentation import watershed
from torch import nn

from ...errors import ParameterError

__all__ = ["HoVerNet", "hovernet_postprocess", "HOVERNET_KEYS"]

#: The keys of the dict returned by :meth:`HoVerNet.forward`: NP, HV and TP branches.
HOVERNET_KEYS = ("nucleus_prediction", "horizontal_vertical", "type_prediction")


class HoVerNet(nn.Module):
    """HoVer-Net (MONAI's implementation, randomly initialised; no weights are downloaded).

    Parameters
    ----------
    mode : {"fast", "original"}
        Network variant (input 256 -> output 164, or input 270 -> output 80).
    in_channels : int
        Input channels.
    out_classes : int
        Nucleus types of the TP branch, background included; 0 disables the TP branch.
    np_out_channels : int
        Channels of the NP branch (2: background / nucleus).
    decoder_padding : bool
        Pad the decoder convolutions so that ("fast" mode) the output is 256x256 like the input.
    dropout : float
        Dropout after each dense layer of the decoders.
    """

    registry_name = "hovernet"

    def __init__(self, mode: str = "fast", in_channels: int = 3, out_classes: int = 0,
                 np_out_channels: int = 2, decoder_padding: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        from monai.networks.nets import HoVerNet as _MonaiHoVerNet

        mode = str(mode).lower()
        if mode not in ("fast", "original"):
            raise ParameterError(f"HoVerNet: mode must be 'fast' or 'original', got {mode!r}")
        if int(in_channels) < 1 or int(out_classes) < 0 or int(np_out_channels) != 2:
            raise ParameterError(f"HoVerNet: in_channels must be >= 1, out_classes >= 0 (0: no type branch) and "
                                 f"np_out_channels 2 (nucleus / background, as its loss and post-processing take), "
                                 f"got {in_channels}, {out_classes} and {np_out_channels}")
        self.mode = mode
        self.in_channels = int(in_channels)
        self.out_classes = int(out_classes)
        self.np_out_channels = int(np_out_channels)
        self.decoder_padding = bool(decoder_padding)
        self.dropout = float(dropout)
        self.net = _MonaiHoVerNet(mode=mode, in_channels=self.in_channels, np_out_channels=self.np_out_channels,
                                  out_classes=self.out_classes, decoder_padding=self.decoder_padding,
                                  dropout_prob=self.dropout)

    @property
    def input_size(self) -> int:
        """Side of the square input the network expects."""
        return 256 if self.mode == "fast" else 270

    @property
    def output_size(self) -> int:
        """Side of the square output maps."""
        if self.mode == "fast":
            return 256 if self.decoder_padding else 164
        return 264 if self.decoder_padding else 80

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dict of branch logits (see the module docstring)."""
        side = self.input_size
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != (side, side):
            raise ParameterError(f"HoVerNet ({self.mode} mode) expects input (N, {self.in_channels}, {side}, {side}), "
                                 f"got {tuple(x.shape)}")
        return self.net(x)


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _to_numpy(a, dtype=None) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


@functools.lru_cache(maxsize=None)
def sobel_step(ksize: int) -> float:
    """The largest response of OpenCV's Sobel derivative of size ``ksize`` to a step from 0 to 1: the unit in
    which fixed Sobel ranges (``hovernet_postprocess(ranges=...)``) are given, whatever the kernel size."""
    n = 4 * ksize + 1
    step = np.zeros((n, n), np.float64)
    step[:, n // 2:] = 1.0
    return float(cv2.Sobel(step, cv2.CV_64F, 1, 0, ksize=ksize).max())


def _scaled(a, lo_hi):
    lo, hi = (float(v) for v in lo_hi)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(a)


def hovernet_postprocess(np_prob, hv_map, tp_prob=None, *, fg_threshold: float = 0.5,
                         marker_threshold: float = 0.4, sobel_ksize: int = 21,
                         min_size: int = 10, ranges: dict | None = None) -> tuple[np.ndarray, dict[int, int]]:
    """Instances (and their types) from HoVer-Net's branch maps of one image.

    The published post-processing: threshold NP into a foreground; min-max normalise the HV maps
    and take Sobel derivatives (horizontal derivative of the horizontal map, vertical of the
    vertical); the boundary energy is the larger of the two normalised responses; markers are the
    foreground minus the high-energy pixels (``>= marker_threshold``), cleaned by hole filling and
    a 5x5 opening; a watershed of the smoothed "distance" ``(1 - energy) * foreground`` from these
    markers, inside the foreground, gives the instances. Each instance's type is the majority
    vote of the TP argmax over its pixels (background votes ignored when another type is present).

    Parameters
    ----------
    np_prob : array (H, W) or (2, H, W)
        Nucleus probability, or the NP branch's two-channel softmax (channel 1 = nucleus).
    hv_map : array (2, H, W)
        Horizontal (channel 0) and vertical (channel 1) maps, as MONAI's HV branch outputs them.
    tp_prob : array (C, H, W) of probabilities, or (H, W) integer type map, optional
        Type branch output (softmax) or a ready type map.
    fg_threshold, marker_threshold : float
        Foreground threshold on ``np_prob`` and energy threshold for markers (0.5 and 0.4).
    sobel_ksize : int
        Sobel kernel size (21 in the published code, for 0.25-0.5 um/px images).
    min_size : int
        Foreground components and markers smaller than this (pixels) are dropped.
    ranges : dict, optional
        Fixed normalisation instead of each image's own minimum and maximum: ``{"hv": [[lo, hi], [lo, hi]],
        "sobel": [[lo, hi], [lo, hi]]}`` for the horizontal and vertical maps and their Sobel responses (these
        in units of :func:`sobel_step`), values outside clipped. With the image's own extremes (the published
        code) the same nucleus can be split or lost in one crop and not another (a tile of a slide and the
        whole image); fixed ranges, taken once from a model's training images, make the result local.

    Returns
    -------
    labels : ndarray (H, W) int32
        Instance label image, 0 = background, instances numbered 1..n.
    types : dict of int to int
        Instance id -> type index (empty when ``tp_prob`` is None).
    """
    np_prob = _to_numpy(np_prob, np.float32)
    hv = _to_numpy(hv_map, np.float32)
    if np_prob.ndim == 3:
        if np_prob.shape[0] != 2:
            raise ParameterError(f"hovernet_postprocess: np_prob must be (H, W) or (2, H, W), got {np_prob.shape}")
        np_prob = np_prob[1]
    if np_prob.ndim != 2:
        raise ParameterError(f"hovernet_postprocess: np_prob must be (H, W) or (2, H, W), got {np_prob.shape}")
    if hv.ndim != 3 or hv.shape[0] != 2 or hv.shape[1:] != np_prob.shape:
        raise ParameterError(f"hovernet_postprocess: hv_map must be (2, H, W) with (H, W) = {np_prob.shape}, "
                             f"got {hv.shape}")
    if sobel_ksize % 2 == 0 or not 1 <= sobel_ksize <= 31:
        raise ParameterError(f"hovernet_postprocess: sobel_ksize must be odd and <= 31, got {sobel_ksize}")
    bad = {name: int(a.size - np.count_nonzero(np.isfinite(a))) for name, a in (("np_prob", np_prob), ("hv_map", hv))}
    if any(bad.values()):  # one NaN made each image-wide minimum and maximum NaN: no nucleus anywhere, silently
        raise ParameterError("hovernet_postprocess: the maps hold NaN or infinite values ("
                             + ", ".join(f"{k}: {v} value(s)" for k, v in bad.items() if v)
                             + "); the network's output is broken there (its input, or its weights)")

    fg = np_prob >= fg_threshold
    fg_lab, _ = ndi.label(fg)
    fg = _remove_small(fg_lab, min_size) > 0
    labels = np.zeros(fg.shape, np.int32)
    if fg.any():
        if ranges is None:
            h_dir = _minmax(hv[0].astype(np.float64))
            v_dir = _minmax(hv[1].astype(np.float64))
            sobel_h = 1.0 - _minmax(cv2.Sobel(h_dir, cv2.CV_64F, 1, 0, ksize=sobel_ksize))
            sobel_v = 1.0 - _minmax(cv2.Sobel(v_dir, cv2.CV_64F, 0, 1, ksize=sobel_ksize))
        else:
            (hr, vr), (shr, svr) = _check_ranges(ranges)
            unit = sobel_step(sobel_ksize)
            h_dir = _scaled(hv[0].astype(np.float64), hr)
            v_dir = _scaled(hv[1].astype(np.float64), vr)
            sobel_h = 1.0 - _scaled(cv2.Sobel(h_dir, cv2.CV_64F, 1, 0, ksize=sobel_ksize) / unit, shr)
            sobel_v = 1.0 - _scaled(cv2.Sobel(v_dir, cv2.CV_64F, 0, 1, ksize=sobel_ksize) / unit, svr)
        energy = np.maximum(sobel_h, sobel_v)
        energy = np.clip(energy - (~fg).astype(np.float64), 0, None)
        dist = (1.0 - energy) * fg
        dist = -cv2.GaussianBlur(dist, (3, 3), 0)
        marker = fg & ~(energy >= marker_threshold)
        marker = ndi.binary_fill_holes(marker)
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
        marker = cv2.morphologyEx(marker.astype(np.uint8), cv2.MORPH_OPEN, kernel)
        markers, _ = ndi.label(marker)
        markers = _remove_small(markers, min_size)
        labels = watershed(dist, markers=markers, mask=fg).astype(np.int32)
        labels = _relabel(labels)

    types: dict[int, int] = {}
    if tp_prob is not None:
        tp = _to_numpy(tp_prob)
        if tp.ndim == 3:
            tp = tp.argmax(axis=0)
        if tp.shape != labels.shape:
            raise ParameterError(f"hovernet_postprocess: tp_prob must be (C, H, W) or (H, W) with (H, W) = "
                                 f"{labels.shape}, got {np.shape(tp_prob)}")
        types = _majority_types(labels, tp.astype(np.int64))
    return labels, types


def _check_ranges(ranges):
    try:
        hv = [(float(a), float(b)) for a, b in ranges["hv"]]
        sob = [(float(a), float(b)) for a, b in ranges["sobel"]]
    except (TypeError, ValueError, KeyError):
        hv = sob = []
    if len(hv) != 2 or len(sob) != 2 or not all(np.isfinite(v).all() and v[0] < v[1] for v in map(np.array, hv + sob)):
        raise ParameterError(f"hovernet_postprocess: ranges must be {{'hv': [[lo, hi], [lo, hi]], 'sobel': [[lo, hi], "
                             f"[lo, hi]]}} with lo < hi, got {ranges!r}")
    return hv, sob


def hv_ranges(maps, sobel_ksize: int = 21) -> dict:
    """The fixed ranges for :func:`hovernet_postprocess` from ``(prob, hv)`` maps of a model's training images:
    the median over the images of each one's minimum and maximum (HV maps, and the Sobel responses of the
    HV maps so normalised, in units of :func:`sobel_step`)."""
    unit = sobel_step(sobel_ksize)
    per = []
    for _, hv in maps:
        hv = np.asarray(hv, np.float64)
        row = []
        for c, (dx, dy) in ((0, (1, 0)), (1, (0, 1))):
            d = _minmax(hv[c])
            s = cv2.Sobel(d, cv2.CV_64F, dx, dy, ksize=sobel_ksize) / unit
            row.append((hv[c].min(), hv[c].max(), s.min(), s.max()))
        per.append(row)
    med = np.median(np.array(per), axis=0)
    return {"hv": [[round(float(m[0]), 4), round(float(m[1]), 4)] for m in med],
            "sobel": [[round(float(m[2]), 4), round(float(m[3]), 4)] for m in med]}


def _remove_small(lab: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 1 or lab.max() == 0:
        return lab
    sizes = np.bincount(lab.ravel())
    small = sizes < min_size
    small[0] = False
    out = lab.copy()
    out[small[lab]] = 0
    return out


def _relabel(lab: np.ndarray) -> np.ndarray:
    ids = np.unique(lab)
    ids = ids[ids != 0]
    lut = np.zeros(int(lab.max()) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[lab]


def _majority_types(labels: np.ndarray, type_map: np.ndarray) -> dict[int, int]:
    types: dict[int, int] = {}
    for inst, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        votes = type_map[sl][labels[sl] == inst]
        values, counts = np.unique(votes, return_counts=True)
        order = np.argsort(-counts, kind="stable")
        best = int(values[order[0]])
        if best == 0 and len(values) > 1:
            best = int(values[order[1]])
        types[inst] = best
    return types

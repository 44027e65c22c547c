"""Resizing images in their native dtype (exact area average when shrinking, bilinear when enlarging)."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an ``(h, w, c)`` array to ``size = (w, h)``, keeping its dtype.

    Shrinking is the exact area average (OpenCV's ``INTER_AREA``: each output pixel the mean of the source
    area it covers, fractions of pixels weighted), whatever the ratio; enlarging is bilinear (Pillow).
    """
    w, h = int(size[0]), int(size[1])
    if image.shape[1] == w and image.shape[0] == h:
        return image
    if w < image.shape[1] and h < image.shape[0]:
        return shrink(image, w / image.shape[1], h / image.shape[0], (w, h))
    method = Image.Resampling.BILINEAR
    if image.dtype == np.uint8 and image.shape[2] == 4:
        return np.concatenate([resize(image[:, :, :3], size), resize(image[:, :, 3:], size)], axis=2)
    if image.dtype == np.uint8 and image.shape[2] in (1, 3):
        src = image[:, :, 0] if image.shape[2] == 1 else image
        out = np.asarray(Image.fromarray(np.ascontiguousarray(src)).resize((w, h), method))
        return out.reshape(h, w, image.shape[2])
    out = np.empty((h, w, image.shape[2]), image.dtype)
    for c in range(image.shape[2]):
        ch = np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))
                        .resize((w, h), method))
        if image.dtype.kind in "ui":
            info = np.iinfo(image.dtype)
            ch = np.clip(np.rint(ch), info.min, info.max)
        out[:, :, c] = ch
    return out


#: dtypes OpenCV resizes as they are
_CV_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


def shrink(image: np.ndarray, fx: float, fy: float, size: tuple[int, int]) -> np.ndarray:
    """The exact area average of an ``(h, w, c)`` image at scale ``(fx, fy)`` (< 1), cut to ``size = (w, h)``
    (the scale is kept exactly, so a part of a larger image gives the same pixels as the whole)."""
    import cv2

    w, h = int(size[0]), int(size[1])
    native = image.dtype.type in _CV_DTYPES
    src = image if native else image.astype(np.float64)
    parts = []
    for c0 in range(0, src.shape[2], 4):  # OpenCV resizes up to 4 channels at a time
        part = cv2.resize(np.ascontiguousarray(src[:, :, c0:c0 + 4]), None, fx=fx, fy=fy, interpolation=cv2.INTER_AREA)
        parts.append(part.reshape(part.shape[0], part.shape[1], -1)[:h, :w])
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)
    if out.shape[:2] != (h, w):  # rounding left it a pixel short: repeat the last row / column
        out = np.pad(out, ((0, h - out.shape[0]), (0, w - out.shape[1]), (0, 0)), mode="edge")
    if not native:
        if image.dtype.kind in "ui":
            info = np.iinfo(image.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        out = out.astype(image.dtype)
    return out


def nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """For each of ``n_out`` output pixels along an axis, the source pixel (of ``n_in``) under its centre."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.intp), n_in - 1)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D mask or label image to ``size = (w, h)`` (labels stay labels)."""
    w, h = int(size[0]), int(size[1])
    if mask.shape[1] == w and mask.shape[0] == h:
        return mask
    return mask[nearest_index(h, mask.shape[0])[:, None], nearest_index(w, mask.shape[1])[None, :]]


class AxisWeights:
    """How ``n`` output pixels along one axis, from output position ``start`` of a grid ``scale`` source pixels
    per output pixel, are made from a source axis of ``extent`` pixels (see :func:`axis_weights`)."""

    __slots__ = ("lo", "hi", "index", "weight", "inside")

    def __init__(self, lo, hi, index, weight, inside):
        self.lo, self.hi, self.index, self.weight, self.inside = lo, hi, index, weight, inside


def axis_weights(start: int, n: int, scale: float, extent: int) -> AxisWeights:
    """The weights of output pixels ``start .. start + n - 1`` of the grid that lays output pixel ``i`` over
    source interval ``[i * scale, (i + 1) * scale)``: the exact area average of what it covers when shrinking
    (``scale > 1``), bilinear at its centre when enlarging, with the source's edge pixels repeated over what
    lies outside ``[0, extent)`` when enlarging and left out of the average when shrinking. Every weight and
    index comes from the output pixel's place in the whole grid, so a pixel's value does not depend on which
    window of the grid it is made in (tiles of any size and overlap agree on the pixels they share).
    Output pixels that do not touch the source at all are marked outside (``inside`` False)."""
    i = np.arange(int(start), int(start) + int(n), dtype=np.float64)
    a, b = i * scale, (i + 1) * scale
    inside = (b > 0) & (a < extent)
    if scale > 1:
        a, b = np.clip(a, 0, extent), np.clip(b, 0, extent)
        m = int(math.ceil(scale)) + 1
        first = np.floor(a)
        k = first[:, None] + np.arange(m)[None, :]
        span = np.where(inside, b - a, 1.0)
        w = np.clip(np.minimum(b[:, None], k + 1) - np.maximum(a[:, None], k), 0, None) / span[:, None]
    else:
        c = (i + 0.5) * scale - 0.5
        first = np.floor(c)
        t = c - first
        k = first[:, None] + np.arange(2)[None, :]
        w = np.stack([1 - t, t], axis=1)
    k = np.clip(k, 0, max(extent - 1, 0)).astype(np.int64)
    w[~inside] = 0
    kin = k[inside]
    lo = int(kin.min()) if kin.size else 0
    hi = int(kin.max()) + 1 if kin.size else 0
    return AxisWeights(lo, hi, np.clip(k - lo, 0, max(hi - lo - 1, 0)), w, inside)


def resample_window(region: np.ndarray, wx: AxisWeights, wy: AxisWeights, fill) -> np.ndarray:
    """The output window of :func:`axis_weights` ``wx`` / ``wy`` made from ``region`` (the source rows
    ``wy.lo:wy.hi`` and columns ``wx.lo:wx.hi``, ``(h, w, c)``), in the region's dtype (integers rounded and
    clipped); pixels outside the source are ``fill``. Columns first, then rows, always in the same order: a
    pixel comes out bit for bit the same in any window."""
    ft = np.float32 if region.dtype == np.uint8 else np.float64
    src = region.astype(ft, copy=False)
    cols = np.zeros((src.shape[0], len(wx.weight), src.shape[2]), ft)
    for j in range(wx.weight.shape[1]):
        cols += wx.weight[:, j, None].astype(ft) * src[:, wx.index[:, j]]
    out = np.zeros((len(wy.weight), cols.shape[1], cols.shape[2]), ft)
    for j in range(wy.weight.shape[1]):
        out += wy.weight[:, j, None, None].astype(ft) * cols[wy.index[:, j]]
    if region.dtype.kind in "ui":
        info = np.iinfo(region.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    out = out.astype(region.dtype)
    if not (wx.inside.all() and wy.inside.all()):
        out[~wy.inside] = fill
        out[:, ~wx.inside] = fill
    return out

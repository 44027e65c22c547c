"""Resizing images in their native dtype (exact area average when shrinking, bilinear when enlarging)."""
from __future__ import annotations

import functools
import math
import threading

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
    if w <= image.shape[1] and h <= image.shape[0]:
        return shrink(image, w / image.shape[1], h / image.shape[0], (w, h))
    # one axis shrinks, the other is enlarged: the area average along the first, then bilinear (Pillow's
    # bilinear shrinking averaged a fixed neighbourhood: 58 grey levels from the area average on noise)
    if w < image.shape[1]:
        image = shrink(image, w / image.shape[1], 1.0, (w, image.shape[0]))
    elif h < image.shape[0]:
        image = shrink(image, 1.0, h / image.shape[0], (image.shape[1], h))
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
    """How ``n`` output pixels along one axis are made from source pixels ``lo .. hi - 1`` (see
    :func:`axis_weights`): output pixel ``i`` is ``sum_j weight[i, j] * source[lo + index[i, j]]``, and
    ``inside`` marks the output pixels that touch the source. Shared by the tiles of a grid's column (or
    row): never changed once made."""

    __slots__ = ("lo", "hi", "index", "weight", "inside", "_as")

    def __init__(self, lo, hi, index, weight, inside):
        self.lo, self.hi, self.index, self.weight, self.inside = lo, hi, index, weight, inside
        self._as = {}

    def weight_as(self, dtype):
        """``weight`` in ``dtype`` (made once)."""
        w = self._as.get(dtype)
        if w is None:
            w = self._as[dtype] = self.weight.astype(dtype)
        return w


def axis_weights(start: float, n: int, scale: float, extent: int) -> AxisWeights:
    """The weights of output pixels ``start .. start + n - 1`` of the grid that lays output pixel ``i`` over
    source interval ``[i * scale, (i + 1) * scale)``. Shrinking (``scale > 1``): each the exact area average of
    the source pixels it covers, those outside ``[0, extent)`` left out. Enlarging (``scale < 1``): bilinear,
    each the linear interpolation of the two source pixels around its centre (source position
    ``(i + 0.5) * scale - 0.5``, held at the first and last pixel beyond them), as a bilinear resize of the
    whole source (Pillow's, OpenCV's) gives it. Every weight comes from the output pixel's place in the whole
    grid, so a pixel's value does not depend on which window of the grid it is made in (tiles of any size and
    overlap agree on the pixels they share); a fractional ``start`` places a window between the grid's pixels.
    Output pixels that do not touch the source are marked outside. The last few are kept (the tiles of a
    grid's column share theirs)."""
    if not (math.isfinite(scale) and scale > 0 and scale != 1):
        raise ValueError(f"axis_weights resamples: scale must be a positive number other than 1, got {scale}")
    if scale < 1:
        return _bilinear_weights(float(start), int(n), float(scale), int(extent))
    return _axis_weights(float(start), int(n), float(scale), int(extent))


@functools.lru_cache(maxsize=512)  # a grid's columns and rows (~16 kB each at 256 px)
def _axis_weights(start, n, scale, extent):
    i = start + np.arange(n, dtype=np.float64)
    a, b = i * scale, (i + 1) * scale
    inside = (b > 0) & (a < extent)
    a, b = np.clip(a, 0, extent), np.clip(b, 0, extent)
    m = int(math.ceil(scale)) + 1
    k = np.floor(a)[:, None] + np.arange(m)[None, :]
    span = np.where(inside, b - a, 1.0)
    w = np.clip(np.minimum(b[:, None], k + 1) - np.maximum(a[:, None], k), 0, None) / span[:, None]
    w[~inside] = 0
    covered = w > 0
    # a term an output pixel does not cover points at its first pixel, which it does: 0 x that pixel adds
    # nothing, where 0 x a NaN (no data) beside it would have made it NaN
    k = np.where(covered, k, k[:, :1]).astype(np.int64)
    lo = int(k[covered].min()) if covered.any() else 0
    hi = int(k[covered].max()) + 1 if covered.any() else 0
    index = np.clip(k - lo, 0, max(hi - lo - 1, 0))
    for arr in (index, w, inside):
        arr.setflags(write=False)
    return AxisWeights(lo, hi, index, w, inside)


@functools.lru_cache(maxsize=512)
def _bilinear_weights(start, n, scale, extent):
    i = start + np.arange(n, dtype=np.float64)
    inside = ((i + 1) * scale > 0) & (i * scale < extent)
    u = np.clip((i + 0.5) * scale - 0.5, 0, extent - 1)
    j0 = np.floor(u)
    f = u - j0
    k = np.stack([j0, np.minimum(j0 + 1, extent - 1)], axis=1).astype(np.int64)
    w = np.stack([1 - f, f], axis=1)
    w[~inside] = 0
    covered = w > 0
    k = np.where(covered, k, k[:, :1])  # a weight-0 term points at the pixel the first covers (0 x NaN)
    lo = int(k[covered].min()) if covered.any() else 0
    hi = int(k[covered].max()) + 1 if covered.any() else 0
    index = np.clip(k - lo, 0, max(hi - lo - 1, 0))
    for arr in (index, w, inside):
        arr.setflags(write=False)
    return AxisWeights(lo, hi, index, w, inside)


#: bytes of work arrays a thread keeps and uses again, all together (fresh pages for every tile's arrays
#: cost more than the sums: ~1,500 page faults a 256 px tile); larger ones are made for the call only
_KEEP_BYTES = 16 << 20
_WORK = threading.local()


def _work(name, shape, dtype):
    """A thread's work array ``name`` of ``shape`` (contents undefined): kept for the next call while the
    thread's kept arrays stay within ``_KEEP_BYTES`` together."""
    size = int(np.prod(shape))
    dtype = np.dtype(dtype)
    store = getattr(_WORK, "arrays", None)
    if store is None:
        store = _WORK.arrays = {}
    key = (name, dtype.str)
    buf = store.get(key)
    if buf is not None and buf.size >= size:
        return buf[:size].reshape(shape)
    kept = sum(b.nbytes for k, b in store.items() if k != key)
    if kept + size * dtype.itemsize > _KEEP_BYTES:
        return np.empty(shape, dtype)
    buf = store[key] = np.empty(size, dtype)
    return buf[:size].reshape(shape)


def resample_window(region: np.ndarray, wx: AxisWeights, wy: AxisWeights, fill) -> np.ndarray:
    """The output window of :func:`axis_weights` ``wx`` / ``wy`` made from ``region`` (the source rows
    ``wy.lo:wy.hi`` and columns ``wx.lo:wx.hi``, ``(h, w, c)``), in the region's dtype (integers rounded and
    clipped); pixels outside the source are ``fill``. Rows first, then columns, each output pixel a sum over
    the same source pixels in the same order in any window: a pixel comes out bit for bit the same."""
    h, w, c = region.shape
    ft = np.float32 if region.dtype == np.uint8 else np.float64
    ny, nx = len(wy.index), len(wx.index)
    wyf, wxf = wy.weight_as(ft), wx.weight_as(ft)
    rows = _work("rows", (ny, w, c), ft)
    # a block of columns at a time: the float copy of a coarse tile's large region stays small
    step = max(1, _KEEP_BYTES // max(1, h * c * np.dtype(ft).itemsize))
    for c0 in range(0, w, step):
        bw = min(step, w - c0)
        src = _work("src", (h, bw, c), ft)
        np.copyto(src, region[:, c0:c0 + bw], casting="unsafe")
        acc, term = _work("acc", (ny, bw, c), ft), _work("term", (ny, bw, c), ft)
        acc[...] = 0
        for j in range(wyf.shape[1]):
            np.take(src, wy.index[:, j], axis=0, out=term, mode="clip")  # (indices in range: no checks)
            term *= wyf[:, j, None, None]
            acc += term
        rows[:, c0:c0 + bw] = acc
    out, term = _work("out", (ny, nx, c), ft), _work("term2", (ny, nx, c), ft)
    out[...] = 0
    for j in range(wxf.shape[1]):
        np.take(rows, wx.index[:, j], axis=1, out=term, mode="clip")
        term *= wxf[None, :, j, None]
        out += term
    if region.dtype.kind in "ui":
        info = np.iinfo(region.dtype)
        np.rint(out, out=out)
        np.clip(out, info.min, info.max, out=out)
    res = out.astype(region.dtype)
    if not (wx.inside.all() and wy.inside.all()):
        res[~wy.inside] = fill
        res[:, ~wx.inside] = fill
    return res

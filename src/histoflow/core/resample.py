"""Resizing images in their native dtype (exact area average when shrinking, bilinear when enlarging)."""
from __future__ import annotations

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

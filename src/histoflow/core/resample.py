"""Resizing images in their native dtype (area average when shrinking, bilinear when enlarging)."""
from __future__ import annotations

import numpy as np
from PIL import Image


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an ``(h, w, c)`` array to ``size = (w, h)``, keeping its dtype.

    uint8 images with 1 or 3 channels go through Pillow in one call (4 channels as 3 + 1: Pillow would take
    them for RGBA and weight the colours by the fourth channel); anything else (uint16, many channels) is
    resized channel by channel in float32 and rounded back.
    """
    w, h = int(size[0]), int(size[1])
    if image.shape[1] == w and image.shape[0] == h:
        return image
    shrink = w < image.shape[1] and h < image.shape[0]
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
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


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D mask or label image to ``size = (w, h)`` (labels stay labels)."""
    w, h = int(size[0]), int(size[1])
    if mask.shape[1] == w and mask.shape[0] == h:
        return mask
    ys = np.minimum(((np.arange(h) + 0.5) * mask.shape[0] / h).astype(np.int64), mask.shape[0] - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * mask.shape[1] / w).astype(np.int64), mask.shape[1] - 1)
    return mask[ys[:, None], xs[None, :]]

"""Smoothing filters: median, Gaussian and box blur.

Each filter keeps the image's dtype (uint8 stays uint8, uint16 stays uint16) and handles any number of
channels: OpenCV does the work (it is exact and fast), called on groups of at most four channels; where
OpenCV lacks a case (a median of a uint16 image with a kernel larger than 5) SciPy does it with the same
border rule.

Borders: the box and Gaussian blurs reflect the image about its edge pixel (``cv2.BORDER_REFLECT_101``,
SciPy's ``mode="mirror"``); the median replicates the edge pixel (SciPy's ``mode="nearest"``).

Every filter normally changes ``tile.image``; given ``mask_name`` it smooths that mask instead, in place
(on a 0/1 mask the median and box blurs are then majority filters).
"""
from __future__ import annotations

import numbers

import cv2
import numpy as np

from ..errors import MaskError, ParameterError
from .base import Transform

__all__ = ["MedianBlur", "GaussianBlur", "BoxBlur", "median_blur", "gaussian_blur", "box_blur"]


# --------------------------------------------------------------------------- helpers (shared in the package)
#: largest filter / morphology kernel (pixels): far beyond any tile-scale filter; a kernel of 10^6 px made
#: OpenCV pad a 256 px tile by half a million pixels on each side (minutes, or gigabytes)
MAX_KERNEL = 1023


def _check_odd_kernel(name, kernel_size, minimum=1, maximum=MAX_KERNEL, param="kernel_size"):
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral):
        raise ParameterError(f"{name}: {param} must be an odd integer, got {kernel_size!r}")
    if kernel_size < minimum or kernel_size % 2 == 0:
        raise ParameterError(f"{name}: {param} must be an odd integer >= {minimum}, got {kernel_size}")
    if kernel_size > maximum:
        raise ParameterError(f"{name}: {param} must be at most {maximum} px, got {kernel_size}")
    return int(kernel_size)


def _check_positive_int(name, param, value, minimum=1, maximum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ParameterError(f"{name}: {param} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ParameterError(f"{name}: {param} must be at most {maximum}, got {value!r}")
    return int(value)


def _check_number(name, param, value, minimum=None, strict=False, maximum=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ParameterError(f"{name}: {param} must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ParameterError(f"{name}: {param} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ParameterError(f"{name}: {param} must be at most {maximum:g}, got {value!r}")
    return value


def _check_bool(name, param, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ParameterError(f"{name}: {param} must be True or False, got {value!r}")
    return bool(value)


def _check_name(name, param, value, optional=False):
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ParameterError(f"{name}: {param} must be a non-empty string, got {value!r}")
    return value


def _as_hwc(image):
    image = np.asarray(image)
    if image.ndim == 2:
        return image[:, :, None], True
    if image.ndim != 3:
        raise ParameterError(f"expected an (h, w, c) or (h, w) image, got shape {image.shape}")
    return image, False


def _channel_groups(c, allowed=(1, 2, 3, 4)):
    """Split ``c`` channels into consecutive groups whose sizes are in ``allowed`` (at most 4 each)."""
    groups, start = [], 0
    while start < c:
        left = c - start
        size = max(s for s in allowed if s <= min(left, 4))
        groups.append((start, start + size))
        start += size
    return groups


def _per_channel_groups(image, fn, allowed=(1, 2, 3, 4)):
    """Apply a cv2 function ``fn(array) -> array`` to ``image`` (h, w, c) in groups of at most four
    channels; returns (h, w, c) of the same dtype."""
    h, w, c = image.shape
    if c in allowed and c <= 4:
        out = fn(np.ascontiguousarray(image))
        return out.reshape(h, w, c)
    out = np.empty_like(image)
    for a, b in _channel_groups(c, allowed):
        out[:, :, a:b] = fn(np.ascontiguousarray(image[:, :, a:b])).reshape(h, w, b - a)
    return out


def _restore(out, was_2d):
    return out[:, :, 0] if was_2d else out


def _clip_to_int(x, dtype, lo=None):
    """Rounded floats to an integer dtype, clipped to its range. For 64-bit integers the range's top is not a
    float (2**63 - 1 rounds up to 2**63), so clipping to it and casting wrapped the brightest pixels round to
    the dtype's minimum: those are set to the top after the cast."""
    info = np.iinfo(dtype)
    lo = info.min if lo is None else lo
    if np.dtype(dtype).itemsize < 8:
        return np.clip(x, lo, info.max).astype(dtype)
    top = x >= float(info.max)
    out = np.clip(x, lo, float(np.nextafter(float(info.max), 0))).astype(dtype)
    out[top] = info.max
    return out


#: dtypes OpenCV's Gaussian and box filters take as they are
_CV2_FILTER_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


def _filter_any_dtype(image, fn):
    """``fn`` (an OpenCV filter, through :func:`_per_channel_groups`) on any dtype: others than OpenCV's
    are filtered in float64 and brought back to their dtype (integers rounded and clipped to their range,
    booleans at 0.5)."""
    dt = image.dtype
    if dt in _CV2_FILTER_DTYPES:
        return _per_channel_groups(image, fn)
    if dt.kind not in "biuf":
        raise ParameterError(f"cannot filter an image of dtype {dt}")
    out = _per_channel_groups(image.astype(np.float64), fn)
    if dt == np.bool_:
        return out >= 0.5
    if dt.kind in "iu":
        return _clip_to_int(np.rint(out), dt)
    return out.astype(dt)


# --------------------------------------------------------------------------- functions on arrays
def median_blur(image, kernel_size=5):
    """Median filter over a ``kernel_size`` square, each channel separately.

    Parameters
    ----------
    image : ndarray
        ``(h, w, c)`` or ``(h, w)``, any dtype; the result has the same shape and dtype.
    kernel_size : int
        Odd side of the square window (1 returns a copy).

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((9, 9, 3), np.uint8); img[4, 4] = 255
    >>> int(median_blur(img, 3).max())     # a lone speck is removed
    0
    """
    k = _check_odd_kernel("median_blur", kernel_size)
    image, was_2d = _as_hwc(image)
    if k == 1 or image.size == 0:  # (an empty image has nothing to filter; OpenCV would raise)
        return _restore(image.copy(), was_2d)
    dt = image.dtype
    if dt.kind == "f" and np.isnan(image).any():  # NaN (no data): the median of each window's numbers
        return _restore(_nan_median(image, k), was_2d)
    cv2_ok = dt == np.uint8 or (k <= 5 and dt in (np.uint16, np.float32))
    if cv2_ok:
        allowed = (1, 3, 4) if (dt == np.uint8 and k > 5) else (1, 2, 3, 4)
        out = _per_channel_groups(image, lambda a: cv2.medianBlur(a, k), allowed)
    else:
        from scipy import ndimage

        src = image.astype(np.float32) if dt == np.float16 else image  # (scipy has no float16 median)
        out = ndimage.median_filter(src, size=(k, k, 1), mode="nearest").astype(dt, copy=False)
    return _restore(out, was_2d)


def _nan_median(image, k):
    """Median over each ``k`` x ``k`` window of its numbers, NaN left out (edges replicated, as the other
    paths); a NaN pixel stays NaN. OpenCV and scipy sort NaN among the numbers: NaN pixels took values and
    finite pixels beside NaN were biased, differently for float32 and float64."""
    import warnings

    r = k // 2
    src = image.astype(np.float32) if image.dtype == np.float16 else image
    padded = np.pad(src, ((r, r), (r, r), (0, 0)), mode="edge")
    out = np.empty(src.shape, src.dtype)
    h, w, c = src.shape
    rows = max(1, (1 << 23) // max(1, w * c * k * k))  # windows of ~8 M values at a time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (a window of NaN only: NaN)
        for y in range(0, h, rows):
            win = np.lib.stride_tricks.sliding_window_view(padded[y:y + rows + 2 * r], (k, k), axis=(0, 1))
            out[y:y + rows] = np.nanmedian(win.reshape(*win.shape[:3], k * k), axis=-1)
    out[np.isnan(src)] = np.nan
    return out.astype(image.dtype, copy=False)


def gaussian_blur(image, kernel_size=5, sigma=5):
    """Gaussian blur with a ``kernel_size`` square kernel of standard deviation ``sigma`` (pixels).

    Parameters
    ----------
    image : ndarray
        ``(h, w, c)`` or ``(h, w)``, any dtype (uint8, uint16, int16, float32 and float64 directly; others
        in float64, rounded back). Same shape and dtype out.
    kernel_size : int
        Odd side of the kernel.
    sigma : float
        Standard deviation of the Gaussian in pixels (> 0).

    Examples
    --------
    >>> import numpy as np
    >>> img = np.full((16, 16, 3), 100, np.uint8)
    >>> bool((gaussian_blur(img, 5, 2) == 100).all())
    True
    """
    k = _check_odd_kernel("gaussian_blur", kernel_size)
    s = float(_check_number("gaussian_blur", "sigma", sigma, 0, strict=True))
    image, was_2d = _as_hwc(image)
    if image.size == 0:
        return _restore(image.copy(), was_2d)
    out = _filter_any_dtype(image, lambda a: cv2.GaussianBlur(a, (k, k), s, sigmaY=s,
                                                              borderType=cv2.BORDER_REFLECT_101))
    return _restore(out, was_2d)


def box_blur(image, kernel_size=5):
    """Mean over a ``kernel_size`` square window (normalised box filter).

    Parameters
    ----------
    image : ndarray
        ``(h, w, c)`` or ``(h, w)``, any dtype (uint8, uint16, int16, float32 and float64 directly; others
        in float64, rounded back). Same shape and dtype out.
    kernel_size : int
        Odd side of the window.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((5, 5, 1), np.uint16); img[2, 2] = 900
    >>> int(box_blur(img, 3)[2, 2, 0])
    100
    """
    k = _check_odd_kernel("box_blur", kernel_size)
    image, was_2d = _as_hwc(image)
    if image.size == 0:
        return _restore(image.copy(), was_2d)
    out = _filter_any_dtype(image, lambda a: cv2.blur(a, (k, k), borderType=cv2.BORDER_REFLECT_101))
    return _restore(out, was_2d)


# --------------------------------------------------------------------------- transforms
class _ImageFilter(Transform, register=False):
    """A filter of the image, or of the named mask when ``mask_name`` is given."""

    mask_name = None

    @property
    def masks_in(self):
        return (self.mask_name,) if self.mask_name else ()

    @property
    def masks_out(self):
        return (self.mask_name,) if self.mask_name else ()

    @property
    def changes_image(self):
        return not self.mask_name

    def apply(self, tile):
        if self.mask_name:
            if self.mask_name not in tile.masks:
                raise MaskError(f"{type(self).__name__}: tile has no mask {self.mask_name!r} "
                               f"(masks: {sorted(tile.masks) or 'none'})")
            tile.masks[self.mask_name] = self.F(tile.masks[self.mask_name])
        else:
            tile.image = self.F(tile.image)


class MedianBlur(_ImageFilter):
    """Median blur of the image (each channel), dtype kept.

    Parameters
    ----------
    kernel_size : int
        Odd side of the square window (default 5).
    mask_name : str or None
        Smooth this mask in place instead of the image.

    Examples
    --------
    >>> from histoflow.transforms.filters import MedianBlur
    >>> MedianBlur(5).F(image)          # doctest: +SKIP
    """

    def __init__(self, kernel_size=5, mask_name=None):
        self.kernel_size = _check_odd_kernel("MedianBlur", kernel_size)
        self.mask_name = _check_name("MedianBlur", "mask_name", mask_name, optional=True)

    def F(self, image):
        return median_blur(image, self.kernel_size)


class GaussianBlur(_ImageFilter):
    """Gaussian blur of the image (each channel), dtype kept.

    Parameters
    ----------
    kernel_size : int
        Odd side of the kernel (default 5).
    sigma : float
        Standard deviation in pixels (default 5).
    mask_name : str or None
        Smooth this mask in place instead of the image.

    Examples
    --------
    >>> from histoflow.transforms.filters import GaussianBlur
    >>> GaussianBlur(kernel_size=7, sigma=2).F(image)       # doctest: +SKIP
    """

    def __init__(self, kernel_size=5, sigma=5, mask_name=None):
        self.kernel_size = _check_odd_kernel("GaussianBlur", kernel_size)
        self.sigma = _check_number("GaussianBlur", "sigma", sigma, 0, strict=True)
        self.mask_name = _check_name("GaussianBlur", "mask_name", mask_name, optional=True)

    def F(self, image):
        return gaussian_blur(image, self.kernel_size, self.sigma)


class BoxBlur(_ImageFilter):
    """Box (mean) blur of the image (each channel), dtype kept.

    Parameters
    ----------
    kernel_size : int
        Odd side of the window (default 5).
    mask_name : str or None
        Smooth this mask in place instead of the image.

    Examples
    --------
    >>> from histoflow.transforms.filters import BoxBlur
    >>> BoxBlur(15).apply(tile)            # doctest: +SKIP
    """

    def __init__(self, kernel_size=5, mask_name=None):
        self.kernel_size = _check_odd_kernel("BoxBlur", kernel_size)
        self.mask_name = _check_name("BoxBlur", "mask_name", mask_name, optional=True)

    def F(self, image):
        return box_blur(image, self.kernel_size)

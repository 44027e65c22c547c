"""Intensity transforms: contrast stretching and (adaptive) histogram equalisation, plus the colour
conversions the other transform modules share (grey, HSV saturation).

The transforms follow :mod:`skimage.exposure` semantics and return the input dtype: uint8 stays uint8,
uint16 stays uint16 (a float result in ``[0, 1]`` is scaled to the dtype's full range and rounded).
"""
from __future__ import annotations

import numbers

import cv2
import numpy as np

from ..errors import ParameterError
from .base import Transform, on_inside
from .filters import _as_hwc, _check_bool, _check_number, _check_positive_int, _clip_to_int, _restore

#: most histogram bins of the equalisations (16-bit images have 65,536 values; 10**9 bins took gigabytes)
MAX_BINS = 65536

__all__ = [
    "RescaleIntensity", "HistogramEqualization", "AdaptiveHistogramEqualization",
    "rescale_intensity", "equalize_histogram", "equalize_adaptive",
    "to_grey", "rgb_to_saturation",
]


# --------------------------------------------------------------------------- colour helpers
def to_grey(image, channel=None):
    """One grey channel of an image, in its dtype.

    ``channel`` given: that channel. Otherwise one channel is itself, three channels are RGB and four
    RGBA, converted with OpenCV's weights ``0.299 R + 0.587 G + 0.114 B``. Other channel counts need
    ``channel``.

    Examples
    --------
    >>> import numpy as np
    >>> to_grey(np.full((2, 2, 3), 200, np.uint8))[0, 0]
    np.uint8(200)
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    c = image.shape[2]
    if channel is not None:
        if not -c <= channel < c:
            raise ParameterError(f"channel {channel} out of range for an image of {c} channels")
        return image[:, :, channel]
    if c == 1:
        return image[:, :, 0]
    if c in (3, 4):
        if image.size == 0:  # no pixels: OpenCV would raise
            return np.zeros(image.shape[:2], image.dtype)
        code = cv2.COLOR_RGB2GRAY if c == 3 else cv2.COLOR_RGBA2GRAY
        if image.dtype in (np.uint8, np.uint16, np.float32):
            return cv2.cvtColor(np.ascontiguousarray(image), code)
        rgb = image[:, :, :3].astype(np.float64)
        grey = rgb @ np.array([0.299, 0.587, 0.114])
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            grey = np.clip(np.round(grey), info.min, info.max)
        return grey.astype(image.dtype)
    raise ParameterError(f"cannot make a grey image from {c} channels without knowing which: pass channel=")


def rgb_to_saturation(image):
    """HSV saturation of an RGB image on the 0-255 scale, uint8 ``(h, w)``.

    ``S = (max - min) / max`` over R, G, B (0 where max is 0), as OpenCV's ``COLOR_RGB2HSV``.

    Examples
    --------
    >>> import numpy as np
    >>> int(rgb_to_saturation(np.array([[[255, 0, 0]]], np.uint8))[0, 0])
    255
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ParameterError(f"saturation needs an RGB image (h, w, 3), got shape {image.shape}")
    rgb = np.ascontiguousarray(image[:, :, :3])
    if rgb.size == 0:  # no pixels: OpenCV would raise
        return np.zeros(rgb.shape[:2], np.uint8)
    if rgb.dtype == np.uint8:
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
    f = rgb.astype(np.float32)
    mx, mn = f.max(axis=2), f.min(axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(mx > 0, (mx - mn) / mx, 0)
    return np.clip(np.round(s * 255), 0, 255).astype(np.uint8)


def _to_dtype(x, dtype):
    """A float array in [0, 1] to ``dtype`` (full integer range, rounded)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return _clip_to_int(np.round(x * float(info.max)), dtype, max(info.min, 0))
    if dtype == np.bool_:
        return x >= 0.5
    return x.astype(dtype, copy=False)


def _cast_like(x, dtype):
    """Values to ``dtype`` unscaled, clipped to its range (rounded for integers)."""
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x
    if np.issubdtype(dtype, np.integer):
        return _clip_to_int(np.round(x), dtype)
    return x.astype(dtype)


def _check_range(name, param, value):
    from skimage.exposure.exposure import DTYPE_RANGE

    if isinstance(value, str):
        if value in ("image", "dtype") or value in DTYPE_RANGE:
            return value
        raise ParameterError(f"{name}: {param} must be 'image', 'dtype', a dtype name or (min, max), got {value!r}")
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) == 2 and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        lo, hi = (v.item() if isinstance(v, np.generic) else v for v in value)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ParameterError(f"{name}: {param} (min, max) must be finite, got {value!r}")
        if not lo < hi:
            raise ParameterError(f"{name}: {param} (min, max) needs min < max, got {value!r}")
        return (lo, hi)
    raise ParameterError(f"{name}: {param} must be 'image', 'dtype', a dtype name or (min, max), got {value!r}")


# --------------------------------------------------------------------------- functions on arrays
def rescale_intensity(image, in_range="image", out_range="dtype", per_channel=False):
    """Stretch intensities from ``in_range`` to ``out_range``
    (:func:`skimage.exposure.rescale_intensity`), the result in the input dtype.

    Parameters
    ----------
    image : ndarray
    in_range, out_range : str or (min, max)
        ``"image"`` (the image's min and max), ``"dtype"`` (its dtype's range), a dtype name such as
        ``"uint12"``, or two numbers. Values outside ``in_range`` are clipped.
    per_channel : bool
        Take ``"image"`` ranges of each channel separately (useful for multiplex fluorescence).

    Examples
    --------
    >>> import numpy as np
    >>> rescale_intensity(np.array([[[50], [100], [150]]], np.uint8))[0, :, 0]
    array([  0, 127, 255], dtype=uint8)
    """
    from skimage import exposure

    in_range = _check_range("rescale_intensity", "in_range", in_range)
    out_range = _check_range("rescale_intensity", "out_range", out_range)
    image = np.asarray(image)
    if image.dtype.kind in "iu" and out_range not in ("image", "dtype"):
        # the result keeps the input's dtype: a wider range (uint16 / (0, 1000) for uint8) was clipped at its top,
        # leaving most of the tile at 255
        from skimage.exposure.exposure import DTYPE_RANGE

        lo, hi = DTYPE_RANGE[out_range] if isinstance(out_range, str) else out_range
        info = np.iinfo(image.dtype)
        if lo < info.min or hi > info.max:
            raise ParameterError(f"rescale_intensity: out_range {out_range!r} ({lo:g}..{hi:g}) does not fit the "
                                 f"image's {image.dtype} ({info.min}..{info.max}), which the result keeps; convert "
                                 "the image first, or give a range within it")
    if image.size == 0:  # no pixels, nothing to stretch (scikit-image would raise)
        return image.copy()

    def one(a):
        rng = in_range
        if rng == "image" and a.dtype.kind == "f" and not np.isfinite(a).all():
            # the range of the finite pixels: NaN (no data) stays NaN, +-inf go to the ends (one NaN pixel made
            # scikit-image's "image" range NaN, and with it the whole tile)
            fin = np.isfinite(a)
            if not fin.any():
                return a.copy()
            lo, hi = float(a[fin].min()), float(a[fin].max())
            if lo == hi:  # one value: as scikit-image treats an image of one value, the holes put back after
                out = exposure.rescale_intensity(np.where(fin, a, a.dtype.type(lo)), "image", out_range)
                return _cast_like(np.where(np.isnan(a), np.nan, out), a.dtype)
            rng = (lo, hi)
        if a.dtype.kind in "iu" and a.dtype.itemsize == 8:
            # scikit-image casts its float result to 64-bit integers itself, wrapping the top of the range round
            # to the bottom: its ranges are given as numbers of a float copy, and the cast is ours
            from skimage.exposure.exposure import DTYPE_RANGE

            def numbers(r):
                if r == "dtype":
                    return float(np.iinfo(a.dtype).min), float(np.iinfo(a.dtype).max)
                if r == "image":
                    return float(a.min()), float(a.max())
                return tuple(float(v) for v in (DTYPE_RANGE[r] if isinstance(r, str) else r))

            return _cast_like(exposure.rescale_intensity(a.astype(np.float64), numbers(rng), numbers(out_range)),
                              a.dtype)
        return _cast_like(exposure.rescale_intensity(a, rng, out_range), a.dtype)

    if per_channel and image.ndim == 3:
        out = np.empty_like(image)
        for i in range(image.shape[2]):
            out[:, :, i] = one(image[:, :, i])
        return out
    return one(image)


def equalize_histogram(image, nbins=256, per_channel=False):
    """Histogram equalisation (:func:`skimage.exposure.equalize_hist`, one histogram over all channels
    unless ``per_channel``), the result in the input dtype.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.array([[[10], [10], [20], [30]]], np.uint8)
    >>> equalize_histogram(img)[0, :, 0]
    array([128, 128, 191, 255], dtype=uint8)
    """
    from skimage import exposure

    nbins = _check_positive_int("equalize_histogram", "nbins", nbins, 2, MAX_BINS)
    image = np.asarray(image)
    if image.size == 0:
        return image.copy()

    def one(a):
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            # the histogram of the finite pixels; NaN (no data) stays NaN, +-inf go to the ends
            fin = np.isfinite(a)
            if not fin.any():
                return a.copy()
            out = exposure.equalize_hist(np.where(fin, a, 0), nbins=nbins, mask=fin)
            out = np.where(np.isnan(a), np.nan, np.where(a == np.inf, 1.0, np.where(a == -np.inf, 0.0, out)))
            return _to_dtype(out, a.dtype)
        return _to_dtype(exposure.equalize_hist(a, nbins=nbins), a.dtype)

    if per_channel and image.ndim == 3:
        out = np.empty_like(image)
        for i in range(image.shape[2]):
            out[:, :, i] = one(image[:, :, i])
        return out
    # one histogram over every channel: flatten (scikit-image would warn that this might be a colour image)
    return one(image.reshape(-1)).reshape(image.shape)


def equalize_adaptive(image, clip_limit=0.03, nbins=256, kernel_size=None):
    """Contrast-limited adaptive histogram equalisation (:func:`skimage.exposure.equalize_adapthist`),
    the result in the input dtype.

    A three-channel image is taken as RGB and equalised on its HSV value (as scikit-image does); any other
    number of channels (1, 2, 4, 22, ...) is equalised channel by channel.

    Parameters
    ----------
    image : ndarray
        ``(h, w, c)`` or ``(h, w)``, non-negative.
    clip_limit : float
        In ``[0, 1]``; higher gives more contrast.
    nbins : int
        Grey bins of the histograms.
    kernel_size : int or (int, int) or None
        Size of the contextual regions; default 1/8 of the image's height and width.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.random.default_rng(0).integers(0, 4000, (64, 64, 22), dtype=np.uint16)
    >>> equalize_adaptive(img).dtype
    dtype('uint16')
    """
    from skimage import exposure

    image, was_2d = _as_hwc(image)
    if image.size == 0:  # no pixels (scikit-image would raise)
        return _restore(image.copy(), was_2d)
    if image.dtype.kind == "f":  # (an all-NaN tile, no data, is left as it is below)
        vals = image[~np.isnan(image)]
        if vals.size and not (vals.min() >= -1 and vals.max() <= 1):
            raise ParameterError(f"AdaptiveHistogramEqualization: float images must hold values in [-1, 1] "
                                 f"(scikit-image's float range), got {float(vals.min())}..{float(vals.max())}; "
                                 "scale them first (RescaleIntensity) or give integers")
    ks = tuple(kernel_size) if isinstance(kernel_size, (list, tuple)) else kernel_size
    dtype = image.dtype
    nan = None
    if dtype.kind == "f":
        # float16 overflows inside scikit-image (a 1- or 2-channel tile came out all 1.0); NaN (no data) was
        # taken for 0 and shifted every region's histogram: it joins its channel's darkest value, and stays NaN
        image = image.astype(np.float32 if dtype.itemsize <= 4 else np.float64)
        nan = np.isnan(image)
        if nan.all():
            return _restore(np.array(image, dtype=dtype), was_2d)
        if nan.any():
            finite = np.where(nan, np.inf, image).min(axis=(0, 1), keepdims=True)  # each channel's darkest
            image = np.where(nan, np.where(np.isfinite(finite), finite, 0), image)
        else:
            nan = None
    c = image.shape[2]
    if c == 3:
        out = _to_dtype(exposure.equalize_adapthist(image, kernel_size=ks, clip_limit=clip_limit,
                                                    nbins=nbins), dtype)
    else:
        out = np.empty(image.shape, dtype)
        for i in range(c):
            out[:, :, i] = _to_dtype(exposure.equalize_adapthist(image[:, :, i], kernel_size=ks,
                                                                 clip_limit=clip_limit, nbins=nbins), dtype)
    if nan is not None:
        out[nan] = np.nan
    return _restore(out, was_2d)


# --------------------------------------------------------------------------- transforms
class RescaleIntensity(Transform):
    """Contrast stretching with :func:`skimage.exposure.rescale_intensity` semantics, dtype kept.

    Parameters
    ----------
    in_range, out_range : str or (min, max)
        ``"image"``, ``"dtype"``, a dtype name (``"uint12"``) or two numbers.
    per_channel : bool
        Rescale each channel from its own range (for multiplex images).

    Examples
    --------
    >>> from histoflow.transforms.intensity import RescaleIntensity
    >>> RescaleIntensity(in_range=(0, 4095)).apply(tile)       # doctest: +SKIP
    """

    changes_image = True

    def __init__(self, in_range="image", out_range="dtype", per_channel=False):
        self.in_range = _check_range("RescaleIntensity", "in_range", in_range)
        self.out_range = _check_range("RescaleIntensity", "out_range", out_range)
        self.per_channel = _check_bool("RescaleIntensity", "per_channel", per_channel)

    def F(self, image):
        return rescale_intensity(image, self.in_range, self.out_range, self.per_channel)

    def apply(self, tile):
        tile.image = on_inside(tile, self.F)  # an edge tile's fill is neither measured nor changed


class HistogramEqualization(Transform):
    """Histogram equalisation (:func:`skimage.exposure.equalize_hist`), dtype kept.

    Parameters
    ----------
    nbins : int
        Bins of the histogram (ignored by scikit-image for integer images, which use every value).
    per_channel : bool
        One histogram per channel instead of one over all channels.

    Examples
    --------
    >>> from histoflow.transforms.intensity import HistogramEqualization
    >>> HistogramEqualization().F(image)        # doctest: +SKIP
    """

    changes_image = True

    def __init__(self, nbins=256, per_channel=False):
        self.nbins = _check_positive_int("HistogramEqualization", "nbins", nbins, 2, MAX_BINS)
        self.per_channel = _check_bool("HistogramEqualization", "per_channel", per_channel)

    def F(self, image):
        return equalize_histogram(image, self.nbins, self.per_channel)

    def apply(self, tile):
        tile.image = on_inside(tile, self.F)  # an edge tile's fill is neither measured nor changed


#: largest CLAHE contextual region (px): scikit-image pads the image to a multiple of it (10^6 px asked for TiB)
MAX_CLAHE_KERNEL = 4096


class AdaptiveHistogramEqualization(Transform):
    """CLAHE (:func:`skimage.exposure.equalize_adapthist`), dtype kept; RGB on its HSV value, other
    channel counts channel by channel.

    Parameters
    ----------
    clip_limit : float
        In ``[0, 1]`` (default 0.03).
    nbins : int
        Grey bins (default 256).
    kernel_size : int or (int, int) or None
        Contextual region size; default 1/8 of the image size.

    Examples
    --------
    >>> from histoflow.transforms.intensity import AdaptiveHistogramEqualization
    >>> AdaptiveHistogramEqualization(clip_limit=0.02).apply(tile)      # doctest: +SKIP
    """

    changes_image = True

    def __init__(self, clip_limit=0.03, nbins=256, kernel_size=None):
        name = "AdaptiveHistogramEqualization"
        self.clip_limit = _check_number(name, "clip_limit", clip_limit, 0)
        if self.clip_limit > 1:
            raise ParameterError(f"{name}: clip_limit must be in [0, 1], got {clip_limit!r}")
        self.nbins = _check_positive_int(name, "nbins", nbins, 2, MAX_BINS)
        if kernel_size is not None:
            if isinstance(kernel_size, (list, tuple)):
                if len(kernel_size) != 2:
                    raise ParameterError(f"{name}: kernel_size must be an int or (height, width), got {kernel_size!r}")
                kernel_size = tuple(_check_positive_int(name, "kernel_size", k, maximum=MAX_CLAHE_KERNEL)
                                    for k in kernel_size)
            else:
                kernel_size = _check_positive_int(name, "kernel_size", kernel_size, maximum=MAX_CLAHE_KERNEL)
        self.kernel_size = kernel_size

    def F(self, image):
        return equalize_adaptive(image, self.clip_limit, self.nbins, self.kernel_size)

    def apply(self, tile):
        tile.image = on_inside(tile, self.F)  # an edge tile's fill is neither measured nor changed

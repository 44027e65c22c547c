"""Augmentation of a tile together with its masks, on numpy arrays (before tensor conversion).

Every operation is called as ``op(image, masks, rng) -> (image, masks)``:

``image``
    ``(h, w, c)`` array in its native dtype (uint8 H&E above all; the geometric operations and
    :class:`Brightness` / :class:`Contrast` work on any dtype and channel count, :class:`HSVShift` and
    :class:`StainAugment` need uint8 RGB). The output keeps the input's dtype and shape.
``masks``
    dict of name -> array whose first two axes are the image's ``(h, w)``: binary masks, semantic or
    **instance label images** (any integer dtype), probability maps (float). May be empty or None.
``rng``
    a :class:`numpy.random.Generator`. One operation draws its random choices once and applies the same
    choice to the image and to every mask, so they stay aligned.

Geometric operations (:class:`RandomFlip`, :class:`RandomRotate90`, :class:`RandomZoom`) move the image and
the masks alike; masks are resampled by nearest neighbour only, so label values are preserved (no new ids
appear, which matters for instance masks). Photometric operations (:class:`HSVShift`, :class:`Brightness`,
:class:`Contrast`, :class:`StainAugment`, :class:`RandStainNA`, :class:`Blur`, :class:`GaussianNoise`) change the
image only and return
the masks untouched.

.. note::
   Maps whose *values* depend on the geometry, such as HoVer-Net's horizontal / vertical distance maps,
   are moved but not corrected (a horizontal flip should negate the horizontal map, a 90° rotation swaps
   and negates the two). Augment the instance label image and recompute such maps from it afterwards.

:class:`Compose` chains operations and is also the ``transform`` of
:class:`histoflow.ml.data.TileDataset` / :class:`~histoflow.ml.data.WSIPatchDataset`: called on a sample dict
(``{"image": ..., "masks": {...}, ...}``) it returns the augmented sample.

Examples
--------
>>> import numpy as np
>>> aug = Compose([RandomFlip(), RandomRotate90(), RandomZoom((0.9, 1.1)),
...                HSVShift(0.02, 0.1, 0.1), StainAugment(0.1, 0.1)], seed=0)
>>> image = np.full((64, 64, 3), 200, np.uint8)
>>> out = aug({"image": image, "masks": {"nuclei": np.zeros((64, 64), np.int32)}})
>>> out["image"].shape, out["image"].dtype, out["masks"]["nuclei"].dtype
((64, 64, 3), dtype('uint8'), dtype('int32'))
"""
from __future__ import annotations

import os
import sys

import cv2
import numpy as np

from ..core.resample import resize_mask
from ..errors import HistoflowError

__all__ = ["AugmentError", "Augmentation", "RandomFlip", "RandomRotate90", "RandomZoom", "HSVShift",
           "Brightness", "Contrast", "StainAugment", "RandStainNA", "Blur", "GaussianNoise", "Compose"]


class AugmentError(HistoflowError, ValueError):
    """An augmentation got invalid parameters or arrays it cannot handle."""


# ------------------------------------------------------------------------------------------ helpers
def _check(image, masks, who):
    image = np.asarray(image)
    if image.ndim == 2:
        raise AugmentError(f"{who}: the image must be (h, w, c); got a 2-D array {image.shape} "
                           "(add a channel axis: image[..., None])")
    if image.ndim != 3:
        raise AugmentError(f"{who}: the image must be (h, w, c), got shape {image.shape}")
    masks = {} if masks is None else masks
    for name, m in masks.items():
        m = np.asarray(m)
        if m.ndim < 2 or m.shape[:2] != image.shape[:2]:
            raise AugmentError(f"{who}: mask {name!r} has shape {m.shape}; its first two axes must be the "
                               f"image's (h, w) = {image.shape[:2]}")
    return image, masks


def _rng(rng):
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise AugmentError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _number(v):
    """``v`` as a float, or None when it is not a real number (text, None, a bool, a list)."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    return float(v)


def _check_prob(who, p):
    v = _number(p)
    if v is None or not 0.0 <= v <= 1.0:
        raise AugmentError(f"{who}: probability p must be a number in [0, 1], got {p!r}")
    return v


def _check_nonneg(who, name, v):
    f = _number(v)
    if f is None or not np.isfinite(f) or f < 0:
        raise AugmentError(f"{who}: {name} must be a finite number >= 0, got {v!r}")
    return f


def _rgb_uint8(image, who):
    if image.dtype != np.uint8 or image.shape[2] != 3:
        raise AugmentError(f"{who}: needs an (h, w, 3) uint8 RGB image, got shape {image.shape} {image.dtype}")
    return image


def _to_dtype(out, dtype):
    """Round and clip a float result back into an image dtype."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(dtype)
    if dtype == bool:
        return out > 0.5
    return out.astype(dtype)


def _full_scale(dtype):
    """The value of "white": 255 for uint8, 65535 for uint16, 1.0 for floats. An integer for integer dtypes (as a
    float, int64's top rounds past it, and a fill of it wrapped round to the dtype's minimum)."""
    dtype = np.dtype(dtype)
    return int(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0


# ------------------------------------------------------------------------------------------ base
class Augmentation:
    """Base class: ``op(image, masks=None, rng=None) -> (image, masks)``.

    Subclasses implement :meth:`_apply` (the random draw included). ``p`` is the probability that the
    operation is applied at all (drawn first, from the same ``rng``).
    """

    #: True for operations that move pixels (applied to masks too)
    geometric = False
    p = 1.0

    def __call__(self, image, masks=None, rng=None):
        who = type(self).__name__
        image, masks = _check(image, masks, who)
        rng = _rng(rng)
        if self.p < 1.0 and rng.random() >= self.p:
            return image, dict(masks)
        out, new_masks = self._apply(image, dict(masks), rng)
        return out, new_masks

    def _apply(self, image, masks, rng):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


# ------------------------------------------------------------------------------------------ geometric
class RandomFlip(Augmentation):
    """Mirror left-right and/or top-bottom, each with probability ``p``.

    Parameters
    ----------
    horizontal, vertical : bool
        Which flips may happen.
    p : float
        Probability of each enabled flip.
    """

    geometric = True

    def __init__(self, horizontal=True, vertical=True, p=0.5):
        self.horizontal = bool(horizontal)
        self.vertical = bool(vertical)
        self.flip_p = _check_prob("RandomFlip", p)

    def _apply(self, image, masks, rng):
        draws = rng.random(2)
        flip_h = self.horizontal and draws[0] < self.flip_p
        flip_v = self.vertical and draws[1] < self.flip_p
        axes = tuple(a for a, f in ((0, flip_v), (1, flip_h)) if f)
        if not axes:
            return image, masks
        return np.flip(image, axes), {k: np.flip(m, axes) for k, m in masks.items()}


class RandomRotate90(Augmentation):
    """Rotate by a random multiple of 90° (0, 90, 180, 270, equally likely).

    A non-square image is rotated by 0° or 180° only, so that its shape is kept (tiles of a batch must
    share one shape).
    """

    geometric = True

    def __init__(self, p=1.0):
        self.p = _check_prob("RandomRotate90", p)

    def _apply(self, image, masks, rng):
        square = image.shape[0] == image.shape[1]
        k = int(rng.integers(0, 4)) if square else 2 * int(rng.integers(0, 2))
        if k == 0:
            return image, masks
        return np.rot90(image, k, axes=(0, 1)), {n: np.rot90(m, k, axes=(0, 1)) for n, m in masks.items()}


class RandomZoom(Augmentation):
    """Scale by a random factor, then crop or pad back to the original size.

    The factor is drawn log-uniformly in ``scale_range`` (so 0.8 and 1.25 are equally likely). The image
    is resized bilinearly, the masks by nearest neighbour (label values are preserved: the ids of the
    output are a subset of the input's). Zooming in crops a random window of the enlarged image; zooming
    out places the smaller image at a random position on a canvas of ``fill`` (image) and
    ``mask_fill`` (masks).

    Parameters
    ----------
    scale_range : (float, float)
        Smallest and largest factor, e.g. ``(0.8, 1.25)``; > 1 enlarges (zoom in).
    fill : float, optional
        Image value of the padded border. Default: white (255 for uint8, 65535 for uint16, 1.0 for float),
        i.e. glass for brightfield tiles; pass 0 for fluorescence.
    mask_fill : int or float
        Mask value of the padded border (0: background).
    p : float
        Probability of zooming at all.
    """

    geometric = True

    def __init__(self, scale_range=(0.8, 1.25), fill=None, mask_fill=0, p=1.0):
        try:
            lo, hi = (float(v) for v in scale_range)
        except (TypeError, ValueError):
            raise AugmentError(f"RandomZoom: scale_range must be a pair of numbers, got {scale_range!r}") from None
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
            raise AugmentError(f"RandomZoom: scale_range must satisfy 0 < low <= high, got {scale_range!r}")
        self.scale_range = (lo, hi)
        self.fill = fill
        self.mask_fill = mask_fill
        self.p = _check_prob("RandomZoom", p)

    def _apply(self, image, masks, rng):
        lo, hi = self.scale_range
        s = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        h, w = image.shape[:2]
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        # offsets: of the crop window inside the resized image (zoom in), or of the resized image inside
        # the canvas (zoom out); drawn for both axes whatever happens, so the stream of draws is fixed
        u = rng.random(2)
        oy, ox = int(u[0] * (abs(nh - h) + 1)), int(u[1] * (abs(nw - w) + 1))
        if (nh, nw) == (h, w):
            return image, masks
        img = _resize_image(image, nw, nh)
        fill = _full_scale(image.dtype) if self.fill is None else self.fill
        out = _crop_or_pad(img, h, w, oy, ox, _fitting(fill, image.dtype, "fill", "the image"))
        new_masks = {}
        for k, m in masks.items():
            m = resize_mask(np.asarray(m), (nw, nh))
            new_masks[k] = _crop_or_pad(m, h, w, oy, ox, _fitting(self.mask_fill, m.dtype, "mask_fill", f"mask {k!r}"))
        return out, new_masks


def _fitting(value, dtype, param, what):
    """``value`` if ``dtype`` holds it, else an AugmentError naming it (numpy raised a bare OverflowError, and only
    when a zoom-out was drawn: mid-epoch, in a worker)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "uib":
        info = np.iinfo(dtype) if dtype.kind != "b" else None
        ok = isinstance(value, (bool, int, np.integer, float, np.floating)) and float(value) == float(value) and \
            float(value).is_integer() and (info is None and value in (0, 1) or
                                           info is not None and info.min <= int(value) <= info.max)
        if not ok:
            raise AugmentError(f"RandomZoom: {param} {value!r} does not fit {what} of dtype {dtype}"
                               + (f" ({info.min}..{info.max})" if info is not None else " (0 or 1)"))
    return value


def _resize_image(image, w, h):
    """Bilinear resize of (h, w, c) keeping the dtype (OpenCV; channel by channel beyond 4 channels)."""
    src = image
    if src.dtype == bool:
        src = src.astype(np.uint8)
    elif src.dtype.kind in "ui" and src.dtype not in (np.uint8, np.uint16, np.int16):
        src = src.astype(np.float32)
    elif src.dtype == np.float16:
        src = src.astype(np.float32)
    src = np.ascontiguousarray(src)
    c = src.shape[2]
    if c <= 4:
        out = cv2.resize(src, (w, h), interpolation=cv2.INTER_LINEAR).reshape(h, w, c)
    else:
        out = np.stack([cv2.resize(np.ascontiguousarray(src[:, :, i]), (w, h), interpolation=cv2.INTER_LINEAR)
                        for i in range(c)], axis=-1)
    return out if out.dtype == image.dtype else _to_dtype(out, image.dtype)


def _crop_or_pad(a, h, w, oy, ox, fill):
    """Bring ``a`` (first two axes) to (h, w): crop at offset (oy, ox) where larger, pad where smaller."""
    ah, aw = a.shape[:2]
    if ah >= h:
        a = a[oy:oy + h]
        py = 0
    else:
        py = oy
    if aw >= w:
        a = a[:, ox:ox + w]
        px = 0
    else:
        px = ox
    if a.shape[:2] == (h, w):
        return a
    out = np.full((h, w) + a.shape[2:], fill, dtype=a.dtype)
    out[py:py + a.shape[0], px:px + a.shape[1]] = a
    return out


# ------------------------------------------------------------------------------------------ photometric
class HSVShift(Augmentation):
    """Random hue rotation and saturation / value scaling of an RGB uint8 image (masks untouched).

    Parameters
    ----------
    h : float
        Largest hue shift, as a fraction of the colour circle (0.05 = 18°); drawn in ``[-h, h]``.
    s, v : float
        Largest relative change of saturation and value: each is multiplied by a factor drawn in
        ``[1 - s, 1 + s]`` (``[1 - v, 1 + v]``).
    p : float
        Probability of applying it.
    """

    def __init__(self, h=0.02, s=0.1, v=0.1, p=1.0):
        self.h = _check_nonneg("HSVShift", "h", h)
        self.s = _check_nonneg("HSVShift", "s", s)
        self.v = _check_nonneg("HSVShift", "v", v)
        self.p = _check_prob("HSVShift", p)

    def _apply(self, image, masks, rng):
        image = _rgb_uint8(image, "HSVShift")
        dh = rng.uniform(-self.h, self.h) * 360.0
        fs, fv = rng.uniform(1 - self.s, 1 + self.s), rng.uniform(1 - self.v, 1 + self.v)
        hsv = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2HSV)
        hsv[..., 0] = np.mod(hsv[..., 0] + np.float32(dh), 360.0)
        hsv[..., 1] = np.clip(hsv[..., 1] * np.float32(fs), 0, 1)
        hsv[..., 2] = np.clip(hsv[..., 2] * np.float32(fv), 0, 1)
        rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * np.float32(255)
        return _to_dtype(rgb, np.uint8), masks


class Brightness(Augmentation):
    """Add a random offset, drawn in ``[-delta, delta]`` times full scale (255 for uint8), to every pixel.

    Works on any dtype (integers are rounded and clipped to their range; floats assume a 0-1 scale and are
    clipped to it). Masks are untouched.
    """

    def __init__(self, delta=0.1, p=1.0):
        self.delta = _check_nonneg("Brightness", "delta", delta)
        self.p = _check_prob("Brightness", p)

    def _apply(self, image, masks, rng):
        scale = _full_scale(image.dtype)
        b = rng.uniform(-self.delta, self.delta) * scale
        out = image.astype(np.float32) + np.float32(b)
        if image.dtype.kind == "f":
            return np.clip(out, 0.0, 1.0).astype(image.dtype), masks
        return _to_dtype(out, image.dtype), masks


class Contrast(Augmentation):
    """Scale the distance of every pixel to the image's mean by a factor in ``[1 - delta, 1 + delta]``.

    The mean is taken per channel, so the average colour is kept. Works on any dtype; masks are untouched.
    """

    def __init__(self, delta=0.1, p=1.0):
        self.delta = _check_nonneg("Contrast", "delta", delta)
        self.p = _check_prob("Contrast", p)

    def _apply(self, image, masks, rng):
        f = rng.uniform(1 - self.delta, 1 + self.delta)
        img = image.astype(np.float32)
        mean = img.reshape(-1, img.shape[2]).mean(axis=0)
        out = (img - mean) * np.float32(f) + mean
        if image.dtype.kind == "f":
            return np.clip(out, 0.0, 1.0).astype(image.dtype), masks
        return _to_dtype(out, image.dtype), masks


class StainAugment(Augmentation):
    """Random perturbation of H&E stain concentrations (Tellez et al. 2018), masks untouched.

    The image's stain matrix is estimated by Macenko's method
    (:func:`histoflow.transforms.stain.estimate_stain_matrix_macenko`); on a tile with too little tissue
    (background, a few cells) the reference matrix is used instead, without raising. Then, per stain,
    ``alpha ~ U(1 - sigma1, 1 + sigma1)``, ``beta ~ U(-sigma2, sigma2)`` and the concentrations become
    ``C * alpha + beta`` (:func:`histoflow.transforms.stain.augment_stains`; glass is kept as glass).
    ``sigma1 = sigma2 = 0`` is the identity up to rounding.

    Parameters
    ----------
    sigma1, sigma2 : float
        Ranges of the multiplicative and additive perturbations.
    stain_matrix : (2, 3) array, optional
        A fixed H&E matrix (rows H, E) instead of the per-image estimate (faster; e.g. the slide's).
    background_intensity : float
        Glass intensity of the optical density.
    p : float
        Probability of applying it.
    """

    def __init__(self, sigma1=0.1, sigma2=0.1, stain_matrix=None, background_intensity=245, p=1.0):
        from ..transforms.stain import _checked_he_matrix

        self.sigma1 = _check_nonneg("StainAugment", "sigma1", sigma1)
        self.sigma2 = _check_nonneg("StainAugment", "sigma2", sigma2)
        if stain_matrix is not None:  # unit rows, hematoxylin first; zero, negative or equal rows refused
            try:
                stain_matrix = _checked_he_matrix(stain_matrix, "StainAugment: stain_matrix")[0]
            except ValueError as e:
                raise AugmentError(str(e)) from None
        self.stain_matrix = stain_matrix
        self.background_intensity = _check_background("StainAugment", background_intensity)
        self.p = _check_prob("StainAugment", p)

    def matrix(self, image):
        """The stain matrix used for ``image``: the fixed one, the image's own, or the reference."""
        from ..transforms import stain as S

        if self.stain_matrix is not None:
            return self.stain_matrix
        if S._enough_tissue(image, self.background_intensity, S._StainFitMixin.beta):
            try:
                return S.estimate_stain_matrix_macenko(image, self.background_intensity,
                                                       beta=S._StainFitMixin.beta)
            except S.StainEstimationError:
                pass
        return S.REFERENCE_STAIN_MATRIX

    def _apply(self, image, masks, rng):
        from ..transforms.stain import augment_stains

        image = _rgb_uint8(image, "StainAugment")
        alpha = rng.uniform(1 - self.sigma1, 1 + self.sigma1, 2)
        beta = rng.uniform(-self.sigma2, self.sigma2, 2)
        image = np.ascontiguousarray(image)
        return augment_stains(image, alpha, beta, self.matrix(image), self.background_intensity), masks


class RandStainNA(Augmentation):
    """Random stain normalisation (RandStainNA, Shen et al., MICCAI 2022), masks untouched.

    Each call draws a virtual template, the mean and standard deviation of CIELAB ``L*, a*, b*``, from
    normal distributions fitted to the training images (:meth:`fit`), and moves the image to it by
    Reinhard's colour transfer (:func:`histoflow.transforms.stain.reinhard_normalize`; glass stays glass).
    The network sees the training set's range of stainings, centred where the training set is, instead of
    the perturbations around each image's own staining that :class:`StainAugment` makes. A tile with too
    little tissue for its statistics (background) is returned unchanged.

    Parameters
    ----------
    means, means_sd : (3,) float
        Mean and standard deviation, over the training images, of each image's mean ``L*, a*, b*``.
    stds, stds_sd : (3,) float
        The same for each image's standard deviation of ``L*, a*, b*``.
    spread : float
        Multiplies both standard deviations (the paper's ``std_hyper`` is an additive version of it):
        0 always normalises to the mean template, larger values draw templates further out.
    p : float
        Probability of applying it.
    luminosity_threshold : float
        Tissue pixels, whose statistics are matched: CIELAB ``L / 100`` below this (as in :meth:`fit`).
    """

    def __init__(self, means, means_sd, stds, stds_sd, spread=1.0, p=1.0, luminosity_threshold=0.8):
        vals = {}
        for name, v in (("means", means), ("means_sd", means_sd), ("stds", stds), ("stds_sd", stds_sd)):
            a = np.asarray(v, np.float64)
            if a.shape != (3,) or not np.all(np.isfinite(a)):
                raise AugmentError(f"RandStainNA: {name} must be 3 finite numbers (L*, a*, b*), got {v!r}")
            vals[name] = a
        if np.any(vals["stds"] <= 0) or np.any(vals["means_sd"] < 0) or np.any(vals["stds_sd"] < 0):
            raise AugmentError("RandStainNA: stds must be > 0 and the standard deviations >= 0")
        self.means, self.means_sd = vals["means"], vals["means_sd"]
        self.stds, self.stds_sd = vals["stds"], vals["stds_sd"]
        self.spread = _check_nonneg("RandStainNA", "spread", spread)
        self.p = _check_prob("RandStainNA", p)
        if isinstance(luminosity_threshold, bool) or not isinstance(luminosity_threshold, (int, float, np.number)) \
                or not 0 < luminosity_threshold <= 1:
            raise AugmentError(f"RandStainNA: luminosity_threshold is the lightness (0..1] below which a pixel is "
                               f"tissue, got {luminosity_threshold!r}")
        self.luminosity_threshold = float(luminosity_threshold)

    @classmethod
    def fit(cls, images, spread=1.0, p=1.0, luminosity_threshold=0.8):
        """Fit the template distributions to RGB uint8 images (e.g. the training images or tiles of them);
        images with too little tissue are left out. Raises AugmentError when fewer than 2 images remain."""
        from ..transforms.stain import StainEstimationError, lab_stats

        ms, ss = [], []
        for im in images:
            try:
                m, s = lab_stats(_rgb_uint8(np.asarray(im), "RandStainNA.fit"),
                                 luminosity_threshold=luminosity_threshold)
            except StainEstimationError:
                continue
            ms.append(m)
            ss.append(s)
        if len(ms) < 2:
            raise AugmentError(f"RandStainNA.fit: {len(ms)} of the images have enough tissue for their colour "
                               "statistics; need at least 2")
        ms, ss = np.array(ms), np.array(ss)
        return cls(ms.mean(0), ms.std(0), ss.mean(0), ss.std(0), spread=spread, p=p,
                   luminosity_threshold=luminosity_threshold)

    def _apply(self, image, masks, rng):
        from ..transforms.stain import StainEstimationError, lab_stats, reinhard_normalize

        image = _rgb_uint8(image, "RandStainNA")
        means = rng.normal(self.means, self.means_sd * self.spread)
        stds = np.maximum(rng.normal(self.stds, self.stds_sd * self.spread), 0.25 * self.stds)
        try:
            sm, ss = lab_stats(image, luminosity_threshold=self.luminosity_threshold)
        except StainEstimationError:  # background: nothing to move
            return image, masks
        return reinhard_normalize(np.ascontiguousarray(image), means, stds, sm, ss,
                                  luminosity_threshold=self.luminosity_threshold), masks


class Blur(Augmentation):
    """Gaussian blur of random strength, as a slide scanned slightly out of focus (masks untouched).

    ``sigma`` is drawn in ``[0, max_sigma]`` pixels; each channel is blurred alike (borders reflected).
    HoVer-Net's training blurs its inputs this way (Graham et al. 2019, kernels up to 3 px). Works on any
    dtype and channel count.

    Parameters
    ----------
    max_sigma : float
        Largest standard deviation, in pixels of the image.
    p : float
        Probability of applying it.
    """

    def __init__(self, max_sigma=1.0, p=1.0):
        self.max_sigma = _check_nonneg("Blur", "max_sigma", max_sigma)
        self.p = _check_prob("Blur", p)

    def _apply(self, image, masks, rng):
        sigma = rng.uniform(0.0, self.max_sigma)
        if sigma < 0.2:  # neighbours would weigh < 1e-5: nothing changes after rounding
            return image, masks
        img = np.ascontiguousarray(image, dtype=np.float32)
        out = cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT_101)
        out = out.reshape(image.shape)  # OpenCV drops a single channel axis
        if image.dtype.kind == "f":
            return out.astype(image.dtype), masks
        return _to_dtype(out, image.dtype), masks


class GaussianNoise(Augmentation):
    """Add zero-mean Gaussian noise, its standard deviation drawn in ``[0, sigma]`` times full scale.

    Full scale is 255 for uint8 (so ``sigma=0.02`` is up to about 5 grey levels), 65535 for uint16, 1.0 for
    floats; the result is rounded and clipped to the dtype's range. Masks are untouched.
    """

    def __init__(self, sigma=0.02, p=1.0):
        self.sigma = _check_nonneg("GaussianNoise", "sigma", sigma)
        self.p = _check_prob("GaussianNoise", p)

    def _apply(self, image, masks, rng):
        sd = rng.uniform(0.0, self.sigma) * _full_scale(image.dtype)
        out = image.astype(np.float32) + rng.normal(0.0, sd, image.shape).astype(np.float32)
        if image.dtype.kind == "f":
            return np.clip(out, 0.0, 1.0).astype(image.dtype), masks
        return _to_dtype(out, image.dtype), masks


def _check_background(who, v):
    """The glass intensity of an optical-density conversion: a number in (0, 256], as the stain steps take it."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not 0 < v <= 256:
        raise AugmentError(f"{who}: background_intensity is the glass's intensity, a number in (0, 256] (e.g. 245), "
                           f"got {v!r}")
    return float(v)


# ------------------------------------------------------------------------------------------ Compose
class Compose:
    """Apply operations in order, with one random generator.

    Parameters
    ----------
    ops : sequence of callables
        Each ``op(image, masks, rng) -> (image, masks)`` (the classes of this module, or your own).
    seed : int, optional
        Seed of the generator used when no ``rng`` is passed. Once torch is imported, the generator is made
        from ``[seed, torch.initial_seed()]`` (None counts as 0) and made again whenever torch is seeded again
        or in each PyTorch DataLoader worker: workers never repeat one another's draws (a generator copied into
        forked workers would), draws differ between epochs, and ``torch.manual_seed`` (or the DataLoader's
        ``generator``) makes them reproducible; the trainer seeds torch at each epoch, so a run resumed at an
        epoch draws what the run that went through drew. So with torch imported, call ``torch.manual_seed``
        for the same draws in every run (torch's own seed is random at start-up), and give two
        ``Compose`` objects different seeds for different draws. Without torch the generator is
        ``numpy.random.default_rng(seed)`` (None: fresh OS entropy). The datasets of
        :mod:`histoflow.ml.data` instead pass each item a generator keyed on (seed, epoch, item): the same
        draws whatever the workers, and new ones only when ``dataset.set_epoch(epoch)`` is called each epoch.

    Calling
    -------
    ``compose(sample)`` with a dict holding ``"image"`` and optionally ``"masks"`` returns a new dict
    with those replaced (other keys are passed through): the ``transform`` of the datasets in
    :mod:`histoflow.ml.data`. ``compose.apply(image, masks, rng)`` is the array form.
    """

    def __init__(self, ops, seed=None):
        ops = list(ops)
        for op in ops:
            if not callable(op):
                raise AugmentError(f"Compose: every operation must be callable, got {op!r}")
        self.ops = ops
        self.seed = seed
        self._state = None  # (process key, generator)

    def _generator(self):
        # keyed by torch's seed when torch is in use: each DataLoader worker has its own, and the trainer
        # seeds torch at every epoch, so the draws of an epoch are the same in a run resumed at that epoch
        torch = sys.modules.get("torch")
        key = (os.getpid(), int(torch.initial_seed()) if torch is not None else None)
        if self._state is None or self._state[0] != key:
            if key[1] is not None:
                entropy = [int(self.seed or 0) & 0xFFFFFFFFFFFFFFFF, key[1] & 0xFFFFFFFFFFFFFFFF]
                gen = np.random.default_rng(entropy)
            else:
                gen = np.random.default_rng(self.seed)
            self._state = (key, gen)
        return self._state[1]

    def apply(self, image, masks=None, rng=None):
        """Augment arrays: returns ``(image, masks)``; ``rng`` defaults to the generator of ``seed``."""
        rng = self._generator() if rng is None else _rng(rng)
        image, masks = _check(image, masks, "Compose")
        masks = dict(masks)
        for op in self.ops:
            image, masks = op(image, masks, rng)
        return np.ascontiguousarray(image), {k: np.ascontiguousarray(m) for k, m in masks.items()}

    def __call__(self, sample, rng=None):
        if not isinstance(sample, dict) or "image" not in sample:
            raise AugmentError("Compose: expected a sample dict with an 'image' entry (and optionally 'masks'); "
                               "use Compose.apply(image, masks, rng) for arrays")
        image, masks = self.apply(sample["image"], sample.get("masks") or {}, rng)
        out = dict(sample)
        out["image"] = image
        out["masks"] = masks
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_state"] = None
        return state

    def __repr__(self):
        return f"Compose({self.ops!r}, seed={self.seed!r})"

"""Tissue detection and tile labels for brightfield (H&E, IHC) slides.

- :class:`TissueDetectionHE` / :func:`detect_tissue`: the PathML recipe (grey or saturation, median blur,
  threshold, opening, closing, region and hole clean-up), guarded against blank glass; the transform takes
  its Otsu threshold from the slide's thumbnail, not from each tile.
- :class:`TissueDetectionCascade` / :func:`detect_tissue_cascade`: the low-magnification (about 1.25x)
  recipe of the cascaded tumour-segmentation method: HSV saturation above 20, closed with 5x5 then 3x3.
- :class:`LabelWhiteSpaceHE`: is the tile mostly glass?
- :class:`LabelArtifactTileHE`: is the tile dominated by pen ink?
"""
from __future__ import annotations

import cv2
import numpy as np

from ..errors import ParameterError
from .base import Transform, inside_slide, open_sides, outputs_from
from .filters import (_check_bool, _check_name, _check_number, _check_odd_kernel, _check_positive_int,
                      median_blur)
from .intensity import rgb_to_saturation, to_grey
from .morphology import check_reach, foreground_detection, morph_close, morph_open, otsu_threshold

__all__ = [
    "TissueDetectionHE", "TissueDetectionCascade", "LabelWhiteSpaceHE", "LabelArtifactTileHE",
    "detect_tissue", "detect_tissue_cascade", "white_space_fraction", "ink_mask", "ink_fraction",
]

#: blank-glass guards of the Otsu threshold (see :func:`detect_tissue`)
MIN_DYNAMIC_RANGE = 10
MAX_GREY_OTSU = 235
MIN_SATURATION_OTSU = 15
#: a slide-wide Otsu threshold (:meth:`TissueDetectionHE.fit_slide`) is kept only when the thumbnail shows
#: glass: the bright class's median grey at least this, or the pale class's median saturation at most
#: ``GLASS_SATURATION`` (blank glass of real slides: grey 226-244, saturation 3-9; the MoNuSeg fields of
#: view, all tissue: at most grey 206, at least saturation 31)
GLASS_GREY = 215
GLASS_SATURATION = 20


def _grey_uint8(image):
    """Grey image (RGB with OpenCV weights, or the single channel) on the 0-255 scale, uint8."""
    grey = to_grey(image)
    return _to_uint8(grey)


def _to_uint8(a):
    """The 0-255 scale of uint8, uint16 (/ 257) or floats in [0, 1]. Other integers (int64 from ``astype(int)``,
    uint32) are taken as 8- or 16-bit by their values: by their dtype's range, 0-255 values became all 0."""
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.integer):
        top = np.iinfo(a.dtype).max
        if a.dtype != np.uint16 and a.size:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi > 65535:
                raise ParameterError(f"tissue and white-space detection take uint8, uint16 or floats in [0, 1]; "
                                     f"got {a.dtype} values {lo}..{hi}")
            top = 255 if hi <= 255 else 65535
        return np.clip(np.round(a.astype(np.float32) * (255.0 / top)), 0, 255).astype(np.uint8)
    # floats in [0, 1]: NaN (no data, as in PathML's float16 stores) is white glass, not tissue (it was cast to
    # 0, black); 0-255 floats (astype(float)) are refused, as out-of-range integers are (they were all white)
    f = a.astype(np.float32)
    finite = np.isfinite(f)
    hi = float(f[finite].max()) if finite.any() else 0.0
    if hi > 1.5:
        raise ParameterError(f"tissue and white-space detection take uint8, uint16 or floats in [0, 1]; got "
                             f"{a.dtype} values up to {hi:g} (divide floats on the 0-255 scale by 255)")
    f = np.nan_to_num(f, nan=1.0, posinf=1.0, neginf=0.0)
    return np.clip(np.round(f * 255.0), 0, 255).astype(np.uint8)


def _rgb(image, who):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ParameterError(f"{who} needs an RGB image (h, w, 3), got shape {image.shape}")
    return image[:, :, :3]


def _odd(x):
    k = int(round(x))
    if k % 2 == 0:
        k = k + 1 if x >= k else k - 1
    return max(k, 1)


# --------------------------------------------------------------------------- functions on arrays
def detect_tissue(image, use_saturation=False, blur_ksize=17, threshold=None, morph_n_iter=3, morph_k_size=7,
                  min_region_size=5000, max_hole_size=1500, outer_contours_only=False, scale=1.0, open_edges=()):
    """Tissue mask of a brightfield image (the PathML ``TissueDetectionHE`` recipe).

    Steps: one channel (grey, or HSV saturation when ``use_saturation``) -> median blur -> threshold
    (Otsu when ``threshold`` is None; grey keeps the pixels at or below it, since tissue is darker than
    glass, saturation the pixels above it) -> opening -> closing -> :func:`foreground_detection`.

    Blank glass is guarded: Otsu always splits an image in two, so on a tile of glass it would split the
    noise. When Otsu is used and the blurred channel's range is under ``MIN_DYNAMIC_RANGE`` (10) grey levels,
    or Otsu's threshold is above ``MAX_GREY_OTSU`` (235) on grey or below ``MIN_SATURATION_OTSU`` (15) on
    saturation, the mask is all zero.

    Parameters
    ----------
    image : ndarray
        RGB ``(h, w, 3)`` (uint8, or uint16 / float in [0, 1], scaled to 0-255), or one grey channel.
    use_saturation : bool
        Threshold HSV saturation instead of grey.
    blur_ksize : int
        Odd median-blur kernel (1: no blur).
    threshold : float or None
        Fixed threshold on the 0-255 scale; None for Otsu.
    morph_n_iter, morph_k_size : int
        Iterations and odd square kernel of the opening and the closing.
    min_region_size, max_hole_size : int
        Regions smaller than this (pixels) are dropped; holes smaller than this are filled.
    outer_contours_only : bool
        Fill every hole.
    scale : float
        Resolution of ``image`` relative to the one the sizes are meant for: kernels are multiplied by
        ``scale`` (kept odd, at least 1) and areas by ``scale ** 2``. For a slide-level pre-pass on a
        thumbnail ``d`` times smaller than the tiles' level, pass ``scale=1/d``.
    open_edges : sequence of str
        Sides of the image beyond which the slide goes on (a tile's, see
        :func:`~histoflow.transforms.morphology.foreground_detection`): regions touching them are kept
        whatever their size here.

    Returns
    -------
    uint8 ndarray (h, w) of 0 and 1.

    Examples
    --------
    >>> import histoflow
    >>> slide = histoflow.open_slide(path)                                   # doctest: +SKIP
    >>> thumb = slide.thumbnail(512)                                         # doctest: +SKIP
    >>> d = max(slide.dimensions) / max(thumb.shape[:2])                     # doctest: +SKIP
    >>> mask = detect_tissue(thumb, scale=1 / d)                             # doctest: +SKIP
    """
    scale = float(_check_number("detect_tissue", "scale", scale, 0, strict=True))
    if use_saturation:
        channel = rgb_to_saturation(_rgb(image, "detect_tissue(use_saturation=True)"))
    else:
        channel = _grey_uint8(image)
    bk = _odd(_check_odd_kernel("detect_tissue", blur_ksize, param="blur_ksize") * scale)
    mk = _odd(_check_odd_kernel("detect_tissue", morph_k_size, param="morph_k_size") * scale)
    blurred = median_blur(channel, bk) if bk > 1 else channel
    empty = np.zeros(channel.shape, np.uint8)
    if channel.size == 0:  # no pixels (cv2.minMaxLoc would kill the process)
        return empty
    if threshold is None:
        lo, hi = cv2.minMaxLoc(blurred)[:2]
        if hi - lo < MIN_DYNAMIC_RANGE:
            return empty
        t = otsu_threshold(blurred)
        if (not use_saturation and t > MAX_GREY_OTSU) or (use_saturation and t < MIN_SATURATION_OTSU):
            return empty
    else:
        t = float(threshold)
    kind = cv2.THRESH_BINARY if use_saturation else cv2.THRESH_BINARY_INV
    _, mask = cv2.threshold(blurred, np.floor(t), 1, kind)
    if not cv2.countNonZero(mask):  # glass (~40% of a slide's tiles): the morphology would keep it empty
        return mask
    if morph_n_iter > 0 and mk > 1:
        mask = morph_open(mask, mk, morph_n_iter)
        mask = morph_close(mask, mk, morph_n_iter)
    return foreground_detection(mask, min_region_size * scale ** 2, max_hole_size * scale ** 2,
                                outer_contours_only, open_edges)


def detect_tissue_cascade(image, saturation_threshold=20, close_kernel_sizes=(5, 3)):
    """Tissue mask by the recipe of the cascaded tumour-segmentation method, meant for a level near 1.25x:
    HSV saturation (0-255) above ``saturation_threshold``, then a morphological closing with a square
    kernel of each size in turn (5x5 then 3x3).

    Returns
    -------
    uint8 ndarray (h, w) of 0 and 1.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.full((32, 32, 3), 240, np.uint8); img[8:24, 8:24] = (200, 80, 160)
    >>> int(detect_tissue_cascade(img).sum())
    256
    """
    sat = rgb_to_saturation(_rgb(image, "detect_tissue_cascade"))
    _, mask = cv2.threshold(sat, float(np.floor(saturation_threshold)), 1, cv2.THRESH_BINARY)
    for k in close_kernel_sizes:
        mask = morph_close(mask, int(k), 1)
    return mask


def white_space_fraction(image, greyscale_threshold=230):
    """Fraction of pixels whose grey value (0-255 scale) is above ``greyscale_threshold``."""
    grey = _grey_uint8(image)
    return float(np.count_nonzero(grey > greyscale_threshold)) / grey.size if grey.size else 0.0


#: the ink rule's constants, on OpenCV's HSV scale (H 0-179, i.e. degrees / 2; S and V 0-255)
INK_HUE_RANGE = (35, 125)       # 70-250 degrees: green, cyan, blue. H&E lies at 250-360 and 0-40 degrees.
INK_MIN_SATURATION = 60
INK_MIN_VALUE = 30
BLACK_MAX_VALUE = 90            # dark ...
BLACK_MAX_SATURATION = 120      # ... and not strongly coloured (dense nuclei are dark but saturated purple)
BLACK_MAX_VALUE_ANY = 30        # or nearly black whatever the colour
GLASS_MIN_VALUE = 200
GLASS_MAX_SATURATION = 25


def _hsv(image, who):
    rgb = _to_uint8(np.ascontiguousarray(_rgb(image, who)))
    if rgb.size == 0:  # no pixels: OpenCV would raise
        return np.zeros(rgb.shape[:2] + (3,), np.uint8)
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)


def _ink_from_hsv(hsv):
    coloured = cv2.inRange(hsv, (INK_HUE_RANGE[0], INK_MIN_SATURATION, INK_MIN_VALUE),
                           (INK_HUE_RANGE[1], 255, 255))
    black = cv2.inRange(hsv, (0, 0, 0), (180, BLACK_MAX_SATURATION - 1, BLACK_MAX_VALUE - 1))
    very_dark = cv2.inRange(hsv, (0, 0, 0), (180, 255, BLACK_MAX_VALUE_ANY - 1))
    return cv2.bitwise_or(cv2.bitwise_or(coloured, black), very_dark)     # 0 / 255


def ink_mask(image):
    """Pixels that look like pen ink (uint8 0/1 mask).

    On OpenCV's HSV scale (H 0-179, S and V 0-255) a pixel is ink when it is

    - coloured ink: hue in ``INK_HUE_RANGE`` (35-125, i.e. 70-250 degrees: green, cyan, blue), saturation
      at least 60 and value at least 30 — haematoxylin and eosin lie outside this hue range (purple to
      pink, 250-360 and 0-40 degrees);
    - black ink: value below 90 with saturation below 120 (dark but not strongly coloured; dense nuclei are
      dark but saturated purple), or value below 30 whatever the colour.

    Red ink cannot be told from eosin by colour and is not detected.

    Examples
    --------
    >>> import numpy as np
    >>> ink_mask(np.array([[[40, 60, 190], [200, 80, 160], [30, 30, 35]]], np.uint8))
    array([[1, 0, 1]], dtype=uint8)
    """
    return (_ink_from_hsv(_hsv(image, "ink_mask")) // 255).astype(np.uint8)


def ink_fraction(image):
    """``(ink fraction of the tile, ink fraction of the tile's non-glass pixels)``; ink as in
    :func:`ink_mask`, glass is HSV value at least 200 with saturation below 25 (0-255 scale)."""
    hsv = _hsv(image, "ink_fraction")
    n = hsv.shape[0] * hsv.shape[1]
    if n == 0:  # no pixels, no ink
        return 0.0, 0.0
    n_ink = cv2.countNonZero(_ink_from_hsv(hsv))
    n_glass = cv2.countNonZero(cv2.inRange(hsv, (0, 0, GLASS_MIN_VALUE), (180, GLASS_MAX_SATURATION - 1, 255)))
    n_fg = n - n_glass
    return (n_ink / n if n else 0.0), (n_ink / n_fg if n_fg else 0.0)


# --------------------------------------------------------------------------- transforms
class TissueDetectionHE(Transform):
    """Tissue mask of an H&E or IHC tile (PathML recipe, see :func:`detect_tissue`), with one Otsu threshold
    for the whole slide, from its thumbnail, by default (``otsu``), and guarded so that a tile of blank
    glass gives an all-zero mask.

    Parameters
    ----------
    mask_name : str
        Where the 0/1 mask goes (default ``"tissue"``).
    use_saturation : bool
        Threshold HSV saturation instead of grey.
    blur_ksize : int
        Odd median-blur kernel (default 17).
    threshold : float or None
        Fixed threshold (0-255 scale); None for Otsu.
    morph_n_iter, morph_k_size : int
        Opening and closing: iterations (default 3) and odd kernel (default 7).
    min_region_size, max_hole_size : int
        Regions under ``min_region_size`` px are dropped, holes under ``max_hole_size`` px filled.
    outer_contours_only : bool
        Fill every hole.
    working_downsample : int
        Detect at 1/``working_downsample`` of the tile's resolution (area-averaged; kernels and areas
        scaled to match), then enlarge the mask. The default 3 is about 12x faster than full resolution
        (the 17 px median becomes a 5 px one, which OpenCV does quickly, where 7 px and up are slow; the
        grey image is reduced by an exact factor, OpenCV's fast path) and agrees with it on about 98 % of
        the pixels of CMU-1 tiles (boundaries move by a few pixels); use 1 for PathML's
        full-resolution behaviour.
    otsu : {"slide", "tile"}
        Where Otsu's threshold comes from when ``threshold`` is None. ``"slide"`` (default): once per slide,
        from its thumbnail (:meth:`fit_slide`, which slide runs call before the first tile), the same for
        every tile. ``"tile"``: each tile's own, PathML's way. Otsu always splits an image in two, so a
        tile's own threshold splits a tile that is all tissue into its darker and paler parts (PathML then
        calls ~20-70 % of such tiles background, and drops them from "more than 25 % tissue"), and a tile of
        blank glass into noise (guarded here, not in PathML); the thumbnail holds glass and tissue, where
        Otsu finds the line between them. A transform never fitted to a slide (used on a lone tile or
        array) uses each tile's own, as does a slide whose thumbnail shows no glass next to tissue (all
        glass; or all tissue, as a cropped field of view: see ``GLASS_GREY`` / ``GLASS_SATURATION``).

    Attributes
    ----------
    slide_threshold_ : float or None
        The threshold :meth:`fit_slide` found (0-255 scale of the grey or saturation channel), or None
        (each tile's own).

    Examples
    --------
    >>> from histoflow.transforms.base import Pipeline
    >>> from histoflow.transforms.tissue import TissueDetectionHE
    >>> from histoflow.transforms.filters import BoxBlur
    >>> pipe = Pipeline([TissueDetectionHE(), BoxBlur(5, mask_name="tissue")])
    """

    slide_types = ("HE", "IHC")

    def __init__(self, mask_name="tissue", use_saturation=False, blur_ksize=17, threshold=None, morph_n_iter=3,
                 morph_k_size=7, min_region_size=5000, max_hole_size=1500, outer_contours_only=False,
                 working_downsample=3, otsu="slide"):
        name = "TissueDetectionHE"
        self.working_downsample = _check_positive_int(name, "working_downsample", working_downsample, 1)
        if otsu not in ("slide", "tile"):
            raise ParameterError(f"{name}: otsu must be 'slide' (one threshold per slide, from its thumbnail) or "
                                 f"'tile' (each tile's own), got {otsu!r}")
        self.otsu = otsu
        self.slide_threshold_ = None
        self.mask_name = _check_name(name, "mask_name", mask_name)
        self.use_saturation = _check_bool(name, "use_saturation", use_saturation)
        self.blur_ksize = _check_odd_kernel(name, blur_ksize, param="blur_ksize")
        if threshold is not None:  # grey or saturation, 0-255 (outside it every pixel or none is tissue)
            threshold = _check_number(name, "threshold", threshold, 0, maximum=255)
        self.threshold = threshold
        self.morph_n_iter = _check_positive_int(name, "morph_n_iter", morph_n_iter, 0)
        self.morph_k_size = _check_odd_kernel(name, morph_k_size, param="morph_k_size")
        check_reach(name, self.morph_k_size, self.morph_n_iter, "morph_n_iter")
        self.min_region_size = _check_number(name, "min_region_size", min_region_size, 0)
        self.max_hole_size = _check_number(name, "max_hole_size", max_hole_size, 0)
        self.outer_contours_only = _check_bool(name, "outer_contours_only", outer_contours_only)

    masks_out = outputs_from("mask_name")

    #: longer side of the thumbnail :meth:`fit_slide` reads: a threshold needs the histogram, not detail (the
    #: thresholds from 512 and 2048 px thumbnails of the bench's slides differ by 0-4 grey levels; 512 px comes
    #: from a small pyramid level, ~15 ms against ~250-700 ms)
    THUMBNAIL_SIZE = 512

    def fit_slide(self, slide):
        """With ``otsu="slide"`` and no fixed ``threshold``: Otsu's threshold of the slide's thumbnail (the
        grey or saturation channel, median-blurred with the kernel scaled to the thumbnail), kept in
        ``slide_threshold_`` for every tile. None (each tile's own) when the thumbnail shows no glass next
        to tissue."""
        self.slide_threshold_ = None
        if self.threshold is not None or self.otsu != "slide":
            return
        thumb = np.asarray(slide.thumbnail(self.THUMBNAIL_SIZE))
        if thumb.ndim != 3 or thumb.shape[2] not in (3, 4):
            return  # not RGB: the tiles' own thresholds (their error, if any, names the problem)
        thumb = thumb[:, :, :3]
        if self.use_saturation:
            channel = rgb_to_saturation(thumb)
        else:
            channel = _grey_uint8(thumb)
        # the blur kernel is meant for the tiles' pixels; the thumbnail's are d times larger
        d = max(float(slide.dimensions[0]) / channel.shape[1], 1.0)
        k = _odd(self.blur_ksize / d)
        blurred = median_blur(channel, k) if k > 1 else channel
        lo, hi = cv2.minMaxLoc(blurred)[:2]
        if hi - lo < MIN_DYNAMIC_RANGE:
            return
        t = float(otsu_threshold(blurred))
        if self.use_saturation:
            pale = blurred[blurred <= t]
            glass = t >= MIN_SATURATION_OTSU and pale.size and np.median(pale) <= GLASS_SATURATION
        else:
            bright = blurred[blurred > t]
            glass = t <= MAX_GREY_OTSU and bright.size and np.median(bright) >= GLASS_GREY
        if glass:  # else all glass, or all tissue (Otsu then splits the tissue): each tile's own
            self.slide_threshold_ = t

    def _threshold(self):
        if self.threshold is not None:
            return self.threshold
        return self.slide_threshold_ if self.otsu == "slide" else None

    def F(self, image, open_edges=()):
        """The tissue mask of ``image``; ``open_edges``: its sides beyond which the slide goes on (a region
        touching one is kept whatever its size here: see :func:`detect_tissue`)."""
        f = self.working_downsample
        image = np.asarray(image)
        if self.use_saturation:  # checked on the image given, before it is resampled
            _rgb(image, "TissueDetectionHE(use_saturation=True)")
        if image.dtype.kind in "iu" and image.dtype not in (np.uint8, np.uint16):
            image = _to_uint8(image)  # int64 0-255 (astype(int)): OpenCV resamples no such dtype
        h, w = image.shape[:2]
        threshold = self._threshold()
        if f == 1 or min(h, w) < 4 * f:
            return detect_tissue(image, self.use_saturation, self.blur_ksize, threshold, self.morph_n_iter,
                                 self.morph_k_size, self.min_region_size, self.max_hole_size,
                                 self.outer_contours_only, open_edges=open_edges)
        # an exact multiple of f keeps OpenCV's area resampling on its fast integer-factor path
        hh, ww = h // f * f, w // f * f
        crop = np.ascontiguousarray(image[:hh, :ww])
        if not self.use_saturation and (crop.ndim == 2 or crop.shape[2] in (1, 3)):
            crop = _grey_uint8(crop)  # grey first: one channel to resample (grey is linear in RGB)
        elif crop.dtype == np.float16:  # OpenCV cannot resample half floats
            crop = crop.astype(np.float32)
        small = cv2.resize(crop, (ww // f, hh // f), interpolation=cv2.INTER_AREA)
        mask_small = detect_tissue(small, self.use_saturation, self.blur_ksize, threshold, self.morph_n_iter,
                                   self.morph_k_size, self.min_region_size, self.max_hole_size,
                                   self.outer_contours_only, scale=1 / f, open_edges=open_edges)
        if not cv2.countNonZero(mask_small):
            return np.zeros((h, w), np.uint8)
        mask = np.empty((h, w), np.uint8)
        mask[:hh, :ww] = cv2.resize(mask_small, (ww, hh), interpolation=cv2.INTER_NEAREST)
        mask[hh:, :ww] = mask[hh - 1:hh, :ww]  # the rows and columns past the last whole block
        mask[:, ww:] = mask[:, ww - 1:ww]
        return mask

    def apply(self, tile):
        # a tissue region cut by the tile's edge is measured only in part here: kept (4 % of CMU-1's tissue was
        # missing along the seams of 256 px tiles, regions under min_region_size inside one tile)
        tile.masks[self.mask_name] = self.F(tile.image, open_sides(tile))


class TissueDetectionCascade(Transform):
    """Tissue mask by the low-magnification recipe of the cascaded tumour-segmentation method (see
    :func:`detect_tissue_cascade`): HSV saturation above ``saturation_threshold``, closed 5x5 then 3x3.
    Meant for tiles or thumbnails near 1.25x.

    Parameters
    ----------
    mask_name : str
        Where the 0/1 mask goes (default ``"tissue"``).
    saturation_threshold : float
        On the 0-255 scale (default 20).
    close_kernel_sizes : sequence of int
        Square closings applied in turn (default ``(5, 3)``).

    Examples
    --------
    >>> from histoflow.transforms.tissue import TissueDetectionCascade
    >>> TissueDetectionCascade().apply(tile)        # doctest: +SKIP
    """

    slide_types = ("HE", "IHC")

    def __init__(self, mask_name="tissue", saturation_threshold=20, close_kernel_sizes=(5, 3)):
        name = "TissueDetectionCascade"
        self.mask_name = _check_name(name, "mask_name", mask_name)
        self.saturation_threshold = _check_number(name, "saturation_threshold", saturation_threshold, 0)
        if self.saturation_threshold >= 255:  # no saturation exceeds it: nothing would be tissue
            raise ParameterError(f"{name}: saturation_threshold is on the 0-255 scale and must be below 255, got "
                                 f"{saturation_threshold!r}")
        if not isinstance(close_kernel_sizes, (list, tuple)):
            raise ParameterError(f"{name}: close_kernel_sizes must be a list of odd integers, "
                                 f"got {close_kernel_sizes!r}")
        self.close_kernel_sizes = tuple(_check_odd_kernel(name, k, param="close_kernel_sizes") for k in close_kernel_sizes)

    masks_out = outputs_from("mask_name")

    def F(self, image):
        return detect_tissue_cascade(image, self.saturation_threshold, self.close_kernel_sizes)

    def apply(self, tile):
        tile.masks[self.mask_name] = self.F(tile.image)


class LabelWhiteSpaceHE(Transform):
    """Label a tile as white space (PathML semantics): True when the fraction of pixels whose grey value is
    above ``greyscale_threshold`` exceeds ``proportion_threshold``.

    Parameters
    ----------
    label_name : str
        Where the bool label goes (default ``"white_space"``).
    proportion_threshold : float
        In [0, 1] (default 0.9).
    greyscale_threshold : float
        Grey level on the 0-255 scale (default 230).

    Examples
    --------
    >>> from histoflow.transforms.tissue import LabelWhiteSpaceHE
    >>> LabelWhiteSpaceHE().apply(tile); tile.labels["white_space"]       # doctest: +SKIP
    False
    """

    slide_types = ("HE", "IHC")

    def __init__(self, label_name="white_space", proportion_threshold=0.9, greyscale_threshold=230):
        name = "LabelWhiteSpaceHE"
        self.label_name = _check_name(name, "label_name", label_name)
        self.proportion_threshold = _check_number(name, "proportion_threshold", proportion_threshold, 0)
        if self.proportion_threshold >= 1:  # the white fraction must exceed it: 1 never can
            raise ParameterError(f"{name}: proportion_threshold must be in [0, 1), got {proportion_threshold!r}")
        self.greyscale_threshold = _check_number(name, "greyscale_threshold", greyscale_threshold, 0)
        if self.greyscale_threshold >= 255:  # a pixel is white above it: nothing is above 255
            raise ParameterError(f"{name}: greyscale_threshold is on the 0-255 scale and must be below 255, got "
                                 f"{greyscale_threshold!r}")

    labels_out = outputs_from("label_name")

    def F(self, image):
        return bool(white_space_fraction(image, self.greyscale_threshold) > self.proportion_threshold)

    def apply(self, tile):
        tile.labels[self.label_name] = bool(self.F(inside_slide(tile)))  # not an edge tile's fill


class LabelArtifactTileHE(Transform):
    """Label a tile dominated by pen ink.

    A pixel is ink by the colour rule of :func:`ink_mask` (green/cyan/blue hues with saturation, or
    black). The tile is labelled True when ink covers at least ``min_ink_fraction`` of the tile **and** at
    least ``proportion_threshold`` of its non-glass pixels (glass: HSV value >= 200 and saturation < 25).
    Red ink is not detected (it has the colour of eosin).

    Parameters
    ----------
    label_name : str
        Where the bool label goes (default ``"artifact"``).
    proportion_threshold : float
        Share of the non-glass pixels that must be ink (default 0.25).
    min_ink_fraction : float
        Share of the whole tile that must be ink (default 0.05), so a fleck of dye or a few dark specks on glass are not
        enough.

    Examples
    --------
    >>> from histoflow.transforms.tissue import LabelArtifactTileHE
    >>> LabelArtifactTileHE().apply(tile); tile.labels["artifact"]       # doctest: +SKIP
    False
    """

    slide_types = ("HE", "IHC")

    def __init__(self, label_name="artifact", proportion_threshold=0.25, min_ink_fraction=0.05):
        name = "LabelArtifactTileHE"
        self.label_name = _check_name(name, "label_name", label_name)
        self.proportion_threshold = _check_number(name, "proportion_threshold", proportion_threshold, 0)
        self.min_ink_fraction = _check_number(name, "min_ink_fraction", min_ink_fraction, 0)
        for p in ("proportion_threshold", "min_ink_fraction"):
            if getattr(self, p) > 1:
                raise ParameterError(f"{name}: {p} must be in [0, 1], got {getattr(self, p)!r}")

    labels_out = outputs_from("label_name")

    def F(self, image):
        of_tile, of_foreground = ink_fraction(image)
        return bool(of_tile >= self.min_ink_fraction and of_foreground >= self.proportion_threshold)

    def apply(self, tile):
        tile.labels[self.label_name] = bool(self.F(inside_slide(tile)))  # not an edge tile's fill

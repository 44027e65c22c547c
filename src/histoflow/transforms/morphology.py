"""Binary masks: thresholding, morphological opening and closing, and foreground clean-up.

Masks are ``uint8`` arrays of 0 and 1, shape ``(h, w)``. The mask transforms read and write the named mask
in place (``masks_in == masks_out == (mask_name,)``); :class:`BinaryThreshold` makes one from the image.
"""
from __future__ import annotations

import cv2
import numpy as np

from ..errors import MaskError, ParameterError
from .base import Transform, mask_on_inside, open_sides, outputs_from
from .filters import (MAX_KERNEL, _check_bool, _check_name, _check_number, _check_odd_kernel,
                      _check_positive_int)
from .intensity import to_grey

__all__ = [
    "BinaryThreshold", "MorphOpen", "MorphClose", "ForegroundDetection",
    "binary_threshold", "otsu_threshold", "morph_open", "morph_close", "foreground_detection",
]


# --------------------------------------------------------------------------- functions on arrays
def _as_mask(mask):
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim != 2:
        raise ParameterError(f"a mask must be (h, w), got shape {mask.shape}")
    if mask.dtype != np.uint8:
        mask = (mask != 0).astype(np.uint8)
    return np.ascontiguousarray(mask)


def otsu_threshold(grey):
    """Otsu's threshold of a grey image: pixels ``> t`` are the bright class.

    uint8 and uint16 use OpenCV (an integer ``t``); other dtypes use
    :func:`skimage.filters.threshold_otsu`.

    Examples
    --------
    >>> import numpy as np
    >>> g = np.array([[10, 12, 200, 210]], np.uint8)
    >>> 12 <= otsu_threshold(g) < 200
    True
    """
    grey = np.ascontiguousarray(grey)
    if grey.dtype.kind == "f" and not np.isfinite(grey).all():
        grey = grey[np.isfinite(grey)]  # the finite pixels' threshold (NaN is no data: in neither class)
    if grey.size == 0 or grey.min() == grey.max():
        return 0.0  # one grey level: no two classes; OpenCV's answer, for every dtype alike
    if grey.dtype in (np.uint8, np.uint16):
        t, _ = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        return float(t)
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(grey))


def binary_threshold(image, use_otsu=True, threshold=0, inverse=False, channel=None, return_threshold=False):
    """A 0/1 mask of the grey pixels above a threshold (or at most it when ``inverse``).

    Parameters
    ----------
    image : ndarray
        ``(h, w)`` or ``(h, w, c)``: one channel is used as is, three are RGB converted to grey (OpenCV
        weights), otherwise ``channel`` picks one.
    use_otsu : bool
        Choose the threshold with Otsu's method (``threshold`` is then ignored).
    threshold : float
        Fixed threshold: mask is ``grey > threshold``.
    inverse : bool
        Mask ``grey <= threshold`` instead (e.g. tissue darker than glass).
    channel : int or None
        Channel to threshold.
    return_threshold : bool
        Also return the threshold used.

    Returns
    -------
    mask : uint8 ndarray (h, w) of 0 and 1, and the threshold when ``return_threshold``.

    Examples
    --------
    >>> import numpy as np
    >>> binary_threshold(np.array([[10, 12, 200, 210]], np.uint8))
    array([[0, 0, 1, 1]], dtype=uint8)
    """
    grey = np.ascontiguousarray(to_grey(image, channel))
    t = otsu_threshold(grey) if use_otsu else float(threshold)
    if grey.dtype in (np.uint8, np.uint16, np.float32, np.float64, np.int16):
        kind = cv2.THRESH_BINARY_INV if inverse else cv2.THRESH_BINARY
        # cv2 compares in the image's type: for integers ``> t`` equals ``> floor(t)``
        tt = np.floor(t) if np.issubdtype(grey.dtype, np.integer) else t
        _, mask = cv2.threshold(grey, tt, 1, kind)
        mask = mask.astype(np.uint8, copy=False)
    else:
        mask = ((grey <= t) if inverse else (grey > t)).astype(np.uint8)
    return (mask, t) if return_threshold else mask


def check_reach(name, kernel_size, n_iterations, param="n_iterations"):
    """``n_iterations`` of a ``kernel_size`` square kernel act as one kernel of side (k - 1) n + 1 (OpenCV makes
    that kernel): kept within the kernels' bound, :data:`~histoflow.transforms.filters.MAX_KERNEL` (100,000
    iterations of a 5 px kernel asked OpenCV for 160 GB)."""
    side = (int(kernel_size) - 1) * int(n_iterations) + 1
    if side > MAX_KERNEL:
        raise ParameterError(f"{name}: {param}={n_iterations} of a {kernel_size} px kernel reach as far as one "
                             f"{side} px kernel; at most {MAX_KERNEL} px (n <= {(MAX_KERNEL - 1) // max(1, int(kernel_size) - 1)})")
    return n_iterations


def morph_open(mask, kernel_size=5, n_iterations=1):
    """Morphological opening (erode then dilate, ``n_iterations`` times each) with a square kernel:
    removes specks and thin bridges narrower than the kernel.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.zeros((20, 20), np.uint8); m[2:12, 2:12] = 1; m[15, 15] = 1
    >>> int(morph_open(m, 3).sum())
    100
    """
    k = _check_odd_kernel("morph_open", kernel_size)
    n = check_reach("morph_open", k, _check_positive_int("morph_open", "n_iterations", n_iterations))
    mask = _as_mask(mask)
    if mask.size == 0:  # no pixels (OpenCV would raise)
        return mask.copy()
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((k, k), np.uint8), iterations=n)


def morph_close(mask, kernel_size=5, n_iterations=1):
    """Morphological closing (dilate then erode, ``n_iterations`` times each) with a square kernel:
    fills gaps and pin-holes narrower than the kernel.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.ones((20, 20), np.uint8); m[10, 10] = 0
    >>> int(morph_close(m, 3).min())
    1
    """
    k = _check_odd_kernel("morph_close", kernel_size)
    n = check_reach("morph_close", k, _check_positive_int("morph_close", "n_iterations", n_iterations))
    mask = _as_mask(mask)
    if mask.size == 0:  # no pixels (OpenCV would raise)
        return mask.copy()
    return cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8), iterations=n)


_EDGES = {"left": lambda a: a[:, 0], "top": lambda a: a[0], "right": lambda a: a[:, -1],
          "bottom": lambda a: a[-1]}


def _check_edges(edges) -> tuple:
    if isinstance(edges, str):
        edges = (edges,)
    edges = tuple(edges or ())
    bad = [e for e in edges if e not in _EDGES]
    if bad:
        raise ParameterError(f"open_edges must name sides among {sorted(_EDGES)}, got {bad!r}")
    return edges


def foreground_detection(mask, min_region_size=5000, max_hole_size=1500, outer_contours_only=False,
                         open_edges=()):
    """Keep the large regions of a mask and fill their small holes.

    Regions are 8-connected groups of 1s; one smaller than ``min_region_size`` pixels is removed, unless it
    touches a side named in ``open_edges`` (``"left"``, ``"top"``, ``"right"``, ``"bottom"``: sides beyond
    which the image goes on, as a slide's tile has neighbours; the region's size is unknown there). Holes
    are 4-connected groups of 0s that do not touch the mask's border (a group touching the border may
    continue outside the tile, so it is never a hole); one smaller than ``max_hole_size`` pixels is
    filled, or every one when ``outer_contours_only``.

    Returns
    -------
    uint8 ndarray (h, w) of 0 and 1.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.zeros((40, 40), np.uint8); m[5:35, 5:35] = 1; m[10:13, 10:13] = 0; m[0, 0] = 1
    >>> out = foreground_detection(m, min_region_size=10, max_hole_size=20)
    >>> int(out[0, 0]), int(out[11, 11])
    (0, 1)
    """
    mask = _as_mask(mask)
    edges = _check_edges(open_edges)
    binary = (mask != 0).astype(np.uint8)
    if binary.size == 0:  # no pixels (OpenCV would raise)
        return binary
    # A mask of one value needs no labelling (on tiles, glass and tissue interiors: ~half of them): all 0 has no
    # region and no hole (its one group of 0s touches the border); all 1 is one region and no hole.
    ones = cv2.countNonZero(binary)
    if ones == 0:
        return binary
    if ones == binary.size:
        return binary if min_region_size <= 1 or ones >= min_region_size or edges else np.zeros_like(binary)
    # Areas by bincount of the labels: OpenCV's statistics (boxes, centroids) took ~3x the labelling's time
    if min_region_size > 1:
        n, labels = cv2.connectedComponents(binary, connectivity=8, ltype=cv2.CV_32S)
        keep = np.bincount(labels.ravel(), minlength=n) >= min_region_size
        for side in edges:  # (a tissue region cut by a tile's edge was dropped: 4 % of
            keep[_EDGES[side](labels)] = True  # a slide's tissue missing along the seams of 256 px tiles)
        keep[0] = False
        if not keep[1:].all():
            binary = keep.astype(np.uint8)[labels]
    if outer_contours_only or max_hole_size > 0:
        holes = 1 - binary
        n, labels = cv2.connectedComponents(holes, connectivity=4, ltype=cv2.CV_32S)
        fill = np.ones(n, bool) if outer_contours_only else np.bincount(labels.ravel(), minlength=n) < max_hole_size
        fill[0] = False  # label 0 is the foreground
        # a group of background pixels touching the border is not a hole
        for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
            fill[edge] = False
        if fill.any():
            binary = binary | fill.astype(np.uint8)[labels]
    return binary


# --------------------------------------------------------------------------- transforms
class BinaryThreshold(Transform):
    """Threshold the grey image into a 0/1 mask.

    The grey image is the image itself if it has one channel, RGB converted with OpenCV's weights if it
    has three, or channel ``channel``.

    Parameters
    ----------
    mask_name : str
        Where the mask goes (default ``"binary_threshold"``).
    use_otsu : bool
        Otsu's threshold, per tile (default True); otherwise ``threshold``.
    threshold : float
        Fixed threshold (mask is ``grey > threshold``).
    inverse : bool
        Mask the dark pixels (``grey <= threshold``) instead.
    channel : int or None
        Channel to threshold (needed for images of 2 or more than 4 channels).

    Examples
    --------
    >>> from histoflow.transforms.morphology import BinaryThreshold
    >>> BinaryThreshold(mask_name="nuclei", channel=0).apply(tile)    # doctest: +SKIP
    """

    def __init__(self, mask_name="binary_threshold", use_otsu=True, threshold=0, inverse=False, channel=None):
        self.mask_name = _check_name("BinaryThreshold", "mask_name", mask_name)
        self.use_otsu = _check_bool("BinaryThreshold", "use_otsu", use_otsu)
        self.threshold = _check_number("BinaryThreshold", "threshold", threshold)
        self.inverse = _check_bool("BinaryThreshold", "inverse", inverse)
        if channel is not None:
            channel = _check_positive_int("BinaryThreshold", "channel", channel, 0)
        self.channel = channel

    masks_out = outputs_from("mask_name")

    def F(self, image):
        return binary_threshold(image, self.use_otsu, self.threshold, self.inverse, self.channel)

    def apply(self, tile):
        # an edge tile's fill is not thresholded (Otsu over it split the fill from the slide, not the slide)
        tile.masks[self.mask_name] = mask_on_inside(tile, self.F)


class _MaskTransform(Transform, register=False):
    """Reads the mask ``mask_name`` and replaces it."""

    @property
    def masks_in(self):
        return (self.mask_name,)

    masks_out = outputs_from("mask_name")

    def apply(self, tile):
        if self.mask_name not in tile.masks:
            raise MaskError(f"{type(self).__name__}: tile has no mask {self.mask_name!r} "
                           f"(masks: {sorted(tile.masks) or 'none'})")
        _refuse_labels(type(self).__name__, self.mask_name, tile.masks[self.mask_name])
        tile.masks[self.mask_name] = self.F(tile.masks[self.mask_name])


def _refuse_labels(who, name, mask):
    """A mask of more than two values (an instance or class label image) is not a 0/1 mask: the morphology
    made it one blob (481 nuclei became one mask of 1 while the tile still counted 481)."""
    m = np.asarray(mask)
    if m.size == 0 or m.dtype == np.bool_ or m.dtype.kind not in "iuf":
        return
    top = m.max()
    if not top > 1:
        return
    if ((m != 0) & (m != top)).any():  # 0/1 and 0/255 masks (or one value) are masks; a third value is not
        values = np.unique(m)
        raise MaskError(f"{who}: mask {name!r} holds {len(values)} values up to {top} (instance or class labels?); "
                        f"{who} works on 0/1 masks and would turn it into one: threshold it first, or apply "
                        "it to a 0/1 mask")


class MorphOpen(_MaskTransform):
    """Morphological opening of a mask, in place (square kernel): removes specks smaller than the kernel.

    Parameters
    ----------
    mask_name : str
        The mask to open.
    kernel_size : int
        Odd side of the square kernel (default 5).
    n_iterations : int
        Erosions, then as many dilations (default 1).

    Examples
    --------
    >>> from histoflow.transforms.base import Pipeline
    >>> from histoflow.transforms.morphology import BinaryThreshold, MorphOpen
    >>> pipe = Pipeline([BinaryThreshold(mask_name="tissue", inverse=True), MorphOpen("tissue")])
    """

    def __init__(self, mask_name, kernel_size=5, n_iterations=1):
        self.mask_name = _check_name("MorphOpen", "mask_name", mask_name)
        self.kernel_size = _check_odd_kernel("MorphOpen", kernel_size)
        self.n_iterations = check_reach("MorphOpen", self.kernel_size,
                                        _check_positive_int("MorphOpen", "n_iterations", n_iterations))

    def F(self, mask):
        return morph_open(mask, self.kernel_size, self.n_iterations)


class MorphClose(_MaskTransform):
    """Morphological closing of a mask, in place (square kernel): fills gaps smaller than the kernel.

    Parameters
    ----------
    mask_name : str
        The mask to close.
    kernel_size : int
        Odd side of the square kernel (default 5).
    n_iterations : int
        Dilations, then as many erosions (default 1).

    Examples
    --------
    >>> from histoflow.transforms.morphology import MorphClose
    >>> MorphClose("tissue", kernel_size=7, n_iterations=3).apply(tile)     # doctest: +SKIP
    """

    def __init__(self, mask_name, kernel_size=5, n_iterations=1):
        self.mask_name = _check_name("MorphClose", "mask_name", mask_name)
        self.kernel_size = _check_odd_kernel("MorphClose", kernel_size)
        self.n_iterations = check_reach("MorphClose", self.kernel_size,
                                        _check_positive_int("MorphClose", "n_iterations", n_iterations))

    def F(self, mask):
        return morph_close(mask, self.kernel_size, self.n_iterations)


class ForegroundDetection(_MaskTransform):
    """Clean a mask in place: drop regions smaller than ``min_region_size`` pixels and fill holes smaller
    than ``max_hole_size`` pixels (every hole when ``outer_contours_only``).

    Parameters
    ----------
    mask_name : str
        The mask to clean.
    min_region_size : int
        Smallest region kept, in pixels (8-connected; default 5000). On a slide's tile a region reaching a
        side beyond which the slide goes on is kept: its size is unknown there (see
        :func:`~histoflow.transforms.base.open_sides`).
    max_hole_size : int
        Holes (4-connected background not touching the tile border) smaller than this are filled
        (default 1500).
    outer_contours_only : bool
        Fill every hole.

    Examples
    --------
    >>> from histoflow.transforms.morphology import ForegroundDetection
    >>> ForegroundDetection("tissue", min_region_size=200).apply(tile)       # doctest: +SKIP
    """

    def __init__(self, mask_name, min_region_size=5000, max_hole_size=1500, outer_contours_only=False):
        name = "ForegroundDetection"
        self.mask_name = _check_name(name, "mask_name", mask_name)
        self.min_region_size = _check_number(name, "min_region_size", min_region_size, 0)
        self.max_hole_size = _check_number(name, "max_hole_size", max_hole_size, 0)
        self.outer_contours_only = _check_bool(name, "outer_contours_only", outer_contours_only)

    def F(self, mask, open_edges=()):
        return foreground_detection(mask, self.min_region_size, self.max_hole_size, self.outer_contours_only,
                                    open_edges)

    def apply(self, tile):
        if self.mask_name not in tile.masks:
            super().apply(tile)  # (its error)
        _refuse_labels(type(self).__name__, self.mask_name, tile.masks[self.mask_name])
        tile.masks[self.mask_name] = self.F(tile.masks[self.mask_name], open_sides(tile))


# --------------------------------------------------------------------------- helpers of the watershed recipes
def _fill_holes(binary) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(binary)`` (default structure), the same bool array, faster: the
    4-connected groups of background that do not touch the border are filled."""
    binary = np.asarray(binary, bool)
    if binary.ndim != 2 or binary.size == 0:
        from scipy import ndimage as ndi

        return ndi.binary_fill_holes(binary)
    n, labels = cv2.connectedComponents((~binary).view(np.uint8), connectivity=4, ltype=cv2.CV_32S)
    if n <= 1:
        return binary.copy()
    inner = np.ones(n, bool)
    inner[0] = False  # label 0: the foreground
    inner[labels[0]] = inner[labels[-1]] = inner[labels[:, 0]] = inner[labels[:, -1]] = False
    return binary | inner[labels]


def _peaks_per_label(image, labels, min_distance) -> np.ndarray:
    """``skimage.feature.peak_local_max(image, min_distance=min_distance, labels=labels, exclude_border=False)``:
    the same coordinates in the same order (tested against it), 3-5x faster on tiles of nuclei.

    For each label, in label order: its bounding box with the pixels of other labels set to the lowest
    value; pixels equal to the maximum of their ``(2 d + 1)`` square window (edge replicated) and above the
    image's minimum are candidates (on a label with no strict maximum, its pixels that an opening would
    remove); candidates by decreasing value (ties in raster order), each dropped when closer than ``d``
    (Chebyshev) to one kept before it.
    """
    from scipy import ndimage as ndi

    image = np.asarray(image)
    d = int(min_distance)
    if image.ndim != 2 or d < 1 or image.dtype not in (np.float32, np.float64):
        from skimage.feature import peak_local_max

        return peak_local_max(image, min_distance=d, labels=labels, exclude_border=False)
    threshold = image.min()
    low = np.finfo(image.dtype).min
    kernel = np.ones((2 * d + 1, 2 * d + 1), np.uint8)
    out = []
    for i, roi in enumerate(ndi.find_objects(labels)):
        if roi is None:
            continue
        inside = labels[roi] == i + 1
        img = np.where(inside, image[roi], low)
        peak = img == cv2.dilate(img, kernel, borderType=cv2.BORDER_REPLICATE)
        if peak[inside].all():  # no strict maximum: isolated pixels only (as skimage)
            peak = inside ^ ndi.binary_opening(inside)
        peak &= img > threshold
        r, c = np.nonzero(peak)
        if len(r) > 1:
            order = np.argsort(-img[r, c], kind="stable")
            r, c = r[order], c[order]
            if d > 1:
                keep = np.ones(len(r), bool)
                for j in range(len(r)):
                    if keep[j]:
                        near = np.maximum(np.abs(r - r[j]), np.abs(c - c[j])) < d
                        near[j] = False
                        keep &= ~near
                r, c = r[keep], c[keep]
        out.append(np.stack([r + roi[0].start, c + roi[1].start], axis=1))
    return np.concatenate(out).astype(np.intp, copy=False) if out else np.empty((0, 2), np.intp)

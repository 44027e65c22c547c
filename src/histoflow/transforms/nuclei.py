"""Nucleus detection in H&E tiles, classically: hematoxylin channel, threshold, watershed.

:func:`detect_nuclei` is the functional form; :class:`NucleusDetectionHE` the transform, which estimates
the slide's stain matrix once (:meth:`~NucleusDetectionHE.fit_slide`) and writes an int32 instance mask and
the nucleus count of each tile.

The steps:

1. hematoxylin concentration by colour deconvolution (least squares on the optical density, with the
   slide's fitted H&E matrix or Macenko's reference matrix; :mod:`histoflow.transforms.stain`);
2. Gaussian smoothing (``sigma``);
3. threshold: the given one, else Otsu's on stained pixels, never below :data:`MIN_HEMATOXYLIN` (so a tile
   without nuclei, or a white tile, gives none): the slide's, fitted once from full-resolution regions of its
   tissue (:meth:`~NucleusDetectionHE.fit_slide`, so a nucleus is the same in every tile holding it), or the
   image's own for a lone image;
4. holes filled, objects smaller than ``min_area`` removed;
5. touching nuclei split by a watershed of the (smoothed) distance transform from its local maxima at
   least ``min_distance`` apart; fragments smaller than ``min_area`` (and, when set, objects larger than
   ``max_area``) removed; labels renumbered 1..n.

The sizes (``min_area``, ``max_area``, ``min_distance``, ``sigma``) are pixels at 0.5 µm/px (20x), chosen on
16 MoNuSeg images (never the 4 test images of the shipped nucleus model). :class:`NucleusDetectionHE` scales
them to each tile's pixel size (``mpp``): at 40x the 20x sizes split every nucleus in two.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi

from ..errors import ParameterError
from .base import Transform, outputs_from
from .filters import MAX_KERNEL, _check_name, _check_number
from .morphology import _fill_holes, _peaks_per_label
from .objects import LARGE_NUCLEUS_UM, keep_owned
from .stain import REFERENCE_STAIN_MATRIX, _METHODS, _check_rgb, _od_lut, _StainFitMixin

__all__ = ["MIN_HEMATOXYLIN", "hematoxylin_concentration", "detect_nuclei", "NucleusDetectionHE"]

#: lowest automatic threshold on the (smoothed) hematoxylin concentration, in OD units
MIN_HEMATOXYLIN = 0.35
#: pixels whose largest channel OD is below this are glass, left out of Otsu's threshold
_STAINED_OD = 0.15


def hematoxylin_concentration(image, stain_matrix=REFERENCE_STAIN_MATRIX, background_intensity=245):
    """The hematoxylin concentration (OD units, float32, ``(h, w)``) of an RGB image.

    Least-squares colour deconvolution with an H&E ``stain_matrix`` (rows H, E). Values are not clipped.
    """
    image = _check_rgb(image, "hematoxylin_concentration")
    m = np.asarray(stain_matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] != 3 or m.shape[0] < 1:
        raise ParameterError(f"stain_matrix must be (n_stains, 3) with hematoxylin in row 0, got {m.shape}")
    h_row = np.linalg.pinv(m)[:, 0].astype(np.float32)
    od = _od_lut(background_intensity)[image]
    return od @ h_row


def _otsu(values, bins=256):
    """Otsu's threshold of a 1-D sample (histogram based, vectorised)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _relabel_by_area(labels, min_area, max_area):
    """Drop labels outside [min_area, max_area] and renumber the rest 1..n (int32)."""
    n = int(labels.max())
    if n == 0:
        return labels.astype(np.int32, copy=False), 0
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = areas >= max(min_area, 1)
    if max_area is not None:
        keep &= areas <= max_area
    keep[0] = False
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return lut[labels], int(keep.sum())


#: the pixel size (µm/px) the default sizes are for
SIZES_MPP = 0.5


def _smoothed_hematoxylin(image, stain_matrix, background_intensity, sigma):
    """The hematoxylin concentration of an RGB image (Macenko's reference matrix when ``stain_matrix`` is None),
    smoothed by a Gaussian of ``sigma`` pixels."""
    h = hematoxylin_concentration(image, REFERENCE_STAIN_MATRIX if stain_matrix is None else stain_matrix,
                                  background_intensity)
    if sigma and sigma > 0:
        h = cv2.GaussianBlur(h, (0, 0), sigmaX=float(sigma), sigmaY=float(sigma), borderType=cv2.BORDER_REFLECT)
    return h


def _auto_threshold(image, h, background_intensity, min_count):
    """Otsu's threshold of the smoothed hematoxylin ``h`` over the stained pixels of ``image``, at least
    :data:`MIN_HEMATOXYLIN`; None with fewer than ``min_count`` stained pixels."""
    # the largest channel OD is the OD of the darkest channel (the table decreases)
    darkest = np.minimum(np.minimum(image[..., 0], image[..., 1]), image[..., 2])
    values = h[_od_lut(background_intensity)[darkest] >= _STAINED_OD]
    if values.size < min_count:
        return None
    return max(_otsu(values), MIN_HEMATOXYLIN)


def detect_nuclei(image, stain_matrix=None, threshold=None, min_area=30, max_area=None, min_distance=3,
                  sigma=0.5, background_intensity=245, dist_sigma=1.0):
    """Instance mask of the nuclei of an H&E image.

    Parameters
    ----------
    image : (h, w, 3) uint8 RGB
    stain_matrix : (2, 3), optional
        H&E stain matrix (rows H, E); default Macenko's reference.
    threshold : float, optional
        On the smoothed hematoxylin concentration (OD units). Default: Otsu's over the stained pixels,
        at least :data:`MIN_HEMATOXYLIN`.
    min_area, max_area : int
        Object sizes kept, in pixels (``max_area=None``: no upper bound).
    min_distance : int
        Least distance between two nucleus centres (seeds of the watershed), in pixels.
    sigma : float
        Gaussian smoothing of the hematoxylin channel, in pixels.
    dist_sigma : float
        Gaussian smoothing of the distance transform whose maxima seed the watershed, in pixels.

    The defaults are for 0.5 µm/px (20x): at another pixel size scale them (areas by the square), or use
    :class:`NucleusDetectionHE`, which does.

    Returns
    -------
    (h, w) int32, 0 background, nuclei 1..n.

    Examples
    --------
    >>> labels = detect_nuclei(he_tile)                  # doctest: +SKIP
    >>> labels.max()                                     # number of nuclei   # doctest: +SKIP
    """
    from skimage.segmentation import watershed

    image = _check_rgb(image, "detect_nuclei")
    if image.size == 0:  # no pixels, no nuclei
        return np.zeros(image.shape[:2], np.int32)
    h = _smoothed_hematoxylin(image, stain_matrix, background_intensity, sigma)
    if threshold is None:
        threshold = _auto_threshold(image, h, background_intensity, max(min_area, 1))
        if threshold is None:
            return np.zeros(image.shape[:2], np.int32)
    binary = h > threshold
    if not binary.any():
        return np.zeros(image.shape[:2], np.int32)
    binary = _fill_holes(binary)
    labels, _ = ndi.label(binary)
    labels, n = _relabel_by_area(labels, min_area, None)
    if n == 0:
        return labels
    binary = labels > 0
    dist = ndi.distance_transform_edt(binary).astype(np.float32)
    if dist_sigma > 0:
        dist = cv2.GaussianBlur(dist, (0, 0), float(dist_sigma))
    peaks = _peaks_per_label(dist, labels, max(int(min_distance), 1))
    markers = np.zeros(labels.shape, np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    # every object gets at least one seed (peak_local_max may find none on a flat plateau)
    seeded = np.zeros(n + 1, bool)
    seeded[labels[peaks[:, 0], peaks[:, 1]]] = True
    missing = np.flatnonzero(~seeded[1:]) + 1
    if missing.size:
        centres = ndi.maximum_position(dist, labels, missing)
        base = len(peaks)
        for i, (r, c) in enumerate(centres):
            markers[int(r), int(c)] = base + 1 + i
    split = watershed(-dist, markers, mask=binary)
    out, _ = _relabel_by_area(split, min_area, max_area)
    return out


class NucleusDetectionHE(_StainFitMixin, Transform):
    """Nucleus instances of an H&E tile by hematoxylin thresholding and distance-transform watershed.

    Parameters
    ----------
    mask_name : str
        Tile mask written: int32 instance labels (0 background).
    stain_estimation_method : {"macenko", "vahadane"}
        How :meth:`fit_slide` estimates the slide's H&E matrix (once, from its thumbnail). Without
        ``fit_slide``, Macenko's reference matrix is used.
    threshold : float, optional
        On the hematoxylin concentration (OD units); default Otsu's, at least 0.35: over the slide's stained
        pixels once :meth:`fit_slide` ran (full-resolution regions of its tissue), so that a nucleus is the
        same in every tile that holds it; per image otherwise (``F`` on a lone image).
    min_area, max_area : float
        Nucleus sizes kept, in pixels at ``mpp``.
    min_distance : float
        Least distance between nucleus centres, in pixels at ``mpp``.
    sigma : float
        Gaussian smoothing of the hematoxylin channel, in pixels at ``mpp``.
    label_name : str
        Tile label written: the number of nuclei.
    mpp : float or None
        The pixel size (µm/px) the sizes above are given at (default 0.5, 20x). On a tile of another known
        pixel size they are scaled to it, areas by the square of the ratio: at 40x (0.25 µm/px) the defaults
        become ``min_area`` 120, ``min_distance`` 6 and ``sigma`` 1. ``None``: they are the tile's pixels,
        whatever its pixel size. (The distance transform is smoothed by 1 px at every pixel size: scaled with
        the others, 2 px at 40x, it gave AJI 0.466 against 0.472 on the 16 MoNuSeg images that are not the
        nucleus model's test images.)

    See :func:`detect_nuclei`.
    """

    slide_types = ("HE",)
    changes_image = False
    background_intensity = 245

    def __init__(self, mask_name="nuclei", stain_estimation_method="macenko", threshold=None, min_area=30,
                 max_area=None, min_distance=3, label_name="nucleus_count", sigma=0.5, mpp=SIZES_MPP):
        if stain_estimation_method not in _METHODS[:2]:
            raise ParameterError(f"NucleusDetectionHE: stain_estimation_method must be 'macenko' or 'vahadane', "
                                 f"got {stain_estimation_method!r}")
        _check_name("NucleusDetectionHE", "mask_name", mask_name)
        _check_name("NucleusDetectionHE", "label_name", label_name)
        if threshold is not None:
            _check_number("NucleusDetectionHE", "threshold", threshold, 0)
        _check_number("NucleusDetectionHE", "min_area", min_area, 0)
        if max_area is not None:
            _check_number("NucleusDetectionHE", "max_area", max_area, 0)
        _check_number("NucleusDetectionHE", "min_distance", min_distance, 1, maximum=MAX_KERNEL // 2)
        _check_number("NucleusDetectionHE", "sigma", sigma, 0, maximum=MAX_KERNEL / 8)
        if mpp is not None:
            _check_number("NucleusDetectionHE", "mpp", mpp, 0, strict=True)
        if max_area is not None and max_area < min_area:
            raise ParameterError(f"NucleusDetectionHE: max_area {max_area} < min_area {min_area}")
        self.mask_name = mask_name
        self.stain_estimation_method = stain_estimation_method
        self.threshold = threshold
        self.min_area = min_area
        self.max_area = max_area
        self.min_distance = min_distance
        self.label_name = label_name
        self.sigma = sigma
        self.mpp = mpp
        self.slide_stains_ = None
        self.slide_threshold_ = None

    masks_out = outputs_from("mask_name")

    labels_out = outputs_from("label_name")

    def fit_slide(self, slide):
        """Estimate the slide's H&E matrix once, from its thumbnail (and ``"tissue"`` mask), and, without a
        given ``threshold``, the slide's hematoxylin threshold. Per-tile thresholds made a nucleus at a tile
        border differ between the tiles holding it (kept by both: 23 pairs of cells sharing pixels in a
        quantify run of an H&E image at 512 px tiles) and the count depend on the tile size (4,376 cells
        whole, 5,074 at 512 px, 5,220 at 256 px)."""
        samples = self._slide_samples(slide)  # the thumbnail and the full-resolution regions, read once
        self.slide_stains_ = self._fit_slide_stains(slide, self.stain_estimation_method, samples)
        self.slide_threshold_ = None if self.threshold is not None else self._fit_threshold(slide, samples)

    def _fit_threshold(self, slide, samples):
        """Otsu's threshold over the stained pixels of full-resolution regions of the slide's tissue (of its
        thumbnail when that is nearly full resolution), smoothed as the tiles are; None when there are none."""
        thumb, _, image = samples
        ds = 1.0
        if image is None:
            ds = slide.dimensions[0] / thumb.shape[1]
            if ds >= 2:  # a coarse thumbnail's averaged pixels would set the threshold far too low
                return None
            image = thumb
        mpp = getattr(slide, "mpp", None)
        mpp = None if mpp is None else float(np.mean(mpp)) * ds
        image = _check_rgb(image, "NucleusDetectionHE")
        h = _smoothed_hematoxylin(image, self.stain_matrix_, self.background_intensity, self.sizes(mpp)["sigma"])
        t = _auto_threshold(image, h, self.background_intensity, 1000)
        return None if t is None else float(t)

    @property
    def stain_matrix_(self):
        return REFERENCE_STAIN_MATRIX if self.slide_stains_ is None else self.slide_stains_[0]

    def min_overlap(self, mpp) -> int:
        """A large nucleus, whole (at 0.5 µm/px, 20x, when the pixel size is unknown)."""
        return int(np.ceil(LARGE_NUCLEUS_UM / float(mpp or 0.5)))

    def sizes(self, mpp=None) -> dict:
        """``min_area``, ``max_area``, ``min_distance`` and ``sigma`` in pixels of an image of pixel size
        ``mpp`` (µm/px; as given when it or :attr:`mpp` is None)."""
        f = 1.0 if mpp is None or self.mpp is None else float(self.mpp) / float(mpp)
        return {"min_area": self.min_area * f * f,
                "max_area": None if self.max_area is None else self.max_area * f * f,
                "min_distance": max(int(round(self.min_distance * f)), 1), "sigma": self.sigma * f}

    def F(self, image, core=None, mpp=None):
        """The instance mask of one RGB image of pixel size ``mpp`` (µm/px; None: unknown, the sizes are
        taken as pixels): the nuclei whose centroid lies in ``core`` = (x0, y0, x1, y1) (all of them when
        None), numbered 1..n."""
        threshold = self.threshold if self.threshold is not None else getattr(self, "slide_threshold_", None)
        labels = detect_nuclei(image, self.stain_matrix_, threshold,
                               background_intensity=self.background_intensity, **self.sizes(mpp))
        return labels if core is None else keep_owned(labels, core)

    def apply(self, tile):
        # tiles that overlap: each nucleus is kept by the one tile whose core holds its centroid
        mpp = None if tile.mpp is None else float(np.mean(tile.mpp))
        labels = self.F(tile.image, tile.core, mpp)
        tile.masks[self.mask_name] = labels
        tile.labels[self.label_name] = int(labels.max()) if labels.size else 0

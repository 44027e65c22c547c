"""Tile quality control: focus (blur) scoring."""
from __future__ import annotations

import cv2
import numpy as np

from ..errors import ParameterError
from .base import Transform, inside_slide
from .filters import _check_name, _check_number, _check_positive_int
from .intensity import to_grey

__all__ = ["BlurQC", "laplacian_variance"]


def laplacian_variance(image, channel=None, full_scale=None):
    """Focus score: variance of the Laplacian (``cv2.Laplacian``, 3x3 aperture, float64) of the grey image.

    The grey image is RGB converted with OpenCV's weights, the single channel, or ``channel``; it is taken
    on the 0-255 scale whatever the dtype (uint16 is divided by 257, floats are taken as [0, 1]; other integers
    over ``full_scale``, e.g. 255 or 65535 from the slide's dtype, else as 8 or 16 bits by their values), so one
    threshold serves every dtype; NaN pixels (no data) are left out. Sharp tissue scores in the hundreds or
    thousands; out-of-focus tiles and blank glass score low.

    Examples
    --------
    >>> import numpy as np
    >>> laplacian_variance(np.full((32, 32, 3), 128, np.uint8))
    0.0
    """
    grey = to_grey(image, channel)
    if grey.size == 0:  # no pixels, no score (OpenCV would raise); such a tile is not labelled blurred
        return float("nan")
    if grey.dtype == np.uint8:
        g = grey
    elif np.issubdtype(grey.dtype, np.integer):
        # other integers (int64 from astype(int), int32, uint32) by their values, as 8 or 16 bits: by their
        # dtype's range an int64 tile of 0-255 values scored 0 and was labelled blurred
        top = np.iinfo(grey.dtype).max
        if full_scale is not None and grey.dtype != np.uint16:
            top = float(full_scale)
        elif grey.dtype != np.uint16:
            lo, hi = int(grey.min()), int(grey.max())
            if lo >= 0 and hi <= 65535:
                top = 255 if hi <= 255 else 65535
        g = grey.astype(np.float64) * (255.0 / top)
    else:
        g = grey.astype(np.float64)
        finite = np.isfinite(g)
        hi = float(g[finite].max()) if finite.any() else 0.0
        if hi > 1.5:  # scored as [0, 1], a 0-255 float tile scored 255**2 times too high: sharp, whatever it was
            raise ParameterError(f"laplacian_variance: float images hold values in [0, 1]; got {grey.dtype} values "
                                 f"up to {hi:g} (divide floats on the 0-255 scale by 255, or give integers)")
        g = g * 255.0
    lap = cv2.Laplacian(np.ascontiguousarray(g), cv2.CV_64F)
    finite = np.isfinite(lap)
    if not finite.all():  # NaN pixels (no data) and their neighbours take no part; a tile of no data scores NaN
        return float(lap[finite].var()) if finite.any() else float("nan")
    return float(lap.var())


class BlurQC(Transform):
    """Label out-of-focus tiles by the variance of the Laplacian of the grey image.

    Writes the float label ``score_name`` (the variance, see :func:`laplacian_variance`) and the bool label
    ``label_name``: True when the score is below ``threshold`` (blurred).

    Parameters
    ----------
    label_name : str
        Bool label, True when blurred (default ``"blur"``).
    score_name : str
        Float label with the score (default ``"laplacian_variance"``).
    threshold : float
        Scores below it are blurred (default 100, on the 0-255 grey scale).
    channel : int or None
        Channel to score, for images that are not RGB (e.g. the nuclear channel of a fluorescence image).

    Examples
    --------
    >>> from histoflow.transforms.quality import BlurQC
    >>> BlurQC(threshold=50).apply(tile); tile.labels["laplacian_variance"]      # doctest: +SKIP
    812.4
    """

    def __init__(self, label_name="blur", score_name="laplacian_variance", threshold=100.0, channel=None):
        self.label_name = _check_name("BlurQC", "label_name", label_name)
        self.score_name = _check_name("BlurQC", "score_name", score_name)
        if self.score_name == self.label_name:
            raise ParameterError(f"BlurQC: label_name and score_name must differ, both are {label_name!r}")
        self.threshold = _check_number("BlurQC", "threshold", threshold, 0)
        if channel is not None:
            channel = _check_positive_int("BlurQC", "channel", channel, 0)
        self.channel = channel

    @property
    def labels_out(self):
        return (self.label_name, self.score_name)

    def fit_slide(self, slide):
        """The slide's full scale (255 for 8-bit slides, 65535 for 16-bit): tiles that reach this step as other
        integers (int32, int64) are scored on it, all alike (by each tile's values, a dim tile of a 16-bit slide
        was taken for 8-bit and scored 66,049x higher)."""
        dtype = getattr(getattr(slide, "reader", None), "dtype", None)
        try:
            self.full_scale_ = float(np.iinfo(np.dtype(dtype)).max) if dtype is not None and \
                np.dtype(dtype) in (np.uint8, np.uint16) else None
        except TypeError:
            self.full_scale_ = None

    def F(self, image):
        return laplacian_variance(image, self.channel, getattr(self, "full_scale_", None))

    def apply(self, tile):
        score = self.F(inside_slide(tile))  # an edge tile's fill is not scored (its edge made it look sharp)
        tile.labels[self.score_name] = score
        tile.labels[self.label_name] = bool(score < self.threshold)

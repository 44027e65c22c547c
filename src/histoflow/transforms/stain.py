"""Stain normalisation, separation and augmentation for brightfield H&E (and IHC) tiles.

Conventions used throughout this module
---------------------------------------
Optical density (OD)
    Beer-Lambert, natural logarithm, relative to the background (glass) intensity ``Io``:
    ``OD = -ln((I + 1) / Io)`` for 8-bit ``I`` and, back, ``I = Io * exp(-OD) - 1`` (the ``+1`` avoids
    ``log 0``; it is the convention of Macenko's reference code and of torchstain). The colour
    deconvolution of :class:`StainSeparation` follows scikit-image instead (``OD = -ln(max(I/255, 1e-6))``).
Stain matrices
    ``(n_stains, 3)`` arrays, one **row** per stain (its unit OD vector over R, G, B), as in scikit-image
    (``skimage.color.rgb_from_hed``). H&E matrices have hematoxylin in row 0 and eosin in row 1.
    Note that Macenko's paper and torchstain write the same matrix transposed (``(3, 2)``, columns).
H before E
    Hematoxylin (blue-purple) absorbs red light more strongly than eosin (pink), which absorbs mostly
    green: in the unit OD vectors **hematoxylin has the larger red component**. Every estimator orders its
    two stains by this rule (it is also Macenko's and torchstain's heuristic). With the reference matrix:
    H = (0.5626, 0.7201, 0.4062), E = (0.2159, 0.8012, 0.5581).
Background
    Pixels close to the background intensity carry no stain. Every image-producing function keeps the
    input pixel where its largest channel OD is below ``GLASS_OD = 0.02`` and blends its result in
    linearly up to ``BACKGROUND_OD = 0.1``, so glass passes unchanged; outputs are clipped to 0-255 and
    single-stain renderings use non-negative concentrations. A white tile, an empty tile or a tile with a
    few tissue pixels never raises and never yields NaN.

Macenko and torchstain
    ``normalize_stains(img, target_stain_matrix=m, target_max_concentrations=mc, background_intensity=240,
    beta=0.15, alpha=1, max_c_pixels="all")`` with ``m, mc = fit_stains(target, background_intensity=240,
    max_c_pixels="all")`` reproduces torchstain's ``MacenkoNormalizer`` (same matrix to 1e-4; images
    within 1 grey level on average: this module rounds where torchstain truncates, and blends glass).
    The transforms differ on purpose in two ways: ``background_intensity`` defaults to 245, and the
    maximum concentrations are percentiles over the *stained* pixels (OD >= beta) rather than over all
    pixels, so they do not depend on how much glass a thumbnail or tile shows (on a CMU-1 region with
    glass that alone moves the result by about 5 grey levels on average).

Functional forms: :func:`estimate_stain_matrix_macenko`, :func:`estimate_stain_matrix_vahadane`,
:func:`separate_stains`, :func:`normalize_stains`, :func:`lab_stats`, :func:`reinhard_normalize`,
:func:`color_deconvolution`, :func:`augment_stains`. Transforms: :class:`StainNormalizationHE`,
:class:`StainSeparation`, :class:`StainAugmentation`.

Examples
--------
>>> norm = StainNormalizationHE()                          # doctest: +SKIP
>>> norm.fit_slide(slide)          # one stain matrix for the whole slide, from its thumbnail  # doctest: +SKIP
>>> for tile in slide.generate_tiles(256):                 # doctest: +SKIP
...     norm.apply(tile)
"""
from __future__ import annotations

import warnings

import cv2
import numpy as np

from ..errors import HistoflowError, ParameterError
from .base import Transform
from .filters import _check_number

__all__ = [
    "REFERENCE_STAIN_MATRIX", "REFERENCE_MAX_CONCENTRATIONS", "REFERENCE_LAB_MEANS", "REFERENCE_LAB_STDS",
    "CONCENTRATION_SCALE", "StainEstimationError",
    "rgb_to_od", "od_to_rgb", "estimate_stain_matrix_macenko", "estimate_stain_matrix_vahadane",
    "estimate_stain_matrix", "fit_stains", "separate_stains", "max_concentrations", "normalize_stains", "lab_stats",
    "reinhard_normalize", "color_deconvolution", "augment_stains", "slide_tissue_sample",
    "StainNormalizationHE", "StainSeparation", "StainAugmentation",
]

#: Macenko's reference H&E stain matrix (rows: hematoxylin, eosin; columns: R, G, B OD), the values of
#: Macenko's reference code, torchstain and staintools.
REFERENCE_STAIN_MATRIX = np.array([[0.5626, 0.7201, 0.4062],
                                   [0.2159, 0.8012, 0.5581]])
#: the matching 99th-percentile maximum concentrations (H, E).
REFERENCE_MAX_CONCENTRATIONS = np.array([1.9705, 1.0308])
#: default Reinhard target: mean and standard deviation of L*, a*, b* (CIELAB, L in 0-100) over the tissue
#: pixels (L < 80) of TIAToolbox's stain-normalisation target image ``stain_norm_target.png``.
REFERENCE_LAB_MEANS = np.array([48.82, 32.22, -14.17])
REFERENCE_LAB_STDS = np.array([14.00, 5.53, 6.20])

#: grey levels per OD unit of the uint8 "concentration" output of :class:`StainSeparation`:
#: ``value = round(clip(c, 0, 255 / CONCENTRATION_SCALE) * CONCENTRATION_SCALE)``, so 64 grey levels per
#: OD unit (natural log), saturating at an OD of 3.98 (1.9 % transmission).
CONCENTRATION_SCALE = 64.0

#: background blend: a pixel whose largest channel OD is below ``GLASS_OD`` (within 2 % of the background
#: intensity) is glass and keeps its value; up to ``BACKGROUND_OD`` the result is blended in linearly, so the
#: palest tissue changes progressively and no edge appears between glass and tissue
GLASS_OD = 0.02
BACKGROUND_OD = 0.1
#: least number of stained pixels for a stain estimate (fewer: the estimators raise, transforms fall back)
MIN_ESTIMATION_PIXELS = 500
#: and least fraction of a tile's pixels for a per-tile estimate when no slide matrix was fitted
MIN_TILE_TISSUE_FRACTION = 0.05
#: pixels used at most by the Vahadane dictionary learning (random subsample; 3000 give the same matrix as
#: 10000 within the spread between seeds, at a third of the time)
VAHADANE_MAX_PIXELS = 3000
#: largest |cosine| between two estimated stain vectors (above: degenerate, one stain only)
MAX_STAIN_COSINE = 0.995

_NAMED_TARGETS = ("normalize", "hematoxylin", "eosin")
_METHODS = ("macenko", "vahadane", "reinhard")


class StainEstimationError(HistoflowError, ValueError):
    """A stain matrix could not be estimated (too few stained pixels, or one stain only)."""


# ---------------------------------------------------------------------------------------- OD helpers
_LUT_CACHE: dict = {}


def _od_lut(background_intensity: float) -> np.ndarray:
    key = float(background_intensity)
    lut = _LUT_CACHE.get(key)
    if lut is None:
        lut = (-np.log((np.arange(256, dtype=np.float64) + 1.0) / key)).astype(np.float32)
        if len(_LUT_CACHE) < 64:
            _LUT_CACHE[key] = lut
    return lut


def _check_rgb(image, who="stain"):
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ParameterError(f"{who}: expected an (h, w, 3) RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ParameterError(f"{who}: expected uint8 RGB, got {image.dtype}")
    return image


def rgb_to_od(image, background_intensity=245) -> np.ndarray:
    """Optical density ``-ln((I + 1) / Io)`` of an 8-bit image, float32, same shape (a table look-up)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ParameterError(f"rgb_to_od: expected uint8, got {image.dtype}")
    return _od_lut(background_intensity)[image]


def od_to_rgb(od, background_intensity=245) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`: ``Io * exp(-OD) - 1``, rounded and clipped to uint8."""
    od = np.asarray(od, dtype=np.float32)
    out = np.exp(-od)
    out *= np.float32(background_intensity)
    out -= np.float32(0.5)          # -1 of the OD convention, +0.5 to round on the cast below
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _background_weight(od_max, ramp=None):
    """1 for stained pixels, falling linearly to 0 as the largest channel OD goes from ``BACKGROUND_OD`` down
    to ``GLASS_OD``."""
    hi = BACKGROUND_OD if ramp is None else ramp
    lo = min(GLASS_OD, hi / 2)
    w = od_max - np.float32(lo)
    w *= np.float32(1.0 / max(hi - lo, 1e-6))
    np.clip(w, 0, 1, out=w)
    return w


def _channel_max(a) -> np.ndarray:
    """``a.max(axis=-1)`` of an (h, w, 3) array, the same values, ~20x faster (numpy reduces a short last
    axis slowly)."""
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


def _blend_background(result, image, od, ramp=None):
    """``image + w * (result - image)`` with the weight of :func:`_background_weight`, uint8."""
    w = _background_weight(_channel_max(od), ramp)
    if np.all(w >= 1):
        return result
    img = image.astype(np.float32)
    out = img + w[..., None] * (result.astype(np.float32) - img)
    out += np.float32(0.5)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _unit_rows(m):
    m = np.asarray(m, dtype=np.float64)
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def _order_he(m):
    """Rows ordered hematoxylin first: the row with the larger red OD component."""
    m = np.asarray(m, dtype=np.float64)
    return m if m[0, 0] >= m[1, 0] else m[::-1].copy()


def _validate_matrix(m, who):
    m = np.asarray(m, dtype=np.float64)
    if not np.all(np.isfinite(m)):
        raise StainEstimationError(f"{who}: the estimated stain matrix is not finite")
    m = np.clip(m, 0, None)        # OD vectors are non-negative; tiny negative noise is removed
    if np.any(np.linalg.norm(m, axis=1) < 1e-6):
        raise StainEstimationError(f"{who}: an estimated stain vector is zero")
    m = _unit_rows(m)
    if abs(float(m[0] @ m[1])) > MAX_STAIN_COSINE:
        raise StainEstimationError(f"{who}: the two estimated stain vectors coincide (one stain only?)")
    return _order_he(m)


def _check_choices(who, method, max_c_pixels):
    """A misspelt method was taken as Macenko, a misspelt max_c_pixels as "all": refused instead."""
    if method not in ("macenko", "vahadane"):
        raise ParameterError(f"{who}: method must be 'macenko' or 'vahadane', got {method!r}")
    if max_c_pixels not in ("stained", "all"):
        raise ParameterError(f"{who}: max_c_pixels must be 'stained' or 'all', got {max_c_pixels!r}")


def _checked_he_matrix(matrix, who):
    """A user's H&E matrix as :func:`_validate_matrix` makes it (unit rows, hematoxylin first), with the row
    order taken from the matrix given and the given rows' lengths; ParameterError naming ``who`` when it
    cannot be a stain matrix (negative, zero or coinciding rows)."""
    m = _as_matrix(matrix, 2, who)
    if np.any(m < 0):
        raise ParameterError(f"{who} holds negative optical densities: {m.tolist()}")
    try:
        valid = _validate_matrix(m, who)  # unit rows, hematoxylin first
    except StainEstimationError as e:
        raise ParameterError(str(e)) from None
    norms = np.linalg.norm(m, axis=1)
    unit = m / norms[:, None]
    order = [0, 1] if np.allclose(valid[0], unit[0]) else [1, 0]
    return valid, order, norms


def _he_first(matrix, maxima, who):
    """``(matrix, maxima)`` with the matrix's rows unit and hematoxylin first (:func:`_checked_he_matrix`) and the
    maxima (None kept) reordered and rescaled with them; a matrix in that form already is kept bit for bit."""
    m = _as_matrix(matrix, 2, who)
    valid, order, norms = _checked_he_matrix(m, who)
    if order == [0, 1] and np.all(np.abs(norms - 1) <= 1e-12) and np.allclose(valid, m, rtol=0, atol=1e-12):
        return m, maxima
    if maxima is not None:
        maxima = (np.asarray(maxima, np.float64).reshape(-1) * norms)[order]
    return valid, maxima


def _check_seed(name, seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ParameterError(f"{name}: seed must be a whole number >= 0 or None, got {seed!r}")


def _as_matrix(stain_matrix, n=None, who="stain matrix"):
    try:
        m = np.asarray(stain_matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise ParameterError(f"{who} must be rows of numbers (one row per stain: its R, G, B OD), got "
                             f"{stain_matrix!r}") from None
    if m.ndim != 2 or m.shape[1] != 3 or (n is not None and m.shape[0] != n):
        want = f"({n}, 3)" if n else "(n_stains, 3)"
        raise ParameterError(f"{who} must be {want} (one row per stain: its R, G, B OD), got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ParameterError(f"{who} has non-finite values")
    return m


# ---------------------------------------------------------------------------------------- estimation
def _pixels(image, mask):
    flat = image.reshape(-1, 3)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise ParameterError(f"mask shape {mask.shape} does not match image {image.shape[:2]}")
        flat = flat[mask.reshape(-1) > 0]
    return flat


def estimate_stain_matrix_macenko(image, background_intensity=245, beta=0.15, alpha=1.0, mask=None):
    """The H&E stain matrix of an image by Macenko's method.

    Macenko et al., "A method for normalizing histology slides for quantitative analysis", ISBI 2009:
    optical density; drop pixels with OD < ``beta`` in any channel (transparent); project onto the plane
    of the two largest eigenvectors of the OD covariance; the stain vectors are the directions at the
    ``alpha`` and ``100 - alpha`` percentiles of the angle in that plane. With
    ``background_intensity=240, beta=0.15, alpha=1`` this is torchstain's / Macenko's reference code.

    Parameters
    ----------
    image : (h, w, 3) uint8 RGB
    background_intensity : float
        ``Io``, the glass intensity.
    beta : float
        OD threshold of transparent pixels.
    alpha : float
        Angular percentile (robust extremes), in percent.
    mask : (h, w) array, optional
        Use only pixels where it is non-zero (e.g. a tissue mask).

    Returns
    -------
    (2, 3) float64, unit rows, hematoxylin first.

    Raises
    ------
    StainEstimationError
        Fewer than 500 stained pixels, or the two vectors coincide.

    Examples
    --------
    >>> m = estimate_stain_matrix_macenko(he_image)        # doctest: +SKIP
    >>> m[0]                                               # doctest: +SKIP
    array([0.65, 0.70, 0.29])
    """
    image = _check_rgb(image, "estimate_stain_matrix_macenko")
    od = _od_lut(background_intensity)[_pixels(image, mask)]
    odhat = od[np.all(od >= beta, axis=1)]
    if len(odhat) < MIN_ESTIMATION_PIXELS:
        raise StainEstimationError(f"estimate_stain_matrix_macenko: only {len(odhat)} stained pixels "
                                   f"(OD >= {beta}); need {MIN_ESTIMATION_PIXELS}")
    return _macenko_from_od(odhat.astype(np.float64), alpha)


def _macenko_from_od(odhat, alpha):
    cov = np.cov(odhat.T)
    if not np.all(np.isfinite(cov)):
        raise StainEstimationError("estimate_stain_matrix_macenko: non-finite OD covariance")
    _, eigvecs = np.linalg.eigh(cov)
    plane = eigvecs[:, 1:3]                     # second and first principal axes (torchstain's order)
    proj = odhat @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v_min = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_max = plane @ np.array([np.cos(hi), np.sin(hi)])
    # the vectors lie in the cone of the data: make them point into the positive octant
    v_min = v_min if v_min.sum() >= 0 else -v_min
    v_max = v_max if v_max.sum() >= 0 else -v_max
    return _validate_matrix(np.stack([v_min, v_max]), "estimate_stain_matrix_macenko")


def _luminosity_mask(image, threshold):
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)          # uint8: L scaled to 0-255
    return lab[..., 0] < threshold * 255.0


def estimate_stain_matrix_vahadane(image, background_intensity=245, luminosity_threshold=0.8,
                                   regularizer=0.1, mask=None, seed=None, max_pixels=VAHADANE_MAX_PIXELS):
    """The H&E stain matrix of an image by Vahadane's sparse non-negative factorisation.

    Vahadane et al., "Structure-preserving color normalization and sparse stain separation for
    histological images", IEEE TMI 2016: tissue pixels are those with CIELAB lightness
    ``L / 100 < luminosity_threshold``; their OD (at most ``max_pixels``, a seeded random subsample) is
    factorised as ``OD = C @ W`` with ``W`` two non-negative unit stain vectors and ``C`` sparse
    non-negative concentrations (``min 0.5 ||OD - C W||^2 + regularizer * |C|_1``; scikit-learn's
    ``dict_learning`` with ``positive_dict=True, positive_code=True``, coordinate descent, started from the
    reference matrix; the SPAMS library of the paper is not used). It costs about a second (scikit-learn
    solves one lasso per pixel), so estimate once per slide (:class:`StainNormalizationHE.fit_slide`).
    The rows are ordered hematoxylin first (larger red OD).

    Returns
    -------
    (2, 3) float64, unit rows, hematoxylin first.

    Raises
    ------
    StainEstimationError
        Fewer than 500 tissue pixels, or the two vectors coincide.
    """
    from sklearn.decomposition import dict_learning

    image = _check_rgb(image, "estimate_stain_matrix_vahadane")
    tissue = _luminosity_mask(image, luminosity_threshold)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise ParameterError(f"estimate_stain_matrix_vahadane: mask shape {mask.shape} differs from the "
                                 f"image's {image.shape[:2]}")
        tissue &= mask > 0
    od = _od_lut(background_intensity)[image[tissue]]
    od = od[od.max(axis=1) > 0]                 # pixels darker than the background only
    if len(od) < MIN_ESTIMATION_PIXELS:
        raise StainEstimationError(f"estimate_stain_matrix_vahadane: only {len(od)} tissue pixels "
                                   f"(L < {luminosity_threshold} * 100); need {MIN_ESTIMATION_PIXELS}")
    rng = np.random.default_rng(0 if seed is None else seed)
    if len(od) > max_pixels:
        od = od[rng.choice(len(od), max_pixels, replace=False)]
    od = np.clip(od, 0, None).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # convergence warnings of the inner lasso
        _, dictionary, _ = dict_learning(
            od, n_components=2, alpha=regularizer, max_iter=30, tol=1e-4, method="cd",
            # both inits: scikit-learn ignores dict_init without code_init (and starts from an SVD)
            dict_init=REFERENCE_STAIN_MATRIX.copy(), code_init=_nnls_2(od, REFERENCE_STAIN_MATRIX),
            positive_dict=True, positive_code=True,
            random_state=int(rng.integers(2**31 - 1)))
    return _validate_matrix(dictionary, "estimate_stain_matrix_vahadane")


def estimate_stain_matrix(image, method="macenko", background_intensity=245, beta=0.15, alpha=1.0,
                          luminosity_threshold=0.8, regularizer=0.1, mask=None, seed=None):
    """Dispatch to :func:`estimate_stain_matrix_macenko` or :func:`estimate_stain_matrix_vahadane`."""
    if method == "macenko":
        return estimate_stain_matrix_macenko(image, background_intensity, beta=beta, alpha=alpha, mask=mask)
    if method == "vahadane":
        return estimate_stain_matrix_vahadane(image, background_intensity, luminosity_threshold, regularizer,
                                              mask=mask, seed=seed)
    raise ParameterError(f"unknown stain estimation method {method!r}; choose 'macenko' or 'vahadane'")


# ---------------------------------------------------------------------------------------- concentrations
def _nnls_2(od, m):
    """Exact non-negative least squares of ``od (n, 3) ~ c (n, 2) @ m (2, 3)``, vectorised."""
    c = od @ np.linalg.pinv(m).astype(np.float32)
    bad = np.any(c < 0, axis=1)
    if np.any(bad):
        ob = od[bad]
        m32 = m.astype(np.float32)
        n2 = np.maximum((m32 * m32).sum(axis=1), 1e-12)
        c0 = np.maximum(ob @ m32[0] / n2[0], 0)            # hematoxylin only
        c1 = np.maximum(ob @ m32[1] / n2[1], 0)            # eosin only
        r0 = ((ob - c0[:, None] * m32[0]) ** 2).sum(axis=1)
        r1 = ((ob - c1[:, None] * m32[1]) ** 2).sum(axis=1)
        first = r0 <= r1
        sub = np.zeros((len(ob), 2), np.float32)
        sub[first, 0] = c0[first]
        sub[~first, 1] = c1[~first]
        c[bad] = sub
    return c


def _concentrations(od, m, method):
    """``lstsq``: plain least squares (may be negative outside the stain cone, as in Macenko's code);
    ``nnls``: non-negative least squares (exact for 2 stains, clipped least squares otherwise)."""
    m = np.asarray(m, dtype=np.float64)
    if method == "nnls" and m.shape[0] == 2:
        return _nnls_2(od, m)
    c = od @ np.linalg.pinv(m).astype(np.float32)
    if method == "nnls":
        np.maximum(c, 0, out=c)
    elif method != "lstsq":
        raise ParameterError(f"unknown concentration method {method!r}; choose 'lstsq' or 'nnls'")
    return c


def separate_stains(image, stain_matrix=REFERENCE_STAIN_MATRIX, background_intensity=245, method="lstsq"):
    """Stain concentrations of an RGB image for a stain matrix.

    Parameters
    ----------
    image : (h, w, 3) uint8
    stain_matrix : (n, 3)
        One row per stain.
    background_intensity : float
        ``Io`` of the OD.
    method : {"lstsq", "nnls"}
        Plain least squares (Macenko's; slightly negative values occur outside the stain cone and on
        glass), or non-negative least squares (exact for 2 stains; Vahadane's).

    Returns
    -------
    (h, w, n) float32 concentrations in OD units such that ``OD ~ C @ stain_matrix``.
    """
    image = _check_rgb(image, "separate_stains")
    m = _as_matrix(stain_matrix)
    od = _od_lut(background_intensity)[image].reshape(-1, 3)
    return _concentrations(od, m, method).reshape(image.shape[0], image.shape[1], m.shape[0])


def _max_concentrations(concentrations, percentile=99, mask=None):
    """The ``percentile`` of each stain's concentration (over ``mask`` pixels when given); at least 1e-3."""
    c = np.asarray(concentrations).reshape(-1, np.asarray(concentrations).shape[-1])
    if mask is not None:
        c = c[np.asarray(mask).reshape(-1) > 0]
    if len(c) == 0:
        raise StainEstimationError("max_concentrations: no pixels")
    return np.maximum(np.percentile(c, percentile, axis=0), 1e-3).astype(np.float64)


max_concentrations = _max_concentrations


def fit_stains(image, method="macenko", background_intensity=245, beta=0.15, alpha=1.0,
               luminosity_threshold=0.8, regularizer=0.1, max_c_percentile=99, mask=None, seed=None,
               max_c_pixels="stained"):
    """The stain matrix of an image and its maximum concentrations.

    The matrix by :func:`estimate_stain_matrix`; the maxima are the ``max_c_percentile`` of each stain's
    concentration over the stained pixels (OD >= ``beta`` in every channel, inside ``mask``) when
    ``max_c_pixels="stained"`` (the default: independent of how much glass the image shows), or over all
    pixels with ``"all"`` (Macenko's reference code and torchstain).

    Returns
    -------
    (matrix (2, 3), max_concentrations (2,))
    """
    m = estimate_stain_matrix(image, method, background_intensity, beta=beta, alpha=alpha,
                              luminosity_threshold=luminosity_threshold, regularizer=regularizer, mask=mask,
                              seed=seed)
    od_all = _od_lut(background_intensity)[_pixels(image, mask)]
    if max_c_pixels == "stained":
        od = od_all[np.all(od_all >= beta, axis=1)]
    elif max_c_pixels != "all":
        raise ParameterError(f"max_c_pixels must be 'stained' or 'all', got {max_c_pixels!r}")
    else:
        od = od_all
    if len(od) < MIN_ESTIMATION_PIXELS:
        raise StainEstimationError(f"only {len(od)} stained pixels for the maximum concentrations")
    return m, _maxima(od, od_all, m, method, beta, max_c_percentile, max_c_pixels)


def stain_maxima(image, stain_matrix, method="macenko", background_intensity=245, beta=0.15, max_c_percentile=99,
                 mask=None, max_c_pixels="stained"):
    """The maximum concentrations (:func:`fit_stains`'s) of ``image`` for a given stain matrix."""
    _check_choices("stain_maxima", method, max_c_pixels)
    od_all = _od_lut(background_intensity)[_pixels(image, mask)]
    od = od_all[np.all(od_all >= beta, axis=1)] if max_c_pixels == "stained" else od_all
    if len(od) < MIN_ESTIMATION_PIXELS:
        raise StainEstimationError(f"only {len(od)} stained pixels for the maximum concentrations")
    return _maxima(od, od_all, np.asarray(stain_matrix, np.float64), method, beta, max_c_percentile, max_c_pixels)


def _maxima(od, od_all, m, method, beta, max_c_percentile, max_c_pixels):
    solver = "nnls" if method == "vahadane" else "lstsq"
    mc = _max_concentrations(_concentrations(od, m, solver), max_c_percentile)
    if max_c_pixels == "stained" and (mc < FAINT_STAIN).any():
        # a stain (nearly) absent where all three channels are stained, e.g. pale eosin next to dark nuclei:
        # its maximum over the pixels stained in any channel, so that normalisation does not blow it up
        some = od_all[np.any(od_all >= beta, axis=1)]
        if len(some) >= MIN_ESTIMATION_PIXELS:
            mc = np.where(mc < FAINT_STAIN, _max_concentrations(_concentrations(some, m, solver),
                                                                max_c_percentile), mc)
    return mc





# ---------------------------------------------------------------------------------------- normalisation
#: the most a stain's concentrations are scaled up by normalisation (target maximum / source maximum)
MAX_STAIN_GAIN = 20.0
#: a stain's maximum concentration (OD units) below which it counts as absent from the pixels it was taken on
FAINT_STAIN = 0.05


def normalize_stains(image, stain_matrix=None, max_concentrations=None,
                     target_stain_matrix=REFERENCE_STAIN_MATRIX,
                     target_max_concentrations=REFERENCE_MAX_CONCENTRATIONS, target="normalize",
                     method="macenko", background_intensity=245, beta=0.15, alpha=1.0,
                     luminosity_threshold=0.8, regularizer=0.1, max_c_percentile=99, seed=None,
                     max_c_pixels="stained"):
    """Normalise the H&E staining of an image to a target stain matrix (Macenko / Vahadane).

    ``C = separate(image, stain_matrix)`` (least squares for Macenko, NNLS for Vahadane),
    ``C' = C / max_concentrations * target_max_concentrations`` and the image ``Io * exp(-C' @ target) - 1``;
    ``target="hematoxylin"`` or ``"eosin"`` renders that stain alone. Background pixels are blended back
    to the input (module docstring): glass passes unchanged.

    Parameters
    ----------
    image : (h, w, 3) uint8 RGB
    stain_matrix, max_concentrations : optional
        The source's (e.g. fitted once per slide). ``None``: estimated from ``image`` with ``method``.
    target_stain_matrix, target_max_concentrations
        Default: Macenko's reference values.
    target : {"normalize", "hematoxylin", "eosin"}
    max_c_pixels : {"stained", "all"}
        Pixels of the source maxima when they are computed here (:func:`fit_stains`); ``"all"`` with
        ``background_intensity=240`` reproduces torchstain's ``MacenkoNormalizer`` (up to its truncation
        of the output to uint8, where this function rounds).

    Returns
    -------
    (h, w, 3) uint8.

    Raises
    ------
    StainEstimationError
        When the source is estimated from ``image`` and it has too little tissue (the transform falls back
        to the target instead).

    Examples
    --------
    >>> out = normalize_stains(img, background_intensity=240)   # torchstain's Macenko   # doctest: +SKIP
    """
    image = _check_rgb(image, "normalize_stains")
    _check_choices("normalize_stains", method, max_c_pixels)
    if target not in _NAMED_TARGETS:
        raise ParameterError(f"normalize_stains: target must be one of {_NAMED_TARGETS}, got {target!r}")
    if stain_matrix is None:
        stain_matrix, mc = fit_stains(image, method, background_intensity, beta, alpha, luminosity_threshold,
                                      regularizer, max_c_percentile, seed=seed, max_c_pixels=max_c_pixels)
        if max_concentrations is None:
            max_concentrations = mc
    # hematoxylin first and unit rows, as the class takes them (an eosin-first target painted the nuclei pink);
    # the maxima go with their rows
    src, max_concentrations = _he_first(stain_matrix, max_concentrations, "normalize_stains: stain_matrix")
    dst, dst_max = _he_first(target_stain_matrix, target_max_concentrations, "normalize_stains: target_stain_matrix")
    dst_max = np.asarray(dst_max, dtype=np.float64)
    od = _od_lut(background_intensity)[image]
    flat = od.reshape(-1, 3)
    c = _concentrations(flat, src, "nnls" if method == "vahadane" else "lstsq")
    if max_concentrations is None:
        sel = np.all(flat >= beta, axis=1) if max_c_pixels == "stained" else None
        src_max = _max_concentrations(c, max_c_percentile, sel) if sel is None or np.any(sel) else dst_max
        if sel is not None and (src_max < FAINT_STAIN).any():  # as in fit_stains
            some = np.any(flat >= beta, axis=1)
            if np.count_nonzero(some) >= MIN_ESTIMATION_PIXELS:
                src_max = np.where(src_max < FAINT_STAIN, _max_concentrations(c, max_c_percentile, some), src_max)
    else:
        src_max = np.asarray(max_concentrations, dtype=np.float64)
    # a source maximum far below the target's is a stain the image (almost) lacks, not a faint one: scaling
    # its traces up 1000x would paint black; at most MAX_STAIN_GAIN x
    scale = (dst_max / np.maximum(src_max, dst_max / MAX_STAIN_GAIN)).astype(np.float32)
    c *= scale
    if target == "normalize":
        out_od = c @ dst.astype(np.float32)
    else:
        k = 0 if target == "hematoxylin" else 1
        out_od = np.maximum(c[:, k:k + 1], 0) * dst[k].astype(np.float32)
    result = od_to_rgb(out_od, background_intensity).reshape(image.shape)
    return _blend_background(result, image, od)


def lab_stats(image, mask=None, luminosity_threshold=0.8):
    """Mean and standard deviation of CIELAB ``L*, a*, b*`` (L in 0-100) over tissue pixels.

    Tissue: ``L / 100 < luminosity_threshold``, and ``mask`` when given. Raises StainEstimationError when
    fewer than 500 pixels qualify.
    """
    image = _check_rgb(image, "lab_stats")
    lab = _rgb_to_lab(image).reshape(-1, 3)
    keep = lab[:, 0] < luminosity_threshold * 100.0
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape[:2]:
            raise ParameterError(f"lab_stats: mask shape {mask.shape} differs from the image's {image.shape[:2]}")
        keep &= mask.reshape(-1) > 0
    if np.count_nonzero(keep) < MIN_ESTIMATION_PIXELS:
        raise StainEstimationError(f"lab_stats: only {np.count_nonzero(keep)} tissue pixels "
                                   f"(L < {luminosity_threshold} * 100); need {MIN_ESTIMATION_PIXELS}")
    sel = lab[keep].astype(np.float64)
    return sel.mean(axis=0), np.maximum(sel.std(axis=0), 1e-3)


def _rgb_to_lab(image):
    return cv2.cvtColor(image.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2LAB)


def reinhard_normalize(image, target_means=REFERENCE_LAB_MEANS, target_stds=REFERENCE_LAB_STDS,
                       source_means=None, source_stds=None, luminosity_threshold=0.8,
                       background_intensity=245):
    """Reinhard et al. (2001) colour transfer in CIELAB: match each channel's mean and standard deviation.

    ``lab' = (lab - source_mean) / source_std * target_std + target_mean``. Source statistics default to
    the tissue pixels of ``image`` (:func:`lab_stats`); background pixels are blended back to the input
    (module docstring), so glass passes unchanged.

    Returns
    -------
    (h, w, 3) uint8.
    """
    image = _check_rgb(image, "reinhard_normalize")
    if source_means is None or source_stds is None:
        sm, ss = lab_stats(image, luminosity_threshold=luminosity_threshold)
        source_means = sm if source_means is None else source_means
        source_stds = ss if source_stds is None else source_stds
    sm = np.asarray(source_means, np.float32)
    ts = np.asarray(target_stds, np.float64)
    # at most MAX_STAIN_GAIN: a uniform source (ink, padding) would otherwise have its noise blown up to tissue
    gain = ts / np.maximum(np.asarray(source_stds, np.float64), ts / MAX_STAIN_GAIN)
    offset = np.asarray(target_means, np.float64) - sm * gain
    lab = _rgb_to_lab(image)
    lab *= gain.astype(np.float32)
    lab += offset.astype(np.float32)
    np.clip(lab[..., 0], 0, 100, out=lab[..., 0])
    rgb = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    rgb *= np.float32(255)
    rgb += np.float32(0.5)
    np.clip(rgb, 0, 255, out=rgb)
    result = rgb.astype(np.uint8)
    od = _od_lut(background_intensity)[image]
    return _blend_background(result, image, od)


# ---------------------------------------------------------------------------------------- augmentation
def augment_stains(image, alpha, beta, stain_matrix=REFERENCE_STAIN_MATRIX, background_intensity=245):
    """Perturb stain concentrations (Tellez et al. 2018): ``C' = C * alpha + beta`` per stain.

    The change is applied to the OD, ``OD' = OD + (C' - C) @ stain_matrix``, so the part of each pixel
    outside the stain plane is kept and ``alpha = 1, beta = 0`` is the identity. Background pixels are
    blended back to the input (glass stays glass).
    """
    image = _check_rgb(image, "augment_stains")
    m = _as_matrix(stain_matrix, None, "stain_matrix")
    try:
        alpha = np.asarray(alpha, np.float32).reshape(-1)
        beta_ = np.asarray(beta, np.float32).reshape(-1)
    except (TypeError, ValueError):
        raise ParameterError(f"augment_stains: alpha and beta must be numbers, got {alpha!r} and {beta!r}") from None
    for name, v in (("alpha", alpha), ("beta", beta_)):
        if v.size not in (1, len(m)) or not np.all(np.isfinite(v)):
            raise ParameterError(f"augment_stains: {name} must be one finite number or one per stain "
                                 f"({len(m)}), got {v.tolist()}")
    od = _od_lut(background_intensity)[image]
    flat = od.reshape(-1, 3)
    c = _concentrations(flat, m, "nnls")
    new = c * alpha + beta_
    np.maximum(new, 0, out=new)
    new -= c
    out_od = flat + new @ m.astype(np.float32)
    result = od_to_rgb(out_od, background_intensity).reshape(image.shape)
    return _blend_background(result, image, od)


# ---------------------------------------------------------------------------------------- deconvolution
def _skimage_matrices():
    from skimage.color import rgb_from_hed
    return np.asarray(rgb_from_hed, dtype=np.float64)


_STAIN_INDEX = {"hematoxylin": 0, "eosin": 1, "dab": 2}
_SK_LUT = (-np.log(np.maximum(np.arange(256, dtype=np.float64) / 255.0, 1e-6))).astype(np.float32)


def _complete_matrix(m):
    """A (3, 3) stain matrix: a third row orthogonal to two given stains (as scikit-image's docs do), so that
    the two stains' concentrations are their least-squares fit (a third row that is not orthogonal, e.g. the
    cross product's absolute value, would leak part of each pixel's residual into them)."""
    m = np.asarray(m, dtype=np.float64)
    if m.shape == (2, 3):
        third = np.cross(m[0], m[1])
        n = np.linalg.norm(third)
        third = third / n if n > 1e-12 else np.array([0.0, 0.0, 1.0])
        m = np.vstack([m, third])
    if m.shape != (3, 3):
        raise ParameterError(f"stain matrix must be (3, 3) or (2, 3) (rows = stain OD vectors), got {m.shape}")
    if not np.all(np.isfinite(m)) or np.linalg.cond(m) > 1e8:
        raise ParameterError("stain matrix is singular or not finite: its stain vectors must be independent")
    return m


def color_deconvolution(image, matrix=None):
    """Colour deconvolution (Ruifrok & Johnston 2001) with scikit-image's conventions.

    ``OD = -ln(max(I / 255, 1e-6))`` and ``C = OD @ inv(matrix)``, clipped at 0, where ``matrix`` has one
    row per stain (``skimage.color.rgb_from_hed`` by default; a (2, 3) matrix gets a third orthogonal
    row). ``C`` is scikit-image's ``rgb2hed`` times ``ln(1e6)`` (natural OD units).

    Returns
    -------
    (h, w, 3) float32 concentrations.
    """
    image = _check_rgb(image, "color_deconvolution")
    m = _complete_matrix(_skimage_matrices() if matrix is None else matrix)
    inv = np.linalg.inv(m).astype(np.float32)
    c = _SK_LUT[image].reshape(-1, 3) @ inv
    np.maximum(c, 0, out=c)
    return c.reshape(image.shape)


def _render_stain(conc, row):
    """RGB image of one stain alone: ``255 * exp(-c * row)`` (scikit-image's ``hed2rgb``), uint8."""
    od = conc[..., None] * np.asarray(row, np.float32)
    out = np.exp(-od)
    out *= np.float32(255)
    out += np.float32(0.5)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


# ---------------------------------------------------------------------------------------- slide fitting
def slide_tissue_sample(slide, max_size=2048):
    """A low-resolution RGB sample of a slide and its tissue mask (or None).

    The slide thumbnail (``max_size`` pixels on its long side); the mask is the slide's ``"tissue"`` mask
    resized to the thumbnail when the slide has one with any tissue, else None (the estimators then keep
    the non-white pixels themselves).
    """
    thumb = np.asarray(slide.thumbnail(max_size))
    if thumb.ndim == 3 and thumb.shape[2] == 4:
        thumb = thumb[:, :, :3]
    thumb = np.ascontiguousarray(thumb)
    mask = None
    sm = getattr(slide, "masks", {}).get("tissue")
    if sm is not None:
        w0, h0 = slide.dimensions
        m = sm.crop(0, 0, w0, h0, (thumb.shape[1], thumb.shape[0])) > 0
        if np.count_nonzero(m) >= MIN_ESTIMATION_PIXELS:
            mask = m
    return thumb, mask


#: full-resolution regions (count, side in pixels) that slide fits take stain maxima and colour statistics from
#: (16 regions missed a 2 x 2 mosaic of CMU-1's tissue colour by 5 L* units: the mosaic's tissue came out 4 units
#: off Reinhard's target where CMU-1's own landed within 1)
FIT_REGIONS, FIT_REGION_SIZE = 64, 256


def slide_full_resolution_sample(slide, thumb, mask=None, background_intensity=245, beta=0.15,
                                 n=FIT_REGIONS, size=FIT_REGION_SIZE):
    """Level-0 regions at tissue of the slide, side by side in one RGB image (``size`` x ``n * size``), or None.

    A thumbnail's pixels are averages of many: their concentration maxima and colour spread are far below
    the tiles' (a 40x slide's thumbnail averages ~50 x 50 pixels), so statistics that the tiles are scaled
    by are taken from full-resolution pixels. Regions are centred on tissue pixels of the thumbnail
    (``mask``, else stained pixels), evenly spread over them."""
    if not hasattr(slide, "read_region"):
        return None
    if mask is not None:
        sel = np.asarray(mask, bool)
    else:
        od = _od_lut(background_intensity)[thumb]
        sel = np.all(od >= beta, axis=-1)
    idx = np.flatnonzero(sel)
    if idx.size == 0:
        return None
    w0, h0 = slide.dimensions
    th, tw = sel.shape
    if w0 / tw < 2 and h0 / th < 2:
        return None  # the thumbnail is (nearly) full resolution already
    picks = idx[np.linspace(0, idx.size - 1, min(n, idx.size)).round().astype(int)]
    side = int(min(size, w0, h0))
    parts = []
    for k in picks:
        ty, tx = divmod(int(k), tw)
        cx, cy = (tx + 0.5) * w0 / tw, (ty + 0.5) * h0 / th
        x = int(min(max(cx - side / 2, 0), w0 - side))
        y = int(min(max(cy - side / 2, 0), h0 - side))
        try:  # (through earlier pixel-changing steps when the slide is a view of what they leave)
            region = np.asarray(slide.read_region((x, y), 0, (side, side)))
        except Exception as e:  # noqa: BLE001 - a step that cannot run on a region: the thumbnail's statistics
            if not hasattr(slide, "_steps"):
                raise
            import warnings

            warnings.warn(f"{getattr(slide, 'path', 'the slide')}: full-resolution regions could not be run "
                          f"through the steps before this one ({type(e).__name__}: {e}); statistics from the "
                          "thumbnail instead", stacklevel=3)
            return None
        if region.ndim == 3 and region.shape[2] >= 3:
            parts.append(region[:, :, :3])
    return np.ascontiguousarray(np.concatenate(parts, axis=1)) if parts else None


def _tile_mask(tile):
    m = tile.masks.get("tissue") if getattr(tile, "masks", None) else None
    if m is not None and np.asarray(m).shape == tile.image.shape[:2] and np.any(m):
        return m
    return None


#: a tile's own stain estimate is H&E-like when every OD component of both vectors is at least this (real H&E
#: tiles: >= 0.078 on CMU-1, MoNuSeg and the he_patches; black ink: a blue OD of 0) ...
MIN_STAIN_COMPONENT = 0.03
#: ... and the two vectors' cosine at most this (real tiles <= 0.966; ink 0.993)
MAX_TILE_STAIN_COSINE = 0.98


#: a tile's own CIELAB spread (Reinhard) below this in any channel is one flat colour, not H&E (real tiles:
#: >= 3.3 on CMU-1, MoNuSeg and the he_patches; black ink 0.7)
MIN_TILE_LAB_STD = 2.5


def _he_like(m) -> bool:
    m = np.asarray(m, np.float64)
    return bool(m.min() >= MIN_STAIN_COMPONENT and float(m[0] @ m[1]) <= MAX_TILE_STAIN_COSINE)


def _enough_tissue(image, background_intensity, beta):
    od = _od_lut(background_intensity)[image]
    n = np.count_nonzero(np.all(od >= beta, axis=-1))
    return n >= max(MIN_ESTIMATION_PIXELS, MIN_TILE_TISSUE_FRACTION * image.shape[0] * image.shape[1])


class _StainFitMixin:
    """Shared slide-level stain fitting (macenko / vahadane) for the H&E transforms."""

    #: OD threshold of transparent pixels (Macenko's beta)
    beta = 0.15

    def _est_kwargs(self):
        return dict(background_intensity=getattr(self, "background_intensity", 245), beta=self.beta,
                    alpha=100 - getattr(self, "angular_percentile", 99),
                    luminosity_threshold=getattr(self, "luminosity_threshold", 0.8),
                    regularizer=getattr(self, "regularizer", 0.1),
                    max_c_percentile=getattr(self, "max_c_percentile", 99))

    def _fit_image(self, image, method, mask=None):
        """(matrix, max concentrations) of an image, or raise StainEstimationError."""
        k = self._est_kwargs()
        return fit_stains(image, method, k["background_intensity"], k["beta"], k["alpha"],
                           k["luminosity_threshold"], k["regularizer"], k["max_c_percentile"], mask=mask,
                           seed=getattr(self, "seed", None))

    def _slide_samples(self, slide):
        """(thumbnail, its tissue mask, full-resolution tissue regions or None) of a slide, read once for a fit."""
        thumb, mask = slide_tissue_sample(slide)
        k = self._est_kwargs()
        return thumb, mask, slide_full_resolution_sample(slide, thumb, mask, k["background_intensity"], k["beta"])

    def _fit_slide_stains(self, slide, method, samples=None):
        """The slide's stains, once: the matrix from its thumbnail, the maximum concentrations from
        full-resolution tissue regions (:func:`slide_full_resolution_sample`; the thumbnail's when there are
        none); None when it has too little tissue. ``samples``: :meth:`_slide_samples`, when read already."""
        thumb, mask, sample = samples if samples is not None else self._slide_samples(slide)
        try:
            m, mc = self._fit_image(thumb, method, mask)
            if not self._he_like_fit(thumb, method, mask, m):  # as a tile's own fit is checked (a few hundred
                # averaged pixels of a little tissue gave two stain vectors of cosine 0.986: every tile of the slide
                # was normalised by them, 35 grey levels from the same tissue normalised by CMU-1's fit)
                raise StainEstimationError(f"the thumbnail's stain vectors are not H&E-like (cosine "
                                           f"{float(np.asarray(m)[0] @ np.asarray(m)[1]):.3f})")
        except StainEstimationError:
            # sparse tissue (biopsy fragments) averages away in a thumbnail: the full-resolution regions at it
            # (each tile then estimated its own matrix, silently: one slide normalised by many matrices)
            try:
                if sample is None:
                    raise StainEstimationError("no full-resolution tissue regions")
                m, mc = self._fit_image(sample, method)
                if not self._he_like_fit(sample, method, None, m):
                    raise StainEstimationError("the full-resolution tissue's stain vectors are not H&E-like either")
                return m, mc
            except StainEstimationError as e:
                warnings.warn(f"{getattr(slide, 'path', 'the slide')}: too little stained tissue to estimate the "
                              f"slide's stains once ({e}); each tile with enough stain uses its own, the rest "
                              "pass unchanged", UserWarning, stacklevel=3)
                return None
        k = self._est_kwargs()
        if sample is not None:
            try:
                mc = stain_maxima(sample, m, method, k["background_intensity"], k["beta"], k["max_c_percentile"])
            except StainEstimationError:
                pass
        return m, mc

    def _tile_stains(self, image, method, tile=None):
        """The source (matrix, max concentrations) for one tile: the slide's, else the tile's, else None."""
        fitted = getattr(self, "slide_stains_", None)
        if fitted is not None:
            return fitted
        if _enough_tissue(image, getattr(self, "background_intensity", 245), self.beta):
            mask = _tile_mask(tile) if tile is not None else None
            try:
                m, mc = self._fit_image(image, method, mask)
            except StainEstimationError:
                return None
            if self._he_like_fit(image, method, mask, m):
                return m, mc
        return None

    def _he_like_fit(self, image, method, mask, m) -> bool:
        """Whether a fit's stain matrix ``m`` of ``image`` is H&E's (:func:`_he_like`). Vahadane's two vectors lie
        closer together than Macenko's on the same pixels (cosine up to 0.983 on real H&E, where the limit was set
        on Macenko's): its fit is H&E when Macenko's of the same pixels is."""
        if _he_like(m):
            return True
        if method == "vahadane" and np.asarray(m).min() >= MIN_STAIN_COMPONENT:
            try:
                return _he_like(self._fit_image(image, "macenko", mask)[0])
            except StainEstimationError:
                return False
        return False


# ---------------------------------------------------------------------------------------- transforms
class StainNormalizationHE(_StainFitMixin, Transform):
    """Normalise H&E staining to a reference (Macenko, Vahadane or Reinhard), or render H or E alone.

    Parameters
    ----------
    target : {"normalize", "hematoxylin", "eosin"}
        ``"normalize"``: map to the reference stain matrix and maximum concentrations (Reinhard: to the
        reference CIELAB statistics); ``"hematoxylin"`` / ``"eosin"``: an RGB image of that stain alone,
        in the reference's colours (macenko / vahadane only).
    stain_estimation_method : {"macenko", "vahadane", "reinhard"}
    background_intensity : float
        ``Io``, the glass intensity of the OD (torchstain uses 240).
    luminosity_threshold : float
        Tissue pixels for Vahadane and Reinhard: CIELAB ``L / 100`` below it.
    angular_percentile : float
        Macenko's robust extreme angles, the ``100 - p`` and ``p`` percentiles (99: Macenko's alpha = 1).
    regularizer : float
        Vahadane's sparsity weight (lambda).
    max_c_percentile : float
        Percentile of the concentrations taken as their maxima.
    seed : int, optional
        Seed of Vahadane's pixel subsample and dictionary learning (None: 0).
    reference : dict, optional
        The target, as :meth:`fit_to_reference` sets it: ``{"stain_matrix": 2 x 3, "max_concentrations":
        2}`` (Macenko, Vahadane) or ``{"lab_means": 3, "lab_stds": 3}`` (Reinhard). A parameter like the
        others, so a fitted target is saved with the pipeline (YAML, provenance) and a run with another
        target is not taken for a finished one on ``resume``.

    The reference is Macenko's (:data:`REFERENCE_STAIN_MATRIX`, :data:`REFERENCE_MAX_CONCENTRATIONS`;
    Reinhard: :data:`REFERENCE_LAB_MEANS` / ``_STDS``) until :meth:`fit_to_reference` fits it to an image.
    :meth:`fit_slide` estimates the source stains once per slide from its thumbnail (inside the slide's
    ``"tissue"`` mask when it has one); every tile then uses them. Without ``fit_slide`` a tile with
    enough tissue (5 % of its pixels stained) is estimated on its own, any other tile is treated as already
    in the reference stains; glass always passes unchanged. The slide's fitted stains (``slide_stains_``)
    are not part of :meth:`to_dict`: they are estimated again for each slide.

    Examples
    --------
    >>> norm = StainNormalizationHE().fit_to_reference(target_rgb)     # doctest: +SKIP
    >>> norm.fit_slide(slide); norm.apply(tile)                        # doctest: +SKIP
    """

    slide_types = ("HE",)
    changes_image = True

    def __init__(self, target="normalize", stain_estimation_method="macenko", background_intensity=245,
                 luminosity_threshold=0.8, angular_percentile=99, regularizer=0.1, max_c_percentile=99,
                 seed=None, reference=None):
        if target not in _NAMED_TARGETS:
            raise ParameterError(f"StainNormalizationHE: target must be one of {_NAMED_TARGETS}, got {target!r}")
        if stain_estimation_method not in _METHODS:
            raise ParameterError(f"StainNormalizationHE: stain_estimation_method must be one of {_METHODS}, "
                                 f"got {stain_estimation_method!r}")
        if stain_estimation_method == "reinhard" and target != "normalize":
            raise ParameterError("StainNormalizationHE: Reinhard matches colour statistics and has no stain "
                                 f"matrix; target {target!r} needs stain_estimation_method 'macenko' or 'vahadane'")
        _check_number("StainNormalizationHE", "background_intensity", background_intensity)
        if not 0 < float(background_intensity) <= 256:
            raise ParameterError(f"StainNormalizationHE: background_intensity must be in (0, 256], got "
                                 f"{background_intensity!r}")
        _check_number("StainNormalizationHE", "angular_percentile", angular_percentile)
        if not 50 < float(angular_percentile) <= 100:
            raise ParameterError(f"StainNormalizationHE: angular_percentile must be in (50, 100], got "
                                 f"{angular_percentile!r}")
        _check_number("StainNormalizationHE", "luminosity_threshold", luminosity_threshold, 0, strict=True)
        if luminosity_threshold > 1:
            raise ParameterError(f"StainNormalizationHE: luminosity_threshold is a fraction of CIELAB L (0..1], "
                                 f"got {luminosity_threshold!r}")
        _check_number("StainNormalizationHE", "regularizer", regularizer, 0, strict=True)
        _check_number("StainNormalizationHE", "max_c_percentile", max_c_percentile, 0, strict=True)
        if max_c_percentile > 100:
            raise ParameterError(f"StainNormalizationHE: max_c_percentile is a percentile in (0, 100], got "
                                 f"{max_c_percentile!r}")
        _check_seed("StainNormalizationHE", seed)
        self.target = target
        self.stain_estimation_method = stain_estimation_method
        self.background_intensity = background_intensity
        self.luminosity_threshold = luminosity_threshold
        self.angular_percentile = angular_percentile
        self.regularizer = regularizer
        self.max_c_percentile = max_c_percentile
        self.seed = seed
        self.slide_stains_ = None       # (matrix (2, 3), max concentrations (2,)) or LAB (means, stds)
        self.target_stains_ = None
        self.reference = None
        if reference is not None:
            self._set_reference(reference)

    def get_params(self) -> dict:
        """The parameters; ``reference`` only when set, so that pipelines recorded before it existed (runs
        to resume, provenance) read the same."""
        params = super().get_params()
        if params.get("reference") is None:
            params.pop("reference", None)
        return params

    def _set_reference(self, reference):
        """Take a target given as ``reference`` (see the class parameters), checked."""
        keys = ("lab_means", "lab_stds") if self._reinhard else ("stain_matrix", "max_concentrations")
        shapes = ((3,), (3,)) if self._reinhard else ((2, 3), (2,))
        if not isinstance(reference, dict) or set(reference) != set(keys):
            raise ParameterError(f"StainNormalizationHE: reference for {self.stain_estimation_method} is a mapping "
                                 f"with {' and '.join(keys)}, got {reference!r}")
        try:
            arrays = tuple(np.asarray(reference[k], np.float64) for k in keys)
        except (TypeError, ValueError):
            arrays = None
        if arrays is None or any(a.shape != sh or not np.all(np.isfinite(a)) for a, sh in zip(arrays, shapes)):
            raise ParameterError(f"StainNormalizationHE: reference {keys} must be finite numbers of shapes {shapes}, "
                                 f"got {reference!r}")
        if np.any(arrays[1] <= 0):
            raise ParameterError(f"StainNormalizationHE: reference {keys[1]} must be positive, got {arrays[1].tolist()}")
        if not self._reinhard:
            m, order, norms = _checked_he_matrix(arrays[0], "StainNormalizationHE: reference stain_matrix")
            # the maxima go with their rows: reordered as the rows are, and in units of the unit rows (an
            # optical density c * v is (c * |v|) * v / |v|); eosin given first made 40 grey levels of error.
            # A reference in that form already (a pipeline read back from its YAML) is kept bit for bit:
            # normalising unit rows again moved the last bits, and the reloaded pipeline was not the one that
            # ran (resume refused it)
            if not (order == [0, 1] and np.all(np.abs(norms - 1) <= 1e-12)
                    and np.allclose(m, arrays[0], rtol=0, atol=1e-12)):
                arrays = (m, (arrays[1] * norms)[order])
        self.target_stains_ = arrays
        self.reference = {k: a.tolist() for k, a in zip(keys, arrays)}

    # ------------------------------------------------------------------ fitting
    @property
    def _reinhard(self):
        return self.stain_estimation_method == "reinhard"

    def _target(self):
        if self.target_stains_ is not None:
            return self.target_stains_
        if self._reinhard:
            return REFERENCE_LAB_MEANS, REFERENCE_LAB_STDS
        return REFERENCE_STAIN_MATRIX, REFERENCE_MAX_CONCENTRATIONS

    def fit_to_reference(self, image, mask=None):
        """Fit the target (stain matrix and max concentrations, or LAB statistics) to a reference image.

        Raises StainEstimationError when the image has too little tissue. Returns ``self``.
        """
        image = _check_rgb(np.asarray(image), "StainNormalizationHE.fit_to_reference")
        if self._reinhard:
            means, stds = lab_stats(image, mask, self.luminosity_threshold)
            self._set_reference({"lab_means": means, "lab_stds": stds})
        else:
            matrix, maxc = self._fit_image(image, self.stain_estimation_method, mask)
            self._set_reference({"stain_matrix": matrix, "max_concentrations": maxc})
        return self

    def fit_slide(self, slide):
        """Estimate the slide's source stains once: the stain matrix from its thumbnail (and ``"tissue"`` mask),
        the maximum concentrations (Reinhard: the colour statistics) from full-resolution tissue regions."""
        if self._reinhard:
            thumb, mask, sample = self._slide_samples(slide)
            self.slide_stains_ = None
            for image, m in ((sample, None), (thumb, mask)):  # full-resolution colour spread, else the thumbnail's
                if image is None:
                    continue
                try:
                    self.slide_stains_ = lab_stats(image, m, self.luminosity_threshold)
                    break
                except StainEstimationError:
                    continue
        else:
            self.slide_stains_ = self._fit_slide_stains(slide, self.stain_estimation_method)

    # ------------------------------------------------------------------ running
    def F(self, image, tile=None):
        """Normalise one RGB image (uint8 in, uint8 out)."""
        image = _check_rgb(np.asarray(image), "StainNormalizationHE")
        if self._reinhard:
            tm, ts = self._target()
            src = self.slide_stains_
            if src is None:
                if not _enough_tissue(image, self.background_intensity, self.beta):
                    return image.copy()  # too little tissue to take statistics from: left as it is
                try:
                    src = lab_stats(image, _tile_mask(tile) if tile is not None else None,
                                    self.luminosity_threshold)
                except StainEstimationError:
                    return image.copy()
                if float(np.min(src[1])) < MIN_TILE_LAB_STD:  # one flat colour (ink, padding): not H&E
                    return image.copy()
            return reinhard_normalize(image, tm, ts, src[0], src[1], self.luminosity_threshold,
                                      self.background_intensity)
        dst, dst_max = self._target()
        src = self._tile_stains(image, self.stain_estimation_method, tile)
        if src is None:  # too little tissue, or not H&E-like (ink, padding): taken as in the reference stains,
            if self.target == "normalize":  # so left as it is, or one stain of it rendered
                return image.copy()
            src = (dst, dst_max)
        return normalize_stains(image, src[0], src[1], dst, dst_max, target=self.target,
                                method=self.stain_estimation_method,
                                background_intensity=self.background_intensity, beta=self.beta)

    def apply(self, tile):
        tile.image = self.F(tile.image, tile)


class StainSeparation(Transform):
    """Colour deconvolution: one stain of an H&E or IHC image, as an RGB rendering or a concentration.

    Parameters
    ----------
    stain : {"hematoxylin", "eosin", "dab"} or int
        The stain (row 0, 1, 2 of the matrix).
    stain_matrix : (3, 3) or (2, 3) list, optional
        Rows = stain OD vectors (scikit-image's ``rgb_from_*`` convention; a third orthogonal row completes
        a (2, 3) matrix), scaled to unit length. Default: ``skimage.color.rgb_from_hed`` (hematoxylin,
        eosin, DAB), as it is.
    output : {"image", "concentration"}
        ``"image"``: ``tile.image`` becomes an (h, w, 3) uint8 RGB rendering of that stain alone (as
        scikit-image's ``hed2rgb``); ``"concentration"``: an (h, w, 1) uint8 image
        ``round(clip(c, 0, 3.98) * 64)`` of the stain's concentration ``c`` in natural OD units
        (:data:`CONCENTRATION_SCALE` = 64 grey levels per OD unit; ``c / ln(1e6)`` is scikit-image's
        ``rgb2hed`` value).
    """

    slide_types = ("HE", "IHC")
    changes_image = True

    def __init__(self, stain="hematoxylin", stain_matrix=None, output="image"):
        if isinstance(stain, str):
            if stain.lower() not in _STAIN_INDEX:
                raise ParameterError(f"StainSeparation: stain must be one of {list(_STAIN_INDEX)} or a row index, "
                                     f"got {stain!r}")
        elif isinstance(stain, (bool, np.bool_)) or not isinstance(stain, (int, np.integer)) or not 0 <= int(stain) <= 2:
            raise ParameterError(f"StainSeparation: stain index must be 0, 1 or 2, got {stain!r}")
        if output not in ("image", "concentration"):
            raise ParameterError(f"StainSeparation: output must be 'image' or 'concentration', got {output!r}")
        if stain_matrix is not None:
            m = _as_matrix(stain_matrix, None, "StainSeparation stain_matrix")
            if np.any(np.max(m, axis=1) <= 0):  # a stain absorbs: a row with nothing positive is negated or empty
                # (a residual row, as scikit-image's cross products, may mix signs)
                raise ParameterError(f"StainSeparation: stain_matrix rows are stains' optical densities, each with "
                                     f"a positive part (not negated, not all 0); got {m.tolist()}")
            _complete_matrix(m)
            k = _STAIN_INDEX[stain.lower()] if isinstance(stain, str) else int(stain)
            if k >= len(m):  # the third row of a two-stain matrix is a made-up residual, not a stain
                raise ParameterError(f"StainSeparation: stain {stain!r} is row {k} but the matrix has {len(m)} "
                                     "stain rows; give a 3-row matrix (e.g. hematoxylin, eosin, DAB)")
        self.stain = stain
        self.stain_matrix = stain_matrix
        self.output = output

    @property
    def _index(self):
        return _STAIN_INDEX[self.stain.lower()] if isinstance(self.stain, str) else int(self.stain)

    def channel_names_out(self, names):
        """``output="concentration"`` leaves one channel, named after its stain (later steps and the stored
        tiles said R, G, B, and a step fitted after it took the tile for RGB); an image stays RGB."""
        if self.output == "image":
            return names
        return [f"{self.stain.lower() if isinstance(self.stain, str) else f'stain_{int(self.stain)}'}_concentration"]

    @property
    def slide_type_out(self):
        """Concentrations are one channel of "how much stain", as a fluorescence channel is ("IF"), not RGB."""
        return "IF" if self.output == "concentration" else None

    def _matrix(self):
        if self.stain_matrix is None:
            return _complete_matrix(_skimage_matrices())
        # unit rows (Ruifrok & Johnston): concentrations in OD units whatever the rows' scale (rows x 100 gave
        # concentrations 100 times too small)
        m = np.asarray(self.stain_matrix, np.float64)
        return _complete_matrix(m / np.linalg.norm(m, axis=1, keepdims=True))

    def F(self, image):
        m = self._matrix()
        k = self._index
        c = color_deconvolution(image, m)[..., k]
        if self.output == "image":  # (the residual row of a two-stain matrix may point to negative OD)
            return _render_stain(c, np.abs(m[k]))
        out = np.clip(c * np.float32(CONCENTRATION_SCALE) + np.float32(0.5), 0, 255)
        return out.astype(np.uint8)[..., None]

    def apply(self, tile):
        tile.image = self.F(tile.image)


class StainAugmentation(_StainFitMixin, Transform):
    """Random stain perturbation in Macenko's H&E space (Tellez et al. 2018), reproducible per tile.

    For each tile and each stain, ``alpha ~ U(1 - sigma1, 1 + sigma1)`` and ``beta ~ U(-sigma2, sigma2)``;
    concentrations become ``C * alpha + beta`` (:func:`augment_stains`). The random numbers come from
    ``numpy.random.default_rng([seed, x, y])`` of the tile's level-0 coordinates, so a tile gets the
    same perturbation whatever order or executor runs it.

    Parameters
    ----------
    sigma1, sigma2 : float
        Ranges of the multiplicative and additive perturbations.
    seed : int
    stain_matrix : (2, 3) list, optional
        Fixed H&E matrix (rows H, E). Default: the slide's, estimated once by :meth:`fit_slide` (Macenko),
        else the tile's own when it has enough tissue, else the reference matrix.
    """

    slide_types = ("HE",)
    changes_image = True
    random = True
    background_intensity = 245

    def __init__(self, sigma1=0.1, sigma2=0.1, seed=0, stain_matrix=None):
        _check_number("StainAugmentation", "sigma1", sigma1, 0)
        _check_number("StainAugmentation", "sigma2", sigma2, 0)
        _check_seed("StainAugmentation", seed)
        # checked as a reference matrix is; used with unit rows, hematoxylin first (kept as given for YAML)
        self._matrix = None if stain_matrix is None else \
            _checked_he_matrix(stain_matrix, "StainAugmentation: stain_matrix")[0]
        self.sigma1 = sigma1
        self.sigma2 = sigma2
        self.seed = seed
        self.stain_matrix = stain_matrix
        self.slide_stains_ = None

    def fit_slide(self, slide):
        if self.stain_matrix is None:
            self.slide_stains_ = self._fit_slide_stains(slide, "macenko")

    def _rng(self, coords):
        x, y = (int(v) for v in coords)
        # every bit of the seed and coordinates (signs as a word of their own): no two tiles or seeds alike
        return np.random.default_rng([int(self.seed or 0), abs(x), abs(y), (x < 0) * 2 + (y < 0)])

    def F(self, image, coords=(0, 0), tile=None):
        """Augment one image with the random draw of ``coords``."""
        image = _check_rgb(np.asarray(image), "StainAugmentation")
        rng = self._rng(coords)
        alpha = rng.uniform(1 - self.sigma1, 1 + self.sigma1, 2)
        beta = rng.uniform(-self.sigma2, self.sigma2, 2)
        if self._matrix is not None:
            m = self._matrix
        else:
            src = self._tile_stains(image, "macenko", tile)
            m = REFERENCE_STAIN_MATRIX if src is None else src[0]
        return augment_stains(image, alpha, beta, m, self.background_intensity)

    def apply(self, tile):
        tile.image = self.F(tile.image, tile.coords, tile)

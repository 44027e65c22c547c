"""Marker positivity per channel: manual thresholds, Otsu, or a two-component Gaussian mixture.

:func:`gate` turns a cell table (an AnnData with one row per cell and one column per channel) into a
boolean layer ``adata.layers["positive"]``: cell *i* is positive for channel *c* when its intensity is
strictly greater than the threshold of *c* on the cell's slide. The thresholds, in the native units of
the intensities, are kept in ``adata.uns["gating"]`` so that every call is reproducible and can be read;
:func:`gating_table` gives them as a table (slides x channels).

Example
-------
>>> gate(adata, method="otsu")                                   # doctest: +SKIP
>>> gate(adata, method="manual", thresholds={"CD3": 12.0}, channels=["CD3"])       # doctest: +SKIP
>>> gate(adata, method="manual", channels=["CD3"],
...      thresholds={"slide1": {"CD3": 12.0}, "slide2": {"CD3": 9.5}})  # doctest: +SKIP
>>> gate(adata, thresholds={"CD3": 12.0})   # Otsu for every channel but CD3    # doctest: +SKIP
"""
from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from histoflow.errors import HistoflowError

__all__ = ["CellsError", "GatingWarning", "gate", "gating_table", "threshold_otsu_log", "threshold_gmm_log",
           "resolve_channel", "normalize_name"]

METHODS = ("otsu", "gmm", "manual")
GMM_MAX_SAMPLES = 100_000


class CellsError(HistoflowError, ValueError):
    """A cell table, a gating request or a phenotype rule table is invalid; the message says what and where."""


class GatingWarning(UserWarning):
    """A channel could not be gated meaningfully (for example it is constant on a slide)."""


# ----------------------------------------------------------------------------------------------------------
# channel names
# ----------------------------------------------------------------------------------------------------------

_MASS_SUFFIX = re.compile(r"\s*\(\s*\d+(?:\.\d+)?\s*\)\s*$")   # MIBI page names: "CD45 (169)"


def normalize_name(name: str) -> str:
    """The loose form of a channel or marker name used for matching.

    A trailing mass tag such as ``" (169)"`` is dropped, then everything but letters and digits is
    removed and the rest lower-cased: ``"Pan-Keratin"``, ``"PanKeratin (171)"`` and ``"pan keratin"``
    all become ``"pankeratin"``.
    """
    name = _MASS_SUFFIX.sub("", str(name))
    return re.sub(r"[^0-9a-z]", "", name.lower())


def resolve_channel(name: str, channels: Sequence[str], aliases: Sequence[str] = ()) -> str | None:
    """Find the channel that ``name`` (or one of its ``aliases``) means in ``channels``.

    An exact match wins; otherwise names are compared in their :func:`normalize_name` form. Returns
    ``None`` when nothing matches; raises :class:`CellsError` when a loose match is ambiguous.
    """
    channels = [str(c) for c in channels]
    candidates = [str(name)] + [str(a) for a in aliases]
    for cand in candidates:
        if cand in channels:
            return cand
    loose: dict[str, list[str]] = {}
    for c in channels:
        loose.setdefault(normalize_name(c), []).append(c)
    for cand in candidates:
        hits = loose.get(normalize_name(cand), [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise CellsError(f"marker {name!r} matches several channels ({', '.join(hits)}); "
                             "name the channel exactly")
    return None


# ----------------------------------------------------------------------------------------------------------
# automatic thresholds (on log1p intensities)
# ----------------------------------------------------------------------------------------------------------

def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def threshold_otsu_log(values: np.ndarray, log: bool = True) -> float:
    """Otsu's threshold of ``values`` (computed on ``log1p(values)`` when ``log``), in native units.

    Returns ``+inf`` when the values have fewer than two distinct finite levels.
    """
    from skimage.filters import threshold_otsu

    v = _finite(values)
    if v.size == 0 or v.min() == v.max():
        return math.inf
    t = float(threshold_otsu(np.log1p(v) if log else v))
    return float(np.expm1(t)) if log else t


def threshold_gmm_log(values: np.ndarray, log: bool = True, max_samples: int = GMM_MAX_SAMPLES,
                      random_state: int = 0) -> float:
    """Threshold from a two-component Gaussian mixture on ``log1p(values)`` (or the raw values), in native units.

    A :class:`sklearn.mixture.GaussianMixture` with two components is fitted (on at most
    ``max_samples`` values drawn with a fixed seed). The threshold is the lowest intensity above the mean
    of the low component at which the posterior probability of the high component (the one with the
    larger mean) reaches 0.5, found on a fine grid and refined by bisection. The search starts at the
    low mean because, with unequal variances, the broader component also wins far out in the low tail.
    If the posterior never reaches 0.5 there, the threshold is the midpoint of the two means.

    Returns ``+inf`` when the values have fewer than two distinct finite levels.
    """
    from sklearn.mixture import GaussianMixture

    v = _finite(values)
    if v.size == 0 or v.min() == v.max():
        return math.inf
    x = np.log1p(v) if log else v
    if x.size > max_samples:
        x = np.random.default_rng(random_state).choice(x, size=max_samples, replace=False)
    if np.unique(x).size < 2:
        return math.inf
    gmm = GaussianMixture(n_components=2, covariance_type="full", random_state=random_state, n_init=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # ConvergenceWarning on nearly discrete data
        gmm.fit(x.reshape(-1, 1))
    means = gmm.means_.ravel()
    lo, hi = int(np.argmin(means)), int(np.argmax(means))
    if lo == hi:
        return math.inf

    def p_high(z):
        return gmm.predict_proba(np.asarray(z, dtype=np.float64).reshape(-1, 1))[:, hi]

    grid = np.linspace(means[lo], x.max(), 2049)
    p = p_high(grid)
    above = np.nonzero(p >= 0.5)[0]
    if above.size == 0:
        t = 0.5 * (means[lo] + means[hi])
    elif above[0] == 0:
        t = grid[0]
    else:
        a, b = grid[above[0] - 1], grid[above[0]]
        for _ in range(40):                      # bisection on p_high(z) - 0.5
            m = 0.5 * (a + b)
            if p_high([m])[0] >= 0.5:
                b = m
            else:
                a = m
        t = b
    t = float(t)
    return float(np.expm1(t)) if log else t


_AUTO = {"otsu": threshold_otsu_log, "gmm": threshold_gmm_log}


# ----------------------------------------------------------------------------------------------------------
# gate
# ----------------------------------------------------------------------------------------------------------

def _matrix(adata, layer):
    if layer is None:
        X = adata.X
    else:
        if layer not in adata.layers:
            raise CellsError(f"layer {layer!r} is not in the cell table; layers: {sorted(adata.layers.keys())}")
        X = adata.layers[layer]
    if X is None:
        raise CellsError("the cell table has no intensities (adata.X is None); pass layer=...")
    try:
        import scipy.sparse as sp
        if sp.issparse(X):
            X = X.toarray()
    except ImportError:                          # pragma: no cover - scipy is a dependency
        pass
    return np.asarray(X)


def _parse_thresholds(thresholds, channels, slides):
    """Split user thresholds into ({channel: value} for all slides, {slide: {channel: value}})."""
    if thresholds is None:
        return {}, {}
    if not isinstance(thresholds, Mapping):
        raise CellsError("thresholds must be a mapping {channel: value} or {slide: {channel: value}}, "
                         f"not {type(thresholds).__name__}")
    slide_names = {str(s) for s in slides}

    def channel_of(name, where):
        ch = resolve_channel(name, channels)
        if ch is None:
            raise CellsError(f"threshold given for unknown channel {name!r}{where}; "
                             f"channels: {', '.join(channels)}")
        return ch

    def value_of(v, what):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise CellsError(f"threshold for {what} is not a number: {v!r}") from None
        if math.isnan(f):
            raise CellsError(f"threshold for {what} is NaN")
        return f

    common, per_slide = {}, {}
    for key, val in thresholds.items():
        if isinstance(val, Mapping):
            slide = str(key)
            if slide not in slide_names:
                raise CellsError(f"thresholds given for unknown slide {slide!r}; "
                                 f"slides: {', '.join(sorted(slide_names))}")
            per_slide[slide] = {channel_of(c, f" (slide {slide!r})"): value_of(v, f"{c!r} on slide {slide!r}")
                                for c, v in val.items()}
        else:
            common[channel_of(key, "")] = value_of(val, repr(key))
    return common, per_slide


def gate(adata, thresholds=None, method: str = "otsu", layer: str | None = None,
         channels: Sequence[str] | None = None, by: str | None = "slide", log: bool = True):
    """Mark each cell positive or negative for each channel.

    Parameters
    ----------
    adata : anndata.AnnData
        The cell table: one row per cell, ``var_names`` are channel names, ``X`` (or ``layer``) holds
        per-cell intensities in native units.
    thresholds : mapping, optional
        Manual thresholds in native units: ``{channel: value}`` applies to every slide,
        ``{slide: {channel: value}}`` to one slide; both forms may be mixed (a per-slide value wins).
        With ``method="otsu"``/``"gmm"`` a manual threshold overrides the automatic one for that channel;
        with ``method="manual"`` every gated channel needs one, on every slide.
    method : {"otsu", "gmm", "manual"}
        How thresholds are found for channels without a manual one. ``"otsu"``: Otsu's method
        (:func:`skimage.filters.threshold_otsu`); ``"gmm"``: the 0.5-posterior point of a two-component
        Gaussian mixture (see :func:`threshold_gmm_log`). Both run per slide (``by``) and per channel.
    layer : str, optional
        Layer to gate (for example ``"median"``); default ``adata.X``.
    channels : sequence of str, optional
        Channels to gate; default all. The others are never positive and are listed in
        ``adata.uns["gating"]["ungated"]``.
    by : str or None
        ``obs`` column that groups cells into slides, each gated separately; ``None`` gates all cells
        together (the group is then called ``"all"``).
    log : bool
        Find automatic thresholds on ``log1p`` intensities (they are converted back to native units).

    Returns
    -------
    numpy.ndarray
        The boolean positivity matrix, also stored as ``adata.layers["positive"]``. ``adata.uns["gating"]``
        becomes ``{"method", "slides", "channels", "thresholds", "sources", "ungated", "layer", "by", "log"}``:
        ``thresholds`` is a float array ``(len(slides), len(channels))`` and ``sources`` a string array of
        the same shape (``"otsu"``, ``"gmm"`` or ``"manual"``), rows in the order of ``slides``, columns in
        the order of ``channels`` (the gated ones). Arrays, not dictionaries keyed by channel name: names
        such as ``"CD45/PTPRC"`` survive ``write_h5ad`` (HDF5 would read the ``/`` as a group path).
        :func:`gating_table` reads them as a pandas table.

    Notes
    -----
    A cell is positive when its value is strictly greater than the threshold. A channel whose values are
    constant on a slide gets the threshold ``+inf`` there (no positive cell) and a :class:`GatingWarning`.
    NaN intensities are never positive.
    """
    if method not in METHODS:
        raise CellsError(f"unknown gating method {method!r}; choose one of {', '.join(METHODS)}")
    all_channels = [str(c) for c in adata.var_names]
    X = _matrix(adata, layer)
    if X.ndim != 2 or X.shape != (adata.n_obs, adata.n_vars):
        raise CellsError(f"intensities have shape {X.shape}, expected {(adata.n_obs, adata.n_vars)}")

    if channels is None:
        gated = list(all_channels)
    else:
        if isinstance(channels, str):
            channels = [channels]
        gated = []
        for c in channels:
            ch = resolve_channel(c, all_channels)
            if ch is None:
                raise CellsError(f"cannot gate unknown channel {c!r}; channels: {', '.join(all_channels)}")
            if ch not in gated:
                gated.append(ch)

    if by is None:
        groups = np.zeros(adata.n_obs, dtype=np.int64)
        slide_ids = ["all"]
    else:
        if by not in adata.obs.columns:
            raise CellsError(f"obs has no column {by!r} to group cells by slide; columns: "
                             f"{', '.join(map(str, adata.obs.columns)) or '(none)'}; pass by=None to gate "
                             "all cells together")
        keys = adata.obs[by].astype(str).to_numpy()
        slide_ids, groups = np.unique(keys, return_inverse=True)
        slide_ids = [str(s) for s in slide_ids]

    common, per_slide = _parse_thresholds(thresholds, all_channels, slide_ids)
    for ch in list(common) + [c for d in per_slide.values() for c in d]:
        if ch not in gated:
            raise CellsError(f"a threshold is given for channel {ch!r}, which is not among the gated channels "
                             f"({', '.join(gated)})")

    col = {c: i for i, c in enumerate(all_channels)}
    if log and method != "manual":
        # only channels that get an automatic threshold on some slide are taken to log1p
        auto = [ch for ch in gated if ch not in common and any(ch not in per_slide.get(g, {}) for g in slide_ids)]
        for ch in auto:
            v = X[:, col[ch]]
            if np.issubdtype(v.dtype, np.number) and np.nanmin(v, initial=0) < 0:
                raise CellsError(f"channel {ch!r} has negative intensities; log1p gating needs values >= 0 "
                                 "(pass log=False, or gate background-subtracted data on a non-negative layer)")

    positive = np.zeros((adata.n_obs, adata.n_vars), dtype=bool)
    table = np.zeros((len(slide_ids), len(gated)), dtype=np.float64)
    sources = np.empty((len(slide_ids), len(gated)), dtype=f"<U{max(len(m) for m in METHODS)}")
    for g, slide in enumerate(slide_ids):
        rows = np.nonzero(groups == g)[0]
        for j, ch in enumerate(gated):
            values = X[rows, col[ch]].astype(np.float64, copy=False)
            if ch in per_slide.get(slide, {}):
                t, src = per_slide[slide][ch], "manual"
            elif ch in common:
                t, src = common[ch], "manual"
            elif method == "manual":
                raise CellsError(f"method='manual' but no threshold is given for channel {ch!r} on slide "
                                 f"{slide!r}; give one, or restrict channels=...")
            else:
                t, src = _AUTO[method](values, log=log), method
                if math.isinf(t):
                    warnings.warn(f"channel {ch!r} is constant on slide {slide!r}: threshold set to +inf, "
                                  "no cell is positive", GatingWarning, stacklevel=2)
            table[g, j] = float(t)
            sources[g, j] = src
            with np.errstate(invalid="ignore"):
                positive[rows, col[ch]] = values > t

    adata.layers["positive"] = positive
    adata.uns["gating"] = {
        "method": method,
        "slides": list(slide_ids),
        "thresholds": table,
        "sources": sources,
        "channels": list(gated),
        "ungated": [c for c in all_channels if c not in gated],
        "layer": "X" if layer is None else str(layer),
        "by": "" if by is None else str(by),
        "log": bool(log),
    }
    return positive


def gating_table(adata, what: str = "thresholds"):
    """The thresholds (or, with ``what="sources"``, how each was found) of the last :func:`gate` call, as a
    :class:`pandas.DataFrame` with one row per slide and one column per gated channel.

    Also reads the ``{slide: {channel: value}}`` dictionaries that histoflow wrote before 2026-12.
    Raises CellsError when ``adata`` was not gated.
    """
    import pandas as pd

    if what not in ("thresholds", "sources"):
        raise CellsError(f"gating_table: what must be 'thresholds' or 'sources', not {what!r}")
    g = adata.uns.get("gating")
    if not isinstance(g, Mapping) or what not in g:
        raise CellsError("this cell table has not been gated (no adata.uns['gating']); run "
                         "histoflow.cells.gate(adata) first")
    values = g[what]
    if isinstance(values, Mapping):  # the older layout: {slide: {channel: value}}
        return pd.DataFrame.from_dict({str(k): dict(v) for k, v in values.items()}, orient="index")
    values = np.asarray(values)
    slides = [str(x) for x in np.asarray(g.get("slides", []), dtype=object).ravel()]
    channels = [str(x) for x in np.asarray(g.get("channels", []), dtype=object).ravel()]
    if values.shape != (len(slides), len(channels)):
        raise CellsError(f"adata.uns['gating'][{what!r}] has shape {values.shape}, expected "
                         f"{(len(slides), len(channels))} (slides x channels)")
    return pd.DataFrame(values.astype(str) if what == "sources" else values, index=slides, columns=channels)

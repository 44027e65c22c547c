"""Single-cell quantification: one row per cell, per-channel intensities and morphology.

:class:`QuantifyCells` measures the cells of a tile's instance mask on the worker (per channel mean,
median and max in native units; area, perimeter, eccentricity, solidity, major and minor axis; centroid
in level-0 pixels) and keeps them as the tile's cell table (:attr:`~histoflow.core.tile.Tile.cells`). The
engine gathers the tables in grid order and the transform turns them into one AnnData per slide
(``X`` = mean intensities, ``layers["median"]`` / ``layers["max"]``, ``var_names`` = channel names,
``obs`` = morphology + ``slide`` + ``tile``, ``obsm["spatial"]`` = level-0 centroids), stored in the h5path
(``/cells``) and readable by scanpy / squidpy once written as ``.h5ad``.

On brightfield H&E the channels are the hematoxylin and eosin optical densities (colour deconvolution
with the slide's stain matrix, or Macenko's reference).
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from ..errors import MaskError, ParameterError
from .base import Transform
from .filters import _check_name
from .objects import check_labels, present_ids, relabel_sequential

__all__ = ["QuantifyCells", "quantify_cells", "MORPHOLOGY"]

MORPHOLOGY = ("area", "perimeter", "eccentricity", "solidity", "major_axis_length", "minor_axis_length")
STATS = ("mean", "median", "max")


def quantify_cells(image, labels, stats=STATS, nuclei=None) -> dict:
    """Per-cell measurements of one image: a dict of column arrays, one row per cell, in order of their ids.

    ``label``: ``(n,)`` int64, each row's id in ``labels`` (ids need not be 1..n: row k is the k-th smallest id);
    ``mean`` / ``median`` / ``max``: ``(n, channels)`` float32 in the image's units; morphology columns
    ``(n,)`` in pixels; ``centroid``: ``(n, 2)`` (x, y) in pixels of ``image``; with ``nuclei`` (a label
    image with the same ids) also ``nucleus_area``.
    """
    from skimage.measure import regionprops_table

    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    labels = check_labels(labels, "quantify_cells: labels")
    if nuclei is not None:
        nuclei = check_labels(nuclei, "quantify_cells: nuclei")
    if labels.shape != image.shape[:2] or (nuclei is not None and np.shape(nuclei) != image.shape[:2]):
        shapes = f"{labels.shape}" + ("" if nuclei is None else f" and nuclei {np.shape(nuclei)}")
        raise ParameterError(f"quantify_cells: labels {shapes} must have the image's height and width "
                             f"{image.shape[:2]}")
    ids = present_ids(labels)
    if nuclei is None:
        labels = relabel_sequential(labels)
    else:
        labels, nuclei = relabel_sequential(labels, nuclei)
    n = int(labels.max(initial=0))
    c = image.shape[2]
    out = {"label": ids}  # the ids the rows measure (rows were unnamed)
    if n == 0:
        for s in stats:
            out[s] = np.zeros((0, c), np.float32)
        for k in MORPHOLOGY:
            out[k] = np.zeros(0, np.float32)
        out["centroid"] = np.zeros((0, 2), np.float64)
        if nuclei is not None:
            out["nucleus_area"] = np.zeros(0, np.float32)
        return out
    flat = labels.ravel()
    fg = np.flatnonzero(flat)  # background pixels take no part: often most of a tile
    lab = flat[fg]
    counts_i = np.bincount(lab, minlength=n + 1)[1:]
    counts = counts_i.astype(np.float64)
    # the pixels of each cell, contiguous in label order (stable: pixel order within a cell)
    order = np.argsort(lab, kind="stable")
    lab_sorted = lab[order]
    starts = np.concatenate([[0], np.cumsum(counts_i)[:-1]])
    lo, hi = starts + (counts_i - 1) // 2, starts + counts_i // 2  # the middle value(s)
    for s in stats:
        out[s] = np.empty((n, c), np.float32)
    for ch in range(c):
        v = image[..., ch].ravel()[fg]
        if "mean" in stats:
            out["mean"][:, ch] = np.bincount(lab, weights=v.astype(np.float64), minlength=n + 1)[1:] / counts
        vs = v[order]
        if "max" in stats:
            out["max"][:, ch] = np.maximum.reduceat(vs, starts)
        if "median" in stats:
            srt = _sorted_within(vs, lab_sorted)
            a, b = srt[lo], srt[hi]
            if srt.dtype.kind == "f" and srt.dtype.itemsize >= 4:  # np.median: the middle two's mean, in its dtype
                med = (a + b) / srt.dtype.type(2)
            elif srt.dtype.kind == "f":  # float16: the sum of the middle two may overflow (np.median uses float32)
                med = (a.astype(np.float32) + b) / np.float32(2)
            else:
                med = (a.astype(np.float64) + b) / 2.0
            if srt.dtype.kind == "f":  # NaN sorts last, so the middle was taken among the rest: np.median gives NaN
                med[np.logical_or.reduceat(np.isnan(vs), starts)] = np.nan
            out["median"][:, ch] = med
    props = regionprops_table(labels, properties=("label", "centroid") + MORPHOLOGY)
    for k in MORPHOLOGY:
        out[k] = np.asarray(props[k], np.float32)
    out["centroid"] = np.column_stack([props["centroid-1"], props["centroid-0"]]).astype(np.float64)
    if nuclei is not None:
        out["nucleus_area"] = np.bincount(np.asarray(nuclei).ravel(), minlength=n + 1)[1:n + 1].astype(np.float32)
    return out


def _sorted_within(values, groups):
    """``values`` (grouped: ``groups`` is sorted) with each group's values sorted, groups kept in place."""
    if values.dtype.kind in "ui" and values.dtype.itemsize <= 4:
        # one sort of 64-bit keys (group in the high bits, value in the low ones) instead of a lexsort
        v = values.astype(np.int64)
        if values.dtype.kind == "i":
            v -= np.iinfo(values.dtype).min
        key = (groups.astype(np.int64) << 33) | v
        key.sort()
        out = key & ((1 << 33) - 1)
        if values.dtype.kind == "i":
            out += np.iinfo(values.dtype).min
        return out.astype(values.dtype)
    return values[np.lexsort((values, groups))]


class QuantifyCells(Transform):
    """Measure the cells of a tile's instance mask into the slide's cell table (AnnData).

    Parameters
    ----------
    mask_name : str
        The instance mask to measure (``"cells"`` from :class:`SegmentCells`, ``"nuclei"`` from
        :class:`SegmentNuclei`, :class:`NucleusDetectionHE` or ``NucleusSegmentation``).
    nucleus_mask : str, optional
        A nucleus mask with the same ids (adds ``nucleus_area``).
    stats : list of str
        Intensity statistics per channel: any of ``"mean"`` (the AnnData ``X``), ``"median"``, ``"max"``.
    brightfield : {"auto", True, False}
        Measure hematoxylin and eosin optical densities instead of the raw channels (``"auto"``: when the
        tile is 8-bit RGB of a brightfield slide type).

    Areas and lengths in ``obs`` are in µm (µm²) when the slide's pixel size is known, else in pixels
    (``uns["histoflow"]["units"]`` says which).
    """

    changes_image = False
    reduces = True

    def __init__(self, mask_name="cells", nucleus_mask=None, stats=("mean", "median", "max"), brightfield="auto"):
        _check_name("QuantifyCells", "mask_name", mask_name)
        _check_name("QuantifyCells", "nucleus_mask", nucleus_mask, optional=True)
        if nucleus_mask == mask_name:
            raise ParameterError(f"QuantifyCells: nucleus_mask and mask_name must differ, both are {mask_name!r}")
        if isinstance(stats, str) or not isinstance(stats, (list, tuple)) or \
                not all(isinstance(v, str) for v in stats):
            raise ParameterError(f"QuantifyCells: stats is a list of names among {STATS} (with 'mean'), got {stats!r}")
        unknown = set(stats) - set(STATS)
        if unknown or "mean" not in stats:
            raise ParameterError(f"QuantifyCells: stats must include 'mean' and be among {STATS}, got {list(stats)}")
        if not (brightfield == "auto" or isinstance(brightfield, (bool, np.bool_))):
            raise ParameterError(f"QuantifyCells: brightfield must be 'auto', True or False, got {brightfield!r}")
        self.mask_name = mask_name
        self.nucleus_mask = nucleus_mask
        self.stats = list(stats)
        self.brightfield = brightfield
        self._reset()

    def _reset(self):
        self._tables, self._tiles = [], []
        self.channel_names_ = None
        self.slide_name_ = None
        self.stain_matrix_ = None
        self.mpp_ = None
        self.od_ = None
        self.source_ = None

    @property
    def masks_in(self):
        return (self.mask_name,) + ((self.nucleus_mask,) if self.nucleus_mask else ())

    @property
    def labels_out(self):
        return ("cell_count",)

    def fit_slide(self, slide):
        self._reset()
        self.slide_name_ = slide.name
        self.source_ = os.path.abspath(str(slide.path))  # the picture of phenotypes finds it from any folder
        self.mpp_ = float(slide.mpp[0]) if slide.mpp else None
        # areas take both sides of a pixel (they were mpp_x squared: half the area of 0.39 x 0.78 µm pixels)
        self.mpp_xy_ = (float(slide.mpp[0]), float(slide.mpp[1])) if slide.mpp else None
        if self.mpp_xy_ and abs(self.mpp_xy_[0] - self.mpp_xy_[1]) > 0.01 * max(self.mpp_xy_):
            warnings.warn(f"{slide.path}: its pixels are {self.mpp_xy_[0]:g} x {self.mpp_xy_[1]:g} µm, not square: "
                          "cell areas are exact, lengths (perimeter, axes) are measured in pixels of their geometric "
                          f"mean side ({np.sqrt(self.mpp_xy_[0] * self.mpp_xy_[1]):g} µm), an approximation",
                          stacklevel=3)
        self.channel_names_ = self.input_channel_names(slide)
        self.od_ = self._use_od(slide.slide_type.brightfield, slide.reader.dtype, len(self.channel_names_))
        if self.od_:
            from .stain import slide_tissue_sample, estimate_stain_matrix, StainEstimationError

            try:
                thumb, mask = slide_tissue_sample(slide)
                self.stain_matrix_ = estimate_stain_matrix(thumb, mask=mask)
            except StainEstimationError:
                self.stain_matrix_ = None

    def _use_od(self, brightfield, dtype, channels):
        if self.brightfield == "auto":
            return bool(brightfield) and np.dtype(dtype) == np.uint8 and channels in (3, 4)
        return bool(self.brightfield)

    def _channels(self, tile):
        image = np.asarray(tile.image)
        od = self.od_
        if od is None:
            od = self._use_od(tile.slide_type in ("HE", "IHC"), image.dtype, image.shape[2])
        if od:
            from .stain import REFERENCE_STAIN_MATRIX, separate_stains

            m = self.stain_matrix_ if self.stain_matrix_ is not None else REFERENCE_STAIN_MATRIX
            return separate_stains(image[..., :3], m)[..., :2], ["hematoxylin_od", "eosin_od"]
        names = self.channel_names_ or [f"channel_{i}" for i in range(image.shape[2])]
        return image, names

    def apply(self, tile):
        if self.mask_name not in tile.masks:
            raise MaskError(f"QuantifyCells: the tile has no mask {self.mask_name!r} (it has {sorted(tile.masks)})")
        image, _ = self._channels(tile)
        nuclei = tile.masks.get(self.nucleus_mask) if self.nucleus_mask else None
        what = f"QuantifyCells: mask {self.mask_name!r}"
        if nuclei is None:
            labels = relabel_sequential(tile.masks[self.mask_name], what=what)
        else:
            nuclei = check_labels(nuclei, f"QuantifyCells: mask {self.nucleus_mask!r}")
            labels, nuclei = relabel_sequential(tile.masks[self.mask_name], nuclei, what=what)
        # the stored masks take the table's numbering: row k is mask id k + 1
        tile.masks[self.mask_name] = labels
        if nuclei is not None:
            tile.masks[self.nucleus_mask] = nuclei
        cells = quantify_cells(image, labels, self.stats, nuclei)
        del cells["label"]  # 1..n: the masks were renumbered above, row k is mask id k + 1
        ds = float(tile.downsample)
        # pixel i of a tile at downsample ds covers level-0 [i*ds, (i+1)*ds): its centre is at (i + 0.5) ds - 0.5
        cells["centroid"] = (cells["centroid"] + 0.5) * ds - 0.5 + np.asarray(tile.coords, np.float64)
        tile.cells = cells
        tile.labels["cell_count"] = int(len(cells["centroid"]))

    # ------------------------------------------------------------------ the slide's table
    def collect(self, tile):
        if tile.cells is None:
            return
        n = len(tile.cells["centroid"])
        if n:
            self._tables.append(tile.cells)
            self._tiles.append((tile.name or f"x{tile.coords[0]}_y{tile.coords[1]}", n, float(tile.downsample)))

    def slide_cells(self):
        """The slide's cells as an AnnData (None before any tile was collected)."""
        import anndata as ad
        import pandas as pd

        if self.slide_name_ is None:
            return None
        tables = self._tables
        if self.od_:
            var_names = ["hematoxylin_od", "eosin_od"]
        else:
            var_names = list(self.channel_names_ or [])
        n_ch = tables[0]["mean"].shape[1] if tables else len(var_names)
        if len(var_names) != n_ch:
            var_names = [f"channel_{i}" for i in range(n_ch)]
        var_names = _unique(var_names)

        def cat(key, width=None):
            if not tables:
                return np.zeros((0,) + ((width,) if width else ()), np.float32)
            return np.concatenate([t[key] for t in tables])

        X = cat("mean", n_ch).astype(np.float32)
        ds_col = np.concatenate([np.full(n, d) for _, n, d in self._tiles]) if tables else np.zeros(0)
        mpp = self.mpp_
        mpp_xy = getattr(self, "mpp_xy_", None) or ((mpp, mpp) if mpp else None)
        unit = "um" if mpp else "px"
        obs = {}
        # nucleus_area with a nucleus mask, even for a slide without cells (the same columns as any other table)
        with_nuclei = ("nucleus_area" in tables[0]) if tables else self.nucleus_mask is not None
        for k in MORPHOLOGY + (("nucleus_area",) if with_nuclei else ()):
            v = cat(k).astype(np.float64)
            if k.endswith("area"):
                v = v * ds_col ** 2 * (mpp_xy[0] * mpp_xy[1] if mpp_xy else 1.0)
            elif k not in ("eccentricity", "solidity"):
                v = v * ds_col * (np.sqrt(mpp_xy[0] * mpp_xy[1]) if mpp_xy else 1.0)
            obs[k] = v.astype(np.float32)
        obs["slide"] = pd.Categorical([self.slide_name_] * len(X))
        obs["tile"] = pd.Categorical(np.concatenate([[name] * n for name, n, _ in self._tiles]) if tables else [])
        obs_df = pd.DataFrame(obs, index=[f"{self.slide_name_}-{i}" for i in range(len(X))])
        adata = ad.AnnData(X=X, obs=obs_df, var=pd.DataFrame(index=var_names))
        for s in self.stats:
            if s != "mean":
                adata.layers[s] = cat(s, n_ch).astype(np.float32)
        adata.obsm["spatial"] = cat("centroid", 2).astype(np.float64)
        adata.uns["histoflow"] = {"mask": self.mask_name, "stats": list(self.stats), "units": unit,
                                  "mpp": mpp if mpp else 0.0, "mpp_xy": list(mpp_xy) if mpp_xy else [0.0, 0.0],
                                  "spatial": "level-0 pixels (x, y)",
                                  "source": self.source_ or ""}
        return adata


def _unique(names):
    """The names, repeats given the first free suffix ``-1``, ``-2`` ... (never a name already taken)."""
    names = [str(n) for n in names]
    taken, out = set(names), []
    used = set()
    for n in names:
        if n not in used:
            used.add(n)
            out.append(n)
            continue
        k = 1
        while f"{n}-{k}" in taken or f"{n}-{k}" in used:
            k += 1
        used.add(f"{n}-{k}")
        out.append(f"{n}-{k}")
    return out

"""Multiplexed fluorescence: folding CODEX/Vectra acquisitions into channels, and classical nucleus and
whole-cell segmentation.

Segmentation (:class:`SegmentNuclei`, :class:`SegmentCells`) works in micrometres: sizes are converted
with the tile's pixel size. The nuclear threshold is one number per slide (Otsu's on the smoothed nuclear
channel of the slide's thumbnail, :meth:`SegmentNuclei.fit_slide`), so a cell's fate does not depend on
the tile it falls in. Run on tiles with overlap: each tile keeps the cells whose nucleus centroid lies in
the part of the tile it owns (:attr:`~histoflow.core.tile.Tile.core`), whole, and the cell count of a slide
does not depend on the tile size.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage as ndi

from ..errors import ChannelError, ParameterError
from ..utils import NUCLEAR_MARKERS
from .base import Transform, inside_slide, outputs_from
from .filters import _check_name, _check_number, _check_positive_int

#: largest size (µm) a nucleus / cell parameter may span: sigmas, distances and expansions far beyond any cell (a
#: sigma of 10^12 µm ran for minutes and gigabytes before failing)
MAX_SIZE_UM = 500.0


def _check_channel(who, param, value, auto=False):
    """A channel given by name or index (``"auto"`` too where ``auto``); anything else is a ParameterError."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    also = ' (or "auto")' if auto else ""
    raise ParameterError(f"{who}: {param} is a channel name or index{also}, got {value!r}")


def _check_channels(who, param, value):
    """None (an empty list too), or channels by name or index: one (``"CD45"``, ``5``) or a list of them."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    if isinstance(value, (str, int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ParameterError(f"{who}: {param} is a channel name or index, or a list of them; got {value!r}")
    return [_check_channel(who, param, v) for v in value]
from .objects import LARGE_NUCLEUS_UM, find_channel, keep_owned, relabel_sequential

__all__ = ["CollapseRunsCODEX", "CollapseRunsVectra", "SegmentNuclei", "SegmentCells", "VirtualHE",
           "segment_nuclei_fluorescence", "grow_cells", "nuclear_channel_index"]

#: pixel size assumed when neither the tile nor the transform knows it (µm/px)
DEFAULT_MPP = 0.5


def nuclear_channel_index(names, channel="auto") -> int:
    """The nuclear channel: ``channel`` by name or index, or with ``"auto"`` the first channel named like a
    nuclear stain (DAPI, Hoechst, HH3, histone, DNA, ...)."""
    if channel != "auto":
        return find_channel(names, channel)
    import re

    def forms(n):  # the name before a "(...)" tag and the tag itself, letters and digits only
        n = str(n).lower()
        parts = [n.split("(")[0]] + re.findall(r"\(([^)]*)\)", n)
        return [re.sub(r"[^0-9a-z]", "", p) for p in parts]

    def looks_like(form, marker):  # "dna", "dna1", "dsdna", "hoechst33342", "dapi_2" ...
        for m in (marker, "ds" + marker):
            if form == m or (form.startswith(m) and form[len(m):].isdigit()):
                return True
        return False

    def tagged(base, marker):  # "dapi 2", "dapi_cycle1", "dna-1", "dna intercalator"; but not "dna-pk" (a
        # kinase), "dna-pkcs_s2056" or "dna_damage_53bp1": after "dna" only a number, a cycle or round, or a stain
        for sep in (" ", "_", "-"):
            if base.startswith(marker + sep):
                rest = base[len(marker) + 1:].strip()
                return marker != "dna" or bool(re.fullmatch(
                    r"(?:(?:cycle|round|c|r|ch)[ _-]?)?\d+|(?:intercalator|stain|counterstain)\b.*", rest))
        return False

    low = [str(n).lower() for n in names]
    for marker in NUCLEAR_MARKERS:
        for i, n in enumerate(low):
            base = n.split("(")[0].strip()
            if base == marker or tagged(base, marker) or any(looks_like(f, marker) for f in forms(n)):
                return i  # the first: CODEX and CyCIF panels repeat "DAPI" in every cycle, the first is the usual
    raise ChannelError(f"no channel looks like a nuclear stain among {list(names)}; name it with nuclear_channel=")


def _off_missing(labels, channels):
    """``labels`` with the pixels where any of ``channels`` (h, w, k) is NaN or infinite set to 0: such pixels
    of a float image are background (the smoothing and the growth of cells reached into them, and every
    channel's mean of such a cell was NaN)."""
    if channels.dtype.kind == "f" and channels.size:
        missing = ~np.isfinite(channels).all(axis=-1)
        if missing.any():
            labels = labels.copy()
            labels[missing] = 0
    return labels


def _smooth(channel, sigma_px):
    img = np.asarray(channel, np.float32)
    if img.size and not np.isfinite(img).all():  # NaN / inf pixels of a float image: background, not spread by the blur
        img = np.where(np.isfinite(img), img, np.float32(0))
    return ndi.gaussian_filter(img, sigma_px, mode="reflect") if sigma_px > 0 else img


def segment_nuclei_fluorescence(nuclear, threshold, *, sigma=2.0, min_area=30, max_area=None, min_distance=6,
                                smoothed=False) -> np.ndarray:
    """Nuclei (int32 labels) of one nuclear-stain image.

    Gaussian smoothing (``sigma`` px), a fixed ``threshold`` on the smoothed intensity, holes filled,
    objects below ``min_area`` px dropped, touching nuclei split by a watershed of the distance transform
    from its maxima at least ``min_distance`` px apart; objects above ``max_area`` dropped.
    """
    from skimage.segmentation import watershed

    from .morphology import _fill_holes, _peaks_per_label

    sm = np.asarray(nuclear, np.float32) if smoothed else _smooth(nuclear, sigma)
    fg = _fill_holes(sm > threshold)
    comp, _ = ndi.label(fg)
    small = np.bincount(comp.ravel(), minlength=1) < min_area
    small[0] = True
    fg = ~small[comp]
    comp[~fg] = 0
    if not fg.any():
        return np.zeros(fg.shape, np.int32)
    dist = ndi.distance_transform_edt(fg)
    dist = ndi.gaussian_filter(dist, 1.0)
    peaks = _peaks_per_label(dist, comp, max(1, int(min_distance)))
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # components without a peak (flat, tiny) keep one marker at their maximum
    missing = np.setdiff1d(np.unique(comp[fg]), np.unique(comp[markers > 0]))
    if len(missing):
        pos = ndi.maximum_position(dist, comp, missing)
        for k, (y, x) in enumerate(pos):
            markers[y, x] = len(peaks) + 1 + k
    lab = watershed(-dist, markers, mask=fg)
    areas = np.bincount(lab.ravel())
    bad = areas < min_area
    if max_area is not None:
        bad |= areas > max_area
    bad[0] = False
    if bad.any():
        lab[bad[lab]] = 0
    return relabel_sequential(lab)


def grow_cells(nuclei, distance, membrane=None, foreground=None) -> np.ndarray:
    """Whole cells grown from nuclei (same ids), at most ``distance`` px beyond each nucleus.

    Without ``membrane``: each nucleus grows by ``distance`` px, stopping where neighbours meet
    (``skimage.segmentation.expand_labels``). With a ``membrane`` signal (a 2-D image): a watershed of it
    from the nuclei decides the borders between neighbours, and each cell keeps only the pixels within
    ``distance`` of its own nucleus (the watershed alone would let a cell flood the reach of its
    neighbours). ``foreground`` (bool) limits cells to stained pixels. Equal membrane values (plateaus, often
    exactly 0 far from any membrane) are split by the distance to the nearest nucleus, so that a cell's border
    depends on its neighbourhood only: the same in a tile and in the whole image.
    """
    from skimage.segmentation import expand_labels, watershed

    nuclei = np.asarray(nuclei, np.int32)
    if nuclei.size == 0:  # no pixels, no cells
        return nuclei.copy()
    reach = expand_labels(nuclei, distance=distance)
    if membrane is None:
        cells = reach
    else:
        inside = reach > 0
        cells = watershed(_flood_order(membrane, nuclei, inside), nuclei, mask=inside)
        _within_own_reach(cells, nuclei, distance)
    if foreground is not None:
        keep = np.asarray(foreground, bool) | (nuclei > 0)
        cells = np.where(keep, cells, 0).astype(np.int32)
    return cells.astype(np.int32)


def _flood_order(membrane, nuclei, inside):
    """The order in which the membrane watershed floods the pixels ``inside``: a float64 image of distinct ranks.

    The watershed breaks ties between equal values by the order its heap happens to hold them, which depends on
    every pixel of the image (on the real MIBI image 9 px of a cell changed owner between a tile and the whole
    image, on zero-membrane plateaus). Ranked by the membrane signal, then the distance to the nearest nucleus (a
    plateau is shared out between the nuclei around it), then raster order (pixels keep their relative raster
    order in any crop), the flood takes the same path wherever the image is cut, away from its edges.
    """
    m = np.asarray(membrane, np.float32)[inside]
    d = ndi.distance_transform_edt(nuclei == 0)[inside]
    order = np.lexsort((d, m))  # stable: equal (membrane, distance) stay in raster order
    rank = np.empty(order.size, np.float64)
    rank[order] = np.arange(order.size, dtype=np.float64)
    out = np.zeros(inside.shape, np.float64)
    out[inside] = rank
    return out


def _within_own_reach(cells, nuclei, distance):
    """Clear, in place, the pixels of each cell farther than ``distance`` from its own nucleus."""
    h, w = cells.shape
    pad = int(np.ceil(distance)) + 1
    for value, sl in enumerate(ndi.find_objects(cells), start=1):
        if sl is None:
            continue
        y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)
        x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)
        box = cells[y0:y1, x0:x1]
        own = nuclei[y0:y1, x0:x1] == value
        if not own.any():
            continue
        far = (box == value) & (ndi.distance_transform_edt(~own) > distance)
        box[far] = 0


class SegmentNuclei(Transform):
    """Nuclei of fluorescence / mass-cytometry tiles: smoothing, a slide-wide threshold, distance-transform
    watershed (an int32 instance mask).

    Parameters
    ----------
    nuclear_channel : str or int
        Name (``"DAPI"``, ``"HH3"`` finds ``"HH3 (89)"``) or index; ``"auto"`` takes the first channel named
        like a nuclear stain.
    threshold : float, optional
        On the smoothed nuclear intensity (native units). Default: Otsu's on the slide's thumbnail, set by
        :meth:`fit_slide`; without ``fit_slide``, Otsu's on each tile.
    sigma_um, min_distance_um : float
        Smoothing and least distance between nucleus centres, in µm.
    min_area_um2, max_area_um2 : float
        Nucleus sizes kept, in µm².
    mpp : float, optional
        Pixel size when the tile does not carry one (default: the tile's, else 0.5).
    mask_name, label_name : str
        Tile mask written and tile label (the number of nuclei).
    """

    slide_types = None
    changes_image = False

    def __init__(self, nuclear_channel="auto", threshold=None, sigma_um=0.8, min_area_um2=8.0, max_area_um2=None,
                 min_distance_um=2.5, mpp=None, mask_name="nuclei", label_name="nucleus_count"):
        who = type(self).__name__
        if threshold is not None:
            _check_number(who, "threshold", threshold)
        _check_number(who, "sigma_um", sigma_um, 0, maximum=MAX_SIZE_UM / 8)
        _check_number(who, "min_area_um2", min_area_um2, 0)
        if max_area_um2 is not None:
            _check_number(who, "max_area_um2", max_area_um2, 0)
        _check_number(who, "min_distance_um", min_distance_um, 0, maximum=MAX_SIZE_UM / 2)
        if mpp is not None:
            _check_number(who, "mpp", mpp, 0, strict=True)
        _check_name(who, "mask_name", mask_name)
        _check_name(who, "label_name", label_name)
        self.nuclear_channel = _check_channel(who, "nuclear_channel", nuclear_channel, auto=True)
        self.threshold = threshold
        self.sigma_um = sigma_um
        self.min_area_um2 = min_area_um2
        self.max_area_um2 = max_area_um2
        self.min_distance_um = min_distance_um
        self.mpp = mpp
        self.mask_name = mask_name
        self.label_name = label_name
        self.threshold_ = None
        self.channel_names_ = None

    masks_out = outputs_from("mask_name")

    labels_out = outputs_from("label_name")

    # ------------------------------------------------------------------ slide level
    def fit_slide(self, slide):
        """Fix the nuclear threshold for the whole slide: Otsu's on its smoothed nuclear channel, read from
        a thumbnail of at most 2048 px (the full image for small ones)."""
        names = self.input_channel_names(slide)
        self.channel_names_ = names
        if self.threshold is not None:
            return
        c = nuclear_channel_index(names, self.nuclear_channel)
        thumb = np.asarray(slide.thumbnail(2048, channels=self.slide_channels(slide, names, [c])))  # that one only
        ds = slide.dimensions[0] / thumb.shape[1]
        mpp = (slide.mpp[0] if slide.mpp else (self.mpp or DEFAULT_MPP)) * ds
        self.threshold_ = _otsu_threshold(_smooth(thumb[..., 0], self.sigma_um / mpp))

    # ------------------------------------------------------------------ tiles
    def _mpp(self, tile):
        if tile is not None and tile.mpp:
            return float(tile.mpp[0])
        return float(self.mpp or DEFAULT_MPP)

    def _channel(self, image, names=None):
        names = names or self.channel_names_ or [str(i) for i in range(image.shape[2])]
        return nuclear_channel_index(names, self.nuclear_channel)

    def nuclei(self, image, mpp, names=None):
        """Nuclei (int32 labels) of a ``(h, w, c)`` image with pixel size ``mpp``."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        c = self._channel(image, names)
        if image.size == 0:  # no pixels, no nuclei
            return np.zeros(image.shape[:2], np.int32)
        sm = _smooth(image[..., c], self.sigma_um / mpp)
        thr = self.threshold if self.threshold is not None else self.threshold_
        if thr is None:
            thr = _otsu_threshold(sm)
        px2 = mpp * mpp
        labels = segment_nuclei_fluorescence(
            sm, thr, smoothed=True, min_area=self.min_area_um2 / px2,
            max_area=None if self.max_area_um2 is None else self.max_area_um2 / px2,
            min_distance=self.min_distance_um / mpp)
        return _off_missing(labels, image[..., [c]])

    def F(self, image, mpp=None, core=None):
        """The owned nuclei of one image (all of them when ``core`` is None)."""
        return keep_owned(self.nuclei(image, mpp or self.mpp or DEFAULT_MPP), core)

    def min_overlap(self, mpp) -> int:
        """A large nucleus, whole, and the smoothing's reach (4 sigma) beyond it on both sides: with a large
        nucleus alone, a nucleus whose centroid lay on the line between two tiles' parts reached a tile's edge,
        where the smoothing differs, and came out differently in the two tiles (both kept it: 340 nuclei for
        339 on the MIBI image at 256 px tiles)."""
        return int(np.ceil((LARGE_NUCLEUS_UM + 8 * float(self.sigma_um)) / float(mpp or self.mpp or DEFAULT_MPP)))

    def apply(self, tile):
        lab = _on_extent(tile, lambda image: (self.F(image, self._mpp(tile), tile.core),))[0]
        tile.masks[self.mask_name] = lab
        tile.labels[self.label_name] = int(lab.max(initial=0))


def _on_extent(tile, fn):
    """``fn(image)`` -> label images, run on the part of the tile inside the slide (a tile overhanging the
    slide's right or bottom edge is filled, and smoothing would pull the fill into the cells there); the
    labels are padded back to the tile's size with 0."""
    inner = inside_slide(tile)
    if inner is tile.image:
        return fn(tile.image)
    eh, ew = inner.shape[:2]
    out = []
    for lab in fn(inner):
        full = np.zeros(tile.image.shape[:2], lab.dtype)
        full[:eh, :ew] = lab
        out.append(full)
    return tuple(out)


def _otsu_threshold(values) -> float:
    from skimage.filters import threshold_otsu

    v = np.asarray(values, np.float32).ravel()
    v = v[np.isfinite(v)]  # NaN pixels of a float image carry no intensity
    if v.size == 0 or v.max() <= v.min():
        warnings.warn("the nuclear channel is flat: no nuclei", stacklevel=3)
        return float("inf")
    return float(threshold_otsu(v))


class SegmentCells(SegmentNuclei):
    """Whole cells of fluorescence tiles: nuclei as in :class:`SegmentNuclei`, grown into cells.

    Parameters (besides those of :class:`SegmentNuclei`)
    ----------------------------------------------------
    membrane_channels : list of str, optional
        Membrane or cytoplasm channels (summed after scaling each by its 99th percentile); borders between
        neighbouring cells follow their signal (watershed). Without them cells grow evenly.
    expand_um : float
        How far a cell reaches beyond its nucleus, in µm.
    cell_mask, nucleus_mask : str
        Tile masks written: cells and their nuclei, with the same ids.

    Ownership follows the nucleus centroid; run with an overlap larger than a cell.
    """

    def __init__(self, nuclear_channel="auto", membrane_channels=None, expand_um=3.0, threshold=None,
                 sigma_um=0.8, min_area_um2=8.0, max_area_um2=None, min_distance_um=2.5, mpp=None,
                 cell_mask="cells", nucleus_mask="nuclei", label_name="cell_count"):
        super().__init__(nuclear_channel=nuclear_channel, threshold=threshold, sigma_um=sigma_um,
                         min_area_um2=min_area_um2, max_area_um2=max_area_um2, min_distance_um=min_distance_um,
                         mpp=mpp, mask_name=nucleus_mask, label_name=label_name)
        _check_number("SegmentCells", "expand_um", expand_um, 0, maximum=MAX_SIZE_UM / 2)
        _check_name("SegmentCells", "cell_mask", cell_mask)
        if cell_mask == nucleus_mask:
            raise ParameterError(f"SegmentCells: cell_mask and nucleus_mask must differ, both are {cell_mask!r}")
        self.membrane_channels = _check_channels("SegmentCells", "membrane_channels", membrane_channels)
        self.expand_um = expand_um
        self.cell_mask = cell_mask
        self.nucleus_mask = nucleus_mask

        self.membrane_scales_ = None

    @property
    def masks_out(self):
        return (self.cell_mask, self.nucleus_mask)

    def fit_slide(self, slide):
        """The nuclear threshold (:meth:`SegmentNuclei.fit_slide`) and, with several membrane channels, the
        scale of each (the 99th percentile of its smoothed thumbnail): one weighting of the channels for the
        whole slide, so that cell borders do not depend on the tiling."""
        super().fit_slide(slide)
        if not self.membrane_channels:
            return
        names = self.channel_names_
        idx = [find_channel(names, ch) for ch in self.membrane_channels]  # unknown names fail here, not per tile
        thumb = np.asarray(slide.thumbnail(2048, channels=self.slide_channels(slide, names, idx)))
        ds = slide.dimensions[0] / thumb.shape[1]
        mpp = (slide.mpp[0] if slide.mpp else (self.mpp or DEFAULT_MPP)) * ds
        self.membrane_scales_ = [float(np.percentile(_smooth(thumb[..., k], self.sigma_um / mpp), 99)) or 1.0
                                 for k in range(len(idx))]

    def cells(self, image, mpp, names=None):
        """(cells, nuclei) int32 label images with matching ids, of a whole image."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        nuc = self.nuclei(image, mpp, names)
        membrane = None
        if self.membrane_channels:
            names = names or self.channel_names_ or [str(i) for i in range(image.shape[2])]
            sig = np.zeros(image.shape[:2], np.float32)
            for k, ch in enumerate(self.membrane_channels):
                m = _smooth(image[..., find_channel(names, ch)], self.sigma_um / mpp)
                scale = self.membrane_scales_[k] if self.membrane_scales_ else \
                    ((float(np.percentile(m, 99)) if m.size else 0.0) or 1.0)
                sig += m / scale
            membrane = sig
        names = names or self.channel_names_ or [str(i) for i in range(image.shape[2])]
        used = [self._channel(image, names)] + [find_channel(names, ch) for ch in self.membrane_channels or ()]
        cells = grow_cells(nuc, self.expand_um / mpp, membrane=membrane)
        return _off_missing(cells, image[..., used]), _off_missing(nuc, image[..., used])

    def min_overlap(self, mpp) -> int:
        """Twice a whole large cell (a large nucleus and the cells' reach on both sides): every nucleus that
        competes for a kept cell's territory is seen whole too. With one cell's width (54 px on the MIBI image)
        a neighbour cut by the tile's edge was dropped as too small and a kept cell grew into its place (3 of
        339 cells differed from the whole image's at 256 px tiles; none with this, 108 px). Never less than
        the nuclei's own (their smoothing's reach: a small expand_um with a large sigma_um needs that more)."""
        cells = int(np.ceil(2 * (LARGE_NUCLEUS_UM + 2 * max(0.0, float(self.expand_um))) /
                            float(mpp or self.mpp or DEFAULT_MPP)))
        return max(cells, super().min_overlap(mpp))

    def F(self, image, mpp=None, core=None):
        """(cells, nuclei) of one image, those owned by ``core`` only, numbered alike 1..n."""
        cells, nuc = self.cells(image, mpp or self.mpp or DEFAULT_MPP)
        nuc_kept, ids = keep_owned(nuc, core, return_ids=True)
        lut = np.zeros(int(max(cells.max(initial=0), nuc.max(initial=0))) + 1, np.int32)
        lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
        return lut[cells], nuc_kept

    def apply(self, tile):
        cells, nuc = _on_extent(tile, lambda image: self.F(image, self._mpp(tile), tile.core))
        tile.masks[self.cell_mask] = cells
        tile.masks[self.nucleus_mask] = nuc
        tile.labels[self.label_name] = int(nuc.max(initial=0))


class _CollapseRuns(Transform, register=False):
    changes_image = True

    def _fold(self, image, n_cycles, channels_per_cycle, z=None, n_z=1):
        image = np.asarray(image)
        c = image.shape[-1]
        expected = n_cycles * channels_per_cycle * n_z
        if c != expected:
            raise ParameterError(f"{type(self).__name__}: the tile has {c} planes, expected {n_cycles} cycles x "
                                 f"{channels_per_cycle} channels x {n_z} z = {expected}")
        a = image.reshape(*image.shape[:-1], n_z, n_cycles, channels_per_cycle)
        if n_z > 1:
            if z is None:  # the sharpest plane: highest variance of the Laplacian over all channels
                z = int(np.argmax([ndi.laplace(a[..., k, :, :].astype(np.float32).sum(-1).sum(-1)).var()
                                   for k in range(n_z)]))
            a = a[..., z, :, :]
        else:
            a = a[..., 0, :, :]
        return a.reshape(*image.shape[:-1], n_cycles * channels_per_cycle)


class CollapseRunsCODEX(_CollapseRuns):
    """Fold a CODEX acquisition's planes (z x cycle x channel, z outermost) into cycle x channel channels
    at one z plane (``z``; None picks the sharpest). The result's channels run cycle by cycle.

    With ``z=None`` the sharpest plane (highest variance of the Laplacian, all channels summed) is chosen
    once per slide by :meth:`fit_slide`, on a few full-resolution regions spread over the slide, so that every
    tile of a slide has the same plane; each tile records it in its ``"z_plane"`` label. A transform never
    fitted to a slide (a lone tile or array) picks each image's sharpest plane."""

    slide_types = ("CODEX",)
    labels_out = ("z_plane",)
    #: side and number of the level-0 regions :meth:`fit_slide` compares the planes on
    FIT_REGION, FIT_REGIONS = 512, 5

    def __init__(self, n_cycles, channels_per_cycle=4, n_z=1, z=None):
        who = type(self).__name__
        _check_positive_int(who, "n_cycles", n_cycles)
        _check_positive_int(who, "channels_per_cycle", channels_per_cycle)
        _check_positive_int(who, "n_z", n_z)
        if z is not None and (_check_positive_int(who, "z", z, 0) >= n_z):
            raise ParameterError(f"{who}: z must be below n_z={n_z}, got {z}")
        self.n_cycles = n_cycles
        self.channels_per_cycle = channels_per_cycle
        self.n_z = n_z
        self.z = z
        self.z_ = None

    def _plane(self):
        return self.z if self.z is not None else self.z_

    def fit_slide(self, slide):
        """Choose the sharpest z plane of the slide (when ``z`` is None and there are several)."""
        self.z_ = None
        if self.z is not None or self.n_z == 1:
            return
        w, h = slide.dimensions
        side = min(self.FIT_REGION, w, h)
        spots = [(0.5, 0.5), (0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)][:self.FIT_REGIONS]
        score = np.zeros(self.n_z)
        for fx, fy in spots:
            x, y = int(fx * w - side / 2), int(fy * h - side / 2)
            region = np.asarray(slide.read_region((max(x, 0), max(y, 0)), 0, (side, side)))
            score += self._sharpness(region)
        self.z_ = int(np.argmax(score))

    def _sharpness(self, image):
        a = np.asarray(image)
        expected = self.n_cycles * self.channels_per_cycle * self.n_z
        if a.shape[-1] != expected:
            return np.zeros(self.n_z)  # the tile check names the problem
        a = a.reshape(*a.shape[:-1], self.n_z, self.n_cycles * self.channels_per_cycle)
        return np.array([ndi.laplace(a[..., k, :].astype(np.float32).sum(-1)).var() for k in range(self.n_z)])

    def F(self, image):
        return self._fold(image, self.n_cycles, self.channels_per_cycle, self._plane(), self.n_z)

    def channel_names_out(self, names):
        """The names of one z plane's channels (that of ``z``, else the first: they name the same markers)."""
        n = self.n_cycles * self.channels_per_cycle
        if names is None or len(names) != n * self.n_z:
            return None
        k = int(self._plane() or 0)
        return list(names[k * n:(k + 1) * n])

    def apply(self, tile):
        z = self._plane()
        if z is None and self.n_z > 1:
            z = int(np.argmax(self._sharpness(tile.image)))
        tile.image = self._fold(tile.image, self.n_cycles, self.channels_per_cycle, z, self.n_z)
        tile.labels["z_plane"] = int(z or 0)


class CollapseRunsVectra(_CollapseRuns):
    """Keep a Vectra (QPTIFF) image's unmixed channels and drop extra planes (e.g. the autofluorescence or
    composite planes at the end): the first ``n_channels`` channels, in acquisition order."""

    slide_types = ("Vectra", "IF")

    def __init__(self, n_channels=None):
        if n_channels is not None:
            _check_positive_int("CollapseRunsVectra", "n_channels", n_channels)
        self.n_channels = n_channels

    def F(self, image):
        image = np.asarray(image)
        if self.n_channels is None:
            return image
        if image.shape[-1] < self.n_channels:
            raise ParameterError(f"CollapseRunsVectra: the tile has {image.shape[-1]} channels, fewer than "
                                 f"n_channels={self.n_channels}")
        return image[..., : self.n_channels]

    def channel_names_out(self, names):  # noqa: D102 - the first n
        return names if names is None or self.n_channels is None else list(names[: self.n_channels])

    def apply(self, tile):
        tile.image = self.F(tile.image)


class VirtualHE(Transform):
    """False-coloured H&E from fluorescence by Beer-Lambert mixing (Giacomelli et al. 2016's model).

    Each channel is scaled to [0, 1] by a slide-wide percentile (:meth:`fit_slide`; else per tile), then
    acts as the concentration of a stain: the nuclear channel as hematoxylin, the chosen cytoplasm /
    stroma channels (averaged, so that many channels do not saturate it) as eosin. The RGB transmitted
    through both is ``255 * exp(-(k_h * H * beta_h + k_e * E * beta_e))`` per colour, with the absorption colours
    ``beta_h`` / ``beta_e`` (optical density per unit stain of R, G, B) below.

    Parameters
    ----------
    nuclear_channel : str or int
        ``"auto"``: the first channel named like a nuclear stain.
    eosin_channels : list of str, optional
        Cytoplasm / stroma channels for eosin; default: every channel but the nuclear one and those named
        background / empty.
    k_h, k_e : float
        Stain strengths (OD at full concentration, scaled by the absorption colours).
    percentile : float
        Intensity mapped to full concentration.
    beta_h, beta_e : (float, float, float)
        Absorption colours (the defaults give the usual purple nuclei and pink stroma).

    A learned style-transfer model can take its place: any transform whose ``apply`` turns ``tile.image``
    into an 8-bit RGB tile (e.g. a model run with :class:`histoflow.ml.transforms.SemanticSegmentation`'s
    loading machinery) slots into the same pipelines; :class:`VirtualHE` is the no-training baseline.
    """

    slide_types = None
    slide_type_out = "HE"
    changes_image = True

    def __init__(self, nuclear_channel="auto", eosin_channels=None, k_h=1.6, k_e=1.1, percentile=99.0,
                 beta_h=(0.86, 1.0, 0.30), beta_e=(0.05, 1.0, 0.544)):
        _check_number("VirtualHE", "k_h", k_h, 0)
        _check_number("VirtualHE", "k_e", k_e, 0)
        _check_number("VirtualHE", "percentile", percentile, 0, strict=True)
        if percentile > 100:
            raise ParameterError(f"VirtualHE: percentile must be in (0, 100], got {percentile!r}")
        for name, beta in (("beta_h", beta_h), ("beta_e", beta_e)):
            b = np.asarray(beta, dtype=object)
            if b.shape != (3,) or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                                          and np.isfinite(v) and v >= 0 for v in b):
                raise ParameterError(f"VirtualHE: {name} is an OD colour of 3 numbers >= 0, got {beta!r}")
        self.nuclear_channel = _check_channel("VirtualHE", "nuclear_channel", nuclear_channel, auto=True)
        self.eosin_channels = _check_channels("VirtualHE", "eosin_channels", eosin_channels)
        self.k_h = k_h
        self.k_e = k_e
        self.percentile = percentile
        self.beta_h = beta_h
        self.beta_e = beta_e
        self.scales_ = None
        self.channel_names_ = None

    def _indices(self, names):
        h = nuclear_channel_index(names, self.nuclear_channel)
        if self.eosin_channels:
            e = [find_channel(names, c) for c in self.eosin_channels]
        else:
            e = [i for i, n in enumerate(names) if i != h and
                 not str(n).lower().startswith(("background", "empty", "blank"))]
        return h, e

    def channel_names_out(self, names):
        return ["R", "G", "B"]

    def fit_slide(self, slide):
        """Percentile scales from the slide's thumbnail, so colours do not change from tile to tile."""
        names = self.input_channel_names(slide)
        self.channel_names_ = names
        thumb = np.asarray(slide.thumbnail(1024, channels=self.slide_channels(slide, names))).astype(np.float32)
        self.scales_ = [float(np.percentile(thumb[..., i], self.percentile)) or 1.0 for i in range(thumb.shape[2])]

    def F(self, image):
        """8-bit RGB virtual H&E of a ``(h, w, c)`` fluorescence image."""
        image = np.asarray(image, np.float32)
        names = self.channel_names_ or [str(i) for i in range(image.shape[2])]
        h, e = self._indices(names)
        scales = self.scales_ or [(float(np.percentile(image[..., i], self.percentile)) if image.size else 0.0)
                                  or 1.0 for i in range(image.shape[2])]
        H = np.clip(image[..., h] / scales[h], 0, 1)
        E = np.clip(sum(image[..., i] / scales[i] for i in e) / max(1, len(e)), 0, 1) if e else np.zeros_like(H)
        od = self.k_h * H[..., None] * np.asarray(self.beta_h, np.float32) + \
            self.k_e * E[..., None] * np.asarray(self.beta_e, np.float32)
        return np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)

    def apply(self, tile):
        tile.image = self.F(tile.image)
        tile.slide_type = "HE"

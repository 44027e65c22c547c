"""SlideData: one object per slide — its reader, slide type, slide-level masks and labels, and tiles."""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError, RegionError
from ..io import open_slide
from ..utils import missing_folders, same_file
from .grid import TileGrid, TileSpec
from .resample import axis_weights, resample_window, resize, shrink
from .tile import Tile
from .types import SlideType, SlideTypePreset


@dataclass
class SlideMask:
    """A slide-level mask or label image and its resolution (level-0 pixels per mask pixel)."""

    array: np.ndarray
    downsample: float
    #: given as bool: stored as uint8 here (coverage sums), handed out and written as bool again
    is_bool: bool = False

    def stored(self) -> np.ndarray:
        """The mask as it was given (bool stays bool), for writing."""
        return self.array.astype(bool) if self.is_bool else self.array

    def crop(self, x: int, y: int, w0: int, h0: int, size, slide_size=None) -> np.ndarray:
        """The part of the mask under a level-0 rectangle, sampled (nearest) at ``size = (w, h)``: output pixel
        (i, j) takes the mask pixel under the level-0 point at the centre of its share of the rectangle, so a
        tile's mask lines up with the tile's pixels at any resolution; zero where the rectangle leaves the mask,
        and past the slide's ``slide_size = (w, h)`` level-0 pixels when given (a mask's last pixel usually
        reaches past the slide's edge: the padding of an edge tile is not tissue)."""
        ds = self.downsample
        mh, mw = self.array.shape[:2]
        w, h = int(size[0]), int(size[1])
        cx, cy = x + (np.arange(w) + 0.5) * (w0 / w), y + (np.arange(h) + 0.5) * (h0 / h)
        cols, rows = np.floor(cx / ds).astype(np.int64), np.floor(cy / ds).astype(np.int64)
        cin, rin = (cols >= 0) & (cols < mw), (rows >= 0) & (rows < mh)
        if slide_size is not None:
            cin &= cx < slide_size[0]
            rin &= cy < slide_size[1]
        out = self.array[np.clip(rows, 0, mh - 1)[:, None], np.clip(cols, 0, mw - 1)[None, :]]
        if not (cin.all() and rin.all()):
            out = out.copy()
            out[~rin, :] = 0
            out[:, ~cin] = 0
        return out.astype(bool) if self.is_bool else out


def _rgb_names(slide_type, channels):
    """Channel names of tiles that lost the slide's: R, G, B for brightfield RGB, else unknown (None); three
    fluorescence channels (collapsed runs) are not red, green and blue."""
    try:
        brightfield = SlideType.get(slide_type).brightfield if slide_type else False
    except ParameterError:
        brightfield = False
    return ["R", "G", "B"] if channels == 3 and brightfield else None


def default_slide_name(path) -> str:
    """A slide's default name (its outputs' file names): its file's name without the extension, or its folder's
    name. "." and "dir/." name the folder; a folder keeps its whole name, and so does a file whose last dotted
    part has no letter (DICOM files and folders named by UID: ``1.2.826.0.1.3680043.8.498.111`` lost its
    ``.111``, and the slides of one series clashed)."""
    full = os.path.abspath(os.fspath(path)).rstrip("/\\")
    base = os.path.basename(full)
    stem, ext = os.path.splitext(base)
    if os.path.isdir(full) or not any(c.isalpha() for c in ext):
        return base
    return stem


def read_resampled(reader, x, y, level, read_size, size) -> np.ndarray:
    """``read_size`` level pixels at level-0 ``(x, y)`` resampled to ``size`` (area average when shrinking,
    bilinear when enlarging): a region off any grid, such as a patch of
    :class:`~histoflow.ml.data.WSIPatchDataset` given by its level-0 corner (grid tiles at a target µm/px are
    read by :func:`read_on_grid`). A shrunk region overhanging the slide reads only the part inside (and a
    pixel of fill): at a coarse mpp one tile's region can be many times the slide (CMU-1 at 60 µm/px: 30782 px
    square, 2.9 GB). The pixels of the tile that lie partly inside the slide average slide pixels only; those
    wholly outside are the reader's fill."""
    rw, rh = read_size
    ow, oh = size
    if (rw, rh) == (ow, oh):
        return reader.read_region((x, y), level, read_size)
    lv = reader.levels[level]
    lx, ly = math.floor(x / lv.downsample + 0.5), math.floor(y / lv.downsample + 0.5)
    iw, ih = min(rw, lv.width - lx), min(rh, lv.height - ly)  # level pixels inside the slide
    sx, sy = rw / ow, rh / oh
    jw, jh = min(ow, math.ceil(max(iw, 0) / sx)), min(oh, math.ceil(max(ih, 0) / sy))  # tile pixels touching them
    if rw <= ow or rh <= oh:  # enlarged: the region is no larger than the tile
        region = reader.read_region((x, y), level, read_size)
        return _refilled(reader, resize(_edge_replicated(region, iw, ih), size), jw, jh)
    nw, nh = min(rw, math.ceil(jw * sx) + 1), min(rh, math.ceil(jh * sy) + 1)
    if nw * nh >= rw * rh:  # (almost) all inside: read it whole
        region = reader.read_region((x, y), level, read_size)
        return _refilled(reader, resize(_edge_replicated(region, iw, ih), size), jw, jh)
    out = np.full((oh, ow, reader.channels), reader.fill_value, dtype=reader.dtype)
    if jw > 0 and jh > 0:
        part = reader.read_region((x, y), level, (nw, nh))
        out[:jh, :jw] = shrink(_edge_replicated(part, iw, ih), ow / rw, oh / rh, (jw, jh))
    return out


def read_on_grid(reader, level, origin, scale, size) -> np.ndarray:
    """The ``size = (w, h)`` window at output pixel ``origin = (x, y)`` of a level resampled by ``scale`` (level
    pixels per output pixel), as grid tiles at a target µm/px are read: shrunk (``scale > 1``), each output pixel
    the exact area average of the level pixels it covers; enlarged (``scale < 1``, finer than level 0),
    bilinear between the level pixels around its centre; either way weighted by its place in the whole
    resampled level (:func:`~histoflow.core.resample.axis_weights`). A pixel is the same in every tile that
    holds it, so tiles of any size and overlap cut one resampled image (reading a rounded region and resizing it, as
    :func:`read_resampled` does, shifts each tile by up to half a level pixel and stretches it by up to one);
    a fractional origin (a patch off the grid's corners) is the window at that place. Pixels of the window
    wholly outside the level are the reader's fill; those partly outside average the pixels inside only."""
    lv = reader.levels[level]
    w, h = int(size[0]), int(size[1])
    wx = axis_weights(origin[0], w, scale, lv.width)
    wy = axis_weights(origin[1], h, scale, lv.height)
    if wx.hi <= wx.lo or wy.hi <= wy.lo:
        return np.full((h, w, reader.channels), reader.fill_value, dtype=reader.dtype)
    ds = lv.downsample
    region = reader.read_region((int(round(wx.lo * ds)), int(round(wy.lo * ds))), level,
                                (wx.hi - wx.lo, wy.hi - wy.lo))
    return resample_window(region, wx, wy, reader.fill_value)


def _refilled(reader, tile, jw, jh):
    """The reader's fill back beyond the tile pixels that touch the slide (a resampled edge tile)."""
    if jh < tile.shape[0] or jw < tile.shape[1]:
        tile = np.array(tile)
        tile[max(jh, 0):] = reader.fill_value
        tile[:, max(jw, 0):] = reader.fill_value
    return tile


def _edge_replicated(region, iw, ih):
    """A region overhanging the slide (``iw`` x ``ih`` of its level pixels inside) with its last inside column and
    row repeated over the fill: a resampled tile pixel that lies partly outside the slide then averages slide
    pixels only (the fill, white on brightfield, made the last row of a stitched map pale: 0.63 for 0.95)."""
    h, w = region.shape[:2]
    if (iw >= w and ih >= h) or iw <= 0 or ih <= 0:
        return region
    region = np.array(region)
    if iw < w:
        region[:, iw:] = region[:, iw - 1:iw]
    if ih < h:
        region[ih:] = region[ih - 1:ih]
    return region


class SlideData:
    """A slide and everything known about it.

    Parameters
    ----------
    path : str or os.PathLike
        The slide (any format :func:`histoflow.open_slide` reads).
    name : str, optional
        Default: the file name without its extension.
    slide_type : str or SlideTypePreset, optional
        ``"HE"``, ``"IHC"``, ``"IF"``, ``"CODEX"``, ``"Vectra"``, ``"MIBI"``. Default: inferred (``HE`` for
        brightfield RGB, ``MIBI`` for MIBItiff, ``Vectra`` for QPTIFF, ``IF`` for other fluorescence).
    backend : str
        Reader backend, ``"auto"`` by default.
    mpp : float or (float, float), optional
        Override the level-0 pixel size (µm/px).
    labels : dict, optional
        Slide-level labels (grade, site, ...), stored with the slide.
    masks : dict, optional
        Slide-level masks: name -> 2-D array (resolution inferred from its width) or ``(array, downsample)``.

    Examples
    --------
    >>> from histoflow.data import sample_slide_path
    >>> slide = SlideData(sample_slide_path())                             # doctest: +SKIP
    >>> for tile in slide.generate_tiles(256, mpp=1.0):                   # doctest: +SKIP
    ...     ...
    >>> slide.write("out.h5path", tiles=slide.generate_tiles(256))        # doctest: +SKIP
    """

    def __init__(self, path, name=None, slide_type=None, backend="auto", mpp=None, labels=None, masks=None,
                 *, max_region_bytes=None):
        self.path = os.fspath(path)
        declared = SlideType.get(slide_type) if slide_type else None
        self.reader = open_slide(self.path, backend=backend, mpp=mpp, max_region_bytes=max_region_bytes,
                                 brightfield=declared.brightfield if declared else None)
        try:
            self.name = name or default_slide_name(self.path)
            self.slide_type: SlideTypePreset = declared or self._infer_type()
            if labels is not None and not isinstance(labels, Mapping):
                raise ParameterError(f"{self.path}: labels must be a dict {{name: value}}, got "
                                     f"{type(labels).__name__} {labels!r:.80}")
            self.labels = dict(labels or {})
            self.masks: dict[str, SlideMask] = {}
            if masks is not None and not isinstance(masks, Mapping):
                raise ParameterError(f"{self.path}: masks must be a dict {{name: array or (array, downsample)}}, "
                                     f"got {type(masks).__name__}")
            for k, v in (masks or {}).items():
                if isinstance(v, tuple) and len(v) not in (1, 2):
                    raise RegionError(f"{self.path}: slide mask {k!r}: give an array or (array, downsample), got a "
                                      f"tuple of {len(v)}")
                self.add_mask(k, *(v if isinstance(v, tuple) else (v,)))
        except BaseException:
            self.reader.close()  # not left open by a slide that could not be made
            raise
        self.tiles: list[Tile] = []

    def _infer_type(self) -> SlideTypePreset:
        r = self.reader
        if r.brightfield:
            return SlideType.HE
        if r.format == "MIBItiff":
            return SlideType.MIBI
        if r.format == "QPTIFF":
            return SlideType.VECTRA
        return SlideType.IF

    # ------------------------------------------------------------------ metadata passthrough
    @property
    def dimensions(self):
        return self.reader.dimensions

    @property
    def levels(self):
        return self.reader.levels

    @property
    def mpp(self):
        """(x, y) pixel size of level 0 in µm, or None when unknown. Assign to override a missing or wrong one
        (as ``SlideData(path, mpp=...)``; the reader's ``mpp`` is the same value)."""
        return self.reader.mpp

    @mpp.setter
    def mpp(self, value):
        self.reader.mpp = value

    @property
    def channel_names(self):
        return self.reader.channel_names

    def read_region(self, location, level, size):
        return self.reader.read_region(location, level, size)

    def thumbnail(self, max_size=512, channels=None):
        return self.reader.thumbnail(max_size, channels=channels)

    # ------------------------------------------------------------------ masks
    def add_mask(self, name: str, array, downsample: float | None = None):
        """Attach a slide-level mask; ``downsample`` (level-0 pixels per mask pixel) defaults to level-0
        width / mask width. The mask must cover the slide: its size times ``downsample`` must match the
        slide's within a mask pixel and 2 % (more for masks a few pixels wide), so that a transposed mask or a
        wrong downsample is refused here rather than silently keeping the wrong tiles."""
        if not isinstance(name, str) or not name:
            raise RegionError(f"{self.path}: a slide mask's name must be a non-empty string, got {name!r}")
        self.masks[name] = SlideMask(*self._checked_mask(name, array, downsample))

    def _checked_mask(self, name, array, downsample):
        """``(array, downsample, was_bool)`` of a slide mask, checked as :meth:`add_mask` says."""
        try:
            array = np.asarray(array)
        except (TypeError, ValueError) as e:  # a ragged list ([mask, downsample] for (mask, downsample))
            raise RegionError(f"{self.path}: slide mask {name!r} is not an array ({e}); give an array, or "
                              "(array, downsample) as a tuple") from None
        if array.ndim != 2:
            raise RegionError(f"{self.path}: slide mask {name!r} must be 2-D, got shape {array.shape}")
        if 0 in array.shape:
            raise RegionError(f"{self.path}: slide mask {name!r} is empty (shape {array.shape})")
        if not (array.dtype == bool or array.dtype.kind in "uif"):
            raise RegionError(f"{self.path}: slide mask {name!r} has dtype {array.dtype}; use bool, integers or "
                              "floats")
        w0, h0 = self.dimensions
        if downsample is None:
            ds = w0 / array.shape[1]
        else:
            try:
                ds = float(downsample)
            except (TypeError, ValueError):
                ds = float("nan")
            if not (math.isfinite(ds) and ds > 0):
                raise RegionError(f"{self.path}: slide mask {name!r}: downsample must be a positive number "
                                  f"(level-0 pixels per mask pixel), got {downsample!r}")
        mh, mw = array.shape

        def covers(h, w, d):  # within a mask pixel, 2 %, and the rounding of the other side's size (a mask made
            # from a thumbnail of a long, narrow slide is 20 px wide: its downsample is known to 2.5 % only)
            rel = 0.02 + 0.5 / min(h, w)
            return all(abs(n * d - full) <= d + rel * full + 1 for n, full in ((w, w0), (h, h0)))

        if not covers(mh, mw, ds):
            transposed = covers(mw, mh, ds if downsample is not None else w0 / mh)
            hint = " (is the mask transposed?)" if transposed else ""
            raise RegionError(
                f"{self.path}: slide mask {name!r} of shape {array.shape} (h, w) at downsample {ds:g} covers "
                f"{mw * ds:.0f} x {mh * ds:.0f} px of level 0, but the slide is {w0} x {h0}: expected shape about "
                f"({round(h0 / ds)}, {round(w0 / ds)}) at that downsample{hint}")
        is_bool = array.dtype == bool
        if is_bool:
            array = array.astype(np.uint8)
        return array, ds, is_bool

    # ------------------------------------------------------------------ tiling
    def grid(self, tile_size=256, *, stride=None, overlap=0, level=None, mpp=None, edge="pad",
             mask=None, min_coverage=0.0) -> TileGrid:
        """The :class:`TileGrid` for these parameters. ``mask`` is the name of a slide mask (or an array)
        to keep only tiles it covers by at least ``min_coverage``."""
        mask_arr, mask_ds = None, None
        if mask is not None:
            if isinstance(mask, str):
                if mask not in self.masks:
                    raise RegionError(f"{self.path}: no slide mask named {mask!r} (have {sorted(self.masks)})")
                mask_arr, mask_ds = self.masks[mask].array, self.masks[mask].downsample
            else:  # checked as add_mask checks (a transposed mask kept the wrong tiles)
                mask_arr, mask_ds, _ = self._checked_mask("grid(mask=...)", mask, None)
        try:
            grid = TileGrid(self.dimensions, tile_size, stride=stride, overlap=overlap, level=level, mpp=mpp,
                            level_downsamples=[lv.downsample for lv in self.levels], slide_mpp=self.mpp,
                            edge=edge, mask=mask_arr, mask_downsample=mask_ds, min_coverage=min_coverage,
                            level_dimensions=[(lv.width, lv.height) for lv in self.levels])
        except RegionError as e:
            if str(e).startswith(str(self.path)):
                raise
            raise type(e)(f"{self.path}: {e}") from None
        if grid.upsampled:  # finer than the scanner's pixels: no detail is gained, and the tiles multiply
            warnings.warn(f"{self.path}: tiles at {grid.target_mpp:g} µm/px are finer than the slide's finest level "
                          f"({float(self.mpp[0]):.4g} µm/px): level 0 is enlarged {1 / grid.downsample:.3g}x and its "
                          f"pixels interpolated, not scanned; ask for mpp >= {float(self.mpp[0]):.4g} to tile the "
                          "slide's own pixels", stacklevel=2)
        return grid

    def _grid_scale(self, spec) -> float:
        """Level pixels per output pixel of a tile resampled to a target µm/px (``spec.origin`` set)."""
        return spec.downsample / float(self.reader.levels[spec.level].downsample)

    def _read_spec(self, spec) -> np.ndarray:
        """The tile's pixels: its level's region as it is, or for a grid at a target µm/px its window of the
        whole resampled level (:func:`read_on_grid`), shrunk or enlarged."""
        if spec.origin is not None:
            return read_on_grid(self.reader, spec.level, spec.origin, self._grid_scale(spec), spec.size)
        if not spec.needs_resample:
            return self.reader.read_region((spec.x, spec.y), spec.level, spec.read_size)
        return read_resampled(self.reader, spec.x, spec.y, spec.level, spec.read_size, spec.size)

    def read_tile(self, spec) -> Tile:
        """Read the tile of a :class:`~histoflow.core.grid.TileSpec`, with the slide masks under it."""
        if not isinstance(spec, TileSpec):
            raise ParameterError(f"{self.path}: read_tile takes a TileSpec of slide.grid(...) (e.g. "
                                 f"`for spec in slide.grid(256): slide.read_tile(spec)`), not {spec!r}; "
                                 "read_region((x, y), level, (w, h)) reads any region")
        self.reader._check_open()  # a rested reader opened again first (meanwhile its levels are not there yet)
        w0, h0 = self.dimensions
        if not 0 <= spec.level < len(self.levels) or not (spec.x < w0 and spec.y < h0 and spec.x + spec.width0 > 0
                                                           and spec.y + spec.height0 > 0):
            n = len(self.levels)
            where = (f"level {spec.level}, which it does not have ({n} level{'s' if n != 1 else ''})"
                     if not 0 <= spec.level < len(self.levels) else
                     f"({spec.x}, {spec.y}) + {spec.width0} x {spec.height0}, outside its {w0} x {h0} px")
            raise RegionError(f"{self.path}: the tile is at {where}: a TileSpec of another slide's grid? Make the "
                              "grid of this slide (slide.grid(...))")
        image = self._read_spec(spec)
        masks = {k: m.crop(spec.x, spec.y, spec.width0, spec.height0, spec.size, (w0, h0))
                 for k, m in self.masks.items()}
        mpp = None if self.mpp is None else (self.mpp[0] * spec.downsample, self.mpp[1] * spec.downsample)
        # the part inside the slide, when the tile overhangs its right or bottom edge
        lv = self.levels[spec.level]
        if spec.origin is not None:  # a window of the resampled level: its pixels that touch the level
            r = self._grid_scale(spec)
            ew = min(spec.size[0], math.ceil(lv.width / r - spec.origin[0] - 1e-9))
            eh = min(spec.size[1], math.ceil(lv.height / r - spec.origin[1] - 1e-9))
        elif abs(spec.downsample - lv.downsample) > 1e-9:  # a rectangle resampled on its own
            w0, h0 = self.dimensions
            ew = min(spec.size[0], math.ceil((w0 - spec.x) / spec.downsample - 1e-9))
            eh = min(spec.size[1], math.ceil((h0 - spec.y) / spec.downsample - 1e-9))
        else:  # read as it is from its level: the level's own pixels (x = round(lx * downsample))
            ew = min(spec.size[0], lv.width - round(spec.x / spec.downsample))
            eh = min(spec.size[1], lv.height - round(spec.y / spec.downsample))
        extent = None if (ew, eh) == tuple(spec.size) else (max(ew, 1), max(eh, 1))
        return Tile(image=image, coords=(spec.x, spec.y), level=spec.level, downsample=spec.downsample,
                    masks=masks, labels={}, slide_type=self.slide_type.name,
                    name=f"{self.name}_x{spec.x}_y{spec.y}", mpp=mpp, core=spec.core, extent=extent)

    def generate_tiles(self, tile_size=256, *, stride=None, overlap=0, level=None, mpp=None, edge="pad",
                       mask=None, min_coverage=0.0) -> Iterator[Tile]:
        """Yield tiles lazily, one read at a time: memory does not grow with the slide.

        Parameters are those of :meth:`grid`. Each :class:`Tile` carries the slide masks cropped to it.
        """
        grid = self.grid(tile_size, stride=stride, overlap=overlap, level=level, mpp=mpp, edge=edge,
                         mask=mask, min_coverage=min_coverage)
        for spec in grid:
            yield self.read_tile(spec)

    # ------------------------------------------------------------------ storage
    def metadata(self) -> dict:
        """What the h5path store records about the slide."""
        r = self.reader
        return {
            "name": self.name,
            "source_path": self.reader._abspath,  # as opened, whatever the working folder is now
            "backend": r.backend,
            "format": r.format,
            "width": r.dimensions[0],
            "height": r.dimensions[1],
            "levels": [lv.as_dict() for lv in r.levels],
            "mpp": list(r.mpp) if r.mpp is not None else None,
            "objective_power": r.objective_power,
            "channel_names": list(r.channel_names),
            "dtype": r.dtype.name,
            "slide_type": self.slide_type.name,
            "labels": dict(self.labels),
        }

    def write(self, path, tiles: Iterable[Tile] | None = None, *, compression="gzip", compression_level=2,
              progress=False, total=None, provenance: dict | None = None, channel_names=None) -> str:
        """Write an h5path file (atomically: a temporary name, then a rename).

        Parameters
        ----------
        path : str
            Output file.
        tiles : iterable of Tile, optional
            Tiles to store, streamed (e.g. ``slide.generate_tiles(...)``). Default: ``self.tiles``.
        compression : {"gzip", "htj2k", "lzf", None}
            Lossless per-tile compression (see ``docs/h5path.md``; ``"htj2k"`` files need hdf5plugin to read).
        compression_level : int
            gzip level (low levels use ISA-L's fast deflate when installed).
        progress : bool
            Show a progress bar.
        total : int, optional
            Number of tiles, for the progress bar's ETA.
        channel_names : list of str, optional
            Names of the tiles' channels, when a transform gave them other channels than the slide's (by
            default the slide's when the tiles keep their count; R, G, B for brightfield RGB tiles; else none).
        """
        from ..errors import H5PathError
        from ..store import H5PathWriter, encode_tile
        from ..utils import progress_bar

        import itertools

        if same_file(path, self.path):  # H5PathWriter would have replaced the image itself with the h5path
            from ..errors import OutputError

            raise OutputError(f"{os.fspath(path)}: the output is the slide being read; choose another output path")
        tiles = self.tiles if tiles is None else tiles
        if total is None and hasattr(tiles, "__len__"):
            total = len(tiles)
        encode = compression in ("gzip", "htj2k", None)
        meta = self.metadata()
        # tiles that a transform gave other channels (grey, a virtual H&E, collapsed runs) are stored with
        # them: the slide's channel names stay only when the first tile still has as many channels
        it = iter(tiles)
        first = next(it, None)
        if first is not None:
            it = itertools.chain([first], it)
            names = meta.get("channel_names")
            c = 1 if np.ndim(first.image) == 2 else np.shape(first.image)[-1]
            kind = getattr(first, "slide_type", None)
            if kind and kind != meta.get("slide_type"):  # another kind of image (a virtual H&E of MIBI or Vectra
                meta["slide_type"] = kind  # tiles): its kind and dtype, as a slide run records them (the store
                meta["dtype"] = np.asarray(first.image).dtype.name  # said Vectra, its tiles read back so)
                if names is not None:
                    meta["channel_names"] = _rgb_names(kind, c)
            elif names is not None and len(names) != c:
                meta["channel_names"] = _rgb_names(kind or meta.get("slide_type"), c)
            if channel_names is not None:
                channel_names = [str(n) for n in channel_names]
                if len(channel_names) != c:
                    raise ParameterError(f"{os.fspath(path)}: {len(channel_names)} channel_names for tiles of {c} "
                                         "channel(s)")
                meta["channel_names"] = channel_names
        with H5PathWriter(path, slide=meta, compression=compression,
                          compression_level=compression_level) as w:
            for name, m in self.masks.items():
                w.add_slide_mask(name, m.stored(), m.downsample)
            for t in progress_bar(it, total=total, desc=f"tiles {self.name}", unit="tile", disable=not progress):
                if encode:
                    try:
                        t = encode_tile(t, compression, compression_level)
                    except H5PathError as e:  # name the store and the slide, as the writer's own errors do
                        raise H5PathError(f"{os.fspath(path)} (slide {self.path}): {e}") from None
                w.add_tile(t)
            if provenance:
                w.add_provenance(provenance)
        return os.fspath(path)

    # ------------------------------------------------------------------ running pipelines
    def run(self, pipeline, out, *, tile_size=256, overlap=0, stride=None, level=None, mpp=None, edge="pad",
            tissue_filter=None, executor="dask", workers=None, scheduler=None, client=None, batch_size=32,
            max_in_flight=None, on_error="raise", resume=False, progress=True, compression="htj2k",
            on_batch=None, overwrite=False) -> str:
        """Run a pipeline on every tile and write the results to the h5path file ``out``.

        Parameters
        ----------
        pipeline : Pipeline or Transform or None
            What to apply to each tile (None: store the tiles as read).
        out : str
            Output h5path file; while the run goes, finished batches are kept in ``out + ".partial/"``.
        tile_size, overlap, stride, level, mpp, edge
            The tile grid (see :meth:`grid`).
        tissue_filter : float, optional
            Run the tissue pre-pass on a low-resolution view (stored as the slide mask "tissue") and keep
            only tiles with at least this fraction of tissue (e.g. 0.25).
        executor : {"dask", "threads", "inprocess"} or distributed.Client or address
            Where tiles run: a local dask cluster of ``workers`` processes by default; ``scheduler`` (an
            address such as ``"tcp://10.0.0.5:8786"``) or ``client`` uses an existing cluster.
        batch_size : int
            Tiles per task; at most ``max_in_flight`` tasks (default 2 x workers + 2; 2 in-process) are in flight.
        on_error : {"raise", "skip"}
            Stop at the first failing tile (the error names the slide, tile and transform), or record
            failed tiles in the file's provenance and go on.
        resume : bool
            Continue an interrupted run from its finished batches (and keep the finished result of a run with
            the same settings). Without it an existing output and journal are replaced.
        overwrite : bool
            With ``resume``: an output or journal of a run with other settings is replaced rather than refused
            (`--resume --overwrite`: an interrupted run that was replacing older results goes on doing so).
        progress : bool
            Show a progress bar (tiles done, rate, ETA).
        compression : {"htj2k", "gzip", None}
            Lossless compression of the stored tiles. ``"htj2k"`` (default): reversible High-Throughput
            JPEG 2000 for images of 1 or 3 channels of 8 or 16 bits (other images, and masks, gzip); on H&E
            about 15 % smaller than gzip for raw tiles and 2x for blurred ones (2.6x in the pipeline bench's
            BoxBlur(15)), read by any HDF5 reader that loads hdf5plugin (histoflow's does).
            ``"gzip"``: readable by any HDF5 reader, larger, and faster to write in one process.
        """
        from ..engine import run_slides

        return run_slides([self], [out], pipeline, tile_size=tile_size, overlap=overlap, stride=stride,
                          level=level, mpp=mpp, edge=edge, tissue_filter=tissue_filter, executor=executor,
                          workers=workers, scheduler=scheduler, client=client, batch_size=batch_size,
                          max_in_flight=max_in_flight, on_error=on_error, resume=resume, progress=progress,
                          compression=compression, on_batch=on_batch, overwrite=overwrite)[0]

    # ------------------------------------------------------------------ life cycle
    def close(self):
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        w, h = self.dimensions
        mpp = f"{self.mpp[0]:.4g} µm/px" if self.mpp else "mpp unknown"
        return (f"SlideData({self.name!r}, {self.slide_type.name}, {self.reader.format}, {w}x{h}, "
                f"{len(self.levels)} level(s), {mpp}, masks={sorted(self.masks)}, labels={self.labels}, "
                f"tiles={len(self.tiles)})")


class SlideDataset:
    """Many slides, run as one job: every worker stays busy across slides; one h5path per slide.

    >>> ds = SlideDataset(["a.svs", "b.svs"], slide_type="HE")              # doctest: +SKIP
    >>> ds.run(pipeline, "out/", workers=4)                               # doctest: +SKIP
    ['out/a.h5path', 'out/b.h5path']
    """

    def __init__(self, paths, **slide_kwargs):
        self.slides = []
        for p in paths:
            if isinstance(p, SlideData):
                self.slides.append(p)
                continue
            s = SlideData(p, **slide_kwargs)
            # its file's handles closed until it is read (opened again then): a cohort of thousands of slides
            # held two or three handles each and stopped at the process's limit (often 1,024) before any work
            s.reader.rest()
            self.slides.append(s)
        names = [s.name for s in self.slides]
        if len(set(names)) != len(names):
            from collections import Counter

            twice = [n for n, k in Counter(names).items() if k > 1]
            clash = "; ".join(f"{n!r}: " + ", ".join(s.path for s in self.slides if s.name == n) for n in twice[:5])
            raise RegionError(f"slide names must be unique (they name the output files): {clash}"
                              f"{' ...' if len(twice) > 5 else ''}; give one of each a name of its own "
                              "(SlideData(path, name=...)) or keep such slides in separate runs")

    def __len__(self):
        return len(self.slides)

    def __iter__(self):
        return iter(self.slides)

    def __getitem__(self, i):
        return self.slides[i]

    def output_paths(self, outdir) -> list[str]:
        """The h5path file :meth:`run` writes for each slide: ``outdir/<slide name>.h5path``."""
        for s in self.slides:  # a name with a folder in it ("../x", "sub/x") wrote outside outdir, or below it
            name = str(s.name)
            if name in (".", "..") or "/" in name or os.sep in name or (os.altsep and os.altsep in name) \
                    or "\0" in name:
                raise ParameterError(f"{s.path}: the slide's name {name!r} is the name of its output file in "
                                     f"{outdir}, so it cannot hold a folder separator or be '.' / '..'; give it "
                                     "another with SlideData(..., name=...)")
        return [os.path.join(outdir, f"{s.name}.h5path") for s in self.slides]

    def run(self, pipeline, outdir, **kwargs) -> list[str]:
        """Run ``pipeline`` on every slide, writing ``outdir/<slide name>.h5path``; parameters as
        :meth:`SlideData.run`."""
        from ..engine import run_slides

        outs = self.output_paths(outdir)  # names checked before any folder is made
        made = missing_folders(outdir)  # the folders made here, the deepest first
        try:
            os.makedirs(outdir, exist_ok=True)
        except OSError as e:
            from ..errors import OutputError

            why = "it is a file" if os.path.isfile(outdir) else (e.strerror or str(e))
            raise OutputError(f"{outdir}: cannot use it as the output folder: {why}") from None
        try:
            return run_slides(self.slides, outs, pipeline, **kwargs)
        except BaseException:  # a run that failed before writing anything leaves no empty folder of its making
            for d in made:
                try:
                    os.rmdir(d)  # only when empty
                except OSError:
                    break
            raise

    def close(self):
        for s in self.slides:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

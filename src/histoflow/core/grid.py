"""TileGrid: where the tiles of a slide are. Geometry only; no pixels are read here.

A grid is laid out in *output* pixels: those of a pyramid level, or of a target pixel size (µm/px) that no
level may have exactly, in which case each tile is read from the coarsest level that is not coarser than
the target and resampled. Every tile knows its level-0 rectangle, the level it is read from and the size
to read there, so a reader can fetch it and a mask can be looked up at any resolution.

>>> g = TileGrid((2220, 2967), tile_size=256, overlap=32)
>>> g.shape, len(g)
((14, 10), 140)
>>> t = g[0]; (t.x, t.y, t.read_size)
(0, 0, (256, 256))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import RegionError

#: relative difference under which a level's pixel size counts as the target's (no resampling)
MPP_TOLERANCE = 0.01


#: most tiles a grid may have (a target mpp far finer than the slide's would make more than a process can count)
MAX_GRID_TILES = 1 << 31


@dataclass(frozen=True)
class TileSpec:
    """One cell of a grid."""

    row: int
    col: int
    x: int  # level-0 top-left
    y: int
    width0: int  # level-0 extent covered by the tile
    height0: int
    level: int  # level to read from
    read_size: tuple[int, int]  # (w, h) to read at that level
    size: tuple[int, int]  # (w, h) of the output tile
    downsample: float  # output pixel -> level-0 pixels
    #: (x0, y0, x1, y1) in tile pixels: the part of the tile that this tile owns when tiles overlap. The
    #: overlap with each neighbour is split at its middle; the first and last tiles of a row or column own
    #: up to the slide's edge. The cores of all tiles cover the slide once, so an object (a nucleus, a
    #: cell) is kept by exactly one tile when each tile keeps the objects whose centroid is in its core.
    core: tuple = None
    #: ``(x, y)`` of the tile's top-left in the grid's output pixels, for tiles resampled to a target µm/px,
    #: shrunk or enlarged (None when read from a level as they are): each pixel is read from its place in the
    #: whole resampled level (:func:`~histoflow.core.slide.read_on_grid`), not from the tile's rounded level-0
    #: rectangle. On grids finer than level 0 (``upsampled``) a level-0 pixel spans several output pixels:
    #: ``x``, ``y`` (whole level-0 pixels, which stitching and slide masks go by) are then the origin rounded
    origin: tuple = None

    @property
    def coords(self) -> tuple[int, int]:
        return (self.x, self.y)

    @property
    def needs_resample(self) -> bool:
        return self.read_size != self.size


class TileGrid:
    """A regular grid of tiles over a slide.

    Parameters
    ----------
    dimensions : (int, int)
        Level-0 (width, height) of the slide.
    tile_size : int or (int, int)
        Output tile (width, height) in pixels.
    stride : int or (int, int), optional
        Step between tile corners in output pixels. Default: ``tile_size - overlap``.
    overlap : int or (int, int)
        Overlap between neighbours in output pixels (ignored when ``stride`` is given).
    level : int, optional
        Read tiles from this level, at its resolution. Default 0 unless ``mpp`` is given.
    mpp : float, optional
        Target pixel size in µm/px. The grid is laid out at that resolution; tiles are read from the
        coarsest level not coarser than it and resampled when no level matches (within 1 %). A target
        finer than level 0 enlarges level 0's pixels (``upsampled``).
    level_downsamples : sequence of float
        Downsample of each level (level 0 first). Default ``[1.0]``.
    slide_mpp : float or (float, float), optional
        Level-0 pixel size, required with ``mpp``.
    edge : {"pad", "drop"}
        ``"pad"`` keeps partial tiles at the right and bottom edges (the reader pads them);
        ``"drop"`` keeps only tiles fully inside the slide.
    mask : 2-D array, optional
        A slide-level mask (any resolution); keep only tiles it covers by at least ``min_coverage``.
    mask_downsample : float, optional
        Level-0 pixels per mask pixel. Default: inferred from the mask's width.
    level_dimensions : sequence of (int, int), optional
        (width, height) of each level. Tiles read from a level without resampling then cover exactly that
        level's pixels (default: level 0's size over the downsample, which can be a pixel off).
    min_coverage : float
        Fraction (0..1) of the tile's area the mask must cover. With a mask and the default 0, a tile
        is kept when the mask touches it at all.
    """

    def __init__(self, dimensions, tile_size=256, *, stride=None, overlap=0, level=None, mpp=None,
                 level_downsamples=None, slide_mpp=None, edge="pad", mask=None, mask_downsample=None,
                 min_coverage=0.0, level_dimensions=None):
        self.dimensions = (int(dimensions[0]), int(dimensions[1]))
        if min(self.dimensions) <= 0:
            raise RegionError(f"slide dimensions must be positive, got {self.dimensions}")
        self.tile_size = _pair(tile_size, "tile_size")
        if min(self.tile_size) <= 0:
            raise RegionError(f"tile_size must be positive, got {tile_size}")
        if stride is None:
            ov = _pair(overlap, "overlap")
            if not all(0 <= o < t for o, t in zip(ov, self.tile_size)):
                raise RegionError(f"overlap must be in [0, tile_size), got {overlap} for tile size {tile_size}")
            self.stride = (self.tile_size[0] - ov[0], self.tile_size[1] - ov[1])
        else:
            self.stride = _pair(stride, "stride")
            if min(self.stride) <= 0:
                raise RegionError(f"stride must be positive, got {stride}")
        self.overlap = (self.tile_size[0] - self.stride[0], self.tile_size[1] - self.stride[1])
        if edge not in ("pad", "drop"):
            raise RegionError(f"edge must be 'pad' or 'drop', got {edge!r}")
        self.edge = edge
        self.level_downsamples = [float(d) for d in (level_downsamples or [1.0])]
        if level is not None and mpp is not None:
            raise RegionError("give either level or mpp, not both")
        self.target_mpp = None
        if mpp is not None:
            if slide_mpp is None:
                raise RegionError("a target mpp needs the slide's pixel size, which is unknown: pass mpp=... when "
                                  "opening the slide (`--slide-mpp` on the command line), or tile by level")
            smpp = float(slide_mpp[0] if not np.isscalar(slide_mpp) else slide_mpp)
            if not (math.isfinite(smpp) and smpp > 0):
                raise RegionError(f"the slide's pixel size must be a positive number, got {slide_mpp!r}")
            if not np.isscalar(slide_mpp) and abs(float(slide_mpp[1]) / smpp - 1) > 0.01:
                raise RegionError(f"the slide's pixels are not square ({smpp:g} x {float(slide_mpp[1]):g} µm): tiles "
                                  "at a target mpp would be square in neither; tile by level")
            try:
                self.target_mpp = float(mpp)
            except (TypeError, ValueError):
                raise RegionError(f"target mpp must be a positive number, got {mpp!r}") from None
            if not (math.isfinite(self.target_mpp) and self.target_mpp > 0):
                raise RegionError(f"target mpp must be a positive number, got {mpp}")
            want = self.target_mpp / smpp
            if want > max(self.dimensions):  # one tile pixel larger than the whole slide: the resampling weights
                # (tile size x level pixels per tile pixel) took gigabytes, and the process was killed
                raise RegionError(f"target mpp {self.target_mpp:g} µm/px makes one tile pixel larger than the whole "
                                  f"slide ({self.dimensions[0]} x {self.dimensions[1]} px at {smpp:g} µm/px, at most "
                                  f"{max(self.dimensions) * smpp:g} µm/px)")
            self.level = max((i for i, d in enumerate(self.level_downsamples) if d <= want * (1 + MPP_TOLERANCE)),
                             default=0)
            lds = self.level_downsamples[self.level]
            self.downsample = lds if abs(lds - want) <= MPP_TOLERANCE * want else want
        else:
            if level is not None and not _whole(level):
                raise RegionError(f"level must be a whole number, got {level!r}")
            n = len(self.level_downsamples)
            given = int(level or 0)
            self.level = given + n if given < 0 else given  # -1: the last level, as read_region takes it
            if not 0 <= self.level < n:
                raise RegionError(f"level {given} does not exist (the slide has {n}: 0..{n - 1}, or -1..-{n} from "
                                  "the last)")
            self.downsample = self.level_downsamples[self.level]
        self.level_downsample = self.level_downsamples[self.level]
        # output-space size of the slide: a level's own size when tiles are read from it as they are (its
        # downsample is level 0's size over its size, rounded: dividing by it can land a pixel off)
        self.out_size = (self.dimensions[0] / self.downsample, self.dimensions[1] / self.downsample)
        if level_dimensions is not None and self.level < len(level_dimensions):
            lw, lh = level_dimensions[self.level]
            if not self.resampled:
                self.out_size = (float(lw), float(lh))
            else:  # resampled from a level that covers less than level 0 (556 px x 15.96 = 8874.5 of 8880): the
                r = self.downsample / self.level_downsample  # grid ends with the level's data, or its last column
                self.out_size = (min(self.out_size[0], lw / r), min(self.out_size[1], lh / r))  # could be fill only
        self.cols = _count(self.out_size[0], self.tile_size[0], self.stride[0], edge)
        self.rows = _count(self.out_size[1], self.tile_size[1], self.stride[1], edge)
        if self.cols * self.rows > MAX_GRID_TILES:
            raise RegionError(f"the grid would have {self.rows:,} x {self.cols:,} tiles ({self.out_size[0]:,.0f} x "
                              f"{self.out_size[1]:,.0f} px of {self.tile_size[0]} x {self.tile_size[1]}), more than "
                              f"{MAX_GRID_TILES:,}: use larger tiles or a coarser level / mpp")
        self.mask_filter = None
        if mask is not None:
            self.mask_filter = _MaskCoverage(np.asarray(mask), mask_downsample, self.dimensions)
        try:
            self.min_coverage = float(min_coverage)
        except (TypeError, ValueError):
            self.min_coverage = float("nan")
        if not 0 <= self.min_coverage <= 1:
            raise RegionError(f"min_coverage is a fraction of the tile, 0..1; got {min_coverage!r}")
        if self.min_coverage > 0 and mask is None:
            raise RegionError("min_coverage needs a mask to measure coverage with (e.g. mask='tissue')")
        self._index = None

    # ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the full grid, before any mask filter."""
        return (self.rows, self.cols)

    @property
    def resampled(self) -> bool:
        return abs(self.downsample - self.level_downsample) > 1e-9

    @property
    def upsampled(self) -> bool:
        """Whether the target pixel size is finer than level 0's by more than ``MPP_TOLERANCE``: the tiles are
        enlarged from level 0, their pixels interpolated (:meth:`SlideData.grid` warns)."""
        return self.resampled and self.downsample < 1

    def spec(self, row: int, col: int) -> TileSpec:
        ds = self.downsample
        ox, oy = col * self.stride[0], row * self.stride[1]
        (tw, th) = self.tile_size
        # both ends from output coordinates, rounded the same way: neighbours whose stride is the tile size
        # share their boundary exactly (rounding the start and the size apart left 1 px gaps now and then)
        x, y = int(round(ox * ds)), int(round(oy * ds))
        x1, y1 = int(round((ox + tw) * ds)), int(round((oy + th) * ds))
        w0, h0 = max(1, x1 - x), max(1, y1 - y)
        if self.resampled:
            lds = self.level_downsample
            # rounded as read_region rounds its start (half up): round() sends x.5 to even, a pixel apart
            read = (max(1, _half_up(x1 / lds) - _half_up(x / lds)), max(1, _half_up(y1 / lds) - _half_up(y / lds)))
        else:
            read = self.tile_size
        return TileSpec(row, col, x, y, w0, h0, self.level, read, self.tile_size, ds, self.core(row, col),
                        (ox, oy) if self.resampled else None)

    def core(self, row: int, col: int) -> tuple:
        """The ``(x0, y0, x1, y1)`` part of tile (row, col) it owns, in tile pixels (see TileSpec.core)."""
        (tw, th), (sx, sy) = self.tile_size, self.stride
        ox, oy = max(0, tw - sx) // 2, max(0, th - sy) // 2
        x0 = 0 if col == 0 else ox
        y0 = 0 if row == 0 else oy
        x1 = tw if col == self.cols - 1 else min(tw, sx + ox)
        y1 = th if row == self.rows - 1 else min(th, sy + oy)
        return (x0, y0, x1, y1)

    def coverage(self, spec: TileSpec) -> float:
        """Fraction of the tile covered by the mask (1.0 when there is no mask)."""
        if self.mask_filter is None:
            return 1.0
        return self.mask_filter.fraction(spec.x, spec.y, spec.width0, spec.height0)

    def _kept(self):
        if self._index is None:
            # every tile's level-0 rectangle as spec() makes it, a row of the grid at a time (one Python call a
            # tile took 75 µs: 3 minutes before a 2.4-million-tile grid began)
            ds, (tw, th), (sx, sy) = self.downsample, self.tile_size, self.stride
            ox, oy = np.arange(self.cols, dtype=np.float64) * sx, np.arange(self.rows, dtype=np.float64) * sy
            x, y = np.round(ox * ds), np.round(oy * ds)
            w0 = np.maximum(1, np.round((ox + tw) * ds) - x)
            h0 = np.maximum(1, np.round((oy + th) * ds) - y)
            keep = []
            step = max(1, (1 << 20) // max(self.cols, 1))
            for r0 in range(0, self.rows, step):
                cov = self.mask_filter.fractions(x, y[r0:r0 + step], w0, h0[r0:r0 + step])
                # (a rectangle the mask does not touch comes out of the integral image as ~1e-15)
                rr, cc = np.nonzero((cov > 1e-9) & (cov >= self.min_coverage - 1e-9))
                keep += list(zip((rr + r0).tolist(), cc.tolist()))
            self._index = keep
        return self._index

    def __len__(self):
        if self.mask_filter is None:
            return self.rows * self.cols
        return len(self._kept())

    def __iter__(self):
        if self.mask_filter is None:
            for r in range(self.rows):
                for c in range(self.cols):
                    yield self.spec(r, c)
        else:
            for r, c in self._kept():
                yield self.spec(r, c)

    def __getitem__(self, i: int) -> TileSpec:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"tile index {i} out of range for a grid of {n} tiles")
        i %= n
        if self.mask_filter is None:
            return self.spec(i // self.cols, i % self.cols)
        return self.spec(*self._kept()[i])

    def __repr__(self):
        where = f"mpp={self.target_mpp}" if self.target_mpp else f"level={self.level}"
        return (f"TileGrid({self.rows}x{self.cols} tiles of {self.tile_size[0]}x{self.tile_size[1]}, "
                f"stride={self.stride}, {where}, downsample={self.downsample:.4g}, edge={self.edge!r}, "
                f"{len(self)} kept)")


def _pair(v, name):
    vals = (v, v) if np.isscalar(v) else v
    try:
        if len(vals) != 2:
            raise TypeError
        out = tuple(int(x) for x in vals)
        if any(isinstance(x, bool) or float(x) != int(x) for x in vals):
            raise TypeError
    except (TypeError, ValueError, OverflowError):
        raise RegionError(f"{name} must be a whole number of pixels or a pair of them, got {v!r}") from None
    return out


def _whole(v) -> bool:
    try:
        return not isinstance(v, bool) and float(v).is_integer()
    except (TypeError, ValueError):
        return False


def _half_up(v: float) -> int:
    return math.floor(v + 0.5)


def _count(extent: float, tile: int, stride: int, edge: str) -> int:
    if edge == "drop":
        # with the tolerance below: a slide 740 x 1.497 µm wide resampled from 0.499 µm/px is 739.9999999999999
        return 0 if extent < tile - 1e-9 else int(math.floor((extent - tile) / stride + 1e-9)) + 1
    if extent <= tile:
        return 1
    # enough tiles to reach the edge, but none that starts at or past it (strides longer than the tile)
    return min(int(math.ceil((extent - tile) / stride - 1e-9)) + 1, int(math.ceil(extent / stride - 1e-9)))


class _MaskCoverage:
    """Fraction of a level-0 rectangle covered by a mask at another resolution (integral image)."""

    def __init__(self, mask: np.ndarray, downsample, dimensions):
        if mask.ndim != 2 or mask.size == 0:
            raise RegionError(f"a tile filter mask must be a non-empty 2-D array, got shape {mask.shape}")
        self.ds = float(downsample) if downsample else dimensions[0] / mask.shape[1]
        self.h, self.w = mask.shape
        self.dimensions = dimensions  # level-0 (w, h): a mask reaching past the slide covers no padding
        # the integral image in the narrowest integer type that holds the mask's area (int32 up to 2 G
        # pixels: a level-0 mask took 32x its own size in int64 copies), summed in place row by row
        dt = np.int32 if mask.size < 2**31 else np.int64
        self.integral = np.zeros((self.h + 1, self.w + 1), dt)
        np.greater(mask, 0, out=self.integral[1:, 1:], casting="unsafe")
        np.cumsum(self.integral[1:, 1:], axis=1, out=self.integral[1:, 1:])
        for r in range(2, self.h + 1):  # rows one at a time: no second full-size temporary
            self.integral[r, 1:] += self.integral[r - 1, 1:]

    def fractions(self, x, y, w0, h0) -> np.ndarray:
        """:meth:`fraction` of every rectangle ``x[j], y[i], w0[j], h0[i]`` (columns ``x``, ``w0``; rows ``y``,
        ``h0``), as ``(rows, cols)``. The mask's area below and left of a fractional corner is the integral image
        interpolated bilinearly, exact for a mask that is constant over each of its pixels."""
        ds = self.ds
        x, y, w0, h0 = (np.asarray(v, np.float64) for v in (x, y, w0, h0))
        fx0, fy0, fx1, fy1 = x / ds, y / ds, (x + w0) / ds, (y + h0) / ds
        area = (fy1 - fy0)[:, None] * (fx1 - fx0)[None, :]
        fx1, fy1 = np.minimum(fx1, self.dimensions[0] / ds), np.minimum(fy1, self.dimensions[1] / ds)

        def at(fx, fy):
            fx, fy = np.minimum(np.maximum(fx, 0.0), self.w), np.minimum(np.maximum(fy, 0.0), self.h)
            i, j = np.minimum(fx.astype(np.int64), self.w - 1), np.minimum(fy.astype(np.int64), self.h - 1)
            ax, ay = (fx - i)[None, :], (fy - j)[:, None]
            s, jj, ii = self.integral, j[:, None], i[None, :]
            return ((1 - ay) * ((1 - ax) * s[jj, ii] + ax * s[jj, ii + 1])
                    + ay * ((1 - ax) * s[jj + 1, ii] + ax * s[jj + 1, ii + 1]))

        s = at(fx1, fy1) - at(fx0, fy1) - at(fx1, fy0) + at(fx0, fy0)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.minimum(1.0, np.maximum(0.0, s / area))
        empty = (area <= 0) | (fx1 <= fx0)[None, :] | (fy1 <= fy0)[:, None]
        out[empty] = 0.0
        return out

    def fraction(self, x, y, w0, h0) -> float:
        """The fraction of the rectangle's area the mask covers; parts past the mask, or past the slide (a
        mask's last pixel usually reaches beyond it: an edge tile's padding), count as uncovered."""
        return float(self.fractions([x], [y], [w0], [h0])[0, 0])

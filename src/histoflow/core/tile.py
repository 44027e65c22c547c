"""Tile: one rectangle of a slide, with its masks and labels."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ParameterError


@dataclass
class Tile:
    """One tile of a slide.

    Attributes
    ----------
    image : numpy.ndarray
        ``(h, w, c)`` pixels in the slide's native dtype.
    coords : (int, int)
        Top-left corner ``(x, y)`` in level-0 pixels.
    level : int
        Pyramid level the pixels were read from.
    downsample : float
        Effective downsample of ``image`` relative to level 0 (differs from the level's when the tile
        was resampled to a target µm/px).
    masks : dict of str -> ndarray
        Per-pixel masks, each ``(h, w)``.
    labels : dict of str -> scalar
        Tile-level labels (numbers or strings).
    slide_type : str or None
        Name of the slide type preset (``"HE"``, ``"IF"``, ...).
    name : str or None
        A readable identifier, by default ``"<slide>_x<x>_y<y>"``.
    mpp : (float, float) or None
        Pixel size of ``image`` in µm, when known.
    cells : dict or None
        The tile's cell table: numeric column arrays with one row per cell (e.g. ``"mean"`` (n, channels),
        ``"area"`` (n,), ``"centroid"`` (n, 2) in level-0 pixels), made by cell quantification on a worker
        and gathered by the engine into the slide's AnnData table.
    core : (x0, y0, x1, y1) or None
        The part of the tile it owns among overlapping neighbours, in tile pixels (set by the grid:
        :attr:`histoflow.core.grid.TileSpec.core`); None means the whole tile. Transforms that find
        objects keep those whose centroid lies in the core, so no object is counted twice or lost.
    extent : (int, int) or None
        ``(width, height)`` in tile pixels of the part of ``image`` that lies inside the slide, for a tile
        at the right or bottom edge of a grid whose tiles overhang the slide (the reader fills the rest:
        white for brightfield, 0 otherwise); None means the whole tile. Costly transforms (the nucleus
        model) work on that part only.
    """

    image: np.ndarray
    coords: tuple[int, int]
    level: int = 0
    downsample: float = 1.0
    masks: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    slide_type: str | None = None
    name: str | None = None
    mpp: tuple[float, float] | None = None
    core: tuple | None = None
    cells: dict | None = None
    extent: tuple | None = None

    def __post_init__(self):
        self.coords = (int(self.coords[0]), int(self.coords[1]))
        if self.image.ndim == 2:
            self.image = self.image[:, :, None]
        if self.image.ndim != 3:
            raise ParameterError(f"tile image must be (h, w, c), got shape {self.image.shape}")

    @property
    def shape(self):
        return self.image.shape

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels of ``image``."""
        return self.image.shape[1], self.image.shape[0]

    def __repr__(self):
        return (f"Tile(name={self.name!r}, coords={self.coords}, level={self.level}, "
                f"shape={self.image.shape}, dtype={self.image.dtype}, masks={sorted(self.masks)}, "
                f"labels={self.labels})")

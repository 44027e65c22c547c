"""The polygon type shared by the annotation readers and writers, and rasterisation to masks."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np

from ..errors import HistoflowError, ParameterError

__all__ = ["AnnotationError", "Polygon", "rasterize"]


class AnnotationError(HistoflowError, ValueError):
    """An annotation file cannot be read or written: names the file and the problem."""


@dataclass
class Polygon:
    """One annotated object.

    Attributes
    ----------
    exterior : ndarray, float64 (n, 2)
        Vertices (x, y) in level-0 pixels, not repeated at the end.
    holes : list of ndarray
        Interior rings, same convention.
    name : str
        The object's id or name in its file.
    classification : str or None
        Class name (QuPath classification, Aperio annotation name ...).
    measurements : dict
        Numbers attached to the object.
    object_type : str or None
        QuPath's kind of object ("annotation", "detection", "cell" ...) when the file said.
    color : (r, g, b) or None
        The class colour the file gave.
    group : str or None
        Shared by the parts of one multi-part object (a GeoJSON MultiPolygon), which are written back as
        one object.
    uid : str or None
        The object's id in its file (a QuPath GeoJSON feature's UUID), written back when the format has one.
    nucleus : ndarray, float64 (m, 2), or None
        The outline of a cell's nucleus (QuPath's ``nucleusGeometry`` of a cell object), when it has one.
    """

    exterior: np.ndarray
    holes: list = field(default_factory=list)
    name: str = ""
    classification: str | None = None
    measurements: dict = field(default_factory=dict)
    object_type: str | None = None
    color: tuple | None = None
    group: str | None = None
    uid: str | None = None
    nucleus: np.ndarray | None = None

    def __post_init__(self):
        self.exterior = _open_ring(np.asarray(self.exterior, dtype=np.float64).reshape(-1, 2))
        self.holes = [_open_ring(np.asarray(h, dtype=np.float64).reshape(-1, 2)) for h in _rings_of(self.holes)]
        if self.nucleus is not None:
            self.nucleus = _open_ring(np.asarray(self.nucleus, dtype=np.float64).reshape(-1, 2))
        for what, rings in (("its exterior", [self.exterior]), ("a hole", self.holes),
                            ("its nucleus", [] if self.nucleus is None else [self.nucleus])):
            if not all(np.all(np.isfinite(r)) for r in rings):  # no file format can hold them (JSON has no NaN)
                raise AnnotationError(f"polygon {self.name!r}: {what} has coordinates that are not finite "
                                      "numbers (NaN or infinite)")

    @property
    def area(self) -> float:
        """Area in level-0 pixels² (shoelace formula; holes subtracted)."""
        return _ring_area(self.exterior) - sum(_ring_area(h) for h in self.holes)

    @property
    def bounds(self) -> tuple:
        """(xmin, ymin, xmax, ymax) of the exterior."""
        x, y = self.exterior[:, 0], self.exterior[:, 1]
        return float(x.min()), float(y.min()), float(x.max()), float(y.max())

    @property
    def centroid(self) -> tuple:
        """Area centroid (x, y) of the exterior ring."""
        x, y = self.exterior[:, 0], self.exterior[:, 1]
        x1, y1 = np.roll(x, -1), np.roll(y, -1)
        cross = x * y1 - x1 * y
        a = cross.sum() / 2
        if abs(a) < 1e-12:
            return float(x.mean()), float(y.mean())
        return float(((x + x1) * cross).sum() / (6 * a)), float(((y + y1) * cross).sum() / (6 * a))


#: colours given to classes that have none, in this order (distinct, readable on H&E and fluorescence)
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def _rings_of(holes) -> list:
    """``holes`` as a list of rings: one ring given as an (n, 2) array or list of points is one hole (it was read
    as n holes of one vertex each, which enclose nothing: the hole was lost without a word)."""
    if holes is None:
        return []
    try:
        a = np.asarray(holes, dtype=np.float64)
    except (TypeError, ValueError):  # rings of different lengths: a list of rings
        return list(holes)
    return [a] if a.ndim == 2 and a.shape[1] == 2 and len(a) >= 3 else list(holes)


def measurement_values(p, where="") -> dict:
    """A polygon's measurements as ``{name: float}`` for writing (None, a missing value, as NaN); an
    AnnotationError naming the file, polygon and measurement for a value that is not a number (a writer raised
    TypeError / OverflowError from deep inside)."""
    out = {}
    for k, v in (p.measurements or {}).items():
        if v is None:
            out[str(k)] = float("nan")
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise AnnotationError(f"{where + ': ' if where else ''}polygon {p.name!r}: measurement {k!r} is "
                                  f"{v!r:.40}, not a number (measurements are numbers; text goes in the name or "
                                  "classification)")
        try:
            out[str(k)] = float(v)
        except OverflowError:
            raise AnnotationError(f"{where + ': ' if where else ''}polygon {p.name!r}: measurement {k!r} is too "
                                  "large for a floating-point number") from None
    return out


def class_colors(polygons, colors: dict | None = None, where: str = "") -> dict:
    """A colour (r, g, b) for each class of ``polygons``: from ``colors`` (name -> colour), else the first
    colour read with a polygon of that class, else the next unused colour of :data:`PALETTE`."""
    out = {k: color_triple(v, f"{where}: colour of {k!r}") for k, v in dict(colors or {}).items()}
    used = set(out.values())
    for p in polygons:
        c = p.classification
        if c is None or c in out:
            continue
        rgb = color_triple(p.color, f"{where}: colour of {c!r}") if p.color is not None else next(
            (q for q in PALETTE if q not in used), PALETTE[len(out) % len(PALETTE)])
        out[c] = rgb
        used.add(rgb)
    return out


def objects_of(polygons) -> list:
    """The polygons as objects: lists of the parts of one object (polygons sharing a ``group``, in their
    order), each object where its first part is."""
    out, by_group = [], {}
    for p in polygons:
        if p.group is None:
            out.append([p])
        elif p.group in by_group:
            by_group[p.group].append(p)
        else:
            by_group[p.group] = [p]
            out.append(by_group[p.group])
    return out


def color_triple(c, where) -> tuple:
    """An (r, g, b) colour of whole numbers 0..255 (an alpha, as QuPath may write, is dropped), or an
    AnnotationError naming ``where``."""
    try:
        rgb = tuple(float(v) for v in c)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) not in (3, 4) or not all(np.isfinite(v) and 0 <= v <= 255 for v in rgb):
        raise AnnotationError(f"{where}: a colour is three numbers 0..255 (and an optional alpha), got {c!r}")
    return tuple(int(round(v)) for v in rgb[:3])


def _open_ring(ring):
    """The ring without its closing vertex (the first repeated at the end), as every polygon keeps it."""
    return ring[:-1] if len(ring) > 3 and np.array_equal(ring[0], ring[-1]) else ring


def _ring_area(ring) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _downsample_pair(downsample):
    try:
        d = np.broadcast_to(np.asarray(downsample, dtype=np.float64), (2,))
    except (TypeError, ValueError):
        d = None
    if d is None or not np.all(np.isfinite(d)) or np.any(d <= 0):
        raise ParameterError(f"downsample must be a positive number (or an (x, y) pair), got {downsample!r}")
    return float(d[0]), float(d[1])


def rasterize(polygons, shape, downsample: float = 1.0, origin=(0, 0), values=None, dtype=np.int32):
    """Paint polygons into a label image.

    Parameters
    ----------
    polygons : sequence of Polygon
    shape : (height, width)
        Of the output, in pixels of the target resolution.
    downsample : float or (float, float)
        Level-0 pixels per output pixel (e.g. 4 for a mask at level-0 / 4); a pair is (x, y).
    origin : (x, y)
        Level-0 position of the output's top-left corner.
    values : sequence of int, optional
        Value painted for each polygon (one per polygon); default 1, 2, 3 ... per object (an instance mask:
        the parts of a multi-part object, polygons sharing a ``group``, get one value). Give
        class ids for a class mask. Later polygons overwrite earlier ones where they overlap; a polygon's
        holes are left out of it (and keep whatever another polygon painted there, e.g. an island inside a
        lumen).
    dtype : numpy integer dtype
        Of the output (int32 by default); every value must fit it.

    A pixel belongs to a polygon when its centre lies inside it; a centre exactly on an edge belongs to the
    polygon on its right and below (half-open, as pixels themselves are), so polygons that share an edge do
    not both take the pixels on it (at downsample 2, 4, ... the centres of pixels lie on whole level-0
    coordinates, where outlines drawn on pixel edges run: counted in on every side, masks grew ~13 %).
    """
    try:
        h, w = (int(v) for v in shape)
        if (h, w) != tuple(float(v) for v in shape) or h < 0 or w < 0:
            raise ValueError
    except (TypeError, ValueError):
        raise ParameterError(f"rasterize: shape is the output's (height, width), two whole numbers >= 0; got "
                             f"{shape!r}") from None
    dx, dy = _downsample_pair(downsample)
    polygons = list(polygons)
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        raise ParameterError(f"rasterize paints integer labels: dtype must be an integer type, not {dtype}")
    if values is None:  # one id per object: the parts of a group share the id of its first part
        ids: dict = {}
        values = np.array([ids.setdefault(p.group if p.group is not None else ("polygon", i), len(ids) + 1)
                           for i, p in enumerate(polygons)], np.int64)
    values = np.asarray(values)
    if values.ndim != 1 or len(values) != len(polygons):
        raise ParameterError(f"rasterize: {len(polygons)} polygons but {values.size} values: give one value per "
                             "polygon")
    if len(values):
        if not np.issubdtype(values.dtype, np.integer):
            raise ParameterError(f"rasterize: values must be whole numbers, got {values.dtype}")
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise ParameterError(f"rasterize: values {values.min()}..{values.max()} do not fit {dtype} "
                                 f"({info.min}..{info.max}); use a wider dtype (e.g. int32)")
    out = np.zeros((h, w), dtype=dtype)
    ox, oy = origin

    def pixels(ring):
        # pixel (c, r) covers level-0 [c*d, (c+1)*d); its centre is at (c + 0.5) * d. Moved up and left by a hair,
        # an outline through centres keeps those on its left and top edges (now just inside) and not those on its
        # right and bottom ones (just outside); _fill's half-open rule does the same for 45-degree edges, which
        # the hair moves along themselves
        cols = (ring[:, 0] - ox) / dx - 0.5 - _TIE
        rows = (ring[:, 1] - oy) / dy - 0.5 - _TIE
        return _fill(rows, cols, h, w)

    for poly, value in zip(polygons, values):
        if len(poly.exterior) < 3:
            continue
        got = pixels(poly.exterior)
        if got is None:
            continue
        y0, x0, own = got
        for hole in poly.holes:  # the polygon's own pixels minus its holes
            cut = pixels(hole) if len(hole) >= 3 else None
            if cut is None:
                continue
            hy, hx, hm = cut
            ya, yb = max(y0, hy), min(y0 + own.shape[0], hy + hm.shape[0])
            xa, xb = max(x0, hx), min(x0 + own.shape[1], hx + hm.shape[1])
            if ya < yb and xa < xb:
                own[ya - y0:yb - y0, xa - x0:xb - x0] &= ~hm[ya - hy:yb - hy, xa - hx:xb - hx]
        out[y0:y0 + own.shape[0], x0:x0 + own.shape[1]][own] = value
    return out


def _fill(rows, cols, h, w):
    """The grid points (r, c), 0 <= r < h, 0 <= c < w, inside the closed ring through (rows, cols) (even-odd
    rule; a point on the outline is in when the ring lies to its right or below it: half-open, as pixels), as
    ``(r0, c0, mask)`` of their bounding box, or None. A scanline fill: each edge's crossings with the rows it
    spans, sorted, paired into spans; the time grows with the rows and edges crossed, not with the box's pixels
    times the vertices (a 9,426-vertex ellipse over 4000 x 2000 px took 150 s by testing every pixel against
    every edge)."""
    rows = np.asarray(rows, np.float64)
    cols = np.asarray(cols, np.float64)
    if not (np.isfinite(rows).all() and np.isfinite(cols).all()):
        return None
    y0, y1 = rows, np.roll(rows, -1)
    x0, x1 = cols, np.roll(cols, -1)
    down = y0 > y1  # each edge from its upper end: an edge two polygons share gives both the same crossings
    y0, y1 = np.where(down, y1, y0), np.where(down, y0, y1)
    x0, x1 = np.where(down, x1, x0), np.where(down, x0, x1)
    # an edge crosses row r when one end is above it and the other not: r in [y0, y1), half-open, so a row
    # through a vertex counts the vertex once (values are clipped to just outside the output before a cast: past
    # int64 they wrapped round, and a square far to the right painted 60 px of a 10 x 10 output)
    start = np.maximum(np.ceil(np.clip(y0, -1, h)).astype(np.int64), 0)
    stop = np.minimum(np.ceil(np.clip(y1, -1, h)).astype(np.int64), h)
    n = np.maximum(stop - start, 0)
    edges = np.nonzero(n)[0]
    if not len(edges):
        return None
    n = n[edges]
    e = np.repeat(edges, n)
    r = start[e] + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
    # from the end nearer the row: a far end (1e16 px, a damaged file) left no digits for the near part
    slope = (x1[e] - x0[e]) / (y1[e] - y0[e])
    near0 = np.abs(r - y0[e]) <= np.abs(r - y1[e])
    with np.errstate(invalid="ignore", over="ignore"):
        x = np.where(near0, x0[e] + (r - y0[e]) * slope, x1[e] + (r - y1[e]) * slope)
    x = np.nan_to_num(x, nan=-1.0, posinf=w + 1.0, neginf=-1.0)
    order = np.lexsort((x, r))
    r, x = r[order], x[order]
    r, a, b = r[0::2], x[0::2], x[1::2]  # every row holds an even number of crossings
    # the points a <= c < b: one on an edge belongs to the polygon on its right, and (rows above) below it
    c0 = np.maximum(np.ceil(np.clip(a, -1, w)).astype(np.int64), 0)
    c1 = np.minimum(np.ceil(np.clip(b, -1, w)).astype(np.int64) - 1, w - 1)
    ok = c0 <= c1
    if not ok.any():
        return None
    r, c0, c1 = r[ok], c0[ok], c1[ok]
    ra, ca = int(r.min()), int(c0.min())
    mark = np.zeros((int(r.max()) - ra + 1, int(c1.max()) - ca + 2), np.int8)
    np.add.at(mark, (r - ra, c0 - ca), 1)  # spans of a row do not overlap: the running sum is 0 or 1
    np.add.at(mark, (r - ra, c1 - ca + 1), -1)
    return ra, ca, np.cumsum(mark, axis=1, dtype=np.int8)[:, :-1] > 0


#: how far outlines are moved (in output pixels) to break ties at pixel centres (see :func:`rasterize`)
_TIE = 1e-6


def polygonize(labels, downsample: float = 1.0, origin=(0, 0), classes=None, min_area: float = 0.0) -> list[Polygon]:
    """Outline every object of a label image as a :class:`Polygon` in level-0 pixels.

    Parameters
    ----------
    labels : 2-D integer array
        0 = background; each other value one object (an instance mask), or a class mask.
    downsample, origin
        Level-0 pixels per label pixel and the level-0 position of the label image's corner.
    classes : mapping of int to str, optional
        ``classification`` of the polygon of each label value.
    min_area : float
        Objects with a smaller polygon area (level-0 pixels², all pieces together) are left out.

    The outline follows the pixel edges of the object (``cv2.findContours`` on a 2x upsampled mask and
    halved), so rasterising the polygon again gives back the same pixels; holes are kept. An object in
    several pieces gives one polygon per piece, all with the object's id as ``name`` and ``group`` (written
    to GeoJSON as one MultiPolygon: one object, as in the label image).
    """
    import cv2
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ParameterError(f"polygonize needs a 2-D label image, got shape {labels.shape}")
    dx, dy = _downsample_pair(downsample)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ParameterError(f"polygonize needs an integer label image, got {labels.dtype}")
    out = []
    ox, oy = origin
    # find_objects walks every id from 1 to the largest: a tile's window of slide-wide ids (1,000,001 ..) cost
    # time in proportion to the nuclei before it. Ids are counted from the smallest present (a few ids spread
    # wider than the image has pixels: numbered 1..n)
    ids, slices = None, ()  # ids[k - 1]: the id of compact label k (ids of any integer dtype, to 2**64 - 1)
    fg = labels[labels > 0]
    if fg.size:
        lo, hi = int(fg.min()), int(fg.max())
        if hi - lo + 1 > labels.size:
            ids = np.unique(fg)
            compact = np.zeros(labels.shape, np.int32)
            compact[labels > 0] = np.searchsorted(ids, fg) + 1
        else:  # (find_objects takes 32-bit labels)
            ids = np.arange(lo, hi + 1, dtype=np.uint64)
            compact = (np.where(labels > 0, labels - labels.dtype.type(lo - 1), 0) if lo > 1 else labels).astype(
                np.int32, copy=False)
        slices = ndi.find_objects(compact)
    for k, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        value = int(ids[k - 1])
        y0, x0 = sl[0].start, sl[1].start
        m = (compact[sl] == k).astype(np.uint8)
        # pixel corners: draw each pixel as a 2x2 block, trace, and map back to corner coordinates
        big = np.pad(np.kron(m, np.ones((2, 2), np.uint8)), 1)
        contours, hierarchy = cv2.findContours(big, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        if hierarchy is None:
            continue
        hierarchy = hierarchy[0]

        def ring(c):
            pts = c[:, 0, :].astype(np.float64)
            # contour pixels of the 2x block image -> pixel-corner coordinates of the original
            pts = (pts - 1 + 0.5) / 2.0
            pts = np.round(pts * 2) / 2
            # rounding makes neighbours of the 2x trace coincide: consecutive repeats (~30 % of the
            # vertices) say nothing and bloat every file written
            keep = np.ones(len(pts), bool)
            keep[1:] = np.any(pts[1:] != pts[:-1], axis=1)
            if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
                keep[-1] = False
            pts = pts[keep]
            return np.column_stack([(pts[:, 0] + x0) * dx + ox, (pts[:, 1] + y0) * dy + oy])

        # pixels meeting at a corner only (of the object, or of its background): the trace touches itself there
        a, b, c_, d = m[:-1, :-1], m[1:, 1:], m[:-1, 1:], m[1:, :-1]
        corners = bool(((a == b) & (c_ == d) & (a != c_)).any())
        pieces = []
        for i, c in enumerate(contours):
            if hierarchy[i][3] != -1 or len(c) < 3:
                continue
            holes = []
            child = hierarchy[i][2]
            while child != -1:
                if len(contours[child]) >= 3:
                    holes.append(ring(contours[child]))
                child = hierarchy[child][0]
            for ext, hs in (_valid_pieces(ring(c), holes) if corners else [(ring(c), holes)]):
                pieces.append(Polygon(ext, hs, name=str(value),
                                      classification=None if classes is None else classes.get(value)))
        if min_area > 0 and sum(p.area for p in pieces) < min_area:
            continue
        # the pieces of one object share a group: one (multi-part) object when written; unique, so that the
        # outlines of several label images (tiles, each numbering its objects 1..n) never merge ("1" did)
        group = uuid.uuid4().hex if len(pieces) > 1 else None
        for p in pieces:
            p.group = group
        out += pieces
    return out


def _valid_pieces(exterior, holes) -> list:
    """``[(exterior, holes), ...]``: the traced outline, or where pixels meet only at a corner (a ring touching
    itself, or a hole cutting the object in two at a corner) the same area as valid polygons (OGC: a ring may
    not touch itself; strict GIS readers refuse such a polygon). Vertices are not moved, so the pixels are the
    same."""
    import shapely

    g = shapely.Polygon(exterior, holes)
    if g.is_valid:  # e.g. a hole touching the outline at one corner
        return [(exterior, holes)]
    g = shapely.make_valid(g, method="structure")
    return [(np.asarray(p.exterior.coords)[:-1], [np.asarray(r.coords)[:-1] for r in p.interiors])
            for p in getattr(g, "geoms", [g]) if p.geom_type == "Polygon" and not p.is_empty]


def rasterize_slide(polygons, slide, level: int | None = None, mpp: float | None = None, values=None,
                    dtype=np.int32):
    """:func:`rasterize` over a whole slide at one of its levels or at a target µm/px.

    ``slide`` is a path, a reader (:func:`histoflow.open_slide`) or a ``SlideData``. Returns
    ``(mask, downsample)``: the mask covers the slide at that resolution, ``downsample`` is level-0 pixels
    per mask pixel (what a slide mask of :class:`~histoflow.core.slide.SlideData` takes).
    """
    from ..io import open_slide

    own = isinstance(slide, (str, bytes)) or hasattr(slide, "__fspath__")
    reader = open_slide(slide) if own else getattr(slide, "reader", slide)
    try:
        if level is not None and mpp is not None:
            raise ParameterError("give either level or mpp, not both")
        w0, h0 = reader.dimensions
        if mpp is not None:
            if reader.mpp is None:
                raise AnnotationError(f"{reader.path}: the slide's pixel size is unknown; rasterise by level")
            try:
                ok = float(mpp) > 0 and np.isfinite(float(mpp))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ParameterError(f"{reader.path}: mpp must be a positive pixel size in µm, got {mpp!r}")
            ds = float(mpp) / float(reader.mpp[0])
        else:
            n = len(reader.levels)
            if not isinstance(level or 0, (int, np.integer)) or not 0 <= (level or 0) < n:
                raise ParameterError(f"{reader.path}: level {level!r} does not exist: the slide has levels 0..{n - 1}")
            ds = float(reader.levels[level or 0].downsample)
        shape = (max(1, int(round(h0 / ds))), max(1, int(round(w0 / ds))))
        need = shape[0] * shape[1] * np.dtype(dtype).itemsize
        bound = getattr(reader, "max_region_bytes", None)
        if bound is not None and need > bound:  # level 0 by default: 6 GiB for a 1.7-gigapixel slide
            from ..errors import RegionTooLargeError
            from ..io.base import format_bytes

            raise RegionTooLargeError(
                f"{reader.path}: a {shape[1]} x {shape[0]} mask (downsample {ds:g}) would take "
                f"{format_bytes(need)}, above the bound of {format_bytes(bound)}; rasterise at a coarser "
                f"level= or mpp= (slide masks need no more than the tissue's detail)")
        return rasterize(polygons, shape, downsample=ds, values=values, dtype=dtype), ds
    finally:
        if own:
            reader.close()

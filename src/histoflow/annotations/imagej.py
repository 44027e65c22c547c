"""ImageJ / Fiji ROIs (``.roi`` files and ``RoiSet.zip`` sets), read and written with ``roifile``.

Polygon, freehand, traced, rectangle and oval ROIs become :class:`Polygon` objects (ovals as their
outline polygon); lines (straight, segmented, freehand), angles and points, which enclose nothing, are
skipped. The rings of a composite ROI are nested as ImageJ fills them (outlines, holes, islands); its
separate areas are one object (one ``group``). A composite ROI with curved segments, which roifile cannot
flatten, is an error naming it. An unnamed ROI is named after its zip entry (or ``.roi`` file), as ImageJ's
ROI Manager names it.

What ImageJ ROIs have no field for is kept in each ROI's properties (ImageJ's ``Roi.setProperty``, shown by
*Edit > Selection > Properties... > List properties*): ``class``, ``objectType``, ``uid`` and
``measurements`` (a JSON object); the class colour is the ROI's stroke colour. A multi-part object is written
as one composite ROI.
"""
from __future__ import annotations

import json
import os
import re
import uuid
import warnings
import zipfile

import numpy as np

from ..utils import atomic_output
from .polygon import AnnotationError, Polygon, class_colors, color_triple, measurement_values, objects_of

__all__ = ["read_imagej_rois", "write_imagej_rois"]


def _roifile():
    try:
        import roifile
    except ImportError:  # pragma: no cover - a core dependency
        raise AnnotationError("ImageJ ROIs need the roifile package: pip install roifile") from None
    return roifile


def read_imagej_rois(path) -> list[Polygon]:
    """Read a ``.roi`` file or a ``.zip`` ROI set."""
    return _read(path)[0]


def _entries(rf, path):
    """(entry name without .roi, ImagejRoi) for a .roi file or each .roi entry of a zip, in file order."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return [(os.path.splitext(os.path.basename(info.filename))[0], rf.ImagejRoi.frombytes(z.read(info)))
                        for info in z.infolist() if info.filename.lower().endswith(".roi")]
        return [(os.path.splitext(os.path.basename(path))[0], rf.ImagejRoi.fromfile(path))]
    except Exception as e:  # noqa: BLE001 - roifile / zipfile raise several kinds on bad input
        raise AnnotationError(f"{path}: not an ImageJ ROI file or set ({type(e).__name__}: {e})") from None


def _props(roi) -> dict:
    """An ROI's properties (``key: value`` lines), values as the text they are."""
    out = {}
    for line in (roi.props or "").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _read(path):
    """The polygons of :func:`read_imagej_rois`, and the ROIs left out (they enclose nothing) by kind."""
    rf = _roifile()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AnnotationError(f"{path}: no such annotation file")
    areas = {rf.ROI_TYPE.POLYGON, rf.ROI_TYPE.RECT, rf.ROI_TYPE.OVAL, rf.ROI_TYPE.FREEHAND, rf.ROI_TYPE.TRACED}
    out, skipped = [], {}

    def skip(kind):
        skipped[kind] = skipped.get(kind, 0) + 1

    for entry, roi in _entries(rf, path):
        name = roi.name or entry
        if roi.roitype not in areas and not roi.composite:
            skip(roi.roitype.name.lower())  # a line, polyline, freehand line, angle or point: encloses nothing
            continue
        if roi.subtype in (rf.ROI_SUBTYPE.TEXT, rf.ROI_SUBTYPE.IMAGE):
            skip(roi.subtype.name.lower())  # an overlay's text label or image, drawn in a rectangle: not a region
            continue
        if roi.roitype == rf.ROI_TYPE.RECT and not roi.composite and roi.subpixelrect:
            # ImageJ keeps a subpixel rectangle's bounds as floats beside the integer ones roifile reads
            x0, y0, x1, y1 = roi.xd, roi.yd, roi.xd + roi.widthd, roi.yd + roi.heightd
            rings = [np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], np.float64)]
        elif roi.roitype == rf.ROI_TYPE.OVAL and not roi.composite:
            if roi.subpixelrect:  # bounds as floats, as for rectangles (the integer ones moved it up to a pixel)
                rings = [_oval_ring(roi.xd, roi.yd, roi.xd + roi.widthd, roi.yd + roi.heightd)]
            else:
                rings = [_oval_ring(roi.left, roi.top, roi.right, roi.bottom)]
        elif roi.roitype == rf.ROI_TYPE.RECT and not roi.composite and roi.rounded_rect_arc_size > 0:
            rings = [_rounded_rect_ring(roi.left, roi.top, roi.right, roi.bottom, roi.rounded_rect_arc_size)]
        else:
            try:
                coords = roi.coordinates(multi=True) if roi.composite else [roi.coordinates()]
            except NotImplementedError as e:  # curves (quadto / cubicto) in a composite ROI
                raise AnnotationError(f"{path}: ROI {name!r} has segments roifile cannot read ({e}); flatten it "
                                      "in ImageJ (Edit > Selection > Interpolate) and save again") from None
            rings = [np.asarray(c, np.float64) for c in coords]
            rings = [r for r in rings if r.ndim == 2 and len(r) >= 3]
            if not roi.composite and roi.options & rf.ROI_OPTIONS.SPLINE_FIT:
                rings = [_spline_ring(r) for r in rings]  # what ImageJ shows and fills, not its control points
        if not rings:
            skip("empty")
            continue
        if not all(np.all(np.isfinite(r)) for r in rings):  # a sub-pixel ROI holds float32 coordinates
            raise AnnotationError(f"{path}: ROI {name!r} has coordinates that are not finite numbers (NaN or "
                                  "infinite)")
        polys = _rings_to_polygons(rings, name)
        _apply_props(polys, _props(roi), _stroke(roi), path, name)
        out.extend(polys)
    return out, skipped


def _oval_ring(left, top, right, bottom):
    """An ImageJ oval as a polygon with about one vertex per boundary pixel (roifile's 33 vertices lost ~0.6 %
    of a 2000 x 1000 oval's area)."""
    a, b = (right - left) / 2.0, (bottom - top) / 2.0
    n = max(33, int(np.ceil(np.pi * (abs(a) + abs(b)))) + 1)
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.column_stack([left + a + a * np.cos(t), top + b + b * np.sin(t)])


def _spline_ring(points, n: int = 200):
    """A polygon saved with ImageJ's "Fit Spline" (its SPLINE_FIT option): ImageJ keeps the control points and
    draws, fills and measures the closed cubic spline through them (parametrised by the points' order, about 200
    points); the same curve here, with at least 4 vertices between control points."""
    from scipy.interpolate import CubicSpline

    pts = np.asarray(points, np.float64)
    if len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
        pts = pts[:-1]
    if len(pts) < 3:
        return pts
    k = len(pts)
    t = np.arange(k + 1, dtype=np.float64)
    spline = CubicSpline(t, np.vstack([pts, pts[:1]]), bc_type="periodic")
    return spline(np.linspace(0.0, float(k), max(n, 4 * k), endpoint=False))


def _rounded_rect_ring(left, top, right, bottom, arc):
    """An ImageJ rounded rectangle (``arc``: the corner arcs' diameter) as a polygon; roifile reads it as a plain
    rectangle, with the corners' area."""
    r = min(float(arc) / 2.0, (right - left) / 2.0, (bottom - top) / 2.0)
    k = max(4, int(np.ceil(np.pi * r / 2)))
    pts = []
    for cx, cy, start in ((right - r, top + r, -np.pi / 2), (right - r, bottom - r, 0.0),
                          (left + r, bottom - r, np.pi / 2), (left + r, top + r, np.pi)):
        t = np.linspace(start, start + np.pi / 2, k + 1)
        pts.append(np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t)]))
    return np.concatenate(pts)


def _stroke(roi):
    """The ROI's stroke colour as (r, g, b), or None when it has none (ARGB bytes, alpha 0)."""
    c = bytes(roi.stroke_color or b"")
    return (c[1], c[2], c[3]) if len(c) == 4 and c[0] else None


def _apply_props(polys, props, color, path, name):
    """Class, object type, id, measurements and colour kept by :func:`write_imagej_rois`, onto ``polys``."""
    meas = {}
    if props.get("measurements"):
        try:
            data = json.loads(props["measurements"])
        except ValueError:
            raise AnnotationError(f"{path}: ROI {name!r}: its 'measurements' property is not a JSON "
                                  "object") from None
        from .geojson import _measurements

        meas = _measurements(data)
    for p in polys:
        p.classification = props.get("class") or None
        p.object_type = props.get("objectType") or None
        p.uid = props.get("uid") or None
        p.measurements = dict(meas)
        p.color = color


def _rings_to_polygons(rings, name):
    """A composite ROI's rings as polygons, by nesting (even-odd, as ImageJ fills them): a ring inside no
    other is an outline, a ring inside one outline is its hole, a ring inside a hole is an outline again
    (an island); an OR of two separate areas is two polygons, not an outline and a hole."""
    import shapely

    if len(rings) == 1:
        return [Polygon(rings[0], [], name=name)]
    shapes = []
    for r in rings:
        g = shapely.Polygon(r)
        shapes.append(g if g.is_valid else shapely.make_valid(g))
    area = [g.area for g in shapes]

    def inside(a, b):  # ring a within ring b: by area, not by one vertex (traced pixel outlines touch at
        # corners: a vertex on another ring's edge made a hole touching another an island, or a part a hole)
        return a != b and area[b] > area[a] and shapes[b].covers(shapes[a])

    holders = [[b for b in range(len(rings)) if inside(a, b)] for a in range(len(rings))]
    depth = [len(h) for h in holders]
    outlines = [a for a in range(len(rings)) if depth[a] % 2 == 0]
    holes = {a: [] for a in outlines}
    for a in range(len(rings)):
        if depth[a] % 2:  # the smallest outline holding it
            holes[min((b for b in holders[a] if depth[b] == depth[a] - 1), key=lambda b: area[b])].append(rings[a])
    group = uuid.uuid4().hex if len(outlines) > 1 else None  # separate areas of one ROI: one object
    return [Polygon(rings[a], holes[a], name=name, group=group) for a in outlines]


def write_imagej_rois(polygons, path) -> str:
    """Write polygons as an ImageJ ROI set (``.zip``; one ROI per object, named after it): a polygon ROI, or
    a composite (shape) ROI of the outlines and holes of a polygon with holes or of a multi-part object
    (polygons sharing a ``group``). Class, object type, id and measurements go into the ROI's properties,
    the class colour into its stroke colour."""
    rf = _roifile()
    path = os.fspath(path)
    if not path.lower().endswith(".zip"):
        raise AnnotationError(f"{path}: ImageJ ROI sets are written as .zip files")
    polygons = list(polygons)
    colors = class_colors(polygons, where=path)
    with atomic_output(path, ".zip") as tmp, zipfile.ZipFile(tmp, "w") as z:  # ROI by ROI, as roifile writes them
        used: set = set()
        for i, parts in enumerate(objects_of(polygons)):  # the parts of a multi-part object become one ROI
            name, roi = _roi(rf, parts, i, used, colors, path)
            z.writestr(name + ".roi", roi.tobytes())
    return path


_ASTRAL = re.compile("[\U00010000-\U0010FFFF]")


def _roi(rf, parts, i, used, colors, path=""):
    """One object (its parts) as an ImageJ ROI and its unique entry name (``used`` holds the names taken)."""
    p = parts[0]
    if len(parts) == 1 and not p.holes:
        roi = rf.ImagejRoi.frompoints(p.exterior.astype(np.float32))
        roi.roitype = rf.ROI_TYPE.POLYGON
    else:
        roi = _composite(rf, [r for q in parts for r in [q.exterior, *q.holes]])
    # the name is the zip entry's: no folders ("../x", "CD8/CD3"), nothing a file system refuses
    base = re.sub(r'[\\/:*?"<>|\x00-\x1f]', "_", str(p.name or "")).lstrip(".") or str(i + 1)
    name, k = base[:200], 1
    while name.lower() in used:  # entries are found by name (case-insensitively on some systems)
        k += 1
        name = f"{base[:190]}-{k}"
    used.add(name.lower())
    props = {"class": p.classification, "objectType": p.object_type, "uid": p.uid,
             "measurements": json.dumps(measurement_values(p, path))
             if p.measurements else None}
    text = "".join(f"{k}: {' '.join(str(v).split())}\n" for k, v in props.items() if v)
    # roifile records the name's and properties' lengths in characters but stores UTF-16, where a character past
    # U+FFFF (an emoji) takes two units: the file then cannot be read back. Such characters become U+FFFD.
    if _ASTRAL.search(name + text):
        warnings.warn(f"ImageJ ROI {name!r}: characters past U+FFFF (e.g. emoji) in its name or properties are "
                      "written as \ufffd (roifile cannot store them readably)", UserWarning, stacklevel=4)
        name, text = _ASTRAL.sub("\ufffd", name), _ASTRAL.sub("\ufffd", text)
    roi.name = name
    roi.props = text
    if p.classification is not None:
        roi.stroke_color = bytes((255, *colors[p.classification]))
    elif p.color is not None:  # an unclassified object's own colour (ImageScope layers are often told apart by it)
        try:  # as the GeoJSON writer: a colour that is not three numbers 0..255 is left out
            roi.stroke_color = bytes((255, *color_triple(p.color, "")))
        except AnnotationError:
            pass
    return name, roi


def _composite(rf, rings):
    """A composite ROI (ImageJ's ShapeRoi): path data of closed rings, MOVETO (0) / LINETO (1) / CLOSE (4),
    in image coordinates (outlines and holes: ImageJ fills them even-odd)."""
    path = []
    for ring in rings:
        ring = np.asarray(ring, np.float64)
        path += [0.0, *ring[0]]
        for x, y in ring[1:]:
            path += [1.0, x, y]
        path.append(4.0)
    roi = rf.ImagejRoi()
    roi.roitype = rf.ROI_TYPE.RECT  # with shape data: a composite ROI
    roi.version = 228
    roi.multi_coordinates = np.asarray(path, np.float32)
    roi.shape_roi_size = len(path)
    pts = np.concatenate(rings)
    roi.left, roi.top = (int(np.floor(v)) for v in pts.min(axis=0))
    roi.right, roi.bottom = (int(np.ceil(v)) for v in pts.max(axis=0))
    return roi

"""ImageJ / Fiji ROIs (``.roi`` files and ``RoiSet.zip`` sets), read and written with ``roifile``.

Polygon, freehand, traced, rectangle and oval ROIs become :class:`Polygon` objects (ovals as their
outline polygon); lines (straight, segmented, freehand), angles and points, which enclose nothing, are
skipped. The rings of a composite ROI are nested as ImageJ fills them (outlines, holes, islands). A
composite ROI with curved segments, which roifile cannot flatten, is an error naming it.
"""
from __future__ import annotations

import os
import re
import uuid

import numpy as np

from ..utils import atomic_output
from .polygon import AnnotationError, Polygon

__all__ = ["read_imagej_rois", "write_imagej_rois"]


def _roifile():
    try:
        import roifile
    except ImportError:  # pragma: no cover - a core dependency
        raise AnnotationError("ImageJ ROIs need the roifile package: pip install roifile") from None
    return roifile


def read_imagej_rois(path) -> list[Polygon]:
    """Read a ``.roi`` file or a ``.zip`` ROI set."""
    rf = _roifile()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AnnotationError(f"{path}: no such annotation file")
    try:
        rois = rf.roiread(path)
    except Exception as e:  # noqa: BLE001 - roifile raises several kinds on bad input
        raise AnnotationError(f"{path}: not an ImageJ ROI file or set ({type(e).__name__}: {e})") from None
    if not isinstance(rois, list):
        rois = [rois]
    areas = {rf.ROI_TYPE.POLYGON, rf.ROI_TYPE.RECT, rf.ROI_TYPE.OVAL, rf.ROI_TYPE.FREEHAND, rf.ROI_TYPE.TRACED}
    out = []
    for i, roi in enumerate(rois):
        name = roi.name or str(i + 1)
        if roi.roitype not in areas and not roi.composite:
            continue  # a line, polyline, freehand line, angle or point: encloses nothing
        if roi.subtype in (rf.ROI_SUBTYPE.TEXT, rf.ROI_SUBTYPE.IMAGE):
            continue  # an overlay's text label or image, drawn in a rectangle: not a region
        if roi.roitype == rf.ROI_TYPE.RECT and not roi.composite and roi.subpixelrect:
            # ImageJ keeps a subpixel rectangle's bounds as floats beside the integer ones roifile reads
            x0, y0, x1, y1 = roi.xd, roi.yd, roi.xd + roi.widthd, roi.yd + roi.heightd
            out.extend(_rings_to_polygons([np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], np.float64)], name))
            continue
        try:
            coords = roi.coordinates(multi=True) if roi.composite else [roi.coordinates()]
        except NotImplementedError as e:  # curves (quadto / cubicto) in a composite ROI
            raise AnnotationError(f"{path}: ROI {name!r} has segments roifile cannot read ({e}); flatten it in "
                                  "ImageJ (Edit > Selection > Interpolate) and save again") from None
        rings = [np.asarray(c, np.float64) for c in coords]
        rings = [r for r in rings if r.ndim == 2 and len(r) >= 3]
        if not rings:
            continue
        out.extend(_rings_to_polygons(rings, name))
    return out


def _rings_to_polygons(rings, name):
    """A composite ROI's rings as polygons, by nesting (even-odd, as ImageJ fills them): a ring inside no
    other is an outline, a ring inside one outline is its hole, a ring inside a hole is an outline again
    (an island); an OR of two separate areas is two polygons, not an outline and a hole."""
    import cv2

    if len(rings) == 1:
        return [Polygon(rings[0], [], name=name)]
    cv = [r.astype(np.float32).reshape(-1, 1, 2) for r in rings]
    area = [abs(cv2.contourArea(c)) for c in cv]

    def inside(a, b):  # ring a within ring b (composite rings do not cross: one vertex tells)
        x, y = (float(v) for v in rings[a][0])
        return a != b and area[b] > area[a] and cv2.pointPolygonTest(cv[b], (x, y), False) >= 0

    holders = [[b for b in range(len(rings)) if inside(a, b)] for a in range(len(rings))]
    depth = [len(h) for h in holders]
    outlines = [a for a in range(len(rings)) if depth[a] % 2 == 0]
    holes = {a: [] for a in outlines}
    for a in range(len(rings)):
        if depth[a] % 2:  # the smallest outline holding it
            holes[min((b for b in holders[a] if depth[b] == depth[a] - 1), key=lambda b: area[b])].append(rings[a])
    group = uuid.uuid4().hex if len(outlines) > 1 else None  # separate areas of one ROI: one object
    return [Polygon(rings[a], holes[a], name=name if k == 0 else f"{name} ({k + 1})", group=group)
            for k, a in enumerate(outlines)]


def write_imagej_rois(polygons, path) -> str:
    """Write polygons as an ImageJ ROI set (``.zip``; one ROI each, named after the polygon): a polygon ROI,
    or a composite (shape) ROI of the outline and its holes for polygons with holes."""
    rf = _roifile()
    path = os.fspath(path)
    if not path.lower().endswith(".zip"):
        raise AnnotationError(f"{path}: ImageJ ROI sets are written as .zip files")
    rois, used = [], set()
    for i, p in enumerate(polygons):
        roi = _composite(rf, p) if p.holes else rf.ImagejRoi.frompoints(p.exterior.astype(np.float32))
        if not p.holes:
            roi.roitype = rf.ROI_TYPE.POLYGON
        # the name is the zip entry's: no folders ("../x", "CD8/CD3"), nothing a file system refuses
        base = re.sub(r'[\\/:*?"<>|\x00-\x1f]', "_", str(p.name or "")).lstrip(".") or str(i + 1)
        name, k = base[:60], 1
        while name.lower() in used:  # entries are found by name (case-insensitively on some systems)
            k += 1
            name = f"{base[:55]}-{k}"
        used.add(name.lower())
        roi.name = name
        rois.append(roi)
    with atomic_output(path, ".zip") as tmp:
        rf.roiwrite(tmp, rois, mode="w")
    return path


def _composite(rf, polygon):
    """A composite ROI (ImageJ's ShapeRoi): path data of closed rings, MOVETO (0) / LINETO (1) / CLOSE (4),
    in image coordinates, the outline first and then each hole."""
    rings = [polygon.exterior] + list(polygon.holes)
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

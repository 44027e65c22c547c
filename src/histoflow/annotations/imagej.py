"""ImageJ / Fiji ROIs (``.roi`` files and ``RoiSet.zip`` sets), read and written with ``roifile``.

Polygon, freehand, traced, rectangle and oval ROIs become :class:`Polygon` objects (ovals as their
outline polygon); lines and points, which enclose nothing, are skipped. Composite ROIs keep their first
ring as the outline and the others as holes.
"""
from __future__ import annotations

import os

import numpy as np

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
    out = []
    for i, roi in enumerate(rois):
        try:
            coords = roi.coordinates(multi=True) if roi.composite else [roi.coordinates()]
        except Exception:  # noqa: BLE001 - ROI types without coordinates
            continue
        rings = [np.asarray(c, np.float64) for c in coords]
        rings = [r for r in rings if r.ndim == 2 and len(r) >= 3]
        if not rings or roi.roitype in (rf.ROI_TYPE.LINE, rf.ROI_TYPE.POINT, rf.ROI_TYPE.NOROI):
            continue
        name = roi.name or str(i + 1)
        out.append(Polygon(rings[0], rings[1:], name=name))
    return out


def write_imagej_rois(polygons, path) -> str:
    """Write polygons as an ImageJ ROI set (``.zip``; one polygon ROI each, named after the polygon)."""
    rf = _roifile()
    path = os.fspath(path)
    if not path.lower().endswith(".zip"):
        raise AnnotationError(f"{path}: ImageJ ROI sets are written as .zip files")
    tmp = f"{path}.tmp-{os.getpid()}.zip"
    rois = []
    for i, p in enumerate(polygons):
        roi = rf.ImagejRoi.frompoints(p.exterior.astype(np.float32))
        roi.roitype = rf.ROI_TYPE.POLYGON
        roi.name = (p.name or str(i + 1))[:60]
        rois.append(roi)
    if os.path.exists(tmp):
        os.remove(tmp)
    rf.roiwrite(tmp, rois, mode="w")
    os.replace(tmp, path)
    return path

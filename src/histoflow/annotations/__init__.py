"""Annotations: polygons from and to annotation files, and between polygons and masks.

Readers return :class:`Polygon` objects (level-0 pixel coordinates, x to the right, y down);
:func:`rasterize` turns them into an instance or class mask at any downsample.

Formats: Aperio ImageScope XML (the format of the MoNuSeg annotations), QuPath GeoJSON, ImageJ ROIs and
ROI sets; :func:`read_annotations` / :func:`write_annotations` / :func:`convert` pick by extension. :func:`polygonize` outlines the objects of
a label image.
"""
import os

from .aperio import read_aperio_xml, write_aperio_xml  # noqa: F401
from .geojson import read_geojson, write_geojson  # noqa: F401
from .imagej import read_imagej_rois, write_imagej_rois  # noqa: F401
from .polygon import AnnotationError, Polygon, polygonize, rasterize, rasterize_slide  # noqa: F401

__all__ = ["AnnotationError", "Polygon", "polygonize", "rasterize", "rasterize_slide", "read_aperio_xml", "write_aperio_xml",
           "read_geojson", "write_geojson", "read_imagej_rois", "write_imagej_rois", "read_annotations",
           "write_annotations", "convert", "skipped_features"]

_READERS = {".xml": read_aperio_xml, ".geojson": read_geojson, ".json": read_geojson, ".roi": read_imagej_rois,
            ".zip": read_imagej_rois}
_WRITERS = {".xml": write_aperio_xml, ".geojson": write_geojson, ".json": write_geojson, ".zip": write_imagej_rois}


def _kind(path, table, what):
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in table:
        raise AnnotationError(f"{path}: cannot {what} {ext or 'files without an extension'}; known: "
                              f"{', '.join(sorted(table))} (Aperio XML, GeoJSON, ImageJ ROI / RoiSet.zip)")
    return table[ext]


def read_annotations(path) -> list:
    """Polygons of an annotation file, by its extension: .xml (Aperio), .geojson/.json (QuPath), .roi/.zip
    (ImageJ)."""
    return _kind(path, _READERS, "read")(path)


def write_annotations(polygons, path) -> str:
    """Write polygons in the format of ``path``'s extension (.xml, .geojson/.json, .zip)."""
    return _kind(path, _WRITERS, "write")(polygons, path)


def convert(src, dst) -> int:
    """Convert an annotation file to another format; returns the number of polygons written. Aperio XML to
    Aperio XML keeps the file's pixel size (MicronsPerPixel)."""
    writer = _kind(dst, _WRITERS, "write")
    polys = read_annotations(src)
    kw = {}
    if writer is write_aperio_xml and _kind(src, _READERS, "read") is read_aperio_xml:
        from .aperio import aperio_mpp

        kw["mpp"] = aperio_mpp(src)
    writer(polys, dst, **kw)
    return len(polys)


def skipped_features(path) -> dict:
    """Features of a GeoJSON file that hold no area (points, lines ...), by geometry type: what
    :func:`read_geojson` leaves out. Empty for other formats."""
    from .geojson import polygon_parts, read_features

    if _kind(path, _READERS, "read") is not read_geojson:
        return {}
    feats = read_features(path)
    out: dict = {}
    for feat in feats:
        geom = ((feat or {}).get("geometry") or {}) if isinstance(feat, dict) else {}
        if not polygon_parts(geom):  # what read_geojson reads is what polygon_parts finds
            kind = geom.get("type") if isinstance(geom, dict) else None
            kind = "no geometry" if kind is None else str(kind)
            out[kind] = out.get(kind, 0) + 1
    return out

"""Annotations: polygons from and to annotation files, and between polygons and masks.

Readers return :class:`Polygon` objects (level-0 pixel coordinates, x to the right, y down);
:func:`rasterize` turns them into an instance or class mask at any downsample.

Formats: Aperio ImageScope XML (the format of the MoNuSeg annotations), QuPath GeoJSON, ImageJ ROIs and
ROI sets; :func:`read_annotations` / :func:`write_annotations` / :func:`convert` pick by extension. :func:`polygonize` outlines the objects of
a label image.
"""
import os
import warnings

from .aperio import read_aperio_xml, write_aperio_xml  # noqa: F401
from .geojson import read_geojson, write_geojson  # noqa: F401
from .imagej import read_imagej_rois, write_imagej_rois  # noqa: F401
from .polygon import AnnotationError, Polygon, polygonize, rasterize, rasterize_slide  # noqa: F401

__all__ = ["AnnotationError", "Polygon", "polygonize", "rasterize", "rasterize_slide", "read_aperio_xml", "write_aperio_xml",
           "read_geojson", "write_geojson", "read_imagej_rois", "write_imagej_rois", "read_annotations",
           "write_annotations", "convert", "conversion_losses", "skipped_features"]

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
    writer = _kind(path, _WRITERS, "write")
    if isinstance(polygons, (str, bytes, Polygon)) or not hasattr(polygons, "__iter__"):
        raise AnnotationError(f"{path}: polygons must be a list of Polygon objects, got {type(polygons).__name__}")
    polygons = list(polygons)
    bad = [type(p).__name__ for p in polygons if not isinstance(p, Polygon)]
    if bad:
        raise AnnotationError(f"{path}: polygons must be Polygon objects, got a {bad[0]} among them")
    return writer(polygons, path)


def _read_skipped(path, negatives=None):
    """(polygons, what the reader left out by kind) of an annotation file, from one reading. ``negatives``:
    how Aperio XML exclusions are read (:func:`read_aperio_xml`; None: its default); other formats have none."""
    from ..errors import ParameterError
    from . import aperio, geojson, imagej

    reader = _kind(path, _READERS, "read")
    if reader is read_aperio_xml:
        if negatives not in (None, "subtract", "keep"):
            raise ParameterError(f"negatives must be 'subtract' or 'keep', not {negatives!r}")
        return aperio._read(path, negatives=negatives or "subtract")
    if negatives == "keep":
        raise ParameterError(f"{path}: keeping exclusion regions (--keep-negatives, negatives='keep') applies to "
                             "Aperio XML files; this format has none")
    return {read_geojson: geojson.read_geojson_skipped, read_imagej_rois: imagej._read}[reader](path)


#: what each written format cannot hold, as (label, test of a polygon); everything else is kept
_NOT_KEPT = {
    write_aperio_xml: [("nucleus outlines", lambda p: p.nucleus is not None)],
    write_imagej_rois: [("nucleus outlines", lambda p: p.nucleus is not None)],
    write_geojson: [],
}


def conversion_losses(polygons, path) -> dict:
    """What writing ``polygons`` in the format of ``path`` (by its extension) would not keep: a description
    -> the number of polygons it concerns. Empty when the format keeps everything (GeoJSON does)."""
    writer = _kind(path, _WRITERS, "write")
    out = {}
    for label, test in _NOT_KEPT[writer]:
        n = sum(1 for p in polygons if test(p))
        if n:
            out[label] = n
    return out


def _convert(src, dst, negatives=None):
    writer = _kind(dst, _WRITERS, "write")
    from ..utils import same_file

    if same_file(src, dst):  # what the reader leaves out (points, lines) would be lost from the file itself
        raise AnnotationError(f"{dst}: the output is the file being converted; write to another path")
    polys, skipped = _read_skipped(src, negatives)
    lost = conversion_losses(polys, dst)
    kw = {}
    if writer is write_aperio_xml and _kind(src, _READERS, "read") is read_aperio_xml:
        from .aperio import aperio_mpp

        kw["mpp"] = aperio_mpp(src)
    writer(polys, dst, **kw)
    noun = {read_aperio_xml: "region", read_geojson: "feature", read_imagej_rois: "ROI"}[_kind(src, _READERS, "read")]
    return len(polys), {f"{k} {noun}(s)": v for k, v in skipped.items()}, lost


def describe_losses(dst, lost) -> str:
    return (f"{os.path.splitext(os.fspath(dst))[1]} files cannot hold "
            + ", ".join(f"{k} ({v} polygon{'s' if v != 1 else ''})" for k, v in lost.items())
            + ": not written")


def convert(src, dst) -> int:
    """Convert an annotation file to another format; returns the number of polygons written. Aperio XML to
    Aperio XML keeps the file's pixel size (MicronsPerPixel). Whatever the target format cannot hold
    (:func:`conversion_losses`) is named in a warning; what the source's reader leaves out (points, lines)
    is counted by :func:`skipped_features`."""
    n, _, lost = _convert(src, dst)
    if lost:
        warnings.warn(f"{dst}: {describe_losses(dst, lost)}", stacklevel=2)
    return n


def skipped_features(path) -> dict:
    """What the reader of an annotation file leaves out because it encloses no area, by kind: GeoJSON
    features by geometry type (points, lines ...), Aperio regions (arrows, rulers, lines), ImageJ ROIs (lines,
    points, angles, text overlays)."""
    return _read_skipped(path)[1]

"""Annotations: polygons from and to annotation files, and between polygons and masks.

Readers return :class:`Polygon` objects (level-0 pixel coordinates, x to the right, y down);
:func:`rasterize` turns them into an instance or class mask at any downsample.

Formats: Aperio ImageScope XML (:func:`read_aperio_xml`, the format of the MoNuSeg annotations) and
QuPath GeoJSON (:func:`read_geojson`, :func:`write_geojson`). :func:`polygonize` outlines the objects of
a label image.
"""
from .aperio import read_aperio_xml  # noqa: F401
from .geojson import read_geojson, write_geojson  # noqa: F401
from .polygon import AnnotationError, Polygon, polygonize, rasterize  # noqa: F401

__all__ = ["AnnotationError", "Polygon", "polygonize", "rasterize", "read_aperio_xml", "read_geojson",
           "write_geojson"]

"""Aperio ImageScope XML annotations (the format of the MoNuSeg nucleus annotations).

The file holds ``Annotations/Annotation/Regions/Region/Vertices/Vertex`` with X, Y in level-0 pixels.
Each Region becomes one :class:`~histoflow.annotations.Polygon`; its ``classification`` is the
enclosing Annotation's Name (or its Id when the name is empty), ``measurements`` holds the region's
Length and Area attributes. Regions with fewer than three vertices are skipped (they enclose nothing).
Regions flagged ``NegativeROA="1"`` are exclusions: they become holes of no one and are returned with
``measurements["negative"] = 1``.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import numpy as np

from .polygon import AnnotationError, Polygon

__all__ = ["read_aperio_xml", "aperio_mpp"]


def _parse(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AnnotationError(f"{path}: no such annotation file")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise AnnotationError(f"{path}: not a readable XML file ({e})") from None
    if root.tag != "Annotations":
        raise AnnotationError(f"{path}: not an Aperio XML annotation file (root element <{root.tag}>, "
                              "expected <Annotations>)")
    return path, root


def aperio_mpp(path) -> float | None:
    """The MicronsPerPixel attribute of the file, or None when absent or zero."""
    _, root = _parse(path)
    try:
        v = float(root.get("MicronsPerPixel", "nan"))
    except ValueError:
        return None
    return v if np.isfinite(v) and v > 0 else None


def read_aperio_xml(path, min_vertices: int = 3) -> list[Polygon]:
    """Read every region of an Aperio XML file as a :class:`Polygon` (level-0 pixels).

    Parameters
    ----------
    path : str or PathLike
    min_vertices : int
        Regions with fewer vertices are skipped (default 3).
    """
    path, root = _parse(path)
    out = []
    for ann in root.iter("Annotation"):
        cls = ann.get("Name") or ann.get("Id")
        for region in ann.iter("Region"):
            verts = region.find("Vertices")
            if verts is None:
                continue
            try:
                xy = np.array([[float(v.get("X")), float(v.get("Y"))] for v in verts.iter("Vertex")],
                              dtype=np.float64).reshape(-1, 2)
            except (TypeError, ValueError):
                raise AnnotationError(f"{path}: region {region.get('Id')} has a vertex without numeric "
                                      "X/Y") from None
            if len(xy) < min_vertices:
                continue
            meas = {}
            for key in ("Length", "Area"):
                try:
                    meas[key.lower()] = float(region.get(key))
                except (TypeError, ValueError):
                    pass
            if region.get("NegativeROA") == "1":
                meas["negative"] = 1
            out.append(Polygon(xy, name=str(region.get("Id", len(out) + 1)), classification=cls,
                               measurements=meas))
    return out

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

from ..utils import atomic_output
from .polygon import AnnotationError, Polygon

__all__ = ["read_aperio_xml", "write_aperio_xml", "aperio_mpp"]


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
        cls = ann.get("Name") or None  # an unnamed annotation layer has no class (its Id is a number)
        first = len(out)
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
            text = region.get("Text") or ""
            out.append(Polygon(xy, name=text or str(region.get("Id", len(out) + 1)), classification=cls,
                               measurements=meas))
        out[first:] = _negatives_as_holes(out[first:])
    return out


def _negatives_as_holes(polys):
    """Regions flagged NegativeROA become holes of the positive region of the same layer that holds them
    whole (every vertex inside; the smallest, for nested ones: not an island inside the hole, which holds
    the hole's centre but not its outline); a negative region inside none stays a polygon flagged negative."""
    import cv2

    pos = [p for p in polys if not p.measurements.get("negative")]
    if len(pos) == len(polys):
        return polys
    areas = [abs(cv2.contourArea(p.exterior.astype(np.float32))) for p in pos]
    kept = []
    for p in polys:
        if not p.measurements.get("negative"):
            kept.append(p)
            continue
        ring = [(float(x), float(y)) for x, y in p.exterior]
        holders = [i for i, q in enumerate(pos)
                   if all(cv2.pointPolygonTest(q.exterior.astype(np.float32).reshape(-1, 1, 2), pt, False) >= 0
                          for pt in ring)]
        if not holders:
            kept.append(p)
            continue
        q = pos[min(holders, key=lambda i: areas[i])]
        q.holes = list(q.holes) + [p.exterior]
    return kept


def write_aperio_xml(polygons, path, mpp: float | None = None) -> str:
    """Write polygons as an Aperio ImageScope XML file (one Annotation per class, one Region per polygon).

    Holes are not representable as holes in this format; they are written as regions flagged
    ``NegativeROA="1"``, which ImageScope subtracts.
    """
    path = os.fspath(path)
    root = ET.Element("Annotations", {"MicronsPerPixel": f"{mpp:.6f}" if mpp else "0"})
    by_class: dict = {}
    for p in polygons:
        by_class.setdefault(p.classification or "", []).append(p)
    rid = 1
    for aid, (cls, polys) in enumerate(by_class.items(), start=1):
        ann = ET.SubElement(root, "Annotation", {"Id": str(aid), "Name": cls, "LineColor": "65280", "Type": "4",
                                                 "Visible": "1"})
        regions = ET.SubElement(ann, "Regions")
        for p in polys:
            for ring, negative in [(p.exterior, "0")] + [(h, "1") for h in p.holes]:
                reg = ET.SubElement(regions, "Region", {"Id": str(rid), "Type": "0", "NegativeROA": negative,
                                                        "Text": p.name or ""})
                rid += 1
                verts = ET.SubElement(reg, "Vertices")
                for x, y in ring:
                    ET.SubElement(verts, "Vertex", {"X": f"{x:.3f}", "Y": f"{y:.3f}"})
    with atomic_output(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    return path

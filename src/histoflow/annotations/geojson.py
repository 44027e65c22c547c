"""QuPath-compatible GeoJSON: read and write polygons with classes and measurements.

QuPath (0.3+) imports and exports a ``FeatureCollection`` (or a bare list) of ``Feature`` objects whose
``geometry`` is a ``Polygon`` or ``MultiPolygon`` in level-0 pixels, and whose ``properties`` hold
``objectType`` (``"annotation"``, ``"detection"``, ``"cell"``, ...), ``classification``
(``{"name": ..., "color": [r, g, b]}``) and ``measurements`` (a mapping, or a list of
``{"name", "value"}`` in older exports; both are read).
"""
from __future__ import annotations

import json
import os
import uuid

import numpy as np

from ..utils import atomic_output
from .polygon import AnnotationError, Polygon

__all__ = ["read_geojson", "write_geojson"]

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255)]


def _closed(ring: np.ndarray) -> list:
    pts = [[round(float(x), 3), round(float(y), 3)] for x, y in ring]
    if pts and pts[0] != pts[-1]:
        pts.append(pts[0])
    return pts


def write_geojson(polygons, path, object_type: str = "detection", colors: dict | None = None) -> str:
    """Write polygons as a QuPath-readable GeoJSON ``FeatureCollection``; returns the path.

    ``object_type`` is QuPath's kind of object ("detection" for nuclei, "cell", "annotation" for
    regions). Classes get a colour from ``colors`` (name -> (r, g, b)) or a fixed palette. The file is
    written to a temporary name and renamed, so a failure never leaves half a file.
    """
    path = os.fspath(path)
    colors = dict(colors or {})
    feats = []
    for p in polygons:
        props = {"objectType": object_type}
        if p.name:
            props["name"] = str(p.name)
        if p.classification is not None:
            c = colors.setdefault(p.classification, _PALETTE[len(colors) % len(_PALETTE)])
            props["classification"] = {"name": str(p.classification), "color": [int(v) for v in c]}
        if p.measurements:
            props["measurements"] = {str(k): float(v) for k, v in p.measurements.items()}
        geom = {"type": "Polygon", "coordinates": [_closed(p.exterior)] + [_closed(h) for h in p.holes]}
        feats.append({"type": "Feature", "id": str(uuid.uuid4()), "geometry": geom, "properties": props})
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump({"type": "FeatureCollection", "features": feats}, f)
    return path


def _measurements(m) -> dict:
    if isinstance(m, dict):
        return {str(k): v for k, v in m.items() if isinstance(v, (int, float))}
    if isinstance(m, list):
        return {str(d["name"]): d["value"] for d in m if isinstance(d, dict) and "name" in d
                and isinstance(d.get("value"), (int, float))}
    return {}


def read_geojson(path) -> list[Polygon]:
    """Read the polygons of a GeoJSON file (QuPath export or any FeatureCollection).

    Each ``Polygon`` geometry gives one :class:`Polygon`; a ``MultiPolygon`` gives one per part, all with
    the feature's name, class and measurements. Other geometry types (points, lines) are skipped.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AnnotationError(f"{path}: no such annotation file")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not a JSON file ({e})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        feats = data.get("features") or []
    elif isinstance(data, dict) and data.get("type") == "Feature":
        feats = [data]
    elif isinstance(data, list):
        feats = data
    else:
        raise AnnotationError(f"{path}: not GeoJSON features (expected a FeatureCollection, a Feature or a list)")
    out = []
    for i, feat in enumerate(feats):
        if not isinstance(feat, dict):
            raise AnnotationError(f"{path}: feature {i} is not an object")
        geom = feat.get("geometry") or {}
        props = feat.get("properties") or {}
        cls = props.get("classification")
        cls = cls.get("name") if isinstance(cls, dict) else cls
        name = str(props.get("name") or feat.get("id") or i + 1)
        meas = _measurements(props.get("measurements"))
        kind = geom.get("type")
        if kind == "Polygon":
            parts = [geom.get("coordinates") or []]
        elif kind == "MultiPolygon":
            parts = geom.get("coordinates") or []
        else:
            continue
        for rings in parts:
            try:
                rings = [np.asarray(r, dtype=np.float64)[:, :2] for r in rings]
            except (ValueError, IndexError, TypeError):
                raise AnnotationError(f"{path}: feature {i} has malformed coordinates") from None
            rings = [r[:-1] if len(r) > 1 and np.array_equal(r[0], r[-1]) else r for r in rings]
            if not rings or len(rings[0]) < 3:
                continue
            out.append(Polygon(rings[0], rings[1:], name=name, classification=cls, measurements=dict(meas)))
    return out

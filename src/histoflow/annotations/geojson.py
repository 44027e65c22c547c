"""QuPath-compatible GeoJSON: read and write polygons with classes and measurements.

QuPath imports and exports a ``FeatureCollection`` (or a bare list) of ``Feature`` objects whose
``geometry`` is a ``Polygon`` or ``MultiPolygon`` in level-0 pixels, and whose ``properties`` hold
``objectType`` (``"annotation"``, ``"detection"``, ``"cell"``, ...), ``classification``
(``{"name": ..., "color": [r, g, b]}``, or ``{"names": [...], ...}`` for a derived class such as
"Tumor: Positive") and ``measurements`` (a mapping, or a list of ``{"name", "value"}`` in older exports).
Older exports are read too: QuPath 0.3's ``object_type``, and 0.2's type in the feature's ``id``
(``"PathAnnotationObject"`` ...). A feature's ``id`` (QuPath's UUID) is kept as :attr:`Polygon.uid` and
written back; colours may carry an alpha (``[r, g, b, a]``), which is dropped.
"""
from __future__ import annotations

import json
import os
import uuid

import numpy as np

from ..utils import atomic_output
from .polygon import AnnotationError, Polygon, class_colors, color_triple

__all__ = ["read_geojson", "write_geojson"]

def _closed(ring: np.ndarray) -> list:
    pts = [[round(float(x), 3), round(float(y), 3)] for x, y in ring]
    if pts and pts[0] != pts[-1]:
        pts.append(pts[0])
    return pts


def write_geojson(polygons, path, object_type: str | None = None, colors: dict | None = None) -> str:
    """Write polygons as a QuPath-readable GeoJSON ``FeatureCollection``; returns the path.

    ``object_type`` is QuPath's kind of object ("detection" for nuclei, "cell", "annotation" for
    regions); None keeps each polygon's own (read from a file), else "detection". Classes get a colour
    from ``colors`` (name -> (r, g, b)), else the one read with the polygon, else a fixed palette. The
    parts of one multi-part object (polygons sharing a ``group``) are written as one MultiPolygon. The file
    is written to a temporary name and renamed, so a failure never leaves half a file.
    """
    path = os.fspath(path)
    polygons = list(polygons)
    colors = class_colors(polygons, colors, path)
    feats, by_group = [], {}
    for p in polygons:
        rings = [_closed(p.exterior)] + [_closed(h) for h in p.holes]
        first = by_group.get(p.group) if p.group is not None else None
        if first is not None and (first["properties"].get("name", "") != str(p.name or "")
                                  or (first["properties"].get("classification") or {}).get("name")
                                  != p.classification):
            raise AnnotationError(f"{path}: polygons of group {p.group!r} are parts of one object but have different "
                                  f"names or classes ({first['properties'].get('name')!r} and {p.name!r}); give each "
                                  "object its own group")
        if first is not None:  # another part of the same object
            geom = first["geometry"]
            if geom["type"] == "Polygon":
                geom["type"], geom["coordinates"] = "MultiPolygon", [geom["coordinates"]]
            geom["coordinates"].append(rings)
            continue
        props = {"objectType": object_type or p.object_type or "detection"}
        if p.name:
            props["name"] = str(p.name)
        if p.classification is not None:
            props["classification"] = {"name": str(p.classification),
                                       "color": [int(v) for v in colors[p.classification]]}
        if p.measurements:
            props["measurements"] = {str(k): float(v) for k, v in p.measurements.items()}
        feat = {"type": "Feature", "id": p.uid or str(uuid.uuid4()),
                "geometry": {"type": "Polygon", "coordinates": rings}}
        if p.nucleus is not None and len(p.nucleus) >= 3:  # a QuPath cell's nucleus rides beside its outline
            feat["nucleusGeometry"] = {"type": "Polygon", "coordinates": [_closed(p.nucleus)]}
        feat["properties"] = props
        feats.append(feat)
        if p.group is not None:
            by_group[p.group] = feat
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump({"type": "FeatureCollection", "features": feats}, f)
    return path


#: QuPath 0.2 wrote an object's type as the feature's id
_LEGACY_TYPES = {"PathAnnotationObject": "annotation", "PathDetectionObject": "detection",
                 "PathCellObject": "cell", "PathTileObject": "tile", "TMACoreObject": "tma_core",
                 "PathRootObject": "root"}


def _class_name(cls_obj):
    if isinstance(cls_obj, dict):
        name = cls_obj.get("name")
        names = cls_obj.get("names")
        if not name and isinstance(names, list) and names:
            name = ": ".join(str(n) for n in names)  # a derived class, as QuPath names it
        return str(name) if name else None
    return str(cls_obj) if cls_obj else None


def _number(v):
    """A measurement's value as a float, or None: numbers, and strings that spell one ("12.5", "NaN", as some
    tools write them); a bool is not a measurement (it was stored as 1.0)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v.strip())
        except ValueError:
            return None
    return None


def _measurements(m) -> dict:
    if isinstance(m, dict):
        pairs = m.items()
    elif isinstance(m, list):
        pairs = [(d["name"], d.get("value")) for d in m if isinstance(d, dict) and "name" in d]
    else:
        return {}
    out = {}
    for k, v in pairs:
        v = _number(v)
        if v is not None:
            out[str(k)] = v
    return out


def polygon_parts(geom) -> list:
    """The polygons (each a list of rings) of a GeoJSON geometry: a Polygon's one, a MultiPolygon's, the
    polygons inside a GeometryCollection; none for points, lines and anything else (they enclose nothing)."""
    if not isinstance(geom, dict):
        return []
    kind = geom.get("type")
    if kind == "Polygon":
        return [geom.get("coordinates") or []]
    if kind == "MultiPolygon":
        return geom.get("coordinates") or []  # not a list: malformed, refused by the reader
    if kind == "GeometryCollection" and isinstance(geom.get("geometries"), list):
        parts = []
        for g in geom["geometries"]:
            found = polygon_parts(g) if g is not geom else []
            parts.extend(found if isinstance(found, list) else [])  # a malformed member is left out
        return parts
    return []


def read_features(path) -> list:
    """The features of a GeoJSON file (a FeatureCollection, one Feature or a list), as JSON objects."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AnnotationError(f"{path}: no such annotation file")
    try:
        with open(path, encoding="utf-8-sig") as f:  # utf-8, with or without a byte-order mark
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not a JSON file ({e})") from None
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read the annotation file ({e.strerror or e})") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return list(data.get("features") or [])
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, list):
        return data
    raise AnnotationError(f"{path}: not GeoJSON features (expected a FeatureCollection, a Feature or a list)")


def read_geojson(path) -> list[Polygon]:
    """Read the polygons of a GeoJSON file (QuPath export or any FeatureCollection).

    Each ``Polygon`` geometry gives one :class:`Polygon`; a ``MultiPolygon`` gives one per part, all with
    the feature's name, class, measurements and a shared ``group`` (so that writing them back makes one
    object again). Each keeps the feature's ``objectType`` and class colour, and a cell's nucleus outline
    (QuPath's ``nucleusGeometry``) as :attr:`Polygon.nucleus`. Other geometry types (points, lines) are
    skipped: :func:`histoflow.annotations.skipped_features` counts them.
    """
    return read_geojson_skipped(path)[0]


def read_geojson_skipped(path) -> tuple[list[Polygon], dict]:
    """:func:`read_geojson`'s polygons and the features it left out by geometry type, from one parse. Each
    feature is let go once read, so that a large file's JSON objects do not all stay in memory beside the
    polygons."""
    path = os.fspath(path)
    feats = read_features(path)
    out, skipped = [], {}
    for i in range(len(feats)):
        feat, feats[i] = feats[i], None
        if not isinstance(feat, dict):
            raise AnnotationError(f"{path}: feature {i} is not an object")
        geom = feat.get("geometry") or {}
        props = feat.get("properties") or {}
        if not isinstance(geom, dict) or not isinstance(props, dict):
            raise AnnotationError(f"{path}: feature {i}: its geometry and properties must be objects, got "
                                  f"{type(geom).__name__} and {type(props).__name__}")
        parts = polygon_parts(geom)
        if not parts:
            kind = geom.get("type")
            kind = "no geometry" if kind is None else str(kind)
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        if not isinstance(parts, list):
            raise AnnotationError(f"{path}: feature {i} has malformed coordinates")
        cls_obj = props.get("classification")
        cls = _class_name(cls_obj)
        color = cls_obj.get("color") if isinstance(cls_obj, dict) else None
        packed = cls_obj.get("colorRGB") if isinstance(cls_obj, dict) else None
        if color is None and isinstance(packed, int) and not isinstance(packed, bool):  # QuPath 0.2: packed ARGB
            color = ((packed >> 16) & 255, (packed >> 8) & 255, packed & 255)
        try:
            color = color_triple(color, path) if color is not None else None
        except AnnotationError:  # an unusable colour is dropped (the writer picks one), not fatal to reading
            color = None
        fid = feat.get("id")
        fid = str(fid) if fid is not None else None
        kind_obj = props.get("objectType") or props.get("object_type")
        if fid in _LEGACY_TYPES:  # QuPath 0.2: the type, not an id
            kind_obj, fid = kind_obj or _LEGACY_TYPES[fid], None
        name = str(props.get("name") or "")  # an unnamed object stays unnamed when written back
        meas = _measurements(props.get("measurements"))
        nucleus = None
        nuc_parts = polygon_parts(feat.get("nucleusGeometry"))
        if nuc_parts:  # a cell's nucleus: the outline of its (first) polygon
            nuc = _rings(path, i, nuc_parts[0] if isinstance(nuc_parts, list) else None, "nucleusGeometry")
            nucleus = nuc[0] if nuc and len(nuc[0]) >= 3 else None
        group = uuid.uuid4().hex if len(parts) > 1 else None  # unique: files read together never merge
        for rings in parts:
            rings = _rings(path, i, rings, "geometry")
            if not rings or len(rings[0]) < 3:
                continue
            out.append(Polygon(rings[0], rings[1:], name=name, classification=cls, measurements=dict(meas),
                               object_type=str(kind_obj) if isinstance(kind_obj, str) else None, color=color,
                               group=group, uid=fid, nucleus=nucleus))
            nucleus = None  # the cell's nucleus goes with its first part only
    return out, skipped


def _rings(path, i, rings, what):
    """The rings of one GeoJSON polygon as (n, 2) float arrays, not closed; an AnnotationError for
    malformed or non-finite coordinates."""
    try:
        rings = [np.asarray(r, dtype=np.float64)[:, :2] for r in rings]
    except (ValueError, IndexError, TypeError):
        raise AnnotationError(f"{path}: feature {i} has malformed coordinates in its {what}") from None
    if not all(np.all(np.isfinite(r)) for r in rings):
        raise AnnotationError(f"{path}: feature {i} has coordinates that are not finite numbers (NaN or "
                              f"infinite) in its {what}")
    return [r[:-1] if len(r) > 1 and np.array_equal(r[0], r[-1]) else r for r in rings]

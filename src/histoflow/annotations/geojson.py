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
import math
import os
import uuid

import numpy as np

from ..utils import atomic_output
from .polygon import AnnotationError, Polygon, class_colors, color_triple, measurement_values, objects_of

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
    with atomic_output(path) as tmp, open(tmp, "w") as f:  # feature by feature: no second copy in memory
        f.write('{"type": "FeatureCollection", "features": [')
        for k, parts in enumerate(objects_of(polygons)):
            f.write(("," if k else "") + "\n" + json.dumps(_feature(parts, object_type, colors, path)))
        f.write("\n]}\n")
    return path


def _feature(parts, object_type, colors, path) -> dict:
    p = parts[0]
    for q in parts[1:]:
        if str(q.name or "") != str(p.name or "") or q.classification != p.classification:
            raise AnnotationError(f"{path}: polygons of group {p.group!r} are parts of one object but have different "
                                  f"names or classes ({p.name!r} and {q.name!r}); give each object its own group")
    # a hole of fewer than 3 points encloses nothing, and is no GeoJSON ring (4 positions at least): left out
    rings = [[_closed(q.exterior)] + [r for r in map(_closed, q.holes) if len(r) >= 4] for q in parts]
    props = {"objectType": object_type or p.object_type or "detection"}
    if p.name:
        props["name"] = str(p.name)
    if p.classification is not None:
        props["classification"] = {"name": str(p.classification),
                                   "color": [int(v) for v in colors[p.classification]]}
    elif p.color is not None:  # an unclassified object keeps its colour (an ImageScope layer's, a QuPath object's)
        try:
            props["color"] = [int(v) for v in color_triple(p.color, path)]
        except AnnotationError:
            pass
    if p.measurements:
        # NaN / infinity as null: bare NaN is not JSON, and strict readers (and QuPath's) refuse the file
        props["measurements"] = {k: (v if math.isfinite(v) else None)
                                 for k, v in measurement_values(p, path).items()}
    geom = {"type": "Polygon", "coordinates": rings[0]} if len(rings) == 1 else \
        {"type": "MultiPolygon", "coordinates": rings}
    feat = {"type": "Feature", "id": p.uid or str(uuid.uuid4()), "geometry": geom}
    nucleus = next((q.nucleus for q in parts if q.nucleus is not None and len(q.nucleus) >= 3), None)
    if nucleus is not None:  # a QuPath cell's nucleus rides beside its outline
        feat["nucleusGeometry"] = {"type": "Polygon", "coordinates": [_closed(nucleus)]}
    feat["properties"] = props
    return feat


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
    try:
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, str):
            return float(v.strip())
    except (ValueError, OverflowError):  # not a number, or an integer past a float's range
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


class _NotStreamable(Exception):
    """The file cannot be read feature by feature (no FeatureCollection or list, or JSON that only Python's
    parser takes, such as NaN): read it whole."""


def _stream_features(path):
    """The features of a FeatureCollection or list one at a time (ijson), so that a large QuPath export is
    never in memory as JSON objects all at once (a whole 150 MB file took 1.3 GB); _NotStreamable when
    that cannot be done."""
    try:
        import ijson
    except ImportError:  # pragma: no cover - a core dependency
        raise _NotStreamable from None
    try:
        with open(path, "rb") as f:
            head = f.read(3)
            f.seek(3 if head == b"\xef\xbb\xbf" else 0)  # a byte-order mark
            first = b""
            while first in (b"", b" ", b"\t", b"\r", b"\n"):
                first = f.read(1)
                if not first:
                    raise _NotStreamable
            if first not in (b"{", b"["):
                raise _NotStreamable
            f.seek(f.tell() - 1)
            n = 0
            for feat in ijson.items(f, "features.item" if first == b"{" else "item", use_float=True):
                n += 1
                yield feat
            if first == b"{" and not n:  # one Feature, or not GeoJSON: the whole-file reader decides
                raise _NotStreamable
    except (ijson.JSONError, UnicodeDecodeError, ValueError, OSError):
        raise _NotStreamable from None


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
    """:func:`read_geojson`'s polygons and the features it left out by geometry type, from one parse:
    feature by feature where the file allows it (a FeatureCollection or a list of standard JSON), else the
    whole file at once."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AnnotationError(f"{path}: no such annotation file")
    try:
        return _polygons(path, _stream_features(path))
    except _NotStreamable:
        pass
    feats = read_features(path)

    def let_go():  # each feature is dropped once read
        for i in range(len(feats)):
            feat, feats[i] = feats[i], None
            yield feat

    return _polygons(path, let_go())


def _polygons(path, feats):
    out, skipped = [], {}
    for i, feat in enumerate(feats):
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
        if color is None and cls_obj is None:  # an unclassified object's own colour (QuPath writes it so)
            color = props.get("color")
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
        kept = 0
        for rings in parts:
            rings = _rings(path, i, rings, "geometry")
            if not rings or len(rings[0]) < 3:
                continue
            kept += 1
            holes = [h for h in rings[1:] if len(h) >= 3]  # a hole of 1-2 points encloses nothing (and no ring)
            out.append(Polygon(rings[0], holes, name=name, classification=cls, measurements=dict(meas),
                               object_type=str(kind_obj) if isinstance(kind_obj, str) else None, color=color,
                               group=group, uid=fid, nucleus=nucleus))
            nucleus = None  # the cell's nucleus goes with its first part only
        if parts and not kept:  # said, as the Aperio reader says its lines and points
            skipped["Polygon with fewer than 3 vertices"] = skipped.get("Polygon with fewer than 3 vertices", 0) + 1
    return out, skipped


def _rings(path, i, rings, what):
    """The rings of one GeoJSON polygon as (n, 2) float arrays, not closed; an AnnotationError for
    malformed or non-finite coordinates."""
    try:
        rings = [np.asarray(r, dtype=np.float64)[:, :2] for r in rings]
    except (ValueError, IndexError, TypeError, OverflowError):
        raise AnnotationError(f"{path}: feature {i} has malformed coordinates in its {what}") from None
    if not all(np.all(np.isfinite(r)) for r in rings):
        raise AnnotationError(f"{path}: feature {i} has coordinates that are not finite numbers (NaN or "
                              f"infinite) in its {what}")
    return [r[:-1] if len(r) > 1 and np.array_equal(r[0], r[-1]) else r for r in rings]

"""Aperio ImageScope XML annotations (the format of the MoNuSeg nucleus annotations).

The file holds ``Annotations/Annotation/Regions/Region/Vertices/Vertex`` with X, Y in level-0 pixels.
Each Region becomes one :class:`~histoflow.annotations.Polygon`; its ``classification`` is the
enclosing Annotation's Name (None when the name is empty), its ``color`` the Annotation's LineColor,
``measurements`` holds the region's Length and Area attributes and the numeric values of its
``Attributes`` (where this writer keeps measurements). Rectangles, polygons and freehand regions are read as their vertices; an ellipse
(``Type="2"``, two corners of its bounding box) as a 64-vertex outline. Other regions with fewer than three
vertices (lines, arrows, rulers) are skipped: they enclose nothing.

Regions flagged ``NegativeROA="1"`` are exclusions, as in ImageScope: each is cut out of the positive
regions of its own Annotation layer that it overlaps (a hole, or a bite out of an edge; a positive region
lying wholly inside the exclusion, an island in a lumen, is kept). ``negatives="keep"`` returns every region
as it is, exclusions flagged ``measurements["negative"] = 1`` (for files that misuse the flag, as MoNuSeg's
TCGA-XS-A8TJ does on 20 nuclei).
"""
from __future__ import annotations

import os
import re
import uuid
import warnings
import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr

import numpy as np

from ..utils import atomic_output
from ..errors import ParameterError
from .polygon import AnnotationError, Polygon, class_colors, measurement_values

__all__ = ["read_aperio_xml", "write_aperio_xml", "aperio_mpp"]


#: Polygon fields with no place in the format, kept as text attributes of the region
#: a polygon's QuPath object type, id and group, kept as region attributes under names of their own (as plain
#: "group" / "uid", a measurement or ImageScope attribute of that name merged cells into one object)
_FIELDS = {"histoflow:objectType": "object_type", "histoflow:uid": "uid", "histoflow:group": "group"}


def _line_color(value):
    """ImageScope's LineColor (a Windows COLORREF, 0x00BBGGRR: 255 is red, 65280 green) as (r, g, b)."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        return None
    return (v & 255, (v >> 8) & 255, (v >> 16) & 255) if 0 <= v <= 0xFFFFFF else None


def _colorref(rgb) -> str:
    r, g, b = (int(v) for v in rgb)
    return str(r | (g << 8) | (b << 16))


def _events(path):
    """``ET.iterparse`` start / end events of the file, element by element (a large file is never in memory
    as a whole tree: 200,000 regions took 3 GB so); the root must be <Annotations>. Errors name the file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AnnotationError(f"{path}: no such annotation file")
    try:
        first = True
        for event, el in ET.iterparse(path, events=("start", "end")):
            if first and el.tag != "Annotations":
                raise AnnotationError(f"{path}: not an Aperio XML annotation file (root element <{el.tag}>, "
                                      "expected <Annotations>)")
            first = False
            yield event, el
    except ET.ParseError as e:
        raise AnnotationError(f"{path}: not a readable XML file ({e})") from None
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read the annotation file ({e.strerror or e})") from None


def aperio_mpp(path) -> float | None:
    """The MicronsPerPixel attribute of the file, or None when absent or zero."""
    events = _events(path)
    _, root = next(events, (None, None))
    events.close()
    try:
        v = float(root.get("MicronsPerPixel", "nan")) if root is not None else float("nan")
    except ValueError:
        return None
    return v if np.isfinite(v) and v > 0 else None


def read_aperio_xml(path, min_vertices: int = 3, negatives: str = "subtract") -> list[Polygon]:
    """Read every region of an Aperio XML file as a :class:`Polygon` (level-0 pixels).

    Parameters
    ----------
    path : str or PathLike
    min_vertices : int
        Regions with fewer vertices are skipped (default 3; ellipses count as their outline).
    negatives : {"subtract", "keep"}
        Exclusion regions (``NegativeROA="1"``): cut out of the positive regions of their layer
        (ImageScope's meaning; the default), or returned as polygons flagged ``measurements["negative"]``.
    """
    if negatives not in ("subtract", "keep"):
        raise ParameterError(f"negatives must be 'subtract' or 'keep', not {negatives!r}")
    return _read(path, min_vertices, negatives)[0]


def _read(path, min_vertices=3, negatives="subtract"):
    """The polygons of :func:`read_aperio_xml` and the regions left out for having too few vertices, by
    type (ImageScope's region types: 0 freehand / polygon, 1 rectangle, 2 ellipse, 3 arrow, 4 ruler)."""
    path = os.fspath(path)
    out, skipped = [], {}
    root, layer, idle = None, None, 0
    for event, el in _events(path):
        if root is None:
            root = el
        elif event == "start" and el.tag == "Annotation":
            # an unnamed annotation layer has no class (its Id is a number)
            layer = (el.get("Name") or None, _line_color(el.get("LineColor")), len(out))
        elif event == "end" and el.tag == "Region":
            if layer is not None:  # regions outside a layer are not annotations
                _region(path, el, layer, min_vertices, out, skipped)
            el.clear()
        elif event == "end" and el.tag == "Annotation":
            if negatives == "subtract":
                out[layer[2]:], unused = _subtract_negatives(out[layer[2]:])
                idle += unused
            layer = None
            root.clear()
    if idle:
        warnings.warn(f"{path}: {idle} region(s) flagged as exclusions (NegativeROA=\"1\") overlap no region of their "
                      "layer, so they cut nothing and were dropped; if they are objects flagged by mistake, read "
                      "the file with negatives=\"keep\"", stacklevel=3)
    return out, skipped


def _region(path, region, layer, min_vertices, out, skipped):
    """One Region element as a Polygon appended to ``out``, or counted in ``skipped``."""
    cls, color, _ = layer
    verts = region.find("Vertices")
    if verts is None:
        return
    try:
        xy = np.array([[float(v.get("X")), float(v.get("Y"))] for v in verts.iter("Vertex")],
                      dtype=np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise AnnotationError(f"{path}: region {region.get('Id')} has a vertex without numeric "
                              "X/Y") from None
    if not np.all(np.isfinite(xy)):  # float() reads "nan" and "inf"
        raise AnnotationError(f"{path}: region {region.get('Id')} has vertices that are not finite numbers (NaN "
                              "or infinite)")
    if region.get("Type") == "2" and len(xy) == 2:  # an ellipse: two corners of its bounding box
        xy = _ellipse(xy)
    if len(xy) > 1 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]  # a closed ring: the first vertex repeated at the end encloses nothing more
    if len(xy) < min_vertices:
        kind = {"3": "arrow", "4": "ruler"}.get(region.get("Type"), "line or point")
        skipped[kind] = skipped.get(kind, 0) + 1
        return
    meas, fields = {}, {}
    for att in region.findall("Attributes/Attribute"):  # as write_aperio_xml keeps them
        key, value = att.get("Name"), att.get("Value")
        if key in _FIELDS:
            fields[_FIELDS[key]] = value or None
            continue
        if key == "negative":  # the exclusion flag is NegativeROA's alone (an attribute of that name cut regions)
            continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            continue  # a text attribute (a description), not a measurement
        if key:
            meas[key] = v
    for key in ("Length", "Area"):
        try:
            meas[key.lower()] = float(region.get(key))
        except (TypeError, ValueError):
            pass
    if region.get("NegativeROA") == "1":
        meas["negative"] = 1
    text = region.get("Text") or ""
    # a region without text is named by its Id, unless it is a part of a multi-part object (its group): the parts
    # then keep one name, as they were written (parts named "1" and "2" could not be written as one GeoJSON object)
    name = text or ("" if fields.get("group") else str(region.get("Id", len(out) + 1)))
    out.append(Polygon(xy, name=name, classification=cls,
                       measurements=meas, color=color, **fields))


def _ellipse(corners):
    """An ellipse region as a polygon with about one vertex per boundary pixel (64 vertices lost up to 2.4 px of
    a 4000 x 2000 px ellipse's edge)."""
    (x0, y0), (x1, y1) = corners
    # (at most 100,000: an ellipse of absurd corners asked for terabytes)
    n = int(min(100_000, max(64, np.ceil(np.pi * (abs(x1 - x0) + abs(y1 - y0)) / 2) + 1)))
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack([(x0 + x1) / 2 + abs(x1 - x0) / 2 * np.cos(t), (y0 + y1) / 2 + abs(y1 - y0) / 2 * np.sin(t)])


def _subtract_negatives(polys):
    """Cut each region flagged NegativeROA out of the positive regions of the same layer that it overlaps
    (not out of one lying wholly inside it: an island in a lumen); the exclusions themselves go. Returns the
    regions and the number of exclusions that overlap none."""
    neg = [p for p in polys if p.measurements.get("negative")]
    if not neg:
        return polys, 0
    import shapely
    from shapely.strtree import STRtree

    cuts = [_shape(p) for p in neg]
    tree = STRtree(cuts)
    out, used = [], set()
    for p in polys:
        if p.measurements.get("negative"):
            continue
        g = _shape(p)
        near = [i for i in tree.query(g) if cuts[i].intersects(g)]
        used.update(int(i) for i in near)
        hit = [cuts[i] for i in near if not g.within(cuts[i])]
        if not hit:
            out.append(p)
            continue
        rest = g.difference(shapely.union_all(hit))
        parts = [r for r in getattr(rest, "geoms", [rest]) if r.geom_type == "Polygon" and not r.is_empty]
        meas = {k: v for k, v in p.measurements.items() if k not in ("area", "length")}  # no longer the region's
        # the pieces of this region, and of no other (region ids restart in each layer, texts repeat)
        group = p.group or (uuid.uuid4().hex if len(parts) > 1 else None)
        for r in parts:
            out.append(Polygon(np.asarray(r.exterior.coords)[:-1], [np.asarray(h.coords)[:-1] for h in r.interiors],
                               name=p.name, classification=p.classification, measurements=dict(meas),
                               object_type=p.object_type, color=p.color, uid=p.uid,
                               group=group))
    return out, len(neg) - len(used)


def _shape(p):
    """A valid shapely polygon of ``p`` (hand-drawn outlines may cross themselves)."""
    import shapely
    from shapely.geometry import Polygon as ShapelyPolygon

    g = ShapelyPolygon(p.exterior, [h for h in p.holes if len(h) >= 3])
    return g if g.is_valid else shapely.make_valid(g)


_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(text) -> str:
    """``text`` without the characters XML 1.0 cannot hold (a file with them could not be read back)."""
    return _XML_INVALID.sub("", str(text))


def write_aperio_xml(polygons, path, mpp: float | None = None) -> str:
    """Write polygons as an Aperio ImageScope XML file (one Annotation layer per class, one Region per polygon).

    Layers change the polygons' order (a class's polygons come together), which matters only where polygons of
    different layers overlap (:func:`rasterize` paints later ones over earlier ones): then, and only then, a
    polygon of another class between two of one class starts a new layer of that class, so that the same one
    is painted last after a round trip (each exclusion is then written into every layer of its class whose
    regions it overlaps, which it cut before).

    Each layer's LineColor is its class colour (the polygons' own, else one of a fixed palette, as in
    :func:`~histoflow.annotations.write_geojson`); each region's measurements are its ``Attributes``
    (``Length`` and ``Area`` also as the region's own attributes, which ImageScope shows), and so are a
    polygon's QuPath object type, id and group (the parts of one object), as text under names of their own
    (``histoflow:objectType``, ``histoflow:uid``, ``histoflow:group``), so a measurement called "group" stays one.
    The measurement ``negative`` is the exclusion flag (``NegativeROA``, 0 or 1; other values are refused).
    Holes are not representable as holes in this format; they are written as regions flagged
    ``NegativeROA="1"``, which ImageScope (and :func:`read_aperio_xml`) subtracts from every region of their
    Annotation layer: so a polygon with holes gets a layer of its own (same class name), where its holes cut
    nothing else. Polygons flagged ``measurements["negative"]`` (exclusions read with ``negatives="keep"``)
    stay in their class's layer, which they cut. Characters XML cannot hold (control characters) are left out
    of names.
    """
    path = os.fspath(path)
    polygons = list(polygons)
    colors = class_colors(polygons, where=path)
    layers = _layers(polygons, in_order=False)
    if _reordered_overlaps(layers, polygons):
        layers = _layers(polygons, in_order=True)
    rid = 1
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:  # region by region
        f.write("<?xml version='1.0' encoding='utf-8'?>\n")
        f.write(f"<Annotations MicronsPerPixel={quoteattr(f'{mpp:.6f}' if mpp else '0')}>\n")
        for aid, (cls, polys) in enumerate(layers, start=1):
            rgb = colors.get(polys[0].classification) if polys[0].classification is not None else \
                _layer_color(polys[0])
            f.write(f'<Annotation Id="{aid}" Name={quoteattr(cls)} LineColor="{_colorref(rgb) if rgb else 65280}" '
                    'Type="4" Visible="1"><Regions>\n')
            for p in polys:
                for reg in _regions(p, rid, path):
                    f.write(ET.tostring(reg, encoding="unicode") + "\n")
                    rid += 1
            f.write("</Regions></Annotation>\n")
        f.write("</Annotations>\n")
    return path


def _layer_key(p):
    # unclassified polygons keep the layers their colours tell apart (ImageScope's layers are often unnamed,
    # told apart by colour; one layer for all lost the colours, and let one layer's exclusions cut another's)
    return (_xml_text(p.classification or ""), None if p.classification is not None else _layer_color(p))


def _layers(polygons, in_order: bool) -> list:
    """``[(class name, polygons)]``: one layer per class (and colour, when unclassified), a polygon with holes in a
    layer of its own (its holes are exclusions, which cut every region of their layer); ``in_order``: a new layer
    whenever the class changes, so that the polygons keep their order, each exclusion in every layer of its
    class."""
    layers: list = []
    by_key: dict = {}  # key -> its layers
    last = None
    for p in polygons:
        key = _layer_key(p)
        if p.measurements.get("negative"):
            continue  # placed below, once the layers are known
        if any(len(h) >= 3 for h in p.holes):
            layers.append((key[0], [p]))
            last = None
            continue
        if key not in by_key or (in_order and key != last):
            by_key.setdefault(key, []).append([])
            layers.append((key[0], by_key[key][-1]))
        by_key[key][-1].append(p)
        last = key
    for p in polygons:  # exclusions cut the regions of their class's layer(s)
        if p.measurements.get("negative"):
            key = _layer_key(p)
            if key not in by_key:
                by_key[key] = [[]]
                layers.append((key[0], by_key[key][0]))
            targets = by_key[key][:1]
            if in_order and len(by_key[key]) > 1:  # the layers holding regions it overlaps (else the first)
                import shapely

                cut = shapely.Polygon(p.exterior) if len(p.exterior) >= 3 else None
                hits = [layer for layer in by_key[key] if cut is not None and any(
                    len(q.exterior) >= 3 and shapely.Polygon(q.exterior).intersects(cut) for q in layer)]
                targets = hits or targets
            for layer in targets:
                layer.append(p)
    return layers


def _reordered_overlaps(layers, polygons) -> bool:
    """Whether writing ``layers`` puts a polygon after one it came before and whose area it overlaps (which
    would change which of the two is painted where they overlap)."""
    import shapely

    order = {}
    for k, (_, polys) in enumerate(layers):
        for p in polys:
            order.setdefault(id(p), k)
    painted = [(i, p) for i, p in enumerate(polygons) if not p.measurements.get("negative") and len(p.exterior) >= 3]
    if len(painted) < 2 or len({order[id(p)] for _, p in painted}) < 2:
        return False
    shapes = []
    for _, p in painted:
        g = shapely.Polygon(p.exterior, [h for h in p.holes if len(h) >= 3])
        shapes.append(g if g.is_valid else shapely.make_valid(g))
    tree = shapely.STRtree(shapes)
    a, b = tree.query(shapes, predicate="intersects")
    for u, v in zip(a.tolist(), b.tolist()):
        if u >= v:
            continue
        (i, p), (j, q) = painted[u], painted[v]  # i < j: p came first
        if order[id(q)] < order[id(p)] and shapes[u].intersection(shapes[v]).area > 0:
            return True
    return False


def _layer_color(p):
    """The (r, g, b) a polygon was read with (its layer's LineColor), or None."""
    try:
        return tuple(int(v) for v in p.color) if p.color is not None and len(p.color) == 3 else None
    except (TypeError, ValueError):
        return None


def _regions(p, rid, path=""):
    """The Region elements of one polygon (its outline, then each hole as an exclusion), ids from ``rid``."""
    values = measurement_values(p, path)
    flag = values.get("negative", 0.0)
    if not (flag in (0.0, 1.0) or np.isnan(flag)):
        raise AnnotationError(f"{path}: polygon {p.name!r}: its measurement 'negative' is {flag:g}; in Aperio XML "
                              "it is the exclusion flag (NegativeROA, 0 or 1): rename the measurement")
    own = "1" if flag == 1.0 else "0"  # an exclusion read with negatives="keep"
    holes = [h for h in p.holes if len(h) >= 3]  # a hole of 1-2 points encloses nothing: no exclusion region
    for k, (ring, negative) in enumerate([(p.exterior, own)] + [(h, "1") for h in holes]):
        attrs = {"Id": str(rid + k), "Type": "0", "NegativeROA": negative, "Text": _xml_text(p.name or "")}
        meas = {m: v for m, v in values.items() if m != "negative"} if k == 0 else {}
        for key in ("length", "area"):  # ImageScope's own region attributes
            if key in meas:
                attrs[key.capitalize()] = repr(meas[key])  # in full: 6 digits turned 6000001 into 6e+06
        reg = ET.Element("Region", attrs)
        extra = {m: repr(v) for m, v in meas.items() if m not in ("length", "area")}
        if k == 0:
            extra.update({key: _xml_text(getattr(p, f)) for key, f in _FIELDS.items() if getattr(p, f) is not None})
        if extra:
            atts = ET.SubElement(reg, "Attributes")
            for m, v in extra.items():
                ET.SubElement(atts, "Attribute", {"Name": _xml_text(m), "Id": "0", "Value": v})
        verts = ET.SubElement(reg, "Vertices")
        for x, y in ring:
            ET.SubElement(verts, "Vertex", {"X": f"{x:.3f}", "Y": f"{y:.3f}"})
        yield reg

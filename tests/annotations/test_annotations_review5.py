"""Annotation files: reserved attribute names, non-number measurements, huge numbers, ellipses, one hole as an
array (session 28 review)."""
import json

import numpy as np
import pytest

from histoflow.annotations import (AnnotationError, Polygon, rasterize, read_annotations, read_aperio_xml,
                                   write_annotations)

SQ = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)


def test_measurements_named_like_the_formats_own_fields_stay_measurements(tmp_path):
    """A measurement 'group' merged two cells into one object in Aperio XML (one instance id, the measurement
    gone), and a region attribute of that name in an ImageScope file did the same."""
    cells = [Polygon(SQ, name="cell1", measurements={"group": 2.0, "uid": 5.0, "area": 100.0}),
             Polygon(SQ + 20, name="cell2", measurements={"group": 2.0}),
             Polygon(SQ + 40, name="cell3", group="g", uid="u3", object_type="cell")]
    for ext in ("xml", "geojson", "zip"):
        back = read_annotations(write_annotations(cells, tmp_path / f"c.{ext}"))
        assert [p.name for p in back] == ["cell1", "cell2", "cell3"], ext
        assert back[0].measurements["group"] == 2.0 and back[0].measurements["uid"] == 5.0, ext
        assert back[0].group is None and back[1].group is None, ext
        assert back[2].uid == "u3" and back[2].object_type == "cell", ext
        m = rasterize(back, (60, 60))
        assert len(np.unique(m)) == 4, ext  # three objects and the background
    assert read_annotations(tmp_path / "c.xml")[2].group == "g"  # (a one-part group is no MultiPolygon elsewhere)
    xml = (tmp_path / "c.xml").read_text()
    assert 'Name="histoflow:group"' in xml and 'Name="group"' in xml
    # an ImageScope file whose regions carry an attribute called "group" (their own meaning): two regions
    (tmp_path / "is.xml").write_text(
        '<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Regions>'
        + "".join(f'<Region Id="{i}" Type="0" NegativeROA="0"><Attributes><Attribute Name="group" Value="7"/>'
                  f'<Attribute Name="negative" Value="3"/></Attributes><Vertices>'
                  + "".join(f'<Vertex X="{x + 20 * i}" Y="{y}"/>' for x, y in SQ) + "</Vertices></Region>"
                  for i in (1, 2))
        + "</Regions></Annotation></Annotations>")
    regions = read_aperio_xml(tmp_path / "is.xml")
    assert len(regions) == 2 and all(p.group is None for p in regions)  # two objects, neither an exclusion
    assert regions[0].measurements["group"] == 7.0 and "negative" not in regions[0].measurements


def test_the_exclusion_flag_is_refused_as_a_count(tmp_path):
    with pytest.raises(AnnotationError, match=r"c\.xml: polygon 'x': its measurement 'negative' is 3; .*exclusion"):
        write_annotations([Polygon(SQ, name="x", measurements={"negative": 3})], tmp_path / "c.xml")
    assert not (tmp_path / "c.xml").exists()


@pytest.mark.parametrize("ext", ["xml", "geojson", "zip"])
def test_measurements_that_are_not_numbers_are_named(tmp_path, ext):
    """None, text and integers past a float's range raised TypeError / ValueError / OverflowError from inside the
    writers, naming no file."""
    out = tmp_path / f"m.{ext}"
    for bad, why in (("high", "not a number"), (10 ** 400, "too large"), (True, "not a number")):
        with pytest.raises(AnnotationError, match=rf"m\.{ext}: polygon 'p': measurement 'a' .*{why}"):
            write_annotations([Polygon(SQ, name="p", measurements={"a": bad})], out)
        assert not out.exists()
    back = read_annotations(write_annotations([Polygon(SQ, name="p", measurements={"a": None, "b": 2})], out))
    assert np.isnan(back[0].measurements.get("a", np.nan)) and back[0].measurements["b"] == 2.0


def test_geojson_with_numbers_past_a_floats_range(tmp_path):
    big = "1" + "0" * 400
    feature = '{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [%s, 0], [5, 5], [0, 0]]]}, ' \
              '"properties": {"measurements": {"a": %s, "b": 1}}}'
    (tmp_path / "c.geojson").write_text('{"type": "FeatureCollection", "features": [%s]}' % (feature % (big, 1)))
    with pytest.raises(AnnotationError, match=r"c\.geojson: feature 0 has malformed coordinates"):
        read_annotations(tmp_path / "c.geojson")
    (tmp_path / "m.geojson").write_text('{"type": "FeatureCollection", "features": [%s]}' % (feature % (10, big)))
    p, = read_annotations(tmp_path / "m.geojson")
    assert p.measurements == {"b": 1.0}  # a value no float holds is left out, as text is


def test_aperio_ellipses_follow_their_outline(tmp_path):
    """An ellipse region (Type 2) was a 64-vertex polygon: a 4000 x 2000 px one lost 10,120 px of its edge."""
    (tmp_path / "e.xml").write_text(
        '<Annotations><Annotation Id="1"><Regions><Region Id="1" Type="2"><Vertices><Vertex X="0" Y="0"/>'
        '<Vertex X="4000" Y="2000"/></Vertices></Region></Regions></Annotation></Annotations>')
    p, = read_aperio_xml(tmp_path / "e.xml")
    got = rasterize([p], (2000, 4000))
    yy, xx = np.mgrid[0:2000, 0:4000] + 0.5
    ideal = ((xx - 2000) / 2000) ** 2 + ((yy - 1000) / 1000) ** 2 <= 1
    assert np.count_nonzero(ideal & (got == 0)) < 200 and np.count_nonzero(~ideal & (got > 0)) < 200


def test_one_hole_given_as_an_array_is_one_hole():
    hole = np.array([[2, 2], [7, 2], [7, 7], [2, 7]], float)
    for holes in (hole, hole.tolist(), [hole], [hole, hole + 0.5]):
        p = Polygon(SQ, holes)
        assert all(h.shape[1] == 2 and len(h) == 4 for h in p.holes)
    p = Polygon(SQ, hole)
    assert p.area == 75 and rasterize([p], (10, 10)).sum() == 75
    json.dumps(p.holes[0].tolist())


def test_polygons_sharing_a_diagonal_edge_share_no_pixel():
    """A pixel centre on a 45° edge (MoNuSeg's outlines step 0.2 px diagonally) was in both polygons that share
    the edge, or in neither: the hair's shift up and left that breaks ties moves such an edge along itself.
    Each edge now crosses the rows alike in both polygons, and a centre on it goes to the polygon on its right."""
    import shapely

    rng = np.random.default_rng(0)
    n = 0
    while n < 300:
        pts = np.round(rng.uniform(0, 30, (4, 2)) * rng.integers(1, 3)) / 2
        order = np.argsort(np.arctan2(*(pts - pts.mean(0)).T[::-1]))
        a, b, c, d = pts[order]
        quad = shapely.Polygon([a, b, c, d])
        if not quad.is_valid or quad.convex_hull.area - quad.area > 1e-9 or quad.area < 1:
            continue
        n += 1
        for ds in (1, 2, 0.5):
            m1 = rasterize([Polygon([a, b, c])], (40, 40), ds) > 0
            m2 = rasterize([Polygon([a, c, d])], (40, 40), ds) > 0
            assert not (m1 & m2).any()
            assert np.array_equal(m1 | m2, rasterize([Polygon([a, b, c, d])], (40, 40), ds) > 0)


def test_rasterize_agrees_with_pixel_centres_inside_the_outline():
    """The scanline fill against shapely's exact containment of each pixel centre, away from ties."""
    import shapely

    rng = np.random.default_rng(3)
    for _ in range(40):
        t = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 60)))
        r = rng.uniform(3, 18, len(t))
        ext = np.c_[20 + r * np.cos(t), 20 + r * np.sin(t)]
        hole = np.c_[20 + 2 * np.cos(t[::3]), 20 + 2 * np.sin(t[::3])] if len(t) > 9 else None
        p = Polygon(ext, [hole] if hole is not None else [])
        g = shapely.Polygon(p.exterior, p.holes)
        got = rasterize([p], (41, 42)) > 0
        yy, xx = np.mgrid[0:41, 0:42] + 0.5
        centres = shapely.points(xx.ravel(), yy.ravel())
        inside = shapely.contains(g, centres).reshape(41, 42)
        far = (shapely.distance(g.boundary, centres) > 1e-6).reshape(41, 42)
        assert np.array_equal(got[far], inside[far])


def test_coordinates_past_int64_paint_nothing_wrong():
    """Cast to int64, coordinates past its range wrapped round: a square far to the right painted 60 px of a
    10 x 10 output, and a strip over every row none."""
    far = Polygon([[1e19, 0], [2e19, 0], [2e19, 9], [1e19, 9]])
    left = Polygon([[-2e19, 0], [-1e19, 0], [-1e19, 9], [-2e19, 9]])
    strip = Polygon([[2, -1e19], [5, -1e19], [5, 1e19], [2, 1e19]])
    assert rasterize([far], (10, 10)).sum() == 0 and rasterize([left], (10, 10)).sum() == 0
    got = rasterize([strip], (10, 10))
    assert got[:, 2:5].all() and got.sum() == 30
    wide = Polygon([[-1e12, 2], [1e12, 2], [1e12, 5], [-1e12, 5]])
    assert rasterize([wide], (10, 10)).sum() == 30


def test_an_absurd_ellipse_region_is_bounded(tmp_path):
    (tmp_path / "e.xml").write_text(
        '<Annotations><Annotation Id="1"><Regions><Region Id="1" Type="2"><Vertices><Vertex X="100" Y="100"/>'
        '<Vertex X="1e12" Y="1e12"/></Vertices></Region></Regions></Annotation></Annotations>')
    p, = read_aperio_xml(tmp_path / "e.xml")
    assert len(p.exterior) <= 100_000


def test_far_vertices_leave_the_near_crossings_exact():
    """Crossings were taken from an edge's upper end: a vertex at 1e16 px left no digits for the rows near the
    output (9 wrong pixels of a 12 x 12 output against exact arithmetic)."""
    from fractions import Fraction

    for far in (1e15, 1e16, 1e17):
        tri = np.array([[2.3, 1.7], [9.1, 10.6], [far, -far / 3]])
        got = rasterize([Polygon(tri)], (12, 12)) > 0
        want = np.zeros((12, 12), bool)
        pts = [(Fraction(x), Fraction(y)) for x, y in tri]
        for r in range(12):
            for c in range(12):
                px, py = Fraction(c) + Fraction(1, 2), Fraction(r) + Fraction(1, 2)
                inside = False
                for (xa, ya), (xb, yb) in zip(pts, pts[1:] + pts[:1]):
                    if (ya > py) != (yb > py) and px < xa + (py - ya) * (xb - xa) / (yb - ya):
                        inside = not inside
                want[r, c] = inside
        assert (got != want).sum() <= 1, far  # (a centre within 1e-6 px of an edge may go either way)


def test_an_unnamed_multi_part_object_survives_aperio_xml_and_back(tmp_path):
    """Its parts came back named by their region ids ("1", "2"), and the GeoJSON writer refused them as one object."""
    parts = [Polygon(SQ, group="g1", classification="Tumor"), Polygon(SQ + 20, group="g1", classification="Tumor")]
    back = read_annotations(write_annotations(parts, tmp_path / "mp.xml"))
    assert [p.name for p in back] == ["", ""] and back[0].group == back[1].group
    again = read_annotations(write_annotations(back, tmp_path / "back.geojson"))
    assert len(again) == 2 and again[0].group is not None and again[0].group == again[1].group
    single = read_annotations(write_annotations([Polygon(SQ)], tmp_path / "one.xml"))
    assert single[0].name == "1"  # an ungrouped region without text keeps its id as its name

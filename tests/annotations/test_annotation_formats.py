"""Annotation formats as their own software writes and means them: ImageScope exclusions and ellipses,
QuPath's GeoJSON across versions, ImageJ lines and curves; argument and file errors; the MoNuSeg loader's
grid at another pixel size."""
import json
import os

import numpy as np
import pytest
import roifile
from datafiles import data_path

from histoflow.annotations import (AnnotationError, Polygon, polygonize, rasterize, rasterize_slide,
                                   read_annotations, read_aperio_xml, read_geojson, read_imagej_rois,
                                   write_aperio_xml, write_geojson)
from histoflow.datasets import load_monuseg
from histoflow.errors import ParameterError

SQUARE = [[0, 0], [10, 0], [10, 10], [0, 10]]


def _aperio(path, regions):
    """An ImageScope file of one layer; regions: (type, negative, vertices)."""
    body = "".join(
        f'<Region Id="{i}" Type="{t}" NegativeROA="{int(neg)}"><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in v) + "</Vertices></Region>"
        for i, (t, neg, v) in enumerate(regions, start=1))
    path.write_text(f'<?xml version="1.0"?><Annotations MicronsPerPixel="0.25"><Annotation Id="1" Name="tumour">'
                    f"<Regions>{body}</Regions></Annotation></Annotations>")
    return path


def test_aperio_exclusions_are_cut_out_of_their_layer(tmp_path):
    # an exclusion across the right edge of a square, one wholly inside a second square (a hole) holding an
    # island, and one over nothing
    path = _aperio(tmp_path / "a.xml", [
        ("0", False, SQUARE), ("0", True, [[6, -2], [14, -2], [14, 12], [6, 12]]),
        ("0", False, [[20, 0], [40, 0], [40, 20], [20, 20]]), ("0", True, [[25, 5], [35, 5], [35, 15], [25, 15]]),
        ("0", False, [[28, 8], [32, 8], [32, 12], [28, 12]]), ("0", True, [[50, 50], [60, 50], [60, 60]])])
    with pytest.warns(UserWarning, match=r"a.xml: 1 region\(s\) flagged as exclusions .* cut nothing"):
        polys = read_aperio_xml(path)             # the one over nothing is named
    assert len(polys) == 3 and not any(p.measurements.get("negative") for p in polys)
    m = rasterize(polys, (20, 45)) > 0
    expect = np.zeros((20, 45), bool)
    expect[0:10, 0:6] = True  # the bite out of the first square
    expect[0:20, 20:40] = True
    expect[5:15, 25:35] = False  # the hole
    expect[8:12, 28:32] = True  # the island inside it
    np.testing.assert_array_equal(m, expect)
    # written and read again: the same mask (holes travel as exclusions)
    write_aperio_xml(polys, tmp_path / "b.xml")
    np.testing.assert_array_equal(rasterize(read_aperio_xml(tmp_path / "b.xml"), (20, 45)) > 0, expect)
    # kept as they are: flagged, and written back flagged
    kept = read_aperio_xml(path, negatives="keep")
    assert [bool(p.measurements.get("negative")) for p in kept] == [False, True, False, True, False, True]
    write_aperio_xml(kept, tmp_path / "c.xml")
    assert (tmp_path / "c.xml").read_text().count('NegativeROA="1"') == 3
    with pytest.raises(ParameterError, match="negatives"):
        read_aperio_xml(path, negatives="drop")


def test_aperio_ellipse_and_closed_rings(tmp_path):
    path = _aperio(tmp_path / "e.xml", [("2", False, [[20, 20], [30, 26]]),
                                        ("0", False, SQUARE + [[0, 0]])])  # closed: first vertex repeated
    ellipse, square = read_aperio_xml(path)
    assert len(ellipse.exterior) == 64 and ellipse.area == pytest.approx(np.pi * 5 * 3, rel=0.01)
    assert ellipse.bounds == pytest.approx((20, 20, 30, 26))
    assert len(square.exterior) == 4


def test_qupath_geojson_of_every_version(tmp_path):
    ring = SQUARE + [[0, 0]]
    feats = [
        {"type": "Feature", "id": "5b1c7d2e-2f39-4c8e-9d2a-0c8b7f0e1a11", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "detection", "classification": {"names": ["Tumor", "Positive"], "color": [200, 0, 0]}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},  # QuPath 0.3
         "properties": {"object_type": "annotation", "classification": {"name": "Stroma", "color": [0, 200, 0]}}},
        {"type": "Feature", "id": "PathAnnotationObject", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"classification": {"name": "Tumor", "colorRGB": -3670016}}},  # QuPath 0.2
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
         "properties": {"objectType": "annotation", "classification": {"name": "Immune", "color": [0, 0, 255, 128]}}}]
    path = tmp_path / "qp.geojson"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"type": "FeatureCollection", "features": feats}).encode())  # a BOM
    polys = read_geojson(path)
    assert [(p.object_type, p.classification, p.color) for p in polys] == [
        ("detection", "Tumor: Positive", (200, 0, 0)), ("annotation", "Stroma", (0, 200, 0)),
        ("annotation", "Tumor", (200, 0, 0)), ("annotation", "Immune", (0, 0, 255))]
    assert polys[0].uid == "5b1c7d2e-2f39-4c8e-9d2a-0c8b7f0e1a11" and polys[2].uid is None
    assert "PathAnnotationObject" not in [p.name for p in polys]
    write_geojson(polys, tmp_path / "out.geojson")
    out = json.loads((tmp_path / "out.geojson").read_text())["features"]
    assert out[0]["id"] == "5b1c7d2e-2f39-4c8e-9d2a-0c8b7f0e1a11"
    assert [f["properties"]["objectType"] for f in out] == ["detection", "annotation", "annotation", "annotation"]
    assert out[0]["properties"]["classification"] == {"name": "Tumor: Positive", "color": [200, 0, 0]}


def test_imagej_lines_are_skipped_and_curves_named(tmp_path):
    pts = np.array([[10, 10], [50, 12], [30, 40], [5, 30]], np.float32)
    rois = []
    for kind in (roifile.ROI_TYPE.POLYLINE, roifile.ROI_TYPE.FREELINE, roifile.ROI_TYPE.ANGLE, roifile.ROI_TYPE.POLYGON):
        r = roifile.ImagejRoi.frompoints(pts[:3] if kind == roifile.ROI_TYPE.ANGLE else pts)
        r.roitype, r.name = kind, kind.name
        rois.append(r)
    rect = roifile.ImagejRoi()
    rect.roitype, rect.version, rect.name = roifile.ROI_TYPE.RECT, 228, "rect"
    rect.left, rect.top, rect.right, rect.bottom = 0, 0, 4, 3
    rois.append(rect)
    roifile.roiwrite(tmp_path / "set.zip", rois, mode="w")
    polys = read_imagej_rois(tmp_path / "set.zip")
    assert [p.name for p in polys] == ["POLYGON", "rect"]
    assert len(polys[1].exterior) == 4 and polys[1].area == 12  # no closing vertex
    curvy = roifile.ImagejRoi()
    curvy.roitype, curvy.version, curvy.name = roifile.ROI_TYPE.RECT, 228, "curvy"
    path = [0, 0, 0, 1, 10, 0, 3, 12, 2, 12, 8, 10, 10, 1, 0, 10, 4]  # moveto, lineto, cubicto, lineto, close
    curvy.multi_coordinates, curvy.shape_roi_size = np.asarray(path, np.float32), len(path)
    curvy.left, curvy.top, curvy.right, curvy.bottom = 0, 0, 12, 10
    roifile.roiwrite(tmp_path / "curvy.zip", [curvy, rois[3]], mode="w")
    with pytest.raises(AnnotationError, match="curvy"):
        read_imagej_rois(tmp_path / "curvy.zip")


def test_polygonize_keeps_an_object_in_pieces_one_object(tmp_path):
    lab = np.zeros((10, 10), np.uint32)
    lab[1:3, 1:3] = 1
    lab[6:8, 6:8] = 1
    lab[4:6, 0:2] = 2
    polys = polygonize(lab)
    assert [p.name for p in polys] == ["1", "1", "2"] and polys[2].group is None
    assert polys[0].group == polys[1].group is not None
    write_geojson(polys, tmp_path / "n.geojson")
    feats = json.loads((tmp_path / "n.geojson").read_text())["features"]
    assert [f["geometry"]["type"] for f in feats] == ["MultiPolygon", "Polygon"]
    np.testing.assert_array_equal(rasterize(read_geojson(tmp_path / "n.geojson"), (10, 10), values=[1, 1, 2]), lab)
    assert len(polygonize(lab, min_area=5)) == 2  # object 1 is 8 px in its two pieces together


def test_rasterize_and_slide_arguments_are_checked():
    sq = [Polygon(np.add(SQUARE, k)) for k in (0, 3, 6)]
    with pytest.raises(ParameterError, match="3 polygons but 2 values"):
        rasterize(sq, (20, 20), values=[5, 7])
    with pytest.raises(ParameterError, match="do not fit uint8"):
        rasterize(sq, (20, 20), values=[1, 2, 300], dtype=np.uint8)
    with pytest.raises(ParameterError, match="do not fit uint8"):
        rasterize([Polygon(SQUARE)] * 300, (20, 20), dtype=np.uint8)
    for bad in (0, -2, float("nan"), (1, 0)):
        with pytest.raises(ParameterError, match="downsample"):
            rasterize(sq, (20, 20), downsample=bad)
    svs = data_path("wsi", "aperio_svs", "CMU-1-Small-Region.svs")
    with pytest.raises(ParameterError, match="CMU-1-Small-Region.svs: mpp"):
        rasterize_slide(sq, svs, mpp=0)
    with pytest.raises(ParameterError, match="level 3 does not exist"):
        rasterize_slide(sq, svs, level=3)


def test_unreadable_annotation_paths_are_annotation_errors(tmp_path):
    for name in ("d.xml", "d.geojson"):
        (tmp_path / name).mkdir()
        with pytest.raises(AnnotationError, match=name):
            read_annotations(tmp_path / name)


def test_monuseg_outlines_on_the_resampled_grid():
    """At 0.5 µm/px the 1000 px image becomes w whole pixels, so its true scale is 1000 / w: the outlines
    are painted on that grid (centroids of the painted nuclei match the polygons' at that scale, also at
    the far edge), and the pixel size reported is the true one."""
    ident = "TCGA-21-5784-01Z-00-DX1"
    s = load_monuseg(data_path("monuseg_train"), [ident], mpp=0.5)[0]
    h, w = s["instances"].shape
    own = load_monuseg(data_path("monuseg_train"), [ident])[0]["mpp"]
    assert s["mpp"] == pytest.approx(own * 1000 / w, rel=1e-9) and s["mpp"] != 0.5
    from scipy import ndimage as ndi

    polys = read_aperio_xml(data_path("monuseg_train", ident + ".xml"))
    far = [i for i, p in enumerate(polys, start=1) if p.centroid[0] > 900 and p.area > 100]
    labels = s["instances"]
    got = ndi.center_of_mass(np.ones_like(labels), labels, far)
    ds = 1000 / w
    err = [abs(gx - ((polys[i - 1].centroid[0]) / ds - 0.5)) for i, (gy, gx) in zip(far, got)]
    assert len(far) > 10 and np.median(err) < 0.2


def test_convert_keeps_the_pixel_size_and_says_what_it_skips(tmp_path):
    from histoflow.annotations import convert, skipped_features
    from histoflow.annotations.aperio import aperio_mpp
    from histoflow.cli import main

    src = data_path("monuseg_train", "TCGA-21-5784-01Z-00-DX1.xml")
    assert convert(src, tmp_path / "back.xml") == 398
    assert aperio_mpp(tmp_path / "back.xml") == pytest.approx(aperio_mpp(src))  # it was written as 0
    feats = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [SQUARE + [[0, 0]]]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 4]}, "properties": {}},
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "properties": {}}]}
    (tmp_path / "mixed.geojson").write_text(json.dumps(feats))
    assert skipped_features(tmp_path / "mixed.geojson") == {"Point": 1, "LineString": 1}
    assert main(["annotations", "convert", str(tmp_path / "mixed.geojson"), str(tmp_path / "m.xml")]) == 0


def test_convert_reports_skipped_features_on_the_command_line(tmp_path, capsys):
    from histoflow.cli import main

    feats = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 4]}, "properties": {}}]}
    (tmp_path / "pts.geojson").write_text(json.dumps(feats))
    assert main(["annotations", "convert", str(tmp_path / "pts.geojson"), str(tmp_path / "o.xml")]) == 0
    out = capsys.readouterr().out
    assert "0 polygons from" in out and "skipped 1 Point feature(s), which enclose no area" in out


def test_split_regions_of_different_layers_stay_different_objects(tmp_path):
    """A region cut in two by an exclusion keeps its pieces together as one object, under a group of its own:
    the group was the region's Id, which restarts in each layer, so a Tumor and a Stroma region both Id 1 and
    both cut became one Tumor MultiPolygon of four parts (Stroma gone). Parts of one group with different
    classes are refused by the writer instead of being merged."""
    rect = '<Vertex X="{0}" Y="{1}"/><Vertex X="{2}" Y="{1}"/><Vertex X="{2}" Y="{3}"/><Vertex X="{0}" Y="{3}"/>'
    layer = ('<Annotation Id="{i}" Name="{name}"><Regions>'
             '<Region Id="1" Type="0" NegativeROA="0"><Vertices>' + rect.format(0, "{y0}", 100, "{y1}") +
             '</Vertices></Region><Region Id="2" Type="0" NegativeROA="1"><Vertices>' +
             rect.format(45, "{n0}", 55, "{n1}") + '</Vertices></Region></Regions></Annotation>')
    xml = ('<?xml version="1.0"?><Annotations MicronsPerPixel="0.25">'
           + layer.format(i=1, name="Tumor", y0=0, y1=20, n0=-5, n1=25)
           + layer.format(i=2, name="Stroma", y0=100, y1=120, n0=95, n1=125) + "</Annotations>")
    (tmp_path / "split.xml").write_text(xml)
    polys = read_aperio_xml(tmp_path / "split.xml")
    assert len(polys) == 4 and len({p.group for p in polys}) == 2
    assert all(len({p.classification for p in polys if p.group == g}) == 1 for g in {p.group for p in polys})
    from histoflow.annotations import convert

    convert(tmp_path / "split.xml", tmp_path / "split.geojson")
    feats = json.load(open(tmp_path / "split.geojson"))["features"]
    assert sorted((f["properties"]["classification"]["name"], f["geometry"]["type"], len(f["geometry"]["coordinates"]))
                  for f in feats) == [("Stroma", "MultiPolygon", 2), ("Tumor", "MultiPolygon", 2)]
    a, b = Polygon([(0, 0), (5, 0), (5, 5)], classification="A", group="g"), \
        Polygon([(9, 9), (12, 9), (12, 12)], classification="B", group="g")
    with pytest.raises(AnnotationError, match="group 'g' are parts of one object but have different"):
        write_geojson([a, b], tmp_path / "bad.geojson")
    assert not (tmp_path / "bad.geojson").exists()


def test_aperio_writes_holes_that_cut_only_their_polygon_and_names_it_can_read(tmp_path):
    """Holes go to Aperio XML as exclusion regions, which cut every region of their layer: a polygon of the
    same class lying over another's hole lost that part (300 -> 200 px²). Holed polygons now get a layer of
    their own. Names with control characters made XML that could not be read back; NaN coordinates in
    GeoJSON are refused when read."""
    holed = Polygon([(0, 0), (100, 0), (100, 100), (0, 100)], [[(40, 40), (60, 40), (60, 60), (40, 60)]],
                    name="a", classification="Tumor")
    over = Polygon([(45, 45), (75, 45), (75, 55), (45, 55)], name="b\x0bc", classification="Tumor")
    write_aperio_xml([holed, over], tmp_path / "h.xml")
    back = {p.name: p for p in read_aperio_xml(tmp_path / "h.xml")}
    assert set(back) == {"a", "bc"} and {p.classification for p in back.values()} == {"Tumor"}
    assert back["bc"].area == pytest.approx(300.0) and back["a"].area == pytest.approx(10000 - 400)
    (tmp_path / "nan.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
            [[0, 0], [10, 0], [float("nan"), 10], [0, 0]]]}}]}))
    with pytest.raises(AnnotationError, match=r"nan.geojson: feature 0 has coordinates that are not finite"):
        read_geojson(tmp_path / "nan.geojson")


def test_rasterize_gives_the_parts_of_one_object_one_id():
    """A MultiPolygon (or an object polygonize found in pieces) is one instance: its parts got ids of
    their own (1 object -> 2 instances)."""
    labels = np.zeros((40, 40), np.int32)
    labels[2:8, 2:8] = labels[20:30, 20:30] = 5  # one object in two pieces
    labels[2:8, 30:38] = 7
    polys = polygonize(labels)
    assert len(polys) == 3
    back = rasterize(polys, labels.shape)
    assert np.unique(back).tolist() == [0, 1, 2]
    assert back[4, 4] == back[25, 25] != back[4, 33]
    assert np.array_equal(back > 0, labels > 0)


def test_imagej_subpixel_rectangles_text_overlays_and_composite_objects(tmp_path):
    """A subpixel rectangle was read at its integer bounds (area 66 for 56.4), an overlay's text label as a
    rectangle region; the separate areas of one composite ROI are parts of one object (one id, one
    MultiPolygon), not unrelated polygons."""
    r = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=10, top=20, right=16, bottom=31, name="r")
    r.options |= roifile.ROI_OPTIONS.SUB_PIXEL_RESOLUTION
    r.xd, r.yd, r.widthd, r.heightd = 10.25, 20.5, 5.5, 10.25
    text = roifile.ImagejRoi(roitype=roifile.ROI_TYPE.RECT, left=0, top=0, right=40, bottom=30, name="label")
    text.subtype = roifile.ROI_SUBTYPE.TEXT
    roifile.roiwrite(tmp_path / "s.zip", [r, text], mode="w")
    polys = read_imagej_rois(tmp_path / "s.zip")
    assert [p.name for p in polys] == ["r"] and polys[0].area == pytest.approx(5.5 * 10.25)
    assert polys[0].bounds == (10.25, 20.5, 15.75, 30.75)
    from histoflow.annotations.imagej import _rings_to_polygons

    parts = _rings_to_polygons([np.array([(0, 0), (10, 0), (10, 10), (0, 10)], float),
                                np.array([(30, 30), (40, 30), (40, 40), (30, 40)], float)], "cell")
    assert len(parts) == 2 and parts[0].group is not None and parts[0].group == parts[1].group
    assert np.unique(rasterize(parts, (50, 50))).tolist() == [0, 1]


def test_unnamed_geojson_objects_stay_unnamed(tmp_path):
    """Objects without a name were given "1", "2" ... when read, and written back with them."""
    (tmp_path / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"objectType": "annotation"},
         "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]}}]}))
    polys = read_geojson(tmp_path / "a.geojson")
    assert polys[0].name == ""
    write_geojson(polys, tmp_path / "b.geojson")
    assert "name" not in json.load(open(tmp_path / "b.geojson"))["features"][0]["properties"]


def test_geometry_collections_and_boolean_measurements(tmp_path):
    """A GeometryCollection's polygons were dropped (and reported as enclosing no area); a boolean
    measurement was stored as 1.0."""
    from histoflow.annotations import skipped_features

    square = [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]
    feats = [{"type": "Feature", "properties": {"measurements": {"area": 100, "edited": True}},
              "geometry": {"type": "GeometryCollection", "geometries": [
                  {"type": "Point", "coordinates": [5, 5]}, {"type": "Polygon", "coordinates": square}]}},
             {"type": "Feature", "properties": {}, "geometry": {"type": "GeometryCollection", "geometries": [
                 {"type": "Point", "coordinates": [5, 5]}]}},
             {"type": "Feature", "properties": {}, "geometry": None}]
    (tmp_path / "g.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    polys = read_geojson(tmp_path / "g.geojson")
    assert len(polys) == 1 and polys[0].area == pytest.approx(100) and polys[0].measurements == {"area": 100}
    assert skipped_features(tmp_path / "g.geojson") == {"GeometryCollection": 1, "no geometry": 1}


def test_imagej_zip_entries_are_plain_file_names():
    """ROI names became zip entry names as they were: "../evil" and "CD8/CD3 T" made entries outside or in
    folders, "a" and "A" collided on case-insensitive file systems."""
    import tempfile
    import zipfile

    from histoflow.annotations.imagej import write_imagej_rois

    sq = [(0, 0), (10, 0), (10, 10)]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "n.zip")
        write_imagej_rois([Polygon(sq, name=n) for n in ("../evil", "CD8/CD3 T", "a", "A", "")], path)
        entries = zipfile.ZipFile(path).namelist()
        assert entries == ["_evil.roi", "CD8_CD3 T.roi", "a.roi", "A-2.roi", "5.roi"]
        assert len(read_imagej_rois(path)) == 5


def test_imagej_rings_touching_at_a_corner_ovals_rounded_corners_and_full_measurements(tmp_path):
    """Found by a review: a composite ROI's rings were nested by one vertex, and a vertex on another ring's edge
    counted as inside (two holes touching at a corner: one became an island; two squares touching at a corner:
    the small one became a hole); ovals were 33-sided polygons and rounded rectangles plain ones; the Aperio
    writer rounded Length and Area to 6 digits."""
    import json

    import roifile

    from histoflow.annotations import polygonize, rasterize, read_annotations, write_annotations

    lab = np.array([[1, 1, 1, 1, 1, 1],
                    [1, 0, 0, 1, 1, 1],
                    [1, 1, 1, 0, 1, 1],
                    [1, 1, 1, 1, 1, 1]], np.int32)
    write_annotations(polygonize(lab), tmp_path / "holes.zip")
    np.testing.assert_array_equal(rasterize(read_annotations(tmp_path / "holes.zip"), lab.shape) > 0, lab > 0)
    gj = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"objectType": "annotation"},
          "geometry": {"type": "MultiPolygon", "coordinates": [[[[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]],
                                                               [[[4, 4], [6, 4], [6, 6], [4, 6], [4, 4]]]]}}]}
    (tmp_path / "two.geojson").write_text(json.dumps(gj))
    write_annotations(read_annotations(tmp_path / "two.geojson"), tmp_path / "two.zip")
    assert int((rasterize(read_annotations(tmp_path / "two.zip"), (8, 8)) > 0).sum()) == 20
    for kind, arc, area in ((roifile.ROI_TYPE.OVAL, 0, np.pi * 100 * 50), (roifile.ROI_TYPE.RECT, 60, 9227)):
        roi = roifile.ImagejRoi()
        roi.roitype, roi.version, roi.name = kind, 228, "r"
        roi.left, roi.top, roi.right, roi.bottom = 0, 0, 200, 100
        if arc:
            roi.right = 100
            roi.rounded_rect_arc_size = arc
        roi.tofile(tmp_path / "r.roi")
        assert read_annotations(tmp_path / "r.roi")[0].area == pytest.approx(area, rel=2e-3)
    p = read_annotations(tmp_path / "two.geojson")[0]
    p.measurements = {"area": 6000001.0, "length": 12345.678}
    write_annotations([p], tmp_path / "m.xml")
    assert read_annotations(tmp_path / "m.xml")[0].measurements["area"] == 6000001.0


def test_geojson_with_a_nan_measurement_is_valid_json(tmp_path):
    """A NaN measurement (a cell with no pixels in a channel) was written as a bare NaN, which is not JSON:
    strict readers refuse the whole file. It is written as null now (a missing value)."""
    from histoflow.annotations import Polygon, read_annotations, write_annotations

    p = Polygon(np.array([[0, 0], [4, 0], [4, 4], [0, 4]], float), [], name="c",
                measurements={"mean_CD3": float("nan"), "area": 16.0})
    write_annotations([p], tmp_path / "n.geojson")

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    data = json.loads((tmp_path / "n.geojson").read_text(), parse_constant=refuse)
    assert data["features"][0]["properties"]["measurements"] == {"mean_CD3": None, "area": 16.0}
    assert read_annotations(tmp_path / "n.geojson")[0].measurements == {"area": 16.0}


def _shapely_objects(polys):
    import shapely

    by = {}
    for p in polys:
        by.setdefault(p.name, []).append(shapely.Polygon(p.exterior, p.holes))
    return {k: shapely.MultiPolygon(v) for k, v in by.items()}


def test_polygonize_writes_valid_polygons_where_pixels_meet_at_a_corner(tmp_path):
    """Pixels of one object meeting only at a corner were traced as one ring touching itself, which OGC
    (and strict GIS readers: GEOS, PostGIS, QGIS's checker) call invalid; 3 of the 398 annotated nuclei of a
    MoNuSeg image came out so. Now such an object is written in valid pieces, with the same pixels."""
    lab = np.zeros((8, 8), np.int32)
    lab[1:3, 1:3] = 1
    lab[3:5, 3:5] = 1            # touches the first square at one corner only
    lab[5:8, 5:8] = 2
    lab[6, 6] = 0                # a hole ...
    lab[5, 7] = 0                # ... and a notch meeting at a corner: still one valid polygon
    polys = polygonize(lab)
    objs = _shapely_objects(polys)
    assert all(g.is_valid for g in objs.values())
    assert [len(g.geoms) for g in objs.values()] == [2, 1]
    assert polys[0].group == polys[1].group is not None and polys[2].group is None
    np.testing.assert_array_equal(rasterize(polys, lab.shape, values=[int(p.name) for p in polys]), lab)

    truth = load_monuseg(data_path("monuseg_train"), ["TCGA-21-5784-01Z-00-DX1"])[0]["instances"]
    polys = polygonize(truth)
    objs = _shapely_objects(polys)
    assert len(objs) == len(np.unique(truth)) - 1
    assert all(g.is_valid for g in objs.values())
    np.testing.assert_array_equal(rasterize(polys, truth.shape, values=[int(p.name) for p in polys]), truth)
    write_geojson(polys, tmp_path / "truth.geojson")
    assert all(g.is_valid for g in _shapely_objects(read_geojson(tmp_path / "truth.geojson")).values())


# ------------------------------------------------------------------ session 22 review
def _two_layer_xml(path):
    """Two unnamed ImageScope layers told apart by colour: red (a square), blue (a square and an exclusion strip)."""
    path.write_text(
        '<Annotations MicronsPerPixel="0.25">'
        '<Annotation Id="1" Name="" LineColor="255"><Regions>'
        '<Region Id="1" NegativeROA="0"><Vertices><Vertex X="0" Y="0"/><Vertex X="100" Y="0"/><Vertex X="100" Y="100"/>'
        '<Vertex X="0" Y="100"/></Vertices></Region></Regions></Annotation>'
        '<Annotation Id="2" Name="" LineColor="16711680"><Regions>'
        '<Region Id="2" NegativeROA="0"><Vertices><Vertex X="200" Y="0"/><Vertex X="300" Y="0"/><Vertex X="300" Y="100"/>'
        '<Vertex X="200" Y="100"/></Vertices></Region>'
        '<Region Id="3" NegativeROA="1"><Vertices><Vertex X="50" Y="50"/><Vertex X="250" Y="50"/><Vertex X="250" Y="60"/>'
        '<Vertex X="50" Y="60"/></Vertices></Region></Regions></Annotation></Annotations>')


def test_unnamed_aperio_layers_keep_their_colours_and_their_own_exclusions(tmp_path):
    """Unclassified polygons were written as one green layer: the layers' colours were lost, and (kept as
    exclusions) one layer's NegativeROA cut the other's regions."""
    src = tmp_path / "two.xml"
    _two_layer_xml(src)
    before = read_aperio_xml(src, negatives="keep")           # the exclusion kept as a polygon of its layer
    write_aperio_xml(before, tmp_path / "out.xml")
    write_geojson(before, tmp_path / "out.geojson")
    colours = sorted(tuple(p.color) for p in before)
    assert sorted(tuple(p.color) for p in read_aperio_xml(tmp_path / "out.xml", negatives="keep")) == colours
    assert sorted(tuple(p.color) for p in read_geojson(tmp_path / "out.geojson")) == colours
    applied = read_aperio_xml(tmp_path / "out.xml")
    assert sorted(p.area for p in applied) == pytest.approx([9500, 10000])  # the red square is not cut by blue's strip


def test_degenerate_geojson_parts_are_counted_and_never_written(tmp_path):
    """A 2-point polygon was dropped without being counted; a 2-point hole was kept and written as a 3-position
    ring, which RFC 7946 and QuPath refuse."""
    from histoflow.annotations import skipped_features

    src = tmp_path / "deg.geojson"
    src.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [5, 5]]]}},
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [
            [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]], [[2, 2], [3, 2]]]}}]}))
    polys = read_geojson(src)
    assert len(polys) == 1 and polys[0].holes == []
    assert skipped_features(src) == {"Polygon with fewer than 3 vertices": 1}
    p = polys[0]
    p.holes = [np.array([[2.0, 2.0], [3.0, 2.0]])]                       # given by a caller: still not written
    write_geojson([p], tmp_path / "out.geojson")
    rings = json.loads((tmp_path / "out.geojson").read_text())["features"][0]["geometry"]["coordinates"]
    assert len(rings) == 1 and all(len(r) >= 4 for r in rings)


def test_imagej_names_with_emoji_are_written_readably(tmp_path):
    from histoflow.annotations import read_imagej_rois, write_imagej_rois

    p = Polygon(np.array([[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]]), name="Zelle \U0001f52c", classification="Tumor",
                measurements={"x": 1.0})
    with pytest.warns(UserWarning, match="past U\\+FFFF"):
        write_imagej_rois([p], tmp_path / "e.zip")
    back = read_imagej_rois(tmp_path / "e.zip")
    assert back[0].name == "Zelle \ufffd" and back[0].classification == "Tumor" and back[0].measurements == {"x": 1.0}


def test_coordinates_that_are_not_finite_are_refused_in_every_format(tmp_path):
    """float() reads "nan" and "inf": an Aperio region with such a vertex became a polygon of area NaN, which
    rasterised to nothing and was written to GeoJSON as a bare NaN (not JSON; its own reader then refused the
    file). Every reader refuses such coordinates now, naming the file and the object, and so does Polygon."""
    for bad in ("nan", "inf", "-inf"):
        path = _aperio(tmp_path / f"{bad}.xml", [(0, False, SQUARE), (0, False, [[0, 0], [bad, 0], [5, 5]])])
        with pytest.raises(AnnotationError, match=rf"{bad}.xml: region 2 has vertices that are not finite numbers"):
            read_aperio_xml(path)
    with pytest.warns(RuntimeWarning):  # roifile's integer copy of the coordinates
        roi = roifile.ImagejRoi.frompoints(np.array([[1.5, 1.5], [8.25, 1.5], [np.nan, 9.0]], np.float32),
                                           name="cell")
    roifile.roiwrite(tmp_path / "n.zip", [roi], mode="w")
    assert np.isnan(roifile.roiread(tmp_path / "n.zip")[0].coordinates()).any()  # the file holds the NaN
    with pytest.raises(AnnotationError, match=r"n.zip: ROI 'cell' has coordinates that are not finite numbers"):
        read_imagej_rois(tmp_path / "n.zip")
    with pytest.raises(AnnotationError, match=r"polygon 'p': its exterior has coordinates that are not finite"):
        Polygon([[0, 0], [np.inf, 0], [5, 5]], name="p")
    with pytest.raises(AnnotationError, match=r"polygon 'q': a hole has coordinates that are not finite"):
        Polygon(SQUARE, [[[1, 1], [2, np.nan], [2, 2]]], name="q")

"""What a conversion keeps: class colours, measurements, QuPath object types, ids, multi-part objects and cell
nuclei through every format; what it cannot keep is said, and so is what the reader leaves out."""
import json
import warnings
import zipfile

import numpy as np
import pytest
import roifile
from datafiles import data_path

from histoflow.annotations import (Polygon, conversion_losses, convert, read_annotations, read_geojson,
                                   read_imagej_rois, skipped_features, write_annotations, write_geojson)

SQ = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)


def _objects():
    hole = np.array([[3, 3], [6, 3], [6, 6], [3, 6]], float)
    return [
        Polygon(SQ, [hole], name="tumour region", classification="Tumor: Positive", color=(200, 10, 20),
                measurements={"Nucleus: Area µm^2": 12.5, "count": 3.0}, object_type="annotation",
                uid="6d0c7e9a-0000-4000-8000-000000000001"),
        Polygon(SQ + 20, name="two parts", classification="Stroma", object_type="detection", group="g1",
                uid="6d0c7e9a-0000-4000-8000-000000000002"),
        Polygon(SQ + 40, name="two parts", classification="Stroma", object_type="detection", group="g1",
                uid="6d0c7e9a-0000-4000-8000-000000000002"),
    ]


def _summary(polys):
    by = {}
    for p in polys:  # one entry per object: its parts' areas
        key = p.group if p.group is not None else id(p)
        e = by.setdefault(key, {"name": p.name, "class": p.classification, "color": p.color,
                                "meas": p.measurements, "type": p.object_type, "uid": p.uid, "areas": []})
        e["areas"].append(round(p.area, 3))
    return sorted((e["name"], e["class"], e["color"], sorted(e["meas"].items()), e["type"], e["uid"],
                   sorted(e["areas"])) for e in by.values())


@pytest.mark.parametrize("ext", [".geojson", ".xml", ".zip"])
def test_every_format_keeps_what_the_objects_carry(tmp_path, ext):
    """Aperio XML wrote every layer green and kept no measurements but Length/Area; ImageJ ROI sets kept only
    names; both split a multi-part object into separate objects, and an ImageJ composite of separate areas
    read back as parts named "x", "x (2)" that GeoJSON then refused to write."""
    src = write_geojson(_objects(), tmp_path / "src.geojson")
    before = read_geojson(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is lost: no warning
        assert convert(src, tmp_path / f"mid{ext}") == 3
    mid = read_annotations(tmp_path / f"mid{ext}")
    stroma = next(p for p in before if p.classification == "Stroma").color
    assert stroma is not None and mid[0].color == (200, 10, 20) and mid[1].color == stroma
    assert _summary(mid) == _summary(before)
    assert len({p.group for p in mid[1:]}) == 1 and mid[1].group is not None
    convert(tmp_path / f"mid{ext}", tmp_path / "back.geojson")
    back = read_geojson(tmp_path / "back.geojson")
    assert _summary(back) == _summary(before)
    feats = json.loads((tmp_path / "back.geojson").read_text())["features"]
    assert [f["geometry"]["type"] for f in feats] == ["Polygon", "MultiPolygon"]
    assert feats[0]["properties"]["classification"] == {"name": "Tumor: Positive", "color": [200, 10, 20]}


def test_a_composite_roi_of_separate_areas_converts_to_geojson(tmp_path):
    path = []
    for ring in (SQ, SQ + 20):
        path += [0.0, *ring[0]] + [v for x, y in ring[1:] for v in (1.0, x, y)] + [4.0]
    roi = roifile.ImagejRoi()
    roi.roitype, roi.version, roi.name = roifile.ROI_TYPE.RECT, 228, "islands"
    roi.multi_coordinates, roi.shape_roi_size = np.asarray(path, np.float32), len(path)
    roi.left, roi.top, roi.right, roi.bottom = 0, 0, 30, 30
    roi.tofile(tmp_path / "islands.roi")
    polys = read_imagej_rois(tmp_path / "islands.roi")
    assert [p.name for p in polys] == ["islands", "islands"] and polys[0].group == polys[1].group
    assert convert(tmp_path / "islands.roi", tmp_path / "i.geojson") == 2
    feats = json.loads((tmp_path / "i.geojson").read_text())["features"]
    assert len(feats) == 1 and feats[0]["geometry"]["type"] == "MultiPolygon"


def test_unnamed_rois_are_named_after_their_entry_and_long_names_kept(tmp_path):
    """ImageJ names an unnamed ROI of a set after its zip entry; we named it by its position ("1")."""
    a = roifile.ImagejRoi.frompoints(SQ.astype(np.float32))
    a.roitype, a.name = roifile.ROI_TYPE.POLYGON, ""
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as z:
        z.writestr("0012-0034.roi", a.tobytes())
        z.writestr("notes.txt", "not a ROI")
    assert [p.name for p in read_imagej_rois(tmp_path / "set.zip")] == ["0012-0034"]
    a.tofile(tmp_path / "cell 7.roi")
    assert read_imagej_rois(tmp_path / "cell 7.roi")[0].name == "cell 7"
    long = "CD8+ cytotoxic T cell in the invasive margin of the tumour, region " + "x" * 40
    write_annotations([Polygon(SQ, name=long)], tmp_path / "long.zip")
    assert read_imagej_rois(tmp_path / "long.zip")[0].name == long  # was cut at 60 characters


def test_measurements_written_as_text_are_read():
    """Measurements some tools write as strings ("12.5", "NaN") were dropped."""
    import tempfile

    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [SQ.tolist() + [[0, 0]]]},
              "properties": {"measurements": {"Area": "12.5", "Mean": "NaN", "Note": "checked", "Flag": True}}},
             {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [SQ.tolist() + [[0, 0]]]},
              "properties": {"measurements": [{"name": "Perimeter", "value": " 40 "}]}}]
    with tempfile.NamedTemporaryFile("w", suffix=".geojson", delete=False) as f:
        json.dump({"type": "FeatureCollection", "features": feats}, f)
    a, b = read_geojson(f.name)
    assert a.measurements["Area"] == 12.5 and np.isnan(a.measurements["Mean"]) and set(a.measurements) == {"Area", "Mean"}
    assert b.measurements == {"Perimeter": 40.0}


def test_cell_nuclei_round_trip_and_formats_without_them_say_so(tmp_path, capsys):
    """QuPath's cells carry their nucleus as ``nucleusGeometry``: it was dropped on reading, and converting
    to a format without a place for it said nothing."""
    from histoflow.cli import main

    nucleus = [[3, 3], [6, 3], [6, 6], [3, 6], [3, 3]]
    feats = [{"type": "Feature", "id": "c1", "geometry": {"type": "Polygon", "coordinates": [SQ.tolist() + [[0, 0]]]},
              "nucleusGeometry": {"type": "Polygon", "coordinates": [nucleus]},
              "properties": {"objectType": "cell", "classification": {"name": "Tumor", "color": [255, 0, 0]}}}]
    (tmp_path / "cells.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    (p,) = read_geojson(tmp_path / "cells.geojson")
    np.testing.assert_array_equal(p.nucleus, np.array(nucleus[:-1], float))
    write_geojson([p], tmp_path / "again.geojson")
    again = json.loads((tmp_path / "again.geojson").read_text())["features"][0]
    assert again["nucleusGeometry"] == {"type": "Polygon", "coordinates": [nucleus]}
    assert conversion_losses([p], tmp_path / "x.geojson") == {}
    assert conversion_losses([p], tmp_path / "x.zip") == {"nucleus outlines": 1}
    with pytest.warns(UserWarning, match=r"x\.xml: \.xml files cannot hold nucleus outlines \(1 polygon\)"):
        convert(tmp_path / "cells.geojson", tmp_path / "x.xml")
    assert main(["annotations", "convert", str(tmp_path / "cells.geojson"), str(tmp_path / "c.zip")]) == 0
    said = capsys.readouterr()  # the note on stderr, with the other notes: stdout is the result
    assert "note: .zip files cannot hold nucleus outlines (1 polygon): not written" in said.err
    assert "note" not in said.out


def test_what_each_reader_leaves_out_is_counted(tmp_path, capsys):
    """Only GeoJSON's points and lines were reported; ImageJ lines and points and Aperio rulers and arrows
    vanished without a word."""
    from histoflow.cli import main

    pts = np.array([[10, 10], [50, 12], [30, 40]], np.float32)
    rois = []
    for kind in (roifile.ROI_TYPE.LINE, roifile.ROI_TYPE.POINT, roifile.ROI_TYPE.POINT, roifile.ROI_TYPE.POLYGON):
        r = roifile.ImagejRoi.frompoints(pts)
        r.roitype = kind
        rois.append(r)
    roifile.roiwrite(tmp_path / "set.zip", rois, mode="w")
    assert skipped_features(tmp_path / "set.zip") == {"line": 1, "point": 2}
    (tmp_path / "a.xml").write_text(
        '<Annotations><Annotation Id="1" Name="t" LineColor="255"><Regions>'
        '<Region Id="1" Type="4"><Vertices><Vertex X="0" Y="0"/><Vertex X="9" Y="9"/></Vertices></Region>'
        '<Region Id="2" Type="0"><Vertices><Vertex X="0" Y="0"/><Vertex X="9" Y="0"/><Vertex X="9" Y="9"/>'
        '</Vertices></Region></Regions></Annotation></Annotations>')
    assert skipped_features(tmp_path / "a.xml") == {"ruler": 1}
    assert read_annotations(tmp_path / "a.xml")[0].color == (255, 0, 0)  # ImageScope's 255 is red
    assert main(["annotations", "convert", str(tmp_path / "set.zip"), str(tmp_path / "o.geojson")]) == 0
    assert "1 polygons from" in (out := capsys.readouterr().out) and "skipped 1 line ROI(s), 2 point ROI(s)" in out


def test_monuseg_regions_keep_their_measurements_through_xml(tmp_path):
    src = data_path("monuseg_train", "TCGA-21-5784-01Z-00-DX1.xml")
    polys = read_annotations(src)
    convert(src, tmp_path / "back.xml")
    back = read_annotations(tmp_path / "back.xml")
    assert len(back) == len(polys) == 398
    assert [p.measurements for p in back] == [p.measurements for p in polys]
    assert polys[0].measurements.keys() >= {"area", "length"}


def test_geojson_read_feature_by_feature_and_whole_agree(tmp_path):
    """Large files are read feature by feature (ijson); files only Python's parser takes (QuPath writes NaN
    measurements as a bare NaN, some files start with a byte-order mark) are read whole, with the same result."""
    from histoflow.annotations import geojson

    feats = [{"type": "Feature", "id": f"f{i}", "properties": {"name": f"n{i}", "measurements": {"a": i + 0.5}},
              "geometry": {"type": "Polygon", "coordinates": [(SQ + 11 * i).tolist() + [[11 * i, 11 * i]]]}}
             for i in range(5)]
    text = json.dumps({"type": "FeatureCollection", "features": feats})
    (tmp_path / "plain.geojson").write_text(text)
    (tmp_path / "bom.geojson").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "nan.geojson").write_text(text.replace('"a": 2.5', '"a": NaN'))
    (tmp_path / "list.geojson").write_text(json.dumps(feats))
    streamed = list(geojson._stream_features(tmp_path / "plain.geojson"))
    assert streamed == feats and list(geojson._stream_features(tmp_path / "list.geojson")) == feats
    with pytest.raises(geojson._NotStreamable):
        list(geojson._stream_features(tmp_path / "nan.geojson"))
    ref = [(p.name, p.measurements, p.exterior.tolist()) for p in read_geojson(tmp_path / "plain.geojson")]
    assert len(ref) == 5
    for name in ("bom", "list"):
        assert [(p.name, p.measurements, p.exterior.tolist()) for p in read_geojson(tmp_path / f"{name}.geojson")] == ref
    nan = read_geojson(tmp_path / "nan.geojson")
    assert np.isnan(nan[2].measurements["a"]) and [p.name for p in nan] == [r[0] for r in ref]


def test_pixel_centres_on_an_outline_are_counted_once():
    """At downsample 2, 4 ... pixel centres lie on whole level-0 coordinates, where outlines drawn on pixel
    edges run; skimage counts such centres in on every side, so a 10 x 10 square took 36 pixels of 4 (144
    level-0 pixels) and two squares sharing an edge both took the column on it. Half-open now, as pixels are."""
    import numpy as np

    from histoflow.annotations import Polygon, polygonize, rasterize
    from histoflow.datasets.monuseg import load_monuseg
    from datafiles import data_path

    sq = Polygon([[1, 1], [11, 1], [11, 11], [1, 11]])
    assert rasterize([sq], (8, 8), downsample=2).sum() * 4 == 100
    pair = rasterize([Polygon([[0, 0], [4, 0], [4, 4], [0, 4]]), Polygon([[4, 0], [8, 0], [8, 4], [4, 4]])], (2, 4),
                     downsample=2)
    assert pair.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2]]
    # a label image outlined and painted again at 2x and 4x coarser: its area, not 13 % more
    lab = load_monuseg(data_path("monuseg_train"), "TCGA-XS-A8TJ-01Z-00-DX1")[0]["instances"][:400, :400]
    polys = polygonize(lab)
    for d in (2, 4):
        coarse = rasterize(polys, (400 // d, 400 // d), downsample=d)
        assert abs((coarse > 0).sum() * d * d / (lab > 0).sum() - 1) < 0.03


def test_imagej_spline_fits_subpixel_ovals_and_colours(tmp_path):
    """A polygon saved with "Fit Spline" was read as its control points (a diamond where ImageJ fills a round
    shape); an oval with sub-pixel bounds was read from its integer ones; the ImageJ writer dropped the colour
    of unclassified objects (XML -> ZIP -> XML merged a red and a green unnamed layer)."""
    import numpy as np
    import roifile

    from histoflow.annotations import Polygon, read_imagej_rois, write_imagej_rois

    r = roifile.ImagejRoi.frompoints(np.array([[50, 10], [90, 50], [50, 90], [10, 50]], np.int32))
    r.roitype = roifile.ROI_TYPE.POLYGON
    r.options |= roifile.ROI_OPTIONS.SPLINE_FIT
    r.tofile(tmp_path / "spline.roi")
    (p,) = read_imagej_rois(tmp_path / "spline.roi")
    assert len(p.exterior) >= 100 and 4600 < p.area < 5100  # round (a circle of radius 40: 5027), not 3200
    assert np.allclose(p.bounds, (10, 10, 90, 90), atol=1.0)
    o = roifile.ImagejRoi()
    o.roitype, o.version = roifile.ROI_TYPE.OVAL, 228
    o.options |= roifile.ROI_OPTIONS.SUB_PIXEL_RESOLUTION
    o.xd, o.yd, o.widthd, o.heightd = 10.6, 20.7, 30.4, 16.2
    o.left, o.top, o.right, o.bottom = 10, 20, 42, 38
    o.tofile(tmp_path / "oval.roi")
    (q,) = read_imagej_rois(tmp_path / "oval.roi")
    assert np.allclose(q.bounds, (10.6, 20.7, 41.0, 36.9), atol=0.05)
    assert abs(q.area - np.pi * 15.2 * 8.1) < 0.01 * q.area
    sq = [[0, 0], [10, 0], [10, 10], [0, 10]]
    write_imagej_rois([Polygon(sq, name="red", color=(255, 0, 0)), Polygon(sq, name="green", color=(0, 255, 0)),
                       Polygon(sq, name="plain")], tmp_path / "c.zip")
    assert [x.color for x in read_imagej_rois(tmp_path / "c.zip")] == [(255, 0, 0), (0, 255, 0), None]
    # colours that are not three numbers 0..255 are left out, as the GeoJSON writer does (no ValueError)
    write_imagej_rois([Polygon(sq, color=(255, 0, 0, 128)), Polygon(sq, color="#ff0000"),
                       Polygon(sq, color=(300, 0, 0))], tmp_path / "odd.zip")
    assert [x.color for x in read_imagej_rois(tmp_path / "odd.zip")] == [(255, 0, 0), None, None]


def test_outlines_of_several_label_images_do_not_merge_and_xml_keeps_the_order(tmp_path):
    """polygonize grouped the pieces of object 1 as "1" in every call: tiles each numbering their objects 1..n
    merged into one object. write_aperio_xml wrote one layer per class, so A(T), B(S), C(T) came back A, C, B
    and C no longer lay under B where they overlap."""
    import numpy as np

    from histoflow.annotations import Polygon, polygonize, rasterize, read_aperio_xml, write_aperio_xml

    t = np.zeros((10, 10), np.int32)
    t[1:3, 1:3] = 1
    t[5:7, 5:7] = 1
    ps = polygonize(t, origin=(0, 0)) + polygonize(t, origin=(100, 0))
    lab = rasterize(ps, (10, 110))
    assert lab.max() == 2 and len(np.unique(lab[:, :10])) == len(np.unique(lab[:, 100:])) == 2
    assert np.unique(lab[:, :10])[1] != np.unique(lab[:, 100:])[1]

    def sq(x, s):
        return [[x, 0], [x + s, 0], [x + s, s], [x, s]]

    ps = [Polygon(sq(0, 10), name="a", classification="T"), Polygon(sq(5, 10), name="b", classification="S"),
          Polygon(sq(10, 10), name="c", classification="T")]
    write_aperio_xml(ps, tmp_path / "order.xml")
    back = read_aperio_xml(tmp_path / "order.xml")
    assert [p.name for p in back] == ["a", "b", "c"]
    classes = {"T": 1, "S": 2}
    paint = [rasterize(q, (1, 20), values=[classes[p.classification] for p in q])[0].tolist() for q in (ps, back)]
    assert paint[0] == paint[1] == [1] * 5 + [2] * 5 + [1] * 10
    # order only matters where polygons overlap: interleaved classes that do not overlap stay one layer per class
    cells = [Polygon(sq(10 * i, 8), name=f"c{i}", classification="AB"[i % 2]) for i in range(200)]
    write_aperio_xml(cells, tmp_path / "cells.xml")
    assert (tmp_path / "cells.xml").read_text().count("<Annotation ") == 2
    # an exclusion still cuts every region of its class, before and after a polygon of another class
    ps = [Polygon(sq(0, 100), name="t1", classification="T"), Polygon([[200, 0], [300, 0], [300, 100], [200, 100]],
          name="s1", classification="S"), Polygon([[400, 0], [500, 0], [500, 100], [400, 100]], name="t2",
          classification="T"), Polygon([[50, 0], [450, 0], [450, 50], [50, 50]], name="x", classification="T",
          measurements={"negative": 1})]
    # the second: a stroma region under a later tumour region, whose order one layer per class would swap
    box = [[420, 60], [480, 60], [480, 90], [420, 90]]
    for extra, layers in (([], 2), ([Polygon(box, name="o", classification="S"),
                                    Polygon(box, name="late", classification="T")], 5)):
        write_aperio_xml(ps + extra, tmp_path / "excl.xml")
        assert (tmp_path / "excl.xml").read_text().count("<Annotation ") == layers
        back = read_aperio_xml(tmp_path / "excl.xml")
        areas = {p.name: p.area for p in back}
        assert areas["t1"] == areas["t2"] == 7500 and areas["s1"] == 10000
        assert [p.name for p in back] == [p.name for p in ps[:3] + extra] if extra else True

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
    assert "note: .zip files cannot hold nucleus outlines (1 polygon): not written" in capsys.readouterr().out


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

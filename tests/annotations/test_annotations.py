"""Annotations on real files: MoNuSeg's Aperio XML, polygon <-> mask, QuPath GeoJSON."""
import json
import os
import re

import numpy as np
import pytest
from datafiles import data_path

from histoflow.annotations import (AnnotationError, Polygon, polygonize, rasterize, read_aperio_xml, read_geojson,
                                   write_geojson)
from histoflow.datasets import DatasetError, load_monuseg, monuseg_ids

MONUSEG = data_path("monuseg_train")
ID = "TCGA-21-5784-01Z-00-DX1"


def _regions_with_3_vertices(path):
    text = open(path).read()
    regions = re.findall(r"<Region .*?</Region>", text, flags=re.S)
    return sum(1 for r in regions if len(re.findall(r"<Vertex ", r)) >= 3)


def test_aperio_xml_reads_every_region():
    path = f"{MONUSEG}/{ID}.xml"
    polys = read_aperio_xml(path)
    assert len(polys) == _regions_with_3_vertices(path) == 398
    assert all(p.exterior.shape[1] == 2 and len(p.exterior) >= 3 for p in polys)
    # vertices are image pixels of a 1000 x 1000 image
    allxy = np.concatenate([p.exterior for p in polys])
    assert allxy.min() >= -1 and allxy.max() <= 1001
    assert all("area" in p.measurements for p in polys)


def test_aperio_xml_skips_degenerate_regions():
    # some MoNuSeg files have regions with fewer than 3 vertices: they are skipped, not errors
    counts = []
    for ident in monuseg_ids(MONUSEG):
        path = f"{MONUSEG}/{ident}.xml"
        counts.append((len(read_aperio_xml(path, negatives="keep")), _regions_with_3_vertices(path),
                       len(re.findall(r"<Region ", open(path).read()))))
    assert all(a == b for a, b, _ in counts)
    assert any(b < c for _, b, c in counts)  # the data really has such regions


def test_rasterize_areas_match_polygons():
    polys = read_aperio_xml(f"{MONUSEG}/{ID}.xml")
    mask = rasterize(polys, (1000, 1000))
    assert mask.dtype == np.int32 and mask.max() == len(polys)
    pix = np.bincount(mask.ravel(), minlength=len(polys) + 1)[1:]
    area = np.array([p.area for p in polys])
    # pixel-centre rasterisation of a polygon covers its area up to boundary pixels (overlaps taken
    # by later nuclei aside): the totals agree within 3 %
    assert abs(pix.sum() - area.sum()) / area.sum() < 0.03


def test_rasterize_downsample_and_origin():
    sq = Polygon([[100, 200], [140, 200], [140, 240], [100, 240]])
    full = rasterize([sq], (300, 300))
    assert full.sum() == 40 * 40 and full[200:240, 100:140].all()
    half = rasterize([sq], (150, 150), downsample=2)
    assert half.sum() == 20 * 20 and half[100:120, 50:70].all()
    shifted = rasterize([sq], (100, 100), origin=(80, 180))
    assert shifted[20:60, 20:60].all() and shifted.sum() == 1600
    cls = rasterize([sq], (300, 300), values=[7], dtype=np.uint8)
    assert cls.max() == 7 and cls.dtype == np.uint8


def test_polygonize_round_trip_on_real_mask():
    mask = load_monuseg(MONUSEG, [ID])[0]["instances"]
    polys = polygonize(mask)
    ids = [int(p.name) for p in polys]
    assert sorted(set(ids)) == sorted(set(np.unique(mask)[1:].tolist()))
    back = rasterize(polys, mask.shape, values=ids)
    assert (back == mask).mean() > 0.999
    area = np.bincount(mask.ravel())
    for p in polys[:50]:
        assert abs(p.area - area[int(p.name)]) <= 0.02 * area[int(p.name)] + 1


def test_polygonize_walks_only_the_ids_of_its_image(monkeypatch):
    """A tile's window of slide-wide ids (segment-nuclei --geojson numbers nuclei across the slide) made
    find_objects walk every id from 1 (9 ms a tile at ids from 10,001, 176 ms from 1,000,001: quadratic in the
    nuclei of a slide). The same outlines, named by their ids, from every numbering."""
    from scipy import ndimage as ndi

    mask = load_monuseg(MONUSEG, [ID])[0]["instances"][:300, :300]
    base = {p.name: p.exterior.tolist() for p in polygonize(mask)}
    walked = []
    real = ndi.find_objects
    monkeypatch.setattr(ndi, "find_objects", lambda a, *k: walked.append(int(a.max())) or real(a, *k))
    n = len(np.unique(mask)) - 1
    for offset, dtype in ((1_000_000, np.int32), (2**40, np.int64), (2**63, np.uint64)):
        shifted = np.where(mask > 0, mask.astype(np.uint64) + np.uint64(offset), 0).astype(dtype)
        got = {str(int(k) - offset): v.exterior.tolist() for v in polygonize(shifted) for k in [int(v.name)]}
        assert got == base and walked[-1] == mask.max() - mask[mask > 0].min() + 1, offset
    hashed = np.where(mask > 0, (mask.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) % np.uint64(2**62), 0)
    assert len(polygonize(hashed)) == len(base) and walked[-1] == n  # ids spread wider than the pixels: 1..n


def test_polygonize_keeps_holes():
    m = np.zeros((50, 50), np.int32)
    m[10:40, 10:40] = 3
    m[20:30, 20:30] = 0
    (p,) = polygonize(m, downsample=2, origin=(100, 0))
    assert p.name == "3" and len(p.holes) == 1
    assert p.area == pytest.approx(4 * (900 - 100))
    assert p.bounds == (120.0, 20.0, 180.0, 80.0)


def test_geojson_round_trip(tmp_path):
    polys = [Polygon([[0, 0], [10, 0], [10, 10], [0, 10]], holes=[[[2, 2], [4, 2], [4, 4], [2, 4]]], name="a",
                     classification="Tumor", measurements={"area": 96.0}),
             Polygon([[20, 20], [30, 20], [25, 30]], name="b", classification="Stroma")]
    out = write_geojson(polys, tmp_path / "x.geojson", object_type="annotation")
    doc = json.load(open(out))
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    f0 = doc["features"][0]
    assert f0["properties"]["objectType"] == "annotation"
    assert f0["properties"]["classification"]["name"] == "Tumor"
    assert f0["geometry"]["coordinates"][0][0] == f0["geometry"]["coordinates"][0][-1]  # closed rings
    back = read_geojson(out)
    assert [p.classification for p in back] == ["Tumor", "Stroma"]
    assert back[0].area == pytest.approx(96.0) and back[0].measurements == {"area": 96.0}
    np.testing.assert_allclose(back[1].exterior, polys[1].exterior)


def test_geojson_reads_qupath_forms(tmp_path):
    # a bare list of features, MultiPolygon, measurements as a list of name/value (older QuPath)
    feats = [{"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
        [[[0, 0], [5, 0], [5, 5], [0, 0]]], [[[10, 10], [15, 10], [15, 15], [10, 10]]]]},
        "properties": {"classification": {"name": "Immune cells", "colorRGB": -1},
                       "measurements": [{"name": "Nucleus: Area", "value": 12.5}]}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}}]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(feats))
    polys = read_geojson(path)
    assert len(polys) == 2 and {p.classification for p in polys} == {"Immune cells"}
    assert polys[0].measurements == {"Nucleus: Area": 12.5}


def test_annotation_errors(tmp_path):
    with pytest.raises(AnnotationError, match="no such annotation file"):
        read_aperio_xml(tmp_path / "none.xml")
    bad = tmp_path / "bad.xml"
    bad.write_text("<Annotations><Annotation>")
    with pytest.raises(AnnotationError, match="bad.xml: not a readable XML"):
        read_aperio_xml(bad)
    other = tmp_path / "other.xml"
    other.write_text("<svg></svg>")
    with pytest.raises(AnnotationError, match="expected <Annotations>"):
        read_aperio_xml(other)
    j = tmp_path / "bad.geojson"
    j.write_text("{not json")
    with pytest.raises(AnnotationError, match="bad.geojson: not a JSON file"):
        read_geojson(j)


def test_monuseg_loader(tmp_path):
    ids = monuseg_ids(MONUSEG)
    assert len(ids) == 20 and ID in ids
    (s,) = load_monuseg(MONUSEG, [ID])
    assert s["image"].shape == (1000, 1000, 3) and s["image"].dtype == np.uint8
    assert s["instances"].max() == 398 and 0.2 < s["mpp"] < 0.3
    with pytest.raises(DatasetError, match="put the MoNuSeg images"):
        monuseg_ids(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no image with a matching .xml"):
        monuseg_ids(tmp_path)
    with pytest.raises(DatasetError, match="nope"):
        load_monuseg(MONUSEG, ["nope"])
    with pytest.raises(DatasetError, match="monuseg_train.*mpp must be a positive"):
        load_monuseg(MONUSEG, [ID], mpp=0)
    with pytest.raises(DatasetError, match="mpp must be a positive"):
        load_monuseg(MONUSEG, [ID], mpp="abc")
    assert load_monuseg(MONUSEG, ID)[0]["id"] == ID  # one id as a str
    # a folder of your own: upper-case extensions are found; broken files name themselves and the folder
    import shutil

    shutil.copy(f"{MONUSEG}/{ID}.xml", tmp_path / "A.xml")
    (tmp_path / "A.PNG").write_bytes(open(f"{MONUSEG}/{ID}.png", "rb").read())
    assert load_monuseg(tmp_path, ["A"])[0]["instances"].max() == 398
    (tmp_path / "A.PNG").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"A.PNG: not a readable image .*put the MoNuSeg images"):
        load_monuseg(tmp_path)
    (tmp_path / "A.PNG").write_bytes(open(f"{MONUSEG}/{ID}.png", "rb").read())
    (tmp_path / "A.xml").write_text("<Annotations><Annotation>")
    with pytest.raises(DatasetError, match=r"A.xml: not a readable XML .*put the MoNuSeg images"):
        load_monuseg(tmp_path)


def test_imagej_and_aperio_round_trips_and_convert(tmp_path):
    from histoflow.annotations import convert, read_annotations, read_imagej_rois, write_aperio_xml, \
        write_imagej_rois

    polys = read_aperio_xml(f"{MONUSEG}/{ID}.xml")[:30]
    zip_path = write_imagej_rois(polys, tmp_path / "RoiSet.zip")
    back = read_imagej_rois(zip_path)
    assert [p.name for p in back] == [p.name for p in polys]
    for a, b in zip(polys, back):
        np.testing.assert_allclose(a.exterior, b.exterior, atol=1e-3)  # ImageJ keeps float32 sub-pixels
    # Aperio XML written and read back, classes kept
    for p in polys:
        p.classification = "Nucleus"
    xml = write_aperio_xml(polys, tmp_path / "a.xml", mpp=0.25)
    again = read_aperio_xml(xml)
    assert {p.classification for p in again} == {"Nucleus"} and len(again) == 30
    np.testing.assert_allclose(again[7].exterior, polys[7].exterior, atol=1e-3)
    # a chain of conversions keeps every polygon and its area
    assert convert(zip_path, tmp_path / "b.geojson") == 30
    assert convert(tmp_path / "b.geojson", tmp_path / "c.xml") == 30
    final = read_annotations(tmp_path / "c.xml")
    np.testing.assert_allclose([p.area for p in final], [p.area for p in polys], rtol=1e-4)
    with pytest.raises(AnnotationError, match="cannot write .txt"):
        convert(zip_path, tmp_path / "x.txt")
    bad = tmp_path / "bad.roi"
    bad.write_bytes(b"not a roi")
    with pytest.raises(AnnotationError, match="bad.roi: not an ImageJ ROI"):
        read_imagej_rois(bad)


def test_rasterize_over_a_slide_at_a_level_or_mpp():
    from datafiles import SVS

    from histoflow.annotations import rasterize_slide

    box = Polygon([[1000, 1000], [1400, 1000], [1400, 1200], [1000, 1200]], classification="Tumor")
    m0, ds0 = rasterize_slide([box], SVS, level=0)
    assert ds0 == 1 and m0.shape == (2967, 2220) and m0.sum() == 400 * 200
    m, ds = rasterize_slide([box], SVS, mpp=2.0)            # the slide is 0.499 µm/px: ~4x coarser
    assert ds == pytest.approx(2.0 / 0.499, rel=1e-3)
    assert m.shape == (round(2967 / ds), round(2220 / ds))
    assert abs(m.sum() * ds * ds - 400 * 200) / (400 * 200) < 0.05
    # a mask larger than the reader's bound is refused before it is made (level 0 of a 1.7-gigapixel slide took
    # 6 GiB and ended in numpy's MemoryError)
    from histoflow import RegionTooLargeError, open_slide

    with open_slide(SVS, max_region_bytes=2967 * 2220 * 4 - 1) as r:
        with pytest.raises(RegionTooLargeError, match=r"CMU-1-Small-Region.svs: a 2220 x 2967 mask \(downsample 1\) "
                                                      r"would take 25.1 MiB, above the bound .* coarser level= or mpp="):
            rasterize_slide([box], r)
        assert rasterize_slide([box], r, dtype=np.uint8)[0].sum() == 400 * 200


def test_holes_and_classes_survive_every_format(tmp_path):
    from histoflow.annotations import convert, rasterize, read_annotations

    donut = Polygon([[10, 10], [60, 10], [60, 60], [10, 60]], holes=[[[20, 20], [40, 20], [40, 40], [20, 40]]],
                    name="d", classification="Tumor")
    plain = Polygon([[70, 70], [90, 70], [90, 90], [70, 90]], name="p")  # no class
    src = write_geojson([donut, plain], tmp_path / "a.geojson")
    want = rasterize([donut, plain], (100, 100))
    assert want[30, 30] == 0 and want[15, 15] == 1
    for ext in (".xml", ".zip", ".geojson"):
        out = tmp_path / f"b{ext}"
        convert(src, out)
        back = read_annotations(out)
        assert len(back) == 2, ext
        assert np.array_equal(rasterize(back, (100, 100)) > 0, want > 0), ext  # the hole is still a hole
        if ext != ".zip":  # ImageJ ROIs carry no class
            assert [p.classification for p in back] == ["Tumor", None], ext


def test_geojson_measurements_without_numbers_are_left_out(tmp_path):
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 0]]]},
              "properties": {"measurements": [{"name": "a", "value": None}, {"name": "b", "value": 2}]}}]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(feats))
    (p,) = read_geojson(path)
    assert p.measurements == {"b": 2}
    write_geojson([p], tmp_path / "r.geojson")
    assert read_geojson(tmp_path / "r.geojson")[0].measurements == {"b": 2.0}


def test_unwritable_output_names_the_output(tmp_path):
    from histoflow import OutputError
    from histoflow.annotations import write_aperio_xml
    from histoflow.utils import save_png

    p = Polygon([[0, 0], [5, 0], [5, 5]])
    for fn, name in ((write_geojson, "x.geojson"), (write_aperio_xml, "x.xml")):
        with pytest.raises(OutputError, match=f"{tmp_path}/missing/{name}: cannot write it"):
            fn([p], tmp_path / "missing" / name)
    with pytest.raises(OutputError, match=r"missing/x.png: cannot write it \(No such file or directory\)"):
        save_png(tmp_path / "missing" / "x.png", np.zeros((4, 4, 3), np.uint8))
    assert os.listdir(tmp_path) == []


def _square(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def test_holes_leave_other_polygons_alone():
    """A polygon's hole is cut from that polygon only: an island inside a lumen, drawn before the ring
    around it, keeps its pixels, and a label image with an object inside another's hole round-trips."""
    island = Polygon(_square(40, 40, 60, 60), name="island")
    donut = Polygon(_square(0, 0, 100, 100), [_square(30, 30, 70, 70)], name="donut")
    m = rasterize([island, donut], (100, 100))
    assert (m == 1).sum() == 400 and (m == 0).sum() == 40 * 40 - 400 and (m == 2).sum() == 100 * 100 - 1600
    lab = np.zeros((7, 7), np.int32)
    lab[1:6, 1:6] = 2
    lab[3, 3] = 1
    p = polygonize(lab)
    assert np.array_equal(rasterize(p, lab.shape, values=[int(q.name) for q in p]), lab)


def test_aperio_negative_regions_go_to_the_polygon_holding_them_whole(tmp_path):
    from histoflow.annotations import write_aperio_xml

    a = Polygon(_square(0, 0, 100, 100), [_square(30, 30, 70, 70)], name="A")
    b = Polygon(_square(40, 40, 60, 60), name="B")  # an island in A's lumen: holds the lumen's centre
    back = read_aperio_xml(write_aperio_xml([a, b], tmp_path / "x.xml"))
    by = {p.name: p for p in back}
    assert len(by["A"].holes) == 1 and not by["B"].holes
    m = rasterize(back, (100, 100))
    assert (m == 2).sum() == 400 and (m == 0).sum() == 1200


def test_monuseg_negative_regions_are_nuclei():
    """TCGA-XS-A8TJ flags 20 of its 1,309 regions NegativeROA, none inside another: nuclei (darker than
    the rest), not exclusions; the loader keeps all 1,309."""
    s = load_monuseg(data_path("monuseg_train"), ["TCGA-XS-A8TJ-01Z-00-DX1"])[0]
    regions = read_aperio_xml(data_path("monuseg_train", "TCGA-XS-A8TJ-01Z-00-DX1.xml"), negatives="keep")
    neg = [p for p in regions if p.measurements.get("negative")]
    assert len(regions) == 1309 and len(neg) == 20
    # read as ImageScope means them (exclusions), they cut nothing out of the other nuclei and go: said
    with pytest.warns(UserWarning, match=r"20 region\(s\) flagged as exclusions .* negatives=\"keep\""):
        assert len(read_aperio_xml(data_path("monuseg_train", "TCGA-XS-A8TJ-01Z-00-DX1.xml"))) == 1289
    assert s["instances"].max() == 1309
    negmask = rasterize(neg, s["image"].shape[:2]) > 0
    assert (s["instances"][negmask] > 0).all()


def test_imagej_composite_of_separate_areas_and_geojson_round_trip(tmp_path):
    """An ImageJ OR of two separate areas is two polygons (not an outline and a hole); a QuPath GeoJSON
    keeps its MultiPolygons, object types and class colours through read + write; malformed features are
    AnnotationErrors."""
    import roifile

    from histoflow.annotations import read_imagej_rois, write_geojson

    # a shape ROI as ImageJ writes Edit > Selection > Combine of two squares: moveto (0), lineto (1), close (4)
    path = [0, 10, 10, 1, 30, 10, 1, 30, 30, 1, 10, 30, 4, 0, 50, 50, 1, 70, 50, 1, 70, 70, 1, 50, 70, 4]
    roi = roifile.ImagejRoi()
    roi.roitype, roi.version, roi.name = roifile.ROI_TYPE.RECT, 228, "two"
    roi.multi_coordinates = np.asarray(path, np.float32)
    roi.shape_roi_size = len(path)
    roi.left, roi.top, roi.right, roi.bottom = 10, 10, 70, 70
    roi.tofile(str(tmp_path / "two.roi"))
    ps = read_imagej_rois(tmp_path / "two.roi")
    assert len(ps) == 2 and not any(p.holes for p in ps) and (rasterize(ps, (80, 80)) > 0).sum() == 800
    from histoflow.annotations.imagej import _rings_to_polygons

    polys = _rings_to_polygons([_square(0, 0, 20, 20), _square(40, 0, 60, 20), _square(5, 5, 15, 15),
                                _square(8, 8, 12, 12)], "r")
    assert len(polys) == 3 and [len(p.holes) for p in polys] == [1, 0, 0]  # the innermost ring: an island
    area = rasterize(polys, (30, 70)) > 0
    assert area.sum() == 400 + 400 - 100 + 16
    src = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "u1", "geometry": {"type": "Polygon", "coordinates": [_square(0, 0, 10, 10).tolist()]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]}}},
        {"type": "Feature", "id": "u2", "geometry": {"type": "MultiPolygon", "coordinates": [
            [_square(20, 0, 30, 10).tolist()], [_square(40, 0, 50, 10).tolist()]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Stroma", "color": [0, 200, 0]}}}]}
    (tmp_path / "in.geojson").write_text(json.dumps(src))
    back = read_geojson(tmp_path / "in.geojson")
    assert len(back) == 3 and back[1].group == back[2].group is not None
    write_geojson(back, tmp_path / "out.geojson")
    feats = json.loads((tmp_path / "out.geojson").read_text())["features"]
    assert [f["geometry"]["type"] for f in feats] == ["Polygon", "MultiPolygon"]
    assert [f["properties"]["objectType"] for f in feats] == ["annotation", "annotation"]
    assert [f["properties"]["classification"]["color"] for f in feats] == [[200, 0, 0], [0, 200, 0]]
    # two files read together: their MultiPolygons stay two objects (ids are not reused across files)
    nameless = {"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": src["features"][1]["geometry"],
                                                           "properties": {}}]}
    for k in (1, 2):
        (tmp_path / f"n{k}.geojson").write_text(json.dumps(nameless))
    both = read_geojson(tmp_path / "n1.geojson") + read_geojson(tmp_path / "n2.geojson")
    write_geojson(both, tmp_path / "both.geojson", colors={"Stroma": [1, 2, 3]})  # a list colour is fine
    assert len(json.loads((tmp_path / "both.geojson").read_text())["features"]) == 2
    with pytest.raises(AnnotationError, match="a colour is three numbers 0..255"):
        write_geojson(back, tmp_path / "x.geojson", colors={"Tumor": [float("nan"), 0, 0]})
    for bad in ({"type": "Feature", "geometry": "nope", "properties": {}},
                {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": []}, "properties": [1]}):
        (tmp_path / "bad.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [bad]}))
        with pytest.raises(AnnotationError, match="feature 0: its geometry and properties must be objects"):
            read_geojson(tmp_path / "bad.geojson")

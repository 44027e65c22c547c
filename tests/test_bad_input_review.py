"""Bad input across the public surface, as a review (session 26) found it: outputs that replaced their own
input, parameters that found nothing without a word, and errors that were not the project's."""
import json
import os
import shutil

import numpy as np
import pytest
from datafiles import SVS, data_path

from histoflow import OutputError, ParameterError, RegionError, SlideData, read_h5path


def test_outputs_that_are_their_own_input_are_refused(tmp_path):
    """SlideData.write(slide.path) replaced the image with an h5path; annotations.convert(f, f) rewrote the file
    without the points and lines its reader leaves out."""
    from histoflow.annotations import AnnotationError, convert

    img = tmp_path / "img.jpg"
    shutil.copy(data_path("he_patches", "stardist_histo.jpg"), img)
    before = img.read_bytes()
    s = SlideData(img)
    with pytest.raises(OutputError, match=r"img.jpg: the output is the slide being read"):
        s.write(img, tiles=list(s.generate_tiles(128))[:1])
    assert img.read_bytes() == before
    gj = tmp_path / "mixed.geojson"
    feats = [{"type": "Feature", "properties": {}, "geometry": g} for g in (
        {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0]]]},
        {"type": "Point", "coordinates": [5, 5]},
        {"type": "LineString", "coordinates": [[0, 0], [3, 3]]})]
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    text = gj.read_text()
    with pytest.raises(AnnotationError, match=r"mixed.geojson: the output is the file being converted"):
        convert(gj, gj)
    assert gj.read_text() == text


def test_nucleus_segmentation_refuses_thresholds_that_find_nothing():
    """fg_threshold NaN or 7, or min_size inf, found no nucleus on any tile and the run succeeded; a string failed
    on every tile with numpy's error."""
    from histoflow.ml.transforms import NucleusSegmentation

    for kw in ({"fg_threshold": float("nan")}, {"fg_threshold": 7.0}, {"marker_threshold": -0.1},
               {"min_size": float("inf")}, {"fg_threshold": "abc"}, {"min_size": True}):
        name = next(iter(kw))
        with pytest.raises(ParameterError, match=rf"NucleusSegmentation: {name} must be a number in"):
            NucleusSegmentation(**kw)
    assert NucleusSegmentation(fg_threshold=0.4, min_size=10).fg_threshold == 0.4


def test_a_target_mpp_coarser_than_the_whole_slide_is_refused(tmp_path):
    """--mpp 1e6 built resampling weights of tile size x 2 million level pixels: the process was killed for
    memory (24 GB), and --mpp 1e20 ended in numpy's traceback."""
    with SlideData(SVS) as s:
        for mpp in (1e6, 1e20):
            with pytest.raises(RegionError, match=r"CMU-1-Small-Region.svs: target mpp .* makes one tile pixel "
                                                  r"larger than the whole slide"):
                s.grid(256, mpp=mpp)
        assert len(s.grid(256, mpp=1000)) == 1  # coarse, but a pixel still within the slide


def test_a_store_that_lost_its_images_is_not_an_empty_store(tmp_path):
    """A file whose /tiles/images was gone read as a valid store of 0 tiles (its coords still held 30 rows)."""
    import h5py

    from histoflow.errors import H5PathError
    from histoflow.store import H5PathWriter

    p = tmp_path / "s.h5path"
    with H5PathWriter(p) as w:
        for i in range(30):
            w.add_tile(np.zeros((8, 8, 3), np.uint8), (8 * i, 0))
    with h5py.File(p, "a") as f:
        del f["tiles/images"]
    with pytest.raises(H5PathError, match=r"s.h5path: inconsistent: /tiles holds .*'coords'.* but no 'images'"):
        read_h5path(p)


def test_augmentations_models_and_rule_tables_raise_their_own_errors(tmp_path):
    """float("abc") / int("a") errors from the augmentations' and models' parameters, NaN dropout accepted until
    the first training step, load("") and save(card="abc") in pathlib's and dict's words, and a rule table that
    is a folder as '[Errno 21] Is a directory'."""
    from histoflow.cells.rules import RuleError, RuleTable
    from histoflow.ml import models
    from histoflow.ml.augment import AugmentError, Blur, Brightness, GaussianNoise

    for make, match in ((lambda: Brightness(p="abc"), r"Brightness: probability p must be a number in \[0, 1\]"),
                        (lambda: Blur(max_sigma=None), r"Blur: max_sigma must be a finite number >= 0, got None"),
                        (lambda: GaussianNoise(sigma=[0.1]), r"GaussianNoise: sigma must be a finite number")):
        with pytest.raises(AugmentError, match=match):
            make()
    for kw, match in ((dict(name="unet", filters="abc"), r"UNet: filters must be a non-empty sequence"),
                      (dict(name="unet", filters=[float("nan")]), r"UNet: filters must be"),
                      (dict(name="mobilenet_v2", width_mult=float("nan")), r"MobileNetV2: width_mult"),
                      (dict(name="mobilenet_v2", dropout=float("nan")), r"MobileNetV2: dropout must be a number")):
        with pytest.raises(ParameterError, match=match):
            models.create(**kw)
    net = models.create("unet", filters=(4, 8))
    with pytest.raises(models.ModelError, match=r"load: path must name a saved model's weights file"):
        models.load("")
    with pytest.raises(ParameterError, match=r"save: card must be a dict of card entries, got str"):
        models.save(net, tmp_path / "m.pt", card="abc")
    assert not os.path.exists(tmp_path / "m.pt")
    (tmp_path / "rules.yaml").mkdir()
    with pytest.raises(RuleError, match=r"rules.yaml: is a folder, not a rule table"):
        RuleTable.from_yaml(tmp_path / "rules.yaml")


def test_small_argument_mistakes_are_named(tmp_path):
    """read_h5path(None) was a TypeError from os.fspath; write_annotations("abc") an AttributeError; a batch size
    of 0, -3 or 1.5 was quietly made 1."""
    from histoflow import PipelineError
    from histoflow.annotations import AnnotationError, write_annotations
    from histoflow.errors import H5PathError
    from histoflow.transforms import BoxBlur, Pipeline

    with pytest.raises(H5PathError, match=r"read_h5path: path must be a file name, got NoneType"):
        read_h5path(None)
    for bad in ("abc", [None]):
        with pytest.raises(AnnotationError, match=r"out.geojson: polygons must be"):
            write_annotations(bad, tmp_path / "out.geojson")
    for bad in (0, -3, 1.5, True):
        with pytest.raises(PipelineError, match=r"batch_size must be a whole number of tiles >= 1"):
            SlideData(SVS).run(Pipeline([BoxBlur(3)]), tmp_path / "o.h5path", executor="inprocess", batch_size=bad)
    assert list(tmp_path.iterdir()) == []

"""Pipeline checks, provenance and pipeline files (session 28 review)."""
import os
import sys
import textwrap

import numpy as np
import pytest
from datafiles import SVS

from histoflow.core.slide import SlideData
from histoflow.core.tile import Tile
from histoflow.errors import MaskError, PipelineError
from histoflow.store import read_h5path
from histoflow.transforms import Pipeline
from histoflow.transforms.base import Transform
from histoflow.transforms.library import (BoxBlur, ForegroundDetection, MorphClose, MorphOpen, NucleusDetectionHE,
                                          StainNormalizationHE, TissueDetectionHE)


def test_a_slide_mask_named_as_the_slides_own_is_refused_before_the_first_tile(tmp_path, dark_model):
    """SemanticSegmentation(mask_name="tissue") with tissue_filter ran every tile, then the store refused the
    second slide mask 'tissue' (and a resume failed the same way, for ever)."""
    from histoflow.ml.transforms import SemanticSegmentation

    out = tmp_path / "s.h5path"
    with SlideData(SVS) as s:
        for resume in (False, True):
            with pytest.raises(PipelineError, match=r"SemanticSegmentation would write slide masks named tissue.*"
                                                    r"already has 'tissue' \(made by tissue_filter\)"):
                s.run(SemanticSegmentation(dark_model, mask_name="tissue"), str(out), tile_size=512,
                      tissue_filter=0.25, executor="inprocess", progress=False, resume=resume)
    assert os.listdir(tmp_path) == []  # nothing begun


def test_two_segmentations_of_one_name_are_refused(dark_model):
    """The second one's slide masks replaced the first's without a word."""
    from histoflow.ml.transforms import SemanticSegmentation

    with pytest.raises(PipelineError, match="would both write the slide masks segmentation"):
        Pipeline([SemanticSegmentation(dark_model), SemanticSegmentation(dark_model)]).check("HE")
    Pipeline([SemanticSegmentation(dark_model), SemanticSegmentation(dark_model, mask_name="other")]).check("HE")


def test_morphology_refuses_instance_masks():
    """MorphOpen after NucleusDetectionHE turned 481 nuclei into one mask of 1 (the tile still counted 481)."""
    img = np.full((64, 64, 3), 230, np.uint8)
    for k, (y, x) in enumerate([(10, 10), (10, 40), (40, 20)]):
        img[y:y + 12, x:x + 12] = (60, 30, 120)
    tile = Tile(img, (0, 0))
    NucleusDetectionHE().apply(tile)
    assert tile.masks["nuclei"].max() >= 2
    for step in (MorphOpen("nuclei", 3), MorphClose("nuclei", 3), ForegroundDetection("nuclei", 10)):
        with pytest.raises(MaskError, match=r"mask 'nuclei' holds \d+ values .*instance or class labels"):
            step.apply(tile)
    tile.masks["m"] = (tile.masks["nuclei"] > 0).astype(np.uint8) * 255  # a 0/255 mask is a mask
    MorphOpen("m", 3).apply(tile)
    tile.masks["b"] = tile.masks["nuclei"] > 0
    MorphClose("b", 3).apply(tile)


def test_provenance_keeps_what_nested_pipelines_fitted(tmp_path):
    with SlideData(SVS) as s:
        out = s.run(Pipeline([Pipeline([TissueDetectionHE(), StainNormalizationHE()]), BoxBlur(3)]),
                    str(tmp_path / "n.h5path"), tile_size=1024, executor="inprocess", progress=False)
    with read_h5path(out) as h:
        fitted = h.provenance[-1]["fitted"]
    assert set(fitted) == {"0.0:TissueDetectionHE", "0.1:StainNormalizationHE"}  # before: {}
    assert "slide_threshold_" in fitted["0.0:TissueDetectionHE"]


def test_provenance_names_the_module_of_a_custom_transform(tmp_path, monkeypatch):
    (tmp_path / "review5_steps.py").write_text(textwrap.dedent("""
        from histoflow.transforms import Transform

        class Review5Darkness(Transform):
            labels_out = ("darkness",)
            masks_in = ("tissue")  # the comma forgotten: one name, not six letters

            def apply(self, tile):
                tile.labels["darkness"] = float(255 - tile.image.mean())
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import review5_steps

    step = review5_steps.Review5Darkness()
    assert step.masks_in == ("tissue",)
    pipe = Pipeline([TissueDetectionHE(), step])
    pipe.check("HE")  # before: "needs mask 't'"
    doc = pipe.to_document()
    assert doc["modules"] == ["review5_steps"]
    assert "modules" not in Pipeline([TissueDetectionHE()]).to_document()
    with SlideData(SVS) as s:
        out = s.run(pipe, str(tmp_path / "c.h5path"), tile_size=1024, executor="inprocess", progress=False)
    with read_h5path(out) as h:
        recorded = h.provenance[-1]["pipeline"]
    assert recorded["modules"] == ["review5_steps"]
    from histoflow.utils import yaml_dump

    assert Pipeline.from_yaml(yaml_dump(recorded)) == pipe
    text = yaml_dump(dict(recorded, steps=[{"Review5Missing": {}}]))
    with pytest.raises(PipelineError, match="unknown transform 'Review5Missing'.*custom transforms come from "
                                            "review5_steps"):
        Pipeline.from_yaml(text)
    sys.modules.pop("review5_steps", None)


def test_pipeline_files_refuse_what_they_would_not_run():
    """Keys beside the steps (tile_size: 512) were dropped without a word; YAML 1.1 read kernel_size: 017 as 15
    and 1:30 as 90."""
    with pytest.raises(PipelineError, match=r"unknown key\(s\) \['tile_size', 'tissue_filter'\]"):
        Pipeline.from_yaml("steps:\n  - BoxBlur: {kernel_size: 5}\ntile_size: 512\ntissue_filter: 0.5\n")
    with pytest.raises(PipelineError, match="kernel_size"):
        Pipeline.from_yaml("steps:\n  - BoxBlur: {kernel_size: 017}\n")
    with pytest.raises(PipelineError, match="threshold"):
        Pipeline.from_yaml("steps:\n  - BinaryThreshold: {use_otsu: false, threshold: 1:30}\n")
    assert Pipeline.from_yaml("steps:\n  - BoxBlur: {kernel_size: 0o17}\n").steps[0].kernel_size == 15
    assert Pipeline.from_yaml("steps:\n  - BoxBlur: {kernel_size: 17}\n").steps[0].kernel_size == 17
    from histoflow.utils import yaml_dump, yaml_load

    assert yaml_load("a: 017\nb: 1:30\nc: 1_000\nd: 1e-3\ne: 0x10\nf: -.inf") == \
        {"a": "017", "b": "1:30", "c": 1000, "d": 0.001, "e": 16, "f": -np.inf}
    assert yaml_dump({"a": "017", "b": "1:30"}) == "a: '017'\nb: '1:30'\n"  # quoted for YAML 1.1 readers


def test_a_str_slide_types_is_one_type():
    class Review5HEOnly(Transform, register=False):
        slide_types = ("HE")

        def apply(self, tile):
            pass

    assert Review5HEOnly.slide_types == ("HE",)
    Pipeline([Review5HEOnly()]).check("HE")
    with pytest.raises(PipelineError, match="accepts HE slides, not IF"):
        Pipeline([Review5HEOnly()]).check("IF")


def test_one_valued_masks_are_masks_and_segmentations_clash_only_with_their_own_names(tmp_path, dark_model):
    """A 0/255 mask is 255 throughout a tile inside the region: taken for labels, the run stopped; and
    SemanticSegmentation(mask_name="tumour") was refused for the slide's own "tumour_bed"."""
    from histoflow.ml.transforms import SemanticSegmentation

    tile = Tile(np.zeros((32, 32, 3), np.uint8), (0, 0))
    for value in (255, 0, 1):
        tile.masks["m"] = np.full((32, 32), value, np.uint8)
        MorphOpen("m", 3).apply(tile)
        ForegroundDetection("m", 10).apply(tile)
    tile.masks["m"] = np.full((32, 32), 7, np.uint8)
    tile.masks["m"][0, 0] = 3  # two values, neither 0: labels
    with pytest.raises(MaskError):
        MorphOpen("m", 3).apply(tile)
    with SlideData(SVS) as s:
        w, h = s.dimensions
        s.add_mask("tumour_bed", np.full((h // 16, w // 16), 255, np.uint8), 16)
        out = s.run(Pipeline([MorphOpen("tumour_bed", 3), SemanticSegmentation(dark_model, mask_name="tumour")],
                             inputs=["tumour_bed"]),
                    str(tmp_path / "t.h5path"), tile_size=1024, executor="inprocess", progress=False)
        with pytest.raises(PipelineError, match="already has 'tumour_bed'"):
            s.run(SemanticSegmentation(dark_model, mask_name="tumour_bed"), str(tmp_path / "u.h5path"),
                  tile_size=1024, executor="inprocess", progress=False)
    with read_h5path(out) as h5:
        assert {"tumour", "tumour_bed", "tumour_prob_0", "tumour_prob_1"} <= set(h5.masks)


def test_saved_pipelines_load_back_whatever_their_strings():
    from histoflow.utils import yaml_dump, yaml_load

    for text in ("0o17", "017", "1:30", "1e3", "0x1F", "1_000", ".inf"):
        assert yaml_load(yaml_dump({"a": text})) == {"a": text}
        p = Pipeline([MorphOpen(mask_name=text)], inputs=[text])
        assert Pipeline.from_yaml(p.to_yaml()) == p

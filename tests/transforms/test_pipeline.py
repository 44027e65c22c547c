"""Transform and Pipeline: YAML round trips, custom transforms, checks, repr."""
import numpy as np
import pytest
from datafiles import SVS

from histoflow import PipelineError, open_slide
from histoflow.core.tile import Tile
from histoflow.transforms import (
    REGISTRY,
    BoxBlur,
    MorphOpen,
    NucleusDetectionHE,
    Pipeline,
    StainNormalizationHE,
    TissueDetectionHE,
    Transform,
    list_transforms,
)


class Invert(Transform):
    """Invert an 8-bit image (a user's own transform)."""

    changes_image = True

    def __init__(self, keep=True):
        self.keep = keep

    def F(self, image):
        return 255 - image

    def apply(self, tile):
        tile.image = self.F(tile.image)


def tile_at(x, y, size=256):
    with open_slide(SVS) as s:
        return Tile(image=s.read_region((x, y), 0, (size, size)), coords=(x, y), slide_type="HE")


def test_yaml_round_trip(tmp_path):
    pipe = Pipeline([BoxBlur(15), TissueDetectionHE(min_region_size=100), MorphOpen("tissue", kernel_size=3),
                     StainNormalizationHE(stain_estimation_method="vahadane"), NucleusDetectionHE()])
    path = pipe.save(tmp_path / "p.yaml")
    text = open(path).read()
    assert "histoflow_pipeline: 1" in text and "BoxBlur:" in text and "kernel_size: 15" in text
    back = Pipeline.load(path)
    assert back == pipe and repr(back) == repr(pipe)
    t1, t2 = tile_at(1000, 1000), tile_at(1000, 1000)
    pipe.apply(t1)
    back.apply(t2)
    np.testing.assert_array_equal(t1.image, t2.image)
    np.testing.assert_array_equal(t1.masks["tissue"], t2.masks["tissue"])


def test_custom_transform_mixes_with_builtins(tmp_path):
    assert REGISTRY["Invert"] is Invert
    pipe = Pipeline([Invert(), BoxBlur(3)])
    t = tile_at(1000, 1000)
    raw = t.image.copy()
    pipe.apply(t)
    assert abs(float(t.image.mean()) - (255 - float(raw.mean()))) < 1
    assert Pipeline.load(pipe.save(tmp_path / "c.yaml")) == pipe


def test_nested_pipeline_round_trip():
    inner = Pipeline([BoxBlur(3), TissueDetectionHE()])
    outer = Pipeline([inner, MorphOpen("tissue")])
    assert Pipeline.from_yaml(outer.to_yaml()) == outer


def test_bad_yaml_files(tmp_path):
    for text, msg in [("steps: [{BoxBlur: {size: 3}}]", r"BoxBlur has no parameter\(s\) \['size'\]"),
                      ("steps: [{NoSuch: {}}]", "unknown transform 'NoSuch'"),
                      ("steps: [BoxBlur]", "a pipeline step must be a mapping"),
                      ("histoflow_pipeline: 9\nsteps: []", "pipeline format 9 is not supported"),
                      ("!!python/object:os.system ls", "not valid YAML"),
                      ("[1, 2", "not valid YAML")]:
        p = tmp_path / "x.yaml"
        p.write_text(text)
        with pytest.raises(PipelineError, match=msg):
            Pipeline.load(p)
    with pytest.raises(PipelineError, match="cannot read pipeline file"):
        Pipeline.load(tmp_path / "missing.yaml")


def test_check_names_transform_and_mask():
    with pytest.raises(PipelineError, match=r"step 1 MorphOpen needs mask 'tissue', which no earlier step makes"):
        Pipeline([BoxBlur(3), MorphOpen("tissue")])
    Pipeline([TissueDetectionHE(), MorphOpen("tissue")])  # fine once something makes it


def test_check_slide_type():
    pipe = Pipeline([StainNormalizationHE()])
    with pytest.raises(PipelineError, match="step 0 StainNormalizationHE accepts HE slides, not MIBI"):
        pipe.check("MIBI")
    pipe.check("HE")


def test_listing_covers_the_library():
    names = {t["name"] for t in list_transforms()}
    for n in ("MedianBlur", "GaussianBlur", "BoxBlur", "RescaleIntensity", "HistogramEqualization",
              "AdaptiveHistogramEqualization", "BinaryThreshold", "MorphOpen", "MorphClose", "ForegroundDetection",
              "SuperpixelInterpolation", "StainNormalizationHE", "StainSeparation", "StainAugmentation",
              "TissueDetectionHE", "TissueDetectionCascade", "LabelWhiteSpaceHE", "LabelArtifactTileHE", "BlurQC",
              "NucleusDetectionHE"):
        assert n in names, n
    box = next(t for t in list_transforms() if t["name"] == "BoxBlur")
    assert box["params"]["kernel_size"] == 5 and box["doc"]


def test_custom_transforms_that_would_save_wrongly_are_refused():
    with pytest.raises(PipelineError, match=r"a transform named 'BoxBlur' is already registered "
                                            r"\(histoflow.transforms.filters.BoxBlur\)"):
        class BoxBlur(Transform):  # noqa: F811 - a user's own class of a built-in's name
            def apply(self, tile):
                pass
    assert REGISTRY["BoxBlur"].__module__ == "histoflow.transforms.filters"

    class Scaled(Transform, register=False):
        def __init__(self, factor=2, **extra):
            self.factor = factor

        def apply(self, tile):
            pass
    with pytest.raises(PipelineError, match=r"Scaled.__init__ takes \*args or \*\*kwargs"):
        Pipeline([Scaled()]).to_yaml()


def test_pipeline_inputs_are_mask_names():
    assert Pipeline([BoxBlur(3)], inputs="tissue").inputs == ["tissue"]
    assert Pipeline.from_yaml("steps: [{BoxBlur: {kernel_size: 3}}]\ninputs: tissue\n").inputs == ["tissue"]
    with pytest.raises(PipelineError, match="inputs must be slide mask names"):
        Pipeline([BoxBlur(3)], inputs=[3])


def test_listing_marks_required_parameters():
    items = {t["name"]: t for t in list_transforms()}
    assert items["ForegroundDetection"]["required"] == ["mask_name"]
    assert items["BoxBlur"]["required"] == []

"""Transform and Pipeline: YAML round trips, custom transforms, checks, repr."""
import numpy as np
import pytest
import yaml
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
                      # a string was taken one character at a time: "a step must be a mapping, got 'B'"
                      ("histoflow_pipeline: 1\nsteps: BoxBlur", r"'steps' must be a list of .*got str 'BoxBlur'"),
                      ("histoflow_pipeline: 9\nsteps: []", "pipeline format 9 is not supported"),
                      ("!!python/object:os.system ls", "not valid YAML"),
                      ("[1, 2", "not valid YAML"),
                      # a parameter given twice: the first was dropped without a word
                      ("steps: [{BoxBlur: {kernel_size: 3, kernel_size: 9}}]", "found the key 'kernel_size' a "
                                                                               "second time")]:
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


def test_steps_are_fitted_to_the_slide_as_earlier_steps_leave_it(tmp_path):
    """A slide-level fit after a step that changes the pixels sees the changed pixels: a linear rescale
    before SegmentNuclei once left its threshold fitted on the raw slide (9.3 instead of 3.5 for 0..100),
    and the nuclei found dropped from ~1,730 to 440."""
    from datafiles import data_path
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    from histoflow.core.slide import SlideData
    from histoflow.store import read_h5path
    from histoflow.transforms import RescaleIntensity, SegmentNuclei
    from histoflow.transforms.intensity import rescale_intensity

    path = data_path("wsi", "qptiff", "small_vectra.qptiff")
    plain = Pipeline([SegmentNuclei(nuclear_channel="DAPI")])
    scaled = Pipeline([RescaleIntensity(in_range="dtype", out_range=(0, 100)), SegmentNuclei(nuclear_channel="DAPI")])
    counts = []
    for i, p in enumerate((plain, scaled)):
        with SlideData(path) as s:
            out = s.run(p, str(tmp_path / f"{i}.h5path"), tile_size=512, overlap=44, executor="inprocess",
                        progress=False)
            thumb = np.asarray(s.thumbnail(2048, channels=[0]))[..., 0]
            sigma = 0.8 / (s.mpp[0] * s.dimensions[0] / thumb.shape[1])
        with read_h5path(out) as h:
            counts.append(sum(int(h.tile(k).labels["nucleus_count"]) for k in range(len(h))))
    seen = rescale_intensity(thumb, "dtype", (0, 100)).astype(np.float32)
    with SlideData(path) as s:
        scaled.fit_slide(s)
    assert scaled.steps[1].threshold_ == pytest.approx(threshold_otsu(ndi.gaussian_filter(seen, sigma)), rel=0.02)
    assert abs(counts[1] - counts[0]) < 0.03 * counts[0], counts


def test_pipeline_file_errors_and_slide_type_changes(tmp_path):
    """A slide given where the pipeline file goes gets a PipelineError (not a UnicodeDecodeError); a step
    that renders H&E (VirtualHE) lets H&E steps follow it; the engine's check names the slide."""
    from datafiles import data_path

    from histoflow.core.slide import SlideData
    from histoflow.transforms import NucleusDetectionHE, VirtualHE

    with pytest.raises(PipelineError, match="not a pipeline YAML file"):
        Pipeline.load(SVS)
    qptiff = data_path("wsi", "qptiff", "small_vectra.qptiff")
    ok = Pipeline([VirtualHE(nuclear_channel="DAPI"), NucleusDetectionHE()])
    ok.check("Vectra")
    with pytest.raises(PipelineError, match="step 0 NucleusDetectionHE accepts HE slides, not Vectra"):
        Pipeline([NucleusDetectionHE()]).check("Vectra")
    with SlideData(qptiff) as s:
        with pytest.raises(PipelineError, match=r"small_vectra.qptiff: step 0 NucleusDetectionHE accepts HE"):
            s.run(Pipeline([NucleusDetectionHE()]), str(tmp_path / "x.h5path"), executor="inprocess", progress=False)
        out = s.run(ok, str(tmp_path / "ok.h5path"), tile_size=512, overlap=30, executor="inprocess", progress=False)
    from histoflow.store import read_h5path

    with read_h5path(out) as h:
        assert "nuclei" in h.tile_mask_names and h.tile(0).image.shape[2] == 3


def test_unregistered_steps_are_not_saved_and_pipeline_subclasses_round_trip():
    class Helper(Transform, register=False):
        def apply(self, tile):
            pass

    with pytest.raises(PipelineError, match="Helper is not a registered transform"):
        Pipeline([BoxBlur(3), Helper()]).to_yaml()
    Pipeline([BoxBlur(3), Helper()]).to_document()  # provenance of a run still records it

    class Stage(Pipeline):
        pass

    back = Pipeline.from_yaml(Pipeline([Stage([BoxBlur(3)])]).to_yaml())
    assert type(back.steps[0]) is Stage and back.steps[0].steps[0] == BoxBlur(3)


def _makers():
    import histoflow.transforms as T

    return [
        (lambda: T.StainNormalizationHE(max_c_percentile=150), "max_c_percentile"),
        (lambda: T.StainNormalizationHE(regularizer=-1, stain_estimation_method="vahadane"), "regularizer"),
        (lambda: T.StainNormalizationHE(luminosity_threshold="0.8", stain_estimation_method="reinhard"),
         "luminosity_threshold"),
        (lambda: T.StainAugmentation(seed="abc"), "seed"),
        (lambda: T.NucleusDetectionHE(min_distance="4"), "min_distance"),
        (lambda: T.NucleusDetectionHE(mask_name=None), "mask_name"),
        (lambda: T.SegmentNuclei(nuclear_channel=0, sigma_um="1"), "sigma_um"),
        (lambda: T.VirtualHE(nuclear_channel=0, percentile=250), "percentile"),
        (lambda: T.CollapseRunsVectra(n_channels=-1), "n_channels"),
        (lambda: T.CollapseRunsCODEX(n_cycles=0), "n_cycles"),
    ]


@pytest.mark.parametrize("make, what", _makers(), ids=[w for _, w in _makers()])
def test_bad_parameters_are_refused_when_made(make, what):
    """Bad values are refused by the constructor with a ParameterError naming the parameter, not per tile
    (or never: a mask named None, channels dropped by a negative count)."""
    from histoflow.errors import ParameterError

    with pytest.raises(ParameterError, match=what):
        make()


def test_fitting_view_runs_only_the_steps_that_change_pixels():
    """The view a step is fitted to runs the pixel-changing steps before it, nested ones too, but no random
    augmentation (the slide's stains would depend on the seed), and no step that only adds masks (a model
    on the whole thumbnail; a reducing step); it has the slide type the steps leave."""
    from datafiles import data_path

    from histoflow.core.slide import SlideData
    from histoflow.transforms import (NucleusDetectionHE, QuantifyCells, RescaleIntensity, SegmentCells,
                                      SegmentNuclei, StainAugmentation, VirtualHE)

    qptiff = data_path("wsi", "qptiff", "small_vectra.qptiff")
    thresholds = []
    for nested in (False, True):
        inner = [RescaleIntensity(in_range="dtype", out_range=(0, 100)), SegmentNuclei(nuclear_channel="DAPI"),
                 QuantifyCells(mask_name="nuclei")]
        last = SegmentCells(nuclear_channel="DAPI", cell_mask="cells2", nucleus_mask="nuc2")
        p = Pipeline([Pipeline(inner), last]) if nested else Pipeline(inner + [last])
        with SlideData(qptiff) as s:
            p.fit_slide(s)
        thresholds.append(p.steps[-1].threshold_)
    assert thresholds[0] == thresholds[1] and thresholds[0] < 5  # Otsu of the rescaled DAPI, not of the raw one
    matrices = []
    for seed in (0, 1):
        p = Pipeline([StainAugmentation(sigma1=0.5, sigma2=0.5, seed=seed), NucleusDetectionHE()])
        with SlideData(SVS) as s:
            p.fit_slide(s)
        matrices.append(p.steps[1].stain_matrix_)
    np.testing.assert_array_equal(matrices[0], matrices[1])
    p = Pipeline([VirtualHE(nuclear_channel="DAPI"), QuantifyCells(mask_name="nuclei")], inputs=["nuclei"])
    with SlideData(qptiff) as s:
        s.add_mask("nuclei", np.zeros((15, 20), np.uint8))
        p.fit_slide(s)
    assert p.steps[1].od_  # measured as H&E optical densities, as the tiles VirtualHE leaves will be


def test_pipelines_recorded_before_reference_existed_read_the_same():
    """`reference` is left out of the parameters when unset, so runs recorded by earlier versions resume."""
    d = StainNormalizationHE().to_dict()["StainNormalizationHE"]
    assert "reference" not in d
    assert Transform.from_dict({"StainNormalizationHE": d}) == StainNormalizationHE()


def test_transform_listing_sentences():
    from histoflow.transforms.base import _first_sentence

    assert _first_sentence("Perturbation (Tellez et al. 2018), per tile. More.\n\nRest") == \
        "Perturbation (Tellez et al. 2018), per tile."
    assert _first_sentence("Keep planes (e.g. the composite\nones) in order.") == "Keep planes (e.g. the composite ones) in order."


def test_numbers_in_scientific_notation_are_numbers_in_every_yaml_file(tmp_path):
    """PyYAML reads YAML 1.1, where 5e3, 1e-3 and 1.0e3 are strings (only 1.0e+3 is a float): a pipeline with
    min_region_size: 5e3 was refused as "must be a finite number, got '5e3'"."""
    from histoflow.ml.recipes import load_config
    from histoflow.transforms import Pipeline, TissueDetectionHE

    p = tmp_path / "p.yaml"
    p.write_text("steps:\n  - TissueDetectionHE: {min_region_size: 5e3, threshold: 2.0e1}\n")
    pipe = Pipeline.load(str(p))
    assert pipe.steps[0] == TissueDetectionHE(min_region_size=5000.0, threshold=20.0)
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "..", "..", "configs", "nucleus_monuseg.yaml"), encoding="utf-8") as f:
        text = f.read()
    assert "  lr: 0.002\n" in text
    c = tmp_path / "c.yaml"
    c.write_text(text.replace("  lr: 0.002\n", "  lr: 2e-3\n"))
    assert load_config(str(c))["train"]["lr"] == 0.002
    import yaml

    assert yaml.safe_load("a: 1e-3") == {"a": "1e-3"}  # PyYAML's own loader is left as it is
    # and a string that spells such a number is written quoted: it reads back a string
    named = Pipeline([TissueDetectionHE(mask_name="1e5")])
    assert Pipeline.from_yaml(named.to_yaml()) == named


def test_the_repr_of_a_transform_that_does_not_keep_a_parameter_does_not_raise():
    """repr (tracebacks, debuggers, logs) raised PipelineError for a custom transform that keeps a parameter
    under another name; such a transform is still refused where it matters (saving, running)."""
    from histoflow.transforms import Pipeline, Transform

    class Scale(Transform):
        def __init__(self, factor=2.0):
            self._factor = factor

        def apply(self, tile):
            tile.image = tile.image * self._factor

    p = Pipeline([Scale()])
    assert repr(p) == "Pipeline([\n    Scale(factor=<not kept>)\n])"
    assert p.steps[0] == p.steps[0] and p.steps[0] != Scale() and len({p.steps[0], Scale()}) == 2
    with pytest.raises(PipelineError, match="does not keep its parameter 'factor'"):
        p.to_yaml()


def test_yaml_merges_may_override_keys_and_repeated_keys_are_refused_everywhere():
    """Keys a mapping merges (<<) may be overridden in it, also when PyYAML expands an anchored mapping before it
    is built (nested one level deeper: a first version of the duplicate-key check took that for a repeated key);
    a key written twice is refused at any depth."""
    from histoflow.utils import yaml_load

    text = ("base: &base {lr: 0.1, wd: 0}\nouter:\n  a: &a\n    <<: *base\n    lr: 0.5\nb:\n  <<: *a\n  x: 2\n")
    assert yaml_load(text) == yaml.safe_load(text) == {"base": {"lr": 0.1, "wd": 0}, "outer": {"a": {"lr": 0.5, "wd": 0}},
                                                       "b": {"lr": 0.5, "wd": 0, "x": 2}}
    for bad, key in (("a: 1\na: 2\n", "a"), ("x:\n  y: {k: 1, k: 2}\n", "k"), ("- {p: 1}\n- {q: 1, q: 2}\n", "q")):
        with pytest.raises(yaml.YAMLError, match=f"found the key '{key}' a second time"):
            yaml_load(bad)


class _Inverted(Transform):
    changes_image = True

    def apply(self, tile):
        return Tile(255 - tile.image, tile.coords)  # a new tile: its pixels were dropped, without a word


def test_a_step_that_returns_a_new_tile_is_an_error_not_a_no_op(tmp_path):
    """apply() changes the tile it is given; a step that built and returned a new Tile had its work dropped: the
    slide's own pixels were stored, with no warning and no failed tile."""
    tile = Tile(np.full((8, 8, 3), 10, np.uint8), (0, 0))
    from histoflow.transforms.base import TransformError

    with pytest.raises(TransformError, match=r"_Inverted failed on tile .*: apply\(tile\) changes the tile it is given "
                                             r"and returns nothing; it returned a new Tile"):
        Pipeline([_Inverted()]).apply(tile)
    from histoflow import SlideData

    with pytest.raises(PipelineError, match="_Inverted failed on tile at"):  # the engine stops the run, naming it
        SlideData(SVS).run(Pipeline([_Inverted()]), tmp_path / "o.h5path", executor="inprocess", progress=False)

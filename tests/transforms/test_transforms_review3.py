"""Defects found by a review of the public API with bad input (session 23): float tiles with NaN pixels, kernels
and sizes without an upper bound, channel arguments not checked, QuantifyCells' names not checked."""
import numpy as np
import pytest
from datafiles import data_path

from histoflow.core.tile import Tile
from histoflow.errors import ParameterError
from histoflow.transforms import (AdaptiveHistogramEqualization, BinaryThreshold, BoxBlur, GaussianBlur,
                                  HistogramEqualization, MedianBlur, MorphClose, MorphOpen, NucleusDetectionHE, Pipeline,
                                  QuantifyCells, RescaleIntensity, SegmentCells, SegmentNuclei, SuperpixelInterpolation,
                                  TissueDetectionHE, VirtualHE)

HE = data_path("he_patches", "stardist_histo.jpg")


def _float_tile_with_holes():
    import imageio.v3 as iio

    img = iio.imread(HE)[:96, :96].astype(np.float32)
    holes = img.copy()
    holes[5, 7] = np.nan  # no data
    holes[40:44, 10:20] = np.nan
    holes[60, 60, 1] = np.inf
    return img, holes


def test_float_tiles_with_nan_pixels_keep_their_statistics():
    """One NaN pixel made RescaleIntensity's range NaN (the whole tile NaN), and BinaryThreshold, HistogramEqualization
    and SuperpixelInterpolation raised numpy / scikit-image errors. Statistics are now those of the finite pixels:
    the other pixels come out as without the holes, NaN stays NaN."""
    img, holes = _float_tile_with_holes()
    nan = np.isnan(holes)
    ok = np.isfinite(holes)
    # the same image with the holes filled by values inside its range gives the same statistics
    filled = np.where(ok, holes, np.float32(img[ok].mean()))
    r = RescaleIntensity().F(holes)
    assert np.isnan(r[nan]).all() and np.isfinite(r[~nan]).all()
    assert r[60, 60, 1] == 1.0  # +inf at the top of the range
    np.testing.assert_allclose(r[ok], RescaleIntensity().F(filled)[ok], atol=1e-6)
    h = HistogramEqualization().F(holes)
    assert np.isnan(h[nan]).all() and np.isfinite(h[~nan]).all() and h[60, 60, 1] == 1.0
    from skimage import exposure  # the finite pixels equalised alone, as a 1-D image: the same values exactly

    np.testing.assert_array_equal(h[ok], exposure.equalize_hist(holes[ok]).astype(np.float32))
    # one finite value and a NaN: the value is kept, as scikit-image keeps an image of one value (not set to 0)
    flat = np.full((4, 4, 2), 0.3, np.float32)
    flat[0, 0, 0] = np.nan
    for per_channel in (False, True):
        r1 = RescaleIntensity(per_channel=per_channel).F(flat)
        assert np.isnan(r1[0, 0, 0]) and np.allclose(r1[1:], RescaleIntensity(per_channel=per_channel).F(
            np.full((4, 4, 2), 0.3, np.float32))[1:])
    t = Tile(image=holes.copy(), coords=(0, 0))
    BinaryThreshold(mask_name="bright").apply(t)
    grey_ok = ok.all(axis=2)
    assert t.masks["bright"][~grey_ok].sum() <= 1  # the NaN pixels are in neither class (inf is bright)
    t2 = Tile(image=filled.copy(), coords=(0, 0))
    BinaryThreshold(mask_name="bright").apply(t2)
    assert (t.masks["bright"][grey_ok] == t2.masks["bright"][grey_ok]).mean() > 0.99
    from histoflow.transforms.superpixel import superpixel_interpolation

    sp, labels = superpixel_interpolation(holes, region_size=12, return_labels=True)
    np.testing.assert_array_equal(np.isnan(sp), nan)
    assert sp[60, 60, 1] == np.inf and np.isfinite(sp[grey_ok]).all()
    for lab in np.unique(labels[grey_ok]):  # each superpixel holds the mean of its finite pixels, holes left out
        inside = (labels == lab) & grey_ok
        np.testing.assert_allclose(sp[inside][0], holes[inside].astype(np.float64).mean(axis=0), rtol=1e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: NucleusDetectionHE(sigma=1e12), "sigma must be at most"),
    (lambda: NucleusDetectionHE(min_distance=1e9), "min_distance must be at most"),
    (lambda: MorphOpen("tissue", kernel_size=10**6 + 1), "kernel_size must be at most 1023 px"),
    (lambda: MorphClose("tissue", kernel_size=2049), "kernel_size must be at most 1023 px"),
    (lambda: AdaptiveHistogramEqualization(kernel_size=10**6), "kernel_size must be at most 4096"),
    (lambda: AdaptiveHistogramEqualization(kernel_size=(8, 10**6)), "kernel_size must be at most 4096"),
    (lambda: TissueDetectionHE(morph_k_size=10**6 + 1), "morph_k_size must be at most 1023 px"),
    (lambda: TissueDetectionHE(blur_ksize=10**6 + 1), "blur_ksize must be at most 1023 px"),
    (lambda: BoxBlur(10**6 + 1), "kernel_size must be at most 1023 px"),
    (lambda: MedianBlur(10**6 + 1), "kernel_size must be at most 1023 px"),
    (lambda: GaussianBlur(10**6 + 1), "kernel_size must be at most 1023 px"),
    (lambda: SegmentNuclei(sigma_um=1e12), "sigma_um must be at most"),
    (lambda: SegmentCells(expand_um=1e9), "expand_um must be at most"),
    (lambda: SegmentCells(min_distance_um=1e9), "min_distance_um must be at most"),
])
def test_kernels_and_sizes_have_an_upper_bound(make, match):
    """A sigma of 10^12 ran for minutes with gigabytes; kernels of 10^6 px asked for hundreds of GiB or ran for
    minutes on a 256 px tile. Refused when the transform is made."""
    with pytest.raises(ParameterError, match=match):
        make()
    BoxBlur(1023), MorphOpen("tissue", kernel_size=1023), NucleusDetectionHE(sigma=10)  # large ones still work


def test_channel_arguments_are_checked():
    """VirtualHE read eosin_channels="CD45" letter by letter ("no channel 'C'") and eosin_channels=5 raised a raw
    TypeError; nuclear_channel=True meant channel 1."""
    assert VirtualHE(eosin_channels="CD45").eosin_channels == ["CD45"]
    assert VirtualHE(eosin_channels=5).eosin_channels == [5]
    assert VirtualHE(eosin_channels=[]).eosin_channels is None  # the default: every other channel
    assert SegmentCells(membrane_channels="CD45").membrane_channels == ["CD45"]
    for make in (lambda: VirtualHE(nuclear_channel=True), lambda: SegmentNuclei(nuclear_channel=True),
                 lambda: SegmentNuclei(nuclear_channel=1.5), lambda: VirtualHE(eosin_channels=[True]),
                 lambda: SegmentCells(membrane_channels={"a": 1}), lambda: VirtualHE(nuclear_channel="")):
        with pytest.raises(ParameterError, match="is a channel name or index"):
            make()


def test_a_one_channel_string_names_one_channel_on_a_real_mibi_slide():
    from histoflow import SlideData

    with SlideData(data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")) as s:
        name = next(n for n in s.reader.channel_names if n.startswith("CD45"))
        t = VirtualHE(eosin_channels=name)
        t.fit_slide(s)
        tile = s.read_tile(next(iter(s.grid(128))))
        t.apply(tile)
        assert tile.image.shape == (128, 128, 3) and tile.image.dtype == np.uint8


@pytest.mark.parametrize("kw, match", [
    (dict(stats=None), "stats is a list of names"),
    (dict(mask_name=["cells"]), "mask_name must be a non-empty string"),
    (dict(mask_name=""), "mask_name must be a non-empty string"),
    (dict(nucleus_mask=float("nan")), "nucleus_mask must be a non-empty string"),
    (dict(nucleus_mask="cells"), "nucleus_mask and mask_name must differ"),
])
def test_quantify_cells_checks_its_names(kw, match):
    with pytest.raises(ParameterError, match=match):
        QuantifyCells(**kw)
    import yaml

    d = yaml.safe_load(Pipeline([QuantifyCells()], inputs=["cells"]).to_yaml())
    d["steps"][0]["QuantifyCells"].update(kw)
    with pytest.raises(Exception, match="QuantifyCells: .*(must|differ|list of names)"):  # from YAML too, with the same reason
        Pipeline.from_yaml(yaml.safe_dump(d))


def test_pipeline_documents_say_what_is_wrong():
    """A quoted format number gave "format 1 is not supported (this histoflow reads format 1)"; inputs given as a
    mapping were taken as its keys; a nested pipeline's steps given as one name failed with "got 'B'"."""
    from histoflow.errors import PipelineError

    for text, match in [("histoflow_pipeline: '1'\nsteps: []", r"format '1' is not supported .* the number"),
                        ("inputs: {tissue: no}\nsteps: []", r"inputs must be slide mask names .* got \{'tissue'"),
                        ("steps:\n- Pipeline: {steps: BoxBlur}", r"Pipeline: 'steps' must be a list .* got str")]:
        with pytest.raises(PipelineError, match=match):
            Pipeline.from_yaml(text)

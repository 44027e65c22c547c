"""Transform library: findings of the session-25 review (each test failed on the code before its fix)."""
import numpy as np
import pytest
import tifffile
from datafiles import data_path
from PIL import Image

from histoflow import ParameterError
from histoflow.transforms import (
    AdaptiveHistogramEqualization,
    BlurQC,
    HistogramEqualization,
    RescaleIntensity,
    SuperpixelInterpolation,
)


@pytest.fixture(scope="module")
def fluo():
    raw = tifffile.imread(data_path("fluorescence", "pathml_smalltif.tif"))[:256, :256]
    return (raw / 65535).astype(np.float32)


def test_adaptive_equalization_of_float16_tiles(fluo):
    """float16 went into scikit-image as it was and overflowed: a 1- or 2-channel tile came out all 1.0."""
    t = AdaptiveHistogramEqualization()
    want = t.F(fluo.astype(np.float16).astype(np.float32))  # the same values in float32
    got = t.F(fluo.astype(np.float16))
    assert got.dtype == np.float16 and len(np.unique(got)) > 1000
    assert np.abs(got.astype(np.float32) - want).max() < 0.002
    two = t.F(np.stack([fluo, fluo], -1).astype(np.float16))
    assert np.abs(two[..., 1].astype(np.float32) - want).max() < 0.002


def test_adaptive_equalization_leaves_nan_pixels_nan(fluo):
    """A NaN pixel (no data) was taken for 0 by scikit-image: it came out 0 and shifted 30 % of the tile."""
    t = AdaptiveHistogramEqualization()
    want = t.F(fluo)
    holed = fluo.copy()
    holed[100, 100] = np.nan
    got = t.F(holed)
    assert np.isnan(got[100, 100]) and np.isnan(got).sum() == 1
    other = ~np.isnan(got)
    assert (np.abs(got[other] - want[other]) > 0.01).mean() < 0.01
    # a tile of no data at all stays so (its range check of NaN..NaN refused it, advising to rescale it)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        blank = t.F(np.full((64, 64, 2), np.nan, np.float32))
    assert blank.shape == (64, 64, 2) and np.isnan(blank).all()
    with pytest.raises(ParameterError, match=r"float images must hold values in \[-1, 1\] .* got 0.0..inf"):
        t.F(np.where(np.eye(64, dtype=bool)[:, :, None], np.inf, 0.0).astype(np.float32))


def test_blur_score_refuses_floats_on_the_0_255_scale():
    """0-255 floats were scored as [0, 1] (255**2 times higher): a blurred tile passed as sharp."""
    img = np.asarray(Image.open(data_path("he_patches", "stardist_histo.jpg")).convert("RGB"))[:128, :128]
    qc = BlurQC()
    assert qc.F(img / 255.0) == pytest.approx(qc.F(img), rel=0.05)
    with pytest.raises(ParameterError, match="divide floats on the 0-255 scale by 255"):
        qc.F(img.astype(np.float64))


@pytest.mark.filterwarnings("ignore:Downcasting int64 to uint16 without scaling")  # scikit-image's, for CLAHE
def test_64_bit_integer_tiles_keep_their_brightest_pixels():
    """float(2**63 - 1) is 2**63: clipping to it and casting back wrapped the brightest pixels of int64 tiles to
    the most negative value (uint64: to 0)."""
    img = np.asarray(Image.open(data_path("he_patches", "stardist_histo.jpg")).convert("L"))[:64, :64]
    a = img.astype(np.int64)
    for t in (HistogramEqualization(), AdaptiveHistogramEqualization()):
        out = t.F(a)
        assert out.dtype == np.int64 and out.min() >= 0 and out[a == a.max()].min() == np.iinfo(np.int64).max
    out = HistogramEqualization().F(a.astype(np.uint64))
    assert out[a == a.max()].min() == np.iinfo(np.uint64).max
    out = RescaleIntensity().F(a)
    assert out[a == a.max()].min() == np.iinfo(np.int64).max and out[a == a.min()].max() == np.iinfo(np.int64).min
    assert RescaleIntensity(out_range=(0, 255)).F(a).max() == 255


def test_bins_and_iterations_are_bounded_when_made():
    """nbins=10**9 was accepted and failed on the workers with numpy's MemoryError (3.7-7.5 GiB a 64 px tile)."""
    for make in (lambda: HistogramEqualization(nbins=10**9), lambda: AdaptiveHistogramEqualization(nbins=10**9)):
        with pytest.raises(ParameterError, match="nbins must be at most 65536"):
            make()
    with pytest.raises(ParameterError, match="n_iter must be at most 1000"):
        SuperpixelInterpolation(n_iter=10**9)
    assert HistogramEqualization(nbins=65536).nbins == 65536


def test_parameters_that_make_a_step_saturate_do_nothing_or_explode_are_refused():
    """A review (session 26) found: RescaleIntensity to a range wider than the image's dtype clipped most of a
    uint8 tile to 255; n iterations of a k px kernel act as one (k - 1) n + 1 px kernel, past the kernels' bound
    (100,000 asked OpenCV for 160 GB, in its own error); thresholds off the 0-255 scale (or a white fraction of 1)
    made tissue detection and white-space labelling constant."""
    import numpy as np
    import pytest

    from histoflow.errors import ParameterError
    from histoflow.transforms import (LabelWhiteSpaceHE, MorphClose, MorphOpen, RescaleIntensity,
                                      TissueDetectionHE)
    from histoflow.transforms.intensity import rescale_intensity
    from histoflow.transforms.morphology import morph_close
    from histoflow.transforms.tissue import TissueDetectionCascade

    img = np.random.default_rng(0).integers(0, 200, (32, 32, 3), dtype=np.uint8)
    for out_range in ("uint16", "uint12", (0, 1000), (-5, 100)):
        with pytest.raises(ParameterError, match=r"out_range .* does not fit the image's uint8"):
            rescale_intensity(img, out_range=out_range)
        with pytest.raises(ParameterError, match=r"does not fit the image's uint8"):
            RescaleIntensity(out_range=out_range).F(img)
    assert rescale_intensity(img.astype(np.uint16), out_range="uint12").max() == 4095  # a range that fits
    assert rescale_intensity(img, out_range=(0, 100)).max() == 100
    for make in (lambda: MorphOpen("m", kernel_size=5, n_iterations=300),
                 lambda: MorphClose("m", kernel_size=5, n_iterations=100000),
                 lambda: morph_close(np.ones((8, 8), np.uint8), 5, 300),
                 lambda: TissueDetectionHE(morph_k_size=7, morph_n_iter=200)):
        with pytest.raises(ParameterError, match=r"reach as far as one \d+ px kernel; at most 1023 px"):
            make()
    assert MorphOpen("m", kernel_size=5, n_iterations=255).n_iterations == 255  # 1021 px: within
    for make in (lambda: TissueDetectionHE(threshold=-5), lambda: TissueDetectionHE(threshold=300),
                 lambda: TissueDetectionCascade(saturation_threshold=255),
                 lambda: LabelWhiteSpaceHE(greyscale_threshold=255), lambda: LabelWhiteSpaceHE(proportion_threshold=1)):
        with pytest.raises(ParameterError):
            make()
    assert LabelWhiteSpaceHE(greyscale_threshold=254, proportion_threshold=0.99).F(np.full((8, 8, 3), 255, np.uint8))

"""Stain transforms as a review found them wanting: slide fits independent of the slide's size, tiles that are
not H&E (or hold little tissue) left unchanged, and arguments checked."""
import cv2
import numpy as np
import pytest
from datafiles import SVS

from histoflow.core.slide import SlideData
from histoflow.errors import ParameterError
from histoflow.transforms.stain import (REFERENCE_STAIN_MATRIX, StainAugmentation, StainNormalizationHE,
                                        StainSeparation, _as_matrix, estimate_stain_matrix_vahadane, lab_stats,
                                        rgb_to_od)


@pytest.fixture(scope="module")
def cmu():
    with SlideData(SVS) as s:
        return np.ascontiguousarray(s.read_region((0, 0), 0, s.dimensions)[..., :3])


class _Larger:
    """CMU-1 as if it were ``f`` times larger: its thumbnail is ``f`` times more area-averaged, its level-0
    pixels the same (what a 40x whole slide's 2048 px thumbnail is to its tiles, f ~ 50)."""

    def __init__(self, img, f):
        self.img, self.f, self.masks = img, f, {}
        self.dimensions = (img.shape[1], img.shape[0])

    def thumbnail(self, size):
        h, w = self.img.shape[:2]
        return cv2.resize(self.img, (w // self.f, h // self.f), interpolation=cv2.INTER_AREA)

    def read_region(self, loc, level, size):
        (x, y), (w, h) = loc, size
        return self.img[y:y + h, x:x + w]


@pytest.mark.parametrize("method", ["macenko", "vahadane", "reinhard"])
def test_a_slide_fit_does_not_depend_on_the_slide_size(cmu, method):
    """Stain maxima and colour spread come from full-resolution tissue: a thumbnail's averaged pixels gave a
    tile about twice its optical density on a slide 16 times larger (Macenko 0.36 -> 0.70)."""
    tile = np.ascontiguousarray(cmu[1000:1256, 1000:1256])
    ods = []
    for f in (1, 16, 32):
        n = StainNormalizationHE(stain_estimation_method=method)
        n.fit_slide(_Larger(cmu, f))
        ods.append(float(rgb_to_od(n.F(tile)).mean()))
    assert max(ods) - min(ods) < 0.06, ods


def test_tiles_that_are_not_h_and_e_or_hold_little_tissue_pass_unchanged(cmu):
    rng = np.random.default_rng(0)
    ink = np.clip(np.array([25, 25, 30]) + rng.normal(0, 2, (256, 256, 3)), 0, 255).astype(np.uint8)
    black = np.zeros((256, 256, 3), np.uint8)
    debris = np.ascontiguousarray(cmu[:256, :256])  # glass with ~2 % dark debris
    for method in ("macenko", "reinhard"):
        n = StainNormalizationHE(stain_estimation_method=method)
        for image in (ink, black, debris):
            np.testing.assert_array_equal(n.F(image), image)
    # a tissue tile is still normalised
    tissue = np.ascontiguousarray(cmu[1000:1256, 1000:1256])
    assert np.abs(StainNormalizationHE().F(tissue).astype(int) - tissue).mean() > 2


def test_stain_arguments_are_checked(cmu):
    tile = np.ascontiguousarray(cmu[1000:1256, 1000:1256])
    with pytest.raises(ParameterError, match="matrix has 2 stain rows"):
        StainSeparation("dab", stain_matrix=[[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    with pytest.raises(ParameterError, match="max_concentrations must be positive"):
        StainNormalizationHE(reference={"stain_matrix": REFERENCE_STAIN_MATRIX, "max_concentrations": [0, 0]})
    with pytest.raises(ParameterError, match="lab_stds must be positive"):
        StainNormalizationHE(stain_estimation_method="reinhard", reference={"lab_means": [50, 30, -10],
                                                                            "lab_stds": [-10, 5, 5]})
    with pytest.raises(ParameterError, match="negative optical densities"):
        StainNormalizationHE(reference={"stain_matrix": [[-0.6, 0.7, 0.3], [0.1, 0.9, 0.1]],
                                        "max_concentrations": [1.9, 1.0]})
    for bad in ("240", True, None):
        with pytest.raises(ParameterError, match="background_intensity"):
            StainNormalizationHE(background_intensity=bad)
    with pytest.raises(ParameterError, match="must be rows of numbers"):
        _as_matrix("abc")
    with pytest.raises(ParameterError, match="mask shape"):
        lab_stats(tile[:200], mask=np.ones((256, 200)))
    with pytest.raises(ParameterError, match="mask shape"):
        estimate_stain_matrix_vahadane(tile, mask=np.ones((256, 1)))
    a, b = (StainAugmentation(seed=s).F(tile, coords=(0, 0)) for s in (0, 2 ** 32))
    assert not np.array_equal(a, b)  # the seed's high bits count


def test_empty_images_give_empty_results():
    from histoflow.transforms.filters import box_blur, gaussian_blur, median_blur
    from histoflow.transforms.nuclei import NucleusDetectionHE

    for shape in ((0, 0, 3), (0, 5, 3), (5, 0, 3)):
        empty = np.zeros(shape, np.uint8)
        for f in (median_blur, box_blur, gaussian_blur):
            assert f(empty, 5).shape == shape
        assert StainNormalizationHE(stain_estimation_method="reinhard").F(empty).shape == shape
        assert NucleusDetectionHE().F(empty).shape == shape[:2]


@pytest.mark.parametrize("method", ["macenko", "vahadane", "reinhard"])
def test_a_step_that_changes_nothing_before_normalisation_changes_nothing(mosaic2, method):
    """Fitted after any pixel-changing step, StainNormalizationHE took its maximum concentrations (Reinhard: its
    colour spread) from the thumbnail instead of full-resolution regions: adding a MedianBlur(1), which changes
    no pixel, moved its output by ~11 grey levels on average."""
    from histoflow.transforms import MedianBlur, Pipeline

    with SlideData(mosaic2) as s:
        tile = s.read_tile(s.grid(256)[40])
        assert np.array_equal(MedianBlur(1).F(tile.image), tile.image)
        outs = []
        for steps in ([], [MedianBlur(1)]):
            pipe = Pipeline(steps + [StainNormalizationHE(stain_estimation_method=method)])
            pipe.fit_slide(s)
            outs.append(pipe.steps[-1].F(tile.image))
    assert np.abs(outs[0].astype(int) - outs[1].astype(int)).max() <= 1


def test_concentrations_are_one_named_channel_for_the_steps_after(tmp_path):
    """StainSeparation(output="concentration") leaves one channel, but the pipeline still said R, G, B and H&E:
    a QuantifyCells after it was fitted as on RGB and failed ("expected an (h, w, 3) RGB image")."""
    from histoflow.store import read_h5path
    from histoflow.transforms import NucleusDetectionHE, Pipeline, QuantifyCells

    pipe = Pipeline([NucleusDetectionHE(), StainSeparation(output="concentration"), QuantifyCells(mask_name="nuclei")])
    assert pipe.channel_names_out(["R", "G", "B"]) == ["hematoxylin_concentration"]
    assert StainSeparation(output="image").channel_names_out(["R", "G", "B"]) == ["R", "G", "B"]
    with SlideData(SVS) as s:
        out = s.run(pipe, tmp_path / "c.h5path", executor="inprocess", tile_size=512, overlap=32, progress=False)
    with read_h5path(out) as h:
        cells = h.cells
    assert list(cells.var_names) == ["hematoxylin_concentration"] and cells.n_obs > 1000


def test_sparse_tissue_gets_one_matrix_for_the_slide(tmp_path):
    """Two specks of real H&E on a 2048 px slide of glass average away in the thumbnail: the slide fit gave None
    without a word and every tile then estimated its own matrix. The full-resolution regions at the specks now
    give the slide's; a slide with (almost) no stain says that its tiles will use their own."""
    from datafiles import data_path

    he = cv2.cvtColor(cv2.imread(data_path("he_patches", "tiatoolbox_stain_target.png")), cv2.COLOR_BGR2RGB)
    for speck, fitted in ((24, True), (4, False)):
        canvas = np.full((2048, 2048, 3), 240, np.uint8)
        canvas[40:40 + speck, 40:40 + speck] = he[300:300 + speck, 300:300 + speck]
        canvas[1064:1064 + speck, 1064:1064 + speck] = he[500:500 + speck, 500:500 + speck]
        path = tmp_path / f"sparse{speck}.png"
        cv2.imwrite(str(path), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        with SlideData(str(path)) as slide:
            for t in (StainNormalizationHE(), StainNormalizationHE(stain_estimation_method="vahadane"),
                      StainAugmentation()):
                if fitted:
                    t.fit_slide(slide)
                    m = np.asarray(t.slide_stains_[0])
                    assert m.shape == (2, 3) and m[0] @ m[1] < 0.99  # two distinct stains, hematoxylin first
                    assert m[0, 0] > m[1, 0]  # hematoxylin first: it absorbs red, eosin hardly
                else:
                    with pytest.warns(UserWarning, match="too little stained tissue to estimate the slide's stains"):
                        t.fit_slide(slide)
                    assert t.slide_stains_ is None


def test_stain_matrices_given_in_any_row_order_or_scale_mean_the_same_stains(cmu):
    """normalize_stains took an eosin-first target as it came (the class reorders it): hematoxylin was painted
    with eosin's colour (24.6 grey levels off on average). StainSeparation divided by its rows' lengths: rows
    x 100 gave concentrations 100 times too small, and a negated row was taken (an almost empty stain)."""
    from histoflow.transforms.stain import REFERENCE_MAX_CONCENTRATIONS, augment_stains, normalize_stains

    im = cmu[1000:1256, 1000:1256]
    r, rm = np.asarray(REFERENCE_STAIN_MATRIX), np.asarray(REFERENCE_MAX_CONCENTRATIONS)
    base = normalize_stains(im)
    for target, maxima in ((r[::-1], rm[::-1]), (2 * r, rm / 2), (3 * r[::-1], rm[::-1] / 3)):
        out = normalize_stains(im, target_stain_matrix=target, target_max_concentrations=maxima)
        assert np.abs(out.astype(int) - base).max() <= 1
    from histoflow.transforms.stain import fit_stains

    own, mc = fit_stains(im)  # the source's matrix given eosin-first with its maxima: the same result
    a = normalize_stains(im, stain_matrix=own, max_concentrations=mc)
    b = normalize_stains(im, stain_matrix=np.asarray(own)[::-1], max_concentrations=np.asarray(mc)[::-1])
    assert np.abs(a.astype(int) - b).max() <= 1 and np.abs(a.astype(int) - im).mean() > 1
    dab = StainSeparation("dab", output="concentration").F(im)
    import skimage.color

    hed = skimage.color.rgb_from_hed
    for scale in (1.0, 100.0, 1 / 255):
        same = StainSeparation("dab", stain_matrix=(hed / np.linalg.norm(hed, axis=1)[:, None] * scale).tolist(),
                               output="concentration").F(im)
        assert np.abs(same.astype(int) - dab).max() <= 1
    with pytest.raises(ParameterError, match=r"StainSeparation: stain_matrix rows are stains' optical densities, each "
                                             r"with a positive part \(not negated"):
        StainSeparation("hematoxylin", stain_matrix=[[-0.65, -0.7, -0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    # scikit-image's own matrices, whose residual rows (cross products) mix signs, are taken: H-DAB as skimage
    hdx = StainSeparation("hematoxylin", stain_matrix=skimage.color.rgb_from_hdx.tolist(), output="concentration")
    sk = skimage.color.separate_stains(im, np.linalg.inv(skimage.color.rgb_from_hdx / np.linalg.norm(
        skimage.color.rgb_from_hdx, axis=1)[:, None]))[..., 0] * np.log(1e6)
    ref = np.clip(np.round(sk * 64), 0, 255)
    assert np.mean(np.abs(hdx.F(im)[..., 0].astype(float) - ref) <= 1) > 0.99
    with pytest.raises(ParameterError, match=r"augment_stains: alpha must be one finite number or one per stain \(2\)"):
        augment_stains(im, [1.0, 1.0, 1.0], 0.0)


def test_stain_augmenters_check_their_glass_and_tissue_settings():
    """StainAugment took any background_intensity (-10 blacked out every image, 0 did nothing) and RandStainNA any
    luminosity_threshold (-1: every image unchanged); strings failed with numpy's ValueError."""
    from histoflow.ml.augment import AugmentError, RandStainNA, StainAugment

    for bad in (0, -10, 300, "x", True):
        with pytest.raises(AugmentError, match=r"StainAugment: background_intensity is the glass's intensity"):
            StainAugment(background_intensity=bad)
    stats = dict(means=[70, 10, -5], means_sd=[2, 1, 1], stds=[10, 5, 5], stds_sd=[1, 1, 1])
    for bad in (-1, 0, 1.5, "a"):
        with pytest.raises(AugmentError, match=r"RandStainNA: luminosity_threshold is the lightness"):
            RandStainNA(**stats, luminosity_threshold=bad)
    assert StainAugment(background_intensity=240).background_intensity == 240.0

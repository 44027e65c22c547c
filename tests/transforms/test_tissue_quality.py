"""Tissue detection, white-space and pen-ink labels, and blur QC on real slides and H&E crops."""
import cv2
import numpy as np
import pytest
from datafiles import SVS, data_path
from PIL import Image

import histoflow
from histoflow.core.tile import Tile
from histoflow.errors import PipelineError
from histoflow.transforms.base import Pipeline, Transform
from histoflow.transforms.filters import BoxBlur
from histoflow.transforms.intensity import to_grey
from histoflow.transforms.morphology import BinaryThreshold, MorphOpen
from histoflow.transforms.quality import BlurQC, laplacian_variance
from histoflow.transforms.tissue import (LabelArtifactTileHE, LabelWhiteSpaceHE, TissueDetectionCascade,
                                         TissueDetectionHE, detect_tissue, detect_tissue_cascade, ink_mask)


@pytest.fixture(scope="module")
def slide():
    s = histoflow.open_slide(SVS)
    yield s
    s.close()


@pytest.fixture(scope="module")
def thumb(slide):
    return slide.thumbnail(512)


@pytest.fixture(scope="module")
def white(slide):
    """The top-left corner of CMU-1: glass, with one small fleck of debris."""
    img = slide.read_region((0, 0), 0, (256, 256))
    grey = to_grey(img)
    assert np.median(grey) > 235 and np.mean(grey > 220) > 0.95
    return img


@pytest.fixture(scope="module")
def glass(slide):
    """Blank glass only: the case where an unguarded Otsu splits the noise."""
    img = slide.read_region((1900, 100), 0, (256, 256))
    grey = to_grey(img)
    assert grey.min() > 230
    return img


@pytest.fixture(scope="module")
def tissue(slide):
    img = slide.read_region((1000, 1000), 0, (256, 256))
    assert np.mean(to_grey(img) < 200) > 0.8
    return img


def _he(name):
    return np.asarray(Image.open(data_path("he_patches", name)).convert("RGB"))


@pytest.fixture(scope="module")
def he_crops():
    """256 x 256 crops of every real H&E image at hand."""
    crops = []
    for name in ("tiatoolbox_stain_target.png", "napari_skin_HE.tif", "stardist_histo.jpg"):
        img = _he(name)
        for y in range(0, img.shape[0] - 255, 128):
            for x in range(0, img.shape[1] - 255, 128):
                crops.append(np.ascontiguousarray(img[y:y + 256, x:x + 256]))
    return crops


def _is_mask(m, shape):
    return m.dtype == np.uint8 and m.shape == shape and set(np.unique(m)) <= {0, 1}


# --------------------------------------------------------------------------- tissue detection
def test_tissue_detection_on_thumbnail(slide, thumb):
    d = max(slide.dimensions) / max(thumb.shape[:2])
    mask = detect_tissue(thumb, scale=1 / d)
    assert _is_mask(mask, thumb.shape[:2])
    # CMU-1-Small-Region: a strip of skin over glass, about a third of the slide
    assert 0.28 < mask.mean() < 0.42
    grey = to_grey(thumb)
    assert grey[mask == 1].mean() < 190 < grey[mask == 0].mean()
    # unscaled parameters and the saturation channel agree
    assert 0.28 < detect_tissue(thumb).mean() < 0.42
    sat = detect_tissue(thumb, use_saturation=True, scale=1 / d)
    assert (sat & mask).sum() / (sat | mask).sum() > 0.85


def test_tissue_detection_transform_and_guard(white, glass, tissue):
    t = TissueDetectionHE()
    tile = Tile(image=white, coords=(0, 0), slide_type="HE")
    t.apply(tile)
    assert _is_mask(tile.masks["tissue"], (256, 256)) and tile.masks["tissue"].max() == 0
    assert t.F(glass).max() == 0
    assert TissueDetectionHE(use_saturation=True).F(glass).max() == 0
    # without the guard, Otsu on blank glass marks a good part of it
    assert BinaryThreshold(inverse=True).F(glass).mean() > 0.1
    m = t.F(tissue)
    assert _is_mask(m, (256, 256)) and m.mean() > 0.3
    # full resolution is PathML's recipe exactly; the default half resolution agrees closely
    np.testing.assert_array_equal(TissueDetectionHE(working_downsample=1).F(tissue), detect_tissue(tissue))
    assert (m == detect_tissue(tissue)).mean() > 0.97
    # a fixed threshold instead of Otsu
    assert TissueDetectionHE(threshold=220, min_region_size=100).F(tissue).mean() > 0.9


@pytest.fixture(scope="module")
def fields_on_glass(tmp_path_factory, glass):
    """A slide whose truth is known: two real MoNuSeg fields of view (all tissue, 1000 px) laid on real
    blank glass of CMU-1 (mirror-tiled), off the 256 px tile grid. Returns its path and the truth mask."""
    import tifffile

    h, w = 1536, 2304  # the bottom row of tiles is glass only
    canvas = np.pad(glass, ((0, h - 256), (0, w - 256), (0, 0)), mode="symmetric")
    truth = np.zeros((h, w), bool)
    for name, (x, y) in (("TCGA-MH-A561-01Z-00-DX1", (140, 140)), ("TCGA-UZ-A9PJ-01Z-00-DX1", (1164, 140))):
        canvas[y:y + 1000, x:x + 1000] = np.asarray(Image.open(data_path("monuseg_train", name + ".png")).convert("RGB"))
        truth[y:y + 1000, x:x + 1000] = True
    path = tmp_path_factory.mktemp("fields") / "fields_on_glass.tif"
    tifffile.imwrite(path, canvas, tile=(256, 256), photometric="rgb")
    return path, truth


def _tile_masks(slide, transform):
    w, h = slide.dimensions
    out = np.zeros((h // 256 * 256, w // 256 * 256), np.uint8)
    for y in range(0, out.shape[0], 256):
        for x in range(0, out.shape[1], 256):
            out[y:y + 256, x:x + 256] = transform.F(slide.read_region((x, y), 0, (256, 256)))
    return out


def test_slide_wide_otsu_keeps_whole_tissue_tiles(fields_on_glass, tmp_path):
    """Each tile's own Otsu threshold splits a tile that is all tissue into darker and paler parts (PathML's
    way); the slide's threshold, from its thumbnail of glass and tissue, keeps such tiles whole."""
    path, truth = fields_on_glass
    slide = histoflow.SlideData(path)
    tile_otsu, slide_otsu = TissueDetectionHE(otsu="tile"), TissueDetectionHE()
    slide_otsu.fit_slide(slide)
    assert 150 < slide_otsu.slide_threshold_ < 235  # between the tissue and the glass
    per_tile, per_slide = _tile_masks(slide, tile_otsu), _tile_masks(slide, slide_otsu)

    def iou(m):
        return np.logical_and(m, truth).sum() / np.logical_or(m, truth).sum()

    assert iou(per_slide) > 0.9 and iou(per_slide) > iou(per_tile) + 0.2
    inside = [(y, x) for y in range(0, 1536, 256) for x in range(0, 2304, 256) if truth[y:y + 256, x:x + 256].all()]
    assert len(inside) == 18
    assert min(per_slide[y:y + 256, x:x + 256].mean() for y, x in inside) > 0.9  # measured 0.955
    assert np.mean([per_tile[y:y + 256, x:x + 256].mean() for y, x in inside]) < 0.5  # measured 0.24
    outside = [(y, x) for y in range(0, 1536, 256) for x in range(0, 2304, 256) if not truth[y:y + 256, x:x + 256].any()]
    assert len(outside) == 9
    for y, x in outside:  # blank glass: nothing, either way
        assert not per_slide[y:y + 256, x:x + 256].any() and not per_tile[y:y + 256, x:x + 256].any()
    assert per_slide[~truth].mean() < 0.01  # the fields' outlines, a few pixels out
    # saturation too, and a slide run fits the transform before the first tile, on every executor
    sat = TissueDetectionHE(use_saturation=True)
    sat.fit_slide(slide)
    assert iou(_tile_masks(slide, sat)) > 0.9
    out = slide.run(Pipeline([TissueDetectionHE()]), tmp_path / "f.h5path", executor="threads", workers=2,
                    progress=False)
    with histoflow.read_h5path(out) as h5:
        for t in h5:
            x, y = t.coords
            np.testing.assert_array_equal(t.masks["tissue"][:min(256, 1536 - y), :min(256, 2304 - x)],
                                          per_slide[y:y + 256, x:x + 256])


def test_slide_wide_otsu_falls_back_to_the_tiles_own(slide):
    """A view with no glass beside the tissue (a field of view) or no tissue: each tile's own threshold."""
    class View:
        def __init__(self, image):
            self.image, self.dimensions = image, (image.shape[1], image.shape[0])

        def thumbnail(self, size):
            return self.image

    field = np.asarray(Image.open(data_path("monuseg_train", "TCGA-MH-A561-01Z-00-DX1.png")).convert("RGB"))
    for image in (field, np.full((512, 512, 3), 240, np.uint8)):
        for kw in ({}, {"use_saturation": True}):
            t = TissueDetectionHE(**kw)
            t.fit_slide(View(image))
            assert t.slide_threshold_ is None
            np.testing.assert_array_equal(t.F(field[:256, :256]), TissueDetectionHE(otsu="tile", **kw).F(field[:256, :256]))
    t = TissueDetectionHE(threshold=200)
    t.fit_slide(slide)  # a fixed threshold stays
    assert t.slide_threshold_ is None and t._threshold() == 200
    t = TissueDetectionHE()
    t.fit_slide(slide)
    assert 170 < t.slide_threshold_ < 200  # CMU-1: tissue under ~170 grey, glass ~244
    assert Transform.from_dict(t.to_dict()) == t and "otsu" in t.to_dict()["TissueDetectionHE"]


def test_tissue_detection_uint16_same_as_uint8(tissue):
    np.testing.assert_array_equal(detect_tissue(tissue.astype(np.uint16) * 257), detect_tissue(tissue))


def test_cascade_recipe(thumb, white, glass, tissue):
    mask = TissueDetectionCascade().F(thumb)
    assert _is_mask(mask, thumb.shape[:2])
    assert 0.28 < mask.mean() < 0.45
    he = detect_tissue(thumb, scale=0.17)
    assert (he & mask).sum() / (he | mask).sum() > 0.8
    # by hand: saturation > 20, then closing 5x5 and 3x3
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[:, :, 1]
    ref = (sat > 20).astype(np.uint8)
    for k in (5, 3):
        ref = cv2.morphologyEx(ref, cv2.MORPH_CLOSE, np.ones((k, k), np.uint8))
    np.testing.assert_array_equal(mask, ref)
    assert detect_tissue_cascade(glass).max() == 0
    assert detect_tissue_cascade(white).mean() < 0.05          # only the fleck of debris
    assert detect_tissue_cascade(tissue).mean() > 0.95
    tile = Tile(image=tissue, coords=(1000, 1000))
    TissueDetectionCascade(mask_name="fg").apply(tile)
    assert "fg" in tile.masks


# --------------------------------------------------------------------------- labels
def test_white_space_label(white, glass, tissue):
    t = LabelWhiteSpaceHE()
    for img, expected in ((white, True), (glass, True), (tissue, False)):
        tile = Tile(image=img, coords=(0, 0))
        t.apply(tile)
        assert tile.labels["white_space"] is expected
        assert expected == (np.mean(to_grey(img) > 230) > 0.9)      # PathML semantics
    assert LabelWhiteSpaceHE(proportion_threshold=0.99).F(white) is False     # 97% of it is above 230


def _pen(img, colour, seed=0, n=4, thickness=24, alpha=0.8):
    """Strokes of ink drawn across a copy of ``img``, ``alpha`` opaque (scanned ink lets some tissue through)."""
    ink = img.copy()
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    for i in range(n):
        y0, y1 = (int(v) for v in rng.integers(0, h, 2))
        cv2.line(ink, (0, y0 + i * 10), (w - 1, y1), colour, thickness, cv2.LINE_AA)
    return cv2.addWeighted(ink, alpha, img, 1 - alpha, 0)


INKS = {"blue": (40, 60, 190), "green": (40, 150, 70), "black": (30, 30, 35), "navy": (20, 30, 110),
        "dark green": (20, 80, 40)}


@pytest.mark.parametrize("ink", sorted(INKS))
def test_pen_marks_flagged(he_crops, tissue, ink):
    t = LabelArtifactTileHE()
    for i, crop in enumerate([tissue] + he_crops[::7]):
        marked = _pen(crop, INKS[ink], seed=i)
        tile = Tile(image=marked, coords=(0, 0), slide_type="HE")
        t.apply(tile)
        assert tile.labels["artifact"] is True, (ink, i)
        assert ink_mask(marked).mean() > ink_mask(crop).mean() + 0.2


def test_real_he_not_flagged(he_crops, tissue, white, glass, thumb):
    t = LabelArtifactTileHE()
    for i, crop in enumerate(he_crops + [tissue, white, glass, np.ascontiguousarray(thumb[:256, :256])]):
        assert t.F(crop) is False, i
    # a single thin stroke does not dominate a tissue tile
    assert not t.F(_pen(tissue, INKS["blue"], n=1, thickness=3))


def test_cmu1_tiles_flagged_only_for_marking_dye(slide):
    """Every 256 x 256 tile of CMU-1: none with mostly tissue is flagged; the few flagged ones are edge tiles
    carrying the lab's cyan-green tissue-marking dye (ink of a pen's colour, so rightly flagged)."""
    w, h = slide.dimensions
    img = slide.read_region((0, 0), 0, (w, h))
    t = LabelArtifactTileHE()
    flagged = 0
    for y in range(0, h - 255, 256):
        for x in range(0, w - 255, 256):
            crop = np.ascontiguousarray(img[y:y + 256, x:x + 256])
            if not t.F(crop):
                continue
            flagged += 1
            hsv = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV)
            glass = (hsv[..., 2] >= 200) & (hsv[..., 1] < 25)
            dye = (hsv[..., 0] >= 35) & (hsv[..., 0] <= 100) & (hsv[..., 1] >= 60)
            assert glass.mean() > 0.5 and dye.mean() > 0.03, (x, y)
    assert flagged <= 4


# --------------------------------------------------------------------------- blur QC
def test_blur_qc(he_crops, tissue):
    t = BlurQC()
    for img in (tissue, he_crops[0], he_crops[-1]):
        tile = Tile(image=img, coords=(0, 0))
        t.apply(tile)
        assert isinstance(tile.labels["laplacian_variance"], float)
        assert tile.labels["laplacian_variance"] > 200 and tile.labels["blur"] is False
        blurred = cv2.GaussianBlur(img, (0, 0), 3)
        tile = Tile(image=blurred, coords=(0, 0))
        t.apply(tile)
        assert tile.labels["laplacian_variance"] < 100 and tile.labels["blur"] is True
    grey = cv2.cvtColor(tissue, cv2.COLOR_RGB2GRAY)
    assert laplacian_variance(tissue) == pytest.approx(cv2.Laplacian(grey, cv2.CV_64F).var())
    # uint16 on the same 0-255 scale; one channel of a multiplex image
    assert laplacian_variance(tissue.astype(np.uint16) * 257) == pytest.approx(laplacian_variance(tissue), rel=0.01)
    mibi = histoflow.open_slide(data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff"))
    mibi = mibi.read_region((0, 0), 0, (128, 128))
    assert laplacian_variance(mibi, channel=0) >= 0
    with pytest.raises(ValueError):
        BlurQC(label_name="x", score_name="x")


# --------------------------------------------------------------------------- serialisation and pipelines
ALL = [TissueDetectionHE(), TissueDetectionHE("fg", True, 9, 200, 2, 5, 100, 50, True),
       TissueDetectionCascade(), TissueDetectionCascade("t2", 25, [7, 5, 3]), LabelWhiteSpaceHE(),
       LabelWhiteSpaceHE("ws", 0.8, 220), LabelArtifactTileHE(), LabelArtifactTileHE("pen", 0.5, 0.1),
       BlurQC(), BlurQC("oof", "lv", 50.0, 0)]


@pytest.mark.parametrize("t", ALL, ids=lambda t: repr(t)[:40])
def test_round_trip(t):
    back = Transform.from_dict(t.to_dict())
    assert back == t and type(back) is type(t)


def test_pipeline(tissue):
    pipe = Pipeline([TissueDetectionHE(mask_name="tissue"), MorphOpen("tissue", 3), BoxBlur(3, mask_name="tissue"),
                     LabelWhiteSpaceHE(), LabelArtifactTileHE(), BlurQC()])
    assert set(pipe.labels_out) == {"white_space", "artifact", "blur", "laplacian_variance"}
    tile = Tile(image=tissue, coords=(1000, 1000), slide_type="HE")
    pipe.apply(tile)
    assert tile.masks["tissue"].mean() > 0.3
    assert tile.labels == {"white_space": False, "artifact": False, "blur": False,
                           "laplacian_variance": tile.labels["laplacian_variance"]}
    assert Pipeline.from_yaml(pipe.to_yaml()) == pipe
    pipe.check(slide_type="IHC")
    with pytest.raises(PipelineError, match="TissueDetectionHE"):
        pipe.check(slide_type="IF")
    with pytest.raises(PipelineError, match=r"MorphOpen.*'tissue'"):
        Pipeline([TissueDetectionHE(mask_name="fg"), MorphOpen("tissue")])
    Pipeline([TissueDetectionCascade(mask_name="fg"), MorphOpen("fg")])


def test_parameters_validated():
    for make in (lambda: TissueDetectionHE(blur_ksize=4), lambda: TissueDetectionHE(mask_name=None),
                 lambda: TissueDetectionHE(otsu="image"),
                 lambda: TissueDetectionCascade(close_kernel_sizes=5),
                 lambda: LabelWhiteSpaceHE(proportion_threshold=2),
                 lambda: LabelArtifactTileHE(min_ink_fraction=-0.1), lambda: BlurQC(threshold="high")):
        with pytest.raises(ValueError):
            make()


def test_tile_labels_of_edge_tiles_describe_the_slide_not_the_fill():
    """A tile overhanging the slide's edge is filled with white past its extent: BlurQC scored the edge between
    tissue and fill (a blurred tile came out sharp) and LabelWhiteSpaceHE counted
    the fill (a tile of tissue inside the slide was called white space)."""
    import cv2

    from histoflow.core.slide import SlideData
    from histoflow.core.tile import Tile
    from histoflow.transforms import BlurQC, LabelWhiteSpaceHE

    with SlideData(SVS) as s:
        tissue = np.ascontiguousarray(s.read_region((1000, 1200), 0, (256, 256))[..., :3])
    blurred = cv2.GaussianBlur(tissue, (0, 0), 3)
    image = np.full_like(blurred, 255)
    image[:, :20] = blurred[:, :20]  # 20 px inside the slide, 92 % fill
    edge = Tile(image=image, coords=(2200, 1200), level=0, downsample=1.0, extent=(20, 256))
    whole = Tile(image=blurred.copy(), coords=(1000, 1200), level=0, downsample=1.0)
    for t in (edge, whole):
        BlurQC().apply(t)
        LabelWhiteSpaceHE().apply(t)
    assert whole.labels["blur"] and edge.labels["blur"]
    assert edge.labels["laplacian_variance"] < 2 * whole.labels["laplacian_variance"] + 5
    assert not whole.labels["white_space"] and not edge.labels["white_space"]


def test_saturation_tissue_detection_takes_half_float_tiles():
    """TissueDetectionHE(use_saturation=True) failed on float16 tiles (OpenCV cannot resample them); they now
    give the mask of the same tile in float32 (and in uint8)."""
    from histoflow.core.slide import SlideData
    from histoflow.transforms import TissueDetectionHE

    with SlideData(SVS) as s:
        img = np.ascontiguousarray(s.read_region((800, 800), 0, (256, 256))[..., :3])
    td = TissueDetectionHE(use_saturation=True, otsu="tile")
    half = td.F((img / 255).astype(np.float16))
    assert np.array_equal(half, td.F((img / 255).astype(np.float32))) and half.any()


def _he_crop():
    import cv2
    from datafiles import data_path

    path = data_path("monuseg_train", "TCGA-21-5784-01Z-00-DX1.png")
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)[:256, :256]


def test_float_tiles_with_no_data_or_on_the_0_255_scale():
    """NaN (no data) was cast to 0, black: half a glass tile of NaN came out as tissue. Floats on the 0-255 scale
    (astype(float)) were clipped to white: a tissue tile had no tissue and was white space. NaN is glass now, and
    0-255 floats are refused as out-of-range integers are."""
    from histoflow.errors import ParameterError
    from histoflow.transforms import LabelWhiteSpaceHE, TissueDetectionHE

    img = np.full((256, 256, 3), 0.95, np.float32)
    img[:, 128:] = np.nan
    for t in (TissueDetectionHE(otsu="tile"), TissueDetectionHE(threshold=200),
              TissueDetectionHE(use_saturation=True, otsu="tile")):
        assert t.F(img).sum() == 0
    assert LabelWhiteSpaceHE().F(img)
    he = _he_crop()
    assert np.array_equal(TissueDetectionHE(otsu="tile").F(he / 255.0), TissueDetectionHE(otsu="tile").F(he))
    with pytest.raises(ParameterError, match=r"floats in \[0, 1\]; got float64 values up to 25\d.*divide .* by 255"):
        TissueDetectionHE(otsu="tile").F(he.astype(float))


def test_focus_scores_of_other_integer_dtypes_and_of_no_data():
    """An int64 copy of a sharp uint8 tile scored 0 (scaled by int64's range) and was labelled blurred; a float
    tile with one NaN scored NaN."""
    from histoflow.transforms import BlurQC
    from histoflow.transforms.quality import laplacian_variance

    he = _he_crop()
    sharp = laplacian_variance(he)
    assert sharp > 200
    for a in (he.astype(np.int64), he.astype(np.int32), he.astype(np.uint32)):
        assert laplacian_variance(a) == pytest.approx(sharp, rel=1e-3)
    assert laplacian_variance(he.astype(np.int32) * 257) == pytest.approx(laplacian_variance(he.astype(np.uint16) * 257),
                                                                         rel=1e-4)
    assert BlurQC().F(he.astype(np.int64)) >= BlurQC().threshold  # not labelled blurred
    f = he / 255.0
    f[:40] = np.nan
    assert np.isfinite(laplacian_variance(f)) and laplacian_variance(f) > 200
    assert np.isnan(laplacian_variance(np.full((8, 8), np.nan)))


def test_focus_scores_of_a_16_bit_slide_in_wider_integers_are_alike(tmp_path):
    """Tiles of a 16-bit slide that reach BlurQC as int32 were scaled by each tile's values: a dim one (max 255 or
    less) was taken for 8-bit and scored 66,049x higher than the same pixels as uint16. After fit_slide they are
    scored on the slide's 16 bits."""
    import tifffile

    from histoflow.transforms import BlurQC
    from histoflow.transforms.quality import laplacian_variance

    rng = np.random.default_rng(0)
    img = rng.integers(0, 200, (64, 128)).astype(np.uint16)
    img[:, 64:] = rng.integers(0, 4000, (64, 64))
    tifffile.imwrite(tmp_path / "s16.tif", img)
    t = BlurQC()
    with histoflow.SlideData(str(tmp_path / "s16.tif")) as s:
        t.fit_slide(s)
    assert t.full_scale_ == 65535
    for part in (img[:, :64], img[:, 64:]):
        assert t.F(part.astype(np.int32)) == pytest.approx(laplacian_variance(part), rel=1e-9)

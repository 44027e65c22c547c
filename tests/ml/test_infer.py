"""Slide-level inference through the engine on the real CMU-1 slide: heatmaps and stitched masks."""
import numpy as np
import pytest
import torch
from datafiles import SVS

from histoflow.core.slide import SlideData
from histoflow.ml import models
from histoflow.ml.onnx import export_onnx
from histoflow.ml.transforms import PatchClassification, SemanticSegmentation
from histoflow.store import read_h5path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    net = models.create("mobilenet_v2", num_classes=2, head="paper", width_mult=0.5).eval()
    path = tmp_path_factory.mktemp("m") / "cls.pt"
    models.save(net, path, card={"classes": ["normal", "tumour"]})
    return str(path)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    torch.manual_seed(1)
    net = models.create("unet", in_channels=3, out_channels=3, filters=(8, 16, 32)).eval()
    path = tmp_path_factory.mktemp("m") / "seg.pt"
    models.save(net, path)
    return str(path)


def _probs(path, image):
    net = models.load(path)
    x = torch.from_numpy(image.transpose(2, 0, 1).copy())[None].float() / 255
    with torch.no_grad():
        return torch.softmax(net(x), 1)[0].numpy()


def test_patch_classifier_heatmap(tmp_path, classifier):
    with SlideData(SVS) as s:
        out = s.run(PatchClassification(classifier), str(tmp_path / "c.h5path"), tile_size=256, level=0,
                    executor="inprocess", progress=False)
        dims = s.dimensions
    with read_h5path(out) as h:
        assert {"prob_normal", "prob_tumour", "prob_class"} <= set(h.tile_label_names)
        heat = h.masks["heatmap_tumour"]
        assert h.mask_downsample("heatmap_tumour") == 256
        assert heat.shape == (int(np.ceil(dims[1] / 256)), int(np.ceil(dims[0] / 256)))
        for i in (0, 7, len(h) - 1):
            t = h.tile(i)
            p = _probs(classifier, t.image)  # the stored tile is the one the model saw
            assert t.labels["prob_tumour"] == pytest.approx(p[1], abs=1e-5)
            assert t.labels["prob_class"] == ["normal", "tumour"][int(p.argmax())]
            assert heat[t.coords[1] // 256, t.coords[0] // 256] == pytest.approx(p[1], abs=1e-5)
        np.testing.assert_allclose(h.masks["heatmap_normal"] + heat, 1, atol=1e-5)


@pytest.mark.parametrize("mpp", [1.0, 0.75])
def test_a_heatmap_cell_of_a_resampled_run_is_its_tile(tmp_path, mpp):
    """At a target µm/px the tiles lie at rounded level-0 coordinates and the heatmap's cells at multiples of the
    fractional tile width: a cell mixed in a sliver of its neighbour (8 of 30 cells off by more than 1e-4 at
    1 µm/px, 19 of 48 at 0.75). Constants are placed where the grid put the tile, in its level's pixels."""
    class Dark(torch.nn.Module):  # the tile's darkness: a probability that differs from tile to tile
        def forward(self, x):
            g = x[:, :3].mean((1, 2, 3))[:, None]
            return torch.cat([torch.zeros_like(g), 20 * (0.8 - g)], 1)

    dark = str(export_onnx(Dark(), tmp_path / "dark.onnx", input_shape=(1, 3, 256, 256)))
    with SlideData(SVS) as s:
        out = s.run(PatchClassification(dark, classes=["normal", "tumour"]), str(tmp_path / "c.h5path"),
                    tile_size=256, mpp=mpp, executor="inprocess", progress=False)
    with read_h5path(out) as h:
        heat, ds = h.masks["heatmap_tumour"], h.mask_downsample("heatmap_tumour")
        assert np.ptp([h.tile(i).labels["prob_tumour"] for i in range(len(h))]) > 0.5
        assert ds == pytest.approx(256 * h.tile(0).downsample)
        off = 0
        for i in range(len(h)):
            t = h.tile(i)
            cx, cy = t.coords[0] + 128 * t.downsample, t.coords[1] + 128 * t.downsample
            off += abs(heat[int(cy // ds), int(cx // ds)] - t.labels["prob_tumour"]) > 1e-6
        assert len(h) > 25 and off == 0


def test_patch_classifier_onnx_equals_torch(tmp_path, classifier):
    net = models.load(classifier)
    onnx_path = export_onnx(net, tmp_path / "cls.onnx", input_shape=(1, 3, 128, 128))
    with SlideData(SVS) as s:
        spec = s.grid(128)[5]
        tile = s.read_tile(spec)
    a = PatchClassification(classifier).F(tile.image)
    b = PatchClassification(str(onnx_path), classes=["normal", "tumour"]).F(tile.image)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_segmentation_stitching_blends_overlaps(tmp_path, segmenter):
    with SlideData(SVS) as s:
        out = s.run(SemanticSegmentation(segmenter, heatmap_downsample=1), str(tmp_path / "s.h5path"),
                    tile_size=256, overlap=64, level=0, executor="inprocess", progress=False)
        dims = s.dimensions
        # the same region predicted directly: a tile's centre, covered by that tile alone, matches
        tile = s.read_tile(s.grid(256, overlap=64)[14])
    with read_h5path(out) as h:
        seg = h.masks["segmentation"]
        probs = np.stack([h.masks[f"segmentation_prob_{c}"] for c in "012"])
    assert seg.shape == (dims[1], dims[0]) and seg.dtype == np.uint8
    assert not np.isnan(probs).any()
    np.testing.assert_allclose(probs.sum(0), 1, atol=0.02)
    p = _probs(segmenter, tile.image)
    x, y = tile.coords
    centre = (slice(y + 64, y + 192), slice(x + 64, x + 192))
    # per-tile masks are stored as uint8 (1/255 steps) and blended where tiles overlap
    assert np.abs(probs[(slice(None),) + centre] - p[:, 64:192, 64:192]).max() < 0.01
    assert (seg[centre] == p.argmax(0)[64:192, 64:192]).mean() > 0.99


def test_heatmap_boxes_at_any_downsample():
    """Tile values painted at a downsample that does not divide the tile size: a heatmap pixel is the mean of
    the boxes covering it, weighted by the area each covers (boxes used to snap to rounded pixels: at an
    overlap, a tile could land wholly in the next pixel, one pixel averaging three tiles, its neighbour one)."""
    from histoflow.ml.transforms import _Heatmap

    for ds in (3, 7, 120):
        hm = _Heatmap((1024, 512), ds, 1)
        for y in (0, 256):
            for x in (0, 256, 512, 768):
                hm.add(x, y, 256, 256, np.array([x / 1024 + y / 512], np.float32))
        full = hm.weight[: 512 // ds, : 1024 // ds]  # pixels wholly inside the slide
        np.testing.assert_allclose(full, 1, atol=1e-6, err_msg=str(ds))  # covered once, in parts or whole
        out = hm.result()[0]
        assert out[384 // ds, 640 // ds] == pytest.approx(512 / 1024 + 256 / 512), ds  # wholly in one tile
        if 256 % ds:  # the pixel across x = 256 on the first row: 256 % ds of it from the first tile
            a = (256 % ds) / ds
            assert out[0, 256 // ds] == pytest.approx(a * 0 + (1 - a) * 0.25, abs=1e-6), ds
    # overlapping tiles (256 px, stride 128) painting their cores: at a downsample of 64 each pixel has one tile
    hm = _Heatmap((1024, 256), 64, 1)
    for k, x in enumerate(range(0, 1024 - 128, 128)):
        c0 = 0 if x == 0 else 64
        c1 = 256 if x + 256 >= 1024 else 192
        hm.add(x + c0, 0, c1 - c0, 256, np.array([k], np.float32))
    np.testing.assert_allclose(hm.weight, 1, atol=1e-6)
    assert hm.result()[0, 0].tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6]


def test_segmentation_pads_to_the_model_divisor(tmp_path):
    torch.manual_seed(0)
    deep = tmp_path / "deep.pt"
    models.save(models.create("unet", in_channels=3, out_channels=2, filters=(4,) * 7), deep)  # divisor 64
    img = np.random.default_rng(0).integers(0, 256, (160, 96, 3), np.uint8)
    p = SemanticSegmentation(str(deep)).F(img)
    assert p.shape == (2, 160, 96)
    np.testing.assert_allclose(p.sum(0), 1, atol=1e-5)
    onnx = export_onnx(models.load(deep), tmp_path / "deep.onnx", input_shape=(1, 3, 128, 128),
                       dynamic_spatial=True)
    np.testing.assert_allclose(SemanticSegmentation(str(onnx)).F(img), p, atol=1e-4)


class _Darkness(torch.nn.Module):
    """A per-pixel 'segmenter': class 1's logit is 20 x (0.7 - grey), so the true map is known everywhere."""

    def forward(self, x):
        g = x[:, :3].mean(1, keepdim=True)
        return torch.cat([torch.zeros_like(g), 20 * (0.7 - g)], 1)


@pytest.mark.parametrize("overlap", [0, 64])
def test_stitched_map_is_right_up_to_the_slide_edges(tmp_path, overlap):
    """Edge tiles reach past the slide (padded): their maps are cut at the slide's edge, not squeezed into
    the part inside it (which shifted the last row and column of the stitched map)."""
    onnx_path = export_onnx(_Darkness(), tmp_path / "dark.onnx", input_shape=(1, 3, 64, 64), dynamic_spatial=True)
    with SlideData(SVS) as s:
        out = s.run(SemanticSegmentation(str(onnx_path)), str(tmp_path / "s.h5path"), tile_size=512,
                    overlap=overlap, executor="inprocess", progress=False)
        w, h = s.dimensions
        image = s.reader.read_region((0, 0), 0, (w, h))[..., :3].astype(np.float32) / 255
        last = s.grid(512, overlap=overlap)[-1]
    with read_h5path(out) as f:
        stitched = np.asarray(f.masks["segmentation_prob_1"])
    truth = 1 / (1 + np.exp(-20 * (0.7 - image.mean(2))))
    assert stitched.shape == truth.shape
    diff = np.abs(stitched - truth)
    assert last.x + 512 > w and last.y + 512 > h  # the last tiles do overhang the slide
    assert diff[:, last.x:].max() < 0.01 and diff[last.y:, :].max() < 0.01  # last column and row
    assert diff.max() < 0.01


class _MeanDarkness(torch.nn.Module):
    """A 'patch classifier' whose class-1 logit is 20 x (0.7 - mean grey): the probability is known."""

    def forward(self, x):
        g = x[:, :3].mean((1, 2, 3))[:, None]
        return torch.cat([torch.zeros_like(g), 20 * (0.7 - g)], 1)


class _OneLogit(torch.nn.Module):
    """A binary model with a single (sigmoid) output: darkness, as a patch logit or a pixel map."""

    def __init__(self, per_pixel):
        super().__init__()
        self.per_pixel = per_pixel

    def forward(self, x):
        g = x[:, :3].mean(1, keepdim=True)
        return 20 * (0.7 - g) if self.per_pixel else 20 * (0.7 - g.mean((2, 3)))


def test_patch_heatmap_of_overlapping_tiles_gives_each_pixel_its_owner(tmp_path):
    """Overlapping tiles paint the part of the slide they own (their core, carried through the journal): at a
    heatmap downsample dividing the stride and half the overlap, the pixel under each tile's centre is that
    tile's probability (with snapping to rounded cells, 334 of 391 tiles were not)."""
    model = export_onnx(_MeanDarkness(), tmp_path / "c.onnx", input_shape=(1, 3, 256, 256))
    with SlideData(SVS) as s:
        out = s.run(PatchClassification(str(model), classes=["light", "dark"], heatmap_downsample=64),
                    str(tmp_path / "o.h5path"), tile_size=256, overlap=128, executor="inprocess", progress=False)
    with read_h5path(out) as h:
        heat = np.asarray(h.masks["heatmap_dark"])
        assert h.mask_downsample("heatmap_dark") == 64
        assert len(h) > 300
        for i in range(len(h)):
            t = h.tile(i)
            x, y = t.coords
            assert heat[(y + 128) // 64, (x + 128) // 64] == pytest.approx(t.labels["prob_dark"], abs=1e-6)


def test_two_classifiers_need_two_heatmap_names(tmp_path):
    """Two PatchClassification steps wrote the same heatmap_<class> masks, the second silently replacing the
    first: refused before any tile, and kept apart with heatmap_prefix."""
    from histoflow import PipelineError
    from histoflow.transforms import Pipeline

    model = str(export_onnx(_MeanDarkness(), tmp_path / "c.onnx", input_shape=(1, 3, 512, 512)))
    a = PatchClassification(model, classes=["light", "dark"], label_prefix="a_")
    with SlideData(SVS) as s:
        with pytest.raises(PipelineError, match="would both write the slide masks heatmap_<class>"):
            s.run(Pipeline([a, PatchClassification(model, classes=["dark", "light"], label_prefix="b_")]),
                  str(tmp_path / "x.h5path"), tile_size=512, executor="inprocess", progress=False)
        assert not (tmp_path / "x.h5path").exists()
        b = PatchClassification(model, classes=["dark", "light"], label_prefix="b_", heatmap_prefix="heatmap_b_")
        out = s.run(Pipeline([a, b]), str(tmp_path / "o.h5path"), tile_size=512, executor="inprocess",
                    progress=False)
    with read_h5path(out) as h:
        t = h.tile(3)
        ha, hb = h.masks["heatmap_dark"], h.masks["heatmap_b_light"]
        cell = t.coords[1] // 512, t.coords[0] // 512
        assert ha[cell] == pytest.approx(t.labels["a_dark"], abs=1e-6)
        assert hb[cell] == pytest.approx(t.labels["b_light"], abs=1e-6)


def test_single_output_models_are_sigmoids(tmp_path):
    """A model with one output channel gave probability 1 everywhere (a softmax over one channel)."""
    cls = export_onnx(_OneLogit(False), tmp_path / "c1.onnx", input_shape=(1, 3, 64, 64), dynamic_spatial=True)
    seg = export_onnx(_OneLogit(True), tmp_path / "s1.onnx", input_shape=(1, 3, 64, 64), dynamic_spatial=True)
    white, dark = np.full((64, 64, 3), 250, np.uint8), np.full((64, 64, 3), 60, np.uint8)
    for img in (white, dark):
        expect = 1 / (1 + np.exp(-20 * (0.7 - img[0, 0, 0] / 255)))
        np.testing.assert_allclose(PatchClassification(str(cls)).F(img), [1 - expect, expect], atol=1e-5)
        p = SemanticSegmentation(str(seg)).F(img)
        assert p.shape == (2, 64, 64)
        np.testing.assert_allclose(p[1], expect, atol=1e-5)
        np.testing.assert_allclose(p.sum(0), 1, atol=1e-6)


def test_stitched_argmax_marks_where_no_tile_ran(tmp_path):
    """Pixels no tile covered (tissue filter) are 255 in the argmax mask, not class 0."""
    from histoflow.ml.transforms import NOT_PREDICTED

    model = export_onnx(_Darkness(), tmp_path / "dark.onnx", input_shape=(1, 3, 64, 64), dynamic_spatial=True)
    with SlideData(SVS) as s:
        out = s.run(SemanticSegmentation(str(model), classes=["light", "dark"], heatmap_downsample=8),
                    str(tmp_path / "s.h5path"), tile_size=256, tissue_filter=0.9, executor="inprocess",
                    progress=False)
    with read_h5path(out) as h:
        arg, prob = np.asarray(h.masks["segmentation"]), np.asarray(h.masks["segmentation_prob_dark"])
    none = np.isnan(prob)
    assert 0 < none.mean() < 1
    assert (arg[none] == NOT_PREDICTED).all() and (arg[~none] <= 1).all()


def test_slide_maps_too_large_are_refused(tmp_path):
    from histoflow.errors import RegionTooLargeError
    from histoflow.ml import transforms as mt
    from histoflow.core.tile import Tile

    (tmp_path / "unused.onnx").write_bytes(b"")
    seg = SemanticSegmentation(str(tmp_path / "unused.onnx"))
    seg._dims, seg._slide_path, seg._maps = (150_000, 100_000), "big.svs", None
    tile = Tile(image=np.zeros((4, 4, 3), np.uint8), coords=(0, 0))
    with pytest.raises(RegionTooLargeError, match=r"big.svs: SemanticSegmentation's slide-level maps would be "
                                                  r"150000 x 100000 pixels x 2 classes .*heatmap_downsample"):
        seg._paint(tile, np.zeros((2, 4, 4), np.float32))
    assert mt.MAX_HEATMAP_PIXELS < 150_000 * 100_000


def test_a_model_of_the_wrong_kind_is_named(classifier, segmenter):
    """A classifier given to SemanticSegmentation (or a segmenter to PatchClassification) failed with numpy's
    IndexError / TypeError, naming neither the model nor the mix-up."""
    from histoflow.errors import HistoflowError

    with SlideData(SVS) as s:
        image = s.read_tile(s.grid(128)[5]).image
    with pytest.raises(HistoflowError, match=r"cls.pt: SemanticSegmentation needs a segmentation model, whose output "
                                             r"is \(N, classes, H, W\); this model gives \(1, 2\)"):
        SemanticSegmentation(classifier).F(image)
    with pytest.raises(HistoflowError, match=r"seg.pt: PatchClassification needs a classifier, whose output is "
                                             r"\(N, classes\); this model gives \(1, 3, 128, 128\)"):
        PatchClassification(segmenter).F(image)


def test_nucleus_model_threads_reach_the_onnx_session(tmp_path):
    from histoflow.ml.transforms import _runner

    torch.manual_seed(0)
    net = models.create("unet", in_channels=3, out_channels=4, filters=(4, 8)).eval()
    models.save(net, tmp_path / "nuc.pt", card={"mpp": 0.5})
    one, two = (_runner(str(tmp_path / "nuc.pt"), "onnx", n) for n in (1, 2))
    assert one is not two   # the thread count is part of the cache key: the first value no longer wins
    opts = [r.session.session.get_session_options().intra_op_num_threads for r in (one, two)]
    assert opts == [1, 2]


def test_two_model_steps_whose_names_share_a_prefix_keep_to_their_own_outputs(tmp_path, classifier, segmenter):
    """Stitching found a model's outputs by name prefix alone: SemanticSegmentation "tumour" took the masks of a
    second step "tumour_bed" as classes of its own (its stitched argmax gained classes it does not have), and a
    PatchClassification with label_prefix "prob_" read the other's "prob_grade_class" (a class name) as a
    probability and crashed."""
    from histoflow.transforms import Pipeline

    def run(steps, name):
        with SlideData(SVS) as s:
            out = s.run(Pipeline(steps), str(tmp_path / name), tile_size=256, mpp=2.0, executor="inprocess",
                        progress=False)
        with read_h5path(out) as h:
            return {k: np.asarray(h.masks[k]) for k in h.masks}

    alone = run([SemanticSegmentation(segmenter, mask_name="tumour", heatmap_downsample=16)], "a.h5path")
    both = run([SemanticSegmentation(segmenter, mask_name="tumour", heatmap_downsample=16),
                SemanticSegmentation(segmenter, mask_name="tumour_bed", heatmap_downsample=16)], "b.h5path")
    assert {"tumour_prob_0", "tumour_prob_1", "tumour_prob_2"} <= set(both)
    assert not any(k.startswith("tumour_prob_bed") for k in both)
    np.testing.assert_array_equal(both["tumour"], alone["tumour"])
    np.testing.assert_array_equal(both["tumour_bed"], alone["tumour"])  # the same model: the same map
    alone = run([PatchClassification(classifier)], "c.h5path")
    both = run([PatchClassification(classifier),
                PatchClassification(classifier, label_prefix="prob_grade_", heatmap_prefix="grade_")], "d.h5path")
    assert set(both) == {"heatmap_normal", "heatmap_tumour", "grade_normal", "grade_tumour"}
    np.testing.assert_array_equal(both["heatmap_tumour"], alone["heatmap_tumour"])
    np.testing.assert_array_equal(both["grade_tumour"], alone["heatmap_tumour"])


def test_model_inputs_are_scaled_as_training_tiles_are():
    """Inference scaled uint8 and uint16 tiles to [0, 1] but passed uint32 ones as raw counts, which training
    (TileDataset, WSIPatchDataset) scales by the dtype's maximum too."""
    from histoflow.ml.data import _image_tensor
    from histoflow.ml.transforms import _as_input

    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.uint16, np.uint32, np.float32, bool):
        info = np.iinfo(dtype).max if np.dtype(dtype).kind == "u" else 1
        img = (rng.random((8, 6, 3)) * info).astype(dtype)
        np.testing.assert_allclose(_as_input(img, True)[0], _image_tensor(img).numpy(), rtol=1e-6)


@pytest.mark.parametrize("downsample", [7, 48])
def test_stitched_maps_at_a_downsample_that_does_not_divide_the_stride(tmp_path, downsample):
    """A heatmap pixel crossed by a tile's edge was the mean of each tile's part weighted by its area: the part
    covered by two tiles counted twice, and the maps had faint seams along every tile edge (up to 0.037 in
    probability at a downsample of 7 with 256 px tiles overlapping by 64). Each pixel is now the area mean of
    the blended map: with a per-pixel model, the direct area mean of the model's probabilities."""
    onnx_path = export_onnx(_Darkness(), tmp_path / "dark.onnx", input_shape=(1, 3, 64, 64), dynamic_spatial=True)
    with SlideData(SVS) as s:
        out = s.run(SemanticSegmentation(str(onnx_path), heatmap_downsample=downsample), str(tmp_path / "s.h5path"),
                    tile_size=256, overlap=64, executor="inprocess", progress=False)
        w, h = s.dimensions
        image = s.reader.read_region((0, 0), 0, (w, h))[..., :3].astype(np.float32) / 255
    with read_h5path(out) as f:
        stitched = np.asarray(f.masks["segmentation_prob_1"])
        assert f.mask_downsample("segmentation_prob_1") == downsample
    p = 1 / (1 + np.exp(-20 * (0.7 - image.mean(2))))
    p = np.round(p * 255) / 255  # the tiles' probability masks are stored as uint8
    k = downsample
    hh, ww = stitched.shape
    padded = np.full((hh * k, ww * k), np.nan)
    padded[:h, :w] = p
    truth = np.nanmean(padded.reshape(hh, k, ww, k), axis=(1, 3))
    assert np.abs(stitched - truth).max() < 1e-4


def test_heatmap_downsample_and_grey_images_are_checked_when_given(tmp_path):
    """heatmap_downsample=-8 ran every tile before the store refused the map (naming no option), NaN was a bare
    numpy error at the first tile and 0 became the default; F of a grey (h, w) image failed in numpy's transpose."""
    from histoflow.errors import ParameterError

    torch.manual_seed(2)
    grey = models.create("unet", in_channels=1, out_channels=2, filters=(8, 16)).eval()
    path = tmp_path / "grey.pt"
    models.save(grey, path)
    for cls in (PatchClassification, SemanticSegmentation):
        for bad in (-8, float("nan"), 0, "8", True):
            with pytest.raises(ParameterError, match=rf"{cls.__name__}: heatmap_downsample is level-0 pixels per "
                                                     r"heatmap pixel, a number > 0"):
                cls(str(path), heatmap_downsample=bad)
        assert cls(str(path), heatmap_downsample=64).heatmap_downsample == 64
    seg = SemanticSegmentation(str(path))
    img = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    np.testing.assert_array_equal(seg.F(img), seg.F(img[:, :, None]))
    with pytest.raises(ParameterError, match=r"an \(h, w\) or \(h, w, channels\) image, got shape \(2, 64, 64, 1\)"):
        seg.F(np.zeros((2, 64, 64, 1), np.uint8))

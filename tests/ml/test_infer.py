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
    """Tiles painted at a downsample that does not divide the tile size: each box gets its rounded extent,
    neighbours meet without gaps or overlaps."""
    from histoflow.ml.transforms import _Heatmap

    for ds in (3, 7, 120):
        hm = _Heatmap((1024, 512), ds, 1)
        for y in (0, 256):
            for x in (0, 256, 512, 768):
                hm.add(x, y, 256, 256, np.array([x / 1024 + y / 512], np.float32))
        assert (hm.weight == 1).all(), ds  # every heatmap pixel painted exactly once
        out = hm.result()[0]
        col = int(round(600 / ds)), int(round(300 / ds))
        assert out[col[1], col[0]] == pytest.approx(512 / 1024 + 256 / 512), ds


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

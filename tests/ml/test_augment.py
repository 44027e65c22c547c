"""Augmentation of real H&E tiles together with a real nucleus instance mask."""
import numpy as np
import pytest
import torch
from datafiles import SVS, data_path
from PIL import Image
from torch.utils.data import DataLoader

import histoflow
from histoflow.ml.augment import (AugmentError, Blur, Brightness, Compose, Contrast, GaussianNoise, HSVShift,
                                  RandomFlip, RandomRotate90, RandomZoom, RandStainNA, StainAugment)
from histoflow.transforms.nuclei import detect_nuclei


@pytest.fixture(scope="module")
def he():
    """A 192 x 192 crop of a real H&E image and its nucleus instance mask (int32 ids)."""
    img = np.asarray(Image.open(data_path("he_patches", "tiatoolbox_stain_target.png")).convert("RGB"))
    img = np.ascontiguousarray(img[300:492, 400:592])
    labels = detect_nuclei(img)
    assert labels.dtype == np.int32 and labels.max() >= 10
    return img, labels


@pytest.fixture(scope="module")
def glass_tile():
    """A 256 x 256 CMU-1 tile, about half tissue and half glass."""
    with histoflow.open_slide(SVS) as r:
        return r.read_region((768, 256), 0, (256, 256))


def _instance_means(image, labels):
    ids = np.unique(labels)
    ids = ids[ids > 0]
    return {int(i): image[labels == i].mean(axis=0) for i in ids}


def _masks(labels):
    """An instance mask, a bool mask and a float map, all derived from the same labels."""
    return {"nuclei": labels, "tissue": labels > 0, "hv": labels.astype(np.float32) / 7}


@pytest.mark.parametrize("op", [RandomFlip(), RandomRotate90()])
def test_flip_rotate_keep_image_and_masks_aligned(he, op):
    img, labels = he
    before = _instance_means(img, labels)
    changed = 0
    ks = set()
    for seed in range(12):
        out, masks = op(img, _masks(labels), np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.uint8
        assert masks["nuclei"].dtype == np.int32 and masks["tissue"].dtype == bool
        after = _instance_means(out, masks["nuclei"])
        assert after.keys() == before.keys()
        for i, m in before.items():
            np.testing.assert_allclose(after[i], m, atol=1e-9)
        np.testing.assert_array_equal(masks["tissue"], masks["nuclei"] > 0)
        # the float map moved exactly like the instance mask
        assert masks["hv"].dtype == np.float32
        np.testing.assert_array_equal(masks["hv"], masks["nuclei"].astype(np.float32) / 7)
        changed += not np.array_equal(out, img)
        ks.add(out.tobytes())
    assert changed >= 6  # the op really moves pixels for most seeds
    if isinstance(op, RandomRotate90):
        assert len(ks) == 4  # all four rotations occur


def test_flip_exact_geometry(he):
    img, labels = he
    out, masks = RandomFlip(horizontal=True, vertical=False, p=1.0)(img, {"n": labels}, np.random.default_rng(0))
    np.testing.assert_array_equal(out, img[:, ::-1])
    np.testing.assert_array_equal(masks["n"], labels[:, ::-1])
    out, masks = RandomFlip(p=0.0)(img, {"n": labels}, np.random.default_rng(0))
    np.testing.assert_array_equal(out, img)


def test_rotate_non_square_keeps_shape(he):
    img, labels = he
    img, labels = img[:, :150], labels[:, :150]
    for seed in range(8):
        out, masks = RandomRotate90()(img, {"n": labels}, np.random.default_rng(seed))
        assert out.shape == img.shape and masks["n"].shape == labels.shape
        assert np.array_equal(out, img) or np.array_equal(out, img[::-1, ::-1])
        np.testing.assert_array_equal(masks["n"], labels if np.array_equal(out, img) else labels[::-1, ::-1])


@pytest.mark.parametrize("scale_range", [(1.3, 1.5), (0.6, 0.75)])
def test_zoom_preserves_label_values_and_alignment(he, scale_range):
    img, labels = he
    op = RandomZoom(scale_range)
    before = _instance_means(img, labels)
    for seed in range(4):
        out, masks = op(img, {"nuclei": labels, "tissue": labels > 0}, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.uint8
        nuc = masks["nuclei"]
        assert nuc.shape == labels.shape and nuc.dtype == np.int32
        ids = set(np.unique(nuc).tolist())
        assert ids <= set(np.unique(labels).tolist())          # no new ids (nearest, not interpolated)
        assert len(ids) > 5
        np.testing.assert_array_equal(masks["tissue"], nuc > 0)
        # the image moved with the mask: the colour under each (big enough) instance is about the same
        after = _instance_means(out, nuc)
        diffs = [np.abs(after[i] - before[i]).max() for i in after if (nuc == i).sum() >= 40]
        assert len(diffs) >= 5 and np.median(diffs) < 12, np.median(diffs)
        if scale_range[1] < 1:  # zoom out: a white border and background in the mask
            assert ((out == 255).all(axis=-1) & (nuc == 0)).sum() > 0.1 * labels.size
    # a misaligned zoom (image and mask offset differently) would break the colour check: prove it can fail
    shifted = np.roll(labels, 9, axis=1)
    after = _instance_means(img, shifted)
    diffs = [np.abs(after[i] - before[i]).max() for i in after if (shifted == i).sum() >= 40]
    assert np.median(diffs) >= 12


def test_photometric_ops_change_only_the_image(he):
    img, labels = he
    masks = _masks(labels)
    for op in (HSVShift(0.05, 0.2, 0.2), Brightness(0.2), Contrast(0.3), StainAugment(0.2, 0.2), Blur(8.0),
               GaussianNoise(0.05)):
        out, new_masks = op(img, masks, np.random.default_rng(3))
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert not np.array_equal(out, img), op
        assert new_masks.keys() == masks.keys()
        for k in masks:
            assert new_masks[k] is masks[k] or np.array_equal(new_masks[k], masks[k])
            assert new_masks[k].dtype == masks[k].dtype


def test_photometric_zero_is_identity(he):
    img, _ = he
    rng = np.random.default_rng(0)
    for op in (HSVShift(0, 0, 0), Brightness(0), Contrast(0), Blur(0), GaussianNoise(0)):
        out, _ = op(img, None, rng)
        assert np.abs(out.astype(int) - img).max() <= 1, op


def _laplacian_var(img):
    import cv2
    return cv2.Laplacian(img.mean(axis=-1).astype(np.float32), cv2.CV_32F).var()


def test_blur_softens_edges_and_keeps_colours(he):
    img, labels = he
    sharp = _laplacian_var(img)
    strengths = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        sigma = np.random.default_rng(seed).uniform(0, 2.0)  # the draw Blur makes first
        out, _ = Blur(2.0)(img, None, rng)
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert np.abs(out.mean(axis=(0, 1)) - img.mean(axis=(0, 1))).max() < 1.0  # the colours stay
        strengths.append((sigma, _laplacian_var(out)))
    # every blur removes edge energy, and a wider kernel removes more
    assert all(v < sharp for s, v in strengths if s > 0.3)
    strengths.sort()
    assert strengths[-1][1] < strengths[0][1]
    # the nuclei are still where the mask says (blur is not a shift): darker inside than around
    out, _ = Blur(2.0)(img, None, np.random.default_rng(5))
    assert out[labels > 0].mean() < out[labels == 0].mean() - 20
    # any dtype and channel count: a single-channel uint16 image and a float one
    img16 = (img[..., :1].astype(np.uint16) * 257)
    out16, _ = Blur(1.5)(img16, None, np.random.default_rng(2))
    assert out16.dtype == np.uint16 and out16.shape == img16.shape and not np.array_equal(out16, img16)
    f = img.astype(np.float32) / 255
    outf, _ = Blur(1.5)(f, None, np.random.default_rng(2))
    assert outf.dtype == np.float32 and outf.shape == f.shape and 0 <= outf.min() and outf.max() <= 1


def test_gaussian_noise_level_and_range(he):
    img, _ = he
    flat = np.full((128, 128, 3), 128, np.uint8)
    sds = []
    for seed in range(8):
        sd = np.random.default_rng(seed).uniform(0, 0.04) * 255  # the level Noise draws
        out, _ = GaussianNoise(0.04)(flat, None, np.random.default_rng(seed))
        assert out.dtype == np.uint8
        assert abs(out.astype(float).std() - sd) < 0.1 * sd + 0.6
        assert abs(out.astype(float).mean() - 128) < 0.5
        sds.append(out.astype(float).std())
    assert max(sds) > 4  # up to 0.04 * 255 = 10 grey levels
    # clipped, never wrapped around: a white image gets only darker pixels
    white = np.full((64, 64, 3), 255, np.uint8)
    out, _ = GaussianNoise(0.1)(white, None, np.random.default_rng(1))
    assert out.min() < 255 and (out.astype(int) - 255).max() == 0 and out.min() > 150
    f = np.zeros((32, 32, 1), np.float32)
    outf, _ = GaussianNoise(0.1)(f, None, np.random.default_rng(1))
    assert outf.dtype == np.float32 and outf.min() >= 0 and outf.max() > 0
    for bad in (lambda: Blur(-1), lambda: GaussianNoise(float("nan")), lambda: Blur(1, p=2)):
        with pytest.raises(AugmentError):
            bad()


def test_brightness_contrast_uint16_and_float():
    img16 = np.full((8, 8, 2), 30000, np.uint16)
    out, _ = Brightness(0.1)(img16, None, np.random.default_rng(0))
    assert out.dtype == np.uint16 and abs(int(out[0, 0, 0]) - 30000) <= 6554 and out[0, 0, 0] != 30000
    f = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8, 1)
    out, _ = Contrast(0.5)(f, None, np.random.default_rng(1))
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    with pytest.raises(AugmentError, match="uint8 RGB"):
        HSVShift()(img16, None, np.random.default_rng(0))


def test_stain_augment_identity_and_white_background(glass_tile):
    img = glass_tile
    glass = (img >= 235).all(axis=-1)
    assert 0.3 < glass.mean() < 0.8
    same, _ = StainAugment(0, 0)(img, None, np.random.default_rng(0))
    assert np.abs(same.astype(int) - img).mean() < 2
    diffs = []
    for seed in range(4):
        out, _ = StainAugment(0.1, 0.1)(img, None, np.random.default_rng(seed))
        assert out.dtype == np.uint8
        diffs.append(np.abs(out.astype(int) - img)[~glass].mean())
        assert (out[glass] >= 230).all(axis=-1).mean() > 0.99        # glass stays white-ish
    assert max(diffs) > 3, diffs                                       # tissue colours do change


def test_stain_augment_background_tile_falls_back(glass_tile):
    white = np.full((64, 64, 3), 243, np.uint8)
    op = StainAugment(0.3, 0.3)
    from histoflow.transforms.stain import REFERENCE_STAIN_MATRIX
    np.testing.assert_array_equal(op.matrix(white), REFERENCE_STAIN_MATRIX)
    out, _ = op(white, None, np.random.default_rng(0))
    assert np.abs(out.astype(int) - white).max() <= 2
    # a tissue tile gets its own matrix, not the reference
    assert not np.allclose(op.matrix(glass_tile), REFERENCE_STAIN_MATRIX, atol=1e-3)


@pytest.fixture(scope="module")
def he_images():
    """Four real H&E images from different sources (their colour statistics differ)."""
    out = []
    for name in ("tiatoolbox_stain_target.png", "stardist_histo.jpg", "napari_skin_HE.tif"):
        out.append(np.asarray(Image.open(data_path("he_patches", name)).convert("RGB")))
    with histoflow.open_slide(SVS) as r:
        out.append(r.read_region((1024, 1024), 0, (512, 512)))
    return out


def test_randstainna_moves_images_to_the_fitted_templates(he_images, glass_tile):
    from histoflow.transforms.stain import lab_stats

    stats = [lab_stats(im) for im in he_images]
    op = RandStainNA.fit(he_images, spread=0.0)
    np.testing.assert_allclose(op.means, np.mean([m for m, _ in stats], 0))
    np.testing.assert_allclose(op.means_sd, np.std([m for m, _ in stats], 0))
    np.testing.assert_allclose(op.stds, np.mean([s for _, s in stats], 0))
    assert (op.means_sd > 0.5).all()                         # the images do differ in colour
    # spread 0: every image moves to the mean template (not exactly: pale pixels are blended back to the
    # input, as glass is, and the tissue pixels counted change with the colours)
    after = []
    for im, (m0, _) in zip(he_images, stats):
        out, masks = op(im, {"n": np.ones(im.shape[:2], np.int32)}, np.random.default_rng(0))
        assert out.dtype == np.uint8 and out.shape == im.shape and (masks["n"] == 1).all()
        m, _ = lab_stats(out)
        assert np.linalg.norm(m - op.means) < 0.6 * np.linalg.norm(m0 - op.means) + 0.5, (m0, m)
        after.append(m)
    assert np.linalg.norm(np.std(after, 0)) < 0.4 * np.linalg.norm(op.means_sd)
    # fitted on one image twice, with spread 0, the image keeps its colours, whatever pixels count as tissue
    for lum in (0.8, 0.9):
        own = RandStainNA.fit([he_images[0], he_images[0]], spread=0.0, luminosity_threshold=lum)
        assert own.luminosity_threshold == lum
        out, _ = own(he_images[0], None, np.random.default_rng(0))
        assert np.abs(out.astype(int) - he_images[0]).mean() < 0.5
    # spread 1: the templates vary as the training images did
    wide = RandStainNA.fit(he_images, spread=1.0)
    im = he_images[3]
    means = np.array([lab_stats(wide(im, None, np.random.default_rng(i))[0])[0] for i in range(30)])
    assert (means.std(0) > 0.4 * wide.means_sd).all() and (means.std(0) < 2 * wide.means_sd).all()
    # glass stays glass, and a tile with no tissue is returned as it is
    glass = (glass_tile >= 235).all(axis=-1)
    out, _ = wide(glass_tile, None, np.random.default_rng(1))
    assert (out[glass] >= 230).all(axis=-1).mean() > 0.99
    white = np.full((64, 64, 3), 243, np.uint8)
    np.testing.assert_array_equal(wide(white, None, np.random.default_rng(0))[0], white)


def test_randstainna_errors(he_images):
    white = np.full((64, 64, 3), 243, np.uint8)
    with pytest.raises(AugmentError, match="1 of the images have enough tissue"):
        RandStainNA.fit([white, he_images[0]])
    with pytest.raises(AugmentError, match="means must be 3 finite numbers"):
        RandStainNA([50, 30], [1, 1, 1], [10, 5, 5], [1, 1, 1])
    with pytest.raises(AugmentError, match="stds must be > 0"):
        RandStainNA([50, 30, -10], [1, 1, 1], [10, 0, 5], [1, 1, 1])
    with pytest.raises(AugmentError, match="spread"):
        RandStainNA.fit(he_images, spread=-1)
    with pytest.raises(AugmentError, match="uint8 RGB"):
        RandStainNA.fit(he_images)(he_images[0].astype(np.float32) / 255, None, np.random.default_rng(0))


def _pipeline(seed=None):
    return Compose([RandomFlip(), RandomRotate90(), RandomZoom((0.8, 1.25)), HSVShift(0.03, 0.1, 0.1),
                    Brightness(0.05), Contrast(0.1), StainAugment(0.05, 0.05)], seed=seed)


def test_compose_deterministic_with_seed(he):
    img, labels = he
    sample = {"image": img, "masks": {"nuclei": labels}, "coords": np.array([5, 6]), "index": 3}
    a = _pipeline(seed=7)(sample)
    b = _pipeline(seed=7)(sample)
    c = _pipeline(seed=8)(sample)
    assert a["index"] == 3 and a["coords"].tolist() == [5, 6]
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["masks"]["nuclei"], b["masks"]["nuclei"])
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].flags.c_contiguous and a["masks"]["nuclei"].flags.c_contiguous
    # the same explicit rng gives the same result too, and the input is never modified in place
    r1 = _pipeline().apply(img, {"nuclei": labels}, np.random.default_rng(1))
    r2 = _pipeline().apply(img, {"nuclei": labels}, np.random.default_rng(1))
    np.testing.assert_array_equal(r1[0], r2[0])
    np.testing.assert_array_equal(r1[1]["nuclei"], r2[1]["nuclei"])
    assert set(np.unique(r1[1]["nuclei"]).tolist()) <= set(np.unique(labels).tolist())
    np.testing.assert_array_equal(sample["image"], he[0])


def test_compose_checks_inputs(he):
    img, labels = he
    with pytest.raises(AugmentError, match="mask 'nuclei'"):
        _pipeline(0)({"image": img, "masks": {"nuclei": labels[:10]}})
    with pytest.raises(AugmentError, match="sample dict"):
        _pipeline(0)(img)
    with pytest.raises(AugmentError, match="scale_range"):
        RandomZoom((1.2, 0.8))
    with pytest.raises(AugmentError, match="callable"):
        Compose([1])


class _Constant(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform

    def __len__(self):
        return 4

    def __getitem__(self, i):
        out = self.transform({"image": np.full((4, 4, 3), 128, np.uint8), "masks": {}})
        return torch.from_numpy(out["image"][0, 0, :1].astype(np.int64))


def test_compose_in_dataloader_workers_differs_per_worker_and_is_reproducible():
    ds = _Constant(Compose([Brightness(0.4)], seed=0))
    ds.transform({"image": np.zeros((2, 2, 3), np.uint8)})  # the parent's generator exists before the fork

    def run():
        torch.manual_seed(0)
        return [int(v) for v in DataLoader(ds, batch_size=None, num_workers=2)]

    first = run()
    # items 0 and 1 are the first draws of worker 0 and worker 1: a generator copied into both would repeat
    assert first[0] != first[1] and first[2] != first[3], first
    assert run() == first


def test_compose_draws_follow_torchs_seed_in_the_main_process():
    """The trainer seeds torch at each epoch: an epoch's augmentations are then the same in a run resumed
    at that epoch as in the run that went through (no DataLoader workers)."""
    aug = Compose([Brightness(0.4), GaussianNoise(0.05)], seed=2)
    img = np.full((16, 16, 3), 120, np.uint8)
    torch.manual_seed(10)
    a1, a2 = aug.apply(img)[0], aug.apply(img)[0]
    torch.manual_seed(11)
    b = aug.apply(img)[0]
    torch.manual_seed(10)  # "resumed": a fresh start of epoch 10's draws
    assert np.array_equal(aug.apply(img)[0], a1) and np.array_equal(aug.apply(img)[0], a2)
    assert not np.array_equal(a1, a2) and not np.array_equal(a1, b)

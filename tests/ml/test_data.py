"""TileDataset (h5path) and WSIPatchDataset (raw slides) on the real CMU-1 pixels."""
import math
import os
import pickle

import cv2
import numpy as np
import pytest
import torch
from datafiles import SVS, data_path
from torch.utils.data import DataLoader

import histoflow
from histoflow.core.grid import TileGrid
from histoflow.errors import H5PathError, RegionError, SlideNotFoundError
from histoflow.ml.augment import Compose, RandomFlip
from histoflow.ml.data import MISSING_LABEL_INT, DatasetError, TileDataset, WSIPatchDataset, to_tensors
from histoflow.store import H5PathWriter
from histoflow.transforms.nuclei import detect_nuclei

# 8 tiles of 128 px on tissue and at its edge (x 768-1280, y 1024-1280 of the SVS)
COORDS = [(768 + 128 * (i % 4), 1024 + 128 * (i // 4)) for i in range(8)]
SIZE = 128


@pytest.fixture(scope="module")
def tiles():
    with histoflow.open_slide(SVS) as r:
        out = []
        for i, (x, y) in enumerate(COORDS):
            img = r.read_region((x, y), 0, (SIZE, SIZE))
            grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
            masks = {"tissue": grey < 210, "nuclei": detect_nuclei(img)}
            labels = {"tumour": i % 2, "site": "a" if i < 4 else "b",
                      "score": None if i == 3 else 0.25 * i}
            out.append((img, (x, y), masks, labels))
    return out


@pytest.fixture(scope="module")
def h5file(tiles, tmp_path_factory):
    path = tmp_path_factory.mktemp("ml") / "cmu.h5path"
    with H5PathWriter(path, slide={"name": "CMU-1-Small-Region", "mpp": (0.499, 0.499)}) as w:
        for img, xy, masks, labels in tiles:
            w.add_tile(img, xy, masks=masks, labels=labels)
    return str(path)


def _as_uint8(t):
    """(C, H, W) float tensor in [0, 1] back to (H, W, C) uint8."""
    return np.rint(t.numpy().transpose(1, 2, 0) * 255).astype(np.uint8)


def _check_sample(s, tile, i):
    img, xy, masks, labels = tile
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, SIZE, SIZE)
    assert float(s["image"].min()) >= 0 and float(s["image"].max()) <= 1
    np.testing.assert_allclose(s["image"].numpy(), img.transpose(2, 0, 1).astype(np.float32) / 255, atol=1e-6)
    np.testing.assert_array_equal(_as_uint8(s["image"]), img)
    assert s["masks"]["tissue"].dtype == torch.bool
    np.testing.assert_array_equal(s["masks"]["tissue"].numpy(), masks["tissue"])
    assert s["masks"]["nuclei"].dtype == torch.int32
    np.testing.assert_array_equal(s["masks"]["nuclei"].numpy(), masks["nuclei"])
    assert s["coords"].tolist() == list(xy)
    assert s["index"] == i


def test_tile_dataset_direct(h5file, tiles):
    ds = TileDataset(h5file, masks=["tissue", "nuclei"], labels=True)
    assert len(ds) == 8 and sorted(ds.labels) == ["score", "site", "tumour"]
    for i in range(8):
        s = ds[i]
        _check_sample(s, tiles[i], i)
        assert s["labels"]["tumour"].dtype == torch.int64 and int(s["labels"]["tumour"]) == i % 2
        assert s["labels"]["site"] == ("a" if i < 4 else "b")
        if i == 3:  # a float label the tile lacks: NaN
            assert math.isnan(float(s["labels"]["score"]))
        else:
            assert s["labels"]["score"].dtype == torch.float32 and float(s["labels"]["score"]) == 0.25 * i
    assert ds[-1]["index"] == 7
    with pytest.raises(IndexError):
        ds[8]
    # the nuclei mask is a real instance mask (the alignment checks below mean something)
    assert tiles[0][2]["nuclei"].max() > 3


def test_tile_dataset_image_only_and_indices(h5file, tiles):
    ds = TileDataset(h5file, indices=[5, 2])
    assert len(ds) == 2
    s = ds[0]
    assert s["masks"] == {} and s["labels"] == {} and s["index"] == 5
    np.testing.assert_array_equal(_as_uint8(s["image"]), tiles[5][0])
    ds = TileDataset(h5file, labels=["tumour", "score"], indices=[3, 4, 1])
    assert ds.label_column("tumour") == [1, 0, 1]
    assert ds.label_column("site") == ["a", "b", "a"]
    assert math.isnan(ds.label_column("score")[0]) and ds.label_column("score")[1] == 1.0
    with pytest.raises(DatasetError, match="out of range"):
        TileDataset(h5file, indices=[0, 8])


def test_tile_dataset_missing_label_fill(tmp_path, tiles):
    path = tmp_path / "int_label.h5path"
    with H5PathWriter(path) as w:
        for i, (img, xy, _, _) in enumerate(tiles[:3]):
            w.add_tile(img, xy, labels={"cls": i} if i != 1 else {})
    ds = TileDataset(path, labels=["cls"])
    assert [int(ds[i]["labels"]["cls"]) for i in range(3)] == [0, MISSING_LABEL_INT, 2]
    ds = TileDataset(path, labels=["cls"], missing_label={"cls": 7})
    assert int(ds[1]["labels"]["cls"]) == 7
    # a batch of int labels with a missing one still collates into one int64 tensor
    batch = next(iter(DataLoader(TileDataset(path, labels=["cls"]), batch_size=3)))
    assert batch["labels"]["cls"].tolist() == [0, MISSING_LABEL_INT, 2]


def test_tile_dataset_dataloader_workers(h5file, tiles):
    ds = TileDataset(h5file, masks=["tissue", "nuclei"], labels=["tumour", "site"])
    ds[0]  # the parent opens the file first: forked workers must not use its handle
    assert ds._h is not None
    loader = DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    seen = []
    for batch in loader:
        assert batch["image"].shape[1:] == (3, SIZE, SIZE)
        for b, i in enumerate(batch["index"].tolist()):
            img, xy, masks, labels = tiles[i]
            np.testing.assert_array_equal(_as_uint8(batch["image"][b]), img)
            np.testing.assert_array_equal(batch["masks"]["nuclei"][b].numpy(), masks["nuclei"])
            np.testing.assert_array_equal(batch["masks"]["tissue"][b].numpy(), masks["tissue"])
            assert batch["coords"][b].tolist() == list(xy)
            assert int(batch["labels"]["tumour"][b]) == labels["tumour"]
            assert batch["labels"]["site"][b] == labels["site"]
            seen.append(i)
    assert seen == list(range(8))
    # and the parent's handle still works after the workers are gone
    np.testing.assert_array_equal(_as_uint8(ds[7]["image"]), tiles[7][0])


class _Probe(torch.utils.data.Dataset):
    """Reports, from inside a worker, which file handle the wrapped dataset used."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        self.ds[i]
        return id(self.ds._h), self.ds._pid == os.getpid(), os.getpid()


def test_tile_dataset_workers_open_their_own_handle(h5file):
    ds = TileDataset(h5file)
    ds[0]
    parent = id(ds._h)
    out = list(DataLoader(_Probe(ds), batch_size=None, num_workers=2))
    assert {pid for _, _, pid in out} != {os.getpid()} and len({pid for _, _, pid in out}) == 2
    assert all(same_pid for _, same_pid, _ in out)
    assert all(h != parent for h, _, _ in out)


def test_tile_dataset_pickles_without_handle(h5file, tiles):
    ds = TileDataset(h5file, masks=["nuclei"])
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._h is None
    np.testing.assert_array_equal(clone[2]["masks"]["nuclei"].numpy(), tiles[2][2]["nuclei"])
    ds.close()
    np.testing.assert_array_equal(_as_uint8(ds[1]["image"]), tiles[1][0])


def test_tile_dataset_transform_on_numpy_before_tensors(h5file, tiles):
    calls = []

    def transform(sample):
        calls.append((sample["image"].dtype, sample["image"].shape, sorted(sample["masks"])))
        return Compose([RandomFlip(p=1.0, vertical=False)], seed=0)(sample)

    ds = TileDataset(h5file, masks=["nuclei"], transform=transform)
    s = ds[0]
    assert calls == [(np.dtype(np.uint8), (SIZE, SIZE, 3), ["nuclei"])]
    img, _, masks, _ = tiles[0]
    np.testing.assert_array_equal(_as_uint8(s["image"]), img[:, ::-1])
    np.testing.assert_array_equal(s["masks"]["nuclei"].numpy(), masks["nuclei"][:, ::-1])


def test_tile_dataset_uint16_and_mask_as_image(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 65536, (16, 16, 2), dtype=np.uint16)
    hema = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    path = tmp_path / "u16.h5path"
    with H5PathWriter(path) as w:
        w.add_tile(img, (0, 0), masks={"hema": hema})
    s = TileDataset(path)[0]
    assert s["image"].shape == (2, 16, 16)
    np.testing.assert_allclose(s["image"].numpy(), img.transpose(2, 0, 1) / 65535.0, atol=1e-6)
    s = TileDataset(path, image_key="hema")[0]
    assert s["image"].shape == (1, 16, 16)
    np.testing.assert_allclose(s["image"][0].numpy(), hema / 255.0, atol=1e-6)
    # a stored one-channel map reaches the transform as (h, w, 1), as every augmentation takes images (it was
    # (h, w): every Compose refused it)
    flipped = TileDataset(path, image_key="hema", transform=Compose([RandomFlip(p=1.0, vertical=False)]))[0]
    np.testing.assert_allclose(flipped["image"][0].numpy(), hema[:, ::-1] / 255.0, atol=1e-6)


def test_tile_dataset_errors_name_the_file(h5file, tmp_path):
    missing = str(tmp_path / "nope.h5path")
    with pytest.raises(H5PathError, match="nope.h5path.*no such file"):
        TileDataset(missing)
    with pytest.raises(H5PathError) as e:
        TileDataset(h5file, masks=["tissue", "stroma"])
    assert h5file in str(e.value) and "'stroma'" in str(e.value) and "nuclei" in str(e.value)
    with pytest.raises(H5PathError, match="label named 'grade'"):
        TileDataset(h5file, labels=["grade"])
    with pytest.raises(H5PathError, match="image_key"):
        TileDataset(h5file, image_key="images")
    not_h5 = tmp_path / "bad.h5path"
    not_h5.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(H5PathError, match="bad.h5path"):
        TileDataset(not_h5)


def test_tile_dataset_reads_pathml_v1():
    path = data_path("pathml_h5path", "cmu_crop_written_by_pathml_3.0.8.h5path")
    ds = TileDataset(path, masks=True, labels=["grade"])
    assert len(ds) == 12 and ds.masks == ["tissue"]
    s = ds[4]
    assert s["image"].shape == (3, 128, 128) and int(s["labels"]["grade"]) == 2
    # PathML's float16 tiles hold whole numbers 0..255: they come back as uint8, hence / 255 exactly
    with histoflow.open_slide(SVS) as r:
        x, y = s["coords"].tolist()
        raw = r.read_region((800 + x - 8, 1000 + y - 8), 0, (144, 144))
    blurred = cv2.blur(raw, (5, 5))[8:-8, 8:-8]  # PathML stored BoxBlur(5) tiles
    assert np.abs(_as_uint8(s["image"]).astype(int) - blurred).mean() < 2
    assert ds.label_column("grade") == [2] * 12


# ------------------------------------------------------------------------------------------ WSIPatchDataset
@pytest.fixture(scope="module")
def reader():
    with histoflow.open_slide(SVS) as r:
        yield r


def test_wsi_patch_equals_read_region(reader):
    coords = [(0, 800, 1000), (0, 1500, 2000), (0, 2100, 2900)]  # the last one runs past the edge
    ds = WSIPatchDataset([SVS], coords=coords, patch_size=128, labels={"cls": [1, 0, 1]})
    assert len(ds) == 3
    for i, (_, x, y) in enumerate(coords):
        s = ds[i]
        want = reader.read_region((x, y), 0, (128, 128))
        np.testing.assert_allclose(s["image"].numpy(), want.transpose(2, 0, 1) / 255.0, atol=1e-6)
        assert s["coords"].tolist() == [x, y] and s["slide"] == 0 and s["index"] == i
        assert s["masks"] == {} and int(s["labels"]["cls"]) == [1, 0, 1][i]
    # past the edge: white padding of a brightfield slide
    assert float(ds[2]["image"][:, -1, -1].min()) == 1.0


def test_wsi_grid_patches_are_the_grid_tiles(mosaic2):
    """coords=None lists the TileGrid's tiles; at a target µm/px each grid tile reads 256 or 257 level
    pixels by where it falls, and each patch must read its own (one size per slide made most of them
    differ from the tiles)."""
    ds = WSIPatchDataset([mosaic2], patch_size=128, mpp=1.0, tissue_filter=False)
    with histoflow.SlideData(mosaic2) as s:
        grid = s.grid(128, mpp=1.0)
        assert len({t.read_size for t in grid}) > 1
        assert len(ds) == len(grid)
        for i in range(0, len(grid), 7):
            want = s.read_tile(grid[i]).image
            np.testing.assert_array_equal(_as_uint8(ds[i]["image"]), want)


def test_wsi_patch_at_target_mpp_covers_twice_the_area(reader):
    x, y = 700, 1100
    ds = WSIPatchDataset([SVS], coords=np.array([[0, x, y]]), patch_size=128, mpp=1.0)
    got = _as_uint8(ds[0]["image"])
    assert got.shape == (128, 128, 3)
    # 1.0 µm/px on a 0.499 µm/px slide: 128 output px cover ~256.5 level-0 px. Compared at low frequency
    # (both brought to 32 x 32, so that two resampling filters of high-frequency texture do not count),
    # an independent area-average of the 256 x 256 read matches; the 128 x 128 read does not
    def low(a):
        return cv2.resize(a, (32, 32), interpolation=cv2.INTER_AREA).astype(float)

    wide = reader.read_region((x, y), 0, (256, 256))
    narrow = reader.read_region((x, y), 0, (128, 128))
    d_wide = np.abs(low(got) - low(wide)).mean()
    d_narrow = np.abs(low(got) - low(narrow)).mean()
    assert d_wide < 4, d_wide
    assert d_narrow > 4 * d_wide and d_narrow > 10, (d_narrow, d_wide)
    # at level 0 (no mpp) the same coordinates give the native 128 x 128 read
    native = WSIPatchDataset([SVS], coords=np.array([[0, x, y]]), patch_size=128)
    np.testing.assert_array_equal(_as_uint8(native[0]["image"]), narrow)


def test_wsi_tissue_tiles_only(reader):
    ds = WSIPatchDataset([SVS], patch_size=128)
    full = TileGrid(reader.dimensions, 128)
    assert 0 < len(ds) < len(full) * 0.6
    assert ds.coords.shape == (len(ds), 3) and (ds.coords[:, 0] == 0).all()
    # every kept patch is mostly tissue by an independent pixel count (non-white pixels)
    kept = set()
    for i in range(len(ds)):
        img = _as_uint8(ds[i]["image"])
        assert (img.min(axis=-1) < 220).mean() > 0.35, tuple(ds.coords[i])
        kept.add(tuple(int(v) for v in ds.coords[i, 1:]))
    # and the glass tiles of the grid were left out
    glass = [t.coords for t in full
             if (reader.read_region(t.coords, 0, (128, 128)).min(axis=-1) < 220).mean() < 0.05]
    assert len(glass) > 50 and not kept & set(glass)
    # a stricter filter keeps fewer; False keeps the whole grid
    assert len(WSIPatchDataset([SVS], patch_size=128, tissue_filter=0.9)) < len(ds)
    assert len(WSIPatchDataset([SVS], patch_size=256, tissue_filter=False)) == len(TileGrid(reader.dimensions, 256))


def test_wsi_dataloader_workers_and_labels(reader):
    ds = WSIPatchDataset([SVS, SVS], patch_size=256, labels={"grade": [1, 3], "name": ["first", "second"]})
    assert len(ds) % 2 == 0 and (ds.coords[: len(ds) // 2, 0] == 0).all()
    ds[0]  # readers opened in the parent first
    loader = DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
    n = 0
    for batch in loader:
        for b in range(len(batch["index"])):
            i = int(batch["index"][b])
            s, x, y = (int(v) for v in ds.coords[i])
            want = reader.read_region((x, y), 0, (256, 256))
            np.testing.assert_array_equal(_as_uint8(batch["image"][b]), want)
            assert int(batch["slide"][b]) == s
            assert int(batch["labels"]["grade"][b]) == (1 if s == 0 else 3)
            assert batch["labels"]["name"][b] == ("first" if s == 0 else "second")
            n += 1
    assert n == len(ds)


def test_wsi_coords_as_dicts_and_pickling():
    rows = [{"slide": 0, "x": 64, "y": 96, "cls": "tumour"}, {"slide": 0, "x": 1000, "y": 1200, "cls": "stroma"}]
    ds = WSIPatchDataset(SVS, coords=rows, patch_size=64, level=0)
    ds[1]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._pid is None and len(clone._readers) == 0
    s = clone[1]
    assert s["labels"]["cls"] == "stroma" and s["coords"].tolist() == [1000, 1200]
    torch.testing.assert_close(s["image"], ds[1]["image"])


def test_wsi_errors(tmp_path):
    with pytest.raises(SlideNotFoundError, match="missing.svs"):
        WSIPatchDataset([str(tmp_path / "missing.svs")], coords=[(0, 0, 0)])
    with pytest.raises(DatasetError, match="slide index 1 out of range"):
        WSIPatchDataset([SVS], coords=[(0, 0, 0), (1, 0, 0)])
    with pytest.raises(DatasetError, match=r"\(N, 3\)"):
        WSIPatchDataset([SVS], coords=[(0, 0)])
    with pytest.raises(DatasetError, match="one per patch"):
        WSIPatchDataset([SVS], coords=[(0, 0, 0)], labels={"cls": [1, 2]})
    with pytest.raises(DatasetError, match="tissue_filter"):
        WSIPatchDataset([SVS], coords=[(0, 0, 0)], tissue_filter=0.5)
    with pytest.raises(RegionError, match="CMU-1-Small-Region.svs: level 3 does not exist"):
        WSIPatchDataset([SVS], coords=[(0, 0, 0)], level=3)
    with pytest.raises(DatasetError, match="lacks"):
        WSIPatchDataset([SVS], coords=[{"slide": 0, "x": 1}])


def test_to_tensors_dtypes():
    s = to_tensors({"image": np.zeros((4, 5, 3), np.float32), "coords": (1, 2),
                    "masks": {"ids": np.arange(20, dtype=np.uint16).reshape(4, 5)[:, ::-1],
                              "hv": np.zeros((4, 5), np.float64)},
                    "labels": {"flag": True, "p": 0.5}})
    assert s["image"].shape == (3, 4, 5)
    assert s["masks"]["ids"].dtype == torch.int64 and s["masks"]["ids"][0, 0] == 4
    assert s["masks"]["hv"].dtype == torch.float32
    assert s["labels"]["flag"].dtype == torch.int64 and s["labels"]["p"].dtype == torch.float32
    assert s["coords"].dtype == torch.int64


def test_slide_options_travel_to_the_workers():
    """A SlideData opened with mpp=... (an image without a pixel size) keeps it in the datasets and in their
    DataLoader workers; it used to be reopened by path alone ("pixel size unknown, open it with mpp=...")."""
    from histoflow.core.slide import SlideData
    from histoflow.ml.patches import NucleusPatchDataset

    path = data_path("he_patches", "stardist_histo.jpg")
    ds = NucleusPatchDataset(SlideData(path, mpp=0.25), [[100, 100], [300, 200]], patch_size=41, mpp=0.5)
    assert ds.slide_mpp == 0.25 and ds[0]["image"].shape == (3, 41, 41)
    w = WSIPatchDataset([SlideData(path, mpp=0.25)], patch_size=32, mpp=0.5, tissue_filter=False)
    assert len(w) == 8 * 5  # 250 x 150 px at 0.5 µm/px, edges padded
    batches = [torch.cat([b["image"] for b in DataLoader(w, batch_size=8, num_workers=n)]) for n in (0, 2)]
    assert torch.equal(batches[0], batches[1])
    with pytest.raises(DatasetError, match="pixel size is unknown"):
        NucleusPatchDataset(path, [[100, 100]], mpp=0.5)


def test_augmentation_draws_do_not_depend_on_the_workers():
    """A seeded Compose draws each item's augmentation from (seed, epoch, item): the same batches with 0 or 2
    DataLoader workers (they used to follow each worker's own generator), new ones each epoch, and the
    trainer sets the epoch of datasets inside a ConcatDataset."""
    from histoflow.ml.augment import HSVShift, RandomRotate90
    from histoflow.ml.train import _datasets

    aug = Compose([RandomFlip(), RandomRotate90(), HSVShift(0.05, 0.2, 0.1)], seed=1)
    coords = [(x, 1000) for x in range(0, 1600, 100)]
    ds = WSIPatchDataset([SVS], coords=[(0, x, y) for x, y in coords], patch_size=64, transform=aug)

    def batches(workers, epoch):
        ds.set_epoch(epoch)
        return torch.cat([b["image"] for b in DataLoader(ds, batch_size=4, num_workers=workers)])

    first = batches(0, 0)
    assert torch.equal(first, batches(2, 0)) and not torch.equal(first, batches(0, 1))
    both = torch.utils.data.ConcatDataset([ds, ds])
    assert [d for d in _datasets(both) if d is ds] and ds.epoch_dependent


def test_items_drawn_again_in_an_epoch_are_augmented_anew():
    """A balancing sampler draws a rare item many times an epoch: each copy gets its own augmentation (they
    were pixel for pixel the same: the generator was keyed on the item alone), still the same with 0 or 2
    workers; a dataset that is not histoflow's sees plain indices."""
    from histoflow.ml.augment import HSVShift, RandomRotate90
    from histoflow.ml.samplers import ClassBalancedSampler, Draw

    aug = Compose([RandomFlip(), RandomRotate90(), HSVShift(0.05, 0.2, 0.1)], seed=0)
    coords = [(0, x, 1000) for x in range(0, 1200, 100)]  # 12 patches of CMU-1; the last one is the rare class
    ds = WSIPatchDataset([SVS], coords=coords, patch_size=32, transform=aug)
    sampler = ClassBalancedSampler([0] * 11 + [1], num_samples=48, seed=0)
    drawn = list(sampler)
    rare = [k for k, i in enumerate(drawn) if i == 11]
    assert len(rare) > 10 and [getattr(drawn[k], "repeat", 0) for k in rare] == list(range(len(rare)))
    assert isinstance(drawn[rare[1]], Draw) and drawn[rare[1]] == 11 and [0, 1, 2][Draw(1, 3)] == 1
    images = [torch.cat([b["image"] for b in DataLoader(ds, batch_size=8, sampler=sampler, num_workers=n)])
              for n in (0, 2)]
    assert torch.equal(images[0], images[1])
    copies = {images[0][k].numpy().tobytes() for k in rare}
    assert len(copies) >= len(rare) // 2  # 8 flips x rotations and an HSV shift: nearly every copy differs
    assert torch.equal(images[0][rare[0]], ds[11]["image"])  # the first draw is the item as indexed alone


def test_patch_tables_of_the_wrong_form_are_refused():
    """Coordinates in the wrong form gave patches of the wrong places without a word: WSIPatchDataset rows
    outside the slide (another level's coordinates, x and y swapped) read as blank white patches, and
    NucleusPatchDataset reshaped an (n, 3) table or (2, n) columns into scrambled (x, y) pairs. Whole-number
    float labels (a pandas column) were sorted as text: 10 between 1 and 2."""
    from histoflow.ml.patches import NucleusPatchDataset

    for row in ((0, 10 ** 6, 10 ** 6), (0, -5000, -5000), (0, 100, 2967)):
        with pytest.raises(DatasetError, match=rf"CMU-1-Small-Region.svs: patch 1 at level-0 \(x={row[1]}, "
                                               r"y=.*outside the slide \(2220 x 2967 px"):
            WSIPatchDataset([SVS], coords=[(0, 0, 0), row], patch_size=64)
    edge = WSIPatchDataset([SVS], coords=[(0, -10, -10), (0, 2200, 2950)], patch_size=64)  # over an edge: padded
    assert edge[1]["image"].shape == (3, 64, 64)
    for bad in ([[100, 200, 0], [300, 400, 0]], [[100, 300, 500], [200, 400, 600]]):
        with pytest.raises(DatasetError, match=r"centroids must be an \(n, 2\) array"):
            NucleusPatchDataset(SVS, bad)
    with pytest.raises(DatasetError, match="NaN"):
        NucleusPatchDataset(SVS, [[100, float("nan")]])
    ds = NucleusPatchDataset(SVS, [[100, 100]] * 4, labels=[0.0, 2.0, 10.0, 1.0])
    assert ds.classes is None and ds.labels.tolist() == [0, 2, 10, 1]
    ds = NucleusPatchDataset(SVS, [[100, 100]] * 3, labels=np.array([2, 10, 1], object))
    assert ds.labels.tolist() == [2, 10, 1]
    ds = NucleusPatchDataset(SVS, [[100, 100]] * 3, labels=["b", "a", "b"])
    assert ds.classes == ["a", "b"] and ds.labels.tolist() == [1, 0, 1]
    with pytest.raises(DatasetError, match="fractional"):
        NucleusPatchDataset(SVS, [[100, 100]] * 2, labels=[0.5, 1.0])
    # a missing label renumbered integer classes as text ([2, 10, 3, None] -> classes '10', '2', '3', 'None')
    for gap in (None, float("nan")):
        for labels in ([2, 10, 3, gap], ["b", gap, "a", "b"], np.array([2.0, 10.0, 3.0, gap], object)):
            with pytest.raises(DatasetError, match=r"CMU-1-Small-Region.svs: 1 label\(s\) are missing \(None / NaN\), "
                                                   r"the first at centroid (3|1); drop those cells or give them a class"):
                NucleusPatchDataset(SVS, [[100, 100]] * 4, labels=labels)
    for size in ("x", 0, 2.5, True):
        with pytest.raises(DatasetError, match=r"CMU-1-Small-Region.svs: patch_size is the patch's side in pixels"):
            NucleusPatchDataset(SVS, [[100, 100]], patch_size=size)
    # patch_size, as WSIPatchDataset names it; size=, its earlier name, still works and says so
    with pytest.warns(FutureWarning, match=r"NucleusPatchDataset\(size=...\) is now patch_size=..."):
        old = NucleusPatchDataset(SVS, [[100, 100]], size=17)
    assert old.patch_size == 17 and old[0]["image"].shape == (3, 17, 17)
    with pytest.warns(FutureWarning, match=r"NucleusPatchDataset.size is now .patch_size"):
        assert old.size == 17
    with pytest.raises(DatasetError, match="give patch_size= only"):
        NucleusPatchDataset(SVS, [[100, 100]], patch_size=17, size=17)
    for kw in ({"tissue_filter": "yes"}, {"tissue_filter": True}, {"tissue_filter": 1.5},
               {"max_open_slides": "x"}, {"max_open_slides": 0}):
        with pytest.raises(DatasetError, match=rf"WSIPatchDataset: {next(iter(kw))} "):
            WSIPatchDataset([SVS], patch_size=64, **kw)


def test_patches_at_grid_corners_are_the_grid_tiles_at_any_mpp():
    """Resampled patches from a table of coordinates are the grid's tiles at the same corners, pixel for pixel
    (they all read the first tile's count of level pixels once, so 78 of 108 patches of CMU-1 at 1 µm/px
    differed), and both are windows of one resampled level: a patch off the grid's corners is that level's
    window there, whatever its size."""
    from histoflow import SlideData

    slide = SlideData(SVS)
    for mpp, size in ((1.0, 128), (0.7, 100)):
        grid = WSIPatchDataset(SVS, mpp=mpp, patch_size=size, tissue_filter=False)
        table = WSIPatchDataset(SVS, coords=grid.coords, mpp=mpp, patch_size=size)
        tiles = list(slide.grid(size, mpp=mpp))
        assert len(tiles) == len(grid)
        for i in range(len(grid)):
            assert np.array_equal(grid.read(i)["image"], table.read(i)["image"]), (mpp, i)
            assert np.array_equal(grid.read(i)["image"], slide.read_tile(tiles[i]).image), (mpp, i)
    ds = 1.0 / slide.mpp[0]
    off = WSIPatchDataset(SVS, coords=[(0, 302, 556)], mpp=1.0, patch_size=128)
    assert np.allclose(off._origins[0], (302 / ds, 556 / ds))  # not a grid corner: its exact place
    big = WSIPatchDataset(SVS, coords=[(0, int(round(150 * ds)), int(round(270 * ds)))], mpp=1.0, patch_size=200)
    small = WSIPatchDataset(SVS, coords=[(0, int(round(170 * ds)), int(round(300 * ds)))], mpp=1.0, patch_size=64)
    assert big._origins[0].tolist() == [150, 270] and small._origins[0].tolist() == [170, 300]
    assert np.array_equal(big.read(0)["image"][30:94, 20:84], small.read(0)["image"])
    # patches one level-0 pixel apart off the grid's corners are each read at their own place
    level = slide.read_region((0, 0), 0, (700, 700)).astype(np.float64)
    for x in (302, 303, 304, 305):
        one = WSIPatchDataset(SVS, coords=[(0, x, 400)], mpp=1.0, patch_size=16)
        img = one.read(0)["image"]
        ox, oy = one._origins[0]  # x / ds, or the grid's whole pixel when x is where a grid puts a tile
        assert ox in (x / ds, round(x / ds)) and oy == 400 / ds
        for i, j in ((0, 0), (7, 11), (15, 15)):  # the exact area average over its square, by hand
            y0, y1, x0, x1 = (oy + i) * ds, (oy + i + 1) * ds, (ox + j) * ds, (ox + j + 1) * ds
            ys, xs = np.arange(int(y0), int(np.ceil(y1))), np.arange(int(x0), int(np.ceil(x1)))
            wy = np.minimum(y1, ys + 1) - np.maximum(y0, ys)
            wx = np.minimum(x1, xs + 1) - np.maximum(x0, xs)
            want = np.einsum("i,j,ijc->c", wy, wx, level[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]) / (wy.sum() * wx.sum())
            assert np.abs(img[i, j] - want).max() <= 0.51, (x, i, j)


@pytest.mark.filterwarnings("ignore:.*finer than the slide's finest level")
def test_patches_of_grids_finer_than_level_0_are_the_grid_tiles():
    """A grid finer than level 0 reads each tile as its window of the whole enlarged level (a level-0 pixel
    spans several output pixels, so its output origin places a tile): its patches are the grid's tiles pixel
    for pixel. (A table of level-0 corners cannot name such tiles: two output origins share a corner.)"""
    from histoflow import SlideData

    slide = SlideData(SVS)
    grid = WSIPatchDataset(SVS, mpp=0.25, patch_size=101, tissue_filter=False)
    tiles = list(slide.grid(101, mpp=0.25))
    assert len(tiles) == len(grid) and not np.isnan(grid._origins).any()
    for i in range(0, len(grid), 37):
        assert np.array_equal(grid.read(i)["image"], slide.read_tile(tiles[i]).image), i
    # patches given by their level-0 corners: windows of the same enlarged level, at x / downsample (each
    # enlarged its rectangle on its own, up to 20 grey levels from the tile there); at 2x that is the tile
    from histoflow.core.slide import read_on_grid

    for mpp, exact in ((0.499 / 2, True), (0.499 * 0.6, False)):
        g = slide.grid(128, mpp=mpp)
        specs = [g.spec(1, 1), g.spec(2, 3)]
        ds = WSIPatchDataset(SVS, coords=[(0, t.x, t.y) for t in specs], patch_size=128, mpp=mpp)
        for k, t in enumerate(specs):
            want = read_on_grid(slide.reader, 0, (t.x / g.downsample, t.y / g.downsample), g.downsample, (128, 128))
            assert np.array_equal(ds.read(k)["image"], want)
            assert np.array_equal(ds.read(k)["image"], slide.read_tile(t).image) == exact


def test_repeats_and_files_keep_their_own_augmentation_in_a_concat_dataset(tmp_path):
    """torch's ConcatDataset subtracts the sizes of the datasets before the one an index falls in: a Draw came
    out as a plain int for every dataset after the first, so each repeat of their rare items was augmented the
    same. And a seeded augmentation shared by two files gave item i of both the same flips and colours."""
    from histoflow.ml.augment import HSVShift, RandomRotate90
    from histoflow.ml.samplers import Draw

    aug = Compose([RandomFlip(), RandomRotate90(), HSVShift(0.05, 0.2, 0.1)], seed=0)
    coords = [(0, x, 1000) for x in range(0, 400, 100)]
    a = WSIPatchDataset([SVS], coords=coords, patch_size=32, transform=aug)
    twin = tmp_path / "same-pixels-other-name.svs"
    os.symlink(SVS, twin)
    b = WSIPatchDataset([str(twin)], coords=coords, patch_size=32, transform=aug)
    both = torch.utils.data.ConcatDataset([a, b])
    assert Draw(5, 2) - 4 == 1 and (Draw(5, 2) - 4).repeat == 2 and (3 + Draw(1, 1)).repeat == 1
    copies = {both[Draw(5, r) if r else 5]["image"].numpy().tobytes() for r in range(6)}
    assert len(copies) >= 4  # b's item 1 drawn six times: (nearly) each copy its own flips and colours
    assert torch.equal(both[5]["image"], b[1]["image"])  # a first draw is the item as indexed alone
    same = [torch.equal(a[i]["image"], b[i]["image"]) for i in range(4)]
    assert not all(same)  # the same pixels under another file name: augmented independently


def test_seeded_augmentation_tells_files_of_one_name_apart_and_takes_any_seed(tmp_path):
    """The per-file part of the augmentation key was the file's name alone: slideA/tiles.h5path and
    slideB/tiles.h5path (one name per slide folder, a common layout) gave item i the same flips in every
    epoch. A negative Compose seed, which Compose itself takes, crashed every read."""
    from torch.utils.data import ConcatDataset

    from histoflow.ml.augment import RandomRotate90

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    paths = []
    for folder in ("slideA", "slideB"):
        os.makedirs(tmp_path / folder)
        paths.append(tmp_path / folder / "tiles.h5path")
        with H5PathWriter(paths[-1]) as w:
            for k, t in enumerate(tiles):
                w.add_tile(t, (16 * k, 0))
    aug = Compose([RandomFlip(), RandomRotate90()], seed=0)
    cat = ConcatDataset([TileDataset(p, transform=aug) for p in paths])
    same = [torch.equal(cat[i]["image"], cat[8 + i]["image"]) for i in range(8)]
    assert not all(same)
    again = ConcatDataset([TileDataset(p, transform=aug) for p in paths])
    assert all(torch.equal(cat[i]["image"], again[i]["image"]) for i in range(16))  # still reproducible

    neg = Compose([RandomFlip()], seed=-1)
    ds = WSIPatchDataset([SVS], coords=[(0, 800, 1000)], patch_size=32, transform=neg)
    assert ds[0]["image"].shape == (3, 32, 32) and torch.equal(ds[0]["image"], ds[0]["image"])


def test_nucleus_patches_take_histoflow_augmentations(tmp_path):
    """NucleusPatchDataset's transform is documented as an augmentation, but a Compose (which takes a sample)
    failed on the bare array; a seeded one now draws per item and epoch as the other datasets do."""
    from histoflow.ml.augment import RandomRotate90
    from histoflow.ml.patches import NucleusPatchDataset

    cells = [[1000, 1000], [1200, 900]]
    plain = NucleusPatchDataset(SVS, cells, labels=[1, 0])
    ds = NucleusPatchDataset(SVS, cells, labels=[1, 0], transform=Compose([RandomFlip(), RandomRotate90()], seed=3))
    a = ds[0]["image"]
    assert a.shape == (3, 41, 41) and torch.equal(a, ds[0]["image"])
    base = plain[0]["image"]
    views = [torch.rot90(f, k, (1, 2)) for f in (base, base.flip(2)) for k in range(4)]
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        x = ds[0]["image"]
        match = [k for k, v in enumerate(views) if torch.equal(v, x)]
        assert match  # a flip / rotation of the patch, nothing else
        seen.add(match[0])
    assert len(seen) > 1
    flipped = NucleusPatchDataset(SVS, cells, transform=lambda p: p[:, ::-1])  # a plain function still works
    assert torch.equal(flipped[0]["image"], base.flip(2))


def test_repeated_draws_keep_their_own_augmentation_through_a_subset_and_numpy_indices():
    """torch's Subset looks a sampler's index up in its list: a Draw arrived as a plain index, so every copy of a
    rare tile of a random_split came out with the same flips and colours (17 copies, 1 distinct). And numpy or
    torch integers as indices (SubsetRandomSampler(np.arange(n)), ds[np.int64(3)]) crashed a seeded dataset:
    their .repeat is a method, taken for a count."""
    from histoflow.ml.augment import HSVShift
    from histoflow.ml.data import Subset, random_split
    from histoflow.ml.samplers import ClassBalancedSampler

    path = data_path("pathml_h5path", "cmu_crop_written_by_pathml_3.0.8.h5path")
    ds = TileDataset(path, transform=Compose([RandomFlip(), HSVShift(0.05, 0.2, 0.1)], seed=0))
    assert torch.equal(ds[np.int64(3)]["image"], ds[3]["image"]) and torch.equal(ds[torch.tensor(3)]["image"],
                                                                                    ds[3]["image"])

    def copies_of_rare(dataset, rare):
        labels = [1 if i == rare else 0 for i in range(len(dataset))]
        draws = [i for i in ClassBalancedSampler(labels, 40, seed=0) if int(i) == rare]
        return len(draws), len({dataset[i]["image"].numpy().tobytes() for i in draws})

    train, _ = random_split(ds, [10, 2], generator=torch.Generator().manual_seed(0))
    assert isinstance(train, Subset)
    n, distinct = copies_of_rare(train, 0)
    assert n >= 10 and distinct >= n - 3  # (a few flips can coincide; torch's Subset gave 1)
    plain = torch.utils.data.Subset(ds, train.indices)
    assert copies_of_rare(plain, 0)[1] == 1  # why Subset exists
    assert torch.equal(train[4]["image"], ds[train.indices[4]]["image"])
    loader = DataLoader(Subset(ds, np.arange(6)), batch_size=3, sampler=torch.utils.data.SubsetRandomSampler(
        np.arange(6)))
    assert sum(len(b["image"]) for b in loader) == 6

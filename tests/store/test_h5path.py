"""h5path format version 2 (write/read) and PathML version-1 reading, on real pixels."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from histoflow.core.tile import Tile
from histoflow.errors import H5PathError
from histoflow.store import FORMAT_VERSION, H5Path, H5PathWriter, read_h5path

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")
SVS = DATA / "wsi" / "aperio_svs" / "CMU-1-Small-Region.svs"
MIBI = DATA / "multiplex" / "ark_fov8_mibitiff_22ch.tiff"
PATHML = DATA / "pathml_h5path" / "cmu_crop_written_by_pathml_3.0.8.h5path"

T = 256  # H&E tile size


@pytest.fixture(scope="module")
def he():
    """Level 0 of CMU-1-Small-Region, (2967, 2220, 3) uint8."""
    return tifffile.imread(SVS, key=0)


@pytest.fixture(scope="module")
def he_tiles(he):
    """24 real H&E tiles (a 4 x 6 grid) with a tissue mask and labels, some missing."""
    out = []
    for k, (y, x) in enumerate((y, x) for y in range(512, 512 + 6 * T, T) for x in range(256, 256 + 4 * T, T)):
        img = he[y:y + T, x:x + T]
        tissue = img.mean(axis=2) < 210
        masks = {"tissue": tissue}
        if k % 3 == 0:  # a per-tile mask only some tiles carry
            masks["dark"] = (img.min(axis=2) < 100).astype(np.uint8) * 255
        labels = {"n": k * 10, "tissue_fraction": float(tissue.mean())}
        if k % 2 == 0:
            labels["region"] = "tumour" if k % 4 == 0 else "stroma"
        out.append(Tile(image=img, coords=(x, y), masks=masks, labels=labels, name=f"cmu_x{x}_y{y}"))
    return out


SLIDE = {
    "name": "CMU-1-Small-Region", "source_path": str(SVS), "backend": "tiff", "format": "svs",
    "width": 2220, "height": 2967, "mpp": (0.499, 0.499), "objective_power": 20, "dtype": "uint8",
    "slide_type": "HE", "channel_names": ["R", "G", "B"],
    "levels": [{"width": 2220, "height": 2967, "downsample": 1.0}],
    "labels": {"grade": 2, "site": "unknown", "ok": True, "scores": [0.5, 1], "extra": {"a": None}},
}


@pytest.fixture(scope="module")
def he_file(tmp_path_factory, he, he_tiles):
    path = tmp_path_factory.mktemp("h5") / "cmu.h5path"
    import anndata
    import pandas as pd

    cells = anndata.AnnData(
        X=np.arange(20, dtype=np.float32).reshape(5, 4),
        obs=pd.DataFrame({"area": [10.0, 12.5, 8.0, 30.0, 22.0], "tile": [0, 0, 1, 5, 5]},
                         index=[f"cell{i}" for i in range(5)]),
        var=pd.DataFrame(index=["DAPI", "CD3", "CD8", "PanCK"]))
    thumb = he[::16, ::16].mean(axis=2) < 210
    with H5PathWriter(path, slide=SLIDE) as w:
        for t in he_tiles[:10]:
            w.add_tile(t)
        # the same, through the array form, one of them 2-D-masked via a non-Tile call
        for t in he_tiles[10:]:
            w.add_tile(t.image, t.coords, masks=t.masks, labels=t.labels, name=t.name)
        w.add_slide_mask("tissue", thumb, downsample=16)
        w.add_slide_mask("labels", np.arange(12, dtype=np.int32).reshape(3, 4), downsample=740.0)
        w.set_cells(cells)
        w.add_provenance({"pipeline": "Pipeline([TissueMask()])", "versions": {"numpy": np.__version__}})
        w.add_provenance({"pipeline": "second run", "date": "2025-01-01T00:00:00+00:00"})
    return path, cells, thumb


def test_he_tiles_round_trip(he_file, he_tiles):
    path, _, _ = he_file
    with read_h5path(path) as h:
        assert isinstance(h, H5Path) and h.format_version == FORMAT_VERSION == 2
        assert len(h) == len(he_tiles)
        np.testing.assert_array_equal(h.coords, [t.coords for t in he_tiles])
        assert h.coords.dtype == np.int64
        assert sorted(h.tile_mask_names) == ["dark", "tissue"]
        assert sorted(h.tile_label_names) == ["n", "region", "tissue_fraction"]
        for k, (got, want) in enumerate(zip(h, he_tiles)):
            assert got.image.dtype == np.uint8 and got.image.shape == (T, T, 3)
            assert got.image.tobytes() == want.image.tobytes()
            assert got.coords == want.coords and got.name == want.name
            assert got.level == 0 and got.downsample == 1.0
            assert got.mpp == pytest.approx((0.499, 0.499)) and got.slide_type == "HE"
            assert got.masks["tissue"].dtype == bool
            np.testing.assert_array_equal(got.masks["tissue"], want.masks["tissue"])
            if "dark" in want.masks:
                np.testing.assert_array_equal(got.masks["dark"], want.masks["dark"])
                assert got.masks["dark"].dtype == np.uint8
            else:  # absent on this tile: stored as zeros
                assert not got.masks["dark"].any() and got.masks["dark"].shape == (T, T)
            assert got.labels == want.labels  # "region" missing on odd tiles stays missing
            assert type(got.labels["n"]) is int and type(got.labels["tissue_fraction"]) is float
            assert ("region" in got.labels) == (k % 2 == 0)


def test_random_access_by_index_and_coords(he_file, he_tiles):
    path, _, _ = he_file
    want = he_tiles[5]
    with read_h5path(path) as h:
        a, b = h.tile(5), h.tile(want.coords)
        assert h[5].coords == want.coords and h.tile(-1).coords == he_tiles[-1].coords
        with pytest.raises(IndexError):
            h.tile(len(he_tiles))
        with pytest.raises(KeyError):
            h.tile((1, 1))
    for t in (a, b):
        assert t.coords == want.coords and t.name == want.name
        np.testing.assert_array_equal(t.image, want.image)


def test_slide_metadata_masks_cells_provenance(he_file):
    path, cells, thumb = he_file
    with read_h5path(path) as h:
        s = h.slide
        for k in ("name", "source_path", "backend", "format", "width", "height", "dtype", "slide_type",
                  "channel_names", "levels"):
            assert s[k] == SLIDE[k], k
        assert s["mpp"] == (0.499, 0.499) and s["objective_power"] == 20.0
        assert h.labels == SLIDE["labels"] == s["labels"]
        assert type(h.labels["grade"]) is int and h.labels["ok"] is True

        assert sorted(h.masks) == ["labels", "tissue"]
        np.testing.assert_array_equal(h.masks["tissue"], thumb)
        assert h.masks["tissue"].dtype == bool and h.mask_downsample("tissue") == 16.0
        assert h.masks["labels"].dtype == np.int32 and h.mask_downsample("labels") == 740.0

        got = h.cells
        np.testing.assert_array_equal(got.X, cells.X)
        assert list(got.obs_names) == list(cells.obs_names) and list(got.var_names) == list(cells.var_names)
        np.testing.assert_array_equal(got.obs["area"], cells.obs["area"])

        prov = h.provenance
        assert [p["pipeline"] for p in prov] == ["Pipeline([TissueMask()])", "second run"]
        assert prov[0]["versions"]["numpy"] == np.__version__ and prov[0]["date"].endswith("+00:00")
        assert prov[1]["date"] == "2025-01-01T00:00:00+00:00" and prov[0]["histoflow"]


def test_layout_chunks_compression_and_size(he_file, he_tiles):
    path, _, _ = he_file
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "h5path" and f.attrs["format_version"] == 2
        assert f.attrs["complete"] and f.attrs["writer"].startswith("histoflow ")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", f.attrs["created"])
        img = f["tiles/images"]
        assert img.shape == (24, T, T, 3) and img.dtype == np.uint8
        assert img.chunks == (1, T, T, 3) and img.maxshape == (None, T, T, 3)
        assert img.compression == "gzip" and img.compression_opts == 4
        assert f["tiles/masks/tissue"].chunks == (1, T, T) and f["tiles/masks/tissue"].attrs["bool"]
        assert f["tiles/coords"].dtype == np.int64 and f["tiles/level"].dtype == np.int16
        assert f["tiles/labels/n"].attrs["kind"] == "int"
        assert dict(f["tiles"].attrs) == {"tile_width": T, "tile_height": T, "channels": 3, "dtype": "uint8",
                                          "compression": "gzip", "compression_level": 4}
        assert f["masks/tissue"].compression == "gzip"
    raw = sum(t.image.nbytes for t in he_tiles)
    assert os.path.getsize(path) < raw


def test_mibi_uint16_22_channels(tmp_path):
    with tifffile.TiffFile(MIBI) as tf:
        stack = tf.asarray()
        names = [p.tags["PageName"].value for p in tf.pages]
    assert stack.shape == (22, 1024, 1024) and stack.dtype == np.uint16
    tiles = [np.ascontiguousarray(stack[:, y:y + 128, x:x + 128].transpose(1, 2, 0))
             for y in (0, 512) for x in (0, 384, 896)]
    path = tmp_path / "mibi.h5path"
    with H5PathWriter(path, slide={"name": "fov8", "slide_type": "MIBI", "channel_names": names,
                                   "dtype": np.uint16}, compression="lzf") as w:
        for k, img in enumerate(tiles):
            w.add_tile(img, (k * 128, 0), labels={"fov": "Point8"})
    with read_h5path(path) as h:
        assert h.slide["channel_names"] == names and len(names) == 22
        assert h.slide["mpp"] is None and h.slide["dtype"] == "uint16" and h.slide["levels"] == []
        assert h.images.dtype == np.uint16 and h.images.compression == "lzf"
        for got, want in zip(h, tiles):
            assert got.image.dtype == np.uint16 and got.image.shape == (128, 128, 22)
            assert got.image.tobytes() == want.tobytes() and got.mpp is None
            assert got.labels == {"fov": "Point8"}


def test_uncompressed_empty_and_2d_tiles(tmp_path, he):
    path = tmp_path / "empty.h5path"
    with H5PathWriter(path, compression=None):
        pass
    with read_h5path(path) as h:
        assert len(h) == 0 and h.coords.shape == (0, 2) and h.images is None and list(h) == []
        assert h.slide["name"] is None and h.labels == {} and h.cells is None and h.provenance == []
    gray = he[:64, :64, 0]
    with H5PathWriter(path, compression=None) as w:
        w.add_tile(gray, (0, 0))
    with read_h5path(path) as h:
        assert h.images.compression is None and h.tile(0).image.shape == (64, 64, 1)
        np.testing.assert_array_equal(h.tile(0).image[:, :, 0], gray)


def test_label_kinds_and_conflicts(tmp_path, he):
    img = he[:32, :32]
    path = tmp_path / "labels.h5path"
    with H5PathWriter(path) as w:
        w.add_tile(img, (0, 0), labels={"a": 1, "b": True, "c": "x"})
        w.add_tile(img, (32, 0), labels={"a": 2.5, "b": None, "c": ""})
        w.add_tile(img, (64, 0), labels={"d": np.int64(7)})
        with pytest.raises(H5PathError, match=r"tile 3 .*label 'c'"):
            w.add_tile(img, (96, 0), labels={"c": 3})
        with pytest.raises(H5PathError, match="numbers or strings"):
            w.add_tile(img, (96, 0), labels={"e": [1, 2]})
        with pytest.raises(H5PathError, match=r"2\*\*53"):
            w.add_tile(img, (96, 0), labels={"a": 2 ** 60})
    with read_h5path(path) as h:
        assert [t.labels for t in h] == [{"a": 1.0, "b": True, "c": "x"}, {"a": 2.5}, {"d": 7}]
        assert type(h.tile(2).labels["d"]) is int


def test_atomic_write_on_exception(tmp_path, he):
    path = tmp_path / "a.h5path"
    with pytest.raises(RuntimeError):
        with H5PathWriter(path) as w:
            w.add_tile(he[:64, :64], (0, 0))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []

    with H5PathWriter(path, slide={"name": "first"}) as w:
        w.add_tile(he[:64, :64], (0, 0))
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with H5PathWriter(path, slide={"name": "second"}) as w:
            w.add_tile(he[64:128, :64], (0, 64))
            assert any(".tmp-" in p for p in os.listdir(tmp_path))  # written beside, not in place
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["a.h5path"] and path.read_bytes() == before
    with read_h5path(path) as h:
        assert h.slide["name"] == "first"

    with pytest.raises(H5PathError, match="overwrite=False"):
        H5PathWriter(path, overwrite=False)
    assert os.listdir(tmp_path) == ["a.h5path"]


def test_an_interrupt_as_the_temporary_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C or TERM (the command turns TERM into KeyboardInterrupt) landing just after HDF5 created the
    temporary file, before the writer held it: the file used to stay behind (1 TERM in 30 in `histoflow tile`)."""
    real = h5py.File

    def created_then_interrupted(name, mode="r", *args, **kwargs):
        f = real(name, mode, *args, **kwargs)
        if mode == "w-":
            raise KeyboardInterrupt
        return f

    monkeypatch.setattr(h5py, "File", created_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        H5PathWriter(tmp_path / "a.h5path")
    import gc
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_bad_tiles_are_refused(tmp_path, he):
    path = tmp_path / "bad.h5path"
    with H5PathWriter(path) as w:
        w.add_tile(he[:64, :64], (0, 0), name="first")
        with pytest.raises(H5PathError, match=r"tile 1 'odd' at \(x=64, y=0\).*\(64, 32, 3\)"):
            w.add_tile(he[:64, :32], (64, 0), name="odd")
        with pytest.raises(H5PathError, match=r"tile 1 .*uint16"):
            w.add_tile(he[:64, :64].astype(np.uint16), (64, 0))
        with pytest.raises(H5PathError, match="mask 'm' has shape"):
            w.add_tile(he[:64, :64], (64, 0), masks={"m": np.zeros((8, 8), bool)})
        with pytest.raises(H5PathError, match="invalid mask name"):
            w.add_tile(he[:64, :64], (64, 0), masks={"a/b": np.zeros((64, 64), bool)})
        w.add_tile(he[:64, 64:128], (64, 0))  # the writer is still usable
        with pytest.raises(H5PathError, match="already added"):
            w.add_slide_mask("m", np.zeros((4, 4), np.uint8))
            w.add_slide_mask("m", np.zeros((4, 4), np.uint8))
    with read_h5path(path) as h:
        assert len(h) == 2 and h.coords.tolist() == [[0, 0], [64, 0]]

    with pytest.raises(H5PathError, match="float16"):
        with H5PathWriter(tmp_path / "f16.h5path") as w:
            w.add_tile(he[:8, :8].astype(np.float16), (0, 0))
    with pytest.raises(H5PathError, match="unknown slide metadata keys"):
        H5PathWriter(tmp_path / "k.h5path", slide={"nmae": "typo"})
    with pytest.raises(H5PathError, match="compression"):
        H5PathWriter(tmp_path / "c.h5path", compression="jpeg")
    assert sorted(os.listdir(tmp_path)) == ["bad.h5path"]


@pytest.fixture()
def small_file(tmp_path, he):
    path = tmp_path / "small.h5path"
    with H5PathWriter(path, slide={"name": "s"}) as w:
        for k in range(4):
            w.add_tile(he[:64, k * 64:(k + 1) * 64], (k * 64, 0))
    return path


def test_incomplete_file_is_refused(small_file):
    with h5py.File(small_file, "r+") as f:
        del f.attrs["complete"]
    with pytest.raises(H5PathError, match="incomplete: the writer did not finish"):
        read_h5path(small_file)


def test_truncated_file_is_refused(small_file, tmp_path):
    cut = tmp_path / "cut.h5path"
    shutil.copy(small_file, cut)
    with open(cut, "r+b") as fh:
        fh.truncate(os.path.getsize(cut) // 2)
    with pytest.raises(H5PathError, match=r"cut\.h5path: not a readable HDF5 file \(truncated or damaged\?\)"):
        read_h5path(cut)
    text = tmp_path / "notes.h5path"
    text.write_text("not hdf5")
    with pytest.raises(H5PathError, match="not a readable HDF5 file"):
        read_h5path(text)
    with pytest.raises(H5PathError, match="no such file"):
        read_h5path(tmp_path / "missing.h5path")


def test_foreign_hdf5_and_newer_version(tmp_path, small_file):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.random.default_rng(0).random((10, 10))
    with pytest.raises(H5PathError, match="foreign"):
        read_h5path(foreign)
    with h5py.File(foreign, "a") as f:
        f.attrs["format"] = "something-else"
    with pytest.raises(H5PathError, match="foreign"):
        read_h5path(foreign)

    with h5py.File(small_file, "r+") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(H5PathError, match="version 3 is newer"):
        read_h5path(small_file)


def test_links_outside_the_file_are_refused(small_file, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros((4, 2), np.int64)
    with h5py.File(small_file, "r+") as f:
        del f["tiles/coords"]
        f["tiles/coords"] = h5py.ExternalLink(str(other), "/x")
    with pytest.raises(H5PathError, match="ExternalLink"):
        read_h5path(small_file)


def test_closed_file(small_file):
    h = read_h5path(small_file)
    assert len(h) == 4
    h.close()
    assert h.closed
    with pytest.raises(H5PathError, match="closed"):
        h.tile(0)
    h = read_h5path(small_file)   # closed while a loop goes over its tiles: said so, not "damaged file?"
    tiles = iter(h)
    next(tiles)
    h.close()
    with pytest.raises(H5PathError, match=r"small.*: the file is closed"):
        next(tiles)


# ---------------------------------------------------------------------------------- PathML v1

def _box_blur(a, k=5):
    """cv2.boxFilter(a, -1, (k, k)) with its default border (reflect-101), in numpy."""
    p = k // 2
    c = np.pad(a.astype(np.float64), ((p, p), (p, p), (0, 0)), mode="reflect").cumsum(0).cumsum(1)
    c = np.pad(c, ((1, 0), (1, 0), (0, 0)))
    h, w = a.shape[:2]
    s = c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]
    return np.round(s / (k * k))


def test_pathml_v1_file(he):
    with h5py.File(PATHML, "r") as f:  # what PathML stored: "(i, j)" = (row, column)
        stored = sorted(tuple(int(v) for v in re.findall(r"-?\d+", g.attrs["coords"]))
                        for g in f["tiles"].values())
    with read_h5path(PATHML) as h:
        assert h.format_version == 1 and len(h) == 12
        assert sorted((y, x) for x, y in h.coords.tolist()) == stored
        assert h.labels == {"grade": 2, "site": "unknown"} and type(h.labels["grade"]) is int
        s = h.slide
        assert (s["name"], s["width"], s["height"], s["slide_type"]) == ("cmu_crop", 512, 384, "HE")
        assert s["mpp"] is None and h.tile_mask_names == ["tissue"] and h.provenance == []
        assert h.images.shape == (12, 128, 128, 3) and h.images[3].dtype == np.uint8
        tiles = list(h)
    xs, ys = {t.coords[0] for t in tiles}, {t.coords[1] for t in tiles}
    assert xs == {0, 128, 256, 384} and ys == {0, 128, 256}  # (x, y) within the 512 x 384 crop
    for t in tiles:
        assert t.image.dtype == np.uint8 and t.image.shape == (128, 128, 3)
        assert 60 < t.image.mean() < 235  # H&E, neither black nor blank
        assert t.masks["tissue"].shape == (128, 128) and t.masks["tissue"].dtype == np.uint8
        assert t.labels == {"grade": 2, "site": "unknown"} and t.level == 0 and t.name is None
        # the crop is x 800-1312, y 1000-1384 of CMU-1, and PathML stored it after BoxBlur(5)
        x, y = t.coords
        region = he[1000 + y:1000 + y + 128, 800 + x:800 + x + 128]
        assert np.abs(_box_blur(region) - t.image).mean() < 3


def test_pathml_v1_converts_to_v2(tmp_path):
    out = tmp_path / "v2.h5path"
    with read_h5path(PATHML) as old, H5PathWriter(out, slide=old.slide) as w:
        assert w.add_tiles(old) == 12
        old_tiles = list(old)
    with read_h5path(out) as new:
        assert new.format_version == 2 and new.labels == {"grade": 2, "site": "unknown"}
        assert new.images.dtype == np.uint8
        for a, b in zip(new, old_tiles):
            assert a.coords == b.coords and a.labels == b.labels
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.masks["tissue"], b.masks["tissue"])


def test_streaming_across_flush_and_growth(tmp_path, he):
    """More tiles than one metadata flush (1024) and several dataset growths; labels and masks that
    first appear late are missing / zero before."""
    n = 2600
    path = tmp_path / "many.h5path"
    src = he[:4 * 52, :4 * 50, 1]
    with H5PathWriter(path) as w:
        for k in range(n):
            y, x = divmod(k, 50)
            img = src[4 * y:4 * y + 4, 4 * x:4 * x + 4]
            labels = {"k": k}
            if k >= 1500:
                labels["late"] = f"t{k}"
            masks = {"late": img > 128} if k >= 2000 else None
            w.add_tile(img, (4 * x, 4 * y), labels=labels, masks=masks, level=k % 3, downsample=1 + k % 3)
        assert len(w) == n
    with read_h5path(path) as h:
        assert len(h) == n and h.images.shape == (n, 4, 4, 1)
        for k in (0, 1023, 1024, 1499, 1500, 1999, 2000, 2047, 2048, n - 1):
            t = h.tile(k)
            y, x = divmod(k, 50)
            np.testing.assert_array_equal(t.image[:, :, 0], src[4 * y:4 * y + 4, 4 * x:4 * x + 4])
            assert t.coords == (4 * x, 4 * y) and t.level == k % 3 and t.downsample == 1 + k % 3
            assert t.labels == ({"k": k, "late": f"t{k}"} if k >= 1500 else {"k": k})
            assert t.masks["late"].dtype == bool
            if k < 2000:
                assert not t.masks["late"].any()
            else:
                np.testing.assert_array_equal(t.masks["late"], t.image[:, :, 0] > 128)


def test_pathml_v1_hostile_strings_are_not_evaluated(tmp_path):
    path = tmp_path / "hostile.h5path"

    def fresh_copy():
        path.write_bytes(PATHML.read_bytes())  # the shared file is read-only; the copy is not

    fresh_copy()
    with h5py.File(path, "r+") as f:
        f["tiles"].move("(0, 0)", "(__import__('os').remove('x'), 0)")
    with pytest.raises(H5PathError, match=r"tile group name .*is not of the form '\(i, j\)'"):
        read_h5path(path)
    fresh_copy()
    with h5py.File(path, "r+") as f:
        f["tiles/(0, 128)"].attrs["coords"] = "(1" + "0" * 100 + ", 0)"
    with read_h5path(path) as h:
        with pytest.raises(H5PathError, match="is not a short"):
            h.tile((128, 0))
        assert h.tile(0).coords == (0, 0)


def test_htj2k_compression_is_lossless_and_smaller(tmp_path):
    """compression="htj2k": RGB tiles with lossless HTJ2K (hdf5plugin), masks gzip; encoded on a worker
    (imagecodecs' encoder) or by the writer (the HDF5 filter), the same pixels and about the same size;
    a 22-channel uint16 image falls back to gzip."""
    import h5py

    from histoflow.store import encode_tile
    from histoflow.store.h5path import htj2k_applies

    base = tifffile.imread(SVS, key=0)
    tiles = [Tile(image=base[y:y + 256, x:x + 256], coords=(x, y), masks={"dark": base[y:y + 256, x:x + 256, 0] < 120})
             for y in range(768, 1536, 256) for x in range(512, 1536, 256)]
    paths = {}
    for comp in ("gzip", "htj2k"):
        paths[comp] = tmp_path / f"{comp}.h5path"
        with H5PathWriter(paths[comp], slide={"name": "s"}, compression=comp) as w:
            for t in tiles:
                w.add_tile(t)
    assert os.path.getsize(paths["htj2k"]) < 0.9 * os.path.getsize(paths["gzip"])  # raw H&E: ~20% smaller
    with read_h5path(paths["htj2k"]) as h5:
        for i, t in enumerate(tiles):
            got = h5.tile(i)
            np.testing.assert_array_equal(got.image, t.image)
            np.testing.assert_array_equal(got.masks["dark"], t.masks["dark"])
    enc_path = tmp_path / "encoded.h5path"
    with H5PathWriter(enc_path, slide={"name": "s"}, compression="htj2k") as w:
        for t in tiles:
            w.add_tile(encode_tile(t, "htj2k", 4))
    with h5py.File(paths["htj2k"], "r") as a, h5py.File(enc_path, "r") as b:
        assert b["tiles/images"].compression is not None
        np.testing.assert_array_equal(a["tiles/images"][:], b["tiles/images"][:])  # plain h5py + hdf5plugin
        size_a = sum(len(a["tiles/images"].id.read_direct_chunk((i, 0, 0, 0))[1]) for i in range(len(tiles)))
        size_b = sum(len(b["tiles/images"].id.read_direct_chunk((i, 0, 0, 0))[1]) for i in range(len(tiles)))
        assert abs(size_a - size_b) < 0.03 * size_a  # this slide: about the same with or without the colour transform
    assert not htj2k_applies((256, 256, 22), np.uint16) and htj2k_applies((256, 256, 1), np.uint16)
    mibi = np.moveaxis(tifffile.imread(MIBI), 0, -1)[:128, :128]
    with H5PathWriter(tmp_path / "mibi.h5path", slide={"name": "m"}, compression="htj2k") as w:
        w.add_tile(encode_tile(Tile(image=mibi, coords=(0, 0)), "htj2k", 4))
    with read_h5path(tmp_path / "mibi.h5path") as h5:
        np.testing.assert_array_equal(h5.tile(0).image, mibi)


def test_htj2k_tiles_use_the_reversible_colour_transform(tmp_path):
    """HTJ2K tiles, written by the writer or encoded by the engine's workers, use JPEG 2000's reversible colour
    transform on RGB: on H&E like this patch a fifth smaller than the HDF5 filter's own encoding (no colour
    transform), the same bytes both ways, and read by plain h5py with hdf5plugin to the same pixels."""
    import imagecodecs

    from histoflow.store import encode_tile
    from histoflow.store.h5path import _FilterCodec

    image = np.ascontiguousarray(imagecodecs.imread(DATA / "he_patches" / "stardist_histo.jpg")[:256, :256, :3])
    for path, tile in ((tmp_path / "plain.h5path", Tile(image=image, coords=(0, 0))),
                       (tmp_path / "direct.h5path", encode_tile(Tile(image=image, coords=(0, 0)), "htj2k", 2))):
        with H5PathWriter(path, slide={"name": "s"}, compression="htj2k") as w:
            w.add_tile(tile)
    chunks = {}
    for name in ("plain", "direct"):
        with h5py.File(tmp_path / f"{name}.h5path", "r") as f:
            np.testing.assert_array_equal(f["tiles/images"][0], image)
            chunks[name] = f["tiles/images"].id.read_direct_chunk((0, 0, 0, 0))[1]
    assert chunks["plain"] == chunks["direct"]
    by_filter = _FilterCodec.get(image.shape, image.dtype, "htj2k").encode(image)
    assert len(chunks["direct"]) < 0.85 * len(by_filter)


def test_htj2k_encoding_is_thread_safe():
    """Workers of the threads executor encode at the same time: every chunk decodes to its own tile."""
    from concurrent.futures import ThreadPoolExecutor

    from histoflow.store import encode_tile

    base = tifffile.imread(SVS, key=0)
    tiles = [Tile(image=np.ascontiguousarray(base[y:y + 128, x:x + 128]), coords=(x, y))
             for y in range(0, 2048, 128) for x in range(0, 1024, 128)]
    with ThreadPoolExecutor(4) as ex:
        encoded = list(ex.map(lambda t: encode_tile(t, "htj2k", 2), tiles))
    for t, e in zip(tiles, encoded):
        np.testing.assert_array_equal(e.decode().image, t.image)


def _hostile(tmp_path, name, change):
    """A valid one-tile file, then changed with h5py as a stranger could."""
    p = tmp_path / f"{name}.h5path"
    with H5PathWriter(p) as w:
        w.add_tile(np.zeros((4, 4, 3), np.uint8), (0, 0))
    with h5py.File(p, "a") as f:
        change(f)
    return p


def test_absurd_sizes_are_refused_before_reading(tmp_path):
    """Tiny files whose datasets claim billions of rows or a 40 GB mask: refused, nothing allocated."""
    def tiles(f):
        n, t = 10 ** 9, f["tiles"]
        for k in list(t):
            del t[k]
        t.create_dataset("images", shape=(n, 4, 4, 3), dtype=np.uint8, chunks=(1, 4, 4, 3))
        t.create_dataset("coords", shape=(n, 2), dtype=np.int64, chunks=(4096, 2))
        t.create_dataset("level", shape=(n,), dtype=np.int16, chunks=(4096,))
        t.create_dataset("downsample", shape=(n,), dtype=np.float64, chunks=(4096,))
        t.create_dataset("names", shape=(n,), dtype=h5py.string_dtype(), chunks=(4096,))

    p = _hostile(tmp_path, "tiles", tiles)
    assert os.path.getsize(p) < 1e6
    with pytest.raises(H5PathError, match="claims 1000000000 tiles, more than histoflow reads"):
        read_h5path(p)
    p = _hostile(tmp_path, "prov", lambda f: f.create_dataset("provenance", shape=(10 ** 9,), chunks=(1024,),
                                                               dtype=h5py.string_dtype()))
    with read_h5path(p) as h, pytest.raises(H5PathError, match="claims 1000000000 records"):
        h.provenance
    p = _hostile(tmp_path, "mask", lambda f: f.require_group("masks").create_dataset(
        "m", shape=(200000, 200000), dtype=np.uint8, chunks=(512, 512), compression="gzip"))
    with read_h5path(p) as h, pytest.raises(H5PathError, match="slide mask 'm' .* 37.3 GiB"):
        h.masks["m"]


def test_odd_values_in_strangers_files_are_h5path_errors(tmp_path):
    p = _hostile(tmp_path, "fmt", lambda f: f.attrs.__setitem__("format", np.array(["h5path", "x"], dtype=h5py.string_dtype())))
    with pytest.raises(H5PathError, match="foreign HDF5 file"):
        read_h5path(p)

    def deep(f):
        f["slide"]["labels"].attrs["x"] = "[" * 100000 + "]" * 100000
        f["slide"].attrs["json_labels"] = np.array(["x"], dtype=h5py.string_dtype())
    with pytest.raises(H5PathError, match="slide label 'x' is not valid JSON"):
        with read_h5path(_hostile(tmp_path, "deep", deep)) as h:
            h.slide

    def badname(f):
        f["tiles"]["names"][0] = b"\xff\xfe"
    with read_h5path(_hostile(tmp_path, "utf", badname)) as h, pytest.raises(H5PathError, match="not UTF-8"):
        h.tile(0)

    def mask_ds(f):
        f.require_group("masks").create_dataset("m", data=np.zeros((4, 4), np.uint8)).attrs["downsample"] = "big"
    with read_h5path(_hostile(tmp_path, "ds", mask_ds)) as h, pytest.raises(H5PathError, match="invalid downsample"):
        h.mask_downsample("m")


def test_text_hdf5_cannot_hold_is_refused_at_add_tile(tmp_path):
    """NUL characters (HDF5 would cut the text there, or fail at close and lose the file), lone surrogates and
    coordinates beyond 64 bits: refused by add_tile, and the writer stays usable."""
    p = tmp_path / "t.h5path"
    with H5PathWriter(p) as w:
        w.add_tile(np.zeros((2, 2, 1), np.uint8), (0, 0), labels={"s": "good"})
        bad = [dict(labels={"s": "a\x00b"}), dict(labels={"a\x00b": 1}), dict(name="t\x00"),
               dict(labels={"s": "\udc80"}), dict(masks={"m\x00": np.zeros((2, 2), np.uint8)}),
               dict(coords=(2 ** 63, 0))]
        for kw in bad:
            with pytest.raises(H5PathError, match="NUL|Unicode|64-bit"):
                w.add_tile(np.zeros((2, 2, 1), np.uint8), kw.pop("coords", (1, 0)), **kw)
        w.add_tile(np.zeros((2, 2, 1), np.uint8), (2, 0))
    with read_h5path(p) as h:
        assert len(h) == 2 and h.tile(0).labels == {"s": "good"}
    with pytest.raises(H5PathError, match="slide name 'a\\\\x00b' contains a NUL"):
        H5PathWriter(tmp_path / "s.h5path", slide={"name": "a\x00b"})
    assert sorted(os.listdir(tmp_path)) == ["t.h5path"]


def test_pathml_v1_arrays_have_one_dtype_per_file(tmp_path):
    """PathML stores pixels and masks as float16: they read as uint8 when every tile's hold whole numbers
    0..255, else as float32 for every tile (one tile of zeros does not turn into uint8 on its own)."""
    p = tmp_path / "v1.h5path"
    with h5py.File(p, "w") as f:
        fl = f.create_group("fields")
        fl.attrs["name"] = "x"
        fl.attrs["shape"] = np.array([8, 16])
        fl.create_group("labels")
        st = fl.create_group("slide_type")
        st.attrs["stain"], st.attrs["platform"] = "HE", ""
        f.create_group("masks")
        f.create_group("counts")
        t = f.create_group("tiles")
        t.attrs["tile_shape"], t.attrs["tile_stride"] = "(8, 8, 3)", 8
        for j, (img, prob, tissue) in enumerate([(100.0, 0.0, 1.0), (100.5, 0.5, 0.0)]):
            g = t.create_group(f"(0, {8 * j})")
            g.attrs["coords"], g.attrs["name"] = f"(0, {8 * j})", 0
            g.create_dataset("array", data=np.full((8, 8, 3), img, np.float16))
            m = g.create_group("masks")
            m.create_dataset("prob", data=np.full((8, 8), prob, np.float16))
            m.create_dataset("tissue", data=np.full((8, 8), tissue, np.float16))
            g.create_group("labels")
    with read_h5path(p) as h:
        tiles = list(h)
        assert {t.image.dtype for t in tiles} == {np.dtype(np.float32)}
        assert {t.masks["prob"].dtype for t in tiles} == {np.dtype(np.float32)}
        assert {t.masks["tissue"].dtype for t in tiles} == {np.dtype(np.uint8)}
        assert h.images[np.int64(1)].max() == np.float32(100.5)
        with H5PathWriter(tmp_path / "v2.h5path", slide=h.slide) as w:  # the conversion in docs/h5path.md
            w.add_tiles(h)


def test_chunks_of_many_tiles_are_refused(tmp_path):
    """A (hostile or foreign) file whose tiles share one big chunk would inflate all of them to read one:
    refused when opened, naming the dataset."""
    path = str(tmp_path / "bomb.h5path")
    with H5PathWriter(path, slide={"name": "s"}) as w:
        for i in range(4):
            w.add_tile(np.full((32, 32, 3), 10 * i, np.uint8), (32 * i, 0), masks={"m": np.ones((32, 32), bool)})
    with h5py.File(path, "r+") as f:
        data = f["tiles/images"][()]
        del f["tiles/images"]
        f["tiles"].create_dataset("images", data=data, chunks=(4, 32, 32, 3), compression="gzip")
    with pytest.raises(H5PathError, match=r"/tiles/images is stored in chunks of 4 tiles"):
        read_h5path(path)


def test_writer_output_errors_come_first_and_are_output_errors(tmp_path, monkeypatch):
    """A missing folder, or a temporary folder on another file system (the finished file is moved into
    place by a rename), is refused before any tile is written, as an OutputError (an OSError) that is also
    an H5PathError."""
    from histoflow.errors import OutputError

    with pytest.raises(OutputError, match="the output folder .*nowhere does not exist") as e:
        H5PathWriter(str(tmp_path / "nowhere" / "x.h5path"))
    assert isinstance(e.value, H5PathError) and isinstance(e.value, OSError)
    other = tmp_path / "other_fs"
    other.mkdir()
    real_stat = os.stat

    def stat(p, *a, **k):  # the temporary folder on a device of its own
        st = real_stat(p, *a, **k)
        if os.fspath(p) == str(other):
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev + 1) + tuple(st)[3:])
        return st

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(OutputError, match="is on another file system than the output"):
        H5PathWriter(str(tmp_path / "x.h5path"), temp_dir=str(other))
    assert os.listdir(other) == [] and not (tmp_path / "x.h5path").exists()
    monkeypatch.undo()
    with H5PathWriter(str(tmp_path / "x.h5path"), temp_dir=str(other)) as w:  # the same device: fine
        w.add_tile(np.zeros((8, 8, 3), np.uint8), (0, 0))
    assert len(read_h5path(str(tmp_path / "x.h5path"))) == 1

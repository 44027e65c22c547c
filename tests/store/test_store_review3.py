"""Defects found by a review of the public API with bad input (session 23): odd but readable h5path files (either
version) gave raw numpy / Python errors from the reader, `histoflow info` and `histoflow thumbnail`."""
import shutil

import h5py
import numpy as np
import pytest
from datafiles import data_path

from histoflow.cli import main
from histoflow.errors import H5PathError
from histoflow.store import H5PathWriter, read_h5path

PATHML = data_path("pathml_h5path", "cmu_crop_written_by_pathml_3.0.8.h5path")


class _Result:
    def __init__(self, returncode, out, err):
        self.returncode, self.stdout, self.stderr = returncode, out, err


def _cli(capsys, *args):
    """The CLI in this process: an exception other than the project's own would propagate and fail the test."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return _Result(rc, out, err)


def _v2(path):
    rng = np.random.default_rng(0)
    with H5PathWriter(path, slide={"name": "s", "width": 64, "height": 32, "labels": {"g": 2}}) as w:
        for i in range(2):
            w.add_tile(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), (i * 32, 0), masks={"m": np.eye(32) > 0})
        w.add_slide_mask("tissue", np.ones((8, 16), bool), 4)
        w.add_provenance({"kind": "pipeline run", "executor": {"kind": "dask", "workers": 2}, "failed_tiles": [],
                          "tiles_written": 2, "elapsed_s": 1.5})
    return path


def test_pathml_tiles_unlike_the_first_and_broken_slide_masks_are_named(tmp_path, capsys):
    bad = tmp_path / "v1.h5path"
    shutil.copy(PATHML, bad)
    with h5py.File(bad, "a") as f:
        key = sorted(f["tiles"])[3]
        del f[f"tiles/{key}/array"]
        f[f"tiles/{key}/array"] = np.zeros((128, 128, 4), np.float16)
        f["masks/flat"] = np.zeros((4, 4, 3), np.uint8)
        f["masks/empty"] = np.zeros((0, 0), np.uint8)
    with read_h5path(bad) as h:
        h.tile(0)  # the other tiles read as before
        with pytest.raises(H5PathError, match=r"v1.h5path: inconsistent: tile 3 .* shape \(128, 128, 4\).*first tile"):
            h.images[()]
        for name in ("flat", "empty"):
            with pytest.raises(H5PathError, match=f"v1.h5path: inconsistent: slide mask '{name}' has shape"):
                h.masks[name]
    r = _cli(capsys, "thumbnail", bad, "-o", tmp_path / "x.png")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "inconsistent" in r.stderr, r.stderr


@pytest.mark.parametrize("damage, match, verb", [
    (lambda f: f["slide"].attrs.__setitem__("json_labels", 5), "'json_labels' must list label names", "info"),
    (lambda f: f["tiles/masks/m"].attrs.__setitem__("bool", [1, 1]), "attribute 'bool' of /tiles/masks/m must be",
     "info"),
    (lambda f: f["masks/tissue"].attrs.__setitem__("bool", "yes"), "attribute 'bool' of /masks/tissue must be",
     "thumbnail"),
])
def test_odd_attributes_of_a_store_are_inconsistencies(tmp_path, capsys, damage, match, verb):
    path = _v2(tmp_path / "v2.h5path")
    with h5py.File(path, "a") as f:
        damage(f)
    with pytest.raises(H5PathError, match=match):
        with read_h5path(path) as h:
            h.slide, h.masks["tissue"], h.tile(0)
    r = _cli(capsys, verb, path, *(["-o", tmp_path / "x.png"] if verb == "thumbnail" else []))
    assert r.returncode != 0 and "Traceback" not in r.stderr and "v2.h5path" in r.stderr, r.stderr


def test_slide_masks_and_images_of_no_size_are_refused(tmp_path, capsys):
    path = _v2(tmp_path / "v2.h5path")
    with h5py.File(path, "a") as f:
        f["masks/empty"] = np.zeros((0, 4), np.uint8)
        f["masks/text"] = np.array([[b"a", b"b"]])
    with read_h5path(path) as h:
        for name in ("empty", "text"):
            with pytest.raises(H5PathError, match=f"inconsistent: slide mask /masks/{name} has shape"):
                h.masks[name]
    r = _cli(capsys, "thumbnail", path, "-o", tmp_path / "x.png")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "slide mask" in r.stderr, r.stderr
    path2 = tmp_path / "nochannels.h5path"
    with h5py.File(_v2(path2), "a") as f:
        del f["tiles/images"]
        f["tiles/images"] = np.zeros((2, 32, 32, 0), np.uint8)
    with pytest.raises(H5PathError, match=r"inconsistent: /tiles/images has shape \(2, 32, 32, 0\)"):
        read_h5path(path2)


def test_info_shows_only_what_provenance_records_plainly(tmp_path, capsys):
    path = _v2(tmp_path / "v2.h5path")
    with read_h5path(path) as h:
        run = h.info()["runs"][0]
        assert run.pop("date").startswith("20")  # the writer dates each record
        assert run == {"kind": "pipeline run", "steps": None, "tiles_written": 2, "failed_tiles": 0,
                       "executor": "dask", "elapsed_s": 1.5}
    with h5py.File(path, "a") as f:  # a record of odd types (written by hand or by another program)
        del f["provenance"]
        f.create_dataset("provenance", data=['{"executor": [1], "failed_tiles": 7, "kind": 3, "tiles_written": '
                                             '"many", "elapsed_s": true, "date": [2026]}'],
                         dtype=h5py.string_dtype())
    with read_h5path(path) as h:
        assert h.info()["runs"][0] == {"kind": None, "date": None, "steps": None, "tiles_written": None,
                                       "failed_tiles": None, "executor": None, "elapsed_s": None}
    r = _cli(capsys, "info", path)
    assert r.returncode == 0 and "run" in r.stdout, r.stderr

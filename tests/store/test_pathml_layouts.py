"""PathML h5path files as PathML 3.0.8 writes them in two cases the sample file does not hold: cell counts
(`/counts`, copied from an .h5ad by PathML's utils.writecounts) and multiparametric tiles as its BioFormats
backend yields them, (i, j, z, c, t)."""
import os
import shutil
import tempfile

import h5py
import numpy as np
import pytest
from datafiles import data_path

from histoflow.errors import H5PathError
from histoflow.store import read_h5path

PATHML = data_path("pathml_h5path", "cmu_crop_written_by_pathml_3.0.8.h5path")


def test_cell_counts_as_pathml_writes_them(tmp_path):
    """PathML copies the members of an .h5ad into /counts but not the file's own encoding attributes, which
    the reader required: every such file failed ("/counts is not an anndata-encoded group")."""
    import anndata
    import pandas as pd

    dst = tmp_path / "counts.h5path"
    shutil.copy(PATHML, dst)
    ad = anndata.AnnData(X=np.arange(15, dtype=np.float32).reshape(5, 3),
                         obs=pd.DataFrame({"x": np.arange(5.0), "tile": ["(0, 0)"] * 5}, index=list("abcde")),
                         var=pd.DataFrame(index=["DAPI", "CD3", "CD8"]))
    with tempfile.TemporaryDirectory() as d:  # as utils.writecounts does it
        fn = os.path.join(d, "tmpfile.h5ad")
        ad.write_h5ad(fn)
        with h5py.File(dst, "a") as f, h5py.File(fn, "r") as counts:
            assert "encoding-type" not in f["counts"].attrs
            for key in counts:
                counts.copy(key, f["counts"])
    with read_h5path(dst) as h5:
        cells = h5.cells
    assert list(cells.obs_names) == list("abcde") and list(cells.var_names) == ["DAPI", "CD3", "CD8"]
    np.testing.assert_array_equal(cells.X, ad.X)
    assert list(cells.obs["tile"]) == ["(0, 0)"] * 5
    with h5py.File(dst, "a") as f:  # something else under /counts is still refused, by name
        for key in list(f["counts"]):
            del f["counts"][key]
        f["counts"].create_dataset("junk", data=[1, 2])
    with read_h5path(dst) as h5, pytest.raises(H5PathError, match=r"/counts holds neither .* \['junk'\]"):
        h5.cells


def _multiparametric(path, shape):
    """Four tiles written as PathML's h5pathManager.add_tile writes BioFormats tiles (float16 arrays)."""
    with h5py.File(path, "w") as f:
        fields = f.create_group("fields")
        fields.attrs["name"] = "vectra"
        fields.attrs["shape"] = (256, 256, 1, 3, 1)
        fields.create_group("labels")
        st = fields.create_group("slide_type")
        for k, v in dict(stain="Fluor", platform="Vectra", tma=0, rgb=0, volumetric=0, time_series=0).items():
            st.attrs[k] = v
        tiles = f.create_group("tiles")
        tiles.attrs["tile_shape"] = str(shape).encode()
        tiles.attrs["tile_stride"] = 128
        f.create_group("masks")
        f.create_group("counts")
        rng = np.random.default_rng(0)
        arrays = {}
        for i in (0, 128):
            for j in (0, 128):
                key = str((i, j))
                arrays[(j, i)] = rng.integers(0, 255, shape).astype(np.float16)
                tiles.create_group(key).create_dataset("array", data=arrays[(j, i)], compression="gzip")
                tiles[key].attrs["coords"] = key
                tiles[key].attrs["name"] = 0
                tiles[key].create_group("labels")
    return arrays


def test_multiparametric_tiles_with_z_and_t_axes(tmp_path):
    """Tiles of shape (h, w, 1, c, 1) were refused, and with them the slide's own metadata."""
    arrays = _multiparametric(tmp_path / "mp.h5path", (128, 128, 1, 3, 1))
    with read_h5path(tmp_path / "mp.h5path") as h5:
        assert h5.slide["slide_type"] == "Vectra" and len(h5) == 4
        for t in h5:
            assert t.image.shape == (128, 128, 3)
            np.testing.assert_array_equal(t.image, arrays[t.coords][:, :, 0, :, 0].astype(np.uint8))
    _multiparametric(tmp_path / "z.h5path", (128, 128, 2, 3, 1))
    with read_h5path(tmp_path / "z.h5path") as h5, pytest.raises(H5PathError, match=r"holds 2 z-planes and 1 time"):
        h5.tile(0)


def test_info_of_a_pathml_file_gives_its_compression_and_mask_shapes(tmp_path):
    """`info()` (and `histoflow info`) said compression None and slide-mask shape None for PathML's files."""
    q = tmp_path / "pm.h5path"
    shutil.copy(PATHML, q)
    os.chmod(q, 0o644)
    with h5py.File(q, "a") as f:
        f["masks"].create_dataset("tissue", data=np.zeros((384, 512), np.uint8))  # as PathML's add_mask writes it
        first = f["tiles"][next(iter(f["tiles"]))]["array"].compression
    assert first == "gzip"
    with read_h5path(q) as h:
        info = h.info()
        assert info["format_version"] == 1
        assert info["compression"] == "gzip"
        assert info["masks"]["tissue"]["shape"] == (384, 512) == h.masks["tissue"].shape

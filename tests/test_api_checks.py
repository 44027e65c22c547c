"""Misuse of the public API that gave raw Python errors, blank results or silent truncation."""
import numpy as np
import pytest
from datafiles import SVS, data_path

import histoflow
from histoflow.errors import ParameterError, RegionError


def test_star_import_gives_the_documented_names():
    names = {}
    exec("from histoflow import *", names)
    for n in ("SlideData", "SlideDataset", "Pipeline", "Transform", "read_h5path", "H5Path", "Tile", "TileGrid",
              "SlideType", "open_slide", "HistoflowError"):
        assert n in names, n


def test_regions_and_tiles_of_the_wrong_kind():
    s = histoflow.SlideData(SVS)
    with pytest.raises(RegionError, match="must be pairs of integers, got .*10.9"):
        s.read_region((0, 0), 0, (10.9, 10))  # was read as 10 x 10
    assert s.read_region((0.0, np.int64(0)), 0, (10.0, 10)).shape == (10, 10, 3)
    with pytest.raises(ParameterError, match=r"read_tile takes a TileSpec of slide.grid"):
        s.read_tile((0, 0))  # AttributeError before


def test_models_and_rasterize_name_their_bad_arguments():
    import histoflow.annotations as A
    from histoflow.ml import models

    with pytest.raises(ParameterError, match=r"unet: no parameter\(s\) \['in_chans'\]; it takes .*'in_channels'"):
        models.create("unet", in_chans=3)  # TypeError before
    p = A.Polygon(np.array([[0.0, 0], [10, 0], [10, 10], [0, 10]]))
    for shape in ((20, 20, 3), (-1, 20), (20.5, 3)):  # cut to 2-D / numpy's ValueError before
        with pytest.raises(ParameterError, match="rasterize: shape is the output's"):
            A.rasterize([p], shape)


def test_nucleus_patches_check_their_pixel_size_and_channels():
    from histoflow.ml.data import DatasetError
    from histoflow.ml.patches import NucleusPatchDataset

    he = histoflow.SlideData(data_path("he_patches", "tiatoolbox_stain_target.png"), mpp=0.25)
    for mpp in (-0.5, 0):  # one flat colour before
        with pytest.raises(DatasetError, match="mpp must be a positive number"):
            NucleusPatchDataset(he, [[500, 500]], patch_size=41, mpp=mpp)
    mibi = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")
    ds = NucleusPatchDataset(mibi, [[500, 500]], channels=["HH3", 2])  # names as elsewhere (IndexError before)
    assert ds[0]["image"].shape == (2, 41, 41)
    for bad in (["nope"], [99]):
        with pytest.raises(DatasetError, match="channels: .*(no channel 'nope'|channel 99 out of range)"):
            NucleusPatchDataset(mibi, [[500, 500]], channels=bad)


def test_the_annotations_subpackage_is_an_attribute_of_the_package():
    """`from __future__ import annotations` in histoflow/__init__.py bound the name `annotations` to __future__'s
    feature object: `from histoflow import annotations` gave that object, not the subpackage."""
    import subprocess
    import sys

    code = ("import histoflow; from histoflow import annotations; "
            "print(annotations.__name__, callable(annotations.convert), hasattr(histoflow, 'annotations'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == ["histoflow.annotations", "True", "True"], r.stderr

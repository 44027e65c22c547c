"""Channel stacks the readers took apart, channel names of written stores, and quantify's slide type (session 28
review)."""
import numpy as np
import pytest
import tifffile
from datafiles import data_path

from histoflow import open_slide
from histoflow.core.slide import SlideData
from histoflow.errors import ParameterError
from histoflow.store import read_h5path

MIBI = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")
NAMES = ["HH3", "CD3", "CD8", "CD45"]


@pytest.fixture(scope="module")
def planes():
    return tifffile.imread(MIBI)[[13, 4, 7, 6], :200, :200]


def test_channels_written_page_by_page_are_said_to_be_left_out(tmp_path, planes):
    """A stack written one page a channel (tifffile lists each page as a series), or an OME-TIFF of one Image a
    channel, was read as its first channel alone, without a word (quantify wrote a 1-channel table)."""
    pages = tmp_path / "pages.tif"
    with tifffile.TiffWriter(pages) as tw:
        for name, p in zip(NAMES, planes):
            tw.write(p, photometric="minisblack", extratags=[(285, "s", 0, name, False)])
    ome = tmp_path / "multi.ome.tif"
    with tifffile.TiffWriter(ome, ome=True) as tw:
        for name, p in zip(NAMES, planes):
            tw.write(p, photometric="minisblack", metadata={"axes": "YX", "Name": name})
    for path in (pages, ome):
        with pytest.warns(UserWarning, match=r"3 more image\(s\) of the slide's size .*'CD3', 'CD8', 'CD45'"):
            r = open_slide(path)
        with r:
            assert r.channels == 1 and any("not read" in w for w in r.warnings)
    stack = tmp_path / "stack.tif"  # the way the warning advises: one image of four channels, nothing left out
    tifffile.imwrite(stack, planes, photometric="minisblack", metadata={"axes": "CYX"})
    with open_slide(stack) as r:
        assert r.channels == 4 and not any("not read" in w for w in r.warnings)


def test_imagej_hyperstack_channel_names_beside_z(tmp_path, planes):
    """ImageJ keeps one label a plane (C fastest): with Z = 2 the 6 labels did not match 3 channels and the names
    became 'channel 0' ..."""
    zc = np.stack([planes[:3], planes[:3]])
    path = tmp_path / "zc.tif"
    tifffile.imwrite(path, zc, imagej=True, metadata={"axes": "ZCYX", "Labels": NAMES[:3] * 2})
    with open_slide(path) as r:
        assert r.channel_names == NAMES[:3]


def test_written_stores_name_collapsed_fluorescence_channels_honestly(tmp_path, planes):
    """SlideData.write called 3 fluorescence channels R, G, B (and the slide run named them DAPI, CD3, CD8)."""
    from histoflow.transforms import CollapseRunsVectra, Pipeline

    src = tmp_path / "if.ome.tif"
    tifffile.imwrite(src, np.concatenate([planes, planes[:1]]), metadata={
        "axes": "CYX", "Channel": {"Name": ["DAPI", "CD3", "CD8", "CD20", "AF"]},
        "PhysicalSizeX": 0.39, "PhysicalSizeY": 0.39})
    pipe = Pipeline([CollapseRunsVectra(3)])
    with SlideData(src) as s:
        assert s.slide_type.name == "IF"
        s.write(tmp_path / "a.h5path", (pipe(t) for t in s.generate_tiles(128)))
        s.write(tmp_path / "b.h5path", (pipe(t) for t in s.generate_tiles(128)), channel_names=["DAPI", "CD3", "CD8"])
        with pytest.raises(ParameterError, match="2 channel_names for tiles of 3"):
            s.write(tmp_path / "c.h5path", (pipe(t) for t in s.generate_tiles(128)), channel_names=["a", "b"])
        run = s.run(pipe, str(tmp_path / "r.h5path"), tile_size=128, executor="inprocess", progress=False)
    with read_h5path(tmp_path / "a.h5path") as h:
        assert h.slide.get("channel_names") is None
    with read_h5path(tmp_path / "b.h5path") as h:
        assert list(h.slide["channel_names"]) == ["DAPI", "CD3", "CD8"]
    with read_h5path(run) as h:
        assert list(h.slide["channel_names"]) == ["DAPI", "CD3", "CD8"]
    assert not (tmp_path / "c.h5path").exists()


def test_quantify_takes_a_slide_type(tmp_path, capsys):
    """A fluorescence export saved as RGB was measured as H&E, and --nuclear-channel refused, with no way to say
    what it is."""
    from histoflow.cli import main

    m = tifffile.imread(MIBI)[:, :384, :384].astype(float)
    scaled = [np.clip(m[c] / np.percentile(m[c], 99.5) * 255, 0, 255).astype(np.uint8) for c in (4, 19, 13)]
    src = tmp_path / "if_rgb.tif"
    tifffile.imwrite(src, np.dstack(scaled), photometric="rgb", resolution=(1 / 0.39e-4, 1 / 0.39e-4),
                     resolutionunit="CENTIMETER")
    assert main(["quantify", str(src), "-o", str(tmp_path / "c.h5ad"), "--slide-type", "IF", "--nuclear-channel",
                 "B", "--no-progress", "--png", "none"]) == 0
    out = capsys.readouterr().out
    assert "cells x 3 channels (R, G, B)" in out
    import anndata

    a = anndata.read_h5ad(tmp_path / "c.h5ad")
    assert a.n_obs > 20 and list(a.var_names) == ["R", "G", "B"]

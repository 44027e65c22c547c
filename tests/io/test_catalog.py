"""Every file of ../shared/data/catalog.json opens, and `histoflow info --json` agrees with the catalog."""
import json

import numpy as np
import pytest

from histoflow import open_slide
from histoflow.cli import main

from datafiles import DATA, data_path

with open(data_path("catalog.json")) as _f:
    CATALOG = json.load(_f)

# files whose resolution tag is known to be wrong (catalog note): mpp must be refused, with a warning
WRONG_MPP = {k for k, v in CATALOG.items() if "mpp tag written wrong" in v.get("note", "")}


def expected_geometry(entry):
    """(width, height, channels) from the catalog entry, whichever way it states them."""
    if "width" in entry:
        return entry["width"], entry["height"], entry.get("channels")
    shape = entry["shape"]
    axes = entry.get("axes")
    if axes:
        d = dict(zip(axes, shape))
        return d["X"], d["Y"], d.get("S", d.get("C", 1))
    if len(shape) == 2:
        return shape[1], shape[0], 1
    if shape[-1] in (3, 4) and shape[0] > 4:
        return shape[1], shape[0], shape[2]
    return shape[2], shape[1], shape[0]  # channels first


def info_json(path, capsys):
    assert main(["info", path, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("rel", sorted(CATALOG))
def test_info_agrees_with_catalog(rel, capsys):
    entry = CATALOG[rel]
    path = data_path(rel)
    info = info_json(path, capsys)
    for key in ("path", "format", "backend", "width", "height", "levels", "mpp", "channel_names", "dtype",
                "associated_images", "warnings"):
        assert key in info, key
    w, h, c = expected_geometry(entry)
    assert (info["width"], info["height"]) == (w, h)
    if c is not None:
        assert len(info["channel_names"]) == c
    if "channel_names" in entry:
        assert info["channel_names"] == entry["channel_names"]
    assert info["dtype"] == entry["dtype"]
    if "levels" in entry:
        assert len(info["levels"]) == entry["levels"]
    if "level_dimensions" in entry:
        assert [[lv["width"], lv["height"]] for lv in info["levels"]] == entry["level_dimensions"]
    assert info["levels"][0] == {"width": w, "height": h, "downsample": 1.0}
    if rel in WRONG_MPP:
        assert info["mpp"] is None
        assert any("implausible" in msg and "0.00499" in msg for msg in info["warnings"]), info["warnings"]
    elif "mpp" in entry:
        want = entry["mpp"] if isinstance(entry["mpp"], list) else [entry["mpp"], entry["mpp"]]
        assert info["mpp"] == pytest.approx(want, abs=1e-4)
    if "associated_images" in entry:
        assert sorted(info["associated_images"]) == sorted(entry["associated_images"])
    if "objective_power" in entry:
        assert info["objective_power"] == pytest.approx(float(entry["objective_power"]))
    region = entry.get("region_x1000_y1000_256")
    if region:
        with open_slide(path) as s:
            r = s.read_region((1000, 1000), 0, (256, 256))
        assert r.shape == (256, 256, 3) and r.dtype == np.uint8
        np.testing.assert_allclose(r.reshape(-1, 3).mean(0), region["mean"], atol=1.5)


def test_catalog_covers_the_data_folder():
    """Nothing in the data folder escapes the catalog test (the training images are not slides)."""
    import os

    listed = {os.path.normpath(k) for k in CATALOG}
    for sub in ("wsi", "multiplex", "fluorescence", "he_patches"):
        for root, dirs, files in os.walk(os.path.join(DATA, sub)):
            rel = os.path.relpath(root, DATA)
            if os.path.normpath(rel) in listed:
                dirs[:] = []
                continue
            for f in files:
                assert os.path.normpath(os.path.join(rel, f)) in listed, f

"""A tile without pixels (a zero-width or zero-height image) gives empty results from every transform, as the
blurs and NucleusDetectionHE already did, instead of an OpenCV assertion, a NumPy reduction error or an
IndexError from deep inside; learned models that cannot answer without pixels say so in our own words."""
import warnings

import numpy as np
import pytest

import histoflow.transforms as T
from histoflow.core.tile import Tile
from histoflow.errors import ParameterError
from histoflow.ml.transforms import NucleusSegmentation, _need_pixels

SHAPES = [(0, 5, 3), (7, 0, 3), (0, 0, 3)]

# every transform of the library that needs no model, built with the parameters it needs
BUILT = {
    "MorphOpen": dict(mask_name="m"), "MorphClose": dict(mask_name="m"), "ForegroundDetection": dict(mask_name="m"),
    "CollapseRunsCODEX": dict(n_cycles=1, channels_per_cycle=3),
    "SegmentNuclei": dict(nuclear_channel=0), "SegmentCells": dict(nuclear_channel=0, membrane_channels=[1]),
    "VirtualHE": dict(nuclear_channel=0),
}
NAMES = sorted(n for n in dir(T) if isinstance(getattr(T, n), type) and issubclass(getattr(T, n), T.Transform)
               and n not in ("Transform", "Pipeline", "QuantifyCells"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_every_transform_takes_a_tile_without_pixels(name, shape):
    t = getattr(T, name)(**BUILT.get(name, {}))
    multiplex = name in ("SegmentNuclei", "SegmentCells", "VirtualHE", "CollapseRunsCODEX")
    tile = Tile(np.zeros(shape, np.uint16 if multiplex else np.uint8), coords=(0, 0),
                slide_type="IF" if multiplex else "HE")
    tile.masks["m"] = np.zeros(shape[:2], np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.apply(tile)
    assert tile.image.shape[:2] == shape[:2]
    for k, m in tile.masks.items():
        assert m.shape == shape[:2], k
    for k in t.labels_out:
        assert k in tile.labels
    if name == "SegmentCells":  # and then the cell table is empty, not an error
        T.QuantifyCells().apply(tile)
        assert all(len(v) == 0 for v in tile.cells.values())
    if name in ("SegmentNuclei", "SegmentCells", "NucleusDetectionHE"):
        assert tile.labels[t.labels_out[0]] == 0


def test_labels_of_a_tile_without_pixels():
    tile = Tile(np.zeros((0, 9, 3), np.uint8), coords=(0, 0), slide_type="HE")
    T.BlurQC().apply(tile)
    assert np.isnan(tile.labels["laplacian_variance"]) and tile.labels["blur"] is False
    T.LabelWhiteSpaceHE().apply(tile)
    T.LabelArtifactTileHE().apply(tile)
    assert tile.labels["white_space"] is False or tile.labels["white_space"] == 0
    assert not tile.labels["artifact"]


def test_the_nucleus_model_finds_no_nuclei_without_pixels():
    seg = NucleusSegmentation()
    for shape in SHAPES:
        tile = Tile(np.zeros(shape, np.uint8), coords=(0, 0), mpp=(0.25, 0.25))
        seg.apply(tile)
        assert tile.masks["nuclei"].shape == shape[:2] and tile.labels["nucleus_count"] == 0


def test_models_that_cannot_answer_without_pixels_say_so():
    with pytest.raises(ParameterError, match=r"PatchClassification: the image has no pixels \(shape \(0, 4, 3\)\)"):
        _need_pixels(np.zeros((0, 4, 3), np.uint8), "PatchClassification")
    _need_pixels(np.zeros((1, 1, 3), np.uint8), "PatchClassification")  # one pixel is enough

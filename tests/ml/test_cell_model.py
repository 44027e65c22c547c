"""The pluggable model segmenter: a small ONNX network with Mesmer-style outputs, on the real MIBI image."""
import numpy as np
import pytest
import torch
from datafiles import data_path

from histoflow.core.slide import SlideData
from histoflow.errors import HistoflowError
from histoflow.ml.onnx import export_onnx
from histoflow.ml.transforms import SegmentCellsModel
from histoflow.store import read_h5path
from histoflow.transforms.multiplex import SegmentNuclei

MIBI = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")


class _BlobNet(torch.nn.Module):
    """Stands in for a trained segmenter: inner distance ~ smoothed nuclear signal, foreground ~ where it is
    high. A fixed Gaussian convolution, so its output is known without training."""

    size_divisor = 16

    def __init__(self, sigma=4.0, threshold=0.12):
        super().__init__()
        r = int(3 * sigma)
        g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
        k = torch.outer(g, g)
        self.conv = torch.nn.Conv2d(1, 1, 2 * r + 1, padding=r, bias=False)
        self.conv.weight.data[:] = k / k.sum()
        self.threshold = threshold

    def forward(self, x):
        s = self.conv(x[:, :1])
        return torch.cat([s, torch.sigmoid((s - self.threshold) * 50)], 1)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "blob.onnx"
    export_onnx(_BlobNet().eval(), path, input_shape=(1, 2, 64, 64), dynamic_spatial=True)
    return str(path)


def test_model_segmenter_finds_the_nuclei(onnx_model):
    with SlideData(MIBI) as s:
        image = s.reader.read_region((0, 0), 0, (512, 512))
        names, mpp = list(s.reader.channel_names), s.mpp[0]
        classical = SegmentNuclei()
        classical.fit_slide(s)
    seg = SegmentCellsModel(onnx_model, membrane_channels=["Membrane"], model_mpp=mpp, radius_um=3.0)
    seg.channel_names_ = names
    lab = seg.F(image, mpp)
    ref = classical.F(image, mpp)
    assert lab.shape == (512, 512) and lab.dtype == np.int32
    assert 0.6 * ref.max() < lab.max() < 1.5 * ref.max()
    # the objects sit on the nuclei the classical method finds
    assert ((lab > 0) & (ref > 0)).sum() > 0.6 * (ref > 0).sum()
    # a model at 0.5 µm/px on this 0.39 µm/px image: inputs resampled, labels back at the tile's size
    coarse = SegmentCellsModel(onnx_model, model_mpp=0.5, radius_um=3.0)
    coarse.channel_names_ = names
    assert coarse.F(image, mpp).shape == (512, 512)


def test_model_segmenter_through_the_engine_with_tiles(tmp_path, onnx_model):
    """The count does not depend on the tiling: the inputs are scaled once for the slide (per tile, 256 and
    1024 px tiles gave 388 and 380 cells), and an edge tile's fill is not given to the model (200 px tiles
    leave narrow ones at the right and bottom)."""
    counts = []
    for tile, overlap in ((256, 80), (1024, 0), (200, 80)):   # 80: a whole large cell (min_overlap 77 px here)
        with SlideData(MIBI) as s:
            out = s.run(SegmentCellsModel(onnx_model, model_mpp=s.mpp[0], radius_um=3.0),
                        str(tmp_path / f"t{tile}.h5path"), tile_size=tile, overlap=overlap, executor="inprocess",
                        progress=False)
        with read_h5path(out) as h:
            counts.append(sum(h.tile(i).labels["cell_count"] for i in range(len(h))))
    assert counts[0] == counts[1] == counts[2] and counts[0] > 300, counts
    with pytest.raises(HistoflowError, match="no such model file"):
        SegmentCellsModel(str(tmp_path / "none.onnx"))


def test_one_membrane_channel_by_name_or_index(onnx_model):
    """A lone name was iterated letter by letter ('no channel M'), a lone index raised a raw TypeError."""
    from histoflow.errors import ParameterError

    with SlideData(MIBI) as s:
        for one in ("Membrane", 17):   # "Membrane (200)" is channel 17
            seg = SegmentCellsModel(onnx_model, membrane_channels=one, radius_um=3.0)
            assert isinstance(seg.membrane_channels, list) and len(seg.membrane_channels) == 1
            seg.fit_slide(s)
    with pytest.raises(ParameterError, match="membrane_channels is a channel"):
        SegmentCellsModel(onnx_model, membrane_channels={"Membrane"})


class _PooledBlobNet(_BlobNet):
    """The blob network seeing its input through a 4 x 4 average pool (as an encoder's pooling does): its answer
    depends on where the pooling grid lies."""

    def forward(self, x):
        small = torch.nn.functional.avg_pool2d(x, 4)
        return super().forward(torch.nn.functional.interpolate(small, scale_factor=4, mode="nearest"))


@pytest.mark.parametrize("model_mpp", [0.5, 0.3])
def test_model_cells_do_not_depend_on_where_the_tiles_begin(tmp_path, model_mpp):
    """Inputs resized tile by tile, and padded to 16 px from each tile's own corner, gave cells in the middle of
    tiles that changed with the tiling at any pixel size other than the model's (mean best IoU 0.93 between these
    two tilings). On the slide's grids, tiles of 256 px (overlap 80) and one tile of the whole image give the
    same cells (1.0)."""
    path = tmp_path / "pooled.onnx"
    export_onnx(_PooledBlobNet().eval(), path, input_shape=(1, 2, 64, 64), dynamic_spatial=True)
    labels = []
    for tile, overlap in ((1024, 0), (256, 80)):
        with SlideData(MIBI) as s:
            out = s.run(SegmentCellsModel(str(path), model_mpp=model_mpp, radius_um=3.0),
                        str(tmp_path / f"t{tile}.h5path"), tile_size=tile, overlap=overlap, executor="inprocess",
                        progress=False)
        from histoflow.ml.infer import assemble_instances

        labels.append(assemble_instances(out, "cells"))
    whole, tiled = labels
    both = (whole.ravel() > 0) & (tiled.ravel() > 0)
    pairs, inter = np.unique(np.stack([whole.ravel()[both], tiled.ravel()[both]], 1), axis=0, return_counts=True)
    area_w, area_t = np.bincount(whole.ravel()), np.bincount(tiled.ravel())
    best = np.zeros(area_w.size)
    np.maximum.at(best, pairs[:, 0], inter / (area_w[pairs[:, 0]] + area_t[pairs[:, 1]] - inter))
    best = best[np.unique(whole)[1:]]
    assert len(best) > 200 and best.mean() > 0.99 and (best < 0.5).sum() == 0, (len(best), best.mean())  # 0.93 before

"""Learned virtual H&E: an image-to-image ONNX model plugged in where VirtualHE goes, on the real MIBI image."""
import numpy as np
import pytest
import torch
from datafiles import data_path

from histoflow.core.slide import SlideData
from histoflow.errors import HistoflowError
from histoflow.ml.onnx import export_onnx
from histoflow.ml.transforms import StyleTransferHE
from histoflow.store import read_h5path
from histoflow.transforms import Pipeline

MIBI = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")
CHANNELS = ["HH3", "PanKeratin"]


class _Colouriser(torch.nn.Module):
    """Stands in for a trained generator: a fixed 1x1 mixing of (nuclear, cytoplasm) into RGB, tanh output
    (nuclei purple, keratin pink), so the expected pixels are known without training."""

    def __init__(self, out_channels=3):
        super().__init__()
        self.mix = torch.nn.Conv2d(2, out_channels, 1)
        w = torch.tensor([[-1.2, -0.3], [-1.6, -1.4], [-0.6, -0.5]])[:out_channels]
        self.mix.weight.data[:] = w[:, :, None, None]
        self.mix.bias.data[:] = 0.9

    def forward(self, x):
        return torch.tanh(self.mix(x))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "colouriser.onnx"
    export_onnx(_Colouriser().eval(), path, input_shape=(1, 2, 64, 64), dynamic_spatial=True)
    return path


def test_style_transfer_matches_the_network_and_runs_in_a_pipeline(model_path, tmp_path):
    slide = SlideData(MIBI)
    t = StyleTransferHE(model_path, channels=CHANNELS)
    t.fit_slide(slide)
    assert len(t.scales_) == 2 and all(s > 0 for s in t.scales_)
    tile = slide.read_tile(slide.grid(256)[5])
    names = list(slide.channel_names)
    from histoflow.transforms.objects import find_channel

    x = np.stack([tile.image[..., find_channel(names, c)].astype(np.float32) / s for c, s in zip(CHANNELS, t.scales_)], -1)
    with torch.no_grad():
        want = _Colouriser()(torch.from_numpy(np.clip(x, 0, 1).transpose(2, 0, 1)[None].copy()))[0].numpy()
    want = np.clip(np.rint((want.transpose(1, 2, 0) + 1) / 2 * 255), 0, 255)
    t.apply(tile)
    assert tile.image.dtype == np.uint8 and tile.image.shape == (256, 256, 3) and tile.slide_type == "HE"
    assert np.abs(tile.image.astype(int) - want).max() <= 1
    # a model trained at twice the pixel size: the tile is resampled to it and the RGB back to the tile's size
    coarse = StyleTransferHE(model_path, channels=CHANNELS, model_mpp=2 * slide.mpp[0])
    coarse.fit_slide(slide)
    rgb = coarse.F(slide.read_tile(slide.grid(256)[5]).image, mpp=slide.mpp[0])
    assert rgb.shape == (256, 256, 3)
    assert np.abs(rgb.mean(axis=(0, 1)) - want.mean(axis=(0, 1))).max() < 5  # same colours, coarser detail
    assert np.corrcoef(rgb.mean(-1).ravel(), want.mean(-1).ravel())[0, 1] > 0.8
    # nuclei (high HH3) come out darker than background
    nuc = x[..., 0] > 0.5
    assert nuc.any() and tile.image[nuc].mean() < tile.image[~nuc].mean() - 20
    # through the engine, as a pipeline step: every stored tile is RGB H&E
    out = slide.run(Pipeline([StyleTransferHE(model_path, channels=CHANNELS)]), tmp_path / "vhe.h5path",
                    tile_size=512, executor="inprocess", progress=False)
    with read_h5path(out) as h5:
        assert len(h5) == 4
        first = h5.tile(0)
        assert first.image.shape == (512, 512, 3) and first.image.dtype == np.uint8
        assert first.image.std() > 10
        # the stored tiles are RGB now: the slide record names those channels, not the 22 markers
        assert h5.slide["channel_names"] == ["R", "G", "B"]
    # the same for the Beer-Lambert VirtualHE
    from histoflow.transforms import VirtualHE

    out = slide.run(Pipeline([VirtualHE()]), tmp_path / "bl.h5path", tile_size=512, executor="inprocess",
                    progress=False)
    with read_h5path(out) as h5:
        assert h5.tile(0).image.shape == (512, 512, 3) and h5.slide["channel_names"] == ["R", "G", "B"]
        # and the record says what the tiles are (it said MIBI / uint16, so tiles read back were taken for MIBI
        # and an unfitted QuantifyCells measured raw R, G, B instead of stain densities)
        assert (h5.slide["slide_type"], h5.slide["dtype"], h5.tile(0).slide_type) == ("HE", "uint8", "HE")


def test_style_transfer_errors(model_path, tmp_path):
    with pytest.raises(HistoflowError, match="no such model file"):
        StyleTransferHE(tmp_path / "none.onnx", channels=CHANNELS)
    with pytest.raises(ValueError, match="output_range"):
        StyleTransferHE(model_path, channels=CHANNELS, output_range="sigmoid")
    slide = SlideData(MIBI)
    with pytest.raises(KeyError, match="no channel 'DAPI'"):
        StyleTransferHE(model_path, channels=["DAPI", "PanKeratin"]).fit_slide(slide)
    two = tmp_path / "two.onnx"
    export_onnx(_Colouriser(out_channels=2).eval(), two, input_shape=(1, 2, 64, 64), dynamic_spatial=True)
    t = StyleTransferHE(two, channels=CHANNELS)
    t.fit_slide(slide)
    with pytest.raises(HistoflowError, match=r"must output \(1, 3, H, W\) RGB"):
        t.F(slide.read_region((0, 0), 0, (64, 64)))


def test_channels_given_as_negative_indices_fit_the_slide_as_they_read_tiles(model_path):
    """F took channels=[13, -1] (numpy indexing), but fit_slide passed -1 to the thumbnail, which refused it:
    a slide run with those channels failed before its first tile."""
    with SlideData(MIBI) as slide:
        n = slide.reader.channels
        t = StyleTransferHE(model_path, channels=[13, -1])
        t.fit_slide(slide)
        u = StyleTransferHE(model_path, channels=[13, n - 1])
        u.fit_slide(slide)
        assert t.scales_ == u.scales_
        image = slide.reader.read_region((0, 0), 0, (64, 64))
    np.testing.assert_array_equal(t.F(image), u.F(image))

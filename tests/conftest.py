"""Shared fixtures: the real data in ../shared/data and mosaic pyramids built from real pixels."""
import json

import pytest
from datafiles import data_path, mosaic


@pytest.fixture(scope="session")
def catalog():
    with open(data_path("catalog.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def mosaic8():
    """A 17760 x 23736, 3-level pyramidal tiled TIFF (JPEG tiles) of the real CMU-1 pixels."""
    return mosaic(8)


@pytest.fixture(scope="session")
def mosaic2():
    """A 4440 x 5934, 2-level pyramidal tiled TIFF of the real CMU-1 pixels."""
    return mosaic(2)


@pytest.fixture(scope="session")
def dark_model(tmp_path_factory):
    """An ONNX per-pixel 'model' whose answer is known everywhere: class 1 = sigmoid(20 (0.7 - grey))."""
    import torch

    from histoflow.ml.onnx import export_onnx

    class Dark(torch.nn.Module):
        def forward(self, x):
            g = x[:, :3].mean(1, keepdim=True)
            return torch.cat([torch.zeros_like(g), 20 * (0.7 - g)], 1)

    return str(export_onnx(Dark(), tmp_path_factory.mktemp("dark") / "dark.onnx", input_shape=(1, 3, 64, 64),
                           dynamic_spatial=True))

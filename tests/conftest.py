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

"""The data model: SlideData, Tile, TileGrid (geometry only), slide-type presets."""
from .tile import Tile  # noqa: F401
from .types import SlideType  # noqa: F401

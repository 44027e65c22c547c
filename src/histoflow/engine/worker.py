"""What runs on a worker: read a batch of tiles, apply the pipeline, compress the results.

Everything CPU-heavy happens here (decoding, transforms, compression), so the driver only moves
bytes. The slide object arrives once per worker process (scattered) and keeps its reader open.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..store.h5path import encode_tile
from ..transforms.base import TransformError


@dataclass
class Failure:
    """A tile that could not be processed."""

    index: int
    x: int
    y: int
    transform: str
    error: str

    def as_dict(self):
        return {"index": self.index, "x": self.x, "y": self.y, "transform": self.transform, "error": self.error}


@dataclass
class BatchResult:
    batch: int
    tiles: list = field(default_factory=list)  # [(grid index, EncodedTile)]
    failures: list = field(default_factory=list)  # [Failure]


def process_batch(slide, pipeline, batch: int, specs, compression="gzip", compression_level=4,
                  on_error="raise") -> BatchResult:
    """Read, transform and encode the tiles of one batch. Never raises for a tile's failure: failures
    are returned (the driver decides whether they stop the run)."""
    out = BatchResult(batch)
    for index, spec in specs:
        try:
            tile = slide.read_tile(spec)
        except Exception as e:
            out.failures.append(Failure(index, spec.x, spec.y, "read", f"{type(e).__name__}: {e}"))
            if on_error == "raise":
                break
            continue
        try:
            if pipeline is not None:
                pipeline.apply(tile)
        except TransformError as e:
            out.failures.append(Failure(index, spec.x, spec.y, e.transform or "?", str(e)))
            if on_error == "raise":
                break
            continue
        except Exception as e:  # a bare transform given instead of a Pipeline
            out.failures.append(Failure(index, spec.x, spec.y, type(pipeline).__name__, f"{type(e).__name__}: {e}"))
            if on_error == "raise":
                break
            continue
        out.tiles.append((index, encode_tile(tile, compression, compression_level)))
    return out

"""What runs on a worker: read a batch of tiles, apply the pipeline, compress the results.

Everything CPU-heavy happens here (decoding, transforms, compression), so the driver only moves
bytes. The slide object arrives once per worker process (shared by the executor) and keeps its reader open.
"""
from __future__ import annotations

import os
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
    journalled: bool = False  # the worker wrote the batch to the journal itself (tiles then left out)
    n_tiles: int = 0


def process_batch(slide, pipeline, batch: int, specs, compression="gzip", compression_level=4,
                  on_error="raise", journal_dir=None, encoder=None, keep_tiles=False, token=None,
                  defer=False) -> BatchResult | PendingBatch:
    """Read, transform and encode the tiles of one batch. Never raises for a tile's failure: failures
    are returned (the driver decides whether they stop the run).

    When ``journal_dir`` is visible from here (the same machine, or a shared file system), the worker
    journals the batch itself and returns only its failures: tile bytes then never travel through the
    driver. A batch that stops a run (a failure with ``on_error="raise"``) is not journalled.

    ``encoder`` (a ``concurrent.futures`` executor, given by the in-process executor) compresses tiles in
    the background while the next tiles are read and transformed; the result is the same bytes.
    ``keep_tiles`` (executors in the driver's own process) keeps the journalled tiles in the result too,
    so that the driver can merge them without reading the journal back. ``token`` names the journal's
    batch files (see :mod:`histoflow.engine.partial`). ``defer=True`` with an ``encoder`` returns a
    :class:`PendingBatch` as soon as the tiles are transformed: the caller reads and transforms the next
    batches while this one's encodings finish, and calls ``finish()`` for the result (the in-process
    executor does, so that the encoder thread is never idle while the driver journals and merges)."""
    pending = start_batch(slide, pipeline, batch, specs, compression, compression_level, on_error, journal_dir,
                          encoder, keep_tiles, token)
    return pending if encoder is not None and defer else pending.finish()


class PendingBatch:
    """A batch whose tiles are read and transformed, with encodings maybe still running on an encoder thread.
    :meth:`finish` collects them (in grid order) and journals the batch; it returns the BatchResult."""

    def __init__(self, out, compression, compression_level, on_error, journal_dir, keep_tiles, token,
                 label="store"):
        self._out, self._args = out, (compression, compression_level, on_error, journal_dir, keep_tiles, token)
        self._label = label
        self._result = None

    def finish(self) -> BatchResult:
        if self._result is None:
            out, (compression, compression_level, on_error, journal_dir, keep_tiles, token) = self._out, self._args
            out.tiles = _collect(out.tiles, compression, compression_level, out.failures, self._label)
            out.n_tiles = len(out.tiles)
            if journal_dir is not None and token is not None and os.path.isdir(journal_dir) and \
                    not (out.failures and on_error == "raise"):
                from .partial import write_batch

                write_batch(journal_dir, out, token)
                if not keep_tiles:
                    out.tiles = []
                out.journalled = True
            self._result = out
        return self._result


def start_batch(slide, pipeline, batch, specs, compression, compression_level, on_error, journal_dir, encoder,
                keep_tiles, token) -> PendingBatch:
    """Read and transform the tiles of a batch; their encodings are handed to ``encoder`` (or done here)."""
    out = BatchResult(batch)
    try:
        _transform_batch(slide, pipeline, specs, compression, compression_level, on_error, encoder, out)
    except BaseException:  # encodings still in the background are collected, whatever happened
        out.tiles = _collect(out.tiles, compression, compression_level)
        raise
    return PendingBatch(out, compression, compression_level, on_error, journal_dir, keep_tiles, token,
                        _store_label(pipeline))


def _store_label(pipeline) -> str:
    """How a tile that cannot be stored is recorded: after the pipeline's last step."""
    steps = getattr(pipeline, "steps", None) or ([pipeline] if pipeline is not None else [])
    return f"{type(steps[-1]).__name__} output" if steps else "store"


def _store_failure(index, tile, label, e) -> Failure:
    x, y = (int(v) for v in tile.coords) if getattr(tile, "coords", None) is not None else (-1, -1)
    return Failure(index, x, y, label, f"cannot be stored: {type(e).__name__}: {e}")


def _collect(tiles, compression, compression_level, failures=None, label="store"):
    """Results of the background encodings, in grid order. The calling thread does not wait idle for the
    encoder to work through its queue: it takes the tiles the encoder has not started, from the end of the
    batch backwards, and encodes them itself (the same function, so the same bytes). A tile that cannot be
    encoded (the pipeline left something no h5path stores) is left out and added to ``failures``."""
    done = [None] * len(tiles)
    failed = []
    for k in range(len(tiles) - 1, -1, -1):
        index, e = tiles[k]
        if isinstance(e, tuple):  # (future, tile) from the encoder
            fut, tile = e
            try:
                e = encode_tile(tile, compression, compression_level) if fut.cancel() else fut.result()
            except Exception as err:  # noqa: BLE001 - recorded for the driver, which decides
                if failures is None:
                    raise
                failed.append(_store_failure(index, tile, label, err))
                e = None
        done[k] = (index, e)
    if failures is not None:
        failures.extend(reversed(failed))
        failures.sort(key=lambda f: f.index)
    return [t for t in done if t[1] is not None]


def _transform_batch(slide, pipeline, specs, compression, compression_level, on_error, encoder, out):
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
            out.failures.append(Failure(index, spec.x, spec.y, e.transform or "?", e.reason or str(e)))
            if on_error == "raise":
                break
            continue
        except Exception as e:  # a bare transform given instead of a Pipeline
            out.failures.append(Failure(index, spec.x, spec.y, type(pipeline).__name__, f"{type(e).__name__}: {e}"))
            if on_error == "raise":
                break
            continue
        if encoder is None:
            try:
                out.tiles.append((index, encode_tile(tile, compression, compression_level)))
            except Exception as e:  # noqa: BLE001 - the pipeline left something no h5path stores
                out.failures.append(_store_failure(index, tile, _store_label(pipeline), e))
                if on_error == "raise":
                    break
        else:
            out.tiles.append((index, (encoder.submit(encode_tile, tile, compression, compression_level), tile)))

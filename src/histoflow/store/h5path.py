"""h5path format version 2: one HDF5 file per processed slide.

The format is specified in ``docs/h5path.md``; this module and that page describe the same thing.
:class:`H5PathWriter` writes a file (atomically: temporary name, then rename) and :func:`read_h5path`
opens one, version 2 or PathML's version 1 (see :mod:`histoflow.store.pathml_v1`), as an
:class:`H5Path`.
"""
from __future__ import annotations

import copy
import json
import math
import os
import secrets
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone

import h5py
import numpy as np

try:  # ISA-L's deflate: same zlib streams, much faster at low levels
    from isal import isal_zlib as _isal_zlib
except ImportError:  # pragma: no cover - optional speed-up
    _isal_zlib = None

from .. import __version__
from ..core.tile import Tile
from ..errors import H5PathError, H5PathNotFoundError, H5PathOutputError, H5PathParameterError, HistoflowError

__all__ = ["FORMAT", "FORMAT_VERSION", "EncodedTile", "H5Path", "H5PathWriter", "encode_tile", "read_h5path"]

#: value of the root attribute ``format``
FORMAT = "h5path"
#: the version this module writes (and the newest it reads)
FORMAT_VERSION = 2
#: default gzip level of tile images and masks
GZIP_LEVEL = 4

#: keys of the slide metadata dict (writer argument and ``H5Path.slide``)
SLIDE_KEYS = ("name", "source_path", "backend", "format", "width", "height", "mpp", "objective_power",
              "dtype", "slide_type", "channel_names", "levels", "labels")
_STR_KEYS = ("name", "source_path", "backend", "format", "dtype", "slide_type")

#: longest attribute string the reader parses (characters)
MAX_ATTR_CHARS = 1 << 20
#: longest provenance record read (a run's record lists its failed tiles: ~100 characters each)
MAX_PROVENANCE_CHARS = 1 << 26
#: failed tiles listed by name in a run's provenance record; past this, a count and the first ones
MAX_FAILED_LISTED = 100_000
#: largest attribute the reader loads (bytes of storage)
MAX_ATTR_BYTES = 16 << 20
#: largest single tile image the reader loads (bytes)
MAX_TILE_BYTES = 1 << 30
#: integers a numeric tile label can hold exactly (float64 storage)
MAX_EXACT_INT = 2 ** 53
#: most tiles the reader accepts in one file (a 200k px square slide has 0.6 M tiles of 256 px, 2.4 M of 128)
MAX_TILES = 1 << 22
#: largest slide mask the reader loads (bytes)
MAX_MASK_BYTES = 1 << 30
#: bytes of a slide label's name (an HDF5 attribute's name, in an object header of at most 64 KiB with its value)
MAX_SLIDE_LABEL_NAME = 4096
#: most provenance records the reader loads
MAX_PROVENANCE = 1 << 16
#: most elements of an array attribute (e.g. channel names)
MAX_ATTR_ITEMS = 1 << 16

_FLUSH_EVERY = 1024       # per-tile metadata rows buffered before writing
_GROW_MIN, _GROW_MAX = 64, 8192
_LABEL_KINDS = ("bool", "int", "float", "str")
_NUMERIC_RANK = {"bool": 0, "int": 1, "float": 2}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_default(value):
    """``json.dumps`` hook: numpy scalars and arrays, paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _check_name(path, what: str, name) -> str:
    if not isinstance(name, str) or not name or "/" in name or name == ".":
        raise H5PathError(f"{path}: invalid {what} name {name!r}: use a non-empty string without '/'")
    return _check_text(path, f"{what} name", name)


def _check_text(path, what: str, text: str) -> str:
    """Text HDF5 stores as it is: UTF-8 without NUL (which would cut it short)."""
    if "\0" in text:
        raise H5PathError(f"{path}: {what} {text!r} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise H5PathError(f"{path}: {what} {text!r} is not valid Unicode text") from None
    return text


_INT64 = 2 ** 63


def _mask_storage(path, where: str, name: str, array) -> tuple[np.ndarray, bool]:
    """Validate a mask; return it in its storage dtype and whether it is boolean."""
    arr = np.asarray(array)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8), True
    if arr.dtype.kind in "ui" or arr.dtype in (np.float32, np.float64):
        return arr, False
    raise H5PathError(f"{path}: {where}: mask {name!r} has dtype {arr.dtype}; use bool, an integer dtype, "
                      "float32 or float64 (float16 is not stored)")


#: lossless image compressions; "htj2k" (High-Throughput JPEG 2000, reversible) needs hdf5plugin to
#: write and to read, and applies to images of 1 or 3 channels of 8 or 16 bits (other images: gzip)
COMPRESSIONS = ("gzip", "lzf", "htj2k", None)


def htj2k_applies(shape, dtype) -> bool:
    """Whether an ``(h, w, c)`` image of this dtype can be stored with HTJ2K."""
    return shape[-1] in (1, 3) and np.dtype(dtype) in (np.uint8, np.uint16)


def _hdf5plugin():
    try:
        import hdf5plugin
    except ImportError:  # pragma: no cover - a core dependency
        raise H5PathError("HTJ2K compression needs the hdf5plugin package: pip install hdf5plugin") from None
    return hdf5plugin


class _FilterCodec:
    """Encode/decode one chunk with any HDF5 filter, through a small in-memory HDF5 file, so that a worker
    produces exactly the bytes the filter writes (for ``write_direct_chunk`` in the writer)."""

    _cache: dict = {}
    _cache_lock = threading.Lock()
    _RENEW = 512  # encodes before the in-memory file is made anew (bounds its growth)

    def __init__(self, shape, dtype, kwargs):
        self.shape, self.dtype, self.kwargs = tuple(shape), np.dtype(dtype), kwargs
        self._uses = self._RENEW
        self._lock = threading.Lock()

    @classmethod
    def get(cls, shape, dtype, kind):
        key = (tuple(shape), np.dtype(dtype).str, kind)
        with cls._cache_lock:
            codec = cls._cache.get(key)
            if codec is None:
                kwargs = dict(_hdf5plugin().Htj2k()) if kind == "htj2k" else {}
                codec = cls._cache[key] = cls(shape, dtype, kwargs)
        return codec

    def _dataset(self):
        if self._uses >= self._RENEW:
            f = h5py.File(f"histoflow-codec-{id(self)}-{secrets.token_hex(4)}", "w", driver="core",
                          backing_store=False)
            self._ds = f.create_dataset("x", shape=(1, *self.shape), dtype=self.dtype, chunks=(1, *self.shape),
                                        **self.kwargs)
            self._uses = 0
        self._uses += 1
        return self._ds

    def encode(self, a: np.ndarray) -> bytes:
        with self._lock:  # write then read back: one thread at a time (threads executor)
            ds = self._dataset()
            ds[0] = a
            return bytes(ds.id.read_direct_chunk((0,) * ds.ndim)[1])

    def decode(self, data: bytes) -> np.ndarray:
        with self._lock:
            ds = self._dataset()
            ds.id.write_direct_chunk((0,) * ds.ndim, data)
            return ds[0]


_HTJ2K_DIRECT: dict = {}


def _htj2k_encode(image: np.ndarray) -> bytes:
    """The HTJ2K chunk of one tile image. The HDF5 filter stores a plain JPEG 2000 codestream; imagecodecs'
    OpenJPH encoder writes one faster than a round trip through the filter, and for 3-channel images with
    JPEG 2000's reversible colour transform (``rgb=True``: 15-30% smaller on most raw H&E, within a few
    percent either way on smooth or blurred tiles; about as fast), which the filter's decoder undoes like any
    JPEG 2000 decoder. Used once a self-check per (shape, dtype)
    and process shows the filter decodes it to the same pixels; otherwise the filter itself encodes."""
    codec = _FilterCodec.get(image.shape, image.dtype, "htj2k")
    key = (image.shape, image.dtype.str)
    rgb = image.ndim == 3 and image.shape[2] == 3
    ok = _HTJ2K_DIRECT.get(key)
    if ok is None:
        try:
            import imagecodecs

            ok = np.array_equal(codec.decode(imagecodecs.htj2k_encode(np.ascontiguousarray(image), rgb=rgb)), image)
        except Exception:  # noqa: BLE001 - any failure: use the filter
            ok = False
        _HTJ2K_DIRECT[key] = ok
    if ok:
        import imagecodecs

        return imagecodecs.htj2k_encode(np.ascontiguousarray(image), rgb=rgb)
    return codec.encode(image)


class _ArrayChunk:
    """One array compressed exactly as HDF5 stores a one-chunk dataset (shuffle + deflate, or raw)."""

    __slots__ = ("data", "shape", "dtype", "is_bool")

    def __init__(self, data: bytes, shape: tuple, dtype: str, is_bool: bool = False):
        self.data, self.shape, self.dtype, self.is_bool = data, tuple(shape), dtype, is_bool

    def __reduce__(self):
        return (_ArrayChunk, (self.data, self.shape, self.dtype, self.is_bool))

    def decode(self, compression) -> np.ndarray:
        dt = np.dtype(self.dtype)
        if compression == "htj2k":
            return _FilterCodec.get(self.shape, dt, "htj2k").decode(self.data)
        raw = zlib.decompress(self.data) if compression == "gzip" else self.data
        if compression == "gzip" and dt.itemsize > 1:
            raw = np.frombuffer(raw, np.uint8).reshape(dt.itemsize, -1).T.tobytes()
        return np.frombuffer(raw, dt).reshape(self.shape)


def _deflate(raw: bytes, level: int) -> bytes:
    """A zlib stream, as HDF5's deflate filter stores it. Levels 1-3 use ISA-L when installed (about 6x
    faster than zlib at a similar ratio; any zlib reads the result)."""
    if 1 <= level <= 3 and _isal_zlib is not None:
        return _isal_zlib.compress(raw, level)
    return zlib.compress(raw, level)


def _encode_array(a: np.ndarray, compression, level: int) -> bytes:
    a = np.ascontiguousarray(a)
    raw = a.tobytes()
    if compression is None:
        return raw
    k = a.dtype.itemsize
    if k > 1:  # HDF5's shuffle filter: byte planes
        raw = np.frombuffer(raw, np.uint8).reshape(-1, k).T.tobytes()
    return _deflate(raw, level)


def _check_cells(tile):
    """The tile's cell table as a dict of numpy column arrays with one row per cell (or None)."""
    cells = getattr(tile, "cells", None)
    if cells is None:
        return None
    if not isinstance(cells, dict):
        raise H5PathError(f"tile at {tile.coords}: cells must be a dict of column arrays, got {type(cells).__name__}")
    out, n = {}, None
    for k, v in cells.items():
        a = np.asarray(v)
        if a.ndim == 0 or a.dtype.kind not in "biuf":
            raise H5PathError(f"tile at {tile.coords}: cell column {k!r} must be a numeric array with one row per "
                              f"cell, got {a.dtype} {a.shape}")
        if n is not None and a.shape[0] != n:
            raise H5PathError(f"tile at {tile.coords}: cell column {k!r} has {a.shape[0]} rows, others {n}")
        n = a.shape[0]
        out[str(k)] = np.ascontiguousarray(a)
    return out


class EncodedTile:
    """A tile already compressed into its HDF5 chunks, so that the (single) writer only copies bytes.

    Made by :func:`encode_tile` where the CPU is (an engine worker); given to
    :meth:`H5PathWriter.add_tile`, which writes its chunks with ``write_direct_chunk``. The bytes are
    identical to what h5py's own filters would write, so files do not depend on where tiles were encoded.
    """

    __slots__ = ("image", "coords", "level", "downsample", "masks", "labels", "name", "compression",
                 "compression_level", "cells", "core")

    def __init__(self, image, coords, level, downsample, masks, labels, name, compression, compression_level,
                 cells=None, core=None):
        self.image, self.coords, self.level, self.downsample = image, coords, level, downsample
        self.masks, self.labels, self.name = masks, labels, name
        self.compression, self.compression_level = compression, compression_level
        self.cells = cells  # the tile's cell table (dict of column arrays), uncompressed; not a chunk
        self.core = None if core is None else tuple(int(v) for v in core)  # the part it owns (Tile.core); not stored

    def __reduce__(self):
        return (EncodedTile, (self.image, self.coords, self.level, self.downsample, self.masks, self.labels,
                              self.name, self.compression, self.compression_level, self.cells, self.core))

    @property
    def nbytes(self) -> int:
        return len(self.image.data) + sum(len(m.data) for m in self.masks.values())

    def decode(self, image: bool = True) -> Tile:
        """Back to a :class:`Tile` (for writers with another compression, and for tests).

        ``image=False`` skips decoding the pixels (the tile's image is then an empty ``(h, w, 0)`` array):
        what the engine hands to reducing transforms, which read masks, labels and cells only.
        """
        c = self.compression
        mc = "gzip" if c == "htj2k" else c
        masks = {k: (m.decode(mc).astype(bool) if m.is_bool else m.decode(mc)) for k, m in self.masks.items()}
        if image:
            ic = c if c != "htj2k" or htj2k_applies(self.image.shape, self.image.dtype) else "gzip"
            pixels = self.image.decode(ic).copy()
        else:
            pixels = np.empty((*self.image.shape[:2], 0), np.dtype(self.image.dtype))
        return Tile(image=pixels, coords=self.coords, level=self.level,
                    downsample=self.downsample, masks=masks, labels=dict(self.labels), name=self.name,
                    cells=self.cells, core=self.core)


def _check_tile_bytes(image, where):
    """Refuse a tile larger than readers of h5path stores accept (:data:`MAX_TILE_BYTES`), before it is written:
    a store of such tiles was written whole and then could not be opened."""
    if image.nbytes > MAX_TILE_BYTES:
        h, w, c = image.shape
        raise H5PathError(f"{where}: a tile of {w} x {h} px x {c} channels of {image.dtype} is "
                          f"{image.nbytes / 2**20:,.0f} MiB, more than an h5path store holds per tile "
                          f"({MAX_TILE_BYTES >> 20} MiB); use a smaller tile size")


def encode_tile(tile: Tile, compression: str | None = "gzip", compression_level: int = GZIP_LEVEL) -> EncodedTile:
    """Compress a tile's image and masks into h5path chunks (see :class:`EncodedTile`).

    ``"gzip"``, ``None`` and ``"htj2k"`` (images with HTJ2K where it applies, else gzip; masks gzip)
    can be encoded here; with ``"lzf"`` give plain tiles to the writer.
    """
    if compression not in ("gzip", "htj2k", None):
        raise H5PathError(f"encode_tile: compression {compression!r} cannot be encoded outside HDF5 "
                          "(use 'gzip', 'htj2k' or None)")
    where = f"encode_tile: tile at {tile.coords}"
    image = np.asarray(tile.image)
    if image.ndim == 2:
        image = image[:, :, None]
    # checked here as the writer would, so that an executor that journals tiles refuses the same tiles as
    # one that writes them from memory (a 4-D image or a wrong mask stopped a dask run or a resume)
    if image.ndim != 3 or 0 in image.shape:
        raise H5PathError(f"{where}: image must be (h, w, c) or (h, w), got shape {image.shape}")
    if not (image.dtype.kind in "ui" or image.dtype in (np.float32, np.float64)):
        raise H5PathError(f"{where}: tile dtype {image.dtype} is not stored; use an integer dtype, or "
                          "float32/float64 for float data")
    _check_tile_bytes(image, where)
    if not image.dtype.isnative:
        image = image.astype(image.dtype.newbyteorder("="))
    mask_comp = "gzip" if compression == "htj2k" else compression
    if compression == "htj2k" and htj2k_applies(image.shape, image.dtype):
        data = _htj2k_encode(image)
    else:
        data = _encode_array(image, mask_comp, compression_level)
    img = _ArrayChunk(data, image.shape, image.dtype.str)
    masks = {}
    for lname, value in (tile.labels or {}).items():  # names and values must survive the journal as they are
        _check_name(where, "label", lname)
        _label_value(where, lname, value)
    for name, m in (tile.masks or {}).items():
        _check_name(where, "mask", name)
        arr, is_bool = _mask_storage("encode_tile", f"tile at {tile.coords}", name, m)
        if arr.shape != image.shape[:2]:
            raise H5PathError(f"{where}: mask {name!r} has shape {arr.shape}, expected the tile's {image.shape[:2]}")
        masks[name] = _ArrayChunk(_encode_array(arr, mask_comp, compression_level), arr.shape, arr.dtype.str,
                                  is_bool)
    return EncodedTile(img, (int(tile.coords[0]), int(tile.coords[1])), int(tile.level), float(tile.downsample),
                       masks, dict(tile.labels or {}), tile.name, compression, compression_level,
                       _check_cells(tile), tile.core)


# ----------------------------------------------------------------------------------------- writer


def _writes(method):
    """A writer's method whose file writes may meet a full disk or a file-size limit: the OS's error (h5py's raw
    OSError naming the hidden temporary file, which the engine could not tell from a tile's fault) becomes an
    H5PathOutputError naming the output, and the file being written is dropped."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except H5PathError:
            raise
        except OSError as e:
            self.abort()
            raise H5PathOutputError(f"{self.path}: cannot write it ({' '.join(str(e).split())[:300]}); nothing "
                                    "was written there") from e
    return wrapper


class H5PathWriter:
    """Write one h5path (format version 2) file, tile by tile.

    The file is written to a temporary name next to ``path`` and renamed onto ``path`` by
    :meth:`close`. As a context manager, an exception inside the block removes the temporary file
    and leaves an existing file at ``path`` untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Target file.
    slide : dict, optional
        Slide metadata, any of the keys ``name, source_path, backend, format, width, height, mpp,
        objective_power, dtype, slide_type, channel_names, levels, labels`` (missing or ``None``
        means unknown). ``mpp`` is ``(x, y)`` µm/px or one number; ``levels`` a list of dicts with
        ``width, height, downsample``; ``labels`` a dict of slide labels; ``slide_type`` a name or a
        :class:`~histoflow.core.types.SlideTypePreset`.
    compression : {"gzip", "htj2k", "lzf", None}
        Lossless compression of tile images and masks.
    compression_level : int
        gzip level (0-9).
    overwrite : bool
        If False, an existing file at ``path`` is an error.
    temp_dir : str, optional
        Where the temporary file is made (default: next to ``path``; must be on the same file system). The
        engine puts it in the run's journal folder, which an interrupted run's resume or restart removes.

    Raises
    ------
    H5PathError
        Bad metadata, or an existing target with ``overwrite=False``.
    H5PathOutputError
        (an ``H5PathError`` and an ``OutputError``, i.e. ``OSError``) The output folder is missing, the
        temporary file cannot be created, or ``temp_dir`` is on another file system than ``path``.

    Examples
    --------
    >>> with H5PathWriter("out.h5path", slide={"name": "s1", "mpp": (0.5, 0.5)}) as w:  # doctest: +SKIP
    ...     w.add_tile(image, (0, 0), masks={"tissue": mask}, labels={"grade": 2})
    """

    def __init__(self, path, *, slide: dict | None = None, compression: str | None = "gzip",
                 compression_level: int = GZIP_LEVEL, overwrite: bool = True, temp_dir=None):
        self._closed = True
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise H5PathParameterError(f"H5PathWriter: path must be a file name, got {type(path).__name__} "
                                       f"{path!r:.60}")
        self.path = os.fsdecode(os.fspath(path))  # bytes too, as read_h5path takes them
        self._f = None
        if compression not in COMPRESSIONS:
            raise H5PathParameterError(f"{self.path}: compression must be 'gzip', 'lzf', 'htj2k' or None, not "
                                       f"{compression!r}")
        if compression == "htj2k":
            _hdf5plugin()
        if compression in ("gzip", "htj2k") and not (isinstance(compression_level, int) and 0 <= compression_level <= 9):
            raise H5PathParameterError(f"{self.path}: gzip compression_level must be an int 0..9, "
                              f"not {compression_level!r}")
        if os.path.isdir(self.path):
            raise H5PathError(f"{self.path}: is a directory")
        if not overwrite and os.path.exists(self.path):
            raise H5PathError(f"{self.path}: file exists and overwrite=False")
        self.overwrite = overwrite
        self.compression = compression
        self.compression_level = compression_level
        meta = _check_slide(self.path, slide or {})
        self._slide_mpp = meta.get("mpp")
        self._channel_names = meta.get("channel_names")

        # an output that is a symbolic link is written through it, as h5py.File(path, "w") writes (the link was
        # replaced by a file, and its target kept the earlier result)
        self._target = os.path.realpath(self.path) if os.path.islink(self.path) else self.path
        # beside the target (one file system: an atomic rename); a short name, so that a long file name still fits
        short = os.path.basename(self._target).encode("utf-8", "surrogateescape")[:64].decode("utf-8", "ignore")
        self._tmp = os.path.join(os.path.dirname(os.path.abspath(self._target)),  # 64 bytes: 4-byte characters too
                                 f".{short}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        folder = os.path.dirname(os.path.abspath(self._target))
        if not os.path.isdir(folder):
            raise H5PathOutputError(f"{self.path}: the output folder {folder} does not exist")
        if temp_dir is not None:
            self._tmp = os.path.join(os.fspath(temp_dir), os.path.basename(self._tmp))
            try:
                same = os.stat(os.fspath(temp_dir)).st_dev == os.stat(folder).st_dev
            except OSError as e:
                raise H5PathOutputError(f"{self.path}: cannot use temp_dir {temp_dir}: {e}") from None
            if not same:  # the finished file is moved into place: a rename, which cannot cross file systems
                raise H5PathOutputError(f"{self.path}: temp_dir {temp_dir} is on another file system than the "
                                        "output; give a temp_dir next to it, or none")
        # set before the file exists: an interrupt (Ctrl-C, TERM) at any point from here leaves abort() and
        # __del__ what they need to remove it
        self._f = None
        self._closed = False
        self._cell_tiles = 0  # tiles added with a cell table (Tile.cells), which add_tile does not store
        self._cells_set = False
        try:
            try:
                self._f = h5py.File(self._tmp, "w-")
            except OSError as e:
                raise H5PathOutputError(f"{self.path}: cannot create the temporary file {self._tmp}: {e}") from e
            f = self._f
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = np.int64(FORMAT_VERSION)
            f.attrs["writer"] = f"histoflow {__version__}"
            f.attrs["created"] = _now()
            _write_slide(f.create_group("slide"), meta, self.path)
            tiles = f.create_group("tiles")
            tiles.attrs["compression"] = compression or "none"
            if compression in ("gzip", "htj2k"):
                tiles.attrs["compression_level"] = np.int64(compression_level)
        except BaseException:
            self.abort()
            raise

        self._n = 0                 # tiles added
        self._cap = 0               # rows allocated in the per-tile datasets
        self._shape = None          # (h, w, c) fixed by the first tile
        self._dtype = None
        self._images = None
        self._mask_ds: dict[str, h5py.Dataset] = {}
        self._mask_bool: dict[str, bool] = {}
        self._label_ds: dict[str, h5py.Dataset] = {}
        self._label_kinds: dict[str, str] = {}
        self._flushed = 0           # rows of buffered metadata already written
        self._buf_coords: list = []
        self._buf_level: list = []
        self._buf_down: list = []
        self._buf_names: list = []
        self._buf_labels: list = []

    # -- context manager / lifecycle

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            return False
        self.close()
        return False

    def __del__(self):
        # a writer dropped without close() must not leave its temporary file behind
        try:
            if not self._closed:
                self.abort()
        except Exception:
            pass

    def __len__(self) -> int:
        return self._n

    def _check_open(self):
        if self._closed:
            raise H5PathError(f"{self.path}: the writer is closed")

    def _comp(self, itemsize: int) -> dict:
        """Filters of masks and other arrays (gzip also when images are HTJ2K)."""
        if self.compression is None:
            return {}
        comp = "gzip" if self.compression == "htj2k" else self.compression
        kw = {"compression": comp, "shuffle": itemsize > 1}
        if comp == "gzip":
            kw["compression_opts"] = self.compression_level
        return kw

    def _image_comp(self, shape, dtype) -> dict:
        if self.compression == "htj2k" and htj2k_applies(shape, dtype):
            return dict(_hdf5plugin().Htj2k())
        return self._comp(np.dtype(dtype).itemsize)

    # -- tiles

    @_writes
    def add_tile(self, image, coords=None, *, level: int = 0, downsample: float = 1.0,
                 masks: Mapping | None = None, labels: Mapping | None = None, name: str | None = None):
        """Append one tile.

        Parameters
        ----------
        image : numpy.ndarray or Tile
            ``(h, w, c)`` or ``(h, w)`` pixels in their native dtype, or a :class:`Tile` (then every
            other argument is taken from it and ``coords`` must be left out; its ``slide_type`` and
            ``mpp`` are not stored per tile: they follow from the slide metadata).
        coords : (int, int)
            Level-0 ``(x, y)`` of the top-left corner.
        level : int
            Pyramid level the pixels were read from.
        downsample : float
            Effective downsample of ``image`` relative to level 0.
        masks : dict of str -> ndarray, optional
            ``(h, w)`` masks (bool, integer, float32/64). A mask that other tiles carry and this one
            does not is stored as zeros.
        labels : dict of str -> number or str, optional
            Tile labels; ``None`` or NaN values count as missing.
        name : str, optional
            A readable identifier.

        Raises
        ------
        H5PathError
            The tile's shape or dtype differs from the first tile's, or a mask/label is invalid. The
            tile is then not added and the writer stays usable.
        """
        self._check_open()
        if isinstance(image, EncodedTile):
            if image.compression != self.compression or (
                    self.compression == "gzip" and image.compression_level != self.compression_level):
                image = image.decode()  # encoded for another filter: let h5py compress it
            else:
                return self._add_encoded(image)
        if isinstance(image, Tile):
            if coords is not None:
                raise H5PathError(f"{self.path}: give either a Tile or an image with coords, not both")
            t = image
            image, coords, level, downsample = t.image, t.coords, t.level, t.downsample
            masks, labels, name = t.masks, t.labels, t.name
            cell_table = t.cells
        else:
            cell_table = None
        i = self._n
        x, y, level, downsample, where = self._check_row(coords, level, downsample, name)
        image = np.asarray(image)
        if not image.dtype.isnative:
            image = image.astype(image.dtype.newbyteorder("="))
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or 0 in image.shape:
            raise H5PathError(f"{self.path}: {where}: image must be (h, w, c) or (h, w), got {image.shape}")
        if self._shape is None:
            self._check_first_image(image, where)
        elif image.shape != self._shape or image.dtype != self._dtype:
            raise H5PathError(f"{self.path}: {where}: shape {image.shape} dtype {image.dtype} differs from "
                              f"the file's tiles, {self._shape} {self._dtype}")
        mask_items = self._check_tile_masks(masks or {}, image.shape[:2], where)
        label_items = self._check_tile_labels(labels or {}, where)

        # everything is valid: write
        if self._images is None:
            self._create_tile_datasets(image.shape, image.dtype)
        if i == self._cap:
            self._grow()
        if self.compression == "htj2k" and htj2k_applies(image.shape, image.dtype):
            # the same encoding as the engine's workers (with the colour transform): same bytes either way
            self._images.id.write_direct_chunk((i, 0, 0, 0), _htj2k_encode(np.ascontiguousarray(image)))
        else:
            self._images[i] = image
        for mname, arr, is_bool in mask_items:
            ds = self._mask_ds.get(mname)
            if ds is None:
                ds = self._create_tile_mask(mname, arr.dtype, is_bool)
            ds[i] = arr
        self._append_row(x, y, level, downsample, name, label_items)
        self._cell_tiles += cell_table is not None

    def _check_row(self, coords, level, downsample, name):
        """The per-tile row (coords, level, downsample, name) checked: ``(x, y, level, downsample, where)``."""
        i = self._n
        if i >= MAX_TILES:  # readers refuse a file of more: refused here, not after the run
            raise H5PathError(f"{self.path}: more than {MAX_TILES:,} tiles, which histoflow reads in one file; "
                              "use larger tiles (or several files)")
        if coords is None or len(coords) != 2:
            raise H5PathError(f"{self.path}: tile {i} ({name!r}): coords must be (x, y), got {coords!r}")
        try:
            x, y = int(coords[0]), int(coords[1])
            whole = x == coords[0] and y == coords[1]  # 10.7 would become 10 silently
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole:
            raise H5PathParameterError(f"{self.path}: tile {i} ({name!r}): coords must be whole numbers, got "
                                       f"{coords!r}")
        if name is not None and not isinstance(name, str):
            raise H5PathError(f"{self.path}: tile {i}: name must be a str, not {type(name).__name__}")
        if name:
            _check_text(self.path, f"tile {i} name", name)
        where = f"tile {i}" + (f" {name!r}" if name else "") + f" at (x={x}, y={y})"
        if not (-_INT64 <= x < _INT64 and -_INT64 <= y < _INT64):
            raise H5PathError(f"{self.path}: {where}: coords out of the 64-bit range")
        try:
            if int(level) != level:
                raise ValueError("level is not a whole number")
            level, downsample = int(level), float(downsample)
        except (TypeError, ValueError, OverflowError):
            raise H5PathParameterError(f"{self.path}: {where}: level must be a whole number and downsample a "
                                       f"number, got {level!r}, "
                              f"{downsample!r}") from None
        if not 0 <= level <= 32767:
            raise H5PathParameterError(f"{self.path}: {where}: level must be a pyramid level, a whole number from 0 "
                                       f"(the slide's full resolution) to 32767, not {level}")
        if not (math.isfinite(downsample) and downsample > 0):
            raise H5PathError(f"{self.path}: {where}: downsample must be a positive number, not {downsample}")
        return x, y, level, downsample, where

    @_writes
    def _add_encoded(self, enc: EncodedTile):
        """Append a tile whose chunks were compressed elsewhere (same checks, bytes copied as they are)."""
        i = self._n
        x, y, level, downsample, where = self._check_row(enc.coords, enc.level, enc.downsample, enc.name)
        shape, dtype = enc.image.shape, np.dtype(enc.image.dtype)
        if len(shape) != 3 or 0 in shape:
            raise H5PathError(f"{self.path}: {where}: image must be (h, w, c), got {shape}")
        if self._shape is None:
            self._check_first_image(np.empty((1, 1, shape[2]), dtype), where)
        elif shape != self._shape or dtype != self._dtype:
            raise H5PathError(f"{self.path}: {where}: shape {shape} dtype {dtype} differs from "
                              f"the file's tiles, {self._shape} {self._dtype}")
        masks = dict(enc.masks)
        for mname, m in enc.masks.items():
            _check_name(self.path, "mask", mname)
            if m.shape != shape[:2]:
                raise H5PathError(f"{self.path}: {where}: mask {mname!r} has shape {m.shape}, expected {shape[:2]}")
            ds = self._mask_ds.get(mname)
            if ds is None:
                continue
            dt = np.dtype(m.dtype)
            if self._mask_bool[mname] and not m.is_bool:
                raise H5PathError(f"{self.path}: {where}: mask {mname!r} is {dt} here but bool in earlier tiles")
            if not m.is_bool and not np.can_cast(dt, ds.dtype, "safe"):
                raise H5PathError(f"{self.path}: {where}: mask {mname!r} has dtype {dt}, which does not cast "
                                  f"safely to {ds.dtype} of earlier tiles")
            if dt != ds.dtype:  # as add_tile does: cast to the file's dtype (the chunk is made again)
                mc = "gzip" if enc.compression == "htj2k" else enc.compression
                arr = m.decode(mc).astype(ds.dtype)
                masks[mname] = _ArrayChunk(_encode_array(arr, mc, enc.compression_level), arr.shape,
                                           ds.dtype.str, self._mask_bool[mname])
        label_items = self._check_tile_labels(enc.labels or {}, where)
        if self._images is None:
            self._create_tile_datasets(shape, dtype)
        if i == self._cap:
            self._grow()
        self._images.id.write_direct_chunk((i, 0, 0, 0), enc.image.data)
        for mname, m in masks.items():
            ds = self._mask_ds.get(mname)
            if ds is None:
                ds = self._create_tile_mask(mname, np.dtype(m.dtype), m.is_bool)
            ds.id.write_direct_chunk((i, 0, 0), m.data)
        self._append_row(x, y, level, downsample, enc.name, label_items)
        self._cell_tiles += enc.cells is not None

    def _append_row(self, x, y, level, downsample, name, label_items):
        for lname, (kind, _) in label_items.items():
            old = self._label_kinds.get(lname)
            if old is None or (kind != "str" and _NUMERIC_RANK[kind] > _NUMERIC_RANK[old]):
                self._label_kinds[lname] = kind
        self._buf_coords.append((x, y))
        self._buf_level.append(int(level))
        self._buf_down.append(float(downsample))
        self._buf_names.append(name or "")
        self._buf_labels.append({k: v for k, (_, v) in label_items.items()})
        self._n += 1
        if len(self._buf_coords) >= _FLUSH_EVERY:
            self._flush()

    def add_tiles(self, tiles: Iterable[Tile]) -> int:
        """Append every :class:`Tile` of an iterable (e.g. an :class:`H5Path`); return how many."""
        n = 0
        for tile in tiles:
            self.add_tile(tile)
            n += 1
        return n

    def _check_first_image(self, image, where):
        dt = image.dtype
        if not (dt.kind in "ui" or dt in (np.float32, np.float64)):
            raise H5PathError(f"{self.path}: {where}: tile dtype {dt} is not stored; use the native integer "
                              "dtype, or float32/float64 for float data (float16 is refused)")
        _check_tile_bytes(image, f"{self.path}: {where}")
        if self._channel_names is not None and len(self._channel_names) != image.shape[2]:
            raise H5PathError(f"{self.path}: {where}: {image.shape[2]} channels but the slide has "
                              f"{len(self._channel_names)} channel_names")

    def _check_tile_masks(self, masks: Mapping, hw: tuple, where: str) -> list:
        out = []
        for mname, m in masks.items():
            _check_name(self.path, "mask", mname)
            arr, is_bool = _mask_storage(self.path, where, mname, m)
            if arr.shape != hw:
                raise H5PathError(f"{self.path}: {where}: mask {mname!r} has shape {arr.shape}, "
                                  f"expected the tile's {hw}")
            ds = self._mask_ds.get(mname)
            if ds is not None:
                if self._mask_bool[mname] != is_bool and self._mask_bool[mname]:
                    raise H5PathError(f"{self.path}: {where}: mask {mname!r} is {arr.dtype} here but bool "
                                      "in earlier tiles")
                if not is_bool and not np.can_cast(arr.dtype, ds.dtype, "safe"):
                    raise H5PathError(f"{self.path}: {where}: mask {mname!r} has dtype {arr.dtype}, which "
                                      f"does not cast safely to {ds.dtype} of earlier tiles")
            out.append((mname, arr, is_bool))
        return out

    def _check_tile_labels(self, labels: Mapping, where: str) -> dict:
        out = {}
        for lname, value in labels.items():
            _check_name(self.path, "label", lname)
            kv = _label_value(f"{self.path}: {where}", lname, value)
            if kv is None:
                continue  # missing
            kind, v = kv
            old = self._label_kinds.get(lname)
            if old is not None and (old == "str") != (kind == "str"):
                raise H5PathError(f"{self.path}: {where}: label {lname!r} is a {kind} here but a {old} "
                                  "in earlier tiles")
            out[lname] = (kind, v)
        return out

    def _create_tile_datasets(self, shape, dtype):
        h, w, c = shape
        dtype = np.dtype(dtype)
        self._shape, self._dtype = tuple(shape), dtype
        tiles = self._f["tiles"]
        tiles.attrs["tile_width"] = np.int64(w)
        tiles.attrs["tile_height"] = np.int64(h)
        tiles.attrs["channels"] = np.int64(c)
        tiles.attrs["dtype"] = dtype.name
        if self.compression == "htj2k" and not htj2k_applies(shape, dtype):
            tiles.attrs["compression"] = "gzip"  # what the images are stored with (22 channels: not HTJ2K)
        self._images = tiles.create_dataset("images", shape=(0, h, w, c), maxshape=(None, h, w, c),
                                            dtype=dtype, chunks=(1, h, w, c), **self._image_comp(shape, dtype))
        tiles.create_dataset("coords", shape=(0, 2), maxshape=(None, 2), dtype=np.int64, chunks=(4096, 2))
        tiles.create_dataset("level", shape=(0,), maxshape=(None,), dtype=np.int16, chunks=(8192,))
        tiles.create_dataset("downsample", shape=(0,), maxshape=(None,), dtype=np.float64, chunks=(8192,))
        tiles.create_dataset("names", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(),
                             chunks=(4096,))
        tiles.create_group("masks")
        tiles.create_group("labels")

    def _create_tile_mask(self, name, dtype, is_bool):
        h, w = self._shape[:2]
        ds = self._f["tiles/masks"].create_dataset(
            name, shape=(self._cap, h, w), maxshape=(None, h, w), dtype=dtype, chunks=(1, h, w),
            fillvalue=0, **self._comp(np.dtype(dtype).itemsize))
        if is_bool:
            ds.attrs["bool"] = True
        self._mask_ds[name] = ds
        self._mask_bool[name] = is_bool
        return ds

    def _per_tile_datasets(self):
        t = self._f["tiles"]
        return [t["images"], t["coords"], t["level"], t["downsample"], t["names"],
                *self._mask_ds.values(), *self._label_ds.values()]

    def _grow(self):
        self._cap += min(max(self._cap, _GROW_MIN), _GROW_MAX)
        for ds in self._per_tile_datasets():
            ds.resize(self._cap, axis=0)

    @_writes
    def _flush(self):
        """Write the buffered per-tile metadata rows."""
        k = len(self._buf_coords)
        if not k:
            return
        a, b = self._flushed, self._flushed + k
        t = self._f["tiles"]
        t["coords"][a:b] = np.asarray(self._buf_coords, dtype=np.int64)
        t["level"][a:b] = np.asarray(self._buf_level, dtype=np.int16)
        t["downsample"][a:b] = np.asarray(self._buf_down, dtype=np.float64)
        t["names"][a:b] = np.asarray(self._buf_names, dtype=object)
        for lname, kind in self._label_kinds.items():
            ds = self._label_ds.get(lname)
            if ds is None:
                if kind == "str":
                    ds = t["labels"].create_dataset(lname, shape=(self._cap,), maxshape=(None,),
                                                    dtype=h5py.string_dtype(), chunks=(4096,))
                else:
                    ds = t["labels"].create_dataset(lname, shape=(self._cap,), maxshape=(None,),
                                                    dtype=np.float64, chunks=(8192,), fillvalue=np.nan)
                self._label_ds[lname] = ds
            ds.attrs["kind"] = kind
            if kind == "str":
                col = np.array([row.get(lname, "") for row in self._buf_labels], dtype=object)
            else:
                col = np.array([row.get(lname, np.nan) for row in self._buf_labels], dtype=np.float64)
            ds[a:b] = col
        self._flushed = b
        self._buf_coords, self._buf_level, self._buf_down = [], [], []
        self._buf_names, self._buf_labels = [], []

    # -- slide-level data

    @_writes
    def add_slide_mask(self, name: str, array, downsample: float = 1.0):
        """Store a slide-level mask.

        Parameters
        ----------
        name : str
            Mask name (no ``/``).
        array : numpy.ndarray
            2-D mask: bool, an integer dtype (label image) or float32/float64.
        downsample : float
            Downsample of ``array`` relative to level 0.

        Raises
        ------
        H5PathError
            Invalid name/array, or a mask of that name already exists.
        """
        self._check_open()
        _check_name(self.path, "mask", name)
        arr, is_bool = _mask_storage(self.path, "slide mask", name, array)
        if arr.ndim != 2 or 0 in arr.shape:
            raise H5PathError(f"{self.path}: slide mask {name!r} must be a non-empty 2-D array, got {arr.shape}")
        if arr.size * np.dtype(arr.dtype).itemsize > MAX_MASK_BYTES:  # readers refuse it: refused here, not after
            raise H5PathError(f"{self.path}: slide mask {name!r} of shape {arr.shape} would take "
                              f"{arr.size * np.dtype(arr.dtype).itemsize / 2**30:.1f} GiB, more than histoflow "
                              f"loads ({MAX_MASK_BYTES >> 30} GiB); store it at a coarser downsample")
        try:
            downsample = float(downsample)
        except (TypeError, ValueError):
            raise H5PathError(f"{self.path}: slide mask {name!r}: downsample must be a positive number, "
                              f"not {downsample!r}") from None
        if not (math.isfinite(downsample) and downsample > 0):
            raise H5PathError(f"{self.path}: slide mask {name!r}: downsample must be positive, not {downsample}")
        group = self._f.require_group("masks")
        if name in group:
            raise H5PathError(f"{self.path}: slide mask {name!r} was already added")
        chunks = (min(arr.shape[0], 512), min(arr.shape[1], 512))
        ds = group.create_dataset(name, data=arr, chunks=chunks, **self._comp(arr.dtype.itemsize))
        ds.attrs["downsample"] = downsample
        if is_bool:
            ds.attrs["bool"] = True

    @_writes
    def set_cells(self, adata):
        """Store the single-cell table (an :class:`anndata.AnnData`) as ``/cells``, replacing any."""
        self._check_open()
        import anndata

        if not isinstance(adata, anndata.AnnData):
            raise H5PathError(f"{self.path}: cells must be an AnnData, not {type(adata).__name__}")
        tmp = f"cells.tmp-{secrets.token_hex(4)}"  # written whole aside, then put in place: never half a table
        try:
            _write_elem()(self._f, tmp, adata)
        except Exception as e:  # noqa: BLE001 - anndata's own errors (a column of mixed types ...)
            if tmp in self._f:
                del self._f[tmp]
            raise H5PathError(f"{self.path}: the cell table cannot be stored ({type(e).__name__}: {e}); the file "
                              "keeps its previous one") from None
        if "cells" in self._f:
            del self._f["cells"]
        self._f.move(tmp, "cells")
        self._cells_set = True

    @_writes
    def add_provenance(self, record: Mapping):
        """Append one run record to ``/provenance``.

        Parameters
        ----------
        record : dict
            JSON-serialisable description of a run (pipeline, parameters, versions, ...). ``date``
            (ISO 8601 UTC) and ``histoflow`` (version) are added when absent.
        """
        self._check_open()
        if not isinstance(record, Mapping):
            raise H5PathError(f"{self.path}: a provenance record must be a dict, not {type(record).__name__}")
        rec = dict(record)
        rec.setdefault("date", _now())
        rec.setdefault("histoflow", __version__)
        failed = rec.get("failed_tiles")
        if isinstance(failed, (list, tuple)) and len(failed) > MAX_FAILED_LISTED:
            rec["failed_tiles_total"] = len(failed)
            rec["failed_tiles"] = list(failed[:MAX_FAILED_LISTED])
        try:
            text = json.dumps(_json_safe(rec), default=_json_default, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise H5PathError(f"{self.path}: provenance record is not JSON serialisable: {e}") from e
        if len(text) > MAX_PROVENANCE_CHARS:
            raise H5PathError(f"{self.path}: provenance record of {len(text):,} characters, more than histoflow "
                              f"reads back ({MAX_PROVENANCE_CHARS:,}); keep large data out of provenance")
        if "provenance" not in self._f:
            self._f.create_dataset("provenance", shape=(0,), maxshape=(None,), dtype=h5py.string_dtype(),
                                   chunks=(64,))
        ds = self._f["provenance"]
        ds.resize(ds.shape[0] + 1, axis=0)
        ds[-1] = text

    # -- finishing

    def close(self):
        """Finish the file: write buffered rows, trim, mark complete, rename onto ``path``."""
        if self._closed:
            return
        if self._cell_tiles and not self._cells_set:
            warnings.warn(f"{self.path}: {self._cell_tiles} tile(s) carried a cell table (Tile.cells), which add_tile "
                          "does not store: the slide's table is made by QuantifyCells (collect(tile) for each tile, "
                          "then slide_cells()) and stored with set_cells(); SlideData.run does both", stacklevel=2)
        try:
            self._flush()
            if self._images is not None:
                for ds in self._per_tile_datasets():
                    ds.resize(self._n, axis=0)
            self._f.attrs["complete"] = True
            self._f.close()
            _fsync(self._tmp)  # the data on disk before the name: a crash never leaves a partial file there
            if not self.overwrite and os.path.exists(self.path):
                raise H5PathError(f"{self.path}: file appeared while writing and overwrite=False")
            os.replace(self._tmp, self._target)
            _fsync(os.path.dirname(os.path.abspath(self._target)), directory=True)
        except OSError as e:  # a full disk, a file-size limit: the OS's own words, the file named
            self.abort()
            if isinstance(e, H5PathError):
                raise
            raise H5PathOutputError(f"{self.path}: cannot finish writing ({e}); nothing was written there") from e
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self):
        """Drop the file being written: close it and remove the temporary file; ``path`` is untouched."""
        self._closed = True
        try:
            if self._f is not None and self._f.id.valid:
                self._f.close()
        except Exception:  # noqa: BLE001 - closing a file whose write failed fails again: the first error counts
            pass
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)


def _fsync(path, directory=False):
    """Flush a file (or a folder's entries) to disk; where the system cannot (some file systems refuse it on
    folders), carry on."""
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _tile_label(value):
    """Normalise a tile label: ``(kind, value)``, None when missing, False when not storable."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        return "bool", bool(value)
    if isinstance(value, (int, np.integer)):
        return "int", int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return None if math.isnan(v) else ("float", v)
    if isinstance(value, str):
        return ("str", value) if value else None
    return False


def _label_value(where: str, lname, value):
    """A tile label checked for storage: ``(kind, value)``, None when missing; an H5PathError naming ``where``
    when no h5path can hold it."""
    kv = _tile_label(value)
    if kv is False:
        raise H5PathError(f"{where}: label {lname!r} = {value!r}: tile labels must be numbers or strings")
    if kv is None:
        return None
    kind, v = kv
    if kind == "str":
        _check_text(where, f"label {lname!r} value", v)
    if kind == "int" and abs(v) > MAX_EXACT_INT:
        raise H5PathError(f"{where}: label {lname!r} = {v} is beyond ±2**53, which the float64 label column "
                          "cannot hold exactly")
    return kv


def _write_elem():
    try:
        from anndata.io import write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import write_elem
    return write_elem


def _read_elem():
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem


def _check_slide(path, slide: Mapping) -> dict:
    """Validate and normalise the writer's slide metadata dict."""
    if not isinstance(slide, Mapping):
        raise H5PathError(f"{path}: slide metadata must be a dict, not {type(slide).__name__}")
    unknown = sorted(set(slide) - set(SLIDE_KEYS))
    if unknown:
        raise H5PathParameterError(f"{path}: unknown slide metadata keys {unknown}; known: {list(SLIDE_KEYS)}")
    meta = {k: v for k, v in slide.items() if v is not None}
    try:
        for k in _STR_KEYS:
            if k in meta:
                v = meta[k]
                if k == "slide_type" and not isinstance(v, str):
                    v = v.name  # a SlideTypePreset
                elif k == "dtype" and not isinstance(v, str):
                    v = np.dtype(v).name
                meta[k] = _check_text(path, f"slide {k}", str(os.fspath(v) if isinstance(v, os.PathLike) else v))
        for k in ("width", "height"):
            if k in meta:
                meta[k] = int(meta[k])
                if meta[k] < 0:
                    raise ValueError(f"{k} must be >= 0")
        if "mpp" in meta:
            mpp = np.broadcast_to(np.asarray(meta["mpp"], dtype=np.float64), (2,))
            if not (np.all(np.isfinite(mpp)) and np.all(mpp > 0)):
                raise ValueError(f"mpp must be positive, got {meta['mpp']!r}")
            meta["mpp"] = (float(mpp[0]), float(mpp[1]))
        if "objective_power" in meta:
            meta["objective_power"] = float(meta["objective_power"])
        if "channel_names" in meta:
            meta["channel_names"] = [_check_text(path, "channel name", str(c)) for c in meta["channel_names"]]
        if "levels" in meta:
            meta["levels"] = [(int(lv["width"]), int(lv["height"]), float(lv["downsample"]))
                              for lv in meta["levels"]]
        if "labels" in meta and not isinstance(meta["labels"], Mapping):
            raise ValueError("labels must be a dict")
        for k, v in (meta.get("labels") or {}).items():
            _check_name(path, "slide label", k)
            if isinstance(v, str):
                _check_text(path, f"slide label {k!r}", v)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise H5PathError(f"{path}: invalid slide metadata: {e}") from e
    return meta


def _write_slide(g: h5py.Group, meta: dict, path):
    for k in _STR_KEYS:
        if k in meta:
            g.attrs[k] = meta[k]
    for k in ("width", "height"):
        if k in meta:
            g.attrs[k] = np.int64(meta[k])
    if "mpp" in meta:
        g.attrs["mpp"] = np.asarray(meta["mpp"], dtype=np.float64)
    if "objective_power" in meta:
        g.attrs["objective_power"] = np.float64(meta["objective_power"])
    if "channel_names" in meta:
        g.attrs["channel_names"] = np.array(meta["channel_names"], dtype=h5py.string_dtype())
    if "levels" in meta:
        ds = g.create_dataset("levels", data=np.asarray(meta["levels"], dtype=np.float64).reshape(-1, 3))
        ds.attrs["columns"] = np.array(["width", "height", "downsample"], dtype=h5py.string_dtype())
    labels = g.create_group("labels")
    as_json = []
    for k, v in (meta.get("labels") or {}).items():
        _check_name(path, "slide label", k)
        if len(str(k).encode("utf-8", "surrogateescape")) > MAX_SLIDE_LABEL_NAME:  # an HDF5 attribute's name
            raise H5PathError(f"{path}: slide label name of {len(str(k)):,} characters, more than a slide label's "
                              f"name may take ({MAX_SLIDE_LABEL_NAME:,} bytes): {str(k)[:40]!r}...")
        if isinstance(v, (bool, np.bool_)):
            labels.attrs[k] = np.bool_(v)
        elif isinstance(v, (int, np.integer)) and -2 ** 63 <= int(v) < 2 ** 63:
            labels.attrs[k] = np.int64(v)
        elif isinstance(v, (float, np.floating)):
            labels.attrs[k] = np.float64(v)
        elif isinstance(v, str):
            if len(v) > MAX_ATTR_CHARS:
                raise H5PathError(f"{path}: slide label {k!r} takes {len(v):,} characters, more than a label may "
                                  f"({MAX_ATTR_CHARS:,})")
            labels.attrs[k] = str(v)  # a numpy str_ is a str h5py cannot store as it is
        else:
            try:
                text = json.dumps(_json_safe(v), default=_json_default, allow_nan=False)
            except (TypeError, ValueError) as e:
                raise H5PathError(f"{path}: slide label {k!r} is not JSON serialisable: {e}") from e
            if len(text) > MAX_ATTR_CHARS:
                raise H5PathError(f"{path}: slide label {k!r} takes {len(text):,} characters, more than a label "
                                  f"may ({MAX_ATTR_CHARS:,}); store large data as a slide mask or a cell table")
            labels.attrs[k] = text
            as_json.append(k)
    if as_json:
        g.attrs["json_labels"] = np.array(as_json, dtype=h5py.string_dtype())


# ----------------------------------------------------------------------------------------- reading

def _attr(obj, name: str, path, default=None):
    """Read one attribute with bounded size; bytes become str (UTF-8)."""
    try:
        if name not in obj.attrs:
            return default
        aid = obj.attrs.get_id(name)
        if aid.get_storage_size() > MAX_ATTR_BYTES or aid.shape and int(np.prod(aid.shape)) > MAX_ATTR_ITEMS:
            raise H5PathError(f"{path}: attribute {name!r} of {obj.name} is too large")
        value = obj.attrs[name]
    except H5PathError:
        raise
    except Exception as e:  # h5py raises OSError, TypeError, ValueError on odd attributes
        raise H5PathError(f"{path}: attribute {name!r} of {obj.name} cannot be read: {e}") from e
    return _bounded(value, f"attribute {name!r} of {obj.name}", path)


def _json_safe(v):
    """``v`` with NaN and infinities as None: strict JSON has no such numbers (``json.dumps`` would write
    ``NaN``, which other readers refuse)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.floating) and not np.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, np.ndarray) and v.dtype.kind == "f":  # nested lists keep the array's shape
        return _json_safe(v.tolist()) if v.ndim else _json_safe(float(v))
    return v


def _bounded(value, what, path):
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise H5PathError(f"{path}: {what} is not UTF-8") from e
    if isinstance(value, str) and len(value) > MAX_ATTR_CHARS:
        raise H5PathError(f"{path}: {what} is longer than {MAX_ATTR_CHARS} characters")
    if isinstance(value, np.ndarray) and value.dtype.kind == "S":  # fixed-length strings (h5py's way for
        value = value.astype(object)  # numpy text): each decoded as the variable-length ones ("b'DAPI'" before)
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = np.array([_bounded(v, what, path) for v in value.ravel()], dtype=object).reshape(value.shape)
        if sum(len(v) for v in value.ravel() if isinstance(v, str)) > MAX_ATTR_CHARS * 16:
            raise H5PathError(f"{path}: {what} holds more than {MAX_ATTR_CHARS * 16} characters")
    return value


def _plain(value):
    """numpy scalars/arrays to Python values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _text_or_none(v):
    """A provenance value shown as text (``histoflow info``): strings as they are, anything else None."""
    return v if isinstance(v, str) else None


def _count_or_none(v):
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _flag(obj, name: str, path) -> bool:
    """A true/false attribute (absent: False); anything but one bool or 0/1 number is an inconsistency."""
    v = _plain(_attr(obj, name, path, False))
    if isinstance(v, list) and len(v) == 1:
        v = v[0]
    if isinstance(v, bool) or (isinstance(v, (int, float)) and v in (0, 1)):
        return bool(v)
    raise H5PathError(f"{path}: inconsistent: attribute {name!r} of {obj.name} must be true or false, got {v!r:.80}")


#: what h5py raises for damaged metadata: damaged object headers (KeyError, OSError, ValueError), B-trees and link
#: tables ("incorrect B-tree node type", "Link visitation failed": RuntimeError; SystemError from its lock)
_DAMAGE = (KeyError, OSError, ValueError, RuntimeError, SystemError)


def _dataset(group, name: str, path) -> h5py.Dataset:
    """``group[name]``, checked to be a plain dataset (hard link, internal storage, not virtual)."""
    try:
        link = group.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise H5PathError(f"{path}: {group.name}/{name} is a {type(link).__name__}, not a plain dataset")
        ds = group[name]
    except _DAMAGE as e:  # h5py's errors for damaged object headers and B-trees
        raise H5PathError(f"{path}: {group.name.rstrip('/')}/{name} cannot be opened (damaged file?): {e}") from e
    if not isinstance(ds, h5py.Dataset):
        raise H5PathError(f"{path}: {ds.name} is not a dataset")
    if ds.external or ds.is_virtual:
        raise H5PathError(f"{path}: {ds.name} stores its data outside the file; refused")
    return ds


def _group(parent, name: str, path) -> h5py.Group | None:
    try:
        if name not in parent:
            return None
        if not isinstance(parent.get(name, getlink=True), h5py.HardLink) or not isinstance(parent[name], h5py.Group):
            raise H5PathError(f"{path}: {parent.name.rstrip('/')}/{name} is not a group")
        return parent[name]
    except _DAMAGE as e:  # h5py's errors for damaged object headers and B-trees
        raise H5PathError(f"{path}: {parent.name.rstrip('/')}/{name} cannot be opened (damaged file?): {e}") from e


def _check_tree(group, path):
    """Every object below ``group`` must be hard-linked, and datasets stored inside the file."""
    problems = []

    def visit(name, link):
        if not isinstance(link, h5py.HardLink):
            problems.append(name)
        else:
            obj = group[name]
            if isinstance(obj, h5py.Dataset) and (obj.external or obj.is_virtual):
                problems.append(name)

    try:
        group.visititems_links(visit)
    except _DAMAGE as e:
        raise H5PathError(f"{path}: {group.name} cannot be read (damaged file?): {e}") from e
    if problems:
        raise H5PathError(f"{path}: {group.name}/{problems[0]} is a link or external dataset; refused")


def _is_str_dtype(dt) -> bool:
    return h5py.check_string_dtype(dt) is not None


def _check_chunks(ds, path):
    """Refuse a per-tile dataset stored in chunks larger than a tile may be: reading one tile decompresses
    its whole chunk, so a small hostile file could otherwise inflate gigabytes for one tile."""
    if ds.chunks is not None and ds.chunks[0] != 1:
        raise H5PathError(f"{path}: {ds.name} is stored in chunks of {ds.chunks[0]} tiles (shape {ds.chunks}); "
                          "this format stores one tile a chunk, and reading one tile would decompress them all; "
                          "refused")


class _V2Reader:
    """Reader of format version 2 (internal; use :func:`read_h5path`)."""

    format_version = 2

    def __init__(self, f: h5py.File, path: str):
        self.f, self.path = f, path
        complete = _attr(f, "complete", path)
        if not (isinstance(complete, (bool, np.bool_)) and bool(complete)):
            raise H5PathError(f"{path}: incomplete: the writer did not finish (root attribute "
                              "'complete' is not True)")
        self._slide_group = _group(f, "slide", path)
        if self._slide_group is None:
            raise H5PathError(f"{path}: inconsistent: no /slide group")
        tiles = _group(f, "tiles", path)
        if tiles is None:
            raise H5PathError(f"{path}: inconsistent: no /tiles group")
        self._slide = None
        self._columns = None
        self._labels_cache = None
        self.images = None
        self.n = 0
        self._tile_masks: dict[str, tuple[h5py.Dataset, bool]] = {}
        self._tile_labels: dict[str, tuple[h5py.Dataset, str]] = {}
        if "images" not in tiles:
            if len(tiles):  # a file of no tiles has an empty /tiles: coords or masks without images lost them
                raise H5PathError(f"{path}: inconsistent: /tiles holds {sorted(tiles)} but no 'images' dataset "
                                  "(damaged file?)")
            return
        img = _dataset(tiles, "images", path)
        if img.ndim != 4 or 0 in img.shape[1:] or \
                not (img.dtype.kind in "ui" or img.dtype in (np.float32, np.float64)):
            raise H5PathError(f"{path}: inconsistent: /tiles/images has shape {img.shape} dtype {img.dtype}")
        n, h, w, c = img.shape
        if n > MAX_TILES:
            raise H5PathError(f"{path}: claims {n} tiles, more than histoflow reads in one file ({MAX_TILES}); "
                              "refused")
        if h * w * c * img.dtype.itemsize > MAX_TILE_BYTES:
            raise H5PathError(f"{path}: tiles of shape {img.shape[1:]} are larger than "
                              f"{MAX_TILE_BYTES >> 20} MiB each; refused")
        _check_chunks(img, path)
        expect = {"coords": ((n, 2), "i"), "level": ((n,), "i"), "downsample": ((n,), "f"),
                  "names": ((n,), "s")}
        for name, (shape, kind) in expect.items():
            if name not in tiles:
                raise H5PathError(f"{path}: inconsistent: /tiles/{name} is missing")
            ds = _dataset(tiles, name, path)
            ok_kind = _is_str_dtype(ds.dtype) if kind == "s" else ds.dtype.kind in ("ui" if kind == "i" else "f")
            if ds.shape != shape or not ok_kind:
                raise H5PathError(f"{path}: inconsistent: /tiles/{name} has shape {ds.shape} dtype {ds.dtype}, "
                                  f"expected {shape}")
        self.images, self.n = img, n
        mg = _group(tiles, "masks", path)
        for name in (mg or {}):
            ds = _dataset(mg, name, path)
            if ds.shape != (n, h, w) or not (ds.dtype.kind in "ui" or ds.dtype in (np.float32, np.float64)):
                raise H5PathError(f"{path}: inconsistent: tile mask {ds.name} has shape {ds.shape} "
                                  f"dtype {ds.dtype}, expected ({n}, {h}, {w})")
            _check_chunks(ds, path)
            self._tile_masks[name] = (ds, _flag(ds, "bool", path))
        lg = _group(tiles, "labels", path)
        for name in (lg or {}):
            ds = _dataset(lg, name, path)
            is_str = _is_str_dtype(ds.dtype)
            if ds.shape != (n,) or not (is_str or ds.dtype.kind in "uifb"):
                raise H5PathError(f"{path}: inconsistent: tile label {ds.name} has shape {ds.shape} "
                                  f"dtype {ds.dtype}")
            kind = _attr(ds, "kind", path) or ("str" if is_str else "float" if ds.dtype.kind == "f" else "int")
            if not isinstance(kind, str) or kind not in _LABEL_KINDS or (kind == "str") != is_str:
                raise H5PathError(f"{path}: inconsistent: tile label {ds.name} has kind {kind!r}")
            self._tile_labels[name] = (ds, kind)

    # slide metadata

    def slide(self) -> dict:
        if self._slide is None:
            self._slide = _read_slide(self._slide_group, self.path)
        return self._slide

    def _tile_slide(self) -> dict:
        """The slide's metadata without its labels (pixel size and type for the tiles)."""
        if self._slide is not None:
            return self._slide
        if getattr(self, "_slide_nolabels", None) is None:
            self._slide_nolabels = _read_slide(self._slide_group, self.path, labels=False)
        return self._slide_nolabels

    # tiles

    def _cols(self):
        if self._columns is None:
            t = self.f["tiles"]
            if self.n:
                try:
                    names = t["names"].asstr()[()]
                    self._columns = (t["coords"][()].astype(np.int64), t["level"][()], t["downsample"][()],
                                     names)
                except UnicodeDecodeError as e:
                    raise H5PathError(f"{self.path}: /tiles/names holds a name that is not UTF-8 ({e.reason})") from e
                except (KeyError, OSError) as e:
                    raise H5PathError(f"{self.path}: the tile table (/tiles) cannot be read (damaged file?): {e}") from e
            else:
                self._columns = (np.zeros((0, 2), np.int64), np.zeros(0, np.int16),
                                 np.zeros(0, np.float64), np.zeros(0, object))
        return self._columns

    def _label_columns(self):
        if self._labels_cache is None:
            cols = {}
            for name, (ds, kind) in self._tile_labels.items():
                try:
                    cols[name] = (ds.asstr()[()] if kind == "str" else ds[()], kind)
                except UnicodeDecodeError as e:
                    raise H5PathError(f"{self.path}: tile label {name!r} holds text that is not UTF-8 "
                                      f"({e.reason})") from e
                except OSError as e:
                    raise H5PathError(f"{self.path}: tile label {name!r} cannot be read (damaged file?): {e}") from e
            self._labels_cache = cols
        return self._labels_cache

    def coords(self) -> np.ndarray:
        return self._cols()[0]

    def read_tile(self, i: int) -> Tile:
        coords, level, down, names = self._cols()
        try:
            image = self.images[i]
            masks = {}
            for name, (ds, is_bool) in self._tile_masks.items():
                m = ds[i]
                masks[name] = m.astype(bool) if is_bool else m
        except OSError as e:
            raise H5PathError(f"{self.path}: tile {i} cannot be read (damaged file?): {e}") from e
        labels = {}
        for name, (col, kind) in self._label_columns().items():
            v = col[i]
            if kind == "str":
                if v != "":
                    labels[name] = str(v)
            elif not (isinstance(v, (float, np.floating)) and math.isnan(v)):
                try:
                    labels[name] = bool(v) if kind == "bool" else int(v) if kind == "int" else float(v)
                except (OverflowError, ValueError) as e:
                    raise H5PathError(f"{self.path}: tile {i}: label {name!r} = {v!r} is not a {kind}") from e
        slide = self._tile_slide()
        ds = float(down[i])
        mpp = None if slide["mpp"] is None else (slide["mpp"][0] * ds, slide["mpp"][1] * ds)
        return Tile(image=image, coords=(int(coords[i, 0]), int(coords[i, 1])), level=int(level[i]),
                    downsample=ds, masks=masks, labels=labels, slide_type=slide["slide_type"],
                    name=str(names[i]) or None, mpp=mpp)

    @property
    def tile_mask_names(self) -> list:
        return list(self._tile_masks)

    @property
    def tile_label_names(self) -> list:
        return list(self._tile_labels)

    # slide masks

    def _mask_group(self):
        return _group(self.f, "masks", self.path)

    def mask_names(self) -> list:
        g = self._mask_group()
        return list(g) if g is not None else []

    def _mask_ds(self, name):
        g = self._mask_group()
        if g is None or name not in g:
            raise KeyError(f"{self.path}: no slide mask {name!r}")
        ds = _dataset(g, name, self.path)
        if ds.ndim != 2 or 0 in ds.shape or ds.dtype.kind not in "uifb":
            raise H5PathError(f"{self.path}: inconsistent: slide mask {ds.name} has shape {ds.shape} dtype {ds.dtype}; "
                              "expected a non-empty 2-D array of numbers")
        return ds

    def read_mask(self, name) -> np.ndarray:
        ds = self._mask_ds(name)
        if ds.size * ds.dtype.itemsize > MAX_MASK_BYTES:
            raise H5PathError(f"{self.path}: slide mask {name!r} of shape {ds.shape} would take "
                              f"{ds.size * ds.dtype.itemsize / 2**30:.1f} GiB; more than histoflow loads, refused")
        try:
            arr = ds[()]
        except OSError as e:
            raise H5PathError(f"{self.path}: slide mask {name!r} cannot be read (damaged file?): {e}") from e
        return arr.astype(bool) if _flag(ds, "bool", self.path) else arr

    def mask_downsample(self, name) -> float:
        v = _attr(self._mask_ds(name), "downsample", self.path, 1.0)
        try:
            v = float(v)
        except (TypeError, ValueError):
            v = float("nan")
        if not (math.isfinite(v) and v > 0):
            raise H5PathError(f"{self.path}: slide mask {name!r} has an invalid downsample attribute")
        return v

    # cells and provenance

    def cells(self):
        g = _group(self.f, "cells", self.path)
        if g is None:
            return None
        _check_tree(g, self.path)
        kind = _attr(g, "encoding-type", self.path)
        if kind != "anndata":
            raise H5PathError(f"{self.path}: /cells is not an AnnData table (encoding-type {kind!r}); damaged?")
        try:
            out = _read_elem()(g)
        except Exception as e:
            raise H5PathError(f"{self.path}: /cells cannot be read as AnnData: {e}") from e
        import anndata

        if not isinstance(out, anndata.AnnData):
            raise H5PathError(f"{self.path}: /cells is not an AnnData table; damaged?")
        return out

    def provenance(self) -> list:
        if "provenance" not in self.f:
            return []
        ds = _dataset(self.f, "provenance", self.path)
        if ds.ndim != 1 or not _is_str_dtype(ds.dtype):
            raise H5PathError(f"{self.path}: inconsistent: /provenance must be a 1-D string dataset")
        if ds.shape[0] > MAX_PROVENANCE:
            raise H5PathError(f"{self.path}: /provenance claims {ds.shape[0]} records, more than histoflow reads "
                              f"({MAX_PROVENANCE}); refused")
        out = []
        try:
            texts = ds.asstr()[()]
        except (OSError, UnicodeDecodeError) as e:
            raise H5PathError(f"{self.path}: /provenance cannot be read (damaged file?): {e}") from e
        for k, text in enumerate(texts):
            if len(text) > MAX_PROVENANCE_CHARS:
                raise H5PathError(f"{self.path}: provenance record {k} is longer than {MAX_PROVENANCE_CHARS} "
                                  "characters")
            try:
                rec = json.loads(text)
            except (ValueError, RecursionError) as e:
                raise H5PathError(f"{self.path}: provenance record {k} is not valid JSON: {e}") from e
            if not isinstance(rec, dict):
                raise H5PathError(f"{self.path}: provenance record {k} is not a JSON object")
            out.append(rec)
        return out


def _read_slide(g: h5py.Group, path, labels: bool = True) -> dict:
    """The /slide group as a dict; ``labels=False`` leaves the slide labels out (what a tile needs is
    read without them, so a damaged or oversized label never makes the tiles unreadable)."""
    out = dict.fromkeys(SLIDE_KEYS)
    for k in _STR_KEYS:
        v = _attr(g, k, path)
        if v is not None and not isinstance(v, str):
            raise H5PathError(f"{path}: /slide attribute {k!r} is not a string")
        out[k] = v
    try:
        for k in ("width", "height"):
            v = _attr(g, k, path)
            out[k] = None if v is None else int(v)
        mpp = _attr(g, "mpp", path)
        if mpp is not None:
            mpp = np.asarray(mpp, dtype=np.float64).reshape(-1)
            if mpp.shape != (2,):
                raise ValueError(f"mpp has {mpp.size} values, not 2")
            out["mpp"] = (float(mpp[0]), float(mpp[1]))
        op = _attr(g, "objective_power", path)
        out["objective_power"] = None if op is None else float(op)
        names = _attr(g, "channel_names", path)
        out["channel_names"] = None if names is None else [str(c) for c in np.asarray(names).reshape(-1)]
        levels = []
        if "levels" in g:
            ds = _dataset(g, "levels", path)
            if ds.ndim != 2 or ds.shape[1] != 3 or ds.shape[0] > 1024 or ds.dtype.kind not in "uif":
                raise H5PathError(f"{path}: inconsistent: /slide/levels has shape {ds.shape} dtype {ds.dtype}")
            levels = [{"width": int(w), "height": int(h), "downsample": float(d)} for w, h, d in ds[()]]
        out["levels"] = levels
    except (TypeError, ValueError, OverflowError) as e:
        raise H5PathError(f"{path}: invalid /slide metadata: {e}") from e
    if not labels:
        out["labels"] = {}
        return out
    json_names = _plain(_attr(g, "json_labels", path, np.zeros(0, object)))
    if isinstance(json_names, str):
        json_names = [json_names]
    if not isinstance(json_names, list) or not all(isinstance(k, str) for k in json_names):
        raise H5PathError(f"{path}: invalid /slide metadata: attribute 'json_labels' must list label names, "
                          f"got {json_names!r:.80}")
    json_names = set(json_names)
    labels = {}
    lg = _group(g, "labels", path)
    for k in (lg.attrs if lg is not None else ()):
        v = _attr(lg, k, path)
        if k in json_names:
            if not isinstance(v, str):
                raise H5PathError(f"{path}: slide label {k!r} is marked JSON but is not a string")
            try:
                v = json.loads(v)
            except (ValueError, RecursionError) as e:
                raise H5PathError(f"{path}: slide label {k!r} is not valid JSON: {e}") from e
        labels[k] = _plain(v)
    out["labels"] = labels
    return out


# ----------------------------------------------------------------------------------------- H5Path

def _damage_guard(f):
    """``f`` with what h5py raises for a damaged file found while reading (a B-tree, a heap or a datatype that
    the first checks did not reach) turned into an H5PathError naming the file; the project's own errors, and
    the caller's (IndexError, KeyError, TypeError), pass as they are."""
    import functools
    import inspect

    def damaged(self, e):
        return H5PathError(f"{self.path}: cannot be read (damaged file?): {type(e).__name__}: {e}")

    if inspect.isgeneratorfunction(f):
        @functools.wraps(f)
        def wrapped(self, *args, **kwargs):
            try:
                yield from f(self, *args, **kwargs)
            except HistoflowError:
                raise
            except (RuntimeError, SystemError, ValueError, OSError) as e:
                raise damaged(self, e) from e
    else:
        @functools.wraps(f)
        def wrapped(self, *args, **kwargs):
            try:
                return f(self, *args, **kwargs)
            except HistoflowError:
                raise
            except (RuntimeError, SystemError, ValueError, OSError) as e:
                raise damaged(self, e) from e
    return wrapped


class _Masks(Mapping):
    """Slide-level masks by name; each is read from disk when accessed."""

    def __init__(self, src):
        self._src = src
        self.path = src.path

    @_damage_guard
    def __getitem__(self, name) -> np.ndarray:
        return self._src.read_mask(name)

    @_damage_guard
    def __iter__(self):
        return iter(self._src.mask_names())

    @_damage_guard
    def __len__(self):
        return len(self._src.mask_names())

    @_damage_guard
    def __contains__(self, name):  # by name: Mapping's reads the whole mask (256 MB, 1.5 s for a large one)
        return name in self._src.mask_names()

    def __repr__(self):
        return f"<slide masks {self._src.mask_names()}>"


class H5Path:
    """An open h5path file (version 2, or PathML's version 1), read lazily.

    The HDF5 file stays open (read-only) until :meth:`close`; use it as a context manager. Open one
    per process: an h5py handle must not cross a fork.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Attributes
    ----------
    path : str
        The file's path.
    format_version : int
        2, or 1 for a PathML file.

    Raises
    ------
    H5PathError
        Missing, not HDF5 / truncated, foreign, of a newer version, incomplete or inconsistent file.

    Examples
    --------
    >>> with read_h5path("slide.h5path") as h:  # doctest: +SKIP
    ...     first = h.tile(0)
    ...     same = h.tile(first.coords)
    ...     n_tissue = sum(t.masks["tissue"].any() for t in h)
    """

    def __init__(self, path):
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise H5PathError(f"read_h5path: path must be a file name, got {type(path).__name__} {path!r:.60}")
        self.path = os.fsdecode(os.fspath(path))  # (bytes paths were named b"..." in messages)
        self._src = None
        self._by_coords = None  # (x, y) -> first tile index, made at the first lookup by coords
        if not os.path.exists(self.path):
            raise H5PathNotFoundError(f"{self.path}: no such file")
        if not os.path.isfile(self.path):
            raise H5PathError(f"{self.path}: not a regular file")
        try:
            _register_filters()
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise H5PathError(f"{self.path}: not a readable HDF5 file (truncated or damaged?): {e}") from e
        try:
            self._src = _open_source(f, self.path)
        except _DAMAGE as e:  # metadata damaged where no check of ours names it
            f.close()
            raise H5PathError(f"{self.path}: cannot be read (damaged file?): {type(e).__name__}: {e}") from e
        except BaseException:
            f.close()
            raise
        self._f = f
        self.format_version = self._src.format_version

    # lifecycle

    def close(self):
        """Close the HDF5 file; further reads raise :class:`H5PathError`."""
        if self._src is not None:
            self._src = None
            self._f.close()

    @property
    def closed(self) -> bool:
        return self._src is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _s(self):
        if self._src is None:
            raise H5PathError(f"{self.path}: the file is closed")
        return self._src

    def __repr__(self):
        if self._src is None:
            return f"H5Path({self.path!r}, closed)"
        return (f"H5Path({self.path!r}, version={self.format_version}, tiles={len(self)}, "
                f"tile_masks={self.tile_mask_names}, masks={list(self.masks)})")

    # metadata

    @property
    @_damage_guard
    def slide(self) -> dict:
        """Slide metadata: the keys :class:`H5PathWriter` accepts, ``None`` where unknown.

        ``levels`` is a list of ``{"width", "height", "downsample"}`` dicts, ``mpp`` a tuple or None,
        ``labels`` the slide labels.
        """
        return copy.deepcopy(self._s().slide())

    @property
    @_damage_guard
    def labels(self) -> dict:
        """Slide labels."""
        return copy.deepcopy(self._s().slide()["labels"])

    # tiles

    @_damage_guard
    def __len__(self) -> int:
        return self._s().n

    @property
    @_damage_guard
    def coords(self) -> np.ndarray:
        """``(N, 2)`` int64 level-0 ``(x, y)`` of every tile, in file order."""
        return self._s().coords().copy()

    @property
    @_damage_guard
    def images(self):
        """All tile images, lazily: an ``(N, h, w, c)`` h5py dataset (v2; None when there are no
        tiles) or an array-like view (v1). Index it; ``images[()]`` loads everything."""
        return self._s().images

    @property
    @_damage_guard
    def tile_mask_names(self) -> list:
        """Names of the per-tile masks."""
        return list(self._s().tile_mask_names)

    @property
    @_damage_guard
    def tile_label_names(self) -> list:
        """Names of the per-tile labels."""
        return list(self._s().tile_label_names)

    @_damage_guard
    def tile(self, key) -> Tile:
        """One tile, read from disk without reading the others.

        Parameters
        ----------
        key : int or (int, int)
            Index in file order (negative counts from the end), or level-0 ``(x, y)`` coords.

        Returns
        -------
        Tile

        Raises
        ------
        IndexError
            Index out of range.
        KeyError
            No tile at those coords.
        """
        src = self._s()
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            i = int(key)
            if i < 0:
                i += src.n
            if not 0 <= i < src.n:
                raise IndexError(f"{self.path}: tile index {int(key)} out of range for {src.n} tiles")
            return src.read_tile(i)
        if isinstance(key, (tuple, list, np.ndarray)) and len(key) == 2:
            try:  # the caller's key, not the file: NaN, inf, None or text was reported as a damaged file
                if any(isinstance(v, (str, bytes, bool, np.bool_)) for v in key):
                    raise TypeError
                x, y = int(key[0]), int(key[1])
                whole = x == key[0] and y == key[1]
            except (TypeError, ValueError, OverflowError):
                whole = False
            if not whole:  # (8.9, 0) is no tile's corner
                raise KeyError(f"{self.path}: no tile at {tuple(key)}: tile coords are whole numbers")
            if self._by_coords is None:  # one scan of the table, not one per lookup (7.8 ms at 100k tiles)
                index = {}
                for i, xy in enumerate(map(tuple, src.coords().tolist())):
                    index.setdefault(xy, i)
                self._by_coords = index
            i = self._by_coords.get((x, y))
            if i is None:
                raise KeyError(f"{self.path}: no tile at (x={x}, y={y})")
            return src.read_tile(i)
        raise TypeError(f"{self.path}: a tile key is an int index or (x, y) coords, not {key!r}")

    __getitem__ = tile

    @_damage_guard
    def __iter__(self) -> Iterator[Tile]:
        src = self._s()
        for i in range(src.n):
            if self._src is None:  # closed while iterating: say so (HDF5 would call the file damaged)
                self._s()
            yield src.read_tile(i)

    # slide masks

    @property
    @_damage_guard
    def masks(self) -> Mapping:
        """Slide-level masks, name -> ndarray, each read when accessed."""
        return _Masks(self._s())

    @_damage_guard
    def mask_downsample(self, name: str) -> float:
        """Downsample of slide mask ``name`` relative to level 0."""
        return self._s().mask_downsample(name)

    # cells and provenance

    @property
    @_damage_guard
    def cells(self):
        """The single-cell table (:class:`anndata.AnnData`), or None when the file has none."""
        return self._s().cells()

    @property
    @_damage_guard
    def provenance(self) -> list:
        """Run records (dicts), oldest first."""
        return self._s().provenance()

    @_damage_guard
    def overview(self, size: int = 1024, **kwargs) -> np.ndarray:
        """A picture (RGB uint8) of the slide with its slide masks, the tiles kept, optionally a tile label as
        colours (``label=``) and nuclei as dots (``instances=``): :func:`histoflow.store.overview.overview`."""
        from .overview import overview

        return overview(self, size, **kwargs)

    @_damage_guard
    def info(self) -> dict:
        """What the file holds, in plain values: ``path``, ``format_version``, ``slide`` (its metadata),
        ``tiles`` (count), ``tile_shape`` and ``dtype`` (None without tiles), ``compression``, ``tile_masks``,
        ``tile_labels``, ``masks`` (slide masks: name -> ``{"shape", "downsample"}``), ``cells`` (``{"cells",
        "features"}`` or None) and ``runs``: per run that wrote it, oldest first, its ``kind``, ``date``,
        ``steps`` (transform names), ``tiles_written``, ``failed_tiles`` (a count), ``executor`` and
        ``elapsed_s`` (None where the record does not say). Reads no tile and no cell table."""
        src = self._s()
        n = src.n
        imgs = src.images
        shape = dtype = None
        if imgs is not None and n and getattr(imgs, "shape", None) is not None:
            shape, dtype = tuple(int(v) for v in imgs.shape[1:]), str(np.dtype(imgs.dtype))
        masks = {}
        for name in self.masks:
            m = self._f.get(f"masks/{name}")  # v2 and PathML's v1 both keep slide masks there
            masks[name] = {"shape": None if not isinstance(m, h5py.Dataset) else tuple(int(v) for v in m.shape),
                           "downsample": float(self.mask_downsample(name))}
        runs = []
        for rec in self.provenance:
            pipe = rec.get("pipeline")
            steps = pipe.get("steps") if isinstance(pipe, dict) else None
            executor = rec.get("executor")
            failed = rec.get("failed_tiles")
            runs.append({"kind": _text_or_none(rec.get("kind")), "date": _text_or_none(rec.get("date")),
                         "steps": [str(next(iter(st))) for st in steps if isinstance(st, dict) and st]
                         if isinstance(steps, list) else None,
                         "tiles_written": _count_or_none(rec.get("tiles_written")),
                         # the list holds 100,000 at most; the total is recorded beside it
                         "failed_tiles": _count_or_none(rec.get("failed_tiles_total", len(failed)))
                         if isinstance(failed, list) else None,
                         "executor": _text_or_none(executor.get("kind") if isinstance(executor, dict) else executor),
                         "elapsed_s": rec.get("elapsed_s") if isinstance(rec.get("elapsed_s"), (int, float))
                         and not isinstance(rec.get("elapsed_s"), bool) else None})
        return {"path": self.path, "format_version": self.format_version, "slide": self.slide, "tiles": n,
                "tile_shape": shape, "dtype": dtype, "compression": self._compression(),
                "tile_masks": self.tile_mask_names, "tile_labels": self.tile_label_names, "masks": masks,
                "cells": self._cell_counts(), "runs": runs}

    def _compression(self):
        tiles = self._f.get("tiles")
        value = None if tiles is None else tiles.attrs.get("compression")
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if value is None and self.images is not None and hasattr(self.images, "compression"):
            value = self.images.compression  # PathML's files: the dataset's own filter
        return value

    def _cell_counts(self):
        """``{"cells", "features"}`` of the cell table from its index sizes (nothing loaded), or None."""
        group = self._f.get("cells") if self.format_version == FORMAT_VERSION else None
        if group is None:
            if self.format_version == FORMAT_VERSION:
                return None
            table = self.cells  # PathML's /counts: small enough to read
            return None if table is None else {"cells": int(table.n_obs), "features": int(table.n_vars)}
        try:
            sizes = []
            for part in ("obs", "var"):
                g = group[part]
                index = g.attrs.get("_index", "_index")
                sizes.append(int(g[index].shape[0]))
            return {"cells": sizes[0], "features": sizes[1]}
        except (KeyError, OSError, TypeError):
            raise H5PathError(f"{self.path}: the cell table /cells is damaged (no obs/var index)") from None


def _open_source(f: h5py.File, path: str):
    from . import pathml_v1  # imports this module's helpers

    fmt = _attr(f, "format", path)
    if fmt is None:
        if pathml_v1.is_pathml_v1(f):
            return pathml_v1.PathMLV1Reader(f, path)
        raise H5PathError(f"{path}: foreign HDF5 file: no 'format' attribute and not a PathML h5path file")
    if not isinstance(fmt, str) or fmt != FORMAT:
        raise H5PathError(f"{path}: foreign HDF5 file: format attribute is {fmt!r}, not {FORMAT!r}")
    version = _attr(f, "format_version", path)
    if not isinstance(version, (int, np.integer)) or isinstance(version, (bool, np.bool_)):
        raise H5PathError(f"{path}: invalid format_version {version!r}")
    version = int(version)
    if version > FORMAT_VERSION:
        raise H5PathError(f"{path}: h5path format version {version} is newer than this histoflow reads "
                          f"(up to {FORMAT_VERSION}); upgrade histoflow")
    if version < FORMAT_VERSION:
        raise H5PathError(f"{path}: invalid format_version {version}: version 1 files (PathML) carry no "
                          "format attribute")
    return _V2Reader(f, path)


def _register_filters():
    """Make hdf5plugin's filters (HTJ2K images) readable, when it is installed."""
    try:
        import hdf5plugin  # noqa: F401 - importing registers the filters with HDF5
    except ImportError:  # pragma: no cover
        pass


def read_h5path(path) -> H5Path:
    """Open an h5path file (version 2, or PathML's version 1) for reading.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    H5Path
        Open, read-only; close it (or use ``with``).

    Raises
    ------
    H5PathError
        The file is missing, not HDF5 or truncated, foreign, of a newer version, incomplete, or
        inconsistent.
    """
    return H5Path(path)

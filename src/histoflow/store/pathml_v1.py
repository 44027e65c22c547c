"""Reading PathML's h5path files (format version 1) through the :class:`~histoflow.store.H5Path` API.

PathML (checked against 3.0.8) writes one HDF5 group per tile, named after the tile's coordinates
``"(i, j)"``, with float16 pixels and string attributes that PathML itself evaluates as Python code.
This module never evaluates anything: coordinates are parsed with a strict regular expression on a
short string, labels are read as plain HDF5 attributes. See ``docs/h5path.md`` ("Version 1") for
how the layout maps onto histoflow's tiles; in short:

- PathML ``(i, j)`` is ``(row, column)`` in the image PathML read; histoflow reports
  ``coords = (x, y) = (j, i)`` with ``level = 0`` and ``downsample = 1.0``;
- tiles are ordered by ``(i, j)`` (row by row);
- float16 pixels and masks that hold whole numbers 0..255 become uint8, others float32;
- slide labels are ``/fields/labels``, or else the labels every tile carries with the same value.
"""
from __future__ import annotations

import re

import h5py
import numpy as np

from ..core.tile import Tile
from ..errors import H5PathError
from .h5path import (
    MAX_TILE_BYTES,
    SLIDE_KEYS,
    _attr,
    _check_tree,
    _dataset,
    _group,
    _plain,
    _read_elem,
)

__all__ = ["PathMLV1Reader", "is_pathml_v1", "parse_coords"]

#: longest coordinate / shape string parsed
MAX_KEY_CHARS = 64
_COORDS_RE = re.compile(r"\(\s*(-?\d{1,12})\s*,\s*(-?\d{1,12})\s*\)")

_PLATFORM_TYPES = {"codex": "CODEX", "vectra": "Vectra", "mibi": "MIBI"}
_STAIN_TYPES = {"he": "HE", "ihc": "IHC", "fluor": "IF"}


def is_pathml_v1(f: h5py.File) -> bool:
    """Whether an open HDF5 file has PathML's h5path layout (groups ``fields`` and ``tiles``, the
    latter with a ``tile_shape`` attribute, and no ``format`` root attribute)."""
    if "format" in f.attrs:
        return False
    for name in ("fields", "tiles"):  # hard links only: never follow a link out of the file
        if not isinstance(f.get(name, getlink=True), h5py.HardLink) or not isinstance(f[name], h5py.Group):
            return False
    return "tile_shape" in f["tiles"].attrs


def parse_coords(text, path="", what="tile coordinates") -> tuple[int, int]:
    """Parse PathML's ``"(i, j)"`` string into two ints, strictly.

    Parameters
    ----------
    text : str or bytes
        At most :data:`MAX_KEY_CHARS` characters, exactly ``(int, int)`` with optional spaces.
    path : str
        File, for error messages.
    what : str
        What the string is, for error messages.

    Returns
    -------
    (int, int)
        PathML's ``(i, j)`` = (row, column).

    Raises
    ------
    H5PathError
        Anything else.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(text, str) or len(text) > MAX_KEY_CHARS:
        raise H5PathError(f"{path}: {what} {str(text)[:MAX_KEY_CHARS]!r}... is not a short '(i, j)' string")
    m = _COORDS_RE.fullmatch(text.strip())
    if m is None:
        raise H5PathError(f"{path}: {what} {text!r} is not of the form '(i, j)'")
    return int(m.group(1)), int(m.group(2))


def _whole_bytes(a: np.ndarray) -> bool:
    """Whether a float array holds only whole numbers 0..255 (PathML stores uint8 pixels as float16)."""
    a32 = a.astype(np.float32) if a.dtype.itemsize < 4 else a
    return bool(np.all(np.isfinite(a32)) and (a32.size == 0 or (a32.min() >= 0 and a32.max() <= 255))
                and np.array_equal(a32, np.floor(a32)))


#: the members of an AnnData written by anndata, as PathML copies them into /counts
_ANNDATA_PARTS = ("X", "obs", "var", "obsm", "varm", "obsp", "varp", "layers", "uns")


def _planes(a: np.ndarray) -> np.ndarray:
    """A tile as (h, w[, c]): PathML's multiparametric tiles come as (i, j, z, c, t) from its BioFormats
    backend, written so when the pipeline has no CollapseRuns step; one z-plane and one time point: squeezed."""
    return a[:, :, 0, :, 0] if a.ndim == 5 else a


def _to_native(a: np.ndarray, as_uint8: bool) -> np.ndarray:
    """Floats -> uint8 when the file's arrays of this kind all hold whole numbers 0..255, else float32 or wider
    (decided once per file and per image / mask name, so every tile of a file has the same dtype)."""
    if a.dtype.kind != "f":
        return a
    if as_uint8:
        return a.astype(np.uint8)
    return a.astype(np.float32) if a.dtype.itemsize < 4 else a


def _slide_type(attrs: dict) -> str | None:
    platform = str(attrs.get("platform") or "").lower()
    stain = str(attrs.get("stain") or "").lower()
    if platform in _PLATFORM_TYPES:
        return _PLATFORM_TYPES[platform]
    return _STAIN_TYPES.get(stain)


class _V1Images:
    """Array-like view of a v1 file's tile images: ``len``, ``shape``, ``dtype``, integer/slice indexing."""

    def __init__(self, reader: PathMLV1Reader):
        self._r = reader

    def __len__(self):
        return self._r.n

    @property
    def dtype(self):
        return self._r.read_tile(0).image.dtype if self._r.n else None

    @property
    def shape(self):
        return (self._r.n, *self._r.read_tile(0).image.shape) if self._r.n else (0,)

    @property
    def compression(self):
        """The HDF5 filter of the first tile's ``array`` dataset (PathML writes every tile alike), or None."""
        if not self._r.n:
            return None
        try:
            return self._r.f["tiles"][self._r._keys[0]]["array"].compression
        except (KeyError, TypeError, AttributeError):
            return None

    def __getitem__(self, key):
        if (isinstance(key, tuple) and key == ()) or key is Ellipsis:
            key = slice(None)
        if isinstance(key, slice):
            return np.stack([self._r.read_tile(i).image for i in range(*key.indices(self._r.n))])
        i = int(key)
        if i < 0:
            i += self._r.n
        if not 0 <= i < self._r.n:
            raise IndexError(f"{self._r.path}: tile index {key} out of range")
        return self._r.read_tile(i).image

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)


class PathMLV1Reader:
    """Reader of PathML h5path files (internal; use :func:`histoflow.store.read_h5path`).

    Parameters
    ----------
    f : h5py.File
        The open file (checked with :func:`is_pathml_v1`).
    path : str
        Its path, for messages.
    """

    format_version = 1

    def __init__(self, f: h5py.File, path: str):
        self.f, self.path = f, path
        tiles = f["tiles"]
        entries = []
        for key in tiles:
            ij = parse_coords(key, path, "tile group name")
            entries.append((ij, key))
        entries.sort()
        self._keys = [k for _, k in entries]
        self._ij = [ij for ij, _ in entries]
        self._coords = np.array([(j, i) for i, j in self._ij], dtype=np.int64).reshape(-1, 2)
        self.n = len(entries)
        self.images = _V1Images(self)
        fields = f["fields"]
        shape = _attr(fields, "shape", path)
        try:
            shape = None if shape is None else [int(s) for s in np.asarray(shape).reshape(-1)[:2]]
        except (TypeError, ValueError) as e:
            raise H5PathError(f"{path}: /fields attribute 'shape' is not a pair of ints") from e
        st = _group(fields, "slide_type", path)
        st_attrs = {k: _plain(_attr(st, k, path)) for k in st.attrs} if st is not None else {}
        height, width = (shape + [None, None])[:2] if shape else (None, None)
        self._meta = dict.fromkeys(SLIDE_KEYS)
        self._meta.update(
            name=_attr(fields, "name", path), width=width, height=height, slide_type=_slide_type(st_attrs),
            levels=[] if width is None else [{"width": width, "height": height, "downsample": 1.0}])
        self._slide_type = self._meta["slide_type"]
        self._scanned = None

    # slide metadata (labels need a scan of the tiles, done on first use)

    def _scan(self):
        """Union of tile mask / label names and the labels shared by every tile."""
        if self._scanned is None:
            mask_names, label_names, common = {}, {}, None
            for key in self._keys:
                g = _group(self.f["tiles"], key, self.path)
                mg = _group(g, "masks", self.path)
                for m in (mg or ()):
                    mask_names.setdefault(m, None)
                labels = self._tile_labels(g)
                for k in labels:
                    label_names.setdefault(k, None)
                if common is None:
                    common = dict(labels)
                else:
                    common = {k: v for k, v in common.items() if k in labels and labels[k] == v}
            self._scanned = (list(mask_names), list(label_names), common or {})
        return self._scanned

    def slide(self) -> dict:
        if self._meta["labels"] is None:
            lg = _group(self.f["fields"], "labels", self.path)
            labels = {k: _plain(_attr(lg, k, self.path)) for k in lg.attrs} if lg is not None else {}
            self._meta["labels"] = labels or dict(self._scan()[2])
            if self.n and self._meta["dtype"] is None:
                self._meta["dtype"] = self.read_tile(0).image.dtype.name
        return self._meta

    @property
    def tile_mask_names(self) -> list:
        return self._scan()[0]

    @property
    def tile_label_names(self) -> list:
        return self._scan()[1]

    # tiles

    def coords(self) -> np.ndarray:
        return self._coords

    def _tile_labels(self, g) -> dict:
        lg = _group(g, "labels", self.path)
        return {k: _plain(_attr(lg, k, self.path)) for k in lg.attrs} if lg is not None else {}

    def _uint8(self, mask) -> bool:
        """Whether the file's images (``mask=None``) or masks ``mask`` all hold whole numbers 0..255: one scan of
        the file per kind, cached."""
        cache = self.__dict__.setdefault("_uint8_cache", {})
        if mask not in cache:
            ok = True
            try:
                for key in self._keys:
                    g = self.f["tiles"][key]
                    ds = g.get("array") if mask is None else (g.get("masks") or {}).get(mask)
                    if ds is None or not isinstance(ds, h5py.Dataset) or ds.dtype.kind != "f":
                        continue
                    if ds.size * ds.dtype.itemsize > MAX_TILE_BYTES or not _whole_bytes(ds[()]):
                        ok = False
                        break
            except (OSError, KeyError, TypeError, ValueError, RuntimeError):
                ok = False  # read_tile reports the damaged tile
            cache[mask] = ok
        return cache[mask]

    def read_tile(self, i: int) -> Tile:
        key = self._keys[i]
        g = _group(self.f["tiles"], key, self.path)
        where = f"tile {i} {key!r}"
        if "array" not in g:
            raise H5PathError(f"{self.path}: {where} has no 'array' dataset")
        ds = _dataset(g, "array", self.path)
        if ds.ndim not in (2, 3, 5) or ds.size * ds.dtype.itemsize > MAX_TILE_BYTES \
                or ds.dtype.kind not in "uif":
            raise H5PathError(f"{self.path}: {where}: array has shape {ds.shape} dtype {ds.dtype}")
        if ds.ndim == 5 and (ds.shape[2] != 1 or ds.shape[4] != 1):
            raise H5PathError(f"{self.path}: {where}: array of shape {ds.shape} (i, j, z, c, t) holds "
                              f"{ds.shape[2]} z-planes and {ds.shape[4]} time points; histoflow reads one of each")
        first = self._first_array()
        if i and (ds.shape, ds.dtype) != first:
            raise H5PathError(f"{self.path}: inconsistent: {where}: array has shape {ds.shape} dtype {ds.dtype}, "
                              f"unlike the first tile's {first[0]} {first[1]} (PathML writes every tile alike)")
        coords_attr = _attr(g, "coords", self.path)
        if coords_attr is not None and \
                parse_coords(coords_attr, self.path, f"{where}: coords attribute") != self._ij[i]:
            raise H5PathError(f"{self.path}: {where}: coords attribute {coords_attr!r} disagrees with the "
                              "group name")
        try:
            image = _to_native(_planes(ds[()]), self._uint8(None))
            masks = {}
            mg = _group(g, "masks", self.path)
            for m in (mg or ()):
                mds = _dataset(mg, m, self.path)
                if mds.shape != ds.shape[:2]:
                    raise H5PathError(f"{self.path}: {where}: mask {m!r} has shape {mds.shape}, "
                                      f"not the tile's {ds.shape[:2]}")
                masks[m] = _to_native(mds[()], self._uint8(m))
        except OSError as e:
            raise H5PathError(f"{self.path}: {where} cannot be read (damaged file?): {e}") from e
        name = _plain(_attr(g, "name", self.path))
        name = None if name in (0, "0", "None", "", None) else str(name)
        i_row, j_col = self._ij[i]
        return Tile(image=image, coords=(j_col, i_row), level=0, downsample=1.0, masks=masks,
                    labels=self._tile_labels(g), slide_type=self._slide_type, name=name, mpp=None)

    def _first_array(self) -> tuple:
        """(shape, dtype) of the first tile's ``array``: every tile of a PathML file has the same."""
        if self.__dict__.get("_first") is None:
            g = _group(self.f["tiles"], self._keys[0], self.path)
            ds = _dataset(g, "array", self.path) if "array" in g else None
            self._first = (None, None) if ds is None else (ds.shape, ds.dtype)
        return self._first

    # slide masks

    def mask_names(self) -> list:
        g = _group(self.f, "masks", self.path)
        return list(g) if g is not None else []

    def read_mask(self, name) -> np.ndarray:
        g = _group(self.f, "masks", self.path)
        if g is None or name not in g:
            raise KeyError(f"{self.path}: no slide mask {name!r}")
        ds = _dataset(g, name, self.path)
        if ds.ndim != 2 or 0 in ds.shape or ds.dtype.kind not in "uifb":
            raise H5PathError(f"{self.path}: inconsistent: slide mask {name!r} has shape {ds.shape} dtype {ds.dtype}; "
                              "expected a non-empty 2-D array of numbers")
        if ds.size * ds.dtype.itemsize > MAX_TILE_BYTES:
            raise H5PathError(f"{self.path}: slide mask {name!r} of shape {ds.shape} is larger than histoflow loads")
        try:
            a = ds[()]
            return _to_native(a, a.dtype.kind == "f" and _whole_bytes(a))
        except OSError as e:
            raise H5PathError(f"{self.path}: slide mask {name!r} cannot be read (damaged file?): {e}") from e

    def mask_downsample(self, name) -> float:
        if name not in self.mask_names():
            raise KeyError(f"{self.path}: no slide mask {name!r}")
        return 1.0

    # cells and provenance

    def cells(self):
        g = _group(self.f, "counts", self.path)
        if g is None or (not len(g) and "encoding-type" not in g.attrs):
            return None
        _check_tree(g, self.path)
        try:
            if "encoding-type" in g.attrs:
                return _read_elem()(g)
            # PathML (utils.writecounts) copies the children of an .h5ad into /counts, not the root's own
            # encoding attributes: read the children, as PathML's readcounts does
            import anndata

            parts = {k: _read_elem()(g[k]) for k in _ANNDATA_PARTS if k in g}
            if "X" not in parts and "obs" not in parts:
                raise H5PathError(f"{self.path}: /counts holds neither an anndata-encoded group nor the parts of "
                                  f"one (it has {sorted(g)})")
            return anndata.AnnData(**parts)
        except H5PathError:
            raise
        except Exception as e:
            raise H5PathError(f"{self.path}: /counts cannot be read as AnnData: {e}") from e

    def provenance(self) -> list:
        return []

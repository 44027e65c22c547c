"""PyTorch datasets of tiles: from an h5path file (:class:`TileDataset`) or straight from slides
(:class:`WSIPatchDataset`).

Both return the same sample, a dict that :func:`torch.utils.data.default_collate` batches:

=========== ==========================================================================================
key         value
=========== ==========================================================================================
``image``   float32 tensor ``(C, H, W)``. uint8 pixels are divided by 255, uint16 by 65535 (any unsigned
            integer by its maximum), so they lie in [0, 1]; float pixels are kept as they are.
``masks``   dict name -> tensor ``(H, W)``: bool, uint8, int8/16/32/64 keep their dtype, uint16/32/64
            become int64 (instance ids), floats become float32. Empty for :class:`WSIPatchDataset`.
``labels``  dict name -> value: 0-d tensor (int64 for bool and int labels, float32 for float labels) or
            ``str`` (collated into a list of str).
``coords``  int64 tensor ``(2,)``: level-0 ``(x, y)`` of the tile's top-left corner.
``index``   int: the tile's index in the h5path file (:class:`TileDataset`) or the row of the coordinate
            table (:class:`WSIPatchDataset`).
``slide``   int, :class:`WSIPatchDataset` only: index of the patch's slide in ``slides``.
=========== ==========================================================================================

A ``transform`` (for instance :class:`histoflow.ml.augment.Compose`) is called on the **numpy** sample
before the conversion to tensors: the same dict with ``image`` an ``(H, W, C)`` array in the native dtype,
``masks`` 2-D arrays, ``labels`` plain Python values and ``coords`` a ``(2,)`` int64 array; it returns the
(new) sample dict. :func:`to_tensors` does the conversion and is public for datasets of your own.

Files and slides are opened lazily, once per process: the datasets hold only paths, open on the first
``__getitem__`` in each process and reopen when the process id changes, so they are safe with
``DataLoader(num_workers > 0)`` whether workers are forked or spawned (pickled by value: no open handle is
ever pickled).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetError, H5PathError, RegionError

__all__ = ["DatasetError", "TileDataset", "WSIPatchDataset", "to_tensors", "DEFAULT_TISSUE_FILTER",
           "MISSING_LABEL_INT"]

#: least tissue fraction of a tile :class:`WSIPatchDataset` keeps when it lists a slide's tiles itself
DEFAULT_TISSUE_FILTER = 0.5
#: stands for a missing int / bool label (torch's default ``ignore_index`` of the classification losses)
MISSING_LABEL_INT = -100


# --------------------------------------------------------------------------------------- conversion
def _image_tensor(image) -> torch.Tensor:
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise DatasetError(f"a sample image must be (H, W, C), got shape {a.shape}")
    if a.dtype == bool:
        f = a.astype(np.float32)
    elif a.dtype.kind == "u":
        f = a.astype(np.float32)
        f *= np.float32(1.0 / np.iinfo(a.dtype).max)
    else:
        f = a.astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(f.transpose(2, 0, 1)))


def _mask_tensor(mask) -> torch.Tensor:
    m = np.asarray(mask)
    if m.dtype.kind == "u" and m.dtype != np.uint8:
        m = m.astype(np.int64)
    elif m.dtype.kind == "f" and m.dtype != np.float32:
        m = m.astype(np.float32)
    elif m.dtype.kind not in "biuf":
        raise DatasetError(f"a sample mask must be numeric or bool, got dtype {m.dtype}")
    m = np.ascontiguousarray(m)
    if not m.flags.writeable:
        m = m.copy()
    return torch.from_numpy(m)


def _label_value(v):
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, (str, np.str_)):
        return str(v)
    if isinstance(v, (bool, np.bool_, int, np.integer)):
        return torch.tensor(int(v), dtype=torch.int64)
    if isinstance(v, (float, np.floating)):
        return torch.tensor(float(v), dtype=torch.float32)
    if isinstance(v, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(v))
    return v


def to_tensors(sample: Mapping) -> dict:
    """Convert a numpy sample (see the module docs) to the tensor sample the datasets return.

    Keys other than ``image``, ``masks``, ``labels`` and ``coords`` are passed through unchanged.
    """
    out = dict(sample)
    out["image"] = _image_tensor(sample["image"])
    out["masks"] = {k: _mask_tensor(m) for k, m in (sample.get("masks") or {}).items()}
    out["labels"] = {k: _label_value(v) for k, v in (sample.get("labels") or {}).items()}
    if "coords" in sample:
        out["coords"] = torch.as_tensor(np.asarray(sample["coords"], dtype=np.int64).reshape(2))
    return out


def _names(requested, available, what, path):
    """Requested mask / label names, checked against the file's; True means all of them."""
    if requested is True:
        return list(available)
    if requested is None or requested is False:
        return []
    if isinstance(requested, str):
        requested = [requested]
    requested = list(requested)
    missing = [n for n in requested if n not in available]
    if missing:
        raise H5PathError(f"{path}: no per-tile {what} named {', '.join(repr(m) for m in missing)} "
                          f"(the file has {list(available) or 'none'})")
    return requested


# --------------------------------------------------------------------------------------- TileDataset
class _Epochs:
    """``set_epoch`` for datasets with a transform: a seeded :class:`~histoflow.ml.augment.Compose` then draws
    each item's augmentation from (its seed, the epoch, the item, the names of the files the dataset reads, and
    which copy of it this is when a histoflow sampler draws it again in the epoch:
    :class:`~histoflow.ml.samplers.Draw`), the same whichever DataLoader worker (and however many) reads the
    item; other transforms are called as they are. Call ``set_epoch(epoch)`` at the start of every epoch, as
    with torch's ``DistributedSampler`` (histoflow's trainer does): without it every epoch gets the same
    flips and colours as the first."""

    _epoch = 0
    _files_key = 0

    def set_epoch(self, epoch: int):
        self._epoch = int(epoch)

    @property
    def epoch_dependent(self) -> bool:
        return _seeded(self.transform)


def _seeded(transform) -> bool:
    from .augment import Compose

    return isinstance(transform, Compose) and transform.seed is not None


def quiet_interrupts(worker_id=None):
    """A DataLoader ``worker_init_fn``: on SIGINT or SIGTERM the worker leaves at once and quietly (exit 0).

    A terminal's Ctrl-C, GNU ``timeout`` and batch systems signal the whole process group. A worker killed by
    the TERM made torch raise "DataLoader worker ... is killed by signal: Terminated" in the main process, a
    traceback instead of the command's one-line interrupt; a worker that ignored it outlived the main process
    and printed a traceback of its own (its batch's connection reset). The main process gets the signal too
    and stops as it should."""
    import signal

    def leave(signum, frame):
        os._exit(0)

    for name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), leave)


def _name(p) -> str:
    """A file's name and its folder's (``slideA/tiles.h5path``): files of one name in several folders are told
    apart, and the same files moved elsewhere keep their key (a DICOM folder given with a trailing / too)."""
    if not isinstance(p, (str, os.PathLike)):
        return str(p)
    parts = os.path.normpath(os.fspath(p)).replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def _files_key(paths) -> int:
    """A number for the files a dataset reads (by name and folder), so that a seeded augmentation shared by the
    datasets of a ConcatDataset does not give item i of every file the same flips and colours each epoch."""
    import zlib

    return zlib.crc32("|".join(_name(p) for p in paths).encode("utf-8", "surrogateescape"))


def _transform(ds, sample, i):
    t = ds.transform
    if _seeded(t):
        key = [int(t.seed), ds._epoch, int(i) % max(len(ds), 1), ds._files_key]
        from .samplers import Draw

        repeat = i.repeat if isinstance(i, Draw) else 0  # the same item drawn again this epoch (numpy and
        # torch integers have a .repeat method: not a count)
        key = [k & 0xFFFFFFFFFFFFFFFF for k in (key + [int(repeat)] if repeat else key)]  # a seed may be < 0
        return t(sample, rng=np.random.default_rng(key))
    return t(sample)


class Subset(torch.utils.data.Subset):
    """``torch.utils.data.Subset`` that passes a sampler's repeated draws on as such: torch's looks the index up
    in its list, so a :class:`~histoflow.ml.samplers.Draw` arrived as a plain index and every copy of a rare item
    that a balancing sampler drew got the same seeded augmentation. Use it (or :func:`random_split`) to split a
    histoflow dataset that a :class:`~histoflow.ml.samplers.ClassBalancedSampler` or
    :class:`~histoflow.ml.samplers.HierarchicalSampler` draws from."""

    def __getitem__(self, idx):
        from .samplers import Draw

        if isinstance(idx, Draw):
            return self.dataset[Draw(int(self.indices[int(idx)]), idx.repeat)]
        return super().__getitem__(idx)

    def __getitems__(self, indices):  # a DataLoader's batch: each index as __getitem__ takes it
        return [self[i] for i in indices]


def random_split(dataset, lengths, generator=None) -> list[Subset]:
    """``torch.utils.data.random_split`` giving :class:`Subset` s (same arguments, same split for a generator)."""
    parts = torch.utils.data.random_split(dataset, lengths, generator=generator or torch.default_generator)
    return [Subset(p.dataset, p.indices) for p in parts]


class TileDataset(_Epochs, Dataset):
    """The tiles of an h5path file as a PyTorch dataset (random access, one tile read per item).

    Parameters
    ----------
    path : str or os.PathLike
        An h5path file (version 2, or PathML's version 1).
    image_key : str
        Where the input image comes from: ``"image"`` for the tile images, or the name of a per-tile mask
        (e.g. a stored hematoxylin channel) to use as a one-channel image instead.
    masks : sequence of str, or True
        Per-tile masks to return (True: all of the file's). Default none.
    labels : sequence of str, or True
        Per-tile labels to return (True: all of the file's). Default none.
    transform : callable, optional
        Called on the numpy sample before tensor conversion; returns the sample (see the module docs).
    indices : sequence of int, optional
        The file's tiles to use, in this order (a train / validation split). Default: all of them.
    missing_label : scalar or dict, optional
        Value of a requested label that a tile does not carry (h5path stores it as missing). Default by
        the label's kind in the file: :data:`MISSING_LABEL_INT` (-100, ignored by torch's classification
        losses) for int and bool labels, NaN for float labels, ``""`` for strings. A dict gives one value
        per label name.

    Raises
    ------
    H5PathError
        The file is missing or unreadable, or a requested mask or label is not in it (the message names
        the file and what it has).

    Examples
    --------
    >>> from torch.utils.data import DataLoader                                  # doctest: +SKIP
    >>> from histoflow.ml.augment import Compose, RandomFlip, StainAugment       # doctest: +SKIP
    >>> ds = TileDataset("slide.h5path", masks=["nuclei"], labels=["tumour"],    # doctest: +SKIP
    ...                  transform=Compose([RandomFlip(), StainAugment()]))
    >>> batch = next(iter(DataLoader(ds, batch_size=16, num_workers=4)))         # doctest: +SKIP
    >>> batch["image"].shape, batch["masks"]["nuclei"].shape                     # doctest: +SKIP
    (torch.Size([16, 3, 256, 256]), torch.Size([16, 256, 256]))
    """

    def __init__(self, path, image_key="image", masks=(), labels=(), transform=None, indices=None,
                 missing_label=None):
        from ..store import read_h5path

        self.path = os.fspath(path)
        self._files_key = _files_key([self.path])
        if transform is not None and not callable(transform):
            raise DatasetError(f"{self.path}: transform must be callable, got {transform!r}")
        with read_h5path(self.path) as h:
            n = len(h)
            mask_names, label_names = h.tile_mask_names, h.tile_label_names
            self.format_version = h.format_version
        if image_key != "image" and image_key not in mask_names:
            raise H5PathError(f"{self.path}: image_key {image_key!r} is neither 'image' nor a per-tile mask "
                              f"(the file has masks {mask_names or 'none'})")
        self.image_key = image_key
        self.masks = _names(masks, mask_names, "mask", self.path)
        self.labels = _names(labels, label_names, "label", self.path)
        self.transform = transform
        self.n_tiles = n
        if indices is None:
            self.indices = None
        else:
            idx = np.asarray(indices)
            if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
                raise DatasetError(f"{self.path}: indices must be a 1-D sequence of integers, got {indices!r}")
            idx = idx.astype(np.int64)
            bad = idx[(idx < 0) | (idx >= n)]
            if bad.size:
                raise DatasetError(f"{self.path}: tile indices {bad[:5].tolist()} out of range for {n} tiles")
            self.indices = idx
        self._kinds = self._label_kinds()
        self._missing = {}
        for name in self.labels:
            if isinstance(missing_label, Mapping):
                if name in missing_label:
                    self._missing[name] = missing_label[name]
                    continue
            elif missing_label is not None:
                self._missing[name] = missing_label
                continue
            kind = self._kinds.get(name)
            if kind in ("int", "bool"):
                self._missing[name] = MISSING_LABEL_INT
            elif kind == "float":
                self._missing[name] = math.nan
            elif kind == "str":
                self._missing[name] = ""
        self._h = None
        self._pid = None
        self._coords = None

    def _label_kinds(self) -> dict:
        """The kind ("bool", "int", "float", "str") of each requested label, from the file (version 2)."""
        if not self.labels or self.format_version != 2:
            return {}
        import h5py

        kinds = {}
        with h5py.File(self.path, "r") as f:
            for name in self.labels:
                k = f["tiles/labels"][name].attrs.get("kind")
                kinds[name] = k.decode() if isinstance(k, bytes) else (str(k) if k is not None else None)
        return kinds

    # ------------------------------------------------------------------ file handle, one per process
    def _file(self):
        pid = os.getpid()
        if self._h is None or self._pid != pid:
            from ..store import read_h5path

            # a handle inherited through fork is dropped, not closed: it belongs to the parent
            self._h = read_h5path(self.path)
            self._pid = pid
            self._coords = self._h.coords
        return self._h

    def close(self):
        """Close this process's handle (it is reopened on the next access)."""
        if self._h is not None and self._pid == os.getpid():
            self._h.close()
        self._h = None
        self._coords = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_h"] = None
        state["_pid"] = None
        state["_coords"] = None
        return state

    # ------------------------------------------------------------------ Dataset
    def __len__(self) -> int:
        return self.n_tiles if self.indices is None else len(self.indices)

    def tile_index(self, i: int) -> int:
        """The file's tile index of item ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.path}: item {i} out of range for a dataset of {n} tiles")
        i = int(i) % n
        return i if self.indices is None else int(self.indices[i])

    def read(self, i: int) -> dict:
        """The numpy sample of item ``i`` (before ``transform`` and tensor conversion)."""
        j = self.tile_index(i)
        h = self._file()
        need_tile = self.image_key != "image" or self.masks or self.labels
        if need_tile:
            tile = h.tile(j)
            image = tile.image if self.image_key == "image" else tile.masks[self.image_key]
            if image.ndim == 2:  # a stored one-channel map: (h, w, 1), as transforms take images
                image = image[..., None]
            masks = {k: tile.masks[k] for k in self.masks}
            labels = {}
            for k in self.labels:
                if k in tile.labels:
                    labels[k] = tile.labels[k]
                elif k in self._missing:
                    labels[k] = self._missing[k]
                else:
                    raise H5PathError(f"{self.path}: tile {j} has no label {k!r} and its kind is unknown; "
                                      "pass missing_label=... to give tiles without it a value")
        else:
            try:
                image = h.images[j]
            except OSError as e:
                raise H5PathError(f"{self.path}: tile {j} cannot be read (damaged file?): {e}") from e
            masks, labels = {}, {}
        return {"image": image, "masks": masks, "labels": labels,
                "coords": np.asarray(self._coords[j], np.int64), "index": j}

    def __getitem__(self, i) -> dict:
        sample = self.read(i)
        if self.transform is not None:
            sample = _transform(self, sample, i)
        return to_tensors(sample)

    def label_column(self, name) -> list:
        """The value of label ``name`` for every item of the dataset (in item order), e.g. to build the
        keys of a :class:`~histoflow.ml.samplers.HierarchicalSampler`. Tiles without it get the
        ``missing_label`` value (or None when it has none)."""
        h = self._file()
        if name not in h.tile_label_names:
            raise H5PathError(f"{self.path}: no per-tile label named {name!r} "
                              f"(the file has {h.tile_label_names or 'none'})")
        order = range(self.n_tiles) if self.indices is None else self.indices.tolist()
        fill = self._missing.get(name)
        if self.format_version == 2:
            import h5py

            with h5py.File(self.path, "r") as f:
                ds = f["tiles/labels"][name]
                kind = ds.attrs.get("kind")
                kind = kind.decode() if isinstance(kind, bytes) else kind
                col = ds.asstr()[()] if kind == "str" else ds[()]
            out = []
            for j in order:
                v = col[j]
                if kind == "str":
                    out.append(str(v) if v != "" else fill)
                elif math.isnan(v):
                    out.append(fill)
                else:
                    out.append(bool(v) if kind == "bool" else int(v) if kind == "int" else float(v))
            return out
        return [h.tile(j).labels.get(name, fill) for j in order]

    def __repr__(self):
        return (f"TileDataset({self.path!r}, {len(self)} tiles, image_key={self.image_key!r}, "
                f"masks={self.masks}, labels={self.labels})")


# --------------------------------------------------------------------------------------- WSIPatchDataset
def _origins(coords, scales) -> np.ndarray:
    """Per patch of a slide resampled to a target µm/px, the output-pixel place of its level-0 corner ``(x, y)``
    in the slide's resampled grid; NaN for slides read at a level as they are. Shrunk: a whole number where a
    grid would put a tile there (the patch is then that tile, pixel for pixel), else the exact quotient.
    Enlarged (finer than level 0, where several output pixels share a level-0 corner, so a corner cannot name
    a tile): the exact quotient, the window at that place (a grid tile itself where its corner is exact, as at
    2x or 4x)."""
    out = np.full((len(coords), 2), np.nan)
    for i, (s, x, y) in enumerate(coords.tolist()):
        if scales[s] is None:
            continue
        ds = scales[s][0]
        if ds < 1:
            out[i] = [x / ds, y / ds]
        else:
            out[i] = [round(v / ds) if int(round(round(v / ds) * ds)) == v else v / ds for v in (x, y)]
    return out


def _parse_coords(coords, n_slides):
    """(N, 3) int64 table of (slide, x, y) and the per-patch labels found in it."""
    labels: dict = {}
    if isinstance(coords, np.ndarray) and coords.dtype.names:
        raise DatasetError("coords: structured arrays are not supported; give an (N, 3) integer array or a "
                           "list of dicts with keys 'slide', 'x', 'y'")
    rows = list(coords) if not isinstance(coords, np.ndarray) else None
    if rows is not None and rows and isinstance(rows[0], Mapping):
        extra = None
        table = np.zeros((len(rows), 3), np.int64)
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise DatasetError(f"coords: row {i} is not a dict like the first one: {r!r}")
            missing = [k for k in ("slide", "x", "y") if k not in r]
            if missing:
                raise DatasetError(f"coords: row {i} lacks {missing} (each dict needs 'slide', 'x', 'y')")
            keys = sorted(k for k in r if k not in ("slide", "x", "y"))
            if extra is None:
                extra = keys
                labels = {k: [] for k in keys}
            elif keys != extra:
                raise DatasetError(f"coords: row {i} has label keys {keys}, row 0 has {extra}")
            for j, k in enumerate(("slide", "x", "y")):
                table[i, j] = _as_int(r[k], f"coords row {i} {k!r}")
            for k in keys:
                labels[k].append(r[k])
    else:
        arr = np.asarray(coords)
        if arr.size == 0:
            arr = arr.reshape(0, 3)
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise DatasetError(f"coords must be an (N, 3) table of (slide index, x, y) or a list of dicts, "
                               f"got shape {arr.shape}")
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
                raise DatasetError("coords must hold integers (slide index, level-0 x, y)")
        elif arr.size and arr.dtype.kind not in "iu":
            raise DatasetError(f"coords must hold integers (slide index, level-0 x, y), got dtype {arr.dtype}")
        table = arr.astype(np.int64)
    bad = np.flatnonzero((table[:, 0] < 0) | (table[:, 0] >= n_slides))
    if bad.size:
        raise DatasetError(f"coords row {int(bad[0])}: slide index {int(table[bad[0], 0])} out of range for "
                           f"{n_slides} slide(s)")
    return table, labels


def _as_int(v, what):
    if isinstance(v, (bool, np.bool_)):
        raise DatasetError(f"{what} must be an integer, got {v!r}")
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    raise DatasetError(f"{what} must be an integer, got {v!r}")


def _label_array(name, values, n, what):
    values = list(values) if not isinstance(values, np.ndarray) else values
    if len(values) != n:
        raise DatasetError(f"label {name!r} has {len(values)} values; it needs one per {what} ({n})")
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DatasetError(f"label {name!r} must be one value per {what}, got shape {arr.shape}")
    if arr.dtype.kind in "US":
        return arr.astype(str).astype(object)
    if arr.dtype.kind == "b" or arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        return arr.astype(np.float64)
    raise DatasetError(f"label {name!r} must hold numbers or strings (not a mix), got {arr.dtype}")


def _slide_source(slide):
    """``(path, backend, reader options, slide type)`` of a path, a reader or a :class:`SlideData`: what a worker
    process needs to open the slide again as the caller had it (a pixel size given with ``mpp=`` included)."""
    reader = getattr(slide, "reader", slide)
    if hasattr(reader, "_kwargs") and hasattr(reader, "backend"):
        kind = getattr(getattr(slide, "slide_type", None), "name", None)
        return reader.path, reader.backend, dict(reader._kwargs), kind
    return os.fspath(slide), "auto", {}, None


def _open_source(source):
    from ..io import open_slide

    path, backend, kwargs, _ = source
    return open_slide(path, backend=backend, **kwargs)


def _slide_of_source(source):
    from ..core.slide import SlideData

    path, backend, kwargs, kind = source
    return SlideData(path, backend=backend, mpp=kwargs.get("mpp"), slide_type=kind,
                     max_region_bytes=kwargs.get("max_region_bytes"))


class WSIPatchDataset(_Epochs, Dataset):
    """Patches read straight from slides, at a pyramid level or a target µm/px (no pre-extraction).

    Parameters
    ----------
    slides : sequence of str, os.PathLike, SlideData or reader
        Slide files (anything :func:`histoflow.open_slide` reads); a single one is one slide. A ``SlideData``
        or reader keeps its options in every worker (e.g. ``SlideData(path, mpp=0.25)`` for an image
        without a pixel size).
    coords : table, optional
        The patches, as level-0 **top-left** corners:

        - an ``(N, 3)`` integer array (or list of triples) of ``(slide index, x, y)``, or
        - a list of dicts with keys ``"slide"``, ``"x"``, ``"y"``; any other key is a per-patch label
          (every dict must have the same keys).

        None: every tissue tile of each slide, on a grid of ``patch_size`` (step ``stride``), found by the
        tissue pre-pass of the engine (:func:`histoflow.engine.tissue_prepass`: tissue detection on a
        thumbnail) and :class:`histoflow.core.grid.TileGrid`.
    patch_size : int or (int, int)
        Output patch (width, height) in pixels.
    level : int, optional
        Read at this pyramid level (default 0 unless ``mpp`` is given).
    mpp : float, optional
        Target pixel size in µm/px: patches are read from the coarsest level not coarser than it and
        resampled (area average when shrinking), exactly as :class:`~histoflow.core.grid.TileGrid` tiles
        are; a patch then covers ``patch_size * mpp / slide mpp`` level-0 pixels.
    labels : dict of str -> sequence, optional
        Labels returned with each patch: one value per patch (row of ``coords``), or, when ``coords`` is
        None, one value per slide (given to each of its patches, e.g. a slide's grade). Numbers (bool and
        int become int64) or strings.
    tissue_filter : float or False, optional
        With ``coords=None``: least fraction of tissue of a kept tile (default
        :data:`DEFAULT_TISSUE_FILTER` = 0.5); ``False``: no tissue detection, every tile of the grid.
        Not allowed with ``coords``.
    transform : callable, optional
        Called on the numpy sample before tensor conversion (see the module docs).
    stride : int or (int, int), optional
        Grid step in output pixels with ``coords=None`` (default ``patch_size``: no overlap).
    max_open_slides : int
        Readers kept open per process (least recently used are closed).

    Attributes
    ----------
    coords : (N, 3) int64 ndarray
        ``(slide index, x, y)`` of every patch.
    labels : dict of str -> ndarray
        One value per patch.

    Raises
    ------
    SlideNotFoundError, SlideReadError
        A slide is missing or unreadable (the message names it).
    RegionError
        ``mpp`` is given but a slide's pixel size is unknown, or the level does not exist.
    DatasetError
        Invalid coordinates or labels.

    Examples
    --------
    >>> ds = WSIPatchDataset(["a.svs", "b.svs"], patch_size=224, mpp=0.5,           # doctest: +SKIP
    ...                      labels={"grade": [1, 3]})
    >>> keys = [(int(ds.labels["grade"][i]), int(ds.coords[i, 0])) for i in range(len(ds))]  # doctest: +SKIP
    """

    def __init__(self, slides, coords=None, patch_size=256, level=None, mpp=None, labels=None,
                 tissue_filter=None, transform=None, *, stride=None, max_open_slides=16):
        if isinstance(slides, (str, os.PathLike)) or hasattr(slides, "read_region"):
            slides = [slides]
        # paths, readers or SlideData objects (whose options, e.g. mpp=..., the workers' readers keep)
        self._sources = [_slide_source(s) for s in slides]
        self.slides = [src[0] for src in self._sources]
        # a SlideData's own tissue mask chooses its patches (it was replaced by the automatic detection)
        given_tissue = [getattr(s, "masks", {}).get("tissue") if hasattr(s, "masks") else None for s in slides]
        if not self.slides:
            raise DatasetError("WSIPatchDataset: no slides given")
        self._files_key = _files_key(self.slides)
        if transform is not None and not callable(transform):
            raise DatasetError(f"WSIPatchDataset: transform must be callable, got {transform!r}")
        if coords is not None and tissue_filter is not None:
            raise DatasetError("WSIPatchDataset: tissue_filter applies only when coords is None (the dataset "
                               "lists the tissue tiles itself); filter your coordinates beforehand")
        if isinstance(max_open_slides, bool) or not isinstance(max_open_slides, (int, np.integer)) or \
                max_open_slides < 1:
            raise DatasetError(f"WSIPatchDataset: max_open_slides must be a whole number >= 1, got "
                               f"{max_open_slides!r}")
        if tissue_filter is not None and tissue_filter is not False and (
                isinstance(tissue_filter, bool) or not isinstance(tissue_filter, (int, float, np.number))
                or not 0.0 <= float(tissue_filter) <= 1.0):
            raise DatasetError(f"WSIPatchDataset: tissue_filter is the fraction of a patch that must be tissue, "
                               f"in [0, 1] (or False: every patch); got {tissue_filter!r}")
        self.patch_size = patch_size
        self.level = level
        self.mpp = mpp
        self.transform = transform
        self.max_open_slides = int(max_open_slides)
        self._geometry = []   # per slide: (level, read_size, size)
        tables, origins, extents, scales = [], [], [], []
        for s, path in enumerate(self.slides):
            slide = _slide_of_source(self._sources[s])
            try:
                if given_tissue[s] is not None:
                    slide.add_mask("tissue", given_tissue[s].stored(), given_tissue[s].downsample)
                grid = self._grid(slide, tissue_filter if coords is None else False, stride)
                spec = grid.spec(0, 0)
                self._geometry.append((spec.level, tuple(spec.read_size), tuple(spec.size)))
                ds = float(slide.levels[spec.level].downsample)
                extents.append((slide.dimensions, (spec.read_size[0] * ds, spec.read_size[1] * ds)))
                scales.append((grid.downsample, grid.level_downsample, grid.tile_size) if grid.resampled else None)
                if coords is None:
                    specs = list(grid)
                    xy = np.array([(t.x, t.y) for t in specs], np.int64).reshape(-1, 2)
                    tables.append(np.column_stack([np.full(len(xy), s, np.int64), xy]))
                    # resampled grids: each tile's place in the resampled level (read as the slide's tiles are)
                    origins.append(np.array([t.origin or (np.nan, np.nan) for t in specs], np.float64).reshape(-1, 2))
            finally:
                slide.close()
        self._scales = scales  # per slide: (output, level downsample, tile size) of a resampled grid, else None
        if coords is None:
            self.coords = np.concatenate(tables) if tables else np.zeros((0, 3), np.int64)
            # per patch: its output-pixel place in a resampled grid (NaN: read at a level as it is)
            self._origins = np.concatenate(origins) if origins else np.zeros((0, 2))
            per_slide = self.coords[:, 0]
            self.labels = {k: _label_array(k, v, len(self.slides), "slide")[per_slide]
                           for k, v in (labels or {}).items()}
        else:
            self.coords, patch_labels = _parse_coords(coords, len(self.slides))
            self._check_inside(extents)
            self._origins = _origins(self.coords, scales)
            self.labels = {k: _label_array(k, v, len(self.coords), "patch") for k, v in patch_labels.items()}
            for k, v in (labels or {}).items():
                if k in self.labels:
                    raise DatasetError(f"WSIPatchDataset: label {k!r} is given both in coords and in labels")
                self.labels[k] = _label_array(k, v, len(self.coords), "patch")
        self._readers = OrderedDict()
        self._pid = None

    def _check_inside(self, extents):
        """Refuse patches that miss their slide altogether (coordinates of another level or with x and y
        swapped would otherwise give blank patches); patches over an edge are read padded, as tiles are."""
        for s, ((w, h), (fw, fh)) in enumerate(extents):
            rows = np.flatnonzero(self.coords[:, 0] == s)
            x, y = self.coords[rows, 1], self.coords[rows, 2]
            out = rows[(x >= w) | (y >= h) | (x + fw <= 0) | (y + fh <= 0)]
            if out.size:
                i = int(out[0])
                raise DatasetError(f"{self.slides[s]}: patch {i} at level-0 (x={self.coords[i, 1]}, "
                                   f"y={self.coords[i, 2]}) lies outside the slide ({w} x {h} px at level 0); "
                                   f"{out.size} such patch(es). coords are level-0 pixels of the patch's top-left "
                                   "corner")

    def _grid(self, slide, tissue_filter, stride):
        """The TileGrid of a slide (tissue-filtered when asked), with the slide's path in any error."""
        try:
            mask, cover = None, 0.0
            if tissue_filter is not False:
                from ..engine import tissue_prepass

                if "tissue" not in slide.masks:  # the slide's own, else the automatic detection (as runs do)
                    if not slide.slide_type.brightfield:
                        raise DatasetError(f"{slide.path}: patches of tissue are found by detecting H&E-like tissue; "
                                           f"for a {slide.slide_type.name} slide give a SlideData with a slide mask "
                                           "named 'tissue' (slide.add_mask), the patches (coords=...), or "
                                           "tissue_filter=False for every patch")
                    tissue_prepass(slide)
                mask = "tissue"
                cover = DEFAULT_TISSUE_FILTER if tissue_filter is None else float(tissue_filter)
            return slide.grid(self.patch_size, stride=stride, level=self.level, mpp=self.mpp, mask=mask,
                              min_coverage=cover)
        except (RegionError, DatasetError) as e:
            msg = str(e)
            if msg.startswith(slide.path):
                raise
            raise type(e)(f"{slide.path}: {msg}") from None

    # ------------------------------------------------------------------ readers, one set per process
    def _reader(self, s: int):
        pid = os.getpid()
        if self._pid != pid:
            self._readers = OrderedDict()   # inherited through fork: dropped, never used
            self._pid = pid
        r = self._readers.get(s)
        if r is None:
            r = _open_source(self._sources[s])
            self._readers[s] = r
            while len(self._readers) > self.max_open_slides:
                _, old = self._readers.popitem(last=False)
                old.close()
        else:
            self._readers.move_to_end(s)
        return r

    def close(self):
        """Close this process's readers (they are reopened on the next access)."""
        if self._pid == os.getpid():
            for r in self._readers.values():
                r.close()
        self._readers = OrderedDict()
        self._pid = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_readers"] = OrderedDict()
        state["_pid"] = None
        return state

    # ------------------------------------------------------------------ Dataset
    def __len__(self) -> int:
        return len(self.coords)

    def read(self, i: int) -> dict:
        """The numpy sample of item ``i`` (before ``transform`` and tensor conversion)."""
        from ..core.slide import read_on_grid

        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"patch {i} out of range for a dataset of {n} patches")
        i = int(i) % n
        s, x, y = (int(v) for v in self.coords[i])
        level, read_size, size = self._geometry[s]
        reader = self._reader(s)
        if not np.isnan(self._origins[i, 0]):  # resampled to a target µm/px: the patch's window of the resampled
            scale = self._scales[s][0] / float(reader.levels[level].downsample)  # level, as the tiles are read
            image = read_on_grid(reader, level, tuple(self._origins[i]), scale, size)
        else:  # a level's own pixels
            image = reader.read_region((x, y), level, read_size)
        labels = {k: (v[i] if v.dtype != object else str(v[i])) for k, v in self.labels.items()}
        return {"image": image, "masks": {}, "labels": labels, "coords": np.array([x, y], np.int64),
                "index": i, "slide": s}

    def __getitem__(self, i) -> dict:
        sample = self.read(i)
        if self.transform is not None:
            sample = _transform(self, sample, i)
        return to_tensors(sample)

    def __repr__(self):
        where = f"mpp={self.mpp}" if self.mpp is not None else f"level={self.level or 0}"
        return (f"WSIPatchDataset({len(self.slides)} slide(s), {len(self)} patches of {self.patch_size}, "
                f"{where}, labels={sorted(self.labels)})")

"""Nucleus-centred patches: N x N crops around cell centroids, at a chosen µm/px, as a torch dataset.

From any slide or image (H&E, virtual H&E, fluorescence) and a table of centroids (level-0 pixels, e.g.
``adata.obsm["spatial"]``) with labels (e.g. ``adata.obs["phenotype"]``): each sample is the patch centred
on one cell, resampled from the slide's pixel size to ``mpp`` when given (the nucleus-subtype paper used
41 x 41 at 0.5 µm/px: ``patch_size=41, mpp=0.5``; by default 41 x 41 at the slide's own pixel size), scaled to
[0, 1]. Patches reaching past the slide are padded (white for brightfield, 0 otherwise). Every DataLoader
worker opens its own reader.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from ..errors import DatasetError
from .data import _Epochs, _files_key, _open_source, _slide_of_source, _slide_source, _transform

__all__ = ["NucleusPatchDataset"]


def _missing(v) -> bool:
    """Whether a label is a missing value (None, NaN, pandas' NA / NaT)."""
    if v is None:
        return True
    try:
        import pandas as pd

        return bool(pd.isna(v)) if np.ndim(v) == 0 else False
    except (ImportError, TypeError, ValueError):
        return isinstance(v, (float, np.floating)) and bool(np.isnan(v))


def _whole_numbers(values) -> bool:
    """Whether every value is a whole (finite, non-boolean) number: such labels are class ids as given."""
    vals = np.asarray(values, dtype=object).ravel()
    return all(isinstance(v, (int, np.integer, float, np.floating)) and not isinstance(v, (bool, np.bool_))
               and np.isfinite(float(v)) and float(v) == round(float(v)) for v in vals)


class NucleusPatchDataset(_Epochs, torch.utils.data.Dataset):
    """Patches centred on cells.

    Parameters
    ----------
    slide : str or SlideData
        The image the patches come from (any format :func:`histoflow.open_slide` reads).
    centroids : array (n, 2)
        Cell centres (x, y) in level-0 pixels.
    labels : sequence, optional
        One label per cell: integers (also as whole floats, e.g. a pandas column), or class names (mapped
        to 0..k-1 in sorted order, ``classes``).
    patch_size : int
        Patch side in pixels at ``mpp`` (as :class:`~histoflow.ml.data.WSIPatchDataset`'s; ``size=``, its
        earlier name, still works with a ``FutureWarning``).
    mpp : float, optional
        Pixel size of the patches in µm (default: the slide's own, no resampling).
    channels : list of int, optional
        Channels to keep (default: all; RGB for brightfield).
    transform : callable, optional
        Applied to the ``(patch_size, patch_size, c)`` numpy patch before conversion: a
        :class:`~histoflow.ml.augment.Compose` (seeded: each item's draw is reproducible, per epoch with
        ``set_epoch``, as in the other datasets), or any function of the array.
    percentile : float, optional
        Scale each channel by the slide's own ``percentile`` of it (taken once, from the slide's thumbnail of
        at most 1024 px, as :class:`~histoflow.transforms.VirtualHE` does) and clip to [0, 1], instead of the
        dtype's maximum: for fluorescence counts (a MIBI image's uint16 channels reach ~250 of 65,535, so
        dtype scaling gives patches of ~0.004 at most). Models trained so must be given tiles scaled alike.

    Samples: ``{"image": float32 (c, patch_size, patch_size) in [0, 1], "label": int64, "index": int}``.
    """

    def __init__(self, slide, centroids, labels=None, patch_size: int = 41, mpp: float | None = None,
                 channels=None, transform=None, percentile: float | None = None, *, size=None):
        self._source = _slide_source(slide)  # a SlideData's options (mpp=...) travel with it
        self.path = self._source[0]
        if size is not None:  # the earlier name
            if patch_size != 41:
                raise DatasetError(f"{self.path}: give patch_size= only (size= is its earlier name), not both")
            warnings.warn("NucleusPatchDataset(size=...) is now patch_size=..., as in WSIPatchDataset; size= will "
                          "be removed in a later release", FutureWarning, stacklevel=2)
            patch_size = size
        self._files_key = _files_key([self.path])
        if not os.path.exists(self.path):
            raise DatasetError(f"{self.path}: no such slide or image")
        try:
            c = np.asarray(centroids, np.float64)
        except (TypeError, ValueError):
            raise DatasetError(f"{self.path}: centroids must be numbers (x, y), one row per cell") from None
        if c.ndim == 1 and c.size == 2:
            c = c.reshape(1, 2)
        if c.ndim != 2 or c.shape[1] != 2:  # an (n, 3) table or (2, n) columns would be read as wrong pairs
            raise DatasetError(f"{self.path}: centroids must be an (n, 2) array of (x, y), got shape {c.shape}")
        if not np.all(np.isfinite(c)):
            raise DatasetError(f"{self.path}: centroids hold NaN or infinite values")
        self.centroids = c
        if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
            raise DatasetError(f"{self.path}: patch_size is the patch's side in pixels, a whole number >= 1; got "
                               f"{patch_size!r}")
        self.patch_size = int(patch_size)
        self.classes = None
        if labels is not None:
            # missing values looked for as given (numpy makes ["a", nan] the strings "a", "nan")
            gaps = [i for i, v in enumerate(np.asarray(labels, dtype=object).ravel()) if _missing(v)]
            labels = np.asarray(labels)
            if len(labels) != len(self.centroids):
                raise DatasetError(f"{self.path}: {len(labels)} labels for {len(self.centroids)} centroids")
            if gaps:  # would become a class of its own ("None", "nan") and renumber the others
                raise DatasetError(f"{self.path}: {len(gaps)} label(s) are missing (None / NaN), the first at "
                                   f"centroid {gaps[0]}; drop those cells or give them a class")
            if labels.dtype.kind in "iub":
                self.labels = labels.astype(np.int64)
            elif _whole_numbers(labels):  # floats or objects holding whole numbers (a pandas column): the ids
                self.labels = np.array([int(v) for v in labels.ravel()], np.int64)
            else:
                if any(isinstance(v, (float, np.floating)) for v in labels.ravel()):
                    raise DatasetError(f"{self.path}: labels are integers or class names, got fractional "
                                       f"numbers ({labels.ravel()[:5].tolist()} ...)")
                self.classes = sorted({str(v) for v in labels})
                index = {c: i for i, c in enumerate(self.classes)}
                self.labels = np.array([index[str(v)] for v in labels], np.int64)
        else:
            self.labels = None
        self.channels = channels  # checked against the slide's channels below (names become indices)
        self.transform = transform
        if percentile is not None and not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
            raise DatasetError(f"{self.path}: percentile must be a number in (0, 100], got {percentile!r}")
        self.percentile = percentile
        self.scales = None
        if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, (int, float, np.number))
                                or not np.isfinite(mpp) or mpp <= 0):
            raise DatasetError(f"{self.path}: mpp must be a positive number of µm per patch pixel, got {mpp!r}")
        with _slide_of_source(self._source) as s:
            self.slide_mpp = float(s.mpp[0]) if s.mpp else None
            self.brightfield = bool(s.slide_type.brightfield)
            self.dtype = np.dtype(s.reader.dtype)
            if channels is not None:  # names or indices, as elsewhere; a bad one named now, not at the first item
                from ..transforms.objects import find_channel

                names = list(s.reader.channel_names)
                picked = [channels] if isinstance(channels, (str, int, np.integer)) else list(channels)
                try:
                    self.channels = [find_channel(names, c) for c in picked]
                except KeyError as e:
                    raise DatasetError(f"{self.path}: channels: {e.args[0] if e.args else e}") from None
            if percentile is not None:  # per channel, of the channels the patches keep
                thumb = np.asarray(s.thumbnail(1024)).astype(np.float32)
                thumb = self._keep(thumb)
                self.scales = np.array([float(np.percentile(thumb[..., k], percentile)) or
                                        float(thumb[..., k].max()) or 1.0 for k in range(thumb.shape[2])], np.float32)
        if mpp is not None and self.slide_mpp is None:
            raise DatasetError(f"{self.path}: the slide's pixel size is unknown, so patches at {mpp} µm/px "
                               "cannot be made; open it with mpp=... or leave mpp=None")
        self.mpp = float(mpp) if mpp is not None else self.slide_mpp
        self.scale = 1.0 if mpp is None else self.mpp / self.slide_mpp  # level-0 px per patch px
        self._reader = None
        self._pid = None

    @property
    def size(self) -> int:
        """The earlier name of :attr:`patch_size` (with a ``FutureWarning``)."""
        warnings.warn("NucleusPatchDataset.size is now .patch_size, as in WSIPatchDataset; .size will be removed "
                      "in a later release", FutureWarning, stacklevel=2)
        return self.patch_size

    def __len__(self):
        return len(self.centroids)

    def _open(self):
        if self._reader is None or self._pid != os.getpid():
            self._reader = _open_source(self._source)
            self._pid = os.getpid()
        return self._reader

    def patch(self, i) -> np.ndarray:
        """The native-dtype ``(patch_size, patch_size, c)`` patch of cell ``i``."""
        from ..core.resample import resize

        r = self._open()
        cx, cy = self.centroids[i]
        span = max(1, int(round(self.patch_size * self.scale)))
        # the centroid's pixel (round half up, not to even) sits at the patch centre (span // 2)
        x0, y0 = int(np.floor(cx + 0.5)) - span // 2, int(np.floor(cy + 0.5)) - span // 2
        a = r.read_region((x0, y0), 0, (span, span))
        if span != self.patch_size:
            a = resize(a, (self.patch_size, self.patch_size))
        return self._keep(a)

    def _keep(self, a):
        """The channels the patches keep: ``channels``, else all (RGB for brightfield)."""
        if self.channels is not None:
            return a[..., list(self.channels)]
        if self.brightfield and a.shape[2] == 4:
            return a[..., :3]
        return a

    def __getitem__(self, i):
        a = self.patch(i)
        if self.transform is not None:
            from .augment import Compose

            if isinstance(self.transform, Compose):  # histoflow's augmentations take a sample
                a = np.asarray(_transform(self, {"image": a, "masks": {}}, i)["image"])
            else:
                a = self.transform(a)
        if self.scales is not None:
            x = np.clip(np.asarray(a, np.float32) / self.scales, 0, 1)
        else:
            x = np.asarray(a, np.float32) / (float(np.iinfo(a.dtype).max) if a.dtype.kind in "ui" else 1.0)
        out = {"image": torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))),
               "index": int(i)}
        if self.labels is not None:
            out["label"] = torch.tensor(self.labels[i])
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

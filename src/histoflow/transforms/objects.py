"""Objects found in tiles (nuclei, cells) and the tiles that own them.

When tiles overlap, every tile carries its :attr:`~histoflow.core.tile.Tile.core`: the part it owns. A
transform that finds objects keeps those whose centroid lies in the core, whole (pixels in the overlap
included), so an object on a tile border is found once, in one piece, by exactly one tile.
"""
from __future__ import annotations

import numpy as np

from ..errors import ChannelError, ParameterError

__all__ = ["keep_owned", "relabel_sequential", "find_channel", "check_labels"]

#: µm across a large nucleus: what a tile's overlap must hold whole (see ``Transform.min_overlap``)
LARGE_NUCLEUS_UM = 15.0


def check_labels(labels, what="labels"):
    """``labels`` as a label image of integers (0 = background, 1.. = objects), or a :class:`ParameterError`
    naming ``what`` and the problem.

    Unsigned and signed integers (none negative) pass as they are; floats holding whole numbers >= 0 (a label
    image saved as float; ids up to 2**31 - 1) become int64. A bool mask is refused: it has no object ids
    (label its objects first, e.g. with ``skimage.measure.label``), and reading it as one object would
    quietly measure the whole mask as one cell.
    """
    labels = np.asarray(labels)
    kind = labels.dtype.kind
    if kind == "u":
        return labels
    if kind == "i":
        low = labels.min() if labels.size else 0
        if low >= 0:
            return labels
        problem = f"it has negative values (down to {low})"
    elif kind == "f":
        ok = not labels.size or (np.isfinite(labels).all() and labels.min() >= 0 and
                                 labels.max() <= np.iinfo(np.int32).max and bool(np.all(labels == np.floor(labels))))
        if ok:
            return labels.astype(np.int64)
        problem = "it holds values that are not whole numbers from 0 to 2**31 - 1"
    elif kind == "b":
        problem = "a bool mask has no object ids: label its objects first (e.g. skimage.measure.label)"
    else:
        problem = "it is not numeric"
    raise ParameterError(f"{what}: a label image must hold non-negative integers (0 = background, 1.. = "
                         f"objects); got dtype {labels.dtype}: {problem}")


def relabel_sequential(labels, same_ids=None, what="labels"):
    """Labels renumbered 1..n in order of their old ids (int32), 0 stays background.

    With ``same_ids`` (a second label image using the same ids, e.g. the nuclei of cells) returns
    ``(labels, same_ids)``, both renumbered alike; ids of ``same_ids`` absent from ``labels`` become 0.
    ``what`` names ``labels`` in the error a label image of the wrong kind raises (see :func:`check_labels`).
    """
    labels = check_labels(labels, what)
    n = int(labels.max()) if labels.size else 0
    if n > 4 * labels.size + 65536:  # ids far above the object count (hashed, or from a global numbering):
        # sorted search, not a lookup table as long as the largest id (10**13 asked for 9 TiB)
        ids = present_ids(labels)
        out = _search(ids, labels)
        if same_ids is None:
            return out
        return out, _search(ids, check_labels(same_ids, f"{what}: same_ids"))
    present = np.zeros(n + 1, bool)
    present[labels.ravel()] = True
    present[0] = False
    k = int(present.sum())
    lut = np.zeros(n + 1, np.int32)
    lut[present] = np.arange(1, k + 1, dtype=np.int32)
    out = labels.astype(np.int32, copy=False) if k == n else lut[labels]  # already 1..n: nothing to do
    if same_ids is None:
        return out
    other = check_labels(same_ids, f"{what}: same_ids")
    other = np.where(other <= n, lut[np.minimum(other, n)], 0).astype(np.int32) if other.size else \
        other.astype(np.int32)
    return out, other


def present_ids(labels) -> np.ndarray:
    """The ids (> 0) of a checked label image, sorted, as int64."""
    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    if n > 4 * labels.size + 65536:
        ids = np.unique(labels)
    else:
        ids = np.flatnonzero(np.bincount(labels.ravel(), minlength=n + 1))
    ids = ids[ids > 0]
    # uint64 ids stay uint64 (hashed ids at or above 2**63 wrapped to negative numbers as int64)
    return ids if ids.dtype == np.uint64 else ids.astype(np.int64)


def _search(ids, labels):
    """``labels`` renumbered by their place in ``ids`` (1..), 0 where an id is not in ``ids``."""
    if labels.dtype != ids.dtype:  # the same integer type on both sides: numpy compares int64 with uint64 as
        labels = labels.astype(ids.dtype, copy=False)  # float64, which merges ids above 2**53
    pos = np.searchsorted(ids, labels)
    pos = np.minimum(pos, max(len(ids) - 1, 0))
    hit = (labels > 0) & (ids[pos] == labels) if len(ids) else np.zeros(labels.shape, bool)
    return np.where(hit, pos + 1, 0).astype(np.int32)


def keep_owned(labels, core, *, return_ids: bool = False, margin: float = 0.0):
    """Keep the objects of a label image whose centroid lies in ``core`` = (x0, y0, x1, y1) (tile pixels);
    renumber them 1..n. ``core=None`` keeps every object. ``margin`` (pixels) widens the core on every side:
    two tiles that outline one object a little differently can put its centroid each on the other's side of
    the split, and then neither kept it; with a margin both may keep it, and the one slide-wide picture keeps
    it once (:func:`histoflow.ml.infer.assemble_instances`).

    With ``return_ids=True`` also returns the old ids of the kept objects (in their new order), so that
    a second mask with the same ids (e.g. cells grown from nuclei) can be filtered alike.
    """
    from scipy import ndimage as ndi

    labels = check_labels(labels, "keep_owned: labels")
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        out = labels.astype(np.int32)
        return (out, np.zeros(0, np.int64)) if return_ids else out
    idx = np.arange(1, n + 1)
    ok = np.bincount(labels.ravel(), minlength=n + 1)[1:] > 0
    if core is not None and tuple(core) == (0, 0, labels.shape[1], labels.shape[0]):
        core = None  # the whole image: every centroid is in it, no need to compute them
    if core is not None:
        with np.errstate(invalid="ignore", divide="ignore"):  # ids absent from the image give NaN, dropped
            cy, cx = (np.asarray(c) for c in zip(*ndi.center_of_mass(np.ones(labels.shape, np.uint8), labels, idx)))
        x0, y0, x1, y1 = core
        if margin:
            x0, y0, x1, y1 = x0 - margin, y0 - margin, x1 + margin, y1 + margin
        with np.errstate(invalid="ignore"):
            ok &= np.isfinite(cx) & (cx >= x0 - 0.5) & (cx < x1 - 0.5) & (cy >= y0 - 0.5) & (cy < y1 - 0.5)
    lut = np.zeros(n + 1, np.int32)
    lut[idx[ok]] = np.arange(1, int(ok.sum()) + 1, dtype=np.int32)
    out = lut[labels]
    return (out, idx[ok]) if return_ids else out


def find_channel(names, channel) -> int:
    """Index of a channel by index, exact name, case-insensitive name, or name without a mass/wavelength
    suffix in parentheses (``"HH3"`` finds ``"HH3 (89)"``). Raises ``KeyError`` listing the channels."""
    names = [str(n) for n in names]
    if isinstance(channel, (int, np.integer)):
        if not -len(names) <= int(channel) < len(names):
            raise ChannelError(f"channel {channel} out of range: the image has {len(names)} channels {names}")
        return int(channel) % len(names)
    want = str(channel).strip().lower()
    exact = [i for i, n in enumerate(names) if n == channel]
    if len(exact) > 1:  # the same name twice: which plane is meant cannot be guessed
        raise ChannelError(f"channel {channel!r} names several channels (indices {exact} of {names}); give the "
                           "index of the one meant")
    if exact:
        return exact[0]
    from ..cells.gating import normalize_name

    loose = normalize_name(str(channel))
    for key, w in ((lambda n: n.strip().lower(), want), (lambda n: n.split("(")[0].strip().lower(), want),
                   (normalize_name, loose)):  # last: as rule tables match ("NaKATPase" finds "NaK ATPase")
        hits = [i for i, n in enumerate(names) if key(n) == w]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ChannelError(f"channel {channel!r} matches several channels: {[names[i] for i in hits]}; "
                               "give the full name")
    raise ChannelError(f"no channel {channel!r}; the channels are {names}")

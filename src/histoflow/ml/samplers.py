"""Samplers that balance training data by a hierarchy of keys (grade -> slide -> class -> patch).

A dataset of patches is rarely balanced: one slide may give a thousand patches and another twenty, one
class may dominate. :class:`HierarchicalSampler` draws as a tree walk instead: at each stage it picks
uniformly among the children present under the current node, and finally a uniform item of the leaf
reached. With keys ``(grade, slide, class_label)`` every grade is drawn equally often, every slide
equally often within its grade and every class equally often within its slide (the sampling of the
cascaded tumour-segmentation method: histological grade -> slide -> class label -> patch).
:class:`ClassBalancedSampler` is the one-stage case: uniform over classes, then within the class.

Both are :class:`torch.utils.data.Sampler` s of dataset indices: pass one as ``sampler=`` to a
:class:`torch.utils.data.DataLoader`. They are deterministic for a ``seed`` and an epoch; call
:meth:`HierarchicalSampler.set_epoch` at the start of each epoch to draw a new sequence.

Examples
--------
>>> keys = [("G1", "s1", "tumour")] * 1000 + [("G3", "s2", "tumour"), ("G3", "s2", "stroma"),
...                                          ("G3", "s3", "tumour")]
>>> sampler = HierarchicalSampler(keys, num_samples=8, seed=0)
>>> len(list(sampler))
8
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ..errors import HistoflowError

__all__ = ["SamplerError", "HierarchicalSampler", "ClassBalancedSampler", "Draw"]


class SamplerError(HistoflowError, ValueError):
    """A sampler got invalid keys, labels or sizes."""


def _key(key):
    """A key by value: numpy and torch scalars as Python ones, every NaN as one key (NaN != NaN, so each NaN
    would otherwise be a group of its own)."""
    if isinstance(key, np.generic) or (torch.is_tensor(key) and key.ndim == 0):
        key = key.item()
    if isinstance(key, float) and math.isnan(key):
        return _NAN
    return key


#: the one key of every NaN
_NAN = float("nan")


class Draw(int):
    """A dataset index drawn again in the same epoch: an ``int`` (the index) that also says how many times the
    sampler drew it before in this epoch (``repeat``, 1 for the second draw, ...).

    Balancing samplers draw rare items many times an epoch; histoflow's datasets seed a seeded augmentation
    with ``(seed, epoch, index, repeat)``, so each copy of a rare item is augmented differently (with the
    index alone every copy came out pixel for pixel the same). Any other dataset sees a plain index.
    """

    def __new__(cls, index, repeat):
        obj = super().__new__(cls, index)
        obj.repeat = int(repeat)
        return obj

    def __reduce__(self):  # across DataLoader worker queues with its repeat
        return (Draw, (int(self), self.repeat))

    # an offset index is the same draw: torch's ConcatDataset subtracts the sizes of the datasets before the
    # one an index falls in (``idx - cumulative_sizes[k - 1]``), which gave a plain int for every dataset
    # after the first, and so the same augmentation to each repeat of their rare items
    def __add__(self, other):
        if isinstance(other, (int, np.integer)) and not isinstance(other, bool):
            return Draw(int(self) + int(other), self.repeat)
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other):
        if isinstance(other, (int, np.integer)) and not isinstance(other, bool):
            return Draw(int(self) - int(other), self.repeat)
        return NotImplemented

    def __repr__(self):
        return f"Draw({int(self)}, repeat={self.repeat})"


def draws(indices) -> list:
    """The indices as a list of ints, the second and later occurrences of an index as :class:`Draw`."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_idx)) + 1]
    rank = np.arange(idx.size) - np.repeat(starts, np.diff(np.r_[starts, idx.size]))
    repeat = np.empty_like(rank)
    repeat[order] = rank
    return [int(i) if k == 0 else Draw(int(i), int(k)) for i, k in zip(idx.tolist(), repeat.tolist())]


class _Node:
    __slots__ = ("children", "order", "items")

    def __init__(self):
        self.children: dict = {}
        self.order: list = []  # child keys in order of first appearance (deterministic)
        self.items: list = []  # dataset indices (leaves only)


class HierarchicalSampler(Sampler):
    """Draw dataset indices by walking a tree of keys, uniformly at every stage.

    Parameters
    ----------
    keys : sequence of tuples
        One tuple per dataset item (item ``i`` is index ``i``), all of the same length: the item's keys
        from the top stage down, e.g. ``(grade, slide, class_label)``. Keys must be hashable; a key
        is only compared with the keys of its siblings, so ``("A", 1)`` and ``("B", 1)`` are different
        nodes. Use 1-tuples (or :class:`ClassBalancedSampler`) for a single stage.
    num_samples : int
        Indices drawn per epoch (``len(sampler)``).
    seed : int
        With the epoch, fixes the sequence.
    replacement : bool
        True: every choice is independent (children and items may repeat at once). False: at every node
        the children (and at a leaf its items) are drawn in rounds, each a fresh random permutation, so
        no child or item repeats before all of its siblings have been drawn; the proportions of each
        stage are then exact up to one round, and no patch is drawn twice while its leaf has unseen ones.

    Notes
    -----
    The probability of an item is the product of ``1 / (number of children)`` along its path, times
    ``1 / (number of items in its leaf)``. A dataset with a single child at some stage (one grade only)
    simply skips that stage.

    Examples
    --------
    >>> from torch.utils.data import DataLoader                          # doctest: +SKIP
    >>> keys = [(t.labels["grade"], slide_id, t.labels["class"]) for ...]  # doctest: +SKIP
    >>> sampler = HierarchicalSampler(keys, num_samples=10_000, seed=0)  # doctest: +SKIP
    >>> loader = DataLoader(dataset, batch_size=32, sampler=sampler)     # doctest: +SKIP
    >>> for epoch in range(10):                                          # doctest: +SKIP
    ...     sampler.set_epoch(epoch)
    ...     for batch in loader: ...
    """

    def __init__(self, keys: Sequence, num_samples: int, seed: int = 0, replacement: bool = True):
        who = type(self).__name__
        keys = list(keys)
        if not keys:
            raise SamplerError(f"{who}: keys is empty: there is nothing to sample")
        depth = None
        root = _Node()
        for i, k in enumerate(keys):
            if torch.is_tensor(k):
                k = k.tolist()
            if not isinstance(k, tuple):
                k = tuple(k) if isinstance(k, (list, np.ndarray)) else (k,)
            if depth is None:
                depth = len(k)
                if depth == 0:
                    raise SamplerError(f"{who}: keys must be non-empty tuples, item 0 has ()")
            elif len(k) != depth:
                raise SamplerError(f"{who}: every key tuple must have the same length; item 0 has {depth} "
                                   f"keys, item {i} has {len(k)}: {k!r}")
            node = root
            for key in k:
                key = _key(key)
                if not isinstance(key, Hashable):
                    raise SamplerError(f"{who}: item {i}: key {key!r} is not hashable")
                child = node.children.get(key)
                if child is None:
                    child = node.children[key] = _Node()
                    node.order.append(key)
                node = child
            node.items.append(i)
        if isinstance(num_samples, (bool, np.bool_)) or not isinstance(num_samples, (int, np.integer)) \
                or num_samples <= 0:
            raise SamplerError(f"{who}: num_samples must be a positive integer, got {num_samples!r}")
        self.depth = depth
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.replacement = bool(replacement)
        self.epoch = 0
        self.n_items = len(keys)
        self._root = root
        # flatten the tree: the nodes of each stage in a fixed order, their children as index ranges
        self._stages = []  # per stage: list of (children node list)
        level = [root]
        for _ in range(depth):
            self._stages.append([[n.children[k] for k in n.order] for n in level])
            level = [c for n in level for c in (n.children[k] for k in n.order)]
        self._leaves = [np.asarray(n.items, np.int64) for n in level]

    def set_epoch(self, epoch: int):
        """Use the sequence of ``epoch`` at the next iteration (call it at the start of each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def _choose(self, rng, n_choices, n_draws):
        """``n_draws`` choices among ``n_choices`` (independent, or in permutation rounds)."""
        if n_choices == 1:
            return np.zeros(n_draws, np.int64)
        if self.replacement:
            return rng.integers(0, n_choices, n_draws)
        rounds = -(-n_draws // n_choices)
        perms = rng.permuted(np.tile(np.arange(n_choices, dtype=np.int64), (rounds, 1)), axis=1)
        return perms.reshape(-1)[:n_draws]

    def indices(self) -> np.ndarray:
        """The ``num_samples`` dataset indices of the current epoch, as an int64 array."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, self.epoch & 0xFFFFFFFFFFFFFFFF])
        # visits[j]: the draws (positions in the output) that reached node j of the current stage
        visits = [np.arange(self.num_samples, dtype=np.int64)]
        for stage in self._stages:
            nxt = []
            for draws, children in zip(visits, stage):
                if not draws.size:
                    nxt.extend(np.zeros(0, np.int64) for _ in children)
                    continue
                choice = self._choose(rng, len(children), draws.size)
                order = np.argsort(choice, kind="stable")
                bounds = np.searchsorted(choice[order], np.arange(len(children) + 1))
                sorted_draws = draws[order]
                nxt.extend(sorted_draws[bounds[c]:bounds[c + 1]] for c in range(len(children)))
            visits = nxt
        out = np.empty(self.num_samples, np.int64)
        for draws, items in zip(visits, self._leaves):
            if draws.size:
                out[draws] = items[self._choose(rng, items.size, draws.size)]
        return out

    def __iter__(self):
        # an index drawn again in the epoch comes as a Draw (an int): seeded augmentations differ per copy
        return iter(draws(self.indices()))

    def __repr__(self):
        return (f"{type(self).__name__}({self.n_items} items, depth {self.depth}, "
                f"num_samples={self.num_samples}, seed={self.seed}, replacement={self.replacement}, "
                f"epoch={self.epoch})")


class ClassBalancedSampler(HierarchicalSampler):
    """Uniform over the classes present, then uniform within the class.

    Parameters
    ----------
    labels : sequence
        One hashable label per dataset item (a class id, a string, ...).
    num_samples : int
        Indices drawn per epoch.
    seed : int
    replacement : bool
        As for :class:`HierarchicalSampler`.

    Examples
    --------
    >>> s = ClassBalancedSampler(["a"] * 99 + ["b"], num_samples=1000, seed=1)
    >>> int((s.indices() == 99).sum()) > 400
    True
    """

    def __init__(self, labels: Sequence, num_samples: int, seed: int = 0, replacement: bool = True):
        if torch.is_tensor(labels) or isinstance(labels, np.ndarray):
            labels = labels.tolist()  # plain values: a tensor's items would each hash as their own object
        labels = list(labels)
        super().__init__([(lab,) for lab in labels], num_samples, seed=seed, replacement=replacement)

"""Stage-wise uniformity of the hierarchical and class-balanced samplers."""
from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare
from torch.utils.data import DataLoader, Dataset

from histoflow.ml.samplers import ClassBalancedSampler, HierarchicalSampler, SamplerError

N = 60_000
P_MIN = 1e-3


def _tree():
    """Grade A: one slide of 1000 patches of one class. Grade B: five slides of 2-50 patches with 1-3
    classes in unequal numbers. Items are shuffled so that indices carry no structure."""
    keys = [("A", "a1", "tumour")] * 1000
    slides_b = {
        "b1": {"tumour": 2},
        "b2": {"tumour": 30, "stroma": 3},
        "b3": {"tumour": 5, "stroma": 40, "necrosis": 2},
        "b4": {"stroma": 50},
        "b5": {"tumour": 1, "stroma": 2, "necrosis": 20},
    }
    for slide, classes in slides_b.items():
        for cls, n in classes.items():
            keys += [("B", slide, cls)] * n
    order = np.random.default_rng(123).permutation(len(keys))
    return [keys[i] for i in order], slides_b


def _uniform_p(counts: Counter):
    obs = np.array(list(counts.values()), float)
    return chisquare(obs).pvalue if len(obs) > 1 else 1.0


def test_hierarchical_stagewise_uniform():
    keys, slides_b = _tree()
    for replacement in (True, False):
        s = HierarchicalSampler(keys, N, seed=0, replacement=replacement)
        idx = s.indices()
        assert len(idx) == N == len(s) and idx.min() >= 0 and idx.max() < len(keys)
        drawn = [keys[i] for i in idx]
        grades = Counter(k[0] for k in drawn)
        assert set(grades) == {"A", "B"}
        assert abs(grades["A"] / N - 0.5) < 0.02 and _uniform_p(grades) > P_MIN
        slides = Counter(k[1] for k in drawn if k[0] == "B")
        assert set(slides) == set(slides_b)
        for sl in slides.values():
            assert abs(sl / grades["B"] - 0.2) < 0.02
        assert _uniform_p(slides) > P_MIN
        for slide, classes in slides_b.items():
            cls = Counter(k[2] for k in drawn if k[1] == slide)
            assert set(cls) == set(classes)
            for c in cls.values():
                assert abs(c / slides[slide] - 1 / len(classes)) < 0.03
            assert _uniform_p(cls) > P_MIN, (slide, cls)
        # within a leaf, patches are uniform: the 40 stroma patches of b3
        leaf = [i for i in idx if keys[i] == ("B", "b3", "stroma")]
        per_item = Counter(leaf)
        assert len(per_item) == 40 and _uniform_p(per_item) > P_MIN
        if not replacement:  # drawn in rounds: counts within a leaf differ by at most one
            assert max(per_item.values()) - min(per_item.values()) <= 1
            assert abs(slides["b1"] - slides["b4"]) <= 1


def test_hierarchical_is_not_uniform_over_items():
    """The check above can fail: plain uniform sampling of items gives grade A ~ 0.87, not 0.5."""
    keys, _ = _tree()
    idx = np.random.default_rng(0).integers(0, len(keys), N)
    grades = Counter(keys[i][0] for i in idx)
    assert _uniform_p(grades) < P_MIN and abs(grades["A"] / N - 0.5) > 0.2


def test_hierarchical_deterministic_and_epochs():
    keys, _ = _tree()
    a = HierarchicalSampler(keys, 500, seed=3)
    b = HierarchicalSampler(keys, 500, seed=3)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating again repeats the epoch
    assert list(HierarchicalSampler(keys, 500, seed=4)) != list(a)
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert second != first
    b.set_epoch(1)
    assert list(b) == second
    a.set_epoch(0)
    assert list(a) == first


def test_hierarchical_without_replacement_no_repeats_within_small_draws():
    keys = [("x", i % 3) for i in range(30)]  # 3 leaves of 10 items
    s = HierarchicalSampler(keys, 30, seed=1, replacement=False)
    idx = s.indices()
    assert sorted(idx.tolist()) == list(range(30))  # every item exactly once


class _Items(Dataset):
    def __len__(self):
        return 1050

    def __getitem__(self, i):
        return i


def test_sampler_in_dataloader():
    keys, _ = _tree()
    s = HierarchicalSampler(keys, 64, seed=0)
    got = [int(v) for batch in DataLoader(_Items(), batch_size=16, sampler=s) for v in batch]
    assert got == s.indices().tolist()


def test_class_balanced():
    rng = np.random.default_rng(5)
    labels = rng.choice([0, 1, 2, 3], size=3000, p=[0.85, 0.1, 0.04, 0.01])
    s = ClassBalancedSampler(labels, N, seed=2)
    idx = s.indices()
    counts = Counter(labels[idx].tolist())
    assert set(counts) == {0, 1, 2, 3}
    for c in counts.values():
        assert abs(c / N - 0.25) < 0.02
    assert _uniform_p(counts) > P_MIN
    rare = np.flatnonzero(labels == 3)
    per_item = Counter(i for i in idx.tolist() if labels[i] == 3)
    assert set(per_item) == set(rare.tolist()) and _uniform_p(per_item) > P_MIN
    assert list(ClassBalancedSampler(labels, 100, seed=2)) == list(ClassBalancedSampler(labels, 100, seed=2))
    strings = ClassBalancedSampler(["a"] * 99 + ["b"], 2000, seed=0)
    assert abs((strings.indices() == 99).mean() - 0.5) < 0.05


def test_errors():
    with pytest.raises(SamplerError, match="empty"):
        HierarchicalSampler([], 10)
    with pytest.raises(SamplerError, match="same length"):
        HierarchicalSampler([("a", 1), ("b",)], 10)
    with pytest.raises(SamplerError, match="num_samples"):
        HierarchicalSampler([("a",)], 0)
    with pytest.raises(SamplerError, match="hashable"):
        HierarchicalSampler([("a", [1])], 5)


def test_tensor_and_nan_labels_are_grouped_by_value():
    """A tensor of labels (a dataset's targets) and NaN keys group by value: 0-d tensors hash by identity and
    NaN != NaN, which made every item a class of its own (no balancing)."""
    import torch

    s = ClassBalancedSampler(torch.tensor([0] * 99 + [1]), num_samples=10_000, seed=0)
    assert 0.45 < (s.indices() == 99).mean() < 0.55
    s = ClassBalancedSampler(np.array([np.nan, np.nan, 1.0, 2.0]), num_samples=9_000, seed=0)
    share = np.bincount(s.indices(), minlength=4) / 9_000
    assert abs(share[:2].sum() - 1 / 3) < 0.03 and abs(share[2] - 1 / 3) < 0.03
    h = HierarchicalSampler(torch.tensor([[0, 1], [0, 2], [1, 1]]), num_samples=9_000, seed=0)
    share = np.bincount(h.indices(), minlength=3) / 9_000
    assert abs(share[2] - 0.5) < 0.03

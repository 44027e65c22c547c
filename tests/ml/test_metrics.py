"""Metrics: hand-computed tiny images, slow per-object reference implementations, and speed."""
import subprocess
import sys
import time

import numpy as np
import pytest
from skimage.draw import disk

from histoflow.ml.metrics import (aji, class_metrics, confusion_matrix, dice, instance_overlaps, iou,
                                  panoptic_quality, precision, recall, segmentation_summary, summarize)


def test_importable_without_torch():
    code = "import sys, histoflow.ml.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------- binary
def test_binary_metrics_by_hand():
    pred = np.array([[1, 1, 1, 0], [0, 0, 0, 0]])
    true = np.array([[0, 1, 1, 1], [1, 0, 0, 0]])
    # TP = 2, FP = 1, FN = 2
    assert dice(pred, true) == pytest.approx(4 / 7)
    assert iou(pred, true) == pytest.approx(2 / 5)
    assert precision(pred, true) == pytest.approx(2 / 3)
    assert recall(pred, true) == pytest.approx(2 / 4)


def test_dice_iou_relationship_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = rng.random((30, 40)) < rng.random()
        t = rng.random((30, 40)) < rng.random()
        d, j = dice(p, t), iou(p, t)
        assert j == pytest.approx(d / (2 - d))
        assert d == pytest.approx(2 * j / (1 + j))
        assert j <= d + 1e-12
        # Dice is the harmonic mean of precision and recall
        pr, rc = precision(p, t), recall(p, t)
        if pr + rc > 0:
            assert d == pytest.approx(2 * pr * rc / (pr + rc))


def test_binary_empty_cases():
    z = np.zeros((4, 4), bool)
    one = z.copy()
    one[1, 1] = True
    assert np.isnan(dice(z, z)) and np.isnan(iou(z, z))
    assert dice(z, z, zero_division=1.0) == 1.0
    assert dice(z, one) == 0.0 and iou(one, z) == 0.0
    assert np.isnan(precision(z, one)) and recall(z, one) == 0.0
    assert precision(one, z) == 0.0 and np.isnan(recall(one, z))
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        dice(z, np.zeros((4, 5)))


def test_summarize_and_segmentation_summary():
    assert summarize([0.5, 0.7, np.nan]) == (pytest.approx(0.6), pytest.approx(np.std([0.5, 0.7], ddof=1)))
    assert summarize([0.5, 0.7], ddof=0)[1] == pytest.approx(0.1)
    m, s = summarize([0.3])
    assert m == 0.3 and np.isnan(s)
    assert all(np.isnan(summarize([np.nan, np.nan])))
    rng = np.random.default_rng(1)
    preds = [rng.random((16, 16)) < 0.5 for _ in range(5)]
    trues = [rng.random((16, 16)) < 0.4 for _ in range(5)]
    preds.append(np.zeros((8, 8), bool))  # both empty: Dice undefined, left out
    trues.append(np.zeros((8, 8), bool))
    out = segmentation_summary(preds, trues)
    assert set(out) == {"dice", "iou", "precision", "recall"}
    d = [dice(p, t) for p, t in zip(preds[:5], trues[:5])]
    assert out["dice"] == (pytest.approx(np.mean(d)), pytest.approx(np.std(d, ddof=1)))
    r = [recall(p, t) for p, t in zip(preds[:5], trues[:5])]
    assert out["recall"][0] == pytest.approx(np.mean(r))
    with pytest.raises(ValueError, match="image 1"):
        segmentation_summary([np.zeros((2, 2)), np.zeros((2, 2))], [np.zeros((2, 2)), np.zeros((3, 2))])


# ------------------------------------------------------------------------------------------ classes
def test_confusion_matrix_matches_sklearn():
    from sklearn.metrics import confusion_matrix as sk_cm
    rng = np.random.default_rng(2)
    t = rng.integers(0, 4, 500)
    p = np.where(rng.random(500) < 0.6, t, rng.integers(0, 4, 500))
    cm = confusion_matrix(t, p, 4)
    assert np.array_equal(cm, sk_cm(t, p, labels=range(4)))
    assert cm[1, 2] == np.sum((t == 1) & (p == 2))  # rows true, columns predicted
    assert confusion_matrix(t, p, 6).shape == (6, 6)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        confusion_matrix(t, p, 3)
    with pytest.raises(ValueError, match=r"\(500,\).*\(499,\)"):
        confusion_matrix(t, p[:-1], 4)
    from histoflow.errors import ParameterError

    for names in (["tumour", "stroma"], np.array(["tumour", "stroma"], object)):  # a bare numpy TypeError before
        with pytest.raises(ParameterError, match=r"y_true must hold integer class ids 0..1, got dtype .*map class "
                                                 r"names to ids first"):
            confusion_matrix(names, [0, 1], 2)
    numbers = np.array([0, 1.0, 2], dtype=object)  # numbers in an object array (a pandas column) are numbers
    assert confusion_matrix(numbers, np.array([0, 1, 1]), 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]


def test_class_metrics_on_known_matrix():
    cm = np.array([[50, 10], [5, 35]])  # rows true, columns predicted
    m = class_metrics(cm)
    # class 1: TP 35, FN 5, FP 10, TN 50
    assert m["ppv"][1] == pytest.approx(35 / 45)
    assert m["npv"][1] == pytest.approx(50 / 55)
    assert m["sensitivity"][1] == pytest.approx(35 / 40)
    assert m["specificity"][1] == pytest.approx(50 / 60)
    assert m["prevalence"][1] == pytest.approx(40 / 100)
    assert m["f1"][1] == pytest.approx(70 / 85)
    assert m["accuracy"][1] == pytest.approx(85 / 100)
    # class 0 is the mirror image
    assert m["ppv"][0] == pytest.approx(50 / 55) and m["npv"][0] == pytest.approx(35 / 45)
    assert m["sensitivity"][0] == pytest.approx(50 / 60) and m["specificity"][0] == pytest.approx(35 / 40)
    assert list(m["support"]) == [60, 40]


def test_class_metrics_multiclass_matches_sklearn_and_zero_division():
    from sklearn.metrics import precision_recall_fscore_support
    rng = np.random.default_rng(3)
    t = rng.integers(0, 3, 300)
    p = np.where(rng.random(300) < 0.5, t, rng.integers(0, 3, 300))
    m = class_metrics(confusion_matrix(t, p, 3))
    pr, rc, f1, sup = precision_recall_fscore_support(t, p, labels=range(3), zero_division=0)
    assert np.allclose(m["ppv"], pr) and np.allclose(m["sensitivity"], rc) and np.allclose(m["f1"], f1)
    assert np.array_equal(m["support"], sup)
    spec = [np.sum((t != k) & (p != k)) / np.sum(t != k) for k in range(3)]
    assert np.allclose(m["specificity"], spec)
    # a class never predicted nor present: undefined PPV/sensitivity
    m = class_metrics(np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]]))
    assert np.isnan(m["ppv"][2]) and np.isnan(m["sensitivity"][2]) and m["specificity"][2] == 1.0
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        class_metrics(np.zeros((2, 3)))


# ---------------------------------------------------------------------------------------- instances
def _tiny():
    """2 ground-truth nuclei, 3 predictions.

    G1 = row 0, cols 0-3 (4 px); G2 = rows 2, cols 0-3 (4 px)
    S1 = row 0, cols 0-2 (3 px)            -> IoU(G1, S1) = 3/4
    S2 = (0, 3) and (1, 3) (2 px)          -> IoU(G1, S2) = 1/5
    S4 = rows 2-3, cols 0-1 (4 px)         -> IoU(G2, S4) = 2/6
    """
    true = np.zeros((5, 6), np.int32)
    true[0, 0:4] = 1
    true[2, 0:4] = 2
    pred = np.zeros((5, 6), np.int32)
    pred[0, 0:3] = 1
    pred[0:2, 3] = 2
    pred[2:4, 0:2] = 4
    return true, pred


def test_aji_and_pq_on_tiny_images_by_hand():
    true, pred = _tiny()
    # AJI: G1 -> S1 (C 3, U 4); G2 -> S4 (C 2, U 6); S2 unused (U + 2)
    assert aji(true, pred) == pytest.approx(5 / 12)
    # PQ at 0.5: one match (G1, S1; IoU 3/4); FP = S2, S4; FN = G2
    pq, counts = panoptic_quality(true, pred, return_counts=True)
    assert counts == {"tp": 1, "fp": 2, "fn": 1}
    assert pq.dq == pytest.approx(1 / 2.5)
    assert pq.sq == pytest.approx(0.75)
    assert pq.pq == pytest.approx(0.3)
    dq, sq, p = pq  # a plain triple too
    assert p == pytest.approx(dq * sq)
    # at 0.3 the (G2, S4) pair of IoU 1/3 matches too
    pq3 = panoptic_quality(true, pred, match_iou=0.3)
    assert pq3.dq == pytest.approx(2 / 2.5)
    assert pq3.sq == pytest.approx((0.75 + 1 / 3) / 2)


def test_aji_prediction_shared_by_two_nuclei():
    true = np.zeros((3, 5), np.int32)
    true[0, 0:2] = 1
    true[0, 3:5] = 2
    pred = np.zeros((3, 5), np.int32)
    pred[0, :] = 9  # one prediction over both nuclei
    pred[2, 0] = 3  # a false positive
    # G1 -> S9 (C 2, U 5), G2 -> S9 (C 2, U 5); S3 unused (U + 1)
    assert aji(true, pred) == pytest.approx(4 / 11)
    assert panoptic_quality(true, pred) == (0.0, 0.0, 0.0)


def test_identical_permuted_and_empty():
    true = _random_labels(64, 25, seed=5)
    assert aji(true, true) == 1.0
    assert tuple(panoptic_quality(true, true)) == (1.0, 1.0, 1.0)
    pred = _random_labels(64, 25, seed=6)
    a, q = aji(true, pred), panoptic_quality(true, pred)
    assert 0 < a < 1 and 0 < q.pq < 1
    # relabel the prediction with a random permutation of large, non-contiguous ids
    rng = np.random.default_rng(7)
    ids = np.unique(pred)[1:]
    lut = np.zeros(pred.max() + 1, np.int64)
    lut[ids] = rng.permutation(np.arange(1, ids.size + 1)) * 1_000_003
    relabelled = lut[pred]
    assert aji(true, relabelled) == pytest.approx(a, rel=1e-12)
    assert tuple(panoptic_quality(true, relabelled)) == pytest.approx(tuple(q), rel=1e-12)
    # the same through the np.unique path (labels beyond the bincount range)
    huge = np.where(relabelled > 0, relabelled + 2 ** 40, 0)
    assert aji(true, huge) == pytest.approx(a, rel=1e-12)
    empty = np.zeros_like(true)
    assert aji(true, empty) == 0.0
    assert tuple(panoptic_quality(true, empty)) == (0.0, 0.0, 0.0)
    assert np.isnan(aji(empty, empty)) and np.isnan(panoptic_quality(empty, empty).pq)
    with pytest.raises(ValueError, match=r"\(64, 64\).*\(64, 63\)"):
        aji(true, true[:, 1:])
    with pytest.raises(ValueError, match="integer"):
        aji(true.astype(float), true)


# slow references: one object at a time, full images ------------------------------------------------
def _aji_slow(true, pred):
    tids = [i for i in np.unique(true) if i]
    pids = [j for j in np.unique(pred) if j]
    used = set()
    c = u = 0
    for i in tids:
        g = true == i
        best = None
        for j in pids:
            s = pred == j
            inter = int(np.sum(g & s))
            if inter == 0:
                continue
            uni = int(np.sum(g | s))
            key = (inter / uni, -j)   # ties: the lowest label (HoVer-Net's get_fast_aji, the MoNuSeg code)
            if best is None or key > best[0]:
                best = (key, j, inter, uni)
        if best is None:
            u += int(g.sum())
        else:
            c += best[2]
            u += best[3]
            used.add(best[1])
    for j in pids:
        if j not in used:
            u += int(np.sum(pred == j))
    return c / u


def _pq_slow(true, pred):
    tids = [i for i in np.unique(true) if i]
    pids = [j for j in np.unique(pred) if j]
    ious = []
    for i in tids:
        for j in pids:
            inter = np.sum((true == i) & (pred == j))
            iou_ = inter / np.sum((true == i) | (pred == j))
            if iou_ > 0.5:
                ious.append(iou_)
    tp = len(ious)
    fp, fn = len(pids) - tp, len(tids) - tp
    dq = tp / (tp + fp / 2 + fn / 2)
    sq = sum(ious) / tp if tp else 0.0
    return dq, sq, dq * sq


def _random_labels(size, n, seed, rmin=3, rmax=9):
    """Overlapping random discs (later ones paint over earlier ones), like a crowded nucleus image."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.int32)
    for k in range(1, n + 1):
        rr, cc = disk((rng.integers(0, size), rng.integers(0, size)), rng.integers(rmin, rmax), shape=img.shape)
        img[rr, cc] = k
    return img


@pytest.mark.parametrize("seed", range(6))
def test_aji_and_pq_against_slow_reference(seed):
    true = _random_labels(48, 15, seed)
    # predictions: a jittered copy of the truth with merges, splits, misses and false positives
    rng = np.random.default_rng(100 + seed)
    pred = np.roll(true, (rng.integers(-2, 3), rng.integers(-2, 3)), axis=(0, 1)) * 3
    pred[pred == 3 * rng.integers(1, 16)] = 0                      # a missed nucleus
    pred[:, 20:22][pred[:, 20:22] > 0] += 1                        # a split strip
    extra = _random_labels(48, 4, 200 + seed) + 1000
    pred = np.where((pred == 0) & (extra > 1000), extra, pred)     # false positives
    assert aji(true, pred) == pytest.approx(_aji_slow(true, pred), rel=1e-12)
    assert tuple(panoptic_quality(true, pred)) == pytest.approx(_pq_slow(true, pred), rel=1e-12)
    other = _random_labels(48, 15, seed + 50)
    assert aji(true, other) == pytest.approx(_aji_slow(true, other), rel=1e-12)
    assert tuple(panoptic_quality(true, other)) == pytest.approx(_pq_slow(true, other), rel=1e-12)


def test_instance_overlaps_table():
    true, pred = _tiny()
    ov = instance_overlaps(true, pred)
    assert list(ov.true_labels) == [1, 2] and list(ov.pred_labels) == [1, 2, 4]
    assert list(ov.true_area) == [4, 4] and list(ov.pred_area) == [3, 2, 4]
    pairs = {(int(ov.true_labels[i]), int(ov.pred_labels[j])): int(n)
             for i, j, n in zip(ov.true_index, ov.pred_index, ov.intersection)}
    assert pairs == {(1, 1): 3, (1, 2): 1, (2, 4): 2}
    assert sorted(np.round(ov.iou, 6)) == sorted(np.round([3 / 4, 1 / 5, 2 / 6], 6))


def test_instance_metrics_are_fast_on_a_crowded_1000px_image():
    true = _random_labels(1000, 1100, seed=11, rmin=6, rmax=14)
    pred = np.roll(true, (2, -3), axis=(0, 1))
    pred[::97] = 0  # some damage
    assert np.unique(true).size > 1000
    t0 = time.perf_counter()
    a = aji(true, pred)
    q = panoptic_quality(true, pred)
    elapsed = time.perf_counter() - t0
    assert 0.3 < a < 1 and 0.3 < q.pq < 1
    assert elapsed < 1.0, f"AJI + PQ took {elapsed:.2f} s on a 1000 x 1000 image"


def test_aji_ties_go_to_the_lowest_label_and_any_integer_type_works():
    """Equal IoUs went to the larger intersection (AJI 0.2857 here); HoVer-Net's get_fast_aji and the MoNuSeg
    MATLAB code take the first, lowest-label prediction (0.125). And uint64 labels reach np.bincount as intp
    (numpy < 2.2.4 refuses uint64 there)."""
    true = np.zeros((2, 6), np.int32)
    true[0, :] = 1
    pred = np.zeros((2, 6), np.int32)
    pred[0, :2] = 1                      # IoU 2/6
    pred[0, 2:], pred[1, :] = 2, 2       # IoU 4/12: the same
    assert aji(true, pred) == pytest.approx(2 / 16)   # C = 2, U = 6 + the unused prediction 2's 10
    assert aji(true, pred) == pytest.approx(_aji_slow(true, pred))
    t = np.array([[1, 1, 0, 2, 2], [1, 1, 0, 2, 2], [0, 0, 0, 0, 3]])
    p = np.array([[5, 5, 5, 0, 0], [5, 5, 0, 9, 9], [0, 0, 0, 9, 0]])
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64, np.int64):
        assert aji(t.astype(dt), p.astype(dt)) == pytest.approx(6 / 11)
        assert panoptic_quality(t.astype(dt), p.astype(dt)).pq == pytest.approx(0.32)


def test_binary_metrics_refuse_probability_maps():
    """A probability map counted every p > 0 as foreground (dice = 0.5 below); floats must be 0/1 masks."""
    from histoflow.errors import ParameterError
    prob, true = np.array([0.2, 0.9, 0.1, 0.0]), np.array([0, 1, 0, 0])
    for f in (dice, iou, precision, recall):
        with pytest.raises(ParameterError, match="threshold"):
            f(prob, true)
        with pytest.raises(ParameterError, match="true must be a binary mask"):
            f(true, prob)
    with pytest.raises(ParameterError, match="threshold"):
        dice(np.array([np.nan, 1.0, 0.0, 0.0]), true)
    with pytest.raises(ParameterError, match="threshold"):
        segmentation_summary([prob], [true])
    # thresholded first it is fine; bool, integer (non-zero = foreground) and 0/1 float masks all agree
    assert dice(prob > 0.5, true) == 1.0
    ref = dice(np.array([True, True, False, False]), true.astype(bool))
    assert ref == pytest.approx(2 / 3)
    for p in (np.array([1, 1, 0, 0]), np.array([7, 3, 0, 0], np.uint8), np.array([1.0, 1.0, 0.0, 0.0], np.float32)):
        assert dice(p, true.astype(np.float64)) == ref
    assert iou(np.ones(3), np.ones(3)) == 1.0 and np.isnan(dice(np.zeros(0), np.zeros(0)))

"""Evaluation metrics for segmentation, classification and nucleus instance segmentation.

Pure numpy (this module never imports torch), so it can score results anywhere.

* Binary masks, per image: :func:`dice`, :func:`iou`, :func:`precision`, :func:`recall`; over a list
  of images: :func:`segmentation_summary` (macro mean and SD, via :func:`summarize`).
* Classes: :func:`confusion_matrix` and :func:`class_metrics` (PPV, NPV, prevalence, sensitivity,
  specificity, F1 and accuracy per class, one class against the rest).
* Instances (label images, 0 = background): :func:`aji` (aggregated Jaccard index, Kumar et al. 2017)
  and :func:`panoptic_quality` (DQ, SQ, PQ; Kirillov et al. 2019), both built on the sparse table of
  pairwise intersections from :func:`instance_overlaps`, computed with one pass over the pixels
  (no per-instance loops over the image).

Undefined ratios (0 / 0, e.g. the Dice of two empty masks) return ``zero_division`` (NaN unless
given), and :func:`summarize` leaves NaN out of the mean and SD.
"""
from __future__ import annotations

import numbers
from typing import Dict, NamedTuple, Sequence, Tuple

import numpy as np

from ..errors import ParameterError

__all__ = [
    "dice", "iou", "precision", "recall", "summarize", "segmentation_summary",
    "confusion_matrix", "class_metrics",
    "InstanceOverlaps", "instance_overlaps", "aji", "PanopticQuality", "panoptic_quality",
]


def _ratio(num: float, den: float, zero_division: float) -> float:
    return float(num) / float(den) if den > 0 else float(zero_division)


def _binary_pair(pred, true) -> Tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    true = np.asarray(true)
    if pred.shape != true.shape:
        raise ParameterError(f"pred shape {pred.shape} does not match true shape {true.shape}")
    for name, a in (("pred", pred), ("true", true)):
        # a probability map would count every p > 0 as foreground: refuse floats other than 0 and 1
        if a.size and not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            if not np.all((a == 0) | (a == 1)):
                raise ParameterError(f"{name} must be a binary mask (bool, integer, or float 0/1), got {a.dtype} "
                                     "values other than 0 and 1; threshold a probability map first "
                                     "(e.g. prob > 0.5)")
    return pred.astype(bool, copy=False), true.astype(bool, copy=False)


def _counts(pred, true) -> Tuple[int, int, int]:
    """(TP, FP, FN) pixel counts of two binary masks (non-zero = foreground; floats must be 0 or 1)."""
    p, t = _binary_pair(pred, true)
    tp = int(np.count_nonzero(p & t))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp


def dice(pred, true, zero_division: float = np.nan) -> float:
    """Dice coefficient ``2 |P & T| / (|P| + |T|)`` of two binary masks (non-zero = foreground).

    Masks are bool, integer (non-zero = foreground) or float holding only 0 and 1; a probability map
    is refused (threshold it first), as are those of :func:`iou`, :func:`precision` and :func:`recall`.
    Returns ``zero_division`` when both masks are empty.

    Examples
    --------
    >>> dice([1, 1, 0, 0], [1, 0, 1, 0])
    0.5
    """
    tp, fp, fn = _counts(pred, true)
    return _ratio(2 * tp, 2 * tp + fp + fn, zero_division)


def iou(pred, true, zero_division: float = np.nan) -> float:
    """Intersection over union (Jaccard) ``|P & T| / |P | T|`` of two binary masks.

    ``iou = dice / (2 - dice)``. Returns ``zero_division`` when both masks are empty.

    Examples
    --------
    >>> iou([1, 1, 0, 0], [1, 0, 1, 0])  # doctest: +ELLIPSIS
    0.333...
    """
    tp, fp, fn = _counts(pred, true)
    return _ratio(tp, tp + fp + fn, zero_division)


def precision(pred, true, zero_division: float = np.nan) -> float:
    """Pixel precision ``|P & T| / |P|``; ``zero_division`` when the prediction is empty."""
    tp, fp, _ = _counts(pred, true)
    return _ratio(tp, tp + fp, zero_division)


def recall(pred, true, zero_division: float = np.nan) -> float:
    """Pixel recall (sensitivity) ``|P & T| / |T|``; ``zero_division`` when the truth is empty."""
    tp, _, fn = _counts(pred, true)
    return _ratio(tp, tp + fn, zero_division)


def summarize(values, ddof: int = 1) -> Tuple[float, float]:
    """``(mean, sd)`` of ``values``, ignoring NaN.

    The SD is the sample standard deviation (``ddof=1``) unless told otherwise; it is NaN when fewer
    than ``ddof + 1`` values are finite, and both are NaN when none is.

    Examples
    --------
    >>> summarize([0.5, 0.7, float("nan")])  # doctest: +ELLIPSIS
    (0.6, 0.1414...)
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    mean = float(v.mean())
    sd = float(v.std(ddof=ddof)) if v.size > ddof else float("nan")
    return mean, sd


_BINARY = {"dice": dice, "iou": iou, "precision": precision, "recall": recall}


def segmentation_summary(preds: Sequence, trues: Sequence,
                         metrics: Sequence[str] = ("dice", "iou", "precision", "recall"),
                         zero_division: float = np.nan, ddof: int = 1) -> Dict[str, Tuple[float, float]]:
    """Macro mean and SD of per-image binary metrics over a list of images.

    Each metric is computed per image pair, then summarised with :func:`summarize` (images where the metric is
    undefined, e.g. both masks empty, are left out unless ``zero_division`` gives them a value).

    Returns
    -------
    dict
        ``{metric: (mean, sd)}`` for each name in ``metrics``.
    """
    preds, trues = list(preds), list(trues)
    if len(preds) != len(trues):
        raise ParameterError(f"{len(preds)} predictions but {len(trues)} ground-truth masks")
    unknown = [m for m in metrics if m not in _BINARY]
    if unknown:
        raise ParameterError(f"unknown metrics {unknown}; choose from {sorted(_BINARY)}")
    per_image = {m: [] for m in metrics}
    for i, (p, t) in enumerate(zip(preds, trues)):
        p, t = np.asarray(p), np.asarray(t)
        if p.shape != t.shape:
            raise ParameterError(f"image {i}: pred shape {p.shape} does not match true shape {t.shape}")
        for m in metrics:
            per_image[m].append(_BINARY[m](p, t, zero_division=zero_division))
    return {m: summarize(v, ddof=ddof) for m, v in per_image.items()}


# --------------------------------------------------------------------------------------------------
# classes
# --------------------------------------------------------------------------------------------------
def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """``(n_classes, n_classes)`` int64 counts: rows are true classes, columns predicted classes.

    Examples
    --------
    >>> confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], 3)
    array([[1, 0, 0],
           [0, 1, 1],
           [0, 0, 1]])
    """
    def numeric(a):  # numbers in an object array (a pandas column) as numbers; class names stay, refused below
        a = np.asarray(a)
        if a.size and a.dtype == object and all(isinstance(v, numbers.Real) for v in a.ravel()):
            return a.astype(np.float64)
        return a

    t, p = numeric(y_true), numeric(y_pred)
    if t.shape != p.shape:
        raise ParameterError(f"y_true shape {t.shape} does not match y_pred shape {p.shape}")
    n_classes = int(n_classes)
    if n_classes < 1:
        raise ParameterError(f"n_classes must be >= 1, got {n_classes}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and a.dtype.kind not in "biuf":  # class names (str, object): np.mod raised a bare TypeError
            raise ParameterError(f"{name} must hold integer class ids 0..{n_classes - 1}, got dtype {a.dtype} "
                                 f"({a.ravel()[:3].tolist()} ...); map class names to ids first")
        if a.size and not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            if not np.all(np.equal(np.mod(a, 1), 0)):
                raise ParameterError(f"{name} must hold integer class labels, got dtype {a.dtype}")
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ParameterError(f"{name} labels must lie in [0, {n_classes - 1}], got range "
                                 f"[{a.min()}, {a.max()}]")
    t = t.astype(np.int64, copy=False).ravel()
    p = p.astype(np.int64, copy=False).ravel()
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def class_metrics(cm, zero_division: float = np.nan) -> Dict[str, np.ndarray]:
    """Per-class metrics from a confusion matrix (rows true, columns predicted), one class vs the rest.

    With ``TP, FP, FN, TN`` the one-vs-rest counts of class ``k`` and ``n`` the total:

    ========================  ================================
    ``ppv`` (precision)       TP / (TP + FP)
    ``npv``                   TN / (TN + FN)
    ``prevalence``            (TP + FN) / n
    ``sensitivity`` (recall)  TP / (TP + FN)
    ``specificity``           TN / (TN + FP)
    ``f1``                    2 TP / (2 TP + FP + FN)
    ``accuracy``              (TP + TN) / n
    ``support``               TP + FN (int)
    ========================  ================================

    Returns a dict of ``(n_classes,)`` arrays; undefined ratios are ``zero_division``. The overall
    accuracy is ``np.trace(cm) / cm.sum()``.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ParameterError(f"confusion matrix must be square (K, K), got shape {cm.shape}")
    if np.any(cm < 0):
        raise ParameterError("confusion matrix counts must be >= 0")
    cm = cm.astype(np.float64)
    n = cm.sum()
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = n - tp - fp - fn

    def div(a, b):
        out = np.full(a.shape, float(zero_division))
        ok = b > 0
        out[ok] = a[ok] / b[ok]
        return out

    total = np.full(tp.shape, n)
    return {
        "ppv": div(tp, tp + fp),
        "npv": div(tn, tn + fn),
        "prevalence": div(tp + fn, total),
        "sensitivity": div(tp, tp + fn),
        "specificity": div(tn, tn + fp),
        "f1": div(2 * tp, 2 * tp + fp + fn),
        "accuracy": div(tp + tn, total),
        "support": (tp + fn).astype(np.int64),
    }


# --------------------------------------------------------------------------------------------------
# instances
# --------------------------------------------------------------------------------------------------
class InstanceOverlaps(NamedTuple):
    """Sparse pairwise overlap table of two label images (see :func:`instance_overlaps`).

    Instances are renumbered ``0 .. n-1`` in the order of their original labels.
    """

    true_labels: np.ndarray    # (n_true,) original labels of the ground-truth instances
    pred_labels: np.ndarray    # (n_pred,) original labels of the predicted instances
    true_area: np.ndarray      # (n_true,) pixel counts
    pred_area: np.ndarray      # (n_pred,) pixel counts
    true_index: np.ndarray     # (n_pairs,) index into true_labels of each overlapping pair
    pred_index: np.ndarray     # (n_pairs,) index into pred_labels
    intersection: np.ndarray   # (n_pairs,) pixels in both

    @property
    def union(self) -> np.ndarray:
        return self.true_area[self.true_index] + self.pred_area[self.pred_index] - self.intersection

    @property
    def iou(self) -> np.ndarray:
        return self.intersection / self.union


def _compact(labels: np.ndarray, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids 0..n with 0 = background, original labels of 1..n, areas of 1..n) for a flat label array."""
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ParameterError(f"{name} must be an integer label image, got dtype {labels.dtype}")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if labels.size == 0:
        e = np.zeros(0, np.int64)
        return labels.astype(np.int64), e, e
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ParameterError(f"{name} labels must be >= 0 (0 is background), got minimum {lo}")
    if hi <= 4 * labels.size + 65536:
        # as intp: numpy < 2.2.4 refuses uint64 in bincount
        counts = np.bincount(labels.ravel().astype(np.intp, copy=False), minlength=hi + 1)
        present = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(hi + 1, dtype=np.int64)
        lut[present] = np.arange(1, present.size + 1)
        return lut[labels], present.astype(np.int64), counts[present].astype(np.int64)
    uniq, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inv = inv.reshape(labels.shape).astype(np.int64)
    if uniq[0] != 0:  # no background: shift so that ids start at 1
        return inv + 1, uniq.astype(np.int64), counts.astype(np.int64)
    return inv, uniq[1:].astype(np.int64), counts[1:].astype(np.int64)


def instance_overlaps(true, pred) -> InstanceOverlaps:
    """Pairwise intersections of the instances of two label images (0 = background).

    One pass over the pixels: both images are renumbered to compact ids, the pixels that are
    foreground in both are coded as one integer per (true, pred) pair, and the pair counts are taken
    with ``np.bincount`` (or ``np.unique`` when the pair space is large). Only pairs that overlap are
    listed, so memory stays proportional to the number of touching pairs.
    """
    t = np.asarray(true)
    p = np.asarray(pred)
    if t.shape != p.shape:
        raise ParameterError(f"true shape {t.shape} does not match pred shape {p.shape}")
    t = t.ravel()
    p = p.ravel()
    tid, tlab, tarea = _compact(t, "true")
    pid, plab, parea = _compact(p, "pred")
    both = (tid > 0) & (pid > 0)
    nt, npr = tlab.size, plab.size
    code = (tid[both] - 1) * npr + (pid[both] - 1)
    if code.size and nt * npr <= max(4 * code.size, 1 << 22):
        counts = np.bincount(code, minlength=nt * npr)
        code = np.flatnonzero(counts)
        inter = counts[code]
    else:
        code, inter = np.unique(code, return_counts=True)
    ti, pi = np.divmod(code, max(npr, 1))
    return InstanceOverlaps(tlab, plab, tarea, parea, ti.astype(np.int64), pi.astype(np.int64),
                            inter.astype(np.int64))


def aji(true, pred, zero_division: float = np.nan) -> float:
    """Aggregated Jaccard index (Kumar et al., IEEE TMI 2017) of two instance label images.

    Every ground-truth instance ``G_i`` is paired with the predicted instance ``S_j`` of largest IoU
    (exact ties, which the paper leaves open: the lowest label; HoVer-Net's ``get_fast_aji`` divides by ``union +
    1e-6`` and so prefers the larger of two equal IoUs, e.g. 4/12 over 2/6); ``C`` sums ``|G_i & S_j|``
    and ``U`` sums ``|G_i | S_j|`` over these pairs (a prediction may serve several ground-truth instances, as
    in the original definition). A ground-truth instance that overlaps no prediction adds ``|G_i|`` to ``U``;
    every prediction never chosen adds its area to ``U``. ``AJI = C / U``.

    Parameters
    ----------
    true, pred : numpy.ndarray
        Integer label images of the same shape; 0 is background, labels need not be contiguous.
    zero_division : float
        Returned when both images are empty.

    Examples
    --------
    >>> t = np.array([[1, 1, 0, 2, 2]]); p = np.array([[3, 3, 3, 0, 0]])
    >>> aji(t, p)  # C = 2; U = 3 (G1 with S3) + 2 (G2 unmatched)
    0.4
    """
    ov = instance_overlaps(true, pred)
    nt, npr = ov.true_labels.size, ov.pred_labels.size
    if nt == 0 and npr == 0:
        return float(zero_division)
    inter = ov.intersection
    union = ov.union
    # best pair per ground-truth instance: sort by (true asc, IoU desc, pred asc)
    iou_ = inter / union
    order = np.lexsort((ov.pred_index, -iou_, ov.true_index))
    first = np.ones(order.size, dtype=bool)
    ts = ov.true_index[order]
    first[1:] = ts[1:] != ts[:-1]
    best = order[first]
    c = int(inter[best].sum())
    u = int(union[best].sum())
    matched_true = np.zeros(nt, dtype=bool)
    matched_true[ov.true_index[best]] = True
    used_pred = np.zeros(npr, dtype=bool)
    used_pred[ov.pred_index[best]] = True
    u += int(ov.true_area[~matched_true].sum()) + int(ov.pred_area[~used_pred].sum())
    return _ratio(c, u, zero_division)


class PanopticQuality(NamedTuple):
    """Detection quality, segmentation quality and panoptic quality (``pq = dq * sq``)."""

    dq: float
    sq: float
    pq: float


def panoptic_quality(true, pred, match_iou: float = 0.5, zero_division: float = np.nan,
                     return_counts: bool = False):
    """Panoptic quality of instance segmentation (Kirillov et al., CVPR 2019).

    A ground-truth and a predicted instance match when their IoU exceeds ``match_iou``; at 0.5 or
    above the matching is unique by construction. Below 0.5 the pairs are chosen among those above
    ``match_iou`` by maximum total IoU (Hungarian assignment; HoVer-Net's evaluation assigns over all pairs
    first and drops those below the threshold afterwards, which can keep fewer or other matches). With ``TP``
    matches of IoUs ``iou_k``:

    ``DQ = TP / (TP + FP/2 + FN/2)``, ``SQ = mean(iou_k)`` (0 without matches), ``PQ = DQ * SQ``.

    Parameters
    ----------
    true, pred : numpy.ndarray
        Integer label images of the same shape; 0 is background.
    match_iou : float
        IoU threshold in ``(0, 1)`` (strictly greater matches).
    zero_division : float
        DQ, SQ and PQ when both images are empty.
    return_counts : bool
        Also return ``{"tp": ..., "fp": ..., "fn": ...}``.

    Returns
    -------
    PanopticQuality
        ``(dq, sq, pq)``, a named tuple.

    Examples
    --------
    >>> t = np.array([[1, 1, 1, 0, 2]]); p = np.array([[5, 5, 0, 0, 0]])
    >>> panoptic_quality(t, p)  # one match of IoU 2/3, one missed  # doctest: +ELLIPSIS
    PanopticQuality(dq=0.666..., sq=0.666..., pq=0.444...)
    """
    if not 0.0 < match_iou < 1.0:
        raise ParameterError(f"match_iou must lie in (0, 1), got {match_iou}")
    ov = instance_overlaps(true, pred)
    nt, npr = ov.true_labels.size, ov.pred_labels.size
    if nt == 0 and npr == 0:
        z = float(zero_division)
        res = PanopticQuality(z, z, z)
        return (res, {"tp": 0, "fp": 0, "fn": 0}) if return_counts else res
    iou_ = ov.iou
    keep = iou_ > match_iou
    ti, pi, iou_k = ov.true_index[keep], ov.pred_index[keep], iou_[keep]
    if match_iou < 0.5 and iou_k.size:
        from scipy.optimize import linear_sum_assignment
        from scipy.sparse import coo_matrix

        # only the instances that take part in some candidate pair enter the assignment
        ut, ti_c = np.unique(ti, return_inverse=True)
        up, pi_c = np.unique(pi, return_inverse=True)
        cost = coo_matrix((-iou_k, (ti_c, pi_c)), shape=(ut.size, up.size)).toarray()
        rows, cols = linear_sum_assignment(cost)
        vals = -cost[rows, cols]
        ok = vals > match_iou
        iou_k = vals[ok]
    tp = int(iou_k.size)
    fp = npr - tp
    fn = nt - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou_k.sum() / tp) if tp else 0.0
    res = PanopticQuality(float(dq), sq, float(dq * sq))
    return (res, {"tp": tp, "fp": fp, "fn": fn}) if return_counts else res

"""Patient-level cross-validation folds: no patient in two folds, classes balanced across folds.

The nucleus-subtype paper evaluates with five folds split by patient; :func:`patient_folds` does that
with scikit-learn's ``StratifiedGroupKFold`` (groups = patients, stratified by the cell classes).
"""
from __future__ import annotations

import numpy as np

from .gating import CellsError

__all__ = ["patient_folds"]


def patient_folds(labels, patients, n_splits: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` (train indices, test indices) pairs, grouped by patient and stratified by label.

    Parameters
    ----------
    labels : sequence
        One class per cell (or patch).
    patients : sequence
        One patient id per cell; all cells of a patient fall in the same test fold.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if isinstance(n_splits, bool) or not isinstance(n_splits, (int, np.integer)) or n_splits < 2:
        raise CellsError(f"patient_folds: n_splits must be a whole number >= 2 (a test fold and the rest), "
                         f"got {n_splits!r}")
    # (a pandas categorical keeps its missing values as None or NaN as an object array)
    labels = np.asarray(labels, dtype=object) if str(getattr(labels, "dtype", "")) == "category" else np.asarray(labels)
    patients = np.asarray(patients)
    if labels.ndim != 1 or patients.ndim != 1 or labels.shape != patients.shape:
        raise CellsError(f"patient_folds: labels and patient ids are one value per cell; got shapes {labels.shape} "
                         f"and {patients.shape}")

    def gaps(a):
        return [i for i, v in enumerate(a.tolist()) if v is None or (isinstance(v, float) and v != v)]

    for what, a in (("patient id", patients), ("label", labels)):
        missing = gaps(a)
        if missing:  # (a missing label was scikit-learn's "Got 'unknown' instead", naming no labels)
            raise CellsError(f"patient_folds: {len(missing)} cells have no {what} (the first: item {missing[0]}); "
                             "every cell needs one")
    patients = patients.astype(str) if patients.dtype == object else patients
    n_patients = len(np.unique(patients))
    if n_patients < n_splits:
        raise CellsError(f"patient_folds: {n_splits} folds need at least {n_splits} patients, got {n_patients}")
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in cv.split(np.zeros(len(labels)), labels, patients)]

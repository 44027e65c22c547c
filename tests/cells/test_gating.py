"""Marker positivity: Otsu / GMM on log intensities, manual thresholds per slide, edge cases, errors."""
import math
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest

from histoflow.cells import CellsError, GatingWarning, gate, gating_table
from histoflow.cells.gating import threshold_gmm_log, threshold_otsu_log
from histoflow.errors import HistoflowError


def bimodal(rng, n, frac_high, lo=(3.0, 0.35), hi=(5.5, 0.35)):
    """Log-normal intensities: a low (negative) and a high (positive) population, and the truth."""
    truth = rng.random(n) < frac_high
    logs = np.where(truth, rng.normal(hi[0], hi[1], n), rng.normal(lo[0], lo[1], n))
    return np.exp(logs), truth


def table(columns, slides=None, **obs):
    X = np.stack(list(columns.values()), axis=1).astype(np.float32)
    n = X.shape[0]
    df = pd.DataFrame(index=[f"c{i}" for i in range(n)])
    if slides is not None:
        df["slide"] = slides
    for k, v in obs.items():
        df[k] = v
    ad = anndata.AnnData(X, obs=df)
    ad.var_names = list(columns)
    return ad


@pytest.mark.parametrize("method", ["otsu", "gmm"])
@pytest.mark.parametrize("frac_high", [0.5, 0.2])
def test_automatic_thresholds_separate_two_log_normal_modes(method, frac_high):
    rng = np.random.default_rng(7)
    v, truth = bimodal(rng, 5000, frac_high)
    ad = table({"CD3": v, "CD8": v[::-1].copy()}, slides=["s1"] * len(v))
    pos = gate(ad, method=method)
    assert pos is ad.layers["positive"] and pos.dtype == bool and pos.shape == (5000, 2)
    acc = (pos[:, 0] == truth).mean()
    assert acc > 0.95, acc
    assert (pos[:, 1] == truth[::-1]).mean() > 0.95
    t = gating_table(ad).loc["s1", "CD3"]
    # the threshold is in native units, between the two modes, and positivity is exactly value > t
    assert math.exp(3.0) < t < math.exp(5.5)
    np.testing.assert_array_equal(pos[:, 0], ad.X[:, 0] > t)
    g = ad.uns["gating"]
    assert g["method"] == method and g["log"] is True and g["channels"] == ["CD3", "CD8"] and g["ungated"] == []
    assert gating_table(ad, "sources").loc["s1"].to_dict() == {"CD3": method, "CD8": method}
    assert g["slides"] == ["s1"] and g["thresholds"].shape == (1, 2) and g["thresholds"][0, 0] == t


def test_gmm_threshold_is_the_half_posterior_point():
    # equal weights and variances: the 0.5-posterior point is the midpoint of the means (on the log scale)
    rng = np.random.default_rng(0)
    logs = np.concatenate([rng.normal(2.0, 0.3, 20000), rng.normal(4.0, 0.3, 20000)])
    t = threshold_gmm_log(np.expm1(logs))
    assert abs(np.log1p(t) - 3.0) < 0.05
    # unequal variances: a broad low mode pushes the crossing towards the narrow high mode
    logs = np.concatenate([rng.normal(2.0, 0.8, 20000), rng.normal(5.0, 0.2, 20000)])
    t = np.log1p(threshold_gmm_log(np.expm1(logs)))
    assert 3.5 < t < 5.0
    assert threshold_otsu_log(np.full(10, 3.0)) == math.inf and threshold_gmm_log(np.full(10, 3.0)) == math.inf
    # without log, thresholds are found on the raw values
    raw = np.concatenate([rng.normal(100, 5, 1000), rng.normal(200, 5, 1000)])
    truth = np.arange(2000) >= 1000
    for t in (threshold_otsu_log(raw, log=False), threshold_gmm_log(raw, log=False)):
        assert 105 < t < 195 and ((raw > t) == truth).mean() > 0.99
    assert 140 < threshold_gmm_log(raw, log=False) < 160          # equal modes: the midpoint


def test_automatic_thresholds_are_per_slide():
    rng = np.random.default_rng(3)
    a, ta = bimodal(rng, 3000, 0.3)
    b, tb = bimodal(rng, 3000, 0.3)
    b = b * 8.0                                   # slide 2 is eight times brighter: one global cut would fail
    ad = table({"CD3": np.concatenate([a, b])}, slides=["s1"] * 3000 + ["s2"] * 3000)
    pos = gate(ad, method="otsu")[:, 0]
    truth = np.concatenate([ta, tb])
    assert (pos == truth).mean() > 0.95
    th = gating_table(ad)
    assert th.loc["s2", "CD3"] > 4 * th.loc["s1", "CD3"]


def test_manual_thresholds_per_channel_and_per_slide():
    v = np.array([1, 5, 10, 20, 1, 5, 10, 20], dtype=float)
    ad = table({"CD3": v, "CD8": v * 2}, slides=["a"] * 4 + ["b"] * 4)
    pos = gate(ad, method="manual", thresholds={"CD3": 7, "CD8": 7, "b": {"CD3": 15}})
    np.testing.assert_array_equal(pos[:, 0], [0, 0, 1, 1, 0, 0, 0, 1])      # slide b uses 15
    np.testing.assert_array_equal(pos[:, 1], [0, 1, 1, 1, 0, 1, 1, 1])      # 7 everywhere
    assert gating_table(ad).to_dict(orient="index") == {"a": {"CD3": 7.0, "CD8": 7.0}, "b": {"CD3": 15.0, "CD8": 7.0}}
    # strictly greater: a value equal to the threshold is negative
    np.testing.assert_array_equal(gate(ad, method="manual", thresholds={"CD3": 10, "CD8": 10})[:, 0],
                                  [0, 0, 0, 1, 0, 0, 0, 1])
    # only per-slide thresholds
    pos = gate(ad, method="manual", thresholds={"a": {"CD3": 4, "CD8": 100}, "b": {"CD3": 12, "CD8": 0}})
    np.testing.assert_array_equal(pos[:, 0], [0, 1, 1, 1, 0, 0, 0, 1])
    np.testing.assert_array_equal(pos[:, 1], [0, 0, 0, 0, 1, 1, 1, 1])
    # slide ids that are not strings are matched by their text
    ad.obs["slide"] = [1] * 4 + [2] * 4
    pos = gate(ad, method="manual", thresholds={1: {"CD3": 4}, 2: {"CD3": 12}}, channels=["CD3"])
    np.testing.assert_array_equal(pos[:, 0], [0, 1, 1, 1, 0, 0, 0, 1])


def test_manual_threshold_overrides_automatic_for_one_channel():
    rng = np.random.default_rng(1)
    v, truth = bimodal(rng, 2000, 0.4)
    ad = table({"CD3": v, "CD45": v}, slides=["s"] * 2000)
    pos = gate(ad, method="otsu", thresholds={"CD45": 1e9})
    assert (pos[:, 0] == truth).mean() > 0.95 and not pos[:, 1].any()
    assert gating_table(ad, "sources").loc["s"].to_dict() == {"CD3": "otsu", "CD45": "manual"}


def test_constant_channel_gets_no_positives_and_a_warning():
    rng = np.random.default_rng(2)
    v, _ = bimodal(rng, 500, 0.5)
    ad = table({"CD3": v, "Empty": np.zeros(500), "Flat": np.full(500, 7.0)}, slides=["s"] * 500)
    for method in ("otsu", "gmm"):
        with pytest.warns(GatingWarning) as record:
            pos = gate(ad, method=method)
        assert sorted(str(w.message).split(" is constant")[0] for w in record) == ["channel 'Empty'", "channel 'Flat'"]
        assert all("slide 's'" in str(w.message) for w in record)
        assert not pos[:, 1].any() and not pos[:, 2].any() and pos[:, 0].any()
        assert gating_table(ad).loc["s", "Empty"] == math.inf


def test_channels_subset_layer_and_no_slides():
    rng = np.random.default_rng(4)
    v, truth = bimodal(rng, 1000, 0.5)
    ad = table({"CD3": v, "CD8": v, "DAPI": v}, slides=["s"] * 1000)
    ad.layers["median"] = ad.X * 0 + np.float32(1)
    ad.layers["median"][:, 1] = v
    pos = gate(ad, channels=["cd-8"], layer="median", by=None)       # loose name match
    assert not pos[:, [0, 2]].any() and (pos[:, 1] == truth).mean() > 0.95
    g = ad.uns["gating"]
    assert g["channels"] == ["CD8"] and g["ungated"] == ["CD3", "DAPI"] and g["layer"] == "median"
    assert list(gating_table(ad).index) == ["all"] and list(gating_table(ad).columns) == ["CD8"]


def test_nan_intensities_are_never_positive():
    rng = np.random.default_rng(5)
    v, truth = bimodal(rng, 1000, 0.5)
    v[:10] = np.nan
    ad = table({"CD3": v}, slides=["s"] * 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pos = gate(ad)[:, 0]
    assert not pos[:10].any() and (pos[10:] == truth[10:]).mean() > 0.95


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="kmeans"), "unknown gating method 'kmeans'"),
    (dict(method="manual", thresholds={"CD3": 1}), "no threshold is given for channel 'CD8' on slide 'a'"),
    (dict(method="manual", thresholds={"FOXP3": 1}), "unknown channel 'FOXP3'.*channels: CD3, CD8"),
    (dict(method="manual", thresholds={"zz": {"CD3": 1}}), "unknown slide 'zz'.*slides: a, b"),
    (dict(method="manual", thresholds={"a": {"FOXP3": 1}}), "unknown channel 'FOXP3' \\(slide 'a'\\)"),
    (dict(thresholds={"CD3": "high"}), "not a number"),
    (dict(thresholds=[1, 2]), "must be a mapping"),
    (dict(channels=["CD4"]), "cannot gate unknown channel 'CD4'"),
    (dict(channels=["CD3"], thresholds={"CD8": 1}), "not among the gated channels"),
    (dict(by="patient"), "no column 'patient'.*by=None"),
    (dict(layer="max"), "layer 'max' is not in the cell table"),
])
def test_errors_are_clear(kwargs, match):
    ad = table({"CD3": np.arange(8.0), "CD8": np.arange(8.0)}, slides=["a"] * 4 + ["b"] * 4)
    with pytest.raises(CellsError, match=match) as e:
        gate(ad, **kwargs)
    assert isinstance(e.value, HistoflowError) and isinstance(e.value, ValueError)
    assert "positive" not in ad.layers and "gating" not in ad.uns


def test_negative_values_need_log_false():
    ad = table({"CD3": np.array([-1.0, 0, 5, 6, 50, 60])}, slides=["s"] * 6)
    with pytest.raises(CellsError, match="negative intensities.*log=False"):
        gate(ad)
    pos = gate(ad, log=False)[:, 0]
    np.testing.assert_array_equal(pos, [0, 0, 0, 0, 1, 1])
    # manual thresholds never need logs
    np.testing.assert_array_equal(gate(ad, method="manual", thresholds={"CD3": -0.5})[:, 0], [0, 1, 1, 1, 1, 1])
    # nor does a channel with a manual threshold among automatic ones (it used to be refused)
    ad = table({"zscored": np.array([-1.0, 0, 1, 2, 3, 4]), "CD8": np.array([1.0, 1.2, 1.1, 40, 50, 60])},
               slides=["s"] * 6)
    pos = gate(ad, thresholds={"zscored": 0.0})
    np.testing.assert_array_equal(pos[:, 0], [0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(pos[:, 1], [0, 0, 0, 1, 1, 1])


def test_gating_survives_h5ad_with_slashes_in_channel_names(tmp_path):
    """Channel names such as "CD45/PTPRC" are common; keyed by name, HDF5 would read the "/" as a group path
    and the thresholds would come back nested. Rules read the reloaded gating too."""
    from histoflow.cells import RuleTable

    rng = np.random.default_rng(5)
    v, truth = bimodal(rng, 2000, 0.4)
    ad = table({"CD45/PTPRC": v, "Pan-CK": v[::-1].copy()}, slides=["s/1"] * 1000 + ["s2"] * 1000)
    gate(ad, method="otsu", thresholds={"s2": {"Pan-CK": 5.0}})
    before = gating_table(ad)
    path = tmp_path / "cells.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # anndata warns about keys with "/" (and will refuse them)
        ad.write_h5ad(path)
    back = anndata.read_h5ad(path)
    pd.testing.assert_frame_equal(gating_table(back), before)
    assert list(before.columns) == ["CD45/PTPRC", "Pan-CK"] and list(before.index) == ["s/1", "s2"]
    src = gating_table(back, "sources")
    assert src.loc["s2", "Pan-CK"] == "manual" and src.loc["s/1", "Pan-CK"] == "otsu"
    rules = RuleTable([{"assign": "Immune", "when": "CD45"}], aliases={"CD45": ["CD45/PTPRC"]})
    counts = rules.apply(back)
    assert counts["Immune"] == int(back.layers["positive"][:, 0].sum()) > 0


def test_gating_table_reads_the_older_layout_and_refuses_ungated_tables():
    ad = table({"CD3": np.arange(10.0)}, slides=["a"] * 10)
    with pytest.raises(CellsError, match="has not been gated"):
        gating_table(ad)
    ad.uns["gating"] = {"thresholds": {"a": {"CD3": 4.0}}, "sources": {"a": {"CD3": "manual"}}}
    assert gating_table(ad).loc["a", "CD3"] == 4.0 and gating_table(ad, "sources").loc["a", "CD3"] == "manual"
    with pytest.raises(CellsError, match="what must be"):
        gating_table(ad, "values")

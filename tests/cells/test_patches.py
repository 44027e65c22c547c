"""Virtual H&E, nucleus-centred patches and patient-level folds, on the real MIBI and CMU-1 images."""
import numpy as np
import pytest
import torch
from datafiles import SVS, data_path

from histoflow import open_slide
from histoflow.cells import CellsError, patient_folds
from histoflow.core.slide import SlideData
from histoflow.errors import DatasetError
from histoflow.ml.patches import NucleusPatchDataset
from histoflow.transforms.multiplex import SegmentNuclei, VirtualHE

MIBI = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")


def test_virtual_he_colours_nuclei_purple_and_background_white():
    with SlideData(MIBI) as s:
        v = VirtualHE(eosin_channels=["PanKeratin", "Vimentin", "SMA", "Membrane"])
        v.fit_slide(s)
        image = s.reader.read_region((0, 0), 0, (512, 512))
        seg = SegmentNuclei()
        seg.fit_slide(s)
        nuc = seg.F(image, s.mpp[0])
    rgb = v.F(image)
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    inside, outside = rgb[nuc > 0].astype(float), rgb[nuc == 0].astype(float)
    # nuclei: dark and blue-purple (blue above green); elsewhere much lighter
    assert inside.mean() < outside.mean() - 30
    assert inside[:, 2].mean() > inside[:, 1].mean() + 20
    empty = np.zeros((8, 8, 22), np.uint16)
    assert (v.F(empty) == 255).all()  # no signal -> white glass


def test_nucleus_patches_at_a_target_mpp(tmp_path):
    with open_slide(SVS) as r:
        mpp = r.mpp[0]
        ref = r.read_region((1000 - 20, 1500 - 20), 0, (41, 41))
    ds = NucleusPatchDataset(SVS, [[1000.4, 1500.2], [5, 5]], labels=["tumour", "stroma"], patch_size=41)
    assert ds.classes == ["stroma", "tumour"] and len(ds) == 2
    s = ds[0]
    assert s["image"].shape == (3, 41, 41) and s["label"].item() == 1
    np.testing.assert_allclose(s["image"].numpy().transpose(1, 2, 0) * 255, ref[..., :3], atol=1e-3)
    # a cell near the corner: padded with white glass
    assert ds[1]["image"][:, 0, 0].min() == 1.0
    # at 0.25 µm/px the 41 px patch spans half the level-0 width (twice the resolution)
    fine = NucleusPatchDataset(SVS, [[1000, 1500]], patch_size=41, mpp=mpp / 2)
    assert fine.scale == pytest.approx(0.5)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 41, 41)
    with pytest.raises(DatasetError, match="no such slide"):
        NucleusPatchDataset(tmp_path / "none.svs", [[0, 0]])
    with pytest.raises(DatasetError, match="2 labels for 1 centroids"):
        NucleusPatchDataset(SVS, [[0, 0]], labels=[1, 2])


def test_patient_folds_keep_patients_apart():
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(12), 50)
    labels = rng.integers(0, 4, len(patients))
    folds = patient_folds(labels, patients, n_splits=5)
    assert len(folds) == 5
    seen = np.concatenate([te for _, te in folds])
    assert sorted(seen) == list(range(len(labels)))          # every cell tested once
    for tr, te in folds:
        assert not set(patients[tr]) & set(patients[te])     # no patient on both sides
        assert len(np.unique(labels[te])) == 4               # every class in every fold
    with pytest.raises(CellsError, match="at least 5 patients"):
        patient_folds([0, 1, 0], [1, 1, 2])
    # a missing label was scikit-learn's "Got 'unknown' instead"; 2-D labels said "60 labels but 60 patient ids"
    import pandas as pd

    gap = labels.astype(object)
    gap[7] = None
    for bad in (gap, pd.Series(pd.Categorical(np.where(np.arange(600) == 9, None, labels.astype(str))))):
        with pytest.raises(CellsError, match=r"patient_folds: 1 cells have no label \(the first: item (7|9)\)"):
            patient_folds(bad, patients, n_splits=5)
    with pytest.raises(CellsError, match=r"one value per cell; got shapes \(300, 2\) and \(600,\)"):
        patient_folds(labels.reshape(300, 2), patients)


def test_patch_centre_is_the_centroid_pixel():
    from histoflow import open_slide
    from histoflow.ml.patches import NucleusPatchDataset

    path = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")
    cents = np.array([[x, 200.0] for x in range(100, 106)] + [[300.0, y] for y in range(51, 54)])
    with open_slide(path) as r:
        img = r.read_region((0, 0), 0, (1024, 1024))
    for size in (41, 40):
        ds = NucleusPatchDataset(path, cents, patch_size=size)
        for i, (cx, cy) in enumerate(cents.astype(int)):  # odd and even coordinates alike
            p = ds.patch(i)
            assert p.shape[:2] == (size, size)
            np.testing.assert_array_equal(p, img[cy - size // 2:cy - size // 2 + size, cx - size // 2:cx - size // 2 + size])


def test_patient_folds_refuse_missing_ids_and_one_fold():
    with pytest.raises(CellsError, match="1 cells have no patient id"):
        patient_folds([0, 1, 0, 1], ["a", "b", None, "c"], n_splits=2)
    with pytest.raises(CellsError, match="n_splits must be a whole number >= 2"):
        patient_folds([0, 1, 0, 1], ["a", "b", "c", "d"], n_splits=1)



def test_fluorescence_patches_scaled_by_the_slides_percentile(tmp_path):
    """Patches are scaled by the dtype's maximum: a MIBI image's uint16 counts (up to ~250 of 65,535) gave
    patches of at most 0.004, near-blank input for a classifier. percentile= scales each channel by the slide's
    own percentile instead."""
    mibi = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")
    cells = [[500, 500], [300, 700], [800, 200]]
    raw = NucleusPatchDataset(mibi, cells, patch_size=41, mpp=0.5)
    assert max(float(raw[i]["image"].max()) for i in range(3)) < 0.01
    ds = NucleusPatchDataset(mibi, cells, patch_size=41, mpp=0.5, percentile=99.9)
    assert ds.scales.shape == (22,) and (ds.scales > 0).all()
    for i in range(3):
        x = ds[i]["image"]
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
        want = np.clip(ds.patch(i).astype(np.float32) / ds.scales, 0, 1).transpose(2, 0, 1)
        np.testing.assert_allclose(x.numpy(), want, rtol=1e-6)
    assert max(float(ds[i]["image"].max()) for i in range(3)) > 0.5
    with pytest.raises(DatasetError, match="percentile must be a number in"):
        NucleusPatchDataset(mibi, cells, percentile=0)

"""Training configs, zoom fills, model parameters, fitting and patch datasets (session 28 review)."""
import numpy as np
import pytest
from datafiles import SVS, data_path

from histoflow.core.slide import SlideData
from histoflow.errors import NotFittedError, ParameterError
from histoflow.ml.augment import AugmentError, RandomZoom
from histoflow.ml.data import DatasetError, WSIPatchDataset
from histoflow.ml.recipes import ConfigError, train_from_config
from histoflow.store import H5PathWriter


def _stores(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        with H5PathWriter(tmp_path / f"{name}.h5path", slide={"name": name}) as w:
            for i in range(8):
                w.add_tile(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), (32 * i, 0),
                           labels={"grade": i % 3, "kind": ["tumour", "normal", "stroma"][i % 3]})


def test_a_class_past_the_models_outputs_is_refused_before_the_earlier_run_is_cleared(tmp_path):
    """The check ran inside the first batch: by then --overwrite had removed the earlier run's weights."""
    _stores(tmp_path)
    cfg = {"task": "tile_classification",
           "data": {"train": [str(tmp_path / "a.h5path")], "val": [str(tmp_path / "b.h5path")], "label": "grade"},
           "model": {"name": "rccnet", "params": {"num_classes": 3}},
           "train": {"epochs": 1, "batch_size": 4, "progress": False}, "output": str(tmp_path / "run"),
           "card": {"licence": "test"}}
    train_from_config(cfg)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "best.pt" in before
    bad = dict(cfg, model={"name": "rccnet", "params": {"num_classes": 2}})
    with pytest.raises(ConfigError, match=r"label 'grade' has class 2, but the model gives 2 outputs.*num_classes: 3"):
        train_from_config(bad)
    named = dict(bad, data=dict(cfg["data"], label="kind"))
    with pytest.raises(ConfigError, match=r"label 'kind' has 3 classes \(normal, stroma, tumour\), but the model gives 2"):
        train_from_config(named)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_zoom_fills_that_the_dtype_cannot_hold_are_named():
    """mask_fill=-100 on a uint8 mask raised a bare OverflowError, and only when a zoom-out was drawn."""
    img = np.full((32, 32, 3), 128, np.uint8)
    masks = {"tissue": np.ones((32, 32), np.uint8)}
    op = RandomZoom((0.5, 0.6), mask_fill=-100)
    with pytest.raises(AugmentError, match=r"mask_fill -100 does not fit mask 'tissue' of dtype uint8 \(0..255\)"):
        op(img, masks, rng=np.random.default_rng(0))
    with pytest.raises(AugmentError, match="fill 1.5 does not fit the image of dtype uint8"):
        RandomZoom((0.5, 0.6), fill=1.5)(img, rng=np.random.default_rng(0))
    out, m = RandomZoom((0.5, 0.6), mask_fill=-100)(img, {"t": np.ones((32, 32), np.int64)}, rng=np.random.default_rng(0))
    assert (m["t"] == -100).any()


def test_zoom_out_fills_64_bit_images_with_their_top():
    """The default fill went through a float: int64's top rounded past it and wrapped to its minimum."""
    for dt in (np.int64, np.uint64, np.uint16):
        img = np.zeros((32, 32, 1), dt)
        out, _ = RandomZoom((0.5, 0.6))(img, rng=np.random.default_rng(0))
        assert out.dtype == dt and out.max() == np.iinfo(dt).max and out.min() == 0


@pytest.mark.parametrize("kw", [{"dropout": "0.5"}, {"dropout": None}, {"input_size": None}, {"input_size": 32.5},
                                {"num_classes": "4"}, {"dropout": True}])
def test_rccnet_parameters_are_checked(kw):
    from histoflow.ml import models

    with pytest.raises(ParameterError, match="(?i)rccnet"):
        models.create("rccnet", **kw)


def test_an_unfitted_cluster_guide_says_so():
    from histoflow.ml.cluster import ClusterGuide

    with pytest.raises(NotFittedError, match="not fitted"):
        ClusterGuide().n_components_


def test_patch_datasets_use_the_slides_own_tissue_mask():
    """A SlideData's hand-made tissue mask was replaced by the automatic detection (33 patches where the run took
    24, some outside the mask); on a fluorescence slide the error's advice (add the mask) did not help."""
    s = SlideData(SVS)
    w, h = s.dimensions
    m = np.zeros((h // 16, w // 16), np.uint8)
    m[: h // 32, : w // 32] = 1  # the top-left quarter
    s.add_mask("tissue", m, 16)
    ds = WSIPatchDataset(s, patch_size=256, tissue_filter=0.5)
    assert len(ds) > 0 and (ds.coords[:, 1] < w // 2).all() and (ds.coords[:, 2] < h // 2).all()
    f = SlideData(data_path("fluorescence", "pathml_smalltif.tif"))
    with pytest.raises(DatasetError, match="tissue_filter=False"):
        WSIPatchDataset(f, patch_size=128)
    f.add_mask("tissue", np.ones((480 // 8, 640 // 8), np.uint8), 8)
    assert len(WSIPatchDataset(f, patch_size=128)) == 20
    assert len(WSIPatchDataset(data_path("fluorescence", "pathml_smalltif.tif"), patch_size=128,
                               tissue_filter=False)) == 20

"""Cluster guidance: the frozen torch module must assign exactly the clusters scikit-learn assigns."""
import io
import pickle

import numpy as np
import pytest
import torch
from datafiles import data_path
from PIL import Image
from sklearn.datasets import make_blobs

from histoflow.ml.cluster import ClusterGuide, ClusterModule
from histoflow.ml.losses import cwce_loss


def _colour_histograms(rgb, size, offset=0, bins=16):
    """Per-channel colour histograms (3 * bins features) of the size x size crops of a real H&E image."""
    h, w, _ = rgb.shape
    feats = []
    for y in range(offset, h - size + 1, size):
        for x in range(offset, w - size + 1, size):
            crop = rgb[y:y + size, x:x + size]
            feats.append(np.concatenate([np.bincount(crop[..., c].ravel() // (256 // bins), minlength=bins)
                                         for c in range(3)]) / (size * size))
    return np.asarray(feats)


@pytest.fixture(scope="module")
def he_features():
    rgb = np.asarray(Image.open(data_path("he_patches", "tiatoolbox_stain_target.png")).convert("RGB"))
    return _colour_histograms(rgb, 40), _colour_histograms(rgb, 40, offset=20)


@pytest.fixture(scope="module")
def he_guide(he_features):
    return ClusterGuide(n_clusters=10, variance=0.95, random_state=0, threads=1).fit(he_features[0])


@pytest.fixture(scope="module")
def blobs():
    x, _ = make_blobs(n_samples=1500, n_features=50, centers=10, cluster_std=2.0, random_state=0)
    return x[:1000], x[1000:]


@pytest.fixture(scope="module")
def blob_guide(blobs):
    return ClusterGuide(n_clusters=10, variance=0.95, random_state=0, threads=1).fit(blobs[0])


def _assert_same_assignment(module, guide, x):
    """Exact agreement; a disagreement is tolerated only on a numerical tie of the two nearest centres."""
    ours = module(torch.from_numpy(x)).numpy()
    ref = guide.predict(x)
    differ = np.flatnonzero(ours != ref)
    if differ.size:
        d = module.distances(torch.from_numpy(x[differ])).numpy()
        rows = np.arange(differ.size)
        gap = np.abs(d[rows, ours[differ]] - d[rows, ref[differ]])
        assert np.all(gap <= 1e-9 * d[rows, ref[differ]].clip(min=1.0)), f"{differ.size} real disagreements"
    return differ.size


def _check_variance(guide, variance):
    ratios = np.cumsum(guide.pca_.explained_variance_ratio_)
    assert guide.explained_variance_ >= variance
    # the fewest components that reach it
    assert guide.n_components_ == 1 or ratios[guide.n_components_ - 2] < variance


def test_blobs_torch_matches_sklearn(blobs, blob_guide):
    train, test = blobs
    guide = blob_guide
    _check_variance(guide, 0.95)
    assert 1 < guide.n_components_ < 50
    module = guide.to_torch()
    assert _assert_same_assignment(module, guide, train) == 0
    assert _assert_same_assignment(module, guide, test) == 0
    assert np.array_equal(guide.labels_, guide.predict(train))
    assert len(np.unique(guide.labels_)) == 10


def test_he_colour_histograms_torch_matches_sklearn(he_features, he_guide):
    train, held_out = he_features
    assert train.shape == (625, 48)
    assert np.any(train.std(axis=0) == 0)  # empty histogram bins: the scaler's unit scale must carry over
    guide = he_guide
    _check_variance(guide, 0.95)
    module = guide.to_torch()
    assert _assert_same_assignment(module, guide, train) == 0
    _assert_same_assignment(module, guide, held_out)
    assert len(np.unique(module(torch.from_numpy(held_out)).numpy())) >= 5  # real tissue is varied
    # float32 input is accepted and gives the same ids on this data
    got32 = module(torch.from_numpy(held_out.astype(np.float32))).numpy()
    assert np.mean(got32 == guide.predict(held_out.astype(np.float32))) > 0.99


def test_projection_matches_sklearn_transform(he_features, he_guide):
    train, _ = he_features
    guide = he_guide
    y = guide.to_torch().project(torch.from_numpy(train)).numpy()
    assert np.allclose(y, guide.transform(train), atol=1e-10)
    assert np.allclose(guide.transform(train), guide.pca_.transform(guide.scaler_.transform(train)))


def test_module_is_frozen_and_follows_dtype(blobs, blob_guide):
    train, test = blobs
    guide = blob_guide
    module = guide.to_torch()
    assert list(module.parameters()) == []
    buffers = dict(module.named_buffers())
    assert set(buffers) == {"scaler_mean", "scaler_scale", "pca_mean", "pca_components", "centers"}
    assert all(not b.requires_grad for b in buffers.values())
    assert not module.training
    module.train()
    assert not module.training
    parent = torch.nn.Sequential(torch.nn.Identity(), module)
    parent.train()
    assert not module.training
    ids64 = module(torch.from_numpy(test))
    assert ids64.dtype == torch.int64 and ids64.shape == (500,)
    module32 = module.to(torch.float32)
    assert all(b.dtype == torch.float32 for b in module32.buffers())
    assert torch.equal(module32(torch.from_numpy(test)), ids64)  # well separated blobs: same ids in float32
    with pytest.raises(ValueError, match=r"\(N, 50\).*\(3, 49\)"):
        module(torch.zeros(3, 49))
    with pytest.raises(ValueError, match=r"49 columns \(shape \(3, 49\)\)"):
        guide.predict(np.zeros((3, 49)))


def test_state_dict_and_pickle_round_trip(he_features, he_guide):
    _, held_out = he_features
    module = he_guide.to_torch()
    x = torch.from_numpy(held_out)
    expected = module(x)

    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = ClusterModule(48, module.pca_components.shape[0], 10)
    assert not torch.equal(fresh(x), expected)  # an empty module does not know the clusters
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), expected)

    clone = pickle.loads(pickle.dumps(module))
    assert torch.equal(clone(x), expected)
    assert not clone.training


def test_inside_a_training_graph_with_cwce(blobs, blob_guide):
    train, _ = blobs
    guide = blob_guide
    torch.manual_seed(0)
    encoder = torch.nn.Linear(50, 50, dtype=torch.float64)
    with torch.no_grad():
        encoder.weight.copy_(torch.eye(50, dtype=torch.float64))
        encoder.bias.zero_()
    head = torch.nn.Linear(50, 3, dtype=torch.float64)
    model = torch.nn.ModuleDict({"encoder": encoder, "head": head, "clusters": guide.to_torch()})
    model.train()
    x = torch.from_numpy(train[:64])
    feats = model["encoder"](x)
    assert feats.requires_grad
    ids = model["clusters"](feats)
    assert not ids.requires_grad and torch.equal(ids, torch.from_numpy(guide.predict(train[:64])))
    labels = torch.randint(0, 3, (64,))
    loss = cwce_loss(model["head"](feats), labels, ids)
    loss.backward()
    assert encoder.weight.grad is not None and head.weight.grad is not None
    assert all(b.grad is None for b in model["clusters"].buffers())


def test_guide_errors():
    with pytest.raises(RuntimeError, match="not fitted"):
        ClusterGuide().predict(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least n_clusters=10"):
        ClusterGuide(n_clusters=10).fit(np.random.default_rng(0).random((5, 3)))
    with pytest.raises(ValueError, match="2-D"):
        ClusterGuide().fit(np.zeros(30))
    with pytest.raises(ValueError, match="NaN"):
        ClusterGuide(n_clusters=2).fit(np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match="every feature is constant"):
        ClusterGuide(n_clusters=2).fit(np.ones((6, 3)))
    with pytest.raises(ValueError, match="and 2"):
        ClusterGuide(n_clusters=1).fit(np.ones((1, 3)))
    with pytest.raises(ValueError, match="variance"):
        ClusterGuide(variance=1.5)
    # an integer variance is a number of components
    g = ClusterGuide(n_clusters=3, variance=4, threads=1).fit(np.random.default_rng(1).random((60, 10)))
    assert g.n_components_ == 4 and g.to_torch().pca_components.shape == (4, 10)
    # the thread cap changes speed, not the result
    g_default = ClusterGuide(n_clusters=3, variance=4).fit(np.random.default_rng(1).random((60, 10)))
    assert np.array_equal(g.labels_, g_default.labels_)
    with pytest.raises(ValueError, match="threads"):
        ClusterGuide(threads=0)


def test_guide_predicts_any_dtype_and_checks_its_components():
    """Fitted on float32 features (torch's), it predicts float64 and integer rows too (scikit-learn's k-means
    refused them); a number of components the data cannot give is a ParameterError naming `variance`."""
    from histoflow.errors import ParameterError
    from histoflow.ml.cluster import ClusterGuide

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 30)).astype(np.float32)
    g = ClusterGuide(n_clusters=4).fit(x)
    np.testing.assert_array_equal(g.predict(x.astype(np.float64)), g.predict(x))
    assert g.predict(np.rint(x * 10).astype(np.int64)).shape == (200,)
    with pytest.raises(ParameterError, match="variance=50 components, more than the 30"):
        ClusterGuide(n_clusters=4, variance=50).fit(x)


def test_numpy_scalar_settings_mean_what_python_numbers_do(he_features):
    """A variance given as np.float32 (read from an array) is a fraction, np.int64 a count of components; they
    used to slip past the checks to scikit-learn's own error."""
    import numpy as np

    x = he_features[0]
    a = ClusterGuide(n_clusters=3, variance=np.float32(0.9)).fit(x)
    b = ClusterGuide(n_clusters=3, variance=0.9).fit(x)
    assert a.pca_.n_components_ == b.pca_.n_components_
    assert ClusterGuide(n_clusters=3, variance=np.int64(2)).fit(x).pca_.n_components_ == 2
    with pytest.raises(ValueError, match="variance"):
        ClusterGuide(variance=np.float32(1.5))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_module_refuses_non_finite_features_as_the_guide_does(blobs, blob_guide):
    """A NaN row has NaN distances to every centre and argmin still gave it a cluster; ClusterGuide.predict
    refuses it, and so does the module now. Traced and exported graphs (which cannot raise) still work."""
    from histoflow.errors import ParameterError
    _, test = blobs
    module = blob_guide.to_torch()
    x = torch.from_numpy(test[:6].copy())
    expected = torch.from_numpy(blob_guide.predict(test[:6]))
    assert torch.equal(module(x), expected)
    for bad in (float("nan"), float("inf"), -float("inf")):
        xb = x.clone()
        xb[2, 7] = bad
        with pytest.raises(ValueError, match="NaN"):
            blob_guide.predict(xb.numpy())
        with pytest.raises(ParameterError, match=r"NaN or infinite.*rows \[2\] of 6"):
            module(xb)
    # finite in float64 but overflowing the float32 module's arithmetic: no cluster can be told either
    with pytest.raises(ParameterError, match="too large"):
        module.to(torch.float32)(x * 1e30)
    traced = torch.jit.trace(module, x, check_trace=False)
    exported = torch.export.export(module, (x,)).module()
    other = torch.from_numpy(test[6:12])  # the exported graph is specialised to 6 rows
    for graph in (traced, exported):
        assert torch.equal(graph(other), module(other))


def test_ids_inside_an_autocast_region_are_scikit_learns():
    """A training step with amp runs the module inside torch.autocast: its projection ran in bfloat16 and 2 of
    2,000 overlapping features got another cluster than ClusterGuide.predict gives."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 64)) + rng.integers(0, 10, (2000, 1)) * 0.3
    guide = ClusterGuide(n_clusters=10, threads=1).fit(x)
    ref = guide.predict(x)
    for dtype in (torch.float64, torch.float32):
        module = guide.to_torch(dtype)
        for amp in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=amp):
                ids = module(torch.from_numpy(x).float()).numpy()
            assert (ids == ref).all(), (dtype, amp)

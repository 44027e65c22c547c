"""Cluster guidance: group training patches by appearance so a loss can weigh the groups equally.

The cascaded tumour-segmentation method clusters the training patches on deep features and trains
with the cluster-weighted cross entropy (:class:`histoflow.ml.losses.CWCELoss`), so that rare tissue
appearances weigh as much as common ones. :class:`ClusterGuide` fits the clustering with
scikit-learn:

    z-score (``StandardScaler``) -> ``PCA`` keeping ``variance`` of the variance -> ``KMeans``

and :meth:`ClusterGuide.to_torch` freezes the fitted pipeline into a :class:`ClusterModule`, a torch
module with buffers only, that assigns cluster ids inside the training graph (on any device and
dtype) and gives the same ids as :meth:`ClusterGuide.predict`.

The features are supplied by the caller, one row per patch: typically the globally pooled output of
a layer of the network being trained (or of a pretrained encoder). This module does not compute them.

Examples
--------
>>> from sklearn.datasets import make_blobs
>>> x, _ = make_blobs(n_samples=300, n_features=20, centers=4, random_state=0)
>>> guide = ClusterGuide(n_clusters=4).fit(x)
>>> module = guide.to_torch()
>>> bool((module(torch.from_numpy(x)).numpy() == guide.predict(x)).all())
True
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from ..errors import NotFittedError, ParameterError

__all__ = ["ClusterGuide", "ClusterModule"]


def _features(x, name: str = "features") -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ParameterError(f"{name} must be a 2-D array (n_samples, n_features), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
        raise ParameterError(f"{name} must be real numbers, got dtype {a.dtype}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ParameterError(f"{name} contain NaN or infinite values")
    return a


class ClusterGuide:
    """Standardise, reduce with PCA and cluster with k-means (scikit-learn).

    Parameters
    ----------
    n_clusters : int
        ``k`` of k-means.
    variance : float or int
        A float in ``(0, 1)``: keep the fewest principal components explaining at least this fraction
        of the variance (``PCA(n_components=variance)``); an int: that many components.
    random_state : int, optional
        Seed of the PCA solver and of k-means.
    n_init : int
        Number of k-means restarts (the best inertia is kept).
    threads : int, optional
        Cap on the BLAS/OpenMP threads used while fitting (``threadpoolctl``). ``None`` leaves the
        libraries' defaults. On small inputs or busy machines ``1`` is often much faster, because
        spinning OpenMP workers compete with other processes for the cores.

    Attributes (after :meth:`fit`)
    ------------------------------
    scaler_, pca_, kmeans_ : the fitted scikit-learn estimators.
    n_components_ : int, the number of principal components kept.
    explained_variance_ : float, the fraction of the variance they explain.
    labels_ : numpy.ndarray, the cluster of each training sample.
    """

    def __init__(self, n_clusters: int = 10, variance: Union[float, int] = 0.95,
                 random_state: Optional[int] = 0, n_init: int = 10, threads: Optional[int] = None) -> None:
        if int(n_clusters) < 1:
            raise ParameterError(f"n_clusters must be >= 1, got {n_clusters}")
        if isinstance(variance, (bool, np.bool_)) or not isinstance(variance, (int, float, np.integer, np.floating)):
            raise ParameterError(f"variance must be a fraction in (0, 1) or a number of components, got {variance!r}")
        # numpy scalars as Python numbers: a fraction stays a fraction (np.float32 is no float), a count a count
        variance = float(variance) if isinstance(variance, (float, np.floating)) else int(variance)
        if isinstance(variance, float) and not 0.0 < variance < 1.0:
            raise ParameterError(f"variance must be a fraction in (0, 1) or a number of components, got {variance}")
        if isinstance(variance, (int, np.integer)) and not isinstance(variance, bool) and variance < 1:
            raise ParameterError(f"variance as a number of components must be >= 1, got {variance}")
        self.n_clusters = int(n_clusters)
        self.variance = variance
        self.random_state = random_state
        self.n_init = int(n_init)
        if threads is not None and int(threads) < 1:
            raise ParameterError(f"threads must be >= 1 or None, got {threads}")
        self.threads = None if threads is None else int(threads)
        self.scaler_ = self.pca_ = self.kmeans_ = None

    def __repr__(self) -> str:
        return (f"ClusterGuide(n_clusters={self.n_clusters}, variance={self.variance}, "
                f"random_state={self.random_state}, n_init={self.n_init}, threads={self.threads})")

    # -- fitting ----------------------------------------------------------------------------------
    def fit(self, features) -> "ClusterGuide":
        """Fit scaler, PCA and k-means on ``features`` ``(n_samples, n_features)``; returns self."""
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        from threadpoolctl import threadpool_limits

        x = _features(features)
        if x.shape[0] < max(2, self.n_clusters):
            raise ParameterError(f"need at least n_clusters={self.n_clusters} (and 2) samples, got {x.shape[0]}")
        if not np.any(np.ptp(x, axis=0) > 0):
            raise ParameterError("every feature is constant over the samples: nothing to cluster")
        if not isinstance(self.variance, float) and self.variance > min(x.shape):
            raise ParameterError(f"variance={self.variance} components, more than the {min(x.shape)} that "
                                 f"{x.shape[0]} samples of {x.shape[1]} features allow; give fewer, or a fraction "
                                 "of the variance (e.g. 0.95)")
        with threadpool_limits(limits=self.threads):
            self.scaler_ = StandardScaler().fit(x)
            z = self.scaler_.transform(x)
            self.pca_ = PCA(n_components=self.variance, svd_solver="full", random_state=self.random_state).fit(z)
            y = self.pca_.transform(z)
            self.kmeans_ = KMeans(n_clusters=self.n_clusters, n_init=self.n_init,
                                  random_state=self.random_state).fit(y)
        self.labels_ = self.kmeans_.labels_.astype(np.int64)
        return self

    def _check_fitted(self) -> None:
        if self.kmeans_ is None:
            raise NotFittedError("ClusterGuide is not fitted; call fit(features) first")

    @property
    def n_components_(self) -> int:
        self._check_fitted()
        return int(self.pca_.n_components_)

    @property
    def explained_variance_(self) -> float:
        self._check_fitted()
        return float(np.sum(self.pca_.explained_variance_ratio_))

    @property
    def cluster_centers_(self) -> np.ndarray:
        """``(n_clusters, n_components)`` centres in PCA space."""
        self._check_fitted()
        return self.kmeans_.cluster_centers_

    # -- using ------------------------------------------------------------------------------------
    def transform(self, features) -> np.ndarray:
        """Features projected to the PCA space, ``(n_samples, n_components)``."""
        self._check_fitted()
        x = _features(features)
        if x.shape[1] != self.scaler_.n_features_in_:
            raise ParameterError(f"features have {x.shape[1]} columns (shape {x.shape}) but the guide was fitted "
                                 f"on {self.scaler_.n_features_in_}")
        # in the dtype the guide was fitted in: scikit-learn's k-means refuses float64 rows for float32 centres
        x = x.astype(self.kmeans_.cluster_centers_.dtype, copy=False)
        return self.pca_.transform(self.scaler_.transform(x))

    def predict(self, features) -> np.ndarray:
        """Cluster id (int64) of each row of ``features``."""
        y = self.transform(features)
        return self.kmeans_.predict(y).astype(np.int64)

    def fit_predict(self, features) -> np.ndarray:
        return self.fit(features).labels_

    def to_torch(self, dtype: torch.dtype = torch.float64) -> "ClusterModule":
        """The fitted pipeline as a frozen :class:`ClusterModule` (buffers in ``dtype``)."""
        self._check_fitted()
        return ClusterModule.from_arrays(
            scaler_mean=self.scaler_.mean_, scaler_scale=self.scaler_.scale_,
            pca_mean=self.pca_.mean_, pca_components=self.pca_.components_,
            centers=self.kmeans_.cluster_centers_, dtype=dtype)


class ClusterModule(nn.Module):
    """Frozen cluster assignment: ``argmin_k || PCA(zscore(x)) - c_k ||``, in torch.

    Holds buffers only (no parameters): ``scaler_mean (d,)``, ``scaler_scale (d,)``,
    ``pca_mean (d,)``, ``pca_components (p, d)`` and ``centers (k, p)``, so it follows ``.to(device)``
    and ``.to(dtype)``, is saved by ``state_dict`` and never receives gradients. It stays in eval
    mode (``train()`` is a no-op) and its forward runs without autograd.

    ``forward(features)`` takes ``(N, d)`` features (cast to the buffers' dtype) and returns the
    ``(N,)`` int64 cluster ids; a row with NaN or infinite values (or one that overflows the dtype)
    raises a :class:`~histoflow.errors.ParameterError`, as :meth:`ClusterGuide.predict` does (except
    inside a traced or compiled graph, which cannot raise). Build it with :meth:`ClusterGuide.to_torch`, or empty with
    ``ClusterModule(d, p, k)`` followed by ``load_state_dict``.
    """

    def __init__(self, n_features: int, n_components: int, n_clusters: int,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if min(n_features, n_components, n_clusters) < 1:
            raise ParameterError(f"sizes must be >= 1, got n_features={n_features}, n_components={n_components}, "
                                 f"n_clusters={n_clusters}")
        self.register_buffer("scaler_mean", torch.zeros(n_features, dtype=dtype))
        self.register_buffer("scaler_scale", torch.ones(n_features, dtype=dtype))
        self.register_buffer("pca_mean", torch.zeros(n_features, dtype=dtype))
        self.register_buffer("pca_components", torch.zeros(n_components, n_features, dtype=dtype))
        self.register_buffer("centers", torch.zeros(n_clusters, n_components, dtype=dtype))
        super().train(False)

    @classmethod
    def from_arrays(cls, scaler_mean, scaler_scale, pca_mean, pca_components, centers,
                    dtype: torch.dtype = torch.float64) -> "ClusterModule":
        comps = np.asarray(pca_components)
        cent = np.asarray(centers)
        if comps.ndim != 2 or cent.ndim != 2 or cent.shape[1] != comps.shape[0]:
            raise ParameterError(f"pca_components {comps.shape} and centers {cent.shape} do not fit: expected "
                                 f"(p, d) and (k, p)")
        d = comps.shape[1]
        for name, v in (("scaler_mean", scaler_mean), ("scaler_scale", scaler_scale), ("pca_mean", pca_mean)):
            if np.shape(v) != (d,):
                raise ParameterError(f"{name} shape {np.shape(v)} does not match pca_components shape {comps.shape}")
        m = cls(d, comps.shape[0], cent.shape[0], dtype=dtype)
        with torch.no_grad():
            for name, v in (("scaler_mean", scaler_mean), ("scaler_scale", scaler_scale), ("pca_mean", pca_mean),
                            ("pca_components", comps), ("centers", cent)):
                getattr(m, name).copy_(torch.as_tensor(np.asarray(v, dtype=np.float64)))
        return m

    @property
    def n_features(self) -> int:
        return self.pca_components.shape[1]

    @property
    def n_clusters(self) -> int:
        return self.centers.shape[0]

    def train(self, mode: bool = True) -> "ClusterModule":
        """No-op: the module is frozen and always in eval mode."""
        return super().train(False)

    def extra_repr(self) -> str:
        return (f"n_features={self.n_features}, n_components={self.pca_components.shape[0]}, "
                f"n_clusters={self.n_clusters}")

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Features in the PCA space ``(N, p)``."""
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ParameterError(f"features must be (N, {self.n_features}), got {tuple(features.shape)}")
        x = features.to(self.centers.dtype)
        z = (x - self.scaler_mean) / self.scaler_scale
        return (z - self.pca_mean) @ self.pca_components.T

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances ``(N, k)`` to the cluster centres in PCA space, in the module's dtype
        also inside an autocast region (a training step with ``amp``: its bfloat16 projection gave 2 of 2,000
        features another cluster than scikit-learn's)."""
        with torch.autocast(features.device.type, enabled=False):
            y = self.project(features)
            diff = y[:, None, :] - self.centers[None, :, :]
            return (diff * diff).sum(dim=-1)

    @torch.no_grad()
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        d = self.distances(features.detach())
        # a NaN/inf row has NaN distances, and argmin would still give it a cluster: refuse it, as
        # ClusterGuide.predict does. The check needs the values, so it is left out while tracing or
        # compiling (torch.jit.trace, ONNX export, torch.compile/export), where the graph cannot raise.
        if not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()):
            bad = ~torch.isfinite(d).all(dim=1)
            if bool(bad.any()):
                raise ParameterError(f"features contain NaN or infinite values (rows "
                                     f"{bad.nonzero().flatten()[:5].tolist()} of {d.shape[0]}; values too large "
                                     f"for {d.dtype} count too): no cluster can be assigned")
        return d.argmin(dim=1).to(torch.int64)

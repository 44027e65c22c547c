"""A model made of several trained models whose outputs are averaged (a deep ensemble).

Averaging the outputs (logits, or regression maps such as HoVer-Net's HV maps) of networks trained
from different random seeds on the same data is the simplest reliable way to gain a little
accuracy and calibration (Lakshminarayanan et al. 2017; nnU-Net averages its folds the same way).
The ensemble is an ordinary registered architecture: it is saved as one ``.pt`` with one card,
loaded with :func:`histoflow.ml.models.load`, exported to ONNX as one graph, and run by anything that
runs a model (``NucleusSegmentation``, slide inference)::

    from histoflow.ml import models
    ens = models.ensemble(["runs/seed0/best.pt", "runs/seed1/best.pt"])
    models.save(ens, "nuclei_ensemble.pt", card={...})
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...errors import ParameterError

__all__ = ["Ensemble"]


class Ensemble(nn.Module):
    """The mean of the outputs of member models that take the same input.

    Parameters
    ----------
    members : sequence of mappings
        One ``{"architecture": NAME, "parameters": {...}}`` per member, as in a model card; each is
        created with :func:`histoflow.ml.models.create`. Members must return tensors of one shape.
    weights : sequence of float, optional
        Weight of each member in the mean (default: equal). They are normalised to sum to 1.
    """

    def __init__(self, members: Sequence[Mapping[str, Any]], weights: Sequence[float] | None = None):
        super().__init__()
        from . import create

        if not members:
            raise ParameterError("Ensemble: give at least one member")
        specs = []
        for i, m in enumerate(members):
            if not isinstance(m, Mapping) or not isinstance(m.get("architecture"), str):
                raise ParameterError(f"Ensemble: member {i} must be a mapping with an 'architecture' name, got {m!r}")
            if m["architecture"] == "ensemble":
                raise ParameterError("Ensemble: members cannot be ensembles themselves")
            specs.append({"architecture": m["architecture"], "parameters": dict(m.get("parameters") or {})})
        if weights is None:
            weights = [1.0] * len(specs)
        weights = [float(w) for w in weights]
        if len(weights) != len(specs) or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ParameterError(f"Ensemble: weights must be {len(specs)} non-negative numbers with a positive sum, "
                                 f"got {weights}")
        self.members = specs
        self.weights = [w / sum(weights) for w in weights]
        self.nets = nn.ModuleList(create(s["architecture"], **s["parameters"]) for s in specs)

    @property
    def size_divisor(self) -> int:
        """Input sizes must be multiples of this (the least common multiple of the members')."""
        return math.lcm(*(int(getattr(n, "size_divisor", 1)) for n in self.nets))

    def forward(self, x: torch.Tensor):
        """The weighted mean of the members' outputs: one tensor, or a dict of tensors (HoVer-Net's maps)
        averaged key by key. Members must give the same shapes (no silent broadcasting)."""
        out = None
        for w, net in zip(self.weights, self.nets):
            y = net(x)
            if isinstance(y, Mapping):
                if out is None:
                    out = {k: v * w for k, v in y.items()}
                    continue
                if set(y) != set(out):
                    raise ParameterError(f"Ensemble: members give different outputs {sorted(out)} and {sorted(y)}")
                for k, v in y.items():
                    _same_shape(out[k], v, k)
                    out[k] = out[k] + v * w
                continue
            if not isinstance(y, torch.Tensor):
                raise ParameterError(f"Ensemble: members must return a tensor or a dict of tensors, "
                                     f"{type(net).__name__} returned {type(y).__name__}")
            if out is not None:
                _same_shape(out, y, "output")
            out = y * w if out is None else out + y * w
        return out

    def extra_repr(self) -> str:
        return f"{len(self.nets)} members, weights {[round(w, 3) for w in self.weights]}"


def _same_shape(a, b, what):
    if isinstance(a, dict) or tuple(a.shape) != tuple(b.shape):
        raise ParameterError(f"Ensemble: members give {what}s of different shapes "
                             f"{tuple(getattr(a, 'shape', ()))} and {tuple(b.shape)}; average like models only")


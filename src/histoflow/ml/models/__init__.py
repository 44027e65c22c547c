"""Model architectures, a name registry, and saving / loading with a model card.

Every architecture is plain torch (HoVer-Net wraps MONAI's). A model is created by name::

    from histoflow.ml import models
    net = models.create("unet", in_channels=4, filters=(8, 16, 32, 64, 128, 128, 256, 256, 512))
    models.save(net, "tumour.pt", card={"training_data": "...", "metrics": {"dice": 0.91}})
    net = models.load("tumour.pt")   # eval mode; net.card is the card

``save`` writes the weights (a ``state_dict``, ``.pt``) and beside them a JSON model card
(``tumour.json``) naming the architecture and its parameters, so ``load`` can re-create the model
without any code from the user. Weights are read with ``weights_only=True``.

Registered names: ``unet``, ``mobilenet_v2``, ``resnet18``, ``resnet34``, ``rccnet``, ``hovernet``,
``ensemble`` (the mean of several saved models, built with :func:`ensemble`); more can be added with
:func:`register`.
"""

from __future__ import annotations

import datetime
import importlib
import inspect
import json
import math
import os
import numbers
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histoflow.errors import HistoflowError, ParameterError

__all__ = [
    "ModelError", "UnknownModelError", "register", "create", "list_models", "save", "load",
    "card_path", "read_card", "ensemble", "Ensemble", "UNet", "MobileNetV2", "ResNet", "RCCNet", "HoVerNet", "hovernet_postprocess",
    "replace_batchnorm_with_instancenorm",
]


class ModelError(HistoflowError):
    """A model could not be created, saved or loaded (bad card, missing or mismatched weights)."""


class UnknownModelError(ModelError, ValueError):
    """No architecture is registered under that name."""


# name -> factory (a class or a function returning an nn.Module). Built-ins are resolved lazily
# from "module:attribute" so that importing the registry does not import MONAI.
_BUILTINS: dict[str, str] = {
    "unet": "histoflow.ml.models.unet:UNet",
    "mobilenet_v2": "histoflow.ml.models.mobilenet:MobileNetV2",
    "resnet18": "histoflow.ml.models.resnet:resnet18",
    "resnet34": "histoflow.ml.models.resnet:resnet34",
    "rccnet": "histoflow.ml.models.rccnet:RCCNet",
    "hovernet": "histoflow.ml.models.hovernet:HoVerNet",
    "ensemble": "histoflow.ml.models.ensembles:Ensemble",
}
_REGISTRY: dict[str, Callable[..., nn.Module] | str] = dict(_BUILTINS)

# Card keys always present (extra keys from the user's card are kept as well).
_CARD_DEFAULTS: dict[str, Any] = {"training_data": None, "metrics": {}, "licence": None}

# Card key listing the submodules (by qualified name, "" = the whole model) whose batch norms
# :func:`replace_batchnorm_with_instancenorm` replaced; :func:`load` replaces them again before the weights go in.
_INSTANCE_NORM_KEY = "batchnorm_to_instancenorm"
# Card keys that describe the saved model itself: filled in by :func:`save`, never carried over or overridden.
_OWN_KEYS = ("architecture", "parameters", "weights_dtype", "saved", "histoflow_version", "torch_version",
             _INSTANCE_NORM_KEY)


def register(name: str, factory: Callable[..., nn.Module] | None = None):
    """Register an architecture under ``name``; usable as a decorator or a plain call.

    The factory's keyword parameters are what :func:`save` records in the card: the model it
    returns should keep each of them as an attribute of the same name (``self.in_channels`` ...),
    or have been made by :func:`create`, which records them.

    Examples
    --------
    >>> @register("tiny")                       # doctest: +SKIP
    ... class Tiny(nn.Module): ...
    """
    if not isinstance(name, str) or not name:
        raise ParameterError(f"register: name must be a non-empty string, got {name!r}")

    def _add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not callable(f):
            raise TypeError(f"register({name!r}): {f!r} is not callable")
        _REGISTRY[name] = f
        return f

    return _add if factory is None else _add(factory)


def list_models() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(_REGISTRY)


def _factory(name: str) -> Callable[..., nn.Module]:
    try:
        f = _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    if isinstance(f, str):
        module, attr = f.split(":")
        f = getattr(importlib.import_module(module), attr)
        _REGISTRY[name] = f
    return f


def create(name: str, **kwargs: Any) -> nn.Module:
    """Create the architecture registered as ``name`` with keyword parameters ``kwargs``.

    Raises
    ------
    UnknownModelError
        (a ``ValueError``) when no architecture has that name; the message lists the known ones.
    """
    factory = _factory(name)
    for k in ("num_classes", "in_channels", "out_channels"):  # sizes every architecture here takes as counts
        v = kwargs.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
            raise ParameterError(f"{name}: {k} must be a whole number >= 1, got {v!r}")
    import inspect

    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepted = None
    if accepted is not None and not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:  # (a TypeError from the constructor named neither the model nor what it takes)
            raise ParameterError(f"{name}: no parameter(s) {unknown}; it takes {sorted(accepted)}")
    try:
        model = factory(**kwargs)
    except (RuntimeError, OverflowError) as e:  # torch refusing a layer of these sizes; an infinite size
        raise ParameterError(f"{name}: cannot be made with {kwargs}: {e}") from None
    model.registry_name = name
    model._histoflow_params = dict(kwargs)
    return model


def _name_of(model: nn.Module) -> str:
    name = getattr(model, "registry_name", None)
    if isinstance(name, str) and name in _REGISTRY:
        return name
    for n in list_models():
        f = _factory(n)
        if inspect.isclass(f) and type(model) is f:
            return n
    raise ModelError(f"cannot save a {type(model).__name__}: it is not a registered architecture "
                     f"({', '.join(list_models())}); register it first")


def check_card_identity(model: nn.Module, card: Mapping, who: str = "") -> None:
    """A ParameterError when ``card`` gives an ``architecture`` or ``parameters`` other than ``model``'s own
    (:func:`save` writes them from the model; a trainer checks its card before the first epoch)."""
    given = [k for k in ("architecture", "parameters") if k in card]
    if not given:
        return
    name = _name_of(model)
    own = {"architecture": name, "parameters": _parameters_of(model, name)}
    for k in given:
        if _jsonable(card[k]) != own[k]:
            raise ParameterError(f"{who}card.{k} {card[k]!r} disagrees with the model ({own[k]!r}); it is written "
                                 "from the model: leave it out")


def _jsonable(v: Any) -> Any:
    """Plain JSON: tuples as lists, keys as text, and numbers JSON cannot hold (NaN, infinities: a metric of a
    class missing from the validation data) as null, not the bare ``NaN`` that strict readers refuse."""
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, float | np.floating) and not math.isfinite(v):
        return None
    return v


def _parameters_of(model: nn.Module, name: str) -> dict[str, Any]:
    """The factory's keyword parameters, read back from the model's attributes."""
    recorded = getattr(model, "_histoflow_params", {})
    params: dict[str, Any] = {}
    for p in inspect.signature(_factory(name)).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if hasattr(model, p.name) and not isinstance(getattr(model, p.name), nn.Module | torch.Tensor):
            params[p.name] = getattr(model, p.name)
        elif p.name in recorded:
            params[p.name] = recorded[p.name]
        elif p.default is not p.empty:
            params[p.name] = p.default
        else:
            raise ModelError(f"cannot save {name}: its parameter {p.name!r} is neither an attribute "
                             "of the model nor recorded by create()")
    params = _jsonable(params)
    try:
        json.dumps(params)
    except TypeError as e:
        raise ModelError(f"cannot save {name}: parameters {params!r} are not JSON-serialisable ({e})") from e
    return params


def _instance_norm_switches(model: nn.Module) -> list[str]:
    """The names of the submodules (``""``: the model) that :func:`replace_batchnorm_with_instancenorm` was
    applied to, outermost first."""
    from .resnet import _SWITCHED

    return [n for n, m in model.named_modules() if getattr(m, _SWITCHED, False)]


def _switch_norms(model: nn.Module, names: Any, cpath: Path) -> None:
    """Apply :func:`replace_batchnorm_with_instancenorm` again to the submodules a card lists."""
    from .resnet import replace_batchnorm_with_instancenorm

    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ModelError(f"{cpath}: the card's {_INSTANCE_NORM_KEY!r} must be a list of module names, got {names!r}")
    for n in names:
        try:
            sub = model.get_submodule(n)
        except AttributeError:
            raise ModelError(f"{cpath}: the card's {_INSTANCE_NORM_KEY!r} names {n!r}, which the model has no "
                             "module of") from None
        new = replace_batchnorm_with_instancenorm(sub)
        if new is not sub:  # a single batch norm layer: put its replacement in its place
            parent, _, attr = n.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)


def card_path(path: str | Path) -> Path:
    """The model card beside the weights file ``path`` (same name, suffix ``.json``)."""
    return Path(path).with_suffix(".json")


def save(model: nn.Module, path: str | Path, card: Mapping[str, Any] | None = None, *,
         dtype: str = "float32") -> Path:
    """Save the weights of ``model`` to ``path`` and its model card beside it.

    Parameters
    ----------
    model : nn.Module
        A registered architecture (made by :func:`create`, or directly from its class).
    path : str or Path
        The weights file, conventionally ``*.pt`` (a ``state_dict``). The card goes to
        ``path.with_suffix(".json")``.
    card : mapping, optional
        Extra card entries: ``training_data``, ``metrics``, ``licence`` and any other JSON keys.
        ``architecture`` and ``parameters`` are filled in from the model and cannot be overridden.
    dtype : {"float32", "float16"}
        Storage of the floating-point weights. ``"float16"`` halves the file (for shipping); :func:`load`
        returns a float32 model either way, and the card records ``weights_dtype``.

    Returns
    -------
    Path
        The card's path.
    """
    from histoflow import __version__

    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path) or Path(path).name in ("", ".", ".."):
        raise ParameterError(f"save: path must name a weights file (e.g. 'model.pt'), got {path!r}")
    if card is not None and not isinstance(card, Mapping):
        raise ParameterError(f"save: card must be a dict of card entries, got {type(card).__name__} {card!r:.60}")
    path = Path(path)
    if path.suffix == ".json":
        raise ParameterError(f"save: {path} would be overwritten by the model card; use a .pt file name")
    if dtype not in ("float32", "float16"):
        raise ParameterError(f"save: dtype must be 'float32' or 'float16', got {dtype!r}")
    name = _name_of(model)
    full: dict[str, Any] = {"architecture": name, "parameters": _parameters_of(model, name),
                            "histoflow_version": __version__, "torch_version": torch.__version__,
                            "saved": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    full.update(_CARD_DEFAULTS)
    # what the model's own card says (a loaded model, an ensemble: its pixel size, task, post-processing,
    # classes, training data ...) travels with it, under what ``card=`` adds or changes
    own = {k: v for k, v in dict(getattr(model, "card", None) or {}).items() if k not in _OWN_KEYS}
    full.update(own)
    full["weights_dtype"] = dtype
    switched = _instance_norm_switches(model)
    if switched:
        full[_INSTANCE_NORM_KEY] = switched
    check_card_identity(model, card or {}, "save: ")
    for k, v in dict(card or {}).items():
        if k in _OWN_KEYS:  # the model's own (checked above), and the date and versions of this save, whatever
            continue        # the card given says (a fine-tuned model's card=parent.card: the parent's date)
        full[k] = v
    try:
        text = json.dumps(_jsonable(full), indent=2, sort_keys=False, allow_nan=False)
    except TypeError as e:
        raise ParameterError(f"save: the card is not JSON-serialisable: {e}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if dtype == "float16":
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    from ...utils import atomic_output

    cpath = card_path(path)
    with atomic_output(path, path.suffix) as tmp:  # whole or not at all: a kill mid-write keeps the old file
        torch.save(state, tmp)
    with atomic_output(cpath, ".json") as tmp:
        Path(tmp).write_text(text + "\n", encoding="utf-8")
    return cpath


def read_card(path: str | Path) -> dict[str, Any]:
    """Read and check the model card of the weights file ``path`` (or the card itself)."""
    cpath = card_path(path)
    if not cpath.is_file():
        raise ModelError(f"{cpath}: model card not found (expected beside the weights {Path(path).name})")
    try:
        card = json.loads(cpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: too deep
        raise ModelError(f"{cpath}: not a readable JSON model card ({type(e).__name__}: {e})") from None
    if not isinstance(card, dict):
        raise ModelError(f"{cpath}: a model card must be a JSON object, got {type(card).__name__}")
    if not isinstance(card.get("architecture"), str):
        raise ModelError(f"{cpath}: the card has no 'architecture' name")
    if not isinstance(card.get("parameters", {}), dict):
        raise ModelError(f"{cpath}: the card's 'parameters' must be an object")
    return card


def load(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Re-create a saved model from its card and weights; returned in eval mode.

    Parameters
    ----------
    path : str or Path
        The weights file given to :func:`save` (the card is found beside it; passing the
        ``.json`` card instead also works when the weights are ``<same name>.pt``).
    map_location : str or torch.device
        Where the weights are loaded (``"cpu"`` by default).

    Returns
    -------
    nn.Module
        The model, in eval mode, with the card as ``model.card``.

    Raises
    ------
    ModelError
        When the card or the weights are missing, unreadable or do not match; the message names
        the file.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path) or Path(path).name in ("", ".", ".."):
        raise ModelError(f"load: path must name a saved model's weights file (e.g. 'model.pt'), got {path!r}")
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".pt")
    card = read_card(path)
    cpath = card_path(path)
    name, params = card["architecture"], card.get("parameters", {})
    try:
        model = create(name, **params)
    except UnknownModelError as e:
        raise ModelError(f"{cpath}: {e}") from e
    except (TypeError, ValueError) as e:
        raise ModelError(f"{cpath}: cannot create {name!r} with parameters {params}: {e}") from e
    if _INSTANCE_NORM_KEY in card:  # saved after replace_batchnorm_with_instancenorm: the same layers again
        _switch_norms(model, card[_INSTANCE_NORM_KEY], cpath)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found (card {cpath.name} is there)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for damaged or foreign files
        raise ModelError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") from e
    if not isinstance(state, Mapping):
        raise ModelError(f"{path}: expected a state_dict, got {type(state).__name__}")
    odd = [k for k in state if not isinstance(k, str)]
    if odd:
        raise ModelError(f"{path}: not a state_dict: its keys must be parameter names, it has {odd[:3]!r}")
    try:
        # float16 weights (save(dtype="float16")) are copied into the float32 parameters
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: the weights do not match {name} {params}: {e}") from e
    model.to(map_location)
    model.card = card
    return model.eval()


def ensemble(paths: Sequence[str | Path], weights: Sequence[float] | None = None,
             map_location: str | torch.device = "cpu") -> nn.Module:
    """One model averaging the outputs of the saved models ``paths`` (same input, same output shape).

    Each member keeps its trained weights; the result is an ``"ensemble"`` architecture that
    :func:`save` writes as one file and :func:`load` reads back, and that exports to ONNX as one graph.
    The ensemble's ``card`` holds the members' cards under ``"members"``.

    Raises
    ------
    ModelError
        When a member cannot be loaded, or the members disagree on their input (``mpp``, ``task``).
    """
    from .ensembles import Ensemble

    paths = [Path(p) for p in paths]
    if not paths:
        raise ModelError("ensemble: give at least one saved model")
    nets = [load(p, map_location=map_location) for p in paths]
    for key in ("mpp", "task", "input"):
        seen = {json.dumps(n.card.get(key)) for n in nets}
        if len(seen) > 1:
            raise ModelError(f"ensemble: the members disagree on {key!r} ({', '.join(map(str, paths))}): "
                             f"{sorted(seen)}")
    specs = [{"architecture": n.card["architecture"], "parameters": n.card.get("parameters", {})} for n in nets]
    try:
        ens = create("ensemble", members=specs, weights=weights)
    except (TypeError, ValueError) as e:
        raise ModelError(f"ensemble of {', '.join(map(str, paths))}: {e}") from e
    for net, member, p in zip(ens.nets, nets, paths):
        _switch_norms(net, _instance_norm_switches(member), card_path(p))  # a member with instance norms: so here
        net.load_state_dict(member.state_dict())
    ens.to(map_location)
    # every card entry the members agree on (pixel size, task, post-processing, classes ...), not the
    # per-member ones (architecture, weights, training records)
    skip = {*_OWN_KEYS, "metrics", "training", "split", "members", "path"}
    keys = set(nets[0].card) - skip
    ens.card = {k: nets[0].card[k] for k in sorted(keys)
                if all(json.dumps(n.card.get(k), sort_keys=True, default=str) ==
                       json.dumps(nets[0].card[k], sort_keys=True, default=str) for n in nets)}
    ens.card["members"] = [dict(n.card, path=str(p)) for n, p in zip(nets, paths)]
    return ens.eval()


_LAZY = {
    "Ensemble": "histoflow.ml.models.ensembles",
    "UNet": "histoflow.ml.models.unet",
    "MobileNetV2": "histoflow.ml.models.mobilenet",
    "ResNet": "histoflow.ml.models.resnet",
    "replace_batchnorm_with_instancenorm": "histoflow.ml.models.resnet",
    "RCCNet": "histoflow.ml.models.rccnet",
    "HoVerNet": "histoflow.ml.models.hovernet",
    "hovernet_postprocess": "histoflow.ml.models.hovernet",
}


def __getattr__(attr: str) -> Any:
    if attr in _LAZY:
        return getattr(importlib.import_module(_LAZY[attr]), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")

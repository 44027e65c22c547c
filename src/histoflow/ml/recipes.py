"""Training from a YAML configuration: ``histoflow train CONFIG.yaml``.

A configuration names a ``task`` (a recipe below), the ``data``, the ``model`` (a registry name and its
parameters), the ``train`` settings of :class:`~histoflow.ml.train.Trainer`, the ``output`` folder and
the ``card`` fields saved with the weights. Relative paths are taken from the configuration file's
folder. Example: ``configs/nucleus_monuseg.yaml`` (the shipped nucleus model).

Tasks
-----
``nucleus_segmentation``
    Nucleus instances from annotated images (MoNuSeg layout: ``<ID>.png`` + Aperio ``<ID>.xml``; all of
    ``data.root`` or the ``data.ids`` listed, ``data.val_ids`` held out for validation);
    a U-Net with 4 outputs (nucleus logits + HV maps), HoVer-Net loss, validation Dice / AJI / PQ.
``tile_classification``
    A classifier on the tiles of h5path files and one of their tile labels.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import yaml

from ..errors import HistoflowError, ParameterError
from .train import Trainer, _number, json_problem

__all__ = ["ConfigError", "load_config", "train_from_config", "TASKS"]


class ConfigError(HistoflowError, ValueError):
    """A training configuration is missing something or has a wrong value: names the key."""


def load_config(path) -> dict:
    """Read a YAML training configuration; relative paths are resolved against its folder."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such configuration file")
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a folder; give the configuration's YAML file")
    try:
        from ..utils import yaml_load

        with open(path, encoding="utf-8") as f:
            cfg = yaml_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; a training configuration is YAML (see configs/)") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: a training configuration is a mapping with task, data, model, train")
    cfg["_base"] = os.path.dirname(os.path.abspath(path))
    cfg["_path"] = path
    check_config(cfg)
    return cfg


#: the sections of a configuration, and the keys of those that are fixed here (train: Trainer's settings)
SECTIONS = ("task", "data", "model", "train", "loss", "output", "card")
MODEL_KEYS = ("name", "params", "init")
NUCLEUS_DATA_KEYS = ("root", "ids", "val_ids", "mpp", "augment", "crop", "crops_per_epoch", "postprocess")


def check_config(cfg: dict) -> dict:
    """The form of a configuration, before any work: known sections of the right kinds, known keys in
    ``model`` (and in ``data`` for the nucleus task), whole numbers where counts go. A misspelt key
    (``trian:``, ``val_id:``, ``model.parmas``) would otherwise leave the run on its defaults without a word.
    Raises :class:`ConfigError` naming the file."""
    where = cfg.get("_path", "configuration")
    unknown = sorted(k for k in cfg if k not in SECTIONS and not str(k).startswith("_"))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; a configuration has {', '.join(SECTIONS)}")
    if not isinstance(cfg.get("task"), str):
        raise ConfigError(f"{where}: task names the recipe ({', '.join(sorted(TASKS))}), not {cfg.get('task')!r}")
    for key in ("data", "model", "train", "loss", "card"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ConfigError(f"{where}: {key} is a mapping of settings (key: value lines under it), not "
                              f"{cfg[key]!r}")
    if cfg.get("output") is not None and not isinstance(cfg["output"], str):
        raise ConfigError(f"{where}: output is a folder name, not {cfg['output']!r}")
    bad = sorted(set(cfg.get("model") or {}) - set(MODEL_KEYS))
    if bad:
        raise ConfigError(f"{where}: unknown model setting(s) {bad}; known: {', '.join(MODEL_KEYS)}")
    if cfg["task"] == "nucleus_segmentation":
        d = cfg.get("data") or {}
        bad = sorted(set(d) - set(NUCLEUS_DATA_KEYS))
        if bad:
            raise ConfigError(f"{where}: unknown data setting(s) {bad}; known: {', '.join(NUCLEUS_DATA_KEYS)}")
        for key in ("ids", "val_ids"):
            v = d.get(key)
            if v is not None and not (isinstance(v, list) and all(isinstance(i, str) for i in v)):
                raise ConfigError(f"{where}: data.{key} is a list of image names (one '- NAME' line each), not "
                                  f"{v!r}")
        for key in ("crop", "crops_per_epoch"):
            v = d.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{where}: data.{key} must be a whole number >= 1, not {v!r}")
        _postprocess(cfg)
    if cfg["task"] == "tile_classification":
        d = cfg.get("data") or {}
        for key in ("train", "val"):
            v = d.get(key)
            if key not in d or key == "val" and v in (None, []):  # no data.train: "missing key data.train" later
                continue
            if not (isinstance(v, str) and v or isinstance(v, list) and v and all(isinstance(p, str) and p for p in v)):
                raise ConfigError(f"{where}: data.{key} is an h5path file or a list of them (one '- FILE' line each), "
                                  f"not {v!r}")
    monitor = (cfg.get("train") or {}).get("monitor")
    if monitor is not None:
        allowed, why = ["val_loss", "train_loss"], ""
        if cfg["task"] == "nucleus_segmentation":
            if (cfg.get("data") or {}).get("val_ids"):
                allowed += ["dice", "aji", "pq"]  # the validation metrics, with validation images
            else:
                why = " (dice, aji and pq need validation images: data.val_ids)"
        if monitor not in allowed:
            raise ConfigError(f"{where}: train.monitor is one of {', '.join(allowed)}{why}, not {monitor!r}")
    if "card" in cfg and cfg["card"] is None:  # `card:` with only comments under it
        cfg["card"] = {}
    card = cfg.get("card") or {}
    if not isinstance(card, dict):
        raise ConfigError(f"{where}: card is a mapping of model-card fields, not {card!r}")
    for key in ("training", "metrics"):
        if card.get(key) is not None and not isinstance(card[key], dict):
            raise ConfigError(f"{where}: card.{key} is a mapping (the run adds its own entries to it), not "
                              f"{card[key]!r}")
    for key, what in (("architecture", "model.name"), ("parameters", "model.params")):
        if key in card:
            raise ConfigError(f"{where}: card.{key} is written from the model ({what}); leave it out")
    if cfg.get("task") == "nucleus_segmentation" and "postprocess" in card:  # the run's card got it, while the
        raise ConfigError(f"{where}: card.postprocess is written from data.postprocess (or model.init's card), "
                          "which chooses the epoch; give it as data.postprocess")  # epoch was chosen by another
    problem = json_problem(card, "card")
    if problem:  # found now, not when best.pt is first saved after an epoch
        raise ConfigError(f"{where}: {problem}")
    if card.get("mpp") is not None:
        _positive(cfg, "card.mpp", card["mpp"])
    return cfg


def _positive(cfg, key, value) -> float:
    """``value`` as a number > 0 (numeric strings read as numbers, as train.lr is), or a ConfigError naming ``key``."""
    v = _number(value)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
        raise ConfigError(f"{cfg.get('_path', 'configuration')}: {key} must be a number > 0 (µm per pixel), "
                          f"not {value!r}")
    return float(v)


def _postprocess(cfg) -> dict:
    """``data.postprocess`` checked: the keywords of :func:`~histoflow.ml.nucleus.maps_to_instances` with values it
    can use (numeric strings read as numbers, as ``train.lr`` is); a ConfigError names the file and the key."""
    import inspect

    from .nucleus import maps_to_instances

    where = cfg.get("_path", "configuration")
    post = (cfg.get("data") or {}).get("postprocess")
    if post is None:
        return {}
    known = [p for p in inspect.signature(maps_to_instances).parameters if p not in ("prob", "hv")]
    if not isinstance(post, dict) or set(post) - set(known):
        raise ConfigError(f"{where}: data.postprocess takes {', '.join(known)}, not {post!r}")
    out = {}
    for key, value in post.items():
        v = _number(value)
        number = not isinstance(v, bool) and isinstance(v, (int, float)) and bool(np.isfinite(v))
        if key in ("fg_threshold", "marker_threshold"):
            if not (number and 0 <= v <= 1):
                raise ConfigError(f"{where}: data.postprocess.{key} must be a number from 0 to 1, not {value!r}")
            v = float(v)
        elif key == "sobel_ksize":
            if not (number and float(v).is_integer() and v % 2 == 1 and 1 <= v <= 31):
                raise ConfigError(f"{where}: data.postprocess.sobel_ksize must be an odd whole number from 1 to 31, "
                                  f"not {value!r}")
            v = int(v)
        elif key == "min_size":
            if not (number and v >= 0):
                raise ConfigError(f"{where}: data.postprocess.min_size must be a number of pixels >= 0, not {value!r}")
        elif key == "ranges" and v is not None:
            from .models.hovernet import _check_ranges

            try:
                _check_ranges(v)
            except ParameterError as e:
                raise ConfigError(f"{where}: data.postprocess.ranges: {e}") from None
        out[key] = v
    return out


def _need(cfg, *keys):
    node = cfg
    for i, k in enumerate(keys):
        if not isinstance(node, dict) or k not in node:
            raise ConfigError(f"{cfg.get('_path', 'configuration')}: missing key {'.'.join(keys[:i + 1])}")
        node = node[k]
    return node


def _path(cfg, p):
    p = os.path.expanduser(str(p))
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(cfg.get("_base", "."), p))


def _augmenter(spec: dict | None, seed: int, images=None):
    """The training augmentation of a config's ``data.augment``; ``images`` (the training images) are what
    ``randstain`` fits its colour templates to."""
    if spec is not None and not isinstance(spec, dict):
        raise ConfigError(f"data.augment is a mapping of augmentations (flip: true, zoom: [0.8, 1.25], ...), "
                          f"not {spec!r}")
    try:
        return _make_augmenter(dict(spec or {}), seed, images)
    except HistoflowError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"data.augment: a value does not fit its augmentation ({e}); ranges are pairs "
                          "(zoom: [0.8, 1.25]), stain: [sigma1, sigma2], hsv: [h, s, v]; see docs/ml.md") from None


def _numbers(key, value, form):
    """The numbers of a range-like augmentation value, or a ConfigError saying the form it takes."""
    n = form[:form.index("]")].count(",") + 1
    if (not isinstance(value, (list, tuple)) or len(value) != n
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"data.augment.{key} is {form}, not {value!r}")
    return tuple(float(v) for v in value)


def _switch(key, value) -> bool:
    """An on/off augmentation (``flip``, ``rot90``): true or false (also 1 / 0, and an empty value: off); text
    is refused (a quoted ``"false"`` was on)."""
    if value is None:
        return False
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ConfigError(f"data.augment.{key} is true or false, not {value!r}")


def _strength(key, value, form):
    """The number of a one-number augmentation, None when it is off (absent, false or 0); ``true`` and text
    are refused (``brightness: true`` was the largest strength there is, shifts of up to the whole range)."""
    if value is None or value is False:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"data.augment.{key} is {form}, not {value!r}")
    return float(value) or None


def _make_augmenter(spec: dict, seed: int, images):
    from . import augment as A

    ops = []
    if _switch("flip", spec.pop("flip", True)):
        ops.append(A.RandomFlip())
    if _switch("rot90", spec.pop("rot90", True)):
        ops.append(A.RandomRotate90())
    if (z := spec.pop("zoom", None)):
        ops.append(A.RandomZoom(_numbers("zoom", z, "[smallest, largest], e.g. [0.8, 1.25]"), p=0.5))
    if (s := spec.pop("stain", None)):
        ops.append(A.StainAugment(*_numbers("stain", s, "[sigma1, sigma2], e.g. [0.2, 0.2]"), p=0.5))
    if (rs := spec.pop("randstain", None)) is not None:
        if images is None:
            raise ConfigError("data.augment.randstain is fitted to the training images, which only the nucleus "
                              "task reads as a whole; use stain or hsv for tile classification")
        if isinstance(rs, bool) or not isinstance(rs, (int, float)):
            raise ConfigError(f"data.augment.randstain is the templates' spread, a number >= 0 (1.0: as the "
                              f"training images vary), not {rs!r}")
        ops.append(A.RandStainNA.fit(images, spread=float(rs), p=0.5))
    if (h := spec.pop("hsv", None)):
        ops.append(A.HSVShift(*_numbers("hsv", h, "[h, s, v], e.g. [0.04, 0.2, 0.15]"), p=0.5))
    if (b := _strength("brightness", spec.pop("brightness", None), "the largest shift, a fraction of the range "
                                                                     "(e.g. 0.15)")):
        ops.append(A.Brightness(b, p=0.5))
    if (c := _strength("contrast", spec.pop("contrast", None), "the largest change of contrast (e.g. 0.15)")):
        ops.append(A.Contrast(c, p=0.5))
    if (bl := _strength("blur", spec.pop("blur", None), "the largest Gaussian sigma in pixels (e.g. 1.0)")):
        ops.append(A.Blur(bl, p=0.3))
    if (n := _strength("noise", spec.pop("noise", None), "the largest noise sigma, a fraction of the range "
                                                        "(e.g. 0.03)")):
        ops.append(A.GaussianNoise(n, p=0.3))
    if spec:
        raise ConfigError(f"unknown augmentation(s) {sorted(spec)}; known: flip, rot90, zoom, stain, hsv, "
                          "randstain, brightness, contrast, blur, noise")
    return A.Compose(ops, seed=seed)


def _check_nucleus_model(cfg, model):
    """The nucleus task's model takes RGB images and gives 4 maps per pixel, checked on a blank image before any
    work (a model with 3 outputs failed at the first batch, after the run folder was cleared, naming no key)."""
    side = max(64, int(getattr(model, "size_divisor", 16) or 16))
    what = f"model {cfg['model'].get('name')!r} with model.params {cfg['model'].get('params') or {}}"
    was = model.training
    model.eval()  # (batch-norm statistics untouched)
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, 3, side, side))
    except Exception as e:  # noqa: BLE001 - any failure: the model cannot do the task
        channels = getattr(model, "in_channels", 3)
        advice = "set model.params.in_channels: 3" if channels != 3 else "the nucleus task needs a model that " \
            "takes RGB images of any size divisible by its pooling and gives 4 maps per pixel (e.g. unet)"
        raise ConfigError(f"{cfg.get('_path')}: {what} cannot take the nucleus task's RGB images "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); {advice}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or tuple(out.shape[1:]) != (4, side, side):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        advice = "set model.params.out_channels: 4" if isinstance(out, torch.Tensor) and out.ndim == 4 and \
            tuple(out.shape[2:]) == (side, side) else "use a model with one output tensor of that shape (e.g. unet)"
        raise ConfigError(f"{cfg.get('_path')}: the nucleus task needs 4 maps per pixel (background and nucleus "
                          f"logits, horizontal and vertical maps), (1, 4, {side}, {side}) for a {side} px image; "
                          f"{what} gives {got}; {advice}")


def _model(cfg):
    from . import models

    m = _need(cfg, "model")
    name, params = _need(cfg, "model", "name"), m.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{cfg.get('_path')}: model.params is a mapping of the model's parameters, not {params!r}")
    try:
        model = models.create(name, **params)
    except (TypeError, ValueError) as e:  # a parameter the model does not take, or a bad value
        if isinstance(e, HistoflowError) and not isinstance(e, ParameterError):  # e.g. an unknown model name,
            raise ConfigError(f"{cfg.get('_path')}: model.name: {e}") from None   # whose message lists the known ones
        raise ConfigError(f"{cfg.get('_path')}: model {name!r} cannot be made with model.params {params} "
                          f"({e})") from None
    if m.get("init"):  # fine-tuning: start from the weights of an earlier run (same architecture)
        path = _path(cfg, m["init"])
        try:
            start = models.load(path)
            model.load_state_dict(start.state_dict())
        except (models.ModelError, RuntimeError) as e:
            raise ConfigError(f"{cfg.get('_path')}: model.init {path} cannot start this model ({e})") from None
    return model


def _loader_settings(cfg, batch_size=8):
    """``train.batch_size``, ``train.num_workers`` and ``train.seed``, checked (whole numbers: batch >= 1,
    workers and seed >= 0)."""
    t = cfg.get("train") or {}
    out = {}
    for key, default, low in (("batch_size", batch_size, 1), ("num_workers", 0, 0), ("seed", 0, 0)):
        v = t.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low or (key == "seed" and v >= 2 ** 62):
            high = " and below 2**62" if key == "seed" else ""
            raise ConfigError(f"{cfg.get('_path')}: train.{key} must be a whole number >= {low}{high}, not {v!r}")
        out[key] = int(v)
    return out


def _trainer(cfg, model, loss_fn, **kw) -> Trainer:
    t = dict(cfg.get("train") or {})
    known = {"epochs", "lr", "weight_decay", "accumulate", "schedule", "patience", "seed", "device", "amp",
             "progress", "monitor", "mode", "ema"}
    unknown = set(t) - known - {"batch_size", "num_workers"}
    if unknown:
        raise ConfigError(f"{cfg.get('_path')}: unknown train setting(s) {sorted(unknown)}; known: {sorted(known)}")
    card = dict(cfg.get("card") or {})
    card.setdefault("config", os.path.basename(cfg.get("_path", "")))
    try:
        return Trainer(model, loss_fn, out_dir=_path(cfg, _need(cfg, "output")), card=card,
                       run_settings=_run_settings(cfg), **{k: v for k, v in t.items() if k in known}, **kw)
    except ParameterError as e:
        raise ConfigError(f"{cfg.get('_path')}: train: {e}") from None


#: configuration keys a resumed run may change: how long and how it runs, not what it learns
RESUMABLE = ("train.epochs", "train.patience", "train.progress", "train.num_workers", "train.device", "output")


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _run_settings(cfg) -> dict:
    """The configuration a resumed run must share with the run it continues (``Trainer(run_settings=...)``): every
    key but the card (the run fills it in) and those in ``RESUMABLE``, by dotted name."""
    return {k: v for k, v in _flat({k: v for k, v in cfg.items() if not k.startswith("_") and k != "card"}).items()
            if k not in RESUMABLE}


# ---------------------------------------------------------------------------------------- tasks
def _nucleus_segmentation(cfg, resume=False):
    from ..datasets import load_monuseg, monuseg_ids
    from .data import quiet_interrupts
    from . import metrics
    from .losses import HoVerNetLoss
    from .nucleus import (NucleusCrops, NucleusImages, bf16_is_fast, maps_to_instances, nucleus_batch_loss,
                          split_outputs)

    d = _need(cfg, "data")
    root = _path(cfg, _need(cfg, "data", "root"))
    val_ids = list(d.get("val_ids") or [])
    ids = monuseg_ids(root)
    if d.get("ids"):
        missing = [i for i in d["ids"] if i not in ids]
        if missing:
            raise ConfigError(f"data.ids {missing} are not in {root}")
        ids = list(d["ids"])
    unknown = [i for i in val_ids if i not in ids]
    if unknown:
        raise ConfigError(f"data.val_ids {unknown} are not in {root}")
    train_ids = [i for i in ids if i not in val_ids]
    settings = _loader_settings(cfg)
    seed = settings["seed"]
    mpp = d.get("mpp")  # resample the images (e.g. 0.5 for a 20x model); None: as scanned
    train_samples = load_monuseg(root, train_ids, mpp=mpp)
    spec = d.get("augment")
    zoom = None
    if isinstance(spec, dict) and spec.get("zoom"):
        # zoom is done by the crops, scaling the window they read, so that a zoom-out keeps its margin of
        # tissue around the crop (whole-nucleus HV maps at the crop's edges) instead of padding with glass
        spec = dict(spec)
        zoom = spec.pop("zoom")
        if not isinstance(zoom, (list, tuple)) or len(zoom) != 2:
            raise ConfigError(f"data.augment.zoom is a pair [smallest, largest] of scale factors, e.g. "
                              f"[0.8, 1.25], not {zoom!r}")
    augment = _augmenter(spec, seed, images=[s["image"] for s in train_samples])
    try:
        train = NucleusCrops(train_samples, crop=d.get("crop") or 256,
                             length=d.get("crops_per_epoch") or 256, augment=augment, seed=seed, zoom=zoom)
    except ParameterError as e:
        raise ConfigError(f"{cfg.get('_path')}: data: {e}") from None
    t = cfg.get("train") or {}
    # not persistent_workers: workers take a copy of the dataset when an epoch's iterator starts, and only
    # that copy knows the epoch that the trainer sets (set_epoch), i.e. which crops and augmentations to make
    loader = torch.utils.data.DataLoader(train, batch_size=settings["batch_size"], shuffle=False,
                                         num_workers=settings["num_workers"], worker_init_fn=quiet_interrupts)
    torch.manual_seed(seed)  # the initial weights too: the same config trains the same model in any process
    model = _model(cfg)
    _check_nucleus_model(cfg, model)
    # the post-processing that chooses the epoch is the one the model's card gives NucleusSegmentation:
    # data.postprocess, else (fine-tuning) the starting model's own
    post = _postprocess(cfg)
    if not post and (cfg.get("model") or {}).get("init"):
        from . import models

        post = dict(models.read_card(_path(cfg, cfg["model"]["init"])).get("postprocess") or {})
    val_loader = validate = None
    if val_ids:  # whole images, padded to what the network needs (a 6-level U-Net: multiples of 32)
        val_loader = torch.utils.data.DataLoader(
            NucleusImages(load_monuseg(root, val_ids, mpp=mpp), divisor=int(getattr(model, "size_divisor", 16))),
            batch_size=1)

        @torch.no_grad()
        def _validate(model, vl, device):
            model.eval()
            dices, ajis, pqs = [], [], []
            for batch in vl:
                h, w = (int(v) for v in batch["shape"][0])
                amp = bool(t.get("amp")) and bf16_is_fast(device)  # as the trainer: float32 where bf16 is emulated
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = split_outputs(model(batch["image"].to(device)).float())
                prob = torch.softmax(out["nucleus_prediction"][0], 0)[1, :h, :w].cpu().numpy()
                hv = out["horizontal_vertical"][0, :, :h, :w].cpu().numpy()
                pred = maps_to_instances(prob, hv, **post)
                true = batch["instances"][0, :h, :w].numpy()
                dices.append(metrics.dice(pred > 0, true > 0))
                ajis.append(metrics.aji(true, pred))
                pqs.append(metrics.panoptic_quality(true, pred).pq)
            # an image with no nucleus, true or found, scores NaN: left out, not poisoning the epoch's mean
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: the trainer warns about that
                return {"dice": float(np.nanmean(dices)), "aji": float(np.nanmean(ajis)),
                        "pq": float(np.nanmean(pqs))}

        validate = _validate

    card = cfg.setdefault("card", {})
    card.setdefault("task", "nucleus_segmentation")
    if post:
        card["postprocess"] = post  # (check_config refuses one of the config's own)
    if card.get("mpp") is not None:
        card["mpp"] = _positive(cfg, "card.mpp", card["mpp"])
    if mpp is not None:
        if card.get("mpp") is not None and abs(card["mpp"] - float(mpp)) > 1e-6:
            raise ConfigError(f"card.mpp {card['mpp']} disagrees with data.mpp {mpp}: the model runs at the data's")
        card["mpp"] = float(mpp)
    elif card.get("mpp") is None:  # images as scanned: the model runs at their pixel size (not an assumed 40x)
        card["mpp"] = round(float(np.median([s["mpp"] for s in train_samples])), 4)
    card.setdefault("outputs", ["background logit", "nucleus logit", "horizontal map", "vertical map"])
    card.setdefault("split", {"train": train_ids, "validation": val_ids})
    try:
        loss = HoVerNetLoss(**(cfg.get("loss") or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cfg.get('_path')}: loss: {e}") from None
    trainer = _trainer(cfg, model, loss, batch_loss=nucleus_batch_loss, validate=validate)
    return trainer, trainer.fit(loader, val_loader, resume=resume)


def _tile_classification(cfg, resume=False):
    from .data import TileDataset, quiet_interrupts

    d = _need(cfg, "data")
    label = _need(cfg, "data", "label")
    unknown = set(d) - {"train", "val", "label", "augment"}
    if unknown:
        raise ConfigError(f"{cfg.get('_path')}: unknown data setting(s) {sorted(unknown)}; known: augment, label, "
                          "train, val")
    if cfg.get("loss"):
        raise ConfigError(f"{cfg.get('_path')}: tile_classification trains with cross entropy and takes no loss "
                          "settings; remove the loss section")
    settings = _loader_settings(cfg, batch_size=16)
    augment = _augmenter(d.get("augment"), settings["seed"]) if d.get("augment") else None

    def datasets(paths, transform=None):
        return [TileDataset(_path(cfg, p), labels=(label,), transform=transform)
                for p in ([paths] if isinstance(paths, str) else paths)]

    train_sets = datasets(_need(cfg, "data", "train"), augment)  # augmented; validation tiles as they are
    val_sets = datasets(d["val"]) if d.get("val") else []
    classes = _label_classes(cfg, label, train_sets + val_sets)  # str labels: names in sorted order; else None
    index = {c: i for i, c in enumerate(classes or [])}

    def batch_loss(model, batch, loss_fn):
        logits = model(batch["image"])
        y = batch["labels"][label]
        if classes is not None:  # class names: their index in the sorted names
            y = torch.tensor([index[v] for v in y], device=logits.device)
        y = y.long()
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
            bad = int(y.max()) if int(y.min()) >= 0 else int(y.min())
            raise ConfigError(f"{cfg.get('_path')}: label {label!r} has class {bad}, but the model gives "
                              f"{logits.shape[1]} outputs (classes 0..{logits.shape[1] - 1}): set the model's "
                              "number of classes")
        return loss_fn(logits, y)

    bs, nw = settings["batch_size"], settings["num_workers"]
    train = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset(train_sets), batch_size=bs, shuffle=True,
                                        num_workers=nw, worker_init_fn=quiet_interrupts)
    val = None
    if val_sets:
        val = torch.utils.data.DataLoader(torch.utils.data.ConcatDataset(val_sets), batch_size=bs, num_workers=nw,
                                          worker_init_fn=quiet_interrupts)
    card = cfg.setdefault("card", {})
    card.setdefault("task", "tile_classification")
    card.setdefault("label", label)
    if classes is not None:
        card.setdefault("classes", classes)

    def names(paths):
        return [os.path.basename(p) for p in ([paths] if isinstance(paths, str) else paths)]

    card.setdefault("split", {"train": names(d["train"]), "validation": names(d["val"]) if d.get("val") else []})
    if card.get("training_data") is None:
        card["training_data"] = f"tiles of {', '.join(card['split']['train'])}, label {label!r}"
    torch.manual_seed(settings["seed"])
    model = _model(cfg)
    _check_class_count(cfg, model, label, classes, train_sets + val_sets)
    trainer = _trainer(cfg, model, torch.nn.CrossEntropyLoss(), batch_loss=batch_loss)
    return trainer, trainer.fit(train, val, resume=resume)


def _check_class_count(cfg, model, label, classes, sets):
    """The model gives an output per class, checked on one tile before any work: a class past its outputs failed
    at the first batch, after ``--overwrite`` had cleared the earlier run's folder."""
    if not sets or not len(sets[0]):
        return
    x = sets[0][0]["image"].unsqueeze(0)
    was = model.training
    model.eval()  # (batch-norm statistics untouched)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:  # noqa: BLE001 - any failure: the model cannot take the tiles
        raise ConfigError(f"{cfg.get('_path')}: model {cfg['model'].get('name')!r} cannot take the tiles "
                          f"{tuple(x.shape[1:])} ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ConfigError(f"{cfg.get('_path')}: tile_classification needs a classifier giving (batch, classes); "
                          f"model {cfg['model'].get('name')!r} gives {got}")
    n = out.shape[1]
    if classes is not None:
        need, what = len(classes), f"{len(classes)} classes ({', '.join(map(str, classes[:5]))}" \
            f"{', ...' if len(classes) > 5 else ''})"
    else:
        values = [int(v) for ds in sets for v in ds.label_column(label)]
        lo, hi = min(values), max(values)
        if lo < 0:
            raise ConfigError(f"{cfg.get('_path')}: label {label!r} has class {lo}; classes are 0..k-1")
        need, what = hi + 1, f"class {hi}"
    if need > n:
        raise ConfigError(f"{cfg.get('_path')}: label {label!r} has {what}, but the model gives {n} outputs "
                          f"(classes 0..{n - 1}): set the model's number of classes (e.g. num_classes: {need})")


def _label_classes(cfg, label, sets):
    """The class names of a string label (sorted), None for a whole-number or boolean label; a float label,
    a label some tiles lack or a missing label is a ConfigError."""
    for ds in sets:  # every tile needs its class: a missing one reads as the fill ("" or -100), not a class
        fill = ds._missing.get(label)
        col = ds.label_column(label)
        if any(v is None or (fill is not None and fill == fill and type(v) is not bool and v == fill) for v in col):
            raise ConfigError(f"{ds.path}: some tiles have no {label!r} label; give every tile a class")
    kinds = set()
    for ds in sets:
        kind = ds._kinds.get(label)
        if kind in (None, "float"):  # a PathML (version 1) file, or floats that may all be whole: the values say
            col = ds.label_column(label)
            kind = "str" if any(isinstance(v, str) for v in col) else \
                "float" if any(isinstance(v, float) and not float(v).is_integer() for v in col) else "int"
        kinds.add(kind)
    if "float" in kinds:
        raise ConfigError(f"{cfg.get('_path')}: label {label!r} holds numbers with fractions (a score?); "
                          "tile_classification needs classes: whole numbers 0..k-1 or names")
    if "str" not in kinds:
        return None
    if kinds != {"str"}:
        raise ConfigError(f"{cfg.get('_path')}: label {label!r} holds names in some files and numbers in others")
    names = set()
    for ds in sets:
        names.update(ds.label_column(label))
    return sorted(names)


TASKS = {"nucleus_segmentation": _nucleus_segmentation, "tile_classification": _tile_classification}


def train_from_config(config, resume: bool = False):
    """Run the training a configuration describes; returns ``(trainer, history)``.

    ``config`` is a path to a YAML file or an already loaded dict (left as it is: the run fills in a copy).
    """
    import copy

    # a deep copy: the run fills in the card (split, mpp, post-processing), which a second run of the same dict
    # with other images or settings inherited
    cfg = load_config(config) if not isinstance(config, dict) else check_config(copy.deepcopy(config))
    where = cfg.get("_path", "configuration")
    task = _need(cfg, "task")
    if task not in TASKS:
        raise ConfigError(f"{where}: unknown task {task!r}; known: {', '.join(sorted(TASKS))}")
    if not cfg.get("output"):  # said before the data and the model are loaded, not after
        raise ConfigError(f"{where}: missing key output (the folder for the run's weights and metrics; "
                          "`histoflow train --output DIR` gives one too)")
    try:
        return TASKS[task](cfg, resume=resume)
    except ConfigError as e:  # every message names the file
        if str(e).startswith(str(where)):
            raise
        raise ConfigError(f"{where}: {e}") from None

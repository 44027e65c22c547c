"""A small, reproducible trainer.

:class:`Trainer` runs Adam with optional gradient accumulation, a one-cycle or plateau schedule, early
stopping on the validation loss, and keeps in ``out_dir``:

``last.ckpt``
    everything needed to resume (model, optimiser, schedule, epoch, history, best loss);
``best.pt`` + ``best.json``
    the weights with the lowest validation loss and their model card (:func:`histoflow.ml.models.save`);
``metrics.csv`` / ``metrics.json``
    one row per epoch: train loss, validation loss, the validation metrics, learning rate, seconds.

Runs are seeded: the same seed, data and settings give the same weights on the same machine (the data
order of epoch ``e`` is drawn from ``seed + e``, so a resumed run continues exactly where it stopped).

Examples
--------
>>> trainer = Trainer(model, loss_fn, epochs=20, lr=1e-3, out_dir="runs/a")   # doctest: +SKIP
>>> history = trainer.fit(train_loader, val_loader)                           # doctest: +SKIP
"""
from __future__ import annotations

import csv
import json
import math
import os
import pickle
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch

from ..errors import HistoflowError, ParameterError
from ..utils import progress_bar

__all__ = ["Trainer", "TrainingError", "default_batch_loss", "pick_device"]


class TrainingError(HistoflowError, RuntimeError):
    """Training cannot start or go on (bad checkpoint, non-finite loss, empty data)."""


def pick_device(device=None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device is not None and device != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ParameterError(f"device {device!r} is not a torch device ('cpu', 'cuda', 'cuda:1', 'mps' or "
                                 f"'auto'): {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ParameterError(f"device {device!r}: this torch has no usable CUDA GPU here; use 'cpu' or 'auto'")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ParameterError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ParameterError(f"device {device!r}: Apple's MPS is not available here; use 'cpu' or 'auto'")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _number(v):
    """``v``, or the number a numeric string spells (``"1e-3"``: YAML 1.1 reads exponents without a dot as
    strings)."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def json_problem(value, key: str) -> str | None:
    """Where ``value`` (a card, a setting) is not plain JSON: ``"<key>.<sub key> is <what>"`` for the first value that
    is not a string, a finite number, true / false / null, a list or a mapping; None when all are."""
    todo = [(key, value)]
    while todo:
        k, v = todo.pop()
        if v is None or isinstance(v, (str, bool)):
            continue
        if isinstance(v, (int, float)):
            if not math.isfinite(v):
                return f"{k} is {v!r}, which JSON cannot hold"
        elif isinstance(v, (list, tuple)):
            todo += [(f"{k}[{i}]", x) for i, x in reversed(list(enumerate(v)))]
        elif isinstance(v, Mapping):
            todo += [(f"{k}.{sub}", x) for sub, x in reversed(list(v.items()))]
        else:
            return (f"{k} is {v!r} (a {type(v).__name__}), which JSON cannot hold; write it as a string "
                    f"(quoted in YAML: '{v}') or a number")
    return None


def _to(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _datasets(dataset):
    """``dataset`` and the datasets inside it (``ConcatDataset``, ``Subset``), outermost first."""
    out, todo = [], [dataset]
    while todo:
        d = todo.pop(0)
        if d is None:
            continue
        out.append(d)
        todo += list(getattr(d, "datasets", []) or []) + ([d.dataset] if hasattr(d, "dataset") else [])
    return out


def _batch_size(batch) -> int:
    """Samples in a batch: the first dimension of its first tensor (1 when it holds none)."""
    def first(b):
        if torch.is_tensor(b):
            return int(b.shape[0]) if b.ndim else 1
        items = b.values() if isinstance(b, Mapping) else b if isinstance(b, (list, tuple)) else ()
        for v in items:
            n = first(v)
            if n:
                return n
        return 0
    return first(batch) or 1


def default_batch_loss(model, batch, loss_fn):
    """Loss of one batch: ``(x, y)`` pairs or dicts with ``"image"`` and ``"target"``."""
    if isinstance(batch, Mapping):
        if "image" not in batch or "target" not in batch:  # a TileDataset's (masks, labels) or a patch's label
            raise TrainingError(f"the batches hold {sorted(batch)}, not 'image' and 'target': give the Trainer a "
                                "batch_loss(model, batch, loss_fn) that says which of them the model is trained "
                                "on (e.g. loss_fn(model(batch['image']), batch['labels']['grade']))")
        x, y = batch["image"], batch["target"]
    else:
        x, y = batch[0], batch[1]
    return loss_fn(model(x), y)


class Trainer:
    """Train a model with Adam; see the module docstring for what it writes.

    Parameters
    ----------
    model : torch.nn.Module
    loss_fn : callable
        ``loss_fn(prediction, target) -> scalar tensor``.
    epochs : int
        Upper bound on epochs (early stopping may end sooner).
    lr, weight_decay : float
        Adam's learning rate (the peak rate for one-cycle) and weight decay.
    accumulate : int
        Batches whose gradients are summed before each optimiser step, each weighted by its samples: for a loss
        that is a mean over the batch's samples the step is that of one batch of all of them (a short last batch
        counts for its samples). A loss that is not (cross entropy that leaves out targets, e.g. the -100 that
        :class:`~histoflow.ml.data.TileDataset` gives missing labels; Dice over a whole batch) gives a step
        close to, not equal to, one batch's. ``train_loss`` is the epoch's mean loss per sample.
    schedule : {None, "onecycle", "plateau"}
        One-cycle (per step, cosine) or reduce-on-plateau (per epoch: the rate is halved when ``monitor``
        has not improved for more than ``max(1, patience // 2)`` epochs in a row; patience 4 when None).
    patience : int or None
        Stop after this many epochs without an improvement of ``monitor`` (None: never).
    seed : int
        Seeds torch at the start of every epoch with ``seed + epoch``.
    device : str or None
        Default: CUDA when present, else CPU.
    amp : bool
        bfloat16 autocast (CPU with AVX-512 BF16 or a CUDA GPU); the loss stays float32.
    out_dir : str or None
        Where checkpoints and metrics go (nothing is written when None). A new (not resumed) run removes an
        earlier run's files there (``RUN_FILES``) as it starts.
    batch_loss : callable, optional
        ``batch_loss(model, batch, loss_fn) -> loss`` for batches of another shape than
        :func:`default_batch_loss` expects.
    validate : callable, optional
        ``validate(model, val_loader, device) -> dict`` of extra metrics (e.g. Dice, AJI), run after the
        validation loss each epoch; values are logged, and ``monitor`` may name one of them.
    monitor : str
        What picks the best epoch and drives early stopping and the plateau schedule: ``"val_loss"`` (the
        training loss without validation data), ``"train_loss"``, or the name of a metric returned by
        ``validate`` (e.g. ``"aji"``).
    mode : {"min", "max"} or None
        Whether lower or higher ``monitor`` is better. Default: ``"min"`` for names containing "loss",
        else ``"max"`` (Dice, AJI, accuracy ...).
    ema : float or None
        Keep an exponential moving average of the weights (and batch-norm statistics) with this decay per
        optimiser step (e.g. 0.99): validation, ``best.pt`` and the returned model use the average, which
        is usually smoother and better than the last step's weights. None: off.
    card : dict, optional
        Model-card fields saved with ``best.pt`` (training data, licence ...); metrics are added.
    progress : bool
        Show a progress bar per epoch (on a terminal).
    run_settings : mapping, optional
        Anything else a resumed run must share with the run it continues (``histoflow train`` gives its
        configuration: data, batch size, model, loss ...): kept in ``last.ckpt``, and a resume with other values is
        refused, naming them.
    """

    def __init__(self, model, loss_fn, *, epochs: int = 10, lr: float = 1e-3, weight_decay: float = 0.0,
                 accumulate: int = 1, schedule: str | None = None, patience: int | None = None,
                 seed: int = 0, device=None, amp: bool = False, out_dir=None,
                 batch_loss: Callable | None = None, validate: Callable | None = None, monitor: str = "val_loss",
                 card: Mapping | None = None, progress: bool = True, ema: float | None = None,
                 mode: str | None = None, run_settings: Mapping | None = None):
        if schedule not in (None, "onecycle", "plateau"):
            raise ParameterError(f"schedule must be None, 'onecycle' or 'plateau', got {schedule!r}")
        for name, v, low in (("epochs", epochs, 1), ("accumulate", accumulate, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ParameterError(f"{name} must be a whole number >= {low}, got {v!r}")
        lr, weight_decay = _number(lr), _number(weight_decay)  # YAML reads 1e-3 (no dot) as a string
        ema = None if ema is None else _number(ema)
        for name, v in (("lr", lr), ("weight_decay", weight_decay)):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not np.isfinite(v) or v < 0:
                raise ParameterError(f"{name} must be a number >= 0, got {v!r}")
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, (int, np.integer))
                                     or patience < 1):
            raise ParameterError(f"patience must be a whole number >= 1 or None, got {patience!r}")
        self.device = pick_device(device)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.accumulate = int(accumulate)
        self.schedule = schedule
        self.patience = patience
        self.seed = int(seed)
        for name, v in (("amp", amp), ("progress", progress)):
            if not isinstance(v, (bool, np.bool_)):  # "false" from a config would be true
                raise ParameterError(f"{name} must be true or false, got {v!r}")
        from .nucleus import effective_amp

        self.amp = effective_amp(bool(amp), self.device, "Trainer")  # float32 where bf16 is emulated: 10-40x slower
        self.out_dir = os.fspath(out_dir) if out_dir is not None else None
        self.batch_loss = batch_loss or default_batch_loss
        self.validate = validate
        if not isinstance(monitor, str) or not monitor:
            raise ParameterError(f"monitor must be the name of a value, e.g. 'val_loss' or 'aji', got {monitor!r}")
        if mode is None:
            mode = "min" if "loss" in monitor else "max"
        if mode not in ("min", "max"):
            raise ParameterError(f"mode must be 'min' (lower {monitor} is better) or 'max', got {mode!r}")
        self.monitor = monitor
        self.mode = mode
        if card is not None and not isinstance(card, Mapping):
            raise ParameterError(f"card must be a mapping of model-card fields, got {card!r}")
        problem = json_problem(dict(card or {}), "card")
        if problem:  # found now, not when best.pt is first saved after an epoch
            raise ParameterError(problem)
        self.card = dict(card or {})
        for key in ("training", "metrics"):  # the trainer adds its own entries to these when it saves best.pt
            if self.card.get(key) is not None and not isinstance(self.card[key], Mapping):
                raise ParameterError(f"card.{key} must be a mapping (the trainer adds its own entries to it), "
                                     f"not {self.card[key]!r}")
        from .models import check_card_identity

        check_card_identity(model, self.card)  # said now, not when best.pt is first saved after an epoch
        if run_settings is not None and not isinstance(run_settings, Mapping):
            raise ParameterError(f"run_settings must be a mapping, got {run_settings!r}")
        self.run_settings = None if run_settings is None else dict(run_settings)
        if not -2 ** 63 <= self.seed <= 2 ** 63 - 1 - self.epochs:  # torch.manual_seed(seed + epoch) takes 64-bit integers
            raise ParameterError(f"seed must be below 2**63 - epochs, got {seed}")
        self.progress = bool(progress)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if ema is not None and (isinstance(ema, bool) or not isinstance(ema, (int, float, np.number))
                                or not 0.0 < float(ema) < 1.0):
            raise ParameterError(f"ema must be a decay between 0 and 1 (e.g. 0.99), got {ema!r}")
        self.ema = None if ema is None else float(ema)
        self.ema_model = None
        if self.ema is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema_model = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.ema), use_buffers=True)
        self.scheduler = None
        self.history: list[dict] = []
        self.best_loss = math.inf
        self.best_epoch = -1
        self.since_best = 0  # epochs since the best one (early stopping)
        self.epoch = 0  # epochs completed

    @property
    def eval_model(self) -> torch.nn.Module:
        """The model that is validated and saved: the weight average when ``ema`` is on."""
        return self.ema_model.module if self.ema_model is not None else self.model

    # ------------------------------------------------------------------ schedule
    def _onecycle_steps(self, steps_per_epoch: int) -> int:
        return max(1, self.epochs * math.ceil(steps_per_epoch / self.accumulate))

    def _make_scheduler(self, steps_per_epoch: int | None, total_steps: int | None = None):
        if self.schedule == "onecycle":
            total = total_steps or self._onecycle_steps(steps_per_epoch)
            return torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=self.lr, total_steps=total)
        if self.schedule == "plateau":
            # threshold 0: an improvement is what the trainer calls one (any, for best.pt and early stopping); torch's
            # default (1e-4, relative) halved the rate while every epoch was the best so far
            return torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, mode=self.mode, factor=0.5, threshold=0,
                                                              patience=max(1, (self.patience or 4) // 2))
        return None

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_path(self):
        return os.path.join(self.out_dir, "last.ckpt")

    #: the files a run writes in ``out_dir`` (a new run removes an earlier one's as it starts)
    RUN_FILES = ("last.ckpt", "best.pt", "best.json", "metrics.csv", "metrics.json")

    #: the settings a resumed run must share with the run it continues (``epochs`` may change, except one-cycle)
    RESUME_SETTINGS = ("schedule", "accumulate", "lr", "weight_decay", "monitor", "mode", "ema", "seed")

    def _settings(self) -> dict:
        return {k: getattr(self, k) for k in self.RESUME_SETTINGS}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "epoch": self.epoch, "history": self.history, "best_loss": self.best_loss,
                "best_epoch": self.best_epoch, "since_best": self.since_best, "seed": self.seed,
                "settings": self._settings(), "run_settings": self.run_settings,
                "ema": self.ema_model.state_dict() if self.ema_model is not None else None}

    def save_checkpoint(self, path=None):
        from ..utils import atomic_output

        path = path or self._ckpt_path()
        with atomic_output(path) as tmp:  # a kill mid-write leaves the last good checkpoint (and no temp file)
            torch.save(self.state_dict(), tmp)

    def load_checkpoint(self, path):
        """Restore a run from ``last.ckpt`` (model, optimiser, schedule, epoch, history)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise TrainingError(f"{path}: no checkpoint to resume from")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except (RuntimeError, KeyError, EOFError, OSError, ValueError, TypeError, pickle.UnpicklingError) as e:
            raise TrainingError(f"{path}: cannot resume: not a readable training checkpoint (damaged, or another "
                                f"kind of file: {type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
        if not isinstance(state, dict):
            raise TrainingError(f"{path}: cannot resume: not a training checkpoint (it holds a "
                                f"{type(state).__name__}, not the mapping Trainer.save_checkpoint writes)")
        diff = []  # checkpoints written before either kind of settings was kept are taken as they are
        for old, new in ((state.get("settings"), self._settings()), (state.get("run_settings"), self.run_settings)):
            if isinstance(old, dict) and new is not None:
                diff += [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in [*new, *sorted(set(old) - set(new))]
                         if old.get(k) != new.get(k)]
        if diff:
            raise TrainingError(f"{path}: cannot resume: the run was started with other settings "
                                f"({'; '.join(diff)}). Resume with the settings it was started with, or "
                                "start a new run from its weights (model.init)")
        sched = state.get("scheduler")
        if (self.schedule is None) != (sched is None):  # checked before anything is restored
            raise TrainingError(f"{path}: cannot resume: the checkpoint was written "
                                f"{'without' if self.schedule is not None else 'with'} a learning-rate schedule")
        if self.scheduler is None and self.schedule is not None:  # restored before fit (which keeps it): made
            # now, before the optimiser's state, whose rate it sets first; one-cycle over the checkpoint's steps
            # (fit checks that its data gives as many)
            total = sched.get("total_steps") if isinstance(sched, dict) else None
            if self.schedule == "onecycle" and not isinstance(total, int):
                raise TrainingError(f"{path}: cannot resume from this checkpoint (its one-cycle schedule has no "
                                    "step count)")
            self.scheduler = self._make_scheduler(None, total)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema_model is not None:
                if state.get("ema") is None:
                    raise KeyError("the checkpoint has no weight average (it was trained without ema)")
                self.ema_model.load_state_dict(state["ema"])
            if self.scheduler is not None:
                mine = getattr(self.scheduler, "total_steps", None)
                if mine is not None and sched.get("total_steps") not in (None, mine):
                    raise TrainingError(
                        f"{path}: the checkpoint's one-cycle schedule spans {sched['total_steps']} steps, this "
                        f"run's {mine} ({self.epochs} epochs): a one-cycle run cannot be lengthened or shortened. "
                        "Resume with the epochs it was started with, or start a new run from its weights "
                        "(model.init)")
                if "mode" in sched and sched["mode"] != self.mode:
                    raise TrainingError(f"{path}: cannot resume: its plateau schedule was written by an earlier "
                                        f"histoflow (mode {sched['mode']!r}); start a new run from its weights")
                self.scheduler.load_state_dict(sched)
                if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    # this run's patience (which may differ from the checkpoint's) governs the schedule too,
                    # as it governs early stopping: the checkpoint's value came back with the state
                    self.scheduler.patience = max(1, (self.patience or 4) // 2)
            self.epoch = int(state["epoch"])
            self.history = list(state["history"])
            self.best_loss = float(state["best_loss"])
            self.best_epoch = int(state["best_epoch"])
        except TrainingError:
            raise
        except (RuntimeError, KeyError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError,
                pickle.UnpicklingError) as e:  # a damaged checkpoint: parts missing or of the wrong kind
            raise TrainingError(f"{path}: cannot resume from this checkpoint ({type(e).__name__}: {e})") from None
        self.since_best = int(state.get("since_best", self.epoch - 1 - self.best_epoch if self.best_epoch >= 0
                                        else self.epoch))

    def _save_best(self, metrics: dict):
        from . import models

        card = dict(self.card)
        card["training"] = {**(card.get("training") or {}), "epoch": self.epoch, "seed": self.seed, "lr": self.lr,
                            "schedule": self.schedule, "accumulate": self.accumulate, "ema": self.ema,
                            "amp": self.amp}  # bfloat16 autocast as it ran (off where bf16 is emulated)
        card["metrics"] = {**(card.get("metrics") or {}), **{k: v for k, v in metrics.items()
                                                         if k not in ("epoch", "seconds", "lr")}}
        models.save(self.eval_model, os.path.join(self.out_dir, "best.pt"), card=card)

    def _write_metrics(self):
        from ..utils import atomic_output

        keys = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        with atomic_output(os.path.join(self.out_dir, "metrics.csv")) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows(self.history)
        best = None if math.isinf(self.best_loss) else (self.best_loss if self.mode == "min" else -self.best_loss)
        from .models import _jsonable

        with atomic_output(os.path.join(self.out_dir, "metrics.json")) as tmp:
            with open(tmp, "w") as f:  # a NaN metric (a class absent from the validation data) as null
                json.dump(_jsonable({"history": self.history, "best_epoch": self.best_epoch + 1,
                                     "monitor": self.monitor, "mode": self.mode, "best_value": best}),
                          f, indent=1, allow_nan=False)

    # ------------------------------------------------------------------ loops
    def _train_epoch(self, loader) -> float:
        """One epoch; the mean training loss per sample."""
        self.model.train()
        total, n = 0.0, 0
        group_n = 0  # samples in the optimiser step's batches so far
        self.optimizer.zero_grad(set_to_none=True)
        steps = len(loader)
        bar = progress_bar(None, total=steps, desc=f"epoch {self.epoch + 1}/{self.epochs}", unit="batch",
                           disable=not self.progress)
        for i, batch in enumerate(loader):
            batch = _to(batch, self.device)
            with self._autocast():
                try:
                    loss = self.batch_loss(self.model, batch, self.loss_fn)
                except ValueError as e:
                    if "Expected more than 1 value per channel when training" not in str(e):
                        raise
                    raise TrainingError(f"a batch norm layer got one value per channel ({e}): batch norm needs "
                                        "at least 2 in training; use batches of 2 or more, larger tiles (a U-Net's "
                                        "bottleneck must be larger than 1 x 1 at batch 1), or norm='instance'") from None
            loss = loss.float()
            if not torch.isfinite(loss):
                raise TrainingError(f"the training loss became {loss.item()} at epoch {self.epoch + 1}, "
                                    f"batch {i}; lower the learning rate or check the targets")
            size = _batch_size(batch)
            if self.accumulate == 1:
                loss.backward()
            else:
                # the mean over the optimiser step's samples, as one bigger batch would give: each batch's loss weighs
                # by its samples (a short last batch less), and the summed gradients are divided by the group's
                # samples before the step (a last group of fewer batches is not scaled down)
                (loss * size).backward()
            group_n += size
            if (i + 1) % self.accumulate == 0 or i + 1 == steps:
                if self.accumulate > 1:
                    for group in self.optimizer.param_groups:
                        for p in group["params"]:
                            if p.grad is not None:
                                p.grad.div_(group_n)
                group_n = 0
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema_model is not None:
                    self.ema_model.update_parameters(self.model)
                if self.schedule == "onecycle":
                    self.scheduler.step()
            total += loss.item() * size  # the epoch's loss per sample: a short last batch is not overweighted
            n += size
            bar.update(1)
            bar.set_postfix(loss=f"{total / n:.4f}")
        bar.close()
        if n == 0:
            raise TrainingError("the training data loader gave no batch")
        return total / n

    @torch.no_grad()
    def evaluate(self, loader) -> float:
        """Mean loss over ``loader`` in eval mode (of the weight average when ``ema`` is on)."""
        model = self.eval_model
        model.eval()
        total, n = 0.0, 0
        for batch in loader:
            batch = _to(batch, self.device)
            size = _batch_size(batch)  # each batch weighs by its samples: a short last batch is not overweighted
            with self._autocast():
                total += self.batch_loss(model, batch, self.loss_fn).float().item() * size
            n += size
        if n == 0:  # a loss of 0 would be the best forever: best.pt and early stopping would go wrong
            raise TrainingError("the validation data loader gave no batch (an empty validation split?)")
        return total / n

    def fit(self, train_loader, val_loader=None, resume: bool = False) -> list[dict]:
        """Train until ``epochs`` or early stopping; returns the history (one dict per epoch).

        ``resume=True`` continues from ``out_dir/last.ckpt`` when it exists.
        """
        if self.out_dir is not None:
            try:
                os.makedirs(self.out_dir, exist_ok=True)
            except OSError as e:  # a file of that name, or under one; no permission
                from ..errors import OutputError

                raise OutputError(f"{self.out_dir}: cannot make the run's folder ({e.strerror or e})") from None
        # the schedule first: creating it sets the optimiser's rate, which a checkpoint then restores. One restored
        # by load_checkpoint before fit is kept (made again, it would set the restored optimiser's rate anew)
        if self.scheduler is None or self.epoch == 0:
            self.scheduler = self._make_scheduler(len(train_loader))
        elif self.schedule == "onecycle" and self.scheduler.total_steps != self._onecycle_steps(len(train_loader)):
            raise TrainingError(
                f"the restored one-cycle schedule spans {self.scheduler.total_steps} steps, this run's data "
                f"{self._onecycle_steps(len(train_loader))} ({self.epochs} epochs of {len(train_loader)} batches): a "
                "one-cycle run cannot be lengthened or shortened; resume with the data and epochs it was started "
                "with")
        if resume:
            if self.out_dir is None:
                raise TrainingError("resume=True needs an out_dir holding last.ckpt")
            if os.path.exists(self._ckpt_path()):
                self.load_checkpoint(self._ckpt_path())
        if self.monitor not in ("val_loss", "train_loss"):  # checked now, not after the first epoch
            if val_loader is None or self.validate is None:
                raise TrainingError(f"monitor {self.monitor!r} is a validation metric: give validation data and a "
                                    "validate function that returns it, or monitor 'val_loss'")
        if self.out_dir is not None:
            from . import models

            try:
                models._name_of(self.eval_model)
            except HistoflowError as e:
                raise TrainingError(f"best.pt could not be saved: {e}") from None
        epochal = [d for d in _datasets(getattr(train_loader, "dataset", None))
                   if hasattr(d, "set_epoch") and getattr(d, "epoch_dependent", True)]
        if epochal and getattr(train_loader, "persistent_workers", False):
            raise TrainingError(f"{type(epochal[0]).__name__} changes with the epoch (set_epoch), but the DataLoader "
                                "keeps persistent_workers, whose copies of the dataset never see the new epoch: "
                                "every epoch would repeat the first; make the DataLoader with "
                                "persistent_workers=False")
        if self.out_dir is not None and self.epoch == 0:
            # a new run (not a resumed one) replaces an earlier run's files in out_dir as it starts: stopped in its
            # first epoch, it must not leave them for a resume to continue, or a reader to take, as its own
            for name in self.RUN_FILES:
                path = os.path.join(self.out_dir, name)
                if os.path.isfile(path):
                    os.remove(path)
        while self.epoch < self.epochs:
            if self.patience is not None and self.since_best >= self.patience:
                break
            torch.manual_seed(self.seed + self.epoch)
            sampler = getattr(train_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            for d in _datasets(getattr(train_loader, "dataset", None)):  # inside Concat/Subset wrappers too
                if hasattr(d, "set_epoch"):
                    d.set_epoch(self.epoch)
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]  # the rate the epoch starts with (one-cycle: its first step's)
            train_loss = self._train_epoch(train_loader)
            row = {"epoch": self.epoch + 1, "train_loss": train_loss}
            if val_loader is not None:
                row["val_loss"] = self.evaluate(val_loader)
                if self.validate is not None:
                    row.update({k: float(v) for k, v in self.validate(self.eval_model, val_loader,
                                                                      self.device).items()})
            row["lr"] = lr
            row["seconds"] = round(time.perf_counter() - t0, 2)
            if self.monitor == "val_loss":
                value = row.get("val_loss", train_loss)
            elif self.monitor in row:
                value = row[self.monitor]
            else:
                raise TrainingError(f"monitor {self.monitor!r} is not among the epoch's values {sorted(row)}")
            if not math.isfinite(value):
                warnings.warn(f"epoch {self.epoch + 1}: the monitored {self.monitor} is {value}; the epoch cannot "
                              "be the best one", RuntimeWarning, stacklevel=2)
                value = math.inf if self.mode == "min" else -math.inf
            monitored = value if self.mode == "min" else -value
            if self.schedule == "plateau":
                self.scheduler.step(value)  # in the schedule's own mode: a negated value turns its threshold round
            self.epoch += 1
            self.history.append(row)
            improved = monitored < self.best_loss
            if improved:
                self.best_loss, self.best_epoch, self.since_best = monitored, self.epoch - 1, 0
            else:
                self.since_best += 1
            if self.out_dir is not None:
                if improved:
                    self._save_best(row)
                self._write_metrics()  # before the checkpoint: a resume from it redoes no epoch to write them
                self.save_checkpoint()
        return self.history

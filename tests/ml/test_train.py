"""The trainer on a small real problem: tissue vs glass patches of the CMU-1 slide."""
import json
import math
import os

import numpy as np
import pytest
import torch
from datafiles import SVS

from histoflow import open_slide
from histoflow.ml import models
from histoflow.ml.train import Trainer, TrainingError


@pytest.fixture(scope="module")
def patches():
    with open_slide(SVS) as r:
        img = r.read_region((0, 0), 0, r.dimensions)[..., :3]
    xs = []
    for y in range(0, img.shape[0] - 32, 128):
        for x in range(0, img.shape[1] - 32, 128):
            xs.append(img[y:y + 32, x:x + 32])
    xs = np.stack(xs)
    # label: tissue when the patch is darker than glass (a real property of each real patch)
    ys = (xs.mean(axis=(1, 2, 3)) < 210).astype(np.int64)
    assert 0.2 < ys.mean() < 0.8
    x = torch.from_numpy(xs.transpose(0, 3, 1, 2).copy()).float() / 255
    return x, torch.from_numpy(ys)


def _loaders(patches):
    x, y = patches
    n = len(x) * 3 // 4
    # no generator of its own: the shuffle follows torch's seed, which the trainer sets per epoch
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:n], y[:n]), batch_size=16, shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[n:], y[n:]), batch_size=64)
    return train, val


def _model(seed=0):
    torch.manual_seed(seed)
    return models.create("rccnet", num_classes=2)


def _accuracy(model, loader):
    model.eval()
    with torch.no_grad():
        right = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return right / len(loader.dataset)


def test_trainer_learns_and_writes_its_files(patches, tmp_path):
    train, val = _loaders(patches)
    t = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=4, lr=2e-3, schedule="onecycle", out_dir=tmp_path,
                card={"training_data": "CMU-1 patches", "licence": "CC0"}, progress=False,
                validate=lambda m, vl, dev: {"accuracy": _accuracy(m, vl)})
    hist = t.fit(train, val)
    assert len(hist) == 4
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert max(h["accuracy"] for h in hist) >= 0.9
    for f in ("last.ckpt", "best.pt", "best.json", "metrics.csv", "metrics.json"):
        assert os.path.exists(tmp_path / f), f
    card = json.load(open(tmp_path / "best.json"))
    assert card["architecture"] == "rccnet" and card["licence"] == "CC0"
    assert card["metrics"]["val_loss"] == pytest.approx(min(h["val_loss"] for h in hist))
    assert json.load(open(tmp_path / "metrics.json"))["best_epoch"] == t.best_epoch + 1
    best = models.load(tmp_path / "best.pt")
    assert _accuracy(best, val) == pytest.approx(hist[t.best_epoch]["accuracy"])
    lines = open(tmp_path / "metrics.csv").read().strip().splitlines()
    assert lines[0].startswith("epoch,train_loss,val_loss,accuracy") and len(lines) == 5


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def test_trainer_is_reproducible_and_resumes_exactly(patches, tmp_path):
    def run(out, epochs, resume=False, model=None):
        train, val = _loaders(patches)
        t = Trainer(model or _model(), torch.nn.CrossEntropyLoss(), epochs=epochs, lr=1e-3, out_dir=out,
                    progress=False, accumulate=2, schedule="onecycle")
        t.fit(train, val, resume=resume)
        return t

    a = run(tmp_path / "a", 3)
    b = run(tmp_path / "b", 3)
    assert torch.equal(_weights(a.model), _weights(b.model))
    # a run interrupted after 2 of 3 epochs, then resumed, ends with the straight run's weights
    part = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=3, lr=1e-3, out_dir=tmp_path / "e",
                   progress=False, accumulate=2, schedule="onecycle")
    _stop_after(part, 2)
    part.fit(*_loaders(patches))
    assert part.epoch == 2
    resumed = run(tmp_path / "e", 3, resume=True)
    assert resumed.epoch == 3 and len(resumed.history) == 3
    assert torch.equal(_weights(resumed.model), _weights(a.model))
    # the same run resumed into another folder by the public load_checkpoint: it refused every run with a
    # schedule ("written with a learning-rate schedule"), and fit would have replaced the restored one
    part = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=3, lr=1e-3, out_dir=tmp_path / "f",
                   progress=False, accumulate=2, schedule="onecycle")
    _stop_after(part, 2)
    part.fit(*_loaders(patches))
    other = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=3, lr=1e-3, out_dir=tmp_path / "g",
                    progress=False, accumulate=2, schedule="onecycle")
    other.load_checkpoint(tmp_path / "f" / "last.ckpt")
    assert other.epoch == 2
    other.fit(*_loaders(patches))
    assert other.epoch == 3 and torch.equal(_weights(other.model), _weights(a.model))
    train, val = _loaders(patches)
    short = torch.utils.data.DataLoader(train.dataset, batch_size=train.batch_size * 2)
    again = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=3, lr=1e-3, out_dir=tmp_path / "h",
                    progress=False, accumulate=2, schedule="onecycle")
    again.load_checkpoint(tmp_path / "f" / "last.ckpt")
    with pytest.raises(TrainingError, match="the restored one-cycle schedule spans .* a one-cycle run cannot be "
                                            "lengthened or shortened"):
        again.fit(short, val)
    plain = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=3, lr=1e-3, progress=False, accumulate=2)
    before = _weights(plain.model)
    with pytest.raises(TrainingError, match="started with other settings"):
        plain.load_checkpoint(tmp_path / "f" / "last.ckpt")
    assert torch.equal(_weights(plain.model), before)  # refused before anything was restored


def _stop_after(trainer, n):
    original = trainer._train_epoch

    def limited(loader):
        if trainer.epoch >= n:
            raise KeyboardInterrupt
        return original(loader)

    trainer._train_epoch = limited
    fit = trainer.fit

    def fit_until(*a, **k):
        try:
            return fit(*a, **k)
        except KeyboardInterrupt:
            return trainer.history

    trainer.fit = fit_until


def test_monitor_a_metric(patches, tmp_path):
    train, val = _loaders(patches)
    t = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=3, lr=2e-3, out_dir=tmp_path, progress=False,
                monitor="accuracy", validate=lambda m, vl, dev: {"accuracy": _accuracy(m, vl)})
    hist = t.fit(train, val)
    accs = [h["accuracy"] for h in hist]
    assert t.best_epoch == int(np.argmax(accs))   # the first of the highest
    assert json.load(open(tmp_path / "metrics.json"))["best_value"] == pytest.approx(max(accs))
    # refused before any training: no validate function to give it
    with pytest.raises(TrainingError, match="monitor 'dice' is a validation metric"):
        Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=1, progress=False, monitor="dice").fit(train, val)
    with pytest.raises(TrainingError, match="monitor 'dice' is not among"):
        Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=1, progress=False, monitor="dice",
                validate=lambda m, vl, dev: {"accuracy": 1.0}).fit(train, val)


def test_a_monitored_loss_is_minimised(patches, tmp_path):
    """Any value named like a loss is better lower (it used to be maximised unless named val_loss)."""
    train, _ = _loaders(patches)
    t = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=4, lr=5e-3, out_dir=tmp_path, progress=False,
                monitor="train_loss")
    hist = t.fit(train)
    losses = [h["train_loss"] for h in hist]
    assert t.mode == "min" and t.best_epoch == int(np.argmin(losses)) and losses[-1] < losses[0]
    assert json.load(open(tmp_path / "metrics.json"))["best_value"] == pytest.approx(min(losses))
    with pytest.raises(ValueError, match="mode must be"):
        Trainer(_model(), torch.nn.CrossEntropyLoss(), mode="lower")


def _numbers(n=20):
    """Arithmetic of the optimiser, not of pathology: numbers that give each sample its own loss."""
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g))


def _mlp():
    torch.manual_seed(123)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_accumulation_equals_one_bigger_batch_with_a_short_last_group():
    """20 samples in batches of 4 with accumulate=2 (groups of 2, 2, 1 batches) step like batches of 8 (8, 8,
    4): the short last group is averaged over its own batch, not halved."""
    def run(batch, accumulate):
        model = _mlp()
        Trainer(model, torch.nn.CrossEntropyLoss(), epochs=3, accumulate=accumulate, progress=False).fit(
            torch.utils.data.DataLoader(_numbers(), batch_size=batch))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert (run(4, 2) - run(8, 1)).abs().max() < 1e-6  # 1.9e-3 when the last group was halved


def test_validation_loss_weighs_batches_by_their_samples():
    t = Trainer(_mlp(), torch.nn.CrossEntropyLoss(), progress=False)
    ds = _numbers(10)
    whole = t.evaluate(torch.utils.data.DataLoader(ds, batch_size=10))
    assert t.evaluate(torch.utils.data.DataLoader(ds, batch_size=4)) == pytest.approx(whole, rel=1e-6)


def test_a_nan_metric_warns_and_is_never_the_best(patches, tmp_path):
    train, val = _loaders(patches)
    values = iter([0.5, float("nan"), 0.6])
    t = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=3, out_dir=tmp_path, progress=False, monitor="aji",
                validate=lambda m, vl, dev: {"aji": next(values)})
    with pytest.warns(RuntimeWarning, match="monitored aji is nan"):
        t.fit(train, val)
    assert t.best_epoch == 2


def test_an_unsaveable_model_is_refused_before_training(patches, tmp_path):
    train, _ = _loaders(patches)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    with pytest.raises(TrainingError, match="best.pt could not be saved: cannot save a Sequential"):
        Trainer(model, torch.nn.CrossEntropyLoss(), epochs=1, out_dir=tmp_path, progress=False).fit(train)
    assert not os.path.exists(tmp_path / "last.ckpt")


def test_early_stopping_and_plateau(patches, tmp_path):
    train, val = _loaders(patches)
    # a learning rate of 0 never improves after the first epoch: patience 2 stops at epoch 3
    t = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=20, lr=0.0, patience=2, schedule="plateau",
                out_dir=tmp_path, progress=False)
    hist = t.fit(train, val)
    assert len(hist) == 3 and t.best_epoch == 0


def test_training_errors(patches, tmp_path):
    train, val = _loaders(patches)

    def nan_loss(pred, target):
        return pred.sum() * float("nan")

    t = Trainer(_model(), nan_loss, epochs=1, progress=False)
    with pytest.raises(TrainingError, match="loss became nan at epoch 1"):
        t.fit(train)
    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"not a checkpoint")
    t = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=1, out_dir=tmp_path, progress=False)
    with pytest.raises(TrainingError, match="cannot resume: not a readable training checkpoint"):
        t.fit(train, resume=True)
    bad.write_text("junk\n")  # torch reads this far enough to fail with a bare KeyError: its number was all it said
    with pytest.raises(TrainingError, match=r"not a readable training checkpoint \(damaged, or another kind of file: "
                                            r"[A-Za-z]+Error"):
        t.fit(train, resume=True)
    with pytest.raises(ValueError, match="schedule"):
        Trainer(_model(), torch.nn.CrossEntropyLoss(), schedule="cosine")
    # a one-cycle run resumed with more epochs than it was made for
    bad.unlink()
    Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=1, out_dir=tmp_path, schedule="onecycle",
            progress=False).fit(train)
    t = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=2, out_dir=tmp_path, schedule="onecycle", progress=False)
    with pytest.raises(TrainingError, match="one-cycle schedule spans .* a one-cycle run cannot be lengthened"):
        t.fit(train, resume=True)
    # a dataset that changes with the epoch behind persistent workers would repeat its first epoch

    class Epochs(torch.utils.data.TensorDataset):
        def set_epoch(self, e):
            self.e = e

    loader = torch.utils.data.DataLoader(Epochs(*patches), batch_size=16, num_workers=1, persistent_workers=True)
    with pytest.raises(TrainingError, match="persistent_workers"):
        Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=1, progress=False).fit(loader)


def test_weight_average_is_validated_saved_and_resumed(patches, tmp_path):
    def trainer(out, epochs=3):
        return Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=epochs, lr=2e-3, out_dir=out, progress=False,
                       schedule="onecycle", ema=0.9, validate=lambda m, vl, dev: {"accuracy": _accuracy(m, vl)})

    train, val = _loaders(patches)
    t = trainer(tmp_path / "a")
    hist = t.fit(train, val)
    # the average is a different set of weights from the last step's, and it is what was validated and saved
    assert not torch.equal(_weights(t.model), _weights(t.eval_model))
    assert hist[-1]["val_loss"] == pytest.approx(t.evaluate(val))
    best = models.load(tmp_path / "a" / "best.pt")
    if t.best_epoch == 2:
        assert torch.equal(_weights(best), _weights(t.eval_model))
    assert _accuracy(best, val) == pytest.approx(hist[t.best_epoch]["accuracy"])
    assert json.load(open(tmp_path / "a" / "best.json"))["training"]["ema"] == 0.9
    assert max(h["accuracy"] for h in hist) >= 0.9
    # interrupted after 2 epochs and resumed: the same average as the straight run
    part = trainer(tmp_path / "b")
    _stop_after(part, 2)
    part.fit(*_loaders(patches))
    resumed = trainer(tmp_path / "b")
    resumed.fit(*_loaders(patches), resume=True)
    assert torch.equal(_weights(resumed.eval_model), _weights(t.eval_model))
    # a checkpoint without an average cannot resume a run with one
    plain = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=1, lr=1e-3, out_dir=tmp_path / "c", progress=False)
    plain.fit(*_loaders(patches))
    with pytest.raises(TrainingError, match=r"started with other settings \(schedule None -> 'onecycle'; lr 0.001 "
                                            r"-> 0.002; ema None -> 0.9\)"):
        trainer(tmp_path / "c", epochs=2).fit(*_loaders(patches), resume=True)
    with pytest.raises(ValueError, match="ema"):
        Trainer(_model(), torch.nn.CrossEntropyLoss(), ema=1.5)


def test_empty_validation_and_bad_settings_are_refused(patches, tmp_path):
    """An empty validation loader gave a loss of 0 that won every epoch (best.pt stuck at epoch 1, early
    stopping after `patience`); settings out of range are ParameterErrors naming the setting."""
    from histoflow.errors import ParameterError

    train, _ = _loaders(patches)
    x, y = patches
    empty = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:0], y[:0]), batch_size=8)
    t = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=2, patience=1, out_dir=tmp_path, progress=False)
    with pytest.raises(TrainingError, match="validation data loader gave no batch"):
        t.fit(train, empty)
    assert not (tmp_path / "best.pt").exists()
    assert Trainer(_model(), torch.nn.CrossEntropyLoss(), lr="1e-3", progress=False).lr == 0.001  # YAML's 1e-3
    for kw, what in (({"epochs": 0}, "epochs"), ({"lr": "fast"}, "lr"), ({"accumulate": 1.5}, "accumulate"),
                     ({"ema": 1.5}, "ema"), ({"patience": 0}, "patience"), ({"device": "gpu"}, "device")):
        with pytest.raises(ParameterError, match=what):
            Trainer(_model(), torch.nn.CrossEntropyLoss(), progress=False, **kw)


def test_batch_norm_with_one_value_per_channel_is_a_training_error(patches):
    x, y = patches
    one = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:1], y[:1]), batch_size=1)
    with pytest.raises(TrainingError, match="batch norm needs at least 2 in training"):
        Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=1, progress=False).fit(one)


def test_a_kill_while_files_are_written_keeps_the_last_good_ones(patches, tmp_path, monkeypatch):
    """best.pt was written in place (a kill mid-write left a file that cannot load), a killed checkpoint
    write left its temporary file, and the metrics came after the checkpoint (a kill between them in the
    last epoch left them an epoch short for good, as the resumed run had nothing left to do)."""
    train, val = _loaders(patches)

    def trainer(epochs=2):
        return Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=epochs, lr=2e-3, out_dir=tmp_path,
                       progress=False)

    trainer().fit(train, val)
    good = _weights(models.load(tmp_path / "best.pt"))
    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    def resumed_with_best(best):
        t = trainer(epochs=3)
        load = t.load_checkpoint

        def then_set_best(path):  # epoch 3 then is the best (best.pt written first) or not (only the checkpoint)
            load(path)
            t.best_loss = best
        t.load_checkpoint = then_set_best
        return t

    monkeypatch.setattr(torch, "save", dies_half_way)
    for best in (math.inf, -math.inf):  # a kill while best.pt is written; then while last.ckpt is
        with pytest.raises(KeyboardInterrupt):
            resumed_with_best(best).fit(train, val, resume=True)
        assert sorted(os.listdir(tmp_path)) == ["best.json", "best.pt", "last.ckpt", "metrics.csv", "metrics.json"]
        assert torch.equal(_weights(models.load(tmp_path / "best.pt")), good)
    monkeypatch.setattr(torch, "save", real_save)
    # the metrics of epoch 3 are written; the checkpoint is still epoch 2's, from which a resume redoes epoch 3
    assert len(json.load(open(tmp_path / "metrics.json"))["history"]) == 3
    resumed = trainer(epochs=3)
    resumed.fit(train, val, resume=True)
    assert len(resumed.history) == 3 and len(open(tmp_path / "metrics.csv").read().strip().splitlines()) == 4
    with pytest.raises(ValueError, match="amp must be true or false"):
        Trainer(_model(), torch.nn.CrossEntropyLoss(), amp="false")


@pytest.mark.parametrize("monitor, values", [("acc", [1.0, 1.00001, 1.00002, 1.00003, 1.00004, 1.00005]),
                                             ("val_loss", [1.0, 0.99999, 0.99998, 0.99997, 0.99996, 0.99995])])
def test_the_plateau_schedule_counts_the_improvements_the_trainer_counts(patches, tmp_path, monitor, values):
    """Every epoch a little better than the last (each the best so far for best.pt and early stopping): the rate
    stays. torch's default relative threshold (1e-4) halved it twice in 6 epochs meanwhile."""
    train, val = _loaders(patches)
    t = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=6, lr=1e-3, schedule="plateau", patience=2,
                monitor=monitor, progress=False, validate=lambda m, vl, dev: {monitor: values[len(t.history)]})
    hist = t.fit(train, val)
    assert t.best_epoch == 5 and t.since_best == 0
    assert [h["lr"] for h in hist] == [1e-3] * 6 and t.optimizer.param_groups[0]["lr"] == 1e-3


def test_plateau_follows_the_monitored_metric_and_patience_survives_a_resume(patches, tmp_path):
    """The plateau schedule got the negated metric for higher-is-better monitors, which turned its relative
    threshold round (AJI 0.6 then 0.59995 three times counted no bad epoch); the epochs since the best were
    not kept in the checkpoint (never a finite value: the count restarted on resume)."""
    train, val = _loaders(patches)
    values = [0.6, 0.59995, 0.59995, 0.59995, 0.59995]
    t = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=5, lr=1e-3, schedule="plateau", patience=2,
                monitor="aji", progress=False, validate=lambda m, vl, dev: {"aji": values[len(t.history)]})
    hist = t.fit(train, val)
    # patience 2: the rate halves after more than max(1, 2 // 2) = 1 epoch without improvement, and `lr` is the
    # rate each epoch ran with; then early stopping after 2 such epochs
    assert [h["lr"] for h in hist] == [1e-3, 1e-3, 1e-3]
    assert t.optimizer.param_groups[0]["lr"] == 5e-4
    nan = {"aji": float("nan")}

    def run(out, stop=None):
        t = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=6, patience=2, monitor="aji", out_dir=out,
                    progress=False, validate=lambda m, vl, dev: nan)
        if stop:
            _stop_after(t, stop)
        with pytest.warns(RuntimeWarning, match="monitored aji is nan"):
            return t.fit(*_loaders(patches), resume=stop is None)

    assert len(run(tmp_path / "a")) == 2
    run(tmp_path / "b", stop=1)
    assert len(run(tmp_path / "b")) == 2  # was 3: the resumed run counted its patience from 0
    onecycle = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=2, lr=1e-2, schedule="onecycle",
                       progress=False)
    assert onecycle.fit(train)[0]["lr"] == pytest.approx(1e-2 / 25)  # the cycle's first rate, not past its end


def _float64_run(ds, batch, accumulate, epochs=3, lr=0.05, **loader_kw):
    torch.manual_seed(123)
    model = torch.nn.Linear(5, 3).double()
    t = Trainer(model, torch.nn.CrossEntropyLoss(), epochs=epochs, accumulate=accumulate, lr=lr, progress=False)
    hist = t.fit(torch.utils.data.DataLoader(ds, batch_size=batch, **loader_kw))
    return torch.cat([p.detach().flatten() for p in model.parameters()]), [h["train_loss"] for h in hist]


def _float64_numbers(n=23):
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(n, 5, generator=g, dtype=torch.float64),
                                          torch.randint(0, 3, (n,), generator=g))


def test_accumulation_weighs_a_short_last_batch_by_its_samples():
    """23 samples: batches of 4 with accumulate=2 (4+4, 4+4, 4+3) step like batches of 8 (8, 8, 7); the batch of 3
    counted as much as a batch of 4 (6.5e-3 apart after 3 epochs). Also with a shuffling sampler. The reported
    training loss is the mean per sample, not per batch."""
    ds = _float64_numbers()
    (a, la), (b, lb) = _float64_run(ds, 4, 2), _float64_run(ds, 8, 1)
    assert (a - b).abs().max() < 1e-10
    assert la == pytest.approx(lb, rel=1e-6)  # the loss is logged in float32
    sampler = torch.utils.data.RandomSampler(ds)  # reshuffled each epoch from the trainer's seed
    (c, _), (d, _) = _float64_run(ds, 4, 2, sampler=sampler), _float64_run(ds, 8, 1, sampler=sampler)
    assert (c - d).abs().max() < 1e-10 and (c - a).abs().max() > 1e-6
    torch.manual_seed(123)  # at a rate of 0 the epoch's loss is that of the initial weights, over all samples
    with torch.no_grad():
        first = torch.nn.functional.cross_entropy(torch.nn.Linear(5, 3).double()(ds.tensors[0]), ds.tensors[1])
    assert _float64_run(ds, 4, 1, epochs=1, lr=0.0)[1][0] == pytest.approx(first.item(), rel=1e-6)


def test_accumulation_with_drop_last():
    """Batches of 4 with accumulate=2 and drop_last (20 of 23 samples: 8, 8, 4) step like batches of 8 of those 20."""
    ds = _float64_numbers()
    (a, _), (b, _) = _float64_run(ds, 4, 2, drop_last=True), _float64_run(torch.utils.data.Subset(ds, range(20)), 8, 1)
    assert (a - b).abs().max() < 1e-10


def test_damaged_checkpoints_are_training_errors(tmp_path):
    """A checkpoint holding a bare tensor (IndexError) or no optimiser state (AttributeError) raised raw errors."""
    loader = torch.utils.data.DataLoader(_numbers(), batch_size=8)
    t = Trainer(_mlp(), torch.nn.CrossEntropyLoss(), epochs=1, progress=False)
    t.fit(loader)
    good = t.state_dict()
    ckpt = tmp_path / "last.ckpt"
    for damaged, message in ((torch.zeros(3), "not a training checkpoint .*Tensor"),
                             ({**good, "optimizer": None}, "AttributeError")):
        torch.save(damaged, ckpt)
        t = Trainer(_mlp(), torch.nn.CrossEntropyLoss(), epochs=2, out_dir=tmp_path, progress=False)
        with pytest.raises(TrainingError, match=f"{ckpt}: cannot resume.*{message}"):
            t.fit(loader, resume=True)


def test_a_card_that_is_not_json_is_refused_before_training():
    import datetime

    for card, key in (({"trained": datetime.date(2024, 5, 1)}, "card.trained"),
                      ({"metrics": {"dice": float("nan")}}, "card.metrics.dice"),
                      ({"split": {"train": ["a", {1, 2}]}}, r"card.split.train\[1\]")):
        with pytest.raises(ValueError, match=f"{key} is .* which JSON cannot hold"):
            Trainer(_mlp(), torch.nn.CrossEntropyLoss(), card=card, progress=False)


def test_a_resumed_plateau_schedule_takes_the_new_patience(patches, tmp_path):
    """Resuming with another patience changed early stopping but not the plateau schedule, whose patience came
    back from the checkpoint."""
    def trainer(patience):
        return Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=4, lr=1e-3, schedule="plateau",
                       patience=patience, out_dir=tmp_path / "r", progress=False)

    first = trainer(2)
    _stop_after(first, 1)
    first.fit(*_loaders(patches))
    assert first.scheduler.patience == 1
    again = trainer(8)
    again.fit(*_loaders(patches), resume=True)
    assert again.scheduler.patience == 4 and len(again.history) == 4


def test_amp_runs_in_float32_where_bfloat16_is_emulated(monkeypatch, recwarn):
    """amp=True (set in every shipped config) ran bfloat16 autocast on CPUs without AVX-512 BF16 / AMX, where
    torch emulates it: a training batch took 11x longer, inference up to 40x, without a word."""
    import warnings

    from histoflow.ml import models, nucleus

    monkeypatch.setattr(nucleus, "_BF16", {"cpu": False})
    monkeypatch.setattr(nucleus, "_SAID_AMP", set())
    with pytest.warns(UserWarning, match=r"Trainer: amp=True asks for bfloat16, .* so it runs in float32"):
        t = Trainer(_model(), torch.nn.CrossEntropyLoss(), amp=True, progress=False)
    assert t.amp is False
    net = models.create("unet", in_channels=3, out_channels=4, filters=(4, 8)).eval()
    img = np.full((64, 64, 3), 200, np.uint8)
    with pytest.warns(UserWarning, match="nucleus segmentation: amp=True asks for bfloat16"):
        a = nucleus.predict_maps(net, img, amp=True)
    b = nucleus.predict_maps(net, img)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])  # float32, as without amp
    monkeypatch.setattr(nucleus, "_BF16", {"cpu": True})  # a CPU with native bf16: as asked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Trainer(_model(), torch.nn.CrossEntropyLoss(), amp=True, progress=False).amp is True


def test_card_entries_the_trainer_fills_are_checked_before_training():
    """card.training / card.metrics that are not mappings, or an architecture the model is not, failed after the
    first epoch, when best.pt was saved (a raw TypeError; the epoch lost). Now at construction."""
    from histoflow.errors import ParameterError

    m = models.create("rccnet", num_classes=2)
    for card, message in (({"training": "from a colleague"}, "card.training must be a mapping"),
                          ({"metrics": 0.9}, "card.metrics must be a mapping"),
                          ({"architecture": "RCCNet"}, "card.architecture 'RCCNet' disagrees with the model")):
        with pytest.raises(ParameterError, match=message):
            Trainer(m, torch.nn.CrossEntropyLoss(), card=card, progress=False)
    Trainer(m, torch.nn.CrossEntropyLoss(), card={"architecture": "rccnet", "training": None}, progress=False)
    with pytest.raises(ParameterError, match="seed must be below"):
        Trainer(m, torch.nn.CrossEntropyLoss(), seed=2 ** 63 - 1, epochs=2, progress=False)


def test_nan_metrics_are_json_null_and_library_misuse_is_named(patches, tmp_path):
    """A validation metric that is NaN in an epoch (the F1 of a class absent from the validation data) was
    written into best.json and metrics.json as a bare NaN, which strict JSON readers refuse; the default batch
    loss met a TileDataset's batches with a bare KeyError('target'); an out_dir that is a file gave
    FileExistsError."""
    from histoflow.errors import OutputError

    def strict(path):
        return json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"{path}: {c} in JSON"))

    t = Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=1, lr=1e-3, out_dir=tmp_path / "n", progress=False,
                validate=lambda m, vl, dev: {"f1_rare": float("nan"), "accuracy": 0.5})
    t.fit(*_loaders(patches))
    assert strict(tmp_path / "n" / "best.json")["metrics"]["f1_rare"] is None
    assert strict(tmp_path / "n" / "metrics.json")["history"][0]["f1_rare"] is None
    assert strict(tmp_path / "n" / "best.json")["metrics"]["accuracy"] == 0.5
    x, y = patches
    tiles = torch.utils.data.DataLoader([{"image": x[i], "labels": {"grade": y[i]}} for i in range(8)], batch_size=4)
    with pytest.raises(TrainingError, match=r"the batches hold \['image', 'labels'\], not 'image' and 'target': give "
                                            r"the Trainer a batch_loss"):
        Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=1, progress=False).fit(tiles)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(OutputError, match=rf"{out.name}: cannot make the run's folder"):
            Trainer(_model(), torch.nn.CrossEntropyLoss(), epochs=1, out_dir=out, progress=False).fit(
                *_loaders(patches))

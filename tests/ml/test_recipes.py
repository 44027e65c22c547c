"""`histoflow train CONFIG.yaml`: the configurations the repo ships, and small real runs of each task."""
import datetime
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from datafiles import ROOT, SVS, data_path

from histoflow.ml.recipes import ConfigError, load_config, train_from_config

MONUSEG = data_path("monuseg_train")


def test_shipped_nucleus_config_is_complete():
    cfg = load_config(os.path.join(ROOT, "configs", "nucleus_monuseg.yaml"))
    assert cfg["task"] == "nucleus_segmentation" and cfg["model"]["name"] == "unet"
    assert os.path.normpath(os.path.join(cfg["_base"], cfg["data"]["root"])) == os.path.normpath(MONUSEG)
    assert len(cfg["data"]["val_ids"]) == 4 and "licence" in cfg["card"]
    ft = load_config(os.path.join(ROOT, "configs", "nucleus_finetune.yaml"))
    assert ft["model"]["params"] == cfg["model"]["params"]
    from histoflow.ml.transforms import builtin_model_path

    assert os.path.samefile(os.path.join(ft["_base"], ft["model"]["init"]), builtin_model_path())


def test_nucleus_task_from_the_command_line(tmp_path):
    ids = ["TCGA-21-5784-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1"]
    cfg = {"task": "nucleus_segmentation",
           "data": {"root": MONUSEG, "ids": ids, "val_ids": ids[1:], "crop": 64, "crops_per_epoch": 8,
                    "augment": {"zoom": [0.9, 1.1], "hsv": [0.02, 0.1, 0.1]}},
           "model": {"name": "unet", "params": {"out_channels": 4, "filters": [8, 16]}},
           "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "seed": 1},
           "output": str(tmp_path / "run"), "card": {"mpp": 0.25, "licence": "CC BY-NC-SA 4.0"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "histoflow.cli", "train", str(path), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "2 epochs" in r.stdout and "best.pt" in r.stdout
    card = json.load(open(tmp_path / "run" / "best.json"))
    assert card["task"] == "nucleus_segmentation" and card["split"] == {"train": ids[:1], "validation": ids[1:]}
    assert {"dice", "aji", "pq", "val_loss"} <= set(card["metrics"])
    hist = json.load(open(tmp_path / "run" / "metrics.json"))["history"]
    assert len(hist) == 2 and all(np.isfinite(h["val_loss"]) for h in hist)
    # --resume with more epochs goes on from the checkpoint
    r = subprocess.run([sys.executable, "-m", "histoflow.cli", "train", str(path), "--resume", "--epochs", "3",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(json.load(open(tmp_path / "run" / "metrics.json"))["history"]) == 3
    # --seed and --output: another member of an ensemble from the same configuration
    r = subprocess.run([sys.executable, "-m", "histoflow.cli", "train", str(path), "--seed", "7", "--epochs", "1",
                        "--output", str(tmp_path / "seed7"), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "seed7" / "best.json"))["training"]["seed"] == 7
    # stage 2: fine-tune from that run's best weights, with a weight average
    import torch

    from histoflow.ml import models
    from histoflow.ml.recipes import _model

    cfg2 = dict(cfg, model=dict(cfg["model"], init=str(tmp_path / "run" / "best.pt")),
                train=dict(cfg["train"], epochs=1, ema=0.9, progress=False), output=str(tmp_path / "ft"))
    start = models.load(tmp_path / "run" / "best.pt").state_dict()
    assert all(torch.equal(v, start[k]) for k, v in _model(cfg2).state_dict().items())
    trainer, hist = train_from_config(cfg2)
    assert len(hist) == 1 and json.load(open(tmp_path / "ft" / "best.json"))["training"]["ema"] == 0.9
    wrong = dict(cfg2, model={"name": "unet", "params": {"out_channels": 4, "filters": [8, 16, 32]},
                              "init": str(tmp_path / "run" / "best.pt")})
    with pytest.raises(ConfigError, match="model.init .*best.pt cannot start this model"):
        train_from_config(wrong)
    # data.mpp resamples the images, and the card records it (a card saying otherwise is refused)
    with pytest.raises(ConfigError, match="card.mpp 0.25 disagrees with data.mpp 0.5"):
        train_from_config(dict(cfg, data=dict(cfg["data"], mpp=0.5), card={"mpp": 0.25}))
    # neither says: the card records the images' own pixel size (inference assumed 0.25 µm/px without it)
    from histoflow.datasets.monuseg import aperio_mpp

    train_from_config(dict(cfg2, card={}, output=str(tmp_path / "nompp")))
    own = aperio_mpp(os.path.join(MONUSEG, ids[0] + ".xml"))
    assert own and abs(own - 0.25) > 1e-3  # this image states its own, not the default
    assert json.load(open(tmp_path / "nompp" / "best.json"))["mpp"] == round(own, 4)


def test_nucleus_crops_change_every_epoch_in_worker_processes(tmp_path, monkeypatch):
    """The trainer sets each epoch on the dataset; a DataLoader worker must see it (new crops, new
    augmentations), and the initial weights come from the seed."""
    import torch

    from histoflow.ml import train as T

    seen = []
    monkeypatch.setattr(T.Trainer, "fit", lambda self, train, val=None, resume=False: seen.append((self, train)) or [])
    cfg = {"task": "nucleus_segmentation",
           "data": {"root": MONUSEG, "ids": ["TCGA-21-5784-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1"], "crop": 64,
                    "crops_per_epoch": 4, "augment": {"flip": True, "hsv": [0.02, 0.1, 0.1], "randstain": 0.5}},
           "model": {"name": "unet", "params": {"out_channels": 4, "filters": [8, 16]}},
           "train": {"epochs": 2, "batch_size": 4, "num_workers": 1, "seed": 3}, "output": str(tmp_path / "r")}
    train_from_config(dict(cfg))
    train_from_config(dict(cfg))
    (t1, loader), (t2, _) = seen
    # randstain: colour templates fitted to the training images
    from histoflow.ml.augment import RandStainNA
    from histoflow.transforms.stain import lab_stats

    (rs,) = [op for op in loader.dataset.augment.ops if isinstance(op, RandStainNA)]
    assert rs.spread == 0.5 and rs.p == 0.5
    np.testing.assert_allclose(rs.means, np.mean([lab_stats(im)[0] for im in loader.dataset.images], 0))
    for a, b in zip(t1.model.state_dict().values(), t2.model.state_dict().values()):
        assert torch.equal(a, b)
    batches = []
    for epoch in (0, 1, 0):
        loader.dataset.set_epoch(epoch)
        batches.append(next(iter(loader))["image"])
    assert not torch.equal(batches[0], batches[1]) and torch.equal(batches[0], batches[2])


def test_tile_classification_task(tmp_path):
    from histoflow.core.slide import SlideData

    with SlideData(SVS) as s:
        tiles = []
        for t in s.generate_tiles(64, level=0):
            t.labels["tissue"] = int(t.image.mean() < 210)
            tiles.append(t)
            if len(tiles) == 96:
                break
        store = s.write(str(tmp_path / "t.h5path"), tiles=tiles)
    cfg = {"task": "tile_classification", "data": {"train": store, "val": store, "label": "tissue"},
           "model": {"name": "mobilenet_v2", "params": {"num_classes": 2, "width_mult": 0.25}},
           "train": {"epochs": 1, "batch_size": 32, "progress": False}, "output": str(tmp_path / "cls")}
    trainer, hist = train_from_config(cfg)
    assert len(hist) == 1 and os.path.exists(tmp_path / "cls" / "best.pt")


def test_config_errors(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "b.yaml"
    bad.write_text("task: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    # a section written twice: PyYAML kept the last one silently (lr 0.5 trained at the default 0.001)
    bad.write_text("task: tile_classification\ntrain: {epochs: 1, batch_size: 16, lr: 0.5}\noutput: x\n"
                   "train: {epochs: 1}\n")
    with pytest.raises(ConfigError, match=r"b.yaml: not valid YAML .*found the key 'train' a second time \(first on "
                                          r"line 2\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown task 'segment_everything'"):
        train_from_config({"task": "segment_everything"})
    with pytest.raises(ConfigError, match="missing key data.root"):
        train_from_config({"task": "nucleus_segmentation", "output": out, "data": {}})
    with pytest.raises(ConfigError, match="are not in"):
        train_from_config({"task": "nucleus_segmentation", "output": out, "data": {"root": MONUSEG, "val_ids": ["nope"]}})
    one = {"root": MONUSEG, "ids": ["TCGA-21-5784-01Z-00-DX1"]}
    with pytest.raises(ConfigError, match=r"data.augment.zoom is a pair \[smallest, largest\]"):
        train_from_config({"task": "nucleus_segmentation", "output": out, "data": dict(one, augment={"zoom": 0.8})})
    with pytest.raises(ConfigError, match="data: NucleusCrops: zoom must satisfy 0 < smallest <= largest"):
        train_from_config({"task": "nucleus_segmentation", "output": out, "data": dict(one, augment={"zoom": [1.25, 0.8]})})
    # a model that cannot do the task is named before the run touches its folder (out_channels 3 failed at
    # the first batch, after --overwrite had cleared the folder, naming no key); a card's own post-processing
    # would be recorded while the epoch was chosen with another
    small = {"root": MONUSEG, "ids": ["TCGA-21-5784-01Z-00-DX1"], "crop": 64, "crops_per_epoch": 4}
    os.makedirs(out)
    open(os.path.join(out, "keep.txt"), "w").close()
    for params, msg in (({"out_channels": 3, "filters": [8, 16]}, r"needs 4 maps per pixel .* gives \(1, 3, 64, 64\); "
                                                                  r"set model.params.out_channels: 4"),
                        ({"in_channels": 4, "out_channels": 4, "filters": [8, 16]}, r"cannot take the nucleus task's "
                                                                                    r"RGB images")):
        with pytest.raises(ConfigError, match=msg):
            train_from_config({"task": "nucleus_segmentation", "output": out, "data": small,
                               "model": {"name": "unet", "params": params}, "train": {"epochs": 1}})
        assert os.listdir(out) == ["keep.txt"]
    with pytest.raises(ConfigError, match=r"model 'hovernet' .* cannot take the nucleus task's RGB images "
                                          r"\(ParameterError: HoVerNet \(fast mode\) expects input .*; the nucleus "
                                          r"task needs a model that takes RGB images of any size"):
        train_from_config({"task": "nucleus_segmentation", "output": out, "data": small,
                           "model": {"name": "hovernet"}, "train": {"epochs": 1}})
    with pytest.raises(ConfigError, match="card.postprocess is written from data.postprocess"):
        train_from_config({"task": "nucleus_segmentation", "output": out, "data": small,
                           "model": {"name": "unet", "params": {"out_channels": 4}},
                           "card": {"postprocess": {"fg_threshold": 0.7}}})
    from histoflow.ml.recipes import _augmenter

    with pytest.raises(ConfigError, match="randstain is the templates' spread, a number"):
        _augmenter({"randstain": "wide"}, 0, images=[])
    r = subprocess.run([sys.executable, "-m", "histoflow.cli", "train", str(tmp_path / "none.yaml")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "none.yaml: no such configuration file" in r.stderr


def _classification_store(tmp_path, label_of):
    from histoflow.core.slide import SlideData

    with SlideData(SVS) as s:
        tiles = []
        for t in s.generate_tiles(32, level=0, stride=64):
            t.labels.update(label_of(t))
            tiles.append(t)
            if len(tiles) == 48:
                break
        return s.write(str(tmp_path / "t.h5path"), tiles=tiles)


def test_tile_classification_labels_are_classes(tmp_path):
    """Class names map to 0..k-1 (recorded in the card); fractional numbers and classes past the model's
    outputs are ConfigErrors, not a raw AttributeError / IndexError or a silent truncation."""
    store = _classification_store(tmp_path, lambda t: {"kind": "tissue" if t.image.mean() < 210 else "glass",
                                                       "score": float(t.image.mean()) / 255,
                                                       "grade": int(t.image.mean() < 210) * 2})

    def cfg(label, classes=2, out="cls"):
        return {"task": "tile_classification", "data": {"train": store, "val": store, "label": label},
                "model": {"name": "rccnet", "params": {"num_classes": classes}},
                "train": {"epochs": 1, "batch_size": 16, "progress": False}, "output": str(tmp_path / out)}

    c = cfg("kind")
    trainer, hist = train_from_config(c)
    assert len(hist) == 1
    from histoflow.ml import models

    assert models.read_card(str(tmp_path / "cls" / "best.pt"))["classes"] == ["glass", "tissue"]
    with pytest.raises(ConfigError, match="label 'score' holds numbers with fractions"):
        train_from_config(cfg("score", out="s"))
    with pytest.raises(ConfigError, match="label 'grade' has class 2, but the model gives 2 outputs"):
        train_from_config(cfg("grade", out="g"))


def test_tiles_without_their_class_are_refused(tmp_path):
    """A tile without the label reads as the fill ("" for names, -100 for numbers): never trained as a class."""
    n = {"i": 0}

    def label_of(t):
        n["i"] += 1
        if n["i"] == 3:  # one tile without a class
            return {}
        return {"kind": "tissue" if t.image.mean() < 210 else "glass", "grade": int(t.image.mean() < 210)}

    store = _classification_store(tmp_path, label_of)
    for label in ("kind", "grade"):
        cfg = {"task": "tile_classification", "data": {"train": store, "label": label},
               "model": {"name": "rccnet", "params": {"num_classes": 3}},
               "train": {"epochs": 1, "batch_size": 16, "progress": False}, "output": str(tmp_path / label)}
        with pytest.raises(ConfigError, match=f"some tiles have no '{label}' label"):
            train_from_config(cfg)
        assert not os.path.exists(tmp_path / label / "best.pt")


def test_tile_classification_is_augmented(tmp_path, monkeypatch):
    """data.augment applies to the training tiles (it was ignored), seeded, and not to validation tiles."""
    from histoflow.ml import data as data_mod

    store = _classification_store(tmp_path, lambda t: {"tissue": int(t.image.mean() < 210)})
    made = []
    original = data_mod.TileDataset.__init__

    def spy(self, *a, **k):
        original(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(data_mod.TileDataset, "__init__", spy)
    cfg = {"task": "tile_classification", "data": {"train": store, "val": store, "label": "tissue",
                                                   "augment": {"flip": True, "rot90": True, "hsv": [0.04, 0.2, 0.15]}},
           "model": {"name": "rccnet", "params": {"num_classes": 2}},
           "train": {"epochs": 1, "batch_size": 16, "progress": False}, "output": str(tmp_path / "aug")}
    train_from_config(cfg)
    train_set, val_set = made
    assert val_set.transform is None and train_set.transform is not None
    seen = set()
    for epoch in range(8):  # augmented afresh every epoch (and alike within one, whichever worker reads it)
        train_set.set_epoch(epoch)
        seen.add(train_set[5]["image"].numpy().tobytes())
    assert len(seen) > 1 and train_set[5]["image"].numpy().tobytes() in seen


@pytest.mark.parametrize("spec, message", [
    ({"brightness": True}, "data.augment.brightness is the largest shift, a fraction of the range (e.g. 0.15), not True"),
    ({"contrast": "0.2"}, "data.augment.contrast is the largest change of contrast (e.g. 0.15), not '0.2'"),
    ({"noise": True}, "data.augment.noise is the largest noise sigma"),
    ({"blur": [1.0]}, "data.augment.blur is the largest Gaussian sigma in pixels (e.g. 1.0), not [1.0]"),
    ({"flip": "false"}, "data.augment.flip is true or false, not 'false'"),
    ({"rot90": 2}, "data.augment.rot90 is true or false, not 2"),
])
def test_augmentation_settings_of_the_wrong_type_are_refused(spec, message):
    """`brightness: true` (or contrast, noise) was the largest strength there is (shifts of the whole range,
    noise of 255 grey levels), and a quoted "false" switched flips on."""
    from histoflow.ml.recipes import _augmenter

    with pytest.raises(ConfigError) as e:
        _augmenter(spec, 0, images=[])
    assert message in str(e.value)


def test_augmentation_strengths_of_zero_or_false_are_off_and_numbers_pass():
    from histoflow.ml.augment import Brightness, GaussianNoise, RandomFlip
    from histoflow.ml.recipes import _augmenter

    aug = _augmenter({"flip": False, "rot90": False, "brightness": 0, "contrast": False, "noise": 0.03}, 0, images=[])
    assert [type(op) for op in aug.ops] == [GaussianNoise] and aug.ops[0].sigma == 0.03
    for off in (0, None):  # as before: 0 and an empty value are off
        assert [type(op) for op in _augmenter({"flip": off, "rot90": off}, 0, images=[]).ops] == []
    aug = _augmenter({"brightness": 1}, 0, images=[])
    assert [type(op) for op in aug.ops][0] is RandomFlip and isinstance(aug.ops[-1], Brightness)
    with pytest.raises(ConfigError, match="only the nucleus task reads as a whole; use stain or hsv"):
        _augmenter({"randstain": 1.0}, 0)


@pytest.mark.parametrize("section, bad, message", [
    ("train", {"schedule": "cosine"}, "train: schedule must be"),
    ("train", {"epochs": 0}, "train: epochs must be a whole number"),
    ("train", {"lr": "fast"}, "train: lr must be a number"),
    ("train", {"device": "gpu"}, "train: device 'gpu' is not a torch device"),
    ("model", {"bogus": 1}, "model 'rccnet' cannot be made with model.params"),
    ("model", {"num_classes": -2}, "model 'rccnet' cannot be made with model.params"),
    ("augment", {"stain": 0.1}, "data.augment.stain is [sigma1, sigma2], e.g. [0.2, 0.2], not 0.1"),
    ("augment", {"hsv": [0.1, 0.2]}, "data.augment.hsv is [h, s, v], e.g. [0.04, 0.2, 0.15], not [0.1, 0.2]"),
    ("augment", {"brightness": True}, "data.augment.brightness is the largest shift, a fraction of the range"),
    ("train", {"batch_size": "x"}, "train.batch_size must be a whole number >= 1, not 'x'"),
    ("train", {"batch_size": 0}, "train.batch_size must be a whole number >= 1"),
    ("train", {"num_workers": -1}, "train.num_workers must be a whole number >= 0"),
    ("train", {"seed": "abc"}, "train.seed must be a whole number >= 0"),
    ("train", {"device": "cuda"}, "train: device 'cuda': this torch has no usable CUDA GPU here"),
    ("data", {"augment": {"not_an_op": 3}}, "unknown augmentation(s) ['not_an_op']"),
    ("data", {"agument": {"flip": True}}, "unknown data setting(s) ['agument']"),
])
def test_config_mistakes_are_one_line_errors(tmp_path, section, bad, message):
    """Ordinary mistakes in a configuration end `histoflow train` with one line naming the setting, not a
    traceback."""
    store = _classification_store(tmp_path, lambda t: {"tissue": int(t.image.mean() < 210)})
    cfg = {"task": "tile_classification", "data": {"train": store, "label": "tissue"},
           "model": {"name": "rccnet", "params": {"num_classes": 2}},
           "train": {"epochs": 1, "batch_size": 16, "progress": False}, "output": str(tmp_path / "cls")}
    if section == "model":
        cfg["model"]["params"].update(bad)
    elif section == "data":
        cfg["data"].update(bad)
    elif section == "augment":
        cfg = {"task": "nucleus_segmentation", "data": {"root": MONUSEG, "ids": ["TCGA-21-5784-01Z-00-DX1"],
                                                       "val_ids": [], "augment": bad},
               "model": {"name": "unet", "params": {"out_channels": 4, "filters": [8, 16]}},
               "output": str(tmp_path / "run")}
    else:
        cfg["train"].update(bad)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "histoflow.cli", "train", str(path), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("histoflow: error:") and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("change, message", [
    ({"trian": {"epochs": 1}}, "unknown section(s) ['trian']"),
    ({"task": ["nucleus_segmentation"]}, "task names the recipe"),
    ({"train": [1, 2]}, "train is a mapping of settings"),
    ({"card": "my model"}, "card is a mapping of settings"),
    ({"model": {"name": "unet", "parmas": {"out_channels": 4}}}, "unknown model setting(s) ['parmas']"),
    ({"data.val_id": ["TCGA-21-5784-01Z-00-DX1"]}, "unknown data setting(s) ['val_id']"),
    ({"data.val_ids": "TCGA-21-5784-01Z-00-DX1"}, "data.val_ids is a list of image names"),
    ({"data.crop": "big"}, "data.crop must be a whole number >= 1, not 'big'"),
    ({"data.postprocess": {"bogus": 1}}, "data.postprocess takes fg_threshold, marker_threshold"),
    ({"loss": {"bogus": 1}}, "loss: "),
    ({"train.amp": "false"}, "train: amp must be true or false, got 'false'"),
    # a card value that is not JSON failed when best.pt was first saved, after an epoch, naming no file or key
    ({"card": {"trained": datetime.date(2024, 5, 1)}}, "card.trained is datetime.date(2024, 5, 1) (a date), which "
                                                      "JSON cannot hold; write it as a string (quoted in YAML: "),
    ({"card": {"metrics": {"dice": float("inf")}}}, "card.metrics.dice is inf, which JSON cannot hold"),
    ({"card": {"mpp": "fine"}}, "card.mpp must be a number > 0 (µm per pixel), not 'fine'"),
    # these failed after the first epoch, when best.pt was saved (a raw TypeError; a ParameterError naming no file)
    ({"card": {"training": "fine-tuned from a colleague's run"}}, "card.training is a mapping (the run adds its own"),
    ({"card": {"metrics": [0.8]}}, "card.metrics is a mapping"),
    ({"card": {"architecture": "UNet"}}, "card.architecture is written from the model (model.name); leave it out"),
    ({"model": {"name": "UNet", "params": {}}}, "model.name: unknown model 'UNet'"),
    ({"train.seed": 2 ** 70}, "train.seed must be a whole number >= 0 and below 2**62"),
    # post-processing values were first used after an epoch (a raw numpy or OpenCV error)
    ({"data.postprocess": {"fg_threshold": 5}}, "data.postprocess.fg_threshold must be a number from 0 to 1, not 5"),
    ({"data.postprocess": {"marker_threshold": "high"}}, "data.postprocess.marker_threshold must be a number from 0"),
    ({"data.postprocess": {"sobel_ksize": 20}}, "data.postprocess.sobel_ksize must be an odd whole number from 1"),
    ({"data.postprocess": {"min_size": [10]}}, "data.postprocess.min_size must be a number of pixels >= 0"),
    ({"data.postprocess": {"ranges": {"hv": 1}}}, "data.postprocess.ranges: hovernet_postprocess: ranges must be"),
    # a metric the run does not compute: a TrainingError telling CLI users to "give a validate function"
    ({"train.monitor": "accuracy"}, "train.monitor is one of val_loss, train_loss, dice, aji, pq, not 'accuracy'"),
    ({"data.val_ids": [], "train.monitor": "aji"}, "train.monitor is one of val_loss, train_loss (dice, aji and pq "
                                                   "need validation images: data.val_ids), not 'aji'"),
])
def test_config_shape_mistakes_are_refused_before_any_work(tmp_path, change, message):
    """Misspelt or misshapen settings: a misspelt section, data key or model key left the run on its
    defaults without a word (`trian:` trained 10 default epochs, `val_id:` chose the epoch on the training
    loss, `model.parmas` made another network); others ended in tracebacks, one (`postprocess`) after a
    whole epoch. Each is now a ConfigError naming the file, before the output folder is made."""
    cfg = {"task": "nucleus_segmentation",
           "data": {"root": MONUSEG, "ids": ["TCGA-21-5784-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1"],
                    "val_ids": ["TCGA-A7-A13E-01Z-00-DX1"], "crop": 64, "crops_per_epoch": 4},
           "model": {"name": "unet", "params": {"out_channels": 4, "filters": [8, 16]}},
           "train": {"epochs": 1, "progress": False}, "output": "run"}
    for key, value in change.items():
        if "." in key:
            section, k = key.split(".")
            cfg[section][k] = value
        else:
            cfg[key] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as e:
        train_from_config(load_config(path))
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()


def test_an_empty_train_section_takes_command_line_overrides(tmp_path):
    """`train:` with nothing under it is None in YAML: --epochs / --no-progress set it (was a TypeError)."""
    from histoflow.cli import main

    cfg = {"task": "nucleus_segmentation",
           "data": {"root": MONUSEG, "ids": ["TCGA-21-5784-01Z-00-DX1"], "crop": 64, "crops_per_epoch": 4},
           "model": {"name": "unet", "params": {"out_channels": 4, "filters": [8, 16]}}, "output": "run"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg) + "train:\n")
    assert main(["train", str(path), "--epochs", "1", "--no-progress"]) == 0
    assert len(json.load(open(tmp_path / "run" / "metrics.json"))["history"]) == 1


def test_numeric_strings_in_postprocess_are_numbers(tmp_path):
    """PyYAML reads `fg_threshold: 5e-1` as a string: it reached numpy after the first epoch (a raw TypeError).
    It is read as the number it spells, as train.lr is."""
    cfg = {"task": "nucleus_segmentation",
           "data": {"root": MONUSEG, "ids": ["TCGA-21-5784-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1"],
                    "val_ids": ["TCGA-A7-A13E-01Z-00-DX1"], "crop": 64, "crops_per_epoch": 2},
           "model": {"name": "unet", "params": {"out_channels": 4, "filters": [4, 8]}},
           "train": {"epochs": 1, "batch_size": 2, "progress": False, "monitor": "aji"}, "output": "run",
           "card": {"mpp": "2.5e-1"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg) .replace("data:\n", "data:\n  postprocess: {fg_threshold: 5e-1, min_size: 1e1}\n"))
    loaded = load_config(path)
    assert loaded["data"]["postprocess"] == {"fg_threshold": 0.5, "min_size": 10.0}  # numbers, as YAML 1.2 reads them
    trainer, hist = train_from_config(loaded)
    assert len(hist) == 1 and np.isfinite(hist[0]["aji"])
    assert json.load(open(tmp_path / "run" / "best.json"))["mpp"] == 0.25


def test_tile_classification_without_training_files_is_a_config_error(tmp_path):
    """`data.train: []` ended in an AssertionError from torch's ConcatDataset."""
    for train in ([], None, [""], {"a": 1}):
        cfg = {"task": "tile_classification", "data": {"train": train, "label": "tissue"},
               "model": {"name": "rccnet", "params": {"num_classes": 2}}, "output": str(tmp_path / "cls"),
               "_path": str(tmp_path / "c.yaml")}
        with pytest.raises(ConfigError, match=r"c\.yaml: data\.train is an h5path file or a list of them"):
            train_from_config(cfg)
    assert not (tmp_path / "cls").exists()


def test_nucleus_post_processing_goes_into_the_card_and_deep_networks_validate(tmp_path):
    """The post-processing that chose the epoch (data.postprocess, or for a fine-tune the starting model's own)
    was not written to the card, so NucleusSegmentation ran the result with its defaults; and validation images
    were padded to multiples of 16 whatever the network, so a 6-level U-Net (multiples of 32) crashed after its
    first epoch."""
    import torch

    from histoflow.ml import models

    ids = ["TCGA-21-5784-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1"]
    base = {"task": "nucleus_segmentation",
            "data": {"root": MONUSEG, "ids": ids, "val_ids": ids[1:], "crop": 64, "crops_per_epoch": 4},
            "model": {"name": "unet", "params": {"out_channels": 4, "filters": [4, 4, 4, 4, 4, 4]}},
            "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, "seed": 1, "progress": False},
            "card": {"mpp": 0.25}}
    post = {"fg_threshold": 0.45, "marker_threshold": 0.35, "sobel_ksize": 7}
    cfg = dict(base, data=dict(base["data"], postprocess=post), output=str(tmp_path / "deep"))
    _, hist = train_from_config(cfg)  # validated on a 1000 x 1000 image: padded to 1024, not 1008
    assert len(hist) == 1 and np.isfinite(hist[0]["val_loss"])
    assert json.load(open(tmp_path / "deep" / "best.json"))["postprocess"] == post
    assert base["card"] == {"mpp": 0.25} and "split" not in cfg["card"]  # the caller's dict is left as it was
    # a fine-tune without data.postprocess keeps (and validates with) its starting model's
    torch.manual_seed(0)
    start = models.create("unet", out_channels=4, filters=[4, 4, 4, 4, 4, 4]).eval()
    own = {"fg_threshold": 0.55, "marker_threshold": 0.5, "sobel_ksize": 9, "min_size": 5}
    models.save(start, tmp_path / "start.pt", card={"mpp": 0.25, "postprocess": own})
    ft = dict(base, model=dict(base["model"], init=str(tmp_path / "start.pt")), output=str(tmp_path / "ft"))
    train_from_config(ft)
    assert json.load(open(tmp_path / "ft" / "best.json"))["postprocess"] == own


def test_a_config_without_output_is_refused_before_any_data_is_read(monkeypatch):
    """A configuration without `output:` failed only after its images were read and its model made."""
    import histoflow.datasets as datasets

    def no(*a, **k):
        raise AssertionError("images read before the configuration's output was checked")

    monkeypatch.setattr(datasets, "load_monuseg", no)
    cfg = {"task": "nucleus_segmentation", "data": {"root": MONUSEG},
           "model": {"name": "unet", "params": {"out_channels": 4, "filters": [8, 16]}}}
    with pytest.raises(ConfigError, match="missing key output .*--output DIR"):
        train_from_config(cfg)


def test_train_stopped_by_a_group_signal_says_one_line(tmp_path):
    """`timeout`, batch systems and Ctrl-C signal the whole process group: the DataLoader workers died of the
    TERM first and torch printed a traceback ("DataLoader worker ... is killed by signal: Terminated", exit 1)
    instead of the command's one-line interrupt."""
    import signal
    import time

    import psutil

    ids = ["TCGA-21-5784-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1"]
    cfg = {"task": "nucleus_segmentation",
           "data": {"root": MONUSEG, "ids": ids, "val_ids": ids[1:], "crop": 64, "crops_per_epoch": 64},
           "model": {"name": "unet", "params": {"out_channels": 4, "filters": [8, 16]}},
           "train": {"epochs": 200, "batch_size": 4, "num_workers": 1, "seed": 1},
           "output": str(tmp_path / "run"), "card": {"mpp": 0.25}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    p = subprocess.Popen([sys.executable, "-m", "histoflow.cli", "train", str(path), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not psutil.Process(p.pid).children():
        time.sleep(0.05)  # until a DataLoader worker runs
    assert p.poll() is None, p.communicate()[1]
    time.sleep(0.3)
    os.killpg(p.pid, signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err and "interrupted" in err, (p.returncode, err[-2000:])


def test_card_section_with_only_comments_and_the_classification_card(tmp_path):
    """`card:` with only comments under it is YAML's None: the run goes ahead (it was an AttributeError). A
    tile_classification card says what the model predicts and from which files."""
    store = _classification_store(tmp_path, lambda t: {"tissue": int(t.image.mean() < 210)})
    path = tmp_path / "c.yaml"
    path.write_text(f"task: tile_classification\ndata: {{train: {store}, label: tissue}}\n"
                    "model: {name: rccnet, params: {num_classes: 2}}\n"
                    f"train: {{epochs: 1, batch_size: 16, progress: false}}\noutput: {tmp_path / 'run'}\n"
                    "card:\n  # licence: to be decided\n")
    train_from_config(load_config(path))
    from histoflow.ml import models

    card = models.read_card(str(tmp_path / "run" / "best.pt"))
    assert card["task"] == "tile_classification" and card["label"] == "tissue"
    assert card["split"] == {"train": ["t.h5path"], "validation": []} and "t.h5path" in card["training_data"]


def test_resume_with_other_data_or_batch_size_is_refused(tmp_path):
    """The trainer's own settings (lr, schedule ...) were compared on resume, the configuration's data, label and
    batch size were not: a resumed run trained on other tiles and joined the metrics as one run."""
    from histoflow.ml.train import TrainingError

    store = _classification_store(tmp_path, lambda t: {"tissue": int(t.image.mean() < 210),
                                                       "dark": int(t.image.mean() < 180)})
    cfg = {"task": "tile_classification", "data": {"train": store, "label": "tissue"},
           "model": {"name": "rccnet", "params": {"num_classes": 2}},
           "train": {"epochs": 1, "batch_size": 16, "progress": False}, "output": str(tmp_path / "run")}
    train_from_config(cfg)
    longer = dict(cfg, train=dict(cfg["train"], epochs=2, progress=False, num_workers=0))
    for change, named in (({"train": dict(longer["train"], batch_size=8)}, "train.batch_size 16 -> 8"),
                          ({"data": dict(cfg["data"], label="dark")}, "data.label 'tissue' -> 'dark'")):
        with pytest.raises(TrainingError, match=f"cannot resume.*{named}"):
            train_from_config(dict(longer, **change), resume=True)
    trainer, hist = train_from_config(longer, resume=True)  # more epochs, the same run: continues
    assert trainer.epoch == 2 and len(hist) == 2


def test_train_overwrite_replaces_the_earlier_run_when_training_starts(tmp_path):
    """--overwrite left the old run's last.ckpt until the new run's first epoch ended: a new run stopped before
    that, then --resume, continued the old run as if it were the new one. The new run removes the old files as it
    starts training; one refused before that (its data missing) leaves them as they were."""
    out = tmp_path / "run"
    out.mkdir()
    old = ("last.ckpt", "best.pt", "best.json", "metrics.csv", "metrics.json")
    for n in old:
        (out / n).write_text("the earlier run")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"task": "tile_classification", "data": {"train": "missing.h5path", "label": "x"},
                                    "model": {"name": "rccnet"}, "output": str(out)}))
    r = subprocess.run([sys.executable, "-m", "histoflow.cli", "train", str(path), "--overwrite"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "missing.h5path" in r.stderr, r.stderr
    assert sorted(os.listdir(out)) == sorted(old)          # refused before training: the old run is kept
    store = _classification_store(tmp_path, lambda t: {"grade": int(t.image.mean() < 210) * 2})
    # (a batch of one tile, the last of 48 in batches of 47, cannot train RCCNet's batch norm: the run stops in its
    # first epoch, once it has started; a class past the model's outputs is refused before, since session 28)
    path.write_text(yaml.safe_dump({"task": "tile_classification", "data": {"train": store, "label": "grade"},
                                    "model": {"name": "rccnet", "params": {"num_classes": 3}},
                                    "train": {"epochs": 1, "batch_size": 47}, "output": str(out)}))
    r = subprocess.run([sys.executable, "-m", "histoflow.cli", "train", str(path), "--overwrite", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "more than 1 value per channel" in r.stderr, r.stderr   # stopped in its first epoch
    assert os.listdir(out) == []                             # ... with nothing of the old run left
    r = subprocess.run([sys.executable, "-m", "histoflow.cli", "train", str(path), "--resume", "--no-progress"],
                       capture_output=True, text=True)
    assert "no last.ckpt to resume from" in r.stderr, r.stderr

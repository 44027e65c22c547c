"""Model architectures (parameter counts against the published ones), registry, save / load."""
import json

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from torch import nn

from histoflow.errors import HistoflowError, ParameterError
from histoflow.ml import models
from histoflow.ml.models import ModelError, UnknownModelError
from histoflow.ml.losses import hv_targets as hv_maps_from_instances
from histoflow.ml.models.hovernet import hovernet_postprocess
from histoflow.ml.models.resnet import replace_batchnorm_with_instancenorm
from histoflow.ml.models.unet import UNet

NINE_LEVELS = (8, 16, 32, 64, 128, 128, 256, 256, 512)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- published parameter counts

@pytest.mark.parametrize("name, kwargs, expected", [
    ("mobilenet_v2", {}, 3_504_872),                      # torchvision mobilenet_v2(), 1000 classes
    ("resnet18", {}, 11_689_512),
    ("resnet34", {}, 21_797_672),
    ("resnet18", {"norm": "instance"}, 11_689_512),       # affine IN has BN's gamma / beta
])
def test_published_parameter_counts(name, kwargs, expected):
    assert n_params(models.create(name, **kwargs)) == expected


def test_rccnet_matches_the_papers_count():
    # Basha et al. 2018 report 1,512,868 parameters, counted the Keras way (running stats included)
    m = models.create("rccnet")
    running = sum(b.numel() for k, b in m.named_buffers() if "running" in k)
    assert n_params(m) == 1_511_652
    assert n_params(m) + running == 1_512_868


def test_mobilenet_width_multiplier_shrinks_the_body():
    small = models.create("mobilenet_v2", width_mult=0.5)
    assert n_params(small) < n_params(models.create("mobilenet_v2")) // 1.5
    assert small.last_channel == 1280  # never scaled below 1280


# ---------------------------------------------------------------- U-Net

def test_unet_default_shapes_and_attributes():
    m = UNet().eval()
    assert (m.in_channels, m.out_channels, m.filters) == (3, 2, (32, 64, 128, 256))
    with torch.no_grad():
        y = m(torch.randn(2, 3, 64, 48))
    assert y.shape == (2, 2, 64, 48)


def test_unet_nine_levels_on_rgb_plus_heatmap():
    m = UNet(in_channels=4, out_channels=2, filters=NINE_LEVELS).eval()
    assert len(m.encoder) == 9 and len(m.decoder) == 8 and m.size_divisor == 256
    with torch.no_grad():
        y = m(torch.randn(1, 4, 256, 256))
    assert y.shape == (1, 2, 256, 256)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("upsample, norm", [("bilinear", "instance"), ("transpose", None), ("bilinear", "batch")])
def test_unet_variants(upsample, norm):
    m = UNet(in_channels=1, out_channels=3, filters=(4, 8, 16), upsample=upsample, norm=norm, dropout=0.1).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)
    kinds = {type(x) for x in m.modules()}
    assert (nn.ConvTranspose2d in kinds) == (upsample == "transpose")
    assert (nn.InstanceNorm2d in kinds) == (norm == "instance")
    assert (nn.BatchNorm2d in kinds) == (norm == "batch")


def test_unet_skip_connections_are_used():
    m = UNet(filters=(4, 8), norm=None).eval()
    x = torch.zeros(1, 3, 16, 16)
    x2 = x.clone()
    x2[..., 0, 0] = 10.0  # a change at one pixel reaches the output at full resolution via the skip
    with torch.no_grad():
        d = (m(x2) - m(x)).abs().sum(1)[0]
    assert d[0, 0] > 0 and d[8:, 8:].max() == 0


def test_unet_rejects_indivisible_input():
    m = UNet(filters=(4, 8, 16, 32))
    with pytest.raises(ValueError, match="divisible by 8"):
        m(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="expected input"):
        m(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="upsample"):
        UNet(upsample="nearest")
    with pytest.raises(ValueError, match="norm"):
        UNet(norm="group")


def test_unet_channels_last_and_bf16_autocast():
    m = UNet(filters=(4, 8, 16)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    assert torch.allclose(y.float(), ref, atol=0.1 * ref.abs().max().item())


def test_unet_trains_one_step():
    m = UNet(filters=(4, 8))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.randint(0, 2, (2, 16, 16))
    loss0 = nn.functional.cross_entropy(m(x), t)
    loss0.backward()
    opt.step()
    assert all(p.grad is not None for p in m.parameters())


# ---------------------------------------------------------------- classifiers

def test_mobilenet_paper_head():
    m = models.create("mobilenet_v2", head="paper", num_classes=2).eval()
    layers = [type(x) for x in m.classifier]
    assert layers == [nn.Linear, nn.Dropout, nn.ReLU, nn.BatchNorm1d, nn.Linear]
    assert m.classifier[0].out_features == 100 and m.classifier[1].p == 0.5
    with torch.no_grad():
        assert m(torch.randn(2, 3, 64, 64)).shape == (2, 2)
        assert m.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 1280)
    with pytest.raises(ValueError, match="head"):
        models.create("mobilenet_v2", head="fancy")


def test_resnet_in_channels_and_classes():
    m = models.create("resnet34", in_channels=1, num_classes=5).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    with pytest.raises(ValueError, match="norm"):
        models.create("resnet18", norm="layer")


def test_replace_batchnorm_with_instancenorm_leaves_no_batchnorm():
    m = models.create("resnet18", num_classes=3)
    with torch.no_grad():
        m.bn1.weight.fill_(2.0)
    out = replace_batchnorm_with_instancenorm(m)
    assert out is m and m.norm == "instance"
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
    ins = [x for x in m.modules() if isinstance(x, nn.InstanceNorm2d)]
    assert len(ins) == 20 and all(x.affine for x in ins)
    assert torch.all(m.bn1.weight == 2.0)  # affine weights carried over
    assert isinstance(replace_batchnorm_with_instancenorm(nn.BatchNorm1d(4)), nn.InstanceNorm1d)


def test_replace_batchnorm_keeps_the_model_dtype():
    """A double (or half) model stays one: the instance norms take the replaced layers' dtype, affine or not."""
    m = models.create("resnet18", num_classes=3).double()
    replace_batchnorm_with_instancenorm(m)
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    with torch.no_grad():
        assert m.eval()(torch.randn(2, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64
    seq = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, affine=False)).to(torch.float64)
    replace_batchnorm_with_instancenorm(seq)
    assert {p.dtype for p in seq.parameters()} == {torch.float64}
    assert seq(torch.randn(1, 2, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_instance_norm_resnet_prediction_does_not_depend_on_the_batch():
    x = torch.randn(3, 3, 48, 48)
    for norm, independent in (("instance", True), ("batch", False)):
        m = models.create("resnet18", num_classes=3, norm=norm).train()
        with torch.no_grad():
            together, alone = m(x)[:1], m(x[:1].repeat(2, 1, 1, 1))[:1]
        assert torch.allclose(together, alone, atol=1e-5) == independent


def test_rccnet_patch_sizes():
    with torch.no_grad():
        assert models.create("rccnet").eval()(torch.randn(3, 3, 32, 32)).shape == (3, 4)
        assert models.create("rccnet", input_size=27, num_classes=2).eval()(torch.randn(1, 3, 27, 27)).shape == (1, 2)
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\).*\(1, 3, 27, 27\)"):
        models.create("rccnet")(torch.randn(1, 3, 27, 27))


# ---------------------------------------------------------------- HoVer-Net

def _touching_discs():
    yy, xx = np.mgrid[:96, :96]
    lab = np.zeros((96, 96), np.int32)
    lab[(yy - 48) ** 2 + (xx - 34) ** 2 <= 18 ** 2] = 1
    lab[((yy - 48) ** 2 + (xx - 66) ** 2 <= 18 ** 2) & (lab == 0)] = 2  # overlaps disc 1: they touch
    lab[(yy - 14) ** 2 + (xx - 14) ** 2 <= 7 ** 2] = 3
    return lab


def test_hv_maps_from_instances():
    lab = _touching_discs()
    hv = hv_maps_from_instances(lab)
    assert hv.shape == (2, 96, 96) and hv.dtype == np.float32
    assert hv.min() == -1 and hv.max() == 1
    assert np.all(hv[:, lab == 0] == 0)
    assert hv[0, 48, 20] < 0 < hv[0, 48, 45]     # left / right of disc 1's centre
    assert hv[1, 35, 34] < 0 < hv[1, 60, 34]     # above / below


def test_hovernet_postprocess_separates_touching_nuclei():
    lab = _touching_discs()
    assert ndi.label(lab > 0)[1] == 2  # the two large discs are one foreground component
    hv = hv_maps_from_instances(lab)
    np_prob = np.stack([lab == 0, lab > 0]).astype(np.float32)       # the NP branch's softmax
    type_map = np.select([lab == 1, lab == 2, lab == 3], [1, 2, 1], 0)
    tp_prob = np.eye(3, dtype=np.float32)[type_map].transpose(2, 0, 1)
    out, types = hovernet_postprocess(np_prob, hv, tp_prob)
    assert out.dtype == np.int32 and out.max() == 3 and set(np.unique(out)) == {0, 1, 2, 3}
    for inst in range(1, 4):
        true = np.bincount(lab[out == inst]).argmax()
        iou = ((out == inst) & (lab == true)).sum() / ((out == inst) | (lab == true)).sum()
        assert iou > 0.9
        assert types[inst] == {1: 1, 2: 2, 3: 1}[true]
    # also from torch tensors and a plain type map
    out2, types2 = hovernet_postprocess(torch.from_numpy(np_prob[1]), torch.from_numpy(hv), type_map)
    assert np.array_equal(out, out2) and types == types2
    empty, none = hovernet_postprocess(np.zeros((32, 32)), np.zeros((2, 32, 32)))
    assert empty.max() == 0 and none == {}
    with pytest.raises(ValueError, match="hv_map"):
        hovernet_postprocess(np_prob, hv[:1])
    # one NaN or infinite value made the image-wide extremes NaN: every nucleus was lost without a word
    for where, value in (("hv", np.nan), ("hv", np.inf), ("np", np.nan)):
        h, p = hv.copy(), np_prob.copy()
        (h[0] if where == "hv" else p[1])[95, 95] = value
        with pytest.raises(ParameterError, match=rf"the maps hold NaN or infinite values \({where}\w*: 1 value"):
            hovernet_postprocess(p, h)


@pytest.mark.parametrize("mode, size, out_size, pad, classes", [
    ("fast", 256, 256, True, 3), ("fast", 256, 164, False, 0), ("original", 270, 80, False, 5),
    ("original", 270, 264, True, 0)])  # output_size said 80 here
def test_hovernet_forward_returns_branch_dict(mode, size, out_size, pad, classes):
    # shapes on the meta device: a real CPU forward of HoVer-Net takes ~10 s
    with torch.device("meta"):
        m = models.create("hovernet", mode=mode, out_classes=classes, decoder_padding=pad).eval()
    assert (m.input_size, m.output_size) == (size, out_size)
    out = m(torch.empty(2, 3, size, size, device="meta"))
    expected = {"nucleus_prediction": 2, "horizontal_vertical": 2}
    if classes:
        expected["type_prediction"] = classes
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        k: (2, c, out_size, out_size) for k, c in expected.items()}


def test_hovernet_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        models.create("hovernet", mode="slow")


def test_models_refuse_bad_arguments_and_inputs_with_parameter_errors():
    from histoflow.ml.models.hovernet import HoVerNet
    from histoflow.ml.models.mobilenet import MobileNetV2
    from histoflow.ml.models.rccnet import RCCNet

    for bad in (dict(num_classes=0), dict(in_channels=0)):
        with pytest.raises(ParameterError, match="RCCNet"):
            RCCNet(**bad)
    for bad in (dict(out_classes=-1), dict(np_out_channels=3), dict(in_channels=0)):
        with pytest.raises(ParameterError, match="HoVerNet"):
            HoVerNet(**bad)
    h = HoVerNet().eval()
    with torch.no_grad(), pytest.raises(ParameterError, match=r"fast mode.*\(N, 3, 256, 256\).*\(1, 3, 270, 270\)"):
        h(torch.zeros(1, 3, 270, 270))
    with torch.no_grad(), pytest.raises(ParameterError, match=r"\(N, 3, 32, 32\).*\(2, 1, 32, 32\)"):
        RCCNet().eval()(torch.zeros(2, 1, 32, 32))
    with torch.no_grad(), pytest.raises(ParameterError, match=r"MobileNetV2.*\(N, 3, H, W\).*\(1, 4, 64, 64\)"):
        MobileNetV2(num_classes=2).eval()(torch.zeros(1, 4, 64, 64))


# ---------------------------------------------------------------- registry, save / load

def test_registry_names_and_unknown_model():
    assert {"unet", "mobilenet_v2", "resnet18", "resnet34", "rccnet", "hovernet"} <= set(models.list_models())
    with pytest.raises(ValueError, match="unknown model 'vgg'.*resnet18"):
        models.create("vgg")
    assert issubclass(UnknownModelError, ModelError) and issubclass(ModelError, HistoflowError)


def _settle(m: nn.Module, shape) -> nn.Module:
    """A train-mode pass so batch-norm running statistics are not the defaults."""
    m.train()
    with torch.no_grad():
        m(torch.randn(*shape))
    return m.eval()


@pytest.mark.parametrize("name, kwargs, shape", [
    ("unet", {"in_channels": 4, "filters": (4, 8, 16), "upsample": "bilinear"}, (2, 4, 32, 32)),
    ("resnet18", {"norm": "instance", "num_classes": 3}, (2, 3, 48, 48)),
    ("mobilenet_v2", {"head": "paper", "num_classes": 2, "width_mult": 0.35}, (2, 3, 32, 32)),
    ("rccnet", {"num_classes": 5}, (2, 3, 32, 32)),
])
def test_save_load_round_trip(tmp_path, name, kwargs, shape):
    m = _settle(models.create(name, **kwargs), shape)
    path = tmp_path / "sub" / "model.pt"
    card_file = models.save(m, path, card={"metrics": {"f1": 0.8}, "training_data": "synthetic", "notes": "x"})
    assert card_file == tmp_path / "sub" / "model.json" and path.is_file()
    card = json.loads(card_file.read_text())
    assert card["architecture"] == name
    for k, v in kwargs.items():
        assert card["parameters"][k] == (list(v) if isinstance(v, tuple) else v)
    assert card["metrics"] == {"f1": 0.8} and card["notes"] == "x" and card["licence"] is None
    assert "histoflow_version" in card

    loaded = models.load(path)
    assert type(loaded) is type(m) and not loaded.training and loaded.card == card
    x = torch.randn(*shape)
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))


def test_save_a_directly_constructed_model(tmp_path):
    m = UNet(in_channels=2, filters=(4, 8), norm="instance").eval()
    models.save(m, tmp_path / "u.pt")
    loaded = models.load(tmp_path / "u.json")  # the card's path works too
    assert (loaded.in_channels, loaded.filters, loaded.norm) == (2, (4, 8), "instance")
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        assert torch.equal(m(x), loaded(x))


def test_unet_one_pixel_bottleneck_is_a_clear_error():
    """The paper's 9-level U-Net at 256 px has a 1 x 1 bottleneck: instance norm cannot normalise it (in eval too),
    batch norm cannot in training at batch 1. A ParameterError names the sizes that work, not torch's message."""
    paper = dict(in_channels=4, filters=(8, 16, 32, 64, 128, 128, 256, 256, 512))
    m = UNet(norm="instance", **paper).eval()
    with torch.no_grad(), pytest.raises(ParameterError, match=r"1x1 bottleneck.*at least 512x256"):
        m(torch.zeros(2, 4, 256, 256))
    with torch.no_grad():
        assert m(torch.zeros(1, 4, 512, 256)).shape == (1, 2, 512, 256)
    b = UNet(norm="batch", **paper).train()
    with pytest.raises(ParameterError, match="batch of 2 or more"):
        b(torch.zeros(1, 4, 256, 256))
    assert b(torch.zeros(2, 4, 256, 256)).shape == (2, 2, 256, 256)


def test_register_a_new_architecture(tmp_path):
    @models.register("tiny_test_net")
    class Tiny(nn.Module):
        def __init__(self, width: int = 3):
            super().__init__()
            self.width = width
            self.lin = nn.Linear(width, 1)

        def forward(self, x):
            return self.lin(x)

    assert "tiny_test_net" in models.list_models()
    models.save(Tiny(width=5), tmp_path / "t.pt")
    assert models.load(tmp_path / "t.pt").lin.in_features == 5
    with pytest.raises(ModelError, match="not a registered architecture"):
        models.save(nn.Linear(2, 2), tmp_path / "lin.pt")


def test_load_errors_name_the_file(tmp_path):
    m = models.create("rccnet")
    path = tmp_path / "r.pt"
    models.save(m, path)
    card = path.with_suffix(".json")

    path.unlink()
    with pytest.raises(ModelError, match=r"r\.pt.*weights file not found"):
        models.load(path)

    models.save(m, path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ModelError, match=r"r\.pt.*cannot read the weights"):
        models.load(path)

    models.save(models.create("rccnet", num_classes=2), path)  # weights of another shape
    card.write_text(json.dumps({"architecture": "rccnet", "parameters": {"num_classes": 4}}))
    with pytest.raises(ModelError, match=r"r\.pt.*do not match"):
        models.load(path)

    card.write_text("{not json")
    with pytest.raises(ModelError, match=r"r\.json.*not a readable JSON"):
        models.load(path)

    card.write_text(json.dumps({"architecture": "vgg", "parameters": {}}))
    with pytest.raises(ModelError, match=r"r\.json.*unknown model 'vgg'"):
        models.load(path)

    card.write_text(json.dumps({"architecture": "rccnet", "parameters": {"bogus": 1}}))
    with pytest.raises(ModelError, match=r"r\.json.*cannot create 'rccnet'"):
        models.load(path)

    card.write_text(json.dumps({"parameters": {}}))
    with pytest.raises(ModelError, match=r"r\.json.*no 'architecture'"):
        models.load(path)

    card.unlink()
    with pytest.raises(ModelError, match=r"r\.json.*model card not found"):
        models.load(path)


def test_save_refuses_conflicting_card(tmp_path):
    m = models.create("rccnet")
    with pytest.raises(ValueError, match="architecture"):
        models.save(m, tmp_path / "r.pt", card={"architecture": "unet"})
    with pytest.raises(ValueError, match="overwritten"):
        models.save(m, tmp_path / "r.json")


# ---------------------------------------------------------------- ensembles, float16 weights

def _saved_unets(tmp_path, n, filters=(4, 8), **card):
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        m = _settle(models.create("unet", in_channels=3, out_channels=4, filters=filters), (2, 3, 16, 16))
        p = tmp_path / f"member{i}.pt"
        models.save(m, p, card={"mpp": 0.25, "task": "nucleus_segmentation", **card})
        paths.append(p)
    return paths


def test_ensemble_is_the_weighted_mean_of_its_members(tmp_path):
    paths = _saved_unets(tmp_path, 3)
    members = [models.load(p) for p in paths]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        outs = [m(x) for m in members]
        ens = models.ensemble(paths)
        assert isinstance(ens, models.Ensemble) and not ens.training and ens.size_divisor == 2
        torch.testing.assert_close(ens(x), sum(outs) / 3, rtol=0, atol=1e-6)
        assert not torch.allclose(outs[0], outs[1])  # the members differ, so the mean is not trivial
        weighted = models.ensemble(paths[:2], weights=[3, 1])
        torch.testing.assert_close(weighted(x), 0.75 * outs[0] + 0.25 * outs[1], rtol=0, atol=1e-6)
    assert ens.card["mpp"] == 0.25 and [m["path"] for m in ens.card["members"]] == [str(p) for p in paths]


def test_ensemble_saves_as_one_model_in_float16(tmp_path):
    paths = _saved_unets(tmp_path, 2, filters=(16, 32))  # 2 x 31 k weights: the pickle's overhead is small
    ens = models.ensemble(paths)
    out32 = tmp_path / "ens32.pt"
    out16 = tmp_path / "ens16.pt"
    models.save(ens, out32, card={"mpp": 0.25})
    card = json.loads(models.save(ens, out16, card={"mpp": 0.25}, dtype="float16").read_text())
    assert card["architecture"] == "ensemble" and card["weights_dtype"] == "float16"
    assert [m["architecture"] for m in card["parameters"]["members"]] == ["unet", "unet"]
    assert card["parameters"]["weights"] == [0.5, 0.5]
    assert out16.stat().st_size < 0.6 * out32.stat().st_size
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        ref = ens(x)
        torch.testing.assert_close(models.load(out32)(x), ref, rtol=0, atol=1e-6)
        back = models.load(out16)
        assert all(p.dtype == torch.float32 for p in back.parameters())
        err = (back(x) - ref).abs().max().item()
    assert 0 < err < 1e-2  # rounded weights, same model


def test_ensemble_errors(tmp_path):
    paths = _saved_unets(tmp_path, 2)
    other = tmp_path / "other.pt"
    models.save(models.create("unet", in_channels=3, out_channels=4, filters=(4, 8)), other, card={"mpp": 0.5})
    with pytest.raises(ModelError, match=r"disagree on 'mpp'.*other\.pt"):
        models.ensemble([paths[0], other])
    with pytest.raises(ModelError, match=r"missing\.pt.*weights file not found|missing\.json.*card not found"):
        models.ensemble([paths[0], tmp_path / "missing.pt"])
    with pytest.raises(ModelError, match="at least one"):
        models.ensemble([])
    with pytest.raises(ModelError, match="weights must be 2"):
        models.ensemble(paths, weights=[1.0])
    with pytest.raises(ValueError, match="cannot be ensembles"):
        models.create("ensemble", members=[{"architecture": "ensemble", "parameters": {}}])
    with pytest.raises(ValueError, match="dtype"):
        models.save(models.ensemble(paths), tmp_path / "e.pt", dtype="int8")


def test_cards_travel_through_save_and_ensembles(tmp_path):
    """A loaded model re-saved (e.g. to float16) keeps its card (pixel size, post-processing); an ensemble
    keeps every entry its members agree on; members with other output shapes or dict outputs average right."""
    card = {"mpp": 0.5, "task": "nucleus_segmentation", "postprocess": {"min_size": 5}}
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        p = tmp_path / f"u{seed}.pt"
        models.save(models.create("unet", filters=[4, 8], out_channels=4), p, card=card)
        paths.append(p)
    half = tmp_path / "half.pt"
    models.save(models.load(paths[0]), half, dtype="float16")
    assert models.read_card(half)["mpp"] == 0.5 and models.read_card(half)["postprocess"] == {"min_size": 5}
    ens = models.ensemble(paths)
    assert ens.card["mpp"] == 0.5 and ens.card["postprocess"] == {"min_size": 5}
    models.save(ens, tmp_path / "ens.pt", dtype="float16")
    assert models.read_card(tmp_path / "ens.pt")["mpp"] == 0.5
    torch.manual_seed(2)
    odd = tmp_path / "odd.pt"
    models.save(models.create("unet", filters=[4, 8], out_channels=1), odd, card=card)
    with pytest.raises(ValueError, match="different shapes"):
        models.ensemble([paths[0], odd])(torch.rand(1, 3, 16, 16))
    hv = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        p = tmp_path / f"h{seed}.pt"
        models.save(models.create("hovernet", out_classes=3), p)
        hv.append(p)
    ens = models.ensemble(hv)
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        a, b, both = models.load(hv[0])(x), models.load(hv[1])(x), ens(x)
    assert set(both) == set(a) and all(torch.allclose(both[k], (a[k] + b[k]) / 2, atol=1e-5) for k in a)


def test_instance_norm_swap_keeps_vector_batch_norms_and_reloads(tmp_path):
    u = replace_batchnorm_with_instancenorm(models.create("unet", filters=[4, 8]))
    assert u.norm == "instance"
    models.save(u, tmp_path / "u.pt")
    assert models.load(tmp_path / "u.pt").norm == "instance"
    m = replace_batchnorm_with_instancenorm(models.create("rccnet"))
    assert any(isinstance(x, nn.BatchNorm1d) for x in m.modules())  # its (N, C) classifier norm stays
    m.eval()
    with torch.no_grad():
        assert m(torch.rand(2, 3, 32, 32)).shape[0] == 2


def test_onnx_export_keeps_each_submodule_mode(tmp_path):
    from histoflow.ml.onnx import export_onnx

    m = models.create("rccnet").train()
    frozen = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)][0]
    frozen.eval()
    export_onnx(m, tmp_path / "r.onnx", input_shape=(1, 3, 32, 32))
    assert m.training and not frozen.training


def test_instance_norm_resnet_refuses_inputs_that_leave_one_pixel(tmp_path):
    """At 32 px a ResNet's last stage is 1 x 1, where instance norm returns its bias whatever the image: torch
    raised a bare ValueError in training and in eval mode every patch got the same prediction."""
    torch.manual_seed(0)
    m = models.create("resnet18", norm="instance", num_classes=3)
    for mode in (m.train, m.eval):
        mode()
        with pytest.raises(ParameterError, match=r"a 32 x 32 px input leaves 1 x 1 px at the last stage"):
            m(torch.rand(2, 3, 32, 32))
    m.eval()
    with torch.no_grad():
        a, b = m(torch.rand(2, 3, 40, 40))   # 2 x 2 at the last stage: the prediction depends on the image
    assert not torch.allclose(a, b)
    bn = models.create("resnet18", num_classes=3).eval()
    assert bn(torch.rand(2, 3, 32, 32)).shape == (2, 3)   # batch norm's running statistics are fine at 1 x 1
    from histoflow.ml.onnx import export_onnx, get_session

    x = torch.rand(1, 3, 96, 64)
    sess = get_session(export_onnx(m, tmp_path / "in.onnx", input_shape=(1, 3, 64, 64), dynamic_spatial=True))
    np.testing.assert_allclose(np.asarray(sess(x.numpy())), m(x).detach().numpy(), atol=1e-4)


_SWITCHABLE = {  # every built-in architecture, small
    "unet": ({"filters": [4, 8]}, (2, 3, 16, 16)),
    "mobilenet_v2": ({"head": "paper", "num_classes": 2, "width_mult": 0.35}, (2, 3, 64, 64)),
    "resnet18": ({"num_classes": 3}, (2, 3, 64, 64)),
    "resnet34": ({"num_classes": 3}, (2, 3, 64, 64)),
    "rccnet": ({"num_classes": 3}, (2, 3, 32, 32)),
    "hovernet": ({"mode": "fast", "out_classes": 0}, None),  # a CPU forward takes ~10 s: its weights are compared
    "ensemble": ({"members": [{"architecture": "unet", "parameters": {"filters": [4, 8]}},
                              {"architecture": "rccnet", "parameters": {"num_classes": 3}}]}, None),
}


def _norm_layers(m: nn.Module) -> list[tuple[str, str]]:
    return [(n, type(x).__name__) for n, x in m.named_modules() if "Norm" in type(x).__name__]


@pytest.mark.parametrize("name", sorted(_SWITCHABLE))
def test_instance_norm_switch_round_trips_for_every_architecture(tmp_path, name):
    """After replace_batchnorm_with_instancenorm, save wrote a file load could not read for the models without a
    string ``norm`` (mobilenet_v2, rccnet, hovernet: the state dict lacked the batch norms' running statistics).
    The card now records the switch and load makes it again."""
    assert set(_SWITCHABLE) >= set(models._BUILTINS)
    kwargs, shape = _SWITCHABLE[name]
    m = replace_batchnorm_with_instancenorm(models.create(name, **kwargs))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for x in m.modules():
            if isinstance(x, nn.InstanceNorm2d):
                x.weight.uniform_(0.5, 1.5, generator=g)
                x.bias.uniform_(-0.2, 0.2, generator=g)
    card = json.loads(models.save(m, tmp_path / "m.pt").read_text())
    assert card["batchnorm_to_instancenorm"] == [""]
    loaded = models.load(tmp_path / "m.pt")
    assert _norm_layers(loaded) == _norm_layers(m)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in loaded.modules())
    a, b = m.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if shape is not None:
        m.eval()
        x = torch.rand(*shape)
        with torch.no_grad():
            assert torch.equal(m(x), loaded(x))
    models.save(loaded, tmp_path / "again.pt")  # a loaded model keeps the switch through another save
    assert json.loads((tmp_path / "again.json").read_text())["batchnorm_to_instancenorm"] == [""]
    assert _norm_layers(models.load(tmp_path / "again.pt")) == _norm_layers(m)


def test_instance_norm_switch_of_a_part_or_a_member_round_trips(tmp_path):
    m = models.create("rccnet", num_classes=3)
    first = [n for n, x in m.named_modules() if isinstance(x, nn.BatchNorm2d)][0]
    parent, _, attr = first.rpartition(".")
    setattr(m.get_submodule(parent), attr, replace_batchnorm_with_instancenorm(m.get_submodule(first)))
    models.save(m, tmp_path / "part.pt")
    assert json.loads((tmp_path / "part.json").read_text())["batchnorm_to_instancenorm"] == [first]
    assert _norm_layers(models.load(tmp_path / "part.pt")) == _norm_layers(m)
    # an ensemble of a switched and a plain member, saved and loaded
    models.save(replace_batchnorm_with_instancenorm(models.create("unet", filters=[4, 8])), tmp_path / "a.pt")
    models.save(models.create("unet", filters=[4, 8]), tmp_path / "b.pt")
    ens = models.ensemble([tmp_path / "a.pt", tmp_path / "b.pt"])
    models.save(ens, tmp_path / "e.pt")
    loaded = models.load(tmp_path / "e.pt")
    assert _norm_layers(loaded) == _norm_layers(ens)
    assert {t for n, t in _norm_layers(loaded)} == {"InstanceNorm2d", "BatchNorm2d"}
    bad = json.loads((tmp_path / "part.json").read_text())
    bad["batchnorm_to_instancenorm"] = ["no.such.layer"]
    (tmp_path / "part.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match=r"part\.json.*'batchnorm_to_instancenorm' names 'no.such.layer'"):
        models.load(tmp_path / "part.pt")


def test_infinite_sizes_damaged_weights_and_deep_cards_are_model_errors(tmp_path):
    """Raw OverflowError / AttributeError / RecursionError before: an infinite size in create or a card, a state
    dict with a non-string key, a card nested too deep for the JSON reader."""
    for name, kwargs, match in (("mobilenet_v2", {"width_mult": float("inf")}, "MobileNetV2: width_mult, .* must be "
                                 "positive finite numbers, got inf"),
                                ("rccnet", {"input_size": float("inf")}, "RCCNet: input_size must be a whole number, got inf")):
        with pytest.raises(ParameterError, match=match):
            models.create(name, **kwargs)
    m = models.create("rccnet", num_classes=2)
    path = tmp_path / "r.pt"
    card = json.loads(models.save(m, path).read_text())
    (tmp_path / "r.json").write_text(json.dumps({**card, "parameters": {"input_size": float("inf")}}))
    with pytest.raises(ModelError, match=r"r\.json.*cannot create 'rccnet'"):
        models.load(path)
    (tmp_path / "r.json").write_text(json.dumps(card))
    torch.save({**m.state_dict(), 5: torch.zeros(1)}, path)
    with pytest.raises(ModelError, match=r"r\.pt: not a state_dict: .*\[5\]"):
        models.load(path)
    (tmp_path / "r.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ModelError, match=r"r\.json: not a readable JSON model card \(RecursionError"):
        models.load(path)


def test_a_saved_card_has_this_saves_date_and_versions_whatever_card_says(tmp_path):
    """The save's own fields were overwritten by card=...: fine-tuning with card=parent.card gave the new weights
    the parent's save date and torch / histoflow versions."""
    import torch

    import histoflow

    m = models.create("rccnet", num_classes=3)
    models.save(m, tmp_path / "a.pt", card={"saved": "1999-01-01", "torch_version": "0.1",
                                            "histoflow_version": "0.0.0", "licence": "CC0"})
    card = models.load(tmp_path / "a.pt").card
    assert card["saved"] > "2026" and card["torch_version"] == torch.__version__
    assert card["histoflow_version"] == histoflow.__version__ and card["licence"] == "CC0"

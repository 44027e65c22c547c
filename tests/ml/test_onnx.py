"""ONNX export and onnxruntime inference agree with torch; sessions are cached per process."""
import os

import numpy as np
import pytest
import torch
from torch import nn

from histoflow.errors import HistoflowError
from histoflow.ml import models
from histoflow.ml.onnx import OnnxError, OnnxModel, clear_sessions, export_onnx, get_session


def _randomise(m: nn.Module) -> nn.Module:
    """Non-trivial weights and batch-norm statistics, so outputs are O(1) and differences show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5, generator=g)
                mod.running_var.uniform_(0.5, 2.0, generator=g)
            if isinstance(mod, nn.Linear):
                mod.weight.normal_(0, 1 / mod.in_features ** 0.5, generator=g)
            if isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d | nn.InstanceNorm2d) and mod.affine:
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.uniform_(-0.2, 0.2, generator=g)
    return m.eval()


@pytest.mark.parametrize("name, kwargs, shape", [
    ("unet", {"in_channels": 4, "filters": (8, 16, 32)}, (1, 4, 32, 32)),
    ("mobilenet_v2", {"head": "paper", "num_classes": 3, "width_mult": 0.35}, (1, 3, 64, 64)),
    ("resnet18", {"norm": "instance", "num_classes": 3}, (1, 3, 64, 64)),
    ("rccnet", {}, (1, 3, 32, 32)),
    ("ensemble", {"members": [{"architecture": "unet", "parameters": {"filters": [8, 16]}},
                              {"architecture": "unet", "parameters": {"filters": [4, 8, 16]}}]}, (1, 3, 32, 32)),
])
def test_onnxruntime_matches_torch_with_dynamic_batch(tmp_path, name, kwargs, shape):
    torch.manual_seed(0)
    m = _randomise(models.create(name, **kwargs))
    path = export_onnx(m, tmp_path / f"{name}.onnx", input_shape=shape)
    assert os.listdir(tmp_path) == [f"{name}.onnx"]  # self-contained: no side .data file
    x = np.random.default_rng(0).standard_normal((3, *shape[1:])).astype(np.float32)  # batch 3
    with torch.no_grad():
        ref = m(torch.from_numpy(x)).numpy()
    assert ref.std() > 0.01  # a meaningful comparison, not of near-zero outputs
    got = OnnxModel(path, intra_op_threads=1)(x)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4


def test_export_restores_training_mode_and_fixed_batch(tmp_path):
    m = models.create("rccnet").train()
    path = export_onnx(m, tmp_path / "r.onnx", input_shape=(2, 3, 32, 32), dynamic_batch=False)
    assert m.training
    model = OnnxModel(path)
    assert model.input_shape == [2, 3, 32, 32] and model.output_names == ["output"]
    assert model(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 4)
    with pytest.raises(OnnxError, match="inference failed"):
        model(np.zeros((3, 3, 32, 32), np.float32))


def test_dict_outputs_come_back_as_a_dict(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 1, 1)

        def forward(self, x):
            return {"seg": self.a(x), "dist": self.b(x)}

    m = TwoHeads().eval()
    path = export_onnx(m, tmp_path / "two.onnx", input_shape=(1, 3, 8, 8))
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    out = OnnxModel(path)(torch.from_numpy(x))
    assert set(out) == {"seg", "dist"}
    with torch.no_grad():
        assert np.abs(out["seg"] - m(torch.from_numpy(x))["seg"].numpy()).max() < 1e-5


def test_get_session_is_cached_per_process(tmp_path):
    path = export_onnx(nn.Conv2d(3, 1, 1), tmp_path / "c.onnx", input_shape=(1, 3, 4, 4))
    clear_sessions()
    s1 = get_session(path)
    assert get_session(str(path)) is s1
    assert s1.session.get_providers()[-1] == "CPUExecutionProvider"
    assert get_session(path, intra_op_threads=1) is not s1   # other settings, other session
    clear_sessions()
    assert get_session(path) is not s1


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(OnnxError, match="missing.onnx.*not found"):
        get_session(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(OnnxError, match="bad.onnx.*cannot open"):
        OnnxModel(bad)
    assert issubclass(OnnxError, HistoflowError)


@pytest.mark.parametrize("filters, side", [((4, 8, 16), 4), ((2, 2, 2, 2, 2, 2, 2, 2, 4), 256)])
def test_dynamic_spatial_export_at_one_size_divisor(tmp_path, filters, side):
    """A height and width of exactly one size_divisor (a 9-level U-Net at 256 px, as the nucleus transforms export
    it) failed: torch.export specialised the dims traced as 1 x the divisor. The file now takes other sizes
    too, and agrees with torch at the given size and at others."""
    torch.manual_seed(0)
    m = _randomise(models.create("unet", in_channels=4, filters=filters))
    assert m.size_divisor == side
    path = export_onnx(m, tmp_path / "u.onnx", input_shape=(1, 4, side, side), dynamic_spatial=True)
    session = OnnxModel(path, intra_op_threads=1)
    rng = np.random.default_rng(0)
    for shape in ((1, 4, side, side), (2, 4, 2 * side, 3 * side)):
        x = rng.standard_normal(shape).astype(np.float32)
        with torch.no_grad():
            ref = m(torch.from_numpy(x)).numpy()
        got = session(x)
        assert got.shape == ref.shape == (shape[0], 2, *shape[2:])
        assert np.abs(got - ref).max() < 1e-4

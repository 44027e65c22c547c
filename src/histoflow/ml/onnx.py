"""Export models to ONNX and run them with onnxruntime.

:func:`export_onnx` writes one self-contained ``.onnx`` file (weights inline) with a dynamic batch
axis. :class:`OnnxModel` wraps an ``onnxruntime.InferenceSession`` (numpy in, numpy out), and
:func:`get_session` caches one per process, so that inference workers create a session once per
process, never per tile::

    export_onnx(net, "tumour.onnx", input_shape=(1, 4, 256, 256))
    model = get_session("tumour.onnx")      # in each worker; cached
    logits = model(batch)                   # (N, 4, 256, 256) float32 -> (N, 2, 256, 256)

The CUDA execution provider is used when onnxruntime has it, else the CPU one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histoflow.errors import HistoflowError, ParameterError

__all__ = ["OnnxError", "export_onnx", "OnnxModel", "get_session", "clear_sessions", "default_providers"]

# Above this the weights cannot live inside one protobuf (2 GiB limit) and go to a side file.
_INLINE_LIMIT = 1_800_000_000


class OnnxError(HistoflowError):
    """An ONNX model could not be exported, opened or run."""


def _output_names(out: Any) -> list[str]:
    if isinstance(out, torch.Tensor):
        return ["output"]
    if isinstance(out, Mapping):
        return [str(k) for k in out]
    if isinstance(out, Sequence):
        return [f"output_{i}" for i in range(len(out))]
    raise OnnxError(f"export_onnx: unsupported model output type {type(out).__name__}")


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's informational logging (e.g. "torchvision is not installed")."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(model: nn.Module, path: str | Path, input_shape: Sequence[int] = (1, 3, 256, 256),
                opset: int | None = None, dynamic_batch: bool = True, dynamic_spatial: bool = False) -> Path:
    """Export ``model`` (in eval mode) to a single ONNX file.

    Parameters
    ----------
    model : nn.Module
        The model; it is put in eval mode for the export and restored afterwards.
    path : str or Path
        The ``.onnx`` file to write.
    input_shape : sequence of int
        Shape of the example input ``(N, C, H, W)``; all dims but the batch are fixed in the file.
    opset : int, optional
        ONNX opset; None uses the exporter's recommended one.
    dynamic_batch : bool
        Make the batch axis dynamic (the exported model accepts any batch size).
    dynamic_spatial : bool
        Make height and width dynamic too, for fully convolutional models (e.g. a U-Net); sizes stay
        multiples of the model's ``size_divisor`` when it has one.

    Returns
    -------
    Path
        The written file. The input is named ``"input"``; outputs are ``"output"`` for a tensor,
        the dict keys for a dict (e.g. HoVer-Net's branches), ``"output_<i>"`` for a tuple.

    Notes
    -----
    Uses the ``torch.export``-based exporter (``dynamo=True``; needs onnxscript). Weights are stored
    inline so the file is self-contained; a model above ~1.8 GB of weights cannot be, and its
    weights are written beside it as ``<name>.onnx.data``, which must travel with the ``.onnx`` file.
    """
    import onnx

    path = Path(path)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise ParameterError(f"export_onnx: input_shape must be positive ints, got {input_shape}")
    # torch.export specialises a dimension of size 1, so a dynamic batch is traced with batch 2, and a dynamic
    # height or width of one size_divisor (1 x the divisor: that size would be all the file accepts) with two
    div = max(1, int(getattr(model, "size_divisor", 1))) if dynamic_spatial else 1
    trace_shape = list(shape)
    if dynamic_batch:
        trace_shape[0] = max(2, shape[0])
    if dynamic_spatial:
        for axis in range(2, min(4, len(shape))):
            if shape[axis] == div:
                trace_shape[axis] = 2 * div
    param = next(iter(model.parameters()), None)
    example = torch.randn(trace_shape, device=param.device if param is not None else "cpu")
    modes = {m: m.training for m in model.modules()}  # each submodule's own (a frozen batch norm stays eval)
    model.eval()
    try:
        with torch.no_grad():
            names = _output_names(model(example))
        n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        inline = n_bytes < _INLINE_LIMIT
        dims = {}
        if dynamic_batch:
            dims[0] = torch.export.Dim("batch", min=1)
        if dynamic_spatial:
            for axis, name in ((2, "height"), (3, "width")):
                dims[axis] = torch.export.Dim(name, min=1) * div if div > 1 else torch.export.Dim(name, min=2)
        dynamic_shapes = (dims,) if dims else None
        path.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings(), _quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=["input"], output_names=names,
                opset_version=opset, dynamic_shapes=dynamic_shapes, external_data=not inline,
                verbose=False)
            if program is None:  # pragma: no cover - only without dynamo
                raise OnnxError("export_onnx: the exporter returned no program")
            program.save(str(path), external_data=not inline)
    except OnnxError:
        raise
    except Exception as e:
        raise OnnxError(f"export_onnx: could not export {type(model).__name__} to {path}: "
                        f"{type(e).__name__}: {e}") from e
    finally:
        for m, training in modes.items():
            m.training = training
    onnx.checker.check_model(str(path))
    return path


def default_providers() -> list[str]:
    """CUDA then CPU when onnxruntime has CUDA, else CPU only."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxModel:
    """An onnxruntime session: call it with a numpy batch, get numpy back.

    Parameters
    ----------
    path : str or Path
        The ``.onnx`` file.
    providers : list of str, optional
        Execution providers; default :func:`default_providers`.
    intra_op_threads : int, optional
        Threads onnxruntime uses inside one operator (0 / None: its default, all cores). Set it
        to the cores per worker when several worker processes share a machine.

    Attributes
    ----------
    session : onnxruntime.InferenceSession
    input_name : str
    output_names : list of str
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None,
                 intra_op_threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxError(f"{self.path}: ONNX model file not found")
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = int(intra_op_threads)
        self.providers = list(providers) if providers is not None else default_providers()
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=self.providers)
        except Exception as e:
            raise OnnxError(f"{self.path}: onnxruntime cannot open the model: {e}") from e
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise OnnxError(f"{self.path}: expected one input, the model has {len(inputs)}")
        self.input_name = inputs[0].name
        self.input_shape = inputs[0].shape
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: np.ndarray) -> np.ndarray | dict[str, np.ndarray]:
        """Run a batch; one output is returned as an array, several as a dict by output name."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != len(self.input_shape):
            raise ParameterError(f"{self.path}: expected a {len(self.input_shape)}-D input "
                                 f"{self.input_shape}, got shape {x.shape}")
        try:
            outs = self.session.run(self.output_names, {self.input_name: x})
        except Exception as e:
            raise OnnxError(f"{self.path}: inference failed on input {x.shape}: {e}") from e
        if len(outs) == 1:
            return outs[0]
        return dict(zip(self.output_names, outs, strict=True))

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, providers={self.session.get_providers()})"


_SESSIONS: dict[tuple, OnnxModel] = {}
_LOCK = threading.Lock()


def get_session(path: str | Path, providers: Sequence[str] | None = None,
                intra_op_threads: int | None = None) -> OnnxModel:
    """The process's :class:`OnnxModel` for ``path``, created on first use and cached.

    The cache key is the file (resolved path, size and modification time, so a re-exported file
    gets a new session), the process id (a forked worker never reuses its parent's session),
    the providers and the thread count. Thread-safe.
    """
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise OnnxError(f"{p}: ONNX model file not found") from e
    key = (str(p), st.st_size, st.st_mtime_ns, os.getpid(),
           tuple(providers) if providers is not None else None, intra_op_threads)
    with _LOCK:
        model = _SESSIONS.get(key)
        if model is None:
            model = OnnxModel(p, providers=providers, intra_op_threads=intra_op_threads)
            _SESSIONS[key] = model
        return model


def clear_sessions() -> None:
    """Forget all cached sessions (they are freed when no longer referenced)."""
    with _LOCK:
        _SESSIONS.clear()

#!/usr/bin/env python3
"""Inference throughput on this machine's CPU cores (or its GPU when torch sees one).

- ``mobilenet_torch_patches_s`` / ``mobilenet_onnx_patches_s``: MobileNetV2 with the cascaded tumour
  paper's head, 256 x 256 RGB patches, batches of 16, in torch (float32) and in onnxruntime; also per
  core. The paper's patch stage ran at about 5.5 patches/s per CPU core (OpenVINO, 32 cores): the target
  is at least 3x that per core with onnxruntime (``target_per_core``).
- ``nucleus_torch_mp_s`` / ``nucleus_onnx_mp_s``: the shipped nucleus model (maps + post-processing with the
  settings of its card's ``postprocess``, as ``NucleusSegmentation`` runs it) on real 1000 x 1000 H&E images
  (MoNuSeg, 0.25 µm/px, the model's own): megapixels per second of input; ``nucleus_net_mp_s`` the network
  alone (torch, bf16 autocast where the CPU has it).
- ``hovernet_mp_s``: MONAI's HoVer-Net (fast mode, the original's 256 -> 164 px windows) network alone on
  the same images, in torch float32: megapixels of output per second; ``hovernet_bf16_mp_s`` the same in
  bf16 autocast where the CPU has it, ``nucleus_net_fp32_mp_s`` our network in float32, and
  ``nucleus_net_over_hovernet_same_precision`` the ratio of the two networks at the same precision.

On a GPU every timed call ends with ``torch.cuda.synchronize()``.

Prints one JSON line.

    python bench/inference.py [--repeat 3] [--patches 64]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MONUSEG = os.path.normpath(os.path.join(ROOT, "..", "shared", "data", "monuseg_train"))
PAPER_PER_CORE = 5.5


def _sync():
    """Wait for the GPU's queued work (CUDA calls return before it is done); nothing on the CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_rate(fn, units, repeat):
    fn()  # warm
    _sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync()  # the timed call's GPU work is counted in it
        times.append(time.perf_counter() - t)
    return units / min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--patches", type=int, default=64)
    ap.add_argument("--images", type=int, default=2)
    args = ap.parse_args()

    from histoflow.datasets import load_monuseg, monuseg_ids
    from histoflow.ml import models
    from histoflow.ml.nucleus import _cpu_bf16, predict_maps, segment_nuclei
    from histoflow.ml.onnx import OnnxModel, export_onnx
    from histoflow.ml.transforms import _OnnxModule, builtin_model_path

    cores = os.cpu_count()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"cores": cores, "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor()
           or platform.machine(), "torch": torch.__version__}
    tmp = tempfile.mkdtemp()

    # --- MobileNetV2 patch classification
    torch.manual_seed(0)
    net = models.create("mobilenet_v2", num_classes=2, head="paper").eval().to(device)
    x = torch.rand(16, 3, 256, 256)
    n_batches = max(1, args.patches // 16)

    def run_torch():
        with torch.no_grad():
            for _ in range(n_batches):
                net(x.to(device))

    out["mobilenet_torch_patches_s"] = round(best_rate(run_torch, 16 * n_batches, args.repeat), 1)
    path = export_onnx(net.cpu(), os.path.join(tmp, "mobilenet.onnx"), input_shape=(16, 3, 256, 256))
    sess = OnnxModel(path)
    xn = x.numpy()

    def run_onnx():
        for _ in range(n_batches):
            sess(xn)

    r = best_rate(run_onnx, 16 * n_batches, args.repeat)
    out["mobilenet_onnx_patches_s"] = round(r, 1)
    out["mobilenet_onnx_patches_s_per_core"] = round(r / cores, 1)
    out["paper_patches_s_per_core"] = PAPER_PER_CORE
    out["target_per_core"] = 3 * PAPER_PER_CORE
    out["onnx_vs_paper_per_core"] = round(r / cores / PAPER_PER_CORE, 2)

    # --- nucleus model and HoVer-Net on real images
    ids = monuseg_ids(MONUSEG)[: args.images]
    images = [s["image"] for s in load_monuseg(MONUSEG, ids)]
    mp = sum(im.shape[0] * im.shape[1] for im in images) / 1e6
    model = models.load(builtin_model_path()).to(device)
    # the card's post-processing (thresholds, Sobel kernel, smallest nucleus, fixed HV ranges), as
    # NucleusSegmentation applies it; these images are at the model's µm/px, so min_size needs no scaling
    post = dict(models.read_card(builtin_model_path()).get("postprocess") or {})
    out["nucleus_torch_mp_s"] = round(best_rate(lambda: [segment_nuclei(model, im, **post) for im in images], mp,
                                                args.repeat), 3)
    # predict_maps runs in float32 unless asked for bfloat16 autocast (amp=True; about 1.9x on CPUs with native
    # bf16): the network at both precisions, so that it can be set against HoVer-Net at either
    bf16 = device == "cpu" and _cpu_bf16()
    out["nucleus_net_precision"] = "bfloat16" if bf16 else "float32"
    net_rate = best_rate(lambda: [predict_maps(model, im, amp=bf16) for im in images], mp, args.repeat)
    out["nucleus_net_mp_s"] = round(net_rate, 3)
    out["nucleus_net_fp32_mp_s"] = round(best_rate(lambda: [predict_maps(model, im) for im in images],
                                                   mp, args.repeat), 3)
    onnx_path = export_onnx(model.cpu(), os.path.join(tmp, "nucleus.onnx"), input_shape=(1, 3, 512, 512),
                            dynamic_spatial=True)
    onnx_model = _OnnxModule(OnnxModel(onnx_path))
    out["nucleus_onnx_mp_s"] = round(best_rate(lambda: [segment_nuclei(onnx_model, im, window=512, **post)
                                                        for im in images], mp, args.repeat), 3)

    hover = models.create("hovernet", mode="fast").eval().to(device)
    win, step = 256, 164
    crops = []
    for im in images:
        t = torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).float() / 255
        for y in range(0, im.shape[0] - win + 1, step):
            for x0 in range(0, im.shape[1] - win + 1, step):
                crops.append(t[:, y:y + win, x0:x0 + win])
    batch = torch.stack(crops)
    out_mp = len(crops) * step * step / 1e6

    def run_hover():
        with torch.no_grad():
            for i in range(0, len(batch), 8):
                hover(batch[i:i + 8].to(device))

    # the same number of timed calls as our network (the best of them), and the ratio of the unrounded rates
    # (HoVer-Net's is ~0.01 MP/s here: rounded to 3 decimals it kept one or two digits)
    hover_rate = best_rate(run_hover, out_mp, args.repeat)  # float32
    out["hovernet_mp_s"] = float(f"{hover_rate:.4g}")
    if bf16:
        def run_hover_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                run_hover()

        hover_rate = best_rate(run_hover_bf16, out_mp, args.repeat)
        out["hovernet_bf16_mp_s"] = float(f"{hover_rate:.4g}")
    out["nucleus_net_over_hovernet_same_precision"] = round(net_rate / hover_rate, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())

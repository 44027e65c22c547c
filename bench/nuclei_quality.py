#!/usr/bin/env python3
"""Nucleus segmentation quality on held-out MoNuSeg images: the shipped model next to the classical
NucleusDetectionHE (hematoxylin threshold + distance-transform watershed).

The images are the model's test split (its card's ``split.test``: never trained on, nor used to choose the
epoch or the post-processing), else, for a card without one, its validation split (``split.validation``:
never trained on), unless ``--ids`` names others. For each method, Dice (nucleus pixels), AJI and PQ per
image, and their mean and sd; ``*_seconds`` is the time of the segmentation calls alone (not the metrics),
after one untimed call that loads the model and warms it. ``model`` is the model file's path, relative to the
repository when inside it. Targets (issue 4): Dice >= 0.82 and AJI >= 0.62 (HoVer-Net on the Kumar data:
Dice 0.826, AJI 0.618).

Prints one JSON line.

    python bench/nuclei_quality.py [--model PATH] [--ids ID ...] [--backend torch|onnx] [--mpp 0.5]

``--mpp`` resamples the images (and paints the outlines) at that pixel size first, e.g. 0.5 to measure
models on 20x material: the 20x model natively, the 40x one upsampling each image to its 0.25 µm/px.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MONUSEG = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "monuseg_train"))


def main():
    from histoflow.datasets import load_monuseg
    from histoflow.ml import metrics, models
    from histoflow.ml.transforms import NucleusSegmentation, builtin_model_path
    from histoflow.transforms import NucleusDetectionHE

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--ids", nargs="*")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--tta", action="store_true", help="average over the four flips")
    ap.add_argument("--root", default=MONUSEG)
    ap.add_argument("--mpp", type=float, default=None, help="resample the images to this µm/px first")
    args = ap.parse_args()
    path = args.model or builtin_model_path()
    card = models.read_card(path)
    ids = args.ids or card["split"].get("test") or card["split"]["validation"]   # never trained on
    samples = load_monuseg(args.root, ids, mpp=args.mpp)
    seg = NucleusSegmentation(model=path, backend=args.backend, tta=args.tta)
    classical = NucleusDetectionHE()
    model_path = os.path.abspath(path)  # relative to the repository when inside it: a run's .../best.pt says which
    rel = os.path.relpath(model_path, ROOT)
    out = {"bench": "nuclei_quality", "images": ids, "model": model_path if rel.startswith("..") else rel,
           "tta": args.tta,
           "mpp": samples[0]["mpp"] if samples else args.mpp}
    for name, fn in (("model", lambda s: seg.F(s["image"], mpp=s["mpp"])),
                     ("classical", lambda s: classical.F(s["image"], mpp=s["mpp"]))):
        rows = []
        if samples:
            fn(samples[0])  # untimed: loads the model, first calls
        seconds = 0.0
        for s in samples:
            t = time.perf_counter()
            pred = fn(s)
            seconds += time.perf_counter() - t
            true = s["instances"]
            pq = metrics.panoptic_quality(true, pred)
            rows.append({"dice": metrics.dice(pred > 0, true > 0), "aji": metrics.aji(true, pred), "pq": pq.pq,
                         "n_true": int(true.max()), "n_pred": int(pred.max())})
        out[f"{name}_seconds"] = round(seconds, 2)
        for k in ("dice", "aji", "pq"):
            v = [r[k] for r in rows]
            out[f"{name}_{k}"] = round(float(np.mean(v)), 4)
            out[f"{name}_{k}_sd"] = round(float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, 4)
        out[f"{name}_per_image"] = [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
                                    for r in rows]
    out["targets"] = {"dice": 0.82, "aji": 0.62}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())

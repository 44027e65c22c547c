#!/usr/bin/env python3
"""Choose the nucleus model's post-processing thresholds on training images (never on the held-out ones).

Runs the network once per image, then the HoVer-Net post-processing over a small grid of foreground
threshold, marker threshold and Sobel kernel size, and prints one JSON line with the mean AJI / Dice of
each setting and the best one. The shipped card records the chosen values.

    python bench/nuclei_tune.py [--model PATH] [--n 4] [--ids ID ...]

``--ids`` names the images instead (e.g. those a blind run carved out of its training images to choose the
epoch: ``configs/nucleus_monuseg_blind.yaml``); never the images a figure will be reported on.

``--ranges`` normalises the HV maps with fixed ranges (``hovernet.hv_ranges`` of the model's training images,
its card's ``split.train``, predicted with the same ``--tta`` as the images tuned on) instead of each image's
own extremes, so that nuclei do not depend on where a slide is cut into tiles; the best setting then carries
its ``ranges``, to put in the card's ``postprocess`` (the shipped cards have them).

The images are resampled to the model's µm/px (its card's ``mpp``; 0.5 for the 20x model).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MONUSEG = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "monuseg_train"))


def main():
    from histoflow.datasets import load_monuseg
    from histoflow.ml import metrics, models
    from histoflow.ml.nucleus import maps_to_instances, predict_maps
    from histoflow.ml.transforms import builtin_model_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--ids", nargs="*", help="these images instead of --n of the model's training ones")
    ap.add_argument("--ranges", action="store_true", help="fixed HV ranges from the model's training images")
    args = ap.parse_args()
    path = args.model or builtin_model_path()
    model = models.load(path)
    card = models.read_card(path)
    ids = args.ids or card["split"]["train"][:: max(1, len(card["split"]["train"]) // args.n)][: args.n]
    samples = load_monuseg(MONUSEG, ids, mpp=card.get("mpp"))
    maps = [predict_maps(model, s["image"], tta=args.tta) for s in samples]
    ranges = {}
    if args.ranges:
        from histoflow.ml.models.hovernet import hv_ranges

        # the training images' maps with the same tta flag as the maps the ranges will normalise
        train = [predict_maps(model, s["image"], tta=args.tta) for s in load_monuseg(MONUSEG, card["split"]["train"],
                                                                                     mpp=card.get("mpp"))]
        ranges = {k: hv_ranges(train, k) for k in (11, 21)}
    grid = list(itertools.product((0.4, 0.5, 0.6, 0.7, 0.8), (0.3, 0.4, 0.5, 0.6), (11, 21)))
    rows = []
    for fg, mk, k in grid:
        aji, dice = [], []
        for s, (p, hv) in zip(samples, maps):
            pred = maps_to_instances(p, hv, fg_threshold=fg, marker_threshold=mk, sobel_ksize=k,
                                     ranges=ranges.get(k))
            aji.append(metrics.aji(s["instances"], pred))
            dice.append(metrics.dice(pred > 0, s["instances"] > 0))
        rows.append({"fg_threshold": fg, "marker_threshold": mk, "sobel_ksize": k, "aji": round(float(np.mean(aji)), 4),
                     "dice": round(float(np.mean(dice)), 4), **({"ranges": ranges[k]} if ranges else {})})
    best = max(rows, key=lambda r: r["aji"])
    print(json.dumps({"bench": "nuclei_tune", "model": os.path.basename(path), "mpp": card.get("mpp"), "images": ids, "tta": args.tta, "best": best, "grid": rows}))


if __name__ == "__main__":
    sys.exit(main())

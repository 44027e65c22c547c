#!/usr/bin/env python3
"""Painting polygons into label images: ``histoflow.annotations.rasterize`` against scikit-image's
``skimage.draw.polygon`` (what rasterize used until session 28; it tests every pixel of a polygon's box against
every edge) and OpenCV's ``fillPoly`` (a scanline fill on integer coordinates, for scale only: its pixel rule is
not the pixel-centre one).

    python bench/rasterize.py [--repeat 3]

Prints one JSON line: seconds for the 20 MoNuSeg images' nuclei (12,103 outlines on 1000 x 1000 px), and for one
large region (an ellipse of 9,426 vertices over 4000 x 2000 px, as a whole-slide tumour outline at a low level).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MONUSEG = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "monuseg_train"))


def best(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(min(times), 3)


def main():
    import cv2
    from skimage.draw import polygon as draw_polygon

    from histoflow.annotations import read_aperio_xml, rasterize

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    images = [[p for p in read_aperio_xml(x, negatives="keep") if not p.measurements.get("negative")]
              for x in sorted(glob.glob(os.path.join(MONUSEG, "*.xml")))]

    def ours():
        for polys in images:
            rasterize(polys, (1000, 1000))

    def skimage_all(shape, polys):
        out = np.zeros(shape, np.int32)
        for i, p in enumerate(polys, 1):
            rr, cc = draw_polygon(p.exterior[:, 1] - 0.5, p.exterior[:, 0] - 0.5, shape=shape)
            out[rr, cc] = i
        return out

    def opencv_all(shape, polys):
        out = np.zeros(shape, np.int32)
        for i, p in enumerate(polys, 1):
            cv2.fillPoly(out, [np.round((p.exterior - 0.5) * 16).astype(np.int32)], i, shift=4)
        return out

    t = np.linspace(0, 2 * np.pi, 9426, endpoint=False)
    from histoflow.annotations import Polygon

    ellipse = [Polygon(np.c_[2000 + 2000 * np.cos(t), 1000 + 1000 * np.sin(t)])]
    row = {"bench": "rasterize", "monuseg_images": len(images), "monuseg_outlines": sum(map(len, images)),
           "monuseg_s": best(ours, args.repeat),
           "monuseg_skimage_s": best(lambda: [skimage_all((1000, 1000), p) for p in images], args.repeat),
           "monuseg_opencv_s": best(lambda: [opencv_all((1000, 1000), p) for p in images], args.repeat),
           "ellipse_vertices": 9426, "ellipse_px": [4000, 2000],
           "ellipse_s": best(lambda: rasterize(ellipse, (2000, 4000)), args.repeat),
           "ellipse_skimage_s": best(lambda: skimage_all((2000, 4000), ellipse), 1),
           "ellipse_opencv_s": best(lambda: opencv_all((2000, 4000), ellipse), args.repeat)}
    print(json.dumps(row))


if __name__ == "__main__":
    sys.exit(main())

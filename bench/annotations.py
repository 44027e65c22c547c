#!/usr/bin/env python3
"""Annotation conversion at whole-slide scale: time and peak memory of ``histoflow annotations convert``.

Writes a QuPath-style GeoJSON of N cell detections (24-vertex outlines, a class with its colour, two
measurements; N = 200,000 by default, ~155 MB, a whole-slide cell export), then converts it, each in a
fresh child process: GeoJSON -> ImageJ RoiSet.zip, -> Aperio XML, -> GeoJSON, and the Aperio XML back to
GeoJSON. For each: seconds and peak RSS (``VmHWM``). As reference: the peak RSS of ``json.load`` of the
same file alone (what reading a whole GeoJSON costs before any polygon exists).

Prints one JSON line.

    python bench/annotations.py [--n 200000]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from read_tiles import peak_rss_mb  # noqa: E402


def make(path, n):
    import numpy as np

    rng = np.random.default_rng(0)
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    with open(path, "w") as f:
        f.write('{"type": "FeatureCollection", "features": [')
        for i in range(n):
            x, y = rng.uniform(0, 1e5, 2)
            ring = [[round(float(x + 6 * np.cos(a)), 2), round(float(y + 6 * np.sin(a)), 2)] for a in t]
            feat = {"type": "Feature", "id": f"id{i}", "geometry": {"type": "Polygon", "coordinates": [ring + ring[:1]]},
                    "properties": {"objectType": "detection", "classification": {"name": "Tumor", "color": [255, 0, 0]},
                                   "measurements": {"Area": 113.0, "Mean": float(rng.uniform())}}}
            f.write(("," if i else "") + json.dumps(feat))
        f.write("]}")


def child(what, src, dst):
    t0 = time.perf_counter()
    if what == "json_load":
        with open(src) as f:
            json.load(f)
    else:
        from histoflow.annotations import convert

        convert(src, dst)
    print(json.dumps({"s": round(time.perf_counter() - t0, 2), "rss": round(peak_rss_mb(), 1)}))


def run(what, src, dst=""):
    out = subprocess.run([sys.executable, __file__, "--child", what, src, dst], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--child", nargs=3)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "cells.geojson")
        make(src, a.n)
        res = {"bench": "annotations", "objects": a.n, "geojson_mb": round(os.path.getsize(src) / 1e6, 1)}
        r = run("json_load", src)
        res["json_load_peak_rss_mb"] = r["rss"]
        for name, dst_src, dst in (("geojson_to_zip", src, "c.zip"), ("geojson_to_xml", src, "c.xml"),
                                   ("geojson_to_geojson", src, "c2.geojson"),
                                   ("xml_to_geojson", os.path.join(d, "c.xml"), "c3.geojson")):
            r = run("convert", dst_src, os.path.join(d, dst))
            res[f"{name}_s"], res[f"{name}_peak_rss_mb"] = r["s"], r["rss"]
    print(json.dumps(res))


if __name__ == "__main__":
    main()

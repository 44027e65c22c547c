#!/usr/bin/env python3
"""In-process runs: the calling thread encodes the tiles the helper thread has not started (the engine's
way) against waiting for the helper (the way before session 7), interleaved in one process.

BoxBlur(15) + TissueDetectionHE, 256 px tiles, HTJ2K, on the 4x mosaic; prints one JSON line with the
tiles/s of every run and the medians.

    python bench/encode_sharing.py [--n 4] [--repeat 6]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from read_tiles import mosaic  # noqa: E402


def main():
    import histoflow
    from histoflow.engine import worker
    from histoflow.transforms import BoxBlur, Pipeline, TissueDetectionHE

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=6)
    args = ap.parse_args()

    def wait_for_helper(tiles, compression, level):  # every background encoding awaited
        return [(i, e[0].result() if isinstance(e, tuple) else e) for i, e in tiles]

    modes = {"shared": worker._collect, "wait": wait_for_helper}
    pipe = Pipeline([BoxBlur(15), TissueDetectionHE()])
    slide = histoflow.SlideData(mosaic(args.n))
    n = len(slide.grid(256))
    runs = {k: [] for k in modes}
    with tempfile.TemporaryDirectory() as tmp:
        slide.run(pipe, os.path.join(tmp, "warm.h5path"), executor="inprocess", progress=False)
        for r in range(args.repeat):
            for name, fn in modes.items():
                worker._collect = fn
                out = os.path.join(tmp, f"{name}{r}.h5path")
                t0 = time.perf_counter()
                slide.run(pipe, out, executor="inprocess", progress=False)
                runs[name].append(round(n / (time.perf_counter() - t0), 1))
                os.remove(out)
    worker._collect = modes["shared"]
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({"bench": "encode_sharing", "slide": f"mosaic{args.n}", "tiles": n, "compression": "htj2k",
                      "tiles_per_s_shared": med["shared"], "tiles_per_s_wait": med["wait"],
                      "speedup": round(med["shared"] / med["wait"], 2), "runs": runs}))


if __name__ == "__main__":
    sys.exit(main())

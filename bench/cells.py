#!/usr/bin/env python3
"""Single-cell throughput: segmentation (SegmentCells) + quantification (QuantifyCells) through the engine.

On the real MIBI image (22 channels, 1024 x 1024 uint16) and on a larger multiplex mosaic made from it
(the image tiled ``--mosaic`` x ``--mosaic`` times with mirrored copies, written as a tiled pyramidal TIFF
with its channel names), in-process and on a 2-worker local dask cluster: cells per second, the cell
count, and the peak RSS of a child process running the mosaic in-process.

Prints one JSON line.

    python bench/cells.py [--mosaic 6] [--tile 512]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MIBI = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "multiplex", "ark_fov8_mibitiff_22ch.tiff"))
CACHE = os.path.join(HERE, ".cache")


def build_mosaic(n: int) -> str:
    """A (1024 n)^2 x 22 pyramidal tiled TIFF of mirrored copies of the MIBI image (cached)."""
    import tifffile

    from histoflow import open_slide

    os.makedirs(CACHE, exist_ok=True)
    out = os.path.join(CACHE, f"mibi_mosaic{n}.ome.tif")
    if os.path.exists(out):
        return out
    with open_slide(MIBI) as r:
        img = r.read_region((0, 0), 0, r.dimensions)
        names = [str(c) for c in r.channel_names]
        mpp = r.mpp[0]
    rows = []
    for i in range(n):
        row = [img[::-1] if i % 2 else img for _ in range(n)]
        row = [a[:, ::-1] if j % 2 else a for j, a in enumerate(row)]
        rows.append(np.concatenate(row, 1))
    big = np.moveaxis(np.concatenate(rows, 0), -1, 0)  # (c, y, x)
    tmp = out + f".tmp-{os.getpid()}.ome.tif"
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
        meta = {"axes": "CYX", "Channel": {"Name": names}, "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}
        tw.write(big, tile=(512, 512), compression="zlib", metadata=meta, subifds=1)
        tw.write(big[:, ::2, ::2], tile=(512, 512), compression="zlib", subfiletype=1)
    os.replace(tmp, out)
    return out


def run(path, executor, workers, tile, out_dir):
    from histoflow.core.slide import SlideData
    from histoflow.store import read_h5path
    from histoflow.transforms import Pipeline, QuantifyCells, SegmentCells

    pipe = Pipeline([SegmentCells(membrane_channels=["Membrane"]), QuantifyCells(nucleus_mask="nuclei")])
    out = os.path.join(out_dir, f"{executor}{workers or ''}-{os.path.basename(path)}.h5path")
    t = time.perf_counter()
    with SlideData(path) as s:
        s.run(pipe, out, tile_size=tile, overlap=64, executor=executor, workers=workers, progress=False)
    dt = time.perf_counter() - t
    with read_h5path(out) as h:
        n = h.cells.n_obs
    os.remove(out)
    return n, dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mosaic", type=int, default=6)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    if args.child:
        n, dt = run(args.child, "inprocess", None, args.tile, tmp)
        print(json.dumps({"cells": n, "seconds": dt,
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return 0
    out = {"bench": "cells", "pipeline": "SegmentCells(membrane=Membrane) + QuantifyCells", "tile": args.tile,
           "cores": os.cpu_count()}
    n, dt = run(MIBI, "inprocess", None, args.tile, tmp)
    out.update({"mibi_cells": n, "mibi_cells_per_s_inprocess": round(n / dt, 1)})
    mosaic = build_mosaic(args.mosaic)
    out["mosaic"] = f"{args.mosaic}x{args.mosaic} MIBI ({1024 * args.mosaic} px square, 22 channels)"
    n, dt = run(mosaic, "inprocess", None, args.tile, tmp)
    out.update({"mosaic_cells": n, "mosaic_cells_per_s_inprocess": round(n / dt, 1)})
    n2, dt2 = run(mosaic, "dask", 2, args.tile, tmp)
    out.update({"mosaic_cells_dask2": n2, "mosaic_cells_per_s_dask2": round(n2 / dt2, 1),
                "dask2_over_inprocess": round(dt / dt2, 2)})
    child = subprocess.run([sys.executable, __file__, "--child", mosaic, "--tile", str(args.tile)],
                           capture_output=True, text=True, check=True)
    out["mosaic_peak_rss_mb_inprocess"] = round(json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_mb"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())

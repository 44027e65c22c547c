#!/usr/bin/env python3
"""Single-cell throughput: segmentation (SegmentCells) + quantification (QuantifyCells) through the engine.

On the real MIBI image (22 channels, 1024 x 1024 uint16) and on a larger multiplex mosaic made from it
(the image tiled ``--mosaic`` x ``--mosaic`` times with mirrored copies, written as a tiled pyramidal TIFF
with its channel names), in-process and on a 2-worker local dask cluster: cells per second, the cell
count, and the peak RSS of a child process running the mosaic in-process. In-process figures follow one
untimed in-process run on the MIBI image (imports, first calls), so they are warm too. Dask figures are
steady-state (clusters of 1 and 2 workers started and warmed on the MIBI image first); ``*_dask2_cold``
includes starting the cluster.

Prints one JSON line.

    python bench/cells.py [--mosaic 6] [--tile 512]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MIBI = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "multiplex", "ark_fov8_mibitiff_22ch.tiff"))
CACHE = os.path.join(HERE, ".cache")
sys.path.insert(0, HERE)
from read_tiles import peak_rss_mb  # noqa: E402


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


def run(path, executor, workers, tile, out_dir, client=None):
    from histoflow.core.slide import SlideData
    from histoflow.store import read_h5path
    from histoflow.transforms import Pipeline, QuantifyCells, SegmentCells

    pipe = Pipeline([SegmentCells(membrane_channels=["Membrane"]), QuantifyCells(nucleus_mask="nuclei")])
    out = os.path.join(out_dir, f"{executor}{workers or ''}-{os.path.basename(path)}.h5path")
    kw = {"client": client} if client is not None else {"executor": executor, "workers": workers}
    t = time.perf_counter()
    with SlideData(path) as s:
        s.run(pipe, out, tile_size=tile, overlap=64, progress=False, **kw)
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
                          "peak_rss_mb": peak_rss_mb()}))
        return 0
    out = {"bench": "cells", "pipeline": "SegmentCells(membrane=Membrane) + QuantifyCells", "tile": args.tile,
           "cores": os.cpu_count()}
    run(MIBI, "inprocess", None, args.tile, tmp)  # untimed warm-up: imports and first uses not counted
    n, dt = run(MIBI, "inprocess", None, args.tile, tmp)
    out.update({"mibi_cells": n, "mibi_cells_per_s_inprocess": round(n / dt, 1)})
    mosaic = build_mosaic(args.mosaic)
    out["mosaic"] = f"{args.mosaic}x{args.mosaic} MIBI ({1024 * args.mosaic} px square, 22 channels)"
    n, dt = run(mosaic, "inprocess", None, args.tile, tmp)
    out.update({"mosaic_cells": n, "mosaic_cells_per_s_inprocess": round(n / dt, 1)})
    n2, dt2 = run(mosaic, "dask", 2, args.tile, tmp)
    out.update({"mosaic_cells_dask2_cold": n2, "mosaic_cells_per_s_dask2_cold": round(n2 / dt2, 1)})
    # steady state: clusters started and warmed on the MIBI image first (start-up and imports not counted)
    import dask
    from distributed import Client, LocalCluster

    from histoflow.engine.executors import WORKER_ENV

    for w in (1, 2):
        with dask.config.set(WORKER_ENV), LocalCluster(n_workers=w, threads_per_worker=1, dashboard_address=None,
                                                       silence_logs=40) as cluster, Client(cluster) as client:
            client.wait_for_workers(w)
            run(MIBI, "dask", w, args.tile, tmp, client=client)
            nw, dtw = run(mosaic, "dask", w, args.tile, tmp, client=client)
        out.update({f"mosaic_cells_dask{w}": nw, f"mosaic_cells_per_s_dask{w}": round(nw / dtw, 1)})
    out["dask2_over_inprocess"] = round(out["mosaic_cells_per_s_dask2"] / out["mosaic_cells_per_s_inprocess"], 2)
    out["dask2_over_dask1"] = round(out["mosaic_cells_per_s_dask2"] / out["mosaic_cells_per_s_dask1"], 2)
    child = subprocess.run([sys.executable, __file__, "--child", mosaic, "--tile", str(args.tile)],
                           capture_output=True, text=True, check=True)
    out["mosaic_peak_rss_mb_inprocess"] = round(json.loads(child.stdout.strip().splitlines()[-1])["peak_rss_mb"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())

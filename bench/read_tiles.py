#!/usr/bin/env python3
"""Tile-read throughput: histoflow's readers side by side with openslide-python and raw tile decoding.

Reads every aligned, full 256 x 256 tile of level 0 of a ``make_mosaic_slide.py N`` pyramid (real CMU-1
pixels, JPEG tiles), one tile per call, on one thread, in the same order for every reader:

- ``histoflow_mp_s``: ``histoflow.open_slide(path)`` (the default backend the content picks)
- ``histoflow_<backend>_mp_s``: each histoflow backend that reads the file
- ``openslide_mp_s``: ``openslide.OpenSlide(path).read_region(...).convert("RGB")``
- ``tiffslide_mp_s``: tiffslide's ``read_region`` where tiffslide is installed (else null)
- ``raw_decode_mp_s``: read each tile's bytes and decode them with tifffile's decoder, nothing else
  (the practical limit on this machine)

Then, in a child process, reads every tile of a larger mosaic (default 16x: 1.7 gigapixels) through
``open_slide`` and reports that process's peak RSS (``peak_rss_mb``).

Prints one JSON line.

    python bench/read_tiles.py [--n 8] [--rss-n 16] [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOOL = os.path.normpath(os.path.join(ROOT, "..", "shared", "tools", "make_mosaic_slide.py"))
CACHE = os.path.join(HERE, ".cache")
TILE = 256


def mosaic(n: int) -> str:
    os.makedirs(CACHE, exist_ok=True)
    out = os.path.join(CACHE, f"mosaic{n}.tif")
    if not os.path.exists(out):
        tmp = out + ".tmp.tif"
        subprocess.run([sys.executable, TOOL, str(n), tmp], check=True, stdout=subprocess.DEVNULL)
        os.replace(tmp, out)
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in decimal MB (10**6 bytes, like the outputs' sizes; until session 22
    MiB): ``VmHWM`` of ``/proc/self/status`` (Linux).

    Not ``ru_maxrss``: a process started by ``subprocess`` from a large parent inherits the parent's peak
    there (Linux records the old memory map's high-water mark at ``exec``), which made children of a bench
    that had itself run a big job report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6  # KiB ("kB" there) -> decimal MB, as output_mb
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def tile_coords(width: int, height: int):
    return [(x, y) for y in range(0, height - TILE + 1, TILE) for x in range(0, width - TILE + 1, TILE)]


def best_rate(fn, coords, repeat):
    """Megapixels per second of the fastest of ``repeat`` passes over ``coords``."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(coords)
        best = min(best, time.perf_counter() - t0)
    return len(coords) * TILE * TILE / best / 1e6, len(coords) / best


def bench_histoflow(path, backend, coords, repeat):
    import histoflow

    with histoflow.open_slide(path, backend=backend) as s:
        def run(cs):
            read = s.read_region
            for xy in cs:
                read(xy, 0, (TILE, TILE))
        return best_rate(run, coords, repeat), s.backend


def bench_openslide(path, coords, repeat):
    import openslide

    with openslide.OpenSlide(path) as o:
        def run(cs):
            for xy in cs:
                o.read_region(xy, 0, (TILE, TILE)).convert("RGB")
        return best_rate(run, coords, repeat)


def bench_tiffslide(path, coords, repeat):
    try:
        import tiffslide
    except ImportError:
        return None
    with tiffslide.TiffSlide(path) as t:
        def run(cs):
            for xy in cs:
                t.read_region(xy, 0, (TILE, TILE), as_array=True)
        return best_rate(run, coords, repeat)


def bench_raw(path, coords, repeat):
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        across = -(-page.imagewidth // page.tilewidth)
        index = [(y // TILE) * across + x // TILE for x, y in coords]
        offsets, counts = page.dataoffsets, page.databytecounts
        tables = page.jpegtables
        fd = os.open(path, os.O_RDONLY)
        try:
            def run(_):
                decode = page.decode
                for i in index:
                    decode(os.pread(fd, counts[i], offsets[i]), i, jpegtables=tables)
            return best_rate(run, coords, repeat)
        finally:
            os.close(fd)


def read_everything(path):
    """Child process: read every tile of level 0 (partial edge tiles too); print tiles and checksum."""
    import histoflow

    with histoflow.open_slide(path) as s:
        w, h = s.dimensions
        n, acc = 0, 0
        for y in range(0, h, TILE):
            for x in range(0, w, TILE):
                acc += int(s.read_region((x, y), 0, (TILE, TILE))[::64, ::64].sum())
                n += 1
    rss = peak_rss_mb()
    print(json.dumps({"tiles": n, "checksum": acc, "peak_rss_mb": round(rss, 1), "megapixels": w * h / 1e6}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8, help="mosaic size for throughput (default 8: 420 MP)")
    p.add_argument("--rss-n", type=int, default=16, help="mosaic size for the peak-RSS pass (0 to skip)")
    p.add_argument("--repeat", type=int, default=5, help="interleaved rounds (best kept)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        read_everything(args.child)
        return

    import histoflow
    from histoflow.io import detect_format

    path = mosaic(args.n)
    with histoflow.open_slide(path) as s:
        coords = tile_coords(*s.dimensions)
    out = {"bench": "read_tiles", "slide": f"mosaic{args.n}", "tiles": len(coords), "tile": TILE,
           "default_backend": detect_format(path).backend}
    # interleaved rounds (every reader once per round, best round kept) so that drift in the machine's
    # speed during the run does not favour whichever reader happens to run first
    readers = {
        "histoflow": lambda: bench_histoflow(path, "auto", coords, 1)[0],
        "histoflow_tiff": lambda: bench_histoflow(path, "tiff", coords, 1)[0],
        "histoflow_openslide": lambda: bench_histoflow(path, "openslide", coords, 1)[0],
        "openslide": lambda: bench_openslide(path, coords, 1),
        "tiffslide": lambda: bench_tiffslide(path, coords, 1),
        "raw_decode": lambda: bench_raw(path, coords, 1),
    }
    best = {}
    for _ in range(args.repeat):
        for name, fn in readers.items():
            r = fn()
            if r is not None and (name not in best or r[0] > best[name][0]):
                best[name] = r
    out["histoflow_mp_s"], out["histoflow_tiles_s"] = round(best["histoflow"][0], 1), round(best["histoflow"][1], 1)
    for backend in ("tiff", "openslide"):
        out[f"histoflow_{backend}_mp_s"] = round(best[f"histoflow_{backend}"][0], 1)
    out["openslide_mp_s"], out["openslide_tiles_s"] = round(best["openslide"][0], 1), round(best["openslide"][1], 1)
    out["tiffslide_mp_s"] = round(best["tiffslide"][0], 1) if "tiffslide" in best else None
    out["raw_decode_mp_s"] = round(best["raw_decode"][0], 1)
    out["speedup_vs_openslide"] = round(out["histoflow_mp_s"] / out["openslide_mp_s"], 2)
    out["fraction_of_raw_decode"] = round(out["histoflow_mp_s"] / out["raw_decode_mp_s"], 3)
    if args.rss_n:
        big = mosaic(args.rss_n)
        r = subprocess.run([sys.executable, __file__, "--child", big], capture_output=True, text=True, check=True)
        child = json.loads(r.stdout)
        out["peak_rss_mb"] = child["peak_rss_mb"]
        out["peak_rss_slide"] = f"mosaic{args.rss_n} ({child['megapixels']:.0f} MP, {child['tiles']} tiles)"
    out["threads"] = 1
    out["machine"] = f"{platform.machine()}, {os.cpu_count()} cpu"
    out["numpy"] = np.__version__
    print(json.dumps(out))


if __name__ == "__main__":
    main()

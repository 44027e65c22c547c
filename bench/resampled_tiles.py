#!/usr/bin/env python3
"""Tiles at a target µm/px: the cost of reading them as windows of one resampled level, side by side with the
former way (each tile's rounded level-0 rectangle resized on its own) and with the level's own tiles.

For each target pixel size, on the first ``--tiles`` 256 px tiles of the slide's grid, one thread:

- ``window_ms``: ``SlideData.read_tile``'s pixels (``read_on_grid``: each output pixel the exact area
  average of the level pixels under it, by its place in the whole resampled level)
- ``rectangle_ms``: ``read_resampled`` on the same tiles' rounded level-0 rectangles (OpenCV's area resize
  of each rectangle; what tiles were until session 25, whose pixels depended on the tiling)
- ``level_ms``: 256 px tiles of the level the grid reads, as they are (the read alone: the raw limit)
- ``tilings_agree``: whether two grids of other tile sizes and overlaps give every shared pixel the same value

Each timed pass follows an untimed one over the same tiles (the reader's cache of decoded tiles then serves
each method alike; the grid's weights, made once per column and row, are made there). Medians of ``--repeat``
rounds. Prints one JSON line.

    python bench/resampled_tiles.py [--slide PATH] [--mpp 0.75 1.0] [--tiles 48] [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from histoflow import SlideData  # noqa: E402
from histoflow.core import resample  # noqa: E402
from histoflow.core.slide import read_resampled  # noqa: E402


def _timed(fn, specs):
    for sp in specs:  # the reader's decoded tiles cached for each alike: the resampling is what differs
        fn(sp)
    t0 = time.perf_counter()
    for sp in specs:
        fn(sp)
    return (time.perf_counter() - t0) / len(specs) * 1e3


def _agree(slide, mpp):
    """Every pixel two tilings share, equal."""
    a, b = slide.grid(200, overlap=57, mpp=mpp), slide.grid(96, overlap=40, mpp=mpp)
    h, w = int(np.ceil(a.out_size[1])), int(np.ceil(a.out_size[0]))
    canvas = np.full((h + 200, w + 200, slide.reader.channels), -1, np.int32)
    for sp in a:
        x, y = sp.origin
        canvas[y:y + 200, x:x + 200] = slide.read_tile(sp).image
    for sp in list(b)[::5]:
        x, y = sp.origin
        img = slide.read_tile(sp).image
        if not np.array_equal(canvas[y:y + 96, x:x + 96][:h - y, :w - x], img[:h - y, :w - x]):
            return False
    return True


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide", default=os.path.join(here, "..", "src", "histoflow", "data", "CMU-1-Small-Region.svs"))
    ap.add_argument("--mpp", type=float, nargs="+", default=[0.75, 1.0])
    ap.add_argument("--tiles", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    out = {"bench": "resampled_tiles", "slide": os.path.basename(args.slide), "tile": 256, "repeat": args.repeat}
    with SlideData(args.slide) as slide:
        reader = slide.reader
        for mpp in args.mpp:
            grid = slide.grid(256, mpp=mpp)
            specs = list(grid)[:args.tiles]
            level = slide.grid(256, level=grid.level)
            plain = list(level)[:len(specs)]
            rounds = {"window": [], "rectangle": [], "level": []}
            for _ in range(args.repeat):
                resample._axis_weights.cache_clear()  # made again in the untimed pass
                rounds["window"].append(_timed(slide._read_spec, specs))
                rounds["rectangle"].append(_timed(
                    lambda sp: read_resampled(reader, sp.x, sp.y, sp.level, sp.read_size, sp.size), specs))
                rounds["level"].append(_timed(slide._read_spec, plain))
            key = f"mpp{mpp:g}"
            out[key] = {"level": grid.level, "scale": round(grid.downsample / grid.level_downsample, 4),
                        "tiles": len(specs), **{f"{k}_ms": round(statistics.median(v), 3) for k, v in rounds.items()},
                        "tilings_agree": _agree(slide, mpp)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Lossless codecs on the tiles the pipeline bench writes: a blurred (BoxBlur 15) 256 px tile of the 4x mosaic.

For each codec, milliseconds to encode one tile (one thread) and kilobytes per tile (``kb``: decimal kB, 1,000
bytes, as the PathML figure: until session 19 it was KiB, 1,024 bytes); PathML writes ~202 kB a tile of this
slide (332 MB for 1,645 tiles), so the issue's 1/4 size target allows ~50 kB. HTJ2K (the default of runs)
and JPEG-LS have HDF5 filters that fit (JPEG-LS only channel-first, see benchmarks.md);
Blosc2 and zlib are the others with HDF5 filters. Prints one JSON line.

    python bench/codecs.py [--tiles 300]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main():
    import cv2
    import imagecodecs

    from histoflow import open_slide
    from read_tiles import mosaic

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=300)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    tiles = []
    with open_slide(mosaic(4)) as r:
        w, h = r.dimensions
        for _ in range(args.tiles):
            x, y = int(rng.integers(0, w - 256)), int(rng.integers(0, h - 256))
            tiles.append(np.ascontiguousarray(cv2.blur(r.read_region((x, y), 0, (256, 256))[..., :3], (15, 15))))
    codecs = {"htj2k": lambda t: imagecodecs.htj2k_encode(t, rgb=True), "jpegls": imagecodecs.jpegls_encode,
              "zlib1": lambda t: imagecodecs.zlib_encode(t, 1)}
    for comp in ("zstd", "lz4hc"):
        for level in (1, 5):
            for shuffle in (1, 2):
                codecs[f"blosc2_{comp}{level}_shuffle{shuffle}"] = (
                    lambda t, c=comp, lv=level, s=shuffle: imagecodecs.blosc2_encode(t, lv, compressor=c, shuffle=s,
                                                                                     typesize=3, numthreads=1))
    out = {"bench": "codecs", "tiles": len(tiles), "pathml_kb_per_tile": 202, "target_kb_per_tile": 50}
    for name, f in codecs.items():
        f(tiles[0])
        t0 = time.perf_counter()
        size = sum(len(f(t)) for t in tiles)
        out[name] = {"ms": round((time.perf_counter() - t0) / len(tiles) * 1e3, 3),
                     "kb": round(size / len(tiles) / 1000, 1)}  # decimal kB, as pathml_kb_per_tile
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Tissue masks of ``TissueDetectionHE`` settings against PathML 3.0.8's ``TissueDetectionHE`` and a known truth.

``bench/pipeline.py`` runs ``TissueDetectionHE()`` with our defaults: grey, detected at 1/3 of the tile's
resolution, with one Otsu threshold per slide taken from its thumbnail (``otsu="slide"``). PathML's recipe is
HSV saturation at full resolution with each tile's own Otsu threshold, several times the CPU. This says what
each setting gives, on every whole 256 x 256 tile of:

- real H&E slides (the sample CMU-1 region, the InstanSeg H&E OME-TIFF, the 4x mosaic of bench/pipeline.py):
  the share of pixels whose tissue / background call equals PathML's, the IoU of the tissue pixels, how
  often the tile decision "more than 25 % tissue" agrees, and the CPU time per tile. PathML thresholds every
  tile by Otsu, so on a tile of blank glass (95 % of its pixels with HSV saturation under 10 of 255) it
  splits the glass's noise and calls much of it tissue, where ours return an empty mask: agreement is given
  over all tiles and over the tiles that are not blank glass (``..._tissue_tiles``), with the number of
  glass tiles each method keeps;
- a slide whose truth is known (``fields_on_glass``): four real MoNuSeg fields of view (1000 px, all tissue)
  laid on real blank glass of CMU-1, off the tile grid: IoU with the fields (``truth_iou``) and the mean
  tissue share of the tiles wholly inside them (``truth_inside_tissue``, 1 is right).

CPU times per tile are of the calls after one untimed call on the first tile, for ours and PathML's alike.

PathML runs in its own Python (``--pathml-python``, see ``bench/pathml_venv.sh``); without it the reference
is its recipe in our code (``pathml_recipe``, equal to PathML on tiles with tissue).

Prints one JSON line.

    python bench/tissue_agreement.py [--pathml-python PY] [--mosaic 4]
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
sys.path.insert(0, HERE)
DATA = os.path.join(HERE, "..", "..", "shared", "data")
KEEP = 0.25  # a tile is kept when more than this share of it is tissue
GLASS_SATURATION = 10  # blank glass: 95 % of the tile's pixels have HSV saturation under this (0-255)

SETTINGS = {
    "default": {},  # grey at 1/3 resolution, the slide's Otsu threshold
    "saturation": {"use_saturation": True},
    "tile_otsu": {"otsu": "tile"},  # the default with each tile's own threshold
    "saturation_full_tile_otsu": {"use_saturation": True, "working_downsample": 1, "otsu": "tile"},
}
PATHML_RECIPE = "saturation_full_tile_otsu"
FIELDS = ("TCGA-MH-A561-01Z-00-DX1", "TCGA-UZ-A9PJ-01Z-00-DX1", "TCGA-BC-A217-01Z-00-DX1", "TCGA-AR-A1AK-01Z-00-DX1")


def pathml_child(tiles_path, out_path):
    """PathML's masks for the tiles in ``tiles_path``; imports nothing of histoflow."""
    from pathml.preprocessing import TissueDetectionHE as PTissue

    tiles = np.load(tiles_path)
    t = PTissue(mask_name="tissue")
    t.F(tiles[0])  # warmed, untimed, as ours are: first calls (imports inside, OpenCV's first use) not counted
    c0 = time.process_time()
    masks = np.stack([t.F(tile) > 0 for tile in tiles])
    cpu = time.process_time() - c0
    np.save(out_path, masks)
    print(json.dumps({"cpu_ms_per_tile": 1e3 * cpu / len(tiles)}))


def fields_on_glass(out):
    """Four MoNuSeg fields (all tissue) on CMU-1's blank glass, mirror-tiled; the truth mask."""
    import tifffile
    from PIL import Image

    import histoflow

    glass = np.asarray(histoflow.open_slide(os.path.join(HERE, "..", "src", "histoflow", "data",
                                                         "CMU-1-Small-Region.svs")).read_region((1900, 100), 0, (256, 256)))
    h = w = 2560
    canvas = np.pad(glass[..., :3], ((0, h - 256), (0, w - 256), (0, 0)), mode="symmetric")
    truth = np.zeros((h, w), bool)
    for name, (x, y) in zip(FIELDS, ((140, 140), (1300, 170), (170, 1330), (1330, 1300))):
        img = Image.open(os.path.join(DATA, "monuseg_train", name + ".png")).convert("RGB")
        canvas[y:y + 1000, x:x + 1000] = np.asarray(img)
        truth[y:y + 1000, x:x + 1000] = True
    tifffile.imwrite(out, canvas, tile=(256, 256), photometric="rgb")
    return out, truth


def slide_tiles(path, size=256):
    """Every whole ``size`` tile of level 0, and the tiles' origins."""
    import histoflow

    s = histoflow.SlideData(path)
    w, h = s.dimensions
    out = []
    for y in range(0, h - size + 1, size):
        for x in range(0, w - size + 1, size):
            out.append(np.asarray(s.read_region((x, y), 0, (size, size)))[..., :3])
    return s, np.stack(out)


def glass_tiles(tiles):
    import cv2

    sat = np.stack([cv2.cvtColor(t, cv2.COLOR_RGB2HSV)[..., 1] for t in tiles])
    return np.percentile(sat.reshape(len(tiles), -1), 95, axis=1) < GLASS_SATURATION


def compare(masks, ref):
    same = float((masks == ref).mean())
    inter, union = np.logical_and(masks, ref).sum(), np.logical_or(masks, ref).sum()
    keep, keep_ref = masks.mean(axis=(1, 2)) > KEEP, ref.mean(axis=(1, 2)) > KEEP
    return {"pixel_agreement": round(same, 4), "tissue_iou": round(float(inter / union), 4) if union else None,
            "tiles_kept": int(keep.sum()), "tile_decision_agreement": round(float((keep == keep_ref).mean()), 4)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pathml-python", help="a Python with PathML 3.0.8 (bench/pathml_venv.sh)")
    p.add_argument("--mosaic", type=int, default=4, help="the mosaic slide of bench/pipeline.py (0: none)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return pathml_child(*a.child)

    from histoflow.transforms import TissueDetectionHE

    sources = {"CMU-1-Small-Region.svs": os.path.join(HERE, "..", "src", "histoflow", "data", "CMU-1-Small-Region.svs"),
               "instanseg_HE_example.ome.tif": os.path.join(DATA, "wsi", "ome_tiff", "instanseg_HE_example.ome.tif")}
    if a.mosaic:
        from read_tiles import mosaic
        sources[f"mosaic{a.mosaic}"] = mosaic(a.mosaic)
    out = {"bench": "tissue_agreement", "tile": 256, "keep_above": KEEP, "settings": SETTINGS,
           "reference": "pathml" if a.pathml_python else PATHML_RECIPE, "slides": {}}
    with tempfile.TemporaryDirectory() as tmp:
        sources["fields_on_glass"], truth = fields_on_glass(os.path.join(tmp, "fields_on_glass.tif"))
        for name, path in sources.items():
            slide, tiles = slide_tiles(path)
            glass = glass_tiles(tiles)
            res = {"tiles": len(tiles), "glass_tiles": int(glass.sum())}
            masks, cpu = {}, {}
            for key, kw in SETTINGS.items():
                t = TissueDetectionHE(**kw)
                t.fit_slide(slide)
                t.F(tiles[0])
                c0 = time.process_time()
                masks[key] = np.stack([t.F(tile) > 0 for tile in tiles])
                cpu[key] = 1e3 * (time.process_time() - c0) / len(tiles)
            if a.pathml_python:
                tp, mp = os.path.join(tmp, "tiles.npy"), os.path.join(tmp, "masks.npy")
                np.save(tp, tiles)
                r = subprocess.run([a.pathml_python, os.path.abspath(__file__), "--child", tp, mp],
                                   capture_output=True, text=True, check=True)
                ref = np.load(mp)
                res["pathml_cpu_ms_per_tile"] = round(json.loads(r.stdout.strip().splitlines()[-1])["cpu_ms_per_tile"], 3)
                kept = ref.mean(axis=(1, 2)) > KEEP
                res["pathml_tiles_kept"], res["pathml_glass_tiles_kept"] = int(kept.sum()), int(kept[glass].sum())
            else:
                ref = masks[PATHML_RECIPE]
            for key in SETTINGS:
                res[key] = {**compare(masks[key], ref), "cpu_ms_per_tile": round(cpu[key], 3),
                            "glass_tiles_kept": int((masks[key][glass].mean(axis=(1, 2)) > KEEP).sum())}
                if (~glass).any():
                    res[key].update({f"{k}_tissue_tiles": v for k, v in compare(masks[key][~glass], ref[~glass]).items()})
            if name == "fields_on_glass":
                n = truth.shape[1] // 256
                t_tiles = truth.reshape(-1, 256, n, 256).swapaxes(1, 2).reshape(-1, 256, 256)
                inside = t_tiles.all(axis=(1, 2))
                for key, m in list(masks.items()) + ([("pathml", ref)] if a.pathml_python else []):
                    r = res.setdefault(key, {})
                    r["truth_iou"] = round(float(np.logical_and(m, t_tiles).sum() / np.logical_or(m, t_tiles).sum()), 4)
                    r["truth_inside_tissue"] = round(float(m[inside].mean()), 4)
            out["slides"][name] = res
    print(json.dumps(out))


if __name__ == "__main__":
    main()

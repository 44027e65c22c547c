"""Where the real test data lives (../shared/data, used in place, never copied) and the cache of
generated mosaics."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
TOOLS = os.path.normpath(os.path.join(ROOT, "..", "shared", "tools"))
CACHE = os.path.join(ROOT, "tests", ".cache")
SVS = os.path.join(DATA, "wsi", "aperio_svs", "CMU-1-Small-Region.svs")


def data_path(*parts):
    return os.path.join(DATA, *parts)


def mosaic(n):
    """Path of a make_mosaic_slide.py N pyramid, built once and cached in tests/.cache."""
    os.makedirs(CACHE, exist_ok=True)
    out = os.path.join(CACHE, f"mosaic{n}.tif")
    if not os.path.exists(out):
        tmp = out + f".tmp-{os.getpid()}.tif"
        subprocess.run([sys.executable, os.path.join(TOOLS, "make_mosaic_slide.py"), str(n), tmp], check=True,
                       stdout=subprocess.DEVNULL)
        os.replace(tmp, out)
    return out

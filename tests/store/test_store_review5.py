"""The store under a full disk, and keys a caller gets wrong (session 28 review)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from histoflow.store import H5PathWriter, read_h5path


def test_a_full_disk_while_adding_tiles_is_an_output_error_naming_the_file(tmp_path):
    """h5py's raw OSError named the hidden temporary file, and the engine could not tell it from a tile's fault.
    Run in a child process under a file-size limit (a full disk's error)."""
    script = f"""
import os, resource, signal, sys
import numpy as np
from histoflow.store import H5PathWriter
from histoflow.errors import H5PathOutputError
os.chdir({str(tmp_path)!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, resource.RLIM_INFINITY))
rng = np.random.default_rng(0)
try:
    with H5PathWriter("full.h5path", compression="gzip") as w:
        for k in range(1000):
            w.add_tile(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), (k, 0))
except H5PathOutputError as e:
    print("named", str(e)[:60], sorted(os.listdir(".")), flush=True)
os._exit(0)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "named full.h5path: cannot write it ([Errno 27]" in r.stdout, r.stdout + r.stderr
    assert r.stdout.strip().endswith("[]")  # no temporary file left


def test_tile_keys_the_caller_gets_wrong_are_key_errors(tmp_path):
    with H5PathWriter(tmp_path / "k.h5path") as w:
        w.add_tile(np.zeros((4, 4, 3), np.uint8), (0, 0))
    with read_h5path(os.fsencode(tmp_path / "k.h5path")) as h:
        assert isinstance(h.path, str)
        for key in ((float("nan"), 0), (float("inf"), 0), (None, 0), ("ab", 0), ("0", 0), (0.5, 0)):
            with pytest.raises(KeyError, match="tile coords are whole numbers"):
                h.tile(key)
        assert h.tile((0, 0)).image.shape == (4, 4, 3)

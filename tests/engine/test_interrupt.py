"""Ctrl-C during a run on a local dask cluster: one line from the driver, no worker tracebacks, nothing left
running, and --resume finishes the run."""
import glob
import hashlib
import os
import signal
import subprocess
import sys
import time

import psutil
from datafiles import SVS

from histoflow import read_h5path

BIN = os.path.dirname(sys.executable)

NAP = '''
import time

from histoflow.transforms import Transform


class Nap(Transform):
    """Sleeps on every tile (a slow step), changes nothing."""

    def __init__(self, seconds=0.1):
        self.seconds = seconds

    def apply(self, tile):
        time.sleep(self.seconds)
'''

PIPELINE = """histoflow_pipeline: 1
steps:
- BoxBlur: {kernel_size: 5}
- Nap: {seconds: 0.1}
"""


def _histoflow(*args):
    return [os.path.join(BIN, "histoflow"), "run", "p.yaml", SVS, "--import", "nap", "--size", "512",
            "--batch-size", "2", "--no-progress", *args]


def _tiles(path):
    with read_h5path(path) as h5:
        return [(t.coords, hashlib.sha1(t.image.tobytes()).hexdigest()) for t in h5]


def test_ctrl_c_on_a_local_cluster_prints_one_line_and_resumes(tmp_path):
    """The terminal's Ctrl-C reaches the whole process group, the local cluster's worker processes too: each
    printed its own traceback (CancelledError, KeyboardInterrupt) above the driver's one-line message."""
    (tmp_path / "nap.py").write_text(NAP)
    (tmp_path / "p.yaml").write_text(PIPELINE)
    journal = tmp_path / "out" / "CMU-1-Small-Region.h5path.partial"
    p = subprocess.Popen(_histoflow("-o", "out", "--workers", "2"), cwd=tmp_path,
                         start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.monotonic()
        while not glob.glob(str(journal / "batch-*.hfb")):  # the first batch is done
            assert p.poll() is None and time.monotonic() - t0 < 60, p.communicate()
            time.sleep(0.02)
        children = psutil.Process(p.pid).children(recursive=True)
        assert len(children) >= 2, children  # the workers (and multiprocessing's resource tracker)
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith("histoflow: interrupted"), err
    _, alive = psutil.wait_procs(children, timeout=10)  # (on a loaded machine a worker may take seconds to go)
    assert not alive, [(c.pid, " ".join(c.cmdline()[:4])) for c in alive]  # no worker left running
    assert not (tmp_path / "out" / "CMU-1-Small-Region.h5path").exists() and journal.is_dir()

    r = subprocess.run(_histoflow("-o", "out", "--resume", "--executor", "inprocess"), cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ref = subprocess.run(_histoflow("-o", "ref", "--executor", "inprocess"), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert ref.returncode == 0, ref.stderr
    out = str(tmp_path / "out" / "CMU-1-Small-Region.h5path")
    with read_h5path(out) as h5:
        assert h5.provenance[-1]["resumed_batches"] >= 1
    got = _tiles(out)
    assert got == _tiles(tmp_path / "ref" / "CMU-1-Small-Region.h5path") and len(got) == 30
    assert not journal.exists()

"""The engine: same output on every executor, faults, worker loss, resume, many slides, checks.

Dask tests start a real scheduler and two workers as separate processes on 127.0.0.1 with the
`dask scheduler` / `dask worker` commands, and run through the scheduler's address.
"""
import json
import os
import signal
import subprocess
import sys
import time
import zlib

import cv2
import h5py
import numpy as np
import pytest
from datafiles import SVS, mosaic

from histoflow import PipelineError, SlideData, SlideDataset, read_h5path
from histoflow.transforms import Pipeline, Transform

BIN = os.path.dirname(sys.executable)
HERE = os.path.dirname(os.path.abspath(__file__))


class Blur(Transform):
    """Box blur (test copy, independent of the library)."""

    changes_image = True

    def __init__(self, k=9):
        self.k = k

    def apply(self, tile):
        tile.image = cv2.blur(tile.image, (self.k, self.k))


class Scratch(Transform):
    """Keeps the tile it works on in self while it works (a user's transform need not be thread-safe)."""

    changes_image = True

    def apply(self, tile):
        self.current = tile.image
        time.sleep(0.002)
        tile.image = (255 - self.current).astype(np.uint8)


class AddFromFile(Transform):
    """Adds the number its file holds to every pixel (a stand-in for a model's weights file)."""

    changes_image = True

    def __init__(self, path):
        self.path = path

    def apply(self, tile):
        with open(self.path) as f:
            tile.image = np.clip(tile.image.astype(int) + int(f.read()), 0, 255).astype(np.uint8)


class Dark(Transform):
    """Mask of dark pixels and its fraction as a label."""

    masks_out = ("dark",)
    labels_out = ("dark_fraction",)

    def __init__(self, threshold=160, delay=0.0):
        self.threshold = threshold
        self.delay = delay

    def apply(self, tile):
        if self.delay:
            time.sleep(self.delay)
        m = (cv2.cvtColor(tile.image, cv2.COLOR_RGB2GRAY) < self.threshold).astype(np.uint8)
        tile.masks["dark"] = m
        tile.labels["dark_fraction"] = float(m.mean())


class FailAt(Transform):
    """Raises on the tile at one coordinate."""

    def __init__(self, x=256, y=512):
        self.x = x
        self.y = y

    def apply(self, tile):
        if tile.coords == (self.x, self.y):
            raise ValueError("synthetic failure")


class KillOnce(Transform):
    """Ends its worker process the first time it meets a tile (a one-off crash, e.g. killed for memory);
    ``marker`` records that it happened."""

    def __init__(self, x, y, marker):
        self.x, self.y, self.marker = x, y, str(marker)

    def apply(self, tile):
        if tile.coords == (self.x, self.y) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)


class SlowAt(Transform):
    """Sleeps on the tile at one coordinate (a straggler)."""

    def __init__(self, x=0, y=0, seconds=1.0):
        self.x, self.y, self.seconds = x, y, seconds

    def apply(self, tile):
        if tile.coords == (self.x, self.y):
            time.sleep(self.seconds)


def pipeline(delay=0.0):
    return Pipeline([Blur(9), Dark(160, delay)])


def tile_data(path):
    """The decoded tile data of a file: per tile, digests of image and mask, coords, labels."""
    import hashlib

    with read_h5path(path) as h5:
        return [(hashlib.sha1(t.image.tobytes()).hexdigest(), hashlib.sha1(t.masks["dark"].tobytes()).hexdigest(),
                 t.coords, t.labels) for t in h5]


# ---------------------------------------------------------------------- a real cluster
def _start_cluster(tmp_path, n_workers=2):
    procs = []
    try:
        return _start_cluster_procs(tmp_path, n_workers, procs)
    except BaseException:  # nothing left running when the cluster could not be started
        for p in procs:
            p.kill()
            p.wait()
        raise


def _start_cluster_procs(tmp_path, n_workers, procs):
    sched_file = tmp_path / "scheduler.json"
    # the workers import this module to unpickle its transforms, as they would a user's own module
    path = os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    procs.append(subprocess.Popen([os.path.join(BIN, "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                   "--no-dashboard", "--scheduler-file", str(sched_file)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    for _ in range(200):
        if sched_file.exists() and sched_file.stat().st_size:
            break
        time.sleep(0.1)
    address = json.loads(sched_file.read_text())["address"]
    for i in range(n_workers):
        procs.append(subprocess.Popen([os.path.join(BIN, "dask"), "worker", address, "--nthreads", "1",
                                       "--no-nanny", "--no-dashboard", "--name", f"w{i}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    from distributed import Client

    if n_workers:
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(n_workers, timeout=60)
    return address, procs


@pytest.fixture
def cluster(tmp_path):
    address, procs = _start_cluster(tmp_path)
    yield address, procs
    for p in procs:
        p.kill()
        p.wait()


# ---------------------------------------------------------------------- tests
def test_same_output_on_every_executor(tmp_path, cluster):
    address, _ = cluster
    slide = SlideData(mosaic(2))
    ref = slide.run(pipeline(), tmp_path / "inprocess.h5path", executor="inprocess", progress=False)
    thr = slide.run(pipeline(), tmp_path / "threads.h5path", executor="threads", workers=2, progress=False)
    dsk = slide.run(pipeline(), tmp_path / "dask.h5path", scheduler=address, batch_size=8, progress=False)
    a = tile_data(ref)
    assert len(a) == 18 * 24
    for other in (thr, dsk):
        b = tile_data(other)
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        assert not diff and len(b) == len(a), (other, diff[:5])
    with read_h5path(dsk) as h5:
        prov = h5.provenance[-1]
        assert prov["executor"] == {"kind": "dask", "workers": 2}
        assert prov["pipeline"]["steps"] == [{"Blur": {"k": 9}}, {"Dark": {"threshold": 160, "delay": 0.0}}]
        t = h5.tile(100)
        np.testing.assert_array_equal(t.image, cv2.blur(slide.read_region(t.coords, 0, (256, 256)), (9, 9)))
    assert not os.path.exists(str(dsk) + ".partial")


def test_slide_fitted_transform_reaches_the_dask_workers(tmp_path, cluster):
    """TissueDetectionHE's threshold is fitted to the slide in the driver (fit_slide); the workers use it."""
    from histoflow.transforms import TissueDetectionHE

    address, _ = cluster
    slide = SlideData(SVS)
    runs = {}
    for name, tissue, kw in (("ref", TissueDetectionHE(), dict(executor="inprocess")),
                             ("dask", TissueDetectionHE(), dict(scheduler=address, batch_size=8)),
                             ("tile", TissueDetectionHE(otsu="tile"), dict(executor="inprocess"))):
        out = slide.run(Pipeline([tissue]), tmp_path / f"{name}.h5path", progress=False, **kw)
        with read_h5path(out) as h5:
            runs[name] = {t.coords: t.masks["tissue"] for t in h5}
    assert len(runs["ref"]) == 108 and runs["dask"].keys() == runs["ref"].keys()
    for xy, m in runs["ref"].items():
        np.testing.assert_array_equal(runs["dask"][xy], m)
    # and the slide's threshold is not each tile's own: they differ on some tiles of CMU-1
    assert sum(not np.array_equal(runs["tile"][xy], m) for xy, m in runs["ref"].items()) >= 10


def test_inprocess_compresses_on_a_helper_thread_with_the_same_result(tmp_path):
    from histoflow.engine.executors import InProcessExecutor

    slide = SlideData(mosaic(2))
    ex = InProcessExecutor()
    assert ex.encoder is not None
    threaded = slide.run(pipeline(), tmp_path / "a.h5path", executor=ex, progress=False, compression="htj2k")
    ex.close()
    plain_ex = InProcessExecutor(encode_thread=False)
    plain = slide.run(pipeline(), tmp_path / "b.h5path", executor=plain_ex, progress=False, compression="htj2k")
    assert tile_data(threaded) == tile_data(plain)
    assert os.path.getsize(threaded) == pytest.approx(os.path.getsize(plain), rel=0.01)


def test_inprocess_encodes_itself_what_the_helper_has_not_started(tmp_path):
    """At the end of a batch the calling thread encodes the tiles the helper thread has not started rather
    than wait: with the helper blocked, the batch still finishes, with the same bytes, in grid order."""
    import concurrent.futures as cf
    import threading

    from histoflow.engine.worker import process_batch

    slide = SlideData(mosaic(2))
    specs = list(enumerate(slide.grid(256)))[:6]
    plain = process_batch(slide, pipeline(), 0, specs, "htj2k")
    encoder = cf.ThreadPoolExecutor(1)
    release = threading.Event()
    encoder.submit(release.wait, 60)  # the helper is busy until released
    t0 = time.perf_counter()
    shared = process_batch(slide, pipeline(), 0, specs, "htj2k", encoder=encoder)
    assert time.perf_counter() - t0 < 30  # did not wait for the helper
    release.set()
    encoder.shutdown(wait=True)
    assert [i for i, _ in shared.tiles] == [i for i, _ in specs]
    for (i, a), (j, b) in zip(plain.tiles, shared.tiles):
        assert i == j and a.image.data == b.image.data and a.coords == b.coords
        assert {k: m.data for k, m in a.masks.items()} == {k: m.data for k, m in b.masks.items()}



def test_inprocess_reads_the_next_batches_before_journalling_one(tmp_path, monkeypatch):
    """In-process, a batch is finished (encodings collected, journalled) only after the next batches were
    read and transformed, so the helper thread encodes those while the calling thread journals and merges;
    the file is the same as without the helper, and an error in a later batch still stops the run."""
    from histoflow.engine import partial, worker

    events = []
    real_write, real_transform = partial.write_batch, worker._transform_batch
    monkeypatch.setattr(partial, "write_batch", lambda d, r, t: events.append(("journal", r.batch)) or
                        real_write(d, r, t))

    def transform(slide, pipe, specs, *a):
        events.append(("read", specs[0][0] // 16))
        return real_transform(slide, pipe, specs, *a)

    monkeypatch.setattr(worker, "_transform_batch", transform)
    slide = SlideData(mosaic(2))
    out = slide.run(pipeline(), tmp_path / "a.h5path", executor="inprocess", batch_size=16, progress=False,
                    compression="htj2k")
    assert events.index(("read", 1)) < events.index(("journal", 0))
    assert sorted(b for kind, b in events if kind == "journal") == list(range(27))
    assert [b for kind, b in events if kind == "journal"] == list(range(27))  # journalled in grid order
    monkeypatch.setattr(worker, "_transform_batch", real_transform)
    from histoflow.engine.executors import InProcessExecutor

    plain = slide.run(pipeline(), tmp_path / "b.h5path", executor=InProcessExecutor(encode_thread=False),
                      batch_size=16, progress=False, compression="htj2k")
    assert tile_data(out) == tile_data(plain)

    class FailLate(Transform):
        def apply(self, tile):
            if tile.coords[1] >= 1024:
                raise RuntimeError("late failure")

    with pytest.raises(PipelineError, match="late failure"):
        slide.run(Pipeline([FailLate()]), tmp_path / "c.h5path", executor="inprocess", batch_size=16,
                  progress=False, compression="htj2k")
    assert not os.path.exists(tmp_path / "c.h5path")

def test_same_process_executors_merge_from_memory(tmp_path, monkeypatch):
    """In-process, finished batches are merged from memory (the journal is written for resume, not read
    back); with no room in memory they are read back from the journal: the same file either way."""
    from histoflow.engine import partial
    from histoflow.engine import run as engine_run

    reads = []
    real_read = partial.read_batch
    monkeypatch.setattr(partial, "read_batch", lambda d, b, t: reads.append(b) or real_read(d, b, t))
    slide = SlideData(mosaic(2))
    mem = slide.run(pipeline(), tmp_path / "mem.h5path", executor="inprocess", batch_size=16, progress=False)
    assert reads == []
    monkeypatch.setattr(engine_run, "IN_MEMORY_BATCHES", 0)
    disk = slide.run(pipeline(), tmp_path / "disk.h5path", executor="inprocess", batch_size=16, progress=False)
    assert reads == list(range(27))  # 432 tiles in batches of 16, read back in grid order
    assert tile_data(mem) == tile_data(disk)


def test_local_cluster_started_here(tmp_path):
    """executor="dask" without an address starts a local cluster whose workers get WORKER_ENV (one OpenCV
    thread per worker, the fixed mmap and trim thresholds), ignore SIGINT and SIGTERM, and write the same tiles
    as in-process."""
    from histoflow.engine.executors import DaskExecutor

    slide = SlideData(SVS)
    ref = slide.run(pipeline(), tmp_path / "ref.h5path", tile_size=512, executor="inprocess", progress=False)
    ex = DaskExecutor(workers=1)
    try:
        env = ex.client.run(lambda: (__import__("os").environ.get("MALLOC_MMAP_THRESHOLD_"),
                                     __import__("os").environ.get("MALLOC_TRIM_THRESHOLD_"),
                                     __import__("cv2").getNumThreads()))
        assert list(env.values()) == [(str(4 * 1024 * 1024), str(64 * 1024 * 1024), 1)]
        # the terminal's Ctrl-C (and TERM) to the process group is the driver's to handle (test_interrupt.py)
        ignored = ex.client.run(lambda: [__import__("signal").getsignal(s) == __import__("signal").SIG_IGN
                                         for s in (signal.SIGINT, signal.SIGTERM)])
        assert list(ignored.values()) == [[True, True]]
        out = slide.run(pipeline(), tmp_path / "dask.h5path", tile_size=512, executor=ex, progress=False)
    finally:
        ex.close()
    assert tile_data(out) == tile_data(ref) and len(tile_data(ref)) == 30


def test_worker_killed_mid_run(tmp_path, cluster):
    address, procs = cluster
    slide = SlideData(mosaic(2))
    killed = []

    def kill_one(slide_, batch, done, total):
        if done == 5 and not killed:
            procs[1].send_signal(signal.SIGKILL)  # worker w0, no nanny: gone for good
            killed.append(batch)

    out = slide.run(pipeline(delay=0.01), tmp_path / "killed.h5path", scheduler=address, batch_size=6,
                    progress=False, on_batch=kill_one)
    assert killed
    ref = slide.run(pipeline(), tmp_path / "ref.h5path", executor="inprocess", progress=False)
    got = tile_data(out)
    assert got == tile_data(ref)  # nothing lost, nothing duplicated, same order
    assert len({t[2] for t in got}) == 432


def test_a_cluster_without_workers_is_waited_for_and_a_lost_worker_replaced(tmp_path):
    """A cluster whose workers have not started yet (Slurm jobs in the queue) made the run fail after 30 s
    ("No valid workers found"); the slide and pipeline were scattered, so when the one worker died (and its
    nanny restarted it) every batch was cancelled (FuturesCancelledError)."""
    import threading

    address, procs = _start_cluster(tmp_path, n_workers=0)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))

    def start_worker():  # with a nanny, which starts the worker again when it dies
        time.sleep(1.0)
        procs.append(subprocess.Popen([os.path.join(BIN, "dask"), "worker", address, "--nthreads", "1",
                                       "--no-dashboard", "--name", "late"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))

    marker = tmp_path / "killed"
    pipe = Pipeline([Blur(9), Dark(160), KillOnce(512, 512, marker)])
    slide = SlideData(SVS)
    try:
        threading.Thread(target=start_worker, daemon=True).start()
        with pytest.warns(UserWarning, match="has no workers yet: the run waits for them"):
            out = slide.run(pipe, tmp_path / "o.h5path", scheduler=address, tile_size=512, batch_size=2,
                            progress=False)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert marker.exists()  # the worker did die on that tile
    ref = slide.run(pipe, tmp_path / "ref.h5path", executor="inprocess", tile_size=512, progress=False)
    assert tile_data(out) == tile_data(ref) and len(tile_data(ref)) == 30


def test_cluster_results_are_read_from_the_journal_not_gathered(tmp_path, cluster, monkeypatch):
    """Workers that see the journal folder journal their batches; the driver reads them from there instead
    of gathering each task's result through the scheduler, and writes the same file."""
    import distributed

    address, _ = cluster
    gathered = []
    real_result = distributed.Future.result

    def result(self, *a, **kw):
        if str(self.key).startswith("histoflow-"):
            gathered.append(self.key)
        return real_result(self, *a, **kw)

    monkeypatch.setattr(distributed.Future, "result", result)
    slide = SlideData(mosaic(2))
    out = slide.run(pipeline(), tmp_path / "o.h5path", scheduler=address, batch_size=40, progress=False)
    ref = slide.run(pipeline(), tmp_path / "ref.h5path", executor="inprocess", progress=False)
    assert gathered == []
    assert tile_data(out) == tile_data(ref) and len(tile_data(ref)) == 432


def test_cluster_batches_are_read_from_the_journal_once(tmp_path, cluster, monkeypatch):
    """With a straggling first batch, the finished batches queue up for the merge: those past the in-memory
    limit are left in the journal until their turn, never read twice."""
    from collections import Counter

    from histoflow.engine import partial

    address, _ = cluster
    reads = []
    real_read = partial.read_batch
    monkeypatch.setattr(partial, "read_batch", lambda d, b, t: reads.append(b) or real_read(d, b, t))
    slide = SlideData(mosaic(2))
    slow = Pipeline([Blur(9), Dark(160), SlowAt(0, 0, 2.0)])
    out = slide.run(slow, tmp_path / "o.h5path", scheduler=address, batch_size=8, max_in_flight=30,
                    progress=False)
    assert sorted(Counter(reads).values(), reverse=True)[0] == 1 and len(reads) == 54
    ref = slide.run(pipeline(), tmp_path / "ref.h5path", executor="inprocess", progress=False)
    assert tile_data(out) == tile_data(ref)


def test_journal_batch_files_round_trip_and_refuse_damage(tmp_path):
    """A batch file holds the encoded tiles (image, masks, cell arrays, labels) and failures as they were;
    a damaged one is refused with an error naming it, not read as wrong tiles."""
    from histoflow.core.tile import Tile
    from histoflow.engine import partial
    from histoflow.engine.worker import BatchResult, Failure
    from histoflow.store.h5path import encode_tile

    rng = np.random.default_rng(0)
    tiles = []
    for i in range(3):
        t = Tile(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8), coords=(48 * i, 0))
        t.masks["dark"] = (t.image[:, :, 0] > 128).astype(np.uint8)
        t.labels["n"] = i
        enc = encode_tile(t, "htj2k")
        enc.cells = {"centroids": rng.random((5, 2)).astype(np.float32)} if i == 1 else None
        tiles.append((i, enc))
    res = BatchResult(7, tiles, [Failure(3, 144, 0, "Dark", "ValueError: bad")])
    d = str(tmp_path)
    partial.write_batch(d, res, "tok")
    back = partial.read_batch(d, 7, "tok")
    assert [i for i, _ in back.tiles] == [0, 1, 2] and back.failures == res.failures
    for (_, a), (_, b) in zip(res.tiles, back.tiles):
        assert np.array_equal(b.decode().image, a.decode().image)
        assert np.array_equal(b.decode().masks["dark"], a.decode().masks["dark"])
        assert b.coords == a.coords and b.labels == a.labels
    assert np.array_equal(back.tiles[1][1].cells["centroids"], tiles[1][1].cells["centroids"])
    assert partial.done_batches(d, "tok") == {7} and partial.done_batches(d, "other") == set()

    path = partial.batch_path(d, 7, "tok")
    data = open(path, "rb").read()
    header_at = data.index(b'{"tiles"')
    flipped_chunk = bytearray(data)
    flipped_chunk[-100] ^= 4  # one bit of the last tile's chunks: would decode to wrong pixels
    moved = data.replace(b'"coords": [96', b'"coords": [97')  # a tile's place changed
    assert moved != data
    for damaged, why in ((data[:-10], "checksum"), (data[:30], "truncated|not a histoflow"),
                         (b"PK\x03\x04" + data[4:], "not a histoflow"), (bytes(flipped_chunk), "checksum"),
                         (moved, "checksum"), (data[:header_at - 1] + b"\x00" + data[header_at:], "checksum")):
        with open(path, "wb") as f:
            f.write(damaged)
        with pytest.raises(PipelineError, match=rf"batch-0000007-tok\.hfb: unreadable batch file .*({why})"):
            partial.read_batch(d, 7, "tok")

    def forged(header: bytes, blob: bytes = b"\0" * 64):  # a well-formed file (right checksum) with this header
        body = header + blob
        return (partial.BATCH_MAGIC + len(header).to_bytes(8, "little") + zlib.crc32(body).to_bytes(4, "little")
                + body)

    tile = {"index": 0, "coords": [0, 0], "level": 0, "downsample": 1.0, "name": None, "labels": {},
            "compression": "gzip", "compression_level": 4, "image": [[0, 8], [2, 2, 3], "|u1"], "masks": {},
            "cells": None}
    for bad in ({**tile, "image": [[0, float("inf")], [2, 2, 3], "|u1"]}, {**tile, "image": [[0, 8], "abc", "|u1"]},
                {**tile, "image": [[0, 8], [2, 2, 3], "nonsense"]}, {**tile, "image": [["0", 8], [2, 2, 3], "|u1"]},
                {**tile, "image": [[60, 8], [2, 2, 3], "|u1"]}, {**tile, "coords": [0]}):
        with open(path, "wb") as f:
            f.write(forged(json.dumps({"tiles": [bad], "failures": []}).encode()))
        with pytest.raises(PipelineError, match=r"batch-0000007-tok\.hfb: unreadable batch file"):
            partial.read_batch(d, 7, "tok")
    with open(path, "wb") as f:
        f.write(forged(b"[" * 100000 + b"]" * 100000))
    with pytest.raises(PipelineError, match=r"batch-0000007-tok\.hfb: unreadable batch file"):
        partial.read_batch(d, 7, "tok")
    with open(path, "wb") as f:
        f.write(forged(json.dumps({"tiles": [tile], "failures": []}).encode()))
    assert partial.read_batch(d, 7, "tok").tiles[0][1].coords == (0, 0)  # the forgery itself is well formed


def test_a_finished_output_of_an_older_journal_version_is_not_redone(tmp_path):
    """resume=True keeps a complete output whose run had the same settings; the journal's version (the format
    of unfinished runs' batch files) is not one of them."""
    from histoflow.engine import run as engine_run

    slide = SlideData(SVS)
    out = slide.run(pipeline(), tmp_path / "o.h5path", tile_size=512, executor="inprocess", progress=False)
    with read_h5path(out) as h:
        settings = h.provenance[-1]["run_settings"]
    assert engine_run._finished_before(out, settings)
    assert engine_run._finished_before(out, {**settings, "journal": settings["journal"] + 1})
    assert not engine_run._finished_before(out, {**settings, "batch_size": settings["batch_size"] + 1})


def test_transform_error_names_slide_tile_and_transform(tmp_path):
    slide = SlideData(SVS)
    pipe = Pipeline([Blur(3), FailAt(256, 512)])
    for executor in ("inprocess", "threads"):
        with pytest.raises(PipelineError, match=r"CMU-1-Small-Region.svs: FailAt failed on tile at \(x=256, y=512\)"
                                                r".*synthetic failure.*resume=True \(`--resume` on the command line\), "
                                                r"or pass on_error='skip' \(`histoflow run --on-error skip`\)"):
            slide.run(pipe, tmp_path / f"{executor}.h5path", executor=executor, batch_size=4, progress=False)
        assert not os.path.exists(tmp_path / f"{executor}.h5path")
        assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # no half-written file left behind
        assert os.path.isdir(tmp_path / f"{executor}.h5path.partial")  # batches 0-3 for the resume
    # nothing finished before the failure (the tile is in the first batch): no journal is left to resume from
    with pytest.raises(PipelineError, match=r"\(x=256, y=512\): ValueError: synthetic failure. Fix the cause "
                                            r"and run again, or pass on_error='skip'"):
        slide.run(pipe, tmp_path / "new" / "first.h5path", executor="inprocess", progress=False)
    assert not os.path.exists(tmp_path / "new")  # nor the folder the journal was made in


def test_transform_error_on_a_dask_cluster(tmp_path, cluster):
    from distributed import Client

    address, _ = cluster
    slide = SlideData(SVS)
    with pytest.raises(PipelineError, match=r"FailAt failed on tile at \(x=256, y=512\)"):
        slide.run(Pipeline([FailAt(256, 512)]), tmp_path / "d.h5path", scheduler=address, progress=False)

    def tasks(dask_scheduler):
        return len(dask_scheduler.tasks)

    with Client(address) as c:  # the user's own client outlives the runs
        with pytest.raises(PipelineError, match="FailAt failed"):
            slide.run(Pipeline([Blur(3), Dark(delay=0.05), FailAt(0, 0)]), tmp_path / "e.h5path", client=c,
                      batch_size=4, progress=False)
        for _ in range(100):  # the stopped run's other tasks are cancelled, its scattered data released
            if c.run_on_scheduler(tasks) == 0:
                break
            time.sleep(0.1)
        assert c.run_on_scheduler(tasks) == 0
        outs = SlideDataset([SVS, mosaic(2)]).run(pipeline(), tmp_path / "many", client=c, batch_size=32,
                                                  progress=False)
        assert [len(read_h5path(o)) for o in outs] == [108, 432]
        for _ in range(100):  # each slide's reader and pipeline leave the workers when the slide is done
            if c.run_on_scheduler(tasks) == 0:
                break
            time.sleep(0.1)
        assert c.run_on_scheduler(tasks) == 0


def test_batches_of_another_run_are_never_merged(tmp_path, monkeypatch):
    """A task of an earlier, stopped run that finishes late writes into the journal folder of the new run
    (a cluster outlives runs): its batch must not end up in the new file."""
    from histoflow.engine import partial, run
    from histoflow.engine.worker import process_batch

    monkeypatch.setattr(run, "IN_MEMORY_BATCHES", 0)  # merge every batch from its journal file
    slide = SlideData(SVS)
    out = str(tmp_path / "o.h5path")
    old = Pipeline([Blur(25), Dark(100)])

    def late_write(slide_, b, done, total):  # after batch b is journalled and before it is merged
        (d,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path) if f.endswith(".partial")]
        grid = list(enumerate(slide.grid(256)))
        process_batch(slide, old, b, grid[b * 10:(b + 1) * 10], "gzip", 4, "raise", d, None, False, "0" * 12)

    slide.run(pipeline(), out, executor="inprocess", batch_size=10, compression="gzip", progress=False,
              on_batch=late_write)
    ref = slide.run(pipeline(), tmp_path / "ref.h5path", executor="inprocess", batch_size=10, progress=False)
    assert tile_data(out) == tile_data(ref)
    assert partial.batch_path("j", 3, "abc") == os.path.join("j", "batch-0000003-abc.hfb")


class Interrupt(Exception):
    pass


def _interrupt_at(n):
    def hook(slide, b, done, total):
        if done == n:
            raise Interrupt
    return hook


def test_resume_with_the_same_settings_spelled_otherwise(tmp_path):
    slide = SlideData(SVS)
    out = tmp_path / "o.h5path"
    with pytest.raises(Interrupt):
        slide.run(pipeline(), out, executor="inprocess", tile_size=(256, 256), batch_size=10, progress=False,
                  on_batch=_interrupt_at(3))
    done_before = {int(f[6:13]) for f in os.listdir(f"{out}.partial") if f.startswith("batch-")}
    assert len(done_before) >= 3
    ran = []
    slide.run(pipeline(), out, executor="inprocess", tile_size=(256, 256), batch_size=10, resume=True,
              progress=False, on_batch=lambda s, b, d, t: ran.append(b))
    assert sorted(ran) == sorted(set(range(11)) - done_before)  # a tuple journalled is a list: same settings
    assert tile_data(out) == tile_data(slide.run(pipeline(), tmp_path / "ref.h5path", executor="inprocess",
                                                 progress=False))


def test_skipped_failures_stop_a_resume_with_on_error_raise(tmp_path):
    slide = SlideData(SVS)
    out = tmp_path / "o.h5path"
    pipe = Pipeline([Blur(3), FailAt(256, 512)])  # tile 19, batch 1
    with pytest.raises(Interrupt):
        slide.run(pipe, out, executor="inprocess", batch_size=10, on_error="skip", progress=False,
                  on_batch=_interrupt_at(3))
    seen = []  # refused before any batch is computed (it came at the final merge, after all the rest)
    with pytest.raises(PipelineError, match=r"FailAt failed on tile at \(x=256, y=512\) in the run being resumed"
                                             r".*on_error='skip' \(`--on-error skip`\)"):
        slide.run(pipe, out, executor="inprocess", batch_size=10, resume=True, progress=False,
                  on_batch=lambda s, b, done, total: seen.append(b))
    assert not os.path.exists(out) and seen == []
    slide.run(pipe, out, executor="inprocess", batch_size=10, resume=True, on_error="skip", progress=False)
    with read_h5path(out) as h5:
        assert len(h5) == 107 and len(h5.provenance[-1]["failed_tiles"]) == 1
        run_id = h5.provenance[-1]["run_id"]
    # the finished output skipped a tile: a resume that must not skip runs again and stops at it, as a fresh run
    # would, and leaves the finished output as it was
    with pytest.raises(PipelineError, match=r"FailAt failed on tile at \(x=256, y=512\)"):
        slide.run(pipe, out, executor="inprocess", batch_size=10, resume=True, progress=False)
    with read_h5path(out) as h5:
        assert len(h5) == 107 and h5.provenance[-1]["run_id"] == run_id
    slide.run(pipe, out, executor="inprocess", batch_size=10, resume=True, on_error="skip", progress=False)
    with read_h5path(out) as h5:
        assert len(h5) == 107 and len(h5.provenance[-1]["failed_tiles"]) == 1


def test_a_resume_over_finished_outputs_keeps_them(tmp_path):
    """A slide whose output had finished has no journal: resuming a cohort with such slides (the merge of a
    resumed slide's journal before its work) failed with a TypeError."""
    slide = SlideData(SVS)
    out = tmp_path / "o.h5path"
    slide.run(Pipeline([Blur(3)]), out, executor="inprocess", batch_size=10, progress=False)
    with read_h5path(out) as h5:
        n, run_id = len(h5), h5.provenance[-1]["run_id"]
    slide.run(Pipeline([Blur(3)]), out, executor="inprocess", batch_size=10, resume=True, progress=False)
    with read_h5path(out) as h5:
        assert len(h5) == n and h5.provenance[-1]["run_id"] == run_id


def test_a_transform_run_alone_reads_the_slides_masks(tmp_path):
    """A transform given to SlideData.run on its own was wrapped in a Pipeline without inputs: one that reads a
    slide mask was refused ("which no earlier step makes (masks available: none)") though the slide had it."""
    from histoflow.transforms import MorphOpen

    slide = SlideData(SVS)
    with pytest.raises(PipelineError, match=r"CMU-1-Small-Region.svs: the pipeline needs slide mask\(s\) \['tissue'\]"):
        slide.run(MorphOpen("tissue"), tmp_path / "a.h5path", executor="inprocess", progress=False)
    out = slide.run(MorphOpen("tissue"), tmp_path / "b.h5path", tissue_filter=0.5, executor="inprocess",
                    progress=False)
    with read_h5path(out) as h5:
        assert len(h5) > 10 and h5.tile(0).masks["tissue"].any()


def test_names_that_are_not_strings_fail_alike_on_every_executor(tmp_path, cluster):
    """Mask and label names are checked where tiles are encoded, so a name the writer refuses is refused on a
    cluster too (batch files would otherwise turn the key 7 into the name "7")."""
    address, _ = cluster

    class IntMaskName(Transform):
        def apply(self, tile):
            tile.masks[7] = np.zeros(tile.image.shape[:2], np.uint8)

    class IntLabelName(Transform):
        def apply(self, tile):
            tile.labels[3] = 1.5

    slide = SlideData(SVS)
    for t, what in ((IntMaskName(), "mask"), (IntLabelName(), "label")):
        for kw in ({"executor": "inprocess"}, {"scheduler": address}):
            with pytest.raises(PipelineError, match=rf"invalid {what} name (7|3)"):
                slide.run(Pipeline([t]), tmp_path / "o.h5path", tile_size=512, progress=False, **kw)
            assert not os.path.exists(tmp_path / "o.h5path")


def test_tiles_no_store_holds_are_skipped_alike_on_every_executor(tmp_path, cluster):
    """A 4-D image, a mask of another shape or a label that is an array were recorded as failed tiles in
    process (the writer refused them) but passed the worker's encoding, so a cluster run or a resume, which
    read the journal back, stopped altogether ("unreadable batch file", "ndarray is not JSON serialisable")."""
    address, _ = cluster

    class Spoil(Transform):
        def __init__(self, how):
            self.how = how

        def apply(self, tile):
            if tile.coords != (512, 0):
                return
            if self.how == "image":
                tile.image = tile.image[:, :, None, :]
            elif self.how == "mask":
                tile.masks["m"] = np.zeros(tile.image.shape, np.uint8)
            else:
                tile.labels["v"] = np.array([1.0, 2.0])

    slide = SlideData(SVS)
    for how, why in (("image", "image must be"), ("mask", "mask 'm' has shape"), ("label", "tile labels must be")):
        for kw in ({"executor": "inprocess"}, {"scheduler": address}):
            out = slide.run(Pipeline([Spoil(how)]), tmp_path / f"{how}.h5path", tile_size=512, on_error="skip",
                            progress=False, **kw)
            with read_h5path(out) as h5:
                assert len(h5) == 29 and (512, 0) not in {tuple(c) for c in h5.coords.tolist()}
                (failed,) = h5.provenance[-1]["failed_tiles"]
                assert (failed["x"], failed["y"]) == (512, 0) and why in failed["error"], failed
    # a resume reads the interrupted run's journal: the spoilt tile is not in it
    with pytest.raises(Interrupt):
        slide.run(Pipeline([Spoil("image")]), tmp_path / "r.h5path", tile_size=512, batch_size=4, on_error="skip",
                  executor="inprocess", progress=False, on_batch=_interrupt_at(3))
    out = slide.run(Pipeline([Spoil("image")]), tmp_path / "r.h5path", tile_size=512, batch_size=4, on_error="skip",
                    executor="inprocess", resume=True, progress=False)
    with read_h5path(out) as h5:
        assert len(h5) == 29 and len(h5.provenance[-1]["failed_tiles"]) == 1


def test_dataset_resume_keeps_slides_already_finished(tmp_path):
    outdir = tmp_path / "out"
    ds = SlideDataset([SVS, mosaic(2)])
    with pytest.raises(Interrupt):  # interrupted in the second slide, after the first was written
        ds.run(pipeline(), outdir, executor="inprocess", batch_size=32, progress=False, on_batch=_interrupt_at(9))
    first = outdir / "CMU-1-Small-Region.h5path"
    assert first.exists() and not (outdir / "mosaic2.h5path").exists()
    stamp = first.stat().st_mtime_ns
    ran = []
    outs = ds.run(pipeline(), outdir, executor="inprocess", batch_size=32, resume=True, progress=False,
                  on_batch=lambda s, b, d, t: ran.append(s.name))
    assert set(ran) == {"mosaic2"} and first.stat().st_mtime_ns == stamp
    assert [len(read_h5path(o)) for o in outs] == [108, 432]
    # other settings: the finished slide is not taken as done, nor replaced under resume (refused, untouched)
    ran.clear()
    with pytest.raises(PipelineError, match="CMU-1-Small-Region.h5path: exists, the result of a run with other"):
        ds.run(Pipeline([Blur(5), Dark()]), outdir, executor="inprocess", batch_size=32, resume=True,
               progress=False, on_batch=lambda s, b, d, t: ran.append(s.name))
    assert ran == [] and first.stat().st_mtime_ns == stamp


def test_outputs_that_would_lose_something_are_refused(tmp_path):
    slide = SlideData(SVS)
    link = tmp_path / "slide.svs"
    os.symlink(SVS, link)
    with pytest.raises(PipelineError, match="the output is the slide being read"):
        SlideData(link).run(None, link, executor="inprocess", progress=False)
    notes = tmp_path / "notes.txt"
    notes.write_text("results of last week")
    with pytest.raises(PipelineError, match="notes.txt: exists and is not an h5path file"):
        slide.run(None, notes, executor="inprocess", progress=False)
    assert notes.read_text() == "results of last week"
    (tmp_path / "adir").mkdir()
    with pytest.raises(PipelineError, match="adir: the output is a directory"):
        slide.run(None, tmp_path / "adir", executor="inprocess", progress=False)
    with pytest.raises(PipelineError, match="notes.txt is a file, not a directory"):
        slide.run(None, notes / "x.h5path", executor="inprocess", progress=False)
    for bad in (dict(max_in_flight=0), dict(max_in_flight=0.5), dict(tissue_filter=25)):
        with pytest.raises(PipelineError, match="max_in_flight|tissue_filter"):
            slide.run(None, tmp_path / "y.h5path", executor="inprocess", progress=False, **bad)
    assert sorted(os.listdir(tmp_path)) == ["adir", "notes.txt", "slide.svs"]  # nothing half-made left


def test_a_slide_without_tiles_gets_an_empty_file(tmp_path):
    ds = SlideDataset([SVS, mosaic(2)])
    with pytest.warns(UserWarning, match="CMU-1-Small-Region.svs: no tiles to process"):
        outs = ds.run(pipeline(), tmp_path, tile_size=3000, edge="drop", executor="inprocess", progress=False)
    with read_h5path(outs[0]) as a, read_h5path(outs[1]) as b:
        assert len(a) == 0 and a.slide["width"] == 2220 and a.provenance[-1]["tiles_written"] == 0
        assert len(b) == 1  # the 4440 x 5934 mosaic holds one 3000 px tile


class Gray(Transform):
    changes_image = True

    def apply(self, tile):
        tile.image = cv2.cvtColor(tile.image, cv2.COLOR_RGB2GRAY)[:, :, None]


class FailTopRow(Transform):
    def apply(self, tile):
        if tile.coords[1] == 0:
            raise ValueError("top row")


class VaryingMask(Transform):
    """A mask stored int32 on the first tile and uint8 (safely castable) later."""

    masks_out = ("m",)

    def apply(self, tile):
        m = (tile.image[:, :, 0] > 128).astype(np.uint8)
        tile.masks["m"] = m.astype(np.int32) * 300 if tile.coords == (0, 0) else m


def test_tiles_that_set_the_file_come_from_the_first_batch_with_tiles(tmp_path):
    slide = SlideData(SVS)
    for bs in (9, 16):  # batch 0 = the top row (all failed) with 9; half of batch 0 with 16
        out = slide.run(Pipeline([Gray(), FailTopRow()]), tmp_path / f"g{bs}.h5path", executor="inprocess",
                        batch_size=bs, on_error="skip", progress=False)
        with read_h5path(out) as h5:
            assert len(h5) == 108 - 9 and h5.tile(0).image.shape == (256, 256, 1)
    out = slide.run(Pipeline([VaryingMask()]), tmp_path / "m.h5path", executor="inprocess", batch_size=4,
                    progress=False)
    with read_h5path(out) as h5:
        assert h5.tile(0).masks["m"].max() == 300
        t = h5.tile(5)
        np.testing.assert_array_equal(t.masks["m"], (slide.read_region(t.coords, 0, (256, 256))[:, :, 0] > 128))


def test_on_error_skip_records_failed_tiles(tmp_path):
    slide = SlideData(SVS)
    out = slide.run(Pipeline([Blur(3), FailAt(256, 512)]), tmp_path / "skip.h5path", executor="threads",
                    on_error="skip", progress=False)
    with read_h5path(out) as h5:
        assert len(h5) == 108 - 1
        assert (256, 512) not in {tuple(c) for c in h5.coords.tolist()}
        failed = h5.provenance[-1]["failed_tiles"]
        assert len(failed) == 1 and failed[0]["x"] == 256 and failed[0]["y"] == 512
        assert failed[0]["transform"] == "FailAt" and "synthetic failure" in failed[0]["error"]


RESUME_SCRIPT = r"""
import os, signal, sys
sys.path[:0] = [{tests!r}, {tests_root!r}]
from test_engine import pipeline
from histoflow import SlideData
def die(slide, batch, done, total):
    if done == 7:
        os.kill(os.getpid(), signal.SIGKILL)
SlideData({slide!r}).run(pipeline(), {out!r}, executor="inprocess", batch_size=10, progress=False, on_batch=die)
"""


def test_resume_after_the_process_was_killed(tmp_path):
    slide_path = mosaic(2)
    out = str(tmp_path / "resumed.h5path")
    script = RESUME_SCRIPT.format(tests=HERE, tests_root=os.path.dirname(HERE), slide=slide_path, out=out)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert not os.path.exists(out)
    journal = os.listdir(out + ".partial")
    done_before = {int(f[6:13]) for f in journal if f.startswith("batch-") and f.endswith(".hfb")}
    assert 7 <= len(done_before) < 20  # 7 reported, plus the few already in flight
    # the half-merged file of the killed run is inside the journal, not beside the output; its lock file stays
    # (the lock itself went with the process)
    assert sorted(os.listdir(tmp_path)) == ["resumed.h5path.lock", "resumed.h5path.partial"]
    assert any(".tmp-" in f for f in journal)
    ran = []
    SlideData(slide_path).run(pipeline(), out, executor="inprocess", batch_size=10, resume=True, progress=False,
                              on_batch=lambda s, b, d, t: ran.append(b))
    assert sorted(ran) == sorted(set(range(44)) - done_before)  # only what was missing
    assert os.listdir(tmp_path) == ["resumed.h5path"]  # journal, lock file, the killed run's temporary file gone
    ref = SlideData(slide_path).run(pipeline(), tmp_path / "ref.h5path", executor="inprocess", batch_size=10,
                                    progress=False)
    assert tile_data(out) == tile_data(ref)
    with read_h5path(out) as h5:
        assert h5.provenance[-1]["resumed_batches"] == len(done_before)


def test_resume_refuses_other_settings(tmp_path):
    slide = SlideData(SVS)
    out = str(tmp_path / "x.h5path")
    os.makedirs(out + ".partial")
    with open(os.path.join(out + ".partial", "manifest.json"), "w") as f:
        json.dump({"journal": 1, "tiles": 3}, f)
    with pytest.raises(PipelineError, match="cannot resume: the unfinished run used other settings"):
        slide.run(pipeline(), out, executor="inprocess", resume=True, progress=False)


def test_many_slides_one_file_each(tmp_path):
    ds = SlideDataset([SVS, mosaic(2)])
    outs = ds.run(pipeline(), tmp_path / "out", executor="threads", workers=2, progress=False)
    assert [os.path.basename(o) for o in outs] == ["CMU-1-Small-Region.h5path", "mosaic2.h5path"]
    with read_h5path(outs[0]) as a, read_h5path(outs[1]) as b:
        assert (len(a), len(b)) == (108, 432)
        assert a.slide["name"] == "CMU-1-Small-Region" and b.slide["width"] == 4440


def test_pipeline_checked_before_any_tile(tmp_path):
    class NeedsTissue(Transform):
        masks_in = ("tissue",)

        def apply(self, tile):
            pass

    with pytest.raises(PipelineError, match=r"step 1 NeedsTissue needs mask 'tissue', which no earlier step makes"):
        Pipeline([Blur(3), NeedsTissue()])
    pipe = Pipeline([Blur(3), NeedsTissue()], inputs=["tissue"])
    slide = SlideData(SVS)
    with pytest.raises(PipelineError, match=r"needs slide mask\(s\) \['tissue'\] as inputs"):
        slide.run(pipe, tmp_path / "a.h5path", executor="inprocess", progress=False)
    slide.add_mask("tissue", np.ones((13, 10), np.uint8))
    out = slide.run(pipe, tmp_path / "b.h5path", executor="inprocess", progress=False)
    with read_h5path(out) as h5:
        assert h5.tile(0).masks["tissue"].all()


def test_memory_flat_while_running(tmp_path):
    import tracemalloc

    slide = SlideData(mosaic(2))
    tracemalloc.start()
    slide.run(pipeline(), tmp_path / "m.h5path", executor="inprocess", batch_size=8, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 40 * 1024**2, peak  # the level is 79 MB; in flight: a few batches of 8 tiles


def test_tissue_prepass_filters_tiles_and_is_stored(tmp_path):
    slide = SlideData(SVS)
    out = slide.run(Pipeline([Blur(3)], inputs=["tissue"]), tmp_path / "t.h5path", tissue_filter=0.25,
                    executor="inprocess", progress=False)
    with read_h5path(out) as h5:
        tissue = h5.masks["tissue"]
        assert 0.25 < tissue.mean() < 0.45  # CMU-1 is about a third tissue
        assert h5.mask_downsample("tissue") == pytest.approx(2220 / tissue.shape[1])
        assert 30 <= len(h5) < 108
        for t in h5:
            assert t.masks["tissue"].mean() >= 0.2  # each kept tile is at least ~25% tissue
        assert h5.provenance[-1]["tiling"]["tissue_filter"] == 0.25


def test_htj2k_run_same_pixels_smaller_file(tmp_path):
    slide = SlideData(mosaic(2))
    a = slide.run(pipeline(), tmp_path / "gzip.h5path", executor="threads", workers=2, progress=False,
                  compression="gzip")
    b = slide.run(pipeline(), tmp_path / "htj2k.h5path", executor="threads", workers=2, progress=False)
    assert os.path.getsize(b) < 0.6 * os.path.getsize(a)  # smoothed tiles: HTJ2K's prediction pays off
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:  # htj2k: the default of runs
        assert fa["tiles"].attrs["compression"] == "gzip" and fb["tiles"].attrs["compression"] == "htj2k"
    with read_h5path(a) as ha, read_h5path(b) as hb:
        for i in range(0, len(ha), 37):
            np.testing.assert_array_equal(ha.tile(i).image, hb.tile(i).image)
            np.testing.assert_array_equal(ha.tile(i).masks["dark"], hb.tile(i).masks["dark"])


SCRIPT_TRANSFORM = r"""
import numpy as np
from histoflow import SlideData, read_h5path
from histoflow.transforms import Pipeline, Transform


class Brightness(Transform):  # a user's transform in the script itself, as docs/transforms.md shows
    labels_out = ("brightness",)

    def apply(self, tile):
        tile.labels["brightness"] = float(tile.image.mean())


if __name__ == "__main__":
    out = SlideData({slide!r}).run(Pipeline([Brightness()]), {out!r}, workers=2, progress=False)
    with read_h5path(out) as h:
        print(len(h), round(float(np.mean([t.labels["brightness"] for t in h])), 3))
"""


def test_a_transform_defined_in_the_script_runs_on_a_local_cluster(tmp_path):
    """Workers import the script as __mp_main__ and unpickle its classes from __main__: one transform."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT_TRANSFORM.format(slide=SVS, out=str(tmp_path / "b.h5path")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    n, mean = r.stdout.split()
    assert int(n) == 108 and 100 < float(mean) < 255


def test_threads_share_a_plain_image_reader(tmp_path):
    """The threads executor shares one reader: a PNG's lazy decode ran in several threads at once and broke
    the Pillow image ("unrecognized data stream contents"). Now decoded once, under a lock."""
    from datafiles import data_path

    png = data_path("he_patches", "tiatoolbox_stain_target.png")
    a = SlideData(png).run(pipeline(), tmp_path / "a.h5path", tile_size=128, executor="inprocess", progress=False)
    for k in range(3):
        b = SlideData(png).run(pipeline(), tmp_path / f"b{k}.h5path", tile_size=128, executor="threads", workers=4,
                               batch_size=2, progress=False)
        assert tile_data(b) == tile_data(a)


def test_resume_refuses_other_slide_inputs(tmp_path):
    """The slide's masks and pixel size are inputs of a run: a resume with other ones is refused (it went on,
    and one file held tiles made with two different masks, or two grids)."""
    out = tmp_path / "o.h5path"
    slide = SlideData(SVS)
    small = (slide.dimensions[1] // 16, slide.dimensions[0] // 16)
    slide.add_mask("ann", np.zeros(small, np.uint8), downsample=16)
    with pytest.raises(Interrupt):
        slide.run(pipeline(), out, executor="inprocess", batch_size=10, progress=False, on_batch=_interrupt_at(3))
    other = SlideData(SVS)
    other.add_mask("ann", np.ones(small, np.uint8), downsample=16)
    with pytest.raises(PipelineError, match=r"used other settings \(inputs\)"):
        other.run(pipeline(), out, executor="inprocess", batch_size=10, resume=True, progress=False)
    same = SlideData(SVS)
    same.add_mask("ann", np.zeros(small, np.uint8), downsample=16)
    same.run(pipeline(), out, executor="inprocess", batch_size=10, resume=True, progress=False)

    out2 = tmp_path / "m.h5path"
    with pytest.raises(Interrupt):
        SlideData(SVS).run(None, out2, tile_size=256, mpp=1.0, executor="inprocess", batch_size=4,
                           progress=False, on_batch=_interrupt_at(2))
    with pytest.raises(PipelineError, match=r"used other settings \(inputs\)"):
        SlideData(SVS, mpp=0.5).run(None, out2, tile_size=256, mpp=1.0, executor="inprocess", batch_size=4,
                                    resume=True, progress=False)


def test_resumed_progress_counts_only_new_tiles_in_its_rate(tmp_path, monkeypatch):
    """Tiles already done are the bar's starting point (tqdm's ``initial``), not work done in the first
    instant: that made the rate and the ETA of a resumed run wrong."""
    import histoflow.engine.run as engine_run

    bars = []

    def fake_bar(iterable, **kw):
        import io

        from tqdm import tqdm

        bar = tqdm(iterable, total=kw["total"], file=io.StringIO(), initial=kw.get("initial", 0))
        bars.append((kw.get("initial", 0), bar))
        return bar

    monkeypatch.setattr(engine_run, "progress_bar", fake_bar)
    out = tmp_path / "o.h5path"
    with pytest.raises(Interrupt):
        SlideData(SVS).run(pipeline(), out, executor="inprocess", batch_size=10, on_batch=_interrupt_at(3))
    SlideData(SVS).run(pipeline(), out, executor="inprocess", batch_size=10, resume=True)
    initial, bar = bars[-1]
    assert initial >= 30 and bar.n == bar.total == 108 and bar.format_dict["initial"] == initial


def test_a_run_without_a_bar_does_not_import_tqdm(tmp_path):
    """A silent bar is a small object of our own: tqdm.auto imported asyncio and ssl at the start of every run,
    bar or not (~20 ms, 1-2 % of a 1,600-tile run). The silent bar counts what it is given like tqdm's."""
    code = ("import sys; from histoflow import SlideData; from histoflow.utils import progress_bar\n"
            f"SlideData({str(SVS)!r}).run(None, {str(tmp_path / 'o.h5path')!r}, executor='inprocess', progress=False)\n"
            "bar = progress_bar(range(3), total=3, disable=True, initial=2)\n"
            "seen = list(bar); bar.update(3); bar.set_postfix(loss='1'); bar.close()\n"
            "print(seen, bar.n, bar.total, 'tqdm' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[0,", "1,", "2]", "5", "3", "False"]


class BadOutputAt(Transform):
    def __init__(self, x=256, y=512, what="dtype"):
        self.x, self.y, self.what = x, y, what

    def apply(self, tile):
        if tuple(tile.coords) == (self.x, self.y):
            if self.what == "dtype":
                tile.image = tile.image.astype(np.float32)
            elif self.what == "mask":
                tile.masks["m"] = np.zeros((*tile.image.shape[:2], 2), bool)
            else:
                tile.image = None


@pytest.mark.parametrize("executor", ["inprocess", "threads"])
def test_tiles_that_cannot_be_stored_are_failures_like_any_other(tmp_path, executor):
    """A tile the pipeline left unstorable (another dtype than the file's tiles, a 3-D mask, no image) is a
    failed tile: skipped and recorded with on_error="skip" (it stopped the run), and with "raise" an error
    naming the slide, the tile and the step whose output it was."""
    slide = SlideData(SVS)
    for what in ("dtype", "mask", "none"):
        out = slide.run(Pipeline([Blur(3), BadOutputAt(what=what)]), tmp_path / f"{what}.h5path", executor=executor,
                        on_error="skip", progress=False)
        with read_h5path(out) as h:
            assert len(h) == 107
            failed = h.provenance[-1]["failed_tiles"]
        assert [(f["x"], f["y"], f["transform"]) for f in failed] == [(256, 512, "BadOutputAt output")]
        assert failed[0]["error"].startswith("cannot be stored")
        with pytest.raises(PipelineError, match=r"CMU-1-Small-Region.svs: .*BadOutputAt output.*"
                                                r"\(x=256, y=512\)|CMU-1-Small-Region.svs: .*\(x=256, y=512\).*"):
            slide.run(Pipeline([Blur(3), BadOutputAt(what=what)]), tmp_path / f"{what}-r.h5path", executor=executor,
                      progress=False)


def test_ctrl_c_stops_an_inprocess_run_at_once(tmp_path):
    """A KeyboardInterrupt inside a batch is not kept as the batch's result while the next batch runs."""
    seen = []

    class CtrlC(Transform):
        def apply(self, tile):
            seen.append(tuple(tile.coords))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        SlideData(SVS).run(Pipeline([CtrlC()]), tmp_path / "o.h5path", executor="inprocess", progress=False)
    assert len(seen) == 1


def test_output_folders_that_cannot_be_used(tmp_path):
    from histoflow.errors import OutputError

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(OutputError, match="afile: cannot use it as the output folder: it is a file"):
        SlideDataset([SVS]).run(None, afile, executor="inprocess", progress=False)
    with pytest.raises(OutputError, match="cannot write there"):
        SlideData(SVS).run(None, "/proc/no-such-folder/x.h5path", executor="inprocess", progress=False)
    with pytest.raises(PipelineError, match="tissue_filter is the fraction"):
        SlideData(SVS).run(None, tmp_path / "t.h5path", tissue_filter=True, executor="inprocess", progress=False)


def test_provenance_records_the_batch_size_used(tmp_path, monkeypatch):
    """Batches hold at most BATCH_BYTES of raw pixels (many-channel slides get fewer tiles a batch); the
    provenance's batch_size said the 32 asked for while 5 were used."""
    from histoflow.engine import run as engine_run

    monkeypatch.setattr(engine_run, "BATCH_BYTES", 5 * 256 * 256 * 3)
    out = SlideData(SVS).run(pipeline(), tmp_path / "b.h5path", executor="inprocess", batch_size=32, progress=False)
    with read_h5path(out) as h5:
        prov = h5.provenance[-1]
    assert prov["batch_size"] == 5 == prov["run_settings"]["batch_size"] and prov["batch_size_requested"] == 32


def test_a_transform_that_cannot_be_copied_is_named(tmp_path):
    """Each slide gets its own copy of the pipeline; a transform holding a lock made a bare TypeError."""
    import threading

    class Locked(Transform):
        def __init__(self):
            self.lock = threading.Lock()

        def apply(self, tile):
            pass

    with pytest.raises(PipelineError, match=r"CMU-1-Small-Region.svs: Locked cannot be copied for the slide "
                                             r"\(TypeError: .*lock"):
        SlideData(SVS).run(Pipeline([Blur(3), Locked()]), tmp_path / "o.h5path", executor="inprocess",
                           progress=False)
    assert not os.path.exists(tmp_path / "o.h5path")


def test_provenance_records_what_the_steps_fitted_to_the_slide(tmp_path):
    """The provenance held the pipeline's parameters only: the stain matrix and the tissue threshold fitted to
    the slide, which decide every tile, could not be read back."""
    from histoflow.transforms import StainNormalizationHE, TissueDetectionHE

    pipe = Pipeline([TissueDetectionHE(), StainNormalizationHE()])
    slide = SlideData(SVS)
    out = slide.run(pipe, tmp_path / "o.h5path", executor="inprocess", tile_size=512, progress=False)
    with read_h5path(out) as h5:
        fitted = h5.provenance[-1]["fitted"]
    ref = Pipeline([TissueDetectionHE(), StainNormalizationHE()])
    ref.fit_slide(slide)
    assert set(fitted) == {"0:TissueDetectionHE", "1:StainNormalizationHE"}
    assert fitted["0:TissueDetectionHE"]["slide_threshold_"] == pytest.approx(float(ref.steps[0].slide_threshold_))
    matrix, maxc = ref.steps[1].slide_stains_
    got = fitted["1:StainNormalizationHE"]["slide_stains_"]
    np.testing.assert_allclose(got[0], matrix)
    np.testing.assert_allclose(got[1], maxc)
    assert np.asarray(got[0]).shape == (2, 3)


def test_starting_over_warns_of_the_batches_it_discards(tmp_path):
    """A run without resume removes an unfinished run's journal (deliberately) and said nothing about the
    finished batches it threw away."""
    import warnings

    slide = SlideData(SVS)
    out = tmp_path / "o.h5path"
    with pytest.raises(Interrupt):
        slide.run(pipeline(), out, executor="inprocess", batch_size=10, progress=False, on_batch=_interrupt_at(3))
    n = len([f for f in os.listdir(f"{out}.partial") if f.startswith("batch-")])
    assert n >= 3
    with pytest.warns(UserWarning, match=rf"o.h5path: an unfinished run's journal .*o.h5path.partial held {n} "
                                         r"finished batch\(es\); they are discarded and the run starts over "
                                         r"\(resume=True, `--resume` on the command line, would have continued"):
        slide.run(pipeline(), out, executor="inprocess", batch_size=10, progress=False)
    with warnings.catch_warnings():  # nothing to discard: no warning
        warnings.simplefilter("error")
        slide.run(pipeline(), out, executor="inprocess", batch_size=10, progress=False)


def test_a_run_that_fails_before_writing_leaves_no_folder_it_made(tmp_path):
    """A run refused for a slide's type, or for a level it lacks, left its (new) output folder behind, empty
    (and the journal of the slides prepared before the refusal in it)."""
    from histoflow import RegionError
    from histoflow.transforms import TissueDetectionHE

    ok, refused = SlideData(SVS, name="a"), SlideData(SVS, name="b", slide_type="IF")
    with pytest.raises(PipelineError, match=r"CMU-1-Small-Region.svs: .*TissueDetectionHE.*IF"):
        SlideDataset([ok, refused]).run(Pipeline([TissueDetectionHE()]), tmp_path / "new" / "deeper",
                                        executor="inprocess", progress=False)
    assert os.listdir(tmp_path) == []
    with pytest.raises(RegionError, match=r"CMU-1-Small-Region.svs: level 3 does not exist"):
        SlideData(SVS).run(pipeline(), tmp_path / "x" / "y" / "o.h5path", level=3, executor="inprocess",
                           progress=False)
    with pytest.raises(RegionError, match="level 3 does not exist"):
        SlideDataset([SVS]).run(pipeline(), tmp_path / "out", level=3, executor="inprocess", progress=False)
    assert os.listdir(tmp_path) == []
    # folders that were there before stay, empty or not; so does a journal with batches to resume from
    (tmp_path / "kept").mkdir()
    with pytest.raises(RegionError):
        SlideDataset([SVS]).run(pipeline(), tmp_path / "kept", level=3, executor="inprocess", progress=False)
    with pytest.raises(Interrupt):
        SlideDataset([SVS]).run(pipeline(), tmp_path / "stopped", executor="inprocess", batch_size=10,
                                progress=False, on_batch=_interrupt_at(2))
    assert sorted(os.listdir(tmp_path)) == ["kept", "stopped"] and os.listdir(tmp_path / "kept") == []
    assert os.listdir(tmp_path / "stopped") == ["CMU-1-Small-Region.h5path.partial"]


def test_resume_does_not_replace_a_result_of_other_settings(tmp_path):
    """resume=True over a finished file of another pipeline or tiling re-ran it and replaced it silently; it is
    refused now, naming the file (the same settings still skip it; without resume it is replaced)."""
    from histoflow.transforms import BoxBlur

    slide = SlideData(SVS)
    out = slide.run(pipeline(), tmp_path / "o.h5path", executor="inprocess", progress=False)
    before = open(out, "rb").read()
    slide.run(pipeline(), out, executor="inprocess", progress=False, resume=True)  # the same: kept
    assert open(out, "rb").read() == before
    for kw in ({"pipeline": Pipeline([BoxBlur(3)])}, {"tile_size": 128}):
        with pytest.raises(PipelineError, match=r"o.h5path: exists, the result of a run with other settings"):
            slide.run(kw.get("pipeline", pipeline()), out, tile_size=kw.get("tile_size", 256), executor="inprocess",
                      progress=False, resume=True)
        assert open(out, "rb").read() == before
    slide.run(Pipeline([BoxBlur(3)]), out, executor="inprocess", progress=False)  # without resume: replaced
    assert open(out, "rb").read() != before


def test_resume_keeps_the_batches_of_a_journal_whose_manifest_is_damaged(tmp_path):
    """With the journal's manifest.json unreadable, `--resume` deleted the finished batches and started over,
    with a warning that it would have kept them with resume=True, which it had been given."""
    out = str(tmp_path / "d.h5path")

    class Stop(Exception):
        pass

    def stop(slide, batch, done, total):
        if done >= 3:
            raise Stop

    with pytest.raises(Stop):
        SlideData(SVS).run(pipeline(), out, executor="inprocess", batch_size=10, progress=False, on_batch=stop)
    journal = out + ".partial"
    batches = sorted(f for f in os.listdir(journal) if f.endswith(".hfb"))
    assert len(batches) >= 3
    with open(os.path.join(journal, "manifest.json"), "w") as f:
        f.write("{")
    with pytest.raises(PipelineError, match=r"cannot resume: the journal's .*manifest\.json is missing or unreadable, "
                                            rf"so its {len(batches)} finished batch\(es\) .* they are kept"):
        SlideData(SVS).run(pipeline(), out, executor="inprocess", batch_size=10, resume=True, progress=False)
    assert sorted(f for f in os.listdir(journal) if f.endswith(".hfb")) == batches
    with pytest.warns(UserWarning, match="discarded and the run starts over"):
        SlideData(SVS).run(pipeline(), out, executor="inprocess", batch_size=10, progress=False)
    assert os.listdir(tmp_path) == ["d.h5path"]


def test_a_slide_replaced_at_the_same_path_is_not_resumed(tmp_path):
    """Another file copied over the slide between the interruption and --resume: the resume went on and one store
    held tiles of two images. The slide file's size and modification time are inputs of the run now."""
    import shutil

    path = tmp_path / "s.svs"
    shutil.copy(SVS, path)
    out = tmp_path / "o.h5path"
    with pytest.raises(Interrupt):
        SlideData(path).run(pipeline(), out, executor="inprocess", batch_size=10, progress=False,
                            on_batch=_interrupt_at(3))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # the same size, a later time: another copy
    with pytest.raises(PipelineError, match=r"cannot resume: the slide file changed since"):
        SlideData(path).run(pipeline(), out, executor="inprocess", batch_size=10, resume=True, progress=False)
    assert os.path.isdir(f"{out}.partial")  # its finished batches are kept


def test_journal_damage_costs_only_the_damaged_batches(tmp_path, recwarn):
    """A damaged batch file was found only at the merge, after all the remaining work, with the advice to throw
    the whole journal away; a manifest that is JSON but not an object raised a raw TypeError; a journal whose
    removal was interrupted (manifest gone, batch files left) blocked every later run."""
    from histoflow.engine import partial

    slide = SlideData(SVS)
    out = tmp_path / "o.h5path"
    with pytest.raises(Interrupt):
        slide.run(pipeline(), out, executor="inprocess", batch_size=10, progress=False, on_batch=_interrupt_at(4))
    d = f"{out}.partial"
    names = sorted(f for f in os.listdir(d) if f.startswith("batch-"))
    with open(os.path.join(d, names[1]), "r+b") as f:  # one byte of a chunk flipped
        f.seek(-5, 2)
        b = f.read(1)
        f.seek(-5, 2)
        f.write(bytes([b[0] ^ 0xFF]))
    ran = []
    slide.run(pipeline(), out, executor="inprocess", batch_size=10, resume=True, progress=False,
              on_batch=lambda s, b, done, t: ran.append(b))
    assert int(names[1][6:13]) in ran and len(ran) == 11 - (len(names) - 1)  # only the damaged one again
    assert any("damaged" in str(w.message) for w in recwarn)
    ref = slide.run(pipeline(), tmp_path / "ref.h5path", executor="inprocess", progress=False)
    assert tile_data(out) == tile_data(ref)
    assert sorted(os.listdir(tmp_path)) == ["o.h5path", "ref.h5path"]  # journals removed, nothing left over

    out2 = tmp_path / "p.h5path"
    with pytest.raises(Interrupt):
        slide.run(pipeline(), out2, executor="inprocess", batch_size=10, progress=False, on_batch=_interrupt_at(2))
    with open(f"{out2}.partial/manifest.json", "w") as f:
        f.write("[]")
    with pytest.raises(PipelineError, match="manifest.json is missing or unreadable"):
        slide.run(pipeline(), out2, executor="inprocess", batch_size=10, resume=True, progress=False)
    slide.run(pipeline(), out2, executor="inprocess", batch_size=10, progress=False)  # starting over works
    assert tile_data(out2) == tile_data(ref)

    # a removal killed half way leaves a renamed folder, which the next run on that output deletes
    os.makedirs(f"{out2}.partial.removing-1234abcd/x")
    partial.remove(partial.start(str(tmp_path / "q.h5path"), {"a": 1}, False)[0])
    assert not os.path.exists(tmp_path / "q.h5path.partial")
    slide.run(pipeline(), out2, executor="inprocess", batch_size=10, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["o.h5path", "p.h5path", "ref.h5path"]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path):
    """Two runs on one output (two terminals, a script started twice) were not kept apart: the second, without
    resume, removed the first one's journal under it and both wrote the same file. The second is refused now,
    naming who holds the output, and the first finishes as if alone."""
    import threading

    from histoflow import OutputError

    slide, out = SlideData(SVS), tmp_path / "o.h5path"
    reference = tmp_path / "ref.h5path"
    slide.run(pipeline(), reference, executor="inprocess", batch_size=10, progress=False)
    assert not os.path.exists(f"{reference}.lock")  # a finished run leaves no lock behind
    paused, go = threading.Event(), threading.Event()

    def hold(slide_, b, done, total):
        if done == 2:
            paused.set()
            go.wait(30)

    errors = []
    first = threading.Thread(target=lambda: _catch(errors, slide.run, pipeline(), out, executor="inprocess",
                                                   batch_size=10, progress=False, on_batch=hold))
    first.start()
    try:
        assert paused.wait(30)
        journal = sorted(os.listdir(f"{out}.partial"))
        for resume in (False, True):
            with pytest.raises(OutputError, match=rf"o.h5path: another histoflow run \(process {os.getpid()} on "
                                                  r".*, since .*\) is writing this output; wait for it"):
                SlideData(SVS).run(pipeline(), out, executor="inprocess", batch_size=10, progress=False,
                                   resume=resume)
            assert sorted(os.listdir(f"{out}.partial")) == journal  # the first run's journal is untouched
    finally:
        go.set()
        first.join(60)
    assert errors == []
    assert tile_data(out) == tile_data(reference)
    assert sorted(os.listdir(tmp_path)) == ["o.h5path", "ref.h5path"]  # no journal, no lock file


def _catch(errors, f, *args, **kwargs):
    try:
        f(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001 - the test reports it
        errors.append(e)


def test_a_lock_file_left_by_a_killed_run_does_not_stop_the_next(tmp_path):
    """A run killed outright leaves its lock file (the lock itself goes with the process): the next run on that
    output takes it over and removes it; so does a run that fails."""
    out = tmp_path / "o.h5path"
    script = ("import os, sys; from histoflow.engine.partial import OutputLock; "
              "OutputLock(sys.argv[1]).acquire(); os.kill(os.getpid(), 9)")
    r = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True)
    assert r.returncode == -signal.SIGKILL and os.path.exists(f"{out}.lock")
    assert "pid" in json.loads(open(f"{out}.lock").read())
    with pytest.raises(PipelineError, match="synthetic failure"):
        SlideData(SVS).run(Pipeline([FailAt(0, 0)]), out, executor="inprocess", progress=False)
    assert os.listdir(tmp_path) == []
    SlideData(SVS).run(pipeline(), tmp_path / "new" / "o.h5path", executor="inprocess", progress=False)
    assert os.listdir(tmp_path / "new") == ["o.h5path"]


def test_one_output_for_two_slides_is_refused(tmp_path):
    from histoflow.engine.run import run_slides

    out = tmp_path / "o.h5path"
    with pytest.raises(PipelineError, match=r"o.h5path: given as the output of two slides \(.*CMU-1-Small-Region.svs "
                                            r"and .*CMU-1-Small-Region.svs\); each slide needs an output of its own"):
        run_slides([SlideData(SVS), SlideData(SVS)], [out, str(out)], pipeline(), executor="inprocess",
                   progress=False)
    assert os.listdir(tmp_path) == []


_MANY_SLIDES = """
import os, resource, sys, warnings
import numpy as np
from PIL import Image
d, soft, hard = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(d + "/in")
rng = np.random.default_rng(0)
paths = []
for i in range(150):
    paths.append(f"{{d}}/in/s{{i:03d}}.png")
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), np.uint8)).save(paths[-1])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
from histoflow import SlideDataset
from histoflow.transforms import Pipeline, BoxBlur
with warnings.catch_warnings(record=True) as said:
    warnings.simplefilter("always")
    SlideDataset(paths).run(Pipeline([BoxBlur(3)]), d + "/out", executor="inprocess", progress=False, tile_size=64)
print(sorted(os.listdir(d + "/out")) == [f"s{{i:03d}}.h5path" for i in range(150)],
      resource.getrlimit(resource.RLIMIT_NOFILE)[0], sum("lock files open" in str(w.message) for w in said))
"""


@pytest.mark.parametrize("room", ["enough", "too little"])
def test_many_outputs_are_locked_within_the_limit_on_open_files(tmp_path, room):
    """A run holds one lock file open per output until that slide is done: a SlideDataset of more slides than the
    process may open files raises its soft limit (up to the hard one), and where that is not enough, the outputs
    beyond are written unlocked, with one warning, instead of failing for "too many open files"."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard = 300 if room == "too little" else (hard if hard != resource.RLIM_INFINITY else 100_000)
    r = subprocess.run([sys.executable, "-c", _MANY_SLIDES.format(), str(tmp_path / "d"), "100", str(hard)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    done, soft, warned = r.stdout.split()
    assert done == "True"
    if hard >= 150 + 256:
        assert int(soft) >= 150 + 256 and warned == "0"  # raised: every output locked
    else:
        assert int(soft) == hard and warned == "1"  # could not be raised far enough: one warning


def test_runs_on_file_systems_without_locks_and_finished_resumes_take_none(tmp_path, monkeypatch):
    """Where flock is refused (some network mounts) a run goes on unguarded, as documented, but it left its lock
    file behind, and a failed run its folder; a resume over a finished output wrote a lock file, so it failed in a
    folder it cannot write to, where it had nothing to write."""
    import errno
    import fcntl

    from histoflow.engine import partial

    out = tmp_path / "done" / "o.h5path"
    SlideData(SVS).run(pipeline(), out, executor="inprocess", progress=False)

    def refuse(*a, **k):
        raise AssertionError("a finished output needs no lock")

    with monkeypatch.context() as m:
        m.setattr(partial.OutputLock, "acquire", refuse)
        assert SlideData(SVS).run(pipeline(), out, executor="inprocess", progress=False, resume=True) == str(out)

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    SlideData(SVS).run(pipeline(), tmp_path / "a" / "o.h5path", executor="inprocess", progress=False)
    assert os.listdir(tmp_path / "a") == ["o.h5path"]
    with pytest.raises(PipelineError, match="synthetic failure"):
        SlideData(SVS).run(Pipeline([FailAt(0, 0)]), tmp_path / "b" / "o.h5path", executor="inprocess",
                           progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a", "done"]


class FailTwo(Transform):
    """Raises on two tiles of the first batch (the engine review's case)."""

    def apply(self, tile):
        if tile.coords in ((256, 0), (0, 256)):
            raise ValueError(f"bad tile {tile.coords}")


def test_a_threads_run_failing_in_its_first_batch_leaves_nothing(tmp_path):
    """The threads executor finishes its running batches on close, and they landed in the journal after the
    failure: the run left a journal (and the folders it made) while its message said nothing was kept. What is
    kept is what the run had finished when it stopped."""
    out = tmp_path / "a" / "b" / "out.h5path"
    with pytest.raises(PipelineError, match=r"FailTwo failed on tile at .*\. Fix the cause and run again, or pass"):
        SlideData(SVS).run(Pipeline([FailTwo()]), out, executor="threads", workers=2, tile_size=256, batch_size=8,
                           progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_closed_dask_client_is_named(tmp_path):
    """A closed Client (or one whose cluster is gone) raised distributed's ClosedClientError, naming neither the
    client nor the run."""
    from distributed import Client

    client = Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None)
    client.close()
    with pytest.raises(PipelineError, match=r"the dask cluster .* takes no work: \w+Error: .*is the Client "
                                            r"closed, or its scheduler gone\?"):
        SlideData(SVS).run(pipeline(), tmp_path / "o.h5path", client=client, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_threads_run_their_own_copy_of_the_pipeline(tmp_path):
    """The threads executor shared one pipeline among its threads: a transform that keeps a tile on self while it
    works wrote other tiles' pixels (98 of 108 tiles differed from the in-process run)."""
    kw = dict(compression="gzip", progress=False, batch_size=4)
    a = SlideData(SVS).run(Pipeline([Scratch()]), tmp_path / "a.h5path", executor="inprocess", **kw)
    b = SlideData(SVS).run(Pipeline([Scratch()]), tmp_path / "b.h5path", executor="threads", workers=4, **kw)
    with read_h5path(a) as x, read_h5path(b) as y:
        assert len(x) == len(y) == 108
        assert all(np.array_equal(x.tile(i).image, y.tile(i).image) for i in range(len(x)))


def test_a_resume_refuses_a_file_the_pipeline_reads_that_changed(tmp_path):
    """The run's fingerprint held the slide file's identity but only the path of a model's weights: weights
    replaced at that path between an interrupt and resume=True gave one store tiles of two models (4 and 5 of 9),
    and a finished output was kept as done after the weights changed."""
    weights = tmp_path / "w.txt"
    weights.write_text("10")
    out = tmp_path / "o.h5path"
    kw = dict(executor="inprocess", compression="gzip", progress=False, batch_size=8)

    def stop(slide, batch, done, total):
        if done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        SlideData(SVS).run(Pipeline([AddFromFile(str(weights))]), out, on_batch=stop, **kw)
    weights.write_text("50")
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(PipelineError, match=r"cannot resume: a file the pipeline reads changed since \(.*w.txt: "
                                            r"other weights at the same path would mix"):
        SlideData(SVS).run(Pipeline([AddFromFile(str(weights))]), out, resume=True, **kw)
    done = SlideData(SVS).run(Pipeline([AddFromFile(str(weights))]), tmp_path / "done.h5path", **kw)
    weights.write_text("90")
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    with pytest.raises(PipelineError, match="the result of a run with other settings"):
        SlideData(SVS).run(Pipeline([AddFromFile(str(weights))]), done, resume=True, **kw)

#!/usr/bin/env python3
"""In-process runs of the engine as it is against the way it was before sessions 7 and 10, interleaved in one process:

- ``wait_disk`` (session 6): at the end of a batch the calling thread waits for the helper thread to finish
  encoding; the driver merges each batch by reading it back from the journal
- ``shared_disk`` (session 7, first step): the calling thread encodes the tiles the helper has not started
  instead of waiting
- ``shared_memory`` (sessions 7-9): the same, and batches are merged from memory (the journal is still written)
- ``overlap`` (now, since session 10): the same, and a batch is finished (its encodings collected, journalled)
  only after the next one is submitted, two batches in flight, oldest first

The first three run the executor as it was before session 10 (``InProcessExecutor`` with ``defer = False``:
each batch finished at its submission; no ``max_in_flight`` of its own, so the run's ``2 * workers + 2``; every
pending batch taken at once), so that ``wait_disk`` is the session-6 engine in these respects (the rest of the
engine is today's). ``speedup_now_vs_session6`` is ``overlap`` / ``wait_disk``; ``speedup_session9_vs_session6``
``shared_memory`` / ``wait_disk`` (the step that session 7 measured).

BoxBlur(15) + TissueDetectionHE, 256 px tiles, HTJ2K, on the 4x mosaic; prints one JSON line with the
tiles/s of every run and the medians.

    python bench/inprocess_variants.py [--n 4] [--repeat 6]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from read_tiles import mosaic  # noqa: E402


def main():
    import histoflow
    from histoflow.engine import run as engine_run
    from histoflow.engine import worker
    from histoflow.engine.executors import InProcessExecutor
    from histoflow.transforms import BoxBlur, Pipeline, TissueDetectionHE

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=6)
    args = ap.parse_args()

    def wait_for_helper(tiles, compression, level, failures=None, label="store"):  # every encoding awaited
        return [(i, e[0].result() if isinstance(e, tuple) else e) for i, e in tiles]

    class BeforeSession10(InProcessExecutor):
        """The in-process executor before session 10: each batch finished at its submission."""
        defer = False
        max_in_flight = None

        def wait_any(self, pending):
            return set(pending)

    # mode: (how a batch's encodings are collected, batches merged from memory, the executor's class)
    modes = {"wait_disk": (wait_for_helper, 0, BeforeSession10),
             "shared_disk": (worker._collect, 0, BeforeSession10),
             "shared_memory": (worker._collect, engine_run.IN_MEMORY_BATCHES, BeforeSession10),
             "overlap": (worker._collect, engine_run.IN_MEMORY_BATCHES, InProcessExecutor)}
    now = worker._collect, engine_run.IN_MEMORY_BATCHES
    pipe = Pipeline([BoxBlur(15), TissueDetectionHE()])
    slide = histoflow.SlideData(mosaic(args.n))
    n = len(slide.grid(256))
    runs = {k: [] for k in modes}
    with tempfile.TemporaryDirectory() as tmp:
        slide.run(pipe, os.path.join(tmp, "warm.h5path"), executor="inprocess", progress=False)
        for r in range(args.repeat):
            for name, (collect, in_memory, executor) in modes.items():
                worker._collect, engine_run.IN_MEMORY_BATCHES = collect, in_memory
                out = os.path.join(tmp, f"{name}{r}.h5path")
                ex = executor()
                try:
                    t0 = time.perf_counter()
                    slide.run(pipe, out, executor=ex, progress=False)
                    runs[name].append(round(n / (time.perf_counter() - t0), 1))
                finally:
                    ex.close()  # an executor object is the caller's to close (the run closes only those it makes)
                os.remove(out)
    worker._collect, engine_run.IN_MEMORY_BATCHES = now
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(json.dumps({"bench": "inprocess_variants", "slide": f"mosaic{args.n}", "tiles": n, "compression": "htj2k",
                      **{f"tiles_per_s_{k}": v for k, v in med.items()},
                      "speedup_now_vs_session6": round(med["overlap"] / med["wait_disk"], 2),
                      "speedup_session9_vs_session6": round(med["shared_memory"] / med["wait_disk"], 2),
                      "runs": runs}))


if __name__ == "__main__":
    sys.exit(main())

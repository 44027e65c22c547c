#!/usr/bin/env python3
"""Pipeline throughput: BoxBlur(15) + TissueDetectionHE on every 256x256 tile of mosaic slides.

Measures, each in a fresh child process so that peak RSS is that run's own:

- ``tiles_per_s_inprocess``: ``SlideData.run(..., executor="inprocess")`` on the 4x mosaic, and
  ``tiles_per_s_inprocess_8x`` / ``tiles_per_s_dask2_8x`` on the 8x mosaic
- ``tiles_per_s_inprocess1``: in-process in one thread (``InProcessExecutor(encode_thread=False)``; the default
  in-process run compresses on a helper thread, ~1.9 cores busy, where PathML's ``distributed=False`` uses one);
  ``tiles_per_s_inprocesspm`` / ``tiles_per_s_inprocess1pm``: the same two with ``TissueDetectionHE`` at PathML's
  recipe (HSV saturation at full resolution, each tile's own Otsu threshold; ours default to grey at 1/3
  resolution with the slide's Otsu threshold, much cheaper and nearer the truth: ``bench/tissue_agreement.py``);
  ``cpu_ms_per_tile_inprocess`` / ``pathml_cpu_ms_per_tile``: CPU time (all threads) per tile of the in-process
  runs, and ``cpu_per_tile_pathml_over_inprocess`` their ratio
- ``tiles_per_s_threads2``: the same with the threads executor, 2 threads in one process
- ``tiles_per_s_dask1`` / ``tiles_per_s_dask2``: the same on a local dask cluster of 1 / 2 worker
  processes, warmed by a run on the small sample slide with the same settings (cluster start-up, the
  workers' first imports and first codec use not counted; scatter, journal and merge counted)
- ``output_mb``: size of the h5path written for the 4x mosaic. All of the above use the runs' default
  compression (HTJ2K); ``output_mb_gzip``, ``tiles_per_s_inprocess_gzip``, ``tiles_per_s_dask1_gzip`` and
  ``tiles_per_s_dask2_gzip`` are the same with ``compression="gzip"``
- ``tiles_per_s_raw1`` / ``tiles_per_s_raw2`` and ``raw2_over_raw1``: the raw limit: the same reading,
  transforms (``TissueDetectionHE`` fitted to the slide first, as runs do) and HTJ2K encoding of every tile in
  plain loops in 1 / 2 spawned processes, no engine, no output; ``raw2_over_raw1`` is the most
  ``dask2_over_dask1`` could be on this machine
- ``peak_rss_mb_4x`` / ``peak_rss_mb_16x``: peak RSS of in-process runs on the 4x and 16x mosaics
  (memory must stay flat with slide size)
- ``pathml_tiles_per_s`` / ``pathml_output_mb`` / ``pathml_tiles_per_s_dask2``: PathML 3.0.8 on the same
  slide and pipeline (``HESlide.run(..., distributed=False)`` + ``write``; and ``distributed=True`` on a
  warmed local cluster of 2 single-thread workers; ``tile_pad=True``, so that PathML runs the same 1645 tiles,
  ``pathml_tiles``), interleaved with our runs when ``--repeat`` > 1, when
  PathML can be run: importable here, or in the Python given by ``--pathml-python`` (a side environment,
  since PathML pins its own torch and numpy < 2: ``bench/pathml_venv.sh`` makes one). Null otherwise; the
  issue's figures (67 / 39 tiles/s, 320 MB), measured on this machine on another day on the 4x mosaic with
  PathML's default ``tile_pad=False`` (1,564 tiles, edge tiles dropped, against our 1,645), are given under
  ``pathml_reference`` and used for the ratios then, with ``--n 4`` only (for another mosaic the reference,
  the ratios to it and ``output_fraction_of_pathml*`` are null)
- ``speedup_vs_pathml_MODE``: with PathML measured in the same rounds, the median of each round's ratio (each
  round's under ``..._runs``), as ``dask2_over_dask1``; against the reference, the ratio to it. (Until session
  22 the side-by-side figures were the ratio of the two medians.)
- ``demo_tiles_per_s``: the full demo pipeline (tissue pre-pass, stain normalisation, nucleus detection)
  in-process on the 4x mosaic's tissue tiles, overlapping by a large nucleus as in `histoflow demo`

Prints one JSON line.

    python bench/pipeline.py [--n 4] [--mid 8] [--big 16] [--skip-big] [--repeat 5] [--pathml-python PY]
    python bench/pipeline.py --compressions [--modes inprocess-gzip,dask2-htj2k,raw1,raw2] [--repeat 5]   # chosen runs only

With ``--repeat N`` the in-process, one-thread, PathML-recipe, dask, raw and PathML runs on the first mosaic
are made N times, interleaved, and reported as medians (every run under ``..._runs``): this machine's speed
drifts by up to a third between runs, so one run of each says little about a 1.7x ratio. The others are one
run each whatever ``--repeat`` is: ``tiles_per_s_threads2``, the gzip runs (``..._gzip``,
``dask2_over_dask1_gzip``: the ratio of one run each), the second and big mosaics and the demo pipeline.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from read_tiles import mosaic, peak_rss_mb  # noqa: E402

#: the issue's PathML figures: the 4x mosaic only, and without tile_pad (edge tiles dropped: 1,564 tiles, ours 1,645)
PATHML_REFERENCE = {"tiles_per_s_inprocess": 67, "tiles_per_s_dask2": 39, "output_mb_4x": 320, "slide": "mosaic4",
                    "tiles": 1564, "tile_pad": False,
                    "source": "measured on this machine before the pipelines issue (issue text), on another day, "
                              "with PathML's default tile_pad=False (1,564 tiles; ours pad the edge tiles: 1,645)"}


def pathml_child(mode, slide, out):
    """PathML 3.0.8's run of the same pipeline; imports nothing of histoflow (it may run in PathML's own
    environment)."""
    from pathml.core import HESlide
    from pathml.preprocessing import BoxBlur as PBoxBlur
    from pathml.preprocessing import Pipeline as PPipeline
    from pathml.preprocessing import TissueDetectionHE as PTissue

    pipe = PPipeline([PBoxBlur(kernel_size=15), PTissue(mask_name="tissue")])
    cpu = None
    # tile_pad=True: PathML pads the edge tiles as histoflow does (its default drops them: 1564 tiles of the 4x
    # mosaic instead of 1645); the slide has no slide-level masks, which PathML's padding cannot take
    if mode == "pathml":
        ps = HESlide(slide, backend="openslide")
        t0, c0 = time.perf_counter(), time.process_time()
        ps.run(pipe, distributed=False, tile_size=256, tile_pad=True)
        ps.write(out)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    else:  # pathml-dask2: the cluster started and warmed first, as for our dask runs
        from dask.distributed import Client, LocalCluster

        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None, silence_logs=40) as cluster, \
                Client(cluster) as client:
            client.wait_for_workers(2)
            warm = os.path.join(os.path.dirname(out), "warm")
            os.makedirs(warm, exist_ok=True)
            w = HESlide(os.path.join(HERE, "..", "src", "histoflow", "data", "CMU-1-Small-Region.svs"),
                        backend="openslide")
            w.run(pipe, distributed=True, client=client, tile_size=256, tile_pad=True)
            ps = HESlide(slide, backend="openslide")
            t0 = time.perf_counter()
            ps.run(pipe, distributed=True, client=client, tile_size=256, tile_pad=True)
            ps.write(out)
            dt = time.perf_counter() - t0
    n = len(ps.tiles)
    print(json.dumps({"tiles": n, "seconds": dt, "tiles_per_s": n / dt, "peak_rss_mb": peak_rss_mb(),
                      "output_mb": os.path.getsize(out) / 1e6, "cpu_s": cpu}))


def child(mode, slide, out):
    if mode.startswith("pathml"):
        return pathml_child(mode, slide, out)
    compression = "htj2k"  # the default of runs
    if "-" in mode:
        mode, compression = mode.split("-", 1)
    import histoflow
    from histoflow.transforms import BoxBlur, Pipeline, TissueDetectionHE

    # "...pm": TissueDetectionHE at PathML's recipe (HSV saturation at full resolution, each tile's own Otsu
    # threshold) instead of our defaults (grey at 1/3 resolution, the slide's Otsu threshold: ~0.3 instead of
    # ~1.7-2.0 ms of CPU a tile, more than PathML's own step takes, and closer to the truth, see
    # bench/tissue_agreement.py and docs/benchmarks.md)
    pm = mode.endswith("pm")
    mode = mode[:-2] if pm else mode
    tissue = (TissueDetectionHE(use_saturation=True, working_downsample=1, otsu="tile") if pm
              else TissueDetectionHE())
    pipe = Pipeline([BoxBlur(15), tissue])
    s = histoflow.SlideData(slide)
    n = len(s.grid(256))
    cpu = None
    if mode in ("inprocess", "inprocess1"):  # inprocess1: one thread (no helper thread compressing), as PathML's
        from histoflow.engine.executors import InProcessExecutor

        ex = InProcessExecutor(encode_thread=mode == "inprocess")
        t0, c0 = time.perf_counter(), time.process_time()
        s.run(pipe, out, executor=ex, progress=False, compression=compression)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    elif mode == "threads2":
        t0 = time.perf_counter()
        s.run(pipe, out, executor="threads", workers=2, progress=False, compression=compression)
        dt = time.perf_counter() - t0
    elif mode.startswith("dask"):
        from distributed import Client, LocalCluster

        workers = int(mode[4:])
        import dask
        from histoflow.engine.executors import WORKER_ENV

        with dask.config.set(WORKER_ENV), LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None,
                                                       silence_logs=40) as cluster, Client(cluster) as client:
            client.wait_for_workers(workers)
            # warm the workers (imports, first OpenCV calls) on the small sample slide: steady-state rate
            from histoflow.data import sample_slide_path

            histoflow.SlideData(sample_slide_path()).run(pipe, out + ".warm.h5path", client=client, progress=False,
                                                         compression=compression)
            t0 = time.perf_counter()
            s.run(pipe, out, client=client, progress=False, compression=compression)
            dt = time.perf_counter() - t0
    elif mode.startswith("raw"):  # the raw limit: the same per-tile work in plain loops, no engine, no output
        if pm:
            raise SystemExit(f"{mode}pm: the raw loops run TissueDetectionHE at our defaults only")
        dt = raw_loops(slide, compression, int(mode[3:]))
        open(out, "wb").close()
    elif mode == "demo":
        from histoflow.cli import demo_pipeline

        pipe = demo_pipeline()
        overlap = pipe.overlap_needed_by(float(s.mpp[0]) if s.mpp else None)[0]   # as `histoflow demo` tiles
        t0 = time.perf_counter()
        s.run(pipe, out, executor="inprocess", overlap=overlap, tissue_filter=0.25, progress=False)
        dt = time.perf_counter() - t0
        with histoflow.read_h5path(out) as h5:
            n = len(h5)
    else:
        raise SystemExit(f"unknown mode {mode}")
    rss = peak_rss_mb()
    print(json.dumps({"tiles": n, "seconds": dt, "tiles_per_s": n / dt, "peak_rss_mb": rss,
                      "output_mb": os.path.getsize(out) / 1e6, "cpu_s": cpu}))


#: the slide and fitted pipeline of raw_loop, kept in each loop's process between its warm-up and timed calls
_RAW: dict = {}


def raw_loop(path, part, procs, compression, warm=0):
    """One plain loop over every ``procs``-th tile from ``part``: read, BoxBlur(15) + TissueDetectionHE, encode
    (at the runs' default compression level, 2). ``warm`` > 0: only the first ``warm`` tiles, untimed."""
    import cv2
    import histoflow
    from histoflow.store.h5path import encode_tile
    from histoflow.transforms import BoxBlur, Pipeline, TissueDetectionHE

    cv2.setNumThreads(1)
    if _RAW.get("path") != path:  # made and fitted once per process, by the untimed warm-up when it ran here
        s, pipe = histoflow.SlideData(path), Pipeline([BoxBlur(15), TissueDetectionHE()])
        pipe.fit_slide(s)  # the slide-wide tissue threshold, as runs fit it before the first tile
        _RAW.update(path=path, slide=s, pipe=pipe)
    s, pipe = _RAW["slide"], _RAW["pipe"]
    specs = list(s.grid(256))
    for spec in specs[:warm]:  # first codec and OpenCV calls out of the timing, as the dask runs are warmed
        t = s.read_tile(spec)
        pipe.apply(t)
        encode_tile(t, compression, 2)
    if warm:
        time.sleep(0.5)  # holds this process, so that the other warm-up runs on the other one
        return
    for spec in specs[part::procs]:
        t = s.read_tile(spec)
        pipe.apply(t)
        encode_tile(t, compression, 2)


def raw_loops(path, compression, procs):
    """The per-tile work alone in ``procs`` spawned processes (tiles dealt round-robin), each a plain loop with one
    OpenCV thread, started and warmed before the clock starts: what the machine does without the engine. Its 2 / 1
    ratio is the ceiling of dask 2 / dask 1 here (the loops share the cores, caches and memory, nothing else).
    Returns the seconds from the loops' start to the last one's end."""
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
        for f in [pool.submit(raw_loop, path, i, procs, compression, 20) for i in range(procs)]:
            f.result()
        t0 = time.perf_counter()
        for f in [pool.submit(raw_loop, path, i, procs, compression) for i in range(procs)]:
            f.result()
        return time.perf_counter() - t0


#: the Python that runs PathML's children (``--pathml-python``); ours otherwise
PATHML_PYTHON = [sys.executable]


def measure(mode, slide):
    python = PATHML_PYTHON[0] if mode.startswith("pathml") else sys.executable
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.h5path")
        r = subprocess.run([python, __file__, "--child", mode, slide, out], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{mode} on {slide} failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def measure_rounds(modes, slide, repeat):
    """Each mode ``repeat`` times, interleaved (round 1 of every mode, then round 2, ...), so that a slow
    spell of the machine falls on every mode alike. Returns {mode: [result, ...]}."""
    runs = {m: [] for m in modes}
    for _ in range(repeat):
        for m in modes:
            runs[m].append(measure(m, slide))
    return runs


def _median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def summarise(out, key, results):
    """``tiles_per_s_KEY`` = the median over the runs; ``tiles_per_s_KEY_runs`` = every run (when more than one)."""
    rates = [r["tiles_per_s"] for r in results]
    out[f"tiles_per_s_{key}"] = round(_median(rates), 1)
    if len(rates) > 1:
        out[f"tiles_per_s_{key}_runs"] = [round(x, 1) for x in rates]
    return rates


def summarise_ratio(out, key, slow, fast):
    """``KEY`` = the median of each round's ratio fast / slow; ``KEY_runs`` = every round's (when more than one)."""
    ratios = [b["tiles_per_s"] / a["tiles_per_s"] for a, b in zip(slow, fast)]
    out[key] = round(_median(ratios), 2)
    if len(ratios) > 1:
        out[f"{key}_runs"] = [round(x, 2) for x in ratios]


def pathml_available(python) -> bool:
    """Whether PathML imports in ``python`` (or in this Python when None)."""
    r = subprocess.run([python or sys.executable, "-c", "import pathml.core, pathml.preprocessing"],
                       capture_output=True, text=True)
    if r.returncode != 0 and python:
        raise SystemExit(f"--pathml-python {python}: PathML does not import there:\n{r.stderr[-2000:]}")
    return r.returncode == 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--mid", type=int, default=8, help="second mosaic for throughput (0 to skip)")
    p.add_argument("--big", type=int, default=16)
    p.add_argument("--skip-big", action="store_true")
    p.add_argument("--compressions", action="store_true",
                   help="only the runs of --modes on the first mosaic")
    p.add_argument("--modes", default="inprocess-htj2k,inprocess-gzip,dask2-htj2k,dask2-gzip",
                   help="with --compressions: the runs, MODE[-COMPRESSION] (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each in-process / dask measurement on the first mosaic, interleaved; the "
                        "figures are medians, ratios the median of each round's ratio (default: %(default)s)")
    p.add_argument("--pathml-python", default=os.environ.get("PATHML_PYTHON"),
                   help="a Python with PathML 3.0.8 installed (e.g. bench/.cache/pathml-venv/bin/python, made by "
                        "bench/pathml_venv.sh; default: $PATHML_PYTHON, else this Python when it has PathML)")
    p.add_argument("--no-pathml", action="store_true", help="do not run PathML even when it is available")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.pathml_python:
        PATHML_PYTHON[0] = args.pathml_python
    if args.child:
        child(*args.child)
        return
    ref = PATHML_REFERENCE if args.n == 4 else None  # measured on the 4x mosaic: no reference for another
    if args.compressions:
        slide = mosaic(args.n)
        out = {"bench": "pipeline-compressions", "slide": f"mosaic{args.n}", "pathml_reference": ref,
               "repeat": args.repeat}
        modes = args.modes.split(",")
        runs = measure_rounds(modes, slide, args.repeat)
        for mode in modes:
            key = mode.replace("-", "_")
            summarise(out, key, runs[mode])
            if not mode.startswith("raw"):  # the raw loops write no output
                out[f"output_mb_{key}"] = round(runs[mode][0]["output_mb"], 1)
        for comp in ("", "-gzip", "-htj2k"):
            for kind in ("dask", "raw"):
                if f"{kind}1{comp}" in runs and f"{kind}2{comp}" in runs:
                    summarise_ratio(out, f"{kind}2_over_{kind}1" + comp.replace("-", "_"), runs[f"{kind}1{comp}"],
                                    runs[f"{kind}2{comp}"])
        print(json.dumps(out))
        return
    slide = mosaic(args.n)
    out = {"bench": "pipeline", "pipeline": "BoxBlur(15) + TissueDetectionHE", "tile": 256,
           "slide": f"mosaic{args.n}"}
    out["repeat"] = args.repeat
    pathml = not args.no_pathml and pathml_available(args.pathml_python)
    modes = ["inprocess", "inprocess1", "inprocesspm", "inprocess1pm", "dask1", "dask2", "raw1", "raw2"] + \
        (["pathml", "pathml-dask2"] if pathml else [])
    runs = measure_rounds(modes, slide, args.repeat)
    ip = runs["inprocess"][0]
    out["tiles"] = ip["tiles"]
    summarise(out, "inprocess", runs["inprocess"])
    out["output_mb"] = round(ip["output_mb"], 1)
    out["peak_rss_mb_4x" if args.n == 4 else f"peak_rss_mb_{args.n}x"] = round(max(r["peak_rss_mb"] for r in runs["inprocess"]), 1)
    for m in ("inprocess1", "inprocesspm", "inprocess1pm"):
        summarise(out, m, runs[m])
    out["cpu_ms_per_tile_inprocess"] = round(1000 * _median([r["cpu_s"] / r["tiles"] for r in runs["inprocess"]]), 3)
    out["tiles_per_s_threads2"] = round(measure("threads2", slide)["tiles_per_s"], 1)
    for w in (1, 2):
        summarise(out, f"dask{w}", runs[f"dask{w}"])
    summarise_ratio(out, "dask2_over_dask1", runs["dask1"], runs["dask2"])
    for w in (1, 2):
        summarise(out, f"raw{w}", runs[f"raw{w}"])
    summarise_ratio(out, "raw2_over_raw1", runs["raw1"], runs["raw2"])
    gz = measure("inprocess-gzip", slide)
    out["output_mb_gzip"] = round(gz["output_mb"], 1)
    out["tiles_per_s_inprocess_gzip"] = round(gz["tiles_per_s"], 1)
    for w in (1, 2):
        out[f"tiles_per_s_dask{w}_gzip"] = round(measure(f"dask{w}-gzip", slide)["tiles_per_s"], 1)
    out["dask2_over_dask1_gzip"] = round(out["tiles_per_s_dask2_gzip"] / out["tiles_per_s_dask1_gzip"], 2)
    if pathml:
        summarise(out, "pathml", runs["pathml"])
        out["pathml_tiles_per_s"] = out.pop("tiles_per_s_pathml")
        if "tiles_per_s_pathml_runs" in out:
            out["pathml_tiles_per_s_runs"] = out.pop("tiles_per_s_pathml_runs")
        summarise(out, "pathml_dask2", runs["pathml-dask2"])
        out["pathml_tiles_per_s_dask2"] = out.pop("tiles_per_s_pathml_dask2")
        if "tiles_per_s_pathml_dask2_runs" in out:
            out["pathml_tiles_per_s_dask2_runs"] = out.pop("tiles_per_s_pathml_dask2_runs")
        out["pathml_output_mb"] = round(runs["pathml"][0]["output_mb"], 1)
        out["pathml_tiles"] = runs["pathml"][0]["tiles"]
        out["pathml_cpu_ms_per_tile"] = round(1000 * _median([r["cpu_s"] / r["tiles"] for r in runs["pathml"]]), 3)
        out["cpu_per_tile_pathml_over_inprocess"] = round(out["pathml_cpu_ms_per_tile"] /
                                                          out["cpu_ms_per_tile_inprocess"], 1)
        out["pathml_peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in runs["pathml"]), 1)
    else:
        out["pathml_tiles_per_s"] = out["pathml_tiles_per_s_dask2"] = out["pathml_output_mb"] = None
    # PathML measured in these rounds, else the figures (the 4x mosaic only), else no ratio
    base_ip = out["pathml_tiles_per_s"] or (ref and ref["tiles_per_s_inprocess"])
    base_d2 = out["pathml_tiles_per_s_dask2"] or (ref and ref["tiles_per_s_dask2"])
    base_mb = out["pathml_output_mb"] or (ref and ref["output_mb_4x"])

    def ratio(a, b, digits):
        return round(a / b, digits) if b else None

    def speedup(m, peer, base):
        """Measured side by side: the median of each round's ratio (as dask2_over_dask1), each round's in
        ``..._runs``; else against the issue's reference figure."""
        key = f"speedup_vs_pathml_{m}"
        if pathml:
            r = [a["tiles_per_s"] / b["tiles_per_s"] for a, b in zip(runs[m], runs[peer])]
            out[key] = round(_median(r), 1)
            if len(r) > 1:
                out[f"{key}_runs"] = [round(x, 2) for x in r]
        else:
            out[key] = ratio(out[f"tiles_per_s_{m}"], base, 1)

    for m in ("inprocess", "inprocess1", "inprocesspm", "inprocess1pm"):
        speedup(m, "pathml", base_ip)
    speedup("dask2", "pathml-dask2", base_d2)
    out["speedup_vs_pathml_inprocess_gzip"] = ratio(out["tiles_per_s_inprocess_gzip"], base_ip, 1)
    out["speedup_vs_pathml_dask2_gzip"] = ratio(out["tiles_per_s_dask2_gzip"], base_d2, 1)
    out["output_fraction_of_pathml"] = ratio(out["output_mb"], base_mb, 3)
    out["output_fraction_of_pathml_gzip"] = ratio(out["output_mb_gzip"], base_mb, 3)
    out["pathml_reference"] = ref
    out["pathml_measured"] = pathml
    if args.mid:
        mid = mosaic(args.mid)
        r = measure("inprocess", mid)
        out[f"tiles_{args.mid}x"] = r["tiles"]
        out[f"tiles_per_s_inprocess_{args.mid}x"] = round(r["tiles_per_s"], 1)
        out[f"peak_rss_mb_{args.mid}x"] = round(r["peak_rss_mb"], 1)
        out[f"tiles_per_s_dask2_{args.mid}x"] = round(measure("dask2", mid)["tiles_per_s"], 1)
    if not args.skip_big:
        big = measure("inprocess", mosaic(args.big))
        out[f"peak_rss_mb_{args.big}x"] = round(big["peak_rss_mb"], 1)
        out[f"tiles_{args.big}x"] = big["tiles"]
        out[f"tiles_per_s_inprocess_{args.big}x"] = round(big["tiles_per_s"], 1)
    demo = measure("demo", slide)
    out["demo_tiles_per_s"] = round(demo["tiles_per_s"], 1)
    out["demo_tiles"] = demo["tiles"]
    out["machine"] = f"{os.cpu_count()} cpu"
    print(json.dumps(out))


if __name__ == "__main__":
    main()

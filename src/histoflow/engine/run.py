"""Running a pipeline over slides: the same code in-process, on threads or on a dask cluster.

The driver prepares each slide (tissue pre-pass, slide-level fitting such as stain matrices, the tile
grid), cuts the grid into batches and keeps a bounded number of batches in flight (backpressure:
memory stays flat whatever the slide size). Workers read their own tiles, apply the pipeline and
compress the results (:mod:`histoflow.engine.worker`); the driver journals each finished batch to disk
(:mod:`histoflow.engine.partial`, which makes runs resumable) and, when a slide is complete, copies the
batches in grid order into its h5path file through one writer. The tile data does not depend on the
executor or on the order in which batches finish.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import platform
import time
import uuid
import warnings
import zlib
from collections import deque

import numpy as np

from ..errors import H5PathError, OutputError, PipelineError
from ..io.sniff import is_dicom_file
from ..store import H5PathWriter
from ..transforms.base import Pipeline, Transform
from ..utils import missing_folders, progress_bar, same_file
from . import partial
from .executors import make_executor
from .worker import BatchResult, Failure, _store_label, process_batch

TISSUE_MASK = "tissue"


class _Job:
    """One slide of a run."""

    def __init__(self, slide, out_path):
        self.slide = slide
        self.out = os.fspath(out_path)
        self.batches: list = []
        self.done: set = set()
        self.dir = None
        self.pipeline = None
        self.manifest = None
        self.shared = None
        self.resumed = 0
        self.finished = False
        self.writer = None  # the h5path being filled in grid order
        self.next_merge = 0
        self.merged = 0
        self.failures: list = []
        self.in_memory: dict = {}  # batch -> journalled result kept in memory until its merge
        self.token = None  # names this journal's batch files: batches of another run are never merged
        self.on_error = "raise"
        self.overwrite = False  # with resume: outputs and journals of other settings are replaced
        self.already_done = False  # resume=True found the output complete with the same settings
        self.made_journal = False  # this run made the journal (not one it resumes)
        self.made_folders: list = []  # folders above the output that did not exist before the run
        self.lock = None  # the run's hold on the output (partial.OutputLock)
        self.nothing_kept = False  # the run stopped on an error whose message said no batch was kept

    @property
    def n_tiles(self):
        return sum(len(b) for b in self.batches)


def tissue_prepass(slide, max_size=2048, **kwargs):
    """Detect tissue on a low-resolution view of the slide and store it as the slide mask "tissue".

    The view is the slide's thumbnail with its longer side ``max_size`` (about 1.25x magnification for
    a 40x slide of 100k px). Returns the mask (uint8 0/1) and its downsample.
    """
    from ..transforms.tissue import detect_tissue

    if not slide.slide_type.brightfield:  # before its thumbnail (every channel of a multiplex slide)
        raise PipelineError(f"{slide.path}: the tissue pre-pass detects H&E-like tissue; for a "
                            f"{slide.slide_type.name} slide give a slide mask named 'tissue' instead")
    thumb = slide.thumbnail(max_size)
    mask = detect_tissue(thumb[:, :, :3], **kwargs).astype("uint8")
    downsample = slide.dimensions[0] / mask.shape[1]
    slide.add_mask(TISSUE_MASK, mask, downsample)
    return mask, downsample


#: most bytes of raw tile pixels in one batch (see _prepare)
BATCH_BYTES = 64 * 2**20
#: most finished batches per slide held in memory until their turn to be merged (the rest are read back
#: from the journal)
IN_MEMORY_BATCHES = 8


def run_slides(slides, outputs, pipeline: Transform | None, *, tile_size=256, overlap=0, stride=None, level=None,
               mpp=None, edge="pad", tissue_filter=None, executor="dask", workers=None, scheduler=None,
               client=None, batch_size=32, max_in_flight=None, on_error="raise", resume=False, progress=True,
               compression="htj2k", compression_level=2, on_batch=None, overwrite=False) -> list[str]:
    """Run ``pipeline`` on every tile of every slide; write one h5path per slide. See :meth:`SlideData.run`.

    Returns the output paths, in the order of ``slides``.
    """
    if on_error not in ("raise", "skip"):
        raise PipelineError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if compression not in ("gzip", "htj2k", None):
        raise PipelineError(f"pipeline runs store tiles with 'gzip', 'htj2k' or None compression, not {compression!r}")
    if pipeline is not None and not isinstance(pipeline, Transform):
        raise PipelineError(f"pipeline must be a Transform or Pipeline, got {type(pipeline).__name__}")
    if pipeline is not None and not isinstance(pipeline, Pipeline):
        # run alone, the masks a transform reads can only be the slide's (checked against each slide below)
        pipeline = Pipeline([pipeline], inputs=list(dict.fromkeys(pipeline.masks_in)))
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise PipelineError(f"batch_size must be a whole number of tiles >= 1, got {batch_size!r}")
    batch_size = int(batch_size)
    if max_in_flight is not None and not (isinstance(max_in_flight, int) and max_in_flight >= 1):
        raise PipelineError(f"max_in_flight must be a whole number of batches >= 1, got {max_in_flight!r}")
    if tissue_filter is not None and (isinstance(tissue_filter, bool) or
                                      not (isinstance(tissue_filter, (int, float)) and 0 <= tissue_filter <= 1)):
        raise PipelineError(f"tissue_filter is the fraction of a tile that must be tissue, 0..1; got {tissue_filter!r}")
    jobs = [_Job(s, o) for s, o in zip(slides, outputs)]
    seen: dict = {}
    for job in jobs:
        other = seen.setdefault(os.path.abspath(job.out), job)
        if other is not job:
            raise PipelineError(f"{job.out}: given as the output of two slides ({other.slide.path} and "
                                f"{job.slide.path}); each slide needs an output of its own")
    partial.allow_open_files(len(jobs))  # one lock file per output, held until the slide is finished
    tiling = {"tile_size": tile_size, "overlap": overlap, "stride": stride, "level": level, "mpp": mpp, "edge": edge,
              "tissue_filter": tissue_filter}
    run_id = uuid.uuid4().hex[:12]
    # slides whose readers rest (closed until read: SlideDataset's) rest again once prepared and once finished,
    # so that the run holds open only the slides it is working on
    resting = {id(j): bool(getattr(j.slide.reader, "_closed", False)) for j in jobs}
    try:
        for job in jobs:
            job.on_error = on_error
            job.overwrite = bool(overwrite)
            _prepare(job, pipeline, tiling, batch_size, compression, compression_level, resume)
            if resting[id(job)]:
                job.slide.reader.rest()
        ex, owned = make_executor(executor, workers=workers, scheduler=scheduler, client=client)
    except BaseException:
        _drop_unused_journals(jobs)
        raise
    pending: dict = {}
    t0 = time.perf_counter()
    total = sum(j.n_tiles for j in jobs)
    initial = sum(len(j.batches[b]) for j in jobs for b in j.done)
    bar = progress_bar(None, total=total, desc="tiles", unit="tile", disable=not progress, initial=initial)
    try:
        for job in jobs:  # slides resumed with every batch done (or without tiles) only need their merge
            if len(job.done) == len(job.batches) and not job.already_done:
                _finish(job, tiling, ex, batch_size, run_id, t0)
            elif not job.already_done and job.next_merge in job.done:  # resumed: the journal's batches first
                _merge_ready(job)
        queue = deque((j, b) for j in jobs for b in range(len(j.batches)) if b not in j.done)
        in_flight_max = int(max_in_flight or getattr(ex, "max_in_flight", None) or 2 * ex.workers + 2)
        while queue or pending:
            while queue and len(pending) < in_flight_max:
                job, b = queue.popleft()
                if job.shared is None:
                    job.shared = (ex.share(job.slide), ex.share(job.pipeline))
                fut = ex.submit(process_batch, job.shared[0], job.shared[1], b, job.batches[b], compression,
                                compression_level, on_error, job.dir, getattr(ex, "encoder", None),
                                getattr(ex, "same_process", False), job.token, getattr(ex, "defer", False),
                                key=f"histoflow-{run_id}-{id(job)}-{b}")
                pending[fut] = (job, b)
            for fut in sorted(ex.wait_any(list(pending)), key=lambda f: (id(pending[f][0]), pending[f][1])):
                job, b = pending.pop(fut)
                result = _from_journal(ex, fut, job, b)  # a damaged journal file raises, naming itself
                if result is None:
                    try:
                        result = fut.result()
                    except Exception as e:
                        raise PipelineError(f"{job.slide.path}: batch {b} (tiles at "
                                            f"{_where(job.batches[b])}) failed on the executor: "
                                            f"{type(e).__name__}: {e}") from e
                if result.failures and on_error == "raise":
                    f = result.failures[0]
                    again = (f"Finished batches are kept in {job.dir}; fix the cause and run again with "
                             "resume=True (`--resume` on the command line)" if job.done or not job.made_journal
                             else "Fix the cause and run again")  # nothing done: the journal is dropped
                    job.nothing_kept = not (job.done or not job.made_journal)
                    raise PipelineError(f"{job.slide.path}: {f.transform} failed on tile at (x={f.x}, y={f.y}): "
                                        f"{f.error}. {again}, or pass on_error='skip' (`histoflow run --on-error "
                                        "skip`)")
                if not result.journalled:  # a worker that cannot see the journal folder sent its tiles
                    partial.write_batch(job.dir, result, job.token)
                if result.tiles and len(job.in_memory) < IN_MEMORY_BATCHES:
                    job.in_memory[b] = result  # merged from memory; the journal file is for resume
                job.done.add(b)
                bar.update(len(job.batches[b]))
                if on_batch is not None:
                    on_batch(job.slide, b, len(job.done), len(job.batches))
                if len(job.done) == len(job.batches):
                    _finish(job, tiling, ex, batch_size, run_id, t0)
                    if resting[id(job)]:
                        job.slide.reader.rest()
                elif b == job.next_merge:
                    _merge_ready(job)
    finally:
        if pending:  # stopped by an error: tasks still queued or running are of no use any more
            ex.cancel(list(pending))
        for job in jobs:  # an interrupted run: drop half-made files, keep the journals for resume
            if job.writer is not None:
                job.writer.abort()
        bar.close()
        if owned:
            ex.close()
        _drop_unused_journals(jobs)  # a run stopped before its first batch leaves nothing behind
    return [j.out for j in jobs]


def _drop_unused_journals(jobs):
    """Remove the journals that this run made and that hold no finished batch (the run failed or was stopped
    before any), release the run's locks on its outputs, and then remove the folders it made for them if they
    are empty: a failed run does not leave empty folders behind. Journals with batches stay for
    ``resume=True``; finished slides have none left."""
    made = set()
    for job in jobs:
        if job.finished:
            continue
        if job.dir is not None and job.made_journal:
            # batches in the journal are kept for resume (a dask worker journals its own, before the driver
            # hears of them: a Ctrl-C then keeps them), unless the run stopped on an error that said nothing was
            # kept (a threads run finishes its running batches on close, after that message)
            if job.done:
                continue
            if not job.nothing_kept:
                try:
                    if partial.done_batches(job.dir, job.token):
                        continue
                except OSError:
                    continue
            partial.remove(job.dir)
        made.update(job.made_folders)
    for job in jobs:
        if job.lock is not None:
            job.lock.release()
    for d in sorted(made, key=len, reverse=True):  # the deepest first; rmdir removes only empty folders
        try:
            os.rmdir(d)
        except OSError:
            pass


def _from_journal(ex, fut, job, b):
    """The result of a batch that a worker of another process journalled itself, read from the journal
    instead of gathered from the worker: the gather is a round trip through the scheduler for a result
    that holds nothing the journal lacks (it was ~10% of the driver's CPU on a 2-worker cluster). None when
    the batch must be gathered: the task failed, or its worker could not see the journal folder, or the
    batch stopped the run (such batches are not journalled)."""
    succeeded = getattr(ex, "succeeded", None)
    if succeeded is None or job.token is None or not succeeded(fut):
        return None
    if not os.path.exists(partial.batch_path(job.dir, b, job.token)):
        return None
    if len(job.in_memory) >= IN_MEMORY_BATCHES:
        # no room to keep it: the merge reads it when its turn comes (a journalled batch holds no failure that
        # stops the run: such batches are not journalled), so it is not read twice
        return BatchResult(b, journalled=True)
    result = partial.read_batch(job.dir, b, job.token)
    result.journalled = True
    return result


def _where(batch):
    (_, a), (_, b) = batch[0], batch[-1]
    return f"({a.x}, {a.y})..({b.x}, {b.y})"


def _check_output(job):
    """Refuse outputs that would lose something: the slide itself, a directory, a file that is not an h5path."""
    out, src = job.out, os.fspath(job.slide.path)
    if os.path.isdir(out):
        raise PipelineError(f"{out}: the output is a directory; give a file name such as "
                            f"{os.path.join(out, job.slide.name + '.h5path')}")
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise PipelineError(f"{out}: cannot write there: {parent} is a file, not a directory")
    if os.path.exists(out):
        if same_file(out, src):
            raise PipelineError(f"{out}: the output is the slide being read; choose another output path")
        if not _is_hdf5(out):
            raise PipelineError(f"{out}: exists and is not an h5path file; a run only replaces h5path files "
                                "(remove it or choose another output path)")


def _is_hdf5(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def _warn_small_overlap(slide, pipeline, grid):
    """Warn when the tiles overlap less than a step that finds objects needs (:meth:`Transform.min_overlap`):
    objects cut by a tile's edge would be kept in pieces, each by its own tile."""
    from ..transforms.base import Pipeline

    mpp = float(slide.mpp[0]) * grid.downsample if slide.mpp else None
    if isinstance(pipeline, Pipeline):
        need, step = pipeline.overlap_needed_by(mpp)
    else:  # one transform run alone
        need = int(pipeline.min_overlap(mpp))
        step = pipeline if need else None
    have = min(grid.overlap)
    if step is not None and have < need and grid.cols * grid.rows > 1:  # one tile cuts nothing
        tile = min(grid.tile_size)
        hint = f"overlap={need}" if need <= tile // 2 else f"tiles of {2 * need} px or more with overlap={need}"
        warnings.warn(f"{slide.path}: {type(step).__name__} finds objects that need {need} px of tile overlap "
                      f"at {'%.3g µm/px' % mpp if mpp else 'these tiles'}; with {have} px, an object cut by a tile's "
                      f"edge is found in pieces, each kept by its own tile (counted twice). Run with {hint}",
                      stacklevel=5)


def _check_slide_mask_names(slide, pipeline, tiling):
    """Refuse, before the first tile, a step whose slide masks would take the name of one the slide has (the
    store refused it after the last tile, and a resume could never finish)."""
    for step in pipeline._all_steps():
        have = sorted(m for m in slide.masks if step.makes_slide_mask(m))
        if have:
            whence = "made by tissue_filter" if have[0] == TISSUE_MASK and tiling["tissue_filter"] is not None \
                else "the slide's own"
            raise PipelineError(f"{slide.path}: {type(step).__name__} would write slide masks named "
                                f"{step.slide_mask_prefixes[0]}..., and the slide already has {have[0]!r} ({whence}): "
                                "give the step another name (mask_name= / heatmap_prefix=)")


def _prepare(job, pipeline, tiling, batch_size, compression, compression_level, resume):
    slide = job.slide
    _check_output(job)
    if tiling["tissue_filter"] is not None and TISSUE_MASK not in slide.masks:
        tissue_prepass(slide)
    if pipeline is not None:
        missing = sorted(set(pipeline.inputs) - set(slide.masks))
        if missing:
            raise PipelineError(f"{slide.path}: the pipeline needs slide mask(s) {missing} as inputs, which the "
                                "slide does not have: add them with slide.add_mask(...), or pass "
                                "tissue_filter=... to make 'tissue'")
        try:
            pipeline.check(slide.slide_type, available_masks=set(slide.masks))
        except PipelineError as e:
            raise PipelineError(f"{slide.path}: {e}") from None
        _check_slide_mask_names(slide, pipeline, tiling)
        try:
            job.pipeline = copy.deepcopy(pipeline)  # fitted per slide
        except Exception as e:  # noqa: BLE001 - copy raises whatever the object's state raises
            bad = next((type(t).__name__ for t in pipeline.steps if not _copies(t)), type(pipeline).__name__)
            raise PipelineError(f"{slide.path}: {bad} cannot be copied for the slide ({type(e).__name__}: {e}); "
                                "a transform's attributes must be plain data (numbers, arrays, strings), not "
                                "locks, open files or lambdas") from e
        job.pipeline.fit_slide(slide)
    grid = slide.grid(tiling["tile_size"], stride=tiling["stride"], overlap=tiling["overlap"],
                      level=tiling["level"], mpp=tiling["mpp"], edge=tiling["edge"],
                      mask=TISSUE_MASK if tiling["tissue_filter"] is not None else None,
                      min_coverage=tiling["tissue_filter"] or 0.0)
    if pipeline is not None:
        _warn_small_overlap(slide, job.pipeline, grid)
        job.pipeline.fit_grid(grid)
    specs = list(enumerate(grid))
    if not specs:  # a blank slide: its h5path has the slide's record and masks, and no tiles
        warnings.warn(f"{slide.path}: no tiles to process (grid {grid}); its h5path will hold no tiles",
                      stacklevel=4)
    # a batch holds at most BATCH_BYTES of raw pixels, so many-channel tiles (22 uint16 channels of
    # 512 px are 11 MiB a tile) do not multiply the memory of every batch in flight
    tw, th = grid.tile_size
    tile_bytes = tw * th * max(1, slide.reader.channels) * slide.reader.dtype.itemsize
    batch_size = max(1, min(batch_size, BATCH_BYTES // max(1, tile_bytes)))
    job.batches = [specs[i:i + batch_size] for i in range(0, len(specs), batch_size)]
    manifest = {
        "journal": 3, "slide": slide.reader._abspath, "name": slide.name,
        "pipeline": pipeline.to_document() if pipeline is not None else None,
        "tiling": tiling, "batch_size": batch_size, "tiles": len(specs),
        "compression": compression, "compression_level": compression_level,
        "inputs": _slide_inputs(slide),
    }
    files = _pipeline_files(manifest["pipeline"])
    if files:  # a model's weights replaced at the same path: a resume would mix two models' tiles in one store
        manifest["inputs"]["pipeline_files"] = files
    job.manifest = json.loads(json.dumps(manifest))  # as it reads back from disk (tuples are lists there)
    if resume and not os.path.isdir(partial.partial_dir(job.out)) and \
            _finished_before(job.out, job.manifest, failures_ok=job.on_error == "skip"):
        job.already_done, job.finished = True, True  # a slide the interrupted run had completed: nothing written
        job.done = set(range(len(job.batches)))
        job.resumed = len(job.done)
        return
    # one run at a time on an output: the lock beside it (its folder made now, and dropped again if the run
    # leaves nothing there) is held until the slide is finished or the run stops
    job.made_folders = missing_folders(os.path.dirname(os.path.abspath(job.out)))
    try:
        os.makedirs(os.path.dirname(os.path.abspath(job.out)), exist_ok=True)
    except OSError as e:
        raise OutputError(f"{job.out}: cannot write there: cannot make its folder: {e.strerror or e}") from None
    job.lock = partial.OutputLock(job.out).acquire()
    journal = partial.partial_dir(job.out)
    replace = job.overwrite  # with resume: other settings' outputs and journals are replaced
    if resume and not replace and not os.path.isdir(journal) and os.path.lexists(job.out):
        rec = _last_run(job.out)  # None: a `histoflow tile` store, a PathML file ...: not this run's to replace
        if rec is None or not _same_settings(rec, job.manifest):
            what = (" and is not the finished result of a pipeline run, nor is there an unfinished one to continue"
                    if rec is None else ", the result of a run with other settings")
            raise PipelineError(f"{job.out}: exists{what}; resume=True continues the same run only: run without "
                                "resume to replace it (--overwrite on the command line), or write elsewhere")
    job.made_journal = not (resume and os.path.isdir(journal))  # a journal resumed is not this run's to drop
    job.dir, job.done, job.token = partial.start(job.out, job.manifest, resume, replace_other=replace)
    job.made_journal = job.made_journal or (replace and not job.done)  # another run's journal, replaced
    job.resumed = len(job.done)


def _pipeline_files(document) -> dict:
    """Size and modification time of each file the pipeline's parameters name (model weights, reference
    images ...), by path: what a resume, or a finished output kept as done, must find unchanged."""
    found = {}

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, str) and 0 < len(v) < 4096 and os.path.isfile(v):
            found[os.path.abspath(v)] = _file_identity(v)

    walk(document)
    return found


def _slide_inputs(slide) -> dict:
    """What the run reads of the slide besides its pixels (its pixel size, type, backend, masks), so that a
    resume with other inputs is refused rather than mixed with the tiles made from the first ones."""
    mpp = slide.mpp
    return {"file": _file_identity(slide.reader._abspath),
            "mpp": None if mpp is None else [float(v) for v in np.ravel(mpp)],
            "slide_type": getattr(slide.slide_type, "name", str(slide.slide_type)),
            "backend": getattr(slide.reader, "backend", None),
            "masks": {name: {"shape": list(m.array.shape), "downsample": float(m.downsample),
                             "crc32": zlib.crc32(np.ascontiguousarray(m.array).view(np.uint8))}
                      for name, m in sorted(slide.masks.items())}}


def _file_identity(path) -> list | None:
    """Size and modification time (ns) of the slide's file, or of each file of a slide folder (DICOM): a slide
    replaced at the same path between an interrupted run and its resume is refused, not mixed into one store."""
    try:
        if os.path.isdir(path):
            out = []
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if os.path.isdir(full) or not is_dicom_file(full):  # as the DICOM reader finds them
                    continue  # only the slide's own files: a run's outputs written into the folder are not the slide
                st = os.stat(full)
                out.append([name, st.st_size, st.st_mtime_ns])
            return out
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return None


def _last_run(out):
    """The last provenance record of ``out`` when it is a finished pipeline run's (else None)."""
    if not os.path.isfile(out):
        return None
    from ..store import read_h5path

    try:
        with read_h5path(out) as h:
            prov = h.provenance
    except Exception:  # noqa: BLE001 - not readable: nothing to keep, run it again
        return None
    if not prov or prov[-1].get("kind") != "pipeline run" or not isinstance(prov[-1].get("run_settings"), dict):
        return None
    return prov[-1]


def _same_settings(rec, manifest) -> bool:
    # the journal's version names the format of unfinished runs' batch files, not the output's
    return ({k: v for k, v in rec["run_settings"].items() if k != "journal"}
            == {k: v for k, v in manifest.items() if k != "journal"})


def _finished_before(out, manifest, failures_ok=True) -> bool:
    """Whether ``out`` is the complete result of a run with these settings (its last provenance says so);
    with ``failures_ok=False`` (a run with ``on_error="raise"``) not if that run skipped failed tiles."""
    rec = _last_run(out)
    if rec is None:
        return False
    if not failures_ok and rec.get("failed_tiles"):
        return False  # run again: the failure stops it, as it would have without resume
    return _same_settings(rec, manifest)


def _slide_metadata(job, first_batch) -> dict:
    """The slide's record for the store. When the pipeline replaced the pixels with another number of
    channels (virtual H&E from fluorescence: 22 channels in, RGB out), the slide's channel names do not name
    the stored tiles' channels: they become R, G, B (or none). A pipeline that makes another kind of image
    (``slide_type_out``: virtual H&E, stain concentrations) also sets the record's slide type, and its dtype to
    the stored tiles' (they said MIBI and uint16 over uint8 H&E tiles, and tiles read back were taken for MIBI)."""
    meta = job.slide.metadata()
    names = meta.get("channel_names")
    if names is not None and job.pipeline is not None:  # the channels the pipeline leaves (collapsed, RGB, ...)
        names = job.pipeline.channel_names_out(list(names))
        meta["channel_names"] = names
    first = next((enc for _, enc in first_batch.tiles), None)
    kind = job.pipeline.slide_type_out if job.pipeline is not None else None
    if first is not None and names is not None and len(names) != first.image.shape[2]:
        from ..core.slide import _rgb_names

        meta["channel_names"] = _rgb_names(kind or meta.get("slide_type"), first.image.shape[2])
    if kind:
        meta["slide_type"] = kind
        if first is not None:
            meta["dtype"] = np.dtype(first.image.dtype).name
    return meta


def _merge_ready(job):
    """Copy every journalled batch that is next in grid order into the slide's h5path, as batches finish
    (the copy overlaps with the work still running). The file stays under a temporary name until
    :func:`_finish`; the journal stays until then too, so an interrupted run resumes from it."""
    while job.next_merge in job.done:
        result = job.in_memory.pop(job.next_merge, None) or partial.read_batch(job.dir, job.next_merge, job.token)
        if result.failures and job.on_error == "raise":  # journalled by an earlier run with on_error="skip"
            f = result.failures[0]
            raise PipelineError(f"{job.slide.path}: {f.transform} failed on tile at (x={f.x}, y={f.y}) in the run "
                                f"being resumed: {f.error}. Resume with on_error='skip' (`--on-error skip`) to keep "
                                "going without those tiles, or run without resume to start over")
        if job.writer is None and result.tiles:  # made by the first tiles: they say the stored channels
            _open_writer(job, result)
        reduces = job.pipeline is not None and job.pipeline.reduces
        for index, enc in sorted(result.tiles, key=lambda t: t[0]):
            try:
                job.writer.add_tile(enc)
            except H5PathError as e:  # unlike the tiles before it (dtype, channels, masks): not storable here
                if isinstance(e, OutputError):  # the file cannot be written (disk full, ...): no tile's fault
                    raise
                label = _store_label(job.pipeline)
                if job.on_error != "skip":
                    raise PipelineError(f"{job.slide.path}: the {label} of the tile at (x={enc.coords[0]}, "
                                        f"y={enc.coords[1]}) cannot be stored: {e}; pass on_error='skip' "
                                        "(`--on-error skip`) to leave such tiles out") from e
                job.failures.append(Failure(index, enc.coords[0], enc.coords[1], label,
                                            f"cannot be stored: {e}").as_dict())
                continue
            if reduces:
                job.pipeline.collect(enc.decode(image=False))  # reducers read masks, labels, cells
            job.merged += 1
        job.failures.extend(f.as_dict() for f in result.failures)
        job.next_merge += 1


def _open_writer(job, first_batch):
    job.writer = H5PathWriter(job.out, slide=_slide_metadata(job, first_batch),
                              compression=job.manifest["compression"],
                              compression_level=job.manifest["compression_level"], temp_dir=job.dir)
    for name, m in job.slide.masks.items():
        job.writer.add_slide_mask(name, m.stored(), m.downsample)


def _finish(job, tiling, ex, batch_size, run_id, t0):
    """Complete the slide's h5path (remaining batches, provenance), rename it into place, drop the journal."""
    from .. import __version__

    _merge_ready(job)
    if job.writer is None:  # no tile at all (a blank slide, or every tile failed with on_error="skip")
        _open_writer(job, BatchResult(-1))
    if job.pipeline is not None and job.pipeline.reduces:
        for name, (array, downsample) in job.pipeline.slide_masks().items():
            job.writer.add_slide_mask(name, array, downsample)
        cells = job.pipeline.slide_cells()
        if cells is not None:
            job.writer.set_cells(cells)
    job.writer.add_provenance({
        "kind": "pipeline run", "run_id": run_id,
        "pipeline": job.manifest["pipeline"],
        # what the steps fitted to this slide (stain matrices, thresholds ...), which the YAML cannot say
        "fitted": _fitted(job.pipeline),
        # the batch size used (the one asked for, or fewer tiles when that many would hold over BATCH_BYTES)
        "tiling": tiling, "batch_size": job.manifest["batch_size"], "batch_size_requested": batch_size,
        "tiles_written": job.merged, "tiles_in_grid": job.n_tiles,
        "failed_tiles": job.failures, "resumed_batches": job.resumed, "run_settings": job.manifest,
        "executor": {"kind": ex.name, "workers": ex.workers},
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "versions": _versions(), "histoflow": __version__, "python": platform.python_version(),
    })
    job.writer.close()
    job.writer = None
    partial.remove(job.dir)
    job.finished = True
    if job.lock is not None:  # the output is in place: other runs may have it now
        job.lock.release()
    if job.shared is not None:  # the slide and pipeline shared with the workers can go
        ex.release(job.shared)
        job.shared = None


def _fitted(pipeline, at: str = "") -> dict:
    """``{"<index>:<Step>": {attribute: value}}`` of the slide-level values the steps of ``pipeline`` fitted
    (their public attributes ending in ``_``, scikit-learn's convention), as JSON: numbers, text and arrays
    (as lists) up to 10,000 numbers each; None and larger values are left out. The steps of a nested pipeline
    are ``"<index>.<index>:<Step>"``."""
    out = {}
    for i, step in enumerate(getattr(pipeline, "steps", None) or []):
        if getattr(step, "steps", None) is not None:  # a nested Pipeline: its own steps fitted the values
            out.update(_fitted(step, f"{at}{i}."))
            continue
        vals = {}
        for k, v in vars(step).items():
            if k.startswith("_") or not k.endswith("_") or v is None:
                continue
            j = _jsonable(v)
            if j is not None:
                vals[k] = j
        if vals:
            out[f"{at}{i}:{type(step).__name__}"] = vals
    return out


def _jsonable(v, budget=10_000):
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else str(float(v))
    if isinstance(v, str):
        return v
    if isinstance(v, np.ndarray):
        return v.tolist() if v.size <= budget and v.dtype.kind in "biuf" else None
    if isinstance(v, (list, tuple)):
        items = [_jsonable(x, budget) for x in v]
        return None if any(x is None for x in items) else items
    return None


def _versions():
    return dict(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions():
    """Versions of the packages that shape the output, looked up once per process (importlib.metadata
    reads every installed package's metadata: ~10 ms, once per slide otherwise)."""
    import importlib.metadata as md

    out = {}
    for pkg in ("numpy", "tifffile", "imagecodecs", "openslide-python", "opencv-python-headless", "scikit-image",
                "h5py", "dask", "distributed"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _copies(obj) -> bool:
    try:
        copy.deepcopy(obj)
        return True
    except Exception:  # noqa: BLE001
        return False

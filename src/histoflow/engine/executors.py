"""Executors: where batches run. In-process (debugging), threads, or dask.distributed.

They share one small interface so that the run loop is the same for all: ``share(obj)`` (send a large
object to the workers once) and ``release(shared)`` (let it go), ``submit(fn, *args)``, ``wait_any(pending)``,
``cancel(futures)`` (a run stopped by an error), ``workers`` and ``close()``.
This is the only module that imports dask, and only when a dask executor is made.
"""
from __future__ import annotations

import concurrent.futures as cf
import os

from ..errors import PipelineError


class _Done:
    """A future that is already resolved (in-process execution)."""

    def __init__(self, fn, args):
        try:
            self._value, self._error = fn(*args), None
        except Exception as e:  # re-raised by result(), as a real future would (Ctrl-C stops the run at once)
            self._value, self._error = None, e

    def result(self):
        if self._error is not None:
            raise self._error
        if hasattr(self._value, "finish"):  # a deferred batch (process_batch(defer=True)): collect it now
            try:
                self._value = self._value.finish()
            except BaseException as e:
                self._value, self._error = None, e
                raise
        return self._value

    def done(self):
        return True


class InProcessExecutor:
    """Runs each batch at submission, in the calling thread: simplest to debug (pdb works).

    Reading and transforms run in the calling thread; compressing the finished tiles runs on one helper
    thread (``encoder``, handed to the batch function) so that it overlaps with the next tiles' work
    (the codecs release the GIL). A batch is finished only when its result is asked for, after the run has
    submitted the next ones (up to its in-flight limit): the helper encodes those while this thread journals
    and merges. When finishing, the calling thread encodes the batch's tiles the helper has not started
    instead of waiting for them, so both cores stay busy when encoding is the slower half.
    ``encode_thread=False`` keeps everything in the calling thread."""

    name = "inprocess"
    workers = 1
    same_process = True  # results need no transport: journalled tiles stay in them for the merge
    defer = True  # batches are finished (encodings collected, journalled) when their result is asked for
    max_in_flight = 2  # one batch being finished while the next one's tiles are encoded: memory of 2 batches

    def __init__(self, encode_thread: bool = True):
        self.encoder = None
        if encode_thread:
            self.encoder = cf.ThreadPoolExecutor(1, thread_name_prefix="histoflow-encode")

    def share(self, obj):
        return obj

    def release(self, shared):
        pass

    def submit(self, fn, *args, key=None):
        return _Done(fn, args)

    def wait_any(self, pending):
        return {next(iter(pending))}  # the oldest batch: the younger ones keep the helper busy meanwhile

    def cancel(self, futures):
        pass

    def close(self):
        if self.encoder is not None:
            self.encoder.shutdown(wait=True)


class ThreadExecutor:
    """A thread pool in this process (decoders and OpenCV release the GIL). Each thread runs its own copy of the
    pipeline (a deep copy, through the state a dask worker's copy is made from): a transform that keeps a tile's
    data on ``self`` while it works gave tiles other tiles' pixels when the threads shared one (98 of 108), so
    the output would have depended on the executor. The slide (its reader is safe to share) is shared."""

    name = "threads"
    same_process = True

    def __init__(self, workers: int | None = None):
        import threading

        self.workers = int(workers or os.cpu_count() or 1)
        self._pool = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="histoflow")
        self._local = threading.local()

    def share(self, obj):
        return obj

    def release(self, shared):
        pass

    def submit(self, fn, *args, key=None):
        return self._pool.submit(self._in_thread, fn, args)

    def _in_thread(self, fn, args):
        from ..transforms.base import Transform

        return fn(*(self._own(a) if isinstance(a, Transform) else a for a in args))

    def _own(self, obj):
        """This thread's copy of ``obj`` (made once per thread and object; ``copy.deepcopy`` goes through the
        transforms' ``__getstate__``, as the pickling that sends them to dask workers does)."""
        import copy

        copies = self._local.__dict__.setdefault("copies", {})
        held = copies.get(id(obj))
        if held is None or held[0] is not obj:  # (the object is kept with its copy: its id stays its own)
            held = copies[id(obj)] = (obj, copy.deepcopy(obj))
        return held[1]

    def wait_any(self, pending):
        done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        return done

    def cancel(self, futures):
        for f in futures:
            f.cancel()

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


#: Worker environment for clusters started here. dask's nanny sets MALLOC_TRIM_THRESHOLD_=64 KiB, which turns
#: off glibc's adaptive mmap threshold: every tile-sized buffer (~200 kB) was then mapped afresh and
#: page-faulted, which made workers 1.4-1.7x slower than the same code in the driver; a fixed 4 MiB mmap
#: threshold keeps tile buffers on the heap. But with a 64 KiB trim threshold glibc still hands the top of the
#: heap back to the kernel whenever a tile's buffers are freed, and faults it in again for the next tile:
#: 0.35 ms of system time per 256 px tile, 18% of a worker's time (measured 2026-12-05: one worker 482 ->
#: 572 tiles/s, two 807 -> 970 with a 64 MiB trim threshold, the size of a batch's pixels). dask also sets
#: OMP/MKL/OpenBLAS to one thread per worker process, which OpenCV ignores: its own pool (one thread per core)
#: made each single-threaded worker use ~1.15 cores, all workers of a machine fighting over the same cores;
#: OPENCV_FOR_THREADS_NUM=1 is OpenCV's equivalent. Set the same variables on clusters you start yourself
#: (docs/running.md).
WORKER_ENV = {"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 4 * 1024 * 1024,
              "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 64 * 1024 * 1024,
              "distributed.nanny.pre-spawn-environ.OPENCV_FOR_THREADS_NUM": 1}
#: Preloaded by the workers of clusters started here (:func:`dask_setup`).
WORKER_PRELOAD = "histoflow.engine.executors"


#: Signals that the workers of clusters started here ignore (see :func:`dask_setup`).
_INTERRUPTS = ("SIGINT", "SIGTERM")


def dask_setup(worker):
    """The workers of a local cluster started here ignore SIGINT and SIGTERM (dask's worker preload hook).

    A terminal's Ctrl-C, and GNU ``timeout``, signal the whole process group: the local cluster's worker
    processes, children of the driver, got the signal too and each printed its own traceback
    (CancelledError, KeyboardInterrupt) above the driver's one-line message. The driver stops them itself
    when it closes the cluster (its nanny asks them to close, then kills them); a worker also exits at once
    when the driver's process ends, and SIGKILL still ends it. The workers are born with these signals
    blocked (:func:`_interrupts_blocked`), so one that arrives while they start is dropped here too."""
    import signal

    sigs = [getattr(signal, name) for name in _INTERRUPTS if hasattr(signal, name)]
    try:
        for sig in sigs:
            signal.signal(sig, signal.SIG_IGN)
    except ValueError:  # pragma: no cover - not the worker process's main thread: leave its handlers
        return
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)  # pending ones are discarded: they are ignored now


class _interrupts_blocked:
    """SIGINT and SIGTERM blocked in this thread while a local cluster starts: the threads it starts, and
    through them its worker processes, inherit the mask, so a Ctrl-C while workers import (before
    :func:`dask_setup` runs in them) does not make each print a traceback. The driver's own Ctrl-C waits
    until the cluster is up (a few seconds) and is raised on leaving."""

    def __enter__(self):
        import signal

        self._old = None
        if hasattr(signal, "pthread_sigmask"):
            try:  # started first, as spawning it unblocks these signals in the thread that does (the cluster's)
                from multiprocessing import resource_tracker

                resource_tracker.ensure_running()
            except Exception:  # noqa: BLE001 - then workers may still print a traceback if Ctrl-C'd as they start
                pass
            self._old = signal.pthread_sigmask(signal.SIG_BLOCK, [getattr(signal, n) for n in _INTERRUPTS])
        return self

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old)  # a pending Ctrl-C is raised here


class DaskExecutor:
    """dask.distributed: a local cluster (started and stopped here), an existing ``Client``, or a
    scheduler address (``"tcp://host:8786"``) of any cluster — Slurm through dask-jobqueue, Kubernetes
    through dask-kubernetes, or ``dask scheduler`` / ``dask worker`` started by hand.

    Workers open the slide themselves (the slide object is handed to them once, by a task, and its reader
    reopens the file on each worker), so every worker must see the slide at the same path.
    """

    name = "dask"

    def __init__(self, workers: int | None = None, client=None, address: str | None = None,
                 threads_per_worker: int = 1):
        try:
            import distributed
        except ImportError:  # pragma: no cover - a core dependency
            raise PipelineError("the dask executor needs dask.distributed: pip install 'dask[distributed]'")
        self._distributed = distributed
        self._own_cluster = None
        self._own_client = False
        self._warned_empty = False
        if client is not None:
            self.client = client
        elif address is not None:
            try:
                self.client = distributed.Client(address, timeout="20s")
            except (OSError, TimeoutError) as e:
                raise PipelineError(f"cannot connect to the dask scheduler at {address}: {e}") from None
            except (ValueError, TypeError) as e:  # no port, a port that is not a number ...
                raise PipelineError(f"{address!r} is not a dask scheduler address (e.g. tcp://host:8786): {e}") \
                    from None
            self._own_client = True
        else:
            import dask

            n = int(workers or os.cpu_count() or 1)
            preload = [*(dask.config.get("distributed.worker.preload", None) or []), WORKER_PRELOAD]
            try:
                with _interrupts_blocked(), dask.config.set(WORKER_ENV):
                    self._own_cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=threads_per_worker,
                                                                 processes=True, dashboard_address=":0",
                                                                 silence_logs=40, preload=preload)
            except KeyboardInterrupt:  # Ctrl-C while it started: stop it again, quietly
                if self._own_cluster is not None:
                    self._own_cluster.close()
                raise
            except Exception as e:
                raise PipelineError(
                    f"could not start a local dask cluster of {n} worker process(es) ({type(e).__name__}: {e}). "
                    "Worker processes re-import the main script: in a script, put the run under "
                    "`if __name__ == \"__main__\":`; or use executor=\"threads\"") from e
            try:
                self.client = distributed.Client(self._own_cluster)
            except BaseException:
                self._own_cluster.close()
                raise
            self._own_client = True

    def _info(self) -> dict:
        return self.client.scheduler_info(n_workers=-1) if _takes_n_workers(self.client) else \
            self.client.scheduler_info()

    def _nthreads(self) -> dict:
        """{worker: threads}, asked of the scheduler (the client's cached scheduler_info() could be caught empty
        by its periodic update: a run then saw one worker, or warned of none)."""
        try:
            return dict(self.client.nthreads())
        except Exception:  # noqa: BLE001 - an older client: its scheduler_info
            return {k: w.get("nthreads", 1) for k, w in self._info().get("workers", {}).items()}

    @property
    def workers(self) -> int:
        try:
            return max(1, sum(self._nthreads().values()))
        except Exception as e:  # noqa: BLE001 - a closed client / a cluster that is gone, in distributed's words
            raise self._gone(e) from e

    def _gone(self, e) -> PipelineError:
        return PipelineError(f"the dask cluster {self._where()} takes no work: {type(e).__name__}: {e} (is the "
                             "Client closed, or its scheduler gone? pass an open Client or a scheduler address)")

    def share(self, obj):
        """``obj`` (a slide or a pipeline) for the tasks, made by a task rather than scattered: the scheduler
        keeps the task and makes it again on another worker if the worker holding it dies (scattered data
        cannot be made again: a worker killed mid-run cancelled every batch of a one-worker run). A cluster
        without workers yet (Slurm jobs still queued) is waited for, with a warning."""
        if not self._warned_empty and not self._n_workers():
            import warnings

            self._warned_empty = True
            warnings.warn(f"the dask cluster {self._where()} has no workers yet: the run waits for them "
                          "(start some, e.g. cluster.scale(...), or stop the run)", stacklevel=4)
        return self._submit(_shared, _portable(obj), pure=False)

    def _submit(self, fn, *args, **kwargs):
        """``client.submit``, a closed client or a cluster that is gone named as the project's error."""
        try:
            return self.client.submit(fn, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - distributed raises several kinds (ClosedClientError, OSError ...)
            raise self._gone(e) from e

    def _n_workers(self) -> int:
        try:
            return len(self._nthreads())
        except Exception:  # noqa: BLE001 - unknown: do not warn
            return 1

    def _where(self) -> str:
        try:
            return f"at {self.client.scheduler.address}"
        except Exception:  # noqa: BLE001
            return "of this client"

    def release(self, shared):
        """Let the workers drop shared objects (a finished slide's reader and pipeline)."""
        futures = [f for f in (shared if isinstance(shared, (tuple, list)) else [shared])
                   if isinstance(f, self._distributed.Future)]
        for f in futures:
            f.release()

    def cancel(self, futures):
        """Cancel tasks of a stopped run, so that they neither hold the workers nor write late results."""
        try:
            self.client.cancel(list(futures))
        except Exception:  # noqa: BLE001 - a client already closing; the journal token guards the rest
            pass

    def submit(self, fn, *args, key=None):
        return self._submit(fn, *args, key=key, pure=False, retries=2)

    def wait_any(self, pending):
        try:
            done, _ = self._distributed.wait(list(pending), return_when="FIRST_COMPLETED")
        except Exception as e:  # noqa: BLE001 - tasks cancelled under us (the scheduler restarted, lost them)
            raise PipelineError(f"the dask cluster {self._where()} dropped this run's tasks "
                                f"({type(e).__name__}: {e}); finished batches are kept: run again with "
                                "resume=True (`--resume`)") from e
        return set(done)

    @staticmethod
    def succeeded(fut) -> bool:
        """Whether a finished task returned (its result may then be read from the journal, not gathered)."""
        return fut.status == "finished"

    def close(self):
        if self._own_client:
            self.client.close()
        if self._own_cluster is not None:
            self._own_cluster.close()


def _portable(obj):
    """``obj`` as a task argument that the scheduler can hold without opening a slide: a slide travels as its
    fields and its reader's state (path and options), and is opened by :func:`_shared` on the worker. Given as
    the object, the scheduler unpickled it with the task graph and opened every slide itself (a slide it could
    not open failed the whole run as "dropped tasks", naming neither slide nor cause; its open files grew with
    every run). Other objects (pipelines) travel as they are."""
    from ..core.slide import SlideData

    if isinstance(obj, SlideData):
        fields = dict(vars(obj))
        reader = fields.pop("reader")
        return ("slide", type(obj), fields, type(reader), reader.__getstate__())
    return ("object", obj)


def _shared(portable):
    """The task that hands a shared object to the batches (see :meth:`DaskExecutor.share`): a slide is opened
    here, on the worker."""
    if portable[0] == "slide":
        _, cls, fields, reader_cls, reader_state = portable
        reader = reader_cls.__new__(reader_cls)
        reader.__setstate__(reader_state)
        slide = cls.__new__(cls)
        slide.__dict__.update(fields)
        slide.reader = reader
        return slide
    return portable[1]


def _takes_n_workers(client) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):
        return False


def make_executor(executor="dask", workers=None, scheduler=None, client=None):
    """An executor from the user's choice.

    ``executor`` is ``"inprocess"``, ``"threads"``, ``"dask"`` (a local cluster of ``workers``
    processes, unless ``scheduler`` (an address) or ``client`` (a ``distributed.Client``) is given), or an
    executor object (returned as is). Returns ``(executor, owned)``: an executor made here is closed by
    the caller.
    """
    if hasattr(executor, "submit") and hasattr(executor, "wait_any"):
        return executor, False
    if client is not None or scheduler is not None or (isinstance(executor, str) and "://" in executor):
        address = scheduler or (executor if isinstance(executor, str) and "://" in executor else None)
        return DaskExecutor(client=client, address=address), True
    if executor is not None and type(executor).__name__ == "Client":
        return DaskExecutor(client=executor), True
    if executor in ("inprocess", "in-process", None):
        return InProcessExecutor(), True
    if executor == "threads":
        return ThreadExecutor(workers), True
    if executor == "dask":
        return DaskExecutor(workers=workers), True
    raise PipelineError(f"unknown executor {executor!r}: use 'inprocess', 'threads', 'dask', a scheduler "
                        "address or a distributed.Client")

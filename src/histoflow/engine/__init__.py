"""Running pipelines: executors (in-process, threads, dask.distributed), batching, backpressure,
progress, fault handling and resume. The only room that knows about dask (imported on use)."""
from .executors import DaskExecutor, InProcessExecutor, ThreadExecutor, make_executor  # noqa: F401
from .run import run_slides, tissue_prepass  # noqa: F401

"""histoflow: computational pathology from slide to cell table.

Open any slide with :func:`open_slide`, tile it with :class:`SlideData`, keep the results in one
h5path file per slide (:func:`read_h5path`). Importing histoflow is light: no torch, no dask.
"""
# no `from __future__ import annotations` here: it binds the name `annotations` in the package, which hid the
# histoflow.annotations subpackage (`from histoflow import annotations` gave __future__'s feature object)
__version__ = "0.1.0"

from .errors import (  # noqa: F401
    ChannelError,
    H5PathError,
    HistoflowError,
    OutputError,
    ParameterError,
    PipelineError,
    RegionError,
    RegionTooLargeError,
    SlideNotFoundError,
    SlideReadError,
    TileDecodeError,
    UnsupportedFormatError,
)
from .io import open_slide  # noqa: F401

_LAZY = {
    "SlideData": "histoflow.core.slide",
    "SlideDataset": "histoflow.core.slide",
    "Pipeline": "histoflow.transforms.base",
    "Transform": "histoflow.transforms.base",
    "SlideType": "histoflow.core.types",
    "Tile": "histoflow.core.tile",
    "TileGrid": "histoflow.core.grid",
    "read_h5path": "histoflow.store",
    "H5Path": "histoflow.store",
}


#: what ``from histoflow import *`` gives: the lazy names too (they are imported then)
__all__ = ["open_slide", *_LAZY, "ChannelError", "H5PathError", "HistoflowError", "OutputError", "ParameterError",
           "PipelineError", "RegionError", "RegionTooLargeError", "SlideNotFoundError", "SlideReadError",
           "TileDecodeError", "UnsupportedFormatError"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'histoflow' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))

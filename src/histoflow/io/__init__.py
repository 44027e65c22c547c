"""Pixels in: one reader API over every slide format, backend chosen by file content.

>>> import histoflow
>>> with histoflow.open_slide("slide.svs") as s:          # doctest: +SKIP
...     region = s.read_region((1000, 1000), 0, (256, 256))  # (256, 256, 3) uint8

Backends: ``"tiff"`` (tifffile: SVS, generic tiled/stripped TIFF, pyramids, OME-TIFF, QPTIFF, MIBItiff,
channel stacks), ``"openslide"`` (NDPI, MRXS, SCN, BIF, Philips TIFF, and anything OpenSlide reads),
``"dicom"`` (wsidicom, with a tolerant pydicom path for single-file WSI), ``"image"`` (Pillow: PNG,
JPEG, BMP, small TIFFs).
"""
from __future__ import annotations

import importlib
import os

from ..errors import UnsupportedFormatError
from .base import DEFAULT_MAX_REGION_BYTES, Level, SlideReader
from .sniff import check_regular_file, detect_format

#: backend name -> "module:Class" (imported on first use, so `import histoflow` stays light)
BACKENDS = {
    "tiff": "histoflow.io.tiff:TiffReader",
    "openslide": "histoflow.io.openslide_backend:OpenSlideReader",
    "dicom": "histoflow.io.dicom:DicomReader",
    "image": "histoflow.io.image:ImageReader",
}


def get_backend(name: str) -> type[SlideReader]:
    if name not in BACKENDS:
        raise UnsupportedFormatError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)} or 'auto'")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def open_slide(path, backend: str = "auto", *, mpp=None, max_region_bytes: int | None = None,
               brightfield: bool | None = None) -> SlideReader:
    """Open a slide with the backend its content calls for (or the one named by ``backend``).

    Parameters
    ----------
    path : str or os.PathLike
        A slide file, or a folder of DICOM instances.
    backend : {"auto", "tiff", "openslide", "dicom", "image"}
        ``"auto"`` sniffs the content (magic bytes, TIFF tags, DICOM preamble), never the extension.
    mpp : float or (float, float), optional
        Override the pixel size in µm/px (for files whose metadata is missing or wrong).
    max_region_bytes : int, optional
        Refuse single reads that would allocate more than this (default 4 GiB).
    brightfield : bool, optional
        Override whether the slide is brightfield (padded white) or fluorescence (padded 0).

    Raises
    ------
    SlideNotFoundError, UnsupportedFormatError, SlideReadError
    """
    path = os.fspath(path)
    if backend != "auto":
        if backend not in BACKENDS:
            from ..errors import ParameterError

            raise ParameterError(f"{path}: unknown backend {backend!r}; choose one of {sorted(BACKENDS)} or 'auto'")
        if not os.path.exists(path):
            from ..errors import SlideNotFoundError

            raise SlideNotFoundError(f"{path}: no such file or folder")
        check_regular_file(path)  # (the format check makes it for backend="auto")
        if os.path.isdir(path) and backend != "dicom":
            raise UnsupportedFormatError(f"{path}: is a folder; the {backend!r} backend reads files (a folder of "
                                         "DICOM instances takes backend='dicom' or 'auto')")
    cls = get_backend(detect_format(path).backend if backend == "auto" else backend)
    return cls(path, mpp=mpp, max_region_bytes=max_region_bytes, brightfield=brightfield)


__all__ = ["open_slide", "SlideReader", "Level", "detect_format", "BACKENDS", "get_backend",
           "DEFAULT_MAX_REGION_BYTES"]

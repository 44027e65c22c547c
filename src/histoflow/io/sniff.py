"""Format detection by content: magic bytes, TIFF tags, the DICOM preamble. Never by extension."""
from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass

from ..errors import SlideNotFoundError, SlideReadError, UnsupportedFormatError

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: TIFF compressions our tifffile path decodes exactly as OpenSlide does. Aperio's JPEG 2000 with
#: YCbCr (33003) needs a colour conversion that OpenSlide does and the raw codec does not.
_OPENSLIDE_ONLY_COMPRESSION = {33003}
#: OpenSlide vendors of TIFF-based formats that our tifffile path reads as OpenSlide does; a TIFF of any
#: other vendor OpenSlide recognises (Trestle's overlapping tiles, ...) goes to the openslide backend
_TIFF_BACKEND_VENDORS = {"generic-tiff", "aperio"}
#: OpenSlide vendor -> format name
_VENDOR_FORMATS = {"trestle": "Trestle TIFF", "hamamatsu": "Hamamatsu NDPI", "leica": "Leica SCN",
                   "philips": "Philips TIFF", "ventana": "Ventana BIF"}
#: how many entries of a folder to look at when searching for DICOM files
_MAX_FOLDER_ENTRIES = 10000


@dataclass(frozen=True)
class FormatInfo:
    format: str  # human readable, e.g. "Aperio SVS"
    backend: str  # tiff | openslide | dicom | image


def is_dicom_file(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_files_in(folder: str) -> list[str]:
    """DICOM files (by preamble) directly inside a folder, sorted."""
    out = []
    with os.scandir(folder) as it:
        for i, entry in enumerate(it):
            if i >= _MAX_FOLDER_ENTRIES:
                break
            if entry.is_file() and is_dicom_file(entry.path):
                out.append(entry.path)
    return sorted(out)


def _folder_hint(folder) -> str:
    """What a folder that is not a DICOM slide holds, when it is other slides or images: a folder is read as
    one DICOM whole-slide image, so the user most likely meant its files."""
    kinds = {}
    with os.scandir(folder) as it:
        for i, entry in enumerate(it):
            if i >= _MAX_FOLDER_ENTRIES:
                break
            ext = os.path.splitext(entry.name)[1].lower()
            if entry.is_file() and ext in _SLIDE_EXTENSIONS:
                kinds[ext] = kinds.get(ext, 0) + 1
    if not kinds:
        return ""
    ext = max(kinds, key=kinds.get)
    example = os.path.join(folder, "*" + ext)
    return (f"; it holds {sum(kinds.values())} image or slide file(s) ({', '.join(sorted(kinds))}): a folder is "
            f"read as one DICOM whole-slide image, so give the files themselves (e.g. {example})")


#: extensions of the images and slides a folder given by mistake usually holds
_SLIDE_EXTENSIONS = frozenset([".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".bif",
                               ".qptiff", ".vsi", ".bmp"])


def check_regular_file(path) -> None:
    """An UnsupportedFormatError for a path that is neither a folder nor a regular file: a named pipe would
    block the first read for ever (inside OpenSlide even past SIGTERM); a socket or device is no slide."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise SlideReadError(f"{path}: cannot read: {e.strerror or e}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise UnsupportedFormatError(f"{path}: {kind}, not a slide file")


def detect_format(path) -> FormatInfo:
    """Decide format and backend from the file's content.

    Raises SlideNotFoundError for a missing path and UnsupportedFormatError for content that no
    backend reads.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise SlideNotFoundError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        if dicom_files_in(path):
            return FormatInfo("DICOM WSI", "dicom")
        if os.path.exists(os.path.join(path, "Slidedat.ini")):
            raise UnsupportedFormatError(f"{path}: this is the data folder of a MIRAX slide; open the .mrxs file next to it")
        raise UnsupportedFormatError(f"{path}: folder contains no DICOM files (nothing with a DICM preamble)"
                                     + _folder_hint(path))
    check_regular_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise SlideReadError(f"{path}: cannot read: {e.strerror or e}") from None
    if not head:
        raise UnsupportedFormatError(f"{path}: empty file")
    if len(head) >= 132 and head[128:132] == b"DICM":
        return FormatInfo("DICOM WSI", "dicom")
    if head[:4] in TIFF_MAGIC:
        return _detect_tiff(path)
    if head[:3] == b"\xff\xd8\xff":
        stem = os.path.splitext(path)[0]
        if os.path.exists(os.path.join(stem, "Slidedat.ini")):
            return FormatInfo("MIRAX", "openslide")
        if path.lower().endswith(".mrxs"):  # the slide's preview only: its pixels are in the missing folder
            raise UnsupportedFormatError(
                f"{path}: a MIRAX slide without its data folder: {stem}{os.sep}Slidedat.ini is missing (the .mrxs "
                "file is only a preview; copy the folder of the same name next to it)")
        return FormatInfo("JPEG", "image")
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return FormatInfo("PNG", "image")
    if head[:2] == b"BM":
        return FormatInfo("BMP", "image")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return FormatInfo("GIF", "image")
    vendor = _openslide_vendor(path)
    if vendor:
        return FormatInfo(f"OpenSlide {vendor}", "openslide")
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        raise UnsupportedFormatError(f"{path}: an HDF5 file (an h5path store?), not a slide: open stores with "
                                     "histoflow.read_h5path(path); `histoflow info` describes them")
    raise UnsupportedFormatError(
        f"{path}: not a recognised slide or image format (first bytes {head[:8].hex(' ')})")


def _openslide_vendor(path):
    try:
        import openslide
    except ImportError:  # pragma: no cover - openslide is a core dependency
        return None
    try:
        return openslide.OpenSlide.detect_format(path)
    except Exception:
        return None


def first_ifd_offset(head: bytes) -> int:
    """Byte offset of the first image directory of a TIFF, from its header."""
    order = "little" if head[:2] == b"II" else "big"
    if head[2:4] in (b"+\x00", b"\x00+"):  # BigTIFF
        return int.from_bytes(head[8:16], order)
    return int.from_bytes(head[4:8], order)


def check_tiff_intact(path: str):
    """Raise SlideReadError when the TIFF header points past the end of the file (a truncated copy)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] not in TIFF_MAGIC:
        raise UnsupportedFormatError(f"{path}: not a TIFF file (first bytes {head[:8].hex(' ')})")
    size = os.path.getsize(path)
    off = first_ifd_offset(head)
    if off >= size:
        raise SlideReadError(f"{path}: file is truncated: its first image directory is at byte {off:,} "
                             f"but the file has {size:,} bytes")


class quiet_tifffile:
    """Collect tifffile's log warnings (it logs, rather than raises, on many damaged files)."""

    def __init__(self):
        self.messages: list[str] = []

    def __enter__(self):
        self._logger = logging.getLogger("tifffile")
        self._handler = _ListHandler(self.messages)
        self._propagate = self._logger.propagate
        self._logger.addHandler(self._handler)
        self._logger.propagate = False
        return self

    def __exit__(self, *exc):
        self._logger.removeHandler(self._handler)
        self._logger.propagate = self._propagate


class _ListHandler(logging.Handler):
    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def emit(self, record):
        self.sink.append(record.getMessage())


def _tag_head(value, n: int) -> bytes:
    """The first ``n`` bytes of a tag's value. XMP (tag 700) is BYTE-typed by the standard, but some writers
    store it as ASCII, which tifffile returns as ``str``; other types give no bytes to look at."""
    if isinstance(value, str):
        return value[:n].encode("utf-8", "replace")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value[:n])
    return b""


def _detect_tiff(path: str) -> FormatInfo:
    import tifffile

    check_tiff_intact(path)
    try:
        with quiet_tifffile() as log, tifffile.TiffFile(path) as tf:
            if not len(tf.pages):
                why = f": {log.messages[0]}" if log.messages else ""
                raise SlideReadError(f"{path}: TIFF without readable images (damaged?){why}")
            page = tf.pages.first
            if tf.is_ndpi:
                return FormatInfo("Hamamatsu NDPI", "openslide")
            if tf.is_scn:
                return FormatInfo("Leica SCN", "openslide")
            if tf.is_philips:
                return FormatInfo("Philips TIFF", "openslide")
            xmp = page.tags.get(700)
            if xmp is not None and b"iScan" in _tag_head(xmp.value, 4096):
                return FormatInfo("Ventana BIF", "openslide")
            vendor = _openslide_vendor(path)
            if vendor and vendor not in _TIFF_BACKEND_VENDORS:
                return FormatInfo(_VENDOR_FORMATS.get(vendor, f"OpenSlide {vendor}"), "openslide")
            if tf.is_svs:
                if int(page.compression) in _OPENSLIDE_ONLY_COMPRESSION:
                    return FormatInfo("Aperio SVS", "openslide")
                return FormatInfo("Aperio SVS", "tiff")
            if tf.is_ome:
                return FormatInfo("OME-TIFF", "tiff")
            if tf.is_qpi:
                return FormatInfo("QPTIFF", "tiff")
            if page.description.startswith('{"mibi.'):
                return FormatInfo("MIBItiff", "tiff")
            if tf.is_imagej:
                return FormatInfo("ImageJ TIFF", "tiff")
            if page.is_tiled:
                pyramid = len(tf.series) and len(tf.series[0].levels) > 1
                return FormatInfo("pyramidal tiled TIFF" if pyramid else "generic tiled TIFF", "tiff")
            return FormatInfo("TIFF", "tiff")
    except SlideReadError:
        raise
    except Exception as e:  # tifffile raises many kinds of errors on damaged files
        raise SlideReadError(f"{path}: damaged TIFF: {e}") from None

"""DICOM WSI backend: wsidicom for conformant slides, a tolerant pydicom reader for the rest.

A slide is a folder of DICOM instances (one per pyramid level, label, overview, ...) or a single file.
:class:`DicomReader` first hands it to `wsidicom <https://github.com/imi-bigpicture/wsidicom>`_, which
reads the whole pyramid, the label and the overview. wsidicom is strict: it ignores files whose
``ImageType`` is missing or unusual, for example single-file TCGA conversions. Those fall back to a
tolerant reader (:class:`_FrameFile`) built on pydicom metadata only: it indexes the byte range of every
frame from the item headers of the pixel data (no pixel data is read at open) and, for a region, reads
with ``os.pread`` (thread-safe, no shared file position) and decodes only the frames it touches.

Two wsidicom facts this module relies on:

* ``WsiDicom.read_region(location, level, size)`` takes the pyramid *scale* level (``log2`` of the
  downsample, ``Level.level``), not the position of the level in the pyramid. Passing a list index reads
  the wrong level (silently rescaled) as soon as the pyramid skips a power of two, so the reader maps its
  level indices to ``Level.level``.
* Pixel spacing is in mm and its width is the column spacing (x), the second value of DICOM
  ``PixelSpacing``; µm/px is that times 1000.
* ``Level.optical_paths`` is a list made from a set, in an order that changes from process to process; the
  channel order is taken from the instances (InstanceNumber, file) and their OpticalPathSequence instead.
* wsidicom leaves files out with no more than a log message (another study, a header it cannot parse, and,
  by default, a level whose tile size is not the base level's: the reader turns that check off), and opens
  files whose pixel data is cut short. The reader compares the files used with the folder's and warns
  about the others, and about truncated files it uses.
"""
from __future__ import annotations

import inspect
import logging
import os
import struct
import warnings
from contextlib import contextmanager
from functools import partial

import numpy as np

from ..errors import SlideNotFoundError, SlideReadError, TileDecodeError, UnsupportedFormatError
from .base import Level, SlideReader
from .sniff import dicom_files_in, is_dicom_file

_IMPLICIT_VR_LE = "1.2.840.10008.1.2"
_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
_NATIVE_SYNTAXES = {_IMPLICIT_VR_LE, _EXPLICIT_VR_LE}
_JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}
#: compressed transfer syntax UID -> names of imagecodecs decoders, tried in order
_DECODERS = {
    "1.2.840.10008.1.2.4.50": ("jpeg8_decode",),  # JPEG baseline
    "1.2.840.10008.1.2.4.51": ("jpeg8_decode",),  # JPEG extended (12 bit)
    "1.2.840.10008.1.2.4.57": ("ljpeg_decode", "jpeg8_decode"),  # JPEG lossless
    "1.2.840.10008.1.2.4.70": ("ljpeg_decode", "jpeg8_decode"),  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": ("jpegls_decode",),  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": ("jpegls_decode",),  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": ("jpeg2k_decode",),  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": ("jpeg2k_decode",),  # JPEG 2000
    "1.2.840.10008.1.2.4.201": ("jpeg2k_decode",),  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": ("jpeg2k_decode",),  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": ("jpeg2k_decode",),  # HTJ2K
    "1.2.840.10008.1.2.4.110": ("jpegxl_decode",),  # JPEG XL lossless
    "1.2.840.10008.1.2.4.111": ("jpegxl_decode",),  # JPEG XL JPEG recompression
    "1.2.840.10008.1.2.4.112": ("jpegxl_decode",),  # JPEG XL
}
_COLOUR_PHOTOMETRIC = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"}
#: first decoder of a transfer syntax -> first bytes of its codestreams (JPEG/JPEG-LS SOI + a marker,
#: J2K SOC + SIZ, JPEG XL signature), which tell where a frame starts when fragments outnumber frames
_FRAME_START_MARKERS = {"jpeg8_decode": b"\xff\xd8\xff", "ljpeg_decode": b"\xff\xd8\xff",
                        "jpegls_decode": b"\xff\xd8\xff", "jpeg2k_decode": b"\xff\x4f\xff\x51",
                        "jpegxl_decode": b"\xff\x0a"}
#: DICOM ImageType flavour (third value) -> associated image name (OpenSlide's names)
_ASSOCIATED_FLAVOURS = {"LABEL": "label", "OVERVIEW": "macro", "THUMBNAIL": "thumbnail"}
#: tags copied into ``properties`` (as ``dicom.<keyword>``); patient identifiers are left out on purpose
_PROPERTY_KEYWORDS = (
    "Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions", "ContainerIdentifier",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "StudyDate", "AcquisitionDateTime",
    "ImageType", "PhotometricInterpretation", "DimensionOrganizationType", "LossyImageCompressionMethod",
    "LossyImageCompressionRatio", "Rows", "Columns", "NumberOfFrames",
)
#: modules whose exceptions, raised while wsidicom reads a region, mean a frame failed to decode
_CODEC_MODULES = {"imagecodecs", "PIL", "pylibjpeg", "openjpeg", "libjpeg"}
_ITEM = (0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = (0xFFFE, 0xE0DD)
_PIXEL_DATA = (0x7FE0, 0x0010)
_UNDEFINED_LENGTH = 0xFFFFFFFF
#: the sequence delimiter item that ends encapsulated pixel data, as stored (little endian)
_SEQUENCE_END = struct.pack("<HHI", *_SEQUENCE_DELIMITER, 0)
_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
_ANNOTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.91.1"


class DicomReader(SlideReader):
    """Reader for DICOM whole-slide images (VL Whole Slide Microscopy Image Storage).

    ``path`` is a folder of instances or one instance file. wsidicom reads conformant slides with their
    whole pyramid and associated images; files it refuses are read by a tolerant single-file reader
    (base level only), and a message in ``warnings`` says so and why.
    """

    backend = "dicom"

    # ------------------------------------------------------------------ opening
    def _open(self):
        self._wsi = None
        self._scale_levels: list[int] = []
        self._tile_sizes: list[tuple[int, int]] = []
        self._optical_paths: list[str] = []
        self._level_files: list[list[str]] = []
        self._damaged: dict[str, str] = {}
        self._frames: _FrameFile | None = None
        self.format = "DICOM WSI"
        try:
            import pydicom  # noqa: F401  (the tolerant reader and wsidicom both need it)
        except ImportError:
            raise UnsupportedFormatError(
                f"{self.path}: reading DICOM needs pydicom and wsidicom: pip install 'histoflow[dicom]'") from None
        if os.path.isdir(self.path):
            files = dicom_files_in(self.path)
            if not files:
                raise UnsupportedFormatError(
                    f"{self.path}: folder contains no DICOM files (nothing with a DICM preamble)")
        elif not os.path.exists(self.path):
            raise SlideNotFoundError(f"{self.path}: no such file or folder")
        elif not is_dicom_file(self.path):
            raise UnsupportedFormatError(f"{self.path}: not a DICOM file (no DICM preamble at byte 128)")
        else:
            files = [self.path]

        wsi, refusal, log = _open_wsidicom(files if len(files) > 1 else files[0])
        if wsi is not None:
            self._wsi = wsi
            with _quiet_pydicom():
                self._setup_wsidicom()
                self._check_files(files, log)
            return
        try:
            with _quiet_pydicom():
                self._setup_tolerant(files)
        except SlideReadError as exc:
            raise type(exc)(f"{self.path}: wsidicom refused it ({refusal}) and the tolerant DICOM reader "
                            f"failed too ({exc})") from None
        self.warnings.append(f"wsidicom refused it ({refusal}); read with histoflow's tolerant DICOM reader "
                             f"(base level of {os.path.basename(self._frames.path)} only)")
        self.warnings.extend(self._frames.notes)

    def _setup_wsidicom(self):
        """Fill the reader's attributes from an open ``WsiDicom``."""
        wsi = self._wsi
        pyramid_levels = list(wsi.pyramid.levels)
        base = pyramid_levels[0]
        w0, h0 = base.size.width, base.size.height
        self.levels = [Level(lv.size.width, lv.size.height, (w0 / lv.size.width + h0 / lv.size.height) / 2)
                       for lv in pyramid_levels]
        self._scale_levels = [lv.level for lv in pyramid_levels]
        self._tile_sizes = [(lv.tile_size.width, lv.tile_size.height) for lv in pyramid_levels]
        instance = base.default_instance
        ds = instance.dataset.as_dataset()
        image_data = instance.image_data
        self.dtype = np.dtype(image_data.dtype)
        photometric = str(image_data.photometric_interpretation)
        self.brightfield = photometric in _COLOUR_PHOTOMETRIC
        if int(image_data.samples_per_pixel) == 3:
            self.channel_names = ["R", "G", "B"]
        else:
            # wsidicom's Level.optical_paths is built from a set: its order changes from process to process.
            # Instance order (InstanceNumber, then file), then each instance's OpticalPathSequence order, is
            # stable; the names come from the OpticalPathSequence of every instance of the level.
            instances = _ordered_instances(base)
            self._optical_paths = list(dict.fromkeys(str(p) for inst, _ in instances for p in inst.optical_paths))
            names = {}
            for _, inst_ds in instances:
                for identifier, name in _optical_path_names(inst_ds).items():
                    names.setdefault(identifier, name)
            self.channel_names = [names.get(p, f"optical path {p}") for p in self._optical_paths]
        try:
            spacing = base.pixel_spacing  # mm, width = column spacing (x)
            self._native_mpp = (float(spacing.width) * 1000.0, float(spacing.height) * 1000.0)
        except Exception:  # wsidicom raises WsiDicomNoResolutionError when the spacing is missing
            self._native_mpp = None
        self.objective_power = _objective_power(ds)
        self.properties = _properties(ds, str(image_data.transfer_syntax))
        self.properties["dicom.reader"] = "wsidicom"
        if len(wsi.pyramids) > 1:
            self.warnings.append(f"{len(wsi.pyramids)} pyramids in the folder; reading the first")
        if wsi.labels is not None and len(wsi.labels):
            self._associated["label"] = partial(self._read_wsidicom_associated, "label")
        if wsi.overviews is not None and len(wsi.overviews):
            self._associated["macro"] = partial(self._read_wsidicom_associated, "macro")
        if wsi.pyramid.thumbnails is not None and len(wsi.pyramid.thumbnails):  # as the tolerant reader does
            self._associated["thumbnail"] = partial(self._read_wsidicom_associated, "thumbnail")

    def _check_files(self, files: list[str], log: list):
        """Warn about the DICOM files wsidicom left out (and why) and about truncated files it uses.

        wsidicom drops files silently (another slide, a header it cannot parse, ...) and opens a file whose
        pixel data is cut short; reads then fail with an end-of-file error that names no file.
        """
        wsi = self._wsi
        given = {os.path.realpath(path): path for path in files}
        self._level_files = [[path for inst in lv.instances.values() for path, _ in _instance_files(inst)]
                             for lv in wsi.pyramid.levels]
        used, other_pyramids = {}, {}
        for index, pyramid in enumerate(wsi.pyramids):
            instances = [inst for lv in pyramid.levels for inst in lv.instances.values()]
            if pyramid.thumbnails is not None:
                instances += list(pyramid.thumbnails.instances)
            for inst in instances:
                for path, dataset in _instance_files(inst):
                    if index == wsi.selected_pyramid:
                        used[path] = (dataset, inst)
                    else:
                        other_pyramids.setdefault(path, index)
        for series in (wsi.labels, wsi.overviews):
            for inst in (series.instances if series is not None else []):
                for path, dataset in _instance_files(inst):
                    used[path] = (dataset, inst)
        for path, (dataset, inst) in used.items():
            off = _off_grid_frame(path, dataset)
            if off is not None:  # wsidicom would put the frame on the tile left of / above it, silently
                raise UnsupportedFormatError(f"{given.get(path, path)}: {off}")
            reason = _truncation(path, dataset, inst)
            if reason:
                self._damaged[path] = reason = f"{given.get(path, path)}: {reason}"
                self.warnings.append(reason)
        if len(files) < 2:
            return
        base = wsi.pyramid.base_level.default_instance.dataset.as_dataset()
        left_out = []
        for path in files:
            key = os.path.realpath(path)
            if key in used:
                continue
            if key in other_pyramids:
                left_out.append(f"{os.path.basename(path)} (in pyramid {other_pyramids[key] + 1}, not read)")
                continue
            reason = _why_not_used(path, base, log)
            if reason is not None:
                left_out.append(f"{os.path.basename(path)} ({reason})")
        if left_out:
            self.warnings.append(f"{len(left_out)} of the {len(files)} DICOM files in the folder are not used: "
                                 + "; ".join(left_out))

    def _setup_tolerant(self, files: list[str]):
        """Open the largest volume image among ``files`` with :class:`_FrameFile`."""
        if len(files) == 1:
            headers, volume = [], files[0]
            try:
                flavour = _flavour(_read_header(volume))
            except SlideReadError:  # damaged: _FrameFile says how
                flavour = ""
            if flavour in _ASSOCIATED_FLAVOURS:  # a label photo tiled as tissue; a folder leaves it out too
                raise UnsupportedFormatError(
                    f"{self.path}: a DICOM {flavour} image (ImageType {flavour}), not a pyramid level of a slide; "
                    f"open the slide's folder (its {_ASSOCIATED_FLAVOURS[flavour]} image is then in "
                    "associated_images) or its VOLUME file")
        else:
            headers, unreadable = [], []
            for path in files:
                try:
                    headers.append((path, _read_header(path)))
                except SlideReadError as exc:  # a damaged or truncated file: left out, and said so
                    unreadable.append(str(exc))
            volumes = [(_matrix_area(ds), os.path.getsize(path), path)
                       for path, ds in headers if _flavour(ds) not in _ASSOCIATED_FLAVOURS]
            if not volumes:
                if unreadable:
                    raise SlideReadError(f"{self.path}: no readable volume (pyramid level) image among the DICOM "
                                         f"files: {'; '.join(unreadable)}")
                raise UnsupportedFormatError(f"{self.path}: no volume (pyramid level) image among the DICOM files")
            volume = max(volumes)[2]
            self.warnings.extend(f"not used: {message}" for message in unreadable)
        self._frames = frames = _FrameFile(volume)
        self.levels = [Level(frames.width, frames.height, 1.0)]
        self.dtype = frames.dtype
        self.brightfield = frames.samples == 3
        self.channel_names = frames.channel_names
        self._native_mpp = frames.mpp
        self.objective_power = _objective_power(frames.dataset)
        self.properties = _properties(frames.dataset, frames.transfer_syntax)
        self.properties["dicom.reader"] = "tolerant"
        for path, ds in headers:
            name = _ASSOCIATED_FLAVOURS.get(_flavour(ds))
            if path != volume and name and name not in self._associated:
                self._associated[name] = partial(_read_whole_image, path)

    # ------------------------------------------------------------------ pixels
    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if self._frames is not None:
            return self._frames.read(x, y, w, h, self.fill_value)
        scale = self._scale_levels[level]
        try:
            if self._optical_paths:
                planes = [self._wsi.read_region((x, y), scale, (w, h), path=p, as_array=True)
                          for p in self._optical_paths]
                out = np.stack([np.asarray(p).reshape(h, w) for p in planes], axis=-1)
            else:
                out = np.asarray(self._wsi.read_region((x, y), scale, (w, h), as_array=True))
        except Exception as exc:  # wsidicom and its decoders raise many kinds of errors on damaged data
            tile_w, tile_h = self._tile_sizes[level]
            where = (f"level {level} region x={x} y={y} {w}x{h} (tile columns {x // tile_w}-{(x + w - 1) // tile_w}, "
                     f"rows {y // tile_h}-{(y + h - 1) // tile_h})")
            damage = "".join(f"; {self._damaged[path]}" for path in self._level_files[level]
                             if path in self._damaged) if level < len(self._level_files) else ""
            if type(exc).__module__.split(".")[0] in _CODEC_MODULES:
                raise TileDecodeError(f"{self.path}: cannot decode a frame of {where}: "
                                      f"{type(exc).__name__}: {exc}{damage}") from None
            if isinstance(exc, EOFError) and not damage:
                damage = " (a file of the level ends early: truncated?)"
            raise SlideReadError(f"{self.path}: wsidicom failed to read {where}: {type(exc).__name__}: "
                                 f"{exc}{damage}") from None
        if out.ndim == 2:
            out = out[:, :, None]
        return np.ascontiguousarray(out, dtype=self.dtype)

    def _read_wsidicom_associated(self, name: str) -> np.ndarray:
        """Decode the first label, overview ("macro") or thumbnail instance wsidicom found, as ``(h, w, 3)``."""
        self._check_open()
        try:
            if name == "thumbnail":
                group = self._wsi.pyramid.thumbnails[0]
                image = self._wsi.read_thumbnail((group.size.width, group.size.height), as_array=True)
            else:
                image = self._wsi.read_label(as_array=True) if name == "label" else \
                    self._wsi.read_overview(as_array=True)
                group = (self._wsi.labels if name == "label" else self._wsi.overviews)[0]
            declared = (int(group.size.height), int(group.size.width))
        except Exception as exc:  # wsidicom and its decoders raise many kinds of errors on damaged data
            raise SlideReadError(f"{self.path}: cannot read the {name} image: {type(exc).__name__}: "
                                 f"{exc}{self._damage_of(name)}") from None
        image = np.asarray(image)
        if image.shape[:2] != declared:  # a short compressed stream decodes to fewer rows, silently
            raise TileDecodeError(f"{self.path}: the {name} image decodes to {image.shape[1]} x {image.shape[0]} "
                                  f"pixels, but the file declares {declared[1]} x {declared[0]} (truncated data?)"
                                  f"{self._damage_of(name)}")
        return _as_rgb(image)

    def _damage_of(self, name: str) -> str:
        """'; <file>: file is truncated ...' for each damaged file of the first label or overview, or ''."""
        try:
            series = {"label": self._wsi.labels, "macro": self._wsi.overviews,
                      "thumbnail": self._wsi.pyramid.thumbnails}[name]
            files = [path for inst in series[0].instances.values() for path, _ in _instance_files(inst)]
        except Exception:  # only adds to a message about an error already raised
            return ""
        return "".join(f"; {self._damaged[path]}" for path in files if path in self._damaged)

    def _close(self):
        if getattr(self, "_wsi", None) is not None:
            self._wsi.close()
            self._wsi = None
        if getattr(self, "_frames", None) is not None:
            self._frames.close()
            self._frames = None


# ---------------------------------------------------------------------- tolerant single-file reader
class _FrameFile:
    """One tiled DICOM image read frame by frame: pydicom for metadata, ``os.pread`` for frames.

    At open only the metadata and the 8-byte item headers of the encapsulated pixel data are read; they
    give every frame's byte ranges. Supports TILED_FULL (and TILED_SPARSE when the frames lie on the tile
    grid), one focal plane and optical path (the first), encapsulated frames of the codecs imagecodecs
    decodes, and native (uncompressed) little-endian pixel data. Frame numbers in messages are 1-based, as
    in DICOM.

    Attributes
    ----------
    path : str
    dataset : pydicom.Dataset
        The metadata (without pixel data).
    transfer_syntax, photometric : str
    width, height : int
        Total pixel matrix size.
    tile_width, tile_height : int
        Frame size.
    samples : int
        Samples per pixel (3 for colour, 1 for grey).
    dtype : numpy.dtype
    mpp : (float, float) or None
        (x, y) µm/px from the pixel measures, None when absent.
    channel_names : list of str
    notes : list of str
        Irregularities found while opening (missing tags, truncation, ...).
    """

    def __init__(self, path: str):
        self.path = path
        self.notes: list[str] = []
        self._fd = None
        with open(path, "rb") as fp:
            ds = _read_header(fp)
            pixel_start = fp.tell()
        self.dataset = ds
        self.transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        self._check_pixel_format(ds)
        self.tile_width, self.tile_height = int(ds.Columns), int(ds.Rows)
        self.width = int(ds.get("TotalPixelMatrixColumns") or self.tile_width)
        self.height = int(ds.get("TotalPixelMatrixRows") or self.tile_height)
        self.tiles_across = -(-self.width // self.tile_width)
        self.tiles_down = -(-self.height // self.tile_height)
        self.n_frames = int(ds.get("NumberOfFrames") or 1)
        self.mpp = _pixel_spacing_mpp(ds)
        if self.mpp is None:
            self.notes.append("no PixelSpacing in the pixel measures: mpp is unknown")
        if "ImageType" not in ds:
            self.notes.append("ImageType is missing")
        self._plane_path = None  # optical path of the frames read, when the frames name it (TILED_SPARSE)
        self._guess_order = False  # frames of no stated organisation: their order found from their edges
        self._tile_frames = self._tile_to_frame(ds)
        names = _optical_path_names(ds)
        if self.samples == 3:
            self.channel_names = ["R", "G", "B"]
        elif self._plane_path is not None:
            self.channel_names = [names.get(self._plane_path, self._plane_path)]
        else:
            self.channel_names = list(names.values())[:1]
        if len(self.channel_names) != self.samples:  # no optical path named: named as the other readers do
            self.channel_names = (["intensity"] if self.samples == 1
                                  else [f"channel {i}" for i in range(self.samples)])
        self._file_size = os.path.getsize(path)
        self._fd = os.open(path, os.O_RDONLY) if hasattr(os, "pread") else None
        try:
            if self.transfer_syntax in _NATIVE_SYNTAXES:
                self._frames = self._index_native(pixel_start)
            else:
                self._frames = self._index_encapsulated(pixel_start)
        except BaseException:
            self.close()
            raise
        if len(self._frames) < self.n_frames:
            self.notes.append(f"file is truncated ({self._file_size} bytes): only {len(self._frames)} of "
                              f"{self.n_frames} frames are complete; reading the lost ones raises SlideReadError")
        self._column_major = False
        if self._guess_order:
            self._column_major = self._frames_run_down_columns()
            self.notes.append("DimensionOrganizationType is missing; frames taken " + (
                "column by column (their edges meet so, not row by row as TILED_FULL would have them)"
                if self._column_major else "as TILED_FULL (row by row)"))

    def _frames_run_down_columns(self, sample: int = 8) -> bool:
        """For frames whose order the file does not say: whether they run down the columns (as some converters
        write them: PathML's small_dicom.dcm) rather than along the rows (TILED_FULL). Neighbouring frames of
        a slide continue each other across their shared edge; the order under which the edges of a few inner
        frames meet clearly better wins, rows when neither does (a blank slide)."""
        across, down = self.tiles_across, self.tiles_down
        inner = [(c, r) for r in range(down - 1) for c in range(across - 1)]
        if not inner:
            return False
        picks = [inner[int(i)] for i in np.unique(np.linspace(0, len(inner) - 1, min(sample, len(inner))).round())]
        cache: dict = {}

        def frame(index):
            if index not in cache:
                try:
                    data = b"".join(self._read_bytes(o, n, f"frame {index + 1}") for o, n in self._frames[index])
                    cache[index] = self._decode(data).astype(np.float32)
                except Exception:  # noqa: BLE001 - an unreadable frame: no evidence either way
                    cache[index] = None
            return cache[index]

        score = {}
        for name, index in (("rows", lambda c, r: r * across + c), ("columns", lambda c, r: c * down + r)):
            steps = []
            for c, r in picks:
                if max(index(c + 1, r), index(c, r + 1)) >= len(self._frames):
                    continue
                t, right, below = frame(index(c, r)), frame(index(c + 1, r)), frame(index(c, r + 1))
                if t is None or right is None or below is None:
                    continue
                steps.append(float(np.abs(t[:, -1] - right[:, 0]).mean()))
                steps.append(float(np.abs(t[-1] - below[0]).mean()))
            score[name] = float(np.median(steps)) if steps else None
        if score["rows"] is None or score["columns"] is None:
            return False
        return score["columns"] < 0.5 * score["rows"] and score["rows"] > 2.0

    # .................................................................. metadata checks
    def _check_pixel_format(self, ds):
        ts = self.transfer_syntax
        if ts not in _NATIVE_SYNTAXES and ts not in _DECODERS:
            raise UnsupportedFormatError(f"{self.path}: transfer syntax {ts or '(missing)'} is not supported by "
                                         "the tolerant DICOM reader")
        for keyword in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated"):
            if keyword not in ds:
                raise SlideReadError(f"{self.path}: no {keyword} tag: not an image")
        for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "TotalPixelMatrixColumns",
                        "TotalPixelMatrixRows", "NumberOfFrames"):
            if keyword not in ds:
                continue
            v = ds.get(keyword)
            try:
                ok = v is not None and not isinstance(v, (list, tuple, bytes, str)) and int(v) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok and not (keyword == "NumberOfFrames" and v in (None, "")):
                raise SlideReadError(f"{self.path}: damaged header: {keyword} is {v!r}, not one positive number")
        self.samples = int(ds.SamplesPerPixel)
        self.photometric = str(ds.PhotometricInterpretation).strip()
        bits = int(ds.BitsAllocated)
        if not ((self.samples == 3 and self.photometric in _COLOUR_PHOTOMETRIC)
                or (self.samples == 1 and self.photometric == "MONOCHROME2")):
            raise UnsupportedFormatError(f"{self.path}: {self.samples} samples with photometric interpretation "
                                         f"{self.photometric} are not supported")
        if bits not in (8, 16) or (bits == 16 and self.samples != 1):
            raise UnsupportedFormatError(f"{self.path}: {bits}-bit {self.photometric} pixels are not supported")
        if ts in _NATIVE_SYNTAXES and self.photometric not in ("RGB", "YBR_FULL", "MONOCHROME2"):
            raise UnsupportedFormatError(f"{self.path}: uncompressed {self.photometric} pixels are not supported")
        self.dtype = np.dtype(np.uint8 if bits == 8 else np.uint16)
        self._planar = int(ds.get("PlanarConfiguration") or 0) == 1

    def _tile_to_frame(self, ds):
        """None for TILED_FULL (frame = row * tiles_across + column), else a dict (column, row) -> frame."""
        organisation = str(ds.get("DimensionOrganizationType", "")).strip().upper()
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        positioned = bool(per_frame) and "PlanePositionSlideSequence" in per_frame[0]
        n_tiles = self.tiles_across * self.tiles_down
        if organisation == "TILED_SPARSE" or (not organisation and positioned):
            return self._sparse_tile_map(per_frame if positioned else None)
        if organisation not in ("TILED_FULL", ""):
            raise UnsupportedFormatError(f"{self.path}: DimensionOrganizationType {organisation} is not supported")
        self._guess_order = not organisation and self.n_frames == n_tiles and min(self.tiles_across,
                                                                                   self.tiles_down) > 1
        if not organisation and not self._guess_order:
            self.notes.append("DimensionOrganizationType is missing; frames taken as TILED_FULL (row by row)")
        if self.n_frames < n_tiles:
            raise SlideReadError(f"{self.path}: {self.n_frames} frames cannot tile a {self.width} x {self.height} "
                                 f"matrix in {self.tile_width} x {self.tile_height} tiles ({n_tiles} needed)")
        if self.n_frames > n_tiles:
            self.notes.append(f"{self.n_frames} frames for {n_tiles} tiles (several focal planes or optical "
                              "paths); reading the first plane")
        return None

    def _sparse_tile_map(self, per_frame) -> dict:
        """Tile grid position of each frame of a TILED_SPARSE image (first focal plane and optical path)."""
        if per_frame is None or len(per_frame) != self.n_frames:
            raise UnsupportedFormatError(f"{self.path}: TILED_SPARSE without a plane position for every frame")
        out = {}
        planes = {}  # (z, optical path) -> number of frames, in the order of their first frames
        for index, item in enumerate(per_frame):
            try:
                position = item.PlanePositionSlideSequence[0]
                paths = item.get("OpticalPathIdentificationSequence")
                plane = (position.get("ZOffsetInSlideCoordinateSystem"),
                         str(paths[0].get("OpticalPathIdentifier")) if paths else None)
                column = int(position.ColumnPositionInTotalImagePixelMatrix) - 1
                row = int(position.RowPositionInTotalImagePixelMatrix) - 1
            except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
                raise SlideReadError(f"{self.path}: damaged plane position of TILED_SPARSE frame {index + 1} "
                                     f"({type(e).__name__}: {e})") from None
            planes[plane] = planes.get(plane, 0) + 1
            if plane != next(iter(planes)):
                continue
            if column % self.tile_width or row % self.tile_height:
                raise UnsupportedFormatError(f"{self.path}: TILED_SPARSE frame {index + 1} at column {column + 1}, "
                                             f"row {row + 1} is not on the {self.tile_width} x "
                                             f"{self.tile_height} tile grid")
            out.setdefault((column // self.tile_width, row // self.tile_height), index)
        if not planes:
            return out
        first_z, self._plane_path = next(iter(planes))
        if len(planes) > 1:
            paths = list(dict.fromkeys(path for _, path in planes))
            zs = list(dict.fromkeys(z for z, _ in planes))
            name = _optical_path_names(self.dataset).get(self._plane_path, self._plane_path)
            read = [f"optical path {self._plane_path} '{name}'" if self._plane_path is not None else None,
                    f"z {first_z}" if len(zs) > 1 else None]
            kinds = [f"{len(paths)} optical paths" if len(paths) > 1 else None,
                     f"{len(zs)} focal planes" if len(zs) > 1 else None]
            self.notes.append(f"frames of {len(planes)} planes ({', '.join(k for k in kinds if k)}); reading the "
                              f"first frame's ({', '.join(r for r in read if r)}), the others are dropped")
        return out

    # .................................................................. frame index
    def _index_native(self, start: int) -> list:
        """Byte ranges of the frames of native pixel data: contiguous, each of the same size."""
        header = self._element_header(start)
        frame_bytes = self.tile_width * self.tile_height * self.samples * self.dtype.itemsize
        first = start + header
        complete = min(self.n_frames, max(0, (self._file_size - first) // frame_bytes))
        return [((first + i * frame_bytes, frame_bytes),) for i in range(complete)]

    def _index_encapsulated(self, start: int) -> list:
        """Byte ranges of each frame's fragments, from the item headers that follow the PixelData tag."""
        header = self._element_header(start)
        if struct.unpack("<I", self._pread(start + header - 4, 4))[0] != _UNDEFINED_LENGTH:
            raise SlideReadError(f"{self.path}: compressed transfer syntax but the pixel data is not encapsulated")
        position = start + header
        tag, length = self._item_header(position)
        if tag != _ITEM:
            raise SlideReadError(f"{self.path}: damaged pixel data: no basic offset table item at byte {position}")
        raw = self._pread(position + 8, length) if length else b""
        if len(raw) != length or length % 4:
            raise SlideReadError(f"{self.path}: file is truncated or damaged inside the basic offset table of its "
                                 f"pixel data ({length} bytes at byte {position + 8:,}, {len(raw)} there)")
        table = np.frombuffer(raw, "<u4").astype(np.int64) if length else None
        position += 8 + length
        first_item = position
        fragments = []  # (offset of data, length)
        truncated = False
        while True:
            tag, length = self._item_header(position)
            if tag is None or (tag == _ITEM and position + 8 + length > self._file_size):
                truncated = True
                break
            if tag == _SEQUENCE_DELIMITER:
                break
            if tag != _ITEM:
                raise SlideReadError(f"{self.path}: damaged pixel data: unexpected tag ({tag[0]:04X},{tag[1]:04X}) "
                                     f"at byte {position} after {len(fragments)} fragments")
            fragments.append((position + 8, length))
            position += 8 + length
        return self._group_fragments(fragments, table, first_item, position if truncated else None)

    def _group_fragments(self, fragments, table, first_item, lost_at) -> list:
        """Split fragments into frames; ``lost_at`` is where a truncated file's lost data began."""
        n = self.n_frames
        item_index = {offset - 8 - first_item: i for i, (offset, _) in enumerate(fragments)}
        if n == 1:
            starts = [0] if fragments else []
            lost_starts_frame = False
        elif table is not None and len(table) == n and table[0] == 0 and np.all(np.diff(table) > 0):
            starts = [item_index[t] for t in table.tolist() if t in item_index]
            lost_starts_frame = lost_at is not None and (lost_at - first_item) in set(table.tolist())
        elif len(fragments) == n and lost_at is None:
            starts = list(range(n))
            lost_starts_frame = False
        else:
            marker = _FRAME_START_MARKERS[_DECODERS[self.transfer_syntax][0]]
            starts = [i for i, (offset, _) in enumerate(fragments)
                      if self._pread(offset, len(marker)) == marker]
            lost_starts_frame = lost_at is not None and self._pread(lost_at + 8, len(marker)) == marker
        if lost_at is None and len(starts) != n:
            raise SlideReadError(f"{self.path}: damaged pixel data: its {len(fragments)} fragments form "
                                 f"{len(starts)} frames (by the basic offset table or the codestream markers) "
                                 f"but NumberOfFrames is {n}")
        if fragments and (not starts or starts[0] != 0):
            raise SlideReadError(f"{self.path}: damaged pixel data: the first fragment does not start a frame")
        frames = [tuple(fragments[a:b]) for a, b in zip(starts, starts[1:] + [len(fragments)])]
        if lost_at is not None and not lost_starts_frame:
            frames = frames[:-1]  # the last frame lost some of its fragments
        return frames[:n]

    def _element_header(self, start: int):
        """Check that PixelData starts at ``start``; return the length of its element header in bytes."""
        head = self._pread(start, 12)
        if len(head) < 8:
            raise SlideReadError(f"{self.path}: the file ends before its pixel data (truncated)")
        group, element = struct.unpack("<HH", head[:4])
        if (group, element) != _PIXEL_DATA:
            raise SlideReadError(f"{self.path}: no PixelData element (found ({group:04X},{element:04X}) instead)")
        return 8 if self.transfer_syntax == _IMPLICIT_VR_LE else 12

    def _item_header(self, position: int):
        """(group, element), length of the item header at ``position``; (None, 0) past the end of the file."""
        head = self._pread(position, 8)
        if len(head) < 8:
            return None, 0
        group, element, length = struct.unpack("<HHI", head)
        return (group, element), length

    def _pread(self, offset: int, length: int) -> bytes:
        if self._fd is not None:
            return os.pread(self._fd, length, offset)
        with open(self.path, "rb") as f:  # platforms without pread: a private handle per call
            f.seek(offset)
            return f.read(length)

    # .................................................................. pixels
    def read(self, x: int, y: int, w: int, h: int, fill) -> np.ndarray:
        """The ``(h, w, samples)`` region at (x, y); tiles absent from a sparse image are ``fill``."""
        tw, th = self.tile_width, self.tile_height
        columns = range(x // tw, (x + w - 1) // tw + 1)
        rows = range(y // th, (y + h - 1) // th + 1)
        if len(columns) == 1 and len(rows) == 1:
            tile = self.read_tile(columns[0], rows[0])
            if tile is not None:
                x0, y0 = x - columns[0] * tw, y - rows[0] * th
                return tile[y0:y0 + h, x0:x0 + w].copy()
        out = np.full((h, w, self.samples), fill, dtype=self.dtype)
        for row in rows:
            for column in columns:
                tile = self.read_tile(column, row)
                if tile is None:
                    continue
                tx, ty = column * tw, row * th
                x0, x1 = max(x, tx), min(x + w, tx + tw)
                y0, y1 = max(y, ty), min(y + h, ty + th)
                out[y0 - y:y1 - y, x0 - x:x1 - x] = tile[y0 - ty:y1 - ty, x0 - tx:x1 - tx]
        return out

    def read_tile(self, column: int, row: int) -> np.ndarray | None:
        """The decoded frame at a tile grid position, ``(tile_height, tile_width, samples)``; None if absent."""
        if self._tile_frames is None:
            index = column * self.tiles_down + row if self._column_major else row * self.tiles_across + column
        else:
            index = self._tile_frames.get((column, row))
            if index is None:
                return None
        where = f"frame {index + 1} of {self.n_frames} (tile column {column}, row {row})"
        if index >= len(self._frames):
            raise SlideReadError(f"{self.path}: file is truncated: {where} lies beyond its end "
                                 f"({self._file_size} bytes)")
        data = b"".join(self._read_bytes(offset, length, where) for offset, length in self._frames[index])
        try:
            tile = self._decode(data)
        except Exception as exc:  # decoders raise many kinds of errors on damaged data
            raise TileDecodeError(f"{self.path}: cannot decode {where}: {type(exc).__name__}: {exc}") from None
        expected = (self.tile_height, self.tile_width, self.samples)
        if tile.shape != expected:
            raise TileDecodeError(f"{self.path}: {where} decoded to shape {tile.shape}, expected {expected}")
        return tile

    def _read_bytes(self, offset: int, length: int, where: str) -> bytes:
        try:
            data = self._pread(offset, length)
        except OSError as exc:
            raise SlideReadError(f"{self.path}: cannot read {where}: {exc.strerror or exc}") from None
        if len(data) != length:
            raise SlideReadError(f"{self.path}: file is truncated: {where} lies beyond its end")
        return data

    def _decode(self, data: bytes) -> np.ndarray:
        """Decode one frame to ``(rows, columns, samples)`` RGB or grey."""
        if self.transfer_syntax in _NATIVE_SYNTAXES:
            return self._decode_native(data)
        import imagecodecs

        if self.transfer_syntax in _JPEG_SYNTAXES and self.photometric == "RGB" and not _jpeg_signals_colour(data):
            # DICOM says RGB and the stream has no JFIF/Adobe marker: its components are RGB, not YCbCr
            # (libjpeg would assume YCbCr and convert them)
            decoders = [partial(imagecodecs.jpeg8_decode, colorspace="RGB", outcolorspace="RGB")]
        else:
            decoders = [getattr(imagecodecs, name) for name in _DECODERS[self.transfer_syntax]]
        errors = []
        for decode in decoders + [imagecodecs.imread]:
            try:
                tile = decode(data)
                break
            except Exception as exc:  # try the next decoder; report them all if none works
                errors.append(str(exc) or type(exc).__name__)
        else:
            raise ValueError("; ".join(errors))
        tile = np.asarray(tile)
        return tile[:, :, None] if tile.ndim == 2 else tile

    def _decode_native(self, data: bytes) -> np.ndarray:
        a = np.frombuffer(data, self.dtype.newbyteorder("<")).astype(self.dtype, copy=False)
        if self._planar:
            a = a.reshape(self.samples, self.tile_height, self.tile_width).transpose(1, 2, 0)
        else:
            a = a.reshape(self.tile_height, self.tile_width, self.samples)
        if self.photometric == "YBR_FULL":
            from pydicom.pixels import convert_color_space

            a = convert_color_space(a, "YBR_FULL", "RGB")
        return np.ascontiguousarray(a)

    def read_all(self) -> np.ndarray:
        """The whole image (for small associated images)."""
        return self.read(0, 0, self.width, self.height, 255 if self.samples == 3 else 0)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ---------------------------------------------------------------------- helpers
def _open_wsidicom(source):
    """``(WsiDicom, None, log)``, or ``(None, reason, log)`` when wsidicom is missing or refuses ``source``.

    ``log`` holds the log records wsidicom wrote while opening (kept off the root logger: it logs, rather
    than raises, on the files it leaves out). Levels are kept whatever their tile size (wsidicom's default
    ``strict_tile_size_check`` drops, silently, every level whose tile size differs from the base level's).
    """
    try:
        from wsidicom import WsiDicom
    except ImportError:
        return None, "wsidicom is not installed", []
    options = {}
    try:
        if "settings" in inspect.signature(WsiDicom.open).parameters:
            from wsidicom.config import Settings

            options["settings"] = Settings(strict_tile_size_check=False)
    except (ImportError, TypeError, ValueError):  # an older wsidicom: no per-object settings
        pass
    with _wsidicom_file_log() as log:
        try:
            return WsiDicom.open(source, **options), None, log
        except Exception as exc:  # wsidicom raises many kinds of errors on files it does not accept
            return None, f"{type(exc).__name__}: {exc}", log


@contextmanager
def _wsidicom_file_log():
    """Collect, in a list, what wsidicom's file source logs (warnings and errors, with tracebacks, about the
    files it leaves out) and keep it from the root logger: the reader's ``warnings`` say it instead.

    A filter of its own on the logger, added and removed, so that other threads opening slides at the same
    time leave the logger as it was.
    """
    logger = logging.getLogger("wsidicom.file.wsidicom_file_source")
    records: list[logging.LogRecord] = []

    def keep(record):
        records.append(record)
        return False

    logger.addFilter(keep)
    try:
        yield records
    finally:
        logger.removeFilter(keep)


def _ordered_instances(level) -> list:
    """(instance, pydicom dataset) of each instance of a wsidicom level, in a stable order: InstanceNumber,
    then file path."""
    def key(pair):
        inst, ds = pair
        try:
            number = int(ds.get("InstanceNumber"))
        except (TypeError, ValueError):
            number = float("inf")
        files = [path for path, _ in _instance_files(inst)]
        return number, min(files) if files else ""
    return sorted(((inst, inst.dataset.as_dataset()) for inst in level.instances.values()), key=key)


def _instance_files(instance) -> list:
    """(real path, WsiDataset) of each file of a wsidicom instance (none for an instance not read from files)."""
    files = getattr(instance.image_data, "files", None) or []
    return [(os.path.realpath(str(path)), dataset) for path, dataset in zip(files, instance.datasets)]


def _off_grid_frame(path, dataset) -> str | None:
    """Why a TILED_SPARSE instance cannot be read as tiles (a frame not on the tile grid), or None. wsidicom keeps
    no frame positions in its dataset, so the file's header is read again (sparse instances only)."""
    try:
        ds = dataset.as_dataset() if hasattr(dataset, "as_dataset") else dataset
        if str(ds.get("DimensionOrganizationType", "")).upper() != "TILED_SPARSE":
            return None
        dataset = _read_header(path)
        tw, th = int(dataset.Columns), int(dataset.Rows)
        for index, item in enumerate(dataset.get("PerFrameFunctionalGroupsSequence") or []):
            position = item.PlanePositionSlideSequence[0]
            column = int(position.ColumnPositionInTotalImagePixelMatrix) - 1
            row = int(position.RowPositionInTotalImagePixelMatrix) - 1
            if column % tw or row % th:
                return (f"TILED_SPARSE frame {index + 1} at column {column + 1}, row {row + 1} is not on the "
                        f"{tw} x {th} tile grid")
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, SlideReadError):
        return None  # damaged positions: wsidicom's own reads report them
    return None


#: how far from the end of a file :func:`_truncation` looks for the end of its pixel data
_TAIL_BYTES = 1 << 16


def _truncation(path: str, dataset, instance) -> str | None:
    """Why an instance file wsidicom opened is truncated, None when it looks whole.

    Cheap checks that need no frame index: encapsulated pixel data ends with a sequence delimiter item, the
    last 8 bytes of the file unless trailing padding or signatures follow it; native pixel data needs at least
    rows x columns x samples x bytes x frames.
    """
    try:
        size = os.path.getsize(path)
        if instance.image_data.transfer_syntax.is_encapsulated:
            with open(path, "rb") as f:
                f.seek(max(0, size - _TAIL_BYTES))
                tail = f.read(_TAIL_BYTES)
            end = tail.rfind(_SEQUENCE_END)
            # the pixel data's end, then nothing or what the standard lets follow it: digital signatures
            # (FFFA,FFFA) and data set trailing padding (FFFC,FFFC)
            if end < 0 or tail[end + 8:] and tail[end + 8:end + 12] not in (b"\xfa\xff\xfa\xff", b"\xfc\xff\xfc\xff"):
                return (f"file is truncated ({size:,} bytes): its encapsulated pixel data has no end (no sequence "
                        "delimiter at the end of the file); frames past the cut cannot be read")
        else:
            tile = dataset.tile_size
            needed = tile.width * tile.height * dataset.samples_per_pixel * (dataset.bits // 8) * dataset.frame_count
            if size < needed:
                return (f"file is truncated ({size:,} bytes): its {dataset.frame_count} uncompressed frames need "
                        f"{needed:,} bytes; frames past the cut cannot be read")
    except Exception:  # a check, not a reader: a file it cannot look at is left to the reads to report
        return None
    return None


def _why_not_used(path: str, base, log) -> str | None:
    """Why wsidicom left a file out of the slide, or None for a file it is right to leave out quietly
    (annotations, which are no pixels)."""
    try:
        ds = _read_header(path)
    except SlideReadError as exc:
        return str(exc).removeprefix(f"{path}: ")
    sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
    if sop_class == _ANNOTATION_SOP_CLASS:
        return None
    if sop_class != _WSI_SOP_CLASS:
        return f"not a VL Whole Slide Microscopy image: SOP class {sop_class or '(missing)'}"
    study = ds.get("StudyInstanceUID")
    if study and base.get("StudyInstanceUID") and str(study) != str(base.get("StudyInstanceUID")):
        return f"another study: StudyInstanceUID {study}"  # what wsidicom matches instances on
    for record in log:
        message = record.getMessage()
        if path in message or os.path.realpath(path) in message:
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                return f"wsidicom cannot read it: {type(exc).__name__}: {exc}"
            return f"wsidicom: {message}"
    flavour = _flavour(ds)
    if flavour not in ("VOLUME", *_ASSOCIATED_FLAVOURS):
        image_type = "\\".join(map(str, ds.get("ImageType") or [])) or "(missing)"
        return f"ImageType {image_type} is not one wsidicom reads"
    return "wsidicom left it out and gave no reason"


def _read_header(source):
    """pydicom metadata of a file (path or open binary file), without the pixel data.

    A file object is left positioned at the PixelData element. pydicom reads a header cut short without
    complaint (a partial dataset, or values shorter than their length): a WSI image whose header runs to
    the end of the file, with no pixel data after it, is reported as truncated.
    """
    import pydicom

    if isinstance(source, str):
        try:
            with open(source, "rb") as fp:
                return _read_header(fp)
        except OSError as exc:
            raise SlideReadError(f"{source}: cannot read: {exc.strerror or exc}") from None
    name = getattr(source, "name", "?")
    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(source, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many kinds of errors on damaged headers
        raise SlideReadError(f"{name}: damaged DICOM header: {type(exc).__name__}: {exc}") from None
    try:
        end, size = source.tell(), os.fstat(source.fileno()).st_size
    except (OSError, AttributeError, ValueError):  # not a plain file: no size to compare with
        return ds
    sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
    if end >= size and sop_class in ("", _WSI_SOP_CLASS):
        raise SlideReadError(f"{name}: file is truncated or damaged: it ends at byte {size:,}, inside its DICOM "
                             "header, before the pixel data")
    return ds


@contextmanager
def _quiet_pydicom():
    """Silence pydicom's warnings about over-long values and the like, common in converted slides."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _flavour(ds) -> str:
    """Third value of ImageType (VOLUME, LABEL, OVERVIEW, THUMBNAIL), "" when missing."""
    image_type = ds.get("ImageType")
    if not image_type or isinstance(image_type, str) or len(image_type) < 3:
        return ""
    return str(image_type[2]).strip().upper()


def _matrix_area(ds) -> int:
    width = int(ds.get("TotalPixelMatrixColumns") or ds.get("Columns") or 0)
    height = int(ds.get("TotalPixelMatrixRows") or ds.get("Rows") or 0)
    return width * height


def _pixel_spacing_mpp(ds):
    """(x, y) µm/px from the shared pixel measures (or a top-level PixelSpacing), None when absent."""
    spacing = None
    try:
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    except (AttributeError, IndexError, KeyError):
        spacing = ds.get("PixelSpacing")
    try:
        row_spacing, column_spacing = (float(v) for v in spacing)
    except (TypeError, ValueError):
        return None
    return (column_spacing * 1000.0, row_spacing * 1000.0)


def _optical_path_names(ds) -> dict:
    """Optical path identifier -> description (or identifier) from the OpticalPathSequence."""
    out = {}
    for item in ds.get("OpticalPathSequence") or []:
        identifier = str(item.get("OpticalPathIdentifier", len(out)))
        out[identifier] = str(item.get("OpticalPathDescription") or identifier)
    return out


def _objective_power(ds):
    for item in ds.get("OpticalPathSequence") or []:
        power = item.get("ObjectiveLensPower")
        if power not in (None, ""):
            try:
                return float(power)
            except (TypeError, ValueError):
                return None
    return None


def _properties(ds, transfer_syntax: str) -> dict:
    """A few identifying and technical tags as JSON-friendly strings (no patient identifiers)."""
    from pydicom.multival import MultiValue

    out = {"dicom.TransferSyntaxUID": transfer_syntax}
    for keyword in _PROPERTY_KEYWORDS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        out[f"dicom.{keyword}"] = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)
    return out


def _jpeg_signals_colour(data: bytes) -> bool:
    """True when a JPEG stream has a JFIF (APP0) or Adobe (APP14) marker that fixes its colour space."""
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker in (0xDA, 0xD9):  # start of scan / end of image: no more headers
            return False
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if (marker == 0xE0 and data[position + 4:position + 9] == b"JFIF\x00") or (
                marker == 0xEE and data[position + 4:position + 9] == b"Adobe"):
            return True
        position += 2 + length
    return False


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """``(h, w, 3)`` from grey, grey+channel axis or RGBA images."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3])


def _read_whole_image(path: str) -> np.ndarray:
    """Decode a whole (small) DICOM image, such as a label, with the tolerant reader."""
    with _quiet_pydicom():
        frames = _FrameFile(path)
    try:
        return _as_rgb(frames.read_all())
    finally:
        frames.close()

"""The SlideReader protocol: what every backend offers, and the checks they all share.

A backend subclasses :class:`SlideReader` and implements four hooks:

``_open()``
    open the file and set ``levels``, ``dtype``, ``channel_names``, ``format``, ``brightfield``, and where
    known ``_native_mpp``, ``objective_power``, ``properties`` and ``_associated`` (a dict of name ->
    zero-argument callable returning the image).
``_read(level, x, y, w, h)``
    return the ``(h, w, c)`` array of the given rectangle in *level* pixel coordinates; the rectangle
    is always fully inside the level (the base class clips and pads).
``_close()``
    release file handles.

Everything else (argument checks, the memory bound, padding past the edges, mpp plausibility,
thumbnails, pickling, context management) lives here, so every backend behaves the same.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import HistoflowError, ParameterError, RegionError, RegionTooLargeError, SlideReadError, TileDecodeError

#: Default bound on the memory one ``read_region`` may allocate (bytes). Override per reader with
#: ``open_slide(path, max_region_bytes=...)``.
DEFAULT_MAX_REGION_BYTES = 4 * 1024**3

#: Pixel sizes outside this range (µm/px) are treated as a broken resolution tag. No microscope image is
#: coarser than ~10 µm/px at full resolution (a 1x scan); print resolutions written by photo and figure tools
#: are: 300 dpi is 84.7 µm/px, 600 dpi 42.3, 1,200 dpi 21.2 (a crop saved at 300 dpi was tiled 169x enlarged).
PLAUSIBLE_MPP = (0.01, 20.0)


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels and its downsample relative to level 0."""

    width: int
    height: int
    downsample: float

    def as_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "downsample": self.downsample}


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"  # pragma: no cover


class AssociatedImages(Mapping):
    """Read-only mapping of associated image names (label, macro, thumbnail, ...) to arrays.

    Images are decoded on access, not when the slide is opened.
    """

    def __init__(self, loaders: dict, reader=None):
        self._loaders = dict(loaders)
        self._reader = reader

    def __getitem__(self, name):
        load = self._loaders[name]
        r = self._reader
        if r is None:
            return load()
        r._check_open()
        load = r._associated.get(name, load)  # a rested reader opened again has loaders of its own
        try:
            return np.array(load())  # a writable array of its own
        except HistoflowError:
            raise
        except Exception as e:  # noqa: BLE001 - a codec's own error on a damaged image
            raise TileDecodeError(f"{r.path}: the {name} image cannot be decoded ({type(e).__name__}: {e})") from None

    def __iter__(self):
        return iter(self._loaders)

    def __len__(self):
        return len(self._loaders)

    def __repr__(self):
        return f"AssociatedImages({sorted(self._loaders)})"


class SlideReader:
    """Base class of every backend. Use :func:`histoflow.open_slide` rather than the classes directly.

    Attributes
    ----------
    path : str
        The file (or folder, for DICOM) that was opened.
    levels : list of Level
        Pyramid levels, largest first. Associated images are never levels.
    dtype : numpy.dtype
        Native sample type (uint8 for most brightfield slides, uint16 for much fluorescence).
    channel_names : list of str
        One name per channel (``["R", "G", "B"]`` for brightfield RGB).
    brightfield : bool
        True for transmitted-light RGB slides; regions past the edge are padded with white for those
        and with 0 otherwise (see ``fill_value``). Decided from the file; ``brightfield=...`` overrides.
    warnings : list of str
        Problems noticed while opening (an implausible resolution tag, ...).
    """

    backend = "base"

    def __init__(self, path, *, mpp=None, max_region_bytes: int | None = None, brightfield: bool | None = None):
        self.path = os.fspath(path)
        # absolute now: the process may change folder before the reader is pickled for a worker
        self._abspath = os.path.abspath(self.path)
        self._kwargs = {"mpp": mpp, "max_region_bytes": max_region_bytes, "brightfield": brightfield}
        if max_region_bytes is None:
            max_region_bytes = DEFAULT_MAX_REGION_BYTES
        elif (isinstance(max_region_bytes, (bool, np.bool_))
              or not isinstance(max_region_bytes, (int, float, np.number))
              or not math.isfinite(max_region_bytes) or max_region_bytes != int(max_region_bytes)
              or max_region_bytes < 1):  # 0 became the default, -1 refused every read, "1e9" a bare ValueError
            raise ParameterError(f"{self.path}: max_region_bytes must be a whole number of bytes >= 1 (or None for "
                                 f"{DEFAULT_MAX_REGION_BYTES / 2**30:g} GiB), not {max_region_bytes!r}")
        self.max_region_bytes = int(max_region_bytes)
        self.warnings: list[str] = []
        self.levels: list[Level] = []
        self.dtype = np.dtype(np.uint8)
        self.channel_names: list[str] = []
        self.format = "unknown"
        self.brightfield = True
        self.objective_power: float | None = None
        self.properties: dict = {}
        self._native_mpp: tuple[float, float] | None = None
        self._associated: dict = {}
        self._mpp_override = None
        self._closed = False
        self._last_thumbnail = None  # (key, array): pipelines ask for the same view twice (pre-pass, stain fit)
        if mpp is not None:
            mpp = self._mpp_pair(mpp)  # checked before the file is opened, so a bad value leaves nothing open
        try:
            self._open()
        except BaseException:
            self._close()
            raise
        if brightfield is not None:
            self.brightfield = bool(brightfield)
        if not self.levels:
            raise SlideReadError(f"{self.path}: no image levels found")
        if not self.channel_names:
            self.channel_names = [f"channel {i}" for i in range(self.channels)]
        self._native_mpp = self._check_mpp(self._native_mpp, "the file's resolution metadata")
        if mpp is not None:
            self.mpp = mpp

    # ------------------------------------------------------------------ hooks for backends
    def _open(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def _close(self):
        pass

    # ------------------------------------------------------------------ metadata
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.levels[0].width, self.levels[0].height

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def channels(self) -> int:
        return len(self.channel_names) if self.channel_names else self._channels_hint()

    def _channels_hint(self) -> int:
        return 3

    @property
    def fill_value(self):
        """Value used for pixels outside the slide: white for brightfield, 0 for fluorescence."""
        if self.brightfield:
            return np.iinfo(self.dtype).max if self.dtype.kind in "ui" else 1.0
        return 0

    @property
    def mpp(self) -> tuple[float, float] | None:
        """(x, y) pixel size of level 0 in µm, or None when unknown or implausible.

        Assign to override it (for slides whose metadata is missing or wrong)."""
        return self._mpp_override if self._mpp_override is not None else self._native_mpp

    @mpp.setter
    def mpp(self, value):
        if value is None:
            self._mpp_override = None
            self._kwargs["mpp"] = None
            return
        value = self._mpp_pair(value)
        self._mpp_override = value
        self._kwargs["mpp"] = value

    def _mpp_pair(self, value) -> tuple[float, float]:
        """An mpp override as ``(x, y)`` µm/px: one positive number, or a pair of them; ParameterError else."""
        pair = None
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
            pair = (value, value)
        elif isinstance(value, (tuple, list, np.ndarray)) and len(value) == 2 and np.ndim(value) == 1:
            pair = tuple(value)
        try:  # elements: numbers (not text, None or booleans)
            if pair is not None and not any(isinstance(v, (str, bytes, bool, np.bool_)) or v is None for v in pair):
                pair = (float(pair[0]), float(pair[1]))
                if all(math.isfinite(v) and v > 0 for v in pair):
                    return pair
        except (TypeError, ValueError):
            pass
        raise ParameterError(f"{self.path}: mpp must be one positive number of µm per pixel or a pair (x, y) of "
                             f"them, got {value!r}")

    def _check_mpp(self, mpp, source: str):
        if mpp is None:
            return None
        try:
            mx, my = (float(mpp[0]), float(mpp[1])) if not np.isscalar(mpp) else (float(mpp), float(mpp))
        except (TypeError, ValueError):
            return None
        lo, hi = PLAUSIBLE_MPP
        if not (math.isfinite(mx) and math.isfinite(my)) or not (lo <= mx <= hi and lo <= my <= hi):
            self.warnings.append(
                f"implausible pixel size {mx:.6g} x {my:.6g} µm/px in {source} (expected {lo}-{hi}); "
                "ignored, mpp is unknown: pass mpp=... to set it (`--slide-mpp` on the command line)")
            return None
        return (mx, my)

    @property
    def associated_images(self) -> AssociatedImages:
        """Label, macro, thumbnail ... where the format has them, decoded on access."""
        return AssociatedImages(self._associated, self)

    def level_mpp(self, level: int):
        """(x, y) µm/px at a level, or None when the slide's mpp is unknown."""
        level = self._check_level(level)
        if self.mpp is None:
            return None
        ds = self.levels[level].downsample
        return (self.mpp[0] * ds, self.mpp[1] * ds)

    def best_level_for_downsample(self, downsample: float) -> int:
        """The level with the largest downsample not above ``downsample`` (as OpenSlide)."""
        if (isinstance(downsample, bool) or not isinstance(downsample, (int, float, np.integer, np.floating))
                or not math.isfinite(downsample) or downsample <= 0):
            raise ParameterError(f"{self.path}: downsample must be a positive number (level-0 pixels per level "
                                 f"pixel), not {downsample!r}")
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * (1 + 1e-6):
                best = i
        return best

    def info(self) -> dict:
        """Facts about the slide as a JSON-friendly dict (what ``histoflow info --json`` prints)."""
        w, h = self.dimensions
        return {
            "path": self.path,
            "format": self.format,
            "backend": self.backend,
            "width": w,
            "height": h,
            "levels": [lv.as_dict() for lv in self.levels],
            "mpp": list(self.mpp) if self.mpp is not None else None,
            "objective_power": self.objective_power,
            "channels": self.channels,
            "channel_names": list(self.channel_names),
            "dtype": self.dtype.name,
            "brightfield": self.brightfield,
            "associated_images": sorted(self._associated),
            "warnings": list(self.warnings),
        }

    # ------------------------------------------------------------------ pixels
    def _check_level(self, level) -> int:
        if isinstance(level, (bool, np.bool_)) or not isinstance(level, (int, np.integer)):
            raise RegionError(f"{self.path}: level must be an integer, got {level!r}")
        given = int(level)
        level = given + len(self.levels) if given < 0 else given
        if not 0 <= level < len(self.levels):
            raise RegionError(f"{self.path}: level {given} does not exist (the slide has {len(self.levels)}: "
                              f"0..{len(self.levels) - 1}, or -1..-{len(self.levels)} from the last)")
        return level

    def _channel_index(self, c: str) -> int:
        """The index of the channel named ``c`` (:class:`ChannelError` naming the channels if there is none)."""
        from ..errors import ChannelError

        if c in self.channel_names:
            return self.channel_names.index(c)
        raise ChannelError(f"{self.path}: no channel named {c!r}; the channels are {self.channel_names}")

    def check_region_bytes(self, w: int, h: int, what: str = "region"):
        need = int(w) * int(h) * self.channels * self.dtype.itemsize
        if need > self.max_region_bytes:
            raise RegionTooLargeError(
                f"{self.path}: refusing to read a {w} x {h} {what} ({self.channels} channels, "
                f"{self.dtype.name}): it would take {format_bytes(need)}, above the bound of "
                f"{format_bytes(self.max_region_bytes)}; read it in tiles (generate_tiles) or raise "
                "max_region_bytes")

    def read_region(self, location, level: int, size) -> np.ndarray:
        """Read a rectangle of a level.

        Parameters
        ----------
        location : (x, y)
            Top-left corner in **level-0** pixel coordinates (may lie outside the slide). It is mapped
            to the nearest pixel of ``level``; pixels are never interpolated. One exception: the
            ``openslide`` backend, at levels whose downsample is not a whole number, gets pixels that
            OpenSlide itself shifted by a fraction of a pixel (bilinear); OpenSlide's API takes level-0
            coordinates only. The ``tiff`` backend reads the same slides exactly.
        level : int
            Pyramid level to read from.
        size : (w, h)
            Size in pixels **of that level**.

        Returns
        -------
        numpy.ndarray
            ``(h, w, c)`` in the native dtype; pixels outside the slide are ``fill_value``.
        """
        self._check_open()
        level = self._check_level(level)
        try:
            x, y = (int(v) for v in location)
            w, h = (int(v) for v in size)
            if (x, y, w, h) != tuple(float(v) for v in (*location, *size)):
                raise ValueError  # 10.9 was read as 10 without a word
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            raise RegionError(f"{self.path}: location and size must be pairs of integers, "
                              f"got {location!r}, {size!r}") from None
        if w <= 0 or h <= 0:
            raise RegionError(f"{self.path}: region size must be positive, got {w} x {h}")
        self.check_region_bytes(w, h)
        lv = self.levels[level]
        # nearest level pixel: level-0 coordinates made from level ones (round(lx * ds)) map back exactly.
        # No sub-pixel resampling (OpenSlide interpolates when x / downsample is fractional).
        lx = math.floor(x / lv.downsample + 0.5)
        ly = math.floor(y / lv.downsample + 0.5)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lv.width), min(ly + h, lv.height)
        if x0 == lx and y0 == ly and x1 == lx + w and y1 == ly + h:
            a = self._read(level, x0, y0, w, h)
            # the caller's own array, whatever the backend (a view of a decoder's buffer may be read-only)
            return a if a.flags.writeable else a.copy()
        out = np.full((h, w, self.channels), self.fill_value, dtype=self.dtype)
        if x1 > x0 and y1 > y0:
            out[y0 - ly:y1 - ly, x0 - lx:x1 - lx] = self._read(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def read_level(self, level: int) -> np.ndarray:
        """A whole level as one array (refused above ``max_region_bytes``)."""
        level = self._check_level(level)
        lv = self.levels[level]
        self.check_region_bytes(lv.width, lv.height, what=f"level {level}")
        return self.read_region((0, 0), level, (lv.width, lv.height))

    def thumbnail(self, max_size: int = 512, channels=None) -> np.ndarray:
        """A downsampled view of the whole slide whose longer side is ``max_size`` pixels.

        Reads the smallest level that is still at least ``max_size`` on its longer side, in strips, so
        memory stays bounded whatever the slide size. Returns the native dtype, ``(h, w, c)``.
        ``channels`` (indices) keeps only those channels, in that order: a one-channel view of a
        22-channel slide takes 1/22 of the memory. The last thumbnail is kept while the slide is open, so
        asking again for the same one (the tissue pre-pass, then a slide-level stain fit) costs a copy.
        """
        self._check_open()
        given = max_size
        try:
            max_size = int(max_size)
        except (TypeError, ValueError, OverflowError):
            max_size = 0
        if isinstance(given, (bool, np.bool_)) or max_size <= 0 or max_size != given:
            raise RegionError(f"{self.path}: thumbnail size must be a positive whole number of pixels, got {given!r}")
        if channels is not None:
            items = list(channels) if isinstance(channels, (list, tuple)) else np.atleast_1d(channels).tolist()
            channels = [self._channel_index(c) if isinstance(c, str) else
                        int(c) if isinstance(c, np.integer) else c for c in items]
            bad = [c for c in channels if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.channels]
            if bad or not channels:
                raise RegionError(f"{self.path}: thumbnail channels {bad or channels} out of range: the slide has "
                                  f"{self.channels} channel(s)")
        w0, h0 = self.dimensions
        scale = max_size / max(w0, h0)
        tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        need = tw * th * (self.channels if channels is None else len(channels)) * self.dtype.itemsize
        if need > self.max_region_bytes:
            raise RegionTooLargeError(f"{self.path}: refusing to make a {tw} x {th} thumbnail: it would take "
                                      f"{format_bytes(need)}, above the bound of {format_bytes(self.max_region_bytes)}; "
                                      "ask for a smaller one (or raise max_region_bytes)")
        level = 0
        for i, lv in enumerate(self.levels):
            if max(lv.width, lv.height) >= max_size:
                level = i
        key = (max_size, None if channels is None else tuple(channels))
        last = self._last_thumbnail
        if last is not None and last[0] == key:
            return last[1].copy()
        out = _downscale_level(self, level, self.levels[level], tw, th, channels)
        self._last_thumbnail = (key, out.copy())
        return out

    # ------------------------------------------------------------------ life cycle
    #: True while a rested reader is opened again (other threads then wait for it, see :meth:`_check_open`)
    _waking = False

    def _check_open(self):
        if self._closed or self._waking:
            lock = getattr(self, "_wake_lock", None)
            if lock is None:
                raise SlideReadError(f"{self.path}: the slide has been closed")
            with lock:  # rested (see rest()): opened again by the first reader, once, in place (the backends'
                # loaders of associated images are bound to the reader); other threads wait here meanwhile
                if self._closed:
                    path, state = self.path, self.__getstate__()
                    self._waking = True
                    try:
                        self.__init__(state["path"], **state["kwargs"])
                    except BaseException:
                        self._closed = True  # (the file went away or changed): still resting, the next read
                        raise  # tries again and says why again, not a half-made reader
                    finally:
                        self._waking = False
                    self.path = path  # as given (relative paths stay relative in messages and info())

    def close(self):
        if not self._closed:
            self._closed = True
            self._last_thumbnail = None
            self._close()
        self._wake_lock = None  # closed for good: a later read is an error

    def rest(self):
        """Close the file's handles but stay usable: the next read opens the file again (with the same options).
        A run over many slides rests the ones it is not working on, so that a cohort is not limited by the
        number of files a process may hold open (a 500-slide run of SVS files used 1,000 handles)."""
        import threading

        if not self._closed:
            self._closed = True
            self._last_thumbnail = None
            self._close()
            self._wake_lock = threading.Lock()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # pickling: send the path and options, reopen on the other side
    def __getstate__(self):
        # absolute: a worker of a remote cluster (or one started in another folder) reopens the file from
        # its own working directory, where a relative path names nothing or another file
        return {"path": self._abspath, "kwargs": dict(self._kwargs)}

    def __setstate__(self, state):
        self.__init__(state["path"], **state["kwargs"])

    def __repr__(self):
        w, h = self.dimensions if self.levels else (0, 0)
        return (f"<{type(self).__name__} {os.path.basename(self.path)!r} {self.format}, {w}x{h}, "
                f"{len(self.levels)} level(s), {self.channels} ch {self.dtype.name}>")


def _downscale_level(reader: SlideReader, level: int, lv: Level, tw: int, th: int, channels=None) -> np.ndarray:
    """Area-average a level down to (tw, th), reading it in horizontal strips (``channels``: keep those)."""
    c = reader.channels
    fy, fx = lv.height / th, lv.width / tw
    # the output in the native dtype, filled strip by strip (a float64 image of many channels would take
    # 4-8x the memory of the result)
    out = np.empty((th, tw, c if channels is None else len(channels)), dtype=reader.dtype)
    # rows of the output covered by each strip: keep a strip under ~4 MiB (its float64 row sums take up to
    # 8x that, divided by the column downsample)
    row_bytes = lv.width * c * reader.dtype.itemsize
    # (and within the reader's bound: a 64 px thumbnail with max_region_bytes=2 MiB was refused)
    rows_per_strip = max(1, int(min(4 * 1024**2, reader.max_region_bytes) // max(row_bytes * max(fy, 1), 1)))
    ds = lv.downsample
    for oy0 in range(0, th, rows_per_strip):
        oy1 = min(th, oy0 + rows_per_strip)
        # output row i averages source rows [floor(i * fy), floor((i + 1) * fy)): a strip ends where its last
        # row's box ends, not a row into the next strip's first box
        sy0 = int(math.floor(oy0 * fy))
        # (enlarging, the last row takes the source row under it: floor((oy1 - 1) * fy), which may be the one
        # floor(oy1 * fy) names, then left out: the strip's last row repeated the row before)
        end = math.floor(oy1 * fy) if fy >= 1 else math.floor((oy1 - 1) * fy) + 1
        sy1 = lv.height if oy1 == th else min(lv.height, int(end))
        sy1 = max(sy1, sy0 + 1)
        try:
            strip = reader.read_region((0, int(round(sy0 * ds))), level, (lv.width, sy1 - sy0))
        except RegionTooLargeError as e:  # (it named an internal band of rows, and advised tiles)
            raise RegionTooLargeError(
                f"{reader.path}: a {tw} x {th} px picture of level {level} reads it in bands of whole rows "
                f"({lv.width} px wide, {sy1 - sy0} rows), above max_region_bytes "
                f"({format_bytes(reader.max_region_bytes)}): raise the bound to make it") from e
        if channels is not None:
            strip = strip[..., channels]
        if strip.shape[0] == oy1 - oy0 and strip.shape[1] == tw:  # same size: no resampling
            out[oy0:oy1] = strip
            continue
        part = _area_resize(strip, tw, oy1 - oy0, fx, fy, sy0, oy0)
        if reader.dtype.kind in "ui":
            info = np.iinfo(reader.dtype)
            part = np.clip(np.rint(part), info.min, info.max)
        out[oy0:oy1] = part.astype(reader.dtype)
    return out


def _area_resize(strip, tw, nrows, fx, fy, sy0, oy0):
    """Average the source pixels falling into each output pixel (box filter; nearest when enlarging)."""
    a = _resize_axis(strip, tw, fx, np.arange(tw) * fx, axis=1)
    return _resize_axis(a, nrows, fy, (oy0 + np.arange(nrows)) * fy - sy0, axis=0)


def _resize_axis(a, n, f, starts_f, axis):
    length = a.shape[axis]
    starts = np.clip(np.floor(starts_f).astype(np.int64), 0, length - 1)
    if f < 1:  # enlarging: nearest neighbour
        return np.take(a, starts, axis=axis).astype(np.float64)
    sums = np.add.reduceat(a, starts, axis=axis, dtype=np.float64)  # summed in float64, no float copy of a
    counts = np.maximum(np.diff(np.append(starts, length)), 1).astype(np.float64)
    shape = [1] * a.ndim
    shape[axis] = n
    return sums / counts.reshape(shape)

"""TIFF backend (tifffile + imagecodecs): SVS, generic tiled or stripped TIFF, pyramids (pages or SubIFDs),
OME-TIFF, QPTIFF, MIBItiff, ImageJ and multi-page channel stacks.

Reading is lazy and lean: for a region, only the tiles (or strips) it touches are read with ``os.pread``
(thread-safe, no shared file position) and decoded with tifffile's per-page decoder. Native dtypes are
kept (uint16 fluorescence stays uint16). A level is a list of *planes* (TIFF pages) whose samples are
concatenated into channels, so an RGB page, a page per channel, or a planar-separate page all read as
``(h, w, c)``.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import tifffile

from ..errors import SlideReadError, TileDecodeError, UnsupportedFormatError
from .base import Level, SlideReader
from .sniff import check_tiff_intact, quiet_tifffile

_MAX_DESCRIPTION = 4 * 1024**2  # bytes of ImageDescription we are willing to parse
_RGB_PHOTOMETRIC = {2, 6}  # RGB, YCbCr
_PALETTE = 3  # PhotometricInterpretation of palette (colormap) images
_CHANNEL_AXES = "CIQ"  # tifffile axes that hold channels (I: a plain multi-page stack); S is a page's samples
#: uncompressed strips whose rows lie end to end are read this many bytes at a time (a few rows), not whole:
#: ImageJ writes a plane as one strip, so a 16 px region of a 30k x 30k uint16 image decoded 1.8 GB a channel
_RAW_STRIP_BYTES = 1 << 20
#: compressed strips decoding to more than this are kept once decoded, for the reads that follow
_BIG_STRIP = 4 << 20


@dataclass
class _Plane:
    """One TIFF page as a source of ``samples`` channels, with everything the hot path needs."""

    page: object  # TiffPage or TiffFrame
    index: int  # page index in the file, for messages
    width: int
    height: int
    samples: int  # channels this plane contributes
    separate: int  # number of planar-separate sample planes (1 for contiguous)
    tile_w: int
    tile_h: int
    tiles_across: int
    tiles_down: int
    offsets: np.ndarray
    counts: np.ndarray
    jpegtables: bytes | None
    jpegheader: bytes | None
    tiled: bool
    keep: int  # samples to keep per decoded pixel (drops alpha)
    alpha: int = 0  # RGB + alpha: 1 associated (premultiplied), 2 unassociated; composited on white
    colormap: np.ndarray | None = None  # palette pages: (entries, 3) uint8 RGB, applied to each decoded tile
    invert: bool = False  # MinIsWhite: 0 is white; stored inverted so that values mean what they do elsewhere
    raw: np.dtype | None = None  # uncompressed rows read straight from the file in this dtype (file byte order)
    raw_samples: int = 0  # ... with this many samples per pixel in each strip
    ycbcr: bool = False  # YCbCr stored without JPEG (whose decoder converts): converted to RGB after decoding
    cmyk: bool = False  # 8-bit CMYK: converted to RGB after decoding (R = (255 - C)(255 - K) / 255, as Pillow)

    @classmethod
    def from_page(cls, page, keep_samples: int | None = None, colormap: np.ndarray | None = None,
                  data_offset: int | None = None) -> _Plane:
        """``data_offset``: where this plane's pixels start, for the planes of a truncated ImageJ stack, which
        follow the first page's, end to end, without pages of their own."""
        key = page.keyframe if hasattr(page, "keyframe") and page.keyframe is not None else page
        shaped = key.shaped  # (separate samples, depth, length, width, contig samples)
        separate, depth = int(shaped[0]), int(shaped[1])
        if depth != 1:
            raise UnsupportedFormatError(f"page {page.index}: volumetric TIFF tiles (depth {depth}) not supported")
        width, height, contig = int(shaped[3]), int(shaped[2]), int(shaped[4])
        if key.is_tiled:
            tw, th = int(key.tilewidth), int(key.tilelength)
        else:
            tw, th = width, int(min(key.rowsperstrip or height, height))
        if width <= 0 or height <= 0 or tw <= 0 or th <= 0:
            raise SlideReadError(f"page {page.index}: damaged: image {width} x {height} px in tiles or strips of "
                                 f"{tw} x {th} px")
        samples = separate * contig
        keep = samples if keep_samples is None else min(keep_samples, samples)
        if colormap is not None:  # one palette index per pixel becomes three colour samples
            samples = keep = 3
        try:
            offsets = np.asarray(page.dataoffsets, np.int64)
            counts = np.asarray(page.databytecounts, np.int64)
        except OverflowError:  # a BigTIFF offset or count of 2**63 or more: no file is that large
            raise SlideReadError(f"page {page.index}: damaged: tile/strip offsets or byte counts out of range "
                                 f"(2**63 bytes or more)") from None
        across, down = math.ceil(width / tw), math.ceil(height / th)
        need = separate * across * down
        if len(offsets) != need or len(counts) != need:
            raise SlideReadError(f"page {page.index}: truncated or damaged: {len(offsets)} tile/strip offsets and "
                                 f"{len(counts)} byte counts where the image needs {need}")
        raw = _raw_dtype(key, colormap)
        if raw is not None:
            row = width * contig * raw.itemsize
            starts = offsets.reshape(separate, down)[:, 0]
            if data_offset is not None:
                starts = data_offset + np.arange(separate, dtype=np.int64) * row * height
            ends = offsets.reshape(separate, down) + counts.reshape(separate, down)
            end_to_end = data_offset is not None or (
                np.array_equal(offsets.reshape(separate, down)[:, 1:], ends[:, :-1])
                and np.array_equal(ends[:, -1] - starts, np.full(separate, row * height)))
            if end_to_end:  # the plane is one block of rows: strips of ~1 MB, wherever its strips end
                th = int(max(1, min(height, _RAW_STRIP_BYTES // row)))
                down = math.ceil(height / th)
                first = np.arange(down, dtype=np.int64) * th
                offsets = (starts[:, None] + first[None, :] * row).ravel()
                counts = np.tile(np.minimum(th, height - first) * row, separate)
            else:
                raw = None
        elif data_offset is not None:
            raise UnsupportedFormatError(f"page {page.index}: an ImageJ stack whose planes have no pages of "
                                         "their own must be uncompressed")
        cmyk = int(key.photometric) == 5
        inkset = key.tags.get(332)  # InkSet: 1 CMYK (the default), 2 other inks
        cmyk_alpha = 0
        if cmyk and samples > 4 and tuple(getattr(key, "extrasamples", ()) or ()) and \
                int(tuple(key.extrasamples)[0]) in (1, 2):
            cmyk_alpha = int(tuple(key.extrasamples)[0])
        if cmyk and (key.dtype != np.uint8 or samples < 4 or separate > 1
                     or (inkset is not None and int(inkset.value) != 1)):
            raise UnsupportedFormatError(f"page {page.index}: separated (CMYK) pixels other than 8-bit contiguous "
                                         f"CMYK ({key.dtype}, {samples} inks) are not supported")
        if cmyk:
            samples = keep = 3
        ycbcr = int(key.photometric) == 6 and int(key.compression) not in (6, 7) and colormap is None
        if ycbcr and (tuple(getattr(key, "subsampling", None) or (1, 1)) != (1, 1) or key.dtype != np.uint8
                      or separate > 1):
            raise UnsupportedFormatError(
                f"page {page.index}: YCbCr without JPEG compression, subsampled {key.subsampling}, "
                f"{key.dtype}, {'planar' if separate > 1 else 'contiguous'}: only 8-bit contiguous YCbCr without "
                "subsampling is read here; OpenSlide reads the rest (backend='openslide')")
        alpha = 0
        extra = tuple(getattr(key, "extrasamples", ()) or ())
        if keep_samples is not None and samples > keep_samples and extra and int(extra[0]) in (1, 2) \
                and colormap is None:
            alpha = int(extra[0])  # contiguous or planar-separate: both are composited (see _read_plane)
        if cmyk:
            alpha = cmyk_alpha
        return cls(page=page, index=int(page.index), width=width, height=height, samples=keep,
                   separate=separate, tile_w=tw, tile_h=th, tiles_across=across,
                   tiles_down=down, offsets=offsets, counts=counts, jpegtables=key.jpegtables,
                   jpegheader=getattr(key, "jpegheader", None), tiled=bool(key.is_tiled), keep=keep, alpha=alpha,
                   colormap=colormap, invert=int(key.photometric) == 0 and colormap is None, raw=raw,
                   raw_samples=contig, ycbcr=ycbcr, cmyk=cmyk)

    def data_end(self) -> int:
        # in uint64: offset + count of a damaged entry near 2**63 would wrap around in int64 and pass as small
        return int((self.offsets.astype(np.uint64) + self.counts.astype(np.uint64)).max()) if len(self.offsets) else 0


class TiffReader(SlideReader):
    """Slides and images in TIFF containers, read with tifffile. See the module docstring."""

    backend = "tiff"

    # ------------------------------------------------------------------ opening
    def _open(self):
        path = self.path
        if not os.path.isfile(path):
            from ..errors import SlideNotFoundError

            raise SlideNotFoundError(f"{path}: no such file")
        check_tiff_intact(path)
        try:
            with quiet_tifffile() as log:
                self._tf = tifffile.TiffFile(path)
                series = self._tf.series
        except Exception as e:
            raise SlideReadError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None
        self.warnings.extend(f"tifffile: {m}" for m in log.messages[:5])
        lost = next((m for m in log.messages if "invalid page offset" in m), None)
        if lost is not None:  # the chain of image directories leaves the file: pages (channels, levels) lost
            n = len(self._tf.pages)
            self._tf.close()
            raise SlideReadError(f"{path}: file is truncated or damaged: only {n} image director{'y' if n == 1 else 'ies'} "
                                 f"can be read before the chain of directories points outside the file "
                                 f"({lost.split('>')[-1].strip()}); the rest of its images would be missing")
        if not series:
            raise UnsupportedFormatError(f"{path}: TIFF holds no image series")
        self._fd = os.open(path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        tf = self._tf
        first = tf.pages.first
        desc = first.description[:_MAX_DESCRIPTION] if first.description else ""

        if tf.is_qpi:
            self.format = "QPTIFF"
        elif tf.is_svs:
            self.format = "Aperio SVS"
        elif tf.is_ome:
            self.format = "OME-TIFF"
        elif desc.startswith('{"mibi.'):
            self.format = "MIBItiff"
        elif tf.is_imagej:
            self.format = "ImageJ TIFF"
        elif first.is_tiled:
            self.format = "tiled TIFF"  # refined below, once the pyramid is known
        else:
            self.format = "TIFF"

        self._levels_planes = []
        level0 = None
        self._main = _main_series(series) if not (tf.is_svs or tf.is_qpi) else 0
        if self._main:
            self.warnings.append(f"the file's first image is its {(series[0].name or '').strip()!r}; the slide is "
                                 f"image {self._main} ({(series[self._main].name or '').strip() or 'unnamed'})")
        series = series[self._main:] + series[:self._main]  # the slide's image first; the rest as they were
        for i, lvl in enumerate(self._pyramid(series)):
            try:
                planes = self._planes_of(lvl)
            except (UnsupportedFormatError, SlideReadError) as e:
                raise type(e)(f"{path}: {e}") from None
            except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:  # a damaged tag's value
                raise SlideReadError(f"{path}: damaged TIFF tags on level {i} ({type(e).__name__}: {e})") from None
            w, h = planes[0].width, planes[0].height
            if any(p.width != w or p.height != h for p in planes):
                raise SlideReadError(f"{path}: level {i} has planes of different sizes")
            if level0 is None:
                level0 = (w, h)
                ds = 1.0
            else:
                ds = (level0[0] / w + level0[1] / h) / 2  # as OpenSlide computes it
            self.levels.append(Level(w, h, ds))
            self._levels_planes.append(planes)
        self._check_truncation()
        if tf.is_imagej:  # tifffile falls back to the first plane when the stack's pixels are cut short
            said = (tf.imagej_metadata or {}).get("images")
            found = int(np.prod([n for a, n in zip(series[0].axes, series[0].shape) if a not in "YXS"]))
            if isinstance(said, int) and said > found:
                raise SlideReadError(f"{path}: file is truncated or damaged: its ImageJ header says {said} "
                                     f"images (planes), only {found} can be read")
        if self.format == "tiled TIFF":
            self.format = "pyramidal tiled TIFF" if len(self.levels) > 1 else "generic tiled TIFF"

        planes0 = self._levels_planes[0]
        kp = planes0[0].page.keyframe if getattr(planes0[0].page, "keyframe", None) is not None else planes0[0].page
        palette = planes0[0].colormap is not None
        # palette indices become 8-bit RGB; 1-bit pages 0 / 255 (uint8)
        self.dtype = np.dtype(np.uint8 if palette or kp.dtype == bool else kp.dtype)
        photometric = int(kp.photometric)
        self.brightfield = (len(planes0) == 1 and (photometric in _RGB_PHOTOMETRIC or palette or planes0[0].cmyk)
                            and planes0[0].samples == 3)
        self.channel_names = self._channel_names(planes0, desc)
        self._native_mpp = self._find_mpp(desc, kp)
        self._associated = self._find_associated()
        self._note_left_out_series(series)
        self.properties = {"tiff.pages": len(tf.pages), "tiff.compression": kp.compression.name
                           if hasattr(kp.compression, "name") else int(kp.compression)}

    def _pyramid(self, series) -> list:
        """The levels of the main series, plus following series made only of reduced-resolution pages
        of the same kind and decreasing size (pyramids whose levels are not exact halvings or quarters,
        which tifffile lists as separate series; OpenSlide's generic-tiff reads them as levels)."""
        main = series[0]
        levels = list(main.levels)

        def largest_first(found):  # (levels stored 1x, 4x, 2x were left so: the reader's levels go largest first)
            return sorted(found, key=lambda lv: -lv.sizes.get("width", 0))

        if self._tf.is_qpi or self._tf.is_svs or self._tf.is_ome:
            return largest_first(levels)
        last = levels[-1]  # tifffile may group the first levels into one series and list the rest apart
        for s in series[1:]:
            pages = [p for p in s.pages if p is not None]
            if not pages or not all(getattr(p, "is_reduced", False) for p in pages):
                break
            w, h = s.sizes.get("width", 0), s.sizes.get("height", 0)
            w0, h0 = main.sizes.get("width", 0), main.sizes.get("height", 0)
            if (s.dtype != main.dtype or len(pages) != len([p for p in last.pages if p is not None])
                    or s.shape[-1] != last.shape[-1] and "S" in s.axes
                    or w >= w0 or h >= h0 or any(w == lv.sizes.get("width", 0) for lv in levels)
                    # a level keeps the slide's shape (to a pixel's rounding on each side, or 2 %); a reduced
                    # label or macro image does not
                    or not w0 or abs(h * w0 - h0 * w) > max(h0 + w0, 0.02 * h * w0)):
                break
            levels.append(s)
            last = s
        return largest_first(levels)

    def _same_file(self, tf) -> bool:
        """Whether a TiffFile tifffile opened for a page is this file (an OME-XML may name this file under
        another UUID, which tifffile opens a second time), not a companion file of a multi-file OME-TIFF."""
        if tf is self._tf:
            return True
        try:
            return os.path.samefile(tf.filehandle.path, self._tf.filehandle.path)
        except (OSError, AttributeError, TypeError):
            return False

    def _planes_of(self, lvl) -> list[_Plane]:
        """The pages of one pyramid level, as channel planes (first index of any Z/T axes)."""
        pages = list(lvl.pages)
        if not any(p is not None for p in pages):
            raise UnsupportedFormatError("a pyramid level without pages")
        foreign = sorted({os.path.basename(getattr(p.parent, "filename", "") or "?") for p in pages
                          if p is not None and not self._same_file(getattr(p, "parent", self._tf))})
        if foreign:  # their pixels are in those files, at offsets of theirs: never read from this one
            raise UnsupportedFormatError(
                f"a multi-file OME-TIFF: planes of this image are stored in {', '.join(foreign[:3])}"
                + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                + "; histoflow reads images held in one file: join them into one OME-TIFF first (e.g. with "
                  "bfconvert, or tifffile.imwrite of tifffile.imread of this file)")
        axes = lvl.axes
        extra = [(a, n) for a, n in zip(axes, lvl.shape) if a not in "YXS"]
        n_planes = int(np.prod([n for _, n in extra])) if extra else 1
        starts = [None] * len(pages)
        if len(pages) == 1 < n_planes and self._tf.is_imagej and getattr(lvl, "dataoffset", None):
            # a truncated ImageJ stack (as ImageJ writes those over 4 GB): one page, and the other planes' pixels
            # after its own, end to end (read by their offsets; tifffile reads them so too)
            sh = pages[0].shaped
            plane_bytes = int(np.prod(sh)) * np.dtype(pages[0].dtype).itemsize
            starts = [int(lvl.dataoffset) + i * plane_bytes for i in range(n_planes)]
            pages = pages * n_planes
        if len(pages) > 1 and (len(extra) > 1 or any(a not in _CHANNEL_AXES for a, _ in extra)):
            # keep only the channel axis; take the first index of the others (Z, T, ...), even when one of
            # them is the only extra axis (a single-channel Z-stack or time series is one channel, not many)
            chan_axis = next((a for a, _ in extra if a in _CHANNEL_AXES), None)
            dropped = [f"{a} ({n})" for a, n in extra if a != chan_axis and n > 1]
            note = (f"axes {', '.join(dropped)} beside the channels: only the first plane of each is read "
                    "(index 0), as one image of the channels")
            if dropped and note not in self.warnings:
                self.warnings.append(note)
            shape = [n for _, n in extra]
            idx = [range(n) if a == chan_axis else [0] for a, n in extra]
            keep = set(int(np.ravel_multi_index(t, shape)) for t in np.array(np.meshgrid(*idx, indexing="ij")).reshape(len(shape), -1).T)
            pages = [p for i, p in enumerate(pages) if i in keep]
            starts = [o for i, o in enumerate(starts) if i in keep]
            if not self._levels_planes:  # level 0's: which of the stack's planes the channels are (their labels)
                self._plane_indices0 = sorted(keep)
        missing = [i for i, p in enumerate(pages) if p is None]
        if missing:  # an OME-XML plane whose file is not there (tifffile leaves None): its channel cannot be read
            raise SlideReadError(f"{len(missing)} of the image's {len(pages)} channel planes are missing (channel "
                                 f"index {', '.join(map(str, missing[:5]))}): the OME-XML names files that are not "
                                 "beside this one, or planes this file does not hold")
        key = pages[0].keyframe if getattr(pages[0], "keyframe", None) is not None else pages[0]
        keep_samples = None
        if int(key.photometric) in _RGB_PHOTOMETRIC and key.samplesperpixel > 3:
            keep_samples = 3  # RGBA and RGB + extra samples: keep the colour
        elif int(key.photometric) in (0, 1) and key.samplesperpixel == 2 and \
                int((tuple(getattr(key, "extrasamples", ()) or ()) or (0,))[0]) in (1, 2):
            keep_samples = 1  # grey + alpha: the grey, composited on white (as the image backend does "LA")
        colormap = self._colormap(key)
        return [_Plane.from_page(p, keep_samples, colormap, o) for p, o in zip(pages, starts)]

    def _colormap(self, key) -> np.ndarray | None:
        """The 8-bit ``(entries, 3)`` RGB palette of a palette page, or None to keep its raw values.

        A palette TIFF is a colour image (Pillow and OpenSlide read it as RGB, as the same image saved as PNG
        reads here). ImageJ writes its display LUT as a palette on fluorescence pages: those keep their raw
        intensities."""
        if int(key.photometric) != _PALETTE or key.samplesperpixel != 1 or self._tf.is_imagej:
            return None
        cmap = key.colormap
        if cmap is None or np.ndim(cmap) != 2 or cmap.shape[0] != 3 or not cmap.size:
            raise SlideReadError(f"page {key.index}: palette image without a usable ColorMap tag")
        cmap = np.asarray(cmap, np.uint16).T
        # TIFF colormaps are 16-bit (value * 257); like libtiff, take one whose values all fit in 8 bits as
        # an 8-bit map written by a non-conforming writer
        return np.ascontiguousarray(cmap >> 8 if cmap.max() > 255 else cmap).astype(np.uint8)

    def _check_truncation(self):
        for i, planes in enumerate(self._levels_planes):
            for pl in planes:
                end = pl.data_end()
                if end > self._size:
                    raise SlideReadError(
                        f"{self.path}: file is truncated: level {i} (page {pl.index}) needs data up to byte "
                        f"{end:,} but the file has {self._size:,} bytes")

    def _full_page(self, page):
        """A TiffPage (with tags) for a page that tifffile handed out as a lightweight TiffFrame."""
        if isinstance(page, tifffile.TiffPage):
            return page
        fh = self._tf.filehandle
        with fh.lock:
            fh.seek(page.offset)
            return tifffile.TiffPage(self._tf, index=page.index)

    def _channel_names(self, planes, desc) -> list[str]:
        n = sum(p.samples for p in planes)
        tf = self._tf
        if self.brightfield:
            return ["R", "G", "B"]
        names = None
        if tf.is_qpi:
            names = []
            for p in planes:
                d = self._full_page(p.page).description[:_MAX_DESCRIPTION]
                m = re.search(r"<Biomarker>([^<]*)</Biomarker>", d) or re.search(r"<Name>([^<]*)</Name>", d)
                names.append(m.group(1).strip() if m else "")
        elif tf.is_ome:  # the channels of the slide's <Image> (the series read), not of every image
            names = [html_unescape(m) for m in re.findall(r"<(?:\w+:)?Channel [^>]*?Name=\"([^\"]*)\"",
                                                         _ome_image(desc, self._main))]
        elif tf.is_imagej and tf.imagej_metadata:
            labels = tf.imagej_metadata.get("Labels")
            if isinstance(labels, (list, tuple)):
                names = [str(v) for v in labels]
                kept = getattr(self, "_plane_indices0", None)
                if len(names) != n and kept and len(kept) == n and max(kept) < len(names):
                    names = [names[i] for i in kept]  # one label a plane (Z or T beside C): the channels' own
        if not names or len(names) != n or not all(names):
            pagenames = []
            for p in planes:
                tag = self._full_page(p.page).tags.get(285)  # PageName
                pagenames.append(str(tag.value) if tag is not None else "")
            if len(planes) == n and all(pagenames) and len(set(pagenames)) == n:
                names = pagenames
        if not names or len(names) != n or not all(names):
            if n == 1:
                return ["intensity"]
            names = [f"channel {i}" for i in range(n)]
        return names

    def _find_mpp(self, desc, page):
        tf = self._tf
        if tf.is_svs:
            m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", desc)
            mag = re.search(r"\bAppMag\s*=\s*([0-9.]+)", desc)
            if mag:
                self.objective_power = float(mag.group(1))
            if m:
                v = float(m.group(1))
                return (v, v)
        if tf.is_ome:
            mag = re.search(r"NominalMagnification=\"([0-9.]+)\"", desc)
            if mag:
                self.objective_power = float(mag.group(1))
            m = re.search(r"<(?:\w+:)?Pixels [^>]*>", _ome_image(desc, self._main))
            if m:
                tag = m.group(0)
                try:
                    mx = _ome_size(tag, "X")
                    my = _ome_size(tag, "Y")
                except _UnitError as e:
                    what = ("not a length" if str(e).strip().lower() in ("pixel", "reference frame")
                            else "a unit histoflow does not know")
                    self.warnings.append(f"the OME-XML gives the pixel size in {str(e)!r}, {what}: the pixel "
                                         "size is unknown (give it with mpp=... / --slide-mpp)")
                    mx = my = None
                if mx and my:
                    return (mx, my)
        if tf.is_qpi:
            m = re.search(r"<PixelSizeMicrons>([0-9.eE+-]+)</PixelSizeMicrons>", desc)
            mag = re.search(r"<Magnification>([0-9.]+)</Magnification>", desc)
            if mag:
                self.objective_power = float(mag.group(1))
            if m:
                v = float(m.group(1))
                return (v, v)
        if desc.startswith('{"mibi.'):
            try:
                meta = json.loads(desc)
                fov = float(meta["mibi.size"])
                return (fov / self.levels[0].width, fov / self.levels[0].height)
            except (ValueError, KeyError, TypeError):
                pass
        return _resolution_mpp(self._full_page(page), tf)

    def _note_left_out_series(self, series):
        """A warning for the images of the slide's size that follow the first and are not read (pages written
        one by one, which tifffile lists as series of their own; an OME-TIFF of one Image per channel or per field
        of view): the slide was read as the first image's channels alone, silently."""
        used = {p.index for planes in self._levels_planes for p in planes}
        w, h = self.levels[0].width, self.levels[0].height
        names = []
        for i, s in enumerate(series[1:], start=1):
            number = (i + self._main) % len(series)  # (``series`` starts at the slide's image)
            pages = [p for p in s.pages if p is not None]
            if not pages or any(p.index in used for p in pages):
                continue
            if (s.sizes.get("width"), s.sizes.get("height")) != (w, h):
                continue
            name = (s.name or "").strip()
            if any(k in name.lower() for k in ("thumbnail", "label", "macro", "overview")):
                continue
            if not name and pages[0].tags.get(285) is not None:  # PageName
                name = str(pages[0].tags[285].value).strip()
            names.append(name or f"series {number}")
        if names:
            shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            self.warnings.append(
                f"{len(names)} more image(s) of the slide's size follow the first in the file and are not read "
                f"({shown}): the slide is the first image's {len(self._levels_planes[0])} channel(s). If they are "
                "more channels, write them as one multi-channel image (e.g. tifffile.imwrite(path, "
                "np.stack(planes)) with axes CYX, or an OME-TIFF with one Image of C channels)")
            warnings.warn(f"{self.path}: {self.warnings[-1]}", UserWarning, stacklevel=4)

    def _find_associated(self) -> dict:
        tf = self._tf
        out = {}
        used = {p.index for planes in self._levels_planes for p in planes}
        for s in tf.series:  # (the slide's own pages are used: a macro stored first is one of these)
            if any(p is not None and p.index in used for p in s.pages):
                continue
            name = (s.name or "").strip().lower()
            for key in ("thumbnail", "label", "macro", "overview"):
                # "overview" (QPTIFF, OME) is the whole-slide photograph OpenSlide and DICOM call "macro"
                key = "macro" if key == "overview" else key
                if (key in name or (key == "macro" and "overview" in name)) and key not in out:
                    out[key] = self._series_loader(s, key)
        if tf.is_qpi:  # Overview and Label pages are not in tifffile's series
            for page in tf.pages:
                if page.index in used:
                    continue
                m = re.search(r"<ImageType>([^<]*)</ImageType>", self._full_page(page).description[:_MAX_DESCRIPTION])
                if m:
                    key = m.group(1).strip().lower()
                    key = "macro" if key == "overview" else key
                    if key in ("thumbnail", "label", "macro") and key not in out:
                        out[key] = self._page_loader(page.index, key)
        return out

    def _series_loader(self, s, name):
        def load():
            with self._tf.filehandle.lock, quiet_tifffile() as log:
                return self._checked_associated(_as_hwc(s.asarray()), s.keyframe, name, log.messages)
        return load

    def _page_loader(self, index, name):
        def load():
            with self._tf.filehandle.lock, quiet_tifffile() as log:
                page = self._tf.pages[index]
                return self._checked_associated(_as_hwc(page.asarray()), page, name, log.messages)
        return load

    def _checked_associated(self, a, page, name, messages) -> np.ndarray:
        """``a`` if it has the size and samples the page's tags give; tifffile hands back damaged pages (a
        zero width, an odd BitsPerSample) as empty or oddly shaped arrays, and only logs why."""
        want = (int(page.imagelength), int(page.imagewidth), int(page.samplesperpixel))
        if 0 in want:
            problem = f"its tags give an empty image ({want[1]} x {want[0]} px, {want[2]} samples)"
        elif a.shape != want:
            problem = f"it decoded to shape {a.shape} where its tags give {want}"
        else:
            return a
        why = f" ({messages[0][:200]})" if messages else ""
        raise TileDecodeError(f"{self.path}: the {name} image (page {page.index}) cannot be decoded: {problem}: "
                              f"damaged{why}")

    # ------------------------------------------------------------------ pixels
    def _read(self, level, x, y, w, h):
        planes = self._levels_planes[level]
        if len(planes) == 1:
            return self._read_plane(level, planes[0], x, y, w, h, None, 0)
        out = np.empty((h, w, self.channels), self.dtype)
        c = 0
        for pl in planes:
            self._read_plane(level, pl, x, y, w, h, out, c)
            c += pl.samples
        return out

    def _read_plane(self, level, pl: _Plane, x, y, w, h, out, c0):
        tw, th = pl.tile_w, pl.tile_h
        col0, col1 = x // tw, (x + w - 1) // tw
        row0, row1 = y // th, (y + h - 1) // th
        per_plane = pl.tiles_across * pl.tiles_down
        if out is None and col0 == col1 and row0 == row1 and pl.separate == 1:
            # the region lies in one tile: decode it and return a view (the common aligned case)
            tile = self._decode(level, pl, row0 * pl.tiles_across + col0, col0, row0)
            ox, oy = x - col0 * tw, y - row0 * th
            view = tile[oy:oy + h, ox:ox + w, :pl.keep]
            return view if view.flags.writeable else view.copy()  # (a kept strip is never handed out)
        if out is None:
            out = np.empty((h, w, pl.samples), self.dtype)
            c0 = 0
        # planar-separate pages hold one sample per plane: read the planes of the samples kept (an extra
        # plane dropped by ``keep`` is never decoded, except an alpha plane, which the colour is composited
        # with as in the contiguous layout); contiguous pages hold all samples in one plane
        per_sample, planes = (1, min(pl.separate, pl.keep)) if pl.separate > 1 else (pl.keep, 1)
        separate_alpha = pl.separate > 1 and pl.alpha
        for r in range(row0, row1 + 1):
            ty0 = r * th
            sy0, sy1 = max(y, ty0), min(y + h, ty0 + th, pl.height)
            for c in range(col0, col1 + 1):
                tx0 = c * tw
                sx0, sx1 = max(x, tx0), min(x + w, tx0 + tw, pl.width)
                if separate_alpha:  # R, G, B and alpha planes of this tile, composited on white
                    rgba = np.concatenate([self._decode(level, pl, s * per_plane + r * pl.tiles_across + c, c, r)
                                           [sy0 - ty0:sy1 - ty0, sx0 - tx0:sx1 - tx0, :1]
                                           for s in range(pl.keep + 1)], axis=-1)
                    out[sy0 - y:sy1 - y, sx0 - x:sx1 - x, c0:c0 + pl.keep] = _on_white(rgba, pl.alpha, pl.keep)
                    continue
                for s in range(planes):
                    tile = self._decode(level, pl, s * per_plane + r * pl.tiles_across + c, c, r)
                    cs = c0 + s * per_sample
                    out[sy0 - y:sy1 - y, sx0 - x:sx1 - x, cs:cs + per_sample] = \
                        tile[sy0 - ty0:sy1 - ty0, sx0 - tx0:sx1 - tx0, :per_sample]
        return out

    def _decode(self, level, pl: _Plane, index, col, row) -> np.ndarray:
        big = not pl.tiled and pl.raw is None and pl.tile_w * pl.tile_h * pl.samples * self.dtype.itemsize > _BIG_STRIP
        if big:  # the last large strip decoded is kept (read-only) for the reads that follow
            kept = self.__dict__.get("_strip_kept")
            if kept is not None and kept[0] == (level, pl.index, index):
                return kept[1]
        tile = self._decode_one(level, pl, index, col, row)
        if big:
            tile.setflags(write=False)
            self.__dict__["_strip_kept"] = ((level, pl.index, index), tile)
        return tile

    def _decode_one(self, level, pl: _Plane, index, col, row) -> np.ndarray:
        offset, count = int(pl.offsets[index]), int(pl.counts[index])
        kind = "tile" if pl.tiled else "strip"
        if count == 0:  # sparse TIFF: tile never written
            return np.full((pl.tile_h, pl.tile_w, pl.samples), self.fill_value, self.dtype)
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise SlideReadError(
                f"{self.path}: {kind} (col {col}, row {row}) of level {level} lies past the end of the file "
                f"(bytes {offset:,}-{offset + count:,}, file has {self._size:,}): truncated?")
        if pl.raw is not None:  # rows as they are in the file (a copy in native byte order: writable)
            seg = np.frombuffer(data, pl.raw).reshape(-1, pl.width, pl.raw_samples).astype(pl.raw.newbyteorder("="))
        else:
            try:
                seg = pl.page.decode(data, index, jpegtables=pl.jpegtables, jpegheader=pl.jpegheader)[0]
            except Exception as e:
                raise TileDecodeError(
                    f"{self.path}: {kind} (col {col}, row {row}) of level {level} (page {pl.index}, "
                    f"bytes {offset:,}+{count:,}) cannot be decoded: {type(e).__name__}: {e}") from None
            if seg is None or seg.ndim != 4:
                raise TileDecodeError(f"{self.path}: {kind} (col {col}, row {row}) of level {level} decoded to "
                                      f"an unexpected shape {getattr(seg, 'shape', None)}")
            seg = seg[0]
        if pl.colormap is not None:
            return np.take(pl.colormap, seg[..., 0], axis=0, mode="clip")  # clip: a damaged index
        if pl.cmyk:  # Pillow's conversion: (255 - C)(255 - K) / 255, rounded as its MULDIV255
            t = (255 - seg[..., :3].astype(np.uint32)) * (255 - seg[..., 3:4].astype(np.uint32)) + 128
            rgb = (((t >> 8) + t) >> 8).astype(np.uint8)
            if pl.alpha and seg.shape[-1] > 4:  # composited on white, as RGBA is
                return _on_white(np.concatenate([rgb, seg[..., 4:5]], axis=-1), pl.alpha, 3)
            return rgb
        if pl.ycbcr:  # ITU-R BT.601, full range (TIFF's default coefficients and reference levels), as Pillow
            import cv2

            rgb = cv2.cvtColor(np.ascontiguousarray(seg[..., [0, 2, 1]]), cv2.COLOR_YCrCb2RGB)
            seg = np.concatenate([rgb, seg[..., 3:]], axis=-1) if seg.shape[-1] > 3 else rgb
        if seg.dtype == bool:  # 1-bit pages: 0 / 255, as Pillow reads them (and the store keeps)
            seg = np.where(seg != pl.invert, np.uint8(255), np.uint8(0))
        elif pl.invert and seg.dtype.kind == "u":
            seg = np.iinfo(seg.dtype).max - seg
        return _on_white(seg, pl.alpha, pl.keep) if pl.alpha and seg.shape[-1] > pl.keep else seg

    def _close(self):
        self.__dict__.pop("_strip_kept", None)  # (rested readers held their strips; a woken one, stale pixels)
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
            self._fd = None
        tf = getattr(self, "_tf", None)
        if tf is not None:
            tf.close()


def _raw_dtype(key, colormap) -> np.dtype | None:
    """The dtype (file byte order) of an uncompressed page whose samples are whole bytes, read without tifffile's
    decoder; None for any other page (compressed, packed bits, a predictor, bit-reversed, a palette)."""
    try:
        dt = np.dtype(key.dtype)
    except TypeError:
        return None
    if (key.is_tiled or int(key.compression) != 1 or colormap is not None or dt == bool
            or int(key.bitspersample) != 8 * dt.itemsize or int(getattr(key, "predictor", 1) or 1) != 1
            or int(getattr(key, "fillorder", 1) or 1) != 1):
        return None
    return dt.newbyteorder(key.parent.byteorder) if dt.itemsize > 1 else dt


def _on_white(a: np.ndarray, alpha: int, n: int = 3) -> np.ndarray:
    """``n`` colour samples (RGB, or 1 for grey) + alpha composited on white (as the image backend does PNGs):
    ``alpha`` 2 unassociated, 1 associated (colour already multiplied by alpha)."""
    if a.dtype.kind != "u":
        return a[..., :n]
    top = np.iinfo(a.dtype).max
    al = a[..., n:n + 1].astype(np.uint64)
    c = a[..., :n].astype(np.uint64)
    if alpha == 2:
        out = (c * al + top * (top - al) + top // 2) // top
    else:
        out = np.minimum(c + (top - al), top)
    return out.astype(a.dtype)


def html_unescape(s: str) -> str:
    import html

    return html.unescape(s)


def _as_hwc(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        return a[:, :, None]
    if a.ndim == 3 and a.shape[0] < a.shape[-1] and a.shape[0] <= 4 and a.shape[-1] > 4:
        return np.moveaxis(a, 0, -1)
    return a


#: µm per OME UnitsLength (SI and imperial); "pixel" and "reference frame" carry no physical size
_OME_UNITS = {"Ym": 1e30, "Zm": 1e27, "Em": 1e24, "Pm": 1e21, "Tm": 1e18, "Gm": 1e15, "Mm": 1e12, "km": 1e9,
              "hm": 1e8, "dam": 1e7, "m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "µm": 1.0, "\u03bcm": 1.0,
              "nm": 1e-3, "pm": 1e-6, "fm": 1e-9, "am": 1e-12, "zm": 1e-15, "ym": 1e-18, "Å": 1e-4,
              "\u212b": 1e-4, "thou": 25.4, "li": 2540.0, "in": 25400.0, "ft": 304800.0,
              "yd": 914400.0, "mi": 1.609344e9, "ua": 1.495978707e17, "ly": 9.4607304725808e21,
              "pc": 3.0856776e22, "pt": 25400.0 / 72}
#: µm per length unit as people spell them (ImageJ's "unit", and OME units spelled other than the schema's)
_IMAGEJ_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
                 "micrometers": 1.0, "micrometres": 1.0, "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
                 "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4,
                 "m": 1e6, "meter": 1e6, "metre": 1e6, "å": 1e-4, "angstrom": 1e-4, "inch": 25400.0,
                 "inches": 25400.0, "in": 25400.0}  # lower case


def _ome_image(xml: str, index: int = 0) -> str:
    """The ``index``-th ``<Image>`` element of an OME-XML text (the slide's: see :func:`_main_series`), or the whole
    text when it has none. An OME-TIFF may describe several images (series); their channel names must not be
    mixed."""
    found = re.findall(r"<(?:\w+:)?Image\b.*?</(?:\w+:)?Image>", xml, re.S)
    return found[index] if index < len(found) else (found[0] if found else xml)


_ASSOCIATED_NAMES = ("thumbnail", "label", "macro", "overview")


def _main_series(series) -> int:
    """The series that is the slide: the first not named as a label, macro, overview or thumbnail image (a
    converter may put the macro photograph first: it was opened as the slide, and the pyramid ignored)."""
    for i, s in enumerate(series):
        name = (s.name or "").strip().lower()
        if not any(k in name for k in _ASSOCIATED_NAMES) and any(p is not None for p in s.pages):
            return i
    return 0


def _ome_size(tag: str, axis: str):
    m = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', tag)
    if not m:
        return None
    u = re.search(rf'PhysicalSize{axis}Unit="([^"]*)"', tag)
    unit = html_unescape(u.group(1)) if u else "µm"
    um = _ome_unit_um(unit)
    if um is None:  # "pixel", "reference frame" or a unit of no known length: no physical size
        raise _UnitError(unit)
    try:
        return float(m.group(1)) * um
    except ValueError:
        return None


class _UnitError(ValueError):
    pass


def _ome_unit_um(unit: str) -> float | None:
    """µm in an OME length unit: the schema's symbols ("µm", "nm", "Mm", "in" ...), else the spellings people use
    (:func:`_imagej_unit_um`: "micron(s)", "micrometer", "UM" ...); None for "pixel", "reference frame" and units
    of no known length."""
    u = unit.strip()
    return _OME_UNITS[u] if u in _OME_UNITS else _imagej_unit_um(u)


def _imagej_unit_um(unit) -> float | None:
    """µm in one ImageJ length unit ("micron", "nm", "mm", ...), or None for "pixel" and unknown units.

    ImageJ writes µ as the escaped text ``\\u00B5`` in its ImageDescription (tifffile leaves it so)."""
    u = str(unit).strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ").replace("\u03bc", "µ").lower()
    return _IMAGEJ_UNITS.get(u)


def _resolution_mpp(page, tf):
    """µm/px from the XResolution/YResolution tags, or None when they carry no physical unit."""
    tags = page.tags
    xr, yr = tags.get(282), tags.get(283)
    unit = tags.get(296)
    unit = int(unit.value) if unit is not None else 2
    if xr is None or yr is None:
        return None

    def ratio(v):
        v = v.value
        return v[0] / v[1] if isinstance(v, tuple) and v[1] else float(v if not isinstance(v, tuple) else 0)

    rx, ry = ratio(xr), ratio(yr)
    if rx <= 0 or ry <= 0:
        return None
    if tf.is_imagej and tf.imagej_metadata:
        um = _imagej_unit_um(tf.imagej_metadata.get("unit", ""))
        if um is not None:  # ImageJ's resolution is pixels per its own unit
            return (um / rx, um / ry)
    if unit == 3:  # centimetre
        return (1e4 / rx, 1e4 / ry)
    if unit == 4:  # millimetre (TIFF/EP and tifffile's ResolutionUnit 4)
        return (1e3 / rx, 1e3 / ry)
    if unit == 5:  # micrometre (ResolutionUnit 5)
        return (1.0 / rx, 1.0 / ry)
    if unit == 2:  # inch (the TIFF default)
        return (25400 / rx, 25400 / ry)
    return None

"""Image backend (Pillow): PNG, JPEG, BMP, GIF and small one-page TIFFs without tiles. The image is decoded
once, on first read, and kept; Pillow's decompression-bomb limit bounds its size."""
from __future__ import annotations

import threading

import numpy as np
from PIL import Image

from ..errors import SlideReadError, UnsupportedFormatError
from .base import Level, SlideReader

_MODES = {  # Pillow mode -> (mode to convert to, dtype, channel names, brightfield)
    "RGB": ("RGB", np.uint8, ["R", "G", "B"], True),
    "RGBA": ("RGBA", np.uint8, ["R", "G", "B"], True),
    "P": ("RGBA", np.uint8, ["R", "G", "B"], True),
    "CMYK": ("RGB", np.uint8, ["R", "G", "B"], True),
    "YCbCr": ("RGB", np.uint8, ["R", "G", "B"], True),
    "L": ("L", np.uint8, ["intensity"], False),
    "LA": ("LA", np.uint8, ["intensity"], False),  # alpha kept for compositing on white, as RGBA
    "1": ("L", np.uint8, ["intensity"], False),
    "I;16": ("I;16", np.uint16, ["intensity"], False),
    "I;16B": ("I;16B", np.uint16, ["intensity"], False),
    "I;16L": ("I;16L", np.uint16, ["intensity"], False),
    "I": ("I", np.int32, ["intensity"], False),
    "F": ("F", np.float32, ["intensity"], False),
}


class ImageReader(SlideReader):
    """Plain images read with Pillow. See the module docstring."""

    backend = "image"

    def _open(self):
        try:
            with Image.open(self.path) as im:
                im.verify()  # cheap structural check
            self._im = Image.open(self.path)
        except FileNotFoundError:
            from ..errors import SlideNotFoundError

            raise SlideNotFoundError(f"{self.path}: no such file") from None
        except Image.DecompressionBombError as e:
            raise SlideReadError(f"{self.path}: image too large for the image backend ({e}); "
                                 "convert it to a tiled TIFF") from None
        except Image.UnidentifiedImageError as e:
            raise UnsupportedFormatError(f"{self.path}: Pillow cannot read it ({type(e).__name__}: {e})") from None
        except Exception as e:  # a format Pillow knows, but the file is damaged or cut short
            raise SlideReadError(f"{self.path}: damaged or truncated image ({type(e).__name__}: {e})") from None
        im = self._im
        if im.format == "TIFF":  # channels, levels or planes in pages, ImageJ's display colours: tifffile's work
            pages = getattr(im, "n_frames", 1)
            imagej = str(im.tag_v2.get(270, "")).startswith("ImageJ=")
            if pages > 1 or imagej:
                what = f"a TIFF of {pages} pages (channels, levels or planes)" if pages > 1 else "an ImageJ TIFF"
                raise UnsupportedFormatError(
                    f"{self.path}: {what}: the image backend would read its first page only"
                    f"{' through its display colour table' if imagej else ''}; use backend='tiff' (the default)")
        if im.mode not in _MODES:
            raise UnsupportedFormatError(f"{self.path}: unsupported image mode {im.mode!r}")
        self._mode, dtype, names, self.brightfield = _MODES[im.mode]
        depth, colour = _png_header(self.path) if im.format == "PNG" else (None, None)
        self._png16 = im.format == "PNG" and im.mode in ("RGB", "RGBA") and depth == 16
        if self._png16:  # Pillow reads 48/64-bit PNGs as 8 bits: decoded with imagecodecs instead
            dtype = np.uint16
            if colour in (0, 4):  # 16-bit grey + alpha, which Pillow calls RGBA: one grey channel, as "LA"
                names, self.brightfield = ["intensity"], False
        self.dtype = np.dtype(dtype)
        self.channel_names = list(names)
        self.format = im.format or "image"
        self.levels = [Level(im.width, im.height, 1.0)]
        dpi = im.info.get("dpi")
        if dpi and dpi[0] and dpi[1]:
            self._native_mpp = (25400 / float(dpi[0]), 25400 / float(dpi[1]))
        self._pixels = None
        self._decode_lock = threading.Lock()  # the threads executor shares one reader: decode once

    def _array(self) -> np.ndarray:
        if self._pixels is not None:
            return self._pixels
        with self._decode_lock:
            if self._pixels is None:
                self._pixels = self._decode()
        return self._pixels

    def _decode(self) -> np.ndarray:
        try:
            if self._png16:
                import imagecodecs

                with open(self.path, "rb") as fh:
                    a = imagecodecs.png_decode(fh.read())
            else:
                im = self._im.convert(self._mode) if self._im.mode != self._mode else self._im
                a = np.asarray(im)
        except Exception as e:
            raise SlideReadError(f"{self.path}: cannot decode image: {type(e).__name__}: {e}") from None
        if a.ndim == 2:
            a = a[:, :, None]
        if a.shape[2] in (2, 4):  # grey or RGB + alpha: composite on white
            top = 65535 if a.dtype == np.uint16 else 255
            al = a[:, :, -1:].astype(np.uint32)
            a = ((a[:, :, :-1].astype(np.uint32) * al + top * (top - al) + top // 2) // top).astype(a.dtype)
        return np.ascontiguousarray(a.astype(self.dtype, copy=False))

    def _read(self, level, x, y, w, h):
        # a copy: the decoded image is kept for the next reads, and tiles may be changed in place
        return self._array()[y:y + h, x:x + w].copy()

    def _close(self):
        im = getattr(self, "_im", None)
        if im is not None:
            im.close()
        self._pixels = None


def _png_header(path) -> tuple[int | None, int | None]:
    """The bit depth and colour type (0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA) in a PNG's header
    (IHDR), or (None, None) when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(26)
    except OSError:
        return None, None
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None, None
    return head[24], head[25]

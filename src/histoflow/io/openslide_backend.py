"""OpenSlide backend (openslide-python + openslide-bin): NDPI, MRXS, SCN, BIF, Philips TIFF, SVS, generic
tiled TIFF, and whatever else OpenSlide reads. Regions come back RGB with empty areas white.

OpenSlide takes level-0 coordinates: at a level whose downsample is not a whole number, it shifts the region
by the fraction of a pixel that the level-0 corner falls between level pixels (bilinear interpolation).
Regions of such levels can then differ slightly from the ``tiff`` backend's exact pixels."""
from __future__ import annotations

import numpy as np
import openslide
from PIL import Image

from ..errors import SlideReadError, UnsupportedFormatError
from .base import Level, SlideReader

_ASSOCIATED_NAMES = {"thumbnail": "thumbnail", "label": "label", "macro": "macro"}


class OpenSlideReader(SlideReader):
    """Slides read through OpenSlide. See the module docstring."""

    backend = "openslide"

    def _open(self):
        try:
            vendor = openslide.OpenSlide.detect_format(self.path)
        except Exception:
            vendor = None
        if vendor is None:
            raise UnsupportedFormatError(f"{self.path}: OpenSlide does not recognise this file")
        try:
            self._osr = openslide.OpenSlide(self.path)
        except openslide.OpenSlideError as e:
            raise SlideReadError(f"{self.path}: OpenSlide cannot open it: {e}") from None
        osr = self._osr
        self.format = f"OpenSlide {vendor}"
        self.levels = [Level(int(w), int(h), float(ds))
                       for (w, h), ds in zip(osr.level_dimensions, osr.level_downsamples)]
        props = osr.properties
        self.properties = {k: v for k, v in props.items() if len(v) < 1000}
        mx, my = props.get(openslide.PROPERTY_NAME_MPP_X), props.get(openslide.PROPERTY_NAME_MPP_Y)
        if mx and my:
            try:
                self._native_mpp = (float(mx), float(my))
            except ValueError:
                self.warnings.append(f"unreadable mpp properties {mx!r}, {my!r}")
        power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        if power:
            try:
                self.objective_power = float(power)
            except ValueError:
                pass
        self.dtype = np.dtype(np.uint8)
        self.channel_names = ["R", "G", "B"]
        self.brightfield = True
        self._associated = {name: self._assoc_loader(name) for name in osr.associated_images}

    def _assoc_loader(self, name):
        def load():
            return _pil_rgba_to_rgb(self._osr.associated_images[name])
        return load

    def _read(self, level, x, y, w, h):
        ds = self.levels[level].downsample
        # OpenSlide takes level-0 coordinates for the corner
        x0, y0 = int(round(x * ds)), int(round(y * ds))
        try:
            img = self._osr.read_region((x0, y0), level, (w, h))
        except openslide.OpenSlideError as e:
            raise SlideReadError(f"{self.path}: OpenSlide failed to read level {level} at ({x0}, {y0}) "
                                 f"size {w}x{h}: {e}") from None
        return _pil_rgba_to_rgb(img)

    def _close(self):
        osr = getattr(self, "_osr", None)
        if osr is not None:
            osr.close()
            self._osr = None


def _pil_rgba_to_rgb(img: Image.Image) -> np.ndarray:
    """OpenSlide's RGBA image (alpha 0 outside the scanned area) to an RGB array on white, in C."""
    if img.mode == "RGBA" and img.getextrema()[3][0] < 255:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        white.alpha_composite(img)
        img = white
    return np.asarray(img.convert("RGB"))

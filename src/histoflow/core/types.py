"""Slide-type presets: what kind of image a slide is, and the defaults that follow from it."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ParameterError


@dataclass(frozen=True)
class SlideTypePreset:
    name: str
    brightfield: bool
    description: str
    #: expected channel count (None: any)
    channels: int | None = None
    #: stain of a brightfield slide, or "fluorescence"/"mass" for the others
    stain: str | None = None

    @property
    def background(self) -> str:
        """Pixel value of empty glass: "white" for brightfield, "black" (0) otherwise."""
        return "white" if self.brightfield else "black"


class SlideType:
    """The slide types histoflow knows. ``SlideType.get("he")`` accepts names case-insensitively."""

    HE = SlideTypePreset("HE", True, "haematoxylin and eosin, brightfield RGB", 3, "HE")
    IHC = SlideTypePreset("IHC", True, "immunohistochemistry (DAB + haematoxylin), brightfield RGB", 3, "IHC")
    IF = SlideTypePreset("IF", False, "immunofluorescence, one channel per marker", None, "fluorescence")
    CODEX = SlideTypePreset("CODEX", False, "CODEX multiplexed fluorescence (planes z x cycle x channel, z "
                            "outermost)", None, "fluorescence")
    VECTRA = SlideTypePreset("Vectra", False, "Akoya Vectra/Polaris multispectral fluorescence (QPTIFF)",
                             None, "fluorescence")
    MIBI = SlideTypePreset("MIBI", False, "MIBI-TOF mass-spectrometry imaging, one channel per mass", None,
                           "mass")

    @classmethod
    def all(cls):
        return [cls.HE, cls.IHC, cls.IF, cls.CODEX, cls.VECTRA, cls.MIBI]

    @classmethod
    def get(cls, value) -> SlideTypePreset:
        if isinstance(value, SlideTypePreset):
            return value
        for p in cls.all():
            if p.name.lower() == str(value).lower():
                return p
        raise ParameterError(f"unknown slide type {value!r}; choose one of {[p.name for p in cls.all()]}")

"""Built-in data: the CC0 sample slide (CMU-1-Small-Region.svs, OpenSlide test data, 2220x2967, 20x)."""
from __future__ import annotations

import os

SAMPLE_SLIDE = "CMU-1-Small-Region.svs"


def sample_slide_path() -> str:
    """Path of the built-in sample slide, an Aperio SVS of H&E tissue (CC0)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), SAMPLE_SLIDE)

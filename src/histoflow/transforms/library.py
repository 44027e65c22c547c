"""The built-in transforms, imported together (importing this module registers them all)."""
from .filters import BoxBlur, GaussianBlur, MedianBlur
from .intensity import AdaptiveHistogramEqualization, HistogramEqualization, RescaleIntensity
from .morphology import BinaryThreshold, ForegroundDetection, MorphClose, MorphOpen
from .multiplex import CollapseRunsCODEX, CollapseRunsVectra, SegmentCells, SegmentNuclei, VirtualHE
from .nuclei import NucleusDetectionHE
from .quality import BlurQC
from .quantify import QuantifyCells
from .stain import StainAugmentation, StainNormalizationHE, StainSeparation
from .superpixel import SuperpixelInterpolation
from .tissue import LabelArtifactTileHE, LabelWhiteSpaceHE, TissueDetectionCascade, TissueDetectionHE

__all__ = [
    "AdaptiveHistogramEqualization", "BinaryThreshold", "BlurQC", "BoxBlur", "CollapseRunsCODEX",
    "CollapseRunsVectra", "ForegroundDetection", "QuantifyCells", "SegmentCells", "SegmentNuclei",
    "GaussianBlur", "HistogramEqualization", "LabelArtifactTileHE", "LabelWhiteSpaceHE", "MedianBlur",
    "MorphClose", "MorphOpen", "NucleusDetectionHE", "RescaleIntensity", "StainAugmentation",
    "StainNormalizationHE", "StainSeparation", "SuperpixelInterpolation", "TissueDetectionCascade",
    "TissueDetectionHE", "VirtualHE",
]

"""Transforms: small classes with parameters and ``apply(tile)``, composed into Pipelines.

The library by domain: filters, intensity, morphology, superpixel, tissue, quality, stain, nuclei,
multiplex (fluorescence segmentation, virtual H&E) and quantify (single-cell tables). ``histoflow transforms`` lists them all with their parameters.

>>> from histoflow.transforms import Pipeline, BoxBlur, TissueDetectionHE
>>> Pipeline([BoxBlur(15), TissueDetectionHE()])      # doctest: +ELLIPSIS
Pipeline([...
"""
from .base import REGISTRY, Pipeline, Transform, TransformError, list_transforms  # noqa: F401
from .library import *  # noqa: F401,F403
from .library import __all__ as _library

__all__ = ["Pipeline", "Transform", "TransformError", "REGISTRY", "list_transforms", *_library]

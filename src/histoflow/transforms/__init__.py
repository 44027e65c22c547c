"""Transforms: small classes with parameters and ``apply(tile)``, composed into Pipelines.

The library by domain: filters, intensity, morphology, tissue, quality, stain, nuclei (and, with the
cells issue, multiplex). ``histoflow transforms`` lists them all with their parameters.
"""
from .base import REGISTRY, Pipeline, Transform, TransformError, list_transforms  # noqa: F401

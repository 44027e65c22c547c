"""Loaders for public datasets, from local files only (nothing is downloaded).

Each loader says where to put the files when they are missing.
"""
from ..errors import DatasetError  # noqa: F401
from .monuseg import MONUSEG_MPP, load_monuseg, monuseg_ids  # noqa: F401

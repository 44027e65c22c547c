"""store: h5path, the on-disk format of one processed slide (spec: ``docs/h5path.md``).

Write with :class:`H5PathWriter`, read with :func:`read_h5path` (which also reads PathML's version-1
files).
"""
from ..errors import H5PathError, H5PathNotFoundError
from .h5path import FORMAT_VERSION, EncodedTile, H5Path, H5PathWriter, encode_tile, read_h5path

__all__ = ["FORMAT_VERSION", "EncodedTile", "H5Path", "H5PathError", "H5PathNotFoundError", "H5PathWriter",
           "encode_tile", "read_h5path"]

"""The exceptions histoflow raises.

Every error names the file (and where it applies the level, tile or region) and the reason, so that a
user can act on it. All derive from :class:`HistoflowError`; the ones about bad arguments also derive
from ``ValueError`` and the one about a missing file from ``FileNotFoundError``, so generic handlers work.
"""


class HistoflowError(Exception):
    """Base class of every error raised by histoflow."""


class SlideReadError(HistoflowError):
    """A slide (or another image file) could not be read: damaged, truncated or inconsistent."""


class SlideNotFoundError(SlideReadError, FileNotFoundError):
    """The path does not exist."""


class UnsupportedFormatError(SlideReadError):
    """The file exists but is not a format any backend can read."""


class TileDecodeError(SlideReadError):
    """One stored tile (or strip/frame) of a slide could not be decoded."""


class RegionError(HistoflowError, ValueError):
    """A region request is invalid (negative size, unknown level, ...)."""


class RegionTooLargeError(RegionError, MemoryError):
    """A region request would need more memory than the configured bound."""


class H5PathError(HistoflowError):
    """An h5path file is missing, truncated, foreign, of an unknown version, or inconsistent."""


class ParameterError(HistoflowError, ValueError):
    """An argument has a value histoflow cannot use (an unknown name, a value out of range); says which
    values it can use."""


class ChannelError(HistoflowError, KeyError):
    """A channel asked for (by name or index) is not in the image, or none looks like the one needed."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MaskError(HistoflowError, KeyError):
    """A tile has no mask of the name a transform reads."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OutputError(HistoflowError, OSError):
    """An output file cannot be written (its folder is missing or not writable, the disk is full)."""


class H5PathNotFoundError(H5PathError, FileNotFoundError):
    """The h5path file does not exist: both an :class:`H5PathError` and a ``FileNotFoundError``."""


class H5PathParameterError(H5PathError, ParameterError):
    """A writer argument histoflow cannot use (a compression, a level, a coordinate): both an
    :class:`H5PathError` and a :class:`ParameterError` (a ``ValueError``)."""


class H5PathOutputError(H5PathError, OutputError):
    """An h5path file cannot be written where asked (its folder is missing or not writable, its temporary
    file would be on another file system): both an :class:`H5PathError` and an :class:`OutputError`."""


class PipelineError(HistoflowError):
    """A pipeline is invalid or failed."""


class DatasetError(HistoflowError, ValueError):
    """A dataset cannot be built: a folder or file is missing or incomplete, or its contents are not what
    the dataset needs. Says what is expected where."""


class NotFittedError(HistoflowError, RuntimeError):
    """An object that learns from data (e.g. a ClusterGuide) was used before it was fitted."""

"""Small helpers shared by the rooms: progress bars and turning any image into a picture."""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from .errors import ParameterError

#: additive colours for fluorescence channels, in order (blue first: the nuclear stain usually comes first)
CHANNEL_COLOURS = [(0, 0, 255), (0, 255, 0), (255, 0, 0), (255, 0, 255), (0, 255, 255), (255, 255, 0),
                   (255, 128, 0), (128, 0, 255), (255, 255, 255)]


def progress_bar(iterable, *, total=None, desc=None, unit="it", disable=False, initial=0):
    """A tqdm progress bar (tiles done, rate, ETA) on stderr; silent when disabled or not a terminal
    unless HISTOFLOW_PROGRESS=1. ``initial``: work done before (a resumed run), shown but not counted in
    the rate. A silent bar is a :class:`_SilentBar` (tqdm.auto imports asyncio and ssl: ~20 ms at the start
    of every run without a bar)."""
    if not disable and not sys.stderr.isatty() and os.environ.get("HISTOFLOW_PROGRESS") != "1":
        disable = True
    if disable:
        return _SilentBar(iterable, total, initial)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, initial=initial)


class _SilentBar:
    """What the code here uses of a disabled tqdm bar: iteration, ``update``, ``set_postfix``, ``close``."""

    def __init__(self, iterable=None, total=None, initial=0):
        self.iterable, self.total, self.n = iterable, total, initial

    def __iter__(self):
        return iter(self.iterable)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        self.n += n

    def set_postfix(self, *args, **kwargs):
        pass

    def set_description(self, *args, **kwargs):
        pass

    def close(self):
        pass


NUCLEAR_MARKERS = ("dapi", "hoechst", "hh3", "histone", "dna", "nuclear", "h3")


def display_channels(names, limit: int = 6) -> list[int]:
    """Channels worth showing in a picture: the nuclear stain first, background/empty channels left out."""
    from .transforms.multiplex import nuclear_channel_index

    names = [str(n) for n in names]
    usable = [i for i, n in enumerate(names) if not n.lower().startswith(("background", "empty", "blank"))]
    try:  # the channel the cell segmentation takes for the nuclear stain (DNA1, Hoechst33342, DAPI-1, dsDNA ...)
        nuclear = [usable[nuclear_channel_index([names[i] for i in usable])]]
    except (KeyError, ValueError, IndexError):
        nuclear = []
    order = nuclear + [i for i in usable if i not in nuclear]
    return order[:limit]


def to_rgb(image: np.ndarray, brightfield: bool | None = None, channels=None, channel_names=None) -> np.ndarray:
    """An 8-bit RGB picture of any ``(h, w, c)`` image, for thumbnails and figures.

    Brightfield RGB uint8 passes through. Other images are shown as fluorescence: each channel is
    stretched between its 1st and 99.5th percentiles and added in its own colour (blue, green, red,
    magenta, ...). ``channels`` picks which channels to show; by default, with ``channel_names``, the
    nuclear stain (DAPI, HH3, ...) comes first in blue and background channels are left out
    (:func:`display_channels`), otherwise the first 9 are shown.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    c = img.shape[2]
    if brightfield is None:  # 3 uint8 channels are RGB, unless channels to show are named
        brightfield = c == 3 and img.dtype == np.uint8 and channels is None
    if brightfield and c >= 3:
        rgb = img[:, :, :3]
        if rgb.dtype != np.uint8:  # (uint16 or float brightfield: stretched to the 8 bits)
            rgb = (_stretch(rgb.astype(np.float32)) * 255).round()
        return np.ascontiguousarray(rgb.astype(np.uint8))
    if c == 1:
        g = (_stretch(img[:, :, 0].astype(np.float32)) * 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if channels is not None:
        idx = list(channels)
    elif channel_names is not None and len(channel_names) == c:
        idx = display_channels(channel_names)
    else:
        idx = list(range(min(c, len(CHANNEL_COLOURS))))
    out = np.zeros(img.shape[:2] + (3,), np.float32)
    for k, ch in enumerate(idx):
        col = np.asarray(CHANNEL_COLOURS[k % len(CHANNEL_COLOURS)], np.float32) / 255
        out += _stretch(img[:, :, ch].astype(np.float32))[:, :, None] * col
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def _stretch(a: np.ndarray) -> np.ndarray:
    """Scale between the 1st and 99.5th percentiles of ``a`` to [0, 1]; NaN and infinite pixels show as 0 (their
    percentiles would make the whole channel NaN, a black picture)."""
    finite = np.isfinite(a)
    if not finite.all():
        out = np.zeros(a.shape, np.float32)
        if finite.any():
            out[finite] = _stretch(a[finite])
        return out
    lo, hi = np.percentile(a, [1, 99.5])
    if hi <= lo:
        hi = lo + 1
    return np.clip((a - lo) / (hi - lo), 0, 1)


def same_file(a, b) -> bool:
    """Whether the paths ``a`` and ``b`` both exist and are one file (an output that would replace its input)."""
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def missing_folders(path) -> list:
    """``path`` and those of its parent folders that do not exist, the deepest first (what ``os.makedirs(path)``
    would make)."""
    out, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out


@contextlib.contextmanager
def atomic_output(path, suffix: str = ""):
    """Write a file under a temporary name beside ``path`` (yielded) and rename it onto ``path`` when the block
    ends without error: an existing file is replaced whole or not at all. An ``OSError`` (missing or read-only
    folder, full disk) becomes :class:`~histoflow.errors.OutputError` naming ``path``."""
    from .errors import OutputError

    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        raise OutputError(f"{path}: cannot write it ({e.strerror or e})") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png(path, rgb: np.ndarray):
    """Write an RGB uint8 array as PNG, atomically."""
    from PIL import Image

    path = os.fspath(path)
    with atomic_output(path, ".png") as tmp:
        Image.fromarray(rgb).save(tmp)
    return path


def outline_instances(rgb: np.ndarray, labels: np.ndarray, colour=(255, 255, 0)) -> np.ndarray:
    """``rgb`` with the outlines of the objects of an instance label image drawn over it.

    ``labels`` (0 = background) may be larger than ``rgb`` (e.g. a slide's level 0 over its thumbnail): it is
    resampled to the picture by nearest neighbour. An outline pixel is an object pixel with a 4-neighbour in
    another object or in the background, so touching objects stay apart.
    """
    rgb = np.asarray(rgb)
    labels = np.asarray(labels)
    if labels.ndim != 2 or rgb.ndim != 3:
        raise ParameterError(f"need a 2-D label image and an (h, w, 3) picture, got {labels.shape} and {rgb.shape}")
    h, w = rgb.shape[:2]
    if labels.shape != (h, w):
        from .core.resample import resize_mask

        labels = resize_mask(labels, (w, h))
    edge = np.zeros((h, w), bool)
    dy = labels[1:, :] != labels[:-1, :]
    dx = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    edge &= labels > 0
    out = rgb[:, :, :3].copy()
    out[edge] = colour
    return out


_YAML = {}

#: numbers in scientific notation, which YAML 1.2 reads as floats and PyYAML's YAML 1.1 as strings
_SCIENTIFIC = r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"

#: YAML 1.1's integers and floats without its base-60 numbers (``1:30`` read as 90) and its octal numbers
#: written with a leading 0 (``017`` read as 15): YAML 1.2 has neither, and a kernel of 017 ran as 15. Such
#: text is read as a string (so a number parameter refuses it by name); ``0o17`` is octal, as in YAML 1.2.
_INT = r"^(?:[-+]?0b[0-1_]+|[-+]?0o[0-7_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$"
_FLOAT = (r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
          r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


def _yaml_classes():
    """A SafeLoader and a SafeDumper that both take ``1e-3`` for a number: the dumper then quotes a string that
    spells one (a mask named "1e5"), so what is written reads back as it was."""
    if not _YAML:
        import re

        import yaml

        def flatten_mapping(self, node):
            # a key written twice: YAML says it must not be, PyYAML keeps the last silently (a second `train:`
            # section dropped the first's learning rate without a word). Checked on a mapping's own keys before
            # its merges (<<) are expanded into it (merged keys may be overridden), once per mapping: PyYAML
            # expands an anchored mapping in place when another merges it, maybe before it is built itself
            checked = self.__dict__.setdefault("_histoflow_checked", set())
            if id(node) not in checked:
                checked.add(id(node))
                seen = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=False)
                    try:
                        first = seen.setdefault(key, key_node.start_mark)
                    except TypeError:  # unhashable: the base class says so
                        continue
                    if first is not key_node.start_mark:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark,
                            f"found the key {key!r} a second time (first on line {first.line + 1}); each key "
                            "may appear once in a mapping", key_node.start_mark)
            return yaml.SafeLoader.flatten_mapping(self, node)

        for name, base in (("loader", yaml.SafeLoader), ("dumper", yaml.SafeDumper)):
            extra = {"flatten_mapping": flatten_mapping} if name == "loader" else {}
            cls = type(f"Histoflow{base.__name__}", (base,), extra)
            # a copy of every first-character list: adding to them in place would change PyYAML's own classes
            cls.yaml_implicit_resolvers = {k: list(v) for k, v in base.yaml_implicit_resolvers.items()}
            if name == "dumper":  # YAML 1.1's numbers and the loader's 0o octal: quoted, "0o17" reads back as text
                cls.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?0o[0-7_]+$"), list("-+0"))
            if name == "loader":  # (the dumper keeps YAML 1.1's: it quotes "017", which other readers take as 15)
                numbers = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
                cls.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag not in numbers]
                                               for k, v in cls.yaml_implicit_resolvers.items()}
                cls.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(_INT), list("-+0123456789"))
                cls.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT), list("-+0123456789."))
            cls.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_SCIENTIFIC), list("-+0123456789."))
            _YAML[name] = cls
    return _YAML["loader"], _YAML["dumper"]


def yaml_load(text):
    """``yaml.safe_load`` with YAML 1.2's numbers: PyYAML follows YAML 1.1, where ``1e-3``, ``5e3`` and ``1.0e3``
    are strings (only ``1.0e+3`` is a float), so a threshold written so was refused as "not a finite number"
    or, where a string is allowed, taken as text; and where ``017`` is 15 and ``1:30`` is 90 (here strings, which
    a number parameter refuses). Everything else is as ``safe_load`` reads it."""
    loader = _yaml_classes()[0](text)  # a SafeLoader: plain data only, whatever the file holds
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def yaml_dump(data, stream=None, **kw):
    """``yaml.safe_dump`` whose output :func:`yaml_load` reads back as it was (strings that spell a number in
    scientific notation are quoted)."""
    import yaml

    return yaml.dump(data, stream, Dumper=_yaml_classes()[1], **kw)

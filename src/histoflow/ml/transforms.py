"""Transforms that run a trained model on tiles (importing this module imports torch).

:class:`NucleusSegmentation` segments nuclei in H&E tiles with a nucleus model (the shipped one by
default, see ``src/histoflow/data/models/nucleus_unet.md``). The model is loaded once per process,
never per tile; it runs in torch or, with ``backend="onnx"``, in onnxruntime.

Tiles on a grid with overlap carry their :attr:`~histoflow.core.tile.Tile.core`; the transform keeps
the nuclei whose centroid lies in the core, whole (their pixels in the overlap included), so a nucleus
cut by a tile edge is found once, in one piece, by the tile that owns its centre.
"""
from __future__ import annotations

import math
import os
import threading
import warnings

import numpy as np

from ..errors import HistoflowError, ParameterError, RegionTooLargeError
from ..transforms.base import Transform, outputs_from
from ..transforms.objects import LARGE_NUCLEUS_UM, keep_owned

__all__ = ["NucleusSegmentation", "PatchClassification", "SemanticSegmentation", "SegmentCellsModel",
           "StyleTransferHE", "builtin_model_path", "builtin_nucleus_model", "BUILTIN_NUCLEUS_MODELS", "keep_owned"]

_LOCK = threading.Lock()
_CACHE: dict = {}


def builtin_model_path(name: str = "nucleus_unet") -> str:
    """Path of a model shipped inside the package (``histoflow/data/models/<name>.pt``)."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "models")
    path = os.path.join(here, f"{name}.pt")
    if not os.path.exists(path):
        raise HistoflowError(f"the built-in model {name!r} is not installed ({path} is missing)")
    return path


#: the shipped nucleus models and the pixel size (µm) each was trained at; "builtin" picks the nearer
BUILTIN_NUCLEUS_MODELS = {"nucleus_unet": 0.25, "nucleus_unet_20x": 0.5}


def builtin_nucleus_model(mpp: float | None = None) -> str:
    """Path of the shipped nucleus model for images of ``mpp`` µm/px: the one trained nearest that scale.

    ``None`` (pixel size unknown) gives the 40x model (0.25 µm/px), the one the images are assumed at.
    Nearest is on a log scale: below ~0.35 µm/px the 40x model, above it the 20x one.
    """
    if mpp is None or not float(mpp) > 0:
        return builtin_model_path("nucleus_unet")
    import math

    name = min(BUILTIN_NUCLEUS_MODELS, key=lambda n: abs(math.log(float(mpp) / BUILTIN_NUCLEUS_MODELS[n])))
    return builtin_model_path(name)


def _resolve(model: str, mpp: float | None = None) -> str:
    if model in (None, "builtin"):
        return builtin_nucleus_model(mpp)
    if model in BUILTIN_NUCLEUS_MODELS:
        return builtin_model_path(model)
    return _existing_model(model)


def _rgb_for_he_model(image) -> np.ndarray:
    """An RGB uint8 view of an H&E image for the nucleus models (:func:`histoflow.ml.nucleus.rgb_uint8`)."""
    from .nucleus import rgb_uint8

    return rgb_uint8(image, "NucleusSegmentation")


#: pixels by which NucleusSegmentation widens a tile's core when choosing the nuclei it keeps (see keep_owned)
OWNERSHIP_MARGIN = 1.0


def _tile_origin(tile) -> tuple[int, int]:
    """(y, x): a tile's place in the slide's pixels at its own scale (the models' grids are the slide's, not the
    tile's)."""
    ds = float(tile.downsample or 1.0)
    return int(round(tile.coords[1] / ds)), int(round(tile.coords[0] / ds))


class _Runner:
    """A loaded nucleus model (torch or onnxruntime) with its card; one per process and model file."""

    def __init__(self, path: str, backend: str, threads: int | None):
        from . import models

        self.card = models.read_card(path)
        self.path = path
        self._said_mpp = bool(self.card.get("mpp"))  # a card without mpp is named once, when a scale depends on it
        self.mpp = float(self.card.get("mpp") or 0.25)
        self.backend = backend
        if backend == "onnx":
            from .onnx import export_onnx, get_session

            onnx_path = os.path.splitext(path)[0] + ".onnx"
            if not _fresh(onnx_path, path):
                onnx_path = _writable_onnx(path)
                if not _fresh(onnx_path, path):
                    # several worker processes may export at once: each writes its own file, renamed into place
                    tmp = f"{onnx_path}.tmp-{os.getpid()}.onnx"
                    export_onnx(models.load(path), tmp, input_shape=(1, 3, 256, 256), dynamic_spatial=True)
                    os.replace(tmp, onnx_path)
            self.session = get_session(onnx_path, intra_op_threads=threads)
            self.model = _OnnxModule(self.session, _card_size_divisor(self.card))
        else:
            import torch

            self.model = models.load(path).to("cuda" if torch.cuda.is_available() else "cpu")
        self.threads = int(threads) if threads else None

    def segment(self, image, mpp, **kw):
        from .nucleus import segment_nuclei

        if mpp is not None and not self._said_mpp:  # an image of unknown pixel size is not resized: no word
            self._said_mpp = True
            warnings.warn(f"{self.path}: the model's card does not say the pixel size it was trained at (mpp); "
                          "assuming 0.25 µm/px (40x): add \"mpp\" to its card if that is wrong", UserWarning,
                          stacklevel=3)
        scale = 1.0 if mpp is None else float(mpp) / self.mpp
        if self.backend == "onnx" or not self.threads:
            return segment_nuclei(self.model, image, scale=scale, **kw)
        import torch

        # torch's thread count is the process's: set for this call only (it stayed set, for every model and
        # every later caller, from the first transform that asked)
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return segment_nuclei(self.model, image, scale=scale, **kw)
        finally:
            torch.set_num_threads(before)


def _fresh(onnx_path, weights):
    """Whether an ONNX export exists and is newer than the weights it was made from."""
    return os.path.exists(onnx_path) and os.path.getmtime(onnx_path) >= os.path.getmtime(weights)


def _writable_onnx(path):
    """An ONNX file next to the weights when that folder is writable and not inside the installed package,
    else in the user cache (``~/.cache/histoflow``; the shipped models' exports go there, not into the
    package), named after the weights' full path (two read-only ``best.pt`` of different runs must not share
    one export)."""
    import hashlib

    folder = os.path.dirname(os.path.abspath(path))
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    inside = os.path.commonpath([folder, package]) == package
    if os.access(folder, os.W_OK) and not inside:
        return os.path.splitext(path)[0] + ".onnx"
    cache = os.path.join(os.path.expanduser("~"), ".cache", "histoflow")
    os.makedirs(cache, exist_ok=True)
    key = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    return os.path.join(cache, f"{os.path.basename(os.path.splitext(path)[0])}-{key}.onnx")


def _card_size_divisor(card) -> int:
    """The input size divisor of the network a card describes (built without weights: a 6-level U-Net is 32,
    an ensemble the least common multiple of its members'); 16 when it cannot be built."""
    from . import models

    try:
        net = models.create(card["architecture"], **(card.get("parameters") or {}))
    except Exception:  # noqa: BLE001 - an unknown architecture: the shipped models' divisor
        return 16
    return int(getattr(net, "size_divisor", 16))


class _OnnxModule:
    """Looks enough like a torch module for :func:`histoflow.ml.nucleus.predict_maps`."""

    def __init__(self, session, size_divisor: int = 16):
        self.session = session
        self.size_divisor = int(size_divisor)

    def eval(self):
        return self

    def parameters(self):
        import torch

        yield torch.zeros(1)

    def __call__(self, x):
        import torch

        out = self.session(x.float().cpu().numpy())
        if isinstance(out, dict):
            out = next(iter(out.values()))
        return torch.from_numpy(np.asarray(out))


def _stamp(*paths) -> tuple:
    """(mtime, size) of each file that exists: a model saved again during a session is loaded again."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def _runner(model, backend, threads, mpp=None) -> _Runner:
    path = _resolve(model, mpp)
    card = os.path.splitext(path)[0] + ".json"
    key = (os.path.abspath(path), backend, threads, os.getpid(), _stamp(path, card))
    with _LOCK:
        r = _CACHE.get(key)
        if r is None:
            r = _CACHE[key] = _Runner(path, backend, threads)
    return r


class NucleusSegmentation(Transform):
    """Nucleus instances of H&E tiles with a trained nucleus model.

    Parameters
    ----------
    model : str
        ``"builtin"``: the shipped MoNuSeg-trained U-Net for the tile's scale, ``"nucleus_unet"`` (trained
        at 0.25 µm/px, 40x) for tiles finer than ~0.35 µm/px or of unknown pixel size, else
        ``"nucleus_unet_20x"`` (0.5 µm/px); either name forces that model. Or the path of a nucleus model
        saved by :func:`histoflow.ml.models.save` (a ``.pt`` with its ``.json`` card; the card's ``mpp``
        is the resolution the model was trained at; an ensemble made by
        :func:`histoflow.ml.models.ensemble` works too).
    backend : {"torch", "onnx"}
        Run the network in torch or onnxruntime (exported once next to the weights, or in
        ``~/.cache/histoflow`` when that folder is read-only).
    mask_name, label_name : str
        Tile mask written (int32 instance labels, 0 background) and tile label (nucleus count).
    fg_threshold, marker_threshold : float, optional
        Post-processing thresholds (nucleus probability; HV boundary energy for markers). Default: the
        values in the model card's ``postprocess`` (chosen on training images), else 0.5 and 0.4.
    min_size : int, optional
        Smallest nucleus kept, in pixels of the tile (default: the card's, which is in the model's pixels,
        so the same area in µm² at any tile scale; else 10).
    threads : int, optional
        torch threads per process (default: torch's own choice).
    tta : bool
        Average the network's maps over the four flips of each tile (about 4x slower, a little better).
    amp : bool
        Run the torch network in bfloat16 autocast (about 1.9x faster on CPUs with native bf16, e.g. AMX;
        probabilities move by up to ~0.03, so nuclei differ a little between machines). Default float32:
        the same result on every machine, and the same as ``backend="onnx"`` within 1e-4.

    Tiles are resized to the model's µm/px when the slide's pixel size is known (``tile.mpp``), and
    the labels come back at the tile's size. Run it on a grid with overlap (e.g. ``overlap=64``) so
    nuclei on tile borders are whole: each is kept by the tile owning its centroid.
    """

    slide_types = ("HE",)
    changes_image = False

    def __init__(self, model="builtin", backend="torch", mask_name="nuclei", label_name="nucleus_count",
                 fg_threshold=None, marker_threshold=None, min_size=None, threads=None, tta=False, amp=False):
        if backend not in ("torch", "onnx"):
            raise ParameterError(f"NucleusSegmentation: backend must be 'torch' or 'onnx', got {backend!r}")
        self.model = model
        self.backend = backend
        self.mask_name = mask_name
        self.label_name = label_name
        for name, v, top in (("fg_threshold", fg_threshold, 1.0), ("marker_threshold", marker_threshold, 1.0),
                             ("min_size", min_size, None)):
            if v is None:
                continue  # the model card's
            bad = isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not np.isfinite(v) or v < 0 or (top is not None and v > top)
            if bad:  # NaN or 7 found no nucleus at all, and said nothing
                raise ParameterError(f"NucleusSegmentation: {name} must be a number in "
                                     f"{'[0, 1] (a probability)' if top else '[0, inf) (pixels)'}, got {v!r}")
        self.fg_threshold = fg_threshold
        self.marker_threshold = marker_threshold
        self.min_size = min_size
        self.threads = threads
        self.tta = tta
        self.amp = bool(amp)
        if self.amp and backend == "onnx":
            raise ParameterError("NucleusSegmentation: amp=True runs the torch network in bfloat16; onnxruntime "
                                 "(backend='onnx') runs float32: use one or the other")
        _resolve(model)  # fail at construction when the model file is missing

    def min_overlap(self, mpp) -> int:
        """A large nucleus, whole (at the 40x model's 0.25 µm/px when the pixel size is unknown)."""
        return int(np.ceil(LARGE_NUCLEUS_UM / float(mpp or 0.25)))

    masks_out = outputs_from("mask_name")

    labels_out = outputs_from("label_name")

    def F(self, image, mpp=None, core=None, origin=(0, 0)):
        """Instance labels (int32) of an RGB image whose pixel size is ``mpp`` µm (None: the model's);
        ``origin`` = (y, x), where it lies in the slide in its own pixels
        (:func:`~histoflow.ml.nucleus.segment_nuclei`)."""
        if np.asarray(image).size == 0:  # no pixels, no nuclei (the network cannot run on them)
            return np.zeros(np.shape(image)[:2], np.int32)
        r = _runner(self.model, self.backend, self.threads, mpp)
        post = dict(r.card.get("postprocess") or {})
        from .nucleus import SCALE_TOLERANCE

        scale = 1.0 if mpp is None else float(mpp) / r.mpp
        if "min_size" in post and abs(scale - 1.0) > SCALE_TOLERANCE:
            post["min_size"] = post["min_size"] / scale ** 2  # the card's is in the model's pixels, ours the tile's
        for k in ("fg_threshold", "marker_threshold", "min_size"):
            if getattr(self, k) is not None:
                post[k] = getattr(self, k)
        labels = r.segment(_rgb_for_he_model(image), mpp, tta=self.tta, amp=getattr(self, "amp", False),
                           origin=origin, **post)
        # a pixel of margin: a nucleus on the split between two tiles, outlined a little differently by each,
        # could have its centroid put on the other's side by both and be lost; kept by both, the slide's label
        # image keeps it once (assemble_instances)
        return keep_owned(labels, core, margin=OWNERSHIP_MARGIN)

    def apply(self, tile):
        mpp = tile.mpp[0] if tile.mpp else None
        image = tile.image
        origin = _tile_origin(tile)
        if tile.extent is not None:  # an edge tile: the model runs on the part inside the slide only
            ew, eh = tile.extent
            labels = np.zeros(image.shape[:2], np.int32)
            labels[:eh, :ew] = self.F(image[:eh, :ew], mpp, tile.core, origin)
        else:
            labels = self.F(image, mpp, tile.core, origin)
        tile.masks[self.mask_name] = labels
        tile.labels[self.label_name] = int(labels.max(initial=0))


# ------------------------------------------------------------------------------------ any model
class _ModelRunner:
    """A model file loaded once per process: torch (``.pt`` + card) or onnxruntime (``.onnx``)."""

    def __init__(self, path: str, device=None):
        self.path = path
        if path.endswith(".onnx"):
            from .onnx import get_session

            self.session = get_session(path)
            self.card = _card_near(path)
            self.torch = None
        else:
            import torch

            from . import models

            self.card = models.read_card(path)
            self.torch = models.load(path)
            self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available()
                                                                              else "cpu")
            self.torch.to(self.device)

    @property
    def size_divisor(self) -> int:
        """Input sides must be multiples of this: the network's own, or from the card of an ONNX file (U-Net:
        2 ** (levels - 1)); 32 when neither says."""
        if self.torch is not None and hasattr(self.torch, "size_divisor"):
            return int(self.torch.size_divisor)
        card = self.card or {}
        if card.get("size_divisor"):
            return int(card["size_divisor"])
        filters = (card.get("parameters") or {}).get("filters")
        if card.get("architecture") == "unet" and filters:
            return 2 ** (len(filters) - 1)
        return 32

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """``(N, C, H, W)`` float32 in, the first output as float32 numpy out."""
        if self.torch is None:
            out = self.session(batch)
            return np.asarray(next(iter(out.values())) if isinstance(out, dict) else out, np.float32)
        import torch

        with torch.no_grad():
            out = self.torch(torch.from_numpy(batch).to(self.device))
            if isinstance(out, dict):
                out = next(iter(out.values()))
            return out.float().cpu().numpy()


def _model_card(path) -> dict:
    """The card of a ``.pt`` model, read (not the weights) once per file version and process."""
    from . import models

    key = ("card", path, os.getpid(), _stamp(path, os.path.splitext(path)[0] + ".json"))
    with _LOCK:
        card = _CACHE.get(key)
        if card is None:
            card = _CACHE[key] = models.read_card(path)
    return card


def _card_near(path):
    import json

    from .models import ModelError

    p = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(p):
        return {}
    try:
        with open(p, encoding="utf-8") as f:
            card = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{p}: not a readable JSON model card ({e})") from None
    if not isinstance(card, dict):
        raise ModelError(f"{p}: a model card is a JSON object, got {type(card).__name__}")
    return card


def _existing_model(path) -> str:
    """``path`` as a str, or a HistoflowError naming it when there is no such file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise HistoflowError(f"{path}: no such model file")
    return path


def _model_runner(path, device=None) -> _ModelRunner:
    path = os.path.abspath(os.fspath(path))
    key = ("any", path, os.getpid(), _stamp(path, os.path.splitext(path)[0] + ".json"))
    with _LOCK:
        r = _CACHE.get(key)
        if r is None:  # the file is checked once, not per tile
            r = _CACHE[key] = _ModelRunner(_existing_model(path), device)
    return r


def _need_pixels(image, who):
    """Refuse an image without pixels: a classifier, a class map or a virtual stain has nothing to give."""
    if np.asarray(image).size == 0:
        raise ParameterError(f"{who}: the image has no pixels (shape {np.shape(image)})")


def _as_input(image, scale):
    """A tile as a float32 ``(1, C, H, W)`` batch, scaled as the datasets scale training tiles
    (``histoflow.ml.data``): unsigned integers over their dtype's maximum (uint8 / 255, uint16 / 65535, ...),
    booleans as 0 / 1, floats as they are."""
    a = np.asarray(image)
    if a.ndim == 2:  # a grey image: one channel (the engine gives (h, w, 1); F(image) may get (h, w))
        a = a[:, :, None]
    if a.ndim != 3:
        raise ParameterError(f"the model's input is an (h, w) or (h, w, channels) image, got shape {a.shape}")
    if a.dtype.kind == "u":
        a = a.astype(np.float32) * np.float32(1.0 / np.iinfo(a.dtype).max)
    else:
        a = a.astype(np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))[None] if scale else a


def _heatmap_downsample(name, value):
    """``heatmap_downsample`` checked when the transform is made: None, or a finite number > 0 (-8 ran every tile
    before the store refused it, NaN was a bare numpy error at the first tile, 0 became the default)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)) or \
            not math.isfinite(value) or value <= 0:
        raise ParameterError(f"{name}: heatmap_downsample is level-0 pixels per heatmap pixel, a number > 0 (or None: "
                             f"the tiles' own pixels), not {value!r}")
    return value


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _class_probabilities(logits):
    """Probabilities over the classes (axis 0) of a model's logits: softmax, or for a single output (a binary
    model trained with a sigmoid) the two classes (1 - p, p) (a softmax over one channel is 1 everywhere)."""
    if logits.shape[0] == 1:
        p = 1 / (1 + np.exp(-np.clip(logits[0], -80, 80)))
        return np.stack([1 - p, p])
    return _softmax(logits, 0)


#: the value of a stitched argmax mask where no tile ran
NOT_PREDICTED = 255
#: the largest slide-level map (pixels per class) made without an explicit, coarser heatmap_downsample
MAX_HEATMAP_PIXELS = 2 ** 28


def level_size(levels, downsample):
    """``(width, height)`` of the pyramid level whose downsample is ``downsample`` (``levels``: ``Level`` objects
    or ``{"width", "height", "downsample"}`` records), or None: a level's own size, not level 0's divided by
    its mean downsample (2220 / 3.99933 px is 556 px where the level has 555)."""
    for lv in levels or ():
        get = lv.get if isinstance(lv, dict) else lambda k, lv=lv: getattr(lv, k)
        if abs(float(get("downsample")) - float(downsample)) <= 1e-9 * float(downsample):
            return int(get("width")), int(get("height"))
    return None


class _Heatmap:
    """Weighted sums of tile values painted at a fixed downsample of level 0.

    With ``edges`` (the level-0 x and y of every tile edge of the grid), the sums are kept in the cells between
    the heatmap's pixel edges and the tile edges, and each heatmap pixel is the area mean of its cells at the
    end: a pixel that a tile's edge crosses is then the area mean of the blended map, not a mean that counted
    its part covered by two tiles twice (faint seams along tile edges at a downsample that does not divide the
    stride)."""

    def __init__(self, dimensions, downsample, channels, size=None, edges=None):
        self.ds = float(downsample)
        self.dimensions = tuple(int(d) for d in dimensions)
        w, h = size or (max(1, int(np.ceil(d / self.ds))) for d in dimensions)
        self.size = (int(w), int(h))
        self.cells = None
        if edges is not None:  # per axis: the cells' edges, and the heatmap pixel each cell lies in
            self.cells = [_cells(n, self.ds, lim, e) for n, lim, e in zip(self.size, self.dimensions, edges)]
            w, h = (len(c[0]) - 1 for c in self.cells)
        self.sum = np.zeros((channels, h, w), np.float32)
        self.weight = np.zeros((h, w), np.float32)

    def add(self, x, y, w0, h0, values, weights=None):
        """Paint ``values`` ((C,) constants or (C, h, w) maps) over the level-0 box (x, y, w0, h0).

        A map's pixels each cover ``w0 / w`` x ``h0 / h`` level-0 pixels of the box; each heatmap pixel gets
        the mean of the map pixels it overlaps, weighted by the area of the overlap, over the part of the box
        inside the slide only (with ``weights``, the blending window, the tiles meeting there count by their
        mean window weight): a padded edge tile's fill outside
        the slide counts for nothing, and a downsample that does not divide the tile positions places every
        map pixel where it lies (rounding the box to whole heatmap pixels shifted a tile by up to half a
        heatmap pixel, and squeezed it)."""
        if values.ndim == 1 and weights is None:  # a constant: each heatmap pixel weighted by the area it gets
            return self._add_constant(x, y, w0, h0, values)
        th, tw = (values.shape[1:] if values.ndim == 3 else weights.shape)
        H, W = self.weight.shape
        if self.cells is None:
            wy, sy = _area_matrix(y, th, h0 / th, self.ds, self.dimensions[1], H)
            wx, sx = _area_matrix(x, tw, w0 / tw, self.ds, self.dimensions[0], W)
        else:
            wy, sy = _edge_matrix(y, th, h0 / th, self.cells[1][0], self.dimensions[1])
            wx, sx = _edge_matrix(x, tw, w0 / tw, self.cells[0][0], self.dimensions[0])
        if wy is None or wx is None:
            return
        wt = np.ones((th, tw), np.float32) if weights is None else np.asarray(weights, np.float32)
        if values.ndim == 1:
            values = np.broadcast_to(np.asarray(values, np.float32)[:, None, None], (len(values), th, tw))
        ky, kx = wy.shape[0], wx.shape[0]
        # per heatmap pixel: the tile's mean value over the area it covers there, weighted by the area times the
        # tile's mean blending weight there (so that, where no tiles overlap, the result is the plain area mean
        # of the map, and where they do, each tile counts as much as its window says)
        area = _resample(np.ones((th, tw), np.float32), wy, wx)
        wsum = _resample(wt, wy, wx)
        with np.errstate(invalid="ignore", divide="ignore"):
            scale = np.where(area > 0, wsum / area, 0).astype(np.float32)
        for c in range(len(values)):
            self.sum[c, sy:sy + ky, sx:sx + kx] += _resample(np.asarray(values[c], np.float32), wy, wx) * scale
        self.weight[sy:sy + ky, sx:sx + kx] += wsum

    def _add_constant(self, x, y, w0, h0, values):
        H, W = self.weight.shape
        wy, sy = _cover(y, min(y + h0, self.dimensions[1]), self.ds, H)
        wx, sx = _cover(x, min(x + w0, self.dimensions[0]), self.ds, W)
        if wy.size == 0 or wx.size == 0:
            return
        wt = np.outer(wy, wx).astype(np.float32)
        self.sum[:, sy:sy + len(wy), sx:sx + len(wx)] += values[:, None, None] * wt
        self.weight[sy:sy + len(wy), sx:sx + len(wx)] += wt

    def result(self):
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.sum / self.weight
        out[:, self.weight == 0] = np.nan
        if self.cells is None:
            return out
        # each heatmap pixel: the area mean of its cells where tiles ran
        (ex, gx), (ey, gy) = self.cells
        area = np.diff(ey)[:, None] * np.diff(ex)[None, :] * (self.weight > 0)
        starts_x = np.searchsorted(gx, np.arange(self.size[0]))
        starts_y = np.searchsorted(gy, np.arange(self.size[1]))

        def per_pixel(a):
            return np.add.reduceat(np.add.reduceat(a, starts_y, axis=0), starts_x, axis=1)

        cover = per_pixel(area)
        maps = np.empty((out.shape[0], self.size[1], self.size[0]), np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            for c in range(out.shape[0]):
                maps[c] = per_pixel(np.where(area > 0, out[c], 0) * area) / cover
        maps[:, cover <= 0] = np.nan
        return maps


def _cells(n, ds, limit, tile_edges):
    """The edges (level-0) of the cells of one axis: those of the ``n`` heatmap pixels, the slide's end and the
    tile edges inside; and the heatmap pixel of each cell."""
    top = n * ds
    inside = [e for e in tile_edges if 0 < e < top]
    edges = np.unique(np.concatenate([np.arange(n + 1, dtype=np.float64) * ds, np.asarray(inside, np.float64),
                                      [min(float(limit), top)]]))
    edges = edges[np.concatenate([[True], np.diff(edges) > 1e-9 * max(1.0, top)])]
    pixel = np.minimum(np.floor(edges[:-1] / ds + 1e-9), n - 1).astype(np.int64)
    return edges, pixel


def _edge_matrix(a, n, d, edges, limit):
    """As :func:`_area_matrix`, for cells of any widths (``edges``, sorted): the fraction of each cell that each
    of ``n`` map pixels ``[a + j d, a + (j + 1) d)``, cut to ``[0, limit)``, covers; (None, 0) when none."""
    e = np.clip(a + np.arange(n + 1, dtype=np.float64) * d, 0, limit)
    i0 = max(0, int(np.searchsorted(edges, e[0], side="right")) - 1)
    i1 = min(len(edges) - 1, int(np.searchsorted(edges, e[-1], side="left")))
    if i1 <= i0:
        return None, 0
    lo, hi = edges[i0:i1], edges[i0 + 1:i1 + 1]
    overlap = np.minimum(hi[:, None], e[None, 1:]) - np.maximum(lo[:, None], e[None, :-1])
    return (np.clip(overlap, 0, None) / (hi - lo)[:, None]).astype(np.float32), i0


def _cover(a, b, ds, n):
    """Fractions of the heatmap pixels ``[i * ds, (i + 1) * ds)`` that the level-0 interval [a, b) covers:
    (weights, first pixel)."""
    if b <= a:
        return np.zeros(0), 0
    i0, i1 = int(np.floor(a / ds)), min(n, int(np.ceil(b / ds)))
    i0 = min(max(i0, 0), n)
    if i1 <= i0:
        return np.zeros(0), 0
    edges = np.arange(i0, i1 + 1) * ds
    lo, hi = np.maximum(edges[:-1], a), np.minimum(edges[1:], b)
    return np.clip(hi - lo, 0, None) / ds, i0


def _resample(a, wy, wx):
    """``wy @ a @ wx.T``, where a weight matrix that maps each map pixel onto one heatmap pixel of its own (the
    heatmap at the tiles' scale, aligned: the default) is applied as a product with its diagonal instead."""
    for axis, w in ((0, wy), (1, wx)):
        k = w.shape[0]
        if k <= w.shape[1] and np.count_nonzero(w) == np.count_nonzero(np.diagonal(w)):  # diagonal
            a = a[:k] * np.diagonal(w)[:, None] if axis == 0 else a[:, :k] * np.diagonal(w)[None, :]
        else:
            a = w @ a if axis == 0 else a @ w.T
    return a


def _area_matrix(a, n, d, ds, limit, n_heat):
    """``(weights (k, n), first heatmap pixel)``: the overlap, in heatmap pixels, of each of ``n`` map pixels
    ``[a + j d, a + (j + 1) d)``, cut to the slide's ``[0, limit)``, with each of the ``k`` heatmap pixels
    ``[i ds, (i + 1) ds)`` they touch; (None, 0) when they touch none."""
    e = np.clip(a + np.arange(n + 1, dtype=np.float64) * d, 0, limit)
    i0 = max(0, int(np.floor(e[0] / ds)))
    i1 = min(n_heat, int(np.ceil(e[-1] / ds)))
    if i1 <= i0:
        return None, 0
    edges = np.arange(i0, i1 + 1, dtype=np.float64) * ds
    overlap = np.minimum(edges[1:, None], e[None, 1:]) - np.maximum(edges[:-1, None], e[None, :-1])
    return (np.clip(overlap, 0, None) / ds).astype(np.float32), i0


def _blend_weights(h, w, sigma_scale=0.125):
    """A Gaussian window (1 in the centre, small but > 0 at the edges) for overlap blending."""
    yy = np.exp(-0.5 * ((np.arange(h) - (h - 1) / 2) / (sigma_scale * h * 2)) ** 2)
    xx = np.exp(-0.5 * ((np.arange(w) - (w - 1) / 2) / (sigma_scale * w * 2)) ** 2)
    return np.maximum(np.outer(yy, xx), 1e-3).astype(np.float32)


class _ReducingModelTransform(Transform, register=False):
    reduces = True
    changes_image = False

    def fit_slide(self, slide):
        self._dims = tuple(slide.dimensions)
        self._levels = list(getattr(getattr(slide, "reader", slide), "levels", None) or [])
        self._slide_path = str(slide.path)
        self._maps = None
        self._tile_edges = None

    def fit_grid(self, grid):
        """The level-0 x and y of every tile edge of the grid, as the maps are painted (a tile's corner and its
        size times its downsample): stitched maps keep sums between them (see :class:`_Heatmap`)."""
        d = float(grid.downsample)
        (tw, th) = grid.tile_size
        w0, h0 = int(round(tw * d)), int(round(th * d))
        xs = {x for c in range(grid.cols) for x in (grid.spec(0, c).x, grid.spec(0, c).x + w0)}
        ys = {y for r in range(grid.rows) for y in (grid.spec(r, 0).y, grid.spec(r, 0).y + h0)}
        self._tile_edges = (sorted(xs), sorted(ys))

    def _classes(self, n):
        names = self.classes or _model_runner(self.model).card.get("classes")
        names = list(names) if names else [str(i) for i in range(n)]
        if len(names) != n:
            raise HistoflowError(f"{self.model}: the model gives {n} outputs but {len(names)} class names "
                                 f"({names})")
        return names

    def _names_in(self, present, prefix):
        """The class names whose outputs ``<prefix><class>`` are in ``present`` (a tile's masks or labels),
        exactly: the transform's ``classes``, else the model card's, else 0, 1, ... as far as they go. (Names
        were found by the prefix alone, which took in the outputs of another transform whose name extends
        it: "tumour" read "tumour_bed" as a class.) None when the tile has none of them."""
        names = getattr(self, "_names", None)
        if names is None:
            path = os.path.abspath(os.fspath(self.model))
            card = _card_near(path) if path.endswith(".onnx") else _model_card(path)
            names = self.classes or card.get("classes")
        if names:
            names = [str(n) for n in names]
            return names if all(prefix + n in present for n in names) else None
        found = []
        while f"{prefix}{len(found)}" in present:
            found.append(str(len(found)))
        return found or None

    def _paint(self, tile, values, weights=None):
        if getattr(self, "_dims", None) is None:
            raise HistoflowError(f"{type(self).__name__} makes a slide-level map: run it through "
                                 "SlideData.run (fit_slide sets the slide's size)")
        if self._maps is None:
            ds = self.heatmap_downsample if self.heatmap_downsample is not None else \
                tile.downsample * (tile.size[0] if values.ndim == 1 else 1)
            w, h = (int(np.ceil(d / float(ds))) for d in self._dims)
            if w * h > MAX_HEATMAP_PIXELS:
                raise RegionTooLargeError(
                    f"{getattr(self, '_slide_path', 'the slide')}: {type(self).__name__}'s slide-level maps would be "
                    f"{w} x {h} pixels x {len(values)} classes ({w * h * (len(values) + 1) * 4 / 2**30:.1f} GiB) at "
                    f"a downsample of {float(ds):g}; pass a larger heatmap_downsample (e.g. "
                    f"{float(ds) * np.ceil(np.sqrt(w * h / MAX_HEATMAP_PIXELS)):g})")
            edges = getattr(self, "_tile_edges", None)
            own = abs(float(ds) - float(tile.downsample)) <= 1e-9 * float(ds)  # the tiles' own pixels: placed 1:1
            if own or values.ndim != 3 or edges is None or all(abs(e / float(ds) - round(e / float(ds))) < 1e-9
                                                               for axis in edges for e in axis):
                edges = None  # every tile edge is a heatmap pixel edge (the tiles' own level, a dividing downsample)
            self._maps = _Heatmap(self._dims, ds, len(values), level_size(getattr(self, "_levels", None), ds),
                                  edges=edges)
        d = float(tile.downsample)
        if values.ndim == 3 and abs(self._maps.ds - d) <= 1e-9 * d:
            # a map at the tiles' own level: placed by their level pixels, one map pixel on one heatmap pixel
            # (level-0 coordinates rounded to whole pixels and a tile 512 px wide for 128 px at 3.99933 smeared
            # every pixel over two)
            lx, ly = round(tile.coords[0] / d), round(tile.coords[1] / d)
            self._maps.add(lx * d, ly * d, tile.size[0] * d, tile.size[1] * d, values, weights)
            return
        w0 = int(round(tile.size[0] * tile.downsample))
        h0 = int(round(tile.size[1] * tile.downsample))
        if values.ndim == 1:
            # a constant is placed where the grid put the tile, in its level's pixels (the level-0 coordinates are
            # those rounded: at a downsample of 1.00005 the tile at x = 513 covered 0.03 px of the cell before
            # its own and one heatmap pixel per tile mixed in a sliver of the neighbouring tile's value)
            x, y = tile.coords
            if d >= 1:
                x, y = round(x / d) * d, round(y / d) * d
            if tile.core is not None:  # a constant covers the part of the slide the tile owns
                cx0, cy0, cx1, cy1 = tile.core
                self._maps.add(x + cx0 * d, y + cy0 * d, (cx1 - cx0) * d, (cy1 - cy0) * d, values)
            else:
                self._maps.add(x, y, tile.size[0] * d, tile.size[1] * d, values)
            return
        self._maps.add(tile.coords[0], tile.coords[1], w0, h0, values, weights)


class PatchClassification(_ReducingModelTransform):
    """Classify each tile with a patch classifier and build a slide-level probability heatmap.

    Parameters
    ----------
    model : str
        A ``.pt`` saved by :func:`histoflow.ml.models.save` (run in torch) or an ``.onnx`` file (run in
        onnxruntime); loaded once per process.
    classes : list of str, optional
        Class names (default: the card's ``classes``, else 0, 1, ...).
    label_prefix : str
        Tile labels written: ``<prefix><class>`` = probability, and ``<prefix>class`` = the top class.
    heatmap_downsample : float, optional
        Level-0 pixels per heatmap pixel (default: one heatmap pixel per tile width).
    heatmap_prefix : str
        Slide masks written: ``<heatmap_prefix><class>``; two classifiers in one pipeline need two prefixes.

    When run through :meth:`SlideData.run`, the slide's h5path gets one slide mask per class,
    ``heatmap_<class>`` (float32 probabilities, NaN where no tile was run). Each tile's probability covers
    the part of the slide it owns (its core: with overlapping tiles, the middle of the overlaps), and a
    heatmap pixel is the area-weighted mean of the tiles covering it: without overlap, one tile per pixel;
    with overlap, a ``heatmap_downsample`` dividing both the stride and half the overlap (64 for 256 px tiles
    overlapping by 128 at level 0) gives each pixel one tile again.
    """

    def __init__(self, model, classes=None, label_prefix="prob_", heatmap_downsample=None,
                 heatmap_prefix="heatmap_"):
        self.model = model
        self.classes = classes
        self.label_prefix = label_prefix
        self.heatmap_downsample = _heatmap_downsample(type(self).__name__, heatmap_downsample)
        self.heatmap_prefix = heatmap_prefix
        _existing_model(model)  # at construction, not on the first tile of a run

    @property
    def slide_mask_prefixes(self):
        return (self.heatmap_prefix,)

    @property
    def labels_out(self):
        return (f"{self.label_prefix}class",)

    def F(self, image):
        """Class probabilities ``(C,)`` of one image."""
        _need_pixels(image, type(self).__name__)
        out = _model_runner(self.model)(_as_input(image, True))
        if out.ndim != 2:
            raise HistoflowError(f"{self.model}: {type(self).__name__} needs a classifier, whose output is "
                                 f"(N, classes); this model gives {tuple(out.shape)} (a segmentation model? use "
                                 "SemanticSegmentation)")
        return _class_probabilities(out[0].astype(np.float64)).astype(np.float32)

    def apply(self, tile):
        p = self.F(tile.image)
        names = self._classes(len(p))
        for name, v in zip(names, p):
            tile.labels[f"{self.label_prefix}{name}"] = float(v)
        tile.labels[f"{self.label_prefix}class"] = names[int(np.argmax(p))]

    def collect(self, tile):
        names = self._names_in(tile.labels, self.label_prefix)
        if names:
            self._names = names
            self._paint(tile, np.array([tile.labels[f"{self.label_prefix}{n}"] for n in names], np.float32))

    def slide_masks(self):
        if getattr(self, "_maps", None) is None:
            return {}
        maps = self._maps.result()
        return {f"{self.heatmap_prefix}{n}": (maps[i], self._maps.ds) for i, n in enumerate(self._names)}


class SemanticSegmentation(_ReducingModelTransform):
    """Segment each tile with a segmentation model; stitch the tiles into slide-level maps.

    Parameters
    ----------
    model : str
        ``.pt`` (torch) or ``.onnx`` (onnxruntime) segmentation model returning ``(N, C, H, W)`` logits.
    classes : list of str, optional
        Class names (default: the card's ``classes``, else 0, 1, ...).
    mask_name : str
        Tile mask written: the argmax class (uint8).
    heatmap_downsample : float, optional
        Level-0 pixels per pixel of the stitched maps (default: the tiles' own).

    Each tile gets the argmax mask and one uint8 probability mask per class, ``<mask_name>_<class>``
    (probability x 255). Overlapping tiles are blended with a Gaussian window (centre pixels count most),
    so seams vanish. The slide's h5path gets ``<mask_name>_prob_<class>`` (float32, NaN where no tile ran)
    and ``<mask_name>`` (uint8 argmax; 255 where no tile ran) slide masks. A model with one output channel
    is read as a sigmoid: two classes, probabilities (1 - p, p).
    """

    def __init__(self, model, classes=None, mask_name="segmentation", heatmap_downsample=None):
        self.model = model
        self.classes = classes
        self.mask_name = mask_name
        self.heatmap_downsample = _heatmap_downsample(type(self).__name__, heatmap_downsample)
        _existing_model(model)  # at construction, not on the first tile of a run

    masks_out = outputs_from("mask_name")

    @property
    def slide_mask_prefixes(self):  # <mask_name> and <mask_name>_prob_<class>
        return (self.mask_name,)

    def makes_slide_mask(self, name):  # (not "tumour_bed" for mask_name "tumour")
        return name == self.mask_name or name.startswith(f"{self.mask_name}_prob_")

    def F(self, image):
        """Class probabilities ``(C, H, W)`` of one image (padded to the model's divisor and cropped back)."""
        _need_pixels(image, type(self).__name__)
        x = _as_input(image, True)
        h, w = x.shape[2:]
        runner = _model_runner(self.model)
        div = runner.size_divisor
        x = np.pad(x, ((0, 0), (0, 0), (0, -h % div), (0, -w % div)), mode="reflect" if min(h, w) > 1 else "edge")
        out = runner(x)
        if out.ndim != 4:
            raise HistoflowError(f"{self.model}: {type(self).__name__} needs a segmentation model, whose output is "
                                 f"(N, classes, H, W); this model gives {tuple(out.shape)} (a classifier? use "
                                 "PatchClassification)")
        logits = out[0][:, :h, :w]
        return _class_probabilities(logits).astype(np.float32)

    def apply(self, tile):
        p = self.F(tile.image)
        tile.masks[self.mask_name] = np.argmax(p, 0).astype(np.uint8)
        names = self._classes(len(p))
        for name, v in zip(names, p):
            tile.masks[f"{self.mask_name}_{name}"] = np.round(v * 255).astype(np.uint8)

    def collect(self, tile):
        prefix = f"{self.mask_name}_"
        names = self._names_in(tile.masks, prefix)
        if not names:
            return
        self._names = names
        p = np.stack([np.asarray(tile.masks[prefix + n], np.float32) / 255 for n in names])
        self._paint(tile, p, _blend_weights(*p.shape[1:]))

    def slide_masks(self):
        if getattr(self, "_maps", None) is None:
            return {}
        maps = self._maps.result()
        out = {f"{self.mask_name}_prob_{n}": (maps[i], self._maps.ds) for i, n in enumerate(self._names)}
        arg = np.nan_to_num(maps, nan=-1).argmax(0).astype(np.uint8)
        arg[np.isnan(maps).all(0)] = NOT_PREDICTED  # no tile ran there: not class 0
        out[self.mask_name] = (arg, self._maps.ds)
        return out


# ------------------------------------------------------------------------------------ cell models
class SegmentCellsModel(Transform):
    """Cells (or nuclei) of fluorescence tiles with a deep-learning segmenter in ONNX (Mesmer-style).

    The model is configured by path and runs in onnxruntime, one session per worker process.
    Pre-processing, as Mesmer's: a nuclear channel and a membrane / cytoplasm channel (the sum of the
    ``membrane_channels``, each scaled by its 99th percentile), each clipped at its ``clip_percentile`` and
    scaled to [0, 1], resampled to the model's ``model_mpp`` and padded to a multiple of 16; the input is
    ``(1, 2, H, W)`` (``layout="NCHW"``) or ``(1, H, W, 2)`` (``"NHWC"``, DeepCell's own).
    In a slide run these scales (each membrane channel's 99th percentile, each input's ``clip_percentile``)
    are taken once for the slide by :meth:`fit_slide`, from full-resolution regions spread over it, so that a
    cell is the same in every tile that holds it and the count does not follow the tile size (per tile, 256
    and 1024 px tiles of a MIBI image gave 388 and 380 cells); a lone image (``F``) takes its own.
    Post-processing, Mesmer's "deep watershed": markers at the maxima of the inner-distance output
    (``inner_channel``) above ``maxima_threshold`` at least ``radius_um`` apart, a foreground where the
    ``foreground_channel`` output exceeds ``interior_threshold``, and a watershed of the inverted inner
    distance from the markers inside it. Labels are resized back to the tile and, with overlapping tiles,
    kept by the tile owning their centroid.

    Parameters
    ----------
    model : str
        Path of the ``.onnx`` file.
    nuclear_channel : str or int
        ``"auto"``: the channel named like a nuclear stain.
    membrane_channels : list of str, optional
        Default: the nuclear channel again (a nuclear-only model input).
    output : int
        Which model output to use when it has several (Mesmer: 0 whole-cell, 1 nuclear... check yours).
    """

    slide_types = None
    changes_image = False

    def __init__(self, model, nuclear_channel="auto", membrane_channels=None, model_mpp=0.5, layout="NCHW",
                 output=0, inner_channel=0, foreground_channel=1, maxima_threshold=0.1, interior_threshold=0.3,
                 radius_um=2.0, min_area_um2=8.0, clip_percentile=99.9, mask_name="cells", label_name="cell_count"):
        if layout not in ("NCHW", "NHWC"):
            raise ParameterError(f"SegmentCellsModel: layout must be 'NCHW' or 'NHWC', got {layout!r}")
        from ..transforms.multiplex import _check_channel, _check_channels

        self.model = model
        # channels by name or index, one membrane channel or a list of them, checked as SegmentCells checks them
        self.nuclear_channel = _check_channel("SegmentCellsModel", "nuclear_channel", nuclear_channel, auto=True)
        self.membrane_channels = _check_channels("SegmentCellsModel", "membrane_channels", membrane_channels)
        self.model_mpp = model_mpp
        self.layout = layout
        self.output = output
        self.inner_channel = inner_channel
        self.foreground_channel = foreground_channel
        self.maxima_threshold = maxima_threshold
        self.interior_threshold = interior_threshold
        self.radius_um = radius_um
        self.min_area_um2 = min_area_um2
        self.clip_percentile = clip_percentile
        self.mask_name = mask_name
        self.label_name = label_name
        self.channel_names_ = None
        self.scales_ = None
        _existing_model(model)

    masks_out = outputs_from("mask_name")

    labels_out = outputs_from("label_name")

    #: side and number (a grid) of the level-0 regions :meth:`fit_slide` takes the slide's scales from
    FIT_REGION, FIT_GRID = 256, 4

    def fit_slide(self, slide):
        """The input scales of the slide, once: from full-resolution regions on a 4 x 4 grid over it."""
        self.channel_names_ = self.input_channel_names(slide)
        self.scales_ = None
        w, h = slide.dimensions
        side = min(self.FIT_REGION, w, h)
        n = self.FIT_GRID
        parts = []
        for fy in (np.arange(n) + 0.5) / n:
            for fx in (np.arange(n) + 0.5) / n:
                x = int(min(max(fx * w - side / 2, 0), w - side))
                y = int(min(max(fy * h - side / 2, 0), h - side))
                parts.append(np.asarray(slide.read_region((x, y), 0, (side, side))))
        self.scales_ = self._scales(np.concatenate([p.reshape(-1, 1, p.shape[-1]) for p in parts]))

    def _channels(self, image):
        """(nuclear channel, membrane channels) of an image, as float32 arrays."""
        from ..transforms.multiplex import nuclear_channel_index
        from ..transforms.objects import find_channel

        names = self.channel_names_ or [str(i) for i in range(image.shape[2])]
        nuc = image[..., nuclear_channel_index(names, self.nuclear_channel)].astype(np.float32)
        mems = [image[..., find_channel(names, ch)].astype(np.float32) for ch in self.membrane_channels or []]
        return nuc, mems

    def _scales(self, image):
        """``{"membrane": each membrane channel's scale, "inputs": the two inputs' scales}`` of an image."""
        nuc, mems = self._channels(image)
        weights = [float(np.percentile(m, 99)) or 1.0 for m in mems]
        mem = sum(m / wt for m, wt in zip(mems, weights)) if mems else nuc
        return {"membrane": weights,
                "inputs": [float(np.percentile(a, self.clip_percentile)) or float(a.max()) or 1.0 for a in (nuc, mem)]}

    def _inputs(self, image):
        sc = self.scales_ or self._scales(image)
        nuc, mems = self._channels(image)
        mem = sum(m / wt for m, wt in zip(mems, sc["membrane"])) if mems else nuc
        return np.stack([np.clip(a / hi, 0, 1) for a, hi in zip((nuc, mem), sc["inputs"])], -1)

    def _predict(self, x, origin=(0, 0)):
        from .onnx import get_session

        sess = get_session(os.fspath(self.model))
        h, w = x.shape[:2]
        # padded with 0 (no signal) to the slide's 16 px grid above and to the left (``origin``: where x lies in
        # the slide, model pixels), so that a network that pools sees every tile on the same grid, and to a
        # multiple of 16 below and to the right
        top, left = int(origin[0]) % 16, int(origin[1]) % 16
        x = np.pad(x, ((top, -(top + h) % 16), (left, -(left + w) % 16), (0, 0)))
        batch = x[None] if self.layout == "NHWC" else x.transpose(2, 0, 1)[None]
        out = sess(np.ascontiguousarray(batch, np.float32))
        if isinstance(out, dict):
            out = list(out.values())[self.output]
        out = np.asarray(out)[0]
        out = out if self.layout == "NHWC" else out.transpose(1, 2, 0)
        return out[top:top + h, left:left + w]

    def min_overlap(self, mpp) -> int:
        """A large cell (twice a large nucleus), whole."""
        return int(np.ceil(2 * LARGE_NUCLEUS_UM / float(mpp or self.model_mpp)))

    def F(self, image, mpp=None, core=None, origin=(0, 0)):
        """Owned cell labels (int32) of a ``(h, w, c)`` image with pixel size ``mpp`` µm; ``origin`` = (y, x):
        where it lies in the slide, in its own pixels (the inputs are resampled onto the slide's model grid and
        padded to its 16 px grid, so a cell does not depend on where a tile begins)."""
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed

        from .nucleus import _from_model_grid, _one_piece, _to_model_grid

        image = np.asarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.size == 0:  # no pixels, no cells (the network cannot run on them)
            return np.zeros(image.shape[:2], np.int32)
        mpp = float(mpp or self.model_mpp)
        x = self._inputs(image)
        h, w = x.shape[:2]
        scale = mpp / float(self.model_mpp)
        resampled = abs(scale - 1) > 1e-3
        if resampled:
            x, (v0, u0) = _to_model_grid(np.ascontiguousarray(x, np.float32), origin, scale)
        else:
            v0, u0 = int(origin[0]), int(origin[1])
        pred = self._predict(x, (v0, u0))
        inner = pred[..., self.inner_channel].astype(np.float32)
        fg = pred[..., self.foreground_channel] > self.interior_threshold
        radius = max(1, int(round(self.radius_um / self.model_mpp)))
        peaks = peak_local_max(inner, min_distance=radius, threshold_abs=self.maxima_threshold, labels=fg.astype(int),
                               exclude_border=False)
        markers = np.zeros(inner.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        lab = watershed(-inner, markers, mask=fg)
        min_area = self.min_area_um2 / self.model_mpp ** 2
        small = np.bincount(lab.ravel()) < min_area
        small[0] = False
        lab[small[lab]] = 0
        if resampled:  # the model pixel under each pixel's centre; a cell cut into pieces by that keeps its largest
            iy = _from_model_grid(h, int(origin[0]), v0, lab.shape[0], scale)
            ix = _from_model_grid(w, int(origin[1]), u0, lab.shape[1], scale)
            lab = lab[iy[:, None], ix[None, :]].astype(np.int32)
            if scale > 1:
                lab = _one_piece(lab)
        return keep_owned(lab, core)

    def apply(self, tile):
        from ..transforms.multiplex import _on_extent

        # an edge tile's fill is not given to the model; labels padded back to the tile with 0
        lab = _on_extent(tile, lambda image: (self.F(image, tile.mpp[0] if tile.mpp else None, tile.core,
                                                     _tile_origin(tile)),))[0]
        tile.masks[self.mask_name] = lab
        tile.labels[self.label_name] = int(lab.max(initial=0))


# ------------------------------------------------------------------------------------ learned virtual H&E
class StyleTransferHE(Transform):
    """Virtual H&E from fluorescence with a learned image-to-image model (e.g. a CycleGAN / pix2pix
    generator exported to ONNX): the learned counterpart of :class:`~histoflow.transforms.VirtualHE`,
    with the same place in a pipeline (the tile becomes 8-bit RGB H&E).

    Pre-processing: the ``channels`` (names or indices, in the model's input order) are each divided by a
    slide-wide ``percentile`` of that channel (from a thumbnail, in :meth:`fit_slide`; per tile without
    one), clipped to [0, 1], mapped to ``input_range``, and padded to a multiple of ``size_divisor``; the
    model gets ``(1, len(channels), H, W)`` float32 and returns ``(1, 3, H, W)`` RGB in ``output_range``
    (``"tanh"``: [-1, 1], the usual GAN generator; ``"unit"``: [0, 1]). One onnxruntime session per
    worker process. Tiles at another pixel size than ``model_mpp`` are resampled to it and back.
    """

    slide_types = None
    slide_type_out = "HE"
    changes_image = True

    def __init__(self, model, channels, percentile=99.0, input_range="unit", output_range="tanh",
                 model_mpp=None, size_divisor=16):
        for name, value in (("input_range", input_range), ("output_range", output_range)):
            if value not in ("unit", "tanh"):
                raise ParameterError(f"StyleTransferHE: {name} must be 'unit' ([0, 1]) or 'tanh' ([-1, 1]), "
                                     f"got {value!r}")
        if not channels:
            raise ParameterError("StyleTransferHE: give the model's input channels (names or indices)")
        self.model = os.fspath(model)  # a str: parameters are saved as YAML/JSON
        self.channels = list(channels)
        self.percentile = percentile
        self.input_range = input_range
        self.output_range = output_range
        self.model_mpp = model_mpp
        self.size_divisor = size_divisor
        self.channel_names_ = None
        self.scales_ = None
        _existing_model(model)

    def _indices(self, names):
        from ..transforms.objects import find_channel

        return [find_channel(names, c) for c in self.channels]  # -1 is the last channel here and in fit_slide alike

    def channel_names_out(self, names):
        return ["R", "G", "B"]

    def fit_slide(self, slide):
        """Slide-wide intensity scales of the input channels, from a thumbnail of those channels only."""
        names = self.input_channel_names(slide)
        self.channel_names_ = names
        thumb = np.asarray(slide.thumbnail(1024, channels=self.slide_channels(slide, names, self._indices(names))),
                           np.float32)
        self.scales_ = [float(np.percentile(thumb[..., i], self.percentile)) or 1.0 for i in range(thumb.shape[2])]

    def F(self, image, mpp=None):
        """8-bit RGB of a ``(h, w, c)`` fluorescence image with pixel size ``mpp`` µm."""
        import cv2

        from .onnx import get_session

        image = np.asarray(image)
        if image.ndim == 2:
            image = image[:, :, None]
        _need_pixels(image, type(self).__name__)
        names = self.channel_names_ or [str(i) for i in range(image.shape[2])]
        x = image[..., self._indices(names)].astype(np.float32)
        scales = self.scales_ or [float(np.percentile(x[..., i], self.percentile)) or 1.0 for i in range(x.shape[2])]
        x = np.clip(x / np.asarray(scales, np.float32), 0, 1)
        if self.input_range == "tanh":
            x = 2 * x - 1
        h, w = x.shape[:2]
        if mpp and self.model_mpp and abs(mpp / self.model_mpp - 1) > 1e-3:
            s = mpp / self.model_mpp
            x = cv2.resize(x, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_LINEAR)
            x = x[:, :, None] if x.ndim == 2 else x
        d = int(self.size_divisor)
        xh, xw = x.shape[:2]
        x = np.pad(x, ((0, -xh % d), (0, -xw % d), (0, 0)), mode="reflect" if min(xh, xw) > d else "edge")
        out = get_session(os.fspath(self.model))(np.ascontiguousarray(x.transpose(2, 0, 1)[None], np.float32))
        out = np.asarray(next(iter(out.values())) if isinstance(out, dict) else out)
        if out.ndim != 4 or out.shape[1] != 3:
            raise HistoflowError(f"{self.model}: a style-transfer model must output (1, 3, H, W) RGB, got {out.shape}")
        rgb = out[0, :, :xh, :xw].transpose(1, 2, 0)
        if self.output_range == "tanh":
            rgb = (rgb + 1) / 2
        rgb = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
        if rgb.shape[:2] != (h, w):
            rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        return rgb

    def apply(self, tile):
        tile.image = self.F(tile.image, tile.mpp[0] if tile.mpp else None)
        tile.slide_type = "HE"

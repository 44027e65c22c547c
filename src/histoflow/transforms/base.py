"""Transform and Pipeline: the unit of tile processing and its composition.

A :class:`Transform` is a small class with parameters and ``apply(tile)``, which updates the tile in place
(its image, masks and labels). It declares the masks and labels it reads and writes and the slide types
it accepts, so a :class:`Pipeline` is checked before the first tile runs. Where it makes sense a
transform also offers a functional form on arrays, ``F(image)``.

Every subclass registers itself under its class name, so pipelines are saved to YAML as names and
parameters (no pickle) and loaded back by name. A user's own transform registers the same way when its
module is imported::

    class Invert(Transform):
        \"\"\"Invert an 8-bit image.\"\"\"
        def __init__(self, keep_masks=True):
            self.keep_masks = keep_masks
        def F(self, image):
            return 255 - image
        def apply(self, tile):
            tile.image = self.F(tile.image)

    pipe = Pipeline([BoxBlur(5), Invert()])
"""
from __future__ import annotations

import inspect
import os

import numpy as np
import yaml

from ..errors import HistoflowError, PipelineError

#: transform name -> class; filled by Transform.__init_subclass__
REGISTRY: dict[str, type[Transform]] = {}

PIPELINE_FORMAT = 1

#: the keys of a pipeline file
_DOCUMENT_KEYS = ("histoflow_pipeline", "steps", "inputs", "modules")


class TransformError(PipelineError):
    """A transform raised on a tile. Carries the transform's name and the tile's coordinates."""

    def __init__(self, message, *, transform=None, coords=None, slide=None, reason=None):
        super().__init__(message)
        self.transform = transform
        self.coords = coords
        self.slide = slide
        self.reason = reason  # what went wrong, without the transform and tile (which the engine adds)


def inside_slide(tile) -> np.ndarray:
    """The part of a tile's image inside the slide (``tile.extent``): a tile overhanging the slide's right or
    bottom edge is filled (white for brightfield), and a tile label computed over the fill describes the
    fill (a blurred edge tile scored sharp by its edge with the fill; tissue called white space)."""
    image = tile.image
    extent = getattr(tile, "extent", None)
    if extent is None:
        return image
    ew, eh = (int(v) for v in extent)
    if ew <= 0 or eh <= 0 or (ew, eh) == tuple(image.shape[1::-1]):
        return image
    return image[:eh, :ew]


def on_inside(tile, fn) -> np.ndarray:
    """``fn(image)``, an image of the same shape and dtype, on the part of the tile inside the slide; a tile
    overhanging the slide's right or bottom edge keeps its fill as it is. For transforms whose result depends
    on the whole tile's statistics (a rescale's range, a histogram): over the fill they describe the fill (the
    0 fill of a fluorescence tile became its darkest class)."""
    inner = inside_slide(tile)
    if inner is tile.image:
        return fn(tile.image)
    eh, ew = inner.shape[:2]
    out = tile.image.copy()
    out[:eh, :ew] = fn(inner)
    return out


def mask_on_inside(tile, fn) -> np.ndarray:
    """``fn(image)``, a mask (h, w), on the part of the tile inside the slide, 0 over an edge tile's fill."""
    inner = inside_slide(tile)
    if inner is tile.image:
        return fn(tile.image)
    eh, ew = inner.shape[:2]
    m = fn(inner)
    full = np.zeros(tile.image.shape[:2], m.dtype)
    full[:eh, :ew] = m
    return full


def open_sides(tile) -> tuple:
    """The sides of a slide's tile beyond which the slide goes on: ``"left"`` / ``"top"`` unless the tile
    starts at the slide's left / top edge, ``"right"`` / ``"bottom"`` unless it reaches past the slide's
    (``tile.extent``; a tile ending exactly at the slide's edge counts its side as open, since a tile does not
    know the slide's size). A region touching an open side may go on in the next tile, so it cannot be
    measured here. A lone tile (not from a slide's grid: ``tile.core`` is None) has none."""
    if getattr(tile, "core", None) is None:
        return ()
    h, w = tile.image.shape[:2]
    ew, eh = tile.extent if getattr(tile, "extent", None) is not None else (w, h)
    sides = (("left", tile.coords[0] > 0), ("top", tile.coords[1] > 0), ("right", ew >= w), ("bottom", eh >= h))
    return tuple(name for name, is_open in sides if is_open)


def outputs_from(*params: str) -> property:
    """A ``masks_out`` / ``labels_out`` (or ``*_in``) that names what a transform writes from its own
    parameters: ``masks_out = outputs_from("mask_name")`` declares the mask the user chose to write."""
    return property(lambda self: tuple(getattr(self, p) for p in params),
                    doc=f"names given by the parameter(s) {', '.join(params)}")


def _module(cls) -> str:
    """A class's module, with a script's two names as one: worker processes import the script that started
    them as ``__mp_main__`` and then unpickle its classes from ``__main__``."""
    return "__main__" if cls.__module__ in ("__main__", "__mp_main__") else cls.__module__


class Transform:
    """Base class of every transform.

    Subclasses set their parameters in ``__init__`` as attributes of the same names (the scikit-learn
    convention: :meth:`get_params` reads them back) and implement :meth:`apply`.

    Class attributes (override as properties when they depend on parameters, e.g. with
    :func:`outputs_from`):

    ``masks_in`` / ``masks_out``
        names of the tile masks read / written.
    ``labels_in`` / ``labels_out``
        names of the tile labels read / written.
    ``slide_types``
        names of the slide types accepted (``None``: any).
    ``slide_type_out``
        the slide type of the tiles it leaves (e.g. ``"HE"`` for a virtual H&E rendering; ``None``: the
        type is unchanged). The steps after it are checked against that type.
    ``changes_image``
        whether ``apply`` replaces ``tile.image``.
    ``random``
        whether ``apply`` draws random numbers (an augmentation): such a step is left out when later steps
        are fitted to the slide as the steps before them leave it.
    """

    masks_in: tuple = ()
    masks_out: tuple = ()
    labels_in: tuple = ()
    labels_out: tuple = ()
    slide_types: tuple | None = None
    slide_type_out: str | None = None
    changes_image: bool = False
    random: bool = False

    def __init_subclass__(cls, register: bool = True, **kwargs):
        super().__init_subclass__(**kwargs)
        for attr in ("masks_in", "masks_out", "labels_in", "labels_out", "slide_types", "slide_mask_prefixes"):
            if isinstance(cls.__dict__.get(attr), str):  # ("tissue") without its comma: one name, not letters
                setattr(cls, attr, (cls.__dict__[attr],))
        if register and not cls.__name__.startswith("_"):
            old = REGISTRY.get(cls.__name__)
            if old is not None and (_module(old), old.__qualname__) != (_module(cls), cls.__qualname__):
                # pipelines are saved by transform name: two classes of one name would load as the wrong one
                raise PipelineError(f"a transform named {cls.__name__!r} is already registered "
                                    f"({old.__module__}.{old.__qualname__}); give {cls.__module__}."
                                    f"{cls.__qualname__} another name (or define it with register=False to "
                                    "keep it out of saved pipelines)")
            REGISTRY[cls.__name__] = cls

    # ------------------------------------------------------------------ behaviour
    def apply(self, tile) -> None:  # pragma: no cover - abstract
        """Update ``tile`` in place."""
        raise NotImplementedError(f"{type(self).__name__}.apply is not implemented")

    def fit_slide(self, slide) -> None:
        """Slide-level preparation before any tile runs (e.g. a stain matrix from a low-resolution
        tissue sample). Runs once, in the driver; the fitted transform is then sent to the workers."""

    def fit_grid(self, grid) -> None:
        """The grid (:class:`~histoflow.core.grid.TileGrid`) a slide run will tile the slide with, given after
        :meth:`fit_slide`, in the driver: for transforms that build slide-level maps from the tiles. Default:
        nothing."""

    def min_overlap(self, mpp) -> int:
        """The tile overlap (pixels, at the tiles' pixel size ``mpp`` in µm; None when unknown) this transform
        needs so that every object it keeps lies whole in one tile: transforms that find objects keep those
        centred in a tile's core, and with less overlap an object cut by a tile's edge is found in pieces,
        each kept by its own tile. Slide runs warn when their overlap is smaller. 0: no need."""
        return 0

    def channel_names_out(self, names):
        """The channel names of tiles after this transform, given those before (``None``: not known).
        The default keeps them; transforms that change the channels (collapsing planes, rendering RGB) say
        what comes out, so that later steps and the stored tiles name their channels right."""
        return names

    @staticmethod
    def slide_channels(slide, names, indices=None) -> list:
        """The slide's own channels (indices) holding the tile channels ``indices`` (default: all of ``names``),
        matched by name, for reading a thumbnail of them; the same index where a name is not the slide's."""
        own = list(slide.reader.channel_names or [])
        indices = range(len(names)) if indices is None else indices
        if own == list(names):
            return list(indices)
        return [own.index(names[i]) if names[i] in own else i for i in indices]

    def input_channel_names(self, slide):
        """The channel names of the tiles this transform gets: those the steps before it in a
        :class:`Pipeline` leave (set by :meth:`Pipeline.fit_slide`), else the slide's."""
        names = self.__dict__.get("_channel_names_in")
        return list(names) if names is not None else list(slide.reader.channel_names or [])

    #: whether :meth:`collect` / :meth:`slide_masks` do something (the engine then hands this transform
    #: every finished tile, in grid order, in the driver)
    reduces: bool = False

    #: the start of the names of the slide masks :meth:`slide_masks` makes (two steps of a pipeline may not
    #: share one: the later one's masks would replace the earlier one's)
    slide_mask_prefixes: tuple = ()

    def collect(self, tile) -> None:
        """See one finished tile in the driver (after the whole pipeline ran on it), e.g. to paint a
        slide-level heatmap. Only called when :attr:`reduces` is true. The engine passes the tile's masks,
        labels and cells but not its pixels (``tile.image`` is an empty ``(h, w, 0)`` array)."""

    def makes_slide_mask(self, name: str) -> bool:
        """Whether :meth:`slide_masks` may make a slide mask of this name (by default: one starting with a
        :attr:`slide_mask_prefixes` entry)."""
        return any(name.startswith(p) for p in self.slide_mask_prefixes)

    def slide_masks(self) -> dict:
        """Slide-level masks made from the collected tiles: ``{name: (array, downsample)}``, stored in
        the slide's h5path when the run ends. Only called when :attr:`reduces` is true."""
        return {}

    def slide_cells(self):
        """The slide's cell table (an AnnData) made from the collected tiles, stored in the h5path when
        the run ends; None when this transform makes none. Only called when :attr:`reduces` is true."""
        return None

    def __call__(self, tile):
        self.apply(tile)
        return tile

    # ------------------------------------------------------------------ parameters and serialisation
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self) -> dict:
        """The constructor parameters, read back from the attributes of the same names."""
        init = type(self).__init__
        if init is not object.__init__ and any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                                               for p in inspect.signature(init).parameters.values()):
            raise PipelineError(f"{type(self).__name__}.__init__ takes *args or **kwargs, which a saved pipeline "
                                "cannot record; name every parameter")
        out = {}
        for name in self._param_names():
            if not hasattr(self, name):
                raise PipelineError(f"{type(self).__name__} does not keep its parameter {name!r} as an "
                                    "attribute; store every __init__ parameter under its own name")
            out[name] = getattr(self, name)
        return out

    def to_dict(self) -> dict:
        return {type(self).__name__: _plain(self.get_params())}

    @staticmethod
    def from_dict(d: dict) -> Transform:
        """Build a transform from ``{Name: {param: value}}`` (the YAML step form)."""
        if not isinstance(d, dict) or len(d) != 1:
            raise PipelineError(f"a pipeline step must be a mapping with one transform name, got {d!r}")
        (name, params), = d.items()
        if name not in REGISTRY:
            from . import library  # noqa: F401 - the built-ins register on import
        if name not in REGISTRY:
            load_model_transforms()
        if name not in REGISTRY:
            raise PipelineError(f"unknown transform {name!r}; known: {', '.join(sorted(REGISTRY))} "
                                "(import the module that defines a custom transform before loading; "
                                "`histoflow run --import MODULE` on the command line)")
        params = params or {}
        if not isinstance(params, dict):
            raise PipelineError(f"parameters of {name} must be a mapping, got {params!r}")
        cls = REGISTRY[name]
        unknown = set(params) - set(cls._param_names())
        if unknown:
            raise PipelineError(f"{name} has no parameter(s) {sorted(unknown)}; it takes {cls._param_names()}")
        if issubclass(cls, Pipeline):
            params = dict(params)
            steps = params.get("steps") or []
            if not isinstance(steps, list):
                raise PipelineError(f"{name}: 'steps' must be a list of {{TransformName: {{param: value}}}}, got "
                                    f"{type(steps).__name__} {steps!r:.60}")
            params["steps"] = [Transform.from_dict(s) for s in steps]
        return cls(**params)

    def __repr__(self):
        # never raises (tracebacks, debuggers and logs call it): a parameter not kept as an attribute, which a
        # run refuses before its first tile, shows as such
        try:
            names = self._param_names()
        except Exception:  # noqa: BLE001 - a signature inspect cannot read
            names = ()
        params = ", ".join(f"{k}={getattr(self, k)!r}" if hasattr(self, k) else f"{k}=<not kept>" for k in names)
        return f"{type(self).__name__}({params})"

    def __eq__(self, other):
        if type(self) is not type(other):
            return False
        try:
            return self.to_dict() == other.to_dict()
        except PipelineError:  # parameters that cannot be read back: only the same object is equal
            return self is other

    def __hash__(self):  # from what __eq__ compares: equal transforms hash alike (np.float32(1.5) and 1.5)
        try:
            return hash(_frozen(self.to_dict()))
        except PipelineError:
            return object.__hash__(self)


class Pipeline(Transform):
    """An ordered list of transforms, itself a transform.

    Parameters
    ----------
    steps : list of Transform
    inputs : list of str
        Masks the tiles bring with them (slide masks cropped to tiles, e.g. ``"tissue"`` from the
        tissue pre-pass). A step reading a mask that neither an input nor an earlier step provides is an
        error, raised here, before any tile runs.

    Examples
    --------
    >>> from histoflow.transforms import BoxBlur, TissueDetectionHE     # doctest: +SKIP
    >>> pipe = Pipeline([BoxBlur(15), TissueDetectionHE()])             # doctest: +SKIP
    >>> pipe.save("pipeline.yaml"); Pipeline.load("pipeline.yaml") == pipe   # doctest: +SKIP
    True
    """

    def __init__(self, steps, inputs=()):
        self.steps = list(steps)
        if isinstance(inputs, str):  # one mask name
            inputs = [inputs]
        if inputs is not None and not isinstance(inputs, (list, tuple)):
            raise PipelineError(f"Pipeline inputs must be slide mask names (a list of str), got {inputs!r}")
        self.inputs = list(inputs or ())
        if not all(isinstance(m, str) and m for m in self.inputs):
            raise PipelineError(f"Pipeline inputs must be slide mask names (a list of str), got {inputs!r}")
        for i, s in enumerate(self.steps):
            if not isinstance(s, Transform):
                raise PipelineError(f"pipeline step {i} is not a Transform: {s!r}")
        self.check()

    # ------------------------------------------------------------------ checking
    @property
    def masks_in(self):
        return tuple(self.inputs)

    @property
    def masks_out(self):
        return tuple(m for s in self.steps for m in s.masks_out)

    @property
    def labels_out(self):
        return tuple(lb for s in self.steps for lb in s.labels_out)

    @property
    def changes_image(self):
        return any(s.changes_image for s in self.steps)

    @property
    def slide_type_out(self):
        out = None
        for s in self.steps:
            out = s.slide_type_out or out
        return out

    def check(self, slide_type=None, available_masks=(), available_labels=()):
        """Raise PipelineError if a step reads a mask or label nothing before it makes, or does not accept
        the slide type. ``available_*`` add what the slide brings (its masks cropped to the tiles)."""
        masks = set(self.inputs) | set(available_masks)
        labels = set(available_labels)
        makers: dict = {}
        for step in self._all_steps():  # nested pipelines make no slide masks of their own
            for prefix in step.slide_mask_prefixes:
                if prefix in makers:
                    raise PipelineError(f"{makers[prefix]} and {type(step).__name__} would both write the slide "
                                        f"masks {prefix}<class>, the second replacing the first: give one of "
                                        "them another name (heatmap_prefix= / mask_name=)")
                makers[prefix] = type(step).__name__
        tables = [type(s).__name__ for s in self._all_steps()
                  if not isinstance(s, Pipeline) and type(s).slide_cells is not Transform.slide_cells]
        if len(tables) > 1:  # found before the run, not after its last tile (slide_cells below)
            raise PipelineError(f"{tables[0]} and {tables[1]} would both make the slide's cell table (an h5path "
                                "holds one): keep one of them in the pipeline")
        for i, step in enumerate(self.steps):
            name = type(step).__name__
            if slide_type is not None and step.slide_types is not None:
                st = getattr(slide_type, "name", slide_type)
                if st not in step.slide_types:
                    raise PipelineError(f"step {i} {name} accepts {', '.join(step.slide_types)} slides, not {st}")
            if isinstance(step, Pipeline):
                step.check(slide_type, masks, labels)
            if step.slide_type_out is not None:  # e.g. a virtual H&E: the next steps see H&E tiles
                slide_type = step.slide_type_out
            for m in step.masks_in:
                if m not in masks:
                    made = sorted(masks) or "none"
                    raise PipelineError(
                        f"step {i} {name} needs mask {m!r}, which no earlier step makes (masks available: "
                        f"{made}); add a step that makes it or declare it with Pipeline(..., inputs=[{m!r}])")
            for lb in step.labels_in:
                if lb not in labels:
                    raise PipelineError(f"step {i} {name} needs label {lb!r}, which no earlier step makes")
            masks |= set(step.masks_out)
            labels |= set(step.labels_out)

    # ------------------------------------------------------------------ running
    def apply(self, tile):
        for step in self.steps:
            try:
                got = step.apply(tile)
            except TransformError:
                raise
            except Exception as e:
                raise TransformError(
                    f"{type(step).__name__} failed on tile {tile.name or ''} at {tile.coords}: "
                    f"{type(e).__name__}: {e}", transform=type(step).__name__, coords=tile.coords,
                    reason=f"{type(e).__name__}: {e}") from e
            if got is not None and got is not tile and isinstance(got, type(tile)):  # its changes were dropped
                why = "apply(tile) changes the tile it is given and returns nothing; it returned a new Tile"
                raise TransformError(f"{type(step).__name__} failed on tile {tile.name or ''} at {tile.coords}: "
                                     f"{why} (its changes would be lost: set tile.image = ... instead)",
                                     transform=type(step).__name__, coords=tile.coords, reason=why)

    def channel_names_out(self, names):
        for step in self.steps:
            names = step.channel_names_out(names) if names is not None else None
        return names

    def fit_grid(self, grid):
        for step in self.steps:
            step.fit_grid(grid)

    def fit_slide(self, slide):
        """Fit each step to the slide in turn. A step after steps that change the pixels (a rescale, a stain
        normalisation, a virtual H&E) is fitted to the slide as those steps leave it: its thumbnails go
        through them first (see :class:`_SlideAfterSteps`)."""
        names = self.input_channel_names(slide)
        for i, step in enumerate(self.steps):
            step.__dict__["_channel_names_in"] = names
            pixel_steps = _pixel_steps(self.steps[:i])
            type_out = next((s.slide_type_out for s in reversed(self.steps[:i]) if s.slide_type_out), None)
            seen = slide if not pixel_steps else _SlideAfterSteps(slide, pixel_steps, names, type_out)
            try:
                step.fit_slide(seen)
            except Exception as e:
                path = str(getattr(slide, "path", ""))
                if isinstance(e, HistoflowError) and path and path in str(e):
                    raise
                raise PipelineError(f"{path}: {type(step).__name__} could not be fitted to the slide: "
                                    f"{'' if isinstance(e, HistoflowError) else type(e).__name__ + ': '}{e}") from e
            names = step.channel_names_out(names) if names is not None else None

    @property
    def reduces(self):
        return any(step.reduces for step in self.steps)

    def collect(self, tile):
        for step in self.steps:
            if step.reduces:
                step.collect(tile)

    def slide_masks(self):
        out = {}
        for step in self.steps:
            if step.reduces:
                out.update(step.slide_masks())
        return out

    def slide_cells(self):
        tables = [t for t in (step.slide_cells() for step in self.steps if step.reduces) if t is not None]
        if len(tables) > 1:
            raise PipelineError("more than one step of the pipeline makes a cell table; keep one")
        return tables[0] if tables else None

    # ------------------------------------------------------------------ containers
    def __len__(self):
        return len(self.steps)

    def __iter__(self):
        return iter(self.steps)

    def __getitem__(self, i):
        return self.steps[i]

    def __repr__(self):
        inner = ",\n".join("    " + repr(s).replace("\n", "\n    ") for s in self.steps)
        inputs = f", inputs={self.inputs!r}" if self.inputs else ""
        return f"Pipeline([\n{inner}\n]{inputs})"

    # ------------------------------------------------------------------ YAML
    def to_document(self) -> dict:
        """The YAML document form: ``{histoflow_pipeline: 1, steps: [...], inputs: [...], modules: [...]}``;
        ``modules`` names the modules of custom transforms (to import before loading it again)."""
        d = {"histoflow_pipeline": PIPELINE_FORMAT, "steps": [s.to_dict() for s in self.steps]}
        if self.inputs:
            d["inputs"] = list(self.inputs)
        modules = list(dict.fromkeys(_module(type(s)) for s in self._all_steps()
                                     if not _module(type(s)).startswith(("histoflow.", "__main__"))))
        if modules:  # (a run's provenance named a custom step's class alone: nothing said where it was)
            d["modules"] = modules
        return d

    def to_yaml(self) -> str:
        """The pipeline as YAML text that :meth:`from_yaml` loads back; a step whose class is not registered
        (``register=False``) cannot be loaded by name, so it is refused here with a PipelineError."""
        doc = self.to_document()
        for step in self._all_steps():
            cls = type(step)
            if REGISTRY.get(cls.__name__) is not cls:
                raise PipelineError(f"{cls.__qualname__} is not a registered transform (defined with register=False, "
                                    "or under a name another class took): a saved pipeline could not load it; "
                                    "register it, or leave it out of pipelines you save")
        from ..utils import yaml_dump

        return yaml_dump(doc, sort_keys=False)

    def _all_steps(self):
        for step in self.steps:
            yield step
            if isinstance(step, Pipeline):
                yield from step._all_steps()

    def min_overlap(self, mpp) -> int:
        return max((s.min_overlap(mpp) for s in self.steps), default=0)

    def overlap_needed_by(self, mpp):
        """``(pixels, step)``: the largest :meth:`min_overlap` of the steps and the step that needs it."""
        best = (0, None)
        for step in self._all_steps():
            if not isinstance(step, Pipeline):
                need = int(step.min_overlap(mpp))
                if need > best[0]:
                    best = (need, step)
        return best

    def save(self, path) -> str:
        """Write the pipeline as YAML (atomically)."""
        from ..utils import atomic_output

        path = os.fspath(path)
        text = self.to_yaml()  # first: a step YAML cannot hold leaves no file behind
        with atomic_output(path) as tmp, open(tmp, "w") as f:
            f.write(text)
        return path

    @classmethod
    def from_yaml(cls, text: str, source: str = "<string>") -> Pipeline:
        if len(text) > 1_000_000:
            raise PipelineError(f"{source}: pipeline file too large ({len(text)} bytes)")
        try:
            from ..utils import yaml_load

            d = yaml_load(text)
        except yaml.YAMLError as e:
            raise PipelineError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(d, dict) or "steps" not in d:
            raise PipelineError(f"{source}: a pipeline file is a mapping with 'steps' (a list of "
                                "{TransformName: {param: value}})")
        unknown = sorted(str(k) for k in d if k not in _DOCUMENT_KEYS)
        if unknown:  # (tile_size: 512 beside the steps was dropped without a word)
            raise PipelineError(f"{source}: unknown key(s) {unknown} in a pipeline file, which holds "
                                f"{', '.join(_DOCUMENT_KEYS)}; tiling (tile_size, overlap, tissue_filter, ...) is "
                                "given to the run: SlideData.run(...) or `histoflow run` options")
        modules = d.get("modules") or []
        if not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
            raise PipelineError(f"{source}: 'modules' must be a list of module names, got {modules!r:.60}")
        if not isinstance(d["steps"], (list, type(None))):
            raise PipelineError(f"{source}: 'steps' must be a list of {{TransformName: {{param: value}}}}, got "
                                f"{type(d['steps']).__name__} {d['steps']!r:.60}")
        version = d.get("histoflow_pipeline", PIPELINE_FORMAT)
        if version != PIPELINE_FORMAT:
            if isinstance(version, str) and version.strip() == str(PIPELINE_FORMAT):
                advice = f": write it as the number `histoflow_pipeline: {PIPELINE_FORMAT}`, without quotes"
            elif isinstance(version, int) and not isinstance(version, bool) and version > PIPELINE_FORMAT:
                advice = ": the file was written by a newer histoflow; upgrade histoflow to load it"
            else:
                advice = ""
            raise PipelineError(f"{source}: pipeline format {version!r} is not supported (this histoflow "
                                f"reads format {PIPELINE_FORMAT}){advice}")
        try:
            steps = [Transform.from_dict(s) for s in d["steps"] or []]
            return cls(steps, inputs=d.get("inputs") or ())
        except PipelineError as e:
            if modules and str(e).startswith("unknown transform"):
                e = PipelineError(f"{e}; this pipeline's custom transforms come from {', '.join(modules)}")
            raise PipelineError(f"{source}: {e}") from None
        except (TypeError, ValueError) as e:
            raise PipelineError(f"{source}: bad parameter: {e}") from None

    @classmethod
    def load(cls, path) -> Pipeline:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read(1_000_001)
        except OSError as e:
            raise PipelineError(f"{path}: cannot read pipeline file: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise PipelineError(f"{path}: not a pipeline YAML file (not UTF-8 text: a slide or image? "
                                "the pipeline file comes first: histoflow run PIPELINE.yaml SLIDE...)") from None
        return cls.from_yaml(text, source=path)


def _first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line (the whole paragraph when it has
    no full stop)."""
    para = " ".join(doc.split("\n\n")[0].split())
    for i, ch in enumerate(para):  # a full stop that ends the paragraph or comes before a capital letter
        if ch == "." and (i + 1 == len(para) or (para[i + 1:i + 2] == " " and para[i + 2:i + 3].isupper())):
            if not para[:i + 1].endswith(("e.g.", "i.e.", "et al.")):
                return para[:i + 1]
    return para


def _plain(value):
    """Parameters as plain YAML types (numpy scalars and arrays become numbers and lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Transform):
        return value.to_dict()
    return value


def load_model_transforms() -> bool:
    """Register the transforms that run models (:mod:`histoflow.ml.transforms`) when torch is installed.

    Returns whether they are available. Kept out of :mod:`histoflow.transforms.library` so that the
    classical transforms never import torch.
    """
    try:
        import histoflow.ml.transforms  # noqa: F401
    except ImportError:
        return False
    return True


def list_transforms() -> list[dict]:
    """Every registered transform: name, parameters with defaults (None for the ``required`` ones, which have
    none), first sentence of its docstring."""
    load_model_transforms()
    out = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        sig = inspect.signature(cls.__init__)
        named = [p for p in sig.parameters.values() if p.name != "self"
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        params = {p.name: (None if p.default is inspect.Parameter.empty else p.default) for p in named}
        required = [p.name for p in named if p.default is inspect.Parameter.empty]
        doc = _first_sentence(inspect.getdoc(cls) or "")
        out.append({"name": name, "params": params, "required": required, "doc": doc,
                    "slide_types": list(cls.slide_types) if isinstance(cls.slide_types, tuple) else None})
    return out


def _pixel_steps(steps) -> list:
    """The steps (nested pipelines flattened) that change the pixels the same way every time: what a slide
    looks like to the step after them. Random augmentations are left out, and so are steps that only add
    masks or labels (which may be costly, e.g. a model)."""
    out = []
    for s in steps:
        if isinstance(s, Pipeline):
            out += _pixel_steps(s.steps)
        elif s.changes_image and not s.random:
            out.append(s)
    return out


class _SlideAfterSteps:
    """A slide as the pixel-changing steps before a step leave it, for fitting that step: its thumbnails are
    the slide's, run through those (already fitted) steps as one tile; its slide type is the one they leave;
    everything else is the slide's. The steps see the thumbnail at its own pixel size, so pixel-wise steps
    (rescaling, stain normalisation, virtual H&E) give what the tiles will hold, and spatial filters a close
    approximation. Images of more than four channels are sampled at 1024 px at most (every channel is
    needed to run the steps). A step that cannot run on the thumbnail (it needs a mask no pixel-changing
    step makes) leaves the fit to the slide's own pixels, with a warning."""

    def __init__(self, slide, steps, channel_names, slide_type_out=None):
        self._slide, self._steps = slide, list(steps)
        self._names = list(channel_names) if channel_names is not None else None
        self._cache = {}
        self.reader = _ReaderAfterSteps(self)
        self.slide_type = slide.slide_type
        if slide_type_out is not None:
            from ..core.types import SlideType

            self.slide_type = SlideType.get(slide_type_out)

    def __getattr__(self, name):
        return getattr(self._slide, name)

    def _thumbnail_all(self, max_size):
        slide = self._slide
        if len(slide.reader.channel_names or ()) > 4:
            max_size = min(max_size, 1024)
        if max_size not in self._cache:
            import warnings

            from ..core.tile import Tile

            thumb = np.ascontiguousarray(slide.thumbnail(max_size))
            w0, h0 = slide.dimensions
            ds = w0 / thumb.shape[1]
            size = (thumb.shape[1], thumb.shape[0])
            masks = {k: m.crop(0, 0, w0, h0, size) for k, m in getattr(slide, "masks", {}).items()}
            mpp = None if slide.mpp is None else (slide.mpp[0] * ds, slide.mpp[1] * ds)
            tile = Tile(image=thumb, coords=(0, 0), level=0, downsample=ds, masks=masks, labels={},
                        slide_type=slide.slide_type.name, name=f"{slide.name}_thumbnail", mpp=mpp)
            try:
                for step in self._steps:
                    step.apply(tile)
                image = np.asarray(tile.image)
            except Exception as e:  # noqa: BLE001 - fit to the slide's own pixels, as without the steps
                warnings.warn(f"{slide.path}: {type(step).__name__} could not run on the slide's thumbnail "
                              f"({type(e).__name__}: {e}); the next step is fitted to the slide's own pixels",
                              stacklevel=4)
                image = thumb
            self._cache[max_size] = image
        return self._cache[max_size]

    def thumbnail(self, max_size=512, channels=None):
        image = self._thumbnail_all(max_size)
        if image.ndim == 2:
            image = image[:, :, None]
        return image if channels is None else np.ascontiguousarray(image[:, :, list(channels)])

    def read_region(self, location, level, size):
        """A region as the steps leave it: the slide's pixels run through the (fitted) steps as one tile at
        the level's pixel size, with the slide's masks cut to it. Fits that take statistics from
        full-resolution regions (stain normalisation) took them from the thumbnail instead, when any
        pixel-changing step came first: their output then changed with a step that changes nothing."""
        from ..core.tile import Tile

        slide = self._slide
        region = np.ascontiguousarray(slide.read_region(location, level, size))
        levels = getattr(slide, "levels", None) or []
        ds = float(levels[level].downsample) if 0 <= level < len(levels) else 1.0
        (x, y), (w, h) = (int(v) for v in location), (int(v) for v in size)
        masks = {k: m.crop(x, y, w * ds, h * ds, (w, h), slide.dimensions)
                 for k, m in getattr(slide, "masks", {}).items()}
        mpp = None if slide.mpp is None else (slide.mpp[0] * ds, slide.mpp[1] * ds)
        tile = Tile(image=region, coords=(x, y), level=int(level), downsample=ds, masks=masks, labels={},
                    slide_type=slide.slide_type.name, name=f"{slide.name}_region", mpp=mpp)
        for step in self._steps:
            step.apply(tile)
        return np.asarray(tile.image)


class _ReaderAfterSteps:
    """The reader of a :class:`_SlideAfterSteps`: the channel names and dtype the steps leave."""

    def __init__(self, view):
        self._view = view

    def __getattr__(self, name):
        return getattr(self._view._slide.reader, name)

    @property
    def channel_names(self):
        names = self._view._names
        return names if names is not None else self._view._slide.reader.channel_names

    @property
    def dtype(self):  # from the thumbnail already made, else from a small one
        cache = self._view._cache
        return (cache[max(cache)] if cache else self._view._thumbnail_all(64)).dtype

    def thumbnail(self, max_size=512, channels=None):
        return self._view.thumbnail(max_size, channels=channels)


def _frozen(v):
    """A hashable form of a plain (YAML) value, equal where the values are equal."""
    if isinstance(v, dict):
        return tuple(sorted((str(k), _frozen(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    try:
        hash(v)
    except TypeError:
        return repr(v)
    return v

"""The ``histoflow`` command. Thin: every verb calls the library.

    histoflow info SLIDE [--json]
    histoflow thumbnail SLIDE -o OUT.png [--size N]
    histoflow tile SLIDE -o OUT.h5path [--size 256] [--level L | --mpp M] [--overlap K] [--edge pad|drop]
    histoflow run PIPELINE.yaml SLIDE... -o OUTDIR [--workers N | --scheduler ADDRESS] [--resume]
    histoflow transforms [--json]
    histoflow train CONFIG.yaml [--resume] [--epochs N] [--seed S] [-o DIR]
    histoflow segment-nuclei IMAGE_OR_SLIDE -o OUT.tif [--geojson OUT.geojson] [--workers N]
    histoflow quantify SLIDE -o cells.h5ad [--nuclear-channel NAME] [--membrane NAME ...] [--workers N]
    histoflow phenotype cells.h5ad --rules RULES.yaml|PRESET -o out.h5ad [--gate otsu|gmm]
    histoflow annotations convert IN OUT
    histoflow demo [-o OUTDIR]

Errors print one line (``histoflow: error: ...``) and exit with status 1 (2 for options that do not go
together, as argparse's own usage errors); ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import textwrap
import time

from .errors import ParameterError


def _int_at_least(lo: int, why: str):
    """An argparse type: a whole number >= ``lo``, refused under its option's name (``why``: what a smaller
    value would have done)."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be {lo} or more, got {v}")
        return v

    parse.__doc__ = why
    return parse


#: 0 workers or batches would silently mean something else; a size or tile of 0 fails deep in the library
_positive_int = _int_at_least(1, "a whole number >= 1")
#: an overlap, a level
_nonneg_int = _int_at_least(0, "a whole number >= 0")


def _mpp(text):
    """An argparse type: a pixel size, µm per pixel (a positive number)."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"is µm per pixel, a positive number; got {text}")
    return v


def _microns(text):
    """An argparse type: a length in µm (a finite number >= 0)."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"is a length in µm, a finite number >= 0; got {text}")
    return v


def _fraction(text):
    """An argparse type: a number from 0 to 1 (a tissue fraction)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"is a fraction of the tile, 0 to 1; got {v}")
    return v


BACKEND_HELP = ("reader: auto (default, chosen by the file's content), openslide, tiff, dicom or image")
BACKEND_CHOICES = ("auto", "openslide", "tiff", "dicom", "image")


class UsageError(ParameterError):
    """Options that do not go together, found after parsing: exit status 2, as argparse's own usage errors."""

#: segment-nuclei's default tile overlap (level-0 pixels): larger than a nucleus at 40x
NUCLEI_OVERLAP = 128


def _overwrite_option(parser, what):
    """``--overwrite``: outputs that exist already are refused without it (nothing is replaced by mistake)."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} when it exists already (refused without it)")


def _slide_mpp_option(parser, help):
    """``--slide-mpp``: the input's own pixel size, as ``tile`` and ``run`` name it; ``--mpp``, its name in
    segment-nuclei and quantify before, still works there (not shown: in ``tile``/``run`` ``--mpp`` is the
    target resolution)."""
    parser.add_argument("--slide-mpp", dest="slide_mpp", type=_mpp, metavar="MPP",
                        help=f"{help} (formerly --mpp, which still works here)")
    parser.add_argument("--mpp", dest="slide_mpp", type=_mpp, action=_SaidAlias, help=argparse.SUPPRESS,
                        note="--mpp here is the input's own µm/px (now --slide-mpp), not a target resolution as "
                             "in `histoflow tile` and `run`")


class _SaidAlias(argparse.Action):
    """An option kept under an earlier name, whose meaning differs from the same name elsewhere: stored as the
    new one, with a note on stderr (segment-nuclei --mpp 0.5 was taken silently as the slide's own pixel size)."""

    def __init__(self, *args, note="", **kwargs):
        self.note = note
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {self.note}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="histoflow", description="Computational pathology: slides, tiles, h5path.")
    p.add_argument("--version", action="version", version=f"histoflow {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("info", help="describe a slide (format, levels, mpp, channels) or an h5path file (tiles, "
                                    "masks, cells, the runs that wrote it)")
    s.add_argument("slide", help="a slide or image (SVS, TIFF, OME-TIFF, DICOM folder, PNG, ...), or an h5path file")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("thumbnail", help="write a PNG thumbnail of a slide, or a picture of an h5path file")
    s.add_argument("slide", help="a slide or image (fluorescence is shown in false colour), or an h5path file: its "
                                 "slide with the slide masks' outlines (tissue: green), the tiles kept, and the "
                                 "tiles a run skipped (red)")
    s.add_argument("-o", "--output", required=True, help="the thumbnail: a .png file")
    s.add_argument("--size", type=_positive_int, default=1024, help="longer side in pixels (default 1024)")
    s.add_argument("--label", help="h5path file: colour the tiles by this tile label (numbers on a scale, classes "
                                   "in a palette; a legend below)")
    s.add_argument("--instances", metavar="MASK", help="h5path file: dots at the objects of this per-tile instance "
                                                       "mask (e.g. nuclei)")
    s.add_argument("--background", choices=["auto", "slide", "tiles"], default="auto",
                   help="h5path file: draw over the slide, or over the stored tiles put together (default auto: the "
                        "slide when it opens and the tiles hold its channels, e.g. not after VirtualHE)")
    _overwrite_option(s, "the thumbnail")
    s.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    s.set_defaults(func=cmd_thumbnail)

    s = sub.add_parser("tile", help="cut a slide into tiles and write an h5path file")
    s.add_argument("slide", help="a slide or image")
    s.add_argument("-o", "--output", required=True, help="the tiles: an .h5path file")
    _overwrite_option(s, "the h5path file")
    s.add_argument("--size", "--tile", dest="size", type=_positive_int, default=256,
                   help="tile size in pixels (default 256)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--level", type=_nonneg_int, help="pyramid level to tile (default 0)")
    g.add_argument("--mpp", type=_mpp, help="target µm/px of the tiles (resampled when no level matches)")
    s.add_argument("--overlap", type=_nonneg_int, default=0, help="pixels shared by neighbouring tiles (default 0)")
    s.add_argument("--edge", choices=["pad", "drop"], default="pad",
                   help="tiles overhanging the slide's right/bottom edge: pad with background (default) or drop")
    s.add_argument("--slide-mpp", type=_mpp, help="the slide's own µm/px, when the file does not say (or is wrong)")
    s.add_argument("--compression", choices=["gzip", "lzf", "htj2k", "none"], default="gzip",
                   help="lossless: gzip (default; any HDF5 reader), htj2k (RGB: about 15%% smaller than gzip for raw "
                        "tiles, 2x for smoothed ones; reading it outside histoflow needs `import hdf5plugin` "
                        "before h5py opens the file), lzf, none")
    s.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_tile)

    s = sub.add_parser("run", help="run a pipeline (YAML) on slides, one h5path per slide")
    s.add_argument("pipeline", help="pipeline YAML file (see `histoflow transforms`)")
    s.add_argument("slides", nargs="+")
    s.add_argument("-o", "--output", required=True, help="output folder")
    # --tile too: the name segment-nuclei and quantify use, and the warnings' advice
    s.add_argument("--size", "--tile", dest="size", type=_positive_int, default=256,
                   help="tile size in pixels (default 256)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--level", type=_nonneg_int, help="pyramid level to tile (default 0)")
    g.add_argument("--mpp", type=_mpp, help="target µm/px of the tiles (resampled when no level matches)")
    s.add_argument("--overlap", type=_nonneg_int, default=0,
                   help="pixels shared by neighbouring tiles (default 0; steps that find nuclei or cells warn when "
                        "it is less than they need)")
    s.add_argument("--tissue-filter", type=_fraction, metavar="FRACTION",
                   help="detect tissue at low resolution first; keep tiles with at least this fraction")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--workers", type=_positive_int, help="worker processes of a local dask cluster, or threads with "
                                               "--executor threads (default: one per core)")
    g.add_argument("--scheduler", help="address of an existing dask scheduler (tcp://host:port)")
    s.add_argument("--executor", choices=["inprocess", "threads", "dask"], help="default: dask")
    s.add_argument("--batch-size", type=_positive_int, default=32, help="tiles per unit of work (default 32)")
    s.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="a transform failing on a tile stops the run (raise, default) or the tile is left out and "
                        "listed in the provenance (skip)")
    s.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this module first (repeatable): custom transforms defined in your own code, e.g. "
                        "--import my_transforms for my_transforms.py in the current folder")
    s.add_argument("--compression", choices=["htj2k", "gzip", "none"], default="htj2k",
                   help="lossless tile compression: htj2k (default; RGB about 16%% smaller than gzip raw, 2-2.7x after a "
                        "blur; reading the "
                        "files outside histoflow needs `import hdf5plugin` before h5py opens them) or gzip (any "
                        "HDF5 reader; the default of `histoflow tile`)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run")
    s.add_argument("--png", choices=["none"], help="none: no pictures (default: OUTDIR/<slide>.png for each slide, "
                                                   "with its slide masks' outlines and the tiles kept, as "
                                                   "`histoflow thumbnail` draws an h5path file)")
    s.add_argument("--overwrite", action="store_true",
                   help="run again over slides whose h5path exists already in the output folder (refused without "
                        "it; --resume keeps the finished ones and continues interrupted ones; both: keep and "
                        "continue those of the same settings, replace those of other settings)")
    s.add_argument("--slide-type", help="HE, IHC, IF, CODEX, Vectra, MIBI (default: from the file)")
    s.add_argument("--slide-mpp", type=_mpp, help="the slides' own µm/px, when the files do not say (or are wrong)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("transforms", help="list every transform with its parameters")
    s.add_argument("--json", action="store_true")
    s.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this module first (repeatable), to list the custom transforms it defines")
    s.set_defaults(func=cmd_transforms)

    s = sub.add_parser("train", help="train a model from a YAML configuration (see configs/)")
    s.add_argument("config")
    s.add_argument("--resume", action="store_true", help="continue from OUTPUT/last.ckpt")
    s.add_argument("--overwrite", action="store_true", help="start afresh over a finished or interrupted run in "
                                                             "OUTPUT (refused without it)")
    s.add_argument("--epochs", type=_positive_int, help="override train.epochs")
    s.add_argument("--seed", type=int, help="override train.seed (e.g. members of an ensemble)")
    s.add_argument("-o", "--output", help="override the output folder")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("segment-nuclei", help="nucleus instances of an H&E image or slide (uint32 label TIFF)")
    s.add_argument("slide", help="an H&E slide or image (PNG, JPEG, TIFF, SVS, ...)")
    s.add_argument("-o", "--output", required=True, help="label image: a uint32 .tif, same size as level 0")
    s.add_argument("--geojson", help="also write the nuclei as QuPath GeoJSON (detections)")
    s.add_argument("--png", help="picture of the nucleus outlines over the image, at most 2048 px "
                                 "(default: OUTPUT with .png; 'none' for no picture)")
    s.add_argument("--model", default="builtin",
                   help="nucleus model .pt, or nucleus_unet (40x) / nucleus_unet_20x (default: the shipped model "
                        "trained nearest the input's µm/px)")
    s.add_argument("--runtime", dest="backend", choices=["torch", "onnx"], default="torch",
                   help="run the model in torch (default) or onnxruntime (exported once, to ~/.cache/histoflow for "
                        "the shipped models; about 2x faster on CPU)")
    s.add_argument("--backend", dest="backend", choices=["torch", "onnx"], action=_SaidAlias, help=argparse.SUPPRESS,
                   note="--backend here is the model's runtime (now --runtime), not the slide reader as in "
                        "`histoflow info`, `thumbnail` and `tile`")
    _slide_mpp_option(s, "the input's own µm/px, when the file does not say (default: the model's) or is wrong")
    s.add_argument("--tta", action="store_true", help="average the model's maps over the four flips of each tile "
                                                       "(about 4x slower; on the test images AJI 0.627 -> 0.630 with "
                                                       "the 40x model, 0.629 -> 0.634 with the 20x)")
    s.add_argument("--tile", "--size", dest="tile", type=_positive_int, default=1024,
                   help="tile size in level-0 pixels (default 1024; --size, as in tile and run, is the same)")
    s.add_argument("--overlap", type=_nonneg_int, default=None,
                   help=f"tile overlap in level-0 pixels, larger than a nucleus and less than --tile (default "
                        f"{NUCLEI_OVERLAP})")
    s.add_argument("--tissue-filter", type=_fraction, metavar="FRACTION", help="only tiles with this much tissue")
    s.add_argument("--workers", type=_positive_int, help="local dask cluster with N workers (default: in-process)")
    s.add_argument("--h5path", help="keep the per-tile results in this h5path file")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run from what it wrote to --h5path")
    _overwrite_option(s, "the outputs (label image, GeoJSON, picture, --h5path)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_segment_nuclei)

    s = sub.add_parser("quantify", help="segment cells of a multiplex (or H&E) slide and measure them (AnnData)")
    s.add_argument("slide")
    s.add_argument("-o", "--output", required=True, help="cells.h5ad (an .h5path with tiles goes beside it)")
    s.add_argument("--nuclear-channel", default=None,
                   help="name or index (default: the DAPI/Hoechst/HH3 channel); fluorescence only")
    s.add_argument("--membrane", nargs="*", default=None, metavar="NAME",
                   help="membrane/cytoplasm channels, by name or index; fluorescence only")
    s.add_argument("--expand", type=_microns, default=None,
                   help="cell reach beyond the nucleus, µm (default 3); fluorescence only (H&E cells are nuclei)")
    s.add_argument("--tile", "--size", dest="tile", type=_positive_int, default=512,
                   help="tile size in pixels (default 512; --size, as in tile and run, is the same)")
    s.add_argument("--overlap", type=_nonneg_int, default=None,
                   help="tile overlap in pixels (default: 2 x (a large nucleus, 15 µm, + 2 x --expand), from the "
                        "slide's µm/px: each tile then sees every neighbour of the cells it keeps whole)")
    s.add_argument("--workers", type=_positive_int, help="local dask cluster with N workers (default: in-process)")
    _slide_mpp_option(s, "the slide's own µm/px, when the file does not say (default: assume "
                         "0.5 µm/px, with a warning) or is wrong")
    s.add_argument("--slide-type", help="HE, IHC, IF, CODEX, Vectra, MIBI (default: from the file; e.g. IF for a "
                                        "fluorescence image saved as RGB)")
    s.add_argument("--png", help="picture of the cell outlines over the slide, at most 2048 px "
                                 "(default: OUTPUT with .png; 'none' for no picture)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run from the tiles it wrote")
    _overwrite_option(s, "the outputs (cell table, its h5path, picture)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_quantify)

    s = sub.add_parser("phenotype", help="gate markers and assign phenotypes with a rule table")
    s.add_argument("cells", help="an .h5ad (or .h5path with a cell table)")
    s.add_argument("--rules", required=True, help="rule table YAML, or the name of a built-in preset "
                                                   "(mibi_panel, nucleus_subtype, ...)")
    s.add_argument("-o", "--output", required=True, help="output .h5ad")
    _overwrite_option(s, "the outputs (-o, picture, GeoJSON; -o the input .h5ad updates it in place without it)")
    s.add_argument("--gate", choices=["otsu", "gmm"], default="otsu", help="automatic thresholds (default otsu)")
    s.add_argument("--thresholds", help="YAML/JSON of manual thresholds {channel: value} or {slide: {channel: v}}")
    s.add_argument("--no-log", action="store_true", help="find automatic thresholds on the intensities as they are "
                                                         "(default: on log1p intensities, which needs values >= 0)")
    s.add_argument("--png", help="picture of the cells coloured by phenotype (default: OUTPUT with .png, or "
                                 "OUTPUT_picture.png when -o is the input, so quantify's own picture stays; 'none' "
                                 "for no picture)")
    s.add_argument("--geojson", help="also write the cells with their phenotypes as QuPath GeoJSON (needs the "
                                     ".h5path that `histoflow quantify` wrote beside the .h5ad)")
    s.set_defaults(func=cmd_phenotype)

    s = sub.add_parser("annotations", help="annotation files: convert between formats")
    a = s.add_subparsers(dest="action", metavar="ACTION")
    a.required = True
    c = a.add_parser("convert", help="Aperio XML, QuPath GeoJSON, ImageJ .roi/.zip -> .xml, .geojson, .zip")
    c.add_argument("input", help="annotations to read: Aperio .xml, QuPath .geojson/.json, ImageJ .roi or .zip")
    c.add_argument("output", help="file to write; its extension picks the format: Aperio .xml, QuPath .geojson/.json, "
                                    "ImageJ .zip")
    c.add_argument("--keep-negatives", action="store_true",
                   help="Aperio XML input: keep regions flagged as exclusions (NegativeROA) as polygons of their own "
                        "(flagged 'negative') instead of cutting them out of the regions they overlap, as ImageScope "
                        "does; for files that flag objects by mistake")
    _overwrite_option(c, "the output file")
    c.set_defaults(func=cmd_annotations_convert)

    s = sub.add_parser("demo", help="run the demo pipeline on the built-in sample slide (tissue detection, stain "
                                    "normalisation, nucleus detection, on 2 dask workers) and draw what came out")
    s.add_argument("-o", "--output", default="demo_out", help="output folder (default demo_out)")
    s.set_defaults(func=cmd_demo)
    return p


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C or TERM in the command. Not KeyboardInterrupt itself: Python marks a KeyboardInterrupt that leaves
    code run from a string (a dataclass or namedtuple being made by an import) as unhandled, and then ends the
    process by SIGINT even after ``main`` caught it and returned 130."""


def _on_interrupt(signum, frame):
    raise _Interrupted(signum)


def _unraisable(hook):
    """``sys.unraisablehook`` that delivers a signal again when its :class:`_Interrupted` was raised where Python
    can only print exceptions (a weakref callback, ``__del__``, an import lock's callback): left there, the
    command would have gone on to the end as if never interrupted (seen in 3 % of TERMs during ``tile``)."""
    import _thread
    import threading

    def handle(unraisable):
        if isinstance(unraisable.exc_value, _Interrupted) and unraisable.exc_value.args:
            # from another thread, once the main thread has left this hook: a signal raised in here would be
            # printed and dropped as well (a fixed 1 ms wait lost the interrupt on a busy machine)
            signum, main = unraisable.exc_value.args[0], threading.main_thread().ident

            def deliver():
                import time

                for _ in range(10_000):  # 10 s at most
                    f = sys._current_frames().get(main)
                    while f is not None and f.f_code is not handle.__code__:
                        f = f.f_back
                    if f is None:
                        break
                    time.sleep(0.001)
                _thread.interrupt_main(signum)

            threading.Thread(target=deliver, name="histoflow-interrupt", daemon=True).start()
            return
        hook(unraisable)

    handle.histoflow = True
    return handle


def _install_interrupt_handlers():
    """As a command: a TERM (a scheduler's job kill) unwinds like Ctrl-C, so that files being written are
    dropped, not left behind as temporary files."""
    import signal

    try:
        signal.signal(signal.SIGTERM, _on_interrupt)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the shell ignores it
            signal.signal(signal.SIGINT, _on_interrupt)
    except ValueError:  # not the main thread
        return
    if not getattr(sys.unraisablehook, "histoflow", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)


def _to_devnull(stream):
    """Point ``stream``'s file descriptor at /dev/null, so that Python's own flush of what is left, at exit, goes
    nowhere rather than failing again on a closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


class _Reader:
    """A text stream (stdout, stderr) of the command that, once its reader has gone (``histoflow transforms |
    head``: a closed pipe), discards what follows instead of raising ``BrokenPipeError`` out of the verb: the
    command finishes its work (the files after the first printed line) and exits as it would have."""

    def __init__(self, stream):
        self._stream = stream
        self.gone = False

    def _drop(self):
        self.gone = True
        _to_devnull(self._stream)

    def write(self, text):
        if not self.gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if not self.gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _as_a_command():
    """For the command's duration (``main()`` run as ``histoflow``): output to a reader that went away is
    discarded (:class:`_Reader`), and warnings print as one line, ``histoflow: warning: MESSAGE``, not as
    Python's ``FILE:LINE: UserWarning: MESSAGE`` and a line of source."""
    import re
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        kind = "" if issubclass(category, UserWarning) and category.__module__.startswith(("histoflow", "builtins")) \
            else f"{category.__name__}: "
        text = " ".join(str(message).split())
        text = re.sub(r"\b(run|Run) with tiles of (\d+) px or more with overlap=(\d+)",
                      r"\1 with --tile \2 or more and --overlap \3", text)  # the library's parameters
        text = re.sub(r"\b(run|Run) with overlap=(\d+)", r"\1 with --overlap \2", text)
        text = text.replace('read the file with negatives="keep"', "use --keep-negatives")
        print(f"histoflow: warning: {kind}{text}", file=file or sys.stderr)

    streams = sys.stdout, sys.stderr
    shown = warnings.showwarning
    sys.stdout, sys.stderr = _Reader(sys.stdout), _Reader(sys.stderr)
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, _Reader):
                stream.flush()
        sys.stdout, sys.stderr = streams


def _anything_saved(args):
    """After an interrupt: whether the command left something its ``--resume`` continues from (a finished batch
    in a run's journal, a finished h5path, train's last.ckpt); None where it cannot tell."""
    try:
        if args.command == "train":
            ckpt = getattr(args, "checkpoint", None)
            return None if ckpt is None else os.path.exists(ckpt)
        if args.command == "run":
            if not os.path.isdir(args.output):
                return False
            stores = [os.path.join(args.output, n) for n in os.listdir(args.output) if n.endswith(".h5path")]
            if stores:  # a slide finished: --resume skips it
                return True
            stores = [os.path.join(args.output, n[:-len(".partial")]) for n in os.listdir(args.output)
                      if n.endswith(".h5path.partial")]
        elif args.command == "segment-nuclei":
            stores = [args.h5path]
        elif args.command == "quantify":
            stores = [os.path.splitext(args.output)[0] + ".h5path"]
        else:
            return None
        from .engine import partial

        return any(os.path.exists(s) or partial.batch_count(partial.partial_dir(s)) > 0 for s in stores)
    except (OSError, TypeError, AttributeError):
        return None


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .errors import HistoflowError

    if argv is None:
        _install_interrupt_handlers()
    with _as_a_command() if argv is None else contextlib.nullcontext():
        try:
            return args.func(args) or 0
        except BrokenPipeError:  # output piped into a reader that stopped early, from main([...]) in Python
            _to_devnull(sys.stdout)
            return 1
        except (HistoflowError, OSError) as e:
            if args.debug:
                raise
            print(f"histoflow: error: {_in_cli_words(str(e), args)}", file=sys.stderr)
            return 2 if isinstance(e, UsageError) else 1
        except KeyboardInterrupt:
            resumable = getattr(args, "resume", None) is not None and getattr(args, "h5path", True)
            saved = _anything_saved(args) if resumable else None
            print("histoflow: interrupted" + ("" if not resumable else
                                              "; nothing was saved yet" if saved is False else
                                              "; the same command with --resume continues from what was written"),
                  file=sys.stderr)
            return 130


def _in_cli_words(msg: str, args) -> str:
    """The library's advice in a command's terms: its options, not Python parameters it has no way to pass."""
    skip = "or pass on_error='skip' (`histoflow run --on-error skip`)"
    if skip in msg:
        msg = msg.replace(skip, "or pass --on-error skip") if hasattr(args, "on_error") else \
            msg.replace(f", {skip}", "")
    msg = msg.replace("run again with resume=True (`--resume` on the command line)", "run again with --resume")
    msg = msg.replace("resume=True continues the same run only: run without resume to replace it (--overwrite on "
                      "the command line), or write elsewhere",
                      "--resume continues the same run only: add --overwrite to replace it (finished slides of "
                      "this run are kept), or write elsewhere")
    msg = msg.replace("; run without resume to start over", "; add --overwrite to start it over (or use --overwrite "
                      "without --resume to start every slide over)")
    msg = msg.replace("give one of each a name of its own (SlideData(path, name=...)) or keep such slides in separate "
                      "runs", "rename or link one of each under another name, or run such slides separately")
    msg = msg.replace(". Run without resume to start over (that removes", ". Use --overwrite (without --resume) to "
                      "start over (that removes")
    msg = msg.replace("add them with slide.add_mask(...), or pass tissue_filter=... to make 'tissue'",
                      "--tissue-filter FRACTION makes 'tissue' (other slide masks can be added from Python, with "
                      "SlideData.add_mask)")
    msg = msg.replace("give a slide mask named 'tissue' instead",
                      "run without --tissue-filter (or give the slide a mask named 'tissue' from Python, with "
                      "SlideData.add_mask)")
    return msg


# ---------------------------------------------------------------------- verbs
def _import_modules(names):
    """Import the user's modules (``--import``), from the current folder too, so that the custom transforms they
    define are known before a pipeline is loaded; dask's worker processes inherit the search path."""
    import importlib

    from .errors import ParameterError

    if names and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    for name in names:
        module = name
        if name.endswith(".py") and os.path.isfile(name):
            rel = os.path.normpath(name[:-3])
            if os.path.isabs(rel) or rel.split(os.sep)[0] == os.pardir:  # /x/my_transforms.py, ../my_transforms.py:
                folder = os.path.dirname(os.path.abspath(name))    # its folder searched (workers inherit it), the
                if folder not in sys.path:                         # file imported by its own name
                    sys.path.insert(0, folder)
                module = os.path.basename(rel)
            else:  # ex/my_transforms.py: ex.my_transforms, from the current folder
                module = rel.replace(os.sep, ".")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ParameterError(f"--import {name}: cannot import it: {e}") from e
        except SyntaxError as e:
            raise ParameterError(f"--import {name}: cannot import it: {e.msg} at {e.filename}:{e.lineno}") from None
        except Exception as e:  # noqa: BLE001 - the module's own code failed as it ran
            import traceback

            last = traceback.extract_tb(e.__traceback__)[-1]
            raise ParameterError(f"--import {name}: importing it raised {type(e).__name__}: {e} "
                                 f"(at {last.filename}:{last.lineno})") from None


def _slide_data(path, slide_mpp, **kwargs):
    """``SlideData(path)`` with the pixel size ``--slide-mpp`` gives, and a note when that replaces one the file
    states (sizes in µm, and the scale the models see, then follow the option, not the file)."""
    from .core.slide import SlideData

    slide = SlideData(path, **kwargs)
    if slide_mpp is None:
        return slide
    stated = slide.mpp
    try:
        slide.reader.mpp = slide_mpp
    except BaseException:
        slide.close()
        raise
    if stated is not None and abs(float(stated[0]) - slide_mpp) > 1e-3 * slide_mpp:
        print(f"note: {path} states {float(stated[0]):.4g} µm/px; --slide-mpp {slide_mpp:g} replaces it",
              file=sys.stderr)
    return slide


def _assume_mpp(slide, path, mpp, why):
    """A slide whose file does not say its pixel size: warn, naming the file and the option that sets it, and
    take ``mpp`` (then recorded as the pixel size used)."""
    print(f"histoflow: warning: {path} does not say its µm/px; taking {mpp:g} µm/px ({why}): pass --slide-mpp to "
          "set it", file=sys.stderr)
    slide.reader.mpp = (mpp, mpp)


def _is_hdf5(path) -> bool:
    if not os.path.isfile(path):
        return False
    import h5py

    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False


def _print_h5path_info(path, as_json):
    from .store import read_h5path

    with read_h5path(path) as h5:
        info = h5.info()
    if as_json:
        print(json.dumps(info))
        return 0
    s = info["slide"]
    print(info["path"])
    print(f"  h5path     version {info['format_version']}" + (" (PathML)" if info["format_version"] == 1 else ""))
    size = f", {s['width']} x {s['height']} px" if s.get("width") and s.get("height") else ""
    mpp = s.get("mpp")
    print(f"  slide      {s.get('name') or '?'}" + (f" ({s['format']})" if s.get("format") else "") + size
          + (f", {mpp[0]:.4g} µm/px" if mpp else ", µm/px unknown")
          + (f", {s['slide_type']}" if s.get("slide_type") else ""))
    if s.get("source_path"):
        print(f"  source     {s['source_path']}")
    shape = "x".join(str(v) for v in info["tile_shape"]) if info["tile_shape"] else "-"
    print(f"  tiles      {info['tiles']}" + (f" of {shape} {info['dtype']}" if info["tile_shape"] else "")
          + (f", {info['compression']}" if info["compression"] else ""))
    if info["tile_masks"]:
        print(f"  tile masks {', '.join(info['tile_masks'])}")
    if info["tile_labels"]:
        print(f"  labels     {', '.join(info['tile_labels'])}")
    for name, m in info["masks"].items():
        shp = f"{m['shape'][1]} x {m['shape'][0]} px " if m["shape"] and len(m["shape"]) >= 2 else ""
        print(f"  slide mask {name}: {shp}(/{m['downsample']:.4g})")
    if info["cells"]:
        print(f"  cells      {info['cells']['cells']} cells x {info['cells']['features']} features")
    for r in info["runs"]:
        what = ", ".join(r["steps"]) if r["steps"] else "no steps"
        parts = [f"{r['tiles_written']} tiles" if r["tiles_written"] is not None else None,
                 f"{r['failed_tiles']} failed" if r["failed_tiles"] else None, r["executor"],
                 f"{r['elapsed_s']:.1f} s" if isinstance(r["elapsed_s"], (int, float)) else None]
        print(f"  run        {(r['date'] or '')[:19].replace('T', ' ')} {r['kind'] or 'run'}: {what}; "
              + ", ".join(p for p in parts if p))
    return 0


def cmd_info(args):
    from . import open_slide

    if _is_hdf5(args.slide):
        return _print_h5path_info(args.slide, args.json)
    with open_slide(args.slide, backend=args.backend) as s:
        info = s.info()
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['path']}")
    print(f"  format     {info['format']} (backend {info['backend']})")
    print(f"  size       {info['width']} x {info['height']} px, {info['channels']} channel(s), {info['dtype']}")
    mpp = info["mpp"]
    print(f"  mpp        {'unknown' if mpp is None else f'{mpp[0]:.4g} x {mpp[1]:.4g} µm/px'}"
          + (f", objective {info['objective_power']:g}x" if info["objective_power"] else ""))
    print("  levels     " + ", ".join(f"{lv['width']}x{lv['height']} (/{lv['downsample']:.4g})"
                                      for lv in info["levels"]))
    names = info["channel_names"]
    print(f"  channels   {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")
    if info["associated_images"]:
        print(f"  associated {', '.join(info['associated_images'])}")
    for w in info["warnings"]:
        print(f"  warning    {w}")
    return 0


def cmd_thumbnail(args):
    from . import open_slide
    from .utils import save_png, to_rgb

    from .errors import OutputError

    _check_outputs([args.slide], {"thumbnail": args.output}, overwrite=args.overwrite)
    if not args.output.lower().endswith(".png"):
        raise OutputError(f"{args.output}: the thumbnail is written as PNG: give -o a .png path")
    if _is_hdf5(args.slide):  # a store: its slide, slide masks, tiles, a tile label, nuclei
        from .store import read_h5path
        from .store.overview import overview

        with read_h5path(args.slide) as h5:
            longest = max(int(h5.slide.get("width") or 0), int(h5.slide.get("height") or 0))
            if 0 < longest < args.size:  # as for a slide: a picture never enlarges it
                print(f"note: --size {args.size} is larger than the slide ({h5.slide['width']} x "
                      f"{h5.slide['height']} px); using {longest}", file=sys.stderr)
            pic = overview(h5, args.size, label=args.label, instances=args.instances, background=args.background)
        save_png(args.output, pic)
        print(f"{args.output}: {pic.shape[1]} x {pic.shape[0]} px")
        return 0
    for option, value in (("--label", args.label), ("--instances", args.instances),
                          ("--background", None if args.background == "auto" else args.background)):
        if value is not None:
            raise UsageError(f"{option} draws over the tiles of an h5path file; {args.slide} is a slide")
    with open_slide(args.slide, backend=args.backend) as s:
        size = args.size
        if size > max(s.dimensions):  # a thumbnail never enlarges the slide
            print(f"note: --size {size} is larger than the slide ({s.dimensions[0]} x {s.dimensions[1]} px); "
                  f"using {max(s.dimensions)}", file=sys.stderr)
            size = max(s.dimensions)
        rgb = to_rgb(s.thumbnail(size), brightfield=s.brightfield, channel_names=s.channel_names)
    save_png(args.output, rgb)
    print(f"{args.output}: {rgb.shape[1]} x {rgb.shape[0]} px")
    return 0


def _check_overlap(overlap, size, size_option):
    """``--overlap`` against the tile size, said under the options' names (not the library's "overlap must be in
    [0, tile_size)")."""
    if overlap is not None and overlap >= size:
        raise UsageError(f"--overlap {overlap} must be less than {size_option} {size} (pixels shared by "
                         "neighbouring tiles)")


def cmd_tile(args):
    from .errors import OutputError

    _check_overlap(args.overlap, args.size, "--size")
    _check_outputs([args.slide], {"h5path": args.output}, overwrite=args.overwrite)
    if not args.output.lower().endswith(".h5path"):
        raise OutputError(f"{args.output}: tiles are written as an h5path store: give -o a .h5path path")
    t0 = time.perf_counter()
    with _slide_data(args.slide, args.slide_mpp, backend=args.backend) as slide:
        grid = slide.grid(args.size, overlap=args.overlap, level=args.level, mpp=args.mpp, edge=args.edge)
        if not len(grid):  # as `run` says it: an empty store written without a word looked like a success
            import warnings

            warnings.warn(f"{args.slide}: no tiles of {args.size} px (grid {grid}); the h5path will hold no tiles"
                          + ("; --edge pad keeps the partial ones" if args.edge == "drop" else ""), stacklevel=2)
        tiles = (slide.read_tile(spec) for spec in grid)
        slide.write(args.output, tiles=tiles, total=len(grid), progress=not args.no_progress,
                    compression=None if args.compression == "none" else args.compression)
    dt = time.perf_counter() - t0
    size = os.path.getsize(args.output)
    print(f"{args.output}: {len(grid)} tiles of {args.size}x{args.size} ({grid.rows} rows x {grid.cols} cols, "
          f"downsample {grid.downsample:.4g}), {size / 1e6:.1f} MB, {dt:.1f} s")
    return 0


def cmd_run(args):
    from .core.slide import SlideDataset
    from .transforms import Pipeline

    from .errors import HistoflowError, OutputError, ParameterError

    if args.scheduler is not None and args.executor not in (None, "dask"):
        raise UsageError(f"--scheduler runs on dask: leave out --executor {args.executor} (or use dask)")
    if args.workers is not None and args.executor == "inprocess":
        raise UsageError("--executor inprocess runs in this process alone: leave out --workers")
    _check_overlap(args.overlap, args.size, "--size")
    _check_output_folder(args.output, "h5path files", "-o")
    _import_modules(args.imports)
    pipeline = Pipeline.load(args.pipeline)
    t0 = time.perf_counter()
    made = []
    for p in args.slides:  # each rests (its file closed until it is read): a cohort is not bound by open files
        made.append(_slide_data(p, args.slide_mpp, slide_type=args.slide_type))
        made[-1].reader.rest()
    slides = SlideDataset(made)
    outs = slides.output_paths(args.output)
    # each slide's picture, OUTDIR/<slide>.png, or <slide>_picture.png where that is one of the inputs
    pngs = [None if args.png == "none" else _picture_path(None, p, avoid=list(args.slides) + outs) for p in outs]
    if not args.overwrite and not args.resume:  # finished results are not replaced by mistake
        done = [p for p in outs + pngs if p and os.path.isfile(p)] + [p for _, p in _journals(outs)]
        if done:
            slides.close()
            raise OutputError(f"{', '.join(done)}: exist{'s' if len(done) == 1 else ''} already; "
                              "--resume keeps finished slides and continues interrupted ones, --overwrite runs "
                              "them again, or give another -o")
    executor = args.executor or ("dask" if args.scheduler is None else None)
    outs = slides.run(pipeline, args.output, tile_size=args.size, overlap=args.overlap, level=args.level,
                      mpp=args.mpp, tissue_filter=args.tissue_filter, executor=executor, workers=args.workers,
                      scheduler=args.scheduler, batch_size=args.batch_size, on_error=args.on_error,
                      resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite,
                      compression=None if args.compression == "none" else args.compression)
    from .store import read_h5path
    from .store.overview import overview
    from .utils import save_png

    all_failed = []
    for slide, out, png in zip(slides.slides, outs, pngs):
        with read_h5path(out) as h5:
            prov = h5.provenance[-1] if h5.provenance else {}
            failed = prov.get("failed_tiles_total", len(prov.get("failed_tiles", [])))  # the list is cut short
            if failed and not len(h5):
                first = (prov.get("failed_tiles") or [{}])[0]
                all_failed.append(f"{out}: every tile failed ({failed}), e.g. {first.get('transform', '?')}: "
                                  f"{first.get('error', '?')}")
            if png:
                try:
                    save_png(png, overview(h5, 1024, slide=slide))
                except (HistoflowError, OSError) as e:  # the results stand; only their picture is missing
                    print(f"histoflow: warning: {out}: no picture: {e}", file=sys.stderr)
                    png = None
                slide.reader.rest()  # (its thumbnail opened the file again)
            print(f"{out}: {len(h5)} tiles" + (f", {failed} failed" if failed else "")
                  + f", masks {h5.tile_mask_names}, labels {h5.tile_label_names}, "
                  f"{os.path.getsize(out) / 1e6:.1f} MB" + (f"; picture {png}" if png else ""))
    slides.close()
    dt = time.perf_counter() - t0
    print(f"{len(outs)} slide(s) in {dt:.1f} s")
    if all_failed:  # --on-error skip kept going, but a slide with nothing written is not a success
        for line in all_failed:
            print(f"histoflow: error: {line}", file=sys.stderr)
        return 1
    return 0


def cmd_transforms(args):
    from .transforms.base import list_transforms

    _import_modules(args.imports)
    items = list_transforms()
    if args.json:
        print(json.dumps(items, default=repr))
        return 0
    for t in items:
        params = ", ".join(k if k in t["required"] else f"{k}={v!r}" for k, v in t["params"].items())
        kinds = f"  [{', '.join(t['slide_types'])}]" if t["slide_types"] else ""
        doc = textwrap.fill(t["doc"], width=max(60, shutil.get_terminal_size((100, 24)).columns - 1),
                            initial_indent="    ", subsequent_indent="    ")
        print(f"{t['name']}({params}){kinds}\n{doc}")
    return 0


def cmd_train(args):
    from .errors import OutputError
    from .ml.recipes import _path, load_config, train_from_config

    cfg = load_config(args.config)
    cfg["train"] = dict(cfg.get("train") or {})  # an empty `train:` is None in YAML
    if args.epochs is not None:
        cfg.setdefault("train", {})["epochs"] = args.epochs
    if args.seed is not None:
        cfg.setdefault("train", {})["seed"] = args.seed
    if args.output is not None:
        cfg["output"] = os.path.abspath(args.output)
    if args.no_progress:
        cfg.setdefault("train", {})["progress"] = False
    if cfg.get("output"):
        out_dir = _path(cfg, cfg["output"])
        _check_output_folder(out_dir, "training run", "--output" if args.output is not None else
                             f"`output:` in {args.config}")
        args.checkpoint = os.path.join(out_dir, "last.ckpt")  # what an interrupted run resumes from
        done = [n for n in ("last.ckpt", "best.pt") if os.path.exists(os.path.join(out_dir, n))]
        if done and not args.resume and not args.overwrite:
            raise OutputError(f"{out_dir}: holds a run already ({', '.join(done)}); continue it with --resume, "
                              "start again over it with --overwrite, or give another --output")
        if args.resume and not os.path.exists(os.path.join(out_dir, "last.ckpt")):
            print(f"note: {out_dir} has no last.ckpt to resume from; starting the run", file=sys.stderr)
        if done and args.overwrite and not args.resume:  # the trainer removes them as the new run starts
            print(f"note: --overwrite: the earlier run in {out_dir} is replaced once this run's data and model are "
                  "ready", file=sys.stderr)
    t0 = time.perf_counter()
    trainer, _ = train_from_config(cfg, resume=args.resume)
    out = trainer.out_dir
    best = trainer.history[trainer.best_epoch] if trainer.best_epoch >= 0 else {}
    shown = ", ".join(f"{k} {v:.4g}" for k, v in best.items() if isinstance(v, float) and k not in ("lr", "seconds"))
    print(f"{out}: {trainer.epoch} epochs in {time.perf_counter() - t0:.0f} s; best epoch "
          f"{trainer.best_epoch + 1}: {shown}; weights {os.path.join(out, 'best.pt')}")
    return 0


def cmd_segment_nuclei(args):
    import tempfile

    from .errors import OutputError, ParameterError, PipelineError
    from .ml.transforms import NucleusSegmentation

    if args.resume and not args.h5path:
        raise UsageError("segment-nuclei --resume continues from the per-tile results of an interrupted run, "
                         "which are kept only with --h5path: run with --h5path FILE (and --resume to continue)")
    overlap = NUCLEI_OVERLAP if args.overlap is None else args.overlap
    if args.overlap is None and overlap >= args.tile:  # said under the options' names, with the default named
        raise UsageError(f"--tile {args.tile}: the default --overlap ({NUCLEI_OVERLAP} px) is too large for "
                         f"it (a tile must be larger than its overlap): pass --overlap {args.tile // 2} or "
                         f"less (nuclei larger than the overlap may be cut at tile edges), or --tile "
                         f"{2 * NUCLEI_OVERLAP} or more")
    _check_overlap(args.overlap, args.tile, "--tile")
    transform = NucleusSegmentation(model=args.model, backend=args.backend, tta=args.tta)
    png = _picture_path(args.png, args.output, avoid=(args.slide, args.output, args.geojson, args.h5path))
    _check_outputs([args.slide], {"label image": args.output, "GeoJSON": args.geojson, "picture": png,
                                  "h5path": args.h5path}, overwrite=args.overwrite, resume=args.resume,
                   store=args.h5path)
    if not args.output.lower().endswith((".tif", ".tiff")):
        raise OutputError(f"{args.output}: the label image is written as TIFF: give -o a .tif path")
    _check_formats(args.png, args.geojson)
    t0 = time.perf_counter()
    with _slide_data(args.slide, args.slide_mpp) as slide, tempfile.TemporaryDirectory() as tmp:
        if not slide.slide_type.brightfield:  # the models read RGB H&E; a fluorescence channel is no such image
            raise PipelineError(f"{args.slide}: not RGB H&E but {slide.slide_type.name} ({slide.reader.channels} "
                                f"channel(s) of {slide.reader.dtype}): segment-nuclei's models read H&E; for "
                                "fluorescence use `histoflow quantify` (nuclei and cells from a nuclear channel)")
        known_mpp = slide.mpp  # the label image carries it (a guessed one is not written into it)
        if slide.mpp is None:
            from .ml.transforms import _runner

            _assume_mpp(slide, args.slide, float(_runner(args.model, args.backend, None).mpp), "the model's")
        store = args.h5path or os.path.join(tmp, "nuclei.h5path")
        executor = "dask" if args.workers else "inprocess"
        try:
            slide.run(transform, store, tile_size=args.tile, overlap=overlap, level=0,
                      tissue_filter=args.tissue_filter, executor=executor, workers=args.workers,
                      progress=not args.no_progress, batch_size=1, resume=args.resume,
                      overwrite=args.overwrite)
        except PipelineError as e:
            if args.h5path:
                raise
            # the journal was in a temporary folder, gone now: no advice about resuming from it
            raise PipelineError(str(e).split(". Finished batches are kept in")[0]) from None
        from .store import read_h5path

        with read_h5path(store) as h:
            n_tiles = len(h)
        shape = (slide.dimensions[1], slide.dimensions[0])
        thumb = _picture_of(args.slide)[0] if png else None
        n, polys = _write_labels(store if n_tiles else None, shape, args.output, bool(args.geojson), thumb, png,
                                 mpp=known_mpp)
    msg = f"{args.output}: {n} nuclei in a {shape[1]} x {shape[0]} uint32 label image"
    if args.geojson:
        from .annotations import write_geojson

        write_geojson(polys, args.geojson, object_type="detection")
        msg += f"; {len(polys)} outlines in {args.geojson}"
    if png:
        msg += f"; picture {png}"
    print(msg + f" ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_quantify(args):
    import warnings

    from .errors import HistoflowError
    from .store import read_h5path
    from .transforms import Pipeline, QuantifyCells, SegmentCells

    _check_overlap(args.overlap, args.tile, "--tile")

    t0 = time.perf_counter()
    out = args.output
    store = os.path.splitext(out)[0] + ".h5path"
    if not out.lower().endswith(".h5ad"):
        raise HistoflowError(f"{out}: the cell table is an AnnData .h5ad file (the tiles and masks go to "
                             f"{store} beside it); give -o a name ending in .h5ad")
    png = _picture_path(args.png, out, avoid=(args.slide, out, store))
    _check_outputs([args.slide], {"cell table": out, "h5path": store, "picture": png}, overwrite=args.overwrite,
                   resume=args.resume, store=store)
    _check_formats(args.png)
    with _slide_data(args.slide, args.slide_mpp, slide_type=args.slide_type) as slide:
        if slide.mpp is None:  # the segmentation assumes one: said, and recorded in the cell table as used
            from .transforms.multiplex import DEFAULT_MPP

            _assume_mpp(slide, args.slide, DEFAULT_MPP, "sizes in µm: nuclei, --expand, the tile overlap, cell areas")
        if slide.slide_type.brightfield:
            from .transforms import NucleusDetectionHE

            given = [o for o, v in (("--nuclear-channel", args.nuclear_channel), ("--membrane", args.membrane),
                                    ("--expand", args.expand)) if v is not None]
            if given:  # they were ignored: cells "grown by 10 µm" were the nuclei as they are
                raise HistoflowError(f"{args.slide}: {', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to "
                                     "fluorescence slides; on a brightfield (H&E) slide the cells are the nuclei "
                                     "NucleusDetectionHE finds: leave them out")
            steps = [NucleusDetectionHE(mask_name="cells"), QuantifyCells(mask_name="cells")]
        else:
            if args.expand is None:
                args.expand = 3.0
            nuclear = _channel_option(args.nuclear_channel or "auto", slide.reader.channel_names)
            membrane = ([_channel_option(m, slide.reader.channel_names) for m in args.membrane]
                        if args.membrane else args.membrane)  # names, or indices as --nuclear-channel takes them
            steps = [SegmentCells(nuclear_channel=nuclear, membrane_channels=membrane,
                                  expand_um=args.expand), QuantifyCells(nucleus_mask="nuclei")]
        overlap = args.overlap
        said = False  # whether the overlap has been warned about here (the run would say it again otherwise)
        if overlap is None:
            needed = _cell_overlap(slide, 3.0 if args.expand is None else args.expand)
            # a tile's core must stay: the overlap is at most half the tile. Below the overlap cells need, cells
            # near tile edges may differ from those of larger tiles (one MIBI cell: 404.5 µm² at --tile 128,
            # 415.5 at --tile 1024): said, with the tile size that avoids it
            overlap = min(needed, args.tile // 2)
            if overlap < needed and args.tile < max(slide.dimensions):
                print(f"histoflow: warning: --tile {args.tile} leaves room for a tile overlap of {overlap} px, less "
                      f"than the {needed} px cells need on this slide (2 x (a large nucleus, 15 µm, + 2 x --expand)): "
                      f"cells near tile edges may differ from those of larger tiles; use --tile {2 * needed} or more",
                      file=sys.stderr)
                said = True
        try:
            with warnings.catch_warnings():
                if said:
                    warnings.filterwarnings("ignore", message=r".*finds objects that need \d+ px of tile overlap")
                slide.run(Pipeline(steps), store, tile_size=args.tile, overlap=overlap,
                          executor="dask" if args.workers else "inprocess", workers=args.workers,
                          progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite)
        except HistoflowError as e:  # the library names its parameter; the user typed an option
            if "nuclear_channel=" not in str(e):
                raise
            raise type(e)(str(e).replace("nuclear_channel=", "--nuclear-channel")) from None
    with read_h5path(store) as h:
        cells = h.cells
    _write_h5ad(cells, out)
    msg = (f"{out}: {cells.n_obs} cells x {cells.n_vars} channels ({', '.join(map(str, cells.var_names[:6]))}"
           f"{', ...' if cells.n_vars > 6 else ''}); tiles and masks in {store}")
    if png:
        import numpy as np

        from .utils import outline_instances, save_png

        thumb, level0 = _picture_of(args.slide)
        # dimmed, as the phenotype picture: the false colours reach the outlines' yellow (red + green, a yellow
        # channel), which then told cell borders from marker signal no more
        thumb = (thumb.astype(np.float32) * 0.7).astype(np.uint8)
        save_png(png, outline_instances(thumb, _labels_at(store, "cells", level0, thumb.shape[:2])))
        msg += f"; picture {png}"
    print(msg + f" ({time.perf_counter() - t0:.1f} s)")
    return 0


#: longest side of the pictures the CLI writes
PICTURE_SIZE = 2048


def _picture_of(path):
    """The slide as an RGB picture of at most PICTURE_SIZE px (fluorescence in false colour), and its level-0
    (width, height)."""
    from . import open_slide
    from .utils import to_rgb

    with open_slide(path) as r:
        thumb = r.thumbnail(min(PICTURE_SIZE, max(r.dimensions)))
        return to_rgb(thumb, brightfield=r.brightfield, channel_names=list(r.channel_names or []) or None), \
            r.dimensions


def _check_formats(png, geojson=None):
    """--png and --geojson name their formats (a PNG named .jpg, or GeoJSON named .xml, which `annotations
    convert` takes for Aperio XML, misleads whatever opens it); after the checks that outputs do not clash."""
    from .errors import HistoflowError

    if png and png.lower() != "none" and not png.lower().endswith(".png"):
        raise HistoflowError(f"{png}: --png writes a PNG picture; give it a .png path (or 'none')")
    if geojson and not geojson.lower().endswith((".geojson", ".json")):
        raise HistoflowError(f"{geojson}: --geojson writes QuPath GeoJSON; give it a .geojson (or .json) path "
                             "(`histoflow annotations convert` makes Aperio XML or ImageJ ROIs from it)")


def _picture_path(option, output, avoid=()):
    """Where a verb's picture goes: ``--png PATH``, none for ``--png none``, else OUTPUT with .png, or
    OUTPUT_picture.png when that would be one of the files in ``avoid`` (the input ``x.png`` of ``-o x.tif``)."""
    if option is not None and option.lower() == "none":
        return None
    if option:
        return option
    taken = {os.path.realpath(p) for p in avoid if p}
    base = os.path.splitext(output)[0]
    path, k = base + ".png", 1
    while os.path.realpath(path) in taken:  # (x_picture.png may be an input too: it was replaced)
        path = base + ("_picture.png" if k == 1 else f"_picture{k}.png")
        k += 1
    return path



def _cell_overlap(slide, expand_um) -> int:
    """Tile overlap (pixels, even) for cell segmentation: each side of a tile's core must hold, whole, every
    nucleus that competes for the territory of the cells the tile keeps: 2 x (a large nucleus + 2 x the
    cells' reach), :meth:`SegmentCells.min_overlap` (made even). With less, a neighbour cut by the tile's edge
    is dropped as too small and a kept cell may grow into its place."""
    import math

    from .transforms.multiplex import DEFAULT_MPP, LARGE_NUCLEUS_UM

    mpp = float(slide.mpp[0]) if slide.mpp else DEFAULT_MPP
    px = math.ceil(2 * (LARGE_NUCLEUS_UM + 2 * max(0.0, float(expand_um))) / mpp)
    return int(px + px % 2)


def _channel_option(value, names):
    """A channel option as the library takes it: a name, or an index for digits that name no channel. A name
    is tried first: channels named by wavelength ('405', '488') are common, and '405' is not index 405."""
    from .errors import ChannelError
    from .transforms.objects import find_channel

    text = str(value)
    if not text.lstrip("-").isdigit():
        return value
    try:
        find_channel(list(names or []), text)
    except ChannelError as e:
        if "several" in str(e):  # a name of several channels: the run says which
            return text
        return int(text)
    return text


def _write_h5ad(table, path):
    """An AnnData written whole or not at all (a failure leaves neither half a file nor a temporary one)."""
    from .utils import atomic_output

    with atomic_output(path, ".h5ad") as tmp:
        table.write_h5ad(tmp)


def _check_outputs(inputs, outputs: dict, overwrite=True, resume=None, in_place=None, store=None):
    """Before any work: refuse an output whose folder is missing, an output that is one of the inputs, and
    two outputs at one path (the later would replace the earlier). ``outputs`` maps what -> path (None: not
    written). With ``overwrite`` False (no ``--overwrite``), outputs that exist already are refused too, unless
    ``resume`` is True (``--resume`` continues the run that wrote them; ``resume`` None: the command has no
    ``--resume``) and there is a run to continue: the h5path ``store`` or its journal (with nothing to resume,
    --resume replaced another image's outputs without a word), or the output is ``in_place``, a file the
    command updates on purpose."""
    from .engine.partial import partial_dir
    from .errors import OutputError

    if resume and store and not (os.path.exists(store) or os.path.isdir(partial_dir(store))):
        print(f"histoflow: nothing to resume ({store} and its journal do not exist): starting a new run",
              file=sys.stderr)
        resume = False

    ins = {os.path.realpath(p): p for p in inputs if p}
    seen: dict = {}
    for what, path in outputs.items():
        if not path:
            continue
        real = os.path.realpath(path)
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise OutputError(f"{path}: cannot write the {what} there: the folder {folder} does not exist")
        if os.path.isdir(path):
            raise OutputError(f"{path}: is a folder; give a file name for the {what}")
        if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            raise OutputError(f"{path}: cannot write the {what} there: no permission to write "
                              f"{'the file' if os.path.exists(path) else f'in {folder}'}")
        if real in ins:
            raise OutputError(f"{path}: the {what} would replace the input {ins[real]}; choose another path")
        if real in seen:
            raise OutputError(f"{path}: given for both the {seen[real]} and the {what}; give each its own path")
        seen[real] = what
    if not overwrite and not resume:
        keep = os.path.realpath(in_place) if in_place else None
        there = [(what, path) for what, path in outputs.items()
                 if path and os.path.isfile(path) and os.path.realpath(path) != keep]
        there += _journals([path for path in outputs.values() if path])
        if there:
            names = ", ".join(f"{path} (the {what})" for what, path in there)
            also = " (--resume continues an interrupted run)" if resume is not None else ""
            raise OutputError(f"{names}: exist{'s' if len(there) == 1 else ''} already: give --overwrite to "
                              f"replace {'it' if len(there) == 1 else 'them'}, or another path{also}")


def _journals(outputs) -> list:
    """(what, path) of the journals of interrupted runs (finished batches kept for --resume) of these outputs."""
    from .engine import partial

    out = []
    for path in outputs:
        n = partial.batch_count(partial.partial_dir(path))
        if n:
            out.append((f"{n} finished batch(es) of an interrupted run", partial.partial_dir(path)))
    return out


def _check_output_folder(path, what, option):
    """Before any work: refuse an output folder (made when missing) that cannot be written: where it is a file,
    or where the folder it would be made in (the nearest one that exists) or it itself is not writable."""
    from .errors import OutputError

    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{path}: is a file; give {option} a folder for the {what}")
    from .utils import missing_folders

    missing = missing_folders(path)  # the folder the missing ones are made in
    folder = os.path.dirname(missing[-1]) if missing else os.path.abspath(path)
    if not os.path.isdir(folder):
        raise OutputError(f"{path}: cannot make the folder for the {what}: {folder} is a file")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write the {what} there: no permission to write in {folder}")


#: label images up to this many pixels are written as strips, larger ones as 512 x 512 tiles
TILED_LABELS_PX = 4096 * 4096


def _write_labels(store, shape, output, outlines, thumb, png, *, mpp=None):
    """Write the nuclei of an h5path's tiles as one uint32 label TIFF of ``shape`` (level 0), streamed a row of
    tiles at a time (:class:`histoflow.ml.infer.InstanceRows`: memory stays flat on slides of any size);
    ``store`` None: no tile, an empty image. With ``outlines`` the nuclei are outlined as they are placed
    (QuPath GeoJSON polygons, "Nucleus"); with ``png`` their outlines are drawn over ``thumb``. Returns the
    number of nuclei and the polygons. ``mpp`` (x, y): the pixel size the TIFF records (pixels per cm, as
    Fiji, QuPath and histoflow read it); None: none recorded."""

    import numpy as np
    import tifffile

    from .annotations import polygonize
    from .errors import OutputError
    from .ml.infer import InstanceRows
    from .utils import atomic_output, outline_instances, save_png

    H, W = shape
    polys = []
    scale = {} if mpp is None else {"resolution": (1e4 / float(mpp[0]), 1e4 / float(mpp[1])),
                                    "resolutionunit": "CENTIMETER"}

    def outline(labels, x, y):
        polys.extend(polygonize(labels, origin=(x, y)))

    rows = InstanceRows(store, "nuclei", shape, on_objects=outline if outlines else None) if store else None
    blocks = iter(rows) if rows is not None else iter([(0, np.zeros((H, W), np.int32))])
    small = pick_r = pick_c = None
    if png:  # the picture's pixels sample the label image by nearest neighbour, as outline_instances does
        from .core.resample import nearest_index

        ph, pw = thumb.shape[:2]
        pick_r, pick_c = nearest_index(ph, H), nearest_index(pw, W)
        small = np.zeros((ph, pw), np.int32)

    def sampled(stream):
        for r0, block in stream:
            if small is not None:
                sel = np.flatnonzero((pick_r >= r0) & (pick_r < r0 + len(block)))
                if len(sel):
                    small[sel] = block[pick_r[sel] - r0][:, pick_c]
            yield r0, block

    def tiles(stream, t=512):  # 512 x 512 tiles in row-major order, from blocks of rows of any height
        pending = np.zeros((0, W), np.int32)
        for _, block in stream:
            pending = np.vstack([pending, block]) if len(pending) else block
            while len(pending) >= t:
                strip, pending = pending[:t], pending[t:]
                for c in range(0, W, t):
                    yield strip[:, c:c + t].astype(np.uint32)
        if len(pending):
            for c in range(0, W, t):
                yield pending[:, c:c + t].astype(np.uint32)

    with contextlib.ExitStack() as stack:
        if rows is not None:
            stack.enter_context(rows)
        tmp_out = stack.enter_context(atomic_output(output, ".tif"))
        if H * W <= TILED_LABELS_PX:
            labels = np.zeros((H, W), np.uint32)
            for r0, block in sampled(blocks):
                labels[r0:r0 + len(block)] = block
            tifffile.imwrite(tmp_out, labels, compression="zlib", **scale)
        else:
            stream = tiles(sampled(blocks))
            tifffile.imwrite(tmp_out, stream, shape=(H, W), dtype=np.uint32, tile=(512, 512),
                             compression="zlib", **scale)
            if next(stream, None) is not None:  # tifffile stops at its last tile: the rows run to their end here
                raise OutputError(f"{output}: more label tiles than a {W} x {H} image holds (a histoflow bug)")
    if png:
        save_png(png, outline_instances(thumb, small))
    for p in polys:
        p.classification = "Nucleus"
    polys.sort(key=lambda p: int(p.name))  # by nucleus id (the pieces of one nucleus stay in their order)
    return (rows.count if rows is not None else 0), polys


def _labels_at(store, mask, level0, shape):
    """The instance masks ``mask`` of an h5path's tiles pasted into one label image of ``shape = (h, w)``
    covering the slide's level 0 (``level0 = (w, h)``), by nearest neighbour, ids unique over tiles; a
    picture-sized stand-in for :func:`histoflow.ml.infer.assemble_instances` on slides of any size."""
    import numpy as np

    from .store import read_h5path

    H, W = shape
    sy, sx = H / level0[1], W / level0[0]
    out = np.zeros((H, W), np.int64)
    offset = 0
    with read_h5path(store) as h:
        for tile in h:
            lab = tile.masks.get(mask)
            if lab is None or not lab.any():
                continue
            x0, y0 = tile.coords
            ds = float(tile.downsample)
            th, tw = lab.shape
            r0, r1 = int(round(y0 * sy)), min(H, int(round((y0 + th * ds) * sy)))
            c0, c1 = int(round(x0 * sx)), min(W, int(round((x0 + tw * ds) * sx)))
            if r1 <= r0 or c1 <= c0:
                continue
            rows = np.minimum(((np.arange(r0, r1) + 0.5) / sy - y0) / ds, th - 1).astype(np.intp)
            cols = np.minimum(((np.arange(c0, c1) + 0.5) / sx - x0) / ds, tw - 1).astype(np.intp)
            part = lab[rows[:, None], cols[None, :]].astype(np.int64)
            region = out[r0:r1, c0:c1]
            free = (region == 0) & (part > 0)
            region[free] = part[free] + offset
            offset += int(lab.max())
    return out


def _read_cells(path):
    import anndata

    from .errors import HistoflowError

    if not os.path.exists(path):
        raise HistoflowError(f"{path}: no such file")
    if path.endswith(".h5path"):
        from .store import read_h5path

        with read_h5path(path) as h:
            cells = h.cells
        if cells is None:
            raise HistoflowError(f"{path}: has no cell table (run QuantifyCells first)")
        return cells
    try:
        return anndata.read_h5ad(path)
    except Exception as e:  # noqa: BLE001 - anndata raises TypeError, AnnDataReadError ... on other HDF5 files
        what = " ".join(str(e).split())[:200]
        hint = "; an h5path store is given by its .h5path name" if _is_h5path(path) else ""
        raise HistoflowError(f"{path}: not an AnnData .h5ad file ({type(e).__name__}: {what}){hint}") from None


def _is_h5path(path) -> bool:
    """Whether an HDF5 file holds an h5path store (its root attribute), whatever its name ends with."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return "h5path" in str(f.attrs.get("format", ""))
    except Exception:  # noqa: BLE001 - not HDF5, unreadable: not a store
        return False


def cmd_phenotype(args):
    import yaml

    from .cells import RuleTable, gate, list_presets, load_preset

    from .cells import RuleError
    from .errors import HistoflowError

    # (quantify's own picture of the cell outlines, <cells>.png, is kept too)
    png = _picture_path(args.png, args.output, avoid=(args.cells, args.rules, args.thresholds, args.output,
                                                      args.geojson, os.path.splitext(args.cells)[0] + ".png"))
    from .errors import OutputError

    store = args.cells if args.cells.endswith(".h5path") else os.path.splitext(args.cells)[0] + ".h5path"
    if not args.output.lower().endswith(".h5ad"):
        raise OutputError(f"{args.output}: the cell table is written as AnnData: give -o a .h5ad path")
    # the cell table may be updated in place (-o the input .h5ad): it is read whole before anything is written;
    # the h5path store of tiles and masks (the input, or the one quantify wrote beside it) is never replaced
    in_place = os.path.realpath(args.output) == os.path.realpath(args.cells)
    _check_outputs([args.rules, args.thresholds, store if os.path.exists(store) else None,
                    None if in_place else args.cells],
                   # a table updated in place: its default picture is updated with it
                   {"cell table": args.output, "picture": None if in_place and args.png is None else png,
                    "GeoJSON": args.geojson}, overwrite=args.overwrite, in_place=args.cells)
    for what, path in (("picture", png), ("GeoJSON", args.geojson)):
        if path and os.path.realpath(path) == os.path.realpath(args.cells):
            raise OutputError(f"{path}: the {what} would replace the input {args.cells}; choose another path")
    _check_formats(args.png, args.geojson)
    presets = list_presets()
    if args.rules not in presets and not os.path.exists(args.rules):
        raise RuleError(f"{args.rules}: no such rule table file, nor a built-in preset of that name; presets: "
                        f"{', '.join(presets)}")
    cells = _read_cells(args.cells)
    if png and "spatial" not in cells.obsm:  # no positions: no picture (said, before anything is written)
        print(f"note: {args.cells} has no cell positions (obsm['spatial']): no picture", file=sys.stderr)
        png = None
    table = load_preset(args.rules) if args.rules in presets else RuleTable.from_yaml(args.rules)
    if args.geojson and not os.path.exists(store):  # before anything is written
        raise HistoflowError(f"{store}: not found; --geojson needs the tiles and masks that `histoflow quantify` "
                             "writes beside the .h5ad")
    manual = None
    if args.thresholds:
        try:
            from .utils import yaml_load

            with open(args.thresholds, encoding="utf-8") as f:
                manual = yaml_load(f)
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise HistoflowError(f"{args.thresholds}: not a YAML/JSON file of thresholds "
                                 f"({' '.join(str(e).split())})") from None
        except OSError as e:
            raise HistoflowError(f"{args.thresholds}: cannot read the thresholds (--thresholds): "
                                 f"{e.strerror or e}") from None
        if manual is not None and not isinstance(manual, dict):
            raise HistoflowError(f"{args.thresholds}: expected {{channel: value}} or {{slide: {{channel: value}}}}, "
                                 f"got a {type(manual).__name__}")
    by = "slide" if "slide" in cells.obs else None
    try:  # the channels the rules use, and any given a manual threshold: not every channel of the panel
        used = set(table.validate(list(cells.var_names)).values())
    except RuleError as e:
        raise RuleError(f"{args.rules}: {e}") from None
    from .cells.gating import CellsError, resolve_channel

    var_names = list(map(str, cells.var_names))
    named = set()
    for k, v in (manual or {}).items():
        for name in (map(str, v) if isinstance(v, dict) else [str(k)]):
            try:  # as gate reads the thresholds: "Ki67" is the channel "Ki67 (151)"
                ch = resolve_channel(name, var_names)
            except CellsError as e:
                raise CellsError(f"{args.thresholds}: {e}") from None
            named.add(ch if ch is not None else name)  # unknown: gate names it
    channels = [c for c in var_names if c in used or c in named]
    try:
        gate(cells, thresholds=manual, method=args.gate, by=by, channels=channels, log=not args.no_log)
    except HistoflowError as e:
        blame = args.thresholds if manual is not None and "threshold" in str(e) else args.cells
        if str(e).startswith(str(blame)):
            raise
        msg = str(e).replace("(pass log=False,", "(pass --no-log,")
        raise type(e)(f"{blame}: {msg}") from None
    try:
        counts = table.apply(cells)
    except RuleError as e:
        raise RuleError(f"{args.rules}: {e}") from None
    n_geojson = None
    if args.geojson:  # first: a store that does not match the table is refused before the table or picture is written
        from .ml.infer import cells_to_geojson

        n_geojson = cells_to_geojson(store, args.geojson, adata=cells)
    _write_h5ad(cells, args.output)
    width = max(len(str(k)) for k in counts) if counts else 5
    total = sum(counts.values()) or 1
    print(f"{'phenotype':<{width}}  cells      %")
    for k, v in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"{str(k):<{width}}  {v:>5}  {100 * v / total:5.1f}")
    if png:
        _phenotype_png(cells, png)
    if args.geojson:
        print(f"{args.geojson}: {n_geojson} cells with outlines, phenotypes and measurements (QuPath: File > Import "
              "objects)")
    print(f"{args.output}: {cells.n_obs} cells, {len([c for c in counts if counts[c]])} phenotypes"
          + (f"; picture {png}" if png else ""))
    return 0


def _phenotype_png(cells, png):
    """Cells as dots coloured by phenotype, over the nuclear channel of the source slide when it is at hand."""
    import numpy as np
    from PIL import Image, ImageDraw

    from .utils import save_png

    xy = np.asarray(cells.obsm["spatial"], float)
    w, h = int(xy[:, 0].max()) + 20 if len(xy) else 100, int(xy[:, 1].max()) + 20 if len(xy) else 100
    background = None
    source = str(cells.uns.get("histoflow", {}).get("source", ""))
    if source and os.path.exists(source):
        from . import open_slide
        from .utils import to_rgb

        try:
            with open_slide(source) as r:
                w, h = r.dimensions
                scale = min(1.0, 1500 / max(w, h))
                thumb = r.thumbnail(int(max(w, h) * scale))
                names = list(r.channel_names)
                brightfield = r.brightfield
            from .transforms.multiplex import nuclear_channel_index

            try:
                c = [nuclear_channel_index(names)]
            except KeyError:
                c = None
            if brightfield:  # H&E shown as it is; fluorescence by its nuclear channel (3 uint8 channels were RGB)
                c = None
            background = Image.fromarray((to_rgb(thumb, brightfield=brightfield, channels=c, channel_names=names)
                                          * 0.6).astype(np.uint8))
        except Exception:  # noqa: BLE001 - the picture still works without its background
            background = None
    scale = min(1.0, 1500 / max(w, h))
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    canvas = background.resize(size) if background is not None else Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    from .cells.rules import phenotype_colours

    classes = list(cells.obs["phenotype"].cat.categories)
    colour = phenotype_colours(classes)  # as in the GeoJSON: one colour per class of the table, on every slide
    r = max(1.5, 3 * scale)
    for (x, y), c in zip(xy * scale, cells.obs["phenotype"]):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour[c])
    for i, c in enumerate(classes):  # legend
        draw.rectangle([8, 8 + 14 * i, 18, 18 + 14 * i], fill=colour[c])
        draw.text((24, 6 + 14 * i), str(c), fill=(255, 255, 255))
    save_png(png, np.asarray(canvas))


def cmd_annotations_convert(args):
    from .annotations import _convert, describe_losses

    _check_outputs([args.input], {"converted annotations": args.output}, overwrite=args.overwrite)
    n, skipped, lost = _convert(args.input, args.output, negatives="keep" if args.keep_negatives else "subtract")
    print(f"{args.output}: {n} polygons from {args.input}"
          + (f"; skipped {', '.join(f'{v} {k}' for k, v in skipped.items())}, which enclose no area"
             if skipped else ""))
    if lost:
        print(f"note: {describe_losses(args.output, lost)}", file=sys.stderr)
    return 0


def demo_pipeline():
    """The demo's pipeline: stain normalisation then nucleus detection, on tiles of detected tissue."""
    from .transforms import NucleusDetectionHE, Pipeline, StainNormalizationHE

    return Pipeline([StainNormalizationHE(), NucleusDetectionHE(mask_name="nuclei")], inputs=["tissue"])


def cmd_demo(args):
    import numpy as np

    from .core.slide import SlideData
    from .data import sample_slide_path
    from .store import read_h5path
    from .utils import save_png

    _check_output_folder(args.output, "demo's results", "-o")
    os.makedirs(args.output, exist_ok=True)
    t0 = time.perf_counter()
    slide = SlideData(sample_slide_path())
    pipe = demo_pipeline()
    mpp = f", {float(slide.mpp[0]):.4g} µm/px" if slide.mpp else ""
    print(f"slide          {slide.name} ({slide.reader.format}, {slide.dimensions[0]} x {slide.dimensions[1]} px{mpp})")
    print("pipeline       tissue detection (pre-pass), then on each tile: "
          + ", ".join(type(step).__name__ for step in pipe.steps))
    out = os.path.join(args.output, f"{slide.name}.h5path")
    # tiles overlap by a large nucleus (NucleusDetectionHE.min_overlap): each nucleus is kept whole by one tile
    overlap = pipe.overlap_needed_by(float(slide.mpp[0]) if slide.mpp else None)[0]
    full_grid = len(slide.grid(256, overlap=overlap))
    slide.run(pipe, out, tile_size=256, overlap=overlap, tissue_filter=0.25, executor="dask", workers=2,
              progress=True)

    # the picture: thumbnail, tissue outline (pre-pass), the tiles' own parts, nuclei centroids
    from .store.overview import overview

    thumb = slide.thumbnail(1024)
    with read_h5path(out) as h5:
        tissue = h5.masks["tissue"]
        n_tiles = len(h5)
        nuclei = sum(len(np.unique(tile.masks["nuclei"])) - int((tile.masks["nuclei"] == 0).any()) for tile in h5)
        prov = h5.provenance[-1]
        pic = overview(h5, 1024, instances="nuclei", slide=slide)
    overlay = save_png(os.path.join(args.output, f"{slide.name}_overlay.png"), pic)
    thumb_path = save_png(os.path.join(args.output, f"{slide.name}_thumbnail.png"), thumb)
    slide.close()
    dt = time.perf_counter() - t0
    print(f"\nsample slide   {sample_slide_path()}")
    print(f"tissue         {100 * float(tissue.mean()):.0f}% of the slide (pre-pass at "
          f"{tissue.shape[1]}x{tissue.shape[0]} px)")
    print(f"tiles          {n_tiles} tiles of 256x256 (overlap {overlap}) with >= 25% tissue "
          f"(of {full_grid} in the full grid), "
          f"on {prov['executor']['workers']} dask workers")
    print(f"nuclei         {nuclei} detected")
    print(f"h5path         {out} ({os.path.getsize(out) / 1e6:.1f} MB)")
    print(f"pictures       {overlay} (tissue outline green, nuclei cyan), {thumb_path}")
    print(f"time           {dt:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

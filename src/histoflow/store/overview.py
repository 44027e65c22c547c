"""A picture of what an h5path file holds: the slide, its slide masks, the tiles kept, a tile label, nuclei.

:func:`overview` draws, over a thumbnail of the slide (or, when the slide cannot be opened, over the stored
tiles put back together):

- the outline of each slide-level mask (``tissue`` from the pre-pass, heatmaps at 0.5), one colour each;
- each tile's own part (its core, without the overlap it shares with its neighbours), in grey;
- a tile label, when asked, as a colour over each tile (numbers on a viridis-like scale, classes in a
  palette) with a legend below the picture;
- the tiles a run skipped after a failure (``on_error="skip"``) in red;
- the centroids of the objects of a per-tile instance mask (``instances="nuclei"``), in cyan.
"""
from __future__ import annotations

import math
import os

import numpy as np

from ..errors import H5PathError, ParameterError

#: the colours of slide-mask outlines, in the order of the masks' names
MASK_COLOURS = [(0, 220, 0), (255, 0, 255), (255, 160, 0), (0, 160, 255), (255, 255, 0)]
#: class colours of a tile label that is not a number (tab10)
CLASS_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                 (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
# viridis at 0, 0.25, 0.5, 0.75, 1 (interpolated in between)
_RAMP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)
TILE_COLOUR = (110, 110, 110)
FAILED_COLOUR = (230, 0, 0)
INSTANCE_COLOUR = (0, 200, 255)


def class_colours(n: int) -> list:
    """``n`` distinct RGB colours for classes: tab10 up to 10, else ``n`` hues around the colour wheel at two
    lightnesses in turn (so that no two classes share a colour however many there are, up to 256)."""
    if n <= len(CLASS_COLOURS):
        return CLASS_COLOURS[:n]
    import colorsys

    out = []
    for k in range(n):
        r, g, b = colorsys.hsv_to_rgb(k / n, 0.75, 0.95 if k % 2 == 0 else 0.6)
        out.append((int(round(r * 255)), int(round(g * 255)), int(round(b * 255))))
    return out


def ramp(values: np.ndarray) -> np.ndarray:
    """RGB uint8 colours of values in [0, 1] on a viridis-like scale (NaN: grey)."""
    v = np.asarray(values, np.float64)
    pos = np.clip(np.nan_to_num(v, nan=0.0), 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(pos.astype(int), len(_RAMP) - 2)
    f = (pos - i)[..., None]
    out = (_RAMP[i] * (1 - f) + _RAMP[i + 1] * f).round().astype(np.uint8)
    out[np.isnan(v)] = (128, 128, 128)
    return out


def mask_outline(mask: np.ndarray, size, downsample: float | None = None, slide_size=None) -> np.ndarray:
    """Boolean outline (1-2 px wide) of a slide mask drawn at ``size = (w, h)``: the mask's pixels > 0, or
    >= 0.5 for a float mask (a probability heatmap). With its ``downsample`` and the slide's level-0
    ``slide_size`` (w, h), each picture pixel takes the mask pixel under its centre, so a mask that covers the
    slide a little more or less than exactly (as masks from thumbnails do) is drawn where it lies; otherwise the
    mask is stretched over the picture."""
    from ..core.resample import resize_mask

    m = np.asarray(mask)
    m = (m >= 0.5) if m.dtype.kind == "f" else (m > 0)
    w, h = int(size[0]), int(size[1])
    if downsample is not None and slide_size is not None:
        def index(n, full, length):  # the mask pixel under each picture pixel's centre; -1 past the mask
            i = np.floor((np.arange(n) + 0.5) * (float(full) / n) / float(downsample)).astype(np.int64)
            return np.where(i < length, i, -1)

        iy, ix = index(h, slide_size[1], m.shape[0]), index(w, slide_size[0], m.shape[1])
        m = m[np.maximum(iy, 0)[:, None], np.maximum(ix, 0)[None, :]] & (iy >= 0)[:, None] & (ix >= 0)[None, :]
    else:
        m = resize_mask(m.astype(np.uint8), (w, h)) > 0
    inner = np.zeros_like(m)  # the picture's border is an edge too: a mask that covers the whole slide is outlined
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    edge = m & ~inner
    edge[1:, :] |= edge[:-1, :]
    return edge


def _background(h5, size, background, slide):
    """(RGB thumbnail, what it is) whose longer side is ``size``."""
    from ..utils import to_rgb

    meta = h5.slide
    if background not in ("auto", "slide", "tiles"):
        raise ParameterError(f"overview: background must be 'auto', 'slide' or 'tiles', not {background!r}")
    if background in ("auto", "slide"):
        source = slide if slide is not None else meta.get("source_path")
        try:
            from .. import open_slide

            if source is None:
                raise H5PathError("the file does not name its slide")
            want = (int(meta["width"]), int(meta["height"]))

            def over(r):
                _same_size(r, want)
                if background == "auto" and _other_pixels(h5, r):
                    return _stitched(h5, size), "tiles"
                return to_rgb(r.thumbnail(size), brightfield=r.brightfield, channel_names=r.channel_names), "slide"

            if isinstance(source, (str, os.PathLike)):
                with open_slide(source) as r:
                    return over(r)
            return over(getattr(source, "reader", source))  # a SlideData or a reader
        except Exception as e:  # noqa: BLE001 - any failure to open it: the tiles instead, or say why
            if background == "slide":
                raise H5PathError(f"{h5.path}: cannot draw over the slide {source}: {e}") from None
    return _stitched(h5, size), "tiles"


def _other_pixels(h5, reader) -> bool:
    """Whether the stored tiles hold other channels than the slide's (a run through ``VirtualHE``: 22 channels of
    fluorescence in, RGB out): the picture is then drawn over the tiles, which are what the file holds."""
    images = h5.images
    if images is None or not len(h5):
        return False
    names = h5.slide.get("channel_names")
    return int(images.shape[-1]) != int(reader.channels) or \
        (names is not None and list(names) != list(reader.channel_names or []))


def _same_size(reader, want):
    """Refuse a slide of another size than the file's (another slide now at its ``source_path``)."""
    got = tuple(int(v) for v in reader.dimensions)
    if got != want:
        raise H5PathError(f"it is {got[0]} x {got[1]} px, the file's slide {want[0]} x {want[1]} px")


def _mask_view(h5, name, width):
    """Slide mask ``name`` read with a stride, no finer than twice the picture's ``width`` (a level-0 mask of
    a large slide is not read whole for a 1024 px picture), and its downsample (None when the file does not
    say it)."""
    src = h5._s()
    try:
        down = float(h5.mask_downsample(name))
    except Exception:  # noqa: BLE001 - PathML's files and odd attributes: the mask is stretched over the slide
        down = None
    if hasattr(src, "_mask_ds"):
        ds = src._mask_ds(name)
        step = max(1, int(ds.shape[1] // (2 * max(1, width))))
        if step > 1:  # (outlines are of values > 0, or >= 0.5 for floats: bool or not alike)
            return ds[::step, ::step], None if down is None else down * step
    return h5.masks[name], down


def _geometry(h5):
    """Level-0 (x, y) and downsample of every tile, and the tiles' (h, w) in their own pixels."""
    src = h5._s()
    coords = h5.coords
    if hasattr(src, "_cols"):
        down = np.asarray(src._cols()[2], np.float64)
    else:  # PathML's files: level 0
        down = np.ones(len(coords))
    shape = tuple(h5.images.shape[1:3]) if len(coords) else (0, 0)
    return coords, down, shape


def _stitched(h5, size):
    """The stored tiles put back together at a thumbnail's scale (where the slide cannot be opened)."""
    from ..core.resample import resize
    from ..utils import progress_bar, to_rgb

    meta = h5.slide
    W, H = int(meta["width"]), int(meta["height"])
    scale = size / max(W, H)
    w, h = max(1, round(W * scale)), max(1, round(H * scale))
    coords, down, (th, tw) = _geometry(h5)
    images = h5.images
    channels = int(images.shape[3]) if len(coords) else 3
    canvas = np.zeros((h, w, channels), np.float32)
    seen = np.zeros((h, w), bool)
    for i in progress_bar(range(len(coords)), total=len(coords), desc="tiles", unit="tile",
                          disable=len(coords) < 2000):
        x0, y0 = coords[i] * scale
        x1, y1 = (coords[i] + (tw * down[i], th * down[i])) * scale
        a, b, c, d = int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))
        a2, b2, c2, d2 = max(a, 0), max(b, 0), min(c, w), min(d, h)
        if c2 <= a2 or d2 <= b2:
            continue
        # area average in float, rounded once below as a slide's thumbnail is (rounded here in the tiles' own
        # dtype, low uint16 counts came out otherwise than in the slide's thumbnail: 0.5 up, not to even)
        tile = np.asarray(images[i])
        small = resize(tile.astype(np.float32) if tile.dtype.kind in "ui" else tile, (c - a, d - b))
        canvas[b2:d2, a2:c2] = small[b2 - b:d2 - b, a2 - a:c2 - a]
        seen[b2:d2, a2:c2] = True
    brightfield = meta.get("slide_type") in (None, "HE", "IHC") and channels == 3
    dtype = np.dtype(h5.images.dtype) if len(coords) else np.dtype(np.uint8)
    if brightfield and seen.any():  # glass where no tile was kept: white (float tiles: their brightest value)
        canvas[~seen] = np.iinfo(dtype).max if dtype.kind in "ui" else canvas[seen].max()
    if dtype.kind in "ui":  # back to the tiles' own type: shown as a thumbnail of the slide would be
        info = np.iinfo(dtype)
        canvas = canvas.round().clip(info.min, info.max).astype(dtype)
    return to_rgb(canvas, brightfield=brightfield, channel_names=meta.get("channel_names"))


def _pair(v, default=0.0):
    """(x, y) of a setting given as one number or a pair (None: the default)."""
    if v is None:
        return float(default), float(default)
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return float(v[0]), float(v[1])
    return float(v), float(v)


def _core_inset(coords, down, tile_w, tile_h, step):
    """Level-0 (x, y) margin between a tile's edge and its own part: half of what neighbours share, found from
    the tiles' positions (``step``: the smallest step between two columns, two rows; :func:`_steps`) so that it
    holds for files with no record of their tiling too."""
    if not len(coords):
        return 0.0, 0.0
    ds = float(np.median(down))
    return tuple(max(0.0, (size * ds - st) / 2) if st else 0.0 for size, st in ((tile_w, step[0]), (tile_h, step[1])))


def _edge_mode(h5) -> str:
    """How the last run's grid ended at the slide's right and bottom edges ("pad" where nothing says)."""
    for rec in reversed(h5.provenance):
        tiling = rec.get("tiling") if isinstance(rec, dict) else None
        if isinstance(tiling, dict) and tiling.get("edge") in ("pad", "drop"):
            return tiling["edge"]
    return "pad"


def _core_box(x, y, ds, tile_w, tile_h, inset, step, size, edge):
    """Level-0 (x0, y0, x1, y1) of a tile's own part: inset by half of what it shares with each neighbour,
    except on a side where it is the grid's first or last tile (it owns up to the slide's edge there, as
    :meth:`histoflow.core.grid.TileGrid.core` says). Grids start at 0; the last column or row is the one that
    reaches the edge ("pad") or after which no whole tile fits ("drop")."""
    box = []
    for lo, extent, a, st, full in ((x, tile_w * ds, inset[0], step[0], size[0]),
                                    (y, tile_h * ds, inset[1], step[1], size[1])):
        last = lo + extent >= full - 1 if edge == "pad" else lo + st + extent > full + 1
        box.append((lo + (0.0 if lo < 1 else a), lo + extent - (0.0 if last or not st else a)))
    (x0, x1), (y0, y1) = box
    return x0, y0, x1, y1


def _steps(coords):
    """The smallest step between two columns and between two rows of tiles (0 where there is one)."""
    out = []
    for axis in (0, 1):
        steps = np.diff(np.unique(coords[:, axis])) if len(coords) else np.zeros(0)
        steps = steps[steps > 0]
        out.append(float(steps.min()) if len(steps) else 0.0)
    return out[0], out[1]


def _failed_size(rec, meta, down, tile_w, tile_h):
    """Level-0 (w, h) of the tiles a run records as failed: its tile size at its downsample (that of the
    stored tiles, else the one its tiling asked for)."""
    tiling = rec.get("tiling") if isinstance(rec.get("tiling"), dict) else {}
    try:
        tw, th = _pair(tiling.get("tile_size"), tile_w or 0)
    except (TypeError, ValueError):
        tw, th = float(tile_w or 0), float(tile_h or 0)
    if len(down):
        ds = float(np.median(down))
    else:  # no tile was stored: the downsample the run's tiling implies
        ds = 1.0
        mpp, level, levels = tiling.get("mpp"), tiling.get("level"), meta.get("levels") or []
        try:
            if mpp is not None and meta.get("mpp"):
                ds = _pair(mpp)[0] / float(meta["mpp"][0])
            elif level is not None and 0 <= int(level) < len(levels):
                ds = float(levels[int(level)]["downsample"])
        except (TypeError, ValueError, KeyError, IndexError):
            ds = 1.0
    return tw * ds, th * ds


def _label_values(h5, name):
    """The label ``name`` of every tile (None where a tile has none)."""
    if name not in h5.tile_label_names:
        raise H5PathError(f"{h5.path}: no tile label {name!r}; the tiles have "
                          f"{h5.tile_label_names or 'no labels'}")
    src = h5._s()
    if hasattr(src, "_label_columns"):
        col, kind = src._label_columns()[name]
        col = np.asarray(col[()])
        if kind == "str":
            return [None if v in ("", b"") else (v.decode() if isinstance(v, bytes) else str(v)) for v in col]
        out = []
        for v in col:
            if isinstance(v, (float, np.floating)) and math.isnan(v):
                out.append(None)
            else:
                out.append(bool(v) if kind == "bool" else float(v))
        return out
    out = []  # (PathML's files) the same kinds as the columns of ours: numbers as float, booleans as bool
    for i in range(len(h5)):
        v = h5.tile(i).labels.get(name)
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, bytes):
            v = v.decode(errors="replace")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = None if isinstance(v, float) and math.isnan(v) else float(v)
        out.append(v)
    return out


def _instances(h5, name):
    """Per tile: the (x, y) centroids, in the tile's pixels, of the objects of tile mask ``name``."""
    if name not in h5.tile_mask_names:
        raise H5PathError(f"{h5.path}: no tile mask {name!r}; the tiles have {h5.tile_mask_names or 'no masks'}")
    src = h5._s()
    ds = src._tile_masks[name][0] if hasattr(src, "_tile_masks") else None
    for i in range(len(h5)):
        inst = np.asarray(ds[i]) if ds is not None else h5.tile(i).masks[name]
        ys, xs = np.nonzero(inst)
        if not len(xs):
            yield np.zeros((0, 2))
            continue
        lab = inst[ys, xs]
        order = np.argsort(lab, kind="stable")
        lab, xs, ys = lab[order], xs[order], ys[order]
        starts = np.r_[0, np.flatnonzero(np.diff(lab)) + 1]
        n = np.diff(np.r_[starts, len(lab)])
        yield np.c_[np.add.reduceat(xs, starts) / n, np.add.reduceat(ys, starts) / n]


def _legend(width, name, numeric, lo, hi, classes):
    """A strip under the picture that says what the tile colours mean."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if numeric:  # wide enough for its text and an 80 px colour bar, however narrow the picture (a tall, narrow
        # slide's picture can be 14 px wide: its legend was a clipped "sc")
        need = 6 + int(probe.textlength(f"{name}: {lo:.4g}", font=font)) + 12 + 80 + 6 + \
            int(probe.textlength(f"{hi:.4g}", font=font)) + 6
    else:
        first = str(classes[0]) if classes else ""
        need = 6 + int(probe.textlength(f"{name}:", font=font)) + 8 + 14 + int(probe.textlength(first, font=font)) + 40
    width = max(int(width), need)
    strip = Image.new("RGB", (width, 22), (255, 255, 255))
    d = ImageDraw.Draw(strip)
    if numeric:
        left = f"{name}: {lo:.4g}"
        x = 6 + int(d.textlength(left, font=font)) + 6
        bar = max(20, min(200, width - x - 60))
        d.text((6, 5), left, fill=(0, 0, 0), font=font)
        colours = ramp(np.linspace(0, 1, bar))
        for j in range(bar):
            d.line([(x + j, 5), (x + j, 16)], fill=tuple(int(c) for c in colours[j]))
        d.text((x + bar + 6, 5), f"{hi:.4g}", fill=(0, 0, 0), font=font)
    else:
        palette = class_colours(len(classes))
        x = 6
        d.text((x, 5), f"{name}:", fill=(0, 0, 0), font=font)
        x += int(d.textlength(f"{name}:", font=font)) + 8
        for k, c in enumerate(classes):
            if x > width - 30:
                d.text((x, 5), "...", fill=(0, 0, 0), font=font)
                break
            d.rectangle([x, 6, x + 10, 16], fill=palette[k])
            d.text((x + 14, 5), str(c), fill=(0, 0, 0), font=font)
            x += 14 + int(d.textlength(str(c), font=font)) + 10
    return np.asarray(strip)


def overview(store, size: int = 1024, *, label: str | None = None, instances: str | None = None,
             background: str = "auto", slide=None) -> np.ndarray:
    """A picture of an h5path file: its slide, slide masks, tiles, a tile label and nuclei (see the module).

    Parameters
    ----------
    store : str or H5Path
        The h5path file (or an open :class:`H5Path`).
    size : int
        Longer side of the picture, in pixels (at most the slide's: it is not enlarged).
    label : str, optional
        A tile label to colour the tiles by: numbers on a scale from their minimum (dark blue) to their
        maximum (yellow), other values (classes, booleans) in a palette; a legend goes below the picture.
    instances : str, optional
        A per-tile instance mask (e.g. ``"nuclei"``) whose objects are drawn as dots at their centroids.
    background : {"auto", "slide", "tiles"}
        Draw over a thumbnail of the slide (``"slide"``: the file's ``source_path``, or ``slide``), over the
        stored tiles put back together (``"tiles"``), or the slide when it opens and the tiles hold its channels,
        else the tiles (``"auto"``: a run through ``VirtualHE`` is drawn over its RGB tiles).
    slide : str, SlideData or reader, optional
        The slide to draw over, when it is not (or no longer) at the file's ``source_path``.

    Returns
    -------
    numpy.ndarray
        RGB uint8 ``(h, w, 3)`` (taller by a legend strip with ``label``). Save it with
        :func:`histoflow.utils.save_png`, or show it (``PIL.Image.fromarray``).
    """
    from PIL import Image, ImageDraw

    from . import read_h5path

    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ParameterError(f"overview: size must be a whole number of pixels >= 16, not {size!r}")
    if not hasattr(store, "coords"):
        with read_h5path(store) as h5:
            return overview(h5, size, label=label, instances=instances, background=background, slide=slide)
    h5 = store
    meta = h5.slide
    if not meta.get("width") or not meta.get("height"):
        raise H5PathError(f"{h5.path}: the file does not say the slide's size; no picture can be drawn")
    W, H = int(meta["width"]), int(meta["height"])
    size = min(int(size), max(W, H))  # a picture never enlarges the slide (as a slide's thumbnail)
    values = _label_values(h5, label) if label is not None else None  # errors before any drawing
    centroids = _instances(h5, instances) if instances is not None else None
    if centroids is not None:
        centroids = list(centroids)
    thumb, _ = _background(h5, int(size), background, slide)
    th, tw = thumb.shape[:2]
    sx, sy = tw / W, th / H
    pic = thumb[..., :3].copy()

    for k, name in enumerate(h5.masks):  # slide masks: outlines
        view, down = _mask_view(h5, name, tw)
        pic[mask_outline(view, (tw, th), down, (W, H))] = MASK_COLOURS[k % len(MASK_COLOURS)]

    coords, down, (tile_h, tile_w) = _geometry(h5)
    step, edge = _steps(coords), _edge_mode(h5)
    inset = _core_inset(coords, down, tile_w, tile_h, step)
    im = Image.fromarray(pic)
    fill = Image.new("RGBA", im.size, (0, 0, 0, 0))
    draw_fill = ImageDraw.Draw(fill)
    legend = None
    if values is not None:
        known = [v for v in values if v is not None]
        numeric = bool(known) and all(isinstance(v, float) for v in known)
        if numeric:
            finite = [v for v in known if math.isfinite(v)] or [0.0]  # (an infinite value takes an end's colour)
            lo, hi = float(min(finite)), float(max(finite))
            span = hi - lo
            colours = ramp(np.array([np.nan if v is None or math.isnan(v) else
                                     (min(max((v - lo) / span, 0.0), 1.0) if span else 0.5) for v in values]))
            classes = []
        else:
            lo = hi = 0.0
            classes = sorted({str(v) for v in known})
            palette = class_colours(len(classes))
            index = {c: k for k, c in enumerate(classes)}
            colours = [None if v is None else palette[index[str(v)]] for v in values]
        legend = _legend(tw, label, numeric, lo, hi, classes)
    rects = []
    for i, ((x, y), ds) in enumerate(zip(coords, down)):
        # the tile's own part: without the half-overlap it shares with each neighbour
        x0, y0, x1, y1 = _core_box(x, y, ds, tile_w, tile_h, inset, step, (W, H), edge)
        x0, y0, x1, y1 = x0 * sx, y0 * sy, x1 * sx, y1 * sy
        rects.append((x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)))
        if values is not None and values[i] is not None:
            c = tuple(int(v) for v in colours[i])
            draw_fill.rectangle(rects[-1], fill=c + (110,))
    im = Image.alpha_composite(im.convert("RGBA"), fill).convert("RGB")
    draw = ImageDraw.Draw(im)
    for r in rects:
        draw.rectangle(r, outline=TILE_COLOUR)
    for rec in h5.provenance:  # tiles a run skipped after a failure
        failed = rec.get("failed_tiles") if isinstance(rec, dict) else None
        if not failed:
            continue
        fw, fh = _failed_size(rec, meta, down, tile_w, tile_h)
        for f in failed:
            try:
                x, y = float(f["x"]), float(f["y"])
            except (TypeError, KeyError, ValueError):
                continue
            draw.rectangle([x * sx, y * sy, max(x * sx, (x + fw) * sx - 1), max(y * sy, (y + fh) * sy - 1)],
                           outline=FAILED_COLOUR, width=2)
    if centroids is not None:
        for (x, y), ds, pts in zip(coords, down, centroids):
            for px, py in zip((x + pts[:, 0] * ds) * sx, (y + pts[:, 1] * ds) * sy):
                draw.ellipse([px - 1.5, py - 1.5, px + 1.5, py + 1.5], fill=INSTANCE_COLOUR)
    out = np.asarray(im)
    if legend is None:
        return out
    if legend.shape[1] > out.shape[1]:  # a narrow picture: white beside it, the width of its legend
        out = np.concatenate([out, np.full((out.shape[0], legend.shape[1] - out.shape[1], 3), 255, np.uint8)], 1)
    return np.concatenate([out, legend], axis=0)

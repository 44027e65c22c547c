"""Slide-level inference through the engine, and assembling tile results into slide-sized outputs.

* :func:`infer_slide` runs a model transform (:class:`~histoflow.ml.transforms.PatchClassification`,
  :class:`~histoflow.ml.transforms.SemanticSegmentation`, :class:`~histoflow.ml.transforms.NucleusSegmentation`)
  over a slide with :meth:`SlideData.run <histoflow.core.slide.SlideData.run>` (in-process, threads or
  dask): heatmaps and stitched masks land in the slide's h5path as slide masks.
* :func:`assemble_instances` turns the per-tile instance masks of an h5path (each nucleus kept by the
  one tile that owns its centroid) into one slide-sized label image with slide-wide ids.
"""
from __future__ import annotations

import numpy as np

from ..errors import H5PathError, RegionTooLargeError

__all__ = ["assemble_instances", "InstanceRows", "infer_slide", "cells_to_geojson"]

#: largest label image assemble_instances builds in memory (uint32/int32 pixels)
MAX_ASSEMBLY_PIXELS = 2_000_000_000


#: fewest pixels of a tile's object left free by the objects of earlier tiles for it to be kept (see
#: :func:`assemble_instances`; the nucleus models' post-processing drops objects under 10 px too)
MIN_FREE_PIXELS = 10


def assemble_instances(store, mask: str = "nuclei", shape=None, max_pixels: int = MAX_ASSEMBLY_PIXELS):
    """One label image (int32, 0 = background) from the per-tile instance masks of an h5path.

    Parameters
    ----------
    store : str or H5Path
        An h5path file (or an open reader) whose tiles carry the instance mask ``mask``.
    shape : (height, width), optional
        Output shape at the tiles' resolution; default: the slide's level-0 size divided by the tiles'
        downsample (from the file's slide metadata), else the tiles' extent.
    max_pixels : int
        Largest image built in memory; for larger slides use :class:`InstanceRows`, which streams the same
        labels a band of rows at a time (``histoflow segment-nuclei`` writes its TIFF that way).

    Tiles are placed in row-major order of their positions. Each tile's objects get ids after those of the
    tiles before it (1..n over the slide, in that order). Where objects of two tiles overlap (only in tile
    overlaps: the same nucleus outlined a little differently by both), the pixel keeps the first; an object of
    a later tile with less than half of its pixels, or fewer than ``MIN_FREE_PIXELS``, left free of the objects
    already placed is dropped as their duplicate, so that no sliver of it stays behind as an object of its
    own; an object kept in part keeps the largest connected piece of its free pixels (one object, one outline).
    """
    rows = InstanceRows(store, mask, shape)
    with rows:
        H, W = rows.shape
        if H * W > max_pixels:
            raise RegionTooLargeError(f"{rows.path}: a {W} x {H} label image would take {H * W * 4 / 2**30:.1f} "
                                      "GiB; raise max_pixels, or stream it with histoflow.ml.infer.InstanceRows")
        out = np.zeros((H, W), np.int32)
        for r0, block in rows:
            out[r0:r0 + len(block)] = block
    return out


class InstanceRows:
    """The slide-wide label image of :func:`assemble_instances`, streamed: iterating gives ``(row, block)``
    pairs, ``block`` the int32 labels of rows ``row .. row + len(block) - 1`` (full width), in order from row 0
    to the last, each row once. Memory holds about one row of tiles (``width x tile height`` labels), whatever
    the slide's size.

    ``on_objects(labels, x, y)``, when given, is called once per tile that places objects, with the tile's
    window of final labels holding only the objects it placed (0 elsewhere) and the window's position (x, y)
    in output pixels: the objects are whole then (a later tile never adds to them), e.g. to outline them.
    After the iteration, ``count`` is the number of objects.
    """

    def __init__(self, store, mask: str = "nuclei", shape=None, on_objects=None):
        from ..store import read_h5path

        self._own = isinstance(store, str) or hasattr(store, "__fspath__")
        self._h = read_h5path(store) if self._own else store
        h = self._h
        self.path = getattr(h, "path", store)
        self.mask = mask
        self.on_objects = on_objects
        self.count = 0
        try:
            if mask not in h.tile_mask_names:
                raise H5PathError(f"{self.path}: tiles have no mask {mask!r} (they have {sorted(h.tile_mask_names)})")
            if len(h) == 0:
                raise H5PathError(f"{self.path}: no tiles")
            first = h.tile(0)
            self.downsample = ds = float(first.downsample)
            if shape is None:
                meta = h.slide or {}
                from .transforms import level_size

                own = level_size(meta.get("levels"), ds)  # a level's own size (one pixel less than ceil, at times)
                if own is not None:
                    shape = (own[1], own[0])
                elif meta.get("width") and meta.get("height"):
                    shape = (int(np.ceil(meta["height"] / ds)), int(np.ceil(meta["width"] / ds)))
                else:
                    coords = np.asarray(h.coords)
                    th, tw = first.image.shape[:2]
                    shape = (int(coords[:, 1].max() / ds) + th, int(coords[:, 0].max() / ds) + tw)
            self.shape = (int(shape[0]), int(shape[1]))
        except BaseException:
            self.close()
            raise

    def close(self):
        if self._own:
            self._h.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        h, mask, ds = self._h, self.mask, self.downsample
        H, W = self.shape
        xy = np.rint(np.asarray(h.coords, dtype=np.float64).reshape(-1, 2) / ds).astype(np.int64)
        order = np.lexsort((xy[:, 0], xy[:, 1]))  # by row, then column
        buf = np.zeros((0, W), np.int32)  # output rows done .. done + len(buf) - 1, not final yet
        done = 0
        next_id = 1
        for i in order:
            x0, y0 = int(xy[i, 0]), int(xy[i, 1])
            if y0 > done:  # the rows above this tile are final: no later tile (sorted by row) reaches them
                upto = min(y0, H)
                if upto > done:
                    block, buf = _take_rows(buf, upto - done, W)
                    yield done, block
                    done = upto
            if y0 >= H or x0 >= W:
                continue
            lab = np.asarray(h.tile(int(i)).masks[mask])
            m = int(lab.max()) if lab.size else 0
            if m == 0:
                continue
            hh, ww = min(lab.shape[0], H - y0), min(lab.shape[1], W - x0)
            lab = lab[:hh, :ww]
            if len(buf) < y0 + hh - done:
                buf = np.vstack([buf, np.zeros((y0 + hh - done - len(buf), W), np.int32)])
            win = buf[y0 - done:y0 - done + hh, x0:x0 + ww]
            put = _free_pixels(lab, win, m)
            ids = np.unique(lab[put])
            ids = ids[ids > 0]
            if not len(ids):
                continue
            lut = np.zeros(m + 1, np.int32)
            lut[ids] = np.arange(next_id, next_id + len(ids), dtype=np.int32)
            new = np.where(put, lut[lab.astype(np.int64)], 0).astype(np.int32)
            win[put] = new[put]
            next_id += len(ids)
            self.count = next_id - 1  # as it goes: a consumer may stop once it has the last row it needs
            if self.on_objects is not None:
                self.on_objects(new, x0, y0)
        while done < H:
            block, buf = _take_rows(buf, H - done, W)
            yield done, block
            done = H
        self.count = next_id - 1


def _take_rows(buf, k, width):
    """The first ``k`` rows of ``buf`` (zeros below its end) and what is left of it."""
    if len(buf) >= k:
        return buf[:k], buf[k:]
    return np.vstack([buf, np.zeros((k - len(buf), width), np.int32)]), buf[len(buf):]


def _free_pixels(lab, win, m):
    """Where a tile's objects ``lab`` (ids 1..m) are placed in ``win`` (the output under the tile, objects of
    earlier tiles there): see :func:`assemble_instances`."""
    fg = lab > 0
    put = fg & (win == 0)
    if (fg & (win != 0)).any():  # some of them meet objects already placed
        area = np.bincount(lab[fg].astype(np.int64), minlength=m + 1)
        free = np.bincount(lab[put].astype(np.int64), minlength=m + 1)
        meets = np.bincount(lab[fg & (win != 0)].astype(np.int64), minlength=m + 1) > 0
        # objects that meet none keep every pixel, whatever their size; the others need most of theirs free
        keep = ~meets | ((2 * free >= area) & (free >= MIN_FREE_PIXELS))
        put &= keep[lab.astype(np.int64)]
        for obj in np.flatnonzero(keep & (free < area)):  # placed in part: its free pixels in one piece
            mine = lab == obj
            piece = _largest_piece(put, mine)
            if 2 * piece < area[obj] or piece < MIN_FREE_PIXELS:  # the piece itself too small: a duplicate
                put &= ~mine
    return put


def _largest_piece(put, obj):
    """Clear from ``put`` all but the largest 8-connected piece of ``put & obj`` (an object whose free pixels
    fell apart around the objects placed before it: the small pieces would be slivers, outlined as objects
    of their own); returns that piece's size."""
    from scipy import ndimage as ndi

    rows, cols = np.nonzero(obj)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    part = put[box] & obj[box]
    pieces, n = ndi.label(part, structure=np.ones((3, 3), bool))
    if n <= 1:
        return int(part.sum())
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    put[box] &= ~(part & (pieces != int(sizes.argmax())))
    return int(sizes.max())


def infer_slide(slide, transform, out, *, tile_size=512, overlap=64, level=None, mpp=None, tissue_filter=None,
                executor="inprocess", workers=None, **run_kwargs) -> str:
    """Run one model transform over a slide; returns the h5path written.

    ``slide`` is a path or a :class:`~histoflow.core.slide.SlideData`. Heatmaps (patch classifiers) and
    stitched masks (segmentation) are stored as slide masks of the h5path; nucleus instances stay per
    tile (use :func:`assemble_instances`).
    """
    from ..core.slide import SlideData

    sd = slide if isinstance(slide, SlideData) else SlideData(slide)
    return sd.run(transform, out, tile_size=tile_size, overlap=overlap, level=level, mpp=mpp,
                  tissue_filter=tissue_filter, executor=executor, workers=workers, **run_kwargs)


def cells_to_geojson(store, out, adata=None, mask: str = "cells", classes_key: str = "phenotype",
                     object_type: str = "cell", nucleus_mask: str | None = "nuclei") -> int:
    """Write the cells of an h5path as QuPath GeoJSON: outlines from the per-tile instance masks, classes
    and measurements from the cell table.

    Parameters
    ----------
    store : str
        The h5path written by a run with ``QuantifyCells`` (its tiles carry ``mask``).
    adata : AnnData, optional
        The cell table (default: the store's own ``/cells``), e.g. after ``histoflow phenotype``. Its rows are
        matched to the store's cells by name (``obs_names``), in any order, where the store has its own table;
        otherwise they must be in the store's order.
        ``obs[classes_key]`` becomes each cell's classification when present.

    Each cell carries its numeric ``obs`` columns (morphology ...) and its mean intensity per channel
    (``"<channel>: mean"``) as QuPath measurements, and its nucleus outline (QuPath's ``nucleusGeometry``)
    from the tiles' ``nucleus_mask`` when they have it (``SegmentCells`` writes cells and nuclei with the same
    ids; None leaves nuclei out).

    Returns the number of cells written.
    """
    from ..annotations import polygonize, write_geojson
    from ..store import read_h5path

    with read_h5path(store) as h:
        table = adata if adata is not None else h.cells
        if table is None:
            raise H5PathError(f"{store}: no cell table; run QuantifyCells, or pass adata")
        if mask not in h.tile_mask_names:
            raise H5PathError(f"{store}: tiles have no mask {mask!r} (they have {sorted(h.tile_mask_names)})")
        with_nuclei = nucleus_mask is not None and nucleus_mask in h.tile_mask_names
        numeric = [c for c in table.obs.columns if table.obs[c].dtype.kind in "fiu"]
        classes = colours = None
        if classes_key in table.obs:
            column = table.obs[classes_key]
            classes = column.astype(str).to_numpy()
            from ..cells.rules import phenotype_colours

            # the colours of the picture, by the classes' order (a rule table's), not by which cell comes first
            colours = phenotype_colours(column.cat.categories if hasattr(column, "cat") else sorted(set(classes)))
        X = np.asarray(table.X)
        channels = list(table.var_names)
        # the table's row of each of the store's cells, by name where the store has its own table (a table
        # given in another order, sorted or rebuilt, gave every outline another cell's name and values)
        order = None
        own = h.cells if adata is not None else None
        if own is not None:
            where = {str(n): k for k, n in enumerate(table.obs_names)}
            missing = [str(n) for n in own.obs_names if str(n) not in where]
            if missing or own.n_obs != table.n_obs:
                raise H5PathError(f"{store}: the cell table does not hold the store's cells "
                                  f"({'e.g. ' + missing[0] + ' is not in it' if missing else f'{table.n_obs} rows for {own.n_obs} cells'}); "
                                  "is it the table of this file?")
            order = np.array([where[str(n)] for n in own.obs_names], np.int64)
        polys, row = [], 0
        for i in range(len(h)):
            t = h.tile(i)
            lab = np.asarray(t.masks[mask])
            n = int(lab.max()) if lab.size else 0
            if n == 0:
                continue
            if row + n > table.n_obs:
                raise H5PathError(f"{store}: the cell table has {table.n_obs} rows but the tiles hold more cells; "
                                  "is it the table of this file?")
            nuclei = {}
            if with_nuclei:  # each cell's nucleus: the largest piece of the same id in the nucleus mask
                for q in polygonize(np.asarray(t.masks[nucleus_mask]), downsample=float(t.downsample),
                                    origin=t.coords):
                    if q.name not in nuclei or q.area > nuclei[q.name].area:
                        nuclei[q.name] = q
            for p in polygonize(lab, downsample=float(t.downsample), origin=t.coords):
                nucleus = nuclei.pop(p.name, None)  # on the cell's first piece
                if nucleus is not None:
                    p.nucleus = nucleus.exterior
                k = row + int(p.name) - 1
                if order is not None:
                    k = int(order[k])
                p.name = str(table.obs_names[k])
                if p.group is not None:  # pieces of one cell: grouped by the cell, not by the tile's own label
                    p.group = p.name
                if classes is not None:
                    p.classification = classes[k]
                    p.color = colours.get(classes[k])
                p.measurements = {c: float(table.obs[c].iloc[k]) for c in numeric}
                p.measurements.update({f"{ch}: mean": float(X[k, j]) for j, ch in enumerate(channels)})
                polys.append(p)
            row += n
        if row != table.n_obs:
            raise H5PathError(f"{store}: the tiles hold {row} cells, the cell table {table.n_obs}")
    write_geojson(polys, out, object_type=object_type)
    return row

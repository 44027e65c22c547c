"""MoNuSeg 2018 (Kumar et al., IEEE TMI 2017): H&E images of 1000 x 1000 px at 40x with every nucleus
outlined in Aperio XML.

Put the images and annotations in one folder as ``<ID>.png`` (or ``.tif``) + ``<ID>.xml`` (the official
"MoNuSeg 2018 Training Data" zip, unpacked with Tissue Images and Annotations together); this module
never downloads anything. Licence of the data: CC BY-NC-SA 4.0 (non-commercial, share-alike); models
trained on it inherit those terms.
"""
from __future__ import annotations

import os

import numpy as np

from ..annotations import AnnotationError, rasterize, read_aperio_xml
from ..annotations.aperio import aperio_mpp
from ..errors import DatasetError

__all__ = ["MONUSEG_MPP", "DatasetError", "monuseg_ids", "load_monuseg"]

#: the images are 40x Aperio scans; files that lack MicronsPerPixel are taken to be this
MONUSEG_MPP = 0.2527
_IMAGE_EXTS = (".png", ".tif", ".tiff")


def _where(root):
    return (f"put the MoNuSeg images and their Aperio XML annotations (<ID>.png or <ID>.tif with <ID>.xml) "
            f"in {os.path.abspath(root)}")


def monuseg_ids(root) -> list[str]:
    """The ids (file stems) that have both an image and an XML annotation in ``root``, sorted."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: no such folder; {_where(root)}")
    names = os.listdir(root)
    xml = {os.path.splitext(n)[0] for n in names if n.lower().endswith(".xml")}
    img = {os.path.splitext(n)[0] for n in names if n.lower().endswith(_IMAGE_EXTS)}
    ids = sorted(xml & img)
    if not ids:
        raise DatasetError(f"{root}: no image with a matching .xml annotation; {_where(root)}")
    return ids


def _image_path(root, ident):
    for name in sorted(os.listdir(root)):  # any case of the extension, as monuseg_ids lists them
        stem, ext = os.path.splitext(name)
        if stem == ident and ext.lower() in _IMAGE_EXTS and os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise DatasetError(f"{root}: no image file for {ident}; {_where(root)}")


def load_monuseg(root, ids=None, mpp: float | None = None) -> list[dict]:
    """Load images and instance masks.

    Returns a list of dicts ``{"id", "image": uint8 (H, W, 3), "instances": int32 (H, W), "mpp"}``,
    one per id (all ids in ``root`` when ``ids`` is None). Nuclei are numbered 1..n in file order;
    where outlines overlap the later one wins.

    ``mpp`` resamples each image to that pixel size (e.g. 0.5 for 20x; area averaging when shrinking)
    and paints the outlines directly at it (no resampling of the label image); the ``"mpp"`` returned is
    the resampled image's true pixel size (its whole number of pixels makes it differ from ``mpp`` by up to
    half a pixel over the image's width: 0.07 % for 1000 px at 0.5 µm/px).
    """
    from PIL import Image

    root = os.fspath(root)
    try:
        ok = mpp is None or float(mpp) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DatasetError(f"{root}: mpp must be a positive pixel size in µm, got {mpp!r}")
    if isinstance(ids, str):
        ids = [ids]  # one id, not its characters
    known = monuseg_ids(root)
    ids = known if ids is None else list(ids)
    missing = [i for i in ids if i not in known]
    if missing:
        raise DatasetError(f"{root}: no image + annotation for {missing}; {_where(root)}")
    out = []
    for ident in ids:
        path = _image_path(root, ident)
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated files
            raise DatasetError(f"{path}: not a readable image ({type(e).__name__}: {e}); {_where(root)}") from None
        xml = next(os.path.join(root, n) for n in sorted(os.listdir(root))
                   if os.path.splitext(n)[0] == ident and n.lower().endswith(".xml"))
        try:
            # MoNuSeg has no exclusion regions: a region flagged negative is a nucleus like the rest
            # (TCGA-XS-A8TJ flags 20, none inside another)
            polys = read_aperio_xml(xml, negatives="keep")
            own_mpp = aperio_mpp(xml) or MONUSEG_MPP
        except AnnotationError as e:
            raise DatasetError(f"{e}; {_where(root)}") from None
        if mpp is None or abs(float(mpp) / own_mpp - 1) < 1e-3:
            inst = rasterize(polys, image.shape[:2])
            out.append({"id": ident, "image": image, "instances": inst, "mpp": own_mpp})
            continue
        import cv2

        ds = float(mpp) / own_mpp
        h0, w0 = image.shape[:2]
        h, w = max(1, round(h0 / ds)), max(1, round(w0 / ds))
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if ds > 1 else cv2.INTER_LINEAR)
        # the whole pixels of the resized image set its true scale (w0 / w, not ds): the outlines go on that
        # grid, and the pixel size reported is the true one (within 0.1 % of mpp for 1000 px images)
        inst = rasterize(polys, (h, w), downsample=(w0 / w, h0 / h))
        out.append({"id": ident, "image": np.ascontiguousarray(image), "instances": inst,
                    "mpp": own_mpp * w0 / w})
    return out

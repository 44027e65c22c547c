"""The DICOM backend on real files: wsidicom folders, the tolerant single-file reader, damaged copies.

Expected values come from the data catalog (wsidicom and pydicom as readers of truth) and from frames
decoded independently of histoflow (pydicom's frame splitter + imagecodecs, and pydicom's pixel_array).
Derived files (TILED_SPARSE, split fragments, uncompressed) are written with pydicom from the real frames.
"""
import os
import pickle
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor

import imagecodecs
import numpy as np
import pydicom
import pytest
from datafiles import data_path
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from histoflow import SlideNotFoundError, SlideReadError, TileDecodeError, UnsupportedFormatError, open_slide

WSIC = ["wsi/dicom_wsic/CMU-1-Small-Region/", "wsi/dicom_wsic/CMU-1-Small-Region-J2K/"]
SMALL = "wsi/dicom_pathml/small_dicom.dcm"
SMALL_PATH = data_path(SMALL)
FRAME = 500  # small_dicom.dcm: 3236 x 2638 in 7 x 6 frames of 500 x 500
ACROSS, DOWN = 7, 6


def _quiet_read(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # over-long UIDs in the TCGA conversion
        return pydicom.dcmread(path, **kwargs)


@pytest.fixture(scope="module")
def small_frames():
    """The 42 encoded frames of small_dicom.dcm, split by pydicom."""
    ds = _quiet_read(SMALL_PATH)
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


@pytest.fixture(scope="module")
def small_mosaic(small_frames):
    """small_dicom.dcm's pixel matrix assembled from frames decoded by imagecodecs directly. Its frames run down
    the columns (the file does not say how they are organised; in rows, the slide is scrambled)."""
    full = np.zeros((DOWN * FRAME, ACROSS * FRAME, 3), np.uint8)
    for i, frame in enumerate(small_frames):
        column, row = divmod(i, DOWN)
        full[row * FRAME:(row + 1) * FRAME, column * FRAME:(column + 1) * FRAME] = imagecodecs.jpeg8_decode(frame)
    return full[:2638, :3236]


def _write_like_small(path, frames, *, sparse_positions=None, has_bot=True, fragments_per_frame=1,
                      native=None, grid=None, image_type=None, spacing_mm=None, organisation=None):
    """Write a variant of small_dicom.dcm: its header with other frames, organisation or encoding.

    ``native`` is an uncompressed ``(frames, rows, columns, 3)`` array; ``grid`` = (tile size, tiles
    across, tiles down) overrides the frame and matrix sizes; ``spacing_mm`` is DICOM PixelSpacing
    (row spacing, column spacing) in mm.
    """
    ds = _quiet_read(SMALL_PATH, stop_before_pixels=True)
    if organisation is not None:
        ds.DimensionOrganizationType = organisation
    if sparse_positions is not None:
        ds.DimensionOrganizationType = "TILED_SPARSE"
        items = []
        for column, row in sparse_positions:
            position = Dataset()
            position.ColumnPositionInTotalImagePixelMatrix = column * FRAME + 1
            position.RowPositionInTotalImagePixelMatrix = row * FRAME + 1
            item = Dataset()
            item.PlanePositionSlideSequence = Sequence([position])
            items.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(items)
    if grid is not None:
        size, across, down = grid
        ds.Rows = ds.Columns = size
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = size * across, size * down
    if image_type is not None:
        ds.ImageType = image_type
    if spacing_mm is not None:
        measures = Dataset()
        measures.PixelSpacing = list(spacing_mm)
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
    if native is not None:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.NumberOfFrames = len(native)
        ds.PixelData = native.tobytes()
    else:
        ds.NumberOfFrames = len(frames)
        ds.PixelData = encapsulate(frames, fragments_per_frame=fragments_per_frame, has_bot=has_bot)
        ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return str(path)


def _bare_rgb_jpeg(tile):
    """A JPEG of untransformed RGB samples with neither JFIF nor Adobe marker and component ids 1, 2, 3.

    libjpeg takes such a stream for YCbCr; DICOM's 'RGB' photometric interpretation says it is not.
    """
    data = bytearray(imagecodecs.jpeg8_encode(tile, level=95, colorspace="RGB", outcolorspace="RGB"))
    position = 2
    while data[position + 1] != 0xDA:
        marker, length = data[position + 1], int.from_bytes(data[position + 2:position + 4], "big")
        if marker == 0xEE:  # drop the Adobe segment
            del data[position:position + 2 + length]
            continue
        if marker == 0xC0:  # SOF0: component ids
            for k in range(3):
                data[position + 10 + 3 * k] = k + 1
        position += 2 + length
    for k in range(3):  # SOS: component ids
        data[position + 5 + 2 * k] = k + 1
    return bytes(data)


# ---------------------------------------------------------------------- wsidicom folders
@pytest.mark.parametrize("name", WSIC)
@pytest.mark.parametrize("backend", ["auto", "dicom"])
def test_wsic_folder(name, backend, catalog):
    truth = catalog[name]
    with open_slide(data_path(name), backend=backend) as slide:
        assert slide.backend == "dicom" and slide.format == "DICOM WSI"
        assert slide.dimensions == (truth["width"], truth["height"]) == (2220, 2967)
        assert slide.level_count == truth["levels"]
        assert slide.mpp == pytest.approx(tuple(truth["mpp"]), abs=1e-3)
        assert slide.channels == truth["channels"] == 3
        assert slide.channel_names == ["R", "G", "B"] and slide.brightfield
        assert slide.dtype == np.uint8
        assert slide.warnings == [] and slide.properties["dicom.reader"] == "wsidicom"
        region = slide.read_region((1000, 1000), 0, (256, 256))
        assert region.shape == (256, 256, 3) and region.dtype == np.uint8 and region.flags.c_contiguous
        mean = region.reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(mean, truth["region_x1000_y1000_256"]["mean"], atol=1.5)
        np.testing.assert_allclose(mean, [150.598, 104.14, 143.919], atol=1.5)


@pytest.mark.parametrize("name", WSIC)
def test_wsic_associated_images(name):
    """The label and overview of the J2K sample decode whole; in the JPEG sample their streams are short
    (463 x 387 and 431 x 1280 declared, decoders give 7 and 16 rows): an error naming the file and both sizes,
    not a sliver."""
    with open_slide(data_path(name)) as slide:
        assert {"label", "macro"} <= set(slide.associated_images)
        for key, (h, w) in (("label", (463, 387)), ("macro", (431, 1280))):
            if name.rstrip("/").endswith("J2K"):
                image = slide.associated_images[key]
                assert image.shape == (h, w, 3) and image.dtype == np.uint8 and image.std() > 5
            else:
                with pytest.raises(TileDecodeError, match=f"CMU-1-Small-Region/?: the {key} image decodes to {w} x "
                                                          fr"\d+ pixels, but the file declares {w} x {h}"):
                    slide.associated_images[key]


def test_wsic_pickle_round_trip():
    with open_slide(data_path(WSIC[0])) as slide:
        expected = slide.read_region((500, 700), 0, (300, 200))
        clone = pickle.loads(pickle.dumps(slide))
    with clone:
        np.testing.assert_array_equal(clone.read_region((500, 700), 0, (300, 200)), expected)


def test_wsic_single_volume_file():
    """One instance file (not the folder) opens with wsidicom too, without associated images."""
    folder = data_path(WSIC[0])
    volume = max((os.path.join(folder, f) for f in os.listdir(folder)), key=os.path.getsize)
    with open_slide(volume, backend="dicom") as single, open_slide(folder) as whole:
        assert single.warnings == [] and single.dimensions == whole.dimensions
        np.testing.assert_array_equal(single.read_region((1000, 1000), 0, (64, 64)),
                                      whole.read_region((1000, 1000), 0, (64, 64)))


def test_wsic_damaged_frame(tmp_path):
    """A garbage frame in a wsidicom-read slide is a TileDecodeError naming the folder and the tiles."""
    folder = tmp_path / "slide"
    shutil.copytree(data_path(WSIC[0]), folder)
    volume = max(folder.iterdir(), key=lambda p: p.stat().st_size)
    os.chmod(volume, 0o644)
    ds = _quiet_read(volume)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    data = bytearray(volume.read_bytes())
    start = data.find(frames[50])  # tile column 0, row 5 of a 10-tile-wide grid of 240 px tiles
    data[start:start + len(frames[50])] = bytes(len(frames[50]))
    volume.write_bytes(bytes(data))
    with open_slide(folder) as slide:
        slide.read_region((0, 0), 0, (100, 100))
        with pytest.raises(TileDecodeError, match=rf"{folder}: cannot decode a frame of .*columns 0-0, rows 5-5"):
            slide.read_region((10, 5 * 240 + 10), 0, (50, 50))


# ---------------------------------------------------------------------- tolerant single-file reader
def test_small_dicom_opens_with_tolerant_reader(catalog):
    truth = catalog[SMALL]
    for backend in ("auto", "dicom"):
        with open_slide(SMALL_PATH, backend=backend) as slide:
            assert slide.dimensions == (truth["width"], truth["height"]) == (3236, 2638)
            assert slide.level_count == 1 and slide.channels == 3 and slide.dtype == np.uint8
            assert slide.brightfield and slide.channel_names == ["R", "G", "B"]
            assert slide.mpp is None  # no PixelSpacing in the file
            assert "wsidicom refused it" in slide.warnings[0] and "tolerant DICOM reader" in slide.warnings[0]
            assert slide.properties["dicom.reader"] == "tolerant"
            assert slide.properties["dicom.TransferSyntaxUID"] == truth["transfer_syntax"]


def test_small_dicom_colours_are_he(small_mosaic):
    """Frames are YCbCr JPEG (JFIF) under a 'RGB' photometric: decoded to RGB, tissue is pink/purple."""
    with open_slide(SMALL_PATH) as slide:
        region = slide.read_region((1000, 1000), 0, (1000, 1000)).reshape(-1, 3).astype(float)
    tissue = region[region.min(axis=1) < 200]
    assert len(tissue) > 1000
    r, g, b = tissue.mean(axis=0)
    assert r > g + 10 and b > g


def test_small_dicom_region_across_frames(small_mosaic):
    """A region over four frames equals the same pixels of independently decoded frames."""
    with open_slide(SMALL_PATH) as slide:
        region = slide.read_region((450, 450), 0, (100, 100))
        assert region.shape == (100, 100, 3) and region.flags.c_contiguous and region.flags.writeable
        np.testing.assert_array_equal(region, small_mosaic[450:550, 450:550])
        whole = slide.read_level(0)
    np.testing.assert_array_equal(whole, small_mosaic)
    # pydicom's own decoder (pylibjpeg or Pillow) rounds differently in a few pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom notes the JFIF marker under 'RGB'
        frames = _quiet_read(SMALL_PATH).pixel_array  # (42, 500, 500, 3)
    # frames down the columns: (column 0, row 1) is frame 1, (column 1, row 0) frame DOWN
    expected = np.concatenate([np.concatenate([frames[0][450:, 450:], frames[DOWN][450:, :50]], axis=1),
                               np.concatenate([frames[1][:50, 450:], frames[DOWN + 1][:50, :50]], axis=1)])
    diff = np.abs(region.astype(int) - expected)
    assert diff.max() <= 5 and diff.mean() < 0.5


def test_frames_of_no_stated_order_are_placed_by_their_edges(tmp_path, small_frames, small_mosaic):
    """small_dicom.dcm says nothing of its frames' order and they run down the columns: read along the rows
    (TILED_FULL's order), its 500 px blocks were shuffled, with blocks of the black padding inside the tissue
    (12.6 % of the slide black). The order whose frame edges meet wins; a file that states TILED_FULL is read
    so, and frames of no stated order that do run along the rows are read along the rows."""
    def seams(img):
        v = [np.abs(img[:, x - 1].astype(int) - img[:, x].astype(int)).mean() for x in range(FRAME, 3236, FRAME)]
        h = [np.abs(img[y - 1].astype(int) - img[y].astype(int)).mean() for y in range(FRAME, 2638, FRAME)]
        return np.mean(v + h)

    with open_slide(SMALL_PATH) as slide:
        whole = slide.read_level(0)
        assert any("column by column" in w for w in slide.warnings)
    assert seams(whole) < 15 and (whole == 0).all(-1).mean() < 0.001  # before: 88 and 0.126
    by_rows = [small_frames[c * DOWN + r] for r in range(DOWN) for c in range(ACROSS)]
    with open_slide(_write_like_small(tmp_path / "rows.dcm", by_rows)) as slide:
        np.testing.assert_array_equal(slide.read_level(0), small_mosaic)
        assert any("as TILED_FULL (row by row)" in w for w in slide.warnings)
    with open_slide(_write_like_small(tmp_path / "stated.dcm", by_rows, organisation="TILED_FULL")) as slide:
        np.testing.assert_array_equal(slide.read_level(0), small_mosaic)
        assert not any("DimensionOrganizationType" in w for w in slide.warnings)
    with open_slide(_write_like_small(tmp_path / "wrong.dcm", small_frames, organisation="TILED_FULL")) as slide:
        assert seams(slide.read_level(0)) > 50  # the file's word is taken


def test_small_dicom_padding_is_white(small_mosaic):
    with open_slide(SMALL_PATH) as slide:
        region = slide.read_region((3236 - 40, 2638 - 30), 0, (100, 100))
    assert region.shape == (100, 100, 3)
    np.testing.assert_array_equal(region[:30, :40], small_mosaic[-30:, -40:])
    assert (region[30:] == 255).all() and (region[:, 40:] == 255).all()


def test_small_dicom_threaded_reads(small_mosaic):
    """Concurrent reads share one file descriptor through os.pread: same pixels as serial reads."""
    boxes = [(x, y) for x in range(0, 3000, 450) for y in range(0, 2400, 450)]
    with open_slide(SMALL_PATH) as slide, ThreadPoolExecutor(8) as pool:
        regions = list(pool.map(lambda xy: slide.read_region(xy, 0, (230, 230)), boxes))
    for (x, y), region in zip(boxes, regions):
        np.testing.assert_array_equal(region, small_mosaic[y:y + 230, x:x + 230])


def test_small_dicom_pickle_round_trip():
    with open_slide(SMALL_PATH) as slide:
        expected = slide.read_region((900, 1400), 0, (300, 300))
        clone = pickle.loads(pickle.dumps(slide))
    with clone:
        assert clone.warnings and clone.dimensions == (3236, 2638)
        np.testing.assert_array_equal(clone.read_region((900, 1400), 0, (300, 300)), expected)


def test_tiled_sparse_with_split_fragments(tmp_path, small_frames, small_mosaic):
    """TILED_SPARSE frames in shuffled order, two fragments each behind a basic offset table."""
    keep = [(column, row) for row in range(DOWN) for column in range(ACROSS) if (column + row) % 3]
    order = np.random.default_rng(1).permutation(len(keep))
    positions = [keep[i] for i in order]
    frames = [small_frames[column * DOWN + row] for column, row in positions]
    path = _write_like_small(tmp_path / "sparse.dcm", frames, sparse_positions=positions, fragments_per_frame=2)
    with open_slide(path) as slide:
        image = slide.read_level(0)
    for row in range(DOWN):
        for column in range(ACROSS):
            box = np.s_[row * FRAME:(row + 1) * FRAME, column * FRAME:(column + 1) * FRAME]
            if (column, row) in keep:
                np.testing.assert_array_equal(image[box], small_mosaic[box])
            else:
                assert (image[box] == 255).all()  # absent tile: white, as the slide is brightfield


@pytest.mark.parametrize("fragments_per_frame", [1, 3])
def test_fragments_without_offset_table(tmp_path, small_frames, small_mosaic, fragments_per_frame):
    """Without a basic offset table, split frames are told apart by their JPEG start-of-image markers."""
    path = _write_like_small(tmp_path / "nobot.dcm", small_frames, has_bot=False,
                             fragments_per_frame=fragments_per_frame)
    with open_slide(path) as slide:
        np.testing.assert_array_equal(slide.read_region((450, 950), 0, (600, 600)), small_mosaic[950:1550, 450:1050])


def test_uncompressed_pixel_data(tmp_path, small_mosaic):
    tiles = np.stack([small_mosaic[r * 64:(r + 1) * 64, 1000 + c * 64:1000 + (c + 1) * 64]
                      for r in range(2) for c in range(2)])
    path = _write_like_small(tmp_path / "native.dcm", None, native=np.ascontiguousarray(tiles), grid=(64, 2, 2),
                             spacing_mm=(0.0005, 0.00025))
    with open_slide(path) as slide:
        assert slide.dimensions == (128, 128)
        assert slide.mpp == pytest.approx((0.25, 0.5))  # x from the column spacing, µm
        np.testing.assert_array_equal(slide.read_level(0), small_mosaic[:128, 1000:1128])


def test_rgb_jpeg_without_colour_marker(tmp_path, small_mosaic):
    """Photometric 'RGB' and a JPEG with no JFIF/Adobe marker: samples are RGB, not converted from YCbCr."""
    source = np.ascontiguousarray(small_mosaic[1000:1128, 1000:1128])
    frames = [_bare_rgb_jpeg(np.ascontiguousarray(source[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64]))
              for r in range(2) for c in range(2)]
    naive = imagecodecs.jpeg8_decode(frames[0]).astype(int)  # libjpeg alone takes it for YCbCr
    assert np.abs(naive - source[:64, :64]).mean() > 20
    path = _write_like_small(tmp_path / "rgb.dcm", frames, grid=(64, 2, 2))
    with open_slide(path) as slide:
        image = slide.read_level(0)
    assert np.abs(image.astype(int) - source).mean() < 3


def test_folder_fallback_with_label(tmp_path, small_frames, small_mosaic):
    """A folder wsidicom refuses: the largest volume file is read, a LABEL file becomes "label"."""
    shutil.copy(SMALL_PATH, tmp_path / "volume.dcm")
    _write_like_small(tmp_path / "label.dcm", small_frames[8:9], grid=(FRAME, 1, 1),
                      image_type=["ORIGINAL", "PRIMARY", "LABEL", "NONE"])
    with open_slide(tmp_path) as slide:
        assert slide.dimensions == (3236, 2638) and "volume.dcm" in slide.warnings[0]
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (64, 64)), small_mosaic[:64, :64])
        assert list(slide.associated_images) == ["label"]
        np.testing.assert_array_equal(slide.associated_images["label"], small_mosaic[1000:1500, 500:1000])  # frame 8


# ---------------------------------------------------------------------- bad input
def test_folder_without_dicom_files(tmp_path):
    (tmp_path / "notes.txt").write_text("no slide here")
    for backend in ("auto", "dicom"):
        with pytest.raises(UnsupportedFormatError, match=f"{tmp_path}: folder contains no DICOM files"):
            open_slide(tmp_path, backend=backend)


def test_missing_and_non_dicom_paths(tmp_path):
    with pytest.raises(SlideNotFoundError, match="nope.dcm: no such file"):
        open_slide(tmp_path / "nope.dcm", backend="dicom")
    text = tmp_path / "text.dcm"
    text.write_text("x" * 500)
    with pytest.raises(UnsupportedFormatError, match="text.dcm: not a DICOM file"):
        open_slide(text, backend="dicom")


@pytest.mark.parametrize("sop_class, reason", [
    # a WSI instance with neither image attributes nor pixel data: its header runs to the end of the file
    ("1.2.840.10008.5.1.4.1.1.77.1.6", "empty.dcm: file is truncated or damaged: it ends at byte [0-9,]+, inside "
                                       "its DICOM header, before the pixel data"),
    ("1.2.840.10008.5.1.4.1.1.7", "empty.dcm: no Rows tag: not an image"),  # secondary capture, no image
])
def test_dicom_without_image_reports_both_readers(tmp_path, sop_class, reason):
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    path = tmp_path / "empty.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    with pytest.raises(SlideReadError, match=r"empty.dcm: wsidicom refused it \(.*\) and the tolerant DICOM reader "
                                             rf"failed too \(.*{reason}\)"):
        open_slide(path)


def test_truncated_at_half(tmp_path):
    """Open works (with a warning); the intact frames read; a region in the lost half raises."""
    path = tmp_path / "half.dcm"
    data = open(SMALL_PATH, "rb").read()
    path.write_bytes(data[: len(data) // 2])
    with open_slide(path) as slide:
        assert any("truncated" in w for w in slide.warnings)
        assert slide.read_region((0, 0), 0, (600, 600)).shape == (600, 600, 3)
        with pytest.raises(SlideReadError, match=r"half.dcm: file is truncated: frame \d+ of 42 .* lies beyond"):
            slide.read_region((3000, 2500), 0, (100, 100))


def test_garbage_frame(tmp_path, small_frames):
    """Frame 9 (1-based; tile column 1, row 2: the frames run down the columns) overwritten with garbage of the same
    length."""
    path = tmp_path / "garbage.dcm"
    data = bytearray(open(SMALL_PATH, "rb").read())
    start = data.find(small_frames[8])
    data[start:start + len(small_frames[8])] = np.random.default_rng(0).integers(
        0, 256, len(small_frames[8]), dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    with open_slide(path) as slide:
        assert slide.read_region((0, 0), 0, (500, 500)).shape == (500, 500, 3)
        with pytest.raises(TileDecodeError, match=r"garbage.dcm: cannot decode frame 9 of 42 \(tile column 1, row 2\)"):
            slide.read_region((600, 1100), 0, (50, 50))


def test_truncated_inside_a_split_frame(tmp_path, small_frames):
    """Cut inside the last fragment of frame 21 (three fragments each, no offset table): frames 1-20 read."""
    path = tmp_path / "cut.dcm"
    _write_like_small(path, small_frames, has_bot=False, fragments_per_frame=3)
    data = path.read_bytes()
    cut = data.find(small_frames[20][-200:])
    path.write_bytes(data[:cut])
    with open_slide(path) as slide:
        assert any("only 20 of 42 frames" in w for w in slide.warnings)
        assert slide.read_region((3 * FRAME, 1 * FRAME), 0, (10, 10)).shape == (10, 10, 3)  # frame 20
        lost = r"cut.dcm: file is truncated: frame 21 of 42 \(tile column 3, row 2\)"
        with pytest.raises(SlideReadError, match=lost):
            slide.read_region((3 * FRAME, 2 * FRAME), 0, (10, 10))

"""DICOM defects found in a review: channel order and names of multi-channel slides, levels of another tile
size, files wsidicom leaves out, truncated instances, the tolerant reader's TILED_SPARSE channel.

Slides are written at test time with pydicom, from the header of the real wsic CMU-1 volume instance, with
uncompressed frames, so the truth is the array written.
"""
import copy
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pydicom
import pytest
from datafiles import data_path
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from histoflow import SlideReadError, open_slide

WSIC = data_path("wsi", "dicom_wsic", "CMU-1-Small-Region")
VOLUME = os.path.join(WSIC, "1.2.826.0.1.3680043.8.498.35220404935377466417110411569853018212.dcm")
CHANNELS = [("1", "DAPI"), ("2", "CD3"), ("3", "CD8"), ("4", "PanCK")]


def _header():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return pydicom.dcmread(VOLUME, stop_before_pixels=True)


def _uids():
    return {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}


def _tiles(img, tile):
    """Frames of ``img`` (h, w, c) in row-major tile order, zero padded at the edges; (frames, across)."""
    (tw, th), (h, w) = tile, img.shape[:2]
    across, down = -(-w // tw), -(-h // th)
    frames = []
    for r in range(down):
        for c in range(across):
            t = np.zeros((th, tw, img.shape[2]), img.dtype)
            part = img[r * th:(r + 1) * th, c * tw:(c + 1) * tw]
            t[:part.shape[0], :part.shape[1]] = part
            frames.append(t)
    return frames, across


def _write(path, img, tile, uids, *, number=1, spacing=0.0005, optical_paths=(("0", None),), frames=None,
           positions=None, frame_paths=None, drop=()):
    """One uncompressed VL WSI VOLUME instance of ``img`` ((h, w) or (h, w, c)) in ``tile`` = (w, h) frames.

    ``spacing`` is the pixel spacing in mm; ``positions`` (tile column, row per frame) makes it TILED_SPARSE;
    ``frame_paths`` gives each frame's optical path identifier; ``drop`` lists keywords to delete
    (``ImageType``: wsidicom refuses the file).
    """
    img = np.asarray(img)
    img = img[:, :, None] if img.ndim == 2 else img
    (h, w, c), (tw, th) = img.shape, tile
    ds = copy.deepcopy(_header())
    ds.ImageType = ["ORIGINAL" if number == 1 else "DERIVED", "PRIMARY", "VOLUME", "NONE"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["frame"]
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = th, tw
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = w, h
    ds.SamplesPerPixel = c
    ds.PhotometricInterpretation = "RGB" if c == 3 else "MONOCHROME2"
    if c == 1:
        del ds.PlanarConfiguration
    else:
        ds.PlanarConfiguration = 0
    bits = img.dtype.itemsize * 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [spacing, spacing]
    items = []
    for identifier, description in optical_paths:
        item = copy.deepcopy(_header().OpticalPathSequence[0])
        item.OpticalPathIdentifier = identifier
        if description:
            item.OpticalPathDescription = description
        items.append(item)
    ds.OpticalPathSequence = Sequence(items)
    ds.NumberOfOpticalPaths = len(items)
    ds.DimensionOrganizationType = "TILED_FULL"
    if frames is None:
        frames, _ = _tiles(img, tile)
    if positions is not None:
        per_frame = []
        for i, (column, row) in enumerate(positions):
            position = Dataset()
            position.ColumnPositionInTotalImagePixelMatrix = column * tw + 1
            position.RowPositionInTotalImagePixelMatrix = row * th + 1
            position.XOffsetInSlideCoordinateSystem = position.YOffsetInSlideCoordinateSystem = 0.0
            position.ZOffsetInSlideCoordinateSystem = 0.0
            item = Dataset()
            item.PlanePositionSlideSequence = Sequence([position])
            if frame_paths is not None:
                identification = Dataset()
                identification.OpticalPathIdentifier = frame_paths[i]
                item.OpticalPathIdentificationSequence = Sequence([identification])
            per_frame.append(item)
        ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
        ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.NumberOfFrames = len(frames)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = b"".join(np.ascontiguousarray(f).tobytes() for f in frames)
    ds["PixelData"].VR = "OW" if bits == 16 else "OB"
    for keyword in ("LossyImageCompression", "LossyImageCompressionMethod", "LossyImageCompressionRatio", *drop):
        if keyword in ds:
            delattr(ds, keyword)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return str(path)


def _fluorescence(h=300, w=260):
    """Four uint16 channels with means 12, 22, 32, 42 (and some noise)."""
    rng = np.random.default_rng(0)
    return np.stack([np.full((h, w), 10 * (i + 1), np.uint16) + rng.integers(0, 5, (h, w), dtype=np.uint16)
                     for i in range(4)], axis=-1)


def _one_channel_per_instance(folder, truth):
    """A folder of four instances, one channel each (their only OpticalPathSequence item)."""
    os.makedirs(folder, exist_ok=True)
    uids = _uids()
    for i, channel in enumerate(CHANNELS):
        _write(os.path.join(folder, f"ch{i}.dcm"), truth[:, :, i], (128, 128), uids, optical_paths=[channel])
    return str(folder)


def _sparse_channels(path, truth, order=(0, 1, 2, 3), drop=()):
    """One TILED_SPARSE instance holding the four channels, frames stored in ``order`` of channels."""
    frames, positions, paths = [], [], []
    for c in order:
        tiles, across = _tiles(truth[:, :, c:c + 1], (128, 128))
        frames += tiles
        positions += [(i % across, i // across) for i in range(len(tiles))]
        paths += [CHANNELS[c][0]] * len(tiles)
    return _write(path, truth[:, :, 0], (128, 128), _uids(), optical_paths=CHANNELS, frames=frames,
                  positions=positions, frame_paths=paths, drop=drop)


# ---------------------------------------------------------------------- 1, 2: channel order and names
_CHANNELS_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")
from histoflow import open_slide
out = {}
for path in sys.argv[1:]:
    with open_slide(path) as slide:
        region = slide.read_region((0, 0), 0, slide.dimensions)
        out[path] = [slide.channel_names, [round(float(region[..., i].mean()), 3) for i in range(region.shape[-1])]]
print(json.dumps(out))
"""


def test_channel_order_is_the_same_in_every_process(tmp_path):
    """wsidicom's Level.optical_paths is a list made from a set: with it, the channel order changed with
    PYTHONHASHSEED, so a reader pickled to a worker read its channels in another order."""
    truth = _fluorescence()
    folder = _one_channel_per_instance(tmp_path / "sep", truth)
    single = _sparse_channels(tmp_path / "one.dcm", truth[:256, :256])
    expected_means = [round(float(truth[..., i].mean()), 3) for i in range(4)]
    results = []
    for seed in ("0", "1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run([sys.executable, "-c", _CHANNELS_SCRIPT, folder, single], env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    for result in results:
        assert result == results[0]
    names, means = results[0][folder]
    assert names == ["DAPI", "CD3", "CD8", "PanCK"]
    assert means == pytest.approx(expected_means, abs=1e-3)
    names, means = results[0][single]
    assert names == ["DAPI", "CD3", "CD8", "PanCK"]
    assert means == pytest.approx([truth[:256, :256, i].mean() for i in range(4)], abs=1e-3)


def test_channel_names_come_from_every_instance(tmp_path):
    """One channel per instance: each instance's OpticalPathSequence names its channel (not only the
    default instance's; the others were 'optical path N')."""
    truth = _fluorescence()
    folder = _one_channel_per_instance(tmp_path / "sep", truth)
    with open_slide(folder) as slide:
        assert slide.properties["dicom.reader"] == "wsidicom"
        assert slide.channel_names == ["DAPI", "CD3", "CD8", "PanCK"]
        assert slide.dtype == np.uint16 and not slide.brightfield
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, slide.dimensions), truth)
        for i, name in enumerate(slide.channel_names):
            np.testing.assert_array_equal(slide.read_region((100, 50), 0, (80, 90))[..., i],
                                          truth[50:140, 100:180, i], err_msg=name)


# ---------------------------------------------------------------------- 4: levels of other tile sizes
def _mean_downsample(img, f):
    h, w = img.shape[0] // f, img.shape[1] // f
    return img[:h * f, :w * f].reshape(h, f, w, f, -1).mean((1, 3)).round().astype(img.dtype)


@pytest.fixture(scope="module")
def cmu_crop():
    """A 700 x 600 crop of the real CMU-1 pixels (wsic DICOM)."""
    with open_slide(WSIC) as slide:
        return slide.read_region((800, 900), 0, (600, 700))


def test_levels_with_another_tile_size_are_kept(tmp_path, cmu_crop):
    """wsidicom's default strict_tile_size_check dropped, silently, every level whose tile size differs
    from the base level's."""
    folder = tmp_path / "pyramid"
    folder.mkdir()
    uids = _uids()
    truths = {}
    for number, (factor, tile) in enumerate(((1, (256, 256)), (2, (128, 64)), (4, (96, 80))), start=1):
        truths[factor] = cmu_crop if factor == 1 else _mean_downsample(cmu_crop, factor)
        _write(folder / f"level{factor}.dcm", truths[factor], tile, uids, number=number, spacing=0.0005 * factor)
    with open_slide(folder) as slide:
        assert slide.warnings == []
        assert slide.level_count == 3
        assert [round(level.downsample) for level in slide.levels] == [1, 2, 4]
        for level, factor in enumerate((1, 2, 4)):
            np.testing.assert_array_equal(slide.read_level(level), truths[factor], err_msg=f"level {level}")
        # a region across tiles of the last level, addressed in level-0 coordinates
        np.testing.assert_array_equal(slide.read_region((4 * 90, 4 * 70), 2, (50, 60)), truths[4][70:130, 90:140])


# ---------------------------------------------------------------------- 5: files wsidicom leaves out
def test_files_left_out_of_the_slide_are_named_with_the_reason(tmp_path, cmu_crop):
    folder = tmp_path / "mixed"
    folder.mkdir()
    uids = _uids()
    _write(folder / "level1.dcm", cmu_crop, (256, 256), uids)
    _write(folder / "aa_other_slide.dcm", cmu_crop[:200, :300], (256, 256), _uids())
    cut = _write(folder / "level2.dcm", _mean_downsample(cmu_crop, 2), (256, 256), uids, number=2)
    with open(cut, "r+b") as f:
        f.truncate(600)  # inside its header: a level of the slide wsidicom cannot parse
    with open_slide(folder) as slide:
        assert slide.level_count == 1 and slide.dimensions == (600, 700)
        np.testing.assert_array_equal(slide.read_level(0), cmu_crop)
        notes = [w for w in slide.warnings if "not used" in w]
        assert len(notes) == 1, slide.warnings
        assert "2 of the 3 DICOM files in the folder are not used" in notes[0]
        assert "aa_other_slide.dcm (another study: StudyInstanceUID" in notes[0]
        assert "level2.dcm (file is truncated or damaged: it ends at byte 600, inside its DICOM header" in notes[0]
        assert "level1.dcm" not in notes[0]


def test_real_folders_use_every_file():
    for name in ("CMU-1-Small-Region", "CMU-1-Small-Region-J2K"):
        with open_slide(data_path("wsi", "dicom_wsic", name)) as slide:
            assert slide.warnings == []


# ---------------------------------------------------------------------- 7: truncated instances
def _half_of_wsic(tmp_path):
    folder = tmp_path / "half"
    shutil.copytree(WSIC, folder)
    volume = folder / os.path.basename(VOLUME)
    os.chmod(volume, 0o644)
    data = volume.read_bytes()
    volume.write_bytes(data[:len(data) // 2])
    return folder, volume


def test_truncated_instance_read_by_wsidicom_is_named(tmp_path):
    """wsidicom opens an instance cut in half; reads then failed with an EOFError naming the folder only."""
    folder, volume = _half_of_wsic(tmp_path)
    for path in (folder, volume):
        with open_slide(path) as slide:
            assert slide.properties["dicom.reader"] == "wsidicom"
            assert any(w.startswith(f"{volume}: file is truncated") for w in slide.warnings), slide.warnings
            with pytest.raises(SlideReadError, match=rf"{path}: .*{volume}: file is truncated"):
                slide.read_level(0)


@pytest.mark.parametrize("size", [200, 1000, 2000])
def test_header_cut_short_is_reported_as_truncated(tmp_path, size):
    """A header cut short said 'no Rows tag: not an image' (or 'transfer syntax (missing)')."""
    single = tmp_path / "cut.dcm"
    single.write_bytes(open(VOLUME, "rb").read()[:size])
    truncated = rf"cut.dcm: file is truncated or damaged: it ends at byte {size:,}, inside its DICOM header"
    with pytest.raises(SlideReadError, match=truncated):
        open_slide(single)
    folder = tmp_path / "folder"
    shutil.copytree(WSIC, folder)
    volume = folder / os.path.basename(VOLUME)
    os.chmod(volume, 0o644)
    volume.write_bytes(volume.read_bytes()[:size])
    with pytest.raises(SlideReadError, match=rf"{volume}: file is truncated or damaged: it ends at byte {size:,}"):
        open_slide(folder)


# ---------------------------------------------------------------------- 6: tolerant reader, TILED_SPARSE channels
def test_tolerant_sparse_multichannel_names_the_plane_it_reads(tmp_path):
    """The first frame is of CD8 (third in the OpticalPathSequence): the channel read is CD8, named CD8, and
    a note says the other optical paths are dropped."""
    truth = _fluorescence(256, 256)
    path = _sparse_channels(tmp_path / "tolerant.dcm", truth, order=(2, 0, 1, 3), drop=("ImageType",))
    with open_slide(path) as slide:
        assert slide.properties["dicom.reader"] == "tolerant"
        assert slide.channel_names == ["CD8"]
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (256, 256))[..., 0], truth[..., 2])
        assert any("4 optical paths" in w and "optical path 3 'CD8'" in w and "dropped" in w
                   for w in slide.warnings), slide.warnings


def test_damaged_sparse_positions_and_offset_tables_are_refused_in_our_words(tmp_path):
    """A frame without its plane position, or a file cut inside its basic offset table, raised bare
    AttributeError / TypeError / ValueError naming no file."""
    with open_slide(WSIC) as s:
        img = s.read_region((800, 900), 0, (256, 256))
    frames, _ = _tiles(img, (128, 128))

    def damaged(name, change):
        p = _write(str(tmp_path / f"{name}.dcm"), img, (128, 128), _uids(), frames=frames,
                   positions=[(0, 0), (1, 0), (0, 1), (1, 1)], drop=("ImageType",))
        ds = pydicom.dcmread(p)
        change(ds.PerFrameFunctionalGroupsSequence)
        ds.save_as(p)
        return p

    def no_position(seq):
        del seq[2].PlanePositionSlideSequence

    def no_row(seq):
        seq[1].PlanePositionSlideSequence[0].RowPositionInTotalImagePixelMatrix = None

    for name, change, frame in (("no_position", no_position, 3), ("no_row", no_row, 2)):
        p = damaged(name, change)
        with pytest.raises(SlideReadError, match=rf"{name}\.dcm: damaged plane position of TILED_SPARSE frame {frame}"):
            open_slide(p)
    small = data_path("wsi", "dicom_pathml", "small_dicom.dcm")
    data = open(small, "rb").read()
    with open(small, "rb") as f:
        pydicom.dcmread(f, stop_before_pixels=True)
        start = f.tell()  # the PixelData element: 12 bytes, then the table's item header (8) and its entries
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:start + 20 + 3])
    with pytest.raises(SlideReadError, match=r"cut\.dcm: file is truncated or damaged inside the basic offset table"):
        open_slide(cut)


def test_trailing_padding_is_not_truncation_and_thumbnails_are_kept(tmp_path):
    """A file with Data Set Trailing Padding (FFFC,FFFC) after its pixel data, which the standard allows, was
    reported as truncated; a THUMBNAIL instance was dropped when wsidicom read the folder (the tolerant reader
    kept it)."""
    folder = tmp_path / "padded"
    shutil.copytree(WSIC, folder)
    volume = folder / os.path.basename(VOLUME)
    os.chmod(volume, 0o644)
    ds = pydicom.dcmread(volume)
    ds.add_new(0xFFFCFFFC, "OB", b"\0" * 16)
    ds.save_as(volume)
    with open_slide(folder) as s, open_slide(WSIC) as ref:
        assert s.properties["dicom.reader"] == "wsidicom" and s.warnings == []
        np.testing.assert_array_equal(s.read_region((800, 900), 0, (64, 64)), ref.read_region((800, 900), 0, (64, 64)))
    with open(volume, "r+b") as f:  # cut short, it is still said to be
        f.truncate(os.path.getsize(volume) // 2)
    with open_slide(folder) as s:
        assert any("file is truncated" in w for w in s.warnings)

    with open_slide(WSIC) as s:
        img = s.read_region((800, 900), 0, (512, 384))
    thumb = _mean_downsample(img, 4)
    for drop in ((), ("ImageType",)):  # wsidicom's path, then the tolerant reader's
        d = tmp_path / f"thumb{len(drop)}"
        os.makedirs(d)
        u = _uids()
        _write(str(d / "vol.dcm"), img, (128, 128), u, drop=drop)
        p = _write(str(d / "thumb.dcm"), thumb, (128, 96), u, number=2, spacing=0.002)
        tds = pydicom.dcmread(p)
        tds.ImageType = ["DERIVED", "PRIMARY", "THUMBNAIL", "RESAMPLED"]
        tds.save_as(p)
        with open_slide(d) as s:
            assert s.properties["dicom.reader"] == ("wsidicom" if not drop else "tolerant")
            assert list(s.associated_images) == ["thumbnail"]
            np.testing.assert_array_equal(s.associated_images["thumbnail"], thumb)


def test_a_sparse_frame_off_the_tile_grid_is_refused_by_both_readers(tmp_path):
    """wsidicom puts a TILED_SPARSE frame stored at x = 64 on the tile at x = 0, silently; the tolerant reader
    refused it. Both now refuse it, naming the file and the frame."""
    with open_slide(WSIC) as s:
        img = s.read_region((800, 900), 0, (256, 256))
    frames, _ = _tiles(img, (128, 128))
    for drop in ((), ("ImageType",)):
        p = _write(str(tmp_path / f"off{len(drop)}.dcm"), img, (128, 128), _uids(), frames=[frames[0]],
                   positions=[(0, 0)], drop=drop)
        ds = pydicom.dcmread(p)
        ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSlideSequence[0].ColumnPositionInTotalImagePixelMatrix = 65
        ds.save_as(p)
        with pytest.raises(SlideReadError, match=rf"off{len(drop)}\.dcm: .*TILED_SPARSE frame 1 at column 65, row 1 "
                                                 r"is not on the 128 x 128 tile grid"):
            open_slide(p)
    p = _write(str(tmp_path / "on.dcm"), img, (128, 128), _uids(), frames=[frames[3], frames[0]],
               positions=[(1, 1), (0, 0)])  # on the grid, out of order: read as it is
    with open_slide(p) as s:
        assert s.properties["dicom.reader"] == "wsidicom"
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (128, 128)), frames[0])


def test_a_grey_file_without_optical_paths_has_one_channel_everywhere(tmp_path):
    """A grey single-file slide that wsidicom refuses and that names no optical path: the tolerant reader gave
    no channel names, so the reader guessed three (RGB): regions inside the image came back (h, w, 1), those
    crossing its edge (h, w, 3), and the thumbnail had three channels."""
    img = np.random.default_rng(0).integers(0, 255, (200, 300), dtype=np.uint8)
    path = _write(tmp_path / "grey.dcm", img, (100, 100), _uids(),
                  drop=("ImageType", "OpticalPathSequence", "NumberOfOpticalPaths"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # wsidicom refused it: said in a warning
        r = open_slide(path)
    with r:
        assert r.channel_names == ["intensity"] and r.channels == 1
        inside, crossing = r.read_region((10, 10), 0, (50, 50)), r.read_region((280, 10), 0, (50, 50))
        assert inside.shape == crossing.shape == (50, 50, 1)
        assert np.array_equal(inside[:, :, 0], img[10:60, 10:60])
        assert np.array_equal(crossing[:, :20, 0], img[10:60, 280:300]) and (crossing[:, 20:] == 0).all()
        assert r.thumbnail(64).shape[2] == 1


@pytest.mark.parametrize("folder", ["CMU-1-Small-Region", "CMU-1-Small-Region-J2K"])
def test_a_label_or_overview_file_alone_is_not_opened_as_the_slide(folder):
    """A folder leaves its LABEL and OVERVIEW images out of the slide; given alone, each opened as an H&E slide
    (the label photo tiled into 16 tiles, the overview into 40), with no word of what it was."""
    from histoflow import UnsupportedFormatError

    root = data_path("wsi", "dicom_wsic", folder)
    kinds = {}
    for name in sorted(os.listdir(root)):
        kinds[pydicom.dcmread(os.path.join(root, name), stop_before_pixels=True).ImageType[2]] = name
    assert set(kinds) == {"VOLUME", "LABEL", "OVERVIEW"}
    for kind, what in (("LABEL", "label"), ("OVERVIEW", "macro")):
        with pytest.raises(UnsupportedFormatError, match=rf"{kinds[kind]}: a DICOM {kind} image \(ImageType {kind}\), "
                                                         rf"not a pyramid level of a slide; open the slide's folder "
                                                         rf"\(its {what} image is then in associated_images\)"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                open_slide(os.path.join(root, kinds[kind]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with open_slide(os.path.join(root, kinds["VOLUME"])) as r:
            assert r.dimensions == (2220, 2967)

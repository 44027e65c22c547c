"""Bad input gives histoflow's own exceptions, naming the file and the reason. One test per case."""
import shutil

import numpy as np
import pytest
import tifffile
from datafiles import SVS, data_path

from histoflow import (
    RegionError,
    RegionTooLargeError,
    SlideNotFoundError,
    SlideReadError,
    TileDecodeError,
    UnsupportedFormatError,
    open_slide,
)
from histoflow.cli import main


def test_missing_path(tmp_path):
    path = str(tmp_path / "nope.svs")
    with pytest.raises(SlideNotFoundError, match="nope.svs: no such file"):
        open_slide(path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("not a slide")
    with pytest.raises(UnsupportedFormatError, match=f"{tmp_path}: folder contains no DICOM"):
        open_slide(tmp_path)


def test_svs_truncated_at_half(tmp_path):
    data = open(SVS, "rb").read()
    path = tmp_path / "half.svs"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideReadError, match="half.svs: file is truncated"):
        open_slide(path)


def test_tiff_truncated_inside_tile_data(tmp_path):
    """The directories survive but tile data is cut off: refused at open, with the byte counts."""
    src = data_path("wsi", "tiled_tiff", "CMU-1-Small-Region.jpeg.tiff")
    with tifffile.TiffFile(src) as tf:
        ifd = tf.pages.first.offset
        end = int(max(o + c for o, c in zip(tf.pages.first.dataoffsets, tf.pages.first.databytecounts)))
    assert ifd < end  # tifffile wrote the directory first: cutting the end keeps it
    path = tmp_path / "cut.tiff"
    path.write_bytes(open(src, "rb").read()[: end - 5000])
    with pytest.raises(SlideReadError, match=r"cut.tiff: file is truncated: level 0 .* needs data up to byte"):
        open_slide(path)


def test_random_bytes_named_svs(tmp_path):
    path = tmp_path / "random.svs"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    with pytest.raises(UnsupportedFormatError, match="random.svs: not a recognised slide or image format"):
        open_slide(path)


def test_tiled_tiff_with_one_corrupted_tile(tmp_path):
    src = data_path("wsi", "tiled_tiff", "CMU-1-Small-Region.jpeg.tiff")
    path = tmp_path / "corrupt.tiff"
    shutil.copy(src, path)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages.first
        across = -(-page.imagewidth // page.tilewidth)
        index = 3 * across + 4  # tile at column 4, row 3
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(1).integers(0, 256, count, dtype=np.uint8).tobytes())
    with open_slide(path) as s:
        s.read_region((0, 0), 0, (256, 256))  # other tiles still read
        with pytest.raises(TileDecodeError, match=r"corrupt.tiff: tile \(col 4, row 3\) of level 0"):
            s.read_region((4 * 256 + 10, 3 * 256 + 10), 0, (100, 100))


def test_region_of_negative_size():
    with open_slide(SVS) as s:
        with pytest.raises(RegionError, match="CMU-1-Small-Region.svs: region size must be positive, got -5 x 10"):
            s.read_region((0, 0), 0, (-5, 10))


def test_reader_arguments_are_checked_naming_the_file():
    """A region of infinite size was a bare OverflowError, a downsample given as text a bare TypeError, a
    max_region_bytes of "1e9" a bare ValueError; 0 became the default bound and -1 refused every read."""
    from histoflow import ParameterError, SlideData

    with open_slide(SVS) as s:
        with pytest.raises(RegionError, match="CMU-1-Small-Region.svs: location and size must be pairs of integers"):
            s.read_region((0, 0), 0, (float("inf"), 2))
        for bad in ("4", float("nan"), 0, -2, None):
            with pytest.raises(ParameterError, match=r"CMU-1-Small-Region.svs: downsample must be a positive number"):
                s.best_level_for_downsample(bad)
        assert s.best_level_for_downsample(4) == 0
    for bad in ("1e9", 0, -1, 2.5, True):
        with pytest.raises(ParameterError, match=r"CMU-1-Small-Region.svs: max_region_bytes must be a whole number of "
                                                 r"bytes >= 1 \(or None for 4 GiB\)"):
            open_slide(SVS, max_region_bytes=bad)
    with open_slide(SVS, max_region_bytes=8e9) as s:  # a whole number written as a float, as before
        assert s.max_region_bytes == 8_000_000_000
    with open_slide(SVS, max_region_bytes=300) as s:
        assert s.read_region((0, 0), 0, (10, 10)).shape == (10, 10, 3)
        with pytest.raises(RegionTooLargeError):
            s.read_region((0, 0), 0, (20, 10))
    # SlideData's mpp is assigned as the reader's is (the way to correct a wrong resolution tag)
    with SlideData(SVS) as s:
        s.mpp = 0.25
        assert s.mpp == s.reader.mpp == (0.25, 0.25) and s.grid(256, mpp=0.5).downsample == pytest.approx(2)
        with pytest.raises(ParameterError):
            s.mpp = -1


def test_unknown_level():
    with open_slide(SVS) as s:
        with pytest.raises(RegionError, match="level 3 does not exist"):
            s.read_region((0, 0), 3, (10, 10))


def test_whole_level_read_over_the_memory_bound(mosaic8):
    with open_slide(mosaic8, max_region_bytes=512 * 1024**2) as s:
        with pytest.raises(RegionTooLargeError, match=r"17760 x 23736 level 0 .* would take 1\.2 GiB, above the bound of 512\.0 MiB"):
            s.read_level(0)
        assert s.read_level(2).shape == (1488, 1112, 3)  # small levels still read


def test_default_bound_refuses_a_huge_region():
    with open_slide(SVS) as s:
        with pytest.raises(RegionTooLargeError, match="would take 8.0 GiB"):
            s.read_region((0, 0), 0, (65536, 43691))  # 65536 x 43691 x 3 bytes


def test_cli_error_is_one_line_and_exit_1(tmp_path, capsys):
    code = main(["info", str(tmp_path / "missing.svs")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("histoflow: error:") and "missing.svs" in err
    assert "Traceback" not in err


def test_cli_debug_shows_traceback(tmp_path):
    with pytest.raises(SlideNotFoundError):
        main(["--debug", "info", str(tmp_path / "missing.svs")])


@pytest.mark.parametrize("backend", ["tiff", "image", "openslide", "dicom"])
def test_forced_backend_on_random_bytes(tmp_path, backend):
    """Whatever backend is forced, garbage is refused with our exception, naming the file."""
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(2).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    with pytest.raises(SlideReadError, match="random.bin"):
        open_slide(path, backend=backend)

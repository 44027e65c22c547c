"""Format sniffing: TIFFs OpenSlide knows by vendor go to the openslide backend unless the tiff backend reads
them as OpenSlide does (generic tiled TIFF, Aperio); every real TIFF keeps its backend."""
import numpy as np
import openslide
import pytest
import tifffile
from datafiles import SVS, data_path

from histoflow import open_slide
from histoflow.io import detect_format
from histoflow.io.sniff import FormatInfo

TRESTLE_DESCRIPTION = ("Background Color=FFFFFF;White Balance=FFFFFF;Objective Power=20;JPEG Quality=75;"
                       "OverlapsXY=  16 16 16 16")


def _overlapping_tiles(img, n, overlap, tile=256):
    """Trestle's tiles: each 256 px tile starts 256 - overlap px after the previous one."""
    for r in range(n):
        for c in range(n):
            out = np.full((tile, tile, 3), 255, np.uint8)
            y, x = r * (tile - overlap), c * (tile - overlap)
            part = img[y:y + tile, x:x + tile]
            out[:part.shape[0], :part.shape[1]] = part
            yield out


@pytest.fixture(scope="module")
def trestle(tmp_path_factory):
    """A two-level Trestle-like TIFF (Software MedScan, OverlapsXY) of real CMU-1 pixels, zlib tiles that
    overlap by 16 px: OpenSlide reads it 976 x 976 with the overlaps removed."""
    with openslide.OpenSlide(SVS) as svs:
        region = np.asarray(svs.read_region((800, 1000), 0, (1952, 1952)))[..., :3]
    path = tmp_path_factory.mktemp("trestle") / "trestle.tif"
    with tifffile.TiffWriter(path) as tw:
        for level, (img, n) in enumerate(((region[:976, :976], 4), (region[::2, ::2][:496, :496], 2))):
            tw.write(_overlapping_tiles(img, n, 16), shape=(256 * n, 256 * n, 3), dtype=np.uint8, tile=(256, 256),
                     compression="zlib", photometric="rgb", software="MedScan", description=TRESTLE_DESCRIPTION,
                     metadata=None)
    return str(path), region[:976, :976]


def test_trestle_tiff_goes_to_openslide(trestle):
    """It went to the tiff backend, which read the stored 1024 x 1024 tiles with their overlaps."""
    path, truth = trestle
    assert openslide.OpenSlide.detect_format(path) == "trestle"
    assert detect_format(path) == FormatInfo("Trestle TIFF", "openslide")
    with open_slide(path) as slide, openslide.OpenSlide(path) as reference:
        assert slide.backend == "openslide"
        assert slide.dimensions == reference.dimensions == (976, 976)
        assert slide.level_count == reference.level_count == 2
        for level in range(2):
            w, h = reference.level_dimensions[level]
            expected = np.asarray(reference.read_region((0, 0), level, (w, h)))[..., :3]
            np.testing.assert_array_equal(slide.read_region((0, 0), level, (w, h)), expected)
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (976, 976)), truth)


# every real TIFF in ../shared/data: (format, backend) as routed before OpenSlide was asked about TIFFs
REAL_TIFFS = {
    "wsi/aperio_svs/CMU-1-Small-Region.svs": ("Aperio SVS", "tiff"),
    "wsi/tiled_tiff/CMU-1-Small-Region.jpeg.tiff": ("generic tiled TIFF", "tiff"),
    "wsi/tiled_tiff/CMU-1-Small-Region.jp2.tiff": ("generic tiled TIFF", "tiff"),
    "wsi/tiled_tiff/CMU-1-Small-Region.webp.tiff": ("generic tiled TIFF", "tiff"),
    "wsi/ome_tiff/instanseg_HE_example.ome.tif": ("OME-TIFF", "tiff"),
    "wsi/qptiff/small_vectra.qptiff": ("QPTIFF", "tiff"),
    "multiplex/ark_fov8_mibitiff_22ch.tiff": ("MIBItiff", "tiff"),
    "fluorescence/instanseg_Fluorescence_example.tif": ("ImageJ TIFF", "tiff"),
    "fluorescence/pathml_smalltif.tif": ("TIFF", "tiff"),
    "he_patches/napari_skin_HE.tif": ("TIFF", "tiff"),
}


@pytest.mark.parametrize("name", sorted(REAL_TIFFS))
def test_real_tiffs_keep_their_backend(name):
    assert detect_format(data_path(name)) == FormatInfo(*REAL_TIFFS[name])


def test_a_folder_of_images_is_named_as_such():
    """A folder is read as one DICOM slide; a folder of PNGs given by mistake says what it holds and what to give."""
    from histoflow.errors import UnsupportedFormatError

    folder = data_path("monuseg_train")
    with pytest.raises(UnsupportedFormatError, match=r"holds 20 image or slide file\(s\) \(\.png\).*give the files "
                                                      r"themselves \(e\.g\. .*monuseg_train/\*\.png\)"):
        detect_format(folder)


def test_an_empty_folder_gets_no_hint(tmp_path):
    from histoflow.errors import UnsupportedFormatError

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UnsupportedFormatError, match=r"no DICOM files \(nothing with a DICM preamble\)$"):
        detect_format(tmp_path)


def test_an_h5path_file_given_as_a_slide_says_how_to_open_it():
    from histoflow.errors import UnsupportedFormatError

    with pytest.raises(UnsupportedFormatError, match=r"not a slide: open stores with histoflow.read_h5path\(path\); "
                                                      r"`histoflow info` describes them"):
        detect_format(data_path("pathml_h5path", "cmu_crop_written_by_pathml_3.0.8.h5path"))


def test_a_mirax_slide_without_its_data_folder_is_refused(tmp_path):
    """A .mrxs file is a JPEG preview; without the folder of the same name it opened silently as that preview
    (500 x 300 px of "slide"), and a pipeline ran on it."""
    import shutil

    from histoflow.errors import UnsupportedFormatError

    mrxs = tmp_path / "slide.mrxs"
    shutil.copy(data_path("he_patches", "stardist_histo.jpg"), mrxs)
    with pytest.raises(UnsupportedFormatError, match=r"slide\.mrxs: a MIRAX slide without its data folder: .*"
                                                      r"slide.Slidedat\.ini is missing"):
        open_slide(mrxs)
    shutil.copy(data_path("he_patches", "stardist_histo.jpg"), tmp_path / "photo.jpg")
    assert open_slide(tmp_path / "photo.jpg").dimensions == (500, 300)  # a JPEG named as one is a JPEG


def test_a_named_pipe_is_refused_at_once(tmp_path):
    """A FIFO given as a slide (a glob that caught one) blocked the format check's read for ever, without a word."""
    import os
    import threading

    from histoflow import UnsupportedFormatError

    fifo = tmp_path / "slide.svs"
    os.mkfifo(fifo)
    seen = []

    def check():
        try:
            detect_format(fifo)
        except Exception as e:  # noqa: BLE001 - what is raised is asserted below
            seen.append(e)

    t = threading.Thread(target=check, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the format check blocked on a named pipe"
    assert isinstance(seen[0], UnsupportedFormatError) and "named pipe" in str(seen[0]) and str(fifo) in str(seen[0])
    from histoflow import open_slide

    for backend in ("tiff", "image", "openslide"):  # a backend named skipped the check (openslide blocked past
        with pytest.raises(UnsupportedFormatError, match="named pipe"):  # SIGTERM)
            open_slide(fifo, backend=backend)


def test_slides_named_by_uid_keep_their_whole_name(tmp_path):
    """DICOM folders and files are often named by UID: the last dotted part was taken for an extension, so
    two slides of one series got the same name (their outputs' file names) and a run refused them as a clash."""
    import os

    from histoflow import SlideData, SlideDataset

    src = data_path("wsi", "dicom_wsic", "CMU-1-Small-Region")
    for n in ("111", "222"):
        os.symlink(src, tmp_path / f"1.2.826.0.1.3680043.8.498.{n}")
    with SlideData(str(tmp_path / "1.2.826.0.1.3680043.8.498.111")) as s:
        assert s.name == "1.2.826.0.1.3680043.8.498.111"
    ds = SlideDataset([str(tmp_path / "1.2.826.0.1.3680043.8.498.111"), str(tmp_path / "1.2.826.0.1.3680043.8.498.222")])
    assert sorted(s.name for s in ds.slides) == ["1.2.826.0.1.3680043.8.498.111", "1.2.826.0.1.3680043.8.498.222"]
    from histoflow.core.slide import default_slide_name

    assert default_slide_name("/a/b/slide.ome.tif") == "slide.ome" and default_slide_name("x/CMU-1.svs") == "CMU-1"
    assert default_slide_name("/scans/1.2.840.10008.5.1") == "1.2.840.10008.5.1"

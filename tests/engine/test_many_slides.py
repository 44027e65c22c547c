"""Runs over many slides: files held open, the dask scheduler, output names, resume of DICOM folders."""
import os
import shutil

import pytest
from datafiles import DATA, SVS

from histoflow import PipelineError, SlideData, SlideDataset
from histoflow.errors import RegionError
from histoflow.transforms import BoxBlur, Pipeline

DICOM = os.path.join(DATA, "wsi", "dicom_wsic", "CMU-1-Small-Region")


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files by /proc")
def test_a_cohort_holds_open_only_the_slides_being_worked_on(tmp_path):
    """Every slide of a SlideDataset stayed open from its making to the end of the run (two handles an SVS):
    about 500 slides stopped at the usual limit of 1,024 open files before any work. They rest (closed until
    read, opened again then) and rest again once done."""
    paths = []
    for i in range(40):
        paths.append(str(tmp_path / f"s{i:02d}.svs"))
        os.symlink(SVS, paths[-1])
    before = _open_files()
    ds = SlideDataset(paths)
    assert _open_files() - before <= 2
    assert ds[3].read_region((0, 0), 0, (8, 8)).shape == (8, 8, 3)  # a rested slide reads as it did
    outs = ds.run(Pipeline([BoxBlur(3)]), tmp_path / "out", tile_size=1024, executor="inprocess", progress=False)
    assert len(outs) == 40 and all(os.path.isfile(o) for o in outs)
    assert _open_files() - before <= 4
    ds.close()
    with pytest.raises(Exception, match="has been closed"):  # closed for good is closed
        ds[3].read_region((0, 0), 0, (8, 8))


def test_the_scheduler_does_not_open_the_slides(tmp_path):
    """The slide went into dask's task graph as an object, which the scheduler unpickled, opening the file: a
    slide it could not open failed the run as "dropped this run's tasks", naming neither slide nor cause (and
    the scheduler's open files grew with every run). The worker opens it, and the error says which and why."""
    gone = tmp_path / "gone.jpg"
    shutil.copy(os.path.join(DATA, "he_patches", "stardist_histo.jpg"), gone)
    ds = SlideDataset([os.path.join(DATA, "he_patches", "skimage_ihc.png"), str(gone)])
    os.remove(gone)
    with pytest.raises(PipelineError, match=r"gone.jpg: batch 0 .* failed on the executor: SlideNotFoundError: .*"
                                            r"gone.jpg: no such file"):
        ds.run(Pipeline([BoxBlur(5)]), tmp_path / "out", tile_size=128, progress=False, executor="dask", workers=1)


def test_names_of_folders_given_as_dot_and_of_clashing_slides(tmp_path, monkeypatch):
    """A DICOM folder given as "." was named "." (a hidden "..h5path"); two slides of one name were refused with
    every name listed and no path."""
    folder = tmp_path / "CMU-1-Small-Region"
    shutil.copytree(DICOM, folder)
    monkeypatch.chdir(folder)
    assert SlideData(".").name == "CMU-1-Small-Region"
    assert SlideData(str(folder) + "/.").name == "CMU-1-Small-Region"
    with pytest.raises(RegionError, match=r"unique .*'CMU-1-Small-Region': .*CMU-1-Small-Region.svs, \."
                                          r".*SlideData\(path, name=\.\.\.\)"):
        SlideDataset([SVS, os.path.join(DATA, "he_patches", "skimage_ihc.png"), "."])


def test_outputs_written_into_a_dicom_folder_are_not_the_slide(tmp_path):
    """The identity of a DICOM folder (which a resume compares) listed every file in it: outputs written into
    the folder made its finished result look like the result of other settings."""
    from histoflow.engine.run import _file_identity

    folder = tmp_path / "dcm"
    shutil.copytree(DICOM, folder)
    first = _file_identity(str(folder))
    out = SlideDataset([str(folder)]).run(Pipeline([BoxBlur(3)]), folder, tile_size=512, executor="inprocess",
                                          progress=False)
    (folder / "notes.txt").write_text("mine")
    assert os.path.isfile(out[0]) and _file_identity(str(folder)) == first and len(first) >= 2
    again = SlideDataset([str(folder)]).run(Pipeline([BoxBlur(3)]), folder, tile_size=512, executor="inprocess",
                                            progress=False, resume=True)
    assert again == out


def test_run_takes_tile_as_the_warnings_advise(tmp_path):
    """The overlap warning of `histoflow run` advised `--tile N`, an option run did not have (`--size`)."""
    from histoflow.cli import main

    (tmp_path / "p.yaml").write_text("steps:\n  - BoxBlur: {kernel_size: 3}\n")
    assert main(["run", str(tmp_path / "p.yaml"), SVS, "-o", str(tmp_path / "o"), "--tile", "1024",
                 "--executor", "inprocess", "--png", "none", "--no-progress"]) == 0
    from histoflow import read_h5path

    with read_h5path(tmp_path / "o" / "CMU-1-Small-Region.h5path") as h5:
        assert h5.images.shape[1:3] == (1024, 1024)


class _Stop(Exception):
    pass


def test_resume_with_overwrite_goes_on_replacing_older_results(tmp_path):
    """A run replacing older results (other settings) was interrupted: resume refused the slides it had not reached
    yet (their outputs are the old settings'), with or without overwrite, and the only way left, overwrite without
    resume, threw away the slides already done and the journal. resume + overwrite keeps and continues what is
    this run's and replaces the rest."""
    from histoflow import read_h5path

    paths = [os.path.join(DATA, "he_patches", "skimage_ihc.png"), os.path.join(DATA, "he_patches", "stardist_histo.jpg"),
             SVS]
    out = tmp_path / "out"
    SlideDataset(paths).run(Pipeline([BoxBlur(5)]), out, tile_size=128, executor="inprocess", progress=False)
    names = [os.path.join(out, f"{n}.h5path") for n in ("skimage_ihc", "stardist_histo", "CMU-1-Small-Region")]

    def stop_on_the_second(slide, batch, done, total):
        if slide.name == "stardist_histo" and done == 2:
            raise _Stop()

    with pytest.raises(_Stop):
        SlideDataset(paths).run(Pipeline([BoxBlur(9)]), out, tile_size=128, executor="inprocess", progress=False,
                                batch_size=2, on_batch=stop_on_the_second)
    first = os.stat(names[0]).st_mtime_ns
    with pytest.raises(PipelineError, match="result of a run with other settings"):
        SlideDataset(paths).run(Pipeline([BoxBlur(9)]), out, tile_size=128, executor="inprocess", progress=False,
                                batch_size=2, resume=True)
    SlideDataset(paths).run(Pipeline([BoxBlur(9)]), out, tile_size=128, executor="inprocess", progress=False,
                            batch_size=2, resume=True, overwrite=True)
    assert os.stat(names[0]).st_mtime_ns == first  # finished by the interrupted run: kept
    for n in names:
        with read_h5path(n) as h5:
            assert h5.provenance[-1]["pipeline"]["steps"][0]["BoxBlur"]["kernel_size"] == 9
    with read_h5path(names[1]) as h5:
        assert h5.provenance[-1]["resumed_batches"] >= 2  # continued from its journal
    assert not any(p.endswith(".partial") for p in os.listdir(out))


def test_a_rested_reader_opened_again_is_the_reader_it_was(tmp_path, monkeypatch):
    """Opened again in a separate object, a rested reader's associated images stayed bound to that object
    (DICOM: "has been closed"; OpenSlide: "closed slide object"), and its path became absolute."""
    from histoflow import open_slide

    dicom = SlideDataset([os.path.join(DATA, "wsi", "dicom_wsic", "CMU-1-Small-Region-J2K")])[0]
    shape = dicom.reader.associated_images["label"].shape
    dicom.read_region((0, 0), 0, (8, 8))
    assert dicom.reader.associated_images["label"].shape == shape
    r = open_slide(SVS, backend="openslide")
    images = r.associated_images
    for _ in range(2):
        r.rest()
        r.read_region((0, 0), 0, (8, 8))
    r.rest()
    assert images["label"].shape == r.associated_images["label"].shape == (463, 387, 3)
    monkeypatch.chdir(DATA)
    s = SlideDataset([os.path.join("wsi", "aperio_svs", "CMU-1-Small-Region.svs")])[0]
    s.read_region((0, 0), 0, (4, 4))
    assert s.reader.info()["path"] == os.path.join("wsi", "aperio_svs", "CMU-1-Small-Region.svs")


def test_quantify_takes_resume_with_overwrite_as_its_advice_says(tmp_path):
    """quantify and segment-nuclei advised "add --overwrite" to a --resume over a store of other settings, but
    did not pass it on: the same error again."""
    import subprocess
    import sys

    f = os.path.join(DATA, "fluorescence", "instanseg_Fluorescence_example.tif")
    base = [sys.executable, "-m", "histoflow.cli", "quantify", f, "-o", str(tmp_path / "a.h5ad"), "--nuclear-channel",
            "0", "--slide-mpp", "0.5", "--no-progress", "--png", "none"]
    run = lambda *extra: subprocess.run(base + list(extra), capture_output=True, text=True, timeout=300)  # noqa: E731
    assert run("--tile", "256").returncode == 0
    r = run("--tile", "200", "--resume")
    assert r.returncode == 1 and "add --overwrite to replace it" in r.stderr
    r = run("--tile", "200", "--resume", "--overwrite")
    assert r.returncode == 0, r.stderr


def test_the_command_line_says_clashing_names_in_its_own_words(tmp_path, capsys):
    from histoflow.cli import main

    for d in ("a", "c"):
        (tmp_path / d).mkdir()
        os.symlink(SVS, tmp_path / d / "x.svs")
    (tmp_path / "p.yaml").write_text("steps:\n  - BoxBlur: {kernel_size: 3}\n")
    assert main(["run", str(tmp_path / "p.yaml"), str(tmp_path / "a" / "x.svs"), str(tmp_path / "c" / "x.svs"),
                 "-o", str(tmp_path / "o"), "--executor", "inprocess", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "'x': " in err and "rename or link one of each under another name" in err and "SlideData(" not in err


def test_a_rested_slide_whose_file_went_away_says_so_each_time(tmp_path):
    from histoflow import SlideNotFoundError

    path = tmp_path / "x.jpg"
    shutil.copy(os.path.join(DATA, "he_patches", "stardist_histo.jpg"), path)
    s = SlideDataset([str(path)])[0]
    os.remove(path)
    for _ in range(2):  # not a half-made reader the second time
        with pytest.raises(SlideNotFoundError, match="x.jpg: no such file"):
            s.read_region((0, 0), 0, (4, 4))

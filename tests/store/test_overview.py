"""The picture of an h5path file (`H5Path.overview`, `histoflow thumbnail STORE.h5path`, the pictures of
`histoflow run`): the slide, its slide masks' outlines, the tiles kept, a tile label as colours with a legend,
the tiles a run skipped, nuclei as dots; drawn over the stored tiles when the slide cannot be opened."""
import os

import numpy as np
import pytest
from datafiles import SVS

from histoflow import SlideData, read_h5path
from histoflow.cli import main
from histoflow.errors import H5PathError, ParameterError
from histoflow.store.overview import FAILED_COLOUR, INSTANCE_COLOUR, MASK_COLOURS, TILE_COLOUR, overview, ramp
from histoflow.transforms import BlurQC, NucleusDetectionHE, Pipeline, Transform


class FailOn(Transform):
    """Raises on the tile at one coordinate."""

    def __init__(self, x=768, y=1024):
        self.x = x
        self.y = y

    def apply(self, tile):
        if tile.coords == (self.x, self.y):
            raise ValueError("synthetic failure")


@pytest.fixture(scope="module")
def qc_store(tmp_path_factory):
    """The sample slide after the tissue pre-pass, BlurQC (a number per tile) and one failing tile."""
    out = str(tmp_path_factory.mktemp("ov") / "qc.h5path")
    SlideData(SVS).run(Pipeline([BlurQC(), FailOn()]), out, executor="inprocess", tissue_filter=0.2,
                       on_error="skip", progress=False)
    return out


def _where(pic, colour):
    return np.all(pic == np.array(colour, np.uint8), axis=-1)


def test_the_picture_shows_masks_tiles_a_label_and_failures(qc_store):
    with read_h5path(qc_store) as h5:
        W, H = h5.slide["width"], h5.slide["height"]
        values = np.array([h5.tile(i).labels["laplacian_variance"] for i in range(len(h5))])
        coords = h5.coords
        plain = h5.overview(600)
        pic = h5.overview(600, label="laplacian_variance")
    h, w = plain.shape[:2]
    assert max(h, w) == 600 and abs(w / h - W / H) < 0.01
    assert pic.shape == (h + 22, w, 3)  # a legend strip below
    s = w / W
    # the tissue mask's outline, the tiles' outlines and the failed tile, each where it belongs
    assert _where(plain, MASK_COLOURS[0]).sum() > 500
    x, y = coords[0]
    assert _where(plain[int(y * s) + 5:int((y + 256) * s) - 5, int(x * s)], TILE_COLOUR).mean() > 0.9
    fx, fy = 768, 1024
    assert (fx, fy) not in {tuple(c) for c in coords.tolist()}
    assert _where(plain[int(fy * s) + 5:int((fy + 256) * s) - 5, int(fx * s) + 1], FAILED_COLOUR).mean() > 0.9
    # each tile tinted by its value: the lowest towards the scale's dark blue, the highest towards its yellow
    lo, hi = coords[values.argmin()], coords[values.argmax()]

    def tint(p, c):
        cx, cy = int((c[0] + 128) * s), int((c[1] + 128) * s)
        return p[cy - 8:cy + 8, cx - 8:cx + 8].reshape(-1, 3).astype(float).mean(0) - \
            plain[cy - 8:cy + 8, cx - 8:cx + 8].reshape(-1, 3).astype(float).mean(0)

    dark, yellow = ramp(np.array([0.0, 1.0])).astype(float)
    d_lo, d_hi = tint(pic, lo), tint(pic, hi)
    assert np.dot(d_lo, dark - 128) > 0 and np.dot(d_hi, yellow - 128) > 0
    assert d_hi[:2].mean() - d_hi[2] > d_lo[:2].mean() - d_lo[2] + 40  # yellow (R, G over B) against blue
    # outside every tile the picture is the slide's thumbnail, untouched
    with SlideData(SVS) as slide:
        thumb = slide.thumbnail(600)
    assert np.array_equal(plain[:20, :20], thumb[:20, :20, :3])


def test_drawn_over_the_stored_tiles_when_the_slide_is_gone(qc_store):
    with read_h5path(qc_store) as h5:
        over_slide = h5.overview(500, background="slide")
        over_tiles = h5.overview(500, background="tiles")
        x, y = h5.coords[3]
    s = over_slide.shape[1] / 2220
    a = over_slide[int(y * s) + 4:int((y + 256) * s) - 4, int(x * s) + 4:int((x + 256) * s) - 4].astype(int)
    b = over_tiles[int(y * s) + 4:int((y + 256) * s) - 4, int(x * s) + 4:int((x + 256) * s) - 4].astype(int)
    assert np.abs(a - b).mean() < 6  # the same tissue, from the stored pixels
    assert (over_tiles[:10, :10] == 255).all()  # glass where no tile was kept
    with pytest.raises(H5PathError, match="cannot draw over the slide /nowhere/x.svs"):
        overview(qc_store, 300, background="slide", slide="/nowhere/x.svs")
    assert overview(qc_store, 300, slide="/nowhere/x.svs").shape[1] > 0  # auto: the tiles instead


def test_nuclei_are_dots_at_their_centroids(tmp_path):
    out = SlideData(SVS).run(Pipeline([NucleusDetectionHE(mask_name="nuclei")]), tmp_path / "n.h5path",
                             executor="inprocess", tissue_filter=0.5, overlap=32, progress=False)
    with read_h5path(out) as h5:
        tile = h5.tile(0)
        pic = h5.overview(2967, instances="nuclei")  # at level 0 (the slide is 2220 x 2967): a dot on every nucleus
    inst = tile.masks["nuclei"]
    x0, y0 = tile.coords
    dots = _where(pic, INSTANCE_COLOUR)
    ids = [i for i in np.unique(inst) if i]
    assert len(ids) > 20
    hit = 0
    for i in ids:
        ys, xs = np.nonzero(inst == i)
        hit += dots[int(round(y0 + ys.mean())), int(round(x0 + xs.mean()))]
    assert hit >= 0.95 * len(ids)
    assert not _where(overview(out, 2967), INSTANCE_COLOUR).any()  # without instances=, no dots


def test_what_cannot_be_drawn_is_said(qc_store):
    with pytest.raises(H5PathError, match=r"qc.h5path: no tile label 'grade'; the tiles have \['blur'"):
        overview(qc_store, label="grade")
    with pytest.raises(H5PathError, match=r"qc.h5path: no tile mask 'nuclei'; the tiles have \['tissue'\]"):
        overview(qc_store, instances="nuclei")
    with pytest.raises(ParameterError, match="size must be a whole number of pixels >= 16"):
        overview(qc_store, 4)
    with pytest.raises(ParameterError, match="background must be"):
        overview(qc_store, background="glass")


def test_class_labels_get_a_palette_and_a_legend(qc_store):
    pic = overview(qc_store, 400, label="blur")  # booleans: classes
    legend = pic[-22:]
    assert (legend != 255).any(axis=-1).sum() > 50  # the class swatches and names


def test_thumbnail_and_run_draw_h5path_files(qc_store, tmp_path, capsys):
    png = str(tmp_path / "qc.png")
    assert main(["thumbnail", qc_store, "-o", png, "--size", "300", "--label", "laplacian_variance"]) == 0
    from PIL import Image

    assert Image.open(png).size[1] == 300 + 22
    assert main(["thumbnail", SVS, "-o", str(tmp_path / "s.png"), "--label", "blur"]) == 2  # a usage error
    assert "--label draws over the tiles of an h5path file" in capsys.readouterr().err
    pipe = tmp_path / "p.yaml"
    pipe.write_text("steps:\n- BlurQC: {}\n")
    args = ["run", str(pipe), SVS, "-o", str(tmp_path / "runs"), "--executor", "inprocess", "--no-progress"]
    assert main(args) == 0
    pic = tmp_path / "runs" / "CMU-1-Small-Region.png"
    assert "picture " + str(pic) in capsys.readouterr().out and max(Image.open(pic).size) == 1024
    assert main(args + ["--png", "none", "-o", str(tmp_path / "runs2")]) == 0
    assert os.listdir(tmp_path / "runs2") == ["CMU-1-Small-Region.h5path"]
    os.remove(tmp_path / "runs" / "CMU-1-Small-Region.h5path")  # the picture alone is refused too
    assert main(args) == 1 and f"{pic}: exists already" in capsys.readouterr().err


def test_a_multiplex_store_drawn_from_its_tiles_looks_like_its_slide(tmp_path):
    """22 uint16 channels (MIBI): the stitched tiles are shown in false colour as the slide's thumbnail is (they
    were stretched as floats, which shifted every colour)."""
    from datafiles import data_path

    out = SlideData(data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")).run(
        Pipeline([]), tmp_path / "m.h5path", executor="inprocess", progress=False)
    a = overview(out, 256, background="slide").astype(int)
    b = overview(out, 256, background="tiles").astype(int)
    assert a.shape == b.shape and np.abs(a - b).mean() < 8, np.abs(a - b).mean()


class FailAll(Transform):
    """Raises on every tile."""

    def apply(self, tile):
        raise ValueError("synthetic failure")


def _column_runs(pic, x, colour):
    return _where(pic[:, x], colour).mean()


def test_tile_cores_come_from_the_tiles_positions(tmp_path):
    """`slide.write` and `histoflow tile --overlap` record no tiling: the tiles were drawn whole, overlapping,
    instead of their own parts (a stride of 192 px for 256 px tiles: cores 32 px inside each edge)."""
    slide = SlideData(SVS)
    out = str(tmp_path / "o.h5path")
    slide.write(out, tiles=slide.generate_tiles(256, overlap=64), progress=False)
    pic = overview(out, 2967)  # level 0
    assert _column_runs(pic, 192 + 32, TILE_COLOUR) > 0.5  # a core's left edge
    assert _column_runs(pic, 192, TILE_COLOUR) < 0.05       # a tile's own left edge is not drawn
    # the first column owns up to the slide's edge (TileGrid.core): its core starts at 0, not 32 px in
    assert _column_runs(pic, 0, TILE_COLOUR) > 0.5 and _column_runs(pic, 32, TILE_COLOUR) < 0.05


def test_the_last_tiles_own_up_to_the_slide_edge(tmp_path):
    """Edge tiles' cores were inset on the slide's edge too, leaving a strip there that no tile seemed to own.
    With edge="drop" the last column (x = 1920 of this 2220 px wide slide: 10 strides of 192) ends at 2176."""
    out = SlideData(SVS).run(Pipeline([BlurQC()]), tmp_path / "d.h5path", tile_size=256, overlap=64, edge="drop",
                             executor="inprocess", progress=False)
    with read_h5path(out) as h5:
        assert int(h5.coords[:, 0].max()) == 1920 and int(h5.coords[:, 1].max()) == 2688
    pic = overview(out, 2967)  # level 0
    assert _column_runs(pic, 1920 + 256 - 1, TILE_COLOUR) > 0.5   # the last column's right edge: the tile's own
    assert _column_runs(pic, 1920 + 256 - 32 - 1, TILE_COLOUR) < 0.05
    assert _where(pic[2688 + 256 - 1, :2000], TILE_COLOUR).mean() > 0.5  # the last row's bottom edge
    assert _column_runs(pic, 1728 + 256 - 32 - 1, TILE_COLOUR) > 0.5  # inside, cores still meet halfway


def test_many_classes_each_get_their_own_colour(tmp_path):
    """More than 10 classes reused tab10's colours: two classes looked the same in the picture and legend."""
    from histoflow.store.overview import class_colours

    for n in (3, 10, 11, 24, 60):
        assert len(set(class_colours(n))) == n
    slide = SlideData(SVS)
    tiles = []
    for k, t in enumerate(slide.generate_tiles(256)):
        t.labels = {"region": f"r{k:02d}"}
        tiles.append(t)
        if len(tiles) == 24:
            break
    out = str(tmp_path / "c.h5path")
    slide.write(out, tiles=iter(tiles), progress=False)
    plain = overview(out, 2967, background="tiles").astype(float)
    pic = overview(out, 2967, label="region", background="tiles")
    palette = np.array(class_colours(len(tiles)), float)
    a = 110 / 255  # the tint's opacity: picture = plain * (1 - a) + colour * a
    for k, (x, y) in enumerate(t.coords for t in tiles):
        if x + 128 >= 2220 or y + 128 >= 2967:
            continue
        colour = (pic[y + 128, x + 128] - plain[y + 128, x + 128] * (1 - a)) / a
        assert np.argmin(np.abs(palette - colour).sum(axis=1)) == k  # each tile tinted with its own class
    legend = pic[-22:].reshape(-1, 3)
    swatches = {tuple(c) for c in legend.tolist()}
    assert all(tuple(c) in swatches for c in palette.astype(int).tolist())  # and each class in the legend


def test_pairs_of_sizes_and_runs_where_every_tile_failed(tmp_path):
    """tile_size / overlap given as (x, y) pairs crashed the picture (TypeError); a run whose every tile failed
    drew its failed tiles at level-0 size whatever the run's pixel size."""
    slide = SlideData(SVS)
    out = slide.run(Pipeline([FailOn(0, 0)]), tmp_path / "p.h5path", tile_size=(256, 128), overlap=(32, 16),
                    executor="inprocess", on_error="skip", progress=False)
    pic = overview(out, 2967)
    red = _where(pic, FAILED_COLOUR)
    ys, xs = np.nonzero(red)
    assert xs.max() in (255, 256) and ys.max() in (127, 128)  # the failed tile at (0, 0): 256 x 128
    out = slide.run(Pipeline([FailAll()]), tmp_path / "a.h5path", tile_size=256, mpp=1.0, executor="inprocess",
                    on_error="skip", progress=False)
    with read_h5path(out) as h5:
        assert len(h5) == 0
    red = _where(overview(out, 2967), FAILED_COLOUR)
    # every tile failed: boxes of 256 px at 1 µm/px, 513 px of this 0.499 µm/px slide (not 256)
    assert red[256, 0:3].any() and not red[256, 250:262].any() and red[256, 508:518].any()


def test_float_tiles_are_drawn_in_colour_not_black(tmp_path):
    """Brightfield tiles stored as floats in [0, 1] came out black (to_rgb cast 0..1 to uint8)."""
    from histoflow.utils import to_rgb

    with SlideData(SVS) as slide:
        region = slide.read_region((1000, 1000), 0, (256, 256))[..., :3]
    rgb = to_rgb(region.astype(np.float32) / 255, brightfield=True)
    assert rgb.max() == 255 and np.abs(rgb.astype(int).mean() - region.mean()) < 40
    out = str(tmp_path / "f.h5path")
    with SlideData(SVS) as slide:
        tiles = []
        for t in slide.generate_tiles(256):
            t.image = t.image[..., :3].astype(np.float32) / 255
            tiles.append(t)
            if len(tiles) == 12:
                break
        slide.write(out, tiles=iter(tiles), progress=False)
    pic = overview(out, 600, background="tiles")
    x, y = tiles[5].coords
    s = pic.shape[1] / 2220
    inside = pic[int(y * s) + 4:int((y + 256) * s) - 4, int(x * s) + 4:int((x + 256) * s) - 4]
    assert inside.mean() > 60 and (pic[-10:, -10:] >= 250).all()  # tissue in colour, glass white


def test_another_slide_at_the_source_path_is_not_drawn_under_the_tiles(qc_store):
    """A slide of another size given (or now at the file's source_path) was drawn under the tiles, out of
    register: the stored tiles are drawn instead, or with background="slide" the sizes are said."""
    from datafiles import data_path

    other = data_path("wsi", "ome_tiff", "instanseg_HE_example.ome.tif")  # 1380 x 1484 px
    with pytest.raises(H5PathError, match=r"cannot draw over the slide .*instanseg_HE_example.ome.tif: it is "
                                          r"1380 x 1484 px, the file's slide 2220 x 2967 px"):
        overview(qc_store, 300, background="slide", slide=other)
    assert np.array_equal(overview(qc_store, 300, slide=other), overview(qc_store, 300, background="tiles"))


def test_a_large_slide_mask_is_read_with_a_stride(tmp_path, monkeypatch):
    """A level-0 slide mask was read whole for a small picture; now every k-th pixel, with the same outline."""
    from histoflow.store import overview as ov

    slide = SlideData(SVS)
    mask = np.zeros((2967, 2220), bool)
    mask[500:2500, 400:1800] = True
    slide.add_mask("region", mask, downsample=1.0)
    out = slide.run(None, tmp_path / "m.h5path", executor="inprocess", progress=False)
    read = []
    real = ov._mask_view
    monkeypatch.setattr(ov, "_mask_view", lambda h5, name, width: read.append(real(h5, name, width)) or read[-1])
    strided = overview(out, 300)
    assert read[0][0].shape[0] < 2967 / 3 and read[0][1] > 3  # not the whole mask; its downsample with the stride
    monkeypatch.setattr(ov, "_mask_view", lambda h5, name, width: (h5.masks[name], h5.mask_downsample(name)))
    whole = overview(out, 300)
    a, b = _where(strided, MASK_COLOURS[0]), _where(whole, MASK_COLOURS[0])
    assert b.sum() > 500 and (a ^ b).sum() <= 0.05 * b.sum()


def test_pathml_integer_labels_are_numbers_as_in_our_files(tmp_path):
    """A PathML file's integer tile labels (its `grade`) were coloured as classes, while the same integers in
    our files go on the number scale: now both are numbers, from dark blue (lowest) to yellow (highest)."""
    import shutil

    import h5py
    from datafiles import data_path

    path = tmp_path / "pm.h5path"
    shutil.copy(data_path("pathml_h5path", "cmu_crop_written_by_pathml_3.0.8.h5path"), path)
    with h5py.File(path, "a") as f:
        for k, key in enumerate(sorted(f["tiles"])):
            f["tiles"][key]["labels"].attrs["grade"] = np.int64(k)
    with read_h5path(path) as h5:
        grades = [h5.tile(i).labels["grade"] for i in range(len(h5))]
        coords, (th, tw) = h5.coords, h5.tile(0).image.shape[:2]
        W = h5.slide["width"]
    plain = overview(path, 600, background="tiles").astype(float)
    pic = overview(path, 600, label="grade", background="tiles")
    s = plain.shape[1] / W
    a = 110 / 255
    ends = ramp(np.array([0.0, 1.0]))
    for want, k in ((ends[0], int(np.argmin(grades))), (ends[1], int(np.argmax(grades)))):
        x, y = (int((c + d / 2) * s) for c, d in zip(coords[k], (tw, th)))
        colour = (pic[y, x] - plain[y, x] * (1 - a)) / a
        assert np.abs(colour - want).max() < 8


def test_a_picture_never_enlarges_the_slide(qc_store, tmp_path, capsys):
    """`histoflow thumbnail STORE --size 5000` drew a 3741 x 5000 px enlargement of a 2220 x 2967 px slide,
    where the same option on the slide itself says so and stops at the slide's size."""
    with read_h5path(qc_store) as h5:
        w, h = h5.slide["width"], h5.slide["height"]
    assert overview(qc_store, 5000).shape[:2] == (h, w)
    out = tmp_path / "big.png"
    assert main(["thumbnail", str(qc_store), "-o", str(out), "--size", "5000"]) == 0
    cap = capsys.readouterr()
    assert f"--size 5000 is larger than the slide ({w} x {h} px); using {max(w, h)}" in cap.err
    assert f"{w} x {h} px" in cap.out


def test_a_virtual_he_run_is_drawn_over_its_tiles(tmp_path, capsys, qc_store):
    """The picture of a VirtualHE run (22 MIBI channels in, RGB tiles out) showed the source fluorescence in
    false colour, not the virtual H&E the file holds; the command line could not choose."""
    from datafiles import data_path

    from histoflow.transforms import VirtualHE

    with SlideData(data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")) as s:
        out = s.run(Pipeline([VirtualHE(eosin_channels=["PanKeratin", "Vimentin"])]), str(tmp_path / "vhe.h5path"),
                    tile_size=256, executor="inprocess", progress=False)
        false_colour = overview(out, 256, background="slide")
    tiles = overview(out, 256, background="tiles")
    auto = overview(out, 256)
    np.testing.assert_array_equal(auto, tiles)
    assert np.abs(auto.astype(int) - false_colour).mean() > 20
    assert auto.mean() > 150  # H&E-like: light, not fluorescence on black
    assert main(["thumbnail", out, "-o", str(tmp_path / "s.png"), "--size", "256", "--background", "slide"]) == 0
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "s.png")), false_colour)
    with pytest.raises(SystemExit):
        main(["thumbnail", out, "-o", str(tmp_path / "t.png"), "--background", "other"])
    capsys.readouterr()
    # a run that keeps the slide's channels is drawn over the slide, as before
    np.testing.assert_array_equal(overview(qc_store, 300), overview(qc_store, 300, background="slide"))


def test_stitched_tiles_are_the_slides_thumbnail_for_low_counts(tmp_path):
    """The tiles put back together were averaged and rounded in their own dtype (0.5 up) before the picture's
    rounding; the slide's thumbnail rounds once (to even). On the MIBI image's low uint16 counts (channel means
    0.1-2) the two pictures differed by 29 grey levels on average; now by nearly nothing."""
    from datafiles import data_path

    from histoflow.store.overview import overview

    with SlideData(data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")) as s:
        out = s.write(str(tmp_path / "m.h5path"), tiles=s.generate_tiles(256))
    tiles = overview(out, 512, background="tiles").astype(int)
    slide = overview(out, 512, background="slide").astype(int)
    assert tiles.shape == slide.shape and np.abs(tiles - slide).mean() < 1.0


def test_a_slide_mask_is_drawn_where_its_downsample_puts_it(tmp_path):
    """A mask that covers the slide a little more than exactly (61 x 102 at downsample 10 over 600 x 1000, which
    add_mask accepts) was stretched over the picture: its outline drifted up to 2 % of the slide."""
    import tifffile

    img = np.full((600, 1000, 3), 230, np.uint8)
    img[100:300, 200:400] = 40
    tifffile.imwrite(tmp_path / "s.tif", img)
    s = SlideData(str(tmp_path / "s.tif"))
    m = np.zeros((61, 102), bool)
    m[10:30, 20:40] = True  # level-0 x 200-399, y 100-299
    s.add_mask("tissue", m, downsample=10)
    out = s.write(str(tmp_path / "s.h5path"), tiles=[t for t in s.generate_tiles(100) if t.coords == (600, 400)])
    pic = overview(out, 1000)
    ys, xs = np.nonzero(np.all(pic == MASK_COLOURS[0], axis=-1))
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (200, 399, 100, 300)  # (outlines are 2 px thick downwards)


def test_the_legend_of_a_narrow_picture_is_readable(tmp_path):
    """A tall, narrow slide's picture is 14 px wide; its legend was too (a clipped "sc", no colour bar)."""
    import tifffile

    tifffile.imwrite(tmp_path / "n.tif", np.full((3000, 40, 3), 200, np.uint8))
    s = SlideData(str(tmp_path / "n.tif"))
    tiles = list(s.generate_tiles(40))
    for i, t in enumerate(tiles):
        t.labels["score"] = float(i)
    out = s.write(str(tmp_path / "n.h5path"), tiles=tiles)
    pic = overview(out, 1024, label="score")
    assert pic.shape[1] >= 150 and pic.shape[0] == 1024 + 22
    legend = pic[1024:]
    bar = np.array([ramp(np.array([0.0]))[0], ramp(np.array([1.0]))[0]])
    assert all(np.any(np.all(legend == c, axis=-1)) for c in bar)  # both ends of the colour bar are drawn
    assert np.all(pic[:1024, 40:] == 255)  # white beside the picture


def test_a_mask_reaching_the_pictures_edge_is_outlined_there():
    """The outline left out the picture's border: a tissue mask covering the whole slide had no outline at all
    and looked like an empty one."""
    from histoflow.store.overview import mask_outline

    full = np.ones((50, 40), bool)
    edge = mask_outline(full, (40, 50))
    assert edge[:, 0].all() and edge[0, :].all() and edge[:, -1].all() and not edge[10:40, 10:30].any()
    left = np.zeros((50, 40), bool)
    left[10:30, :15] = True
    edge = mask_outline(left, (40, 50))
    assert edge[10:30, 0].all() and not edge[:, 20:].any()

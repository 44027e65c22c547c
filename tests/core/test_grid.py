"""TileGrid geometry: counts, overlap, edges, target mpp, mask filters."""
import math

import numpy as np
import pytest

from histoflow import RegionError, TileGrid


def test_level0_no_overlap_pad_and_drop():
    g = TileGrid((2220, 2967), 256)
    assert g.shape == (12, 9) and len(g) == 108
    last = g[-1]
    assert (last.x, last.y) == (8 * 256, 11 * 256) and last.read_size == (256, 256)
    d = TileGrid((2220, 2967), 256, edge="drop")
    assert d.shape == (11, 8)
    assert all(t.x + 256 <= 2220 and t.y + 256 <= 2967 for t in d)


def test_overlap_and_stride():
    g = TileGrid((1000, 600), 256, overlap=56)  # stride 200
    assert g.stride == (200, 200)
    xs = sorted({t.x for t in g})
    assert xs == [0, 200, 400, 600, 800]  # the tile at 800 reaches 1056 > 1000: padded
    assert sorted({t.y for t in g}) == [0, 200, 400]
    d = TileGrid((1000, 600), 256, overlap=56, edge="drop")
    assert sorted({t.x for t in d}) == [0, 200, 400, 600] and sorted({t.y for t in d}) == [0, 200]
    s = TileGrid((1000, 600), 100, stride=150, edge="drop")
    assert sorted({t.x for t in s}) == [0, 150, 300, 450, 600, 750, 900] and s.overlap == (-50, -50)


def test_exact_fit_has_no_extra_tile():
    assert TileGrid((512, 512), 256).shape == (2, 2)
    assert TileGrid((513, 512), 256).shape == (2, 3)
    assert TileGrid((100, 100), 256).shape == (1, 1)
    assert TileGrid((100, 100), 256, edge="drop").shape == (0, 0)


def test_level_coordinates_are_level0():
    ds = [1.0, 4.0, 16.0]
    g = TileGrid((17760, 23736), 256, level=1, level_downsamples=ds)
    t = g[1]
    assert (t.x, t.y, t.level, t.read_size, t.width0) == (1024, 0, 1, (256, 256), 1024)
    assert g.shape == (24, 18)  # 4440 x 5934 at level 1


def test_target_mpp_matching_a_level_reads_it_directly():
    g = TileGrid((17760, 23736), 256, mpp=0.499 * 4, slide_mpp=0.499, level_downsamples=[1.0, 3.9993, 15.96])
    assert g.level == 1 and not g.resampled and g[0].read_size == (256, 256)


def test_target_mpp_between_levels_resamples_from_finer_level():
    g = TileGrid((17760, 23736), 256, mpp=1.0, slide_mpp=0.5, level_downsamples=[1.0, 4.0, 16.0])
    assert g.level == 0 and g.resampled and g.downsample == pytest.approx(2.0)
    t = g[1]
    assert t.read_size == (512, 512) and t.size == (256, 256) and (t.x, t.width0) == (512, 512)
    g = TileGrid((17760, 23736), 128, mpp=4.0, slide_mpp=0.5, level_downsamples=[1.0, 4.0, 16.0])
    assert g.level == 1 and g.downsample == pytest.approx(8.0) and g[0].read_size == (256, 256)
    assert g.shape == (round(23736 / 8 / 128 + 0.5), round(17760 / 8 / 128 + 0.5))
    # finer than level 0: read less and enlarge
    g = TileGrid((1000, 1000), 100, mpp=0.25, slide_mpp=0.5)
    assert g.level == 0 and g[0].read_size == (50, 50) and g.shape == (20, 20)


def test_target_mpp_needs_slide_mpp():
    with pytest.raises(RegionError, match="pixel size, which is unknown"):
        TileGrid((100, 100), 10, mpp=1.0)


def test_mask_filter_at_another_resolution():
    mask = np.zeros((30, 40), bool)  # 1 mask px = 32 level-0 px over a 1280 x 960 slide
    mask[0:8, 0:8] = True  # covers level-0 x, y in [0, 256): tile (0, 0) fully
    mask[8:10, 8:12] = True  # covers [256, 384) x [256, 320): half of tile (1, 1)'s width, a quarter of it
    g = TileGrid((1280, 960), 256, mask=mask)
    assert len(g) == 2 and [(t.row, t.col) for t in g] == [(0, 0), (1, 1)]
    assert g.coverage(g[0]) == 1.0 and g.coverage(g[1]) == pytest.approx(0.125)
    g = TileGrid((1280, 960), 256, mask=mask, min_coverage=0.25)
    assert [(t.row, t.col) for t in g] == [(0, 0)]


def test_bad_parameters():
    with pytest.raises(RegionError, match="overlap"):
        TileGrid((100, 100), 10, overlap=10)
    with pytest.raises(RegionError, match="edge"):
        TileGrid((100, 100), 10, edge="wrap")
    with pytest.raises(RegionError, match="level 3 does not exist"):
        TileGrid((100, 100), 10, level=3)


def test_strides_longer_than_the_tile_start_no_tile_past_the_edge():
    g = TileGrid((2220, 2967), 256, stride=300)
    assert g.shape == (10, 8)
    assert max(s.y for s in g) < 2967 and max(s.x for s in g) < 2220
    assert TileGrid((2220, 2967), 256).shape == (12, 9)  # stride = tile: as before


def test_neighbouring_resampled_tiles_share_their_boundary():
    """Tiles at a target µm/px: each ends where the next begins, in level-0 pixels and in pixels read, so
    no slide pixel is skipped between tiles (rounding start and size apart lost 1 px every few tiles)."""
    for smpp, mpp in ((0.2265, 0.5), (0.499, 0.25), (0.25, 0.6), (0.25, 1.7)):
        g = TileGrid((120000, 3000), 256, mpp=mpp, slide_mpp=smpp, level_downsamples=[1.0, 4.0])
        row = [g.spec(0, c) for c in range(g.cols)]
        for a, b in zip(row, row[1:]):
            assert a.x + a.width0 == b.x
        lds = g.level_downsample
        if g.resampled:  # level pixels as read_region finds them (half up; round() sends x.5 to even)
            for a, b in zip(row, row[1:]):
                assert math.floor(a.x / lds + 0.5) + a.read_size[0] == math.floor(b.x / lds + 0.5)
        end = row[-1].x + row[-1].width0
        assert abs(end - g.cols * 256 * g.downsample) <= 1  # no drift either


def test_mask_coverage_is_the_covered_fraction_of_the_tile():
    # a mask 100 level-0 px per pixel, all tissue: a bottom tile 43.75 % inside the slide is 43.75 % covered
    mask = np.ones((10, 10), np.uint8)
    g = TileGrid((1000, 1000), 256, mask=mask, mask_downsample=100)
    bottom = g.spec(3, 0)  # y 768..1024
    assert g.coverage(bottom) == pytest.approx((1000 - 768) / 256)
    # a smooth mask: coverage equals the mean of the mask drawn at level 0 under the tile
    rng = np.random.default_rng(0)
    mask = (rng.random((37, 53)) > 0.5).astype(np.uint8)
    ds = 1060 / 53
    full = np.kron(mask, np.ones((20, 20), np.uint8))  # ds = 20 exactly
    g = TileGrid((1060, 740), 96, overlap=17, mask=mask, mask_downsample=ds)
    for s in list(g)[::7]:
        window = full[s.y:s.y + s.height0, s.x:s.x + s.width0]
        want = window.sum() / (s.width0 * s.height0)
        assert g.coverage(s) == pytest.approx(want, abs=1e-9)
    # fully covered tiles are kept at min_coverage=1 (no floating-point shortfall)
    g = TileGrid((10000, 10000), 256, overlap=20, mask=np.ones((300, 300), np.uint8), min_coverage=1.0)
    assert len(g) == sum(1 for r in range(g.rows) for c in range(g.cols)
                         if g.spec(r, c).x + 256 <= 10000 and g.spec(r, c).y + 256 <= 10000)


def test_grid_argument_errors():
    for kw in (dict(min_coverage=25, mask=np.ones((4, 4))), dict(min_coverage=0.5), dict(mpp=float("nan"), slide_mpp=0.5),
               dict(mpp=float("inf"), slide_mpp=0.5), dict(mpp=0.5, slide_mpp=0)):
        with pytest.raises(RegionError):
            TileGrid((1000, 1000), 256, **kw)
    # an infinite tile size, and a target mpp so fine that the tiles could not be counted: errors, not OverflowError
    with pytest.raises(RegionError, match="tile_size must be a whole number of pixels"):
        TileGrid((1000, 1000), float("inf"))
    with pytest.raises(RegionError, match=r"the grid would have .* tiles .* more than 2,147,483,648"):
        TileGrid((1000, 1000), 256, mpp=1e-9, slide_mpp=0.5)


def test_level_grids_cover_the_level_itself(mosaic2):
    """A level's size is level 0's over its downsample only roughly (the mosaic's level 1 is 1110 x 1484 at
    3.9993): grids read from a level as it is take its own size, so no column lies wholly past it and no
    row that fits is dropped; the tiles' extents are the level's pixels."""
    from histoflow.core.slide import SlideData

    with SlideData(mosaic2) as s:
        lv = s.levels[1]
        assert (lv.width, lv.height) == (1110, 1484) and lv.downsample != 4
        g = s.grid(222, level=1)
        assert g.shape == (7, 5)  # 1484 / 222 = 6.7 rows, 1110 / 222 = 5 columns exactly
        assert s.grid(212, level=1, edge="drop").shape == (7, 5)  # 7 x 212 = 1484 fits
        assert s.grid(222, mpp=s.mpp[0] * lv.downsample).shape == (7, 5)
        last = s.read_tile(g[-1])
        assert last.extent == (222, 1484 - 6 * 222)
        assert s.read_tile(g[4]).extent is None  # the last column fits exactly: no padding
        np.testing.assert_array_equal(last.image[:last.extent[1]], s.reader.read_region(
            (g[-1].x, g[-1].y), 1, (222, 1484 - 6 * 222)))


def test_tiling_errors_name_the_slide():
    from datafiles import data_path

    from histoflow.core.slide import SlideData

    path = data_path("wsi", "tiled_tiff", "CMU-1-Small-Region.jpeg.tiff")
    with SlideData(path) as s:  # its resolution tag is wrong (0.00499 µm/px): no pixel size
        assert s.mpp is None
        for kw in ({"mpp": 0.5}, {"level": 3}, {"overlap": 300}, {"min_coverage": 0.5}):
            with pytest.raises(RegionError) as e:
                s.grid(256, **kw)
            assert str(e.value).startswith(path), str(e.value)


def test_resize_of_four_channels_keeps_each_channel():
    """Pillow takes 4 x uint8 for RGBA and weights the colours by the fourth channel when resampling."""
    from datafiles import data_path

    from histoflow.core.resample import resize

    a = np.asarray(__import__("tifffile").imread(data_path("wsi", "qptiff", "small_vectra.qptiff"), key=0))
    img = np.dstack([a[:400, :400]] * 3 + [a[400:800, :400]]) if a.ndim == 2 else None
    assert img is not None and img.dtype == np.uint8 and img.shape[2] == 4
    out = resize(img, (200, 200))
    box = img.reshape(200, 2, 200, 2, 4).mean(axis=(1, 3))
    assert np.abs(out.astype(float) - box).max() <= 1


def _area_matrix(n_out, n_in):
    """Rows: the exact area weights of each output pixel over the input pixels along one axis."""
    s, m = n_in / n_out, np.zeros((n_out, n_in))
    for i in range(n_out):
        a, b = i * s, (i + 1) * s
        for k in range(int(a), int(np.ceil(b))):
            m[i, k] = min(b, k + 1) - max(a, k)
    return m / m.sum(axis=1, keepdims=True)


def test_resize_shrinking_one_axis_is_the_area_average_along_it():
    """With one axis shrunk and the other kept (or enlarged), resize used Pillow's bilinear filter, which averages
    a fixed neighbourhood: 58 grey levels from the area average on noise (the docstring promised the area
    average whenever a side shrinks)."""
    from histoflow.core.resample import resize

    img = np.random.default_rng(1).integers(0, 256, (100, 90, 3), dtype=np.uint8)
    for w, h in ((90, 50), (45, 100), (89, 50), (90, 49), (45, 50)):
        want = np.einsum("ij,jkc->ikc", _area_matrix(h, 100), img.astype(float))
        want = np.einsum("lk,ikc->ilc", _area_matrix(w, 90), want)
        assert np.abs(resize(img, (w, h)).astype(float) - want).max() <= 0.5 + 1e-9, (w, h)
    # shrunk along x, enlarged along y: the columns are the area average, the rows then interpolated
    out = resize(img, (45, 200)).astype(float)
    cols = np.einsum("lk,ikc->ilc", _area_matrix(45, 90), img.astype(float))
    assert np.abs(out[1::2][:-1] - (0.75 * cols[:-1] + 0.25 * cols[1:])).max() <= 1.0


def test_resampled_tiles_are_the_exact_area_average_and_overhangs_read_little(tmp_path):
    """Shrinking used Pillow's BOX filter, which gives each source pixel to one output pixel (contents up to
    0.45 px out of place at 2.1 µm/px); and a tile overhanging the slide read its whole region (CMU-1 at 60
    µm/px: one 30782 px square read, 2.9 GB, 22 s)."""
    import resource

    import cv2

    from histoflow import SlideData

    from datafiles import SVS

    with SlideData(SVS) as s:
        spec = s.grid(256, mpp=0.6)[10]            # about 308 -> 256 px: a ratio of 1.2
        (ox, oy), r = spec.origin, spec.downsample
        x0, y0 = int(ox * r), int(oy * r)
        region = s.reader.read_region((x0, y0), 0, (int(np.ceil((ox + 256) * r)) - x0,
                                                     int(np.ceil((oy + 256) * r)) - y0)).astype(np.float64)

        def weights(o, lo, n_src):  # row j: how much of each source pixel output pixel o + j covers
            edges = (o + np.arange(257)) * r - lo   # in the slide's resampled grid, not the tile's own
            a, b = edges[:-1, None], edges[1:, None]
            px = np.arange(n_src)[None, :]
            return np.clip(np.minimum(b, px + 1) - np.maximum(a, px), 0, None) / r

        wy, wx = weights(oy, y0, region.shape[0]), weights(ox, x0, region.shape[1])
        want = np.einsum("ij,jkc,lk->ilc", wy, region, wx, optimize=True)     # the exact area average
        got = s.read_tile(spec).image.astype(np.float64)
        assert np.abs(got - want).max() <= 0.51 and np.abs(got - want).mean() < 0.3
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tiles = list(s.generate_tiles(256, mpp=60))     # one tile, 30782 px of level 0 square
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000   # KiB: not 2.9 GB
        t = tiles[0]
        assert t.extent == (19, 25) and (t.image[30:, 30:] == 255).all()
        small = cv2.resize(s.reader.read_region((0, 0), 0, s.dimensions), None, fx=256 / 30782, fy=256 / 30782,
                           interpolation=cv2.INTER_AREA)
        # the pixels wholly inside the slide (the last row and column average the slide's part of them only);
        # OpenCV rounds its sums its own way: a grey level apart now and then
        d = t.image[:small.shape[0] - 1, :small.shape[1] - 1].astype(int) - small[:-1, :-1]
        assert np.abs(d).max() <= 1 and (d != 0).mean() < 0.01


def test_grid_arguments_are_checked_by_name():
    for kw, message in (({"tile_size": "abc"}, "tile_size must be a whole number"),
                        ({"tile_size": None}, "tile_size must be a whole number"),
                        ({"tile_size": 100.9}, "tile_size must be a whole number"),
                        ({"level": 0.5}, "level must be a whole number"),
                        ({"min_coverage": "x", "mask": np.ones((3, 3))}, "min_coverage is a fraction"),
                        ({"mask": np.zeros((0, 0))}, "non-empty 2-D array")):
        kw = {"tile_size": 256, **kw}
        with pytest.raises(RegionError, match=message):
            TileGrid((2220, 2967), kw.pop("tile_size"), **kw)
    with pytest.raises(RegionError, match=r"pixels are not square \(0.5 x 0.25 µm\)"):
        TileGrid((2220, 2967), 256, mpp=1.0, slide_mpp=(0.5, 0.25))
    assert TileGrid((2220, 2967), 256, mpp=1.0, slide_mpp=(0.5, 0.502)).downsample == 2.0


def test_negative_levels_count_from_the_last_as_read_region_takes_them():
    """read_region((0, 0), -1, ...) reads the last level and its error names -1..-n; grid(level=-1) was refused."""
    g = TileGrid((17760, 23736), 256, level=-1, level_downsamples=[1.0, 4.0, 16.0])
    assert g.level == 2 and g.downsample == 16.0
    assert TileGrid((17760, 23736), 256, level=-3, level_downsamples=[1.0, 4.0, 16.0]).level == 0
    with pytest.raises(RegionError, match=r"level -4 does not exist \(the slide has 3: 0..2, or -1..-3 from the last\)"):
        TileGrid((17760, 23736), 256, level=-4, level_downsamples=[1.0, 4.0, 16.0])


def test_a_mask_reaching_past_the_slide_covers_no_padding():
    """A mask's last pixel usually reaches past the slide (ceil(w0 / downsample) pixels): an edge tile counted its
    padding as covered (34 % inside the slide, coverage 0.5: kept at min_coverage 0.5), and its tile mask marked
    the padding as tissue."""
    from histoflow.core.slide import SlideMask

    g = TileGrid((1000, 900), 256, mask=np.ones((15, 16), bool), mask_downsample=64, min_coverage=0.5)
    last = g.spec(g.rows - 1, g.cols - 1)  # x 768..1024 of 1000, y 768..1024 of 900
    assert g.mask_filter.fraction(last.x, last.y, 256, 256) == pytest.approx((232 / 256) * (132 / 256))
    assert g.mask_filter.fraction(0, 0, 256, 256) == 1.0
    assert [(t.row, t.col) for t in g][-1] == (3, 2)  # the corner tile (46 % inside) is no longer kept
    m = SlideMask(np.ones((15, 16), np.uint8), 64.0)
    crop = m.crop(768, 768, 256, 256, (256, 256), (1000, 900))
    assert crop[:132, :232].all() and not crop[132:].any() and not crop[:, 232:].any()
    assert m.crop(768, 768, 256, 256, (256, 256))[:192].all()  # without the slide's size: as before (mask to 960)


def test_the_mask_filter_keeps_the_tiles_their_own_coverage_keeps():
    """The filter measures every tile's coverage at once (a Python call a tile took 3 minutes before a
    2.4-million-tile grid began): the same tiles as each tile's own coverage() keeps, on random grids and masks."""
    rng, kept = np.random.default_rng(0), []
    for trial in range(12):
        w, h = int(rng.integers(500, 6000)), int(rng.integers(500, 6000))
        mds = float(rng.choice([1, 4, 16, 64, 7.3]))
        mask = rng.random((int(np.ceil(h / mds)) + int(rng.integers(0, 2)),
                           int(np.ceil(w / mds)) + int(rng.integers(0, 2)))) < rng.random()
        g = TileGrid((w, h), int(rng.choice([64, 256, 300])), overlap=int(rng.choice([0, 32])), slide_mpp=0.5,
                     mpp=rng.choice([None, 0.7, 1.3]), level_downsamples=[1.0], mask=mask, mask_downsample=mds,
                     min_coverage=float(rng.choice([0, 0.25, 0.5])))
        own = [(t.row, t.col) for t in (g.spec(r, c) for r in range(g.rows) for c in range(g.cols))
               if g.coverage(t) > 1e-9 and g.coverage(t) >= g.min_coverage - 1e-9]
        assert [(t.row, t.col) for t in g] == own, trial
        kept.append(len(own) / (g.rows * g.cols))
    assert min(kept) < 0.5 < max(kept)  # grids mostly dropped and mostly kept

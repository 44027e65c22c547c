"""Rule-based phenotypes: the expression parser, table checks, the shipped presets, and the MIBI image."""
import builtins
import itertools
import os

import anndata
import numpy as np
import pandas as pd
import pytest
from datafiles import data_path

from histoflow.cells import gate
from histoflow.cells.rules import (ExpressionError, RuleError, RuleTable, Step, list_presets, load_preset,
                                   parse_expression)
from histoflow.errors import HistoflowError

MIBI = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")

# the nucleus_subtype markers, spelled the way a panel might spell them (aliases and loose matching)
PANEL = {"CD45": "CD45", "PanCK": "Pan-Keratin", "NaKATPase": "NaK ATPase (175)", "CD3d": "CD3",
         "CD20": "CD20", "CD68": "CD68", "CD11B": "CD11b", "Lysozyme": "LYZ", "CD4": "CD4", "CD8": "CD8",
         "Muc2": "MUC2", "CgA": "Chromogranin A", "Sox9": "SOX9", "OLFM4": "OLFM4", "Vimentin": "Vimentin",
         "SMA": "aSMA"}
MARKERS = list(PANEL)


def cell_table(patterns, channels=None):
    """AnnData whose positivity layer has the given sets of positive (table) markers, one cell each."""
    channels = channels or [PANEL[m] for m in MARKERS]
    pos = np.zeros((len(patterns), len(channels)), dtype=bool)
    for i, p in enumerate(patterns):
        for m in p:
            pos[i, MARKERS.index(m)] = True
    ad = anndata.AnnData(pos.astype(np.float32), obs=pd.DataFrame(index=[f"c{i}" for i in range(len(patterns))]))
    ad.var_names = channels
    ad.layers["positive"] = pos
    return ad


# ----------------------------------------------------------------------------------------------------------
# the 31-step preset: one or more cells per step
# ----------------------------------------------------------------------------------------------------------

# (positive markers, expected class, expected deciding step; 0 = default)
V = "Vimentin"  # immune cells are kept only when stromal too (Vimentin+, SMA-), as in the source's rules
CASES = [
    ({"PanCK", "Vimentin"}, "excluded", 3),
    ({"CgA", "SMA"}, "excluded", 3),
    ({"CD45", "CD68", "CD3d", V}, "excluded", 5),
    ({"CD45", "CD68", "CD11B", "Lysozyme", V}, "excluded", 5),
    ({"CD11B", "CD20", V}, "excluded", 6),
    ({"CD45", "CD20", "CD3d", V}, "excluded", 7),
    ({"CD45", "CD3d", "CD4", "CD8", V}, "excluded", 8),
    (set(), "excluded", 10),
    ({"CD45", "CD3d", "CD4"}, "excluded", 11),    # no stromal marker
    ({"Sox9"}, "excluded", 11),
    ({"PanCK", "Muc2", "CgA"}, "excluded", 12),
    ({"PanCK", "Muc2", "OLFM4"}, "excluded", 12),
    ({"PanCK", "CgA", "Sox9"}, "excluded", 13),
    ({"CD45", V, "SMA"}, "excluded", 14),
    ({"CD45", "Sox9", V}, "excluded", 15),
    ({"PanCK", "CD45"}, "excluded", 16),
    ({"PanCK", "Muc2"}, "goblet", 17),
    ({"Muc2"}, "goblet", 17),
    ({"NaKATPase", "CgA"}, "endocrine", 18),
    ({"PanCK"}, "epithelial", 19),
    ({"PanCK", "NaKATPase"}, "epithelial", 19),
    ({"SMA"}, "fibroblast", 21),
    ({"SMA", V}, "fibroblast", 21),
    ({V}, "stromal", 22),
    ({"Lysozyme", V}, "myeloid", 23),
    ({"CD45", "Lysozyme", V}, "myeloid", 23),
    ({"CD45", "CD3d", "CD4", V}, "helper T", 24),
    ({"CD4", V}, "helper T", 24),
    ({"CD45", "CD3d", "CD8", V}, "cytotoxic T", 25),
    ({"CD45", "CD3d", V}, "T cell receptor", 26),
    ({"CD45", "CD11B", V}, "monocyte", 27),
    ({"CD45", "CD68", "Lysozyme", V}, "macrophage", 28),
    ({"CD45", "CD20", V}, "B", 29),
    ({"CD45", V}, "leukocyte", 30),
    ({"PanCK", "Sox9"}, "progenitor", 31),
    ({"OLFM4", "SMA"}, "progenitor", 31),
]


def test_nucleus_subtype_preset_every_step():
    table = load_preset("nucleus_subtype")
    assert len(table.steps) == 31
    expected_classes = {"goblet", "endocrine", "epithelial", "progenitor", "fibroblast", "stromal", "monocyte",
                        "macrophage", "helper T", "cytotoxic T", "T cell receptor", "B", "myeloid", "leukocyte"}
    assigned = {s.name for s in table.steps if s.kind == "assign"}
    assert assigned == expected_classes and len(assigned) == 14

    ad = cell_table([p for p, _, _ in CASES])
    counts = table.apply(ad)
    got = list(zip(ad.obs["phenotype"].astype(str), ad.obs["phenotype_step"]))
    want = [(c, s) for _, c, s in CASES]
    bad = [(sorted(p), g, w) for (p, _, _), g, w in zip(CASES, got, want) if g != w]
    assert not bad, bad
    # every decisive step decided at least one cell; every group step holds at least one cell
    decided = set(ad.obs["phenotype_step"])
    assert decided >= {s.index for s in table.steps if s.kind != "group"}
    _, _, groups = table.evaluate(ad.layers["positive"], list(ad.var_names), return_groups=True)
    assert [g for g, m in groups.items() if not m.any()] == []
    assert len(groups) + len(decided - {0}) == 31
    assert sum(counts.values()) == len(CASES)
    assert all(counts[c] > 0 for c in expected_classes)


def _oracle(p):
    """The nucleus_subtype logic in plain Python, as the source script writes it (a union of exclusions, then
    final classes as independent conditions), independently of the rule engine."""
    has = p.__contains__
    epi = bool(p & {"NaKATPase", "PanCK", "CgA", "Muc2"})
    stroma = bool(p & {"Vimentin", "SMA"})
    immune = bool(p & {"CD45", "CD3d", "CD4", "CD8", "CD20", "CD68", "CD11B", "Lysozyme"})
    prog = bool(p & {"Sox9", "OLFM4"})
    lymph_myelo = {"CD3d", "CD20", "CD4", "CD8"}
    excluded = any([
        epi and stroma,
        has("CD68") and bool(p & (lymph_myelo | {"CD11B"})),
        has("CD11B") and bool(p & (lymph_myelo | {"CD68"})),
        has("CD20") and bool(p & {"CD3d", "CD4", "CD8"}),
        has("CD4") and has("CD8"),
        not (epi or stroma),
        has("Muc2") and (immune or stroma or prog or has("CgA")),
        has("CgA") and (immune or stroma or prog),
        has("SMA") and immune,
        prog and immune,
        epi and immune,
    ])
    t_or_prog = bool(p & {"CD3d", "CD4", "CD8"}) or prog
    finals = {
        "goblet": has("Muc2") and epi and not prog,
        "endocrine": has("CgA") and epi and not prog,
        "epithelial": epi and not (has("CgA") or has("Muc2") or prog),
        "fibroblast": stroma and not immune and has("SMA") and not prog,
        "stromal": stroma and not immune and not has("SMA") and not prog,
        "myeloid": immune and has("Lysozyme") and not (p & {"CD68", "CD11B", "CD20", "CD3d", "CD8", "CD4"}),
        "helper T": immune and has("CD4") and not prog,
        "cytotoxic T": immune and has("CD8") and not prog,
        "T cell receptor": immune and has("CD3d") and not has("CD4") and not has("CD8"),
        "monocyte": immune and has("CD11B") and not t_or_prog,
        "macrophage": immune and has("CD68") and not t_or_prog,
        "B": immune and has("CD20") and not (has("CD68") or t_or_prog),
        "leukocyte": immune and has("CD45") and not (p & {"CD20", "CD68", "CD3d", "CD4", "CD8", "CD11B", "Lysozyme"})
        and not prog,
        "progenitor": prog,
    }
    if excluded:
        return "excluded"
    hits = [c for c, on in finals.items() if on]
    assert len(hits) <= 1, (sorted(p), hits)  # the final classes never overlap once conflicts are excluded
    return hits[0] if hits else "unassigned"


def test_nucleus_subtype_preset_matches_plain_python_on_all_patterns():
    patterns = [{m for m, on in zip(MARKERS, bits) if on} for bits in itertools.product((0, 1), repeat=len(MARKERS))]
    ad = cell_table(patterns)
    load_preset("nucleus_subtype").apply(ad)
    got = ad.obs["phenotype"].astype(str).to_numpy()
    want = np.array([_oracle(p) for p in patterns])
    assert (got == want).all(), [(sorted(p), g, w) for p, g, w in zip(patterns, got, want) if g != w][:5]


# ----------------------------------------------------------------------------------------------------------
# aliases and panels
# ----------------------------------------------------------------------------------------------------------

def test_alias_resolution():
    table = RuleTable([{"assign": "epithelial", "when": "PanCK and not CD45"}], aliases={"PanCK": ["PanKeratin", "KRT8"]})
    for spelled in ("Pan-Keratin", "PanKeratin (171)", "pan keratin", "PANCK", "KRT8"):
        assert table.validate([spelled, "CD45"]) == {"PanCK": spelled, "CD45": "CD45"}
    ad = cell_table([{"PanCK"}, {"PanCK", "CD45"}, set()])
    ad = ad[:, ["Pan-Keratin", "CD45"]].copy()
    assert table.apply(ad) == {"epithelial": 1, "unassigned": 2}
    assert list(ad.obs["phenotype"]) == ["epithelial", "unassigned", "unassigned"]
    rules = ad.uns["phenotype_rules"]
    assert dict(zip(rules["markers"], rules["channels"])) == {"PanCK": "Pan-Keratin", "CD45": "CD45"}
    # an exact channel name wins over a loose match; an ambiguous loose match is an error
    assert table.validate(["PanCK", "Pan-CK", "CD45"])["PanCK"] == "PanCK"
    with pytest.raises(RuleError, match="several channels"):
        table.validate(["Pan-CK", "pan_ck", "CD45"])


def test_preset_listing_and_mibi_table_fits_the_panel():
    assert {"nucleus_subtype", "mibi_panel"} <= set(list_presets())
    with pytest.raises(RuleError, match="no preset rule table 'nope'.*nucleus_subtype"):
        load_preset("nope")
    import tifffile
    with tifffile.TiffFile(MIBI) as tf:
        names = [p.tags["PageName"].value for p in tf.pages]
    mapping = load_preset("mibi_panel").validate(names)
    assert mapping["PanKeratin"] == "PanKeratin (171)" and mapping["CD45"] == "CD45 (169)"
    # the colon table does not fit this panel, and says which marker is missing
    with pytest.raises(RuleError, match=r"step 1 \(.*\): unknown marker 'CgA'.*Channels: Background \(128\)"):
        load_preset("nucleus_subtype").validate(names)


# ----------------------------------------------------------------------------------------------------------
# errors before evaluation
# ----------------------------------------------------------------------------------------------------------

def test_unknown_marker_names_marker_step_and_channels():
    table = RuleTable([{"group": "T", "when": "CD3"}, {"assign": "helper T", "when": "T and CD4 and not FOXP3"}])
    with pytest.raises(RuleError) as e:
        table.validate(["CD3", "CD4", "CD8"])
    msg = str(e.value)
    assert "FOXP3" in msg and "step 2" in msg and "CD3, CD4, CD8" in msg
    assert isinstance(e.value, HistoflowError) and isinstance(e.value, ValueError)
    # apply validates before touching obs
    ad = cell_table([{"CD3d"}], channels=None)
    with pytest.raises(RuleError, match="FOXP3"):
        table.apply(ad)
    assert "phenotype" not in ad.obs


def test_circular_groups_are_named():
    with pytest.raises(RuleError, match=r"circular group definition: A -> B -> A \(steps 1, 2\)"):
        RuleTable([{"group": "A", "when": "B and CD3"}, {"group": "B", "when": "A or CD4"},
                   {"assign": "x", "when": "A"}])
    with pytest.raises(RuleError, match=r"circular group definition: A -> A \(step 1\)"):
        RuleTable([{"group": "A", "when": "A or CD3"}])
    with pytest.raises(RuleError, match=r"B -> C -> D -> B"):
        RuleTable([{"group": "A", "when": "B"}, {"group": "B", "when": "C"}, {"group": "C", "when": "D"},
                   {"group": "D", "when": "B or CD3"}])


def test_group_used_before_definition_and_duplicates():
    with pytest.raises(RuleError, match=r"step 1: group 'T' is used before it is defined \(at step 2\)"):
        RuleTable([{"assign": "T cell", "when": "T"}, {"group": "T", "when": "CD3"}])
    with pytest.raises(RuleError, match=r"step 3: group 'T' is already defined at step 1"):
        RuleTable([{"group": "T", "when": "CD3"}, {"assign": "T cell", "when": "T"}, {"group": "T", "when": "CD4"}])
    with pytest.raises(RuleError, match="same name as channel"):
        RuleTable([{"group": "CD3", "when": "CD4 and CD8"}, {"assign": "x", "when": "CD3"}]).validate(["CD3", "CD4", "CD8"])


@pytest.mark.parametrize("expr, where", [
    ("CD3 and and CD4", "position 8"),
    ("CD3 CD4", "position 4"),
    ("(CD3 or CD4", "expected '\\)'"),
    ("CD3 or CD4)", "position 10"),
    ("not", "found the end"),
    ("CD3+ and CD4", "unexpected character '\\+'"),
    ("", "empty expression"),
    ("__import__('os')", "found '\\('"),
    ("__import__('os').system('echo pwned')", "unexpected character '\\.'"),
    ("lambda: 1", "unexpected character ':'"),
    ("CD3; import os", "unexpected character ';'"),
    ("[c for c in ()]", "unexpected character '\\['"),
])
def test_bad_expressions_are_rejected_by_the_parser(expr, where, monkeypatch):
    calls = []
    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda *a, **k: calls.append(a[0]) or real_import(*a, **k))
    with pytest.raises(ExpressionError, match=where):
        RuleTable([{"assign": "x", "when": expr}])
    monkeypatch.undo()
    assert "os" not in calls


def test_dotted_dunder_names_are_only_names():
    # a word with dots is a (strange) marker name, never an attribute access; validation refuses it
    table = RuleTable([{"assign": "x", "when": "CD3.__class__"}])
    with pytest.raises(RuleError, match="unknown marker 'CD3.__class__'"):
        table.validate(["CD3"])


def test_parser_precedence_and_quoted_names():
    assert parse_expression("a or b and not c") == ("or", (("name", "a"), ("and", (("name", "b"), ("not", ("name", "c"))))))
    assert parse_expression("(a or b) and c")[0] == "and"
    assert parse_expression("'NaK ATPase' AND Not CD45") == ("and", (("name", "NaK ATPase"), ("not", ("name", "CD45"))))
    ad = cell_table([{"NaKATPase"}, {"NaKATPase", "CD45"}, {"CD45"}])
    table = RuleTable([{"assign": "epi", "when": "'NaK ATPase (175)' and not CD45"},
                       {"assign": "imm", "when": "CD45 or CD3 or (CD4 and CD8)"}])
    table.apply(ad)
    assert list(ad.obs["phenotype"]) == ["epi", "imm", "imm"]
    with pytest.raises(ExpressionError, match="deeper"):
        parse_expression("(" * 100 + "CD3" + ")" * 100)


# ----------------------------------------------------------------------------------------------------------
# table structure, files, apply
# ----------------------------------------------------------------------------------------------------------

def test_order_semantics_first_decisive_step_wins():
    table = RuleTable([
        {"group": "T", "when": "CD3"},
        {"exclude": "T and CD20"},
        {"assign": "helper T", "when": "T and CD4"},
        {"assign": "T cell", "when": "T"},
        {"assign": "CD4 cell", "when": "CD4"},
    ], default="other", excluded="conflict")
    ad = cell_table([{"CD3d", "CD4"}, {"CD3d"}, {"CD3d", "CD20", "CD4"}, {"CD4"}, set()])
    counts = table.apply(ad, key="cls")
    assert list(ad.obs["cls"]) == ["helper T", "T cell", "conflict", "CD4 cell", "other"]
    assert list(ad.obs["cls_step"]) == [3, 4, 2, 5, 0]
    assert list(ad.obs["cls"].cat.categories) == ["helper T", "T cell", "CD4 cell", "conflict", "other"]
    assert counts == {"helper T": 1, "T cell": 1, "CD4 cell": 1, "conflict": 1, "other": 1}


def test_python_api_steps_and_yaml_round_trip(tmp_path):
    steps = [Step("group", "T", "CD3"), {"assign": "T cell", "when": "T", "note": "any T"}]
    table = RuleTable(steps, aliases={"CD3": "CD3e"}, name="tiny")
    assert table.aliases == {"CD3": ["CD3e"]}
    path = tmp_path / "tiny.yaml"
    table.to_yaml(path)
    back = RuleTable.from_yaml(path)
    assert back.to_dict() == table.to_dict()
    assert [s.describe() for s in back.steps] == ["1: group T = CD3", "2: assign 'T cell' when T"]
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


@pytest.mark.parametrize("text, match", [
    ("steps: [{group: T, when: CD3}]\nstep: []\n", "unknown key.*step"),
    ("steps: [{group: T, assign: x, when: CD3}]\n", "exactly one of"),
    ("steps: [{assign: x}]\n", "missing 'when'"),
    ("steps: [{exclude: CD3, when: CD4}]\n", "unknown key.*when"),
    ("steps: [{group: 'two words', when: CD3}]\n", "single word"),
    ("steps: [{group: and, when: CD3}]\n", "single word"),
    ("name: x\n", "no 'steps'"),
    ("steps: [\n", "not valid YAML"),
    ("steps: [{group: T, when: CD3}]\nsteps: [{group: B, when: CD20}]\n", "found the key 'steps' a second time"),
    ("steps: []\n", "at least one step"),
    ("aliases: [CD3]\nsteps: [{assign: x, when: CD3}]\n", "aliases must be a mapping"),
])
def test_yaml_structure_errors(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RuleError, match=match) as e:
        RuleTable.from_yaml(path)
    assert str(path) in str(e.value) or "YAML" in str(e.value)


def test_apply_requires_gated_channels():
    table = RuleTable([{"assign": "T cell", "when": "CD3"}])
    ad = cell_table([{"CD3d"}, set()])
    del ad.layers["positive"]
    with pytest.raises(RuleError, match="run histoflow.cells.gate"):
        table.apply(ad)
    ad.X = np.array([[0.0] * 16, [1.0] * 16], dtype=np.float32)
    gate(ad, method="manual", thresholds={"CD4": 0.5}, channels=["CD4"], by=None)
    with pytest.raises(RuleError, match="channel 'CD3', which was not gated"):
        table.apply(ad)


# ----------------------------------------------------------------------------------------------------------
# the real MIBI image
# ----------------------------------------------------------------------------------------------------------

def mibi_cell_table(grow=2):
    """A quick cell table of the MIBI field of view: HH3 nuclei (smoothed, Otsu, seeded watershed), grown
    by ``grow`` pixels, mean counts per channel. Deliberately simple; the real segmentation lives elsewhere."""
    import tifffile
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu
    from skimage.segmentation import watershed

    with tifffile.TiffFile(MIBI) as tf:
        names = [p.tags["PageName"].value for p in tf.pages]
        img = np.stack([p.asarray() for p in tf.pages])
    hh3 = ndi.gaussian_filter(img[names.index("HH3 (89)")].astype(np.float32), 2.0)
    mask = ndi.binary_opening(hh3 > threshold_otsu(hh3))
    peaks = peak_local_max(hh3, min_distance=8, labels=ndi.label(mask)[0], exclude_border=False)
    markers = np.zeros(hh3.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    nuclei = watershed(-hh3, markers, mask=mask)
    sizes = np.bincount(nuclei.ravel())
    keep = sizes >= 40
    keep[0] = False
    _, nuclei = np.unique(np.where(keep[nuclei], nuclei, 0), return_inverse=True)
    nuclei = nuclei.reshape(hh3.shape)
    n = int(nuclei.max())
    dist, (iy, ix) = ndi.distance_transform_edt(nuclei == 0, return_indices=True)
    cells = np.where(dist <= grow, nuclei[iy, ix], 0).ravel()
    area = np.bincount(cells, minlength=n + 1)[1:]
    X = np.stack([np.bincount(cells, weights=c.ravel(), minlength=n + 1)[1:] / area for c in img], axis=1)
    centroids = ndi.center_of_mass(np.ones_like(nuclei), nuclei, np.arange(1, n + 1))
    spatial = np.array([(x, y) for y, x in centroids])
    ad = anndata.AnnData(X.astype(np.float32),
                         obs=pd.DataFrame({"slide": "fov8", "tile": 0}, index=[f"cell{i}" for i in range(n)]))
    ad.var_names = names
    ad.obsm["spatial"] = spatial
    return ad


def test_mibi_image_otsu_and_mibi_panel_table():
    ad = mibi_cell_table()
    pos = gate(ad, method="otsu")
    table = load_preset("mibi_panel")
    counts = table.apply(ad)
    print("\nMIBI fov8:", ad.n_obs, "cells; class counts (Otsu, mibi_panel):", counts)

    assert ad.n_obs > 300
    assert sum(counts.values()) == ad.n_obs
    assert sum(v > 0 for k, v in counts.items() if k not in ("excluded", "unassigned")) >= 6
    cls = ad.obs["phenotype"].astype(str).to_numpy()
    epi_classes = {"epithelial", "proliferating epithelial"}
    immune_classes = {"helper T", "cytotoxic T", "T cell", "B", "leukocyte"}
    col = {c.split(" (")[0]: i for i, c in enumerate(ad.var_names)}
    panck = pos[:, col["PanKeratin"]]
    is_epi = np.isin(cls, list(epi_classes))
    # PanKeratin+ cells: epithelial unless excluded as a CD45 conflict; never immune or connective
    assert not np.isin(cls[panck], list(immune_classes | {"fibroblast", "stromal", "unassigned"})).any()
    kept = panck & (cls != "excluded")
    assert is_epi[kept].all() and kept.sum() > 50
    assert is_epi[panck].mean() > 0.4
    # and they are where the epithelial cells are: enriched far above PanKeratin- cells
    assert is_epi[panck].mean() > 4 * is_epi[~panck].mean()
    # class intensities make sense: epithelial cells carry more keratin than immune cells,
    # T cells more CD3 than epithelial cells
    X = ad.X
    assert X[is_epi, col["PanKeratin"]].mean() > 2 * X[np.isin(cls, list(immune_classes)), col["PanKeratin"]].mean()
    t_cells = np.isin(cls, ["helper T", "cytotoxic T", "T cell"])
    assert X[t_cells, col["CD3"]].mean() > X[is_epi, col["CD3"]].mean()
    # the step that decided each cell is recorded and consistent with its class
    steps = ad.obs["phenotype_step"].to_numpy()
    for s in table.steps:
        if s.kind == "assign":
            assert set(cls[steps == s.index]) <= {s.name}
    assert set(cls[steps == 0]) <= {"unassigned"}

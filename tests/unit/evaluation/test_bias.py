"""The bias report: sites from patient ids, lesion-size tertiles, flagged subgroups (plausibility, downstream)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from medsynth.config.analysis import TCGA_SITE, AnalysisConfig
from medsynth.evaluation.bias import downstream_by_group, plausibility_by_group, site_labels, site_of, size_tertiles


def test_site_from_tcga_patient_ids() -> None:
    assert site_of("TCGA_CS_4941_19960909", TCGA_SITE) == "CS"
    assert site_of("TCGA_HT_7602_19951103", TCGA_SITE) == "HT"
    assert site_of("phantom_003", TCGA_SITE) is None
    assert site_of("hosp-B/p12", r"hosp-\w") == "hosp-B"  # no group: the whole match
    assert site_labels(["TCGA_CS_1_2", "TCGA_DU_5_6", "x"], TCGA_SITE) == ["CS", "DU", "other"]
    assert site_labels(["phantom_000", "phantom_001"], TCGA_SITE) == ["all", "all"]
    assert site_labels(["TCGA_CS_1_2"], None) == ["all"]
    with pytest.raises(ValidationError, match="not a regular expression"):
        AnalysisConfig(site_pattern="TCGA_(")


def test_size_tertiles_split_lesion_items_in_thirds() -> None:
    groups, edges = size_tertiles([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert groups[:2] == ["none", "none"]
    assert groups[2:] == ["small"] * 3 + ["medium"] * 3 + ["large"] * 3
    assert edges is not None and edges[0] == pytest.approx(1 + 8 / 3) and edges[1] == pytest.approx(1 + 16 / 3)
    assert size_tertiles([0, 0]) == (["none", "none"], None)


def _plausibility_items(bad_site: int) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """6 patients x 4 items: 3 lesion items + 1 lesion-free each; site A (patients 0-2) or B (3-5)."""
    rng = np.random.default_rng(0)
    patients, sites = [], []
    dr, ds, fr, fs, cr, cs = [], [], [], [], [], []
    for p in range(6):
        site = "A" if p < 3 else "B"
        for k in range(4):
            patients.append(f"p{p}")
            sites.append(site)
            if k < 3:
                d = 0.8 + 0.05 * rng.standard_normal()
                bad = (site == "A") == (bad_site == 0)
                dr.append(d)
                ds.append(d * (0.5 if bad else 1.0))
                fr.append(np.nan)
                fs.append(np.nan)
                cr.append(0.3)
                cs.append(0.3)
            else:
                dr.append(np.nan)
                ds.append(np.nan)
                fr.append(0.0)
                fs.append(1.0 if p == 0 else 0.0)
                cr.append(np.nan)
                cs.append(np.nan)
    items = {
        "dice_real": dr,
        "dice_synth": ds,
        "fp_real": fr,
        "fp_synth": fs,
        "contrast_real": cr,
        "contrast_synth": cs,
    }
    return {k: np.asarray(v) for k, v in items.items()}, patients, sites


def test_the_subgroup_below_the_dice_target_is_flagged() -> None:
    items, patients, sites = _plausibility_items(bad_site=0)
    rows = plausibility_by_group(items, patients, {"site": sites}, 0.95, 0.8, n_boot=200)
    by = {(r["grouping"], r["group"]): r for r in rows}
    assert list(by) == [("all", "all"), ("site", "A"), ("site", "B")]
    a, b = by[("site", "A")], by[("site", "B")]
    assert a["dice_ratio"]["value"] == pytest.approx(0.5)
    assert a["dice_ratio"]["hi"] < 0.95 and a["flags"] == ["Dice ratio < 0.95"]
    assert b["dice_ratio"]["value"] == pytest.approx(1.0) and b["flags"] == []
    assert a["n_items"] == 12 and a["n_patients"] == 3
    assert a["fp_synth"]["value"] == pytest.approx(1 / 3) and b["fp_synth"]["value"] == 0.0
    assert a["contrast_ratio"]["value"] == pytest.approx(1.0)
    # the other site bad instead: the flag follows it
    items, patients, sites = _plausibility_items(bad_site=1)
    rows = plausibility_by_group(items, patients, {"site": sites}, 0.95, 0.8, n_boot=200)
    assert [r["group"] for r in rows if r["flags"] and r["grouping"] == "site"] == ["B"]


def test_a_one_patient_subgroup_is_na_and_never_flagged() -> None:
    items, patients, _ = _plausibility_items(bad_site=0)
    sites = ["A" if p == "p0" else "B" for p in patients]  # site A: one (bad) patient
    rows = plausibility_by_group(items, patients, {"site": sites}, 0.95, 0.8, n_boot=50, min_patients=2)
    a = next(r for r in rows if r["group"] == "A")
    assert a["dice_ratio"]["value"] is None and a["dice_ratio"]["na"] == "n/a (needs >= 2 patients, has 1)"
    assert a["flags"] == []


def test_downstream_subgroups_below_the_whole_test_set_are_flagged() -> None:
    n_pat, per = 8, 4
    patients = [f"p{p}" for p in range(n_pat) for _ in range(per)]
    sites = ["A" if int(p[1:]) < 4 else "B" for p in patients]
    presence = np.array([1, 1, 1, 0] * n_pat)
    seg = [0.3 if s == "A" and y else 0.9 if y else None for s, y in zip(sites, presence, strict=True)]
    rng = np.random.default_rng(1)
    # presence: site B separates perfectly, site A not at all
    prob = [float(rng.uniform()) if s == "A" else (0.9 if y else 0.1) for s, y in zip(sites, presence, strict=True)]
    cells = [
        {
            "cell": f"seg-{s}",
            "task": "segmentation",
            "arm": "real",
            "fraction": 1.0,
            "ratio": 0,
            "seed": s,
            "test_scores": seg,
        }
        for s in (0, 1)
    ] + [
        {"cell": "pres", "task": "presence", "arm": "real", "fraction": 1.0, "ratio": 0, "seed": 0, "test_scores": prob}
    ]
    sizes = ["small" if i % 2 else "large" for i in range(len(patients))]
    sizes = [g if y else "none" for g, y in zip(sizes, presence, strict=True)]
    rows = downstream_by_group(cells, presence, patients, {"site": sites, "lesion size": sizes}, n_boot=200)
    seg_rows = {(r["grouping"], r["group"]): r for r in rows if r["task"] == "segmentation"}
    assert seg_rows[("all", "all")]["n_seeds"] == 2
    assert seg_rows[("site", "A")]["score"]["value"] == pytest.approx(0.3)
    assert seg_rows[("site", "A")]["flags"] and not seg_rows[("site", "B")]["flags"]
    pres = {(r["grouping"], r["group"]): r for r in rows if r["task"] == "presence"}
    assert pres[("site", "B")]["score"]["value"] == pytest.approx(1.0) and not pres[("site", "B")]["flags"]
    assert pres[("lesion size", "small")]["score"]["value"] is not None  # lesion items vs every lesion-free item
    assert ("lesion size", "none") not in pres and ("lesion size", "none") not in seg_rows  # no lesion: no score
    with pytest.raises(ValueError, match="test scores for"):
        downstream_by_group(cells, presence[:-1], patients[:-1], {})

"""Plausibility report: exact per-label values on hand-made predictions, empty/FP handling, rows, worst-case figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from medsynth.evaluation.plausibility import contrast_report, plausibility_report, worst_cases_figure, worst_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LABELS = {0: "background", 1: "tumour", 2: "brain"}


def _case(tumour: bool) -> np.ndarray:
    m = np.zeros((1, 10, 10), np.uint8)
    m[0, 1:9, 1:9] = 2
    if tumour:
        m[0, 3:5, 3:5] = 1  # 4 voxels
    return m


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    # 6 cases, 3 patients; cases 4 and 5 (patient C) have no tumour
    masks = np.stack([_case(i < 4) for i in range(6)])
    pred_real = masks.copy()  # perfect on real images
    pred_synth = masks.copy()
    pred_synth[1, 0, 3, 3] = 2  # tumour 3 of 4 voxels: Dice 2*3/(3+4)
    pred_synth[2][pred_synth[2] == 1] = 2  # tumour missed: Dice 0
    pred_synth[5, 0, 6:8, 6:8] = 1  # a 4-voxel tumour where the mask has none: false positive
    pats = ["A", "A", "B", "B", "C", "C"]
    ids = [f"case{i}" for i in range(6)]
    return masks, pred_real, pred_synth, pats, ids


def test_report_values() -> None:
    masks, pred_real, pred_synth, pats, ids = _data()
    rep = plausibility_report(pred_real, pred_synth, masks, pats, ids, LABELS, n_boot=200, seed=0, fp_min_voxels=2)
    t = rep["per_label"]["tumour"]
    synth_dice = [1.0, 6 / 7, 0.0, 1.0]
    assert t["n_cases_present"] == 4 and t["n_cases_absent"] == 2
    assert t["dice_real"]["value"] == 1.0
    assert t["dice_synth"]["value"] == pytest.approx(np.mean(synth_dice))
    assert t["ratio"]["value"] == pytest.approx(np.mean(synth_dice))  # real Dice is 1
    assert t["dice_synth"]["n_patients"] == 2  # patient C has no tumour case
    assert t["ratio"]["lo"] <= t["ratio"]["value"] <= t["ratio"]["hi"]
    assert t["difference"]["difference"]["value"] == pytest.approx(np.mean(synth_dice) - 1.0)
    assert t["fp_real"]["value"] == 0.0 and t["fp_synth"]["value"] == 0.5 and t["fp_synth"]["n_false_positive"] == 1
    assert t["n_both_empty_real"] == 2 and t["n_both_empty_synth"] == 1  # case 5 is an FP, not both-empty
    b = rep["per_label"]["brain"]
    assert b["dice_real"]["value"] == 1.0 and b["n_cases_present"] == 6 and b["fp_synth"]["value"] is None
    assert "background" not in rep["per_label"]
    # per-case table: one row per case and label, Dice None where undefined
    rows = {(r["item_id"], r["name"]): r for r in rep["rows"]}
    assert len(rep["rows"]) == 12
    assert rows[("case1", "tumour")]["dice_synth"] == pytest.approx(6 / 7)
    assert rows[("case4", "tumour")]["dice_synth"] is None and not rows[("case4", "tumour")]["label_in_mask"]
    assert rows[("case5", "tumour")]["dice_synth"] == 0.0 and rows[("case5", "tumour")]["fp_synth"]
    json.dumps(rep, allow_nan=False)  # strict JSON: no NaN anywhere
    again = plausibility_report(pred_real, pred_synth, masks, pats, ids, LABELS, n_boot=200, seed=0, fp_min_voxels=2)
    assert again == rep


def test_worst_cases_and_figure(tmp_path: Path) -> None:
    masks, pred_real, pred_synth, pats, ids = _data()
    rep = plausibility_report(pred_real, pred_synth, masks, pats, ids, LABELS, n_boot=50)
    worst = worst_rows(rep["rows"], 2, label=1)
    assert [r["item_id"] for r in worst] == ["case2", "case1"]
    assert all(r["label_in_mask"] for r in worst_rows(rep["rows"], 100))
    rng = np.random.default_rng(0)
    images = rng.random(masks.shape).astype(np.float32)
    png = worst_cases_figure(tmp_path / "worst.png", images, images, masks, pred_real, pred_synth, rep["rows"], n=3)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_mismatched_lengths_are_refused() -> None:
    masks, pred_real, pred_synth, pats, ids = _data()
    with pytest.raises(ValueError, match="patients"):
        plausibility_report(pred_real, pred_synth, masks, pats[:-1], ids, LABELS)
    assert math.isfinite(
        plausibility_report(pred_real, pred_real, masks, pats, ids, [1])["per_label"]["1"]["ratio"]["value"]
    )


def test_contrast_report_real_vs_synthetic() -> None:
    masks, *_ = _data()
    patients = ["A", "A", "B", "B", "C", "C"]
    real = np.where(masks == 1, 0.8, np.where(masks == 2, 0.3, 0.0)).astype(np.float32)  # tumour +0.5
    synth = real.copy()
    synth[:2][masks[:2] == 1] = 0.3  # patient A: the generator ignored the tumour (contrast 0)
    synth[2:4][masks[2:4] == 1] = 0.6  # patient B: drawn at +0.3 (>= half of +0.5: visible)
    rep = contrast_report(real, synth, masks, patients, LABELS, reference=[2], n_boot=50)
    assert set(rep) == {"tumour"}  # the reference label itself is not reported
    t = rep["tumour"]
    assert t["n_cases"] == 4 and t["reference"] == [2]
    assert t["contrast_real"]["value"] == pytest.approx(0.5)
    assert t["contrast_synth"]["value"] == pytest.approx(0.15)
    assert t["ratio"]["value"] == pytest.approx(0.3)
    assert t["visible"]["value"] == pytest.approx(0.5) and t["visible"]["n_patients"] == 2
    # a generator that draws the tumour at the wrong sign is not "visible" however strong
    dark = real.copy()
    dark[masks == 1] = 0.0
    assert contrast_report(real, dark, masks, patients, LABELS, [2], n_boot=10)["tumour"]["visible"]["value"] == 0.0
    # with no reference given, the other foreground (here the brain) is the reference
    assert contrast_report(real, synth, masks, patients, LABELS, None, n_boot=10)["tumour"]["ratio"][
        "value"
    ] == pytest.approx(0.3)


def test_lesion_label_of_the_shipped_configs() -> None:
    from medsynth.config.loader import load_config
    from medsynth.evaluation.validate import contrast_reference, lesion_label

    root = Path(__file__).resolve().parents[3] / "configs"
    lgg = load_config(root / "lgg-2d.yaml")
    assert lesion_label(lgg) == 1  # the label named "tumour", not the derived brain label (2)
    assert contrast_reference(lgg) == [2] and lgg.preprocess.derived_label.index == 2
    demo = load_config(root / "demo.yaml")
    assert lesion_label(demo) == 4 and contrast_reference(demo) is None  # the phantom's lesion
    # synthesis.lesion_label wins; a vocabulary without a lesion-like name gives its highest label
    assert lesion_label(load_config(root / "demo.yaml", ["synthesis.lesion_label=3"])) == 3
    assert lesion_label(load_config(root / "hippocampus-3d.yaml")) == 2

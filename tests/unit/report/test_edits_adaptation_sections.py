"""The whitepaper's counterfactual and site-adaptation sections: rendered from the stage reports, n/a without."""

from __future__ import annotations

from typing import Any

from medsynth.report.collect import ExperimentResults
from medsynth.report.edits_adaptation import adaptation_section, counterfactual_section
from medsynth.tracking.query import PipelineRecord, RunRecord


def _results(stage: str, **reports: Any) -> ExperimentResults:
    parent = RunRecord("p" * 32, "pipeline", "pipeline", "FINISHED", 0, 1, {}, {}, {})
    run = RunRecord("c0ffee12" + "0" * 24, stage, stage, "FINISHED", 0, 1, {}, {}, {})
    pipe = PipelineRecord("sqlite://", "x", "0", parent, {stage: run} if reports else {}, [], [])
    return ExperimentResults(pipe, {}, **reports)


def _est(value: float | None, lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"value": value, "lo": lo, "hi": hi, "ci": 0.95, "n_cases": 4, "n_patients": 3}


CF_REPORT = {
    "n_scans": 4,
    "n_edits": 8,
    "skipped": {"move:6,0": 1},
    "settings": {"steps": 50, "guidance_scale": 1.5, "dilate": 3, "region_noise": 1.0},
    "targets": {"min_ssim_outside": 0.9, "min_dice_ratio": 0.9},
    "per_edit": {
        "remove": {
            "n": 4,
            "ssim_outside": _est(0.93, 0.9, 0.95),
            "fp_rate_removed": _est(0.25, 0.0, 0.5),
            "fp_rate_plain": _est(0.5, 0.25, 0.75),
            "found_rate_real": _est(1.0, 1.0, 1.0),
        },
        "scale:1.5": {
            "n": 4,
            "ssim_outside": _est(0.91, 0.88, 0.94),
            "dice_ratio": _est(0.85, 0.7, 1.0),
            "dice_edit": _est(0.5),
            "dice_plain": _est(0.6),
        },
    },
    "summary": {"ssim_outside": 0.92, "dice_ratio": 0.85, "ssim_met": 1.0, "dice_met": 0.0},
}


def test_counterfactual_section_shows_every_edit_and_the_targets() -> None:
    text = "\n".join(counterfactual_section(_results("counterfactual", counterfactual=CF_REPORT)))
    assert "`c0ffee12`" in text and "8 edits of 4 lesion-bearing test scans" in text
    assert (
        "| `remove` | 4 | 0.930 [0.900, 0.950] | — | 0.250 [0.000, 0.500] "
        "(real scan before the edit 1.000 [1.000, 1.000]; plain synthesis 0.500 [0.250, 0.750]) |" in text
    )
    assert "| `scale:1.5` | 4 | 0.910 [0.880, 0.940] | 0.850 [0.700, 1.000] | — |" in text
    assert "SSIM outside 0.920 (target >= 0.9: met)" in text and "(target >= 0.9: **missed**)" in text
    assert "Skipped (edit impossible on that mask): {'move:6,0': 1}" in text


def test_counterfactual_section_na() -> None:
    assert counterfactual_section(_results("counterfactual"))[0].startswith(
        "n/a: no tracked run of the counterfactual stage"
    )
    na = {**CF_REPORT, "na": "no lesion-bearing test scan could be edited"}
    assert counterfactual_section(_results("counterfactual", counterfactual=na)) == [
        "Run `c0ffee12`: n/a (no lesion-bearing test scan could be edited)."
    ]


def test_adaptation_section_has_a_row_per_cell() -> None:
    rep = {
        "site": "CS",
        "patients": {"adaptation": {"2": ["a", "b"]}, "evaluation": ["c", "d", "e"]},
        "fid_real_floor": 0.02,
        "note": "",
        "rows": [
            {
                "k": 2,
                "method": "none",
                "trainable_params": 0,
                "adapt_seconds": 0.0,
                "dice_ratio": 0.8,
                "dice_ratio_lo": 0.6,
                "dice_ratio_hi": 0.95,
                "fid": 0.05,
            },
            {
                "k": 2,
                "method": "lora",
                "trainable_params": 123456,
                "adapt_seconds": 61.2,
                "dice_ratio": None,
                "dice_ratio_lo": None,
                "dice_ratio_hi": None,
                "fid": 0.04,
            },
        ],
    }
    text = "\n".join(adaptation_section(_results("adaptation", adaptation=rep)))
    assert "trained without site CS" in text and "site's other 3 patients" in text and "floor 0.020" in text
    assert "| 2 | none | 0 | 0.0 | 0.800 [0.600, 0.950] | 0.050 |" in text
    assert "| 2 | lora | 123,456 | 61.2 | n/a | 0.040 |" in text
    assert adaptation_section(_results("adaptation"))[0].startswith("n/a: no tracked run of the adaptation stage")

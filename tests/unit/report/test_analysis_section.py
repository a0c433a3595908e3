"""The whitepaper's latent-map and bias section: rendered from the analysis report, n/a without it."""

from __future__ import annotations

from typing import Any

from medsynth.evaluation.latent_map import coverage, coverage_reading
from medsynth.report.analysis import analysis_section
from medsynth.report.collect import ExperimentResults
from medsynth.tracking.query import PipelineRecord, RunRecord


def _results(analysis: dict[str, Any] | None, with_run: bool = True) -> ExperimentResults:
    parent = RunRecord("p" * 32, "pipeline", "pipeline", "FINISHED", 0, 1, {}, {}, {})
    run = RunRecord("a1b2c3d4" + "0" * 24, "analysis", "analysis", "FINISHED", 0, 1, {}, {}, {})
    pipe = PipelineRecord("sqlite://", "x", "0", parent, {"analysis": run} if with_run else {}, [], [])
    return ExperimentResults(pipe, {}, analysis=analysis)


def _estimate(value: float | None, lo: float | None, hi: float | None) -> dict[str, Any]:
    return {"value": value, "lo": lo, "hi": hi, "ci": 0.95, "n_cases": 10, "n_patients": 3}


def test_section_reads_the_coverage_and_shows_flagged_subgroups() -> None:
    import numpy as np

    train = np.arange(0.0, 50.0, 10.0)[:, None]
    cov = coverage(train + 1.0, train, np.full((5, 1), 0.7))  # synthetic collapsed next to one test item
    cov["reading"] = coverage_reading(cov)
    rep = {
        "n_items": 20,
        "n_patients": 6,
        "targets": {"dice_ratio": 0.95, "contrast_ratio": 0.8},
        "size_edges": [10.0, 30.0],
        "latent_map": {**cov, "embedding": "features", "umap": "drawn"},
        "plausibility": [
            {
                "grouping": "site",
                "group": "CS",
                "n_items": 8,
                "n_patients": 3,
                "dice_ratio": _estimate(0.6, 0.5, 0.7),
                "fp_real": _estimate(0.1, 0.0, 0.2),
                "fp_synth": _estimate(0.2, 0.1, 0.3),
                "contrast_ratio": _estimate(0.9, 0.8, 1.0),
                "flags": ["Dice ratio < 0.95"],
            }
        ],
        "downstream": {"na": None, "rows": []},
    }
    text = "\n".join(analysis_section(_results(rep)))
    assert "collapse onto part of the real test manifold" in text and "`a1b2c3d4`" in text
    assert "| site | CS | 8 / 3 | 0.600 [0.500, 0.700] |" in text and "**Dice ratio < 0.95**" in text
    assert "split at 10 and 30 voxels" in text and "No downstream cell" in text


def test_section_says_na_when_the_stage_did_not_run() -> None:
    assert analysis_section(_results(None))[0].startswith("n/a: no tracked run of the analysis stage")
    assert analysis_section(_results({"n_items": 1}, with_run=False))[0].startswith("n/a")

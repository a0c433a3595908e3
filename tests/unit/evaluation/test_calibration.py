"""Guidance calibration: the documented choice on hand-made sweep tables, and the 'auto' config value."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsynth.config.stages import GuidanceCalibrationConfig, SamplingConfig
from medsynth.errors import ConfigError
from medsynth.evaluation.calibration import choose_guidance, plot_sweep

REAL = {"row": "real images", "guidance": None, "contrast_rel": 1.0, "dice": 0.8}


def row(g: float, dice_rel: float | None, contrast_rel: float | None, fp: float = 0.2) -> dict[str, object]:
    return {"row": f"guidance {g:g}", "guidance": g, "dice_rel": dice_rel, "contrast_rel": contrast_rel, "fp": fp}


def test_calibration_picks_the_smallest_scale_meeting_both_criteria() -> None:
    sweep = [
        REAL,
        row(5.0, 1.10, 2.70),  # recognisable but far too bright
        row(1.0, 0.70, 0.60),  # too faint
        row(1.5, 0.93, 0.85),  # contrast fine, Dice ratio just short
        row(2.0, 0.97, 1.10),  # the documented choice: smallest meeting both
        row(3.0, 1.02, 1.20),  # meets both, but larger
    ]
    choice = choose_guidance(sweep)
    assert choice.scale == 2.0 and choice.met and choice.dice_ratio == 0.97 and choice.contrast_ratio == 1.10
    assert "smallest scale" in choice.reason and "2" in choice.reason
    assert len(choice.rows) == len(sweep)  # the sweep travels with the choice
    # the band edges are inclusive
    assert choose_guidance([row(1.0, 0.95, 1.25), row(2.0, 1.0, 1.0)]).scale == 1.0


def test_calibration_falls_back_to_the_best_trade_off_with_a_reason() -> None:
    sweep = [
        REAL,
        row(1.0, 0.60, 0.70),  # shortfall 0.35 + ln(0.8/0.7) = 0.48
        row(1.5, 0.90, 0.95),  # shortfall 0.05: the best trade-off
        row(3.0, 1.05, 1.60),  # shortfall ln(1.6/1.25) = 0.25
        row(5.0, 1.10, 2.70),
    ]
    choice = choose_guidance(sweep)
    assert choice.scale == 1.5 and not choice.met
    assert "no scale meets" in choice.reason and "best trade-off" in choice.reason
    # contrast is judged on a log scale: 2x too bright is as far off as 2x too dark; ties go to the smaller scale
    tie = choose_guidance([row(2.0, 1.0, 2.5), row(1.0, 1.0, 0.4)])
    assert tie.scale == 1.0
    unmeasured = choose_guidance([row(1.5, None, None), row(3.0, None, 1.0)])
    assert unmeasured.scale == 1.5 and "could be measured" in unmeasured.reason
    with pytest.raises(ValueError):
        choose_guidance([REAL])


def test_guidance_scale_auto_must_be_calibrated(tmp_path: Path) -> None:
    auto = SamplingConfig(guidance_scale="auto")
    with pytest.raises(ConfigError, match="auto"):
        _ = auto.scale
    assert auto.with_scale(2.0).scale == 2.0 and SamplingConfig(guidance_scale=1.5).scale == 1.5
    for bad in ("fast", -1.0):
        with pytest.raises(ValueError):
            SamplingConfig(guidance_scale=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        GuidanceCalibrationConfig(scales=[0.5, 2.0])
    assert GuidanceCalibrationConfig(scales=[3.0, 1.0]).scales == [1.0, 3.0]
    choice = choose_guidance([row(1.0, 0.9, 0.9), row(2.0, 1.0, 1.1)])
    png = plot_sweep(tmp_path / "sweep.png", choice, GuidanceCalibrationConfig())
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_calibrate_guidance_sweeps_the_validation_split_with_a_real_generator(tmp_path: Path) -> None:
    """A tiny untrained generator and segmenter (real classes): one row per scale, a documented choice."""
    import torch

    from benchmarks import common
    from medsynth.data.dataset import ArraySet
    from medsynth.evaluation.calibration import calibrate_guidance
    from medsynth.evaluation.segmenter import Segmenter, build_segmenter
    from tests.unit.test_benchmarks import LABELS, tiny_raw, write_yaml

    torch.set_num_threads(1)
    raw = tiny_raw(2, tmp_path)
    raw["sampling"]["calibration"] = {
        "scales": [1.0, 2.0],
        "n_with": 3,
        "n_free": 1,
        "min_voxels": 10,
        "n_bootstrap": 10,
    }
    cfg = common.load_cfg(write_yaml(tmp_path / "cal.yaml", raw))
    gen = common.random_generator(cfg, 5, torch.device("cpu"))
    seg = Segmenter(build_segmenter(cfg, 5), 5, [16, 16], LABELS).eval()
    masks = torch.full((4, 1, 16, 16), 2, dtype=torch.uint8)
    masks[:3, :, 4:10, 4:10] = 4  # three validation masks hold a 36-voxel lesion, one does not
    val = ArraySet(
        common.random_images(4, [16, 16]), masks, torch.eye(3).repeat(4, 1, 1).numpy(),
        [f"v{i}" for i in range(4)], ["a", "a", "b", "c"], LABELS,
    )  # fmt: skip
    choice = calibrate_guidance(cfg, gen, val, seg)
    assert [r["guidance"] for r in choice.rows] == [None, 1.0, 2.0]  # the real images, then each scale
    assert choice.scale in (1.0, 2.0) and choice.reason.startswith(f"guidance {choice.scale:g}")
    assert choice == choose_guidance(choice.rows)  # the rule, applied to the measured sweep

"""Coverage of real test items by synthetic ones on hand-made point sets with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth.evaluation.latent_map import coverage, coverage_reading, write_map_csv

TRAIN = np.array([[0.0], [10.0], [20.0], [30.0], [40.0]])
TEST = TRAIN + 1.0  # every test item 1 from its nearest train item: tau = 1


def test_coverage_counts_synthetic_nearest_neighbours_within_the_real_radius() -> None:
    synth = np.array([[0.5], [10.5], [100.0], [200.0], [300.0]])  # near test items 0 and 1 only
    cov = coverage(TEST, TRAIN, synth, quantile=0.95)
    assert cov["na"] is None
    assert cov["tau"] == pytest.approx(1.0)
    assert cov["coverage"] == pytest.approx(0.4)  # test items 0, 1: synthetic at 0.5 < 1 = real
    assert cov["recall"] == pytest.approx(0.4)
    assert cov["recall_reference"] == pytest.approx(1.0)
    assert cov["nn_synthetic"] == pytest.approx(0.4)
    assert cov["precision"] == pytest.approx(0.4)  # 0.5 and 10.5 lie within 1 of a test item
    assert cov["precision_reference"] == pytest.approx(1.0)


def test_nearest_synthetic_outside_the_radius_is_not_coverage() -> None:
    synth = TRAIN - 0.5  # test item t = r + 1: d_S = 1.5 > d_R = 1
    cov = coverage(TEST, TRAIN, synth)
    assert cov["coverage"] == 0.0 and cov["nn_synthetic"] == 0.0 and cov["recall"] == 0.0
    # d_R = 1, 1, 1, 1, 5 -> tau (median) = 1; a synthetic item 2 from the last test item is its nearest
    # neighbour (2 < 5) but beyond the radius: nearest-neighbour synthetic, not covered
    test = np.array([[1.0], [11.0], [21.0], [31.0], [45.0]])
    synth2 = np.array([[43.0], [1000.0], [1001.0], [1002.0], [1003.0]])
    cov2 = coverage(test, TRAIN, synth2, quantile=0.5)
    assert cov2["tau"] == pytest.approx(1.0)
    assert cov2["nn_synthetic"] == pytest.approx(0.2)
    assert cov2["coverage"] == 0.0 and cov2["recall"] == 0.0
    cov3 = coverage(test, TRAIN, synth2 + 1.5, quantile=0.5)  # now 0.5 from it: covered
    assert cov3["coverage"] == pytest.approx(0.2)


def test_reading_tells_cover_from_collapse_from_off_manifold() -> None:
    ideal = coverage(TEST, TRAIN, TEST + 0.1)
    assert "cover the real test manifold" in coverage_reading(ideal)
    collapsed = coverage(TEST, TRAIN, np.array([[0.5], [0.6], [0.7], [0.8], [0.9]]))
    assert collapsed["recall"] == pytest.approx(0.2) and collapsed["precision"] == pytest.approx(1.0)
    assert "collapse onto part" in coverage_reading(collapsed)
    off = coverage(TEST, TRAIN, TEST + 1000.0)
    assert "off the real test manifold" in coverage_reading(off)


def test_tiny_sets_are_na_with_the_reason() -> None:
    cov = coverage(TEST, TRAIN, TEST[:2], min_items=5)
    assert cov["coverage"] is None and cov["na"] == "n/a (needs >= 5 synthetic items, has 2)"
    assert coverage_reading(cov) == "Coverage n/a (needs >= 5 synthetic items, has 2)."


def test_map_csv_has_one_row_per_item_and_empty_coordinates_without_a_map(tmp_path) -> None:  # type: ignore[no-untyped-def]
    items = [
        {
            "item_id": "a",
            "set": "real test",
            "patient": "p",
            "site": "CS",
            "lesion": True,
            "lesion_voxels": 3,
            "size_group": "small",
        }
    ]
    text = write_map_csv(tmp_path / "m.csv", None, items).read_text(encoding="utf-8").splitlines()
    assert text[0].startswith("item_id,set,patient,site") and text[1].endswith(",,")
    text = write_map_csv(tmp_path / "m.csv", np.array([[1.0, 2.0]]), items).read_text(encoding="utf-8").splitlines()
    assert text[1].endswith("1.00000,2.00000")

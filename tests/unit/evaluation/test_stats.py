"""Patient-level bootstrap: coverage and width on a known distribution, patients move together, ratio, tests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medsynth.evaluation.stats import (
    bootstrap_mean,
    bootstrap_ratio,
    bootstrap_replicates,
    format_mean_sd,
    mean_sd,
    paired_comparison,
)


def test_bootstrap_ci_on_normal_samples_contains_mean_and_has_expected_width() -> None:
    rng = np.random.default_rng(1)
    n, mu, sigma = 400, 2.0, 3.0
    x = rng.normal(mu, sigma, n)
    est = bootstrap_mean(x, [f"p{i}" for i in range(n)], n_boot=2000, seed=0)  # one case per patient
    assert est.lo < mu < est.hi
    assert est.lo < est.value < est.hi and est.value == pytest.approx(x.mean())
    assert est.hi - est.lo == pytest.approx(2 * 1.96 * sigma / math.sqrt(n), rel=0.2)
    assert (est.n_cases, est.n_patients, est.ci) == (n, n, 0.95)


def test_bootstrap_is_deterministic_given_seed() -> None:
    rng = np.random.default_rng(2)
    x, pats = rng.random(50), [f"p{i % 7}" for i in range(50)]
    assert bootstrap_mean(x, pats, seed=3) == bootstrap_mean(x, pats, seed=3)
    assert bootstrap_mean(x, pats, seed=3) != bootstrap_mean(x, pats, seed=4)


def test_resampling_moves_a_patients_cases_together() -> None:
    # patient A: 1 case of value 0; patient B: 9 cases of value 1. Resampling patients can only give
    # means of (A,A)=0, (B,B)=1 or (A,B)=(0+9)/10=0.9; resampling cases would give 0.1, 0.2, ...
    values = [0.0] + [1.0] * 9
    pats = ["A"] + ["B"] * 9
    reps = bootstrap_replicates(values, pats, n_boot=500, seed=0)
    assert set(np.round(reps, 12)) == {0.0, 0.9, 1.0}
    assert bootstrap_mean(values, pats).value == pytest.approx(0.9)  # mean over cases, not over patients


def test_patient_clustering_widens_the_interval() -> None:
    # 10 patients x 20 identical slices each: the information is 10 values, not 200
    rng = np.random.default_rng(5)
    per_patient = rng.normal(0.7, 0.1, 10)
    values = np.repeat(per_patient, 20)
    by_patient = bootstrap_mean(values, [f"p{i // 20}" for i in range(200)], n_boot=2000)
    by_case = bootstrap_mean(values, [f"c{i}" for i in range(200)], n_boot=2000)
    assert by_patient.n_patients == 10 and by_case.n_patients == 200
    expected = 2 * 1.96 * per_patient.std(ddof=1) / math.sqrt(10)
    assert by_patient.hi - by_patient.lo == pytest.approx(expected, rel=0.35)
    assert (by_patient.hi - by_patient.lo) > 3 * (by_case.hi - by_case.lo)


def test_nan_cases_are_dropped() -> None:
    est = bootstrap_mean([1.0, np.nan, 3.0], ["a", "b", "c"], n_boot=100)
    assert est.value == 2.0 and est.n_cases == 2 and est.n_patients == 2
    assert math.isnan(bootstrap_mean([np.nan], ["a"]).value)
    assert bootstrap_mean([np.nan], ["a"]).to_json()["value"] is None


def test_ratio_of_paired_means_with_ci() -> None:
    rng = np.random.default_rng(3)
    real = rng.uniform(0.6, 0.9, 120)
    synth = 0.8 * real + rng.normal(0, 0.01, 120)
    pats = [f"p{i // 3}" for i in range(120)]
    r = bootstrap_ratio(synth, real, pats, n_boot=1000, seed=0)
    assert r.value == pytest.approx(synth.mean() / real.mean())
    assert r.lo < 0.8 < r.hi and r.hi - r.lo < 0.02  # paired: the shared case variation cancels
    # a case missing in either member of the pair is left out of both means
    s2 = synth.copy()
    s2[0] = np.nan
    assert bootstrap_ratio(s2, real, pats).value == pytest.approx(synth[1:].mean() / real[1:].mean())
    assert math.isnan(bootstrap_ratio([1.0, 1.0], [0.0, 0.0], ["a", "b"]).value)


@pytest.mark.parametrize("test", ["wilcoxon", "permutation"])
def test_paired_comparison(test: str) -> None:
    rng = np.random.default_rng(4)
    a = rng.uniform(0.5, 0.9, 60)
    pats = [f"p{i // 2}" for i in range(60)]
    worse = paired_comparison(a - 0.1, a, pats, test=test, n_resamples=999)  # type: ignore[arg-type]
    assert worse["difference"]["value"] == pytest.approx(-0.1)
    assert worse["difference"]["lo"] == pytest.approx(-0.1) == worse["difference"]["hi"]  # a constant shift
    assert worse["p_value"] < 0.01 and worse["n_patients"] == 30
    noise = paired_comparison(a + rng.normal(0, 0.05, 60), a, pats, test=test, n_resamples=999)  # type: ignore[arg-type]
    assert noise["p_value"] > 0.01 and noise["difference"]["lo"] < 0 < noise["difference"]["hi"]
    assert paired_comparison(a, a, pats, test=test)["p_value"] == 1.0  # type: ignore[arg-type]
    again = paired_comparison(a - 0.1, a, pats, test=test, n_resamples=999)  # type: ignore[arg-type]
    assert again == worse


def test_mean_sd() -> None:
    m, s = mean_sd([1.0, 2.0, 3.0, np.nan])
    assert (m, s) == (2.0, 1.0)
    assert format_mean_sd([1.0, 2.0, 3.0], 2) == "2.00 ± 1.00"
    assert math.isnan(mean_sd([1.0])[1])


def test_table_formatting_of_values_and_estimates() -> None:
    from medsynth.evaluation.stats import format_estimate, format_value

    assert format_value(0.12345) == "0.123" and format_value(3) == "3" and format_value(None) == "n/a"
    assert format_value(float("nan"), missing="–") == "–"
    assert format_estimate({"value": 0.9, "lo": 0.85, "hi": None}) == "0.900 [0.850, n/a]"
    assert format_estimate({"value": None}) == "n/a"


def test_holm_adjust_matches_hand_computation() -> None:
    from medsynth.evaluation.stats import holm_adjust

    # m = 4 tests (None is not a test): sorted 0.01, 0.02, 0.03, 0.2 -> 0.04, 0.06, 0.06 (monotone), 0.2
    got = holm_adjust([0.03, None, 0.01, 0.2, 0.02])
    assert got[1] is None
    assert got == pytest.approx([0.06, None, 0.04, 0.2, 0.06])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm_adjust([]) == []


def test_bootstrap_p_value_and_effect_size() -> None:
    from medsynth.evaluation.stats import bootstrap_p_value, cohens_dz, patient_weights, percentile_interval

    assert bootstrap_p_value(np.full(99, 0.5)) == pytest.approx(2 / 100)
    assert bootstrap_p_value(np.linspace(-1, 1, 101)) == pytest.approx(1.0)
    lo, hi = percentile_interval(np.arange(101.0), 0.9)
    assert (lo, hi) == pytest.approx((5.0, 95.0))
    pats = ["a", "a", "b", "c"]
    w = patient_weights(pats, 20, 0)
    assert w.shape == (20, 4) and np.all(w[:, 0] == w[:, 1]) and np.all(w.sum(1) >= 3)
    d = cohens_dz([1.0, 1.0, 2.0, 3.5], [0.0, 0.0, 0.5, 1.0], pats)  # per-patient diffs 1, 1.5, 2.5
    assert d == pytest.approx(np.mean([1, 1.5, 2.5]) / np.std([1, 1.5, 2.5], ddof=1))
    assert math.isnan(cohens_dz([1.0], [0.0], ["a"]))

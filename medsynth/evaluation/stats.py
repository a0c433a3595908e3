"""Patient-level statistics: bootstrap confidence intervals, paired ratios and paired tests.

Slices (or crops) of one patient are not independent, so every interval here resamples PATIENTS
with replacement, never cases. Definition used throughout (point estimate and replicates alike):
**the mean over all cases of the (resampled) patients** — a patient drawn twice contributes its
cases twice, a patient with more cases weighs more. With one case per patient this is the
ordinary bootstrap of the mean. Cases whose value is NaN (e.g. Dice where a label is absent from
both prediction and mask) are dropped first, and patients left without cases with them.

Intervals are percentile bootstrap intervals; every function is deterministic given ``seed``.
The p-value of :func:`paired_comparison` is computed on per-patient mean differences (patients are
the independent units).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from medsynth.na import needs

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap confidence interval.

    Attributes:
        value: Point estimate on the original data.
        lo: Lower bound of the interval.
        hi: Upper bound.
        ci: Confidence level.
        n_cases: Cases used (non-NaN).
        n_patients: Patients with at least one case.
    """

    value: float
    lo: float
    hi: float
    ci: float
    n_cases: int
    n_patients: int

    def to_json(self) -> dict[str, Any]:
        """JSON-compatible dict (NaN → None)."""
        return {k: _json_float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


MIN_PATIENTS_CI = 2
"""A bootstrap interval needs at least this many patients (one patient always resamples to itself)."""


def _json_float(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _nan_estimate(ci: float) -> Estimate:
    return Estimate(float("nan"), float("nan"), float("nan"), ci, 0, 0)


def _group(
    columns: Sequence[npt.ArrayLike], patients: Sequence[str]
) -> tuple[list[FloatArray], npt.NDArray[np.float64], int]:
    """Per-patient sums of each column (NaN rows dropped), per-patient case counts, and cases kept."""
    cols = [np.asarray(c, dtype=np.float64).ravel() for c in columns]
    n = len(patients)
    if any(c.shape[0] != n for c in cols):
        raise ValueError(f"values and patients differ in length ({[c.shape[0] for c in cols]} vs {n})")
    keep = np.ones(n, dtype=bool)
    for c in cols:
        keep &= np.isfinite(c)
    pats = np.asarray(list(patients), dtype=object)[keep]
    uniq, inv = np.unique(pats.astype(str), return_inverse=True) if pats.size else (np.array([]), np.array([], int))
    sums = [np.bincount(inv, weights=c[keep], minlength=len(uniq)).astype(np.float64) for c in cols]
    counts = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    return sums, counts, int(keep.sum())


def _draws(n_patients: int, n_boot: int, seed: int) -> npt.NDArray[np.float64]:
    """``(n_boot, n_patients)`` multiplicities of each patient in each resample (patients drawn with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_patients, np.full(n_patients, 1.0 / n_patients), size=n_boot).astype(np.float64)


def _interval(reps: FloatArray, ci: float) -> tuple[float, float]:
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return float("nan"), float("nan")
    a = (1.0 - ci) / 2.0
    lo, hi = np.percentile(reps, [100 * a, 100 * (1 - a)])
    return float(lo), float(hi)


def bootstrap_replicates(
    values: npt.ArrayLike, patients: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> FloatArray:
    """The ``n_boot`` bootstrap replicates of the mean: each the mean over all cases of resampled patients."""
    (sums,), counts, n_cases = _group([values], patients)
    if n_cases == 0:
        return np.full(n_boot, np.nan)
    w = _draws(len(counts), n_boot, seed)
    return np.asarray((w @ sums) / (w @ counts), dtype=np.float64)


def bootstrap_mean(
    values: npt.ArrayLike, patients: Sequence[str], n_boot: int = 1000, ci: float = 0.95, seed: int = 0
) -> Estimate:
    """Mean of per-case ``values`` with a patient-level bootstrap interval (see module doc).

    Args:
        values: One value per case (NaN cases are dropped).
        patients: Patient id of each case.
        n_boot: Bootstrap resamples.
        ci: Confidence level.
        seed: Seed of the resampling.

    Returns:
        An :class:`Estimate` (all NaN when no case is left).
    """
    (sums,), counts, n_cases = _group([values], patients)
    if n_cases == 0:
        return _nan_estimate(ci)
    lo, hi = float("nan"), float("nan")
    if len(counts) >= MIN_PATIENTS_CI:  # one patient: no interval (it would have zero width)
        lo, hi = _interval(bootstrap_replicates(values, patients, n_boot, seed), ci)
    return Estimate(float(sums.sum() / counts.sum()), lo, hi, ci, n_cases, len(counts))


def bootstrap_ratio(
    numerator: npt.ArrayLike,
    denominator: npt.ArrayLike,
    patients: Sequence[str],
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Ratio of two paired means, ``mean(numerator) / mean(denominator)``, with a patient-level bootstrap CI.

    Both means are taken over the SAME cases (those where both values are finite) and, in each
    replicate, over the same resampled patients — e.g. synthetic Dice / real Dice of one segmenter.
    A replicate whose denominator mean is 0 gives no ratio and is left out of the interval.
    """
    (s_num, s_den), counts, n_cases = _group([numerator, denominator], patients)
    if n_cases == 0 or s_den.sum() == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), ci, n_cases, len(counts))
    lo, hi = float("nan"), float("nan")
    if len(counts) >= MIN_PATIENTS_CI:
        w = _draws(len(counts), n_boot, seed)
        num, den = w @ s_num, w @ s_den
        with np.errstate(divide="ignore", invalid="ignore"):
            reps = np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)
        lo, hi = _interval(reps, ci)
    return Estimate(float(s_num.sum() / s_den.sum()), lo, hi, ci, n_cases, len(counts))


def patient_means(values: npt.ArrayLike, patients: Sequence[str]) -> tuple[list[str], FloatArray]:
    """Per-patient mean of the non-NaN case values (patients sorted by id; patients with none left out)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    keep = np.isfinite(v)
    pats = [p for p, k in zip(patients, keep, strict=True) if k]
    uniq = sorted(set(pats))
    idx = {p: i for i, p in enumerate(uniq)}
    inv = np.array([idx[p] for p in pats], dtype=np.int64)
    sums = np.bincount(inv, weights=v[keep], minlength=len(uniq))
    cnt = np.bincount(inv, minlength=len(uniq))
    return uniq, sums / np.maximum(cnt, 1)


def paired_comparison(
    a: npt.ArrayLike,
    b: npt.ArrayLike,
    patients: Sequence[str],
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    test: Literal["wilcoxon", "permutation"] = "wilcoxon",
    n_resamples: int = 9999,
) -> dict[str, Any]:
    """Paired comparison of two per-case measurements (e.g. Dice on synthetic vs on real images).

    The mean difference ``a - b`` over cases with both values gets a patient-level bootstrap interval.
    The p-value tests "no difference" on the per-patient mean differences (patients are the
    independent units): ``scipy.stats.wilcoxon`` (signed-rank) or ``scipy.stats.permutation_test``
    with paired sign flips (``permutation_type='samples'``, seeded).

    Returns:
        ``{"mean_a", "mean_b", "difference": Estimate JSON, "p_value", "test", "n_patients", "unit"}``;
        the p-value is NaN with fewer than 2 patients, 1 when every patient difference is 0.
    """
    av = np.asarray(a, dtype=np.float64).ravel()
    bv = np.asarray(b, dtype=np.float64).ravel()
    both = np.isfinite(av) & np.isfinite(bv)
    av, bv = np.where(both, av, np.nan), np.where(both, bv, np.nan)
    diff = bootstrap_mean(av - bv, patients, n_boot, ci, seed)
    _, pa = patient_means(av, patients)
    _, pb = patient_means(bv, patients)
    d = pa - pb
    p_value = float("nan")
    if d.size >= 2:
        if np.allclose(d, 0.0):
            p_value = 1.0
        elif test == "wilcoxon":
            from scipy.stats import wilcoxon

            p_value = float(wilcoxon(pa, pb).pvalue)
        else:
            p_value = _paired_permutation_p(pa, pb, seed, n_resamples)
    return {
        "mean_a": _json_float(float(np.nanmean(av))) if both.any() else None,
        "mean_b": _json_float(float(np.nanmean(bv))) if both.any() else None,
        "difference": diff.to_json(),
        "p_value": _json_float(p_value),
        "test": test,
        "n_patients": int(d.size),
        "unit": "patient (p-value); cases of resampled patients (interval)",
    }


def _paired_permutation_p(x: FloatArray, y: FloatArray, seed: int, n_resamples: int) -> float:
    from scipy.stats import permutation_test

    def stat(u: FloatArray, v: FloatArray, axis: int = -1) -> FloatArray:
        return np.asarray(np.mean(u - v, axis=axis), dtype=np.float64)

    kwargs: dict[str, Any] = {"permutation_type": "samples", "n_resamples": n_resamples, "vectorized": True}
    try:
        res = permutation_test((x, y), stat, rng=np.random.default_rng(seed), **kwargs)
    except TypeError:  # scipy < 1.15 names the generator random_state
        res = permutation_test((x, y), stat, random_state=np.random.default_rng(seed), **kwargs)
    return float(res.pvalue)


def mean_sd(values: npt.ArrayLike) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1) of the non-NaN values (NaN when too few)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    mean = float(v.mean()) if v.size else float("nan")
    sd = float(v.std(ddof=1)) if v.size > 1 else float("nan")
    return mean, sd


def format_mean_sd(values: npt.ArrayLike, digits: int = 3) -> str:
    """``"0.812 ± 0.034"`` for the non-NaN values."""
    m, s = mean_sd(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def format_value(v: Any, digits: int = 3, missing: str = "n/a") -> str:
    """A table cell: floats with ``digits`` decimals, ``missing`` for None/NaN, other values as text."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return missing
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_estimate(e: dict[str, Any], digits: int = 3) -> str:
    """``"value [lo, hi]"`` of an :class:`Estimate` as JSON (``n/a`` when it has no value).

    An estimate from fewer than :data:`MIN_PATIENTS_CI` patients shows its value with
    ``[CI n/a (needs >= 2 patients, has 1)]``.
    """
    if e.get("value") is None:
        n = e.get("n_cases")
        return needs(1, "case with the label") if n == 0 else "n/a"
    n_pat = e.get("n_patients")
    if e.get("lo") is None and isinstance(n_pat, int) and n_pat < MIN_PATIENTS_CI:
        return f"{format_value(e['value'], digits)} [CI {needs(MIN_PATIENTS_CI, 'patients', n_pat)}]"
    lo, hi = format_value(e.get("lo"), digits), format_value(e.get("hi"), digits)
    return f"{format_value(e['value'], digits)} [{lo}, {hi}]"


# --------------------------------------------------------------------------------------------------
# metric-level bootstrap (metrics that are not a mean over cases, e.g. AUROC), multiplicity, effect size


def patient_weights(patients: Sequence[str], n_boot: int = 1000, seed: int = 0) -> FloatArray:
    """``(n_boot, n_cases)`` case weights of the patient bootstrap: each case weighted by how often its
    patient is drawn in each resample (the same draws as :func:`bootstrap_replicates` for these patients).

    For metrics that are not a mean over cases (AUROC): compute the metric once per row of weights.
    """
    uniq, inv = np.unique(np.asarray(list(patients), dtype=str), return_inverse=True)
    if uniq.size == 0:
        return np.zeros((n_boot, 0), dtype=np.float64)
    return np.asarray(_draws(len(uniq), n_boot, seed)[:, inv], dtype=np.float64)


def percentile_interval(replicates: npt.ArrayLike, ci: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (non-finite replicates dropped; NaN when none is left)."""
    return _interval(np.asarray(replicates, dtype=np.float64).ravel(), ci)


def bootstrap_p_value(delta_replicates: npt.ArrayLike) -> float:
    """Two-sided bootstrap p-value of "difference = 0": ``min(1, 2 min(P*(Δ <= 0), P*(Δ >= 0)))`` with
    the +1 correction, consistent with the percentile interval of the same replicates (NaN when none)."""
    r = np.asarray(delta_replicates, dtype=np.float64).ravel()
    r = r[np.isfinite(r)]
    if r.size == 0:
        return float("nan")
    lo = (1 + np.sum(r <= 0)) / (r.size + 1)
    hi = (1 + np.sum(r >= 0)) / (r.size + 1)
    return float(min(1.0, 2 * min(lo, hi)))


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values of one family of tests (None/NaN entries are not tests and stay None).

    The ``k``-th smallest of ``m`` p-values becomes ``max_{j <= k} min(1, (m - j + 1) p_(j))``
    (step-down; controls the family-wise error rate).
    """
    idx = [i for i, p in enumerate(p_values) if p is not None and math.isfinite(p)]
    out: list[float | None] = [None] * len(p_values)
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda j: float(p_values[j]))):  # type: ignore[arg-type]
        adj = min(1.0, (m - rank) * float(p_values[i]))  # type: ignore[arg-type]
        running = max(running, adj)
        out[i] = running
    return out


def cohens_dz(a: npt.ArrayLike, b: npt.ArrayLike, patients: Sequence[str]) -> float:
    """Paired standardised effect size: mean / sd (ddof 1) of the per-patient mean differences ``a - b``.

    Cases where either value is NaN are dropped. NaN with fewer than 2 patients or zero spread.
    """
    av = np.asarray(a, dtype=np.float64).ravel()
    bv = np.asarray(b, dtype=np.float64).ravel()
    _, d = patient_means(np.where(np.isfinite(av) & np.isfinite(bv), av - bv, np.nan), patients)
    if d.size < 2:
        return float("nan")
    sd = float(d.std(ddof=1))
    return float(d.mean() / sd) if sd > 0 else float("nan")

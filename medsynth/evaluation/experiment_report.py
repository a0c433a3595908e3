"""Summary of the downstream experiment: per-(task, arm, fraction, ratio) statistics, table and figure.

**Statistics** (:func:`summarise`, all through :mod:`medsynth.evaluation.stats`). Per ``(task, arm,
fraction, ratio)``: mean ± sd over seeds of each metric, and a percentile bootstrap interval over
TEST PATIENTS (the units a new test set would resample) of the **seed-mean primary metric**: each
replicate resamples patients with replacement (all of a patient's items; multiplicity as case
weights, :func:`~medsynth.evaluation.stats.patient_weights`), recomputes every seed's metric on the
resample and averages over seeds. For AUROC this is the weighted Mann-Whitney AUROC per seed; for
Dice the per-case Dice averaged over seeds (:func:`~medsynth.evaluation.stats.bootstrap_mean`).

The paired comparison is with the **baseline** of the row: the real-only ratio-0 cell of the same task
and fraction, except for synthetic data on top of classical augmentation (``real_classical`` at ratio r
> 0), whose baseline is classical augmentation alone (``real_classical`` at ratio 0) — the question a
user who already augments asks. It uses the same seeds and the same resampled patients for both: the
difference of the seed means (the effect size on the metric's own scale), its bootstrap interval and a
p-value — for AUROC the two-sided bootstrap p-value
(:func:`~medsynth.evaluation.stats.bootstrap_p_value`), for Dice the Wilcoxon signed-rank test on
per-patient mean differences (:func:`~medsynth.evaluation.stats.paired_comparison`), with Cohen's d_z of
those differences as the standardised effect size. p-values are Holm-adjusted across the fractions of
each (task, arm, ratio)
(:func:`~medsynth.evaluation.stats.holm_adjust`).

:func:`real_only_growth` checks that the real-only arm grows with the real fraction (no step down
below the previous fraction's interval, and the largest fraction above the smallest one's interval): a task model
whose score does not grow with its data cannot measure what synthetic data adds, and the report says
so.
"""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from medsynth.config.experiment import Task
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet
from medsynth.evaluation.cells import (
    CellRecord,
    presence_labels,
    resolve_target_label,
    segmentation_target,
)
from medsynth.evaluation.classifier import weighted_auroc
from medsynth.evaluation.stats import (
    bootstrap_mean,
    bootstrap_p_value,
    cohens_dz,
    format_value,
    holm_adjust,
    mean_sd,
    paired_comparison,
    patient_weights,
    percentile_interval,
)
from medsynth.fileio import write_text_atomic
from medsynth.na import needs

__all__ = [
    "SUMMARY_CSV",
    "SUMMARY_MD",
    "GrowthCheck",
    "SummaryRow",
    "real_only_growth",
    "row_from_flat",
    "summarise",
    "write_summary",
]

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
METRICS: dict[str, list[str]] = {
    "presence": ["auroc", "sens_at_spec90", "balanced_accuracy", "f1", "balanced_accuracy_youden", "f1_youden"],
    "segmentation": ["dice", "fp_rate"],
}
PRIMARY: dict[str, str] = {"presence": "auroc", "segmentation": "dice"}


class SummaryRow(BaseModel):
    """One (task, arm, fraction, ratio) of the grid summary (one row of ``summary.csv``).

    Attributes:
        means / sds: Per metric, mean and sd over seeds (None where undefined).
        ci_lo, ci_hi: Patient-bootstrap interval of the seed-mean primary metric.
        delta_vs_real, delta_lo, delta_hi: Paired difference with the row's baseline cell of the same
            task and fraction, and its interval (None for the real-only ratio-0 cell itself).
        baseline: What the Δ is against: 'real' (real only, ratio 0) or 'real_classical' (classical
            augmentation alone, for synthetic data on top of classical augmentation).
        p_value: Its p-value; p_holm: Holm-adjusted across the fractions of (task, arm, ratio).
        effect_dz: Cohen's d_z of per-patient differences (segmentation), else None.
        chosen_step_mean: Mean over seeds of the early-stopping step kept.
        external_mean, external_lo, external_hi: Primary metric on the external test set, when given.
    """

    model_config = ConfigDict(frozen=True)

    task: Task
    arm: str
    fraction: float
    ratio: int
    n_seeds: int
    n_real_patients: float
    n_real: float
    n_synthetic: float
    synthetic_with_replacement: bool
    metric: str
    means: dict[str, float | None]
    sds: dict[str, float | None]
    ci: float
    ci_lo: float | None = None
    ci_hi: float | None = None
    delta_vs_real: float | None = None
    delta_lo: float | None = None
    delta_hi: float | None = None
    p_value: float | None = None
    p_holm: float | None = None
    effect_dz: float | None = None
    paired_seeds: int = 0
    baseline: str = "real"
    chosen_step_mean: float | None = None
    external_mean: float | None = None
    external_lo: float | None = None
    external_hi: float | None = None

    @property
    def mean(self) -> float | None:
        """Seed mean of the primary metric."""
        return self.means.get(self.metric)

    def flat(self) -> dict[str, Any]:
        """The CSV row: scalar fields plus ``<metric>_mean`` / ``<metric>_sd`` columns."""
        out: dict[str, Any] = {}
        for k, v in self.model_dump().items():
            if k in ("means", "sds"):
                continue
            out[k] = v
            if k == "metric":
                for name in self.means:
                    out[f"{name}_mean"] = self.means[name]
                    out[f"{name}_sd"] = self.sds.get(name)
        return out


def row_from_flat(flat: dict[str, Any]) -> SummaryRow:
    """A :class:`SummaryRow` from a ``summary.csv`` row (as read back; empty cells as None or "")."""
    clean = {k: (None if v == "" else v) for k, v in flat.items()}
    task = clean.get("task") or ("presence" if clean.get("auroc_mean") is not None else "segmentation")
    names = [n for n in METRICS[str(task)] if f"{n}_mean" in clean]
    fields = {k: v for k, v in clean.items() if k in SummaryRow.model_fields and v is not None}
    fields.update(
        task=task,
        metric=clean.get("metric") or PRIMARY[str(task)],
        means={n: clean.get(f"{n}_mean") for n in names},
        sds={n: clean.get(f"{n}_sd") for n in names},
        ci=clean.get("ci") or 0.95,
        synthetic_with_replacement=str(clean.get("synthetic_with_replacement")).lower() == "true",
    )
    return SummaryRow.model_validate(fields)


class GrowthCheck(BaseModel):
    """Does the real-only arm of a task grow with the real fraction (within its CI)?"""

    model_config = ConfigDict(frozen=True)

    task: str
    grows: bool | None
    message: str


def _clean(v: float | None) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


def _scores(values: Sequence[float | None] | None) -> npt.NDArray[np.float64]:
    return np.array([np.nan if v is None else float(v) for v in values or []], dtype=np.float64)


def arm_order(arm: str) -> int:
    """Sort key of the arms: real, real + classical augmentation, synthetic only."""
    return {"real": 0, "real_classical": 1, "synthetic_only": 2}.get(arm, 3)


class _Scorer:
    """Seed-mean primary metric of a set of cells and its patient-bootstrap replicates on one split."""

    def __init__(self, split: ArraySet, task: Task, cfg: MedsynthConfig, external: bool = False) -> None:
        ec = cfg.experiment
        self.task, self.split, self.ec, self.external = task, split, ec, external
        self.y: npt.NDArray[np.int64] | None = None
        self.w: npt.NDArray[np.float64] | None = None
        if task == "presence":
            target = resolve_target_label(split.labels, ec.target_label)
            self.y = presence_labels(split.masks, target, ec.min_target_voxels)
            self.w = patient_weights(split.patients, ec.n_bootstrap, ec.bootstrap_seed)

    def scores(self, rec: CellRecord) -> npt.NDArray[np.float64]:
        return _scores(rec.external_scores if self.external else rec.test_scores)

    def reps(self, recs: Sequence[CellRecord]) -> npt.NDArray[np.float64]:
        """Presence: ``(n_boot,)`` seed-mean AUROC replicates."""
        assert self.y is not None and self.w is not None
        return np.asarray(np.mean([weighted_auroc(self.y, self.scores(r), self.w) for r in recs], axis=0))

    def point(self, recs: Sequence[CellRecord]) -> float:
        if self.task == "presence":
            assert self.y is not None
            return float(np.mean([weighted_auroc(self.y, self.scores(r))[0] for r in recs]))
        cases = self.case_mean(recs)
        finite = cases[np.isfinite(cases)]
        return float(finite.mean()) if finite.size else float("nan")  # the mean over cases, as bootstrap_mean

    def case_mean(self, recs: Sequence[CellRecord]) -> npt.NDArray[np.float64]:
        return np.asarray(np.mean([self.scores(r) for r in recs], axis=0), np.float64)

    def interval(self, recs: Sequence[CellRecord]) -> tuple[float, float]:
        ec = self.ec
        if self.task == "presence":
            return percentile_interval(self.reps(recs), ec.ci)
        est = bootstrap_mean(self.case_mean(recs), self.split.patients, ec.n_bootstrap, ec.ci, ec.bootstrap_seed)
        return est.lo, est.hi


def summarise(
    records: list[CellRecord],
    test: ArraySet,
    task: Task,
    cfg: MedsynthConfig,
    external: ArraySet | None = None,
) -> list[SummaryRow]:
    """One row per ``(arm, fraction, ratio)`` of one task: seed mean ± sd of each metric, the
    patient-bootstrap interval of the seed-mean primary metric, and the paired comparison with the
    real-only ratio-0 cell of the same fraction, Holm-adjusted across fractions (see the module doc).

    Args:
        records: Cell records of this task (``test_scores`` over the items of ``test``).
        test: The evaluated test items (labels and patients).
        task: 'presence' or 'segmentation'.
        cfg: Resolved config (``experiment.n_bootstrap``, ``ci``, ``bootstrap_seed``).
        external: The evaluated external test items, when the cells scored one.
    """
    ec = cfg.experiment
    groups: dict[tuple[str, float, int], dict[int, CellRecord]] = {}
    for rec in records:
        groups.setdefault((rec.arm, rec.fraction, rec.ratio), {})[rec.seed] = rec
    scorer = _Scorer(test, task, cfg)
    ext = _Scorer(external, task, cfg, external=True) if external is not None else None
    names = METRICS[task]
    metric = PRIMARY[task]
    rows: list[SummaryRow] = []
    for (arm, fraction, ratio), by_seed in sorted(
        groups.items(), key=lambda kv: (arm_order(kv[0][0]), kv[0][1], kv[0][2])
    ):
        seeds = sorted(by_seed)
        recs = [by_seed[s] for s in seeds]
        means: dict[str, float | None] = {}
        sds: dict[str, float | None] = {}
        for name in names:
            m, s = mean_sd([np.nan if r.metrics.get(name) is None else float(r.metrics[name] or 0) for r in recs])
            means[name], sds[name] = _clean(m), _clean(s)
        lo, hi = scorer.interval(recs)
        row: dict[str, Any] = {
            "task": task,
            "arm": arm,
            "fraction": fraction,
            "ratio": ratio,
            "n_seeds": len(seeds),
            "n_real_patients": float(np.mean([r.n_real_patients for r in recs])),
            "n_real": float(np.mean([r.n_real for r in recs])),
            "n_synthetic": float(np.mean([r.n_synthetic for r in recs])),
            "synthetic_with_replacement": any(r.synthetic_with_replacement for r in recs),
            "metric": metric,
            "means": means,
            "sds": sds,
            "ci": ec.ci,
            "ci_lo": _clean(lo),
            "ci_hi": _clean(hi),
            "chosen_step_mean": float(np.mean([r.convergence.chosen_step for r in recs])),
        }
        if ext is not None and all(r.external_scores is not None for r in recs):
            elo, ehi = ext.interval(recs)
            row.update(
                {"external_mean": _clean(ext.point(recs)), "external_lo": _clean(elo), "external_hi": _clean(ehi)}
            )
        base_arm = "real_classical" if arm == "real_classical" and ratio > 0 else "real"
        base = groups.get((base_arm, fraction, 0))
        row["baseline"] = base_arm
        if base is not None and (arm, ratio) != ("real", 0):
            common = sorted(set(seeds) & set(base))
            if common:
                cur_c, base_c = [by_seed[s] for s in common], [base[s] for s in common]
                row["paired_seeds"] = len(common)
                if task == "presence":
                    reps = scorer.reps(cur_c) - scorer.reps(base_c)
                    dlo, dhi = percentile_interval(reps, ec.ci)
                    row.update(
                        {
                            "delta_vs_real": _clean(scorer.point(cur_c) - scorer.point(base_c)),
                            "delta_lo": _clean(dlo),
                            "delta_hi": _clean(dhi),
                            "p_value": _clean(bootstrap_p_value(reps)),
                        }
                    )
                else:
                    a, b = scorer.case_mean(cur_c), scorer.case_mean(base_c)
                    cmp = paired_comparison(a, b, test.patients, ec.n_bootstrap, ec.ci, ec.bootstrap_seed)
                    d = cmp["difference"]
                    row.update(
                        {
                            "delta_vs_real": d["value"],
                            "delta_lo": d["lo"],
                            "delta_hi": d["hi"],
                            "p_value": cmp["p_value"],
                            "effect_dz": _clean(cohens_dz(a, b, test.patients)),
                        }
                    )
        rows.append(SummaryRow(**row))
    return _with_holm(rows)


def _with_holm(rows: list[SummaryRow]) -> list[SummaryRow]:
    """Holm-adjust the p-values across the fractions of each (task, arm, ratio)."""
    out = list(rows)
    families: dict[tuple[str, str, int], list[int]] = {}
    for i, r in enumerate(rows):
        families.setdefault((r.task, r.arm, r.ratio), []).append(i)
    for idx in families.values():
        adj = holm_adjust([rows[i].p_value for i in idx])
        for i, p in zip(idx, adj, strict=True):
            out[i] = rows[i].model_copy(update={"p_holm": p})
    return out


def real_only_growth(rows: Sequence[SummaryRow], task: str) -> GrowthCheck:
    """Whether the real-only (ratio 0) arm of ``task`` grows with the real fraction, within its CI.

    It grows when no fraction's seed mean falls below the previous (smaller) fraction's interval and
    the largest fraction's mean lies above the smallest fraction's interval (a gain the CI resolves).
    """
    base = sorted(
        (r for r in rows if r.task == task and r.arm == "real" and r.ratio == 0 and r.mean is not None),
        key=lambda r: r.fraction,
    )
    label = PRIMARY.get(task, task).upper() if task == "presence" else "Dice"
    if len(base) < 2:
        return GrowthCheck(task=task, grows=None, message=f"{task}: n/a (fewer than two real fractions)")
    trail = " → ".join(f"{format_value(r.mean)} ({100 * r.fraction:g}%)" for r in base)
    drops = [(a, b) for a, b in itertools.pairwise(base) if a.ci_lo is not None and (b.mean or 0.0) < a.ci_lo]
    first, last = base[0], base[-1]
    bar = first.ci_hi if first.ci_hi is not None else first.mean
    grows = not drops and (last.mean or 0.0) > (bar or 0.0)
    if grows:
        return GrowthCheck(
            task=task, grows=True, message=f"{task}: the real-only {label} grows with the real fraction: {trail}."
        )
    why = (
        "; ".join(
            f"at {100 * b.fraction:g}% it is {format_value(b.mean)}, below the {100 * a.fraction:g}% interval "
            f"[{format_value(a.ci_lo)}, {format_value(a.ci_hi)}]"
            for a, b in drops
        )
        or f"at {100 * last.fraction:g}% it is {format_value(last.mean)}, not above the {100 * first.fraction:g}% "
        f"interval [{format_value(first.ci_lo)}, {format_value(first.ci_hi)}]"
    )
    return GrowthCheck(
        task=task,
        grows=False,
        message=f"{task}: the real-only {label} does NOT grow with the real fraction ({trail}; {why}). "
        "A task model that does not improve with more real data cannot measure what synthetic data adds; "
        "read the Δ of this task with that in mind.",
    )


# --------------------------------------------------------------------------------------------------
# outputs


def _fmt(v: Any, digits: int = 3) -> str:
    return format_value(v, digits, missing="–")


def arm_label(arm: str, ratio: int) -> str:
    """Readable name of an arm at a ratio."""
    if arm == "real":
        return "real only" if ratio == 0 else f"real + {ratio}x synthetic"
    if arm == "real_classical":
        return "real + classical aug." if ratio == 0 else f"real + classical aug. + {ratio}x synthetic"
    return f"synthetic only ({ratio}x)"


def write_summary(
    out: Path,
    rows: list[SummaryRow],
    growth: dict[str, GrowthCheck],
    cfg: MedsynthConfig,
    labels: dict[int, str],
    n_test: int,
    external: ArraySet | None = None,
) -> tuple[Path, Path]:
    """Write ``summary.csv`` (one row per SummaryRow) and ``summary.md`` (one table per task)."""
    ec = cfg.experiment
    flat = [r.flat() for r in rows]
    cols: list[str] = []
    for fr in flat:
        cols += [k for k in fr if k not in cols]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for fr in flat:
        writer.writerow({k: "" if fr.get(k) is None else fr.get(k) for k in cols})
    csv_path = write_text_atomic(out / SUMMARY_CSV, buf.getvalue())

    pct = f"{100 * ec.ci:g}%"
    lines = [
        "# Downstream augmentation experiment",
        "",
        f"{n_test} test items; seeds {list(ec.seeds)}; every cell trains until its validation score stops "
        f"improving (patience {ec.convergence.patience} evaluations every {ec.convergence.eval_every} steps, "
        f"{ec.convergence.schedule} schedule) and keeps its best-on-validation weights.",
        "",
        f"- {pct} CI = percentile bootstrap over TEST PATIENTS ({ec.n_bootstrap} resamples) of the seed-mean metric.",
        "- Δ vs baseline: seed-mean difference with the real-only ratio-0 cell of the same fraction — for "
        "synthetic data on top of classical augmentation, with classical augmentation alone (marked †) — (same "
        "seeds, same resampled test patients); p: presence = two-sided bootstrap p-value, segmentation = "
        "Wilcoxon signed-rank on per-patient means; p (Holm) adjusted across fractions per arm and ratio; "
        "d_z = Cohen's d_z of per-patient differences.",
        "- Real fraction = fraction of the training PATIENTS; ratio = synthetic items per real item, drawn "
        "only from the pool items of those patients.",
        "",
    ]
    for task in dict.fromkeys(r.task for r in rows):
        trows = [r for r in rows if r.task == task]
        if task == "presence":
            target = resolve_target_label(labels, ec.target_label)
            title = f"## Task: presence of label {target} ({labels.get(target, target)!r}) — AUROC"
            extra = ["sens. @ 90% spec."]
        else:
            lesion = segmentation_target(labels, ec.target_label)
            title = (
                f"## Task: segmentation — Dice of {labels.get(lesion, lesion)!r} on lesion-bearing items, "
                "false-positive rate on lesion-free ones"
                if lesion is not None
                else "## Task: segmentation — mean foreground Dice"
            )
            extra = ["FP rate"] if lesion is not None else []
        name = "AUROC" if task == "presence" else "Dice"
        lines += [title, ""]
        if task in growth:
            lines += [f"**Real-only check:** {growth[task].message}", ""]
        head = [
            "arm",
            "real fraction",
            "patients",
            "n real",
            "n synthetic",
            f"{name} (mean ± sd)",
            f"{pct} CI",
            *extra,
            f"Δ {name} vs baseline [{pct} CI]",
            "p",
            "p (Holm)",
            "d_z",
            "chosen step",
        ]
        if external is not None:
            head.append(f"external {name} [{pct} CI]")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in trows:
            metric = r.metric
            cells = [
                arm_label(r.arm, r.ratio) + (" (with replacement)" if r.synthetic_with_replacement else ""),
                _fmt(r.fraction, 2),
                _fmt(r.n_real_patients, 0),
                _fmt(r.n_real, 0),
                _fmt(r.n_synthetic, 0),
                f"{_fmt(r.means.get(metric))} ± {_fmt(r.sds.get(metric))}",
                f"[{_fmt(r.ci_lo)}, {_fmt(r.ci_hi)}]",
            ]
            if task == "presence":
                cells.append(_fmt(r.means.get("sens_at_spec90")))
            elif extra:
                cells.append(_fmt(r.means.get("fp_rate")))
            delta = (
                f"{_fmt(r.delta_vs_real)} [{_fmt(r.delta_lo)}, {_fmt(r.delta_hi)}]"
                + (" †" if r.baseline == "real_classical" else "")
                if r.delta_vs_real is not None
                else "–"
            )
            cells += [delta, _fmt(r.p_value, 4), _fmt(r.p_holm, 4), _fmt(r.effect_dz, 2), _fmt(r.chosen_step_mean, 0)]
            if external is not None:
                cells.append(f"{_fmt(r.external_mean)} [{_fmt(r.external_lo)}, {_fmt(r.external_hi)}]")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    notes = []  # "–" cells of a small experiment say why they are empty
    if len(ec.seeds) < 2:
        notes.append(f"- ± sd: {needs(2, 'seeds', len(ec.seeds))}")
    if rows and all(r.ci_lo is None for r in rows):
        notes.append(f"- CI and p: {needs(2, 'test patients')} ({n_test} test items)")
    if notes:
        lines += ["", *notes]
    md_path = write_text_atomic(out / SUMMARY_MD, "\n".join(lines))
    return csv_path, md_path

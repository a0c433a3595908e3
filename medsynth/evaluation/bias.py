"""The bias report: plausibility and downstream scores per subgroup (site, lesion-size tertile), with flags.

Subgroups of test items:

* **site** — from the patient id through a regex (:func:`site_labels`; by default the TCGA tissue-source
  site, ``TCGA_CS_4941_19960909`` -> ``CS``). Without a pattern, or when it matches no patient, every
  item is in one group ``all``; patients it does not match form the group ``other``.
* **lesion size** — :func:`size_tertiles`: items whose mask holds no lesion voxel are ``none``; the
  others are split at the 1/3 and 2/3 quantiles of their lesion voxel counts into ``small``
  (``<= q1/3``), ``medium`` (``<= q2/3``) and ``large``.

Per subgroup (:func:`plausibility_by_group`): the lesion Dice ratio synthetic/real of the real-data
segmenter, the false-positive rates on lesion-free items (real and synthetic), and the lesion
contrast ratio synthetic/real, each with a patient-bootstrap CI
(:func:`~medsynth.evaluation.stats.bootstrap_ratio` / :func:`~medsynth.evaluation.stats.bootstrap_mean`).
A subgroup whose Dice-ratio (or contrast-ratio) CI upper bound is below the configured target is
**flagged**: even its optimistic bound misses the target.

Per subgroup and grid cell group (:func:`downstream_by_group`): the downstream task models' scores on
the subgroup's test items, mean over seeds: segmentation the lesion Dice (bootstrap mean over
patients), presence the AUROC of the subgroup's lesion items against its lesion-free items (for size
groups, which hold no lesion-free item, against every lesion-free test item), with the weighted
Mann-Whitney AUROC over patient-bootstrap weights. A subgroup is flagged when its CI upper bound is
below the score of the same models on the whole test set. Subgroups without a lesion item (the size group
``none``) have neither and are left out.

Subgroups with fewer than ``min_patients`` patients are reported as ``n/a (needs >= n patients)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from medsynth.evaluation.classifier import weighted_auroc
from medsynth.evaluation.stats import (
    Estimate,
    bootstrap_mean,
    bootstrap_ratio,
    patient_weights,
    percentile_interval,
)
from medsynth.na import needs

FloatArray = npt.NDArray[np.float64]
ALL = "all"
SIZE_ORDER = ("none", "small", "medium", "large")


def site_of(patient: str, pattern: str | None) -> str | None:
    """The site of a patient id: the regex's first group (or its whole match); None when it does not match."""
    if not pattern:
        return None
    m = re.search(pattern, str(patient))
    if m is None:
        return None
    return m.group(1) if m.re.groups else m.group(0)


def site_labels(patients: Sequence[str], pattern: str | None) -> list[str]:
    """Site of each item; ``all`` for every item when nothing matches, ``other`` for unmatched patients."""
    found = [site_of(p, pattern) for p in patients]
    if all(s is None for s in found):
        return [ALL] * len(found)
    return [s if s is not None else "other" for s in found]


def size_tertiles(voxels: npt.ArrayLike) -> tuple[list[str], tuple[float, float] | None]:
    """Lesion-size group of each item and the tertile edges (see the module doc).

    Args:
        voxels: ``(N,)`` lesion voxel count of each item's mask.

    Returns:
        ``(groups, (q1, q2))``; edges None when no item holds a lesion.
    """
    v = np.asarray(voxels, dtype=np.float64).ravel()
    pos = v[v > 0]
    if pos.size == 0:
        return ["none"] * len(v), None
    q1, q2 = (float(x) for x in np.quantile(pos, [1 / 3, 2 / 3]))
    groups = ["none" if x <= 0 else "small" if x <= q1 else "medium" if x <= q2 else "large" for x in v]
    return groups, (q1, q2)


def _est(e: Estimate, min_patients: int) -> dict[str, Any]:
    out = e.to_json()
    if 0 < e.n_patients < min_patients:
        out.update(value=None, lo=None, hi=None, na=needs(min_patients, "patients", e.n_patients))
    return out


def _below(e: dict[str, Any], target: float | None) -> bool:
    hi = e.get("hi")
    return target is not None and hi is not None and e.get("na") is None and float(hi) < target


def _group_order(values: Sequence[str]) -> list[str]:
    uniq = set(values)
    return [g for g in SIZE_ORDER if g in uniq] + sorted(uniq - set(SIZE_ORDER))


def plausibility_by_group(
    items: Mapping[str, npt.ArrayLike],
    patients: Sequence[str],
    groupings: Mapping[str, Sequence[str]],
    target_dice_ratio: float,
    target_contrast_ratio: float,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    min_patients: int = 2,
) -> list[dict[str, Any]]:
    """Plausibility per subgroup with patient-bootstrap CIs and flags.

    Args:
        items: Per test item (all ``(N,)``): ``dice_real``, ``dice_synth`` (lesion Dice of the segmenter on
            the real / synthetic image, NaN where the mask holds no lesion), ``fp_real``, ``fp_synth``
            (lesion predicted on a lesion-free mask, 0/1; NaN where the mask holds the lesion),
            ``contrast_real``, ``contrast_synth`` (lesion contrast, NaN where no lesion).
        patients: Patient of each item.
        groupings: Grouping name -> group of each item (e.g. ``{"site": [...], "size": [...]}``).
        target_dice_ratio: Flag below this Dice ratio (CI upper bound).
        target_contrast_ratio: Flag below this contrast ratio (CI upper bound).
        n_boot: Bootstrap resamples; ci: confidence level; seed: bootstrap seed.
        min_patients: Fewer patients in a subgroup: n/a.

    Returns:
        Rows ``{"grouping", "group", "n_items", "n_patients", "dice_real", "dice_synth", "dice_ratio",
        "fp_real", "fp_synth", "contrast_ratio", "flags"}`` (Estimate JSONs); the first row is the whole
        test set (grouping ``all``).
    """
    pats = np.asarray(list(patients), dtype=object)
    arr = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in items.items()}
    n = len(pats)
    rows: list[dict[str, Any]] = []
    plan: list[tuple[str, str, npt.NDArray[np.bool_]]] = [(ALL, ALL, np.ones(n, dtype=bool))]
    for grouping, labels in groupings.items():
        lab = np.asarray(list(labels), dtype=object)
        plan += [(grouping, g, lab == g) for g in _group_order([str(x) for x in labels])]
    for grouping, group, sel in plan:
        p = [str(x) for x in pats[sel]]

        def sub(key: str, sel: npt.NDArray[np.bool_] = sel) -> FloatArray:
            return arr[key][sel]

        row: dict[str, Any] = {
            "grouping": grouping,
            "group": group,
            "n_items": int(sel.sum()),
            "n_patients": len(set(p)),
            "dice_real": _est(bootstrap_mean(sub("dice_real"), p, n_boot, ci, seed), min_patients),
            "dice_synth": _est(bootstrap_mean(sub("dice_synth"), p, n_boot, ci, seed), min_patients),
            "dice_ratio": _est(bootstrap_ratio(sub("dice_synth"), sub("dice_real"), p, n_boot, ci, seed), min_patients),
            "fp_real": _est(bootstrap_mean(sub("fp_real"), p, n_boot, ci, seed), min_patients),
            "fp_synth": _est(bootstrap_mean(sub("fp_synth"), p, n_boot, ci, seed), min_patients),
            "contrast_ratio": _est(
                bootstrap_ratio(sub("contrast_synth"), sub("contrast_real"), p, n_boot, ci, seed), min_patients
            ),
        }
        flags = []
        if _below(row["dice_ratio"], target_dice_ratio):
            flags.append(f"Dice ratio < {target_dice_ratio:g}")
        if _below(row["contrast_ratio"], target_contrast_ratio):
            flags.append(f"contrast ratio < {target_contrast_ratio:g}")
        row["flags"] = flags
        rows.append(row)
    return rows


def _presence_estimate(
    y: npt.NDArray[np.int64],
    scores: Sequence[FloatArray],
    patients: Sequence[str],
    n_boot: int,
    ci: float,
    seed: int,
) -> dict[str, Any]:
    """Seed-mean AUROC of ``scores`` (one array per seed) and its patient-bootstrap interval."""
    n_pat = len(set(patients))
    if not (y == 1).any() or not (y == 0).any():
        return {
            "value": None,
            "lo": None,
            "hi": None,
            "ci": ci,
            "n_cases": len(y),
            "n_patients": n_pat,
            "na": needs(1, "lesion and 1 lesion-free item"),
        }
    point = float(np.mean([weighted_auroc(y, s)[0] for s in scores]))
    lo = hi = float("nan")
    if n_pat >= 2:
        w = patient_weights(patients, n_boot, seed)
        lo, hi = percentile_interval(np.mean([weighted_auroc(y, s, w) for s in scores], axis=0), ci)
    fin = [x if np.isfinite(x) else None for x in (point, lo, hi)]
    return {"value": fin[0], "lo": fin[1], "hi": fin[2], "ci": ci, "n_cases": len(y), "n_patients": n_pat}


def downstream_by_group(
    cells: Sequence[dict[str, Any]],
    presence: npt.ArrayLike,
    patients: Sequence[str],
    groupings: Mapping[str, Sequence[str]],
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    min_patients: int = 2,
) -> list[dict[str, Any]]:
    """Downstream scores of the grid's task models per subgroup (see the module doc).

    Args:
        cells: Cell records as dicts: ``task``, ``arm``, ``fraction``, ``ratio``, ``seed`` and
            ``test_scores`` (one per test item: presence probability or lesion Dice, None where undefined).
        presence: ``(N,)`` 1 where the test item holds the lesion (the presence task's label).
        patients: Patient of each test item.
        groupings: Grouping name -> group of each item.
        n_boot: Bootstrap resamples; ci: confidence level; seed: bootstrap seed.
        min_patients: Fewer patients in a subgroup: n/a.

    Returns:
        Rows ``{"task", "arm", "fraction", "ratio", "n_seeds", "grouping", "group", "metric", "score",
        "flags"}``; the ``all`` row of each cell group comes first and is the flags' reference.
    """
    y_all = np.asarray(presence, dtype=np.int64).ravel()
    pats = np.asarray(list(patients), dtype=object)
    n = len(pats)
    by: dict[tuple[str, str, float, int], list[FloatArray]] = {}
    for c in cells:
        s = np.array([np.nan if v is None else float(v) for v in c["test_scores"]], dtype=np.float64)
        if len(s) != n:
            raise ValueError(f"cell {c.get('cell')} holds {len(s)} test scores for {n} test items")
        by.setdefault((str(c["task"]), str(c["arm"]), float(c["fraction"]), int(c["ratio"])), []).append(s)
    plan: list[tuple[str, str, npt.NDArray[np.bool_]]] = [(ALL, ALL, np.ones(n, dtype=bool))]
    for grouping, labels in groupings.items():
        lab = np.asarray(list(labels), dtype=object)
        plan += [(grouping, g, lab == g) for g in _group_order([str(x) for x in labels])]
    rows: list[dict[str, Any]] = []
    for (task, arm, fraction, ratio), scores in sorted(by.items()):
        reference: float | None = None
        for grouping, group, sel in plan:
            if not (y_all[sel] == 1).any():  # no lesion item (e.g. size group 'none'): no Dice, no AUROC
                continue
            if task == "presence":
                if not (y_all[sel] == 0).any():  # size groups: the group's lesions against every lesion-free item
                    sel = sel | (y_all == 0)
                p = [str(x) for x in pats[sel]]
                est = _presence_estimate(y_all[sel], [s[sel] for s in scores], p, n_boot, ci, seed)
                if "na" not in est and 0 < est["n_patients"] < min_patients:
                    est.update(value=None, lo=None, hi=None, na=needs(min_patients, "patients", est["n_patients"]))
                metric = "auroc"
            else:
                p = [str(x) for x in pats[sel]]
                case_mean = np.mean([s[sel] for s in scores], axis=0)
                est = _est(bootstrap_mean(case_mean, p, n_boot, ci, seed), min_patients)
                metric = "dice"
            if grouping == ALL:
                reference = est.get("value")
            flags = [f"{metric} < whole test set ({reference:.3f})"] if _below(est, reference) else []
            rows.append(
                {
                    "task": task,
                    "arm": arm,
                    "fraction": fraction,
                    "ratio": ratio,
                    "n_seeds": len(scores),
                    "grouping": grouping,
                    "group": group,
                    "metric": metric,
                    "score": est,
                    "flags": flags,
                }
            )
    return rows

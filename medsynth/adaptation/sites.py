"""Acquisition sites in patient ids, and the target site's cases, patients and adaptation/evaluation split."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from medsynth.config.data import DataConfig
from medsynth.errors import ConfigError


def site_of(patient: str, pattern: str) -> str | None:
    """The site of a patient id: the first group of ``pattern`` (``TCGA_CS_4941`` -> ``CS``), or None."""
    m = re.search(pattern, patient)
    return m.group(1) if m else None


@dataclass(frozen=True)
class SiteSplit:
    """The target site's patients, split into nested adaptation sets and one evaluation set.

    Attributes:
        site: The target site.
        data: The data config selecting exactly the site's cases (its own ``include``).
        order: The site's patients in the seeded order; adaptation with ``k`` patients uses ``order[:k]``.
        evaluation: Patients after the largest ``k``: the same evaluation set for every ``k`` and method.
        sites: Patients per site in the dataset (for messages and the report).
    """

    site: str
    data: DataConfig
    order: tuple[str, ...]
    evaluation: tuple[str, ...]
    sites: dict[str, int]

    def adaptation(self, k: int) -> tuple[str, ...]:
        """The first ``k`` patients (nested: the set for 2 is inside the set for 5)."""
        return self.order[:k]


def split_site(data: DataConfig, pattern: str, target: str, k_patients: list[int], seed: int) -> SiteSplit:
    """Find the target site's cases in ``data.root`` (ignoring ``data.include``) and split its patients.

    Args:
        data: The config's data section (its ``include`` may exclude the target site).
        pattern: Site regex on patient ids (first group = site).
        target: The target site code.
        k_patients: Adaptation set sizes.
        seed: Seed of the patient order.

    Returns:
        A :class:`SiteSplit`.

    Raises:
        ConfigError: No patient of the target site, or too few patients for the largest ``k`` plus an
            evaluation patient (one line naming the sites found).
    """
    from medsynth.data.layouts import discover

    disc = discover(data.model_copy(update={"include": None}))
    patients_of: dict[str, set[str]] = {}
    for c in disc.cases:
        s = site_of(c.patient_id, pattern)
        if s is not None:
            patients_of.setdefault(s, set()).add(c.patient_id)
    sites = {s: len(p) for s, p in sorted(patients_of.items())}
    found = ", ".join(f"{s} ({n})" for s, n in sites.items()) or "none"
    if target not in patients_of:
        raise ConfigError(
            "adaptation",
            f"target_site {target!r} matches no patient of {data.root} (site_pattern {pattern!r}; sites: {found})",
        )
    pats = sorted(patients_of[target])
    k_max = max(k_patients)
    if len(pats) < k_max + 1:
        raise ConfigError(
            "adaptation",
            f"site {target} has {len(pats)} patients, too few for k_patients {list(k_patients)}: needs at least "
            f"{k_max + 1} (the largest k + 1 to evaluate on; sites: {found})",
        )
    order = tuple(str(p) for p in np.random.default_rng(seed).permutation(pats))
    ids = sorted(c.case_id for c in disc.cases if c.patient_id in patients_of[target])
    include = "^(?:" + "|".join(re.escape(i) for i in ids) + ")$"
    return SiteSplit(
        site=target,
        data=data.model_copy(update={"include": include}),
        order=order,
        evaluation=order[k_max:],
        sites=sites,
    )

"""The case table: one row per image/mask pair, with patient identity and split."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.config.data import SplitConfig
from medsynth.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Case:
    """One image/mask pair.

    Attributes:
        case_id: Unique id within the dataset (file stem, channel suffix removed).
        patient_id: The patient the case belongs to; splits never separate a patient's cases.
        image: Image file or DICOM series folder.
        mask: Mask file, or None when the dataset has no mask for this image.
        split: "train", "val" or "test" once assigned (or given by a manifest).
        extra_images: Files of channels 1.. of a multi-contrast case (``data.channels``); ``image`` is
            channel 0. Empty for single-channel cases and for 4D files holding every channel.
    """

    case_id: str
    patient_id: str
    image: Path
    mask: Path | None
    split: str | None = None
    extra_images: tuple[Path, ...] = ()

    @property
    def images(self) -> tuple[Path, ...]:
        """Every image file of the case, channel 0 first."""
        return (self.image, *self.extra_images)

    def to_json(self) -> dict[str, Any]:
        """JSON-compatible dict (paths as strings)."""
        d = asdict(self)
        d["image"] = str(self.image)
        d["mask"] = None if self.mask is None else str(self.mask)
        if self.extra_images:
            d["extra_images"] = [str(p) for p in self.extra_images]
        else:  # single-channel cases keep their previous form
            del d["extra_images"]
        return d


def assign_splits(cases: list[Case], cfg: SplitConfig) -> list[Case]:
    """Assign train/val/test by patient, deterministically from ``cfg.seed``.

    Cases that already carry a split (e.g. from a CSV manifest) keep it; their patients are
    excluded from the random draw, and a patient whose cases disagree is an error.

    Args:
        cases: The case table.
        cfg: Fractions and seed.

    Returns:
        A new list of cases with ``split`` set, in the input order.
    """
    given: dict[str, str] = {}
    for c in cases:
        if c.split is not None:
            if c.split not in SPLITS:
                raise DataError(c.image, f"split {c.split!r} is not one of {SPLITS}")
            if given.setdefault(c.patient_id, c.split) != c.split:
                raise DataError(c.image, f"patient {c.patient_id} is in splits {given[c.patient_id]} and {c.split}")
    free = sorted({c.patient_id for c in cases} - set(given))
    rng = np.random.default_rng(cfg.seed)
    order = [free[i] for i in rng.permutation(len(free))]
    n = len(order)
    n_test = round(n * cfg.test)
    n_val = round(n * cfg.val)
    if n >= 3:  # every requested split gets at least one patient when there are enough
        n_test = max(n_test, 1 if cfg.test > 0 else 0)
        n_val = max(n_val, 1 if cfg.val > 0 else 0)
    assigned = dict(given)
    for i, pid in enumerate(order):
        assigned[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return [replace(c, split=assigned[c.patient_id]) for c in cases]


def split_summary(cases: list[Case]) -> dict[str, dict[str, int]]:
    """Counts of patients and cases per split."""
    out: dict[str, dict[str, int]] = {}
    for s in SPLITS:
        sel = [c for c in cases if c.split == s]
        out[s] = {"patients": len({c.patient_id for c in sel}), "cases": len(sel)}
    return out


def splits_json(cases: list[Case]) -> dict[str, Any]:
    """The stored form of a split: patient → split, plus counts."""
    return {
        "patients": {c.patient_id: c.split for c in sorted(cases, key=lambda c: c.patient_id)},
        "summary": split_summary(cases),
    }

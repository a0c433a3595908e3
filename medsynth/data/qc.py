"""Quality checks of image/mask pairs, run before preprocessing and by ``medsynth data check``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from medsynth.config.data import DataConfig
from medsynth.config.preprocess import QCConfig
from medsynth.data.cases import Case
from medsynth.data.channels import read_case_image
from medsynth.data.io import ImageData, read_image, spacing_from_affine
from medsynth.data.labels import remap_and_validate
from medsynth.errors import DataError


@dataclass
class CaseQC:
    """Outcome of checking one case.

    Attributes:
        case: The case checked.
        problems: ``(code, path, message)`` triples, path being the file at fault; empty when the
            case is fine. Codes: ``unreadable``,
            ``missing_mask``, ``shape_mismatch``, ``geometry_mismatch``, ``label_values``,
            ``non_finite``, ``constant``, ``near_empty``.
        info: Shape, spacing, intensity range and label voxel counts (when readable).
    """

    case: Case
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def first_error(self) -> DataError:
        """The first problem as a :class:`DataError` naming the file at fault."""
        _, path, msg = self.problems[0]
        return DataError(path, msg)

    def add(self, code: str, path: object, message: str) -> None:
        """Record a problem with the file at fault."""
        self.problems.append((code, str(path), message))

    def to_json(self) -> dict[str, Any]:
        """JSON-compatible form for the QC report."""
        return {
            **self.case.to_json(),
            "ok": self.ok,
            "problems": [{"code": c, "file": p, "message": m} for c, p, m in self.problems],
            **self.info,
        }


def _geometry_problem(img: ImageData, mask: ImageData, tol: float) -> str | None:
    a, b = img.affine, mask.affine
    if a.shape != b.shape:
        return f"image is {img.ndim}D but mask is {mask.ndim}D"
    d = a.shape[0] - 1
    sa, sb = np.asarray(spacing_from_affine(a)), np.asarray(spacing_from_affine(b))
    if not np.allclose(sa, sb, rtol=tol, atol=1e-6):
        return f"spacing differs: image {tuple(np.round(sa, 4))} vs mask {tuple(np.round(sb, 4))}"
    scale = max(float(np.max(sa)), 1e-6)
    if not np.allclose(a[:d, d], b[:d, d], atol=tol * scale * 10 + 1e-4):
        return f"origin differs: image {tuple(np.round(a[:d, d], 3))} vs mask {tuple(np.round(b[:d, d], 3))}"
    if not np.allclose(a[:d, :d] / sa, b[:d, :d] / sb, atol=tol * 10):
        return "direction (orientation) differs between image and mask"
    return None


def check_pair(
    img: ImageData, mask: ImageData | None, case: Case, data_cfg: DataConfig, qc_cfg: QCConfig
) -> tuple[CaseQC, npt.NDArray[np.int64] | None]:
    """Check an already loaded image/mask pair.

    Args:
        img: The image.
        mask: The raw mask (before remapping), or None if missing.
        case: The case (for names in messages).
        data_cfg: Label vocabulary and remapping.
        qc_cfg: Tolerances and switches.

    Returns:
        The :class:`CaseQC` and the remapped mask (None when the mask is missing or invalid).
    """
    qc = CaseQC(case)
    arr = img.array
    qc.info = {"shape": list(arr.shape), "spacing": [round(s, 5) for s in img.spacing]}
    finite = np.isfinite(arr)
    if not finite.all():
        qc.add("non_finite", img.path, f"image holds {int((~finite).sum())} NaN/Inf voxels")
    else:
        lo, hi = float(arr.min()), float(arr.max())
        qc.info["intensity"] = [lo, hi]
        if qc_cfg.check_constant and hi == lo:
            qc.add("constant", img.path, f"image is constant (all voxels = {lo:g})")
        elif qc_cfg.min_signal is not None:
            top = float(np.percentile(np.asarray(arr, dtype=np.float64), 99.5))
            if top < qc_cfg.min_signal:
                qc.add(
                    "near_empty",
                    img.path,
                    f"image is near-empty: 99.5th percentile {top:g} < qc.min_signal {qc_cfg.min_signal:g} "
                    "(noise only, no anatomy)",
                )
    remapped: npt.NDArray[np.int64] | None = None
    if mask is None:
        qc.add("missing_mask", img.path, "no mask found for this image")
        return qc, None
    if mask.array.shape != arr.shape:
        qc.add("shape_mismatch", mask.path, f"image shape {arr.shape} != mask shape {mask.array.shape}")
    else:
        geo = _geometry_problem(img, mask, qc_cfg.geometry_tolerance)
        if geo:
            qc.add("geometry_mismatch", mask.path, geo)
    try:
        remapped = remap_and_validate(mask.array, data_cfg, mask.path)
        vals, counts = np.unique(remapped, return_counts=True)
        qc.info["label_counts"] = {int(v): int(n) for v, n in zip(vals, counts, strict=True)}
    except DataError as exc:
        qc.add("label_values", mask.path, exc.problem)
    return qc, remapped


def load_and_check(
    case: Case, data_cfg: DataConfig, qc_cfg: QCConfig
) -> tuple[CaseQC, ImageData | None, npt.NDArray[np.int64] | None]:
    """Read a case and check it; read failures become ``unreadable`` problems, not exceptions.

    Returns:
        ``(qc, image, remapped_mask)``; image/mask are None when unreadable or invalid.
    """
    try:
        img = read_case_image(case, data_cfg)
    except DataError as exc:
        return CaseQC(case, [("unreadable", str(exc.path), exc.problem)]), None, None
    mask = None
    if case.mask is not None:
        try:
            mask = read_image(case.mask, "mask")
        except DataError as exc:
            qc = CaseQC(case, [("unreadable", str(case.mask), exc.problem)])
            return qc, img, None
    qc, remapped = check_pair(img, mask, case, data_cfg, qc_cfg)
    if img.channels is not None:  # channels 1..: on channel 0's grid already; their values checked here
        for k in range(1, img.channels.shape[0]):
            bad = int((~np.isfinite(img.channels[k])).sum())
            if bad:
                qc.add(
                    "non_finite", case.images[min(k, len(case.images) - 1)], f"channel {k} holds {bad} NaN/Inf voxels"
                )
    return qc, img, remapped

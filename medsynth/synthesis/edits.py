"""Edits of real masks, so that synthesis can draw anatomy the training set lacks.

Every edit takes a ``(1, *S)`` uint8 label map and a :class:`numpy.random.Generator` and returns
the new mask plus a JSON-able description (``{"name": ..., parameters...}``). Edits are
deterministic given the generator and never create a label that is not already in the input
(``flip``, ``elastic``) or in the vocabulary (``transplant`` pastes the lesion label).

* ``flip``: left-right mirror along array axis 0 (``x``, left-right for RAS-oriented data).
* ``elastic``: a random smooth displacement field (white noise smoothed by a Gaussian of
  ``sigma`` voxels, scaled so the largest displacement is ``magnitude`` voxels) applied with
  nearest-neighbour look-up, so labels are moved, never blended.
* ``transplant``: the lesion voxels (label ``L``) of a donor mask, pasted at a uniformly drawn
  position where *every* pasted voxel lands inside the recipient's non-background region; they
  take priority over the recipient's labels there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medsynth.config.synthesis import SynthesisConfig, parse_edit
from medsynth.errors import ConfigError, DataError
from medsynth.synthesis.masks import MaskItem

__all__ = [
    "LESION_NAME",
    "EditResult",
    "apply_edit",
    "check_vocabulary",
    "default_lesion_label",
    "elastic",
    "flip",
    "transplant",
]

Mask = npt.NDArray[np.uint8]
EditResult = tuple[Mask, dict[str, Any]]
"""An edited ``(1, *S)`` mask and the JSON-able description of the edit."""

LESION_NAME = re.compile(r"lesion|tumou?r|cancer|metasta|glioma|neoplas", re.IGNORECASE)
"""Label names taken for a lesion when ``synthesis.lesion_label`` is not set."""


def _check(mask: npt.NDArray[Any]) -> Mask:
    m = np.asarray(mask)
    if m.ndim not in (3, 4) or m.shape[0] != 1:
        raise ValueError(f"expected a mask of shape (1, *spatial) with 2 or 3 spatial dims, got {m.shape}")
    return m.astype(np.uint8, copy=False)


def flip(mask: npt.NDArray[Any], rng: np.random.Generator | None = None, axis: int = 0) -> EditResult:
    """Mirror a mask along spatial ``axis`` (0: left-right for RAS-oriented data).

    Args:
        mask: ``(1, *S)`` labels.
        rng: Unused (every edit takes one).
        axis: Spatial axis to flip.

    Returns:
        The flipped mask (a new array) and ``{"name": "flip", "axis": axis}``.
    """
    m = _check(mask)
    return np.ascontiguousarray(np.flip(m, axis=axis + 1)), {"name": "flip", "axis": axis}


def elastic(mask: npt.NDArray[Any], rng: np.random.Generator, sigma: float = 4.0, magnitude: float = 3.0) -> EditResult:
    """Warp a mask with a random smooth displacement field, nearest-neighbour.

    Args:
        mask: ``(1, *S)`` labels.
        rng: Source of the random field.
        sigma: Gaussian smoothing of the field in voxels (larger: smoother, more global warps).
        magnitude: Largest displacement in voxels.

    Returns:
        The warped mask and ``{"name": "elastic", "sigma", "magnitude", "changed_voxels"}``.
    """
    m = _check(mask)
    spatial = m.shape[1:]
    fields = []
    for _ in spatial:
        f = ndimage.gaussian_filter(rng.standard_normal(spatial), sigma, mode="reflect")
        fields.append(f)
    peak = max(float(np.abs(f).max()) for f in fields)
    scale = magnitude / peak if peak > 0 else 0.0
    grid = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in spatial], indexing="ij")
    coords = np.stack([g + f * scale for g, f in zip(grid, fields, strict=True)])
    warped = ndimage.map_coordinates(m[0], coords, order=0, mode="nearest").astype(np.uint8)[None]
    desc = {
        "name": "elastic",
        "sigma": float(sigma),
        "magnitude": float(magnitude),
        "changed_voxels": int(np.count_nonzero(warped != m)),
    }
    return warped, desc


def _lesion_voxels(donor: Mask, label: int, component: str, rng: np.random.Generator) -> npt.NDArray[np.bool_]:
    les: npt.NDArray[np.bool_] = np.asarray(donor[0] == label, dtype=bool)
    if component == "all":
        return les
    comps, n = ndimage.label(les)
    if n <= 1:
        return les
    if component == "largest":
        sizes = np.bincount(comps.ravel())[1:]
        return np.asarray(comps == int(np.argmax(sizes)) + 1, dtype=bool)
    if component == "random":
        return np.asarray(comps == int(rng.integers(1, n + 1)), dtype=bool)
    raise ValueError(f"component must be 'all', 'largest' or 'random', got {component!r}")


def transplant(
    mask: npt.NDArray[Any],
    donor: npt.NDArray[Any],
    rng: np.random.Generator,
    lesion_label: int,
    *,
    donor_id: str | None = None,
    component: str = "all",
) -> EditResult:
    """Paste the donor's lesion at a random position fully inside the recipient's non-background region.

    Candidate positions are every translation of the lesion's bounding box for which all lesion
    voxels land on non-background voxels of ``mask`` (found at once by an FFT correlation); one is
    drawn uniformly. Pasted voxels overwrite the recipient's labels; the recipient's own lesion
    voxels elsewhere are kept.

    Args:
        mask: Recipient ``(1, *S)`` labels.
        donor: Donor ``(1, *S')`` labels holding ``lesion_label`` (any spatial size of the same
            dimensionality; the donor may be the recipient itself).
        rng: Source of the position (and of the component with ``component="random"``).
        lesion_label: The lesion's label index.
        donor_id: Id of the donor, recorded in the description.
        component: ``"all"`` (every lesion component, keeping their arrangement), ``"largest"`` or
            ``"random"`` (one connected component).

    Returns:
        The new mask and ``{"name": "transplant", "applied", "lesion_label", "donor_id", "offset",
        "voxels", ...}``. When the lesion fits nowhere (or the recipient has no region) the mask is
        returned unchanged with ``applied`` False and a ``reason``.

    Raises:
        ValueError: If the donor holds no voxel of ``lesion_label`` or the dimensionalities differ.
    """
    m, d = _check(mask), _check(donor)
    if m.ndim != d.ndim:
        raise ValueError(f"donor is {d.ndim - 1}D but the recipient is {m.ndim - 1}D")
    les = _lesion_voxels(d, lesion_label, component, rng)
    if not les.any():
        who = f"donor {donor_id}" if donor_id else "donor"
        raise ValueError(f"{who} holds no voxel of lesion label {lesion_label}")
    box = ndimage.find_objects(les.astype(np.int32))[0]
    crop = les[box]
    n = int(crop.sum())
    desc: dict[str, Any] = {
        "name": "transplant",
        "lesion_label": int(lesion_label),
        "donor_id": donor_id,
        "component": component,
        "voxels": n,
    }
    region = m[0] > 0
    if int(region.sum()) < n or any(c > s for c, s in zip(crop.shape, region.shape, strict=True)):
        return m.copy(), {**desc, "applied": False, "reason": "lesion larger than the recipient's region"}
    from scipy.signal import fftconvolve

    flipped = crop[tuple(slice(None, None, -1) for _ in crop.shape)].astype(np.float64)
    inside = fftconvolve(region.astype(np.float64), flipped, mode="valid")  # lesion voxels inside, per offset
    valid = np.argwhere(inside > n - 0.5)
    if valid.size == 0:
        return m.copy(), {**desc, "applied": False, "reason": "lesion fits nowhere inside the recipient's region"}
    offset = valid[int(rng.integers(len(valid)))]
    out = m.copy()
    target = tuple(slice(int(o), int(o) + c) for o, c in zip(offset, crop.shape, strict=True))
    view = out[0][target]
    view[crop] = lesion_label
    return out, {
        **desc,
        "applied": True,
        "offset": [int(o) for o in offset],
        "donor_offset": [int(s.start) for s in box],
        "candidate_positions": len(valid),
    }


def default_lesion_label(labels: dict[int, str], configured: int | None = None) -> int:
    """The lesion label: ``configured`` if given (checked against ``labels``), else the highest index
    whose name looks like a lesion/tumour (:data:`LESION_NAME`).

    Raises:
        ConfigError: If the configured label is not in the vocabulary or no name looks like a lesion.
    """
    if configured is not None:
        if configured not in labels or configured == 0:
            raise ConfigError("config", f"synthesis.lesion_label {configured} is not a foreground label of {labels}")
        return configured
    named = [k for k, v in labels.items() if k != 0 and LESION_NAME.search(v)]
    if not named:
        raise ConfigError(
            "config",
            f"no label of the vocabulary {labels} is named like a lesion/tumour",
            hint="set synthesis.lesion_label to the label to transplant",
        )
    return max(named)


def check_vocabulary(mask: npt.NDArray[Any], labels: dict[int, str] | Sequence[int], what: str = "mask") -> None:
    """Raise ValueError if ``mask`` holds a value that is not a label of the vocabulary."""
    bad = sorted(set(np.unique(mask).tolist()) - {int(k) for k in labels})
    if bad:
        raise ValueError(f"{what} holds labels {bad} outside the vocabulary {sorted(int(k) for k in labels)}")


def apply_edit(
    spec: str,
    item: MaskItem,
    pool: Sequence[MaskItem],
    rng: np.random.Generator,
    cfg: SynthesisConfig,
    labels: dict[int, str],
) -> EditResult:
    """Apply one entry of ``synthesis.edits`` (a name or a ``+`` chain) to a source mask.

    Args:
        spec: ``"none"``, ``"flip"``, ``"elastic"``, ``"transplant"`` or a chain like ``"flip+elastic"``.
        item: The source mask.
        pool: Every source mask (donors of ``transplant`` are drawn from those holding the lesion
            label, other than ``item`` unless it is the only one).
        rng: Source of all randomness of the edit.
        cfg: Synthesis section (edit parameters).
        labels: The label vocabulary.

    Returns:
        The edited mask and its description: the single edit's, or ``{"name": spec, "steps": [...]}``
        for a chain. ``none`` gives a copy and ``{"name": "none"}``.

    Raises:
        ConfigError: Transplant without a usable lesion label.
        DataError: Transplant when no source mask holds the lesion label.
        ValueError: If the result held a label outside ``labels`` (a bug, never expected).
    """
    names = parse_edit(spec)
    mask = _check(item.mask).copy()
    steps: list[dict[str, Any]] = []
    for name in names:
        if name == "none":
            steps.append({"name": "none"})
        elif name == "flip":
            mask, desc = flip(mask, rng)
            steps.append(desc)
        elif name == "elastic":
            mask, desc = elastic(mask, rng, cfg.elastic_sigma, cfg.elastic_magnitude)
            steps.append(desc)
        else:
            mask, desc = _transplant_from_pool(mask, item, pool, rng, cfg, labels)
            steps.append(desc)
    check_vocabulary(mask, labels, f"mask {item.item_id} after edit {spec!r}")
    return mask, steps[0] if len(steps) == 1 else {"name": spec, "steps": steps}


def _transplant_from_pool(
    mask: Mask,
    item: MaskItem,
    pool: Sequence[MaskItem],
    rng: np.random.Generator,
    cfg: SynthesisConfig,
    labels: dict[int, str],
) -> EditResult:
    label = default_lesion_label(labels, cfg.lesion_label)
    donors = [p for p in pool if np.any(p.mask == label)]
    if not donors:
        raise DataError(
            item.source,
            f"transplant needs a donor, but no source mask holds lesion label {label} ({labels[label]!r})",
            hint="use masks with lesions, or drop 'transplant' from synthesis.edits",
        )
    others = [p for p in donors if p.item_id != item.item_id] or donors
    donor = others[int(rng.integers(len(others)))]
    if rng.random() >= cfg.transplant_probability:
        return mask.copy(), {
            "name": "transplant",
            "applied": False,
            "reason": f"not drawn (transplant_probability {cfg.transplant_probability:g})",
            "lesion_label": label,
            "donor_id": None,
        }
    return transplant(mask, donor.mask, rng, label, donor_id=donor.item_id, component=cfg.transplant_component)

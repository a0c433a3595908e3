"""Deterministic lesion edits of one mask, for counterfactual editing of a real scan.

Each edit takes a ``(1, *S)`` uint8 label map (the cache's label space, model grid) and returns the
edited mask plus a JSON-able description, like the random edits of :mod:`medsynth.synthesis.edits`
(whose lesion-label rule and vocabulary check are reused here):

* :func:`remove_lesion`: lesion voxels become the surrounding tissue: ``fill_label`` when given
  (the derived label, e.g. the brain), else each voxel takes the label of its nearest non-lesion
  foreground voxel (background only when the mask has no other foreground).
* :func:`move_lesion`: the lesion shifted by whole voxels; its old place is filled as by ``remove``;
  moved voxels that land outside the image or on background are dropped (counted).
* :func:`scale_lesion`: the lesion scaled about its centre of mass (nearest neighbour), same filling
  and dropping rules.
* :func:`edit_region`: where two masks differ, dilated: the region a counterfactual regenerates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medsynth.config.counterfactual import parse_counterfactual_edit
from medsynth.synthesis.edits import EditResult, Mask, _check

__all__ = ["apply_lesion_edit", "edit_region", "move_lesion", "remove_lesion", "scale_lesion"]


def _fill(m: Mask, les: npt.NDArray[np.bool_], lesion_label: int, fill_label: int | None) -> Mask:
    """``m`` with the voxels of ``les`` replaced by the surrounding tissue."""
    out = m.copy()
    if not les.any():
        return out
    if fill_label is not None:
        out[0][les] = fill_label
        return out
    other = (m[0] != lesion_label) & (m[0] != 0)
    if not other.any():
        out[0][les] = 0
        return out
    _, idx = ndimage.distance_transform_edt(~other, return_indices=True)
    nearest = m[0][tuple(idx)]
    out[0][les] = nearest[les]
    return out


def remove_lesion(mask: npt.NDArray[Any], lesion_label: int, fill_label: int | None = None) -> EditResult:
    """Replace every lesion voxel by the surrounding tissue label.

    Args:
        mask: ``(1, *S)`` labels.
        lesion_label: The lesion's label.
        fill_label: Label the lesion becomes (e.g. the derived brain label); None: per voxel, the
            label of the nearest non-lesion foreground voxel.

    Returns:
        The edited mask and ``{"name": "remove", "lesion_label", "fill_label", "voxels"}``.

    Raises:
        ValueError: If the mask holds no lesion voxel.
    """
    m = _check(mask)
    les = m[0] == lesion_label
    if not les.any():
        raise ValueError(f"the mask holds no voxel of lesion label {lesion_label}: nothing to remove")
    out = _fill(m, les, lesion_label, fill_label)
    return out, {
        "name": "remove",
        "lesion_label": int(lesion_label),
        "fill_label": fill_label,
        "voxels": int(les.sum()),
    }


def _paste(m: Mask, les: npt.NDArray[np.bool_], new: npt.NDArray[np.bool_], lesion: int, fill: int | None) -> Mask:
    out = _fill(m, les, lesion, fill)
    out[0][new] = lesion
    return out


def _placed(m: Mask, target: npt.NDArray[np.bool_], lesion_label: int, what: str) -> tuple[npt.NDArray[np.bool_], int]:
    """The target voxels that land on foreground (lesion or tissue), and how many were dropped."""
    inside = target & (m[0] > 0)
    dropped = int(target.sum() - inside.sum())
    if not inside.any():
        raise ValueError(f"{what} leaves no lesion voxel inside the anatomy (every voxel lands on background)")
    return inside, dropped


def move_lesion(
    mask: npt.NDArray[Any], shift: Sequence[float], lesion_label: int, fill_label: int | None = None
) -> EditResult:
    """Shift the lesion by whole voxels along the array axes.

    Args:
        mask: ``(1, *S)`` labels.
        shift: Voxels per spatial axis (``(dx, dy)`` or ``(dx, dy, dz)``; a missing ``dz`` is 0).
        lesion_label: The lesion's label.
        fill_label: See :func:`remove_lesion`.

    Returns:
        The edited mask and ``{"name": "move", "shift", "voxels", "dropped_voxels"}``.

    Raises:
        ValueError: No lesion, a shift of the wrong length, or no moved voxel inside the anatomy.
    """
    m = _check(mask)
    d = m.ndim - 1
    s = [int(v) for v in shift] + [0] * (d - len(shift))
    if len(s) != d:
        raise ValueError(f"move needs {d} offsets for a {d}D mask, got {list(shift)}")
    les = m[0] == lesion_label
    if not les.any():
        raise ValueError(f"the mask holds no voxel of lesion label {lesion_label}: nothing to move")
    target = np.zeros_like(les)
    if all(abs(o) < n for o, n in zip(s, les.shape, strict=True)):  # else everything leaves the image
        src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(s, les.shape, strict=True))
        dst = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(s, les.shape, strict=True))
        target[dst] = les[src]
    new, dropped = _placed(m, target, lesion_label, f"move by {s}")
    out = _paste(m, les, new, lesion_label, fill_label)
    return out, {"name": "move", "shift": s, "voxels": int(new.sum()), "dropped_voxels": dropped}


def scale_lesion(mask: npt.NDArray[Any], factor: float, lesion_label: int, fill_label: int | None = None) -> EditResult:
    """Scale the lesion by ``factor`` about its centre of mass (nearest-neighbour resampling).

    Args:
        mask: ``(1, *S)`` labels.
        factor: Linear scale (> 0; 2 doubles each extent).
        lesion_label: The lesion's label.
        fill_label: See :func:`remove_lesion`.

    Returns:
        The edited mask and ``{"name": "scale", "factor", "voxels_before", "voxels", "dropped_voxels"}``.

    Raises:
        ValueError: No lesion, ``factor <= 0``, or nothing left inside the anatomy.
    """
    if not factor > 0:
        raise ValueError(f"scale factor must be > 0, got {factor}")
    m = _check(mask)
    les = m[0] == lesion_label
    if not les.any():
        raise ValueError(f"the mask holds no voxel of lesion label {lesion_label}: nothing to scale")
    centre = np.asarray(ndimage.center_of_mass(les))
    # output voxel x samples input at centre + (x - centre) / factor
    matrix = np.eye(les.ndim) / factor
    offset = centre - matrix @ centre
    target = ndimage.affine_transform(les.astype(np.uint8), matrix, offset=offset, order=0, mode="constant") > 0
    if not target.any():
        target = np.zeros_like(les)
        target[tuple(round(c) for c in centre)] = True  # a lesion scaled below one voxel keeps one
    new, dropped = _placed(m, target, lesion_label, f"scale by {factor:g}")
    out = _paste(m, les, new, lesion_label, fill_label)
    desc = {
        "name": "scale",
        "factor": float(factor),
        "voxels_before": int(les.sum()),
        "voxels": int(new.sum()),
        "dropped_voxels": dropped,
    }
    return out, desc


def apply_lesion_edit(
    spec: str,
    mask: npt.NDArray[Any],
    lesion_label: int,
    fill_label: int | None = None,
    new_mask: npt.NDArray[Any] | None = None,
) -> EditResult:
    """Apply one counterfactual edit spec (``remove``, ``move:dx,dy``, ``scale:f``, ``mask:FILE``).

    Args:
        spec: The edit (see :func:`medsynth.config.counterfactual.parse_counterfactual_edit`).
        mask: ``(1, *S)`` original labels.
        lesion_label: The lesion's label.
        fill_label: See :func:`remove_lesion`.
        new_mask: For ``mask:FILE``: that file's labels on the same grid, ``(1, *S)``.

    Returns:
        The edited mask and its description.

    Raises:
        ValueError: On a bad spec, a missing/mis-shaped new mask, or an edit that cannot apply.
    """
    name, params = parse_counterfactual_edit(spec)
    if name == "remove":
        return remove_lesion(mask, lesion_label, fill_label)
    if name == "move":
        return move_lesion(mask, tuple(params), lesion_label, fill_label)  # type: ignore[arg-type]
    if name == "scale":
        return scale_lesion(mask, float(params[0]), lesion_label, fill_label)  # type: ignore[arg-type]
    m = _check(mask)
    if new_mask is None:
        raise ValueError(f"edit {spec!r} needs the new mask's labels")
    n = _check(new_mask)
    if n.shape != m.shape:
        raise ValueError(f"the new mask is {n.shape[1:]} on the model grid but the original is {m.shape[1:]}")
    return n.copy(), {"name": "mask", "file": str(params), "changed_voxels": int(np.count_nonzero(n != m))}


def edit_region(original: npt.NDArray[Any], edited: npt.NDArray[Any], dilate: int) -> npt.NDArray[np.bool_]:
    """Voxels where the masks differ, dilated by ``dilate`` voxels (full connectivity): ``(1, *S)`` bool."""
    a, b = _check(original), _check(edited)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    diff = a[0] != b[0]
    if dilate > 0 and diff.any():
        structure = ndimage.generate_binary_structure(diff.ndim, diff.ndim)
        diff = ndimage.binary_dilation(diff, structure=structure, iterations=dilate)
    return np.asarray(diff, dtype=bool)[None]

"""Configuration of counterfactual editing: change one thing in a REAL scan, keep the rest.

A counterfactual edit inverts the real image's latent with its original mask as the condition
(deterministic DDIM inversion), regenerates it with an edited mask and keeps everything outside a
dilated edit region by blending in the inverted trajectory at every step. Edits (``edits`` and
``medsynth edit --edit``):

* ``remove``: the lesion label becomes the surrounding tissue label (the derived label, e.g. the
  brain, when the config adds one; else the nearest non-lesion foreground label).
* ``move:dx,dy[,dz]``: the lesion shifted by whole voxels of the model grid along the array axes.
* ``scale:f``: the lesion scaled by ``f`` about its centre.
* ``mask:FILE``: a new mask file on the same grid as the original (``medsynth edit`` only).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from medsynth.config.base import StrictModel

_NUM = r"[-+]?\d+(?:\.\d*)?"
_MOVE = re.compile(rf"^move:({_NUM}),({_NUM})(?:,({_NUM}))?$")
_SCALE = re.compile(rf"^scale:({_NUM})$")


def parse_counterfactual_edit(spec: str, allow_mask: bool = True) -> tuple[str, tuple[float, ...] | str]:
    """Split an edit spec into its name and parameters.

    Args:
        spec: ``remove``, ``move:dx,dy[,dz]`` (integers), ``scale:f`` (f > 0) or ``mask:FILE``.
        allow_mask: Accept ``mask:FILE`` (a command-line edit; not in a config's edit list).

    Returns:
        ``("remove", ())``, ``("move", (dx, dy[, dz]))``, ``("scale", (f,))`` or ``("mask", "FILE")``.

    Raises:
        ValueError: On anything else.
    """
    s = spec.strip()
    if s == "remove":
        return "remove", ()
    m = _MOVE.match(s.replace(" ", ""))
    if m:
        parts = [p for p in m.groups() if p is not None]
        if any(float(p) != int(float(p)) for p in parts):
            raise ValueError(f"edit {spec!r}: move offsets are whole voxels of the model grid")
        shift = tuple(float(int(float(p))) for p in parts)
        if not any(shift):
            raise ValueError(f"edit {spec!r} moves nothing")
        return "move", shift
    m = _SCALE.match(s.replace(" ", ""))
    if m:
        f = float(m.group(1))
        if not f > 0:
            raise ValueError(f"edit {spec!r}: the scale factor must be > 0")
        return "scale", (f,)
    if allow_mask and s.startswith("mask:") and s[5:].strip():
        return "mask", s[5:].strip()
    allowed = "remove, move:dx,dy, scale:f" + (", mask:FILE" if allow_mask else "")
    raise ValueError(f"unknown counterfactual edit {spec!r}; choose one of {allowed}")


class CounterfactualConfig(StrictModel):
    """Counterfactual edits of real scans and the optional stage that measures them on test scans.

    The stage edits up to ``n_cases`` lesion-bearing TEST scans with every entry of ``edits`` and
    measures: SSIM outside the dilated edit region against the original after the autoencoder round
    trip; the reference segmenter's lesion Dice on the edited image (where the new mask puts it)
    relative to plain synthesis from the same edited mask; and how often it still finds a lesion
    where one was removed.
    """

    enabled: bool = Field(False, description="Run the counterfactual stage in the pipeline (off by default).")
    n_cases: int = Field(16, ge=1, description="Lesion-bearing test scans edited (spread over the split).")
    edits: list[str] = Field(
        default_factory=lambda: ["remove", "move:6,0", "scale:1.5"],
        description="Edits applied to every selected scan: 'remove', 'move:dx,dy[,dz]' (model-grid voxels "
        "along the array axes) and 'scale:f'.",
    )
    min_lesion_voxels: int = Field(20, ge=1, description="Smallest lesion (model-grid voxels) of a selected scan.")
    dilate: int = Field(
        3,
        ge=0,
        description="Voxels (model grid) by which the changed region is dilated; outside it the inverted "
        "latents of the original are kept at every step (the region is then rounded up to whole latent voxels).",
    )
    steps: int | None = Field(
        None, ge=1, description="DDIM steps of inversion and regeneration (None: sampling.steps)."
    )
    guidance_scale: float | None = Field(
        None,
        ge=0,
        description="Classifier-free guidance of the regeneration (None: the sampling section's scale, "
        "calibrated when 'auto'). The inversion always uses the plain conditional model.",
    )
    region_noise: Literal["inverted", "fresh"] = Field(
        "fresh",
        description="Start of the edit region: 'fresh' Gaussian noise (seeded; the old lesion's trace is not "
        "carried over) or the 'inverted' latent of the original.",
    )
    paste_original: bool = Field(
        True,
        description="medsynth edit: write the input's own voxels outside the edit region (resampled back onto the "
        "input grid), so only the region changes; False: the whole regenerated image (outside the region: the "
        "autoencoder's round trip at the model's resolution). Needs an invertible (percentile) normalisation.",
    )
    feather: float = Field(
        2.0,
        ge=0,
        description="medsynth edit with paste_original: width, in model-grid voxels, of the band INSIDE the edit "
        "region over which the regenerated content fades into the input's own voxels (0: a hard paste, whose "
        "edge shows where the model's resolution is coarser than the input's). Capped at 'dilate', so the edited "
        "lesion itself is always fully regenerated. Outside the region the input's voxels are kept exactly.",
    )
    min_ssim_outside: float = Field(0.90, gt=0, le=1, description="Target: SSIM outside the edit region.")
    min_dice_ratio: float = Field(0.9, gt=0, description="Target: lesion Dice of edits / of plain synthesis.")
    fp_min_voxels: int = Field(
        5,
        ge=0,
        description="A removed lesion counts as found again when MORE than this many lesion voxels are predicted "
        "inside the voxels it occupied (as validation.fp_min_voxels counts false positives).",
    )
    n_figure: int = Field(6, ge=0, description="Rows of the figure original | edited mask | result | difference.")
    seed: int = Field(0, description="Seed of the fresh noise inside the edit region (cases are chosen evenly).")

    @field_validator("edits")
    @classmethod
    def _edits_ok(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("edits must name at least one edit")
        for v in value:
            parse_counterfactual_edit(v, allow_mask=False)
        return [v.replace(" ", "") for v in value]

"""Configuration of the synthesis stage: which masks, which edits, how many images, what is written."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from medsynth.config.base import StrictModel

EDIT_NAMES = ("none", "flip", "elastic", "transplant")
"""Edits of source masks: keep, left-right flip, random elastic warp, lesion transplant."""


def parse_edit(spec: str) -> tuple[str, ...]:
    """Split an edit entry (``"flip"`` or a chain ``"flip+elastic"``) into its edit names.

    Raises:
        ValueError: On an unknown name, an empty part, or ``none`` inside a chain.
    """
    parts = tuple(p.strip() for p in spec.split("+"))
    bad = [p for p in parts if p not in EDIT_NAMES]
    if bad:
        raise ValueError(f"unknown edit {bad[0]!r} in {spec!r}; choose from {list(EDIT_NAMES)} (chain with '+')")
    if len(parts) > 1 and "none" in parts:
        raise ValueError(f"edit chain {spec!r} cannot contain 'none'")
    return parts


class SynthesisConfig(StrictModel):
    """Synthesis of image/mask pairs from real or edited masks.

    Each source mask gives one *variant* per entry of ``edits`` and ``n_per_mask`` images per
    variant, so the output holds ``n_masks * len(edits) * n_per_mask`` image/mask pairs.
    """

    n_per_mask: int = Field(1, ge=1, description="Images generated per (edited) mask, each with its own seed.")
    source: Literal["split", "folder", "manifest"] = Field(
        "split",
        description="Where the masks come from: a split of the preprocessing cache, a folder of mask files "
        "(masks_path), or a CSV manifest with a 'mask' column (masks_path).",
    )
    split: Literal["train", "val", "test", "all"] = Field(
        "test", description="Cache split whose masks are used (source 'split'); 'all' for every split."
    )
    masks_path: str | None = Field(
        None,
        description="Folder of mask files (source 'folder') or CSV manifest (source 'manifest': columns mask, "
        "optional image, id, patient, intensity_lo, intensity_hi). Masks of any size, spacing and orientation go "
        "through the training transforms (orientation, spacing, crop/pad, data.label_remap); a derived label "
        "(preprocess.derived_label) is computed from the manifest's image, or must already be in the mask.",
    )
    max_masks: int | None = Field(None, ge=1, description="Use only the first N source masks (quick runs).")
    edits: list[str] = Field(
        default_factory=lambda: ["none"],
        description="One variant per entry: 'none' (the mask as is), 'flip' (left-right, array axis 0), "
        "'elastic' (random smooth warp, nearest-neighbour), 'transplant' (paste a lesion from another "
        "mask inside this mask's non-background region), or a chain such as 'flip+transplant'.",
    )
    elastic_sigma: float = Field(
        4.0, gt=0, description="Elastic edit: Gaussian smoothing (voxels) of the random displacement field."
    )
    elastic_magnitude: float = Field(3.0, ge=0, description="Elastic edit: largest displacement (voxels).")
    lesion_label: int | None = Field(
        None,
        ge=1,
        description="Transplant edit: label index of the lesion; None = the highest index whose name looks "
        "like a lesion/tumour (lesion, tumour, tumor, cancer, metastasis, glioma, neoplasm).",
    )
    transplant_probability: float = Field(
        1.0, ge=0, le=1, description="Transplant edit: probability that a mask receives a lesion (else kept)."
    )
    transplant_component: Literal["all", "largest", "random"] = Field(
        "all",
        description="Transplant edit: the donor's lesion components moved together ('all'), or only its largest "
        "or one random connected component.",
    )
    output_format: Literal["nifti", "png"] = Field(
        "nifti",
        description="'nifti': images/<id>.nii.gz + labels/<id>.nii.gz (2D or 3D, full geometry); "
        "'png': 2D only, image quantised to png_dtype, labels uint8 (PNG keeps pixel spacing only; the "
        "full affine is in manifest.json).",
    )
    png_dtype: Literal["uint8", "uint16"] = Field("uint8", description="PNG output: image sample type.")
    output_geometry: Literal["native", "model"] = Field(
        "native",
        description="Masks from files (source folder/manifest): 'native' writes each image/mask pair on its "
        "source mask's own grid (size, spacing, orientation, origin; SimpleITK resampling, image linear, mask "
        "nearest); 'model' writes the model's grid (preprocess.spatial_size). Split sources are always on the "
        "model grid. manifest.json records both geometries of every item.",
    )
    intensity_range: tuple[float, float] | None = Field(
        None,
        description="[lo, hi]: write NIfTI images as lo + x * (hi - lo) instead of the model's [0, 1] scale "
        "(the inverse of percentile scaling, with lo/hi the source's clip values). A per-mask range from a "
        "CSV manifest (intensity_lo/intensity_hi columns) takes precedence. None: keep [0, 1].",
    )
    n_grid: int = Field(8, ge=0, description="Rows of the sample grid PNG (real | mask | synthetic); 0: none.")
    refuse_memorised: bool = Field(
        False,
        description="Refuse to export synthetic images the memorisation audit flags: nearest training image "
        "closer than the validation.memorisation_percentile-th percentile of the real test images' nearest-"
        "training distances (validation.memorisation_distance). Refused images are listed in "
        "refused_memorised.json. Needs the preprocessing cache (train + test splits). Images generated from "
        "TRAINING masks share their source's layout and are often flagged: synthesise from held-out or edited masks.",
    )
    seed: int = Field(0, description="Seed of the edits and of the sampling noise.")

    @field_validator("edits")
    @classmethod
    def _edits_ok(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("edits must name at least one edit (use ['none'] for the masks as they are)")
        out = ["+".join(parse_edit(v)) for v in value]
        dup = sorted({v for v in out if out.count(v) > 1})
        if dup:
            raise ValueError(f"edits lists {dup} more than once; use n_per_mask for more images per variant")
        return out

    @field_validator("intensity_range")
    @classmethod
    def _range_ok(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not value[0] < value[1]:
            raise ValueError(f"intensity_range must be [lo, hi] with lo < hi, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _source_ok(self) -> Self:
        if self.source != "split" and not self.masks_path:
            raise ValueError(f"source {self.source!r} needs masks_path")
        return self

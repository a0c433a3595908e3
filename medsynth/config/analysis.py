"""The optional analysis stage: a latent map of real and synthetic items, and a bias report per subgroup."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from medsynth.config.base import StrictModel

TCGA_SITE = r"^TCGA_([A-Za-z0-9]{2})_"
"""Default site pattern: the TCGA tissue-source-site code of ids like ``TCGA_CS_4941_19960909`` -> ``CS``."""


class UmapConfig(StrictModel):
    """The 2D UMAP (umap-learn, optional extra ``medsynth[analysis]``) of the item embeddings."""

    enabled: bool = Field(True, description="Draw the UMAP (coverage is computed without it).")
    n_neighbors: int = Field(15, ge=2, description="UMAP n_neighbors (capped at the number of items - 1).")
    min_dist: float = Field(0.1, ge=0, description="UMAP min_dist.")
    metric: str = Field("euclidean", description="UMAP metric of the embedding space.")
    seed: int = Field(0, description="UMAP random_state (single-threaded, reproducible).")


class AnalysisConfig(StrictModel):
    """Latent map (coverage of the real test items by synthetic ones) and bias report (per site / lesion size)."""

    enabled: bool = Field(False, description="Run the analysis stage (after validate and experiment).")
    embedding: Literal["features", "latents"] = Field(
        "features",
        description="Embedding of the latent map and the coverage: the in-domain feature encoder of the realism "
        "metric ('features'), or the autoencoder's flattened latent means ('latents').",
    )
    max_items: int = Field(
        400, ge=2, description="At most this many real train items (spread evenly) in the map and the coverage."
    )
    n_synthetic: int | None = Field(
        None,
        ge=1,
        description="Synthetic items of the map, generated from as many real TRAINING masks (spread evenly); "
        "None: as many as the real train items used.",
    )
    nn_quantile: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Coverage radius: this quantile of the real test items' nearest-real-train distances.",
    )
    min_items: int = Field(5, ge=2, description="Coverage and UMAP need at least this many items per set.")
    site_pattern: str | None = Field(
        TCGA_SITE,
        description="Regex on the patient id whose first group (or whole match) is the site; None or no match "
        "anywhere: one group 'all'.",
    )
    size_tertiles: bool = Field(True, description="Also report per lesion-size tertile (of the lesion-holding items).")
    target_dice_ratio: float = Field(
        0.95, gt=0, description="A subgroup whose lesion Dice ratio (synthetic/real) CI upper bound is below: flagged."
    )
    target_contrast_ratio: float = Field(
        0.8, gt=0, description="A subgroup whose lesion contrast ratio CI upper bound is below this: flagged."
    )
    min_patients: int = Field(2, ge=1, description="Subgroups with fewer patients are reported as n/a.")
    seed: int = Field(0, description="Seed of the synthetic items of the map.")
    umap: UmapConfig = Field(default_factory=UmapConfig)  # type: ignore[arg-type]

    @field_validator("site_pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"site_pattern {v!r} is not a regular expression: {exc}") from None
        return v

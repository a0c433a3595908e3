"""Configuration of the site-adaptation experiment (LoRA vs full fine-tuning vs none on a held-out site)."""

from __future__ import annotations

import re
from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from medsynth.config.base import StrictModel

AdaptMethod = Literal["none", "lora", "full"]
AdaptNetwork = Literal["unet", "controlnet"]


class AdaptationConfig(StrictModel):
    """Adapt the generator to a site it was not trained on, from a few of that site's patients.

    The generator of the config is trained on the data ``data.include`` selects (e.g. every site but
    the target: ``include: "^(?!TCGA_CS_)"``); this stage preprocesses the target site's patients
    from ``data.root``, adapts the generator on ``k`` of them (for each ``k`` in ``k_patients``) and
    compares ``methods`` on the site's remaining patients.
    """

    enabled: bool = Field(False, description="Run the site-adaptation stage (an optional experiment).")
    site_pattern: str = Field(
        r"TCGA_([A-Z0-9]{2})_",
        description="Regex searched in each patient id; its first group is the site (TCGA_CS_4941 -> CS).",
    )
    target_site: str = Field("", description="The held-out site the generator is adapted to (e.g. CS).")
    k_patients: list[int] = Field(
        default_factory=lambda: [2, 5], description="Adaptation set sizes (patients of the target site)."
    )
    methods: list[AdaptMethod] = Field(
        default_factory=lambda: list[AdaptMethod](["none", "lora", "full"]),
        description="none = the base generator; lora = peft LoRA of rank `rank`; full = fine-tuning the same layers.",
    )
    networks: list[AdaptNetwork] = Field(
        default_factory=lambda: list[AdaptNetwork](["unet", "controlnet"]),
        description="Networks whose convolutions and attention projections are adapted.",
    )
    rank: int = Field(4, ge=1, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (the update is alpha/r * BA); None: rank.")
    steps: int = Field(200, ge=1, description="Adaptation optimiser steps (the ControlNet training loop).")
    lr: float = Field(1e-4, gt=0, description="Adaptation learning rate (AdamW).")
    batch_size: int = Field(8, ge=1, description="Adaptation batch size.")
    seed: int = Field(0, description="Seed of the patient choice and of the adaptation loop.")
    max_eval_items: int = Field(300, ge=1, description="Evaluation slices/volumes of the remaining patients (spread).")
    n_bootstrap: int = Field(200, ge=10, description="Patient-bootstrap resamples of the Dice-ratio CI.")

    @field_validator("site_pattern")
    @classmethod
    def _one_group(cls, v: str) -> str:
        try:
            groups = re.compile(v).groups
        except re.error as exc:
            raise ValueError(f"site_pattern is not a regex: {exc}") from None
        if groups < 1:
            raise ValueError("site_pattern needs a capture group (the site), e.g. TCGA_([A-Z0-9]{2})_")
        return v

    @model_validator(mode="after")
    def _usable(self) -> Self:
        if any(k < 1 for k in self.k_patients) or not self.k_patients:
            raise ValueError("k_patients must be one or more positive patient counts")
        if not self.methods or not self.networks:
            raise ValueError("methods and networks must not be empty")
        if self.enabled and not self.target_site:
            raise ValueError("adaptation.enabled needs adaptation.target_site")
        return self

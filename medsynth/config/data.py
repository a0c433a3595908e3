"""Configuration of dataset ingestion: where the data is, its layout, labels and splits."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from medsynth.config.base import StrictModel

Layout = Literal["auto", "msd", "paired", "csv"]


class SplitConfig(StrictModel):
    """Patient-level train/val/test split."""

    train: float = Field(0.7, ge=0.0, le=1.0, description="Fraction of patients in the training split.")
    val: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of patients in the validation split.")
    test: float = Field(0.2, ge=0.0, le=1.0, description="Fraction of patients in the test split.")
    seed: int = Field(0, description="Seed of the patient shuffle; the same seed always gives the same split.")

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1 (train+val+test = {total:g})")
        return self


class DataConfig(StrictModel):
    """Where a dataset lives and how to read it.

    Relative paths are resolved against the current working directory; ``${VAR}`` and
    ``${VAR:-default}`` are expanded from the environment (e.g. ``${MEDSYNTH_SHARED:-../shared}``).
    """

    root: str = Field(..., description="Dataset root folder (or the CSV manifest for layout 'csv').")
    layout: Layout = Field("auto", description="Dataset layout; 'auto' detects it and says which it chose.")
    images_dir: str = Field(
        "", description="Paired layout: folder of images relative to root ('' = root, searched recursively)."
    )
    masks_dir: str | None = Field(
        None, description="Paired layout: folder of masks relative to root (None = next to the images)."
    )
    mask_suffix: str = Field(
        "", description="Paired layout: the mask's file stem is the image stem plus this suffix (e.g. '_mask')."
    )
    patient_regex: str | None = Field(
        None,
        description=(
            "Regex applied to the image path relative to root; its first group is the patient id. "
            "None: the parent folder name when images sit in per-patient folders, else the case id."
        ),
    )
    include: str | None = Field(
        None, description="Regex on case ids: only matching cases are used (e.g. a subset for a quick run)."
    )
    channel: int | None = Field(
        None, ge=0, description="Channel to keep from 4D (multi-modal) images (one contrast at a time)."
    )
    channels: tuple[str, ...] = Field(
        (),
        description="Multi-contrast cases modelled jointly: one name per channel, in order (e.g. [flair, t1c, t2]). "
        "Channel k is the CSV column image_k, the nnU-Net file X_000k, or index k of a 4D NIfTI's last axis. "
        "Empty (the default): one channel per case (data.channel picks it from multi-channel data).",
    )
    labels: dict[int, str] = Field(
        default_factory=dict,
        description="Label vocabulary: mask value → name; 0 must be the background. Empty (the default): read "
        "from a dataset.json next to the data, else inferred from the masks (union of values) and reported.",
    )
    label_remap: dict[int, int] = Field(
        default_factory=dict, description="Mask values mapped before validation, e.g. {255: 1}."
    )
    split: SplitConfig = Field(default_factory=SplitConfig)  # type: ignore[arg-type]

    @property
    def n_channels(self) -> int:
        """Image channels per case: ``len(channels)``, or 1 when the cases are read one channel at a time."""
        return max(len(self.channels), 1)

    @model_serializer(mode="wrap")
    def _single_channel_as_before(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Leave an empty ``channels`` out of dumps: single-channel configs keep their stage keys and cache keys."""
        data = handler(self)
        if isinstance(data, dict) and not self.channels:
            data.pop("channels", None)
        return data

    @model_validator(mode="after")
    def _channels_ok(self) -> DataConfig:
        if self.channels and self.channel is not None:
            raise ValueError("set data.channels (all contrasts jointly) or data.channel (one of them), not both")
        if len(set(self.channels)) != len(self.channels) or any(not c.strip() for c in self.channels):
            raise ValueError(f"data.channels must be distinct non-empty names, got {list(self.channels)}")
        return self

    @model_validator(mode="after")
    def _labels_ok(self) -> DataConfig:
        if not self.labels:  # resolved from the data (medsynth.data.vocabulary)
            return self
        if 0 not in self.labels:
            raise ValueError("labels must contain 0 (background)")
        bad = sorted(v for v in self.label_remap.values() if v not in self.labels)
        if bad:
            raise ValueError(f"label_remap maps to values {bad} that are not in labels {sorted(self.labels)}")
        return self

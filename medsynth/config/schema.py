"""The root configuration: one section per pipeline stage."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from medsynth.config.adaptation import AdaptationConfig
from medsynth.config.analysis import AnalysisConfig
from medsynth.config.base import StrictModel
from medsynth.config.counterfactual import CounterfactualConfig
from medsynth.config.data import DataConfig
from medsynth.config.evaluation import SegmenterConfig, ValidationConfig
from medsynth.config.experiment import ExperimentConfig
from medsynth.config.orchestration import OrchestrationConfig
from medsynth.config.preprocess import PreprocessConfig, QCConfig
from medsynth.config.privacy import PrivacyConfig
from medsynth.config.stages import AutoencoderStage, ControlNetStage, DiffusionStage, SamplingConfig
from medsynth.config.synthesis import SynthesisConfig
from medsynth.config.tracking import TrackingConfig


class PhantomConfig(StrictModel):
    """The built-in procedural phantom dataset, generated when ``data.root`` does not exist yet."""

    enabled: bool = Field(False, description="Generate the phantom into data.root if that folder is missing.")
    dim: int = Field(2, ge=2, le=3, description="2: per-patient PNG slices; 3: MSD-style NIfTI volumes.")
    n: int = Field(24, ge=1, description="Number of phantom patients.")
    size: int = Field(64, ge=16, description="In-plane size in voxels.")
    slices_per_patient: int = Field(8, ge=1, description="2D: slices written per patient.")
    lesion_probability: float = Field(0.6, ge=0, le=1, description="Probability that a patient has a lesion.")
    seed: int = Field(0, description="Generator seed.")


class MedsynthConfig(StrictModel):
    """Root configuration of a medsynth project.

    Attributes:
        name: Experiment name (MLflow experiment, output sub-folder).
        output_dir: Folder for every stage's outputs; relative to the working directory.
        seed: Global seed.
    """

    name: str = Field("medsynth", description="Experiment name; also the output sub-folder.")
    output_dir: str = Field("outputs", description="Root folder of all outputs (relative to the working dir).")
    seed: int = Field(0, description="Global random seed.")
    data: DataConfig
    phantom: PhantomConfig = Field(default_factory=PhantomConfig)  # type: ignore[arg-type]
    qc: QCConfig = Field(default_factory=QCConfig)  # type: ignore[arg-type]
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)  # type: ignore[arg-type]
    autoencoder: AutoencoderStage = Field(default_factory=AutoencoderStage)  # type: ignore[arg-type]
    diffusion: DiffusionStage = Field(default_factory=DiffusionStage)  # type: ignore[arg-type]
    controlnet: ControlNetStage = Field(default_factory=ControlNetStage)  # type: ignore[arg-type]
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)  # type: ignore[arg-type]
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)  # type: ignore[arg-type]
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)  # type: ignore[arg-type]
    synthesis: SynthesisConfig = Field(default_factory=SynthesisConfig)  # type: ignore[arg-type]
    segmenter: SegmenterConfig = Field(default_factory=SegmenterConfig)  # type: ignore[arg-type]
    validation: ValidationConfig = Field(default_factory=ValidationConfig)  # type: ignore[arg-type]
    experiment: ExperimentConfig = Field(default_factory=ExperimentConfig)  # type: ignore[arg-type]
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)  # type: ignore[arg-type]
    adaptation: AdaptationConfig = Field(default_factory=AdaptationConfig)  # type: ignore[arg-type]
    counterfactual: CounterfactualConfig = Field(default_factory=CounterfactualConfig)  # type: ignore[arg-type]
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _synthesis_fits(self) -> Self:
        if self.synthesis.output_format == "png" and self.preprocess.spatial_dims != 2:
            raise ValueError("synthesis.output_format 'png' needs 2D data (preprocess.spatial_dims 2); use 'nifti'")
        return self

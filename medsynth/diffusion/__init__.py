"""Diffusion objectives (training targets) and samplers (pure loops over a narrow denoiser interface)."""

from medsynth.diffusion.denoiser import CountingDenoiser, Denoiser
from medsynth.diffusion.guidance import cfg_denoiser
from medsynth.diffusion.objectives import OBJECTIVE_NAMES, DiffusionObjective, ObjectiveName, build_objective
from medsynth.diffusion.samplers import SAMPLERS, ProgressCallback, sample

__all__ = [
    "OBJECTIVE_NAMES",
    "SAMPLERS",
    "CountingDenoiser",
    "Denoiser",
    "DiffusionObjective",
    "ObjectiveName",
    "ProgressCallback",
    "build_objective",
    "cfg_denoiser",
    "sample",
]

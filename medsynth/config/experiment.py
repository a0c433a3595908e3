"""The downstream augmentation experiment: does adding synthetic data help a task network trained on little real data?

A grid of cells ``(arm, fraction, ratio, seed)``. Each cell trains a task network from scratch on a
patient-level fraction of the real training split (plus synthetic images, for some arms) and is
evaluated on the fixed patient-level test split:

* ``presence``: a MONAI classifier predicts whether the target label (the lesion/tumour) is present
  in an image; AUROC, sensitivity at 90% specificity, balanced accuracy and F1.
* ``segmentation``: the reference segmenter's UNet (``segmenter`` section) is trained on the cell's
  data; Dice of the lesion on lesion-bearing test items and the false-positive rate on lesion-free
  ones (mean foreground Dice when the label vocabulary names no lesion, e.g. hippocampus).

``tasks`` lists the tasks (default: both on 2D data, segmentation on 3D); every task runs every cell.
Each cell trains until its score on the patient-level validation split stops improving
(``convergence``) and keeps its best-on-validation weights.

Arms: ``real`` (the real subset; with ratio r > 0 plus r synthetic images per real image),
``real_classical`` (the same data with classical MONAI augmentation on every batch: at ratio 0 classical
augmentation alone, at r > 0 synthetic data on top of it, compared with classical alone) and
``synthetic_only`` (r synthetic images per real image of the subset, the real images themselves
left out; ratios >= 1 only). Synthetic images come from a pool generated once per training mask
(see :mod:`medsynth.evaluation.experiment`).
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from medsynth.config.base import StrictModel
from medsynth.config.stages import SamplingConfig
from medsynth.config.synthesis import parse_edit
from medsynth.config.training import OptimConfig

POOL_ONLY_EDITS = ("counterfactual",)
"""Pool variants that are not mask edits: 'counterfactual' (a same-patient lesion transplanted into a lesion-free
REAL slice and generated in context by inversion + blending, :mod:`medsynth.synthesis.counterfactual`)."""

Arm = Literal["real", "real_classical", "synthetic_only"]
ARMS: tuple[Arm, ...] = ("real", "real_classical", "synthetic_only")
"""Arms of the grid: real (+ synthetic at ratio r), real with classical augmentation, synthetic only."""


class ClassifierOptimConfig(OptimConfig):
    """Optimisation of the presence classifier (sized for a CPU: a small ResNet, a few hundred steps)."""

    steps: int = Field(
        400,
        ge=1,
        description="Maximum optimiser steps per cell (early stopping on the validation split may end it sooner).",
    )
    batch_size: int = Field(32, ge=1, description="Batch size.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(20, ge=0, description="Linear learning-rate warm-up steps.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="Unused by the classifier (no EMA); keep None.")
    val_every: int = Field(400, ge=1, description="Unused by the classifier (no periodic validation).")
    ckpt_every: int = Field(400, ge=1, description="Unused by the classifier (cells are not checkpointed).")


Task = Literal["presence", "segmentation"]
TASKS: tuple[Task, ...] = ("presence", "segmentation")


class ConvergenceConfig(StrictModel):
    """Training of each grid cell until its validation score stops improving (early stopping).

    Every ``eval_every`` steps the cell's network is scored on the patient-level validation split
    (presence: AUROC; segmentation: mean per-case Dice); the best-scoring weights are kept, and
    training stops after ``patience`` evaluations without an improvement of at least ``min_delta``
    (or at the task's maximum steps: ``experiment.train.steps`` / ``experiment.segmenter_steps``).
    Without a validation split, cells train for the maximum steps and keep their last weights.
    """

    enabled: bool = Field(
        True, description="False: train exactly the maximum steps and keep the last weights (no validation)."
    )
    eval_every: int = Field(25, ge=1, description="Optimiser steps between validation evaluations.")
    patience: int = Field(
        4, ge=1, description="Evaluations without improvement (by more than min_delta) before a cell stops."
    )
    min_delta: float = Field(1e-3, ge=0, description="Smallest validation-score gain that counts as an improvement.")
    min_steps: int = Field(0, ge=0, description="Never stop before this many steps.")
    schedule: Literal["cosine", "plateau", "constant"] = Field(
        "cosine",
        description="Learning rate after the linear warm-up: 'cosine' decays to min_lr_ratio x lr at the "
        "maximum steps; 'plateau' multiplies it by plateau_factor after plateau_patience evaluations "
        "without improvement; 'constant'.",
    )
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="'cosine': final learning rate / peak learning rate.")
    plateau_factor: float = Field(0.5, gt=0, lt=1, description="'plateau': learning-rate factor on a plateau.")
    plateau_patience: int = Field(2, ge=1, description="'plateau': evaluations without improvement before a cut.")
    max_val_items: int | None = Field(
        256,
        ge=1,
        description="Validation items scored per evaluation (spread over the split, every patient kept "
        "where possible); None: all.",
    )


class ExperimentConfig(StrictModel):
    """Downstream augmentation experiment (real-data fraction x synthetic:real ratio x seed)."""

    tasks: list[Task] | None = Field(
        None,
        description="Downstream tasks, each run on every cell: 'presence' (classify whether target_label is in "
        "an image) and/or 'segmentation' (the segmenter's UNet: lesion Dice and false-positive rate). "
        "None: [presence, segmentation] for 2D data, [segmentation] for 3D.",
    )
    convergence: ConvergenceConfig = Field(default_factory=ConvergenceConfig)  # type: ignore[arg-type]
    target_label: int | None = Field(
        None,
        ge=1,
        description="The lesion label: presence classifies whether it is in an image; segmentation scores its Dice "
        "on the test items holding it and its false-positive rate on the others. None = the highest label named "
        "like a lesion/tumour (presence: else the highest label; segmentation: else the mean foreground Dice).",
    )
    min_target_voxels: int = Field(
        1, ge=1, description="Presence task: an image is positive when its mask holds at least this many target voxels."
    )
    fractions: list[float] = Field(
        default_factory=lambda: [0.05, 0.10, 0.25, 0.50, 1.0],
        description="Fractions of the training PATIENTS used as real data (nested: for one seed, a smaller "
        "fraction's patients are a subset of a larger one's). Sorted ascending.",
    )
    ratios: list[int] = Field(
        default_factory=lambda: [0, 1, 2, 5],
        description="Synthetic:real ratios (synthetic images per real image of the cell). Sorted ascending.",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        description="Seeds per cell (patient subset, synthetic draw, initialisation, batch order).",
    )
    arms: list[Arm] = Field(
        default_factory=lambda: list(ARMS),
        description="'real' (ratio r > 0: real + synthetic), 'real_classical' (the same with classical MONAI "
        "augmentation on every batch, at the classical_ratios), 'synthetic_only' (ratio x n_real synthetic images "
        "of the subset's masks and no real image; ratios >= 1 only).",
    )
    classical_ratios: list[int] | None = Field(
        None,
        description="Ratios of the 'real_classical' arm: None = every ratio of 'ratios' (synthetic data on top of "
        "classical augmentation, each compared with classical augmentation alone); [0] = classical augmentation "
        "alone (cheaper).",
    )
    classifier: Literal["resnet10", "densenet121"] = Field(
        "resnet10",
        description="Presence classifier, trained from scratch (never pretrained): 'resnet10' = MONAI ResNet "
        "with basic blocks [1, 1, 1, 1] and widths resnet_widths; 'densenet121' = MONAI DenseNet121.",
    )
    resnet_widths: tuple[int, int, int, int] = Field(
        (16, 32, 64, 128), description="'resnet10': channels of its four stages (MONAI's resnet10 uses 64..512)."
    )
    resnet_conv1_stride: int = Field(2, ge=1, le=4, description="'resnet10': stride of the first convolution.")
    balance: Literal["pos_weight", "sampler", "none"] = Field(
        "pos_weight",
        description="Class imbalance: 'pos_weight' = BCE positive weight n_neg/n_pos; 'sampler' = each batch "
        "drawn with equal probability from both classes; 'none'.",
    )
    train: ClassifierOptimConfig = Field(default_factory=ClassifierOptimConfig)  # type: ignore[arg-type]
    segmenter_steps: int | None = Field(
        None,
        ge=1,
        description="Segmentation task: maximum optimiser steps per cell (None: segmenter.train.steps; the other "
        "optimiser settings always come from segmenter.train; early stopping may end a cell sooner).",
    )
    augment_rotate_deg: float = Field(10.0, ge=0, description="Classical augmentation: largest rotation (degrees).")
    augment_scale: float = Field(0.1, ge=0, lt=1, description="Classical augmentation: largest relative zoom.")
    augment_noise_std: float = Field(0.03, ge=0, description="Classical augmentation: Gaussian noise std.")
    augment_intensity: float = Field(0.1, ge=0, lt=1, description="Classical augmentation: intensity scale +/-.")
    augment_prob: float = Field(0.5, ge=0, le=1, description="Classical augmentation: probability of each transform.")
    synthetic_pool_per_mask: int | None = Field(
        None,
        ge=0,
        description="Synthetic variants generated per training mask (None: the largest ratio). A cell needing "
        "more than its patients' pool holds draws with replacement (recorded per cell).",
    )
    pool_edits: list[str] = Field(
        default_factory=lambda: ["none", "transplant", "flip+elastic", "elastic", "flip"],
        description="Mask edit of pool variant k: pool_edits[k % len] ('none', 'flip', 'elastic', 'transplant' "
        "or a '+' chain; elastic and lesion parameters from the synthesis section). A transplant pastes a "
        "lesion of another slice of the SAME patient into a lesion-free slice (never another patient's); "
        "where that is impossible the step becomes 'elastic' (recorded per pool item). 'counterfactual' (alone, "
        "not in a chain): the same same-patient transplant, but the image is the REAL lesion-free slice edited in "
        "context (DDIM inversion with its mask, regeneration with the transplanted mask, everything outside the "
        "dilated lesion kept; settings from the counterfactual section); where no transplant applies, 'elastic' "
        "from noise.",
    )
    pool_sampling: SamplingConfig | None = Field(
        None, description="Sampler settings of the pool (None: the top-level 'sampling' section)."
    )
    predict_batch_size: int = Field(64, ge=1, description="Images per forward pass at evaluation.")
    n_bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples of TEST PATIENTS per interval.")
    ci: float = Field(0.95, gt=0, lt=1, description="Confidence level of the percentile bootstrap intervals.")
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap resampling.")
    external_test: str | None = Field(
        None,
        description="External test set (another site or cohort): a dataset folder (any layout the data section "
        "reads) or a CSV manifest, preprocessed with the same settings into its own cache; every cell's model is "
        "scored on it and reported separately. It never enters training or model selection. None: none.",
    )
    max_eval_items: int | None = Field(
        None, ge=1, description="Evaluate on the first N test (and validation) items only (quick runs); None: all."
    )

    @field_validator("fractions")
    @classmethod
    def _fractions_ok(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("fractions must hold at least one fraction")
        bad = [f for f in value if not 0 < f <= 1]
        if bad:
            raise ValueError(f"fractions must lie in (0, 1], got {bad}")
        if len(set(value)) != len(value):
            raise ValueError(f"fractions lists a value twice: {value}")
        return sorted(value)

    @field_validator("ratios")
    @classmethod
    def _ratios_ok(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("ratios must hold at least one ratio (0 = real only)")
        if any(r < 0 for r in value) or len(set(value)) != len(value):
            raise ValueError(f"ratios must be distinct integers >= 0, got {value}")
        return sorted(value)

    @field_validator("seeds")
    @classmethod
    def _seeds_ok(cls, value: list[int]) -> list[int]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"seeds must be a non-empty list of distinct seeds, got {value}")
        return value

    @field_validator("tasks")
    @classmethod
    def _tasks_ok(cls, value: list[Task] | None) -> list[Task] | None:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError(f"tasks must be a non-empty list of distinct tasks from {list(TASKS)}, got {value}")
        return value

    @field_validator("arms")
    @classmethod
    def _arms_ok(cls, value: list[Arm]) -> list[Arm]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"arms must be a non-empty list of distinct arms from {list(ARMS)}, got {value}")
        return value

    @field_validator("pool_edits")
    @classmethod
    def _edits_ok(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("pool_edits must name at least one edit (['none'] keeps the masks)")
        return [v.strip() if v.strip() in POOL_ONLY_EDITS else "+".join(parse_edit(v)) for v in value]

    @model_validator(mode="after")
    def _grid_ok(self) -> Self:
        if "synthetic_only" in self.arms and max(self.ratios) < 1:
            raise ValueError("arm 'synthetic_only' needs a ratio >= 1 in ratios")
        if self.classical_ratios is not None:
            extra = sorted(set(self.classical_ratios) - set(self.ratios))
            if extra or 0 not in self.classical_ratios:
                raise ValueError(
                    f"classical_ratios must include 0 and be a subset of ratios {self.ratios}, got "
                    f"{self.classical_ratios}"
                )
        return self

    @property
    def real_classical_ratios(self) -> list[int]:
        """Ratios of the 'real_classical' arm (``classical_ratios``, or every ratio)."""
        return sorted(self.classical_ratios if self.classical_ratios is not None else self.ratios)

    @property
    def pool_per_mask(self) -> int:
        """Variants generated per training mask: ``synthetic_pool_per_mask`` or the largest ratio."""
        return self.synthetic_pool_per_mask if self.synthetic_pool_per_mask is not None else max(self.ratios)

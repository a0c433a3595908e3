"""The presence classifier of the augmentation experiment: build, train (explicit loop), predict, score.

The classifier answers one binary question per image: does its mask hold the target label (the
lesion/tumour)? It is a MONAI network trained from scratch (never pretrained weights) with one output
logit and binary cross-entropy.

Training is a plain loop until the validation AUROC stops improving
(:func:`medsynth.evaluation.convergence.fit_until_converged`: AdamW, linear warm-up then a cosine or
plateau schedule, best-on-validation weights kept), gradient clipping, batches from
:func:`medsynth.training.common.batch_indices` (epoch-wise seeded permutations) or, with
``balance='sampler'``, drawn half from each class; with
``balance='pos_weight'`` the BCE positive weight is ``n_neg / n_pos``. Every random draw (initial
weights, batch order, augmentation, dropout) derives from the cell seed, so a cell is reproducible.

Classical augmentation (:func:`classical_augment`) applies MONAI random transforms to each batch:
``RandFlipd`` (each spatial axis), ``RandAffined`` (small rotation and zoom; nearest for masks),
``RandGaussianNoised`` and ``RandScaleIntensityd`` (image only), seeded by ``(seed, step)``.

Metrics (:func:`binary_metrics`) are implemented with numpy (scikit-learn is not a dependency; the
tests check them against it): AUROC as the Mann-Whitney statistic (ties count 1/2, optional case
weights), balanced accuracy and F1 of the positive class at a threshold (``p >= threshold`` is
positive), and :func:`youden_threshold` (maximises sensitivity + specificity - 1, chosen on the
validation split by the experiment).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from medsynth.config.experiment import ExperimentConfig
from medsynth.evaluation.convergence import ConvergenceRecord, fit_until_converged, make_schedule
from medsynth.progress import Progress
from medsynth.tracking.base import Tracker
from medsynth.training.common import (
    autocast,
    batch_indices,
    make_scaler,
    optimizer_step,
    seeded_global_rng,
    set_threads,
)

FloatArray = npt.NDArray[np.float64]

__all__ = [
    "balanced_indices",
    "binary_metrics",
    "build_classifier",
    "classical_augment",
    "predict_proba",
    "sensitivity_at_specificity",
    "train_classifier",
    "weighted_auroc",
    "youden_threshold",
]


def build_classifier(cfg: ExperimentConfig, spatial_dims: int, in_channels: int = 1) -> torch.nn.Module:
    """A fresh MONAI classifier with one output logit (never pretrained).

    Args:
        cfg: The experiment section (``classifier``, ``resnet_widths``, ``resnet_conv1_stride``).
        spatial_dims: 2 or 3.
        in_channels: Image channels (the contrasts of a multi-contrast dataset).
    """
    if cfg.classifier == "densenet121":
        from monai.networks.nets import DenseNet121

        dense: torch.nn.Module = DenseNet121(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1, pretrained=False
        )
        return dense
    from monai.networks.nets import ResNet

    res: torch.nn.Module = ResNet(
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=list(cfg.resnet_widths),
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=cfg.resnet_conv1_stride,
        num_classes=1,
    )
    return res


# --------------------------------------------------------------------------------------------------
# classical augmentation


def _augment_transform(cfg: ExperimentConfig, spatial_dims: int, with_mask: bool) -> Any:
    from monai.transforms import (
        Compose,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
    )

    keys = ["image", "mask"] if with_mask else ["image"]
    rot = math.radians(cfg.augment_rotate_deg)
    n_rot = 1 if spatial_dims == 2 else 3
    p = cfg.augment_prob
    steps: list[Any] = [RandFlipd(keys=keys, prob=p, spatial_axis=a) for a in range(spatial_dims)]
    steps.append(
        RandAffined(
            keys=keys,
            prob=p,
            rotate_range=[rot] * n_rot,
            scale_range=[cfg.augment_scale] * spatial_dims,
            mode=["bilinear", "nearest"] if with_mask else "bilinear",
            padding_mode="zeros",
        )
    )
    steps.append(RandGaussianNoised(keys=["image"], prob=p, mean=0.0, std=cfg.augment_noise_std))
    steps.append(RandScaleIntensityd(keys=["image"], factors=cfg.augment_intensity, prob=p))
    return Compose(steps)


def classical_augment(
    images: torch.Tensor,
    cfg: ExperimentConfig,
    seed: int,
    step: int,
    masks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Classical MONAI augmentation of a batch, deterministic given ``(seed, step)``.

    Each item gets random flips, a small affine (rotation up to ``augment_rotate_deg``, zoom up to
    ``augment_scale``; masks resampled nearest-neighbour), Gaussian noise and an intensity scale,
    each transform applied with probability ``augment_prob``.

    Args:
        images: ``(B, 1, *S)`` float images.
        cfg: The experiment section (augmentation strengths).
        seed: Cell seed.
        step: Optimiser step (a different draw per step).
        masks: Optional ``(B, 1, *S)`` integer masks moved with the images.

    Returns:
        The augmented images (float32, same shape) and masks (same dtype as given) or None.
    """
    spatial_dims = images.ndim - 2
    tf = _augment_transform(cfg, spatial_dims, masks is not None)
    tf.set_random_state(seed=int(np.random.default_rng([seed, step, 11]).integers(2**31 - 1)))
    out_x, out_y = [], []
    for i in range(images.shape[0]):
        item: dict[str, Any] = {"image": images[i].float()}
        if masks is not None:
            item["mask"] = masks[i].float()
        res = tf(item)
        out_x.append(torch.as_tensor(res["image"]).as_subclass(torch.Tensor).float())
        if masks is not None:
            out_y.append(torch.as_tensor(res["mask"]).as_subclass(torch.Tensor).round().to(masks.dtype))
    x = torch.stack(out_x)
    return x, (torch.stack(out_y) if masks is not None else None)


# --------------------------------------------------------------------------------------------------
# training and prediction


def balanced_indices(labels: npt.ArrayLike, step: int, batch_size: int, seed: int) -> npt.NDArray[np.int64]:
    """Batch indices with each item drawn from either class with probability 1/2 (uniform within a class).

    Deterministic given ``(seed, step)``. Falls back to uniform draws when one class is absent.
    """
    y = np.asarray(labels).astype(bool).ravel()
    rng = np.random.default_rng([seed, step, 5])
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if pos.size == 0 or neg.size == 0:
        return rng.integers(0, y.size, size=batch_size).astype(np.int64)
    take_pos = rng.random(batch_size) < 0.5
    out = np.where(take_pos, pos[rng.integers(0, pos.size, batch_size)], neg[rng.integers(0, neg.size, batch_size)])
    return out.astype(np.int64)


def train_classifier(
    images: torch.Tensor,
    labels: npt.ArrayLike,
    cfg: ExperimentConfig,
    seed: int,
    augment: bool,
    device: torch.device | None = None,
    tracker: Tracker | None = None,
    progress: Progress | None = None,
    val_images: torch.Tensor | None = None,
    val_labels: npt.ArrayLike | None = None,
) -> tuple[torch.nn.Module, ConvergenceRecord]:
    """Train a presence classifier from scratch on ``images`` and binary ``labels`` until its
    validation AUROC stops improving (``cfg.convergence``; at most ``cfg.train.steps`` steps).

    Args:
        images: ``(N, 1, *S)`` float images (2D or 3D).
        labels: ``(N,)`` 0/1 targets.
        cfg: The experiment section (network, ``train`` optimiser settings, balance, augmentation,
            ``convergence``).
        seed: Seed of everything random in the cell (init, batches, augmentation, dropout).
        augment: Apply :func:`classical_augment` to every batch.
        device: Where to train (default CPU).
        tracker: Receives ``train_loss`` every 10 steps and ``val_auroc`` at each evaluation.
        progress: Advanced once per step.
        val_images: ``(M, 1, *S)`` validation images (patients disjoint from training and test), or None.
        val_labels: ``(M,)`` their 0/1 targets. When they hold one class only, the score is minus
            the validation BCE.

    Returns:
        The network holding its best-on-validation weights (eval mode, on ``device``) and its
        :class:`~medsynth.evaluation.convergence.ConvergenceRecord`.
    """
    oc = cfg.train
    set_threads(oc.num_threads)
    dev = device or torch.device("cpu")
    y_all = torch.as_tensor(np.asarray(labels, dtype=np.float32).ravel())
    n = int(images.shape[0])
    if n == 0 or y_all.numel() != n:
        raise ValueError(f"need one label per image and at least one image (got {n} images, {y_all.numel()} labels)")
    n_pos = float(y_all.sum())
    n_neg = n - n_pos
    pos_weight = None
    if cfg.balance == "pos_weight" and n_pos > 0 and n_neg > 0:
        pos_weight = torch.tensor([n_neg / n_pos], device=dev)
    torch.manual_seed(int(np.random.default_rng([seed, 3]).integers(2**62)))
    net = build_classifier(cfg, images.ndim - 2, int(images.shape[1])).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=oc.lr, weight_decay=oc.weight_decay)
    sched, on_eval = make_schedule(opt, oc.warmup_steps, oc.steps, cfg.convergence)
    scaler = make_scaler(dev, oc.amp)  # fp16 (pre-Ampere GPU) needs loss scaling

    def train_step(step: int) -> float:
        if cfg.balance == "sampler":
            idx = balanced_indices(y_all.numpy(), step, oc.batch_size, seed)
        else:
            idx = batch_indices(n, step, oc.batch_size, seed)
        x = images[idx].float()
        if augment:
            x, _ = classical_augment(x, cfg, seed, step)
        x, yb = x.to(dev), y_all[idx].to(dev)
        with autocast(dev, oc.amp), seeded_global_rng(seed, step, 0, dev):
            logits = net(x).reshape(-1)
        loss = F.binary_cross_entropy_with_logits(logits.float(), yb, pos_weight=pos_weight)
        optimizer_step(loss, net, opt, sched, oc.grad_clip, scaler=scaler)
        return float(loss.detach())

    evaluate = None
    if val_images is not None and val_labels is not None and len(val_images) > 0:
        y_val = np.asarray(val_labels).astype(np.float64).ravel()

        def evaluate() -> float:
            p = predict_proba(net, val_images, cfg.predict_batch_size)
            if y_val.min() != y_val.max():
                return float(weighted_auroc(y_val, p)[0])
            p = np.clip(p, 1e-7, 1 - 1e-7)
            return float(np.mean(y_val * np.log(p) + (1 - y_val) * np.log(1 - p)))

    record = fit_until_converged(
        net, train_step, evaluate, oc.steps, cfg.convergence, on_eval, tracker, "auroc", progress
    )
    return net.eval(), record


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64) -> FloatArray:
    """Predicted probability of presence, ``(N,)`` float64, of ``images`` ``(N, 1, *S)`` (eval mode)."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs = []
    try:
        for i in range(0, images.shape[0], batch_size):
            logits = model(images[i : i + batch_size].float().to(dev)).reshape(-1)
            outs.append(torch.sigmoid(logits.float()).cpu().numpy().astype(np.float64))
    finally:
        model.train(was_training)
    return np.concatenate(outs) if outs else np.zeros(0, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# metrics


def weighted_auroc(y_true: npt.ArrayLike, score: npt.ArrayLike, weights: npt.ArrayLike | None = None) -> FloatArray:
    """AUROC (Mann-Whitney, ties 1/2) of scores, for one or many sets of case weights at once.

    ``AUROC = sum_{i pos, j neg} w_i w_j ([s_i > s_j] + 1/2 [s_i = s_j]) / (sum_pos w * sum_neg w)``;
    with unit weights this is ``sklearn.metrics.roc_auc_score``. Integer weights are case
    multiplicities, which is how the patient bootstrap uses it (one row per replicate).

    Args:
        y_true: ``(N,)`` 0/1 labels.
        score: ``(N,)`` scores (higher = more likely positive).
        weights: ``(N,)`` or ``(B, N)`` non-negative case weights; None: all 1.

    Returns:
        ``(B,)`` AUROC values (``(1,)`` without weights or with 1D weights); NaN where a class has
        zero weight.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length ({y.size} vs {s.size})")
    w = np.ones((1, y.size)) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if w.shape[1] != y.size:
        raise ValueError(f"weights have {w.shape[1]} columns for {y.size} cases")
    if y.size == 0:
        return np.full(w.shape[0], np.nan)
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted, w_sorted = s[order], y[order], w[:, order]
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])  # last index of each tie group
    cum_pos = np.cumsum(w_sorted * y_sorted, axis=1)[:, ends]
    cum_neg = np.cumsum(w_sorted * ~y_sorted, axis=1)[:, ends]
    grp_pos = np.diff(cum_pos, axis=1, prepend=0.0)
    grp_neg = np.diff(cum_neg, axis=1, prepend=0.0)
    below_neg = cum_neg - grp_neg  # negative weight strictly below each group
    num = np.sum(grp_pos * (below_neg + 0.5 * grp_neg), axis=1)
    den = cum_pos[:, -1] * cum_neg[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def binary_metrics(y_true: npt.ArrayLike, prob: npt.ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, balanced accuracy, F1, sensitivity and specificity of probabilities against 0/1 labels.

    A case is predicted positive when ``prob >= threshold``. Balanced accuracy is the mean of
    sensitivity and specificity (NaN where a class is absent, as is AUROC); F1 is that of the
    positive class, 0 when there is no true positive.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    pred = p >= threshold
    tp = float(np.sum(pred & y))
    fp = float(np.sum(pred & ~y))
    fn = float(np.sum(~pred & y))
    tn = float(np.sum(~pred & ~y))
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {
        "auroc": float(weighted_auroc(y, p)[0]),
        "balanced_accuracy": 0.5 * (sens + spec),
        "f1": f1,
        "sensitivity": sens,
        "specificity": spec,
        "threshold": float(threshold),
        "n_pos": int(y.sum()),
        "n_neg": int((~y).sum()),
    }


def youden_threshold(y_true: npt.ArrayLike, prob: npt.ArrayLike) -> float | None:
    """The threshold maximising Youden's J (sensitivity + specificity - 1) on these cases.

    Candidates are the distinct probabilities (positive when ``prob >= t``); ties in J go to the
    candidate closest to 0.5. None when a class is absent.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if y.all() or not y.any():
        return None
    cands = np.unique(p)
    pred = p[None, :] >= cands[:, None]
    sens = (pred & y).sum(1) / y.sum()
    spec = (~pred & ~y).sum(1) / (~y).sum()
    j = sens + spec - 1.0
    best = np.flatnonzero(np.isclose(j, j.max()))
    return float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]])


def sensitivity_at_specificity(y_true: npt.ArrayLike, prob: npt.ArrayLike, specificity: float = 0.9) -> float:
    """The highest sensitivity among thresholds whose specificity is at least ``specificity``.

    Candidate thresholds are the distinct probabilities and +inf (everything negative); a case is
    positive when ``prob >= threshold``. NaN when a class is absent.
    """
    y = np.asarray(y_true).astype(bool).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if y.all() or not y.any():
        return float("nan")
    cands = np.r_[np.unique(p), np.inf]
    pred = p[None, :] >= cands[:, None]
    sens = (pred & y).sum(1) / y.sum()
    spec = (~pred & ~y).sum(1) / (~y).sum()
    ok = spec >= specificity - 1e-12
    return float(sens[ok].max())

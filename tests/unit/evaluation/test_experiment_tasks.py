"""Converged task models, both downstream tasks on separable toy data, and the leak-free pool.

Toy data (from ``test_experiment.make_set``): 16 x 16 grey discs (label 1) with, in every other
item, a bright 3 x 3 "lesion" (label 2): presence and segmentation are learnable, so a real MONAI
network trained on it must beat chance and a control trained on the same images with shuffled
labels. Early stopping is checked on a scripted validation curve with a real ``nn.Linear`` whose
weights record the step, so "best weights kept" is visible in the weights themselves.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from medsynth.config.experiment import ConvergenceConfig
from medsynth.data.dataset import ArraySet
from medsynth.evaluation.cells import run_cell, segmentation_scores
from medsynth.evaluation.classifier import sensitivity_at_specificity
from medsynth.evaluation.convergence import choose_step, fit_until_converged, make_schedule
from medsynth.evaluation.experiment_report import SummaryRow, real_only_growth
from medsynth.evaluation.pool import make_pool
from medsynth.evaluation.selection import Cell, select_cell, select_patients
from tests.unit.evaluation.test_experiment import LABELS, SIZE, TinyGenerator, make_cfg, make_set

torch.set_num_threads(1)

# --------------------------------------------------------------------------------------------------
# early stopping


TOY_CURVE = [(10, 0.50), (20, 0.70), (30, 0.80), (40, 0.79), (50, 0.81), (60, 0.60), (70, 0.95)]


def test_early_stopping_picks_the_best_validation_step_on_a_toy_curve() -> None:
    # 0.81 at step 50 does not beat 0.80 by min_delta 0.02: three evaluations in a row without
    # improvement (40, 50, 60) stop training at 60, before the (unseen) 0.95 at step 70
    assert choose_step(TOY_CURVE, patience=3, min_delta=0.02) == (30, 60)
    assert choose_step(TOY_CURVE, patience=3, min_delta=0.0) == (70, 70)  # 0.81 counts: training reaches 0.95
    assert choose_step(TOY_CURVE, patience=10) == (70, 70)
    assert choose_step(TOY_CURVE, patience=1, min_steps=45) == (50, 60)  # no stop before step 45


def test_fit_until_converged_restores_the_best_weights_and_records_the_curve() -> None:
    net = torch.nn.Linear(1, 1, bias=False)
    scores = dict(TOY_CURVE)

    def train_step(step: int) -> float:
        with torch.no_grad():
            net.weight.fill_(float(step + 1))  # the weights remember the step
        return 1.0 / (step + 1)

    def evaluate() -> float:
        return scores[int(net.weight.item())]

    conv = ConvergenceConfig(eval_every=10, patience=3, min_delta=0.02)
    rec = fit_until_converged(net, train_step, evaluate, 70, conv)
    assert (rec.chosen_step, rec.stopped_step, rec.stopped_early) == (30, 60, True)
    assert net.weight.item() == 30.0  # the step-30 weights, not the last ones
    assert rec.curve == TOY_CURVE[:6] and rec.best_score == 0.80 and not net.training
    off = fit_until_converged(net, train_step, evaluate, 70, conv.model_copy(update={"enabled": False}))
    assert (off.chosen_step, off.curve, net.weight.item()) == (70, [], 70.0)


def test_learning_rate_schedules() -> None:
    def lrs(schedule: str, improved: list[bool]) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        conv = ConvergenceConfig(schedule=schedule, min_lr_ratio=0.1, plateau_patience=2, plateau_factor=0.5)
        sched, on_eval = make_schedule(opt, 2, 12, conv)
        out = []
        for step in range(12):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            if step % 3 == 2:
                on_eval(improved[step // 3])
        return out

    cos = lrs("cosine", [True] * 4)
    assert cos[0] == pytest.approx(0.5) and cos[1] == pytest.approx(1.0) and cos[-1] == pytest.approx(0.1, abs=0.03)
    assert all(a >= b for a, b in itertools.pairwise(cos[1:]))
    plateau = lrs("plateau", [True, False, False, True])
    # the second evaluation without improvement (after step index 8) halves the rate from the next update on
    assert plateau[1] == 1.0 and plateau[9] == 1.0 and plateau[10] == pytest.approx(0.5)
    assert lrs("constant", [False] * 4)[-1] == 1.0


# --------------------------------------------------------------------------------------------------
# the two tasks on separable data, against a shuffled-label control


@pytest.fixture(scope="module")
def toy() -> tuple[ArraySet, ArraySet, ArraySet]:
    return make_set("P", 10, 0), make_set("V", 3, 1), make_set("T", 5, 2)


def _shuffled(data: object, seed: int) -> object:
    """The same images with the masks (hence labels) of other items: a model can learn nothing real."""
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(data.masks)))  # type: ignore[attr-defined]
    return dataclasses.replace(data, masks=data.masks[perm])  # type: ignore[type-var]


@pytest.mark.parametrize("task", ["presence", "segmentation"])
def test_cells_beat_chance_and_a_shuffled_label_control(toy: tuple[ArraySet, ArraySet, ArraySet], task: str) -> None:
    train, val, test = toy
    cfg = make_cfg(
        tasks=[task],
        train={"steps": 80, "batch_size": 16, "warmup_steps": 5, "lr": 0.005, "amp": "off", "num_threads": 1},
        segmenter_steps=80,
        convergence={"eval_every": 10, "patience": 4},
    )
    seg_train = cfg.segmenter.train.model_copy(update={"lr": 0.02, "batch_size": 16})
    cfg = cfg.model_copy(update={"segmenter": cfg.segmenter.model_copy(update={"train": seg_train})})
    data = select_cell(train, None, 1.0, 0, 0, "real")
    cell = Cell(task, "real", 1.0, 0, 0)  # type: ignore[arg-type]
    real = run_cell(cell, data, cfg, LABELS, test, val)
    control = run_cell(cell, _shuffled(data, 1), cfg, LABELS, test, val)  # type: ignore[arg-type]
    metric = "auroc" if task == "presence" else "dice"
    got, ctl = real.metrics[metric], control.metrics[metric]
    assert got is not None and ctl is not None
    if task == "presence":
        assert got > 0.9 and got > ctl + 0.2, (got, ctl)
        assert real.metrics["sens_at_spec90"] is not None and real.metrics["sens_at_spec90"] > 0.7
    else:
        assert got > 0.5 and got > ctl + 0.2, (got, ctl)
        assert real.metrics["fp_rate"] is not None and real.metrics["fp_rate"] < 0.5
    assert real.convergence.curve and real.convergence.chosen_step <= 80


def test_sensitivity_at_specificity_and_segmentation_scores() -> None:
    y = np.array([0] * 10 + [1] * 4)
    p = np.r_[np.linspace(0.0, 0.45, 9), 0.8, [0.9, 0.7, 0.85, 0.3]]  # one negative at 0.8
    # thresholds keeping specificity >= 0.9 allow one false positive: t = 0.7 catches 3 of 4 positives
    assert sensitivity_at_specificity(y, p, 0.9) == pytest.approx(0.75)
    assert sensitivity_at_specificity(y, p, 1.0) == pytest.approx(0.5)  # t = 0.85: no false positive
    assert math.isnan(sensitivity_at_specificity(np.ones(3), np.ones(3)))
    target = torch.zeros((3, 1, 4, 4), dtype=torch.uint8)
    target[0, 0, :2, :2] = 2  # lesion-bearing
    pred = target.clone()
    pred[0, 0, 0, 0] = 0  # Dice 2*3/(3+4)
    pred[2, 0, :, :] = 2  # lesion-free item with 16 predicted lesion voxels: a false positive
    per_case, m = segmentation_scores(pred, target, LABELS, lesion=2, fp_min_voxels=5)
    assert per_case[0] == pytest.approx(6 / 7) and np.isnan(per_case[1:]).all()
    assert m["dice"] == pytest.approx(6 / 7) and m["fp_rate"] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------
# the pool


def _patient_set(sizes: dict[str, int], per_patient: int = 4) -> ArraySet:
    """Patients whose lesions have a patient-specific size (``sizes[p]`` pixels a side); odd items lesion-free."""
    items, masks, pats = [], [], []
    for p, side in sizes.items():
        for j in range(per_patient):
            m = np.zeros((1, SIZE, SIZE), np.uint8)
            m[0, 2:14, 2:14] = 1
            if j % 2 == 0:
                m[0, 4 : 4 + side, 4 + j : 4 + j + side] = 2
            masks.append(m)
            pats.append(p)
            items.append(f"{p}_{j}")
    mk = torch.from_numpy(np.stack(masks))
    return ArraySet(mk.float() / 2, mk, np.repeat(np.eye(3)[None], len(items), 0), items, pats, LABELS)


def test_pool_transplants_only_within_the_patient_and_cells_draw_only_their_patients(tmp_path: Path) -> None:
    sizes = {"A": 2, "B": 3, "C": 4, "D": 5, "E": 1}
    train = _patient_set(sizes)
    cfg = make_cfg(ratios=[0, 1, 2, 5], synthetic_pool_per_mask=3, pool_edits=["none", "transplant", "flip"])
    pool = make_pool(TinyGenerator(), train, cfg, tmp_path)
    n = len(train)
    assert pool.variants.count(1) == n
    for i in range(n, 2 * n):  # variant 1: transplant into lesion-free items, elastic fallback elsewhere
        src = pool.source_items[i]
        had_lesion = bool((train.masks[train.item_ids.index(src)] == 2).any())
        assert pool.edits[i] == ("elastic" if had_lesion else "transplant"), (src, pool.edits[i])
        if not had_lesion:  # the pasted lesion has the size of THIS patient's lesions, no other's
            assert int((pool.masks[i] == 2).sum()) == sizes[pool.source_patients[i]] ** 2
    for fraction, ratio, seed in itertools.product([0.2, 0.4, 0.6, 1.0], [1, 2, 5], [0, 1, 2]):
        chosen = set(select_patients(train.patients, fraction, seed))
        for arm in ("real", "synthetic_only"):
            cell = select_cell(train, pool, fraction, ratio, seed, arm)
            assert {pool.source_patients[i] for i in cell.pool_indices} <= chosen
            assert set(cell.patients) <= chosen and cell.n_synthetic == ratio * cell.n_real_available


class FailingGenerator(TinyGenerator):
    """Dies after ``n_ok`` batches, like a killed run."""

    def __init__(self, n_ok: int) -> None:
        super().__init__()
        self.n_ok = n_ok

    def generate(self, masks: torch.Tensor | None, sampling: object, seed: int) -> torch.Tensor:
        if self.calls >= self.n_ok:
            raise KeyboardInterrupt
        return super().generate(masks, sampling, seed)  # type: ignore[arg-type]


def test_pool_generation_resumes_after_a_kill(tmp_path: Path) -> None:
    train = make_set("P", 3, 0)  # 12 masks, batches of 5: 3 batches per variant
    cfg = make_cfg(synthetic_pool_per_mask=2, pool_edits=["none", "flip"])
    with pytest.raises(KeyboardInterrupt):
        make_pool(FailingGenerator(4), train, cfg, tmp_path)
    assert not (tmp_path / "pool.npz").exists()
    gen = TinyGenerator()
    pool = make_pool(gen, train, cfg, tmp_path)
    assert gen.calls == 6 - 4 and len(pool) == 24  # only the 2 missing batches
    fresh = make_pool(TinyGenerator(), train, cfg, tmp_path / "fresh")
    assert torch.equal(pool.images, fresh.images) and pool.edits == fresh.edits
    assert not list((tmp_path / "parts").glob("*.npy"))  # parts removed once the pool is written


def _real_row(fraction: float, mean: float, half_width: float = 0.05, task: str = "presence") -> SummaryRow:
    metric = "auroc" if task == "presence" else "dice"
    return SummaryRow(
        task=task, arm="real", fraction=fraction, ratio=0, n_seeds=3, n_real_patients=5, n_real=50, n_synthetic=0,
        synthetic_with_replacement=False, metric=metric, means={metric: mean}, sds={metric: 0.02}, ci=0.95,
        ci_lo=mean - half_width, ci_hi=mean + half_width,
    )  # fmt: skip


def test_real_only_growth_check() -> None:
    grows = real_only_growth([_real_row(0.1, 0.70), _real_row(0.25, 0.76), _real_row(1.0, 0.85)], "presence")
    assert grows.grows is True and "grows" in grows.message and "0.700 (10%)" in grows.message
    # the tracked LGG run of issue 12: 0.806 (10%), 0.769 (25%), 0.821 (100%): no gain the CI resolves
    flat = real_only_growth([_real_row(0.1, 0.806), _real_row(0.25, 0.769), _real_row(1.0, 0.821)], "presence")
    assert flat.grows is False and "does NOT grow" in flat.message and "not above the 10% interval" in flat.message
    drop = real_only_growth([_real_row(0.1, 0.80, 0.02), _real_row(0.25, 0.70), _real_row(1.0, 0.95)], "presence")
    assert drop.grows is False and "at 25% it is 0.700, below the 10% interval" in drop.message
    assert real_only_growth([_real_row(1.0, 0.9)], "presence").grows is None
    seg = [_real_row(0.1, 0.3, task="segmentation"), _real_row(1.0, 0.6, task="segmentation")]
    assert real_only_growth(seg, "segmentation").grows is True and real_only_growth(seg, "presence").grows is None

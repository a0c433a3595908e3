"""Downstream augmentation experiment on tiny data: patient-level cells, pool provenance, metrics, resumable grid.

Data: 16 x 16 images of a grey "brain" disc (label 1) with, in about half of the items, a bright
square "lesion" (label 2), built in memory as :class:`ArraySet` splits (8 training, 3 validation and
4 test patients, 4 items each). The synthetic pool of the grid tests is built from the real training
arrays (flipped copies with noise, keeping their source item and patient) — data, not a mock. Every
classifier is a real MONAI ResNet (widths 4-8) trained from scratch for 20 steps, the segmenter a
real tiny MONAI UNet; ``make_pool`` is driven by a small deterministic generator object that
satisfies the ``PoolGenerator`` protocol (the diffusion model itself is tested elsewhere).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from medsynth.config.experiment import ExperimentConfig
from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig
from medsynth.config.stages import SamplingConfig
from medsynth.data.dataset import ArraySet
from medsynth.errors import ConfigError, DataError
from medsynth.evaluation.cells import presence_labels, resolve_target_label
from medsynth.evaluation.classifier import (
    binary_metrics,
    classical_augment,
    weighted_auroc,
    youden_threshold,
)
from medsynth.evaluation.grid import CELL_SCORES_FILE, CELLS_FILE, run_grid
from medsynth.evaluation.pool import SyntheticPool, make_pool
from medsynth.evaluation.selection import (
    PatientLeakError,
    check_no_leak,
    grid_cells,
    resolve_tasks,
    select_cell,
    select_patients,
)

torch.set_num_threads(1)
SIZE = 16
LABELS = {0: "background", 1: "brain", 2: "lesion"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_set(prefix: str, n_patients: int, seed: int, per_patient: int = 4) -> ArraySet:
    """``n_patients`` x ``per_patient`` items: a brain disc, and a lesion square in every other item."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    n = n_patients * per_patient
    images = np.zeros((n, 1, SIZE, SIZE), np.float32)
    masks = np.zeros((n, 1, SIZE, SIZE), np.uint8)
    for i in range(n):
        cx, cy = rng.uniform(6.5, 9.5, 2)
        brain = (xx - cx) ** 2 + (yy - cy) ** 2 <= 36
        m = brain.astype(np.uint8)
        if i % 2 == 0:
            x0, y0 = rng.integers(5, 9, 2)
            m[y0 : y0 + 3, x0 : x0 + 3] = 2
        masks[i, 0] = m
        images[i, 0] = np.clip(0.35 * (m == 1) + 0.9 * (m == 2) + rng.normal(0, 0.05, (SIZE, SIZE)), 0, 1)
    patients = [f"{prefix}{i // per_patient:02d}" for i in range(n)]
    ids = [f"{patients[i]}_{i % per_patient}" for i in range(n)]
    return ArraySet(
        torch.from_numpy(images), torch.from_numpy(masks), np.repeat(np.eye(3)[None], n, 0), ids, patients, LABELS
    )


def fake_pool(train: ArraySet, per_mask: int = 2, seed: int = 0) -> SyntheticPool:
    """``per_mask`` variants of every training item from the real arrays (odd variants flipped, plus noise)."""
    rng = np.random.default_rng(seed)
    imgs, msks, items, pats, variants, edits = [], [], [], [], [], []
    for k in range(per_mask):
        flip = k % 2 == 1
        im = train.images.flip(2) if flip else train.images
        mk = train.masks.flip(2) if flip else train.masks
        imgs.append((im + torch.from_numpy(rng.normal(0, 0.02, im.shape).astype(np.float32))).clamp(0, 1))
        msks.append(mk)
        items += train.item_ids
        pats += train.patients
        variants += [k] * len(train)
        edits += ["flip" if flip else "none"] * len(train)
    return SyntheticPool(torch.cat(imgs).half(), torch.cat(msks), items, pats, variants, edits, key="fake-v1")


def make_cfg(**experiment: Any) -> MedsynthConfig:
    exp: dict[str, Any] = {
        "tasks": ["presence"],
        "convergence": {"eval_every": 5, "patience": 2},
        "fractions": [0.5, 1.0],
        "ratios": [0, 1],
        "seeds": [0],
        "resnet_widths": [4, 8, 8, 8],
        "n_bootstrap": 50,
        "train": {"steps": 20, "batch_size": 8, "warmup_steps": 2, "amp": "off", "num_threads": 1},
    }
    exp.update(experiment)
    raw: dict[str, Any] = {
        "name": "exp-test",
        "data": {"root": "unused", "labels": LABELS},
        "preprocess": {"spatial_dims": 2, "spatial_size": [SIZE, SIZE]},
        "sampling": {"batch_size": 5, "steps": 2},
        "segmenter": {
            "channels": [4, 8],
            "strides": [2],
            "num_res_units": 0,
            "train": {"steps": 5, "batch_size": 4, "warmup_steps": 1, "amp": "off", "num_threads": 1},
        },
        "experiment": exp,
    }
    return validate_config(raw, "experiment test config", MedsynthConfig)


@pytest.fixture(scope="module")
def splits() -> tuple[ArraySet, ArraySet, ArraySet]:
    return make_set("P", 8, 0), make_set("V", 3, 1), make_set("T", 4, 2)


class RecordingTracker:
    """A tracker that keeps what it is given (the Tracker protocol)."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, float] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        return None


# --------------------------------------------------------------------------------------------------
# configuration, task and labels


def test_config_defaults_and_validation() -> None:
    ec = ExperimentConfig()
    assert ec.fractions == [0.05, 0.10, 0.25, 0.50, 1.0] and ec.ratios == [0, 1, 2, 5] and ec.seeds == [0, 1, 2]
    assert ec.arms == ["real", "real_classical", "synthetic_only"] and ec.pool_per_mask == 5
    assert ec.train.steps == 400 and ec.train.batch_size == 32 and ec.train.ema_decay is None
    assert ExperimentConfig(fractions=[1.0, 0.2]).fractions == [0.2, 1.0]
    for bad in (
        {"arms": ["synthetic_only"], "ratios": [0]},
        {"tasks": []},
        {"tasks": ["presence", "presence"]},
        {"fractions": [0.0]},
        {"ratios": [1, 1]},
        {"unknown_key": 1},
    ):
        with pytest.raises(ValueError):
            ExperimentConfig(**bad)
    assert make_cfg().experiment.resnet_widths == (4, 8, 8, 8)


def test_task_and_target_label() -> None:
    assert resolve_tasks(make_cfg(tasks=None)) == ["presence", "segmentation"]
    assert resolve_tasks(make_cfg(tasks=["segmentation"])) == ["segmentation"]
    assert resolve_target_label(LABELS) == 2
    assert resolve_target_label({0: "bg", 1: "tumour", 2: "brain"}) == 1
    assert resolve_target_label({0: "bg", 1: "anterior", 2: "posterior"}) == 2
    assert resolve_target_label(LABELS, 1) == 1
    with pytest.raises(ConfigError):
        resolve_target_label(LABELS, 5)
    m = torch.zeros((3, 1, 4, 4), dtype=torch.uint8)
    m[1, 0, 0, 0] = 2
    m[2, 0, :2, :2] = 2
    assert presence_labels(m, 2).tolist() == [0, 1, 1]
    assert presence_labels(m, 2, min_voxels=2).tolist() == [0, 0, 1]


# --------------------------------------------------------------------------------------------------
# patient-level selection


def test_patient_selection_is_nested_and_patient_level(splits: tuple[ArraySet, ArraySet, ArraySet]) -> None:
    train, _, test = splits
    for seed in (0, 1, 2):
        subsets = [select_patients(train.patients, f, seed) for f in (0.1, 0.25, 0.5, 1.0)]
        assert [len(s) for s in subsets] == [1, 2, 4, 8]
        for small, big in itertools.pairwise(subsets):
            assert set(small) <= set(big)
        cell = select_cell(train, None, 0.5, 0, seed, "real")
        assert sorted(set(cell.patients)) == sorted(subsets[2])
        assert cell.n_real == 4 * 4 and len(cell.images) == 16  # every item of the selected patients
        check_no_leak(cell, test.patients)
    assert select_patients(train.patients, 0.5, 0) != select_patients(train.patients, 0.5, 1)


def test_leaking_patient_raises(splits: tuple[ArraySet, ArraySet, ArraySet], tmp_path: Path) -> None:
    train, val, test = splits
    leaky_test = test.subset([0, 1])
    leaky_test = ArraySet(leaky_test.images, leaky_test.masks, leaky_test.affines, ["x0", "x1"], ["P03", "T00"], LABELS)
    cell = select_cell(train, None, 1.0, 0, 0, "real")
    with pytest.raises(PatientLeakError, match="P03"):
        check_no_leak(cell, leaky_test.patients)
    # a synthetic item whose SOURCE patient is a test patient leaks too
    pool = fake_pool(train, per_mask=1)
    bad_pool = SyntheticPool(pool.images, pool.masks, pool.source_items, ["T01"] * len(pool), pool.variants, pool.edits)
    with pytest.raises(PatientLeakError):
        run_grid(make_cfg(arms=["real"], ratios=[0, 1]), train, val, test, bad_pool, tmp_path / "a")
    with pytest.raises(PatientLeakError, match="P03"):
        run_grid(make_cfg(arms=["real"], ratios=[0]), train, val, leaky_test, None, tmp_path / "b")
    assert not (tmp_path / "b" / CELLS_FILE).exists()  # refused before any training
    with pytest.raises(ValueError, match="no pool"):
        run_grid(make_cfg(arms=["real"], ratios=[0, 1]), train, val, test, None, tmp_path / "c")


def test_synthetic_items_only_from_selected_patients(splits: tuple[ArraySet, ArraySet, ArraySet]) -> None:
    train, _, _ = splits
    pool = fake_pool(train, per_mask=2)
    for seed in (0, 1):
        real = select_cell(train, pool, 0.25, 0, seed, "real")
        chosen = set(real.real_patients)
        one = select_cell(train, pool, 0.25, 1, seed, "real")
        two = select_cell(train, pool, 0.25, 2, seed, "real")
        assert (one.n_real, one.n_synthetic) == (8, 8) and (two.n_real, two.n_synthetic) == (8, 16)
        assert len(two.images) == 24 and two.synthetic.sum() == 16 and not two.synthetic[:8].any()
        for c in (one, two):
            assert {pool.source_patients[i] for i in c.pool_indices} <= chosen
            assert set(c.patients) == chosen and not c.with_replacement
        assert two.pool_indices[:8] == one.pool_indices  # nested across ratios
        # ratio = pool_per_mask: every real mask contributes each of its variants exactly once
        assert sorted((pool.source_items[i], pool.variants[i]) for i in two.pool_indices) == sorted(
            (iid, k) for iid in [train.item_ids[j] for j, p in enumerate(train.patients) if p in chosen] for k in (0, 1)
        )
        # the synthetic masks are those of the pool items (flipped for variant 1)
        j = two.pool_indices[-1]
        assert torch.equal(two.masks[-1], pool.masks[j])
        syn = select_cell(train, pool, 0.25, 1, seed, "synthetic_only")
        assert syn.n_real == 0 and syn.n_synthetic == 8 and syn.synthetic.all() and set(syn.patients) <= chosen
    more = select_cell(train, pool, 0.25, 3, 0, "real")
    assert more.n_synthetic == 24 and more.with_replacement and set(more.patients) <= set(more.real_patients)
    classical = select_cell(train, pool, 0.25, 1, 0, "real_classical")  # same data as 'real'; the cell augments it
    plain = select_cell(train, pool, 0.25, 1, 0, "real")
    assert classical.item_ids == plain.item_ids and torch.equal(classical.images, plain.images)
    with pytest.raises(ValueError):
        select_cell(train, pool, 0.25, 0, 0, "synthetic_only")
    with pytest.raises(ValueError):
        select_cell(train, pool, 0.25, -1, 0, "real")
    other = fake_pool(make_set("Q", 2, 9), per_mask=1)
    with pytest.raises(DataError):
        select_cell(train, other, 0.25, 1, 0, "real")


def test_grid_cells_design() -> None:
    cells = grid_cells(make_cfg(ratios=[0, 1, 2], seeds=[0, 1], tasks=["presence", "segmentation"]))
    by_arm: dict[str, set[int]] = {}
    for c in cells:
        by_arm.setdefault(c.arm, set()).add(c.ratio)
    # synthetic data on top of classical augmentation at every ratio (the default)...
    assert by_arm == {"real": {0, 1, 2}, "real_classical": {0, 1, 2}, "synthetic_only": {1, 2}}
    assert len(cells) == 2 * 2 * 2 * (3 + 3 + 2) and len({c.name for c in cells}) == len(cells)
    assert {c.task for c in cells} == {"presence", "segmentation"} and cells[0].name == "presence-real-f0.5-r0-s0"
    # ... or classical augmentation alone, when the config says so
    cheap = grid_cells(make_cfg(ratios=[0, 1, 2], seeds=[0], classical_ratios=[0]))
    assert {c.ratio for c in cheap if c.arm == "real_classical"} == {0}
    with pytest.raises(ValueError, match="classical_ratios"):
        make_cfg(ratios=[0, 1], classical_ratios=[0, 5])


# --------------------------------------------------------------------------------------------------
# metrics and augmentation


def test_metrics_equal_sklearn() -> None:
    import sklearn.metrics as sk  # declared in the dev extra: a missing install fails, it does not skip

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    p = np.round(np.clip(0.3 * y + rng.random(40) * 0.7, 0, 1), 1)  # rounding makes ties
    for thr in (0.5, 0.35):
        m = binary_metrics(y, p, thr)
        pred = (p >= thr).astype(int)
        assert m["auroc"] == pytest.approx(sk.roc_auc_score(y, p))
        assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
        assert m["f1"] == pytest.approx(sk.f1_score(y, pred))
    w = rng.integers(0, 4, (3, 40))
    got = weighted_auroc(y, p, w)
    assert got == pytest.approx([sk.roc_auc_score(y, p, sample_weight=row) for row in w])
    fpr, tpr, _ = sk.roc_curve(y, p)
    t = youden_threshold(y, p)
    assert t is not None
    mt = binary_metrics(y, p, t)
    assert mt["sensitivity"] + mt["specificity"] - 1 == pytest.approx(float(np.max(tpr - fpr)))
    assert youden_threshold(np.ones(4), np.arange(4) / 4) is None
    assert np.isnan(binary_metrics(np.zeros(3), np.array([0.1, 0.6, 0.2]))["auroc"])
    assert binary_metrics([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.3])["f1"] == 1.0


def test_classical_augmentation_changes_images_deterministically(splits: tuple[ArraySet, ArraySet, ArraySet]) -> None:
    train, _, _ = splits
    ec = make_cfg(augment_prob=1.0).experiment
    x, m = train.images[:6], train.masks[:6]
    a, none = classical_augment(x, ec, seed=3, step=7)
    b, _ = classical_augment(x, ec, seed=3, step=7)
    c, _ = classical_augment(x, ec, seed=4, step=7)
    assert none is None and a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, x) and not torch.equal(a, c)
    a2, am = classical_augment(x, ec, seed=3, step=7, masks=m)
    b2, bm = classical_augment(x, ec, seed=3, step=7, masks=m)
    assert am is not None and bm is not None and torch.equal(a2, b2) and torch.equal(am, bm)
    assert am.shape == m.shape and am.dtype == m.dtype
    assert set(am.unique().tolist()) <= {0, 1, 2} and not torch.equal(am, m)
    # image and mask move together: without noise/intensity changes the lesion stays bright under its label
    spatial_only = make_cfg(augment_prob=1.0, augment_noise_std=0.0, augment_intensity=0.0).experiment
    xi, mi = classical_augment(x, spatial_only, seed=3, step=7, masks=m)
    assert mi is not None and float(xi[mi == 2].mean()) > 0.6 and float(xi[mi == 0].mean()) < 0.2


# --------------------------------------------------------------------------------------------------
# the pool


class TinyGenerator:
    """Deterministic stand-in with the ``PoolGenerator`` interface: image = mask / 2 + seeded noise."""

    def __init__(self, tag: str = "w1") -> None:
        self.hashes = {"controlnet/weights": tag}
        self.calls = 0

    def generate(self, masks: torch.Tensor | None, sampling: SamplingConfig, seed: int) -> torch.Tensor:
        assert masks is not None
        self.calls += 1
        g = torch.Generator().manual_seed(seed)
        return (masks.float() / 2 + 0.05 * torch.randn(masks.shape, generator=g)).clamp(0, 1)


def test_make_pool_keeps_provenance_and_is_reused(splits: tuple[ArraySet, ArraySet, ArraySet], tmp_path: Path) -> None:
    train, _, _ = splits
    small = train.subset(list(range(12)))  # 3 patients
    cfg = make_cfg(synthetic_pool_per_mask=3, pool_edits=["none", "flip", "elastic"])
    gen = TinyGenerator()
    pool = make_pool(gen, small, cfg, tmp_path)
    n = len(small)
    assert len(pool) == 3 * n and (tmp_path / "pool.npz").is_file() and gen.calls == 3 * 3  # 12 masks / batch 5
    assert pool.source_patients == small.patients * 3 and pool.source_items == small.item_ids * 3
    assert pool.variants == [0] * n + [1] * n + [2] * n and pool.edits[n] == "flip"
    assert torch.equal(pool.masks[:n], small.masks)
    assert torch.equal(pool.masks[n : 2 * n], small.masks.flip(2))  # flip = array axis 0 of the image
    assert not torch.equal(pool.masks[2 * n :], small.masks)  # elastic warps differ from the real masks
    assert pool.images.dtype == torch.float16 and float(pool.images.max()) <= 1.0
    again = make_pool(gen, small, cfg, tmp_path)
    assert gen.calls == 9 and again.key == pool.key and torch.equal(again.images, pool.images)
    other = make_pool(TinyGenerator("w2"), small, cfg, tmp_path)  # new weights: regenerated
    assert other.key != pool.key
    cell = select_cell(small, pool, 0.34, 2, 0, "real")
    assert set(cell.patients) == set(cell.real_patients) and cell.n_synthetic == 2 * cell.n_real


# --------------------------------------------------------------------------------------------------
# the grid


def test_run_grid_writes_summary_and_resumes(splits: tuple[ArraySet, ArraySet, ArraySet], tmp_path: Path) -> None:
    train, val, test = splits
    cfg = make_cfg()
    pool = fake_pool(train, per_mask=1)
    opened: list[tuple[str, RecordingTracker]] = []

    @contextlib.contextmanager
    def factory(name: str, params: dict[str, Any]) -> Iterator[RecordingTracker]:
        tr = RecordingTracker()
        opened.append((name, tr))
        yield tr

    res = run_grid(cfg, train, val, test, pool, tmp_path, tracker_factory=factory)
    names = [c.name for c in grid_cells(cfg)]
    assert len(names) == 10 and res.trained == names and res.skipped == [] and res.tasks == ["presence"]
    assert [n for n, _ in opened] == names
    tr = dict(opened)["presence-real-f0.5-r1-s0"]
    assert tr.params["ratio"] == 1 and tr.params["n_synthetic"] == tr.params["n_real"] == 16
    assert 0.0 <= tr.metrics["test_auroc"] <= 1.0 and "train_loss" in tr.metrics
    assert "val_auroc" in tr.metrics and 1 <= tr.metrics["chosen_step"] <= 20  # the validation curve is logged
    lines = (tmp_path / CELLS_FILE).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 10
    rec = json.loads(lines[0])["record"]
    assert len(rec["test_scores"]) == len(test) and {"auroc", "sens_at_spec90", "f1"} <= set(rec["metrics"])
    conv = rec["convergence"]
    assert conv["curve"] and conv["chosen_step"] in [s for s, _ in conv["curve"]]
    # per-item scores with the test item ids, for the bias report: every cell, aligned with the test items
    scores = json.loads((tmp_path / CELL_SCORES_FILE).read_text(encoding="utf-8"))
    assert scores["test_items"] == test.item_ids and scores["test_patients"] == test.patients
    assert [c["cell"] for c in scores["cells"]] == names
    by_cell = {c["cell"]: c for c in scores["cells"]}
    assert by_cell[rec["cell"]]["test_scores"] == rec["test_scores"] and by_cell[rec["cell"]]["ratio"] == rec["ratio"]
    for p in (res.summary_csv, res.summary_md, res.plot):
        assert p.is_file() and p.stat().st_size > 0
    assert res.plot.read_bytes()[:8] == PNG_MAGIC
    md = res.summary_md.read_text(encoding="utf-8")
    assert "real + 1x synthetic" in md and "Real-only check" in md and "p (Holm)" in md
    rows = {(r.arm, r.fraction, r.ratio): r for r in res.summary}
    assert len(rows) == 10 and rows[("real", 0.5, 0)].delta_vs_real is None
    for key in (("real", 0.5, 1), ("real_classical", 1.0, 0), ("real_classical", 1.0, 1), ("synthetic_only", 1.0, 1)):
        r = rows[key]
        assert r.delta_vs_real is not None and r.p_value is not None and 0.0 <= r.p_value <= 1.0
        assert r.delta_lo is not None and r.delta_hi is not None and r.delta_lo <= r.delta_hi
        assert r.p_holm is not None and r.p_holm >= r.p_value
    base = rows[("real", 1.0, 0)]
    assert base.ci_lo is not None and base.ci_hi is not None and base.mean is not None
    assert base.ci_lo <= base.mean <= base.ci_hi and base.n_real == 32
    assert rows[("synthetic_only", 0.5, 1)].n_real == 0 and rows[("synthetic_only", 0.5, 1)].n_synthetic == 16
    assert res.growth["presence"].grows is not None and res.growth["presence"].message
    header = res.summary_csv.read_text(encoding="utf-8").splitlines()[0].split(",")
    assert {"task", "auroc_mean", "auroc_sd", "ci_lo", "delta_vs_real", "p_holm"} <= set(header)
    # the whitepaper reads summary.csv back: the same rows and the same real-only check
    from medsynth.evaluation.experiment_report import real_only_growth, row_from_flat
    from medsynth.report.collect import _read_csv

    back = [row_from_flat(r) for r in _read_csv(res.summary_csv)]
    assert back == res.summary and real_only_growth(back, "presence") == res.growth["presence"]

    # second run: nothing is trained, no run is opened, the same summary is written
    opened.clear()
    again = run_grid(cfg, train, val, test, pool, tmp_path, tracker_factory=factory)
    assert again.trained == [] and again.skipped == names and opened == []
    assert len((tmp_path / CELLS_FILE).read_text(encoding="utf-8").splitlines()) == 10
    assert again.summary == res.summary

    # an interrupted run (last line cut short) retrains only the lost cell
    (tmp_path / CELLS_FILE).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    third = run_grid(cfg, train, val, test, pool, tmp_path)
    assert third.trained == [names[-1]]


def test_segmentation_grid_tiny(splits: tuple[ArraySet, ArraySet, ArraySet], tmp_path: Path) -> None:
    train, _, test = splits
    cfg = make_cfg(tasks=["segmentation"], arms=["real", "real_classical"], fractions=[1.0], segmenter_steps=4)
    res = run_grid(cfg, train, None, test, fake_pool(train, per_mask=1), tmp_path)
    assert res.metric == "dice" and res.plot.is_file()
    rows = {(r.arm, r.ratio): r for r in res.summary}
    assert set(rows) == {("real", 0), ("real", 1), ("real_classical", 0), ("real_classical", 1)}
    # classical alone is compared with real only; synthetic on top of classical with classical alone
    assert rows[("real_classical", 0)].baseline == "real" and rows[("real_classical", 1)].baseline == "real_classical"
    assert rows[("real", 1)].baseline == "real"
    assert "†" in res.summary_md.read_text(encoding="utf-8")
    for r in rows.values():
        assert r.mean is not None and 0.0 <= r.mean <= 1.0 and r.means["fp_rate"] is not None
        assert r.chosen_step_mean == 4  # no validation split: the last step
    assert rows[("real", 1)].delta_vs_real is not None and rows[("real", 1)].p_value is not None
    assert rows[("real", 1)].effect_dz is not None or rows[("real", 1)].delta_vs_real == 0

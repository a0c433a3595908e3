"""Reference segmenter on a tiny disc set: learns (Dice > 0.5), checkpoint round trip, no-op rerun, inference paths.

The data set is a preprocessing cache of bright discs (label 1) on a noisy dark background, 32 x 32,
written directly in the format ``load_split`` reads (``manifest.json`` + one ``.npz`` per patient), so
the segmenter and feature-encoder stages run end to end in about a second.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medsynth.checkpoint import find_checkpoint
from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import load_split
from medsynth.evaluation.features import (
    extract_features,
    load_feature_encoder,
    train_feature_encoder,
)
from medsynth.evaluation.metrics import dice_per_label
from medsynth.evaluation.segmenter import (
    SegmenterResult,
    load_segmenter,
    predict,
    train_segmenter,
)
from medsynth.training.context import StageContext

torch.set_num_threads(1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZE = 32
LABELS = {0: "background", 1: "disc"}


def disc_items(n: int, seed: int, shape: tuple[int, ...] = (SIZE, SIZE)) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images ``(n, 1, *shape)`` in [0, 1] with one bright disc (ball in 3D) each, and the masks."""
    rng = np.random.default_rng(seed)
    grid = np.mgrid[tuple(slice(0, s) for s in shape)]
    images = np.zeros((n, 1, *shape), np.float32)
    masks = np.zeros((n, 1, *shape), np.uint8)
    for i in range(n):
        hi = min(9.0, min(shape) / 2 - 1.5)
        r = rng.uniform(min(4.0, hi - 1), hi)
        centre = [rng.uniform(r + 1, s - r - 1) for s in shape]
        disc = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= r**2
        images[i, 0] = np.clip(0.15 + 0.6 * disc + rng.normal(0, 0.05, shape), 0, 1)
        masks[i, 0] = disc
    return images, masks


@dataclass(frozen=True)
class DiscCache:
    """The cache folder and a config with tiny networks for it."""

    cache_dir: Path

    def cfg(self, **sections: Any) -> MedsynthConfig:
        raw: dict[str, Any] = {
            "name": "discs",
            "data": {"root": "unused", "labels": LABELS},
            "preprocess": {"spatial_dims": 2, "spatial_size": [SIZE, SIZE]},
            "segmenter": {
                "channels": [8, 16],
                "strides": [2],
                "num_res_units": 1,
                "train": {
                    "steps": 60,
                    "batch_size": 8,
                    "lr": 1e-2,
                    "warmup_steps": 5,
                    "val_every": 30,
                    "ckpt_every": 30,
                    "amp": "off",
                    "num_threads": 1,
                },
            },
            "validation": {
                "features": {
                    "channels": [8, 16],
                    "train": {"steps": 10, "batch_size": 8, "val_every": 5, "ckpt_every": 5, "num_threads": 1},
                }
            },
        }
        for k, v in sections.items():
            raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
        return validate_config(raw, "disc test config", MedsynthConfig)


def write_disc_cache(
    root: Path, splits: dict[str, int], per_patient: int = 4, shape: tuple[int, ...] = (SIZE, SIZE)
) -> Path:
    """A cache with ``splits[name]`` patients per split, ``per_patient`` disc images of ``shape`` each."""
    items: list[dict[str, Any]] = []
    (root / "cases").mkdir(parents=True, exist_ok=True)
    seed = 0
    for split, n_pat in splits.items():
        for p in range(n_pat):
            pid = f"{split}{p}"
            img, msk = disc_items(per_patient, seed, shape)
            seed += 1
            rel = f"cases/{pid}.npz"
            affine = np.repeat(np.eye(len(shape) + 1)[None], per_patient, 0)
            np.savez(root / rel, image=img, mask=msk, affine=affine)
            items += [
                {"item_id": f"{pid}_{k}", "patient_id": pid, "file": rel, "index": k, "split": split}
                for k in range(per_patient)
            ]
    (root / "manifest.json").write_text(json.dumps({"items": items, "labels": {str(k): v for k, v in LABELS.items()}}))
    return root


@pytest.fixture(scope="session")
def disc_cache(tmp_path_factory: pytest.TempPathFactory) -> DiscCache:
    """6 training patients (24 images), 2 validation patients (8), 2 test patients (8)."""
    return DiscCache(write_disc_cache(tmp_path_factory.mktemp("discs"), {"train": 6, "val": 2, "test": 2}))


@pytest.fixture(scope="module")
def trained(disc_cache: DiscCache, tmp_path_factory: pytest.TempPathFactory) -> tuple[SegmenterResult, Path]:
    run = tmp_path_factory.mktemp("seg") / "segmenter"
    ctx = StageContext.create(run, device="cpu", input_key="discs-v1")
    return train_segmenter(disc_cache.cfg(), disc_cache.cache_dir, ctx), run


def test_segmenter_learns_discs(trained: tuple[SegmenterResult, Path], disc_cache: DiscCache) -> None:
    result, run = trained
    assert result.metrics["val_dice"] > 0.5 and result.metrics["val_dice_disc"] == result.metrics["val_dice"]
    test = load_split(disc_cache.cache_dir, "test")
    assert result.model is not None
    pred = predict(result.model, test.images)
    assert pred.shape == test.masks.shape and pred.dtype == torch.uint8
    assert float(np.mean(dice_per_label(pred, test.masks, [1]).present(1))) > 0.5
    assert (run / "samples" / "segmenter_val.png").read_bytes()[:8] == PNG_MAGIC
    extras = find_checkpoint(run, "final").extras  # type: ignore[union-attr]
    assert extras["num_classes"] == 2 and extras["roi_size"] == [32, 32] and extras["input_key"] == "discs-v1"


def test_checkpoint_round_trip_gives_identical_predictions(
    trained: tuple[SegmenterResult, Path], disc_cache: DiscCache
) -> None:
    result, run = trained
    x = load_split(disc_cache.cache_dir, "test").images
    loaded = load_segmenter(disc_cache.cfg(), run, "cpu")
    assert result.model is not None
    assert torch.equal(predict(result.model, x), predict(loaded, x))
    assert torch.equal(predict(loaded, x, batch_size=3), predict(loaded, x, batch_size=8))
    assert loaded.labels == {0: "background", 1: "disc"} and loaded.roi_size == (32, 32)


def test_rerun_with_same_inputs_is_a_no_op(trained: tuple[SegmenterResult, Path], disc_cache: DiscCache) -> None:
    result, run = trained
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*") if p.is_file()}
    again = train_segmenter(disc_cache.cfg(), disc_cache.cache_dir, StageContext.create(run, input_key="discs-v1"))
    assert again.checkpoint == result.checkpoint and again.metrics["val_dice"] == result.metrics["val_dice"]
    assert before == {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*") if p.is_file()}


def test_other_sizes_go_through_the_sliding_window(
    trained: tuple[SegmenterResult, Path], disc_cache: DiscCache
) -> None:
    result, _ = trained
    test = load_split(disc_cache.cache_dir, "test")
    assert result.model is not None
    small = predict(result.model, test.images[:, :, 2:30, 3:29])  # 28 x 26: smaller than the window, padded
    assert small.shape == (8, 1, 28, 26)
    assert float(np.nanmean(dice_per_label(small, test.masks[:, :, 2:30, 3:29], [1]).present(1))) > 0.5


def test_feature_encoder_trains_loads_and_extracts(disc_cache: DiscCache, tmp_path: Path) -> None:
    cfg = disc_cache.cfg()
    res = train_feature_encoder(cfg, disc_cache.cache_dir, StageContext.create(tmp_path / "fe", device="cpu"))
    assert np.isfinite(res.metrics["val_mse"])
    enc = load_feature_encoder(cfg, tmp_path / "fe")
    x = load_split(disc_cache.cache_dir, "test").images
    f = extract_features(enc, x, batch_size=3)
    assert f.shape == (8, 16) and f.dtype == torch.float64
    assert torch.equal(f, extract_features(enc, x, batch_size=8))
    # the same weights given as a user's local file
    weights = tmp_path / "my_encoder.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(weights))
    user_cfg = disc_cache.cfg(validation={**cfg.validation.model_dump(), "feature_weights": str(weights)})
    user = load_feature_encoder(user_cfg)
    assert torch.allclose(extract_features(user, x), f)


def test_plausibility_with_the_real_trained_segmenter(
    trained: tuple[SegmenterResult, Path], disc_cache: DiscCache, tmp_path: Path
) -> None:
    from medsynth.evaluation.plausibility import plausibility_report, worst_cases_figure

    result, _ = trained
    assert result.model is not None
    test = load_split(disc_cache.cache_dir, "test")
    # "synthetic" images that respect the masks poorly: the disc drawn shifted by 6 pixels
    synth = torch.roll(test.images, shifts=6, dims=3)
    pred_real, pred_synth = predict(result.model, test.images), predict(result.model, synth)
    rep = plausibility_report(pred_real, pred_synth, test.masks, test.patients, test.item_ids, test.labels, n_boot=100)
    disc = rep["per_label"]["disc"]
    assert disc["dice_real"]["value"] > 0.5 and disc["ratio"]["value"] < 0.9
    png = worst_cases_figure(tmp_path / "w.png", test.images, synth, test.masks, pred_real, pred_synth, rep["rows"], 2)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_3d_segmenter_with_a_size_that_needs_padding(tmp_path: Path) -> None:
    """3D from preprocess.spatial_dims; 14 x 12 x 10 is padded to 16 x 12 x 12 (stride 4) and predicted back."""
    shape = (14, 12, 10)
    cache = write_disc_cache(tmp_path / "cache", {"train": 2, "val": 1}, per_patient=2, shape=shape)
    raw_seg = {"channels": [4, 8, 8], "strides": [2, 2], "num_res_units": 0, "augment_flips": True, "flip_axes": [0, 2]}
    cfg = DiscCache(cache).cfg(
        preprocess={"spatial_dims": 3, "spatial_size": list(shape)},
        segmenter={**raw_seg, "train": {"steps": 3, "batch_size": 2, "ckpt_every": 2, "amp": "off", "num_threads": 1}},
    )
    res = train_segmenter(cfg, cache, StageContext.create(tmp_path / "seg3d", device="cpu"))
    assert res.model is not None and res.model.roi_size == (16, 12, 12)
    x = load_split(cache, "val").images
    pred = predict(res.model, x)
    assert pred.shape == (2, 1, *shape)
    assert torch.equal(pred, predict(load_segmenter(cfg, tmp_path / "seg3d"), x))


class _StepCounter:
    """A progress sink counting the optimiser steps a run actually performs."""

    def __init__(self) -> None:
        self.steps = 0

    def advance(self, n: int = 1, info: str = "") -> None:
        self.steps += n


def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path: Path) -> None:
    """Flips, dropout and EMA are drawn per step, so resuming at a checkpoint repeats the run bit for bit."""
    cache = write_disc_cache(tmp_path / "cache", {"train": 2}, per_patient=4, shape=(16, 16))

    def cfg(steps: int) -> MedsynthConfig:
        seg = {"channels": [4, 8], "strides": [2], "num_res_units": 1, "dropout": 0.2}
        opt = {"steps": steps, "batch_size": 4, "ckpt_every": 4, "val_every": 3, "ema_decay": 0.9, "amp": "off"}
        return DiscCache(cache).cfg(preprocess={"spatial_size": [16, 16]}, segmenter={**seg, "train": opt})

    train_segmenter(cfg(6), cache, StageContext.create(tmp_path / "straight", device="cpu"))
    train_segmenter(cfg(4), cache, StageContext.create(tmp_path / "resumed", device="cpu"))
    counter = _StepCounter()
    resumed_ctx = StageContext.create(tmp_path / "resumed", resume=True, progress=counter, device="cpu")
    train_segmenter(cfg(6), cache, resumed_ctx)
    assert counter.steps == 2  # it continued from the step-4 checkpoint rather than starting over
    a, b = find_checkpoint(tmp_path / "straight", "final"), find_checkpoint(tmp_path / "resumed", "final")
    assert a is not None and b is not None and a.step == b.step == 6
    for name in ("segmenter", "segmenter_ema", "state"):
        wa, wb = a.weights(name), b.weights(name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name

"""Memorisation audit: exact and lightly noised copies of training images are flagged, fresh images are not."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

from medsynth.synthesis.memorisation import (
    closest_pairs_figure,
    memorisation_audit,
    nearest_neighbours,
)

torch.set_num_threads(1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _images(n: int, seed: int, size: int = 24) -> torch.Tensor:
    """Smooth random 'anatomies': a few Gaussian blobs each, in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        for _ in range(4):
            cy, cx, s, a = rng.random(), rng.random(), 0.05 + 0.15 * rng.random(), rng.random()
            out[i, 0] += a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
        out[i, 0] /= max(out[i, 0].max(), 1e-6)
    return torch.from_numpy(out)


@pytest.mark.parametrize("distance", ["ncc", "l2", "ssim"])
def test_copies_are_flagged_and_fresh_images_are_not(distance: str, tmp_path: Path) -> None:
    train, test = _images(60, seed=0), _images(40, seed=1)
    fresh = _images(4, seed=2)
    noise = torch.from_numpy(np.random.default_rng(3).normal(0, 0.01, (1, 1, 24, 24)).astype(np.float32))
    synth = torch.cat([train[7:8], (train[21:22] + noise).clamp(0, 1), fresh])
    res = memorisation_audit(
        synth,
        train,
        test,
        percentile=1.0,
        distance=distance,  # type: ignore[arg-type]
        synth_ids=["copy", "noisy", "f0", "f1", "f2", "f3"],
        train_ids=[f"t{i}" for i in range(60)],
        chunk=16,  # several blocks on both axes
    )
    assert res.flagged.tolist() == [True, True, False, False, False, False]
    assert res.rows[0]["nearest_train_id"] == "t7" and res.rows[1]["nearest_train_id"] == "t21"
    assert res.synth_distance[0] == pytest.approx(0.0, abs=1e-4)
    assert res.summary["n_flagged"] == 2 and res.fraction_flagged == pytest.approx(2 / 6)
    assert res.threshold == pytest.approx(np.percentile(res.test_distance, 1.0))
    png = closest_pairs_figure(tmp_path / "closest.png", synth, train, res, n=3)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_nearest_neighbours_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    q, r = rng.random((13, 50)).astype(np.float32), rng.random((37, 50)).astype(np.float32)
    d, i = nearest_neighbours(q, r, "l2", k=3, chunk=8)
    brute = np.sqrt(((q[:, None] - r[None]) ** 2).mean(-1))
    np.testing.assert_array_equal(i.numpy(), np.argsort(brute, 1)[:, :3])
    np.testing.assert_allclose(d.numpy(), np.sort(brute, 1)[:, :3], atol=1e-5)
    d, i = nearest_neighbours(q, r, "ncc", k=1, chunk=8)
    corr = np.corrcoef(np.concatenate([q, r]))[:13, 13:]
    np.testing.assert_array_equal(i[:, 0].numpy(), corr.argmax(1))
    np.testing.assert_allclose(d[:, 0].numpy(), 1 - corr.max(1), atol=1e-5)


def test_source_ids_and_feature_vectors() -> None:
    rng = np.random.default_rng(1)
    train, test = torch.from_numpy(rng.random((30, 16))), torch.from_numpy(rng.random((20, 16)))
    synth = train[[4, 9]] + 0.001
    res = memorisation_audit(synth, train, test, distance="l2", source_ids=["4", "3"])
    assert res.flagged.all()
    assert res.summary["fraction_nearest_is_source"] == 0.5
    assert [r["nearest_is_source"] for r in res.rows] == [True, False]

"""Fixtures of the training tests: tiny phantom preprocessing caches and a tiny-network config builder.

Everything is sized for CPU seconds: 2D slices of 16 x 16 (4 patients x 2 slices; 3 train, 1 val),
3D volumes of 16 x 16 x 12 (3 patients; 2 train, 1 val); networks of 8-16 channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig
from medsynth.data.phantom import LABELS, write_phantom_dataset
from medsynth.data.preprocess import run_preprocess

torch.set_num_threads(1)  # OMP_NUM_THREADS=1 is set by tests/conftest.py before torch is imported

SIZE = 16
SPATIAL = {2: [SIZE, SIZE], 3: [SIZE, SIZE, SIZE * 3 // 4]}
SPLITS = {
    2: {"train": 0.75, "val": 0.25, "test": 0.0, "seed": 0},
    3: {"train": 0.67, "val": 0.33, "test": 0.0, "seed": 0},
}


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _optim(**over: Any) -> dict[str, Any]:
    return {
        "steps": 8,
        "batch_size": 2,
        "lr": 1e-3,
        "warmup_steps": 2,
        "val_every": 4,
        "val_batches": 1,
        "ckpt_every": 4,
        "keep_checkpoints": 2,
        "ema_decay": 0.9,
        "amp": "off",
        "seed": 0,
        "num_threads": 1,
        **over,
    }


def raw_config(dims: int, data_root: str | Path = "unused", **overrides: Any) -> dict[str, Any]:
    """A raw config dict with tiny networks for ``dims`` (2 or 3); ``overrides`` are merged section-wise."""
    raw: dict[str, Any] = {
        "name": f"tiny{dims}d",
        "output_dir": "outputs",
        "seed": 0,
        "data": {"root": str(data_root), "labels": dict(LABELS), "split": SPLITS[dims]},
        "qc": {"policy": "fail", "n_overlays": 0},
        "preprocess": {
            "spatial_dims": dims,
            "spatial_size": SPATIAL[dims],
            "intensity": {"method": "percentile", "lower": 0.5, "upper": 99.5, "within_foreground": True},
        },
        "autoencoder": {
            "network": {
                "channels": [8, 8],
                "latent_channels": 2,
                "num_res_blocks": 1,
                "attention_levels": [False, False],
                "norm_num_groups": 4,
            },
            "discriminator": {"channels": 8, "num_layers_d": 1},  # BatchNorm: running stats resume too
            "train": _optim(),
            "kl_weight": 1e-6,
            "adv_weight": 0.0,
        },
        "diffusion": {
            "network": {
                "channels": [8, 16],
                "attention_levels": [False, False],
                "num_res_blocks": 1,
                "num_head_channels": 8,
                "norm_num_groups": 4,
            },
            "train": _optim(),
            "objective": "v_prediction",
            "num_train_timesteps": 50,
        },
        "controlnet": {
            "network": {"conditioning_embedding_num_channels": [8, 8]},
            "train": _optim(),
            "mask_dropout": 0.1,
        },
        "sampling": {"sampler": "ddim", "steps": 3, "guidance_scale": 1.0, "batch_size": 4},
    }
    return _merge(raw, overrides)


def tiny_cfg(dims: int, data_root: str | Path = "unused", **overrides: Any) -> MedsynthConfig:
    """A validated :class:`MedsynthConfig` with tiny networks (see :func:`raw_config`)."""
    return validate_config(raw_config(dims, data_root, **overrides), "tiny test config", MedsynthConfig)


@dataclass(frozen=True)
class TinyCache:
    """A preprocessing cache of a tiny phantom dataset."""

    dims: int
    data_root: Path
    cache_dir: Path

    def cfg(self, **overrides: Any) -> MedsynthConfig:
        """:func:`tiny_cfg` for this cache's dimensionality and data root."""
        return tiny_cfg(self.dims, self.data_root, **overrides)


def _build_cache(root: Path, dims: int, n: int) -> TinyCache:
    data = write_phantom_dataset(root / "phantom", dim=dims, n=n, seed=0, size=SIZE, slices_per_patient=2)
    cache = root / "cache"
    summary = run_preprocess(tiny_cfg(dims, data), cache)
    assert summary.n_items > 0
    return TinyCache(dims, data, cache)


@pytest.fixture(scope="session")
def cache2d(tmp_path_factory: pytest.TempPathFactory) -> TinyCache:
    """2D phantom cache: 4 patients x 2 slices of 16 x 16 (3 train patients, 1 val)."""
    return _build_cache(tmp_path_factory.mktemp("cache2d"), 2, 4)


@pytest.fixture(scope="session")
def cache3d(tmp_path_factory: pytest.TempPathFactory) -> TinyCache:
    """3D phantom cache: 3 volumes of 16 x 16 x 12 (2 train, 1 val)."""
    return _build_cache(tmp_path_factory.mktemp("cache3d"), 3, 3)


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def cache(request: pytest.FixtureRequest) -> TinyCache:
    """The 2D and the 3D cache in turn."""
    return request.getfixturevalue(f"cache{request.param}d")


class RecordingTracker:
    """A real :class:`~medsynth.tracking.base.Tracker` that keeps everything it is given."""

    def __init__(self) -> None:
        self.params: dict[str, Any] = {}
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.artifacts: list[tuple[Path, str | None]] = []

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))

    def series(self, key: str) -> list[tuple[int | None, float]]:
        """``(step, value)`` of every logged value of ``key``, in logging order."""
        return [(s, m[key]) for s, m in self.metrics if key in m]

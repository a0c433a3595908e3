"""Fixtures of the integration tests: one temporary Prefect API per session, tiny pipeline configs."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API (slow to start: one per test session)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def tiny_pipeline_config(root: Path, **extra: Any) -> dict[str, Any]:
    """A complete pipeline config on a tiny 2D phantom with tiny networks (seconds per stage)."""
    opt = {"batch_size": 4, "warmup_steps": 1, "val_every": 3, "ckpt_every": 3, "num_threads": 1, "lr": 1e-3}
    cfg: dict[str, Any] = {
        "name": "tiny",
        "output_dir": str(root / "out"),
        "phantom": {
            "enabled": True,
            "dim": 2,
            "n": 5,
            "size": 32,
            "slices_per_patient": 2,
            "seed": 3,
            "lesion_probability": 1.0,
        },
        "data": {
            "root": str(root / "phantom"),
            "mask_suffix": "_mask",
            "labels": {0: "background", 1: "csf", 2: "grey_matter", 3: "white_matter", 4: "lesion"},
            "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 0},
        },
        "qc": {"policy": "fail", "n_overlays": 2},
        "preprocess": {"spatial_dims": 2, "spatial_size": [32, 32]},
        "autoencoder": {
            "network": {
                "channels": [8, 8],
                "latent_channels": 2,
                "num_res_blocks": 1,
                "norm_num_groups": 4,
                "attention_levels": [False, False],
            },
            "train": {**opt, "steps": 4},
        },
        "diffusion": {
            "network": {
                "channels": [8, 16],
                "attention_levels": [False, False],
                "num_res_blocks": 1,
                "num_head_channels": 8,
                "norm_num_groups": 4,
            },
            "num_train_timesteps": 50,
            "schedule": "cosine",
            "train": {**opt, "steps": 4},
        },
        "controlnet": {"network": {"conditioning_embedding_num_channels": [8, 8]}, "train": {**opt, "steps": 4}},
        "sampling": {"sampler": "ddim", "steps": 3, "guidance_scale": 1.0, "batch_size": 8},
        "synthesis": {"max_masks": 3},
        "segmenter": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "train": {**opt, "steps": 4}},
        "validation": {
            "n_bootstrap": 20,
            "diversity_masks": 2,
            "diversity_seeds": 2,
            "max_cases": 6,
            "features": {"channels": [8, 16], "train": {**opt, "steps": 4}},
        },
        "experiment": {
            "fractions": [0.5, 1.0],
            "ratios": [0, 1],
            "seeds": [0],
            "n_bootstrap": 20,
            "train": {**opt, "steps": 4, "batch_size": 8},
        },
    }
    cfg.update(extra)
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    """Write a config dict as YAML."""
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def pipeline_config() -> Any:
    """The factory :func:`tiny_pipeline_config` (fixtures are importable where modules are not)."""
    return tiny_pipeline_config


@pytest.fixture(scope="session")
def tiny_run(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny pipeline run twice (the second time everything is cached); shared by the integration tests.

    Returns ``root`` (its output folder is ``root/out``), ``cfg`` (the YAML path), the two flow results
    ``first`` and ``second``, and their wall times ``t_first`` and ``t_second``.
    """
    from flows.pipeline import pipeline_flow

    root = tmp_path_factory.mktemp("pipeline")
    cfg_path = write_config(root / "tiny.yaml", tiny_pipeline_config(root))
    t0 = time.monotonic()
    first = pipeline_flow(str(cfg_path), [])
    t1 = time.monotonic()
    second = pipeline_flow(str(cfg_path), [])
    t2 = time.monotonic()
    return {"root": root, "cfg": cfg_path, "first": first, "second": second, "t_first": t1 - t0, "t_second": t2 - t1}

"""A one-test-case 3D dataset goes through every stage and reports "n/a (needs >= n)" where it must.

The stages are the library functions the Prefect flows and the CLI call (no Prefect server needed),
on 4 tiny 3D patients (train 2, val 1, test 1) with tiny networks and a few steps each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig


def _config(root: Path, out: Path) -> dict[str, Any]:
    opt = {"batch_size": 2, "warmup_steps": 1, "val_every": 2, "ckpt_every": 2, "num_threads": 1, "lr": 1e-3}
    return {
        "name": "one-test",
        "output_dir": str(out),
        "data": {"root": str(root), "split": {"train": 0.5, "val": 0.25, "test": 0.25, "seed": 0}},
        "qc": {"policy": "fail", "n_overlays": 0},
        "preprocess": {"spatial_dims": 3, "spatial_size": [16, 16, 8]},
        "autoencoder": {
            "network": {
                "channels": [4, 4],
                "latent_channels": 2,
                "num_res_blocks": 1,
                "norm_num_groups": 2,
                "attention_levels": [False, False],
            },
            "train": {**opt, "steps": 2},
        },
        "diffusion": {
            "network": {
                "channels": [8, 8],
                "attention_levels": [False, False],
                "num_res_blocks": 1,
                "num_head_channels": 8,
                "norm_num_groups": 4,
            },
            "num_train_timesteps": 20,
            "train": {**opt, "steps": 2},
        },
        "controlnet": {"network": {"conditioning_embedding_num_channels": [4, 4]}, "train": {**opt, "steps": 2}},
        "sampling": {"sampler": "ddim", "steps": 2, "guidance_scale": 1.0, "batch_size": 2},
        "segmenter": {"channels": [4, 8], "strides": [2], "num_res_units": 1, "train": {**opt, "steps": 2}},
        "validation": {
            "n_bootstrap": 10,
            "diversity_masks": 1,
            "diversity_seeds": 2,
            "features": {"channels": [4, 8], "train": {**opt, "steps": 2}},
        },
        "synthesis": {"max_masks": 2},
        "experiment": {
            "tasks": ["segmentation"],
            "fractions": [1.0],
            "ratios": [0, 1],
            "seeds": [0],
            "arms": ["real"],
            "segmenter_steps": 2,
            "n_bootstrap": 10,
        },
    }


@pytest.mark.timeout(600)
def test_one_test_case_3d_dataset_validates_with_na(synth, tmp_path: Path) -> None:
    from medsynth.pipeline import run_stage, run_with_upstream

    root = synth.msd(n=4)
    cfg = validate_config(_config(root, tmp_path / "out"), "test", MedsynthConfig)
    # labels undeclared: inferred as 0/1/2 from the masks; every stage the validation needs runs first
    outs = run_with_upstream(cfg, "validate", device="cpu", track=False)
    summary = outs["validate"].result
    assert summary is not None
    rep = json.loads(Path(summary.outputs["report"]).read_text(encoding="utf-8"))
    assert rep["n_items"] == 1 and rep["labels"] == {"0": "background", "1": "label_1", "2": "label_2"}
    assert rep["realism"]["fid"] is None and rep["realism"]["na"].startswith("n/a (needs >= 2")
    assert rep["memorisation"]["na"].startswith("n/a (needs >= 2 real test images")
    md = (Path(summary.outputs["report"]).parent / "validation_summary.md").read_text(encoding="utf-8")
    assert "n/a (needs >= 2" in md and "CI n/a (needs >= 2 patients, has 1)" in md
    assert "val/fid_in_domain" not in summary.metrics  # an n/a measurement is not logged as a number
    synth_out = run_stage(cfg, "synthesize", device="cpu", track=False)
    assert synth_out.result is not None and synth_out.result.n_images > 0  # type: ignore[attr-defined]
    exp = run_stage(cfg, "experiment", device="cpu", track=False).result
    assert exp is not None and exp.metrics["exp/n_cells"] == 2
    exp_md = Path(exp.outputs["summary_md"]).read_text(encoding="utf-8")
    assert "n/a (needs >= 2 test patients)" in exp_md and "n/a (needs >= 2 seeds, has 1)" in exp_md

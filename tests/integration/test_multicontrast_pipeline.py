"""A two-contrast (FLAIR + T2) 2D dataset goes through the pipeline modelled jointly: every stage carries 2 channels.

The stages are the library functions the Prefect flows and the CLI call (no Prefect server needed),
on 6 tiny 2D cases in nnU-Net layout (``X_0000``, ``X_0001``) with tiny networks and a few steps each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig
from medsynth.data.io import read_image


def _config(root: Path, out: Path) -> dict[str, Any]:
    opt = {"batch_size": 2, "warmup_steps": 1, "val_every": 2, "ckpt_every": 2, "num_threads": 1, "lr": 1e-3}
    return {
        "name": "two-contrast",
        "output_dir": str(out),
        "data": {
            "root": str(root),
            "channels": ["flair", "t2"],
            "split": {"train": 0.5, "val": 0.17, "test": 0.33, "seed": 0},
        },
        "qc": {"policy": "fail", "n_overlays": 0},
        "preprocess": {"spatial_dims": 2, "spatial_size": [32, 32]},
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
            "tasks": ["segmentation", "presence"],
            "fractions": [1.0],
            "ratios": [0, 1],
            "seeds": [0],
            "arms": ["real"],
            "segmenter_steps": 2,
            "n_bootstrap": 10,
        },
    }


@pytest.mark.timeout(600)
def test_two_contrast_dataset_trains_synthesises_and_validates_per_channel(synth, tmp_path: Path) -> None:
    from medsynth.pipeline import run_stage, run_with_upstream

    root = synth.multicontrast("nnunet", n=6, dim=2)
    cfg = validate_config(_config(root, tmp_path / "out"), "test", MedsynthConfig)
    outs = run_with_upstream(cfg, "validate", device="cpu", track=False)
    summary = outs["validate"].result
    assert summary is not None
    rep = json.loads(Path(summary.outputs["report"]).read_text(encoding="utf-8"))
    assert rep["n_items"] == 2
    assert list(rep["per_channel"]) == ["flair", "t2"]
    for ch in rep["per_channel"].values():
        assert isinstance(ch["realism"]["fid"], float) and ch["autoencoder_psnr_db"] > 0
        assert set(ch["intensity_wasserstein"]) == set(rep["intensity_wasserstein"])
    md = (Path(summary.outputs["report"]).parent / "validation_summary.md").read_text(encoding="utf-8")
    assert "## Per channel" in md and "| flair |" in md and "| t2 |" in md

    synth_out = run_stage(cfg, "synthesize", device="cpu", track=False).result
    assert synth_out is not None
    out_dir = Path(synth_out.out_dir)  # type: ignore[attr-defined]
    manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["items"]
    for row in manifest["items"]:
        assert [Path(p).name for p in row["images"]] == [f"{row['id']}_0000.nii.gz", f"{row['id']}_0001.nii.gz"]
        shapes = {read_image(out_dir / p).array.shape for p in row["images"]}
        assert shapes == {(32, 32)}

    # the downstream experiment trains its segmenter and classifier on both channels (real and synthetic)
    exp = run_stage(cfg, "experiment", device="cpu", track=False).result
    assert exp is not None and exp.metrics["exp/n_cells"] >= 2

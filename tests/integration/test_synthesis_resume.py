"""SIGKILL in the middle of synthesis, then a re-run: the same dataset, and no batch generated twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, os, signal, sys
import numpy as np, torch
from torch import nn
torch.set_num_threads(1)
from medsynth.config.schema import MedsynthConfig
from medsynth.models.autoencoder import build_autoencoder
from medsynth.models.unet import build_diffusion_unet
from medsynth.generator import MaskGenerator, build_controlled, latent_channels, make_objective
from medsynth.generator import latent_spatial_shape
from medsynth.synthesis.masks import MaskItem
from medsynth.synthesis.run import RESUMED, synthesize

out, kill_after, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
LABELS = {0: "background", 1: "brain", 2: "tumour"}
net = {"channels": [8, 8], "attention_levels": [False, False], "num_res_blocks": 1, "norm_num_groups": 4}
cfg = MedsynthConfig.model_validate({
    "data": {"root": "unused", "labels": LABELS},
    "preprocess": {"spatial_dims": 2, "spatial_size": [16, 16]},
    "autoencoder": {"network": {**net, "latent_channels": 2}},
    "diffusion": {"network": {**net, "num_head_channels": 8}},
    "controlnet": {"network": {"conditioning_embedding_num_channels": [8, 8]}},
    "sampling": {"sampler": "ddim", "steps": 3, "batch_size": 2, "guidance_scale": 1.0},
    "synthesis": {"n_per_mask": 2, "edits": ["none", "flip"], "n_grid": 2},
})
torch.manual_seed(0)
ae = build_autoencoder(cfg.autoencoder, 2).eval()
controlled = build_controlled(cfg, build_diffusion_unet(cfg.diffusion, 2, latent_channels(cfg)), num_classes=3)
with torch.no_grad():
    for p in controlled.parameters():
        if p.ndim > 1 and not p.any():
            nn.init.normal_(p, std=0.2)
gen = MaskGenerator(ae, controlled.eval(), make_objective(cfg, latent_spatial_shape(cfg)), 1.0, 3,
                    latent_channels(cfg), torch.device("cpu"), {"x": "0" * 64})
masks = []
for i in range(3):
    m = np.zeros((1, 16, 16), np.uint8)
    m[0, 2:14, 3:13] = 1
    m[0, 4 + i: 7 + i, 5:8] = 2
    masks.append(MaskItem(f"case{i}", m, np.diag([1.5, 1.5, 1.0]), f"P{i}", "test", None))

class Prog:
    n = 0
    def advance(self, n=1, info=""):
        with open(log, "a") as fh:
            fh.write(json.dumps({"n": n, "resumed": info.endswith(RESUMED)}) + "\n")
        if not info.endswith(RESUMED):
            Prog.n += 1
            if Prog.n == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)  # a real kill, mid-synthesis

synthesize(cfg, gen, masks, out, progress=Prog(), labels=LABELS)
"""


def _run(out: Path, kill_after: int, log: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out), str(kill_after), str(log)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, -9), proc.stderr[-3000:]
    return proc.returncode


def _dataset(out: Path) -> tuple[list[dict[str, object]], dict[str, bytes]]:
    rows = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["items"]
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    return rows, files


def _events(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_sigkill_mid_synthesis_then_rerun_gives_the_same_dataset(tmp_path: Path) -> None:
    from medsynth.data.io import read_image

    straight, resumed = tmp_path / "straight" / "ds", tmp_path / "resumed" / "ds"
    assert _run(straight, 0, tmp_path / "straight.log") == 0
    assert _run(resumed, 3, tmp_path / "killed.log") == -9  # killed after 3 of the 6 batches (12 images)
    assert not resumed.exists() and (resumed.parent / ".ds.resume").is_dir()  # nothing half-published
    assert _run(resumed, 0, tmp_path / "rerun.log") == 0
    rerun = _events(tmp_path / "rerun.log")
    assert sum(int(e["n"]) for e in rerun if e["resumed"]) == 6  # 3 batches of 2 taken from the first run
    assert sum(int(e["n"]) for e in rerun if not e["resumed"]) == 6  # only the other 3 generated
    rows_a, files_a = _dataset(straight)
    rows_b, files_b = _dataset(resumed)
    assert rows_a == rows_b and len(rows_a) == 12  # same manifest, same order
    assert "items.jsonl" not in files_b and not (resumed.parent / ".ds.resume").exists()
    for r in rows_a:
        a, b = read_image(straight / str(r["image"])).array, read_image(resumed / str(r["image"])).array
        np.testing.assert_array_equal(a, b)  # bit for bit
    assert {k for k in files_a if k.startswith(("images/", "labels/"))} == {
        k for k in files_b if k.startswith(("images/", "labels/"))
    }

"""End-to-end synthesis with a real (tiny, untrained) MONAI generator on 16x16 masks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from medsynth.config.schema import MedsynthConfig
from medsynth.config.stages import SamplingConfig
from medsynth.data.io import read_image
from medsynth.data.layouts import discover
from medsynth.errors import ConfigError, DataError, OutputExistsError
from medsynth.generator import MaskGenerator, build_controlled, latent_channels, make_objective
from medsynth.generator import latent_spatial_shape as latent_shape
from medsynth.models.autoencoder import build_autoencoder
from medsynth.models.unet import build_diffusion_unet
from medsynth.synthesis.masks import MaskItem
from medsynth.synthesis.run import GRID_NAME, image_seed, synthesize
from medsynth.synthesis.writer import MANIFEST_ROW_KEYS

torch.set_num_threads(1)

LABELS = {0: "background", 1: "brain", 2: "tumour"}
SIDE = 16
RAW: dict[str, Any] = {
    "data": {"root": "unused", "labels": LABELS},
    "preprocess": {"spatial_dims": 2, "spatial_size": [SIDE, SIDE]},
    "autoencoder": {
        "network": {
            "channels": [8, 8],
            "latent_channels": 2,
            "num_res_blocks": 1,
            "attention_levels": [False, False],
            "norm_num_groups": 4,
        }
    },
    "diffusion": {
        "network": {
            "channels": [8, 8],
            "attention_levels": [False, False],
            "num_res_blocks": 1,
            "num_head_channels": 8,
            "norm_num_groups": 4,
        }
    },
    "controlnet": {"network": {"conditioning_embedding_num_channels": [8, 8]}},  # AE factor 2: one stride-2 stage
    "sampling": {"sampler": "ddim", "steps": 3, "batch_size": 4, "guidance_scale": 1.0},
}


def _cfg(**sections: dict[str, Any]) -> MedsynthConfig:
    raw = {**RAW, **{k: {**RAW.get(k, {}), **v} for k, v in sections.items()}}
    return MedsynthConfig.model_validate(raw)


@pytest.fixture(scope="module")
def generator() -> MaskGenerator:
    """A real MaskGenerator of tiny untrained networks; zero-initialised weights filled so masks matter."""
    cfg = _cfg()
    torch.manual_seed(0)
    ae = build_autoencoder(cfg.autoencoder, 2).eval()
    unet = build_diffusion_unet(cfg.diffusion, 2, latent_channels(cfg))
    controlled = build_controlled(cfg, unet, num_classes=len(LABELS))
    with torch.no_grad():
        for p in controlled.parameters():
            if p.ndim > 1 and not p.any():
                nn.init.normal_(p, std=0.2)
    objective = make_objective(cfg, latent_shape(cfg))
    return MaskGenerator(
        ae, controlled.eval(), objective, 1.0, len(LABELS), latent_channels(cfg), torch.device("cpu"), {"x": "0" * 64}
    )


def _masks(n: int = 3) -> list[MaskItem]:
    out = []
    for i in range(n):
        m = np.zeros((1, SIDE, SIDE), np.uint8)
        m[0, 2:14, 3:13] = 1
        if i != 1:
            m[0, 4 + i : 7 + i, 5:8] = 2
        affine = np.array([[0.0, -1.5, 10.0 + i], [1.5, 0.0, -3.0], [0.0, 0.0, 1.0]])
        image = np.random.default_rng(i).random((1, SIDE, SIDE)).astype(np.float32) if i == 0 else None
        out.append(MaskItem(f"case{i}_s{i}", m, affine, f"P{i}", "test", image))
    return out


class RecordingTracker:
    """A tracker that remembers what it was given."""

    def __init__(self) -> None:
        self.artifacts: list[tuple[Path, str | None]] = []
        self.metrics: dict[str, float] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        """Unused."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append((Path(path), artifact_path))


def _images(out: Path) -> dict[str, np.ndarray]:
    rows = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["items"]
    return {r["id"]: read_image(out / r["image"]).array for r in rows}


def test_generate_shapes_and_determinism_by_seed(generator: MaskGenerator) -> None:
    masks = torch.from_numpy(np.stack([m.mask for m in _masks()]))
    for guidance in (1.0, 2.0):
        sampling = SamplingConfig(sampler="ddim", steps=3, guidance_scale=guidance)
        a = generator.generate(masks, sampling, seed=5)
        b = generator.generate(masks, sampling, seed=5)
        assert a.shape == (3, 1, SIDE, SIDE) and a.dtype == torch.float32
        assert torch.equal(a, b)  # same seed twice: identical images
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    c = generator.generate(masks, SamplingConfig(sampler="ddim", steps=3), seed=6)
    assert not torch.equal(a, c)


def test_synthesize_writes_every_variant_with_complete_rows(generator: MaskGenerator, tmp_path: Path) -> None:
    cfg = _cfg(synthesis={"n_per_mask": 2, "edits": ["none", "flip", "transplant"], "n_grid": 3, "seed": 1})
    tracker = RecordingTracker()
    advanced: list[int] = []

    class Count:
        def advance(self, n: int = 1, info: str = "") -> None:
            advanced.append(n)

    s = synthesize(cfg, generator, _masks(), tmp_path / "syn", progress=Count(), tracker=tracker)
    assert (s.n_masks, s.n_variants, s.n_images, s.n_edits_not_applied) == (3, 9, 18, 0)
    assert advanced == [4, 4, 4, 4, 2]  # batches of sampling.batch_size
    manifest = json.loads(s.manifest.read_text(encoding="utf-8"))
    rows = manifest["items"]
    assert len(rows) == 18 and manifest["n_items"] == 18
    assert all(set(MANIFEST_ROW_KEYS) <= set(r) for r in rows)
    assert rows[0]["id"] == "case0_s0_none_0" and rows[1]["id"] == "case0_s0_none_1"
    assert rows[0]["source_patient"] == "P0" and rows[0]["model_hashes"] == {"x": "0" * 64}
    assert rows[0]["sampler"] == "ddim" and rows[0]["steps"] == 3 and rows[0]["guidance_scale"] == 1.0
    assert rows[1]["image_seed"] == image_seed(1, 0, 0, 1)
    assert rows[0]["seed"] == rows[3]["seed"] == image_seed(1, 0, 0, 0)  # one generate call per batch
    by_id = {r["id"]: r for r in rows}
    assert by_id["case0_s0_flip_0"]["edit"] == {"name": "flip", "axis": 0}
    t = by_id["case1_s1_transplant_0"]["edit"]
    assert t["name"] == "transplant" and t["applied"] and t["donor_id"] in {"case0_s0", "case2_s2"}
    images = _images(s.out_dir)
    assert all(a.shape == (SIDE, SIDE) for a in images.values())
    assert not np.array_equal(images["case0_s0_none_0"], images["case0_s0_none_1"])  # k gives another image
    lesion = read_image(s.out_dir / by_id["case1_s1_transplant_0"]["mask"], kind="mask").array
    assert int((lesion == 2).sum()) == 9  # the source mask 1 had no tumour
    flipped = read_image(s.out_dir / by_id["case0_s0_flip_1"]["mask"], kind="mask").array
    np.testing.assert_array_equal(flipped, _masks()[0].mask[0][::-1])
    back = read_image(s.out_dir / by_id["case2_s2_none_0"]["image"])
    np.testing.assert_allclose(back.affine, _masks()[2].affine, atol=1e-5)  # the mask's own geometry
    assert discover(cfg.data.model_copy(update={"root": str(s.out_dir)})).layout == "msd"
    assert s.grid == s.out_dir / GRID_NAME and s.grid.is_file()
    assert tracker.artifacts == [(s.grid, "synthesis")] and tracker.metrics["synthesis/n_images"] == 18


def test_same_config_gives_identical_images_and_the_seed_reproduces_one(
    generator: MaskGenerator, tmp_path: Path
) -> None:
    cfg = _cfg(synthesis={"n_per_mask": 2, "edits": ["none", "elastic"], "n_grid": 0}, sampling={"batch_size": 1})
    masks = _masks(2)
    a = synthesize(cfg, generator, masks, tmp_path / "a")
    b = synthesize(cfg, generator, masks, tmp_path / "b")
    ia, ib = _images(a.out_dir), _images(b.out_dir)
    assert ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
    assert a.grid is None and not (a.out_dir / GRID_NAME).exists()
    assert (a.out_dir / "labels" / "case0_s0_elastic_0.nii.gz").read_bytes() == (
        b.out_dir / "labels" / "case0_s0_elastic_0.nii.gz"
    ).read_bytes()
    # batch size 1: the row's seed regenerates its image alone
    row = json.loads(a.manifest.read_text(encoding="utf-8"))["items"][1]
    mask = read_image(a.out_dir / row["mask"], kind="mask").array
    again = generator.generate(torch.from_numpy(mask[None, None]), cfg.sampling, row["seed"])
    np.testing.assert_array_equal(again[0, 0].numpy(), ia[row["id"]])
    other = synthesize(
        cfg.model_copy(update={"synthesis": cfg.synthesis.model_copy(update={"seed": 9})}),
        generator,
        masks,
        tmp_path / "c",
    )
    assert not np.array_equal(_images(other.out_dir)["case0_s0_none_0"], ia["case0_s0_none_0"])


def test_refusals_happen_before_any_generation(generator: MaskGenerator, tmp_path: Path) -> None:
    out = tmp_path / "syn"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError):
        synthesize(_cfg(), generator, _masks(1), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    s = synthesize(_cfg(synthesis={"max_masks": 1, "n_grid": 0}), generator, _masks(), out, overwrite=True)
    assert s.n_images == 1 and not (out / "keep.txt").exists()

    with pytest.raises(ConfigError, match="refuse_memorised"):
        synthesize(_cfg(synthesis={"refuse_memorised": True}), generator, _masks(1), tmp_path / "m")
    wrong = MaskItem("w", np.zeros((1, 8, 8), np.uint8), np.eye(3), None, "wrong.nii.gz")
    with pytest.raises(DataError, match=r"\(1, 16, 16\)"):
        synthesize(_cfg(), generator, [wrong], tmp_path / "w")
    no_lesion = [_masks()[1]]
    with pytest.raises(DataError, match="no source mask holds lesion label 2"):
        synthesize(_cfg(synthesis={"edits": ["transplant"]}), generator, no_lesion, tmp_path / "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn"]


def test_memorisation_guard_refuses_copies_of_training_images(generator: MaskGenerator, tmp_path: Path) -> None:
    from medsynth.synthesis.memorisation import MemorisationGuard

    masks = _masks(2)
    plain = synthesize(_cfg(synthesis={"n_grid": 0}), generator, masks, tmp_path / "plain")
    produced = _images(plain.out_dir)
    names = sorted(produced)
    copy = torch.from_numpy(produced[names[0]]).float().reshape(1, 1, SIDE, SIDE)
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.random((12, 1, SIDE, SIDE)).astype(np.float32))
    train = torch.cat([noise[:6], copy])  # one of the generator's outputs sits in its "training set"
    ids = [f"n{i}" for i in range(6)] + ["the-copy"]
    guard = MemorisationGuard.from_reference(train, noise[6:], ids, percentile=1.0, distance="ncc")
    assert 0.5 < guard.threshold < 1.5  # real (noise) test images are far from every training image

    cfg = _cfg(synthesis={"refuse_memorised": True, "n_grid": 0})
    s = synthesize(cfg, generator, masks, tmp_path / "guarded", guard=guard)
    assert s.n_refused == 1 and s.n_images == len(produced) - 1
    refused = json.loads((s.out_dir / "refused_memorised.json").read_text(encoding="utf-8"))["refused"]
    assert [(r["item_id"], r["nearest_train_id"]) for r in refused] == [(names[0], "the-copy")]
    assert refused[0]["distance"] < 1e-3 and names[0] not in _images(s.out_dir)

    # nothing left to export: a clear error, and no dataset is committed
    everything = MemorisationGuard.from_reference(
        torch.cat(
            [noise[:6], torch.from_numpy(np.stack([produced[k] for k in names])).float().reshape(-1, 1, SIDE, SIDE)]
        ),
        noise[6:],
        ids[:6] + names,
    )
    with pytest.raises(DataError, match="refused as possible copies"):
        synthesize(cfg, generator, masks, tmp_path / "all", guard=everything)
    assert not (tmp_path / "all").exists() or not any((tmp_path / "all").iterdir())

    # outputs far from every training image pass a guard whose threshold is small (real test images that
    # are near-copies of training images: distance ~1e-3)
    near = noise[:6] + 0.01 * torch.from_numpy(rng.standard_normal((6, 1, SIDE, SIDE)).astype(np.float32))
    fresh = MemorisationGuard.from_reference(noise[:6], near, ids[:6], percentile=1.0, distance="ncc")
    assert fresh.threshold < 0.01
    s2 = synthesize(cfg, generator, masks, tmp_path / "fresh", guard=fresh)
    assert s2.n_refused == 0 and s2.n_images == len(produced)

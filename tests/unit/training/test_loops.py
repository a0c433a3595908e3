"""The training loops end to end on tiny phantom caches, in 2D and 3D.

autoencoder → latent cache (means) → diffusion UNet → ControlNet → ``load_generator`` → ``generate``,
plus the properties each stage promises: the latent scale factor, deterministic latent means, a
falling diffusion loss for every objective, sample grids, a frozen base UNet, mask dropout and
label weights.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth.checkpoint import find_checkpoint
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import load_split
from medsynth.fileio import sha256_file
from medsynth.generator import CONTROLNET, CONTROLNET_EMA, load_autoencoder, load_generator
from medsynth.models.autoencoder import encode_mean
from medsynth.models.controlnet import build_controlnet, one_hot_mask
from medsynth.training.autoencoder import train_autoencoder
from medsynth.training.context import StageContext
from medsynth.training.controlnet import drop_masks, train_controlnet
from medsynth.training.denoising import label_weight_map
from medsynth.training.diffusion import train_diffusion
from medsynth.training.latents import encode_split, load_latents

from .conftest import RecordingTracker, TinyCache

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class Pipeline:
    """The run folders of one tiny end-to-end training."""

    cache: TinyCache
    cfg: MedsynthConfig
    root: Path
    ae: Path
    latents: Path
    unet: Path
    controlnet: Path
    unet_files_before_controlnet: dict[str, str]
    tracker: RecordingTracker


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    cache: TinyCache = request.getfixturevalue(f"cache{request.param}d")
    root = tmp_path_factory.mktemp(f"pipeline{request.param}d")
    steps = {"train": {"steps": 4, "val_every": 2, "ckpt_every": 2}}
    cfg = cache.cfg(
        autoencoder=steps,
        diffusion=steps,
        controlnet={**steps, "mask_dropout": 0.5, "label_weights": {4: 5.0, 1: 0.5}},
    )
    tracker = RecordingTracker()

    def ctx(name: str) -> StageContext:
        return StageContext.create(root / name, tracker=tracker, device="cpu")

    train_autoencoder(cfg, cache.cache_dir, ctx("ae"))
    for split in ("train", "val"):
        encode_split(cfg, cache.cache_dir, root / "ae", root / "latents", split)
    train_diffusion(cfg, root / "latents", ctx("unet"), ae_run=root / "ae")
    before = _files(root / "unet")
    train_controlnet(cfg, root / "latents", root / "unet", ctx("controlnet"), ae_run=root / "ae")
    return Pipeline(
        cache, cfg, root, root / "ae", root / "latents", root / "unet", root / "controlnet", before, tracker
    )


def test_generate_gives_images_in_unit_range(pipeline: Pipeline) -> None:
    cfg, dev = pipeline.cfg, torch.device("cpu")
    val = load_split(pipeline.cache.cache_dir, "val")
    spatial = tuple(cfg.preprocess.spatial_size)
    assert tuple(val.masks.shape[2:]) == spatial

    gen = load_generator(cfg, pipeline.ae, pipeline.unet, pipeline.controlnet, dev)
    assert gen.conditional and gen.num_classes == val.num_classes
    masks = val.masks[:1].repeat(2, *[1] * (val.masks.ndim - 1))
    out = gen.generate(masks, cfg.sampling, seed=0)
    assert out.shape == (2, 1, *spatial) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, gen.generate(masks, cfg.sampling, seed=0))  # seeded
    guided = gen.generate(masks, cfg.sampling.model_copy(update={"guidance_scale": 2.0}), seed=0)
    assert guided.shape == out.shape and guided.min() >= 0.0 and guided.max() <= 1.0

    uncond = load_generator(cfg, pipeline.ae, pipeline.unet, None, dev)
    assert not uncond.conditional
    imgs = uncond.generate(None, cfg.sampling, seed=1, n=3, image_shape=spatial)
    assert imgs.shape == (3, 1, *spatial) and imgs.min() >= 0.0 and imgs.max() <= 1.0
    assert set(gen.hashes) > {f"controlnet/{CONTROLNET}", "autoencoder/autoencoder_ema", "unet/unet_ema"}


def test_scale_factor_is_inverse_std_of_training_latents(pipeline: Pipeline) -> None:
    ckpt = find_checkpoint(pipeline.ae, "final")
    assert ckpt is not None
    scale = ckpt.extras["scale_factor"]
    train = load_latents(pipeline.latents / "train.npz")
    n_train = len(load_split(pipeline.cache.cache_dir, "train"))
    latent_spatial = [s // 2 for s in pipeline.cfg.preprocess.spatial_size]
    assert tuple(train.latents.shape) == (n_train, pipeline.cfg.autoencoder.network.latent_channels, *latent_spatial)
    assert train.scale_factor == pytest.approx(scale, rel=1e-6)
    assert scale == pytest.approx(1.0 / float(train.latents.std()), rel=1e-4)
    val = load_latents(pipeline.latents / "val.npz")
    assert val.scale_factor == train.scale_factor  # the val split is scaled with the training factor
    unet = find_checkpoint(pipeline.unet, "final")
    assert unet is not None and unet.extras["scale_factor"] == pytest.approx(scale, rel=1e-6)


def test_latent_cache_holds_means(pipeline: Pipeline, tmp_path: Path) -> None:
    cfg, dev = pipeline.cfg, torch.device("cpu")
    first = encode_split(cfg, pipeline.cache.cache_dir, pipeline.ae, tmp_path / "a", "train")
    second = encode_split(cfg, pipeline.cache.cache_dir, pipeline.ae, tmp_path / "b", "train")
    with np.load(first) as a, np.load(second) as b:
        assert np.array_equal(a["latents"], b["latents"])
        z = a["latents"]
    ckpt = find_checkpoint(pipeline.ae, "final")
    assert ckpt is not None
    ae, _ = load_autoencoder(cfg, ckpt, dev)
    images = load_split(pipeline.cache.cache_dir, "train").images
    with torch.no_grad():
        mu = encode_mean(ae, images)
        sample = ae.encode_stage_2_inputs(images)  # a posterior sample, for contrast
    assert torch.allclose(torch.from_numpy(z), mu, atol=1e-6)
    assert not torch.allclose(torch.from_numpy(z), sample, atol=1e-6)


def test_sample_grids_are_written(pipeline: Pipeline) -> None:
    grids = {
        pipeline.ae: sorted((pipeline.ae / "samples").glob("recon_step*.png")),
        pipeline.unet: [pipeline.unet / "samples" / "unconditional.png"],
        pipeline.controlnet: [pipeline.controlnet / "samples" / "controlnet.png"],
    }
    assert [p.name for p in grids[pipeline.ae]] == ["recon_step0000002.png", "recon_step0000004.png"]
    for paths in grids.values():
        for p in paths:
            assert p.is_file() and p.read_bytes()[:8] == PNG_MAGIC, p
    logged = {p for p, _ in pipeline.tracker.artifacts}
    assert {p for paths in grids.values() for p in paths} <= logged


def test_controlnet_training_changes_only_controlnet_weights(pipeline: Pipeline) -> None:
    cfg = pipeline.cfg
    assert _files(pipeline.unet) == pipeline.unet_files_before_controlnet  # base UNet run untouched
    ckpt = find_checkpoint(pipeline.controlnet, "final")
    assert ckpt is not None
    weights = {p.stem for p in ckpt.path.glob("*.safetensors")} - {"state"}
    assert weights == {CONTROLNET, CONTROLNET_EMA}  # no copy of the UNet
    fresh = build_controlnet(
        cfg.controlnet, cfg.diffusion, cfg.preprocess.spatial_dims, cfg.autoencoder.network.latent_channels, 5, 2
    )
    trained = ckpt.weights(CONTROLNET)
    assert trained.keys() == fresh.state_dict().keys()
    zero_convs = [k for k in trained if k.startswith("controlnet_") and k.endswith("weight")]
    assert zero_convs and any(bool(trained[k].abs().sum() > 0) for k in zero_convs)  # trained away from zero
    # the optimiser only ever held ControlNet parameters
    n_params = sum(1 for _ in fresh.parameters())
    assert len(ckpt.state["optimizers"]["controlnet"]["param_groups"][0]["params"]) == n_params
    assert ckpt.extras["num_classes"] == 5


@pytest.fixture(scope="module")
def train_only_latents(cache2d: TinyCache, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Latents of the 2D training split alone (no val.npz: validation runs on the training set)."""
    root = tmp_path_factory.mktemp("train_only_latents")
    cfg = cache2d.cfg(autoencoder={"train": {"steps": 2}})
    train_autoencoder(cfg, cache2d.cache_dir, StageContext.create(root / "ae", device="cpu"))
    return encode_split(cfg, cache2d.cache_dir, root / "ae", root / "latents", "train")


@pytest.mark.parametrize("objective", ["epsilon", "v_prediction", "rflow"])
def test_diffusion_loss_falls(objective: str, cache2d: TinyCache, train_only_latents: Path, tmp_path: Path) -> None:
    lat = tmp_path / "latents"
    lat.mkdir()
    shutil.copy(train_only_latents, lat / "train.npz")
    steps = 30
    # cosine: with T=50 the default scaled-linear betas never noise beyond abar=0.7; cosine spans (0, 1)
    cfg = cache2d.cfg(
        diffusion={
            "objective": objective,
            "schedule": "cosine",
            "train": {
                "steps": steps,
                "lr": 5e-3,
                "warmup_steps": 2,
                "ema_decay": None,
                "val_every": 2,
                "val_batches": 3,
                "ckpt_every": 1000,
                "batch_size": 2,
            },
        },
    )
    tracker = RecordingTracker()
    train_diffusion(cfg, lat, StageContext.create(tmp_path / "unet", tracker=tracker, device="cpu"))
    # the validation loss uses the same noise and timesteps at every evaluation: comparable across steps
    val = [v for _, v in tracker.series("unet/val_loss")]
    assert [s for s, _ in tracker.series("unet/val_loss")] == list(range(2, steps + 1, 2))
    assert all(np.isfinite(val))
    first, last = float(np.mean(val[:3])), float(np.mean(val[-3:]))
    assert last < 0.8 * first, f"{objective}: validation loss {val}"
    assert [s for s, _ in tracker.series("unet/train_loss")] == [10, 20, 30]


def test_drop_masks_all_or_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    onehot = one_hot_mask(torch.randint(0, 3, (4, 1, 6, 6)), 3)
    assert torch.equal(drop_masks(onehot, 1.0, g), torch.zeros_like(onehot))
    assert drop_masks(onehot, 0.0, g) is onehot
    half = drop_masks(onehot, 0.5, torch.Generator().manual_seed(3))
    kept = [bool(torch.equal(half[i], onehot[i])) for i in range(4)]
    dropped = [bool((half[i] == 0).all()) for i in range(4)]
    assert all(k != d for k, d in zip(kept, dropped, strict=True))  # each sample kept whole or dropped whole


def test_label_weight_map_exact_values_2d() -> None:
    mask = torch.tensor(
        [
            [1, 1, 0, 0],
            [1, 0, 0, 0],
            [2, 2, 2, 2],
            [0, 0, 2, 2],
        ]
    ).view(1, 1, 4, 4)
    onehot = one_hot_mask(mask, 3)
    w = label_weight_map(onehot, {1: 5.0, 2: 0.0}, factor=2)
    assert w is not None and w.shape == (1, 1, 2, 2)
    # blocks: {1,1,1,0} → 1 + 4·0.75; all 0 → 1; {2,2,0,0} → 1 - 0.5; all 2 → 1 - 1
    assert torch.equal(w, torch.tensor([[[[4.0, 1.0], [0.5, 0.0]]]]))
    assert label_weight_map(onehot, {}, factor=2) is None
    assert torch.equal(label_weight_map(onehot, {7: 9.0}, factor=2), torch.ones(1, 1, 2, 2))  # unknown label
    assert torch.equal(label_weight_map(onehot, {1: 3.0}, factor=1), 1.0 + 2.0 * onehot[:, 1:2])


def test_label_weight_map_exact_values_3d() -> None:
    mask = torch.zeros(1, 1, 2, 2, 4, dtype=torch.long)
    mask[0, 0, 0, 0, 0] = 1  # one voxel of 8 in the first 2x2x2 block
    mask[0, 0, :, :, 2:] = 1  # the whole second block
    w = label_weight_map(one_hot_mask(mask, 2), {1: 9.0}, factor=2)
    assert w is not None and w.shape == (1, 1, 1, 1, 2)
    assert torch.equal(w, torch.tensor([2.0, 9.0]).view(1, 1, 1, 1, 2))

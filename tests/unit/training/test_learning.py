"""The generative stages LEARN on a tiny 2D phantom, and the mask steers the result.

A few dozen steps on 16 x 16 slices (seconds): the autoencoder's validation reconstruction error and
the ControlNet's validation denoising loss (fixed noise and timesteps, so comparable across steps)
fall; the trained ControlNet changes the bare UNet's prediction where the mask is; and classifier-free
guidance moves the images further in the direction the mask moved them (guided - conditional is
aligned with conditional - unconditional).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import load_split
from medsynth.generator import MaskGenerator, load_generator, load_unet
from medsynth.models.controlnet import one_hot_mask
from medsynth.training.autoencoder import train_autoencoder
from medsynth.training.context import StageContext
from medsynth.training.controlnet import train_controlnet
from medsynth.training.diffusion import train_diffusion
from medsynth.training.latents import encode_split, load_latents

from .conftest import RecordingTracker, TinyCache

STEPS = 30


@dataclass(frozen=True)
class Trained:
    """A tiny 2D generator trained here, with the tracker that saw every stage's metrics."""

    cfg: MedsynthConfig
    cache_dir: Path
    root: Path
    tracker: RecordingTracker
    generator: MaskGenerator


@pytest.fixture(scope="module")
def trained(cache2d: TinyCache, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("learning")
    every = {"val_every": 3, "ckpt_every": 1000, "lr": 5e-3, "warmup_steps": 2, "batch_size": 2, "ema_decay": None}
    cfg = cache2d.cfg(
        autoencoder={"train": {**every, "steps": STEPS, "lr": 3e-3, "batch_size": 4, "ema_decay": 0.9}},
        # cosine: with T=50 the default scaled-linear betas never noise beyond abar=0.7; cosine spans (0, 1).
        # A weak base UNet (2 steps): what the mask tells the ControlNet is worth learning.
        diffusion={"schedule": "cosine", "train": {**every, "steps": 2}},
        controlnet={"train": {**every, "steps": STEPS, "val_batches": 3}, "mask_dropout": 0.0},
    )
    tracker = RecordingTracker()

    def ctx(name: str) -> StageContext:
        return StageContext.create(root / name, tracker=tracker, device="cpu")

    train_autoencoder(cfg, cache2d.cache_dir, ctx("ae"))
    for split in ("train", "val"):
        encode_split(cfg, cache2d.cache_dir, root / "ae", root / "latents", split)
    train_diffusion(cfg, root / "latents", ctx("unet"))
    train_controlnet(cfg, root / "latents", root / "unet", ctx("controlnet"))
    gen = load_generator(cfg, root / "ae", root / "unet", root / "controlnet", torch.device("cpu"))
    return Trained(cfg, cache2d.cache_dir, root, tracker, gen)


def _first_last(tracker: RecordingTracker, key: str) -> tuple[float, float]:
    """Mean of the first three and of the last three validation values of ``key`` (every 3 steps)."""
    series = tracker.series(key)
    assert [s for s, _ in series] == list(range(3, STEPS + 1, 3)), series
    values = [v for _, v in series]
    return sum(values[:3]) / 3, sum(values[-3:]) / 3


def test_autoencoder_reconstruction_error_falls(trained: Trained) -> None:
    first, last = _first_last(trained.tracker, "ae/val_l1")
    assert last < 0.8 * first, (first, last)
    psnr_first, psnr_last = _first_last(trained.tracker, "ae/val_psnr")
    assert psnr_last > psnr_first + 1.0, (psnr_first, psnr_last)


def test_controlnet_validation_loss_falls(trained: Trained) -> None:
    first, last = _first_last(trained.tracker, "controlnet/val_loss")
    assert last < 0.93 * first, (first, last)


def test_controlnet_changes_the_bare_unet_where_the_mask_is(trained: Trained) -> None:
    val = load_latents(trained.root / "latents" / "val.npz")
    x = val.latents[:2] * val.scale_factor
    t = torch.full((2,), 25, dtype=torch.long)
    cond = one_hot_mask(val.masks[:2].long(), val.num_classes)
    bare = load_unet(trained.cfg, trained.root / "unet", torch.device("cpu"))
    controlled = trained.generator.denoiser_net
    with torch.no_grad():
        out_bare = bare(x, t)
        out_cn = controlled(x, t, cond)
        # the same latents under a mask with every foreground label removed
        out_empty = controlled(x, t, one_hot_mask(torch.zeros_like(val.masks[:2]).long(), val.num_classes))
    fg = F.max_pool2d((val.masks[:2] > 0).float(), 2) > 0  # foreground at latent resolution (factor 2)
    fg = fg.expand_as(out_bare)
    assert fg.any() and (~fg).any()
    scale = out_bare.abs().mean()
    delta = (out_cn - out_bare).abs()
    assert delta[fg].mean() > 0.02 * scale, (float(delta[fg].mean()), float(scale))  # zero-convs moved
    steer = (out_cn - out_empty).abs()
    assert steer[fg].mean() > 0.02 * scale  # what the mask holds changes the prediction


def test_guidance_moves_images_in_the_direction_of_the_mask(trained: Trained) -> None:
    gen = trained.generator
    sampling = trained.cfg.sampling.model_copy(update={"sampler": "dpmpp", "steps": 10})
    masks = load_split(trained.cache_dir, "val").masks[:2]
    images = {
        w: gen.generate(masks, sampling.model_copy(update={"guidance_scale": w}), seed=3) for w in (0.0, 1.0, 3.0)
    }
    along = (images[1.0] - images[0.0]).flatten()  # what the mask does to the images
    guided = (images[3.0] - images[1.0]).flatten()  # what guidance adds on top
    assert along.abs().mean() > 1e-2 and guided.abs().mean() > 1e-2
    # exactly aligned in latent space for a one-step sampler; the decoder and 10 steps bend it (~0.5 here)
    cos = float(F.cosine_similarity(along, guided, dim=0))
    assert cos > 0.25, cos

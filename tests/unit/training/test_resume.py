"""Interrupted-and-resumed training equals uninterrupted training, bit for bit (raw and EMA weights).

Each stage is trained N steps straight in one run folder, and k < N steps (checkpoint at k) then
resumed to N in another; every saved network of the final checkpoints must be ``torch.equal``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from medsynth.checkpoint import find_checkpoint
from medsynth.config.schema import MedsynthConfig
from medsynth.generator import CONTROLNET, CONTROLNET_EMA, UNET, UNET_EMA
from medsynth.training.autoencoder import AE, AE_EMA, DISC, train_autoencoder
from medsynth.training.context import StageContext
from medsynth.training.controlnet import train_controlnet
from medsynth.training.diffusion import train_diffusion
from medsynth.training.latents import encode_split

N, K = 6, 4  # total steps; interrupted after K (a checkpoint step: ckpt_every=4)


def _opt(steps: int) -> dict[str, object]:
    return {"train": {"steps": steps, "ckpt_every": K, "val_every": 3, "lr": 2e-3, "warmup_steps": 2}}


class _StepCounter:
    """A progress sink counting the optimiser steps a run actually performs."""

    def __init__(self) -> None:
        self.steps = 0

    def advance(self, n: int = 1, info: str = "") -> None:
        self.steps += n


def _ctx(run: Path, resume: bool = False, progress: _StepCounter | None = None) -> StageContext:
    return StageContext.create(run, resume=resume, progress=progress, device="cpu")


def _assert_same_final(a: Path, b: Path, names: list[str]) -> None:
    ca, cb = find_checkpoint(a, "final"), find_checkpoint(b, "final")
    assert ca is not None and cb is not None
    assert ca.step == cb.step == N
    for name in [*names, "state"]:  # "state": optimiser moments and step counters
        wa, wb = ca.weights(name), cb.weights(name)
        assert wa.keys() == wb.keys(), name
        diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not diff, f"{name}: resumed run differs in {len(diff)}/{len(wa)} tensors, e.g. {diff[:3]}"


def _straight_and_resumed(
    tmp_path: Path, train: Callable[[MedsynthConfig, StageContext], object], cfg_for: Callable[[int], MedsynthConfig]
) -> tuple[Path, Path]:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(cfg_for(N), _ctx(straight))
    train(cfg_for(K), _ctx(resumed))
    first = find_checkpoint(resumed)
    assert first is not None and first.step == K
    counter = _StepCounter()
    train(cfg_for(N), _ctx(resumed, resume=True, progress=counter))
    assert counter.steps == N - K  # it continued from the checkpoint rather than starting over
    return straight, resumed


def test_autoencoder_resume_is_exact_with_adversarial_loss(cache2d, tmp_path: Path) -> None:
    def cfg_for(steps: int) -> MedsynthConfig:
        # the adversarial loss switches on at step 2, before the interruption: discriminator state resumes too
        return cache2d.cfg(autoencoder={**_opt(steps), "adv_weight": 0.1, "adv_start": 2})

    straight, resumed = _straight_and_resumed(
        tmp_path, lambda cfg, ctx: train_autoencoder(cfg, cache2d.cache_dir, ctx), cfg_for
    )
    _assert_same_final(straight, resumed, [AE, AE_EMA, DISC])
    ckpt = find_checkpoint(straight, "final")
    assert ckpt is not None and "disc" in ckpt.state["optimizers"]


@pytest.fixture(scope="module")
def latents2d(cache2d, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(autoencoder run, latent folder) of a tiny 2D autoencoder."""
    root = tmp_path_factory.mktemp("resume_latents")
    cfg = cache2d.cfg(autoencoder={"train": {"steps": 2}})
    train_autoencoder(cfg, cache2d.cache_dir, _ctx(root / "ae"))
    for split in ("train", "val"):
        encode_split(cfg, cache2d.cache_dir, root / "ae", root / "latents", split)
    return root / "ae", root / "latents"


def test_diffusion_resume_is_exact(cache2d, latents2d: tuple[Path, Path], tmp_path: Path) -> None:
    _, lat = latents2d
    straight, resumed = _straight_and_resumed(
        tmp_path, lambda cfg, ctx: train_diffusion(cfg, lat, ctx), lambda s: cache2d.cfg(diffusion=_opt(s))
    )
    _assert_same_final(straight, resumed, [UNET, UNET_EMA])


def test_controlnet_resume_is_exact(cache2d, latents2d: tuple[Path, Path], tmp_path: Path) -> None:
    _, lat = latents2d
    unet_run = tmp_path / "unet"
    train_diffusion(cache2d.cfg(diffusion={"train": {"steps": 2}}), lat, _ctx(unet_run))

    def cfg_for(steps: int) -> MedsynthConfig:
        return cache2d.cfg(diffusion={"train": {"steps": 2}}, controlnet={**_opt(steps), "mask_dropout": 0.5})

    straight, resumed = _straight_and_resumed(
        tmp_path, lambda cfg, ctx: train_controlnet(cfg, lat, unet_run, ctx), cfg_for
    )
    _assert_same_final(straight, resumed, [CONTROLNET, CONTROLNET_EMA])

"""ControlNet training throughput: medsynth's step on cached latents vs MONAI's latent-diffusion inferer.

Both trainers train a ControlNet next to the same frozen ``DiffusionModelUNet`` with the same
optimiser (AdamW on the ControlNet only, warm-up schedule, gradient clipping, EMA), mask dropout,
batch order, batch size and precision, on random images and blocky random masks of the config's
spatial size (random-init weights: throughput does not depend on them). They differ where the two
approaches differ:

* **medsynth** (``medsynth/training/controlnet.py``): latents are the autoencoder's *means*, encoded
  once before training (the ``latents`` stage; its one-off cost is reported, not timed per step);
  the ControlNet's conditioning embedding takes the **full-resolution** one-hot mask and downsamples
  it by the autoencoder's factor; loss: label-weighted MSE on the config's objective.
* **MONAI baseline** (``monai.inferers.ControlNetLatentDiffusionInferer``): every batch is encoded by
  the autoencoder (``encode_stage_2_inputs``, a posterior sample, under ``no_grad``) and the mask is
  nearest-resized to the *latent* size, so its ControlNet needs a conditioning embedding without
  stride-2 stages (one stage of the config's last embedding width: cheaper than ours); loss: plain
  MSE to the noise, as in MONAI's tutorials (the target's cost is negligible either way).

Precision is a setting of each row (``train.amp``, :mod:`medsynth.training.precision`): by default the
baseline runs fp32 (what MONAI's tutorials do on a CPU, where their CUDA autocast is a no-op) and
medsynth runs ``--amp bf16``, the documented CPU choice (``controlnet.train.amp: bf16``) on CPUs with
native bf16. Both trainers are also measured at the other precision, so the JSON holds the
equal-precision ratios as well (what the architecture alone buys).

Target: medsynth (``--amp``) >= 1.5x the baseline's (``--baseline-amp``) samples/s.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from monai.inferers import ControlNetLatentDiffusionInferer
from monai.networks.nets.controlnet import ControlNet
from torch import Tensor

from benchmarks.common import (
    BenchmarkError,
    Column,
    Timing,
    add_config_args,
    base_parser,
    load_cfg,
    num_classes_of,
    print_table,
    random_images,
    random_masks,
    ratio,
    run_main,
    setup,
    synchronize,
    verdict,
    write_result,
)
from medsynth.config.schema import MedsynthConfig
from medsynth.generator import build_controlled, latent_channels, latent_spatial_shape, make_objective
from medsynth.models.autoencoder import build_autoencoder, downsample_factor, encode_mean
from medsynth.models.controlnet import fuse_swish, init_controlnet_from_unet, one_hot_mask
from medsynth.models.unet import build_diffusion_unet, encoder_kwargs
from medsynth.training.common import (
    batch_indices,
    make_ema,
    make_optimizer,
    optimizer_step,
    step_generator,
)
from medsynth.training.controlnet import controlnet_loss, drop_masks
from medsynth.training.latents import LatentSet
from medsynth.training.precision import AmpPolicy, policy_for

NAME = "training"
TARGET = 1.5


@dataclass(frozen=True)
class BenchData:
    """The training pool: images and masks at full resolution, and their cached latents.

    Attributes:
        images: ``(N, 1, *S)`` float32 images in ``[0, 1]``.
        masks: ``(N, 1, *S)`` uint8 labels.
        latents: ``(N, C, *S/f)`` unscaled latents (the cache medsynth trains on).
        scale_factor: Latent scale factor (1 / std of the latents).
        encode_seconds: One-off cost of encoding the pool (0 when the latents are random).
    """

    images: Tensor
    masks: Tensor
    latents: Tensor
    scale_factor: float
    encode_seconds: float

    def __len__(self) -> int:
        return int(self.images.shape[0])


def make_data(
    cfg: MedsynthConfig,
    n: int,
    num_classes: int,
    ae: torch.nn.Module | None,
    device: torch.device,
    seed: int = 0,
) -> BenchData:
    """A pool of ``n`` random images/masks of the config's size and their latents.

    Args:
        cfg: Config (image size, latent shape).
        n: Pool size.
        num_classes: Mask classes.
        ae: Autoencoder to encode the latent means with (timed as the one-off cache cost); None: random
            latents of the right shape (what the memory benchmark uses: no autoencoder in memory).
        device: Device of the encoder.
        seed: Seed of the data.

    Returns:
        The :class:`BenchData` (tensors on the CPU, as a loaded cache).
    """
    size = cfg.preprocess.spatial_size
    images, masks = random_images(n, size, seed), random_masks(n, size, num_classes, seed)
    if ae is None:
        g = torch.Generator().manual_seed(seed + 1)
        lat = torch.randn((n, latent_channels(cfg), *latent_spatial_shape(cfg)), generator=g)
        return BenchData(images, masks, lat, 1.0, 0.0)
    t0 = time.perf_counter()
    with torch.no_grad():
        zs = [encode_mean(ae, images[i : i + 16].to(device)).float().cpu() for i in range(0, n, 16)]
    synchronize(device)
    lat = torch.cat(zs)
    return BenchData(images, masks, lat, float(1.0 / lat.std().clamp_min(1e-8)), time.perf_counter() - t0)


class _Trainer:
    """The part both trainers share: optimiser over the ControlNet, warm-up schedule, clipping, EMA, batches."""

    def __init__(
        self,
        cfg: MedsynthConfig,
        cn: torch.nn.Module,
        data: BenchData,
        num_classes: int,
        batch_size: int,
        amp: str | None = None,
    ) -> None:
        self.cfg, self.cn, self.data = cfg, cn, data
        self.num_classes, self.batch_size = num_classes, batch_size
        self.oc = cfg.controlnet.train
        self.device = next(cn.parameters()).device
        self.precision: AmpPolicy = policy_for(self.device, amp or self.oc.amp)
        self.scaler = self.precision.make_scaler()
        self.opt, self.sched = make_optimizer(cn.parameters(), self.oc, self.device)
        self.ema = make_ema(cn, self.oc.ema_decay)
        self.objective = make_objective(cfg, latent_spatial_shape(cfg))
        self.step_index = 0

    def _batch(self) -> tuple[npt.NDArray[np.int64], torch.Generator, Tensor]:
        """This step's indices, generator and full-resolution one-hot masks (as ``train_controlnet``)."""
        idx = batch_indices(len(self.data), self.step_index, self.batch_size, self.oc.seed)
        g = step_generator(self.oc.seed, self.step_index, 0, self.device)
        return idx, g, one_hot_mask(self.data.masks[idx].to(self.device).long(), self.num_classes)

    def _update(self, loss: Tensor) -> None:
        optimizer_step(loss, self.cn, self.opt, self.sched, self.oc.grad_clip, self.ema, self.scaler)
        self.step_index += 1

    def step(self) -> Tensor:
        """One optimiser step; returns the detached loss (no host sync: the stage reads it at log steps)."""
        raise NotImplementedError

    def run(self, n: int) -> None:
        """``n`` optimiser steps."""
        for _ in range(n):
            self.step()


class CachedLatentTrainer(_Trainer):
    """medsynth's ControlNet step (the loop body of ``medsynth.training.controlnet.train_controlnet``).

    Scaled cached latents, the full-resolution one-hot mask (partly dropped for guidance), label
    weights at latent resolution, the objective's denoising loss through the ``ControlledUNet``.
    """

    def __init__(
        self,
        cfg: MedsynthConfig,
        data: BenchData,
        num_classes: int,
        batch_size: int,
        device: torch.device,
        amp: str | None = None,
    ) -> None:
        unet = build_diffusion_unet(cfg.diffusion, cfg.preprocess.spatial_dims, latent_channels(cfg))
        self.model = build_controlled(cfg, unet, num_classes).to(device)
        super().__init__(cfg, self.model.controlnet, data, num_classes, batch_size, amp)
        if self.precision.enabled:  # as train_controlnet does
            fuse_swish(self.model)
        ids = [str(i) for i in range(len(data))]
        self.cache = LatentSet(data.latents, data.masks, data.images, ids, data.scale_factor, num_classes)

    def step(self) -> Tensor:
        """One training step: the loss and update functions ``train_controlnet`` itself calls."""
        idx = batch_indices(len(self.data), self.step_index, self.batch_size, self.oc.seed)
        g = step_generator(self.oc.seed, self.step_index, 0, self.device)
        self.model.train()
        factor = downsample_factor(self.cfg.autoencoder)
        loss = controlnet_loss(
            self.model, self.objective, self.cache, idx, g, self.cfg.controlnet, factor, self.precision
        )
        self._update(loss)
        return loss.detach()


def baseline_embedding_channels(cfg: MedsynthConfig) -> tuple[int]:
    """The baseline ControlNet's embedding: one stage (no stride-2) of the config's last embedding width."""
    return (int(cfg.controlnet.network.conditioning_embedding_num_channels[-1]),)


class InfererTrainer(_Trainer):
    """The MONAI way: ``ControlNetLatentDiffusionInferer`` encodes each batch and resizes the mask to the latent."""

    def __init__(
        self,
        cfg: MedsynthConfig,
        data: BenchData,
        num_classes: int,
        batch_size: int,
        device: torch.device,
        ae: torch.nn.Module,
        amp: str | None = None,
    ) -> None:
        dims = cfg.preprocess.spatial_dims
        self.unet = build_diffusion_unet(cfg.diffusion, dims, latent_channels(cfg)).to(device)
        self.unet.requires_grad_(False).eval()
        cn = ControlNet(
            **encoder_kwargs(cfg.diffusion, dims, latent_channels(cfg)),
            conditioning_embedding_in_channels=num_classes,
            conditioning_embedding_num_channels=baseline_embedding_channels(cfg),
        ).to(device)
        init_controlnet_from_unet(cn, self.unet)
        self.ae = ae.requires_grad_(False).eval()
        super().__init__(cfg, cn, data, num_classes, batch_size, amp)
        self.inferer = ControlNetLatentDiffusionInferer(
            scheduler=self.objective.make_scheduler(), scale_factor=data.scale_factor
        )
        self.latent_shape = tuple(int(s) for s in data.latents.shape[1:])

    def step(self) -> Tensor:
        """One training step through the inferer (MONAI tutorial style)."""
        idx, g, onehot = self._batch()
        images = self.data.images[idx].to(self.device)
        cond = drop_masks(onehot, self.cfg.controlnet.mask_dropout, g)
        noise = torch.randn((len(idx), *self.latent_shape), generator=g, device=self.device)
        t = self.objective.sample_timesteps(noise, g)
        self.cn.train()
        with self.precision.autocast():
            pred = self.inferer(
                inputs=images,
                autoencoder_model=self.ae,
                diffusion_model=self.unet,
                controlnet=self.cn,
                noise=noise,
                timesteps=t,
                cn_cond=cond,
            )
        loss = F.mse_loss(pred.float(), noise.float())
        self._update(loss)
        return loss.detach()


def n_params(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def measure(
    trainers: Sequence[_Trainer], steps: int, warmup: int, rounds: int, device: torch.device
) -> tuple[list[Timing], list[Timing]]:
    """Time ``steps`` steps of each trainer per round, alternating trainers over ``rounds`` rounds.

    Alternating spreads any slow-down from other processes over all trainers. Besides wall-clock
    seconds, the process's CPU seconds are recorded: with one torch thread on a shared CPU they
    exclude the time other processes held the core (a cross-check of the wall-clock ratio).

    Returns:
        ``(wall, cpu)``: one :class:`Timing` per trainer each (seconds of each round's ``steps`` steps).
    """
    for tr in trainers:
        tr.run(warmup)
    synchronize(device)
    wall: list[list[float]] = [[] for _ in trainers]
    cpu: list[list[float]] = [[] for _ in trainers]
    for _ in range(rounds):
        for k, tr in enumerate(trainers):
            t0, c0 = time.perf_counter(), time.process_time()
            tr.run(steps)
            synchronize(device)
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return [Timing(tuple(s), warmup) for s in wall], [Timing(tuple(s), warmup) for s in cpu]


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = base_parser(NAME, __doc__.split("\n\n")[0] if __doc__ else NAME)
    add_config_args(p, "configs/demo.yaml")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's controlnet.train.batch_size")
    p.add_argument("--steps", type=int, default=10, help="timed steps per trainer and round (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per trainer first (default 3)")
    p.add_argument(
        "--rounds", type=int, default=4, help="alternating timed rounds; the median round counts (default 4)"
    )
    p.add_argument("--pool", type=int, default=None, help="items in the data pool (default: 4 batches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--amp",
        default="bf16",
        choices=["auto", "bf16", "fp16", "off"],
        help="medsynth's precision (train.amp; default bf16: the documented CPU choice, bf16 on Ampere+ GPUs)",
    )
    p.add_argument(
        "--baseline-amp",
        default="off",
        choices=["auto", "bf16", "fp16", "off"],
        help="the MONAI baseline's precision (default off: fp32, as MONAI's tutorials run on a CPU)",
    )
    return p


def _body(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    dev = setup(args)
    if min(args.steps, args.rounds) < 1 or args.warmup < 0:
        raise BenchmarkError("--steps and --rounds must be >= 1, --warmup >= 0")
    cfg = load_cfg(args.config, args.overrides)

    k = num_classes_of(cfg)
    bs = args.batch_size or cfg.controlnet.train.batch_size
    torch.manual_seed(args.seed)
    ae = build_autoencoder(cfg.autoencoder, cfg.preprocess.spatial_dims).to(dev).eval()
    data = make_data(cfg, args.pool or 4 * bs, k, ae, dev, args.seed)
    amps = [args.baseline_amp] + ([args.amp] if args.amp != args.baseline_amp else [])
    specs: list[tuple[str, str, _Trainer]] = []
    for amp in amps:  # baseline precision first: row 0 is the baseline
        specs.append(("monai", amp, InfererTrainer(cfg, data, k, bs, dev, ae, amp)))
    for amp in amps:
        specs.append(("medsynth", amp, CachedLatentTrainer(cfg, data, k, bs, dev, amp)))
    wall, cpu = measure([tr for _, _, tr in specs], args.steps, args.warmup, args.rounds, dev)
    per_round = args.steps * bs
    names = {
        "monai": "MONAI ControlNetLatentDiffusionInferer (encodes every batch)",
        "medsynth": "medsynth ControlNet step on cached latents (full-res mask)",
    }
    rows: list[dict[str, Any]] = []
    for (who, amp, tr), t_wall, t_cpu in zip(specs, wall, cpu, strict=True):
        rows.append(
            {
                "trainer": f"{names[who]}, {tr.precision.name}",
                "who": who,
                "amp": amp,
                "precision": tr.precision.name,
                "baseline": not rows,
                "samples_per_s": per_round / t_wall.median,
                "s_per_step": t_wall.median / args.steps,
                "cpu_samples_per_s": per_round / t_cpu.median,
                "controlnet_params": n_params(tr.cn),
                "timing": t_wall.to_json(),
                "cpu_timing": t_cpu.to_json(),
            }
        )
    for row in rows:
        row["ratio"] = ratio(row["samples_per_s"], rows[0]["samples_per_s"])
        row["cpu_ratio"] = ratio(row["cpu_samples_per_s"], rows[0]["cpu_samples_per_s"])

    def pick(who: str, amp: str) -> dict[str, Any]:
        return next(r for r in rows if r["who"] == who and r["amp"] == amp)

    speedup = pick("medsynth", args.amp)["ratio"]
    same_precision = {
        pick("medsynth", amp)["precision"]: ratio(
            pick("medsynth", amp)["samples_per_s"], pick("monai", amp)["samples_per_s"]
        )
        for amp in amps
    }
    passed = None if speedup is None else speedup >= TARGET
    print_table(
        f"ControlNet training throughput ({cfg.name} sizes, {list(cfg.preprocess.spatial_size)}, batch {bs}, {dev})",
        [
            Column("trainer", "trainer"),
            Column("samples_per_s", "samples/s", "{:.1f}"),
            Column("s_per_step", "s/step", "{:.3f}"),
            Column("ratio", "ratio vs baseline", "{:.2f}x"),
            Column("cpu_ratio", "CPU-time ratio", "{:.2f}x"),
            Column("controlnet_params", "ControlNet params", "{:,}"),
        ],
        rows,
    )
    target_text = (
        f"medsynth ({pick('medsynth', args.amp)['precision']}) >= {TARGET}x the MONAI inferer's "
        f"({rows[0]['precision']}) samples/s"
    )
    print(f"target: {target_text}: {verdict(passed)} ({'-' if speedup is None else f'{speedup:.2f}x'})")
    print(
        "equal precision, medsynth / MONAI: "
        + ", ".join(f"{p} {'-' if v is None else f'{v:.2f}x'}" for p, v in same_precision.items())
    )
    print(f"one-off latent cache cost (not per step): {data.encode_seconds:.2f} s for {len(data)} items")
    notes = [
        "medsynth trains on latent means cached once (one-off cost in 'latent_cache_seconds'); the baseline "
        "encodes every batch with the autoencoder (a posterior sample, under no_grad).",
        "medsynth's ControlNet embeds the full-resolution mask with log2(AE factor) stride-2 stages; the "
        "baseline's mask is nearest-resized to the latent by the inferer, so its embedding has one stage "
        f"of width {baseline_embedding_channels(cfg)[0]} (cheaper than medsynth's).",
        "Losses: medsynth label-weighted MSE on the config objective; baseline plain MSE to the noise "
        "(MONAI tutorial); the target's cost is negligible.",
        "Shared: frozen UNet, AdamW on the ControlNet, warm-up schedule, grad clipping, EMA, mask dropout, "
        "batch order, batch size; random-init weights and random data; no per-step host sync in either.",
        f"Precision per row (train.amp): the target compares medsynth at --amp {args.amp} with the baseline at "
        f"--baseline-amp {args.baseline_amp}; 'equal_precision_ratios' compares both at the same precision.",
        "cpu_ratio: the same ratio from process CPU seconds (one torch thread: excludes time other processes "
        "held the core), a cross-check of the wall-clock ratio on a shared machine.",
    ]
    write_result(
        args.out,
        NAME,
        argv,
        dev,
        {
            "config": args.config,
            "overrides": args.overrides,
            "spatial_size": list(cfg.preprocess.spatial_size),
            "batch_size": bs,
            "steps_per_round": args.steps,
            "warmup_steps": args.warmup,
            "rounds": args.rounds,
            "pool": len(data),
            "num_classes": k,
            "amp": args.amp,
            "baseline_amp": args.baseline_amp,
            "objective": cfg.diffusion.objective,
        },
        baseline=f"MONAI ControlNetLatentDiffusionInferer samples/s ({rows[0]['precision']})",
        rows=rows,
        target={"text": target_text, "value": speedup, "threshold": TARGET, "passed": passed},
        notes=notes,
        extra={"latent_cache_seconds": data.encode_seconds, "equal_precision_ratios": same_precision},
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the training benchmark (``python -m benchmarks.training --help``)."""
    return run_main(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())

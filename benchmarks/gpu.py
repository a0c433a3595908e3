"""GPU throughput and peak memory: training (autoencoder, UNet, ControlNet) and 20-step sampling by size and precision.

One command (``make bench-gpu``; under 8 minutes on one GPU) measures, at 2D 128² and 256² (the
networks of ``configs/lgg-2d.yaml``) and 3D 96³ (``configs/hippocampus-3d.yaml``):

* samples/s and peak CUDA memory of one training step of the autoencoder (L1 + KL), the latent
  diffusion UNet and the ControlNet (medsynth's step on cached latents, ``benchmarks.training``), at
  fp32 and at the device's mixed precision (``train.amp: auto``: bf16 on Ampere and newer, fp16 with
  a ``GradScaler`` before; :mod:`medsynth.training.precision`);
* the same ControlNet trained through MONAI's ``ControlNetLatentDiffusionInferer`` (the baseline: it
  encodes every batch) at the same precisions, and the ratio medsynth / MONAI;
* images/s and peak memory of sampling a batch with 20 DPM-Solver++ steps (guided; autoencoder
  decode included) at fp32 and under the mixed-precision autocast.

Random-init weights and random data (throughput does not depend on them); each row: ``--warmup``
untimed steps, then ``--steps`` timed ones (sampling: one untimed and one timed batch; CUDA
synchronised). A row that runs out of memory is reported as ``OOM``. ``--smoke`` runs tiny sizes for
one step per row on any device (the CPU check the test suite runs); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    BenchmarkError,
    Column,
    add_set_arg,
    base_parser,
    load_cfg,
    num_classes_of,
    peak_device_memory_mb,
    print_table,
    random_generator,
    random_images,
    random_masks,
    ratio,
    reset_peak_device_memory,
    run_main,
    setup,
    size_multiple,
    synchronize,
    with_spatial_size,
    write_result,
)
from benchmarks.memory import parse_sizes
from benchmarks.training import CachedLatentTrainer, InfererTrainer, make_data
from medsynth.config.schema import MedsynthConfig
from medsynth.config.stages import SamplingConfig
from medsynth.generator import latent_channels, latent_spatial_shape, make_objective, unconditional
from medsynth.models.autoencoder import build_autoencoder
from medsynth.models.unet import build_diffusion_unet
from medsynth.training.autoencoder import kl_loss
from medsynth.training.common import (
    batch_layout,
    channels_last,
    make_optimizer,
    optimizer_step,
    seeded_global_rng,
    step_generator,
)
from medsynth.training.denoising import bind_cond, denoising_loss
from medsynth.training.precision import AmpPolicy, device_capability, policy_for

NAME = "gpu"
WORKLOADS = ("autoencoder", "unet", "controlnet", "controlnet_monai", "sample")


def _autoencoder_step(cfg: MedsynthConfig, batch: int, dev: torch.device, policy: AmpPolicy) -> Callable[[], None]:
    """One autoencoder training step (L1 + KL, AdamW, clipping) as ``train_autoencoder`` runs it."""
    dims, oc = cfg.preprocess.spatial_dims, cfg.autoencoder.train
    ae = channels_last(build_autoencoder(cfg.autoencoder, dims).to(dev), oc.channels_last, dims)
    opt, _ = make_optimizer(ae.parameters(), oc, dev)
    scaler = policy.make_scaler()
    x = batch_layout(random_images(batch, cfg.preprocess.spatial_size).to(dev), oc.channels_last)
    state = {"step": 0}

    def step() -> None:
        with policy.autocast(), seeded_global_rng(0, state["step"], 0, dev):
            recon, mu, sigma = ae(x)
        loss = F.l1_loss(recon.float(), x) + cfg.autoencoder.kl_weight * kl_loss(mu.float(), sigma.float())
        optimizer_step(loss, ae, opt, None, oc.grad_clip, None, scaler)
        state["step"] += 1

    return step


def _unet_step(cfg: MedsynthConfig, batch: int, dev: torch.device, policy: AmpPolicy) -> Callable[[], None]:
    """One latent diffusion UNet training step as ``train_diffusion`` runs it."""
    dims, oc = cfg.preprocess.spatial_dims, cfg.diffusion.train
    unet = build_diffusion_unet(cfg.diffusion, dims, latent_channels(cfg)).to(dev)
    channels_last(unet, oc.channels_last, dims)
    opt, _ = make_optimizer(unet.parameters(), oc, dev)
    scaler = policy.make_scaler()
    objective = make_objective(cfg, latent_spatial_shape(cfg))
    x0 = torch.randn((batch, latent_channels(cfg), *latent_spatial_shape(cfg)), device=dev)
    x0 = batch_layout(x0, oc.channels_last)
    state = {"step": 0}

    def step() -> None:
        g = step_generator(0, state["step"], 0, dev)
        with policy.autocast():
            loss = denoising_loss(bind_cond(unconditional(unet), None), objective, x0, g)
        optimizer_step(loss, unet, opt, None, oc.grad_clip, None, scaler)
        state["step"] += 1

    return step


def _controlnet_step(cfg: MedsynthConfig, batch: int, dev: torch.device, amp: str, monai: bool) -> Callable[[], None]:
    """One ControlNet step: medsynth's on cached latents, or MONAI's inferer (encodes the batch)."""
    k = num_classes_of(cfg)
    ae = build_autoencoder(cfg.autoencoder, cfg.preprocess.spatial_dims).to(dev).eval() if monai else None
    data = make_data(cfg, batch, k, ae, dev)
    if monai and ae is not None:
        tr: Any = InfererTrainer(cfg, data, k, batch, dev, ae, amp)
    else:
        tr = CachedLatentTrainer(cfg, data, k, batch, dev, amp)

    def step() -> None:
        tr.step()

    return step


def _sample(cfg: MedsynthConfig, batch: int, dev: torch.device, policy: AmpPolicy, steps: int) -> Callable[[], None]:
    """Generate one batch: DPM-Solver++ ``steps`` steps, the config's guidance, autoencoder decode."""
    k = num_classes_of(cfg)
    gen = random_generator(cfg, k, dev)
    masks = random_masks(batch, cfg.preprocess.spatial_size, k)
    sampling = SamplingConfig(
        sampler="dpmpp", steps=steps, guidance_scale=cfg.sampling.guidance_scale, batch_size=batch
    )

    def step() -> None:
        with policy.autocast():
            gen.generate(masks, sampling, seed=0)

    return step


def time_steps(fn: Callable[[], None], warmup: int, steps: int, dev: torch.device) -> tuple[float, float | None]:
    """Seconds per call of ``fn`` after ``warmup`` calls, and peak CUDA MiB during the timed calls."""
    for _ in range(warmup):
        fn()
    synchronize(dev)
    reset_peak_device_memory(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(dev)
    return (time.perf_counter() - t0) / steps, peak_device_memory_mb(dev)


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def measure_row(
    workload: str,
    cfg: MedsynthConfig,
    batch: int,
    dev: torch.device,
    amp: str,
    warmup: int,
    steps: int,
    sample_steps: int,
) -> dict[str, Any]:
    """Build one workload at one size and precision, time it, and free it again.

    Returns:
        ``samples_per_s`` (images/s for ``sample``), ``s_per_step``, ``peak_mb`` (CUDA; None on CPU)
        and ``status`` (``ok``, or ``OOM`` with the numbers None).
    """
    policy = policy_for(dev, amp)
    fn: Callable[[], None] | None = None
    try:
        if workload == "autoencoder":
            fn = _autoencoder_step(cfg, batch, dev, policy)
        elif workload == "unet":
            fn = _unet_step(cfg, batch, dev, policy)
        elif workload in ("controlnet", "controlnet_monai"):
            fn = _controlnet_step(cfg, batch, dev, amp, monai=workload == "controlnet_monai")
        elif workload == "sample":
            fn = _sample(cfg, batch, dev, policy, sample_steps)
        else:
            raise BenchmarkError(f"unknown workload {workload!r}; choose from {WORKLOADS}")
        sampling = workload == "sample"  # a whole batch of sampler steps: one untimed, one timed call
        sec, peak = time_steps(fn, min(warmup, 1) if sampling else warmup, 1 if sampling else steps, dev)
        out = {"status": "ok", "samples_per_s": batch / sec, "s_per_step": sec, "peak_mb": peak}
    except torch.cuda.OutOfMemoryError:
        out = {"status": "OOM", "samples_per_s": None, "s_per_step": None, "peak_mb": None}
    finally:
        fn = None  # drop the networks before the next row
        _free(dev)
    return {**out, "precision": policy.name, "amp": amp, "policy": policy.reason}


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = base_parser(NAME, __doc__.split("\n\n")[0] if __doc__ else NAME)
    p.add_argument("--config-2d", default="configs/lgg-2d.yaml", help="network sizes of the 2D rows")
    p.add_argument("--config-3d", default="configs/hippocampus-3d.yaml", help="network sizes of the 3D rows")
    add_set_arg(p, "config override applied to both configs (repeatable)")
    p.add_argument("--sizes-2d", default="128,256", help='2D sizes ("none": no 2D rows)')
    p.add_argument("--sizes-3d", default="96", help='3D sizes, e.g. "96" or "96x112x96" ("none": no 3D rows)')
    p.add_argument("--batch-2d", type=int, default=16, help="training/sampling batch of the 2D rows")
    p.add_argument("--batch-3d", type=int, default=2, help="training/sampling batch of the 3D rows")
    p.add_argument("--amps", default="off,auto", help="precisions (train.amp values), comma-separated")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per row (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3; cuDNN autotuning)")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps of the sample rows (default 20)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one step per row: checks the code on any device")
    return p


def _body(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    dev = setup(args)
    if args.smoke:
        args.sizes_2d, args.sizes_3d = (
            ("32" if args.sizes_2d == "128,256" else args.sizes_2d),
            ("16" if args.sizes_3d == "96" else args.sizes_3d),
        )
        args.batch_2d, args.batch_3d = min(args.batch_2d, 2), 1
        args.steps, args.warmup, args.sample_steps = 1, 0, 2
        if args.amps == "off,auto":
            args.amps = "off,bf16" if dev.type == "cpu" else "off,auto"
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    amps = [a.strip() for a in args.amps.split(",") if a.strip()]
    if not workloads or any(w not in WORKLOADS for w in workloads):
        raise BenchmarkError(f"--workloads must name some of {WORKLOADS}, got {args.workloads!r}")
    if any(a not in ("auto", "bf16", "fp16", "off") for a in amps):
        raise BenchmarkError(f"--amps takes auto, bf16, fp16, off; got {args.amps!r}")
    groups: list[tuple[MedsynthConfig, list[int], int]] = []
    for config, text, dims, batch in (
        (args.config_2d, args.sizes_2d, 2, args.batch_2d),
        (args.config_3d, args.sizes_3d, 3, args.batch_3d),
    ):
        sizes = parse_sizes(text, dims)
        if not sizes:
            continue
        cfg = load_cfg(config, args.overrides)
        if cfg.preprocess.spatial_dims != dims:
            raise BenchmarkError(f"{config} is a {cfg.preprocess.spatial_dims}D config, used for the {dims}D rows")
        m = size_multiple(cfg)
        for size in sizes:
            if any(v % m for v in size):
                raise BenchmarkError(
                    f"{dims}D size {size} is not a multiple of {m}, which the networks of {config} need"
                )
            groups.append((with_spatial_size(cfg, size), size, batch))

    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for cfg, size, batch in groups:
        for workload in workloads:
            for amp in amps:
                res = measure_row(workload, cfg, batch, dev, amp, args.warmup, args.steps, args.sample_steps)
                row = {
                    "workload": workload,
                    "size": size,
                    "size_text": "x".join(map(str, size)),
                    "dims": len(size),
                    "batch": batch,
                    "baseline": False,
                    **res,
                }
                rows.append(row)
                sps = row["samples_per_s"]
                print(
                    f"  {workload} {row['size_text']} {row['precision']}: "
                    + (f"{sps:.1f}/s" if sps is not None else row["status"]),
                    flush=True,
                )
    for row in rows:  # precision speed-up vs fp32, and medsynth ControlNet vs MONAI's inferer
        same = [r for r in rows if r["workload"] == row["workload"] and r["size"] == row["size"]]
        fp32 = next((r for r in same if r["precision"] == "fp32"), None)
        row["vs_fp32"] = ratio(row["samples_per_s"], fp32["samples_per_s"]) if fp32 else None
        if row["workload"] == "controlnet":
            base = next(
                (
                    r
                    for r in rows
                    if r["workload"] == "controlnet_monai" and r["size"] == row["size"] and r["amp"] == row["amp"]
                ),
                None,
            )
            row["vs_monai"] = ratio(row["samples_per_s"], base["samples_per_s"]) if base else None
    total = time.perf_counter() - t_start
    print_table(
        f"GPU benchmark ({dev}{', smoke' if args.smoke else ''}; {total:.0f} s)",
        [
            Column("workload", "workload"),
            Column("size_text", "size"),
            Column("batch", "batch"),
            Column("precision", "precision"),
            Column("samples_per_s", "samples/s", "{:.1f}"),
            Column("peak_mb", "peak MiB", "{:.0f}"),
            Column("vs_fp32", "vs fp32", "{:.2f}x"),
            Column("vs_monai", "vs MONAI inferer", "{:.2f}x"),
            Column("status", "status"),
        ],
        rows,
    )
    write_result(
        args.out,
        NAME,
        argv,
        dev,
        {
            "config_2d": args.config_2d,
            "config_3d": args.config_3d,
            "overrides": args.overrides,
            "sizes": [r for _, r, _ in groups],
            "batch_2d": args.batch_2d,
            "batch_3d": args.batch_3d,
            "amps": amps,
            "workloads": workloads,
            "steps": args.steps,
            "warmup": args.warmup,
            "sample_steps": args.sample_steps,
            "smoke": args.smoke,
            "capability": device_capability(dev),
        },
        baseline="fp32 of the same workload and size (vs_fp32); MONAI's inferer at the same precision (vs_monai)",
        rows=rows,
        target={"text": "none (informational): GPU figures where a GPU is available", "passed": None},
        notes=[
            "Random-init networks and random data; samples/s = batch / seconds per step (sample rows: images/s of "
            "one batch of --sample-steps guided DPM-Solver++ steps, autoencoder decode included).",
            "peak_mb: torch.cuda.max_memory_allocated during the timed steps (None on CPU).",
            "controlnet_monai: MONAI ControlNetLatentDiffusionInferer encoding every batch (benchmarks.training).",
        ],
        extra={"total_seconds": total},
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the GPU benchmark (``python -m benchmarks.gpu --help``)."""
    return run_main(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory of one ControlNet training step and of sampling one batch, by image size (2D and 3D).

Every measurement runs in a fresh subprocess (``python -m benchmarks.memory --worker SPEC``), so
peaks never mix: on CPU the peak resident set size (``getrusage`` ``ru_maxrss``) of that process, on
CUDA also ``torch.cuda.max_memory_allocated`` around the measured call. Each worker imports the same
modules first (torch, MONAI, the diffusers scheduler, medsynth); the baseline row is a worker that
does only that, so "increment" is the memory the step itself needs.

* train: one step of medsynth's ControlNet training (``benchmarks.training.CachedLatentTrainer``:
  cached latents, full-resolution mask, frozen UNet, AdamW state allocated by the step);
* sample: ``MaskGenerator.generate`` of one batch (config sampler and guidance, ``--sample-steps``
  steps, autoencoder decode included);
* decode: the 3D autoencoder decode of one latent volume at ``--decode-sizes`` (default 64^3 and
  128^3), whole (``ae.decode``) and tiled (``medsynth.models.tiling.decode_latents`` with the 3D
  config's ``autoencoder.tiling`` tile and overlap, tiling forced on). Target: the tiled peak stays
  within 20% from the smallest to the largest size; the tiled volume's deviation from the whole
  decode is measured in this process afterwards (``decode_agreement``).

Sizes: 2D at 64, 128 and 256 with the network sizes of ``configs/demo.yaml``; 3D at the size of
``configs/hippocampus-3d.yaml`` and at 1.5x and 2x it (rounded up to what the networks accept).
Random-init weights and random masks (memory does not depend on them). Growth is reported as the
ratio to the smallest size of the same kind.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.common import (
    BenchmarkError,
    Column,
    add_set_arg,
    apply_threads,
    base_parser,
    emit_json,
    load_cfg,
    num_classes_of,
    peak_device_memory_mb,
    peak_rss_mb,
    print_table,
    random_generator,
    random_masks,
    ratio,
    reset_peak_device_memory,
    resolve_device,
    run_json_subprocess,
    run_main,
    setup,
    size_multiple,
    synchronize,
    verdict,
    with_spatial_size,
    write_result,
)
from medsynth.config.generative import TilingConfig
from medsynth.config.schema import MedsynthConfig
from medsynth.models.autoencoder import build_autoencoder, downsample_factor
from medsynth.models.tiling import decode_latents

NAME = "memory"
KINDS = ("train", "sample", "decode")
DECODE_FLAT = 1.2
"""Target: tiled decode peak memory at the largest size <= this x the smallest."""
WORKER_TIMEOUT_S = 900.0


def import_stack() -> None:
    """Import what every measurement needs (the same in every worker, the idle baseline included)."""
    import monai.networks.nets  # noqa: F401
    from diffusers.schedulers import scheduling_dpmsolver_multistep  # noqa: F401

    import benchmarks.training  # noqa: F401
    import medsynth.generator  # noqa: F401


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in this process (a worker) and return its peaks.

    Args:
        spec: ``kind`` (``idle``, ``train`` or ``sample``), ``device``, ``threads`` and, except for
            ``idle``: ``config``, ``overrides``, ``size``, ``batch_size``, ``sample_steps``.

    Returns:
        ``peak_rss_mb`` (whole process), ``peak_device_mb`` (CUDA, around the measured call; None on
        CPU) and ``seconds`` of the measured call (None for idle).
    """
    kind = spec.get("kind")
    if kind not in ("idle", *KINDS):
        raise BenchmarkError(f"unknown measurement kind {kind!r}; choose from {('idle', *KINDS)}")
    apply_threads(spec.get("threads"))
    dev = resolve_device(spec.get("device", "cpu"))
    import_stack()
    seconds: float | None = None
    if kind != "idle":
        from benchmarks.training import CachedLatentTrainer, make_data
        from medsynth.config.stages import SamplingConfig

        cfg = with_spatial_size(load_cfg(spec["config"], spec.get("overrides", [])), spec["size"])
        k, b = num_classes_of(cfg), int(spec["batch_size"])
        if kind == "decode":
            ae, z, tiling = decode_inputs(cfg, bool(spec.get("tiled")), dev)
            reset_peak_device_memory(dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                decode_latents(ae, z, downsample_factor(cfg.autoencoder), tiling)
        elif kind == "train":
            trainer = CachedLatentTrainer(cfg, make_data(cfg, b, k, None, dev), k, b, dev)
            reset_peak_device_memory(dev)
            t0 = time.perf_counter()
            trainer.step()
        else:
            gen = random_generator(cfg, k, dev)
            masks = random_masks(b, cfg.preprocess.spatial_size, k)
            s = cfg.sampling
            sampling = SamplingConfig(
                sampler=s.sampler, steps=int(spec["sample_steps"]), guidance_scale=s.guidance_scale, batch_size=b
            )
            reset_peak_device_memory(dev)
            t0 = time.perf_counter()
            gen.generate(masks, sampling, seed=0)
        synchronize(dev)
        seconds = time.perf_counter() - t0
    return {"peak_rss_mb": peak_rss_mb(), "peak_device_mb": peak_device_memory_mb(dev), "seconds": seconds}


def decode_inputs(
    cfg: MedsynthConfig, tiled: bool, device: torch.device
) -> tuple[Any, torch.Tensor, TilingConfig | None]:
    """A random-init autoencoder of ``cfg``, one random latent volume of its size, and the tiling (forced on)."""
    from medsynth.generator import latent_channels, latent_spatial_shape

    torch.manual_seed(0)
    ae = build_autoencoder(cfg.autoencoder, cfg.preprocess.spatial_dims).to(device).eval()
    z = torch.randn((1, latent_channels(cfg), *latent_spatial_shape(cfg)), generator=torch.Generator().manual_seed(1))
    tiling = cfg.autoencoder.tiling.model_copy(update={"above_voxels": 0}) if tiled else None
    return ae, z.to(device), tiling


@torch.no_grad()
def decode_agreement(cfg: MedsynthConfig, device: torch.device) -> dict[str, float]:
    """How far the tiled decode of one random latent volume is from the whole-volume decode.

    Returns:
        ``mean_abs`` and ``max_abs`` differences, ``rel_mean_abs`` (mean / std of the whole decode),
        ``correlation`` and ``psnr_db`` (peak: the whole decode's value range).
    """
    ae, z, tiling = decode_inputs(cfg, True, device)
    f = downsample_factor(cfg.autoencoder)
    full = decode_latents(ae, z, f, None).float().cpu()
    tiled = decode_latents(ae, z, f, tiling).float().cpu()
    d = (tiled - full).abs()
    rng = float(full.max() - full.min())
    mse = float(d.pow(2).mean())
    return {
        "mean_abs": float(d.mean()),
        "max_abs": float(d.max()),
        "rel_mean_abs": float(d.mean() / full.std().clamp_min(1e-12)),
        "correlation": float(torch.corrcoef(torch.stack([tiled.flatten(), full.flatten()]))[0, 1]),
        "psnr_db": 10.0 * math.log10(rng**2 / max(mse, 1e-20)),
    }


def parse_sizes(text: str, dims: int) -> list[list[int]]:
    """Sizes from ``"64,128"`` (2D squares) or ``"32x40x32,48x64x48"``; ``""`` or ``"none"`` gives none."""
    if text.strip().lower() in ("", "none"):
        return []
    out = []
    for item in text.split(","):
        parts = [int(v) for v in item.strip().lower().split("x")]
        if len(parts) == 1:
            parts *= dims
        if len(parts) != dims or min(parts) < 1:
            raise BenchmarkError(f"size {item!r} is not a {dims}D size")
        out.append(parts)
    return out


def scaled_sizes(base: Sequence[int], factors: Sequence[float], multiple: int) -> list[list[int]]:
    """``base`` scaled by each factor, each side rounded up to a multiple of ``multiple``."""
    return [[int(math.ceil(s * f / multiple) * multiple) for s in base] for f in factors]


def growth_exponent(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    """``k`` in ``value ~ voxels^k`` from the smallest to the largest row (None when undefined)."""
    ok = [r for r in rows if r.get(key) is not None and r[key] > 0]
    if len(ok) < 2:
        return None
    lo, hi = ok[0], ok[-1]
    if hi["voxels"] == lo["voxels"]:
        return None
    return math.log(hi[key] / lo[key]) / math.log(hi["voxels"] / lo["voxels"])


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = base_parser(NAME, __doc__.split("\n\n")[0] if __doc__ else NAME)
    p.add_argument("--config-2d", default="configs/demo.yaml", help="network sizes of the 2D rows")
    p.add_argument("--config-3d", default="configs/hippocampus-3d.yaml", help="network sizes of the 3D rows")
    add_set_arg(p, "config override applied to both configs (repeatable)")
    p.add_argument("--sizes-2d", default="64,128,256", help='2D sizes, e.g. "64,128,256" ("none": no 2D rows)')
    p.add_argument(
        "--sizes-3d",
        default="auto",
        help='3D sizes, e.g. "32x40x32,48x64x48" (default auto: the 3D config size x1, x1.5, x2; "none": no 3D rows)',
    )
    p.add_argument("--kinds", default="train,sample,decode", help="comma-separated subset of train,sample,decode")
    p.add_argument(
        "--decode-sizes",
        default="64,128",
        help='3D decode sizes, e.g. "64,128" (cubes) or "64x80x64" (--config-3d nets)',
    )
    p.add_argument("--batch-size", type=int, default=4, help="batch of every measurement (default 4)")
    p.add_argument("--sample-steps", type=int, default=3, help="sampler steps of the sample rows (default 3)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def _worker(spec_json: str) -> int:
    emit_json(measure(json.loads(spec_json)))
    return 0


def _body(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        return _worker(args.worker)
    dev = setup(args)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        raise BenchmarkError(f"--kinds must name some of {KINDS}, got {args.kinds!r}")
    groups: list[tuple[int, str, list[list[int]]]] = []
    if (sizes := parse_sizes(args.sizes_2d, 2)) != []:
        groups.append((2, args.config_2d, sizes))
    if args.sizes_3d.strip().lower() == "auto":
        cfg3 = load_cfg(args.config_3d, args.overrides)
        sizes3 = scaled_sizes(cfg3.preprocess.spatial_size, (1.0, 1.5, 2.0), size_multiple(cfg3))
    else:
        sizes3 = parse_sizes(args.sizes_3d, 3)
    if sizes3:
        groups.append((3, args.config_3d, sizes3))
    decode_sizes = parse_sizes(args.decode_sizes, 3) if "decode" in kinds else []
    for dims, config, sizes in groups:  # fail early on a size the networks cannot take
        cfg = load_cfg(config, args.overrides)
        if cfg.preprocess.spatial_dims != dims:
            raise BenchmarkError(f"{config} is a {cfg.preprocess.spatial_dims}D config, used for the {dims}D rows")
        m = size_multiple(cfg)
        bad = [s for s in sizes if any(v % m for v in s)]
        if bad:
            raise BenchmarkError(f"{dims}D sizes {bad} are not multiples of {m}, which the networks of {config} need")
    common = {"device": args.device, "threads": args.threads}

    def run(spec: dict[str, Any]) -> dict[str, Any]:
        return run_json_subprocess("benchmarks.memory", ["--worker", json.dumps({**common, **spec})], WORKER_TIMEOUT_S)

    idle = run({"kind": "idle"})
    rows: list[dict[str, Any]] = [
        {
            "measurement": "idle (torch, MONAI, diffusers scheduler, medsynth imported)",
            "kind": "idle",
            "baseline": True,
            "peak_rss_mb": idle["peak_rss_mb"],
            "increment_mb": 0.0,
            "peak_device_mb": idle["peak_device_mb"],
        }
    ]
    growth: dict[str, dict[str, float | None]] = {}
    plan: list[tuple[str, int, str, list[list[int]], bool]] = []
    for kind in kinds:
        if kind == "decode":
            plan += [("decode", 3, args.config_3d, decode_sizes, tiled) for tiled in (False, True) if decode_sizes]
        else:
            plan += [(kind, dims, config, sizes, False) for dims, config, sizes in groups]
    for kind, dims, config, sizes, tiled in plan:
        group_rows = []
        label = f"{kind}{' tiled' if tiled else (' whole' if kind == 'decode' else '')}"
        for size in sizes:
            res = run(
                {
                    "kind": kind,
                    "config": config,
                    "overrides": args.overrides,
                    "size": size,
                    "batch_size": 1 if kind == "decode" else args.batch_size,
                    "sample_steps": args.sample_steps,
                    "tiled": tiled,
                }
            )
            print(f"  {label} {dims}D {'x'.join(map(str, size))}: peak RSS {res['peak_rss_mb']:.0f} MiB", flush=True)
            group_rows.append(
                {
                    "measurement": f"{label} {dims}D {'x'.join(map(str, size))}",
                    "kind": kind,
                    "tiled": tiled,
                    "baseline": False,
                    "dims": dims,
                    "size": size,
                    "voxels": math.prod(size),
                    "config": config,
                    "peak_rss_mb": res["peak_rss_mb"],
                    "increment_mb": res["peak_rss_mb"] - idle["peak_rss_mb"],
                    "peak_device_mb": res["peak_device_mb"],
                    "seconds": res["seconds"],
                }
            )
        first = group_rows[0]
        for r in group_rows:
            r["voxel_ratio"] = ratio(r["voxels"], first["voxels"])
            r["peak_ratio"] = ratio(r["peak_rss_mb"], first["peak_rss_mb"])
            r["increment_ratio"] = ratio(r["increment_mb"], first["increment_mb"])
            r["device_ratio"] = ratio(r["peak_device_mb"], first["peak_device_mb"])
        growth[f"{label} {dims}D"] = {
            "increment_exponent": growth_exponent(group_rows, "increment_mb"),
            "device_exponent": growth_exponent(group_rows, "peak_device_mb"),
        }
        rows += group_rows
    columns = [
        Column("measurement", "measurement"),
        Column("peak_rss_mb", "peak RSS MiB", "{:.0f}"),
        Column("increment_mb", "+ over idle MiB", "{:.0f}"),
        Column("voxel_ratio", "voxels vs smallest", "{:.1f}x"),
        Column("peak_ratio", "peak vs smallest", "{:.2f}x"),
        Column("increment_ratio", "increment vs smallest", "{:.2f}x"),
        Column("seconds", "s", "{:.2f}"),
    ]
    if dev.type == "cuda":
        columns[3:3] = [
            Column("peak_device_mb", "peak CUDA MiB", "{:.0f}"),
            Column("device_ratio", "CUDA vs smallest", "{:.2f}x"),
        ]
    print_table(
        f"Peak memory (batch {args.batch_size}, decode batch 1, {dev}; one fresh process per row)", columns, rows
    )
    for name, g in growth.items():
        e = g["device_exponent"] if dev.type == "cuda" else g["increment_exponent"]
        what = "CUDA peak" if dev.type == "cuda" else "RSS increment"
        print(f"{name}: {what} grows ~ voxels^{'-' if e is None else f'{e:.2f}'} over the sizes measured")
    target: dict[str, Any] = {"text": "none (informational): how peak memory grows with size", "passed": None}
    agreement: dict[str, Any] = {}
    tiled_rows = [r for r in rows if r.get("kind") == "decode" and r.get("tiled")]
    if len(tiled_rows) >= 2:
        peak_key = "peak_device_mb" if dev.type == "cuda" else "peak_rss_mb"
        flat = ratio(tiled_rows[-1][peak_key], tiled_rows[0][peak_key])
        sizes_txt = f"{'x'.join(map(str, tiled_rows[0]['size']))} to {'x'.join(map(str, tiled_rows[-1]['size']))}"
        target = {
            "text": f"tiled decode peak ({'CUDA' if dev.type == 'cuda' else 'RSS'}) "
            f"within {DECODE_FLAT:.1f}x from {sizes_txt}",
            "value": flat,
            "threshold": DECODE_FLAT,
            "passed": None if flat is None else flat <= DECODE_FLAT,
        }
        print(f"target: {target['text']}: {verdict(target['passed'])} ({'-' if flat is None else f'{flat:.2f}x'})")
        cfg3 = load_cfg(args.config_3d, args.overrides)
        for size in decode_sizes:
            agreement["x".join(map(str, size))] = a = decode_agreement(with_spatial_size(cfg3, size), dev)
            print(
                f"tiled vs whole decode {'x'.join(map(str, size))}: mean |diff| {a['mean_abs']:.4f} "
                f"({a['rel_mean_abs']:.1%} of the image std), max {a['max_abs']:.3f}, r {a['correlation']:.3f}, "
                f"PSNR {a['psnr_db']:.1f} dB"
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
            "kinds": kinds,
            "sizes": {f"{d}D": s for d, _, s in groups},
            "batch_size": args.batch_size,
            "sample_steps": args.sample_steps,
            "decode_sizes": decode_sizes,
        },
        baseline="idle worker process (same imports, nothing computed); ratios are vs the smallest size of a kind",
        rows=rows,
        target=target,
        notes=[
            "CPU peaks are whole-process ru_maxrss (imports and weights included); 'increment' subtracts "
            "the idle worker's peak.",
            "Training rows use random cached latents (no autoencoder in memory, as in the real stage); "
            "sampling rows include the autoencoder decode.",
            "Decode rows: batch 1, random-init 3D autoencoder of --config-3d, whole vs tiled (the config's "
            "autoencoder.tiling tile/overlap/mode, forced on). Tiled output is approximate (GroupNorm statistics "
            "per tile); decode_agreement measures it on random-init weights (no learned locality: a hard case).",
        ],
        extra={"growth": growth, "decode_agreement": agreement},
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the memory benchmark (``python -m benchmarks.memory --help``)."""
    return run_main(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory of one ControlNet training step and of sampling one batch, by image size (2D and 3D).

Every measurement runs in a fresh subprocess (``python -m benchmarks.memory --worker SPEC``), so
peaks never mix: on CPU the peak resident set size (``getrusage`` ``ru_maxrss``) of that process, on
CUDA also ``torch.cuda.max_memory_allocated`` around the measured call. Each worker imports the same
modules first (torch, MONAI, the diffusers scheduler, medsynth); the baseline row is a worker that
does only that, so "increment" is the memory the step itself needs.

* train: one step of medsynth's ControlNet training (``benchmarks.training.CachedLatentTrainer``:
  cached latents, full-resolution mask, frozen UNet, AdamW state allocated by the step);
* sample: ``MaskGenerator.generate`` of one batch (config sampler and guidance, ``--sample-steps``
  steps, autoencoder decode included).

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
    with_spatial_size,
    write_result,
)

NAME = "memory"
KINDS = ("train", "sample")
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
        if kind == "train":
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
    p.add_argument("--kinds", default="train,sample", help="comma-separated subset of train,sample")
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
    for kind in kinds:
        for dims, config, sizes in groups:
            group_rows = []
            for size in sizes:
                res = run(
                    {
                        "kind": kind,
                        "config": config,
                        "overrides": args.overrides,
                        "size": size,
                        "batch_size": args.batch_size,
                        "sample_steps": args.sample_steps,
                    }
                )
                print(f"  {kind} {dims}D {'x'.join(map(str, size))}: peak RSS {res['peak_rss_mb']:.0f} MiB", flush=True)
                group_rows.append(
                    {
                        "measurement": f"{kind} {dims}D {'x'.join(map(str, size))}",
                        "kind": kind,
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
            growth[f"{kind} {dims}D"] = {
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
    print_table(f"Peak memory (batch {args.batch_size}, {dev}; one fresh process per row)", columns, rows)
    for name, g in growth.items():
        e = g["device_exponent"] if dev.type == "cuda" else g["increment_exponent"]
        what = "CUDA peak" if dev.type == "cuda" else "RSS increment"
        print(f"{name}: {what} grows ~ voxels^{'-' if e is None else f'{e:.2f}'} over the sizes measured")
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
        },
        baseline="idle worker process (same imports, nothing computed); ratios are vs the smallest size of a kind",
        rows=rows,
        target={"text": "none (informational): how peak memory grows with size", "passed": None},
        notes=[
            "CPU peaks are whole-process ru_maxrss (imports and weights included); 'increment' subtracts "
            "the idle worker's peak.",
            "Training rows use random cached latents (no autoencoder in memory, as in the real stage); "
            "sampling rows include the autoencoder decode.",
        ],
        extra={"growth": growth},
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the memory benchmark (``python -m benchmarks.memory --help``)."""
    return run_main(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())

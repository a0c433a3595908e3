"""Sampler cost and quality: network evaluations, wall time and plausibility Dice vs DDPM-1000.

Loads a trained generator (autoencoder, diffusion UNet, ControlNet) and the reference segmenter from
a config's stage outputs (``<output_dir>/<name>/{autoencoder,unet,controlnet,segmenter}``, final
checkpoints, as ``medsynth validate`` does), takes the first ``--n-masks`` masks of the test split
and generates one image per mask with each sampler, the same seeds for every row:

* DDPM with ``--ddpm-steps`` (default 1000) ancestral steps: the baseline, what MONAI's tutorials use;
* DDIM 50, DPM-Solver++ (2M) 10 and 20;
* rectified-flow Euler 10/20/30, only for a model trained with the ``rflow`` objective. For such a
  model the DDPM-family rows are ``n/a`` and the baseline is Euler with ``--ddpm-steps`` steps.

Per row: network evaluations per image (the denoiser is wrapped in ``CountingDenoiser``, so
classifier-free guidance counts two per step), wall time (decode included), both as ratios to the
baseline, and the reference segmenter's mean foreground Dice on the synthetic images against their
conditioning masks (``medsynth.evaluation.segmenter.validation_dice``), also relative to the
baseline's. Target: >= 30x fewer evaluations than the baseline at >= 98% of its Dice.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.common import (
    BenchmarkError,
    Column,
    add_config_args,
    base_parser,
    load_cfg,
    print_table,
    ratio,
    run_main,
    setup,
    synchronize,
    verdict,
    write_result,
)
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet
from medsynth.diffusion.denoiser import CountingDenoiser, Denoiser
from medsynth.generator import MaskGenerator

NAME = "sampling"
NFE_TARGET = 30.0
DICE_TARGET = 0.98


@dataclass
class CountingGenerator(MaskGenerator):
    """A :class:`MaskGenerator` whose every denoiser is wrapped in a :class:`CountingDenoiser`.

    The wrapper sits inside classifier-free guidance (``generate`` wraps what :meth:`denoiser`
    returns), so a guided step counts two network evaluations.

    Attributes:
        counters: One counter per ``generate`` call.
    """

    counters: list[CountingDenoiser] = field(default_factory=list)

    @classmethod
    def wrap(cls, gen: MaskGenerator) -> CountingGenerator:
        """A counting copy of ``gen`` (same networks, no copies of weights)."""
        return cls(**{f.name: getattr(gen, f.name) for f in dataclasses.fields(MaskGenerator)})

    def denoiser(self) -> Denoiser:
        """The generator's denoiser, counted."""
        counter = CountingDenoiser(super().denoiser())
        self.counters.append(counter)
        return counter

    @property
    def calls(self) -> int:
        """Network evaluations over every ``generate`` call so far."""
        return sum(c.calls for c in self.counters)


@dataclass(frozen=True)
class SamplerSpec:
    """One row: a sampler and its number of steps."""

    sampler: str
    steps: int
    baseline: bool = False

    @property
    def label(self) -> str:
        """Row label, e.g. ``dpmpp-20``."""
        return f"{self.sampler}-{self.steps}"


def sampler_specs(objective: str, ddpm_steps: int) -> list[SamplerSpec]:
    """The rows for a model trained with ``objective``: the baseline first.

    DDPM-family models: DDPM ``ddpm_steps`` (baseline), DDIM 50, DPM-Solver++ 10 and 20, then the
    rectified-flow rows (reported n/a). Rectified-flow models: Euler ``ddpm_steps`` (baseline), the
    DDPM-family rows (n/a), Euler 10, 20 and 30.
    """
    ddpm_family = [SamplerSpec("ddim", 50), SamplerSpec("dpmpp", 10), SamplerSpec("dpmpp", 20)]
    rflow = [SamplerSpec("rflow_euler", n) for n in (10, 20, 30)]
    if objective == "rflow":
        baseline = SamplerSpec("rflow_euler", ddpm_steps, baseline=True)
        return [baseline, SamplerSpec("ddpm", ddpm_steps), *ddpm_family, *rflow]
    return [SamplerSpec("ddpm", ddpm_steps, baseline=True), *ddpm_family, *rflow]


def not_applicable(spec: SamplerSpec, objective: str, num_train_timesteps: int) -> str | None:
    """Why ``spec`` cannot run on a model (None when it can)."""
    if (spec.sampler == "rflow_euler") != (objective == "rflow"):
        return f"n/a: model trained with {objective}"
    if not 1 <= spec.steps <= num_train_timesteps:
        return f"n/a: {spec.steps} steps > {num_train_timesteps} training timesteps"
    return None


def mean_foreground_dice(seg: torch.nn.Module, data: ArraySet, images: torch.Tensor, batch: int) -> dict[str, float]:
    """The segmenter's mean foreground Dice on ``images`` against ``data``'s masks (per label and mean).

    Uses ``medsynth.evaluation.segmenter.validation_dice``: per label, the mean over the cases whose
    mask holds it, then the mean over labels (``val_dice``).
    """
    from medsynth.evaluation.segmenter import validation_dice

    return validation_dice(seg, dataclasses.replace(data, images=images), batch, data.labels)


def run_rows(
    gen: MaskGenerator,
    seg: torch.nn.Module,
    data: ArraySet,
    cfg: MedsynthConfig,
    specs: Sequence[SamplerSpec],
    seed: int = 0,
    batch_size: int | None = None,
    guidance_scale: float | None = None,
    warmup: bool = True,
) -> list[dict[str, Any]]:
    """Generate an image per mask of ``data`` with each sampler and measure it.

    Args:
        gen: The generator (trained, or random for a smoke test).
        seg: Reference segmenter (``predict``-compatible).
        data: Conditioning masks (their real images are used only for the segmenter's own Dice).
        cfg: Config (sampling defaults, objective).
        specs: Rows, the baseline among them (first by convention).
        seed: Base seed; batch ``i`` uses ``seed + i`` in every row (``validate.generate_for``).
        batch_size: Masks per generate call (default ``cfg.sampling.batch_size``).
        guidance_scale: Classifier-free guidance (default ``cfg.sampling.guidance_scale``).
        warmup: Run one short untimed sampling call first (allocator, lazy imports).

    Returns:
        One dict per spec: ``sampler``, ``steps``, ``label``, ``baseline``, ``status`` (``ok`` or the
        n/a reason), ``nfe`` (evaluations per image), ``nfe_total``, ``seconds``, ``nfe_ratio``
        (baseline NFE / row NFE), ``speedup`` (baseline seconds / row seconds), ``dice``,
        ``dice_per_label``, ``dice_rel`` (row / baseline).
    """
    from medsynth.config.stages import SamplingConfig
    from medsynth.evaluation.validate import generate_for

    objective = gen.objective.name
    base_sampling = cfg.sampling
    bs = batch_size or base_sampling.batch_size
    gs = base_sampling.guidance_scale if guidance_scale is None else guidance_scale
    n_batches = -(-len(data) // bs)

    def sampling_cfg(spec: SamplerSpec) -> MedsynthConfig:
        s = SamplingConfig(sampler=spec.sampler, steps=spec.steps, guidance_scale=gs, eta=0.0, batch_size=bs)
        return cfg.model_copy(update={"sampling": s})

    if warmup:
        runnable = [s for s in specs if not_applicable(s, objective, gen.objective.num_train_timesteps) is None]
        if runnable:
            short = dataclasses.replace(runnable[-1], steps=min(2, runnable[-1].steps))
            generate_for(gen, data.masks[:1], sampling_cfg(short), seed=seed)
    rows: list[dict[str, Any]] = []
    for spec in specs:
        row: dict[str, Any] = {"sampler": spec.sampler, "steps": spec.steps, "label": spec.label}
        row["baseline"] = spec.baseline
        reason = not_applicable(spec, objective, gen.objective.num_train_timesteps)
        if reason is not None:
            rows.append({**row, "status": reason})
            continue
        counted = CountingGenerator.wrap(gen)
        synchronize(gen.device)
        t0 = time.perf_counter()
        synth = generate_for(counted, data.masks, sampling_cfg(spec), seed=seed)
        synchronize(gen.device)
        seconds = time.perf_counter() - t0
        dice = mean_foreground_dice(seg, data, synth, bs)
        rows.append(
            {
                **row,
                "status": "ok",
                "nfe": counted.calls / n_batches,
                "nfe_total": counted.calls,
                "seconds": seconds,
                "ms_per_image": 1000.0 * seconds / len(data),
                "dice": dice["val_dice"],
                "dice_per_label": {k.removeprefix("val_dice_"): v for k, v in dice.items() if k != "val_dice"},
            }
        )
    base = next((r for r in rows if r["baseline"] and r["status"] == "ok"), None)
    for r in rows:
        if r["status"] != "ok":
            continue
        r["nfe_ratio"] = ratio(base["nfe"], r["nfe"]) if base else None
        r["speedup"] = ratio(base["seconds"], r["seconds"]) if base else None
        r["dice_rel"] = ratio(r["dice"], base["dice"]) if base else None
    return rows


def target_met(rows: Sequence[dict[str, Any]]) -> tuple[bool | None, list[str]]:
    """Whether some non-baseline row has >= 30x fewer evaluations at >= 98% of the baseline's Dice.

    Returns:
        ``(passed, labels of the rows that meet it)``; passed is None when the baseline has no Dice.
    """
    base = next((r for r in rows if r["baseline"]), None)
    if base is None or base.get("status") != "ok" or base.get("dice") is None or base["dice"] != base["dice"]:
        return None, []
    ok = [
        r["label"]
        for r in rows
        if not r["baseline"]
        and r.get("status") == "ok"
        and (r.get("nfe_ratio") or 0.0) >= NFE_TARGET
        and (r.get("dice_rel") or 0.0) >= DICE_TARGET
    ]
    return bool(ok), ok


def load_trained(cfg: MedsynthConfig, config_arg: str, device: torch.device) -> tuple[MaskGenerator, torch.nn.Module]:
    """The trained generator and reference segmenter of a config's stage outputs.

    Raises:
        BenchmarkError: If a final checkpoint or the preprocessing cache is missing (run the pipeline first).
    """
    from medsynth.checkpoint import find_checkpoint
    from medsynth.evaluation.segmenter import load_segmenter
    from medsynth.generator import load_generator
    from medsynth.pipeline.runner import stage_root

    root = stage_root(cfg)
    p = SimpleNamespace(**{n: root / n for n in ("preprocess", "autoencoder", "unet", "controlnet", "segmenter")})
    missing = [
        f"no final checkpoint in {d}"
        for d in (p.autoencoder, p.unet, p.controlnet, p.segmenter)
        if find_checkpoint(d, "final") is None
    ]
    if not (p.preprocess / "manifest.json").is_file():
        missing.insert(0, f"no {p.preprocess / 'manifest.json'}")
    if missing:
        raise BenchmarkError(
            f"trained outputs of {config_arg} are missing ({'; '.join(missing)}): run `medsynth run {config_arg}` first"
        )
    gen = load_generator(cfg, p.autoencoder, p.unet, p.controlnet, device)
    return gen, load_segmenter(cfg, p.segmenter, device)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = base_parser(NAME, __doc__.split("\n\n")[0] if __doc__ else NAME)
    add_config_args(p, "configs/demo.yaml", what="trained stage outputs")
    p.add_argument("--n-masks", type=int, default=32, help="test-split masks sampled per row (default 32)")
    p.add_argument("--ddpm-steps", type=int, default=1000, help="steps of the baseline sampler (default 1000)")
    p.add_argument("--batch-size", type=int, default=None, help="masks per batch (default: sampling.batch_size)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: sampling.guidance_scale")
    p.add_argument("--seed", type=int, default=0, help="base seed, the same in every row")
    return p


def _body(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    dev = setup(args)
    if args.n_masks < 1 or args.ddpm_steps < 1:
        raise BenchmarkError("--n-masks and --ddpm-steps must be >= 1")
    cfg = load_cfg(args.config, args.overrides)
    gen, seg = load_trained(cfg, args.config, dev)
    from medsynth.data.dataset import load_split
    from medsynth.pipeline.runner import stage_root

    data = load_split((stage_root(cfg) / "preprocess"), "test", max_items=args.n_masks)
    specs = sampler_specs(gen.objective.name, args.ddpm_steps)
    real_dice = mean_foreground_dice(seg, data, data.images, args.batch_size or cfg.sampling.batch_size)
    rows = run_rows(gen, seg, data, cfg, specs, args.seed, args.batch_size, args.guidance_scale)
    passed, meeting = target_met(rows)
    if len(data) < args.n_masks:
        print(f"note: the test split holds only {len(data)} masks (asked for {args.n_masks})")
    base_label = specs[0].label
    print_table(
        f"Samplers vs {base_label} ({cfg.name}, {len(data)} test masks, {dev}; "
        f"segmenter Dice on the real images {real_dice['val_dice']:.3f})",
        [
            Column("label", "sampler"),
            Column("status", "status"),
            Column("nfe", "NFE/image", "{:.0f}"),
            Column("nfe_ratio", f"NFE ratio ({base_label}/row)", "{:.1f}x"),
            Column("seconds", "wall s", "{:.1f}"),
            Column("speedup", "speed-up", "{:.1f}x"),
            Column("dice", "Dice", "{:.3f}"),
            Column("dice_rel", "Dice / baseline", "{:.3f}"),
        ],
        rows,
    )
    target_text = f">= {NFE_TARGET:.0f}x fewer NFE than {base_label} at >= {DICE_TARGET:.0%} of its Dice"
    detail = f"rows meeting it: {', '.join(meeting)}" if meeting else "no row meets it"
    print(f"target: {target_text}: {verdict(passed)} ({detail})")
    gs = cfg.sampling.guidance_scale if args.guidance_scale is None else args.guidance_scale
    write_result(
        args.out,
        NAME,
        argv,
        dev,
        {
            "config": args.config,
            "overrides": args.overrides,
            "n_masks": len(data),
            "n_masks_requested": args.n_masks,
            "ddpm_steps": args.ddpm_steps,
            "batch_size": args.batch_size or cfg.sampling.batch_size,
            "guidance_scale": gs,
            "seed": args.seed,
            "objective": gen.objective.name,
            "num_train_timesteps": gen.objective.num_train_timesteps,
        },
        baseline=f"{base_label} (NFE, wall time and Dice ratios are relative to it)",
        rows=rows,
        target={"text": target_text, "passed": passed, "rows_meeting": meeting},
        notes=[
            "NFE counts calls of the network (CountingDenoiser inside guidance): a guided step costs 2.",
            "Wall time includes the autoencoder decode; Dice: reference segmenter trained on real data, "
            "mean over foreground labels of the mean over masks holding the label.",
            "Dice from few masks is noisy: judge the 98% criterion with --n-masks large enough.",
        ],
        extra={"segmenter_dice_real": real_dice},
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sampling benchmark (``python -m benchmarks.sampling --help``)."""
    return run_main(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())

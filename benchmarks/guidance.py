"""Classifier-free guidance sweep: does the structure appear where the mask says, and nowhere else?

Loads a trained generator and the reference segmenter from a config's stage outputs (as
``benchmarks.sampling`` does) and, for each guidance scale, generates one image per test-split mask
of two sets, the same seeds for every scale:

* ``--n-masks`` masks that hold the structure (``--label``; at least ``--min-voxels`` of it), spread
  over the split;
* ``--n-free`` masks that lack it (with at least half the median reference area of the first set, so
  near-empty edge slices do not count).

Per scale it measures, next to the same numbers on the real images of those masks:

* **contrast**: mean intensity inside the structure minus the mean of the reference region
  (:func:`medsynth.evaluation.metrics.label_contrast`; the derived label, e.g. the brain, when the
  config has one, else the rest of the foreground) — is the structure *visible* where the mask says;
* **Dice** of the reference segmenter for the structure against the conditioning mask, and its
  **false-positive rate** on the masks lacking it (:func:`medsynth.evaluation.plausibility.plausibility_report`,
  patient-bootstrap CIs) — is it recognisable there, and drawn nowhere else;
* network evaluations per image and wall time relative to guidance 1.0 (no guidance: one network
  evaluation per step; any other scale costs two).

The measurement is the library's (:mod:`medsynth.evaluation.calibration`, which also chooses the
scale on the validation split when ``sampling.guidance_scale`` is ``"auto"``); this benchmark runs it on
the test split with costs. No target; a grid (mask | real | each scale) is written next to the JSON,
and the row the calibration rule would choose is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    RESULTS_DIR,
    BenchmarkError,
    Column,
    add_config_args,
    base_parser,
    load_cfg,
    print_table,
    run_main,
    setup,
    write_result,
)
from benchmarks.sampling import CountingGenerator, load_trained
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet
from medsynth.errors import DataError
from medsynth.evaluation import calibration
from medsynth.evaluation.validate import contrast_reference, lesion_label
from medsynth.generator import MaskGenerator

NAME = "guidance"
DEFAULT_SCALES = (1.0, 1.5, 3.0, 5.0, 7.0)


def select_masks(
    data: ArraySet, label: int, n_with: int, n_free: int, min_voxels: int, reference: Sequence[int] | None
) -> tuple[ArraySet, ArraySet]:
    """:func:`medsynth.evaluation.calibration.select_masks`, with a benchmark error when nothing fits."""
    try:
        return calibration.select_masks(data, label, n_with, n_free, min_voxels, reference)
    except DataError as exc:
        raise BenchmarkError(str(exc)) from exc


def sweep(
    gen: MaskGenerator,
    seg: torch.nn.Module,
    data: ArraySet,
    cfg: MedsynthConfig,
    scales: Sequence[float],
    label: int,
    reference: Sequence[int] | None,
    seed: int = 0,
    n_boot: int = 200,
) -> tuple[list[dict[str, Any]], dict[float, torch.Tensor]]:
    """The library's sweep (:func:`medsynth.evaluation.calibration.sweep_guidance`, one definition of
    every measurement) with network evaluations counted per image (``nfe``)."""
    return calibration.sweep_guidance(
        gen, seg, data, cfg, scales, label, reference, seed, n_boot, CountingGenerator.wrap
    )


def save_sweep_grid(path: Path, data: ArraySet, images: dict[float, torch.Tensor], label: int, n_rows: int = 6) -> Path:
    """A PNG: per row a mask holding the structure (overlay on the real image), the real image, each scale."""
    from medsynth.viz import overlay_rgb, save_grid, to_2d

    holding = [i for i in range(len(data)) if bool((data.masks[i] == label).any())]
    pick = [holding[int(j)] for j in np.linspace(0, len(holding) - 1, min(n_rows, len(holding))).round()]
    rows = []
    for i in pick:
        real = to_2d(data.images[i, 0].numpy())
        panels = [overlay_rgb(real, to_2d(data.masks[i, 0].numpy())), real]
        panels += [to_2d(images[g][i, 0].numpy()) for g in images]
        rows.append(panels)
    cols = ["mask", "real", *[f"guidance {g:g}" for g in images]]
    return save_grid(path, rows, titles=[data.item_ids[i][-24:] for i in pick], col_titles=cols)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = base_parser(NAME, __doc__.split("\n\n")[0] if __doc__ else NAME)
    add_config_args(p, "configs/lgg-2d.yaml", "trained stage outputs")
    p.add_argument("--scales", default=",".join(f"{s:g}" for s in DEFAULT_SCALES), help="comma-separated scales")
    p.add_argument(
        "--label", type=int, default=None, help="structure (default: medsynth.evaluation.validate.lesion_label)"
    )
    p.add_argument("--n-masks", type=int, default=48, help="test masks holding the structure (default 48)")
    p.add_argument("--n-free", type=int, default=32, help="test masks lacking it (default 32)")
    p.add_argument("--min-voxels", type=int, default=20, help="smallest structure counted (default 20 voxels)")
    p.add_argument("--seed", type=int, default=0, help="base seed, the same at every scale")
    return p


def _body(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    dev = setup(args)
    try:
        scales = [float(s) for s in args.scales.split(",") if s.strip()]
    except ValueError as exc:
        raise BenchmarkError(f"--scales must be comma-separated numbers, got {args.scales!r}") from exc
    if not scales or min(scales) < 1.0:
        raise BenchmarkError("--scales needs at least one scale, each >= 1.0")
    cfg = load_cfg(args.config, args.overrides)
    label = lesion_label(cfg) if args.label is None else int(args.label)
    reference = contrast_reference(cfg)
    gen, seg = load_trained(cfg, args.config, dev)
    from medsynth.data.dataset import load_split
    from medsynth.pipeline.runner import stage_root

    test = load_split((stage_root(cfg) / "preprocess"), "test")
    held, free = select_masks(test, label, args.n_masks, args.n_free, args.min_voxels, reference)
    data = dataclasses.replace(
        held,
        images=torch.cat([held.images, free.images]),
        masks=torch.cat([held.masks, free.masks]),
        affines=np.concatenate([held.affines, free.affines]),
        item_ids=held.item_ids + free.item_ids,
        patients=held.patients + free.patients,
    )
    rows, images = sweep(gen, seg, data, cfg, scales, label, reference, args.seed)
    name = data.labels.get(label, str(label))
    print_table(
        f"Guidance sweep ({cfg.name}, {name}: {len(held)} masks holding it, {len(free)} lacking it; "
        f"{cfg.sampling.sampler} {cfg.sampling.steps} steps, {dev})",
        [
            Column("row", "row"),
            Column("nfe", "NFE/image", "{:.0f}"),
            Column("cost_ratio", "time vs g=1", "{:.2f}x"),
            Column("contrast", f"{name} contrast", "{:+.3f}"),
            Column("contrast_rel", "/ real", "{:.2f}"),
            Column("visible", "visible", "{:.2f}"),
            Column("dice", f"{name} Dice", "{:.3f}"),
            Column("dice_rel", "/ real", "{:.2f}"),
            Column("fp", "FP rate", "{:.2f}"),
        ],
        rows,
    )
    out = args.out
    if out == RESULTS_DIR / f"{NAME}.json":
        out = RESULTS_DIR / f"{NAME}-{cfg.name}.json"
    grid = save_sweep_grid(out.with_suffix(".png"), data, images, label)
    print(f"grid: {grid}")
    choice = calibration.choose_guidance(rows)
    print(f"calibration rule: {choice.reason}")
    ref_text = f"labels {reference}" if reference else "the other foreground labels"
    write_result(
        out,
        NAME,
        argv,
        dev,
        {
            "config": args.config,
            "overrides": args.overrides,
            "label": label,
            "label_name": name,
            "reference": reference,
            "n_with": len(held),
            "n_free": len(free),
            "min_voxels": args.min_voxels,
            "sampler": cfg.sampling.sampler,
            "steps": cfg.sampling.steps,
            "seed": args.seed,
        },
        "guidance 1.0 (no classifier-free guidance) for cost; the real images for contrast, Dice and FP",
        rows,
        notes=[
            f"contrast: mean intensity in {name} minus the mean of {ref_text}, preprocessing scale [0, 1]",
            "visible: fraction of masks holding the structure whose synthetic contrast has the real sign and at "
            "least half its size",
            "Dice/FP: the reference segmenter (trained on real data only); FP on masks lacking the structure",
        ],
        extra={"grid": str(grid), "calibration_choice": choice.model_dump(exclude={"rows"})},
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``python -m benchmarks.guidance``."""
    return run_main(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Preprocessing throughput: medsynth's cached preprocessing (cold and warm) vs a plain MONAI pipeline.

For each dataset (LGG FLAIR slices with ``configs/lgg-2d.yaml``, MSD hippocampus volumes with
``configs/hippocampus-3d.yaml``; read from ``$MEDSYNTH_SHARED/data``, skipped when absent) the first
``--max-cases`` cases (sorted case ids, selected through ``data.include``) are

* preprocessed by ``medsynth.data.preprocess.run_preprocess`` into an empty temporary cache (cold:
  discovery, input hashing, QC, transforms, derived label, slicing, writing arrays and manifest);
* preprocessed again into the same cache (warm: every case is found valid and skipped), and once
  more followed by ``load_split`` of every item into memory (what a training stage then reads);
* run through a plain MONAI pipeline -- ``LoadImaged``, ``EnsureChannelFirstd``, ``Orientationd``
  (3D only, as medsynth), ``Spacingd``, ``ScaleIntensityRangePercentilesd``, ``ResizeWithPadOrCropd``
  in a ``monai.data.Dataset`` -- iterated for two epochs (a plain ``Dataset`` recomputes every epoch).

The baseline is the MONAI epoch; rows report cases/s and the ratio to it. No pass/fail target: the
warm ratio says what the cache saves per epoch-equivalent, the cold ratio what QC and caching cost.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import (
    BenchmarkError,
    Column,
    add_set_arg,
    base_parser,
    load_cfg,
    print_table,
    ratio,
    run_main,
    setup,
    shared_root,
    write_result,
)
from medsynth.config.schema import MedsynthConfig

NAME = "preprocessing"


@dataclass(frozen=True)
class DatasetSpec:
    """A benchmarked dataset: its config and its folder under ``<shared>/data``."""

    key: str
    config: str
    folder: str


DATASETS: dict[str, DatasetSpec] = {
    "lgg": DatasetSpec("lgg", "configs/lgg-2d.yaml", "lgg-flair"),
    "hippocampus": DatasetSpec("hippocampus", "configs/hippocampus-3d.yaml", "msd-hippocampus"),
}


def subset_config(cfg: MedsynthConfig, data_root: Path, output_dir: Path, max_cases: int | None) -> MedsynthConfig:
    """``cfg`` reading ``data_root``, writing under ``output_dir``, restricted to its first ``max_cases`` cases.

    The subset is the first cases by sorted case id, selected with an exact-match ``data.include``.
    """
    from medsynth.data.layouts import discover

    data = cfg.data.model_copy(update={"root": str(data_root)})
    if max_cases is not None:
        ids = [c.case_id for c in discover(data).cases]
        if max_cases < len(ids):
            pattern = "^(?:" + "|".join(re.escape(i) for i in ids[:max_cases]) + ")$"
            data = data.model_copy(update={"include": pattern})
    return cfg.model_copy(update={"data": data, "output_dir": str(output_dir)})


def monai_pipeline(cfg: MedsynthConfig, ndim: int) -> Any:
    """The plain MONAI chain for ``cfg``'s geometry and intensity settings (image + mask)."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ResizeWithPadOrCropd,
        ScaleIntensityRangePercentilesd,
        Spacingd,
    )

    pc = cfg.preprocess
    keys = ["image", "mask"]
    chain: list[Any] = [LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys)]
    if ndim == 3 and pc.orientation:
        chain.append(Orientationd(keys, axcodes=pc.orientation, labels=None))
    if pc.spacing is not None:
        chain.append(Spacingd(keys, pixdim=pc.spacing, mode=("bilinear", "nearest")))
    chain.append(
        ScaleIntensityRangePercentilesd(
            "image", pc.intensity.lower, pc.intensity.upper, b_min=0.0, b_max=1.0, clip=True
        )
    )
    spatial = pc.spatial_size if ndim == pc.spatial_dims else [*pc.spatial_size, -1][:ndim]
    chain.append(ResizeWithPadOrCropd(keys, spatial_size=spatial, mode="constant"))
    return Compose(chain)


def _read_all(paths: Sequence[Path]) -> int:
    """Read every file once (OS page cache warm for every row alike); returns the bytes read."""
    return sum(len(p.read_bytes()) for p in paths if p.is_file())


def bench_dataset(
    spec: DatasetSpec, data_root: Path, max_cases: int | None, overrides: Sequence[str]
) -> list[dict[str, Any]]:
    """All rows of one dataset (temporary cache removed afterwards).

    Returns:
        Rows ``dataset, row, cases, items, seconds, cases_per_s, ratio`` (+ ``baseline`` on the first).
    """
    tmp = Path(tempfile.mkdtemp(prefix=f"medsynth-bench-{spec.key}-"))
    with warnings.catch_warnings():  # MONAI's deprecation notice and its warning on blank (constant) slices
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="Divide by zero")
        try:
            return _bench_in(spec, data_root, max_cases, overrides, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _bench_in(
    spec: DatasetSpec, data_root: Path, max_cases: int | None, overrides: Sequence[str], tmp: Path
) -> list[dict[str, Any]]:
    """The rows of :func:`bench_dataset`, with every file under ``tmp``."""
    import monai.data

    from medsynth.data.dataset import load_split
    from medsynth.data.io import read_image
    from medsynth.data.layouts import discover
    from medsynth.data.preprocess import cache_dir_for, run_preprocess

    cfg = subset_config(load_cfg(spec.config, overrides), data_root, tmp / "out", max_cases)
    cases = discover(cfg.data).cases
    files = [p for c in cases for p in (c.image, c.mask) if p is not None]
    ndim = len(read_image(cases[0].image, "image").array.shape)
    items = [{"image": str(c.image), "mask": str(c.mask)} for c in cases]
    ds = monai.data.Dataset(data=items, transform=monai_pipeline(cfg, ndim))
    # --- warm-up: inputs in the OS page cache, readers imported, one case through each pipeline ---
    _read_all(files)
    _ = ds[0]
    one = subset_config(cfg, data_root, tmp / "warmup", 1)
    run_preprocess(one)
    n = len(cases)
    rows: list[dict[str, Any]] = []

    def row(name: str, seconds: float, n_items: int | None = None, **extra: Any) -> None:
        rows.append(
            {
                "dataset": spec.key,
                "row": name,
                "cases": n,
                "items": n_items,
                "seconds": seconds,
                "cases_per_s": n / seconds if seconds > 0 else None,
                **extra,
            }
        )

    for epoch in (1, 2):
        t0 = time.perf_counter()
        count = sum(1 for _ in ds)
        row(f"MONAI Dataset epoch {epoch}", time.perf_counter() - t0, count, baseline=epoch == 1)
    t0 = time.perf_counter()
    cold = run_preprocess(cfg)
    row("medsynth cold (empty cache)", time.perf_counter() - t0, cold.n_items, processed=cold.n_processed)
    t0 = time.perf_counter()
    warm = run_preprocess(cfg)
    row("medsynth warm (cache valid)", time.perf_counter() - t0, warm.n_items, processed=warm.n_processed)
    t0 = time.perf_counter()
    again = run_preprocess(cfg)
    loaded = load_split(cache_dir_for(cfg), None)
    row("medsynth warm + load_split", time.perf_counter() - t0, len(loaded), processed=again.n_processed)
    base = rows[0]["cases_per_s"]
    for r in rows:
        r["ratio"] = ratio(r["cases_per_s"], base)
        r.setdefault("baseline", False)
    return rows


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = base_parser(NAME, __doc__.split("\n\n")[0] if __doc__ else NAME)
    p.add_argument(
        "--datasets", default="lgg,hippocampus", help=f"comma-separated subset of {sorted(DATASETS)} (default: both)"
    )
    p.add_argument("--max-cases", type=int, default=200, help="first N cases of each dataset (default 200; 0 = all)")
    add_set_arg(p, "config override applied to every dataset's config (repeatable)")
    return p


def _body(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    dev = setup(args)
    keys = [k.strip() for k in args.datasets.split(",") if k.strip()]
    unknown = [k for k in keys if k not in DATASETS]
    if unknown:
        raise BenchmarkError(f"unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}")
    max_cases = args.max_cases if args.max_cases > 0 else None
    shared = shared_root() / "data"
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for key in keys:
        spec = DATASETS[key]
        root = shared / spec.folder
        if not root.is_dir():
            skipped[key] = f"{root} not found (set MEDSYNTH_SHARED to the folder holding data/{spec.folder})"
            print(f"skipped {key}: {skipped[key]}")
            continue
        rows += bench_dataset(spec, root, max_cases, args.overrides)
    if rows:
        print_table(
            f"Preprocessing throughput (first {max_cases or 'all'} cases per dataset; baseline: MONAI epoch 1)",
            [
                Column("dataset", "dataset"),
                Column("row", "pipeline"),
                Column("cases", "cases"),
                Column("items", "items out"),
                Column("seconds", "s", "{:.2f}"),
                Column("cases_per_s", "cases/s", "{:.1f}"),
                Column("ratio", "ratio vs MONAI epoch", "{:.2f}x"),
            ],
            rows,
        )
    write_result(
        args.out,
        NAME,
        argv,
        dev,
        {"datasets": keys, "max_cases": max_cases, "shared_data": str(shared), "overrides": args.overrides},
        baseline="plain MONAI Dataset, epoch 1 (cases/s); ratio = row cases/s / baseline cases/s",
        rows=rows,
        target={"text": "none (informational)", "passed": None},
        notes=[
            "Preprocessing runs on the CPU whatever --device says.",
            "medsynth's rows include discovery (file listing), input hashing, QC, the derived label (LGG), "
            "slicing and writing the cache; the MONAI rows get the file list for free and do none of these.",
            "Intensity: medsynth scales by percentiles of the non-zero voxels (ForegroundPercentileScaled); "
            "the MONAI baseline by percentiles of all voxels (ScaleIntensityRangePercentilesd).",
            "Every input file is read once before timing, so all rows see a warm OS page cache.",
        ],
        extra={"skipped": skipped},
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preprocessing benchmark (``python -m benchmarks.preprocessing --help``)."""
    return run_main(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())

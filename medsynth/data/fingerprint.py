"""Dataset fingerprint: what a dataset holds, measured on a sample of its cases (as nnU-Net does).

The fingerprint records the layout chosen and why, file formats, 2D/3D, channels, spacing and size
distributions, intensity statistics, label values with voxel and case counts, patients and
suspected problems. It reads at most ``max_cases`` cases (a seeded random sample), so large
datasets are fingerprinted in seconds; the numbers then describe the sample and say so.
:func:`medsynth.planning.plan_config` turns it into a config.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.config.data import DataConfig
from medsynth.data.cases import Case
from medsynth.data.io import IMAGE_SUFFIXES, image_channels, read_image
from medsynth.data.layouts import _CHANNEL, detect_layout, discover, stem
from medsynth.data.vocabulary import dataset_json_path, labels_from_dataset_json, read_dataset_json
from medsynth.errors import DataError
from medsynth.fileio import write_json_atomic, write_text_atomic
from medsynth.progress import NullProgress, Progress

log = logging.getLogger(__name__)

FINGERPRINT_JSON, FINGERPRINT_MD = "fingerprint.json", "fingerprint.md"
SCALE_RATIO_CONSISTENT = 10.0
"""Per-case 99.5th percentiles within this ratio (p95/p5) share one intensity scale (absolute QC thresholds apply)."""
MAX_CASES = 64
"""Cases read by default; the rest of the dataset is only listed (file names, patients)."""


def _suffix(path: Path) -> str:
    if path.is_dir():
        return "dicom"
    low = path.name.lower()
    return next((s for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True) if low.endswith(s)), path.suffix.lower())


def _stats(values: list[float]) -> dict[str, float] | None:
    """min / percentiles / max of a list (None when empty)."""
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    q = np.percentile(a, [0, 5, 50, 95, 100])
    return {k: round(float(v), 5) for k, v in zip(("min", "p5", "median", "p95", "max"), q, strict=True)}


def _nnunet_channels(root: Path) -> int:
    """Channels given as files: nnU-Net ``imagesTr/X_0000``, ``X_0001``... or CSV ``image_0``, ``image_1``..."""
    if root.is_file() and root.suffix.lower() == ".csv":
        import csv

        with open(root, newline="", encoding="utf-8") as fh:
            cols = next(csv.reader(fh), [])
        return max(1, sum(1 for c in cols if re.fullmatch(r"image_\d+", c)))
    folder = root / "imagesTr"
    if not folder.is_dir():
        return 1
    chans = {int(m.group("ch")) for p in folder.iterdir() if (m := _CHANNEL.match(stem(p)))}
    return max(chans) + 1 if chans else 1


def _read_case(case: Case, data: DataConfig) -> dict[str, Any]:
    """Per-case measurements (or ``{"error": ...}`` when a file cannot be read)."""
    out: dict[str, Any] = {"case_id": case.case_id, "patient_id": case.patient_id}
    try:
        n_ch = image_channels(case.image)
        img = read_image(
            case.image, "image", channel=data.channel if data.channel is not None else (0 if n_ch > 1 else None)
        )
    except DataError as exc:
        return {**out, "error": f"{exc.path}: {exc.problem}"}
    arr = img.array
    finite = arr[np.isfinite(arr)]
    out.update(
        ndim=img.ndim,
        channels=n_ch,
        shape=[int(s) for s in arr.shape],
        spacing=[round(float(s), 5) for s in img.spacing],
        dtype=str(arr.dtype),
        non_finite=int(arr.size - finite.size),
    )
    if finite.size:
        fg = finite[finite != 0] if (finite != 0).any() else finite
        p = np.percentile(fg, [0.5, 50, 99.5])
        out["intensity"] = {
            "min": float(finite.min()),
            "max": float(finite.max()),
            "p0.5": float(p[0]),
            "median": float(p[1]),
            "p99.5": float(p[2]),
            "mean": float(fg.mean()),
            "std": float(fg.std()),
            "foreground_fraction": float((finite != 0).mean()),
            "integer_valued": bool(np.array_equal(finite, np.round(finite))),
        }
    if case.mask is None:
        out["mask"] = None
        return out
    try:
        mask = read_image(case.mask, "mask").array
    except DataError as exc:
        out["mask_error"] = f"{exc.path}: {exc.problem}"
        return out
    vals, counts = np.unique(mask, return_counts=True)
    out["mask"] = {
        "shape": [int(s) for s in mask.shape],
        "label_counts": {int(v): int(n) for v, n in zip(vals, counts, strict=True)},
        "foreground_fraction": float((mask != 0).mean()),
    }
    return out


def _problems(fp: dict[str, Any], rows: list[dict[str, Any]], cases: list[Case], orphans: list[Path]) -> list[str]:
    probs: list[str] = []
    read = [r for r in rows if "error" not in r]
    if len(read) < len(rows):
        bad = [r for r in rows if "error" in r]
        probs.append(f"{len(bad)} sampled images cannot be read, e.g. {bad[0]['error']}")
    no_mask = [c for c in cases if c.mask is None]
    if no_mask:
        probs.append(f"{len(no_mask)} images have no mask, e.g. {no_mask[0].image}")
    if orphans:
        probs.append(f"{len(orphans)} masks have no image, e.g. {orphans[0]}")
    shape_mis = [r["case_id"] for r in read if r.get("mask") and r["mask"]["shape"] != r["shape"]]
    if shape_mis:
        probs.append(f"{len(shape_mis)} sampled cases have image and mask shapes that differ, e.g. {shape_mis[0]}")
    if any(r.get("non_finite") for r in read):
        probs.append("some images hold NaN/Inf voxels")
    sp = fp["spacing"].get("median")
    if sp and max(sp) / max(min(sp), 1e-6) > 3:
        probs.append(f"anisotropic voxels (median spacing {sp}): resampling to a coarser isotropic grid loses detail")
    values = set(fp["labels"]["values"])
    if 255 in values:
        probs.append("mask value 255 found: a binary mask saved as 0/255 (map it with data.label_remap {255: 1})")
    empty = fp["labels"].get("cases_without_foreground", 0)
    if read and empty == len([r for r in read if r.get("mask")]):
        probs.append("every sampled mask is empty (background only)")
    const = [r["case_id"] for r in read if r.get("intensity") and r["intensity"]["min"] == r["intensity"]["max"]]
    if const:
        probs.append(f"{len(const)} sampled images are constant (blank), e.g. {const[0]}")
    if not fp["intensity"].get("consistent_scale", True) and fp["intensity"].get("p99.5"):
        probs.append(
            f"intensity scales differ between cases (p95/p5 of the per-case 99.5th percentiles = "
            f"{fp['intensity']['scale_ratio']}): normalise per case (the plan does) and compare no raw intensities"
        )
    low = fp["intensity"].get("low_signal_cases", 0)
    if low:
        probs.append(
            f"{low} sampled images are near-empty (99.5th percentile < 20% of the dataset median): "
            "noise-only slices the plan excludes with qc.min_signal"
        )
    if fp["channels"] > 1:
        probs.append(
            f"{fp['channels']} channels per case: the plan models them jointly (data.channels); "
            "data.channel: K models one of them instead"
        )
    n_pat = fp["n_patients"]
    if n_pat < 10:
        probs.append(
            f"only {n_pat} patients: splits are tiny and most validation numbers will be n/a or very uncertain"
        )
    return probs


def fingerprint(
    data: DataConfig, max_cases: int = MAX_CASES, seed: int = 0, progress: Progress | None = None
) -> dict[str, Any]:
    """Fingerprint a dataset from a sample of at most ``max_cases`` cases.

    Args:
        data: Data config (``root`` and any layout options; labels need not be declared).
        max_cases: Cases read (a seeded random sample when the dataset is larger).
        seed: Seed of the sample.
        progress: One ``advance()`` per case read.

    Returns:
        The JSON-compatible fingerprint (see :func:`fingerprint_md` for a readable form).

    Raises:
        DataError: Missing root or a layout that matches nothing.
    """
    root = Path(data.root)
    if data.layout == "auto":
        data, why = detect_layout(data, root)
    else:
        why = f"layout {data.layout} (from config)"
    disc = discover(data, root)
    cases = disc.cases
    rng = np.random.default_rng(seed)
    idx = sorted(rng.choice(len(cases), size=min(max_cases, len(cases)), replace=False).tolist())
    prog = progress or NullProgress()
    rows = []
    for i in idx:
        rows.append(_read_case(cases[i], data))
        prog.advance(1, cases[i].case_id)
    read = [r for r in rows if "error" not in r]
    with_mask = [r for r in read if r.get("mask")]
    voxels: Counter[int] = Counter()
    case_counts: Counter[int] = Counter()
    for r in with_mask:
        for v, n in r["mask"]["label_counts"].items():
            voxels[v] += n
            case_counts[v] += 1 if n else 0
    fg_fracs = [r["mask"]["foreground_fraction"] for r in with_mask]
    p995 = [r["intensity"]["p99.5"] for r in read if r.get("intensity")]
    med_p995 = float(np.median(p995)) if p995 else 0.0
    lo_p, hi_p = np.percentile(p995, [5, 95]) if p995 else (0.0, 0.0)
    scale_ratio = float(hi_p / lo_p) if lo_p > 0 else float("inf")
    consistent = bool(p995) and scale_ratio < SCALE_RATIO_CONSISTENT  # e.g. 8-bit exports; not raw MRI scaling
    meta_path = dataset_json_path(data)
    meta = read_dataset_json(meta_path)
    patients = Counter(c.patient_id for c in cases)
    ndims = Counter(r["ndim"] for r in read)
    shapes = [r["shape"] for r in read]
    spacings = [r["spacing"] for r in read]
    fp: dict[str, Any] = {
        "root": str(root),
        "layout": {
            "name": disc.layout,
            "why": why,
            "images_dir": data.images_dir,
            "masks_dir": data.masks_dir,
            "mask_suffix": data.mask_suffix,
        },
        "n_cases": len(cases),
        "n_sampled": len(rows),
        "sampled": len(rows) < len(cases),
        "n_patients": len(patients),
        "cases_per_patient": _stats([float(v) for v in patients.values()]),
        "formats": {
            "images": dict(Counter(_suffix(c.image) for c in cases)),
            "masks": dict(Counter(_suffix(c.mask) for c in cases if c.mask is not None)),
        },
        "ndim": ndims.most_common(1)[0][0] if ndims else None,
        "channels": max(max((r["channels"] for r in read), default=1), _nnunet_channels(root)),
        "shape": {
            "median": [int(v) for v in np.median(shapes, axis=0)]
            if shapes and len(set(map(len, shapes))) == 1
            else None,
            "per_axis": [_stats([float(s[a]) for s in shapes]) for a in range(len(shapes[0]))]
            if shapes and len(set(map(len, shapes))) == 1
            else None,
        },
        "spacing": {
            "median": [round(float(v), 5) for v in np.median(spacings, axis=0)]
            if spacings and len(set(map(len, spacings))) == 1
            else None,
            "per_axis": [_stats([s[a] for s in spacings]) for a in range(len(spacings[0]))]
            if spacings and len(set(map(len, spacings))) == 1
            else None,
        },
        "intensity": {
            "p0.5": _stats([r["intensity"]["p0.5"] for r in read if r.get("intensity")]),
            "median": _stats([r["intensity"]["median"] for r in read if r.get("intensity")]),
            "p99.5": _stats(p995),
            "negative_values": any(r["intensity"]["min"] < 0 for r in read if r.get("intensity")),
            "integer_valued": all(r["intensity"]["integer_valued"] for r in read if r.get("intensity")),
            "max": max((r["intensity"]["max"] for r in read if r.get("intensity")), default=None),
            "scale_ratio": round(scale_ratio, 3) if math.isfinite(scale_ratio) else None,
            "consistent_scale": consistent,
            "low_signal_cases": sum(1 for v in p995 if v < 0.2 * med_p995) if consistent else 0,
            "low_signal_threshold": round(0.2 * med_p995, 5) if consistent else None,
        },
        "labels": {
            "values": sorted(voxels),
            "voxels": {str(k): int(v) for k, v in sorted(voxels.items())},
            "cases": {str(k): int(v) for k, v in sorted(case_counts.items())},
            "dataset_json": {str(k): v for k, v in (labels_from_dataset_json(meta, meta_path) or {}).items()}
            if meta is not None
            else None,
            "foreground_fraction": _stats(fg_fracs),
            "cases_without_foreground": sum(1 for f in fg_fracs if f == 0),
            "n_masks_read": len(with_mask),
        },
        "dataset_json": str(meta_path) if meta is not None else None,
        "modality": (meta or {}).get("modality") or (meta or {}).get("channel_names"),
        "orphan_masks": [str(p) for p in disc.orphan_masks],
        "images_without_mask": sum(1 for c in cases if c.mask is None),
        "cases": rows,
    }
    fp["problems"] = _problems(fp, rows, cases, disc.orphan_masks)
    return fp


def _fmt_stats(s: dict[str, float] | None) -> str:
    if not s:
        return "n/a"
    return f"{s['median']:g} (p5 {s['p5']:g}, p95 {s['p95']:g}, range {s['min']:g}-{s['max']:g})"


def fingerprint_md(fp: dict[str, Any]) -> str:
    """A readable Markdown summary of a fingerprint."""
    lab = fp["labels"]
    sample = f"{fp['n_sampled']} sampled of {fp['n_cases']}" if fp["sampled"] else f"all {fp['n_cases']}"
    lines = [
        f"# Dataset fingerprint: `{fp['root']}`",
        "",
        f"- layout: **{fp['layout']['name']}** ({fp['layout']['why']})",
        f"- cases: {fp['n_cases']} from {fp['n_patients']} patients (cases per patient "
        f"{_fmt_stats(fp['cases_per_patient'])}); measured on {sample} cases",
        f"- formats: images {fp['formats']['images']}, masks {fp['formats']['masks']}",
        f"- dimensionality: {fp['ndim']}D, {fp['channels']} channel(s)",
        f"- median shape {fp['shape']['median']}, median spacing {fp['spacing']['median']} mm",
    ]
    if fp["shape"]["per_axis"]:
        lines += [
            "",
            "| axis | size (median, p5, p95, range) | spacing mm (median, p5, p95, range) |",
            "|---|---|---|",
            *[
                f"| {a} | {_fmt_stats(s)} | {_fmt_stats(sp)} |"
                for a, (s, sp) in enumerate(zip(fp["shape"]["per_axis"], fp["spacing"]["per_axis"] or [], strict=False))
            ],
        ]
    it = fp["intensity"]
    lines += [
        "",
        "## Intensities (non-zero voxels, per case)",
        "",
        f"- 0.5th percentile {_fmt_stats(it['p0.5'])}",
        f"- median {_fmt_stats(it['median'])}",
        f"- 99.5th percentile {_fmt_stats(it['p99.5'])}",
        f"- negative values: {it['negative_values']}, integer-valued: {it['integer_valued']}, max {it['max']}",
        "",
        "## Labels",
        "",
        f"dataset.json labels: {lab['dataset_json'] or 'none'}; masks read: {lab['n_masks_read']}; "
        f"masks with no foreground: {lab['cases_without_foreground']}; "
        f"foreground fraction {_fmt_stats(lab['foreground_fraction'])}",
        "",
        "| value | voxels | cases |",
        "|---|---|---|",
        *[f"| {v} | {lab['voxels'][str(v)]} | {lab['cases'][str(v)]} |" for v in lab["values"]],
        "",
        "## Suspected problems",
        "",
        *([f"- {p}" for p in fp["problems"]] or ["- none found"]),
    ]
    return "\n".join(lines) + "\n"


def write_fingerprint(fp: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``fingerprint.json`` and ``fingerprint.md`` into ``out_dir``."""
    out = Path(out_dir)
    return write_json_atomic(out / FINGERPRINT_JSON, fp), write_text_atomic(out / FINGERPRINT_MD, fingerprint_md(fp))


def safe_name(root: str | Path) -> str:
    """A config name from a dataset path (letters, digits, ``-``)."""
    name = Path(root).stem if Path(root).suffix.lower() == ".csv" else Path(root).name
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "dataset"

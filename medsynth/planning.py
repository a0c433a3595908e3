"""Automatic planning: a dataset fingerprint -> a commented config sized for a device, memory and time budget.

The rules follow nnU-Net's spirit (median spacing as the starting grid, sizes from the size
distribution, batch size from memory) adapted to a latent diffusion pipeline:

* **grid**: the median spacing, coarsened (keeping its anisotropy) until the 95th-percentile field of
  view fits a voxel budget (CPU 3D: 48k voxels, the size of ``configs/hippocampus-3d.yaml``; 2D: a
  64-pixel side on CPU); sizes rounded up to the whole network's downsampling factor.
* **networks**: preset widths per (device, 2D/3D), the presets of the shipped configs on CPU.
* **batch sizes**: an activation-memory estimate per sample, half of the given memory.
* **steps**: the time budget split over the stages with per-voxel step costs measured on this
  project's CPU (README, hippocampus run with one thread: autoencoder 3.0 s/step at batch 4 and
  40,960 voxels; UNet 0.55 s/step and ControlNet 0.68 s/step at batch 8 on 640 latent voxels),
  scaled by kernel size and squared channel widths. CUDA is assumed 40x faster: an ESTIMATE, not
  measured here; the YAML says so.
* **labels**: ``dataset.json`` names, else the values found (generic names); a single foreground
  label that is small or absent in many cases is treated as a lesion, gets the name ``lesion``, a
  loss weight and a derived anatomy label (Otsu foreground) so the model also learns the anatomy.
* **QC**: ``exclude`` for slice datasets and datasets with blank or near-empty images; ``min_signal``
  at 20% of the median 99.5th intensity percentile when near-empty images were found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from medsynth.data.fingerprint import safe_name

Device = Literal["cpu", "cuda"]

# --- step costs (seconds per voxel per sample), measured on CPU with one thread (see module doc) -----
_REF_AE = (16, 32, 32)
_REF_UNET = (32, 64)
_COST_AE_3D = 3.0 / (4 * 40960)
_COST_UNET_3D = 0.55 / (8 * 640)
_COST_CN_3D = 0.675 / (8 * 640)
_GPU_SPEEDUP = 40.0  # assumed, not measured here
_SHARES = {"autoencoder": 0.30, "diffusion": 0.17, "controlnet": 0.13}  # the rest: segmenter, validation, ...

_PRESETS: dict[tuple[str, int], dict[str, Any]] = {
    ("cpu", 3): {
        "ae": {"channels": [16, 32, 32], "latent_channels": 3, "norm_num_groups": 8},
        "unet": {"channels": [32, 64], "attention_levels": [False, False], "norm_num_groups": 16},
        "cn": [8, 16, 32],
        "max_voxels": 48_000,
    },
    ("cpu", 2): {
        "ae": {"channels": [32, 64, 64], "latent_channels": 4, "norm_num_groups": 16},
        "unet": {"channels": [64, 128, 128], "attention_levels": [False, False, True], "norm_num_groups": 32},
        "cn": [16, 32, 64],
        "max_voxels": 64 * 64,
    },
    ("cuda", 3): {
        "ae": {"channels": [32, 64, 64], "latent_channels": 4, "norm_num_groups": 16},
        "unet": {"channels": [64, 128, 256], "attention_levels": [False, False, True], "norm_num_groups": 32},
        "cn": [16, 32, 64],
        "max_voxels": 96 * 96 * 96,
    },
    ("cuda", 2): {
        "ae": {"channels": [64, 128, 128], "latent_channels": 4, "norm_num_groups": 32},
        "unet": {"channels": [128, 256, 256], "attention_levels": [False, True, True], "norm_num_groups": 32},
        "cn": [16, 32, 96],
        "max_voxels": 256 * 256,
    },
}


@dataclass
class Plan:
    """A planned config.

    Attributes:
        raw: The config as a plain dict (validates as :class:`medsynth.config.schema.MedsynthConfig`).
        yaml_text: The same, as commented YAML.
        warnings: Things the user should know (tiny splits, assumptions, problems found).
        notes: Why each section was chosen (also in the YAML comments).
    """

    raw: dict[str, Any]
    yaml_text: str
    warnings: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)


def channel_names_of(fp: dict[str, Any]) -> list[str]:
    """Names of a fingerprint's channels: dataset.json's ``channel_names``/``modality`` when complete, else ch0.."""
    n = int(fp["channels"])
    modality = fp.get("modality")
    given: dict[str, Any] = modality if isinstance(modality, dict) else {}
    names = [str(given.get(str(k), "")).strip().lower().replace(" ", "_") for k in range(n)]
    if all(names) and len(set(names)) == n:
        return names
    return [f"ch{k}" for k in range(n)]


def _round_up(n: float, mult: int) -> int:
    return max(mult, math.ceil(n / mult) * mult)


def _factor(preset: dict[str, Any]) -> int:
    """Total downsampling of autoencoder x UNet: the grid size must be a multiple of it."""
    return int(2 ** (len(preset["ae"]["channels"]) - 1) * 2 ** (len(preset["unet"]["channels"]) - 1))


def plan_grid(fp: dict[str, Any], preset: dict[str, Any], dims: int) -> tuple[list[float], list[int], str]:
    """Target spacing and size: the median spacing, coarsened until the p95 field of view fits the budget.

    Returns:
        ``(spacing, spatial_size, why)``.
    """
    mult = _factor(preset)
    spacing0 = [float(s) for s in (fp["spacing"]["median"] or [1.0] * dims)][:dims]
    per_axis = fp["shape"]["per_axis"] or [{"p95": 64.0}] * dims
    extent = [float(per_axis[a]["p95"]) * spacing0[a] for a in range(dims)]  # mm
    budget = preset["max_voxels"]
    native = math.prod(max(e / s, 1.0) for e, s in zip(extent, spacing0, strict=True))
    scale = max(1.0, (native / budget) ** (1.0 / dims))  # the coarsening that fits before rounding
    for _ in range(400):
        spacing = [round(s * scale, 3) for s in spacing0]
        size = [_round_up(e / s, mult) for e, s in zip(extent, spacing, strict=True)]
        if math.prod(size) <= budget:
            break
        scale *= 1.01
    why = (
        f"median spacing {spacing0} mm and p95 field of view {[round(e, 1) for e in extent]} mm; "
        f"{'kept' if scale == 1.0 else f'coarsened x{scale:.2f}'} to fit {budget} voxels, "
        f"sizes rounded up to multiples of {mult} (autoencoder x UNet downsampling)"
    )
    return spacing, size, why


def _cost(kind: str, dims: int, channels: list[int], device: str) -> float:
    ref, base = {
        "ae": (_REF_AE, _COST_AE_3D),
        "unet": (_REF_UNET, _COST_UNET_3D),
        "cn": (_REF_UNET, _COST_CN_3D),
    }[kind]
    width = sum(c * c for c in channels) / sum(c * c for c in ref)
    kernel = (3**dims) / 27
    return float(base * width * kernel / (_GPU_SPEEDUP if device == "cuda" else 1.0))


def _batch(voxels: int, channels: list[int], memory_gib: float, cap: int) -> int:
    per_sample = voxels * sum(channels) * 4 * 24  # float32 activations kept for the backward pass (estimate)
    return max(1, min(cap, int(0.5 * memory_gib * 2**30 // max(per_sample, 1))))


def _steps(budget_s: float, share: float, batch: int, voxels: int, cost: float, lo: int, hi: int) -> int:
    steps = share * budget_s / max(batch * voxels * cost, 1e-9)
    return int(min(hi, max(lo, round(steps / 10) * 10)))


def _labels(fp: dict[str, Any]) -> tuple[dict[int, str], dict[int, int], int | None, bool, list[str]]:
    """Vocabulary, remap, lesion label, whether masks are lesion-only, and notes."""
    lab = fp["labels"]
    values = set(lab["values"]) | {0}
    remap: dict[int, int] = {}
    notes: list[str] = []
    if 255 in values and values <= {0, 1, 255}:
        remap = {255: 1}
        values = (values - {255}) | {1}
        notes.append("mask value 255 mapped to 1 (a binary mask saved as 0/255)")
    if lab.get("dataset_json"):
        labels = {int(k): str(v) for k, v in lab["dataset_json"].items()}
        notes.append("label names from dataset.json")
    else:
        labels = {v: "background" if v == 0 else f"label_{v}" for v in sorted(values)}
        if fp["sampled"]:
            notes.append(f"label values seen in {lab['n_masks_read']} sampled masks (`medsynth data check` reads all)")
    fg = sorted(v for v in labels if v)
    from medsynth.synthesis.edits import LESION_NAME

    named = [v for v in fg if LESION_NAME.search(labels[v])]
    n_masks = max(lab["n_masks_read"], 1)
    frac = (lab.get("foreground_fraction") or {}).get("median", 1.0)
    lesion_only = len(fg) == 1 and (lab["cases_without_foreground"] / n_masks >= 0.2 or frac < 0.02)
    lesion: int | None = named[-1] if named else None
    if lesion_only:
        lesion = fg[0]
        if not lab.get("dataset_json"):
            labels[lesion] = "lesion"
        notes.append(
            f"one foreground label, absent in {lab['cases_without_foreground']}/{n_masks} sampled masks and "
            f"median {100 * frac:.2f}% of the voxels: treated as a lesion"
        )
    return labels, remap, lesion, lesion_only, notes


def plan_config(
    fp: dict[str, Any],
    device: Device = "cpu",
    memory_gib: float | None = None,
    budget_min: float | None = None,
    name: str | None = None,
    output_dir: str = "outputs",
) -> Plan:
    """Turn a fingerprint into a config for ``device`` with ``memory_gib`` and a ``budget_min`` time budget.

    Args:
        fp: A fingerprint from :func:`medsynth.data.fingerprint.fingerprint`.
        device: ``"cpu"`` or ``"cuda"``.
        memory_gib: Memory to plan batch sizes for (default: CPU 8, CUDA 16).
        budget_min: Wall-clock budget of the training stages in minutes (default: CPU 60, CUDA 240).
        name: Config name (default: from the dataset folder).
        output_dir: Output folder of the runs.

    Returns:
        The :class:`Plan`.
    """
    dims = 3 if fp["ndim"] == 3 else 2
    preset = _PRESETS[(device, dims)]
    mem = float(memory_gib if memory_gib is not None else (8 if device == "cpu" else 16))
    budget_s = 60.0 * float(budget_min if budget_min is not None else (60 if device == "cpu" else 240))
    warnings: list[str] = []
    notes: dict[str, list[str]] = {}

    spacing, size, why = plan_grid(fp, preset, dims)
    voxels = math.prod(size)
    ae_f = 2 ** (len(preset["ae"]["channels"]) - 1)
    latent_voxels = voxels // ae_f**dims
    notes["preprocess"] = [f"grid {size} at {spacing} mm: {why}"]

    labels, remap, lesion, lesion_only, label_notes = _labels(fp)
    notes["data"] = [fp["layout"]["why"], *label_notes]

    # --- splits that can be measured -----------------------------------------------------------
    n_pat = int(fp["n_patients"])
    n_test = max(round(0.2 * n_pat), 1 if n_pat >= 3 else 0)
    if n_test < 2:
        warnings.append(
            f"{n_pat} patients give a test split of {n_test} patient(s): confidence intervals, FID/KID and the "
            "memorisation threshold will be n/a (needs >= 2); add patients to measure anything"
        )
    elif n_test < 10:
        warnings.append(
            f"the test split has only {n_test} patients: every confidence interval will be wide; "
            "treat the validation numbers as a smoke test"
        )
    if n_pat < 3:
        warnings.append(f"{n_pat} patient(s) cannot fill train, val and test splits")

    # --- batch sizes and steps ------------------------------------------------------------------
    cap = 8 if device == "cpu" else 32
    ae_ch, unet_ch, cn_ch = preset["ae"]["channels"], preset["unet"]["channels"], preset["cn"]
    b_ae = _batch(voxels, ae_ch, mem, 4 if dims == 3 and device == "cpu" else cap)
    b_unet = _batch(latent_voxels, unet_ch, mem, 2 * cap)
    b_cn = _batch(latent_voxels, [*unet_ch, *cn_ch], mem, 2 * cap)
    b_seg = _batch(voxels, [16, 32, 64, 128], mem, 2 * cap)
    s_ae = _steps(budget_s, _SHARES["autoencoder"], b_ae, voxels, _cost("ae", dims, ae_ch, device), 50, 20000)
    s_unet = _steps(
        budget_s, _SHARES["diffusion"], b_unet, latent_voxels, _cost("unet", dims, unet_ch, device), 100, 50000
    )
    s_cn = _steps(budget_s, _SHARES["controlnet"], b_cn, latent_voxels, _cost("cn", dims, unet_ch, device), 100, 50000)
    notes["train"] = [
        f"batch sizes from an activation-memory estimate within half of {mem:g} GiB",
        f"steps fill ~{budget_s / 60:.0f} min ({int(100 * sum(_SHARES.values()))}% for the generative stages) "
        "at per-voxel costs measured on CPU"
        + (" / 40 (assumed CUDA speed-up, not measured)" if device == "cuda" else ""),
    ]

    def optim(steps: int, batch: int, lr: float, ema: float | None) -> dict[str, Any]:
        every = max(10, steps // 2)
        out: dict[str, Any] = {
            "steps": steps,
            "batch_size": batch,
            "lr": lr,
            "warmup_steps": max(1, steps // 20),
            "val_every": every,
            "ckpt_every": max(10, steps // 4),
        }
        if ema is not None:
            out["ema_decay"] = ema
        return out

    # --- QC -----------------------------------------------------------------------------------
    it = fp["intensity"]
    slices = (fp["cases_per_patient"] or {}).get("median", 1) > 1
    blank = any("constant" in p for p in fp["problems"])
    qc: dict[str, Any] = {"policy": "exclude" if (slices or blank or it["low_signal_cases"]) else "fail"}
    qc_notes = [
        f"policy {qc['policy']}: "
        + ("bad cases are dropped and listed" if qc["policy"] == "exclude" else "any bad case stops the run")
    ]
    if it["low_signal_cases"] and it["low_signal_threshold"]:
        qc["min_signal"] = float(it["low_signal_threshold"])
        qc_notes.append(
            f"min_signal {qc['min_signal']:g} = 20% of the median 99.5th percentile: "
            f"{it['low_signal_cases']} sampled images are near-empty"
        )
    notes["qc"] = qc_notes

    pre: dict[str, Any] = {
        "spatial_dims": dims,
        "spacing": spacing,
        "spatial_size": size,
        "intensity": {"method": "percentile", "lower": 0.5, "upper": 99.5, "within_foreground": True},
    }
    if dims == 3:
        pre["orientation"] = "RAS"
        pre["crop_mode"] = "whole"
    if lesion_only:
        anatomy = max(labels) + 1
        pre["derived_label"] = {"enabled": True, "name": "anatomy", "index": anatomy, "threshold": "otsu"}
        notes["preprocess"].append(
            f"masks are lesion-only: the image foreground (Otsu) is added as label {anatomy} 'anatomy' so the "
            "model is conditioned on the anatomy around the lesion"
        )

    data: dict[str, Any] = {"root": fp["root"], "layout": fp["layout"]["name"]}
    if fp["layout"]["name"] == "paired":
        for key in ("images_dir", "masks_dir", "mask_suffix"):
            if fp["layout"][key]:
                data[key] = fp["layout"][key]
    data["labels"] = labels
    if remap:
        data["label_remap"] = remap
    data["split"] = {"train": 0.7, "val": 0.1, "test": 0.2, "seed": 0}
    if fp["channels"] > 1:
        data["channels"] = channel_names_of(fp)
        warnings.append(
            f"{fp['channels']} channels per case, modelled jointly as data.channels {data['channels']} "
            "(names from dataset.json when it has them; set data.channel: K instead to model one contrast)"
        )

    cn: dict[str, Any] = {
        "network": {"conditioning_embedding_num_channels": cn_ch},
        "mask_dropout": 0.1,
        "train": optim(s_cn, b_cn, 5e-4 if device == "cpu" else 3e-4, 0.995),
    }
    if lesion is not None and lesion_only:
        cn["label_weights"] = {lesion: 4.0}
    raw: dict[str, Any] = {
        "name": name or safe_name(fp["root"]),
        "output_dir": output_dir,
        "seed": 0,
        "data": data,
        "qc": qc,
        "preprocess": pre,
        "autoencoder": {
            "network": {**preset["ae"], "num_res_blocks": 1, "attention_levels": [False] * len(ae_ch)},
            "train": optim(s_ae, b_ae, 1e-3 if dims == 3 else 5e-4, 0.99 if dims == 3 else 0.995),
            "kl_weight": 1e-6,
        },
        "diffusion": {
            "network": {**preset["unet"], "num_res_blocks": 1, "num_head_channels": 32},
            "objective": "v_prediction",
            "train": optim(s_unet, b_unet, 5e-4 if device == "cpu" else 3e-4, 0.995),
        },
        "controlnet": cn,
        "sampling": {"sampler": "dpmpp", "steps": 20, "guidance_scale": 1.5, "batch_size": max(b_unet, 1)},
        "segmenter": {
            "train": optim(
                _steps(budget_s, 0.1, b_seg, voxels, _cost("ae", dims, ae_ch, device), 200, 5000),
                b_seg,
                2e-3 if dims == 3 else 1e-3,
                None,
            )
        },
        "validation": {"max_cases": (24 if dims == 3 else 300) if device == "cpu" else None},
    }
    if lesion is not None:
        raw["synthesis"] = {"lesion_label": lesion}
    if dims == 3:
        raw["experiment"] = {
            "tasks": ["segmentation"],
            "fractions": [0.25, 1.0],
            "ratios": [0, 1],
            "seeds": [0],
            "arms": ["real"],
            "segmenter_steps": 150,
        }
    notes["header"] = [
        f"planned by `medsynth plan` for {device.upper()}, {mem:g} GiB, ~{budget_s / 60:.0f} min of training",
        f"dataset: {fp['n_cases']} cases, {n_pat} patients, {dims}D ({fp['layout']['why']})",
    ]
    return Plan(raw, to_yaml(raw, notes, warnings), warnings, notes)


_COMMENTED = ("data", "qc", "preprocess", "train")


def to_yaml(raw: dict[str, Any], notes: dict[str, list[str]], warnings: list[str]) -> str:
    """Commented YAML: a header (why, warnings), then each section with its reasons above it."""
    lines = [f"# {n}" for n in notes.get("header", [])]
    lines += [f"# WARNING: {w}" for w in warnings]
    lines.append("# Numbers marked as estimates come from rules in medsynth/planning.py; check them with a short run.")
    for key, value in raw.items():
        flow = None if isinstance(value, dict) else False  # top-level scalars as `key: value`
        text = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=flow, width=110).rstrip()
        reasons = notes.get(key, [])
        if key == "autoencoder":
            reasons = notes.get("train", [])
        if reasons:
            lines.append("")
            lines += [f"# {r}" for r in reasons]
        lines.append(text)
    return "\n".join(lines) + "\n"


def write_plan(plan: Plan, out: str | Path) -> Path:
    """Write the planned config (never over an existing file)."""
    from medsynth.errors import OutputExistsError
    from medsynth.fileio import write_text_atomic

    path = Path(out)
    if path.exists():
        raise OutputExistsError(path)
    return write_text_atomic(path, plan.yaml_text)

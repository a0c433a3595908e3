"""The validation report's text and flat metrics: the Markdown summary (external test set and per-channel
sections included) and the headline numbers logged as metrics, from the report dict."""

from __future__ import annotations

import math
from typing import Any

from medsynth.config.schema import MedsynthConfig
from medsynth.evaluation.stats import format_estimate, format_value

__all__ = ["external_md", "flat_metrics", "summary_md"]


def summary_md(cfg: MedsynthConfig, rep: dict[str, Any]) -> str:
    lines = [
        f"# Validation: {cfg.name}",
        "",
        f"Test items: {rep['n_items']} from {rep['n_patients']} patients; "
        f"sampler {cfg.sampling.sampler} x{cfg.sampling.steps}, guidance {cfg.sampling.guidance_scale}.",
        "",
        f"Autoencoder on the test split: PSNR {rep['autoencoder']['psnr_db']:.2f} dB, "
        f"SSIM {rep['autoencoder']['ssim']:.3f}."
        + "".join(
            f" {name} contrast kept by the reconstructions: {format_estimate(c['ratio'])} of the real images'."
            for name, c in (rep["autoencoder"].get("contrast") or {}).items()
        ),
        "",
        "## Plausibility (segmenter trained on real data)",
        "",
        "| label | Dice real | Dice synthetic | ratio synth/real | FP rate real | FP rate synth |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rep["plausibility"]["per_label"].items():
        fp_r, fp_s = r["fp_real"].get("value"), r["fp_synth"].get("value")
        lines.append(
            f"| {name} | {format_estimate(r['dice_real'])} | {format_estimate(r['dice_synth'])} | "
            f"{format_estimate(r['ratio'])} | "
            f"{format_value(fp_r)} | {format_value(fp_s)} |"
        )
    contrast = rep.get("contrast") or {}
    if contrast:
        lines += [
            "",
            "## Visibility: label contrast (mean inside the label minus the reference region's mean)",
            "",
            "| label | reference | contrast real | contrast synthetic | ratio synth/real | visible |",
            "|---|---|---|---|---|---|",
        ]
        for name, c in contrast.items():
            lines.append(
                f"| {name} | {c['reference']} | {format_estimate(c['contrast_real'])} | "
                f"{format_estimate(c['contrast_synth'])} | {format_estimate(c['ratio'])} | "
                f"{format_estimate(c['visible'])} |"
            )
        lines += [
            "",
            "visible: fraction of masks whose synthetic contrast has the real image's sign and at least half its "
            "size. A ratio means little where the real contrast is near 0.",
        ]
    rl, dv, mm = rep["realism"], rep["diversity"], rep["memorisation"]
    realism_na = rl.get("na", "n/a")
    reference_na = rl.get("reference_na", "n/a")
    lines += [
        "",
        "## Realism",
        "",
        f"- Fréchet distance {format_value(rl.get('fid'), 3, realism_na)}, "
        f"KID {format_value(rl.get('kid_mean'), 4, realism_na)} (in-domain encoder; {rl['note']})",
        "- reference (real test vs real train) Fréchet distance "
        f"{format_value(rl.get('reference_fid'), 3, reference_na)}, "
        f"KID {format_value(rl.get('reference_kid_mean'), 4, reference_na)}",
        "- per-label intensity Wasserstein (real vs synthetic, same masks): "
        + ", ".join(f"{v['name']} {format_value(v.get('wasserstein'))}" for v in rep["intensity_wasserstein"].values()),
        "",
        "## Diversity",
        "",
        f"- mean pairwise {dv.get('method', 'similarity')} among seeds of one mask: "
        f"{format_value(dv.get('mean'), 3, dv.get('na', 'n/a'))} (1 = identical)",
        "",
        "## Memorisation",
        "",
        f"- fraction of synthetic images closer to a training image than the {cfg.validation.memorisation_percentile}"
        f"th percentile of real test images: {format_value(mm.get('fraction_flagged'), 4, mm.get('na', 'n/a'))}",
    ]
    if rep.get("per_channel"):  # multi-contrast: the headline numbers above are channel 0 (realism: all channels)
        lines += [
            "",
            "## Per channel",
            "",
            "| channel | FID | KID | AE PSNR (dB) | lesion contrast ratio |",
            "|---|---|---|---|---|",
        ]
        for name, ch in rep["per_channel"].items():
            r = ch["realism"]
            first: dict[str, Any] = next(iter(ch["contrast"].values()), {})
            ratio = first.get("ratio")
            lines.append(
                f"| {name} | {format_value(r.get('fid'), 3, r.get('na', 'n/a'))} | "
                f"{format_value(r.get('kid_mean'), 4, r.get('na', 'n/a'))} | {ch['autoencoder_psnr_db']:.2f} | "
                f"{format_estimate(ratio) if isinstance(ratio, dict) else format_value(ratio)} |"
            )
    if rep.get("external"):
        lines += external_md(rep["external"])
    return "\n".join(lines) + "\n"


def external_md(ext: dict[str, Any]) -> list[str]:
    """The external test set's section of the summary (same measurements, reported separately)."""
    rl = ext["realism"]
    lines = [
        "",
        "## External test set",
        "",
        f"`{ext['source']}`: {ext['n_items']} items from {ext['n_patients']} patients, preprocessed with the same "
        "settings; never used for training or for choosing anything.",
        "",
        "| label | Dice real | Dice synthetic | ratio synth/real | FP rate real | FP rate synth |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in ext["plausibility"]["per_label"].items():
        lines.append(
            f"| {name} | {format_estimate(r['dice_real'])} | {format_estimate(r['dice_synth'])} | "
            f"{format_estimate(r['ratio'])} | {format_value(r['fp_real'].get('value'))} | "
            f"{format_value(r['fp_synth'].get('value'))} |"
        )
    for name, c in (ext.get("contrast") or {}).items():
        lines.append(f"\n{name} contrast synthetic/real: {format_estimate(c['ratio'])}.")
    lines.append(
        f"\nFréchet distance {format_value(rl.get('fid'), 3, rl.get('na', 'n/a'))}, "
        f"KID {format_value(rl.get('kid_mean'), 4, rl.get('na', 'n/a'))} (in-domain encoder)."
    )
    return lines


def flat_metrics(rep: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a validation report, as flat metric names."""
    m: dict[str, float] = {}
    for name, r in rep["plausibility"]["per_label"].items():
        for key in ("dice_real", "dice_synth", "ratio"):
            v = r.get(key, {}).get("value")
            if v is not None:
                m[f"val/{name}_{key}"] = float(v)
    for name, c in (rep.get("contrast") or {}).items():
        for key in ("contrast_real", "contrast_synth", "visible"):
            v = c[key].get("value")
            if v is not None:
                m[f"val/{name}_{key}"] = float(v)
        if c["ratio"].get("value") is not None:
            m[f"val/{name}_contrast_ratio"] = float(c["ratio"]["value"])
    for name, c in (rep["autoencoder"].get("contrast") or {}).items():
        if c["ratio"].get("value") is not None:
            m[f"val/ae_{name}_contrast_ratio"] = float(c["ratio"]["value"])
    m["val/ae_psnr_db"] = float(rep["autoencoder"]["psnr_db"])
    m["val/ae_ssim"] = float(rep["autoencoder"]["ssim"])
    optional = {
        "val/fid_in_domain": rep["realism"].get("fid"),
        "val/kid_in_domain": rep["realism"].get("kid_mean"),
        "val/diversity": rep["diversity"].get("mean"),
        "val/memorised_fraction": rep["memorisation"].get("fraction_flagged"),
    }
    ext = rep.get("external")
    if ext:
        for name, r in ext["plausibility"]["per_label"].items():
            for key in ("dice_real", "dice_synth", "ratio"):
                optional[f"val/external_{name}_{key}"] = r.get(key, {}).get("value")
            optional[f"val/external_{name}_fp_synth"] = r["fp_synth"].get("value")
        for name, c in (ext.get("contrast") or {}).items():
            optional[f"val/external_{name}_contrast_ratio"] = c["ratio"].get("value")
        optional["val/external_fid_in_domain"] = ext["realism"].get("fid")
    for name, v in optional.items():  # "n/a" measurements (too few items) are not logged as metrics
        if v is not None and math.isfinite(float(v)):
            m[name] = float(v)
    return m

"""The whitepaper's counterfactual-editing and site-adaptation sections, rendered from the tracked stage reports."""

from __future__ import annotations

from typing import Any

from medsynth.evaluation.stats import format_value
from medsynth.report.collect import ExperimentResults
from medsynth.report.tables import md_table, no_run_line, num, run_ref


def _f(v: Any) -> str:
    return format_value(v, 3, missing="–")  # a rate or ratio of 1 prints 1.000 (num() prints counts)


def _ci(e: dict[str, Any] | None) -> str:
    """``value [lo, hi]`` of a bootstrap estimate (``Estimate.to_json``); n/a without a value."""
    if not e or e.get("value") is None:
        return "n/a"
    if e.get("lo") is None or e.get("hi") is None:
        return f"{_f(e['value'])} (n/a CI: too few patients)"
    return f"{_f(e['value'])} [{_f(e['lo'])}, {_f(e['hi'])}]"


def counterfactual_section(res: ExperimentResults) -> list[str]:
    """Per-edit SSIM outside the edit region, lesion Dice ratio vs plain synthesis, lesion found after removal.

    Args:
        res: Collected results (``res.counterfactual`` is the stage's ``counterfactual.json``).

    Returns:
        Markdown lines; one n/a line when the stage did not run or edited nothing.
    """
    rep, run = res.counterfactual, res.stage("counterfactual")
    if rep is None or run is None:
        return [no_run_line("counterfactual")]
    if rep.get("na"):
        return [f"Run {run_ref(run.run_id)}: n/a ({rep['na']})."]
    t, s, st = rep.get("targets") or {}, rep.get("summary") or {}, rep.get("settings") or {}
    rows = []
    for spec, e in (rep.get("per_edit") or {}).items():
        removal = "fp_rate_removed" in e
        rows.append(
            [
                f"`{spec}`",
                str(e.get("n", "")),
                _ci(e.get("ssim_outside")),
                "—" if removal else _ci(e.get("dice_ratio")),
                f"{_ci(e.get('fp_rate_removed'))} (real scan before the edit {_ci(e.get('found_rate_real'))}; "
                f"plain synthesis {_ci(e.get('fp_rate_plain'))})"
                if removal
                else "—",
            ]
        )
    skipped = rep.get("skipped") or {}
    return [
        f"Run {run_ref(run.run_id)}: {rep['n_edits']} edits of {rep['n_scans']} lesion-bearing test scans "
        f"(DDIM inversion with the original mask, {st.get('steps')} steps, guidance {st.get('guidance_scale')}; "
        f"regeneration with the edited mask, latents blended back outside the edit region dilated by "
        f"{st.get('dilate')} latent voxels). SSIM outside the edit region is measured against the scan's autoencoder "
        "round trip; the lesion Dice ratio is the reference segmenter's Dice against the edited mask over its Dice "
        "on plain synthesis from the same mask; after removal, the fraction of scans where it still finds a lesion "
        f"where the lesion was (more than {res.cfg('counterfactual.fp_min_voxels', 5)} predicted lesion voxels inside "
        "its voxels), beside the same on the real "
        "scan before the edit and on plain synthesis from the lesion-free mask. "
        "Patient-bootstrap 95% CIs.",
        "",
        *md_table(["edit", "n", "SSIM outside", "lesion Dice ratio", "lesion found after removal"], rows),
        "",
        f"Over all edits: SSIM outside {num(s.get('ssim_outside'))} (target >= {t.get('min_ssim_outside')}: "
        f"{_met(s.get('ssim_met'))}); lesion Dice ratio {num(s.get('dice_ratio'))} (target >= "
        f"{t.get('min_dice_ratio')}: {_met(s.get('dice_met'))})."
        + (f" Skipped (edit impossible on that mask): {skipped}." if skipped else ""),
    ]


def _met(flag: Any) -> str:
    return "n/a" if flag is None else ("met" if float(flag) >= 1 else "**missed**")


def adaptation_section(res: ExperimentResults) -> list[str]:
    """None vs LoRA vs full fine-tuning on the held-out site, from the adaptation stage's report.

    Args:
        res: Collected results (``res.adaptation`` is the stage's ``adaptation.json``).

    Returns:
        Markdown lines; one n/a line when the stage did not run for this config.
    """
    rep, run = res.adaptation, res.stage("adaptation")
    if rep is None or run is None:
        return [no_run_line("adaptation")]
    ev = (rep.get("patients") or {}).get("evaluation") or []
    rows = []
    for r in rep.get("rows") or []:
        ratio = "n/a" if r.get("dice_ratio") is None else num(r["dice_ratio"])
        if r.get("dice_ratio_lo") is not None:
            ratio += f" [{num(r['dice_ratio_lo'])}, {num(r['dice_ratio_hi'])}]"
        rows.append(
            [
                str(r.get("k")),
                str(r.get("method")),
                f"{int(r['trainable_params']):,}" if r.get("trainable_params") is not None else "n/a",
                num(r.get("adapt_seconds"), 1),
                ratio,
                num(r.get("fid")),
            ]
        )
    return [
        f"Run {run_ref(run.run_id)}: the generator was trained without site {rep.get('site')} and adapted to it "
        f"from k of its patients; every row is scored on the site's other {len(ev)} patients (lesion Dice ratio "
        f"with patient-bootstrap 95% CI; Fréchet distance to the site's real images in the in-domain feature space, "
        f"real-real floor {num(rep.get('fid_real_floor'))}). {rep.get('note') or ''}".rstrip(),
        "",
        *md_table(["k", "method", "trainable params", "adapt s", "lesion Dice ratio", "FD to site"], rows),
    ]

"""Text of the analysis stage: its headline metrics and the Markdown of the latent map and the bias tables.

The same functions render the stage's ``analysis_summary.md`` and the whitepaper's section (from the
tracked ``analysis_report.json``), so both always say the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from medsynth.evaluation.stats import format_estimate


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _cell(e: dict[str, Any]) -> str:
    return str(e["na"]) if e.get("na") else format_estimate(e)


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Headline numbers: coverage/recall/precision of the latent map and the count of flagged subgroups."""
    m: dict[str, float] = {}
    cov = report.get("latent_map") or {}
    for k in ("coverage", "recall", "recall_reference", "nn_synthetic", "precision", "precision_reference", "tau"):
        v = cov.get(k)
        if v is not None and math.isfinite(float(v)):
            m[f"analysis/{k}"] = float(v)
    plaus = report.get("plausibility") or []
    down = (report.get("downstream") or {}).get("rows") or []
    m["analysis/n_flagged_plausibility"] = float(sum(1 for r in plaus if r["flags"]))
    m["analysis/n_flagged_downstream"] = float(sum(1 for r in down if r["flags"]))
    his = [r["dice_ratio"].get("hi") for r in plaus if r["grouping"] != "all"]
    his = [float(h) for h in his if h is not None]
    if his:
        m["analysis/min_subgroup_dice_ratio_hi"] = min(his)
    return m


def latent_map_lines(report: dict[str, Any]) -> list[str]:
    """The reading of the latent map and its numbers (n/a when not computed)."""
    cov = report.get("latent_map") or {}
    if not cov:
        return ["_The latent map was not computed._"]
    lines = [str(cov.get("reading") or "")]
    if not cov.get("na"):
        lines += [
            "",
            f"Embedding: {cov.get('embedding', 'features')}; {cov['n_test']} real test, {cov['n_train']} real train, "
            f"{cov['n_synthetic']} synthetic items (from training masks). Radius tau = {cov['tau']:.4g} = the "
            f"{cov['quantile']:g} quantile of the test items' nearest-real-train distances; nearest-neighbour "
            f"synthetic without radius: {cov['nn_synthetic']:.3f}.",
        ]
    if cov.get("umap") and cov["umap"] != "drawn":
        lines += ["", f"UMAP: {cov['umap']}."]
    return lines


def plausibility_table(report: dict[str, Any]) -> list[str]:
    """Per subgroup: lesion Dice ratio, FP rates, contrast ratio (CIs) and flags."""
    rows = []
    for r in report.get("plausibility") or []:
        rows.append(
            [
                r["grouping"],
                r["group"],
                f"{r['n_items']} / {r['n_patients']}",
                _cell(r["dice_ratio"]),
                _cell(r["fp_real"]),
                _cell(r["fp_synth"]),
                _cell(r["contrast_ratio"]),
                "**" + "; ".join(r["flags"]) + "**" if r["flags"] else "–",
            ]
        )
    if not rows:
        return ["_No plausibility subgroup._"]
    return _table(
        [
            "grouping",
            "group",
            "items / patients",
            "lesion Dice ratio synth/real",
            "FP rate real",
            "FP rate synth",
            "contrast ratio",
            "flag",
        ],
        rows,
    )


def downstream_table(report: dict[str, Any], all_fractions: bool = False) -> list[str]:
    """Per task, arm and ratio (the largest real fraction unless ``all_fractions``): score per subgroup and flags."""
    down = report.get("downstream") or {}
    if down.get("na"):
        return [str(down["na"])]
    rows_in = down.get("rows") or []
    if not rows_in:
        return ["_No downstream cell to slice._"]
    top = {t: max(r["fraction"] for r in rows_in if r["task"] == t) for t in {r["task"] for r in rows_in}}
    rows = []
    for r in rows_in:
        if not all_fractions and r["fraction"] != top[r["task"]]:
            continue
        rows.append(
            [
                r["task"],
                r["arm"],
                f"{r['fraction']:g}",
                str(r["ratio"]),
                f"{r['grouping']}: {r['group']}",
                r["metric"],
                _cell(r["score"]),
                "**" + "; ".join(r["flags"]) + "**" if r["flags"] else "–",
            ]
        )
    return _table(["task", "arm", "real fraction", "synthetic ratio", "subgroup", "metric", "value [CI]", "flag"], rows)


def summary_markdown(name: str, report: dict[str, Any]) -> str:
    """``analysis_summary.md``."""
    edges = report.get("size_edges")
    t = report.get("targets") or {}
    lines = [
        f"# Analysis: {name}",
        "",
        "## Latent map",
        "",
        *latent_map_lines(report),
        "",
        "## Bias: plausibility per subgroup",
        "",
        f"{report['n_items']} test items from {report['n_patients']} patients; lesion label "
        f"{report['lesion_label']}. Sites from the patient id with `{report.get('site_pattern')}`"
        + (f"; lesion-size tertile edges {edges[0]:g} / {edges[1]:g} voxels" if edges else "")
        + f". Flagged: CI upper bound below the target (Dice ratio {t.get('dice_ratio')}, contrast ratio "
        f"{t.get('contrast_ratio')}).",
        "",
        *plausibility_table(report),
        "",
        "## Bias: downstream task models per subgroup",
        "",
        "Flagged: CI upper bound below the same models' score on the whole test set.",
        "",
        *downstream_table(report, all_fractions=True),
    ]
    return "\n".join(lines) + "\n"

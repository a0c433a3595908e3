"""Build the whitepaper (Markdown, plus HTML when the ``markdown`` package is present) from tracked runs.

Every table and figure is rendered from :class:`~medsynth.report.collect.ExperimentResults` (read from
the MLflow store) and, for the sampler trade-off, from benchmark JSON written by ``benchmarks/``; each
table names the run ids (or the benchmark command) its numbers come from. Nothing measured is typed
by hand: re-running the command regenerates the document.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsynth.errors import DataError
from medsynth.evaluation.stats import format_estimate
from medsynth.fileio import write_text_atomic
from medsynth.report import prose
from medsynth.report.analysis import analysis_section
from medsynth.report.benchmarks import guidance_section, sampler_section
from medsynth.report.collect import ExperimentResults, collect
from medsynth.report.edits_adaptation import adaptation_section, counterfactual_section
from medsynth.report.tables import duration, md_table, num, run_ref

log = logging.getLogger(__name__)

WHITEPAPER_MD = "whitepaper.md"
WHITEPAPER_HTML = "whitepaper.html"

TRAIN_STAGES = {
    "autoencoder": ("autoencoder", ["ae/val_l1", "ae/val_psnr", "ae/train_l1", "ae/scale_factor"]),
    "unet": ("diffusion", ["unet/val_loss", "unet/train_loss"]),
    "controlnet": ("controlnet", ["controlnet/val_loss", "controlnet/train_loss"]),
    "segmenter": ("segmenter", ["segmenter/val_dice", "segmenter/train_loss"]),
    "features": ("validation.features", ["features/val_mse", "features/train_loss"]),
}
"""Trained stage -> (config section of its optimiser, metrics shown in the training table)."""


def _env(res: ExperimentResults) -> str:
    t = res.record.parent.tags
    if "medsynth.env.device" not in t:
        return "not recorded by this run"
    return (
        f"{t['medsynth.env.device']}, {t.get('medsynth.env.cpus', '?')} CPUs "
        f"({t.get('medsynth.env.torch_threads', '?')} torch threads), torch {t.get('medsynth.env.torch', '?')}, "
        f"{t.get('medsynth.env.platform', '?')}"
    )


def data_section(results: Sequence[ExperimentResults]) -> list[str]:
    """Table of datasets: source, dimensionality, size after preprocessing, items and labels."""
    rows = []
    for r in results:
        pre = r.stage("preprocess")
        labels = r.cfg("data.labels", {}) or {}
        derived = r.cfg("preprocess.derived_label", {}) or {}
        if derived.get("enabled"):
            labels = {**labels, str(derived.get("index")): f"{derived.get('name')} (derived)"}
        size = "x".join(str(s) for s in r.cfg("preprocess.spatial_size", []) or [])
        spacing = r.cfg("preprocess.spacing")
        rows.append(
            [
                f"**{r.name}**",
                "phantom (procedural)" if r.cfg("phantom.enabled") else str(Path(str(r.cfg("data.root", ""))).name),
                f"{r.cfg('preprocess.spatial_dims')}D {size}"
                + (f" @ {'x'.join(num(float(s), 2) for s in spacing)} mm" if spacing else ""),
                num(pre.metrics.get("n_cases"), 0) if pre else "–",
                num(pre.metrics.get("n_items"), 0) if pre else "–",
                num(pre.metrics.get("n_excluded"), 0) if pre else "–",
                ", ".join(f"{k} {v}" for k, v in labels.items()),
                run_ref(pre.run_id) if pre else "–",
            ]
        )
    return md_table(["config", "data", "model input", "cases", "items", "excluded (QC)", "labels", "run"], rows)


def training_section(res: ExperimentResults) -> list[str]:
    """Per trained stage: steps, batch size, wall time and final metrics."""
    rows = []
    for stage, (section, keys) in TRAIN_STAGES.items():
        run = res.stage(stage)
        if run is None:
            continue
        metrics = ", ".join(f"{k.split('/')[-1]} {num(run.metrics[k], 4)}" for k in keys if k in run.metrics)
        cached = run.tags.get("medsynth.cached") == "true"
        rows.append(
            [
                stage,
                num(res.cfg(f"{section}.train.steps")),
                num(res.cfg(f"{section}.train.batch_size")),
                duration(run.wall_s) + (" (cached)" if cached else ""),
                metrics or "–",
                run_ref(run.run_id),
            ]
        )
    for stage in ("latents", "synthesize", "validate", "experiment"):
        run = res.stage(stage)
        if run is not None:
            rows.append([stage, "–", "–", duration(run.wall_s), "–", run_ref(run.run_id)])
    return [
        f"Hardware: {_env(res)}. Objective `{res.cfg('diffusion.objective')}`, sampler "
        f"`{res.cfg('sampling.sampler')}` x{res.cfg('sampling.steps')} steps, guidance "
        f"{res.cfg('sampling.guidance_scale')}.",
        "",
        *md_table(["stage", "steps", "batch", "wall time", "final metrics", "run"], rows),
    ]


def plausibility_section(res: ExperimentResults) -> list[str]:
    """Segmenter Dice real vs synthetic per label with bootstrap CIs, FP rates, and the AE quality."""
    val = res.validation
    run = res.stage("validate")
    if val is None or run is None:
        return ["_Validation did not run for this config._"]
    ae = val.get("autoencoder", {})
    out = [
        f"{val['n_items']} test items from {val['n_patients']} test patients (run {run_ref(run.run_id)}). "
        f"Autoencoder reconstruction on the test split: PSNR {num(ae.get('psnr_db'), 2)} dB, SSIM "
        f"{num(ae.get('ssim'))}."
        + "".join(
            f" Its reconstructions keep {format_estimate(c['ratio'])} of the real {name} contrast."
            for name, c in (ae.get("contrast") or {}).items()
        ),
        "",
    ]
    rows = []
    for name, r in val["plausibility"]["per_label"].items():
        rows.append(
            [
                name,
                format_estimate(r["dice_real"]),
                format_estimate(r["dice_synth"]),
                format_estimate(r["ratio"]),
                num(r.get("fp_real", {}).get("value")),
                num(r.get("fp_synth", {}).get("value")),
            ]
        )
    out += md_table(
        ["label", "Dice on real", "Dice on synthetic", "ratio synth/real", "FP rate real", "FP rate synth"], rows
    )
    out += [
        "",
        "Dice values are means over test items holding the label, with 95% bootstrap intervals over patients; "
        "the FP rate is the fraction of items WITHOUT the label in which the segmenter finds it.",
    ]
    contrast = val.get("contrast") or {}
    if contrast:
        crow = [
            [
                name,
                str(c["reference"]),
                format_estimate(c["contrast_real"]),
                format_estimate(c["contrast_synth"]),
                format_estimate(c["ratio"]),
                format_estimate(c["visible"]),
            ]
            for name, c in contrast.items()
        ]
        out += [
            "",
            "Visibility without a segmenter: the contrast of the lesion label (mean intensity inside it minus the mean "
            "of the reference region, intensities in [0, 1]) on the real image and on the synthetic image of the "
            "same mask; _visible_ = fraction of masks whose synthetic contrast has the real sign and at least half "
            "its size.",
            "",
            *md_table(["label", "reference", "contrast real", "contrast synthetic", "ratio", "visible"], crow),
        ]
    return out


def realism_section(res: ExperimentResults) -> list[str]:
    """Fréchet distance/KID (in-domain), intensity Wasserstein, diversity and memorisation."""
    val = res.validation
    if val is None:
        return []
    rl, dv, mm = val["realism"], val["diversity"], val["memorisation"]
    wass = ", ".join(
        f"{v['name']} {num(v.get('wasserstein'), 4)}" for v in val.get("intensity_wasserstein", {}).values()
    )
    rows = [
        ["Fréchet distance, real test vs synthetic", num(rl.get("fid")), "in-domain encoder (not Inception)"],
        ["  reference: real test vs real train", num(rl.get("reference_fid")), "the floor a perfect generator reaches"],
        ["KID, real test vs synthetic", num(rl.get("kid_mean"), 4), ""],
        ["  reference: real test vs real train", num(rl.get("reference_kid_mean"), 4), ""],
        ["intensity Wasserstein per label", wass or "–", "images in [0, 1]"],
        [f"diversity: mean pairwise {dv.get('method', 'MS-SSIM')} among seeds", num(dv.get("mean")), "1 = identical"],
        [
            "memorisation: fraction flagged",
            num(mm.get("fraction_flagged"), 4),
            f"closer to a training image than the {mm.get('percentile', 1)}th percentile of real test images",
        ],
    ]
    return md_table(["measure", "value", "note"], rows)


def _task_of(row: dict[str, Any]) -> str:
    """The task of a summary row (rows written before the tasks list have no ``task``: AUROC = presence)."""
    task = row.get("task")
    if task:
        return str(task)
    return "presence" if row.get("auroc_mean") not in (None, "") else "segmentation"


def downstream_section(res: ExperimentResults) -> list[str]:
    """The grid summary per task: metric per (arm, fraction, ratio) with CIs and the paired comparison."""
    from medsynth.evaluation.experiment_report import arm_label, real_only_growth, row_from_flat

    rows_in = res.experiment_rows
    run = res.stage("experiment")
    if not rows_in or run is None:
        return ["_The downstream experiment did not run for this config._"]
    cells = res.record.cells
    n_all = int(run.metrics.get("exp/n_cells", len(cells)))
    reused = n_all - len(cells)
    earlier = (
        "recorded by an earlier run with the same inputs (the same seeds give the same cells) and reused from the "
        "cell ledger; their tracked runs are under that run's experiment run"
    )
    if reused <= 0:
        where = f"each its own tracked run under the experiment run {run_ref(run.run_id)}"
    elif cells:
        where = (
            f"{len(cells)} trained by this run, each its own tracked run under the experiment run "
            f"{run_ref(run.run_id)}; the other {reused} {earlier}"
        )
    else:
        where = f"0 trained by experiment run {run_ref(run.run_id)}: all {earlier}"
    out = [
        f"{n_all} grid cells ({where}); each cell trains until its validation score stops improving (at most "
        f"{res.cfg('experiment.train.steps')} classifier steps) and keeps its best-on-validation weights.",
        "",
    ]
    for task in dict.fromkeys(_task_of(r) for r in rows_in):
        metric = "auroc" if task == "presence" else "dice"
        label = "AUROC" if metric == "auroc" else "Dice"
        rows = []
        for r in (r for r in rows_in if _task_of(r) == task):
            arm = arm_label(str(r["arm"]), int(r["ratio"] or 0))
            delta = "–"
            if r.get("delta_vs_real") not in (None, ""):
                delta = f"{num(r['delta_vs_real'])} [{num(r.get('delta_lo'))}, {num(r.get('delta_hi'))}]"
                delta += " †" if r.get("baseline") == "real_classical" else ""
            rows.append(
                [
                    arm,
                    f"{100 * float(r['fraction']):g}%",
                    num(r.get("n_real_patients"), 0),
                    num(r.get("n_real"), 0),
                    num(r.get("n_synthetic"), 0),
                    f"{num(r.get(f'{metric}_mean'))} ± {num(r.get(f'{metric}_sd'))}",
                    f"[{num(r.get('ci_lo'))}, {num(r.get('ci_hi'))}]",
                    delta,
                    num(r.get("p_value"), 4),
                    num(r.get("p_holm"), 4),
                ]
            )
        what = "tumour/lesion presence per image" if task == "presence" else "segmentation"
        out += [f"Task: {what}.", ""]
        try:
            growth = real_only_growth([row_from_flat(r) for r in rows_in if _task_of(r) == task], task)
            out += [f"Real-only check: {growth.message}", ""]
        except ValueError:  # a summary written by an older version without the fields the check needs
            pass
        out += [
            *md_table(
                [
                    "arm",
                    "real fraction",
                    "patients",
                    "n real (mean over seeds)",
                    "n synthetic",
                    f"{label} mean ± sd (seeds)",
                    "95% CI",
                    f"Δ {label} vs baseline [95% CI]",
                    "p",
                    "p (Holm, across fractions)",
                ],
                rows,
            ),
            "",
            "Δ is against real only (ratio 0) of the same fraction; † marks synthetic data on top of classical "
            "augmentation, compared with classical augmentation alone.",
            "",
        ]
    return out


def _lesion_label(per_label: dict[str, Any]) -> str | None:
    from medsynth.synthesis.edits import LESION_NAME

    return next((name for name in per_label if LESION_NAME.search(name)), None)


def findings_section(results: Sequence[ExperimentResults]) -> list[str]:
    """The headline checks per config: lesion Dice ratio vs 0.95, downstream Δ at 10% real (CI excludes 0?)."""
    rows = []
    for res in results:
        val = res.validation
        if val is not None:
            per = val["plausibility"]["per_label"]
            name = _lesion_label(per)
            if name is not None:
                ratio = per[name]["ratio"]
                met = ratio.get("value") is not None and ratio["value"] >= 0.95
                rows.append(
                    [
                        res.name,
                        f"{name}: synthetic/real Dice ratio ≥ 0.95",
                        format_estimate(ratio),
                        "met" if met else "not met",
                    ]
                )
                c = (val.get("contrast") or {}).get(name)
                if c is not None:
                    rows.append(
                        [
                            res.name,
                            f"{name}: visible where the mask says (fraction of masks; contrast ratio synth/real)",
                            format_estimate(c["visible"]),
                            f"contrast {format_estimate(c['ratio'])} x real",
                        ]
                    )
        for r in res.experiment_rows:
            if r["arm"] not in ("real", "real_classical") or not r["ratio"] or abs(float(r["fraction"]) - 0.1) > 1e-9:
                continue
            if r.get("delta_vs_real") in (None, ""):
                continue
            lo, hi = r.get("delta_lo"), r.get("delta_hi")
            excl = lo is not None and hi is not None and (lo > 0 or hi < 0)
            sign = "gain" if excl and lo is not None and lo > 0 else ("loss" if excl else "no significant change")
            rows.append(
                [
                    res.name,
                    f"Δ {_task_of(r)} metric at 10% real, + {r['ratio']}x synthetic"
                    + (" on top of classical aug. (vs classical alone)" if r["arm"] == "real_classical" else "")
                    + " (CI excludes 0?)",
                    f"{num(r['delta_vs_real'])} [{num(lo)}, {num(hi)}]",
                    sign,
                ]
            )
    if not rows:
        return ["_No validation or downstream result to summarise._"]
    return md_table(["config", "check", "value [95% CI]", "outcome"], rows)


def _figure(res: ExperimentResults, key: str, caption: str) -> list[str]:
    """An image with its caption; ``key`` is a figure name or, ending in ``*``, a prefix."""
    if key.endswith("*"):
        key = next((k for k in sorted(res.figures) if k.startswith(key[:-1])), "")
    path = res.figures.get(key)
    return [f"![{caption}]({path})", "", f"*{caption}*", ""] if path else []


def render(
    results: Sequence[ExperimentResults], bench_dir: Path | None, command: str, figures_dir: Path | None = None
) -> str:
    """The whitepaper as Markdown (benchmark figures are copied into ``figures_dir`` when given)."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    uris = sorted({r.record.tracking_uri for r in results})
    lines = [
        "# Mask-conditioned MRI synthesis at small scale: does it help a model trained on limited real data?",
        "",
        f"_Generated {now} by `{command}` from the MLflow store {', '.join(f'`{u}`' for u in uris)}. Every "
        "number below is read from a tracked run whose id (first 8 characters) is given next to it, or from "
        "a benchmark JSON named with its command. Do not edit by hand: re-run the command._",
        "",
        "## Findings at a glance",
        "",
        *findings_section(results),
        "",
        "Targets set before the runs: a synthetic/real Dice ratio of at least 0.95 for the lesion/tumour label, "
        "and a downstream gain at 10% real data whose 95% interval excludes 0. Sections 4 and 5 give the "
        "evidence and what limits it.",
        "",
        "## 1. Question",
        "",
        prose.QUESTION,
        "",
        "## 2. Data",
        "",
        *data_section(results),
        "",
        "LGG FLAIR: TCGA-LGG slices with tumour masks (Buda et al.); hippocampus: Medical Segmentation Decathlon "
        "task 4 (anterior/posterior hippocampus); phantom: procedural images generated by the project (not "
        "anatomy). Splits are by patient, fixed per config.",
        "",
        "## 3. Methods",
        "",
        prose.METHODS,
        "",
        "## 4. Results",
        "",
    ]
    for i, res in enumerate(results, 1):
        lines += [
            f"### 4.{i} {res.name}",
            "",
            (
                "Stages run one at a time (no pipeline run); each number cites the latest finished run of its stage"
                if res.record.stage_only
                else f"Pipeline run {run_ref(res.record.parent.run_id)} ({res.record.parent.name})"
            )
            + "; registered models: "
            + (", ".join(f"`{m}`" for m in res.record.models) or "none")
            + ".",
            "",
            "**Training.**",
            "",
            *training_section(res),
            "",
            *_figure(res, "controlnet/controlnet", f"{res.name}: ControlNet samples (image | mask | synthetic)"),
            "**Plausibility.**",
            "",
            *plausibility_section(res),
            "",
            *_figure(
                res,
                "validation/real_vs_synthetic",
                f"{res.name}: real test images and synthetic images generated from their masks",
            ),
            *_figure(res, "validation/worst_cases", f"{res.name}: the 5 worst synthetic cases by Dice"),
            "**Realism, diversity, memorisation.**",
            "",
            *realism_section(res),
            "",
            *_figure(
                res,
                "validation/closest_pairs",
                f"{res.name}: synthetic images and their nearest training images (memorisation audit)",
            ),
            "**Downstream augmentation.**",
            "",
            *downstream_section(res),
            "",
            *_figure(res, "experiment/*", f"{res.name}: downstream metric vs real-data fraction"),
            "**Latent map and bias.**",
            "",
            *analysis_section(res),
            "",
            *_figure(
                res,
                "analysis/latent_map",
                f"{res.name}: UMAP of real train, real test and synthetic items (by set, lesion, lesion size, site)",
            ),
            "**Counterfactual edits of real test scans.**",
            "",
            *counterfactual_section(res),
            "",
            *_figure(
                res,
                "counterfactual/counterfactual",
                f"{res.name}: counterfactual edits (original | edited mask | result | difference)",
            ),
            "**Site adaptation.**",
            "",
            *adaptation_section(res),
            "",
        ]
    lines += [
        f"### 4.{len(results) + 1} Sampler speed and quality",
        "",
        *sampler_section(bench_dir),
        "",
        f"### 4.{len(results) + 2} Guidance scale: visible where the mask says, nowhere else?",
        "",
        *guidance_section(bench_dir, figures_dir),
        "",
        "## 5. Limitations",
        "",
        prose.LIMITATIONS,
        "",
        "## 6. Context: published work",
        "",
        prose.CONTEXT,
        "",
        "## Appendix: runs",
        "",
    ]
    for res in results:
        lines.append(
            f"- **{res.name}**: "
            + ("stages run one at a time" if res.record.stage_only else f"pipeline `{res.record.parent.run_id}`")
            + "; "
            + "; ".join(f"{r.stage or r.name} `{r.run_id}`" for r in res.ordered_stages())
        )
    return "\n".join(lines) + "\n"


def _html(md_text: str, title: str) -> str | None:
    try:
        import markdown
    except ImportError:
        return None
    body = markdown.markdown(md_text, extensions=["tables"])
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.45}"
        "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:.25em .5em}"
        "img{max-width:100%}code{background:#f4f4f4}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head>"
        f"<body>{body}</body></html>\n"
    )


def build_whitepaper(
    tracking_uri: str,
    experiments: Sequence[str],
    out_dir: str | Path,
    bench_dir: str | Path | None = None,
    command: str = "medsynth report",
    run_ids: dict[str, str] | None = None,
    skip_missing: bool = False,
) -> Path:
    """Collect the latest finished pipeline run of each experiment and write the whitepaper.

    Args:
        tracking_uri: MLflow tracking URI holding the runs.
        experiments: Experiment (config) names, in the order they appear.
        out_dir: Output folder (``whitepaper.md``, ``whitepaper.html`` when possible, ``figures/``).
        bench_dir: Folder of benchmark JSON results (``benchmarks/results``); None skips that section.
        command: The command line quoted in the document.
        run_ids: Experiment -> a specific pipeline (parent) run, e.g. one still running (its report stage).
        skip_missing: Leave out (and name in the document) experiments without a finished pipeline run
            instead of failing.

    Returns:
        Path of the Markdown file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[ExperimentResults] = []
    missing: list[str] = []
    for name in experiments:
        try:
            results.append(collect(tracking_uri, name, out, run_id=(run_ids or {}).get(name)))
        except DataError as exc:
            if not skip_missing:
                raise
            log.warning("left out of the report: %s", exc)
            missing.append(f"{name} ({exc.problem})")
    text = render(results, Path(bench_dir) if bench_dir else None, command, out / "figures")
    if missing:
        text += "\n_Not reported (no finished pipeline run in the store): " + "; ".join(missing) + "._\n"
    md = write_text_atomic(out / WHITEPAPER_MD, text)
    html = _html(text, "medsynth whitepaper")
    if html is not None:
        write_text_atomic(out / WHITEPAPER_HTML, html)
    log.info("whitepaper written to %s (%d experiments)", md, len(results))
    return md

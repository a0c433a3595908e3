"""The site-adaptation experiment: none vs LoRA vs full fine-tuning on a site the generator never saw.

For each adaptation size ``k`` the generator is adapted on ``k`` patients of the target site and
every method is measured on the site's remaining patients (the same evaluation patients for every
``k`` and method): the plausibility Dice ratio of the lesion (reference segmenter on synthetic vs
real images of the same masks, patient-bootstrap CI), the Fréchet distance of the in-domain
features of the synthetic images to those of the site's real images, the trainable parameters and
the adaptation wall time. Finished cells are recorded in the stage's ledger, so a killed run
resumes with the next cell.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth.adaptation.adapt import AdaptSettings, adapt_generator, encode_for_adaptation
from medsynth.adaptation.sites import split_site
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet, load_split
from medsynth.fileio import write_json_atomic, write_text_atomic
from medsynth.ledger import ItemLedger
from medsynth.progress import NullProgress, Progress
from medsynth.tracking.base import NullTracker, Tracker

log = logging.getLogger(__name__)
TABLE_CSV, TABLE_MD, REPORT_JSON = "adaptation.csv", "adaptation.md", "adaptation.json"
COLUMNS = (
    "k",
    "method",
    "trainable_params",
    "adapt_seconds",
    "dice_ratio",
    "dice_ratio_lo",
    "dice_ratio_hi",
    "dice_synth",
    "dice_real",
    "fid",
    "n_eval_items",
    "n_eval_patients",
)


def _items_of(data: ArraySet, patients: tuple[str, ...], max_items: int | None = None) -> ArraySet:
    keep = set(patients)
    idx = [i for i, p in enumerate(data.patients) if p in keep]
    if max_items is not None and len(idx) > max_items:
        idx = [idx[int(j)] for j in np.unique(np.linspace(0, len(idx) - 1, max_items).round().astype(np.int64))]
    return data.subset(idx)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(float(x)) else None


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def table_markdown(rows: list[dict[str, Any]], site: str, note: str) -> str:
    """The result table as Markdown (n/a where a value could not be computed)."""
    head = "| k | method | trainable params | adapt s | lesion Dice ratio [CI] | FD to site | eval items (patients) |"
    lines = [f"# Site adaptation to {site}", "", note, "", head, "|" + "---|" * 7]
    for r in rows:
        ci = f" [{_fmt(r['dice_ratio_lo'])}, {_fmt(r['dice_ratio_hi'])}]" if r["dice_ratio"] is not None else ""
        lines.append(
            f"| {r['k']} | {r['method']} | {r['trainable_params']} | {_fmt(r['adapt_seconds'])} | "
            f"{_fmt(r['dice_ratio'])}{ci} | {_fmt(r['fid'])} | {r['n_eval_items']} ({r['n_eval_patients']}) |"
        )
    return "\n".join(lines) + "\n"


def run_site_adaptation(
    cfg: MedsynthConfig,
    bundle: Path,
    segmenter_run: Path,
    features_run: Path | None,
    out: Path,
    ledger: ItemLedger,
    *,
    device: torch.device | None = None,
    tracker: Tracker | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the experiment of ``cfg.adaptation`` and write its table (CSV, Markdown) and report (JSON).

    Args:
        cfg: Resolved config (``adaptation``, ``sampling`` with a numeric guidance scale, ``validation``).
        bundle: The base generator bundle (trained without the target site).
        segmenter_run: Reference segmenter run folder.
        features_run: Feature-encoder run folder (None: ``validation.feature_weights``).
        out: The stage folder (site data cache, latents, adapters, tables).
        ledger: Finished cells (``k<k>-<method>``) under the stage key.
        device: Torch device (default CPU).
        tracker: Receives the table artifacts.
        progress: One ``advance()`` per finished cell.

    Returns:
        The report: ``site``, ``sites``, ``patients`` (adaptation sets, evaluation set), ``rows``.
    """
    from medsynth.adapter import apply_adapter
    from medsynth.data.preprocess import run_preprocess
    from medsynth.evaluation.features import extract_features, load_feature_encoder
    from medsynth.evaluation.plausibility import plausibility_report
    from medsynth.evaluation.realism import realism_report
    from medsynth.evaluation.segmenter import load_segmenter, predict
    from medsynth.evaluation.validate import generate_for, lesion_label
    from medsynth.synthesis.bundle import load_bundle

    ac = cfg.adaptation
    dev = device or torch.device("cpu")
    prog = progress or NullProgress()
    tr = tracker or NullTracker()
    split = split_site(cfg.data, ac.site_pattern, ac.target_site, ac.k_patients, ac.seed)
    site_cfg = cfg.model_copy(update={"data": split.data})
    cache = out / "site-data"
    run_preprocess(site_cfg, cache)
    site = load_split(cache, None)
    evaluation = _items_of(site, split.evaluation, ac.max_eval_items)

    seg = load_segmenter(cfg, segmenter_run, dev)
    pred_real = predict(seg, evaluation.images)
    enc = load_feature_encoder(cfg, features_run, dev)
    f_real = extract_features(enc, evaluation.images)
    # the floor to read a distance against: the site's adaptation patients (largest k) vs its evaluation patients
    f_floor = extract_features(enc, _items_of(site, split.adaptation(max(ac.k_patients)), ac.max_eval_items).images)
    floor = realism_report(f_real, f_real, f_floor, kid_subset_size=max(min(50, len(evaluation)), 1))
    fid_floor = _num(floor.get("reference_fid"))
    lesion = lesion_label(cfg)
    lesion_name = evaluation.labels.get(lesion, str(lesion))
    total = sum(p.numel() for p in load_bundle(bundle, dev).denoiser_net.parameters())

    def measure(gen: Any) -> dict[str, Any]:
        synth = generate_for(gen, evaluation.masks, cfg, seed=cfg.validation.seed)
        plaus = plausibility_report(
            pred_real,
            predict(seg, synth),
            evaluation.masks,
            evaluation.patients,
            evaluation.item_ids,
            {lesion: lesion_name},
            n_boot=ac.n_bootstrap,
            seed=ac.seed,
            ci=cfg.validation.ci,
            fp_min_voxels=cfg.validation.fp_min_voxels,
        )
        lab = plaus["per_label"].get(lesion_name, {})
        ratio = lab.get("ratio", {})
        real = realism_report(f_real, extract_features(enc, synth), kid_subset_size=max(min(50, len(evaluation)), 1))
        return {
            "dice_ratio": _num(ratio.get("value")),
            "dice_ratio_lo": _num(ratio.get("lo")),
            "dice_ratio_hi": _num(ratio.get("hi")),
            "dice_synth": _num(lab.get("dice_synth", {}).get("value")),
            "dice_real": _num(lab.get("dice_real", {}).get("value")),
            "fid": _num(real.get("fid")),
        }

    done = ledger.done()
    rows: list[dict[str, Any]] = []
    base_scores: dict[str, Any] | None = None
    encoded: set[int] = set()
    for k in sorted(ac.k_patients):
        latent_dir = out / f"k{k}" / "latents"
        for method in ac.methods:
            cell = f"k{k}-{method}"
            if cell in done:
                rows.append(done[cell])
                prog.advance(1, cell)
                continue
            if method == "none":
                if base_scores is None:
                    base_scores = measure(load_bundle(bundle, dev))
                scores, params, seconds = base_scores, 0, 0.0
            else:
                if k not in encoded:  # encoded anew by every execution: the autoencoder may have changed
                    encode_for_adaptation(
                        cfg, _items_of(site, split.adaptation(k)), bundle / "autoencoder", latent_dir, dev
                    )
                    encoded.add(k)
                settings = AdaptSettings(
                    method=method,
                    rank=ac.rank,
                    alpha=ac.alpha,
                    networks=tuple(ac.networks),
                    steps=ac.steps,
                    lr=ac.lr,
                    batch_size=ac.batch_size,
                    seed=ac.seed,
                )
                res = adapt_generator(
                    cfg,
                    bundle,
                    latent_dir,
                    out / "adapters" / cell,
                    settings,
                    device=dev,
                    info={"site": split.site, "patients": list(split.adaptation(k))},
                )
                scores = measure(apply_adapter(load_bundle(bundle, dev), res.folder))
                params, seconds = res.spec.trainable_parameters, res.seconds
            row = {
                "k": k,
                "method": method,
                "trainable_params": params,
                "adapt_seconds": round(seconds, 2),
                **scores,
                "n_eval_items": len(evaluation),
                "n_eval_patients": len(split.evaluation),
            }
            ledger.record(cell, row)
            rows.append(row)
            prog.advance(1, cell)
            log.info("site adaptation %s: %s", cell, row)

    note = (
        f"Generator trained without site {split.site}; adapted on k of its {len(split.order)} patients, measured on "
        f"the other {len(split.evaluation)} ({len(evaluation)} items). Base denoiser: {total} parameters. Dice "
        f"ratio: lesion ({lesion_name}) Dice of the reference segmenter on synthetic / real images of the same "
        f"masks, {int(cfg.validation.ci * 100)}% patient-bootstrap CI. FD: Fréchet distance of in-domain features "
        "to the site's real images (lower is closer); two real sets of the site (the adaptation patients vs the "
        f"evaluation patients) are {_fmt(fid_floor)} apart. Small-scale experiment: read the CIs."
    )
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: "" if r.get(c) is None else r.get(c) for c in COLUMNS})
    write_text_atomic(out / TABLE_CSV, buf.getvalue())
    write_text_atomic(out / TABLE_MD, table_markdown(rows, split.site, note))
    report = {
        "site": split.site,
        "sites": split.sites,
        "patients": {
            "adaptation": {str(k): list(split.adaptation(k)) for k in sorted(ac.k_patients)},
            "evaluation": list(split.evaluation),
        },
        "base_parameters": total,
        "fid_real_floor": fid_floor,
        "note": note,
        "rows": rows,
    }
    write_json_atomic(out / REPORT_JSON, report)
    for f in (TABLE_CSV, TABLE_MD, REPORT_JSON):
        tr.log_artifact(out / f, "adaptation")
    return report

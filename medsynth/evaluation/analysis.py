"""The analysis stage: the latent map (coverage of real test items by synthetic ones) and the bias report.

Inputs are the outputs of the stages before it: the generator, the real-data segmenter, the feature
encoder, the preprocessing cache, the validation stage's synthetic test images
(``validation/synthetic_test.npz``) and the downstream grid's per-item test scores
(``experiment/cell_scores.json``). The plausibility part uses the validation stage's own synthetic
images (the same items), so the bias report's ``all`` row reproduces the validation report's lesion
numbers; the synthetic items of the latent map are generated from TRAINING masks
(:mod:`medsynth.evaluation.latent_map` says why).

Outputs (``<out>/``): ``analysis_report.json``, ``analysis_summary.md``, ``bias.csv`` (one row per
subgroup and measure), ``latent_map.csv`` (2D coordinates and the colouring fields of every item) and
``latent_map.png`` (when umap-learn is installed).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet, load_split
from medsynth.evaluation.analysis_summary import flat_metrics, summary_markdown
from medsynth.evaluation.bias import downstream_by_group, plausibility_by_group, site_labels, size_tertiles
from medsynth.evaluation.grid import CELL_SCORES_FILE
from medsynth.evaluation.latent_map import (
    UMAP_MISSING,
    coverage,
    coverage_reading,
    map_figure,
    umap_2d,
    umap_available,
    write_map_csv,
)
from medsynth.fileio import write_json_atomic, write_text_atomic
from medsynth.generator import MaskGenerator
from medsynth.na import needs
from medsynth.progress import NullProgress, Progress
from medsynth.tracking.base import NullTracker, Tracker

log = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, BIAS_CSV = "analysis_report.json", "analysis_summary.md", "bias.csv"
MAP_CSV, MAP_PNG = "latent_map.csv", "latent_map.png"


def _even(n: int, k: int) -> list[int]:
    """At most ``k`` indices spread evenly over ``range(n)``."""
    if n <= k:
        return list(range(n))
    return [int(i) for i in np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))]


def lesion_voxels(masks: torch.Tensor, lesion: int) -> np.ndarray:
    """``(N,)`` voxels of the lesion label in each mask ``(N, 1, *S)``."""
    return (masks.reshape(masks.shape[0], -1) == lesion).sum(1).numpy().astype(np.int64)


@torch.no_grad()
def embed(cfg: MedsynthConfig, gen: MaskGenerator, features_run: str | Path | None, images: torch.Tensor) -> np.ndarray:
    """``(N, F)`` embeddings of ``images`` ``(N, 1, *S)``: feature-encoder vectors or flattened latent means."""
    if cfg.analysis.embedding == "latents":
        from medsynth.models.autoencoder import encode_mean

        out = [
            encode_mean(gen.ae, images[i : i + 32].to(gen.device)).float().flatten(1).cpu()
            for i in range(0, len(images), 32)
        ]
        return torch.cat(out).double().numpy() if out else np.zeros((0, 0))
    from medsynth.evaluation.features import extract_features, load_feature_encoder

    enc = load_feature_encoder(cfg, features_run, gen.device)
    return extract_features(enc, images, cfg.validation.features.batch_size).numpy()


def _plausibility_items(
    cfg: MedsynthConfig,
    gen: MaskGenerator,
    test: ArraySet,
    segmenter_run: str | Path,
    validation_dir: Path | None,
    progress: Progress,
) -> dict[str, np.ndarray]:
    """Per test item: lesion Dice real/synthetic, false positives on lesion-free masks, lesion contrast.

    The synthetic images are the validation stage's (``synthetic_test.npz``); generated again the same way
    (items, seed, sampler) when that file is missing or holds other items.
    """
    from medsynth.evaluation.metrics import dice_per_label, false_positive_flags, label_contrast
    from medsynth.evaluation.segmenter import load_segmenter, predict
    from medsynth.evaluation.validate import (
        SYNTHETIC_NPZ,
        contrast_reference,
        generate_for,
        lesion_label,
        load_synthetic,
    )

    vc = cfg.validation
    lesion = lesion_label(cfg)
    synth = load_synthetic(validation_dir / SYNTHETIC_NPZ, test.item_ids) if validation_dir is not None else None
    if synth is None:
        log.info("analysis: the validation stage's synthetic images are missing; generating them again")
        synth = generate_for(gen, test.masks, cfg, seed=vc.seed, progress=progress)
    seg = load_segmenter(cfg, segmenter_run, gen.device)
    out: dict[str, np.ndarray] = {}
    ref = contrast_reference(cfg)
    for kind, images in (("real", test.images), ("synth", synth)):
        pred = predict(seg, images)
        res = dice_per_label(pred, test.masks, {lesion: test.labels.get(lesion, str(lesion))})
        present = res.target_present[:, 0]
        out[f"dice_{kind}"] = np.where(present, res.dice[:, 0], np.nan)
        absent, fp = false_positive_flags(pred, test.masks, lesion, vc.fp_min_voxels)
        out[f"fp_{kind}"] = np.where(absent, fp.astype(np.float64), np.nan)
        out[f"contrast_{kind}"] = label_contrast(images, test.masks, lesion, ref)
    return out


def _groupings(cfg: MedsynthConfig, patients: list[str], voxels: np.ndarray) -> tuple[dict[str, list[str]], Any]:
    ac = cfg.analysis
    groups: dict[str, list[str]] = {}
    sites = site_labels(patients, ac.site_pattern)
    if set(sites) != {"all"}:
        groups["site"] = sites
    edges = None
    if ac.size_tertiles:
        groups["lesion size"], edges = size_tertiles(voxels)
    return groups, edges


def _downstream(cfg: MedsynthConfig, experiment_dir: Path | None, cache_dir: Path) -> dict[str, Any]:
    """Downstream rows per subgroup from the grid's per-item scores (n/a when the grid left none)."""
    from medsynth.evaluation.cells import presence_labels, resolve_target_label
    from medsynth.evaluation.validate import lesion_label

    path = experiment_dir / CELL_SCORES_FILE if experiment_dir is not None else None
    if path is None or not path.is_file():
        return {"rows": [], "na": "n/a (no per-item test scores of the downstream grid: run the experiment stage)"}
    data = json.loads(path.read_text(encoding="utf-8"))
    full = load_split(cache_dir, "test")
    where = {iid: i for i, iid in enumerate(full.item_ids)}
    missing = [i for i in data["test_items"] if i not in where]
    if missing:
        return {"rows": [], "na": f"n/a (the grid's test items are not in the test split: {missing[:3]})"}
    test = full.subset([where[i] for i in data["test_items"]])
    ac, ec = cfg.analysis, cfg.experiment
    lesion = lesion_label(cfg)
    target = resolve_target_label(test.labels, ec.target_label)
    groups, _ = _groupings(cfg, test.patients, lesion_voxels(test.masks, lesion))
    rows = downstream_by_group(
        data["cells"],
        presence_labels(test.masks, target, ec.min_target_voxels),
        test.patients,
        groups,
        ec.n_bootstrap,
        ec.ci,
        ec.bootstrap_seed,
        ac.min_patients,
    )
    return {"rows": rows, "na": None, "n_items": len(test), "n_patients": len(set(test.patients))}


def _latent_map(
    cfg: MedsynthConfig,
    gen: MaskGenerator,
    features_run: str | Path | None,
    train: ArraySet,
    test: ArraySet,
    out: Path,
    progress: Progress,
) -> tuple[dict[str, Any], list[Path]]:
    from medsynth.evaluation.validate import generate_for, lesion_label

    ac = cfg.analysis
    lesion = lesion_label(cfg)
    real_train = train.subset(_even(len(train), ac.max_items))
    src = train.subset(_even(len(train), ac.n_synthetic or len(real_train)))
    synth = generate_for(gen, src.masks, cfg, seed=ac.seed, progress=progress) if len(src) else src.images
    e_test, e_train, e_syn = (embed(cfg, gen, features_run, x) for x in (test.images, real_train.images, synth))
    cov = coverage(e_test, e_train, e_syn, ac.nn_quantile, ac.min_items)
    cov["reading"] = coverage_reading(cov)
    cov["embedding"] = ac.embedding
    items: list[dict[str, Any]] = []
    for name, ds in (("real train", real_train), ("real test", test), ("synthetic", src)):
        vox = lesion_voxels(ds.masks, lesion)
        sizes, _ = size_tertiles(vox)
        sites = site_labels(ds.patients, ac.site_pattern)
        for i in range(len(ds)):
            items.append(
                {
                    "item_id": ds.item_ids[i] + (" (synthetic)" if name == "synthetic" else ""),
                    "set": name,
                    "patient": ds.patients[i],
                    "site": sites[i],
                    "lesion": bool(vox[i] > 0),
                    "lesion_voxels": int(vox[i]),
                    "size_group": sizes[i],
                }
            )
    points = np.concatenate([e_train, e_test, e_syn]) if len(e_syn) else np.concatenate([e_train, e_test])
    coords = None
    umap_na: str | None = None
    if not ac.umap.enabled:
        umap_na = "n/a (analysis.umap.enabled is false)"
    elif not umap_available():
        umap_na = UMAP_MISSING
    elif len(points) < max(ac.min_items, 4):
        umap_na = needs(max(ac.min_items, 4), "items", len(points))
    else:
        u = ac.umap
        coords = umap_2d(points, u.n_neighbors, u.min_dist, u.metric, u.seed)
    files = [write_map_csv(out / MAP_CSV, coords, items)]
    (out / MAP_PNG).unlink(missing_ok=True)  # never leave an earlier run's map beside these numbers
    if coords is not None:
        title = f"{cfg.name}: {ac.embedding} embedding, UMAP ({cov['reading'].split(':')[0]})"
        files.append(map_figure(out / MAP_PNG, coords, items, title))
    cov["umap"] = umap_na or "drawn"
    cov["n_map_items"] = len(items)
    return cov, files


def _bias_csv(plaus: list[dict[str, Any]], down: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields = [
        "part",
        "task",
        "arm",
        "fraction",
        "ratio",
        "grouping",
        "group",
        "measure",
        "value",
        "lo",
        "hi",
        "n_cases",
        "n_patients",
        "na",
        "flagged",
    ]
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in plaus:
        for m in ("dice_real", "dice_synth", "dice_ratio", "fp_real", "fp_synth", "contrast_ratio"):
            e = r[m]
            flagged = any(
                f.startswith({"dice_ratio": "Dice", "contrast_ratio": "contrast"}.get(m, "-")) for f in r["flags"]
            )
            w.writerow(
                {
                    "part": "plausibility",
                    "grouping": r["grouping"],
                    "group": r["group"],
                    "measure": m,
                    **{k: e.get(k) for k in ("value", "lo", "hi", "n_cases", "n_patients", "na")},
                    "flagged": flagged,
                }
            )
    for r in down:
        e = r["score"]
        w.writerow(
            {
                "part": "downstream",
                **{k: r[k] for k in ("task", "arm", "fraction", "ratio", "grouping", "group")},
                "measure": r["metric"],
                **{k: e.get(k) for k in ("value", "lo", "hi", "n_cases", "n_patients", "na")},
                "flagged": bool(r["flags"]),
            }
        )
    return buf.getvalue()


def run_analysis(
    cfg: MedsynthConfig,
    gen: MaskGenerator,
    cache_dir: str | Path,
    segmenter_run: str | Path,
    features_run: str | Path | None,
    experiment_dir: str | Path | None,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    progress: Progress | None = None,
    validation_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Latent map + coverage and the bias report; writes the outputs listed in the module doc.

    Args:
        cfg: Resolved config (``analysis``, ``validation``, ``sampling``, ``experiment`` sections).
        gen: The trained generator.
        cache_dir: Preprocessing cache.
        segmenter_run: Folder of the real-data reference segmenter.
        features_run: Feature-encoder folder (None with ``validation.feature_weights``).
        experiment_dir: The experiment stage's folder (its ``cell_scores.json``), or None.
        out_dir: Output folder.
        tracker: Receives the metrics, the PNG and the CSV/JSON files.
        progress: One ``advance()`` per generated image.
        validation_dir: The validation stage's folder (its synthetic test images), or None: generate them.

    Returns:
        The report (also ``analysis_report.json``).
    """
    ac, vc = cfg.analysis, cfg.validation
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tr = tracker or NullTracker()
    prog = progress or NullProgress()
    cache = Path(cache_dir)
    test = load_split(cache, "test", max_items=vc.max_cases)
    train = load_split(cache, "train")
    from medsynth.evaluation.validate import lesion_label

    lesion = lesion_label(cfg)
    # --- bias: plausibility per subgroup (the validation stage's items, seed and sampler) ---
    val_dir = Path(validation_dir) if validation_dir is not None else None
    per_item = _plausibility_items(cfg, gen, test, segmenter_run, val_dir, prog)
    voxels = lesion_voxels(test.masks, lesion)
    groups, edges = _groupings(cfg, test.patients, voxels)
    plaus = plausibility_by_group(
        per_item,
        test.patients,
        groups,
        ac.target_dice_ratio,
        ac.target_contrast_ratio,
        vc.n_bootstrap,
        vc.ci,
        vc.seed,
        ac.min_patients,
    )
    # --- bias: downstream task models per subgroup ---
    down = _downstream(cfg, Path(experiment_dir) if experiment_dir is not None else None, cache)
    # --- latent map and coverage ---
    cov, files = _latent_map(cfg, gen, features_run, train, test, out, prog)
    report: dict[str, Any] = {
        "n_items": len(test),
        "n_patients": len(set(test.patients)),
        "lesion_label": test.labels.get(lesion, str(lesion)),
        "site_pattern": ac.site_pattern,
        "groupings": {k: sorted(set(v)) for k, v in groups.items()},
        "size_edges": list(edges) if edges else None,
        "targets": {"dice_ratio": ac.target_dice_ratio, "contrast_ratio": ac.target_contrast_ratio},
        "plausibility": plaus,
        "downstream": down,
        "latent_map": cov,
    }
    files += [
        write_text_atomic(out / BIAS_CSV, _bias_csv(plaus, down["rows"])),
        write_json_atomic(out / REPORT_JSON, report),
        write_text_atomic(out / REPORT_MD, summary_markdown(cfg.name, report)),
    ]
    tr.log_metrics(flat_metrics(report))
    for f in files:
        tr.log_artifact(f, "analysis")
    return report

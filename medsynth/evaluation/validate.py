"""The validation stage: plausibility, realism, diversity and memorisation of generated images.

The generator draws images from the TEST-split masks (never seen in training); a segmenter trained
on the real training split segments both the real and the synthetic image of each mask; an
in-domain feature encoder (trained on real training images) gives realism distances; several seeds
per mask give diversity; nearest training neighbours give the memorisation audit.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet, load_split
from medsynth.evaluation.diversity import diversity_report
from medsynth.evaluation.features import extract_features, load_feature_encoder
from medsynth.evaluation.metrics import per_label_wasserstein
from medsynth.evaluation.plausibility import contrast_report, plausibility_report, worst_cases_figure, worst_rows
from medsynth.evaluation.realism import realism_report
from medsynth.evaluation.segmenter import load_segmenter, predict
from medsynth.evaluation.validation_report import flat_metrics, summary_md
from medsynth.fileio import write_atomic, write_json_atomic, write_text_atomic
from medsynth.generator import MaskGenerator
from medsynth.privacy import MAP_FILE, privacy_dir, pseudonymiser
from medsynth.progress import NullProgress, Progress
from medsynth.synthesis.memorisation import closest_pairs_figure, memorisation_audit
from medsynth.tracking.base import NullTracker, Tracker

log = logging.getLogger(__name__)
REPORT_JSON, REPORT_MD = "validation_report.json", "validation_summary.md"
SYNTHETIC_NPZ = "synthetic_test.npz"
"""The synthetic image of every validated test item (float16, with the item ids), reused by the analysis stage."""


def generate_for(
    gen: MaskGenerator, masks: torch.Tensor, cfg: MedsynthConfig, seed: int, progress: Progress | None = None
) -> torch.Tensor:
    """Images ``(N, 1, *S)`` in [0, 1] for masks ``(N, 1, *S)``, in batches of ``sampling.batch_size``."""
    b = cfg.sampling.batch_size
    out = []
    for i in range(0, len(masks), b):
        out.append(gen.generate(masks[i : i + b], cfg.sampling, seed=seed + i))
        (progress or NullProgress()).advance(min(b, len(masks) - i))
    return torch.cat(out)


def lesion_label(cfg: MedsynthConfig) -> int:
    """The label the contrast, the worst-case figure, the diversity check and the guidance sweep focus on.

    ``synthesis.lesion_label`` or the highest label named like a lesion, the rule lesion transplants
    use (:func:`medsynth.synthesis.edits.default_lesion_label`); a vocabulary without such a name
    (e.g. hippocampus) gives its highest data label.
    """
    from medsynth.data.vocabulary import data_labels
    from medsynth.synthesis.edits import LESION_NAME, default_lesion_label

    labels = {int(k): str(v) for k, v in data_labels(cfg).items()}
    configured = cfg.synthesis.lesion_label
    if configured is None and not any(k and LESION_NAME.search(v) for k, v in labels.items()):
        return max(labels)
    return default_lesion_label(labels, configured)


def contrast_reference(cfg: MedsynthConfig) -> list[int] | None:
    """Reference region of the lesion contrast: the derived label (e.g. the brain) when the config adds one.

    None means the rest of the foreground (:func:`medsynth.evaluation.metrics.label_contrast`).
    """
    d = cfg.preprocess.derived_label
    return [int(d.index)] if d.enabled else None


def run_validation(
    cfg: MedsynthConfig,
    gen: MaskGenerator,
    cache_dir: str | Path,
    segmenter_run: str | Path,
    features_run: str | Path | None,
    out_dir: str | Path,
    tracker: Tracker | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run every validation measurement and write the report (JSON, Markdown, figures).

    Args:
        cfg: Resolved config (``validation``, ``sampling`` sections).
        gen: The trained mask-conditioned generator.
        cache_dir: Preprocessing cache (test split = conditioning masks and real references).
        segmenter_run: Run folder of the reference segmenter (trained on real data).
        features_run: Run folder of the feature encoder (None: ``validation.feature_weights``).
        out_dir: Report folder.
        tracker: Receives metrics and the figures.
        progress: Receives one ``advance()`` per generated image.

    Returns:
        The report dict (also written to ``validation_report.json``).
    """
    vc = cfg.validation
    out = Path(out_dir)
    tr = tracker or NullTracker()
    dev = gen.device
    test = load_split(cache_dir, "test", max_items=vc.max_cases)
    train = load_split(cache_dir, "train")
    labels = test.labels
    # ids as they appear in figures and the logged report (keyed pseudonyms with privacy.pseudonymise_ids)
    pseudo = pseudonymiser(cfg)
    test_ids, train_ids = pseudo.many(test.item_ids), pseudo.many(train.item_ids)
    test_patients = pseudo.many(test.patients)

    # --- autoencoder reconstruction quality on the test split (the ceiling of any synthetic image) ---
    ae_quality, recon = reconstruction_quality(gen, test.images)

    # --- synthetic images from the test masks ---
    synth = generate_for(gen, test.masks, cfg, seed=vc.seed, progress=progress)

    save_synthetic(out / SYNTHETIC_NPZ, synth, test.item_ids)

    # --- plausibility: the same real-data segmenter on real and synthetic images ---
    seg = load_segmenter(cfg, segmenter_run, dev)
    pred_real = predict(seg, test.images)
    pred_synth = predict(seg, synth)
    plaus = plausibility_report(
        pred_real,
        pred_synth,
        test.masks,
        test_patients,
        test_ids,
        labels,
        n_boot=vc.n_bootstrap,
        seed=vc.seed,
        ci=vc.ci,
        fp_min_voxels=vc.fp_min_voxels,
    )
    # visibility of the lesion (the label that matters most; tissue classes against "the rest of the
    # foreground" have no meaningful contrast) against the derived brain label when there is one
    lesion = lesion_label(cfg)
    reference = contrast_reference(cfg)
    lesion_only = {lesion: labels.get(lesion, str(lesion))}

    def contrast_of(images: torch.Tensor, k: int = 0) -> dict[str, Any]:  # channel k (0: the headline channel)
        return contrast_report(
            test.images[:, k : k + 1],
            images[:, k : k + 1],
            test.masks,
            test.patients,
            lesion_only,
            reference,
            vc.n_bootstrap,
            vc.seed,
            vc.ci,
        )

    contrast = contrast_of(synth)
    # the same on the autoencoder's reconstructions: the most contrast a latent-space generator can show
    contrast_ae = contrast_of(recon)
    ae_quality["contrast"] = {name: {"ratio": c["ratio"], "visible": c["visible"]} for name, c in contrast_ae.items()}
    figs = []
    worst = worst_rows(plaus["rows"], vc.n_worst, label=lesion)
    if worst:
        figs.append(
            worst_cases_figure(
                out / "worst_cases.png",
                test.images,
                synth,
                test.masks,
                pred_real,
                pred_synth,
                worst,
                n=vc.n_worst,
                label=lesion,
            )
        )

    # --- realism: in-domain features, intensity distributions per label ---
    enc = load_feature_encoder(cfg, features_run, dev)
    f_real, f_synth = extract_features(enc, test.images), extract_features(enc, synth)
    half = len(train) // 2
    f_ref = extract_features(enc, train.images[: min(half, len(test))]) if half else None
    realism = realism_report(
        f_real,
        f_synth,
        f_ref,
        kid_subset_size=max(min(vc.kid_subset_size, len(test)), 1),
        kid_subsets=vc.kid_subsets,
        seed=vc.seed,
    )
    wass = per_label_wasserstein(
        test.images[:, :1], test.masks, synth[:, :1], test.masks, labels, bins=vc.intensity_bins
    )
    per_channel: dict[str, Any] = {}
    if test.n_channels > 1:  # multi-contrast: realism, contrast and intensities of every channel on its own
        from medsynth.training.autoencoder import psnr

        names = cfg.data.channels or tuple(str(k) for k in range(test.n_channels))
        train_ref = train.images[: min(half, len(test))]
        for k, name in enumerate(names):
            sl = slice(k, k + 1)
            per_channel[name] = {
                "realism": realism_report(
                    extract_features(enc, test.images[:, sl]),
                    extract_features(enc, synth[:, sl]),
                    extract_features(enc, train_ref[:, sl]) if half else None,
                    kid_subset_size=max(min(vc.kid_subset_size, len(test)), 1),
                    kid_subsets=vc.kid_subsets,
                    seed=vc.seed,
                ),
                "contrast": contrast_of(synth, k),
                "contrast_autoencoder": contrast_of(recon, k),
                "intensity_wasserstein": per_label_wasserstein(
                    test.images[:, sl], test.masks, synth[:, sl], test.masks, labels, bins=vc.intensity_bins
                ),
                "autoencoder_psnr_db": psnr(recon[:, sl], test.images[:, sl]),
            }

    # --- diversity: several seeds for masks with the highest label present ---
    has = [i for i in range(len(test)) if bool((test.masks[i] == lesion).any())] or list(range(len(test)))
    pick = has[: vc.diversity_masks]
    groups = [
        torch.stack(
            [
                gen.generate(test.masks[i : i + 1], cfg.sampling, seed=1000 + 17 * s)[0]
                for s in range(vc.diversity_seeds)
            ]
        )
        for i in pick
    ]
    diversity = diversity_report(groups)

    # --- memorisation: nearest training image of each synthetic image vs of each real test image ---
    mem = memorisation_audit(
        synth,
        train.images,
        test.images,
        percentile=vc.memorisation_percentile,
        distance=vc.memorisation_distance,
        synth_ids=test_ids,
        train_ids=train_ids,
        top_k=vc.memorisation_top_k,
    )
    figs.append(
        closest_pairs_figure(
            out / "closest_pairs.png",
            synth,
            train.images,
            mem,
            n=vc.n_closest,
            synth_ids=test_ids,
            train_ids=train_ids,
        )
    )
    figs.append(_sample_panel(out / "real_vs_synthetic.png", test, synth))

    external = None
    if vc.external_test:
        external = validate_external(cfg, gen, seg, enc, train.patients, out, progress)
        if "figure" in external:
            figs.append(Path(external["figure"]))

    report: dict[str, Any] = {
        "n_items": len(test),
        "n_patients": len(set(test.patients)),
        "labels": {str(k): v for k, v in labels.items()},
        "sampling": cfg.sampling.model_dump(mode="json"),
        "autoencoder": ae_quality,
        "plausibility": plaus,
        "contrast": contrast,
        "realism": realism,
        "intensity_wasserstein": wass,
        "diversity": diversity,
        "memorisation": mem.summary,
        **({"per_channel": per_channel} if per_channel else {}),
    }
    if external is not None:
        report["external"] = external
    if pseudo.enabled:
        report["ids"] = "pseudonymised (privacy.pseudonymise_ids)"
        pseudo.save_table(privacy_dir(cfg) / MAP_FILE)
    write_json_atomic(out / REPORT_JSON, report)
    write_text_atomic(out / REPORT_MD, summary_md(cfg, report))
    tr.log_metrics(flat_metrics(report))
    for f in [*figs, out / REPORT_JSON, out / REPORT_MD]:
        tr.log_artifact(f, "validation")
    return report


def validate_external(
    cfg: MedsynthConfig,
    gen: MaskGenerator,
    seg: torch.nn.Module,
    enc: torch.nn.Module,
    train_patients: list[str],
    out_dir: Path,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Plausibility, lesion contrast and realism on the masks of ``validation.external_test``.

    The external set (another site or cohort) is preprocessed with the main data's settings
    (:func:`medsynth.evaluation.external.load_external_test`); its masks condition the generator and
    the same real-data segmenter and feature encoder score its real and synthetic images. Nothing of
    it is used for training or for choosing anything.

    Args:
        cfg: Resolved config (``validation.external_test`` set).
        gen: The generator.
        seg: The reference segmenter (trained on the real training split).
        enc: The in-domain feature encoder.
        train_patients: Patients of the training split (an external patient among them is an error).
        out_dir: Folder of its figure (``external_real_vs_synthetic.png``).
        progress: Receives one ``advance()`` per generated image.

    Returns:
        ``{"source", "n_items", "n_patients", "plausibility", "contrast", "realism"}`` (and ``"figure"``,
        the path of its real/mask/synthetic panel).

    Raises:
        PatientLeakError: If an external patient is also a training patient.
    """
    from medsynth.evaluation.external import load_external_test
    from medsynth.evaluation.selection import check_no_leak

    vc = cfg.validation
    assert vc.external_test is not None
    ext = load_external_test(cfg, vc.external_test)
    check_no_leak(train_patients, ext.patients, "external test")
    if vc.max_cases is not None and len(ext) > vc.max_cases:
        ext = ext.subset(list(range(vc.max_cases)))
    synth = generate_for(gen, ext.masks, cfg, seed=vc.seed, progress=progress)
    pred_real, pred_synth = predict(seg, ext.images), predict(seg, synth)
    pseudo = pseudonymiser(cfg)
    plaus = plausibility_report(
        pred_real,
        pred_synth,
        ext.masks,
        pseudo.many(ext.patients),
        pseudo.many(ext.item_ids),
        ext.labels,
        n_boot=vc.n_bootstrap,
        seed=vc.seed,
        ci=vc.ci,
        fp_min_voxels=vc.fp_min_voxels,
    )
    plaus.pop("rows", None)  # per-case rows of the main split only (the report stays small)
    lesion = lesion_label(cfg)
    contrast = contrast_report(  # the headline channel, as on the main split
        ext.images[:, :1],
        synth[:, :1],
        ext.masks,
        ext.patients,
        {lesion: ext.labels.get(lesion, str(lesion))},
        contrast_reference(cfg),
        vc.n_bootstrap,
        vc.seed,
        vc.ci,
    )
    f_real, f_synth = extract_features(enc, ext.images), extract_features(enc, synth)
    realism = realism_report(
        f_real,
        f_synth,
        None,
        kid_subset_size=max(min(vc.kid_subset_size, len(ext)), 1),
        kid_subsets=vc.kid_subsets,
        seed=vc.seed,
    )
    figure = _sample_panel(out_dir / "external_real_vs_synthetic.png", ext, synth)
    return {
        "source": str(vc.external_test),
        "figure": str(figure),
        "n_items": len(ext),
        "n_patients": len(set(ext.patients)),
        "plausibility": plaus,
        "contrast": contrast,
        "realism": realism,
    }


def save_synthetic(path: Path, images: torch.Tensor, item_ids: list[str]) -> Path:
    """Write ``images`` ``(N, 1, *S)`` (float16) with their item ids as ``.npz``, atomically."""
    import numpy as np

    arrays = {"images": images.to(torch.float16).numpy(), "item_ids": np.asarray(item_ids, dtype=str)}
    return write_atomic(path, lambda p: np.savez_compressed(p, **arrays))  # type: ignore[arg-type]


def load_synthetic(path: Path, item_ids: list[str]) -> torch.Tensor | None:
    """The images :func:`save_synthetic` wrote for exactly these item ids (float32), else None."""
    import numpy as np

    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if [str(i) for i in z["item_ids"]] != list(item_ids):
            return None
        return torch.from_numpy(z["images"]).float()


@torch.no_grad()
def reconstruction_quality(gen: MaskGenerator, images: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor]:
    """PSNR (dB), SSIM and L1 of the autoencoder's deterministic reconstructions of ``images``.

    Args:
        gen: The generator (its autoencoder is used).
        images: ``(N, 1, *S)`` in [0, 1].

    Returns:
        ``(metrics, reconstructions)``; reconstructions ``(N, 1, *S)`` on the CPU.
    """
    from monai.metrics import SSIMMetric

    from medsynth.training.autoencoder import psnr, reconstruct

    rec = reconstruct(gen.ae, images, gen.device).cpu()
    win = min(11, *images.shape[2:])  # MONAI's 11-voxel window, shrunk to the largest odd size tiny images allow
    win = max(win - (1 - win % 2), 1)
    ssim = SSIMMetric(spatial_dims=images.ndim - 2, data_range=1.0, win_size=win)(rec, images.float())
    metrics: dict[str, Any] = {
        "psnr_db": psnr(rec, images),
        "ssim": float(ssim.mean()),
        "l1": float((rec - images).abs().mean()),
    }
    return metrics, rec


def _sample_panel(path: Path, test: ArraySet, synth: torch.Tensor, n: int = 8) -> Path:
    from medsynth.viz import overlay_rgb, save_grid, to_2d

    order = sorted(range(len(test)), key=lambda i: -int((test.masks[i] > 0).sum()))[:n]
    rows = [
        [
            to_2d(test.images[i, 0].numpy()),
            overlay_rgb(to_2d(test.images[i, 0].numpy()), to_2d(test.masks[i, 0].numpy()), 0.5),
            to_2d(synth[i, 0].numpy()),
        ]
        for i in order
    ]
    return save_grid(path, rows, col_titles=["real", "mask", "synthetic"])

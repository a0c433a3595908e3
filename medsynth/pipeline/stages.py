"""The pipeline's stages, declared once each, in pipeline order.

Each declaration names the config sections the stage reads, the stages it runs after, its code
version and the library function that does the work (a thin adapter from a
:class:`~medsynth.pipeline.declare.StageRun` to the library, in ``data_stages``, ``train_stages``,
``sampling_stages`` and ``eval_stages``). Reading this file top to bottom is reading the pipeline.
"""

from __future__ import annotations

from medsynth.pipeline.adapt_stages import AdaptationResult, AdaptOptions, AdaptResult, run_adapt, run_adaptation
from medsynth.pipeline.data_stages import DatasetResult, PreprocessOptions, run_check, run_preprocess
from medsynth.pipeline.declare import Stage
from medsynth.pipeline.digests import (
    checkpoint_digest,
    dataset_fingerprint,
    experiment_inputs,
    file_digest,
    mask_source_fingerprint,
    validation_external_fingerprint,
)
from medsynth.pipeline.edit_stages import CounterfactualResult, EditOptions, run_counterfactual, run_edit
from medsynth.pipeline.eval_stages import (
    AnalysisResult,
    ReportOptions,
    run_analysis,
    run_experiment,
    run_report,
    run_validate,
)
from medsynth.pipeline.registry import register_stage
from medsynth.pipeline.sampling_stages import (
    CalibrationResult,
    ExportOptions,
    SynthesisResult,
    SynthesizeOptions,
    needs_calibration,
    run_calibrate,
    run_export,
    run_synthesize,
)
from medsynth.pipeline.train_stages import (
    TrainResult,
    bundle_digest,
    latents_digest,
    run_autoencoder,
    run_controlnet,
    run_features,
    run_generator,
    run_latents,
    run_segmenter,
    run_unet,
)

TRAIN = ("train",)

register_stage(
    Stage(
        "check",
        run_check,
        reads=("data", "qc", "phantom"),
        folder="qc",
        cli=("check",),
        inputs=dataset_fingerprint,
        digest=file_digest("qc_report.json"),
        help="Check every image/mask pair and write the QC report (JSON, Markdown, overlays).",
    )
)
register_stage(
    Stage(
        "preprocess",
        run_preprocess,
        reads=("data", "preprocess", "qc", "phantom"),
        cli=("preprocess",),
        options=PreprocessOptions,
        result=DatasetResult,
        inputs=dataset_fingerprint,
        digest=file_digest("manifest.json"),
        fan_out=True,
        help="Preprocess the dataset into the on-disk cache (unchanged cases are not redone).",
    )
)
register_stage(
    Stage(
        "autoencoder",
        run_autoencoder,
        reads=("autoencoder",),
        ignores=("autoencoder.tiling",),  # decoding/encoding in tiles: read by the stages that decode
        after=("preprocess",),
        result=TrainResult,
        cli=("train", "autoencoder"),
        register="autoencoder",
        digest=checkpoint_digest,
        progress_total=lambda cfg: cfg.autoencoder.train.steps,
        help="Train the KL autoencoder (L1 + KL, optional patch-adversarial loss) and its latent scale factor.",
    )
)
register_stage(
    Stage(
        "latents",
        run_latents,
        reads=("autoencoder.tiling",),
        after=("autoencoder", "preprocess"),
        cli=("train", "latents"),
        digest=latents_digest,
        help="Encode the train/val splits once with the trained autoencoder (latent means).",
    )
)
register_stage(
    Stage(
        "unet",
        run_unet,
        reads=("diffusion",),
        after=("latents",),
        result=TrainResult,
        cli=("train", "diffusion"),
        register="unet",
        digest=checkpoint_digest,
        progress_total=lambda cfg: cfg.diffusion.train.steps,
        help="Train the latent diffusion UNet (epsilon, v-prediction or rectified flow).",
    )
)
register_stage(
    Stage(
        "controlnet",
        run_controlnet,
        reads=("controlnet",),
        after=("unet", "latents"),
        result=TrainResult,
        cli=("train", "controlnet"),
        register="controlnet",
        digest=checkpoint_digest,
        progress_total=lambda cfg: cfg.controlnet.train.steps,
        help="Train the ControlNet on full-resolution masks, initialised from the frozen UNet.",
    )
)
register_stage(
    Stage(
        "segmenter",
        run_segmenter,
        reads=("segmenter",),
        after=("preprocess",),
        result=TrainResult,
        cli=("train", "segmenter"),
        register="segmenter",
        digest=checkpoint_digest,
        progress_total=lambda cfg: cfg.segmenter.train.steps,
        help="Train the reference segmenter on the real training split (for plausibility).",
    )
)
register_stage(
    Stage(
        "calibrate",
        run_calibrate,
        reads=("sampling", "autoencoder.tiling"),
        after=("autoencoder", "unet", "controlnet", "segmenter", "preprocess"),
        result=CalibrationResult,
        folder="calibration",
        cli=("calibrate",),
        enabled=needs_calibration,
        digest=file_digest("calibration.json"),
        help="Choose the guidance scale on the validation split (sampling.guidance_scale: auto): the smallest "
        "scale whose lesion Dice ratio and contrast ratio match the real images.",
    )
)
register_stage(
    Stage(
        "generator",
        run_generator,
        reads=("sampling",),  # the bundle's config: sampling defaults of the registered model
        after=("autoencoder", "unet", "controlnet", "calibrate"),
        cli=("train", "generator"),
        register="generator",
        digest=bundle_digest,
        help="Bundle the trained autoencoder, UNet and ControlNet (+ config) as the registered generator.",
    )
)
register_stage(
    Stage(
        "features",
        run_features,
        reads=("validation.features",),
        after=("preprocess",),
        result=TrainResult,
        cli=("train", "features"),
        digest=checkpoint_digest,
        enabled=lambda cfg: not cfg.validation.feature_weights,
        progress_total=lambda cfg: cfg.validation.features.train.steps,
        help="Train the in-domain feature encoder for realism distances (skipped with validation.feature_weights).",
    )
)
register_stage(
    Stage(
        "synthesize",
        run_synthesize,
        reads=("synthesis", "sampling", "autoencoder.tiling"),
        after=("generator", "calibrate", "preprocess"),
        result=SynthesisResult,
        folder="synthetic",
        cli=("synthesize",),
        inputs=mask_source_fingerprint,
        options=SynthesizeOptions,
        managed=lambda o: (
            not (
                isinstance(o, SynthesizeOptions) and (o.out is not None or o.model is not None or o.adapter is not None)
            )
        ),
        digest=file_digest("manifest.json"),
        help="Synthesise image/mask pairs from real or edited masks into an augmented dataset with provenance.",
    )
)
register_stage(
    Stage(
        "validate",
        run_validate,
        reads=("validation", "sampling", "autoencoder.tiling", "privacy"),
        after=("generator", "calibrate", "segmenter", "features", "preprocess"),
        inputs=validation_external_fingerprint,
        version=4,  # 2: label contrast; 3: contrast, worst cases and diversity on the lesion label only;
        # 4: synthetic_test.npz (the synthetic test images, reused by the analysis stage)
        folder="validation",
        cli=("validate",),
        digest=file_digest("validation_report.json"),  # evaluation.validate.REPORT_JSON
        help="Validate synthetic images: plausibility (real-data segmenter Dice, synthetic vs real, with CIs), "
        "visibility, realism, diversity and memorisation.",
    )
)
register_stage(
    Stage(
        "counterfactual",
        run_counterfactual,
        reads=("counterfactual", "sampling", "autoencoder.tiling"),
        after=("generator", "calibrate", "segmenter", "preprocess"),
        result=CounterfactualResult,
        version=2,  # 2: a removed lesion is looked for where it was (not anywhere), also on the real scan
        cli=("counterfactual",),
        enabled=lambda cfg: cfg.counterfactual.enabled,
        digest=file_digest("counterfactual.json"),  # evaluation.counterfactual.REPORT
        help="Counterfactual edits of real test scans (remove, move, scale the lesion): SSIM outside the edit region, "
        "lesion Dice vs plain synthesis, lesions found again after removal (optional: counterfactual.enabled).",
    )
)
register_stage(
    Stage(
        "experiment",
        run_experiment,
        reads=("experiment", "sampling", "segmenter", "autoencoder.tiling"),
        after=("generator", "calibrate", "preprocess"),
        inputs=experiment_inputs,
        version=2,  # 2: cell_scores.json (per-item test scores with the test item ids, for the bias report)
        cli=("experiment",),
        fan_out=True,
        digest=file_digest("summary.csv"),
        help="Downstream augmentation grid: a task model on limited real data, with and without synthetic data, "
        "over real-data fractions, synthetic ratios and seeds.",
    )
)
register_stage(
    Stage(
        "analysis",
        run_analysis,
        reads=("analysis", "validation", "sampling", "autoencoder.tiling"),
        after=("generator", "calibrate", "segmenter", "features", "preprocess", "validate", "experiment"),
        result=AnalysisResult,
        cli=("analyse",),
        enabled=lambda cfg: cfg.analysis.enabled,
        digest=file_digest("analysis_report.json"),  # evaluation.analysis.REPORT_JSON
        help="Latent map (UMAP of feature/latent embeddings, coverage of real test items by synthetic ones) and "
        "bias report (plausibility and downstream scores per site and lesion-size tertile, flagged subgroups).",
    )
)
register_stage(
    Stage(
        "export",
        run_export,
        reads=("privacy",),
        after=("synthesize", "preprocess"),
        cli=("export",),
        options=ExportOptions,
        managed=lambda o: False,  # the user's own folder: never cached, never overwritten
        in_pipeline=False,
        help="Export the augmented dataset (real + synthetic, provenance CSV) as nnU-Net v2, MSD or a folder.",
    )
)
register_stage(
    Stage(
        "adaptation",
        run_adaptation,
        reads=("adaptation", "data", "preprocess", "sampling", "validation"),
        after=("generator", "calibrate", "segmenter", "features", "preprocess"),
        result=AdaptationResult,
        cli=("adaptation",),
        enabled=lambda cfg: cfg.adaptation.enabled,
        digest=file_digest("adaptation.csv"),  # adaptation.experiment.TABLE_CSV
        progress_total=lambda cfg: len(cfg.adaptation.k_patients) * len(cfg.adaptation.methods),
        help="Site adaptation (optional): adapt the generator to a held-out site from k patients; none vs LoRA vs "
        "full fine-tuning on the site's other patients (Dice ratio, Fréchet distance, parameters, time).",
    )
)
register_stage(
    Stage(
        "adapt",
        run_adapt,
        after=("generator",),
        result=AdaptResult,
        cli=("adapt",),
        options=AdaptOptions,
        register="adapter",  # registered beside the config's generator: <prefix>-<name>-adapter
        managed=lambda o: False,  # an adapter of the user's data: never cached
        in_pipeline=False,
        help="Adapt the trained generator to new data (--data) with LoRA (--method lora --rank r) or full "
        "fine-tuning; writes the adapter (safetensors + JSON) and registers it.",
    )
)
register_stage(
    Stage(
        "edit",
        run_edit,
        after=("generator", "calibrate"),
        cli=("edit",),
        options=EditOptions,
        managed=lambda o: False,  # the user's own folder: never cached, never overwritten
        in_pipeline=False,
        help="Counterfactual edit of real scans: --image X --mask M --edit remove|move:dx,dy|scale:f|mask:NEW "
        "(or --batch edits.csv) --out DIR; invert with the original mask, regenerate with the edited one, keep the "
        "rest.",
    )
)
register_stage(
    Stage(
        "report",
        run_report,
        after=("check", "generator", "calibrate", "synthesize", "validate", "experiment", "analysis"),
        options=ReportOptions,
        enabled=lambda cfg: cfg.tracking.enabled,
        managed=lambda o: isinstance(o, ReportOptions) and o.pipeline_run_id is not None,
        help="The report of one pipeline execution, built from its tracked runs.",
    )
)

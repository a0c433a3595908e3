"""The synthesis stage: (edited) masks → generator → a written synthetic dataset.

For source mask ``i`` and entry ``e`` of ``synthesis.edits`` the edited mask (a *variant*) is drawn
with ``numpy.random.default_rng(SeedSequence([seed, 1, i, e]))``, and image ``k`` of that variant
has the seed :func:`image_seed` ``(seed, i, e, k)``. Images are generated in batches of
``sampling.batch_size`` (in the order i, e, k); one ``generate`` call covers a batch and uses the
seed of its *first* image, which the manifest records for every image of the batch (with the
batch's position and size). With ``sampling.batch_size`` 1 every image is therefore reproducible
on its own from its manifest row; with larger batches, by rerunning the same configuration.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from medsynth.config.schema import MedsynthConfig
from medsynth.config.synthesis import parse_edit
from medsynth.device import resolve_device
from medsynth.errors import ConfigError, DataError, OutputExistsError
from medsynth.fileio import is_nonempty, sha256_json, write_json_atomic
from medsynth.generator import MaskGenerator
from medsynth.progress import LogProgress, Progress
from medsynth.synthesis.edits import apply_edit, default_lesion_label
from medsynth.synthesis.masks import MaskItem, load_masks, mask_vocabulary
from medsynth.synthesis.memorisation import MemorisationGuard
from medsynth.synthesis.writer import DATASET_JSON, MANIFEST_JSON, DatasetWriter, Provenance, SyntheticItem
from medsynth.tracking.base import NullTracker, Tracker

log = logging.getLogger(__name__)

__all__ = ["GRID_NAME", "SynthesisSummary", "image_seed", "synthesize", "synthesize_from_config"]

GRID_NAME = "samples.png"
REFUSED_JSON = "refused_memorised.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class SynthesisSummary:
    """Outcome of a synthesis run.

    Attributes:
        out_dir: The written dataset.
        n_masks: Source masks used.
        n_variants: (Edited) masks generated from (``n_masks * len(edits)``).
        n_images: Synthetic image/mask pairs written.
        n_edits_not_applied: Variants whose edit could not be applied (e.g. a lesion too large to fit).
        manifest: ``manifest.json`` of the dataset.
        dataset_json: MSD-style ``dataset.json``.
        grid: Sample grid PNG (None when ``synthesis.n_grid`` is 0).
        seconds: Wall time.
        n_refused: Images the memorisation guard refused to export (``synthesis.refuse_memorised``).
    """

    out_dir: Path
    n_masks: int
    n_variants: int
    n_images: int
    n_edits_not_applied: int
    manifest: Path
    dataset_json: Path
    grid: Path | None
    seconds: float
    n_refused: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON-able summary (paths as strings)."""
        return {
            "out_dir": str(self.out_dir),
            "n_masks": self.n_masks,
            "n_variants": self.n_variants,
            "n_images": self.n_images,
            "n_edits_not_applied": self.n_edits_not_applied,
            "manifest": str(self.manifest),
            "dataset_json": str(self.dataset_json),
            "grid": str(self.grid) if self.grid else None,
            "seconds": round(self.seconds, 3),
            "n_refused_memorised": self.n_refused,
        }


def _entropy(seed: int) -> int:
    return int(seed) % (1 << 64)


def image_seed(seed: int, mask_index: int, edit_index: int, k: int) -> int:
    """Sampling seed of image ``k`` of variant (mask ``mask_index``, edit ``edit_index``): a 32-bit int."""
    state = np.random.SeedSequence([_entropy(seed), 2, mask_index, edit_index, k]).generate_state(1)
    return int(state[0])


def edit_rng(seed: int, mask_index: int, edit_index: int) -> np.random.Generator:
    """Random generator of the edit of variant (mask ``mask_index``, edit ``edit_index``)."""
    return np.random.default_rng(np.random.SeedSequence([_entropy(seed), 1, mask_index, edit_index]))


def _not_applied(desc: dict[str, Any]) -> bool:
    if desc.get("applied") is False:
        return True
    return any(_not_applied(s) for s in desc.get("steps", []))


@dataclass(frozen=True)
class _Job:
    """One image to generate."""

    item: MaskItem
    mask_index: int
    edit_index: int
    spec: str
    k: int
    mask: npt.NDArray[np.uint8]
    edit: dict[str, Any]
    seed: int

    @property
    def item_id(self) -> str:
        tag = self.spec.replace("+", "-")
        return f"{_UNSAFE.sub('_', self.item.item_id)}_{tag}_{self.k}"


def _jobs(cfg: MedsynthConfig, masks: Sequence[MaskItem], labels: dict[int, str]) -> Iterator[_Job]:
    """Images in generation order (mask, edit, k); each variant's edit is computed when first needed."""
    sc = cfg.synthesis
    for i, item in enumerate(masks):
        for e, spec in enumerate(sc.edits):
            mask, desc = apply_edit(spec, item, masks, edit_rng(sc.seed, i, e), sc, labels)
            for k in range(sc.n_per_mask):
                yield _Job(item, i, e, spec, k, mask, desc, image_seed(sc.seed, i, e, k))


def _check_inputs(
    cfg: MedsynthConfig,
    generator: MaskGenerator,
    masks: Sequence[MaskItem],
    labels: dict[int, str],
    guard: MemorisationGuard | None,
) -> None:
    sc = cfg.synthesis
    if sc.refuse_memorised and guard is None:
        raise ConfigError(
            "config",
            "synthesis.refuse_memorised needs the training and test images of the preprocessing cache "
            "(the memorisation guard's reference)",
            hint="preprocess the config's dataset first, or set synthesis.refuse_memorised to false",
        )
    if not generator.conditional:
        raise ConfigError(
            "config",
            "synthesis needs a mask-conditioned generator (a trained ControlNet); this one ignores masks",
            hint="pass the ControlNet run",
        )
    if not masks:
        raise DataError("masks", "no source masks to synthesise from")
    expected = tuple(cfg.preprocess.spatial_size)
    for it in masks:
        if it.mask.ndim != len(expected) + 1 or it.mask.shape[0] != 1 or it.spatial_shape != expected:
            raise DataError(
                it.source or it.item_id,
                f"mask {it.item_id} has shape {tuple(it.mask.shape)}; the model needs {(1, *expected)} "
                "(preprocess.spatial_size)",
            )
        present = {int(v) for v in np.unique(it.mask)}
        bad = sorted(v for v in present if v not in labels or v >= generator.num_classes)
        if bad:
            raise DataError(
                it.source or it.item_id,
                f"mask {it.item_id} holds labels {bad} outside the vocabulary {sorted(labels)} or beyond the "
                f"generator's {generator.num_classes} classes",
            )
    if any("transplant" in parse_edit(s) for s in sc.edits):
        label = default_lesion_label(labels, sc.lesion_label)
        if not any(np.any(it.mask == label) for it in masks):
            raise DataError(
                "masks",
                f"synthesis.edits asks for 'transplant' but no source mask holds lesion label {label} "
                f"({labels[label]!r})",
                hint="use masks with lesions, or drop 'transplant' from synthesis.edits",
            )


def _intensity(cfg: MedsynthConfig, item: MaskItem) -> tuple[float, float] | None:
    rng = item.intensity_range if item.intensity_range is not None else cfg.synthesis.intensity_range
    if rng is not None and cfg.preprocess.intensity.method != "percentile":
        return None  # [0, 1] is the inverse of nothing under z-scoring: keep the model scale
    return rng


def _output_geometry(
    cfg: MedsynthConfig, job: _Job, image: npt.NDArray[np.float32]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], npt.NDArray[np.float64], dict[str, Any]]:
    """The image/mask/affine to write for a job (native or model grid) and the manifest's geometry fields."""
    item = job.item
    fields: dict[str, Any] = {
        "model_grid": {"shape": list(item.spatial_shape), "affine": np.asarray(item.affine).tolist()},
        "native_geometry": item.native.to_json() if item.native is not None else None,
        "source_intensity_range": list(item.source_range) if item.source_range is not None else None,
    }
    if item.native is None or cfg.synthesis.output_geometry == "model":
        return image, job.mask, item.affine, {**fields, "geometry": "model"}
    from medsynth.synthesis.native import to_native

    native_image, native_mask = to_native(image, job.mask, item.affine, item.native)
    return native_image, native_mask, item.native.affine, {**fields, "geometry": "native"}


def _grid_row(job: _Job, image: npt.NDArray[np.float32]) -> list[npt.NDArray[Any]]:
    from medsynth import viz

    mask = job.mask[0]
    index = viz.representative_slice(image[0], mask) if mask.ndim == 3 else None
    real = job.item.image[0] if job.item.image is not None and job.spec == "none" else np.zeros_like(image[0])
    return [
        viz.to_2d(real, index),
        viz.overlay_rgb(np.zeros(viz.to_2d(mask, index).shape, np.float32), viz.to_2d(mask, index), alpha=1.0),
        viz.to_2d(image[0], index),
    ]


RESUMED = "(resumed)"


def resume_key(
    cfg: MedsynthConfig,
    generator: MaskGenerator,
    masks: Sequence[MaskItem],
    labels: dict[int, str],
    guard: MemorisationGuard | None,
) -> str:
    """What a synthetic dataset depends on: a partly written one resumes only under the same key.

    The synthesis and sampling settings, the generator's weight hashes, the label vocabulary, the
    memorisation guard's threshold and every source mask (id, geometry, labels).
    """
    import hashlib

    h = hashlib.sha256()
    for it in masks:
        h.update(it.item_id.encode())
        h.update(np.ascontiguousarray(it.mask).tobytes())
        h.update(np.asarray(it.affine, dtype=np.float64).tobytes())
        h.update(repr(it.intensity_range).encode())
    return sha256_json(
        {
            "synthesis": cfg.synthesis.model_dump(mode="json"),
            "sampling": cfg.sampling.model_dump(mode="json"),
            "preprocess": cfg.preprocess.intensity.model_dump(mode="json"),
            "generator": generator.hashes,
            "labels": {str(k): v for k, v in labels.items()},
            "guard": None if guard is None else [guard.threshold, guard.distance, guard.percentile],
            "masks": h.hexdigest(),
        }
    )


def _written_image(writer: DatasetWriter, row: dict[str, Any]) -> npt.NDArray[np.float32]:
    """A written image back on the model's [0, 1] scale, ``(1, *S)`` (for the sample grid of a resumed run)."""
    from medsynth.data.io import read_image

    x = np.asarray(read_image(writer.staging / row["image"]).array, dtype=np.float32)
    rng = row.get("intensity_range")
    if str(row["image"]).endswith(".png"):
        x = x / (255.0 if writer.png_dtype == "uint8" else 65535.0)
    elif rng is not None:
        x = (x - rng[0]) / (rng[1] - rng[0])
    return np.clip(x, 0.0, 1.0)[None]


def synthesize(
    cfg: MedsynthConfig,
    generator: MaskGenerator,
    masks: list[MaskItem],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
    tracker: Tracker | None = None,
    labels: dict[int, str] | None = None,
    guard: MemorisationGuard | None = None,
) -> SynthesisSummary:
    """Generate ``synthesis.n_per_mask`` images for every configured edit of every mask and write the dataset.

    With ``synthesis.refuse_memorised`` every generated image goes through ``guard`` first; flagged
    images (possible copies of a training image) are not exported and are listed, with their nearest
    training image and distance, in ``refused_memorised.json`` of the dataset.

    Args:
        cfg: Resolved config (``synthesis``, ``sampling``, ``preprocess`` are used).
        generator: A mask-conditioned :class:`MaskGenerator`.
        masks: Source masks (at most ``synthesis.max_masks`` are used), at the model's image size.
        out_dir: Dataset folder (see :mod:`medsynth.synthesis.writer` for its layout).
        overwrite: Replace a non-empty ``out_dir`` once the new dataset is complete.
        progress: Receives ``advance(n)`` per generated batch.
        tracker: Receives the sample grid (``log_artifact``) and counts (``log_metrics``).
        labels: Label vocabulary; default :func:`medsynth.synthesis.masks.mask_vocabulary`.
        guard: The memorisation guard (see :func:`memorisation_guard`); required by ``refuse_memorised``.

    Returns:
        A :class:`SynthesisSummary`.

    Raises:
        OutputExistsError: ``out_dir`` is non-empty and ``overwrite`` is False (before any generation).
        ConfigError: ``refuse_memorised`` without a guard, an unconditional generator, or no usable lesion label.
        DataError: No masks, a mask of the wrong size or with unknown labels, transplant without donors.
    """
    t0 = time.monotonic()
    sc = cfg.synthesis
    vocab = dict(labels) if labels is not None else mask_vocabulary(cfg)
    source = list(masks[: sc.max_masks] if sc.max_masks is not None else masks)
    _check_inputs(cfg, generator, source, vocab, guard)
    refuse = guard if sc.refuse_memorised else None
    refused: list[dict[str, Any]] = []
    track = tracker or NullTracker()
    out = Path(out_dir)
    batch_size = cfg.sampling.batch_size
    n_total = len(source) * len(sc.edits) * sc.n_per_mask
    prog = progress or LogProgress(n_total, "synthesising")
    grid_rows: list[list[npt.NDArray[Any]]] = []
    grid_titles: list[str] = []
    not_applied: set[tuple[int, int]] = set()
    metadata = {
        "synthesis": sc.model_dump(mode="json"),
        "sampling": cfg.sampling.model_dump(mode="json"),
        "image_size": list(cfg.preprocess.spatial_size),
        "n_masks": len(source),
        "n_variants": len(source) * len(sc.edits),
        "seeding": "edit: SeedSequence([seed, 1, mask_index, edit_index]); image k: "
        "SeedSequence([seed, 2, mask_index, edit_index, k]); a batch uses its first image's seed",
    }
    writer = DatasetWriter(
        out,
        vocab,
        provenance=Provenance.from_sampling(generator.hashes, cfg.sampling),
        output_format=sc.output_format,
        png_dtype=sc.png_dtype,
        intensity_range=None,  # resolved per item by _intensity
        overwrite=overwrite,
        metadata=metadata,
        resume_key=resume_key(cfg, generator, source, vocab, refuse),
        channel_names=cfg.data.channels,
    )
    with writer:
        jobs = _jobs(cfg, source, vocab)
        n_done = 0
        refused.extend(writer.resumed_refused)
        finished = set(writer.resumed) | {str(r["item_id"]) for r in writer.resumed_refused}
        while True:
            batch = list(itertools.islice(jobs, batch_size))
            if not batch:
                break
            if all(job.item_id in finished for job in batch):  # written before a kill: not generated again
                for job in batch:
                    if _not_applied(job.edit):
                        not_applied.add((job.mask_index, job.edit_index))
                    if job.k == 0 and len(grid_rows) < sc.n_grid and job.item_id in writer.resumed:
                        written = _written_image(writer, writer.resumed[job.item_id])
                        if written.shape[1:] == job.mask.shape[1:]:  # native-geometry output: not on the grid
                            grid_rows.append(_grid_row(job, written))
                            grid_titles.append(f"{job.item.item_id}\n{job.spec}")
                n_done += len(batch)
                prog.advance(len(batch), f"{n_done}/{n_total} images {RESUMED}")
                continue
            batch_rows: list[dict[str, Any]] = []
            batch_refused: list[dict[str, Any]] = []
            seed = batch[0].seed
            cond = torch.from_numpy(np.stack([j.mask for j in batch]).astype(np.int64))
            generated = generator.generate(cond, cfg.sampling, seed)
            checks = refuse.check(generated) if refuse is not None else [None] * len(batch)
            images = generated.numpy().astype(np.float32)
            for pos, (job, image, check) in enumerate(zip(batch, images, checks, strict=True)):
                if check is not None and check["flagged"]:
                    batch_refused.append({"item_id": job.item_id, "source_id": job.item.item_id, **check})
                    continue
                if _not_applied(job.edit):
                    not_applied.add((job.mask_index, job.edit_index))
                out_image, out_mask, out_affine, geometry = _output_geometry(cfg, job, image)
                row = writer.add(
                    SyntheticItem(
                        item_id=job.item_id,
                        image=out_image,
                        mask=out_mask,
                        affine=out_affine,
                        source_id=job.item.item_id,
                        source_patient=job.item.patient_id,
                        edit=job.edit,
                        seed=seed,
                        source=job.item.source,
                        intensity_range=_intensity(cfg, job.item),
                        extra={
                            "image_seed": job.seed,
                            "k": job.k,
                            "batch": {"index": n_done // batch_size, "position": pos, "size": len(batch)},
                            **geometry,
                        },
                    )
                )
                batch_rows.append(row)
                if job.k == 0 and len(grid_rows) < sc.n_grid:
                    grid_rows.append(_grid_row(job, image))
                    grid_titles.append(f"{job.item.item_id}\n{job.spec}")
            writer.commit_items(batch_rows, batch_refused)  # the whole batch is on disk: record it
            refused.extend(batch_refused)
            n_done += len(batch)
            prog.advance(len(batch), f"{n_done}/{n_total} images")
        if refuse is not None and refused and len(refused) == n_done:
            raise DataError(
                out,
                f"all {n_done} synthetic images were refused as possible copies of training images "
                f"(nearest-training {refuse.distance} distance below {refuse.threshold:.4g})",
                hint="synthesise from held-out or edited masks, or set synthesis.refuse_memorised to false",
            )
        if refuse is not None:
            write_json_atomic(
                writer.path(REFUSED_JSON),
                {
                    "threshold": refuse.threshold,
                    "distance": refuse.distance,
                    "percentile": refuse.percentile,
                    "refused": refused,
                },
            )
        grid: Path | None = None
        if grid_rows:
            from medsynth.viz import save_grid

            save_grid(
                writer.path(GRID_NAME),
                grid_rows,
                titles=grid_titles,
                col_titles=["real (if known)", "mask", "synthetic"],
            )
            grid = out / GRID_NAME
    seconds = time.monotonic() - t0
    summary = SynthesisSummary(
        out_dir=out,
        n_masks=len(source),
        n_variants=len(source) * len(sc.edits),
        n_images=n_done - len(refused),
        n_edits_not_applied=len(not_applied),
        manifest=out / MANIFEST_JSON,
        dataset_json=out / DATASET_JSON,
        grid=grid,
        seconds=seconds,
        n_refused=len(refused),
    )
    if grid is not None:
        track.log_artifact(grid, "synthesis")
    track.log_metrics(
        {
            "synthesis/n_images": float(n_done),
            "synthesis/n_edits_not_applied": float(len(not_applied)),
            "synthesis/seconds_per_image": seconds / max(n_done, 1),
            "synthesis/n_refused_memorised": float(len(refused)),
        }
    )
    if not_applied:
        log.warning(
            "%d of %d edited masks kept unchanged (see 'edit' in %s)",
            len(not_applied),
            summary.n_variants,
            summary.manifest,
        )
    if refused:
        log.warning("%d images refused as possible copies of training images (see %s)", len(refused), REFUSED_JSON)
    log.info("synthesised %d images from %d masks into %s (%.1fs)", n_done, len(source), out, seconds)
    return summary


def memorisation_guard(cfg: MedsynthConfig, cache_dir: str | Path) -> MemorisationGuard | None:
    """The guard ``synthesis.refuse_memorised`` asks for, from the cache's train and test splits (None when off).

    Uses the ``validation`` section's ``memorisation_percentile``, ``memorisation_distance`` and
    ``memorisation_top_k``, so export-time refusals match the validation audit.

    Raises:
        DataError: The cache lacks a train or test split.
    """
    if not cfg.synthesis.refuse_memorised:
        return None
    from medsynth.data.dataset import load_split

    vc = cfg.validation
    train, test = load_split(cache_dir, "train"), load_split(cache_dir, "test")
    return MemorisationGuard.from_reference(
        train.images.float(),
        test.images.float(),
        train.item_ids,
        vc.memorisation_percentile,
        vc.memorisation_distance,
        vc.memorisation_top_k,
    )


def synthesize_from_config(
    cfg: MedsynthConfig,
    ae_run: str | Path,
    unet_run: str | Path,
    controlnet_run: str | Path,
    cache_dir: str | Path | None,
    out_dir: str | Path,
    *,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    tracker: Tracker | None = None,
    adapter: str | Path | None = None,
) -> SynthesisSummary:
    """Load the trained generator and the configured masks, then :func:`synthesize`.

    Args:
        cfg: Resolved config.
        ae_run: Autoencoder run folder (final checkpoint).
        unet_run: Diffusion UNet run folder.
        controlnet_run: ControlNet run folder.
        cache_dir: Preprocessing cache (for ``synthesis.source`` 'split'; None: the config's default).
        out_dir: Dataset folder.
        device: Torch device (default: CUDA if available, else CPU).
        overwrite: Replace a non-empty ``out_dir`` once the new dataset is complete.
        progress: Progress sink.
        tracker: Experiment tracker.
        adapter: A site adapter folder (:mod:`medsynth.adapter`) applied on top of the generator.

    Returns:
        A :class:`SynthesisSummary`.

    Raises:
        OutputExistsError: Checked first, before any model or mask is loaded.
    """
    from medsynth.generator import load_generator

    if not overwrite and is_nonempty(out_dir):
        raise OutputExistsError(out_dir)
    labels = mask_vocabulary(cfg)
    dev = resolve_device(device)
    masks = load_masks(cfg, cache_dir)
    generator = load_generator(cfg, ae_run, unet_run, controlnet_run, dev, num_classes=max(labels) + 1)
    if adapter is not None:
        from medsynth.adapter import apply_adapter

        apply_adapter(generator, adapter)
    guard = memorisation_guard(
        cfg, cache_dir if cache_dir is not None else Path(cfg.output_dir) / cfg.name / "preprocess"
    )
    return synthesize(
        cfg,
        generator,
        masks,
        out_dir,
        overwrite=overwrite,
        progress=progress,
        tracker=tracker,
        labels=labels,
        guard=guard,
    )

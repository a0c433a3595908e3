"""Writing a synthetic dataset: image/mask files, ``manifest.json`` and an MSD-style ``dataset.json``.

Layout of a written dataset (readable back by :func:`medsynth.data.layouts.discover`, layout msd)::

    images/<id>.nii.gz | images/<id>.png    synthetic image
    labels/<id>.nii.gz | labels/<id>.png    its conditioning mask (uint8 labels)
    manifest.json                           one row per item: provenance, edit, seed, geometry
    dataset.json                            MSD-style: labels, training list
    (samples.png and other extra files)

Geometry: every file is written in its mask's own geometry. NIfTI keeps the full affine (2D
masks become a 2D NIfTI; reading it back gives the same ``(D+1, D+1)`` affine up to NIfTI's
float32 storage). PNG keeps only the pixel spacing (no origin, no direction): each manifest row
holds the full affine and ``geometry_in_file`` says whether the PNG alone reproduces it.

Multi-contrast items (``channel_names`` with C > 1 names) write one image file per channel with
nnU-Net's channel suffix, ``images/<id>_0000.nii.gz``, ``images/<id>_0001.nii.gz``, ...; the row's
``image`` is channel 0 and ``images`` lists every channel in order (``dataset.json`` names them in
``modality``); their intensities stay on the model's ``[0, 1]`` scale (no source range is applied).

Intensities: the generator draws images on the model's scale, ``[0, 1]`` = the preprocessing's
percentile clip range. Original scanner values cannot be recovered in general (the per-volume
percentiles are not kept in the cache, and values outside them were clipped), so a source range is
restored only "where possible", i.e. where one is *given*: an item's own ``intensity_range``
(e.g. from a CSV manifest) or the writer's default ``(lo, hi)``; NIfTI images are then written as
``lo + x * (hi - lo)`` (float32). Without a range, NIfTI images stay in ``[0, 1]``. PNG images are
always the ``[0, 1]`` image quantised to uint8/uint16 (``round(x * max)``); a range is recorded in
the manifest so ``lo + png / max * (hi - lo)`` restores it. The row's ``intensity_space`` says which.

The dataset is built in a temporary sibling folder and moved into place only when complete
(:func:`medsynth.fileio.staged_dir`): an existing non-empty folder is refused up front unless
``overwrite``, and then replaced only once the new dataset is whole.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from medsynth.config.stages import SamplingConfig
from medsynth.data.io import read_image, write_image
from medsynth.fileio import is_nonempty, move_dir_into_place, staged_dir, write_json_atomic
from medsynth.ledger import ItemLedger

log = logging.getLogger(__name__)

__all__ = [
    "DATASET_JSON",
    "MANIFEST_JSON",
    "MANIFEST_ROW_KEYS",
    "DatasetWriter",
    "Provenance",
    "SyntheticItem",
    "write_dataset",
]

MANIFEST_JSON = "manifest.json"
LEDGER_JSONL = "items.jsonl"
DATASET_JSON = "dataset.json"
MANIFEST_VERSION = 1
MANIFEST_ROW_KEYS = (
    "id",
    "image",
    "mask",
    "source_id",
    "source",
    "source_patient",
    "edit",
    "seed",
    "model_hashes",
    "sampler",
    "steps",
    "guidance_scale",
    "eta",
    "intensity_range",
    "intensity_space",
    "affine",
    "geometry_in_file",
)
"""Keys every manifest row has (plus any ``extra`` of the item)."""

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
OutputFormat = Literal["nifti", "png"]


@dataclass(frozen=True)
class Provenance:
    """What produced the images, repeated in every manifest row.

    Attributes:
        model_hashes: SHA-256 of the weight files (``MaskGenerator.hashes``).
        sampler: Sampler name.
        steps: Sampling steps.
        guidance_scale: Classifier-free guidance scale.
        eta: DDIM stochasticity.
    """

    model_hashes: dict[str, str]
    sampler: str
    steps: int
    guidance_scale: float
    eta: float = 0.0

    @classmethod
    def from_sampling(cls, hashes: dict[str, str], sampling: SamplingConfig) -> Provenance:
        """Provenance of a generator's hashes and a sampling config."""
        return cls(dict(hashes), sampling.sampler, sampling.steps, sampling.scale, sampling.eta)

    def to_json(self) -> dict[str, Any]:
        """The manifest fields."""
        return {
            "model_hashes": dict(self.model_hashes),
            "sampler": self.sampler,
            "steps": int(self.steps),
            "guidance_scale": float(self.guidance_scale),
            "eta": float(self.eta),
        }


@dataclass(frozen=True)
class SyntheticItem:
    """One synthetic image with the mask it was generated from.

    Attributes:
        item_id: File stem (letters, digits, ``_ . -``; unique in the dataset).
        image: ``(1, *S)`` or ``S`` float image on the model's ``[0, 1]`` scale; ``(C, *S)`` for a
            writer with C channel names.
        mask: ``(1, *S)`` or ``S`` uint8 labels (the possibly edited conditioning mask).
        affine: ``(D+1, D+1)`` RAS affine of the mask.
        source_id: Id of the source mask.
        source_patient: Patient of the source mask, or None.
        edit: JSON-able description of the edit applied to the source mask.
        seed: Seed of the sampling call that produced the image.
        source: Where the source mask came from.
        intensity_range: ``(lo, hi)`` source range of this item (overrides the writer's default).
        extra: More JSON-able fields for the manifest row.
    """

    item_id: str
    image: npt.NDArray[np.floating[Any]]
    mask: npt.NDArray[np.integer[Any]]
    affine: npt.NDArray[np.float64]
    source_id: str
    source_patient: str | None
    edit: dict[str, Any]
    seed: int
    source: str = ""
    intensity_range: tuple[float, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _spatial(a: npt.NDArray[Any], d: int) -> npt.NDArray[Any]:
    arr = np.asarray(a)
    if arr.ndim == d + 1 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != d:
        raise ValueError(f"expected a ({d}D) array of shape S or (1, *S), got {arr.shape}")
    return arr


class DatasetWriter:
    """Writes a synthetic dataset item by item into a staging folder; commits it on a clean exit.

    Use as a context manager::

        with DatasetWriter(out, labels, provenance=prov) as w:
            w.add(item)
            ...
        # out/ now holds images/, labels/, manifest.json, dataset.json

    Args:
        out_dir: Final dataset folder.
        labels: Label vocabulary (index → name) for ``dataset.json`` and the label check.
        provenance: Model hashes and sampling settings, repeated in every row.
        output_format: ``"nifti"`` (2D or 3D) or ``"png"`` (2D only).
        png_dtype: PNG image sample type.
        intensity_range: Default ``(lo, hi)`` source range (see the module docstring); None: ``[0, 1]``.
        overwrite: Replace a non-empty ``out_dir`` (only once the new dataset is complete).
        name: Dataset name in ``dataset.json``.
        description: Dataset description in ``dataset.json``.
        metadata: More JSON-able fields for the top of ``manifest.json`` (e.g. the synthesis config).
        channel_names: The contrasts of multi-contrast items, in channel order (``data.channels``);
            empty or one name: single-channel items.
        resume_key: Make the dataset resumable item by item: it is built in the stable sibling
            ``.<name>.resume/`` with an :class:`~medsynth.ledger.ItemLedger` (``items.jsonl``) under this key.
            After a kill (or an error), a writer with the same key reopens it with the rows already
            written (:attr:`resumed`), so only the rest needs generating; another key starts afresh.
            None: a throw-away staging folder (nothing resumes).

    Raises:
        OutputExistsError: On entering, if ``out_dir`` is non-empty and ``overwrite`` is False.
    """

    def __init__(
        self,
        out_dir: str | Path,
        labels: dict[int, str],
        *,
        provenance: Provenance,
        output_format: OutputFormat = "nifti",
        png_dtype: Literal["uint8", "uint16"] = "uint8",
        intensity_range: tuple[float, float] | None = None,
        overwrite: bool = False,
        name: str = "medsynth-synthetic",
        description: str = "Synthetic MRI generated by medsynth from (edited) masks",
        metadata: dict[str, Any] | None = None,
        resume_key: str | None = None,
        channel_names: Sequence[str] = (),
    ) -> None:
        if output_format not in ("nifti", "png"):
            raise ValueError(f"output_format must be 'nifti' or 'png', got {output_format!r}")
        if 0 not in labels:
            raise ValueError(f"labels must contain 0 (background), got {labels}")
        self.out_dir = Path(out_dir)
        self.labels = dict(sorted((int(k), str(v)) for k, v in labels.items()))
        self.provenance = provenance
        self.output_format: OutputFormat = output_format
        self.png_dtype = png_dtype
        self.intensity_range = intensity_range
        self.overwrite = overwrite
        self.name, self.description = name, description
        self.metadata = dict(metadata or {})
        self.rows: list[dict[str, Any]] = []
        self.spatial_dims: int | None = None
        self._ctx: Any = None
        self._tmp: Path | None = None
        self.resume_key = resume_key
        self.channel_names = tuple(channel_names)
        self.ledger: ItemLedger | None = None
        self.resumed: dict[str, dict[str, Any]] = {}
        self.resumed_refused: list[dict[str, Any]] = []

    # ----- context ---------------------------------------------------------------------------
    @property
    def resume_dir(self) -> Path:
        """The stable staging folder of a resumable dataset."""
        return self.out_dir.parent / f".{self.out_dir.name}.resume"

    def _open_resumable(self, key: str) -> None:
        if not self.overwrite and is_nonempty(self.out_dir):
            from medsynth.errors import OutputExistsError

            raise OutputExistsError(self.out_dir)
        tmp = self.resume_dir
        self.ledger = ItemLedger(tmp / LEDGER_JSONL, key)
        done = self.ledger.done() if tmp.is_dir() else {}
        if not done:  # nothing to resume under this key: start afresh
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        for item_id, row in done.items():  # rows whose files are all there; refused items
            if "refused" in row:
                self.resumed_refused.append(row["refused"])
            elif all((tmp / p).is_file() for p in [row["mask"], *row.get("images", [row["image"]])]):
                self.resumed[item_id] = row
        self.rows = list(self.resumed.values())
        if self.rows:
            self.spatial_dims = len(self.rows[0]["affine"]) - 1
            log.info("%s: resuming, %d items already written", self.out_dir, len(self.rows))
        self._tmp = tmp

    def __enter__(self) -> DatasetWriter:
        if self.resume_key is not None:
            self._open_resumable(self.resume_key)
            return self
        self._ctx = staged_dir(self.out_dir, self.overwrite)
        self._tmp = self._ctx.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.resume_key is not None:
            if et is None and self._tmp is not None:  # on an error the folder stays, for the next run to resume
                self._finalize()
                (self._tmp / LEDGER_JSONL).unlink(missing_ok=True)
                move_dir_into_place(self._tmp, self.out_dir, self.overwrite)
            self._tmp = None
            return
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        if et is None:
            try:
                self._finalize()
            except BaseException as exc:
                ctx.__exit__(type(exc), exc, exc.__traceback__)
                raise
        ctx.__exit__(et, ev, tb)
        self._tmp = None

    @property
    def staging(self) -> Path:
        """The staging folder (only while the writer is open)."""
        if self._tmp is None:
            raise RuntimeError("DatasetWriter is not open; use it as a context manager")
        return self._tmp

    def path(self, relative: str) -> Path:
        """Where to write an extra file (e.g. ``"samples.png"``) so that it is committed with the dataset."""
        p = self.staging / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    # ----- items -----------------------------------------------------------------------------
    def commit_items(self, rows: Sequence[dict[str, Any]], refused: Sequence[dict[str, Any]] = ()) -> None:
        """Record written rows (and refused items) as finished in the resume ledger (no-op when not resumable).

        Call it once a unit of work (e.g. one generated batch) is fully written, so a kill never leaves
        half a unit recorded.
        """
        if self.ledger is None:
            return
        for row in rows:
            self.ledger.record(str(row["id"]), row)
        for rec in refused:
            self.ledger.record(str(rec["item_id"]), {"refused": rec})

    def add(self, item: SyntheticItem) -> dict[str, Any]:
        """Write one image/mask pair and record its manifest row.

        Returns:
            The manifest row (paths relative to the dataset folder).

        Raises:
            ValueError: On a bad or duplicate id, mismatching shapes, a bad affine, labels outside the
                vocabulary, or PNG output of a 3D item.
        """
        tmp = self.staging
        if not _ID.match(item.item_id):
            raise ValueError(f"item id {item.item_id!r} must be letters, digits, '_', '.', '-' (not first)")
        if item.item_id in self.resumed or any(r["id"] == item.item_id for r in self.rows):
            raise ValueError(f"duplicate item id {item.item_id!r}")
        affine = np.asarray(item.affine, dtype=np.float64)
        d = affine.shape[0] - 1
        if affine.shape != (d + 1, d + 1) or d not in (2, 3):
            raise ValueError(f"affine of {item.item_id} must be 3x3 or 4x4, got {affine.shape}")
        if self.spatial_dims is None:
            self.spatial_dims = d
        elif d != self.spatial_dims:
            raise ValueError(f"item {item.item_id} is {d}D but the dataset is {self.spatial_dims}D")
        n_ch = max(len(self.channel_names), 1)
        if n_ch > 1:
            image = np.asarray(item.image, dtype=np.float32)
            if image.ndim != d + 1 or image.shape[0] != n_ch:
                raise ValueError(f"item {item.item_id}: expected {n_ch} channels (C, *S), got {image.shape}")
            channels = list(image)
            image = image[0]
        else:
            image = _spatial(item.image, d).astype(np.float32)
            channels = [image]
        mask = _spatial(item.mask, d)
        if image.shape != mask.shape:
            raise ValueError(f"item {item.item_id}: image {image.shape} and mask {mask.shape} differ in shape")
        bad = sorted(set(np.unique(mask).tolist()) - set(self.labels))
        if bad:
            raise ValueError(f"item {item.item_id}: mask labels {bad} are not in the vocabulary {sorted(self.labels)}")
        clash = sorted(set(item.extra) & set(MANIFEST_ROW_KEYS))
        if clash:
            raise ValueError(f"item {item.item_id}: extra fields {clash} clash with manifest row keys")
        mask_u8 = mask.astype(np.uint8)
        rng = item.intensity_range if item.intensity_range is not None else self.intensity_range
        if n_ch > 1:  # a source range is one contrast's: multi-contrast items stay on the model scale [0, 1]
            rng = None
        suffixes = [f"_{k:04d}" for k in range(n_ch)] if n_ch > 1 else [""]
        if self.output_format == "png":
            if d != 2:
                raise ValueError(f"item {item.item_id} is 3D: PNG output is 2D only, use nifti")
            top = 255 if self.png_dtype == "uint8" else 65535
            images_rel = [f"images/{item.item_id}{sfx}.png" for sfx in suffixes]
            for rel, ch in zip(images_rel, channels, strict=True):
                write_image(tmp / rel, np.floor(np.clip(ch, 0.0, 1.0) * top + 0.5).astype(self.png_dtype), affine)
            image_rel, mask_rel = images_rel[0], f"labels/{item.item_id}.png"
            write_image(tmp / mask_rel, mask_u8, affine)
            back = read_image(tmp / mask_rel, kind="mask").affine
            in_file = bool(back.shape == affine.shape and np.allclose(back, affine, atol=1e-4))
            space = f"png {self.png_dtype} of [0, 1]" + ("; source = lo + png / max * (hi - lo)" if rng else "")
        else:
            images_rel = [f"images/{item.item_id}{sfx}.nii.gz" for sfx in suffixes]
            for rel, ch in zip(images_rel, channels, strict=True):
                x = np.clip(ch, 0.0, 1.0)
                values = x if rng is None else (rng[0] + x * (rng[1] - rng[0]))
                write_image(tmp / rel, values.astype(np.float32), affine)
            image_rel, mask_rel = images_rel[0], f"labels/{item.item_id}.nii.gz"
            write_image(tmp / mask_rel, mask_u8, affine)
            in_file = True
            space = "source" if rng is not None else "model [0, 1]"
        if not in_file and not any(not r["geometry_in_file"] for r in self.rows):
            log.warning(
                "%s: PNG keeps only pixel spacing; the full affine of each item is in %s", self.out_dir, MANIFEST_JSON
            )
        row: dict[str, Any] = {
            "id": item.item_id,
            "image": image_rel,
            **({"images": images_rel, "channels": list(self.channel_names)} if n_ch > 1 else {}),
            "mask": mask_rel,
            "source_id": item.source_id,
            "source": item.source,
            "source_patient": item.source_patient,
            "edit": item.edit,
            "seed": int(item.seed),
            **self.provenance.to_json(),
            "intensity_range": [float(rng[0]), float(rng[1])] if rng is not None else None,
            "intensity_space": space,
            "affine": affine.tolist(),
            "geometry_in_file": in_file,
            **item.extra,
        }
        self.rows.append(row)
        return row

    # ----- commit ----------------------------------------------------------------------------
    def _finalize(self) -> None:
        tmp = self.staging
        if not self.rows:
            raise ValueError(f"{self.out_dir}: no items were written; refusing to commit an empty dataset")
        manifest = {
            "version": MANIFEST_VERSION,
            "kind": "medsynth-synthetic",
            "spatial_dims": self.spatial_dims,
            "output_format": self.output_format,
            "labels": {str(k): v for k, v in self.labels.items()},
            "intensity_range": list(self.intensity_range) if self.intensity_range else None,
            "provenance": self.provenance.to_json(),
            **self.metadata,
            "n_items": len(self.rows),
            "items": self.rows,
        }
        write_json_atomic(tmp / MANIFEST_JSON, manifest)
        write_json_atomic(
            tmp / DATASET_JSON,
            {
                "name": self.name,
                "description": self.description,
                "reference": "medsynth.synthesis (see manifest.json for provenance)",
                "licence": "as the source masks and training data",
                "tensorImageSize": f"{self.spatial_dims}D",
                "modality": {str(k): f"{n} (synthetic)" for k, n in enumerate(self.channel_names)}
                if len(self.channel_names) > 1
                else {"0": "MRI (synthetic)"},
                "labels": {str(k): v for k, v in self.labels.items()},
                "numTraining": len(self.rows),
                "numTest": 0,
                "training": [{"image": f"./{r['image']}", "label": f"./{r['mask']}"} for r in self.rows],
                "test": [],
            },
        )


def write_dataset(
    out_dir: str | Path,
    items: Iterable[SyntheticItem],
    labels: dict[int, str],
    *,
    provenance: Provenance,
    output_format: OutputFormat = "nifti",
    png_dtype: Literal["uint8", "uint16"] = "uint8",
    intensity_range: tuple[float, float] | None = None,
    overwrite: bool = False,
    extra_files: Sequence[tuple[str, Callable[[Path], object]]] = (),
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a whole synthetic dataset at once (see :class:`DatasetWriter`).

    Args:
        out_dir: Final dataset folder.
        items: The image/mask pairs.
        labels: Label vocabulary.
        provenance: Model hashes and sampling settings.
        output_format: ``"nifti"`` or ``"png"`` (2D).
        png_dtype: PNG image sample type.
        intensity_range: Default source range (see the module docstring).
        overwrite: Replace a non-empty ``out_dir`` once the new dataset is complete.
        extra_files: ``(relative name, writer(path))`` pairs written into the dataset folder.
        metadata: More fields for the top of ``manifest.json``.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        OutputExistsError: If ``out_dir`` is non-empty and ``overwrite`` is False (before writing anything).
    """
    with DatasetWriter(
        out_dir,
        labels,
        provenance=provenance,
        output_format=output_format,
        png_dtype=png_dtype,
        intensity_range=intensity_range,
        overwrite=overwrite,
        metadata=metadata,
    ) as w:
        for it in items:
            w.add(it)
        for rel, fn in extra_files:
            fn(w.path(rel))
    return Path(out_dir)

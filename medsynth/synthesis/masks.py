"""Sources of conditioning masks for synthesis: a cache split, a folder of mask files, a CSV manifest.

Every source returns :class:`MaskItem` objects whose masks are in the *cache's* label space (the
vocabulary :func:`medsynth.data.preprocess.output_labels` gives: ``data.labels`` plus an enabled
derived label) and at the model's image size. Masks read from files (folder, manifest) may have
any size, spacing, orientation and raw label values: they go through the training transforms
(orientation, spacing, foreground crop, ``data.label_remap``, crop/pad; see
:mod:`medsynth.synthesis.native`) and keep their own geometry (``MaskItem.native``) so synthetic
output can be written back onto it. A config that derives a label from the image (e.g. LGG's
'brain') needs that image (manifest ``image`` column) or a mask that already holds the label.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from medsynth.config.schema import MedsynthConfig
from medsynth.data.io import is_dicom_dir, is_image_file
from medsynth.data.layouts import stem
from medsynth.data.preprocess import output_labels
from medsynth.errors import DataError
from medsynth.synthesis.native import GridMask, NativeGeometry, mask_to_grid

log = logging.getLogger(__name__)

__all__ = [
    "MaskItem",
    "load_masks",
    "mask_vocabulary",
    "masks_from_folder",
    "masks_from_manifest",
    "masks_from_split",
]


@dataclass(frozen=True)
class MaskItem:
    """One conditioning mask with its geometry and provenance.

    Attributes:
        item_id: Unique id (cache item id, or the file stem; nested files are qualified by folder).
        mask: ``(1, *S)`` uint8 labels in the cache's label space.
        affine: ``(D+1, D+1)`` RAS affine of the mask on the model grid (voxel index → mm).
        patient_id: Patient of the mask when known (cache split, manifest ``patient`` column), else None.
        source: Where it came from, for the manifest (e.g. ``"cache:<dir>:test"``, ``"file:<path>"``).
        image: ``(1, *S)`` float32 real image of the mask when known (cache split), else None.
        intensity_range: Per-mask ``(lo, hi)`` of the source intensities (manifest columns
            ``intensity_lo``/``intensity_hi``), else None.
        native: Geometry of the source mask file (folder/manifest sources), which native output goes back to.
        source_range: ``(lo, hi)`` source intensities that the given image's normalisation mapped to 0 and 1
            (manifest ``image`` column, percentile scaling), else None.
    """

    item_id: str
    mask: npt.NDArray[np.uint8]
    affine: npt.NDArray[np.float64]
    patient_id: str | None
    source: str
    image: npt.NDArray[np.float32] | None = None
    intensity_range: tuple[float, float] | None = None
    native: NativeGeometry | None = None
    source_range: tuple[float, float] | None = None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The mask's spatial shape ``S``."""
        return tuple(int(s) for s in self.mask.shape[1:])


def mask_vocabulary(cfg: MedsynthConfig) -> dict[int, str]:
    """The label vocabulary masks must use: the cache's (``data.labels`` plus an enabled derived label)."""
    return output_labels(cfg)


def _limit(items: list[MaskItem], max_masks: int | None) -> list[MaskItem]:
    return items if max_masks is None else items[:max_masks]


def masks_from_split(cache_dir: str | Path, split: str | None, max_masks: int | None = None) -> list[MaskItem]:
    """The masks (and real images) of one split of a preprocessing cache.

    Args:
        cache_dir: Folder holding the cache's ``manifest.json``.
        split: ``"train"``, ``"val"``, ``"test"``, or None / ``"all"`` for every split.
        max_masks: Keep only the first N items (the cache's deterministic order).

    Returns:
        One :class:`MaskItem` per cached item, with its patient and real image.

    Raises:
        DataError: If the cache is missing or the split is empty.
    """
    from medsynth.data.dataset import load_split

    which = None if split in (None, "all") else split
    data = load_split(cache_dir, which, max_items=max_masks)
    masks = data.masks.numpy().astype(np.uint8, copy=False)
    images = data.images.numpy().astype(np.float32, copy=False)
    where = f"cache:{Path(cache_dir)}:{split or 'all'}"
    return [
        MaskItem(
            item_id=data.item_ids[i],
            mask=masks[i],
            affine=np.asarray(data.affines[i], dtype=np.float64),
            patient_id=data.patients[i],
            source=where,
            image=images[i],
        )
        for i in range(len(data))
    ]


def _read_mask(path: Path, cfg: MedsynthConfig, labels: dict[int, str], image: Path | None = None) -> GridMask:
    """Read one mask file (and its image) and bring it onto the model grid as training does."""
    return mask_to_grid(path, cfg, labels, image)


def _check_vocabulary_fits(labels: dict[int, str]) -> None:
    if max(labels) > 255:
        raise DataError("config", f"label index {max(labels)} does not fit uint8 masks (max 255)")


def _qualified_id(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return "__".join([*rel.parent.parts, stem(path)])


def masks_from_folder(folder: str | Path, cfg: MedsynthConfig, max_masks: int | None = None) -> list[MaskItem]:
    """Every mask file below a folder (any format :func:`medsynth.data.io.read_image` reads).

    Files are found recursively (hidden files skipped) in sorted order; a DICOM series folder
    counts as one mask. Values are remapped with ``data.label_remap`` and must then be in the
    vocabulary (:func:`mask_vocabulary`).

    Args:
        folder: The folder.
        cfg: Config giving the vocabulary, the remapping and the preprocessing transforms.
        max_masks: Keep only the first N files.

    Returns:
        One :class:`MaskItem` per file, ``patient_id`` None, id = file stem (qualified by sub-folder).

    Raises:
        DataError: Missing/empty folder, unreadable file, wrong dimensionality, labels outside
            the vocabulary, a derived label the config needs but the mask lacks.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(root, "masks folder does not exist")
    labels = mask_vocabulary(cfg)
    _check_vocabulary_fits(labels)
    entries: list[Path] = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        is_file = p.is_file() and is_image_file(p) and p.suffix.lower() != ".dcm"
        if is_file or (p.is_dir() and is_dicom_dir(p)):  # a DICOM series folder is one mask
            entries.append(p)
    if not entries:
        raise DataError(root, "masks folder holds no image files")
    items: list[MaskItem] = []
    for p in entries[: max_masks or len(entries)]:
        g = _read_mask(p, cfg, labels)
        items.append(MaskItem(_qualified_id(p, root), g.mask, g.affine, None, f"file:{p}", native=g.native))
    _check_unique(items, root)
    return items


def _float_or_none(row: dict[str, str], key: str, path: Path, line: int) -> float | None:
    raw = (row.get(key) or "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise DataError(path, f"line {line}: column {key!r} is not a number ({raw!r})") from None


def masks_from_manifest(csv_path: str | Path, cfg: MedsynthConfig, max_masks: int | None = None) -> list[MaskItem]:
    """Masks listed in a CSV manifest.

    Columns: ``mask`` (required; path relative to the CSV's folder), and optionally ``image`` (the
    mask's image on the same grid: a derived label is computed from it as in training, and its
    intensity scale is recorded), ``id`` (default: the file stem), ``patient``, and ``intensity_lo`` +
    ``intensity_hi`` (the source intensity range the synthetic image of this mask is mapped back to).

    Args:
        csv_path: The manifest.
        cfg: Config giving the vocabulary, the remapping and the preprocessing transforms.
        max_masks: Keep only the first N rows.

    Returns:
        One :class:`MaskItem` per row, in file order.

    Raises:
        DataError: Missing file or column, empty manifest, duplicate ids, or a bad mask (see
            :func:`masks_from_folder`).
    """
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(path, "masks manifest does not exist")
    labels = mask_vocabulary(cfg)
    _check_vocabulary_fits(labels)
    items: list[MaskItem] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        if "mask" not in cols:
            raise DataError(path, f"masks manifest needs a 'mask' column (has {sorted(cols)})")
        for line, row in enumerate(reader, start=2):
            if max_masks is not None and len(items) >= max_masks:
                break
            if not (row.get("mask") or "").strip():
                raise DataError(path, f"line {line}: empty 'mask' column")
            mpath = (path.parent / row["mask"].strip()).resolve()
            ipath = (path.parent / row["image"].strip()).resolve() if (row.get("image") or "").strip() else None
            g = _read_mask(mpath, cfg, labels, ipath)
            lo = _float_or_none(row, "intensity_lo", path, line)
            hi = _float_or_none(row, "intensity_hi", path, line)
            if (lo is None) != (hi is None) or (lo is not None and hi is not None and not lo < hi):
                raise DataError(path, f"line {line}: give both intensity_lo < intensity_hi, or neither")
            rng = (lo, hi) if lo is not None and hi is not None else None
            item_id = (row.get("id") or "").strip() or stem(mpath)
            patient = (row.get("patient") or "").strip() or None
            items.append(
                MaskItem(
                    item_id,
                    g.mask,
                    g.affine,
                    patient,
                    f"manifest:{path}:{line}",
                    g.image,
                    rng,
                    native=g.native,
                    source_range=g.source_range,
                )
            )
    if not items:
        raise DataError(path, "masks manifest lists no masks")
    _check_unique(items, path)
    return items


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _check_unique(items: list[MaskItem], where: Path) -> None:
    ids = [_SAFE.sub("_", it.item_id) for it in items]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(where, f"duplicate mask ids {dup[:5]}", hint="give each mask a unique file name or id")


def load_masks(cfg: MedsynthConfig, cache_dir: str | Path | None = None) -> list[MaskItem]:
    """The source masks a config asks for (``cfg.synthesis.source``), at most ``max_masks``.

    Args:
        cfg: Resolved config.
        cache_dir: Preprocessing cache (source ``split``); default ``<output_dir>/<name>/preprocess``.

    Returns:
        The masks, in a deterministic order.
    """
    from medsynth.data.preprocess import cache_dir_for

    sc = cfg.synthesis
    if sc.source == "split":
        return masks_from_split(cache_dir if cache_dir is not None else cache_dir_for(cfg), sc.split, sc.max_masks)
    if sc.masks_path is None:  # the config validator already requires it
        raise DataError("config", f"synthesis.source {sc.source!r} needs synthesis.masks_path")
    if sc.source == "folder":
        return masks_from_folder(sc.masks_path, cfg, sc.max_masks)
    return masks_from_manifest(sc.masks_path, cfg, sc.max_masks)

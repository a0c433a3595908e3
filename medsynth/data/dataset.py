"""In-memory arrays of a preprocessed split (the cache written by :mod:`medsynth.data.preprocess`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsynth.data.preprocess import load_manifest
from medsynth.errors import DataError


@dataclass(frozen=True)
class ArraySet:
    """Items of one split held in memory.

    Attributes:
        images: ``(N, C, *S)`` float32, normalised intensities (``[0, 1]`` for percentile scaling); C = 1
            unless the cache holds multi-contrast cases (``data.channels``).
        masks: ``(N, 1, *S)`` uint8 label indices.
        affines: ``(N, D+1, D+1)`` float64 RAS affines of the items.
        item_ids: Item ids, in order.
        patients: Patient id of each item.
        labels: Label vocabulary of the cache (index → name).
    """

    images: torch.Tensor
    masks: torch.Tensor
    affines: np.ndarray
    item_ids: list[str]
    patients: list[str]
    labels: dict[int, str]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of mask channels of a one-hot encoding (max label + 1)."""
        return max(self.labels) + 1

    @property
    def n_channels(self) -> int:
        """Image channels per item (C > 1 for multi-contrast caches)."""
        return int(self.images.shape[1])

    def one_channel(self) -> ArraySet:
        """Every channel of every item as its own single-channel item: images ``(N * C, 1, *S)``, item-major.

        Item ids gain a ``#k`` channel suffix when C > 1; a single-channel set is returned as it is.
        """
        c = self.n_channels
        if c == 1:
            return self
        return ArraySet(
            self.images.reshape(-1, 1, *self.images.shape[2:]),
            self.masks.repeat_interleave(c, 0),
            np.repeat(self.affines, c, 0),
            [f"{i}#{k}" for i in self.item_ids for k in range(c)],
            [p for p in self.patients for _ in range(c)],
            self.labels,
        )

    def subset(self, index: list[int] | np.ndarray) -> ArraySet:
        """The items at ``index`` (in that order)."""
        idx = [int(i) for i in index]
        return ArraySet(
            self.images[idx],
            self.masks[idx],
            self.affines[idx],
            [self.item_ids[i] for i in idx],
            [self.patients[i] for i in idx],
            self.labels,
        )


def load_split(cache_dir: str | Path, split: str | None, max_items: int | None = None) -> ArraySet:
    """Load every item of ``split`` (or all items if None) from a preprocessing cache.

    Args:
        cache_dir: Folder holding ``manifest.json``.
        split: "train", "val", "test" or None for all.
        max_items: Keep N items spread evenly over the split's (sorted, patient-grouped) items, so a
            subset still covers every patient rather than the first few; None keeps all.

    Returns:
        An :class:`ArraySet`.

    Raises:
        DataError: If the cache is missing or the split is empty.
    """
    cache = Path(cache_dir)
    manifest = load_manifest(cache)
    items = [it for it in manifest["items"] if split is None or it["split"] == split]
    if max_items is not None and len(items) > max_items:
        keep = np.linspace(0, len(items) - 1, max_items).round().astype(np.int64)
        items = [items[int(i)] for i in np.unique(keep)]
    if not items:
        raise DataError(cache / "manifest.json", f"split {split!r} has no items")
    by_file: dict[str, list[dict[str, object]]] = {}
    for it in items:
        by_file.setdefault(str(it["file"]), []).append(it)
    images, masks, affines, ids, pats = [], [], [], [], []
    for f, its in by_file.items():
        with np.load(cache / f) as z:
            im, mk, af = z["image"], z["mask"], z["affine"]
        for it in its:
            i = int(str(it["index"]))
            images.append(im[i])
            masks.append(mk[i])
            affines.append(af[i])
            ids.append(str(it["item_id"]))
            pats.append(str(it["patient_id"]))
    labels = {int(k): v for k, v in manifest["labels"].items()}
    return ArraySet(
        torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)), np.stack(affines), ids, pats, labels
    )

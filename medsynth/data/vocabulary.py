"""Where a dataset's label vocabulary comes from: the config, a ``dataset.json``, or the masks themselves.

Resolution order (first that applies):

1. ``data.labels`` given in the config (or on the command line): used as declared; a mask value
   outside it is a QC error naming the file and the values.
2. A ``dataset.json`` next to the data (Medical Segmentation Decathlon ``{"0": "background", ...}`` or
   nnU-Net v2 ``{"background": 0, ...}``): its labels are the declared vocabulary.
3. Neither: the vocabulary is inferred as the union of the mask values (after ``data.label_remap``),
   with generic names (``foreground`` for a binary mask, else ``label_<v>``), and reported as inferred.

Downstream stages read the vocabulary the preprocessing cache recorded (``data_labels`` in its
manifest), so every stage of a run uses the same labels without rescanning the masks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.config.data import DataConfig
from medsynth.config.schema import MedsynthConfig
from medsynth.data.labels import HOW_TO_DECLARE
from medsynth.errors import DataError

log = logging.getLogger(__name__)

MAX_INFERRED_LABEL = 63
"""Largest mask value accepted when inferring a vocabulary (a one-hot of 64 classes is already large)."""
DATASET_JSON = "dataset.json"


@dataclass(frozen=True)
class Vocabulary:
    """A resolved label vocabulary.

    Attributes:
        labels: Mask value -> name (0 is the background).
        source: ``"config"``, ``"dataset.json"`` or ``"inferred"``.
        detail: One line saying where the labels came from (for logs and reports).
        label_remap: The remapping in force (an inferred ``{255: 1}`` for 0/255 masks included).
    """

    labels: dict[int, str]
    source: str
    detail: str
    label_remap: dict[int, int]

    def to_json(self) -> dict[str, Any]:
        """JSON-compatible form (keys as strings)."""
        return {
            "labels": {str(k): v for k, v in self.labels.items()},
            "source": self.source,
            "detail": self.detail,
            "label_remap": {str(k): v for k, v in self.label_remap.items()},
        }


def labels_declared(data: DataConfig) -> bool:
    """True when ``data.labels`` holds a vocabulary (config file, override, CLI, or already resolved).

    An empty vocabulary (the default) means "resolve it from the data"; unlike a "was it set" flag it
    survives the JSON round trips of configs between stages and Prefect tasks.
    """
    return bool(data.labels)


def dataset_json_path(data: DataConfig) -> Path:
    """Where a ``dataset.json`` describing the data would be: in the root, or next to a CSV manifest."""
    root = Path(data.root)
    return (root.parent if root.suffix.lower() == ".csv" else root) / DATASET_JSON


def read_dataset_json(path: Path) -> dict[str, Any] | None:
    """The parsed ``dataset.json`` at ``path``, or None when there is none.

    Raises:
        DataError: When the file exists but is not a JSON object.
    """
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataError(path, "is not a JSON object")
    return meta


def labels_from_dataset_json(meta: dict[str, Any], path: Path) -> dict[int, str] | None:
    """The ``labels`` of an MSD or nnU-Net v2 ``dataset.json`` as value -> name, or None when absent.

    MSD writes ``{"0": "background", "1": "Anterior"}``; nnU-Net v2 writes ``{"background": 0,
    "Anterior": 1}``. nnU-Net v2 region entries (a name mapped to a list of values) describe unions of
    labels, not new mask values, and are skipped.

    Raises:
        DataError: When the labels cannot be read as integer values with names.
    """
    raw = meta.get("labels")
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise DataError(path, f"'labels' must be a non-empty object (got {type(raw).__name__})")
    out: dict[int, str] = {}
    try:
        if all(isinstance(v, str) for v in raw.values()):  # MSD: "value": "name"
            out = {int(k): str(v) for k, v in raw.items()}
        else:  # nnU-Net v2: "name": value (or a list of values = a region, skipped)
            for name, v in raw.items():
                if isinstance(v, list):
                    continue
                out[int(v)] = str(name)
    except (TypeError, ValueError) as exc:
        raise DataError(path, f"'labels' must map integer values to names ({exc})") from exc
    if 0 not in out:
        raise DataError(path, f"'labels' has no background value 0 (values {sorted(out)})")
    return dict(sorted(out.items()))


def _mask_values(data: DataConfig, remap: dict[int, int]) -> tuple[set[int], int]:
    """Union of the (remapped) values of every readable mask, and the number of masks read."""
    from medsynth.data.io import read_image
    from medsynth.data.layouts import discover

    values: set[int] = set()
    n = 0
    for case in discover(data).cases:
        if case.mask is None:
            continue
        try:
            arr = read_image(case.mask, "mask").array
        except DataError:
            continue  # unreadable masks are reported by QC, with their file
        uniq = np.unique(arr)
        if uniq.size and not np.all(np.mod(uniq.astype(np.float64), 1.0) == 0):
            raise DataError(
                case.mask,
                f"mask holds non-integer values (e.g. {float(uniq[np.mod(uniq, 1) != 0][0]):g}); not a label map",
                hint="masks must hold integer labels; " + HOW_TO_DECLARE,
            )
        vals = {int(v) for v in uniq.tolist()}
        values |= {remap.get(v, v) for v in vals}
        n += 1
    return values, n


def _generic_names(values: set[int]) -> dict[int, str]:
    vals = sorted(values | {0})
    if vals == [0, 1]:
        return {0: "background", 1: "foreground"}
    return {v: "background" if v == 0 else f"label_{v}" for v in vals}


def infer_vocabulary(data: DataConfig) -> Vocabulary:
    """Resolve the vocabulary of a dataset (config, then ``dataset.json``, then the mask values).

    Args:
        data: The data config; its ``labels`` count as declared only when set explicitly.

    Returns:
        The :class:`Vocabulary`.

    Raises:
        DataError: A broken ``dataset.json``, masks with non-integer values, or inferred values above
            :data:`MAX_INFERRED_LABEL` (named with the mask values and how to declare labels).
    """
    remap = dict(data.label_remap)
    if labels_declared(data):
        return Vocabulary(dict(sorted(data.labels.items())), "config", "labels declared in the config", remap)
    meta_path = dataset_json_path(data)
    meta = read_dataset_json(meta_path)
    if meta is not None:
        labels = labels_from_dataset_json(meta, meta_path)
        if labels is not None:
            bad = sorted(v for v in remap.values() if v not in labels)
            if bad:
                raise DataError(
                    meta_path, f"data.label_remap maps to values {bad} that its 'labels' {sorted(labels)} lack"
                )
            return Vocabulary(labels, DATASET_JSON, f"labels read from {meta_path}", remap)
    values, n = _mask_values(data, remap)
    if values == {0, 255} and not remap:  # a binary mask saved as 0/255 (PNG, JPEG-era tools)
        remap = {255: 1}
        values = {0, 1}
        note = "; values 0/255 read as a binary mask (label_remap {255: 1})"
    else:
        note = ""
    big = sorted(v for v in values if v > MAX_INFERRED_LABEL or v < 0)
    if big:
        raise DataError(
            Path(data.root),
            f"masks hold values {big[:10]} (all values {sorted(values)[:12]}); cannot infer a label vocabulary "
            f"from values outside 0..{MAX_INFERRED_LABEL}",
            hint=HOW_TO_DECLARE,
        )
    labels = _generic_names(values)
    detail = f"labels inferred from {n} masks (union of values {sorted(values)}){note}"
    log.info("%s", detail)
    return Vocabulary(labels, "inferred", detail, remap)


def resolve_labels(cfg: MedsynthConfig) -> tuple[MedsynthConfig, Vocabulary]:
    """The config with its vocabulary resolved from the data (see :func:`infer_vocabulary`).

    The returned config declares the labels (and any inferred remapping), so that everything after
    this point, including the resolved config saved with the cache, uses exactly these labels.
    """
    vocab = infer_vocabulary(cfg.data)
    if vocab.source == "config":
        return cfg, vocab
    data = cfg.data.model_copy(update={"labels": vocab.labels, "label_remap": vocab.label_remap})
    return cfg.model_copy(update={"data": data}), vocab


def data_labels(cfg: MedsynthConfig) -> dict[int, str]:
    """The data label vocabulary of a run, for stages after preprocessing.

    Declared labels are returned as they are; otherwise the vocabulary the preprocessing cache
    recorded (so nothing is rescanned and every stage agrees), and only without a cache the
    vocabulary inferred from the data.
    """
    if labels_declared(cfg.data):
        return dict(cfg.data.labels)
    from medsynth.data.preprocess import MANIFEST, cache_dir_for

    manifest = cache_dir_for(cfg) / MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text(encoding="utf-8")).get("data_labels")
        if isinstance(recorded, dict):
            return {int(k): str(v) for k, v in recorded.items()}
    return infer_vocabulary(cfg.data).labels

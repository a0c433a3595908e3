"""External test sets: another site or cohort, preprocessed like the training data and scored separately.

``experiment.external_test`` names a dataset folder (any layout the data layer reads) or a CSV
manifest. It is preprocessed with the SAME settings as the main data (labels, remap, channel,
preprocess section, QC) into its own cache, ``<output_dir>/<name>/external/<digest>/``, and every one
of its items is test data (a manifest's ``split`` column is ignored). It never enters training or
model selection: the grid refuses it when a patient id is shared with the training data, the pool,
or the validation split (:func:`medsynth.evaluation.selection.check_no_leak`).
"""

from __future__ import annotations

from pathlib import Path

from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet
from medsynth.fileio import sha256_json
from medsynth.progress import Progress

__all__ = ["external_cache_dir", "external_config", "load_external_test"]


def external_config(cfg: MedsynthConfig, source: str | Path) -> MedsynthConfig:
    """``cfg`` reading ``source`` instead of ``data.root`` (a ``.csv`` file: the 'csv' layout), every
    patient in the test split; all other data and preprocessing settings unchanged."""
    src = str(source)
    layout = "csv" if src.lower().endswith(".csv") else cfg.data.layout
    split = cfg.data.split.model_copy(update={"train": 0.0, "val": 0.0, "test": 1.0})
    data = cfg.data.model_copy(update={"root": src, "layout": layout, "split": split})
    return cfg.model_copy(update={"data": data})


def external_cache_dir(cfg: MedsynthConfig, source: str | Path) -> Path:
    """The external set's own cache: ``<output_dir>/<name>/external/<digest of its path>``."""
    digest = sha256_json({"source": str(Path(source).resolve())})[:12]
    return Path(cfg.output_dir) / cfg.name / "external" / digest


def load_external_test(cfg: MedsynthConfig, source: str | Path, progress: Progress | None = None) -> ArraySet:
    """Preprocess (cached per case, like the main data) and load every item of an external test set.

    Raises:
        DataError: If the source cannot be read or holds no item (one line naming the file and problem).
    """
    from medsynth.data.dataset import load_split
    from medsynth.data.preprocess import run_preprocess

    ext = external_config(cfg, source)
    cache = external_cache_dir(cfg, source)
    run_preprocess(ext, cache, progress)
    return load_split(cache, None)

"""Label vocabulary: remapping raw mask values and rejecting values outside the vocabulary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from medsynth.config.data import DataConfig
from medsynth.errors import DataError

HOW_TO_DECLARE = (
    "declare the vocabulary in the config (data: {labels: {0: background, 1: tumour}}) or on the command line "
    "(--set 'data.labels={0: background, 1: tumour}', or `data check --labels 0:background,1:tumour`), map "
    "values with data.label_remap (e.g. {255: 1}), or leave data.labels out to infer it from the masks"
)


def problem_hint(code: str) -> str:
    """The hint shown with the first bad case of a dataset: how to declare labels for label problems."""
    if code == "label_values":
        return HOW_TO_DECLARE + "; or set qc.policy=exclude to drop bad cases and list them"
    return "fix the data, or set qc.policy=exclude to drop bad cases and list them"


def remap_and_validate(mask: npt.NDArray[np.generic], cfg: DataConfig, path: str | Path) -> npt.NDArray[np.int64]:
    """Apply ``cfg.label_remap`` and check every value is in ``cfg.labels``.

    Args:
        mask: Integer label array of any shape.
        cfg: Data config holding the vocabulary and remapping.
        path: The mask file, named in the error.

    Returns:
        The remapped int64 mask (same shape).

    Raises:
        DataError: If values outside the vocabulary remain after remapping (never clipped).
    """
    out = np.asarray(mask, dtype=np.int64).copy()
    values = np.unique(out)
    for src, dst in cfg.label_remap.items():
        if src in values:
            out[mask == src] = dst
    bad = sorted(set(np.unique(out).tolist()) - set(cfg.labels))
    if bad:
        raise DataError(
            path,
            f"mask values {bad[:10]} are not in the label vocabulary {sorted(cfg.labels)}",
            hint=HOW_TO_DECLARE,
        )
    return out

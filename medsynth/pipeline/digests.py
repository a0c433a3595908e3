"""Content digests the stage keys and up-to-date checks use: datasets, mask sources, stage outputs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from medsynth.config.schema import MedsynthConfig
from medsynth.fileio import sha256_file, sha256_json
from medsynth.pipeline.declare import StageRun

log = logging.getLogger(__name__)


def dataset_fingerprint(cfg: MedsynthConfig) -> str:
    """Digest of the dataset as discovered: case ids, files, sizes and modification times.

    Generates the phantom first when the config asks for it. Cheap (no file is read); the
    preprocessing cache still hashes every file's content per case.
    """
    from medsynth.data.layouts import discover
    from medsynth.data.sources import ensure_dataset

    ensure_dataset(cfg)
    rows = []
    for case in discover(cfg.data).cases:
        files: list[list[str | int | None] | None] = []
        for f in (case.image, case.mask):
            if f is None:
                files.append(None)
                continue
            p = Path(f)
            st = p.stat() if p.exists() else None
            files.append([str(p), st.st_size if st else None, st.st_mtime_ns if st else None])
        rows.append([case.case_id, files])
    return sha256_json(rows)


def _stat_digest(files: list[Path]) -> str:
    rows = []
    for p in files:
        st = p.stat() if p.exists() else None
        rows.append([str(p), st.st_size if st else None, st.st_mtime_ns if st else None])
    return sha256_json(rows)


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]


def files_fingerprint(path: str | Path) -> str:
    """Digest of the files under ``path`` (or of one file): paths, sizes and modification times."""
    return _stat_digest(_files_under(Path(path)))


def external_test_fingerprint(cfg: MedsynthConfig) -> str | None:
    """Digest of the experiment's external test set (None when there is none)."""
    ext = cfg.experiment.external_test
    return files_fingerprint(ext) if ext else None


def validation_external_fingerprint(cfg: MedsynthConfig) -> str | None:
    """Digest of the validation's external test set (None when there is none)."""
    ext = cfg.validation.external_test
    return files_fingerprint(ext) if ext else None


def experiment_inputs(cfg: MedsynthConfig) -> str | None:
    """What the experiment reads beyond its sections: the external test set and, only when a pool variant is
    ``counterfactual``, the counterfactual settings it uses (so every other config keeps its key)."""
    from medsynth.evaluation.pool import counterfactual_settings

    ext = external_test_fingerprint(cfg)
    cf = counterfactual_settings(cfg)
    return ext if cf is None else sha256_json({"external_test": ext, "counterfactual": cf})


def mask_source_fingerprint(cfg: MedsynthConfig) -> str | None:
    """Digest of the mask files a folder/manifest synthesis source reads (None for the split source).

    Paths, sizes and modification times of every file under the folder (or of the manifest and the
    files it names), so edited masks re-run the synthesis stage.
    """
    sc = cfg.synthesis
    if sc.source == "split" or not sc.masks_path:
        return None
    root = Path(sc.masks_path)
    files = _files_under(root)
    if root.is_file() and root.suffix.lower() == ".csv":
        import csv

        with open(root, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                for col in ("mask", "image"):
                    if row.get(col):
                        p = Path(row[col]) if Path(row[col]).is_absolute() else root.parent / row[col]
                        files.append(p)
    return _stat_digest(files)


def file_digest(*parts: str) -> Any:
    """An output digest: the SHA-256 of one file in the stage's folder."""

    def digest(run: StageRun) -> str:
        return sha256_file(run.out.joinpath(*parts))

    return digest


def checkpoint_digest(run: StageRun) -> str:
    """An output digest: the file hashes of the stage's final checkpoint."""
    from medsynth.checkpoint import find_checkpoint

    ckpt = find_checkpoint(run.out, "final")
    if ckpt is None:
        raise ValueError(f"{run.out}: no final checkpoint")
    return sha256_json(ckpt.file_hashes())


def dataset_ref(name: str, source: str, digest: str, context: str) -> dict[str, str]:
    """A dataset a stage run read or wrote (logged as an MLflow dataset input)."""
    return {"name": name, "source": source, "digest": digest, "context": context}

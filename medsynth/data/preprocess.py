"""Preprocessing: cases → MONAI transforms → an on-disk cache of arrays with a manifest.

Cache layout (under ``cache_dir``)::

    cases/<case_id>.npz   image (N, C, *S) float32 (C = len(data.channels), else 1), mask (N, 1, *S) uint8,
                          affine (N, D+1, D+1)
    cases/<case_id>.json  cache key, input hashes, QC outcome, item records
    manifest.json         every item: id, case, patient, split, file, index, shape, label counts, hash
    splits.json           patient → split
    qc/                   QC report of the cases checked
    config.resolved.yaml  the configuration that produced the cache

A case is recomputed only when its key (input file hashes + relevant config) changes. New work is
first written to a staging folder and moved into place only when every case has been processed
and the QC policy accepts the result, so a failed or interrupted run never leaves a case that a
later run would trust.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from medsynth.config.loader import save_resolved
from medsynth.config.schema import MedsynthConfig
from medsynth.data.case_transform import transform_case
from medsynth.data.cases import Case, assign_splits, split_summary, splits_json
from medsynth.data.labels import problem_hint
from medsynth.data.layouts import discover
from medsynth.data.qc import load_and_check
from medsynth.data.transforms import IMAGE, MASK, pad_crop_transform, to_meta
from medsynth.data.vocabulary import Vocabulary, resolve_labels
from medsynth.errors import DataError
from medsynth.fileio import sha256_file, sha256_json, write_atomic, write_json_atomic
from medsynth.progress import NullProgress, Progress

log = logging.getLogger(__name__)
CACHE_VERSION = 1
Item = tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], npt.NDArray[np.float64], int | None]
"""One cached item: image (C, *S) float32, mask (1, *S) uint8, affine (D+1, D+1), slice/crop index."""
MANIFEST = "manifest.json"


@dataclass
class CaseWork:
    """A case with its cache key and whether a valid cache entry exists."""

    case: Case
    key: str
    inputs: dict[str, Any]
    cached: dict[str, Any] | None = None


@dataclass
class CaseResult:
    """What processing one case produced (staged, not yet committed)."""

    case: Case
    meta: dict[str, Any]
    qc: dict[str, Any]
    staged_files: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the case passed QC and produced items."""
        return bool(self.qc.get("ok"))


@dataclass
class PreprocessPlan:
    """Everything decided before any array is computed."""

    cfg: MedsynthConfig
    cache_dir: Path
    discovery_message: str
    work: list[CaseWork]
    labels: dict[int, str]
    vocabulary: Vocabulary | None = None
    orphan_masks: list[Path] = field(default_factory=list)

    @property
    def todo(self) -> list[CaseWork]:
        """Cases without a valid cache entry."""
        return [w for w in self.work if w.cached is None]


def cache_dir_for(cfg: MedsynthConfig) -> Path:
    """Default cache folder of a config: ``<output_dir>/<name>/preprocess``."""
    return Path(cfg.output_dir) / cfg.name / "preprocess"


def output_labels(cfg: MedsynthConfig) -> dict[int, str]:
    """The label vocabulary of the cache: the data labels plus an enabled derived label."""
    from medsynth.data.vocabulary import data_labels

    labels = data_labels(cfg)
    dl = cfg.preprocess.derived_label
    if dl.enabled:
        if dl.index in labels:
            raise DataError(
                "config",
                f"preprocess.derived_label.index {dl.index} is already the label "
                f"{labels[dl.index]!r}; choose a new index",
            )
        labels[dl.index] = dl.name
    return dict(sorted(labels.items()))


def _relevant_config(cfg: MedsynthConfig) -> dict[str, Any]:
    return {
        "version": CACHE_VERSION,
        "preprocess": cfg.preprocess.model_dump(mode="json"),
        "labels": {str(k): v for k, v in cfg.data.labels.items()},
        "label_remap": {str(k): v for k, v in cfg.data.label_remap.items()},
        "channel": cfg.data.channel,
        "qc": {"tol": cfg.qc.geometry_tolerance, "constant": cfg.qc.check_constant},
        # multi-contrast configs only, so that single-channel caches keep their keys
        **({"channels": list(cfg.data.channels)} if cfg.data.channels else {}),
    }


def _file_hash(path: Path | None, previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """Content hash of a file, reusing a previous hash when size and mtime are unchanged."""
    if path is None:
        return None
    if not path.exists():
        return {"path": str(path), "missing": True}
    st = path.stat()
    stat = [st.st_size, st.st_mtime_ns] if path.is_file() else None
    if previous and previous.get("path") == str(path) and stat and previous.get("stat") == stat:
        return previous
    return {"path": str(path), "stat": stat, "sha256": sha256_file(path)}


def plan(cfg: MedsynthConfig, cache_dir: Path | None = None) -> PreprocessPlan:
    """Discover cases, assign patient splits and decide which cases need processing.

    Args:
        cfg: Resolved config.
        cache_dir: Cache folder (default :func:`cache_dir_for`).

    Returns:
        The plan; ``plan.todo`` lists the cases without a valid cache entry.
    """
    cache = Path(cache_dir) if cache_dir is not None else cache_dir_for(cfg)
    cfg, vocab = resolve_labels(cfg)
    labels = output_labels(cfg)
    disc = discover(cfg.data)
    if disc.orphan_masks and cfg.qc.policy == "fail":
        from medsynth.data.qc_report import orphan_error

        raise orphan_error(disc.orphan_masks, "run `medsynth data check` for the list")
    cases = assign_splits(disc.cases, cfg.data.split)
    relevant = sha256_json(_relevant_config(cfg))
    work: list[CaseWork] = []
    for case in cases:
        meta_path = cache / "cases" / f"{case.case_id}.json"
        old = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
        old_inputs = old.get("inputs", {}) if old else {}
        inputs: dict[str, Any] = {
            "image": _file_hash(case.image, old_inputs.get("image")),
            "mask": _file_hash(case.mask, old_inputs.get("mask")),
        }
        keyed: dict[str, Any] = {
            "config": relevant,
            "image": (inputs["image"] or {}).get("sha256"),
            "mask": (inputs["mask"] or {}).get("sha256"),
        }
        if case.extra_images:  # channels 1.. of a multi-contrast case (absent for single-channel keys)
            olds = old_inputs.get("extra_images") or []
            inputs["extra_images"] = [
                _file_hash(p, olds[i] if i < len(olds) else None) for i, p in enumerate(case.extra_images)
            ]
            keyed["extra_images"] = [(h or {}).get("sha256") for h in inputs["extra_images"]]
        key = sha256_json(keyed)
        cached = None
        if old and old.get("key") == key:
            files_ok = all((cache / it["file"]).is_file() for it in old.get("items", []))
            cached = old if files_ok else None
        work.append(CaseWork(case, key, inputs, cached))
    return PreprocessPlan(cfg, cache, disc.message, work, labels, vocab, list(disc.orphan_masks))


def _slice_affine(affine: npt.NDArray[np.float64], axis: int, index: int) -> npt.NDArray[np.float64]:
    keep = [a for a in range(3) if a != axis]
    out = np.eye(3)
    out[:2, :2] = affine[np.ix_(keep, keep)]
    origin = affine[:3, 3] + affine[:3, axis] * index
    out[:2, 2] = origin[keep]
    return out


def _items_2d(
    image: torch.Tensor,
    mask: torch.Tensor,
    affine: npt.NDArray[np.float64],
    n_orig_fg: npt.NDArray[np.int64],
    cfg: MedsynthConfig,
    case: Case,
) -> list[Item]:
    """Slices of a processed case: ``(image (C,H,W), mask (1,H,W), affine 3x3, slice index)``."""
    pc = cfg.preprocess
    rng = np.random.default_rng([pc.seed, *case.case_id.encode()])
    if image.ndim == 3:  # a 2D input is one slice
        candidates: list[tuple[torch.Tensor, torch.Tensor, npt.NDArray[np.float64], int | None, int]] = [
            (image, mask, affine, None, int(n_orig_fg[0]))
        ]
    else:
        ax = pc.slices.axis
        candidates = []
        for j in range(image.shape[ax + 1]):
            candidates.append(
                (image.select(ax + 1, j), mask.select(ax + 1, j), _slice_affine(affine, ax, j), j, int(n_orig_fg[j]))
            )
    pad = pad_crop_transform(pc.spatial_size)
    out: list[Item] = []
    for im, mk, aff, k, n_fg in candidates:
        if pc.slices.drop_blank and float(im.max()) == float(im.min()):
            continue
        if n_fg < pc.slices.min_foreground and rng.random() >= pc.slices.keep_empty_fraction:
            continue
        d = pad(
            {
                IMAGE: to_meta(im.numpy(), aff, torch.float32, channels=True),
                MASK: to_meta(mk[0].numpy(), aff, torch.float32),
            }
        )
        out.append(
            (
                np.asarray(d[IMAGE], dtype=np.float32),
                np.asarray(d[MASK]).round().astype(np.uint8),
                np.asarray(d[IMAGE].affine, dtype=np.float64),
                k,
            )
        )
    return out


def _items_3d(
    image: torch.Tensor, mask: torch.Tensor, affine: npt.NDArray[np.float64], cfg: MedsynthConfig, case: Case
) -> list[Item]:
    pc = cfg.preprocess
    d = pad_crop_transform(pc.spatial_size)(
        {
            IMAGE: to_meta(image.numpy(), affine, torch.float32, channels=True),
            MASK: to_meta(mask[0].numpy(), affine, torch.float32),
        }
    )
    samples: list[Any]
    if pc.crop_mode == "whole":
        samples = [d]
    else:
        from monai.transforms import RandSpatialCropSamplesd

        crop = RandSpatialCropSamplesd(
            keys=[IMAGE, MASK], roi_size=list(pc.crop_size or []), num_samples=pc.crops_per_volume, random_size=False
        )
        crop.set_random_state(seed=int(np.random.default_rng([pc.seed, *case.case_id.encode()]).integers(2**31)))
        samples = crop(d)
    return [
        (
            np.asarray(s[IMAGE], dtype=np.float32),
            np.asarray(s[MASK]).round().astype(np.uint8),
            np.asarray(s[IMAGE].affine, dtype=np.float64),
            i if pc.crop_mode != "whole" else None,
        )
        for i, s in enumerate(samples)
    ]


def process_case(w: CaseWork, cfg: MedsynthConfig, staging: Path) -> CaseResult:
    """Check and preprocess one case, writing its arrays into ``staging``.

    Args:
        w: The case and its cache key.
        cfg: Resolved config.
        staging: Folder for new files (moved into the cache by :func:`commit`).

    Returns:
        The staged result; failed QC gives a result with ``ok`` False and no files.
    """
    qc, img, remapped = load_and_check(w.case, cfg.data, cfg.qc)
    meta: dict[str, Any] = {"key": w.key, "inputs": w.inputs, "case": w.case.to_json(), "qc": qc.to_json(), "items": []}
    if not qc.ok or img is None or remapped is None:
        return CaseResult(w.case, meta, meta["qc"])
    pc = cfg.preprocess
    tc = transform_case(img.array if img.channels is None else img.channels, remapped, img.affine, pc)
    assert tc.image is not None
    image, mask_np, orig_fg, affine = tc.image, tc.mask, tc.original_foreground, tc.affine
    mask_t = torch.as_tensor(mask_np[None], dtype=torch.float32)
    if pc.spatial_dims == 2:
        if img.ndim == 3:
            ax = pc.slices.axis
            n_fg = orig_fg.sum(axis=tuple(a for a in range(3) if a != ax))
        else:
            n_fg = np.array([orig_fg.sum()])
        items = _items_2d(image.as_tensor(), mask_t, affine, n_fg, cfg, w.case)
    else:
        if img.ndim != 3:
            raise DataError(w.case.image, "is 2D but preprocess.spatial_dims is 3")
        items = _items_3d(image.as_tensor(), mask_t, affine, cfg, w.case)
    if not items:
        meta["qc"]["note"] = "no slice passed the slice filter"
        return CaseResult(w.case, meta, meta["qc"])
    rel = f"cases/{w.case.case_id}.npz"
    images = np.stack([it[0] for it in items]).astype(np.float32)
    masks = np.stack([it[1] for it in items]).astype(np.uint8)
    affines = np.stack([it[2] for it in items])
    target = staging / rel
    write_atomic(target, lambda p: np.savez(p, image=images, mask=masks, affine=affines))
    digest = sha256_file(target)
    for i, (im, mk, _aff, k) in enumerate(items):
        vals, counts = np.unique(mk, return_counts=True)
        meta["items"].append(
            {
                "item_id": w.case.case_id
                if len(items) == 1 and k is None
                else f"{w.case.case_id}_{k if k is not None else i}",
                "case_id": w.case.case_id,
                "patient_id": w.case.patient_id,
                "file": rel,
                "index": i,
                "slice": k,
                "shape": list(im.shape[1:]),
                "label_counts": {str(int(v)): int(n) for v, n in zip(vals, counts, strict=True)},
                "sha256": digest,
            }
        )
    return CaseResult(w.case, meta, meta["qc"], [target])


@dataclass
class PreprocessSummary:
    """Outcome of a preprocessing run."""

    cache_dir: Path
    n_cases: int
    n_processed: int
    n_cached: int
    n_items: int
    excluded: list[dict[str, Any]]
    seconds: float
    manifest: Path


def commit(
    plan_: PreprocessPlan, results: Iterable[CaseResult], staging: Path, seconds: float = 0.0
) -> PreprocessSummary:
    """Apply the QC policy, move staged files into the cache and write the manifest.

    With policy ``fail`` any bad case raises :class:`DataError` naming its file and problem, and
    the staging folder is removed: the cache is left as it was.
    """
    cfg, cache = plan_.cfg, plan_.cache_dir
    new = {r.case.case_id: r for r in results}
    metas: list[dict[str, Any]] = []
    for w in plan_.work:
        if w.cached is not None:
            metas.append(w.cached)
        elif w.case.case_id in new:
            metas.append(new[w.case.case_id].meta)
        else:
            raise RuntimeError(f"case {w.case.case_id} was neither cached nor processed")
    bad = [m for m in metas if not m["qc"]["ok"]]
    if bad and cfg.qc.policy == "fail":
        shutil.rmtree(staging, ignore_errors=True)
        first = bad[0]["qc"]["problems"][0]
        more = (
            f" (and {len(bad) - 1} more bad cases; run `medsynth data check` for the full report)"
            if len(bad) > 1
            else ""
        )
        raise DataError(
            first["file"],
            first["message"] + more,
            hint=problem_hint(str(first.get("code", ""))),
        )
    (cache / "cases").mkdir(parents=True, exist_ok=True)
    for r in new.values():
        for f in r.staged_files:
            f.replace(cache / f.relative_to(staging))
        write_json_atomic(cache / "cases" / f"{r.case.case_id}.json", r.meta)
    shutil.rmtree(staging, ignore_errors=True)
    if not cfg.data.include:  # a subset run (data.include) never prunes the cache of the full dataset
        keep = {f"{w.case.case_id}{ext}" for w in plan_.work for ext in (".npz", ".json")}
        for f in (cache / "cases").iterdir():  # cases no longer in the dataset
            if f.name not in keep:
                f.unlink()
    cases = [w.case for w in plan_.work]
    split_of = {c.case_id: c.split for c in cases}
    items = [{**it, "split": split_of[m["case"]["case_id"]]} for m in metas for it in m["items"]]
    excluded = [{"case_id": m["case"]["case_id"], "problems": m["qc"]["problems"]} for m in bad]
    manifest = {
        "version": CACHE_VERSION,
        "dataset": {
            "root": cfg.data.root,
            "layout": plan_.discovery_message,
            "n_cases": len(cases),
            "digest": sha256_json(sorted(w.key for w in plan_.work)),
        },
        "labels": {str(k): v for k, v in plan_.labels.items()},
        "data_labels": {str(k): v for k, v in sorted(cfg.data.labels.items())},
        "labels_source": plan_.vocabulary.to_json() if plan_.vocabulary else None,
        "spatial_dims": cfg.preprocess.spatial_dims,
        **({"channels": list(cfg.data.channels)} if cfg.data.channels else {}),
        "splits": split_summary(cases),
        "n_items": len(items),
        "items": items,
        "excluded": excluded,
        "orphan_masks": [str(p) for p in plan_.orphan_masks],
    }
    write_json_atomic(cache / "splits.json", splits_json(cases))
    save_resolved(cfg, cache)
    write_json_atomic(cache / MANIFEST, manifest)
    return PreprocessSummary(
        cache, len(cases), len(new), len(plan_.work) - len(new), len(items), excluded, seconds, cache / MANIFEST
    )


def staging_dir(cache_dir: Path) -> Path:
    """A fresh staging folder inside the cache (removed after commit)."""
    path = cache_dir / f".staging-{time.time_ns()}"
    path.mkdir(parents=True)
    return path


def run_preprocess(
    cfg: MedsynthConfig,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    plan_: PreprocessPlan | None = None,
) -> PreprocessSummary:
    """Check and preprocess a dataset into the cache (cached cases are skipped).

    Args:
        cfg: Resolved config.
        cache_dir: Cache folder (default ``<output_dir>/<name>/preprocess``).
        progress: Receives one ``advance()`` per processed case.
        plan_: A plan already made by :func:`plan` for this config (saves hashing the inputs twice).

    Returns:
        A :class:`PreprocessSummary`.
    """
    t0 = time.monotonic()
    p = plan_ if plan_ is not None else plan(cfg, cache_dir)
    prog = progress or NullProgress()
    staging = staging_dir(p.cache_dir)
    try:
        results = []
        for w in p.todo:
            results.append(process_case(w, p.cfg, staging))
            prog.advance(1, w.case.case_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return commit(p, results, staging, time.monotonic() - t0)


def load_manifest(cache_dir: Path) -> dict[str, Any]:
    """Read a cache's manifest; a clear error if the cache was never completed."""
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise DataError(path, "no preprocessing manifest here", hint="run `medsynth preprocess` first")
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data

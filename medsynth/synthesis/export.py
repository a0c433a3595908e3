"""Export the augmented dataset (synthetic, optionally with the real training cases) where segmenters train.

Formats (every image/label is NIfTI ``.nii.gz``; one image file per channel: multi-contrast
configs (``data.channels``) export every channel, named in ``channel_names``/``modality``)::

    nnunetv2  imagesTr/<case>_0000.nii.gz (_0001... for more channels), labelsTr/<case>.nii.gz,
              dataset.json (channel_names, labels name -> index, numTraining, file_ending): an nnU-Net v2
              raw dataset (put it at $nnUNet_raw/DatasetNNN_Name)
    msd       imagesTr/<case>.nii.gz (<case>_0000.nii.gz... for more channels), labelsTr/<case>.nii.gz,
              dataset.json (MSD v1: modality, labels index -> name, training list of channel 0)
    folder    images/<case>.nii.gz (<case>_0000.nii.gz...), labels/<case>.nii.gz (medsynth's paired layout)

Every format also holds ``provenance.csv``: one row per case (real or synthetic, source mask, edit,
seed, model hashes, geometry, intensity space).

Geometry: by default every case is on the model's grid (``preprocess.spatial_size``, the cache's
geometry), intensities on the training scale ``[0, 1]``. With ``native`` each case goes back to its
source mask's own grid (size, spacing, orientation, origin) through the :class:`NativeGeometry`
record that synthesis kept (:mod:`medsynth.synthesis.native`; for cache-split sources, the grid of
the case's mask file): synthetic images are resampled (image linear, mask nearest) and mapped back
to the source intensity scale where the source image is known (a manifest ``image``, or the
case's images for cache sources: ``lo + x * (hi - lo)`` with the ``lo``/``hi`` of its percentile
scaling, per contrast for multi-contrast cases; background 0 stays 0 under ``within_foreground``
scaling); real cases are their original image files with the remapped original mask (plus the
derived label, resampled from the cache).

Nothing is written until every case has been planned (ids checked, geometry found); the dataset is
built in a temporary sibling folder and moved into place when complete; an existing non-empty
folder is never overwritten.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from medsynth.config.schema import MedsynthConfig
from medsynth.data.case_transform import transform_case
from medsynth.data.cases import Case
from medsynth.data.channels import read_case_image
from medsynth.data.io import read_image, write_image
from medsynth.data.labels import remap_and_validate
from medsynth.data.preprocess import load_manifest
from medsynth.errors import DataError, OutputExistsError
from medsynth.fileio import is_nonempty, staged_dir, write_json_atomic, write_text_atomic
from medsynth.privacy import Pseudonymiser
from medsynth.progress import LogProgress, Progress
from medsynth.synthesis.native import NativeGeometry, to_native
from medsynth.synthesis.writer import MANIFEST_JSON

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "ExportSummary", "export_dataset"]

ExportFormat = Literal["nnunetv2", "msd", "folder"]
FORMATS: tuple[str, ...] = ("nnunetv2", "msd", "folder")
PROVENANCE_CSV = "provenance.csv"
FILE_ENDING = ".nii.gz"
CHANNEL_NAME = "MRI"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_COLUMNS = (
    "case_id",
    "kind",
    "image",
    "label",
    "source_id",
    "source",
    "source_patient",
    "split",
    "edit",
    "seed",
    "model_hashes",
    "geometry",
    "shape",
    "spacing",
    "intensity_space",
)

Arrays = tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], npt.NDArray[np.float64]]
"""``(image (*S) or multi-contrast (C, *S), mask (*S), affine (D+1, D+1))``."""


@dataclass(frozen=True)
class _Case:
    """One planned case: its id, how to load its arrays, and its provenance row."""

    case_id: str
    load: Callable[[], Arrays]
    row: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportSummary:
    """Outcome of an export.

    Attributes:
        out_dir: The exported dataset folder.
        format: ``nnunetv2``, ``msd`` or ``folder``.
        n_real: Real cases exported.
        n_synthetic: Synthetic cases exported.
        native: Whether cases are on their source masks' grids.
        provenance: The provenance CSV.
    """

    out_dir: Path
    format: str
    n_real: int
    n_synthetic: int
    native: bool
    provenance: Path

    def to_json(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "out_dir": str(self.out_dir),
            "format": self.format,
            "n_real": self.n_real,
            "n_synthetic": self.n_synthetic,
            "native": self.native,
            "provenance": str(self.provenance),
        }


# ----- intensities ---------------------------------------------------------------------------
def _model_scale(row: dict[str, Any], values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """A synthetic dataset's stored image back on the model's ``[0, 1]`` scale (see its ``intensity_space``)."""
    space = str(row.get("intensity_space", "model [0, 1]"))
    if space.startswith("png"):
        top = 65535.0 if "uint16" in space else 255.0
        return (values / top).astype(np.float32)
    if space == "source" and row.get("intensity_range"):
        lo, hi = (float(v) for v in row["intensity_range"])
        return ((values - lo) / (hi - lo)).astype(np.float32)
    return values.astype(np.float32)


def to_source_scale(
    x: npt.NDArray[np.float32], source_range: tuple[float, float], within_foreground: bool
) -> npt.NDArray[np.float32]:
    """Invert percentile scaling: ``lo + x * (hi - lo)``; with ``within_foreground``, 0 (background) stays 0."""
    lo, hi = source_range
    y = (lo + np.clip(x, 0.0, 1.0) * (hi - lo)).astype(np.float32)
    return np.where(x > 0, y, np.float32(0.0)).astype(np.float32) if within_foreground else y


def to_source_scales(
    x: npt.NDArray[np.float32], ranges: tuple[tuple[float, float], ...], within_foreground: bool
) -> npt.NDArray[np.float32]:
    """:func:`to_source_scale` per channel: ``x`` is ``(*S)`` with one range or ``(C, *S)`` with ``C`` ranges.

    Raises:
        ValueError: The number of ranges is not the number of channels.
    """
    if len(ranges) == 1:
        return to_source_scale(x, ranges[0], within_foreground)
    if x.shape[0] != len(ranges):
        raise ValueError(f"{len(ranges)} intensity ranges for an image of {x.shape[0]} channels")
    return np.stack([to_source_scale(x[c], r, within_foreground) for c, r in enumerate(ranges)])


# ----- the cache's source files --------------------------------------------------------------
class _Cache:
    """Items of a preprocessing cache and the files of their cases."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = Path(cache_dir)
        self.manifest = load_manifest(self.dir)
        self.items = {str(it["item_id"]): it for it in self.manifest["items"]}

    def case_files(self, item_id: str) -> tuple[Path, Path]:
        """The image and mask file of the case an item came from."""
        it = self.items[item_id]
        meta = json.loads((self.dir / "cases" / f"{it['case_id']}.json").read_text(encoding="utf-8"))
        case = meta["case"]
        if not case.get("mask"):
            raise DataError(self.dir / "cases", f"case {it['case_id']} has no mask file")
        return Path(case["image"]), Path(case["mask"])

    def case(self, item_id: str) -> Case:
        """The case (every image file, channel 0 first) an item came from."""
        it = self.items[item_id]
        meta = json.loads((self.dir / "cases" / f"{it['case_id']}.json").read_text(encoding="utf-8"))
        c = meta["case"]
        extra = tuple(Path(p) for p in c.get("extra_images") or [])
        return Case(str(c["case_id"]), str(c["patient_id"]), Path(c["image"]), Path(c["mask"]), None, extra)

    def whole(self, item_id: str) -> bool:
        """True when the item is its whole case (not a slice of a volume or a random crop)."""
        return self.items[item_id].get("slice") is None

    def arrays(self, item_id: str) -> Arrays:
        """The cached ``(image (*S) or (C, *S), mask (*S), affine)`` of an item (model grid, training scale)."""
        it = self.items[item_id]
        with np.load(self.dir / str(it["file"])) as z:
            i = int(it["index"])
            im = z["image"][i]
            im = im[0] if im.shape[0] == 1 else im
            return im.astype(np.float32), z["mask"][i][0].astype(np.uint8), z["affine"][i]


def _cache_native(cfg: MedsynthConfig, cache: _Cache, item_id: str, where: str) -> NativeGeometry:
    if item_id not in cache.items:
        raise DataError(where, f"source item {item_id!r} is not in the cache {cache.dir}", hint="drop --native")
    if not cache.whole(item_id):
        raise DataError(
            where,
            f"source item {item_id!r} is a slice or crop of a volume; --native needs whole cases",
            hint="synthesise from mask files (--masks folder|manifest) or drop --native",
        )
    _, mask_path = cache.case_files(item_id)
    m = read_image(mask_path, kind="mask", channel=cfg.data.channel)
    return NativeGeometry(tuple(int(s) for s in m.array.shape), m.affine, str(mask_path))


def _cache_source_ranges(cfg: MedsynthConfig, cache: _Cache, item_id: str) -> tuple[tuple[float, float], ...] | None:
    """The source intensities a cached whole case's normalisation mapped to 0 and 1, one range per contrast.

    Training's own transform on the case's files (every channel of a multi-contrast case, each scaled on its own).
    """
    _, mask_path = cache.case_files(item_id)
    img = read_case_image(cache.case(item_id), cfg.data)
    mask = remap_and_validate(read_image(mask_path, kind="mask", channel=cfg.data.channel).array, cfg.data, mask_path)
    pixels = img.array if img.channels is None else img.channels
    return transform_case(pixels, mask, img.affine, cfg.preprocess).source_ranges


# ----- planning ------------------------------------------------------------------------------
def _synthetic_cases(
    cfg: MedsynthConfig, synthetic_dir: Path, native: bool, cache: Callable[[], _Cache]
) -> tuple[list[_Case], dict[int, str]]:
    manifest_path = synthetic_dir / MANIFEST_JSON
    if not manifest_path.is_file():
        raise DataError(synthetic_dir, "no synthetic dataset here (manifest.json missing)", hint="run synthesis first")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    labels = {int(k): str(v) for k, v in manifest["labels"].items()}
    within = cfg.preprocess.intensity.within_foreground
    cases: list[_Case] = []
    for row in manifest["items"]:
        geometry = row.get("geometry", "model")
        model = row.get("model_grid") or {"shape": None, "affine": row["affine"]}
        target: NativeGeometry | None = None
        n_chan = max(len(row.get("images") or []), 1)
        src: tuple[tuple[float, float], ...] | None = None
        if row.get("source_intensity_range") and n_chan == 1:  # the mask file's given image (single contrast)
            lo, hi = (float(v) for v in row["source_intensity_range"])
            src = ((lo, hi),)
        if native:
            if row.get("native_geometry"):
                target = NativeGeometry.from_json(row["native_geometry"])
            else:
                target = _cache_native(cfg, cache(), str(row["source_id"]), str(manifest_path))
                src = src or _cache_source_ranges(cfg, cache(), str(row["source_id"]))
        elif geometry == "native":
            target = NativeGeometry(tuple(int(s) for s in model["shape"]), np.asarray(model["affine"]), "model grid")
        rng = src if native and src is not None and len(src) == n_chan else None

        def load(row: dict[str, Any] = row, target: NativeGeometry | None = target, rng: Any = rng) -> Arrays:
            files = row.get("images") or [row["image"]]
            chans = [read_image(synthetic_dir / f).array.astype(np.float32) for f in files]
            msk = read_image(synthetic_dir / row["mask"], kind="mask")
            raw = chans[0] if len(chans) == 1 else np.stack(chans)
            x, m, aff = _model_scale(row, raw), msk.array.astype(np.uint8), msk.affine
            if target is not None and not (m.shape == target.shape and np.allclose(aff, target.affine, atol=1e-4)):
                x, m = to_native(x, m, aff, target)
                aff = target.affine
            if rng is not None:
                x = to_source_scales(x, rng, within)
            return x, m, aff

        space = "source" if rng is not None else "model [0, 1]"
        shape = list(target.shape) if target is not None else list(model["shape"] or [])
        cases.append(
            _Case(
                str(row["id"]),
                load,
                {
                    "kind": "synthetic",
                    "source_id": row.get("source_id"),
                    "source": row.get("source"),
                    "source_patient": row.get("source_patient"),
                    "edit": json.dumps(row.get("edit"), sort_keys=True),
                    "seed": row.get("seed"),
                    "model_hashes": json.dumps(row.get("model_hashes"), sort_keys=True),
                    "geometry": "native" if native else "model",
                    "shape": shape,
                    "intensity_space": space,
                },
            )
        )
    return cases, labels


def _real_cases(cfg: MedsynthConfig, cache: _Cache, split: str, native: bool) -> list[_Case]:
    dl = cfg.preprocess.derived_label
    cases: list[_Case] = []
    for item_id, it in cache.items.items():
        if split != "all" and it.get("split") != split:
            continue
        row = {
            "kind": "real",
            "source_id": item_id,
            "source_patient": it.get("patient_id"),
            "split": it.get("split"),
            "geometry": "native" if native else "model",
        }
        if not native:

            def load(item_id: str = item_id) -> Arrays:
                return cache.arrays(item_id)

            cases.append(
                _Case(item_id, load, {**row, "source": f"cache:{cache.dir}", "intensity_space": "model [0, 1]"})
            )
            continue
        geo = _cache_native(cfg, cache, item_id, str(cache.dir / "manifest.json"))
        image_path, mask_path = cache.case_files(item_id)

        def load_native(item_id: str = item_id, image_path: Path = image_path, mask_path: Path = mask_path) -> Arrays:
            img = read_case_image(cache.case(item_id), cfg.data)  # every contrast of a multi-contrast case
            raw = read_image(mask_path, kind="mask", channel=cfg.data.channel)
            mask = remap_and_validate(raw.array, cfg.data, mask_path)
            if dl.enabled:  # the derived label as training computed it, brought back from the cache
                x, cached, aff = cache.arrays(item_id)
                _, back = to_native(x, cached, aff, NativeGeometry(mask.shape, raw.affine))
                mask = np.where((mask == 0) & (back == dl.index), dl.index, mask)
            pixels = img.array if img.channels is None else img.channels
            return pixels.astype(np.float32), mask.astype(np.uint8), raw.affine

        cases.append(
            _Case(
                item_id,
                load_native,
                {**row, "source": str(image_path), "shape": list(geo.shape), "intensity_space": "source (original)"},
            )
        )
    if not cases:
        raise DataError(cache.dir / "manifest.json", f"the cache has no {split!r} items to export")
    return cases


def _pseudonymised(case: _Case, p: Pseudonymiser) -> _Case:
    """The case under its pseudonym: ids and patients replaced, paths that name them dropped."""
    row = dict(case.row)
    for col in ("source_id", "source_patient"):
        if row.get(col) is not None:
            row[col] = p(row[col])
    if row.get("source") is not None:
        row["source"] = "(pseudonymised)"
    return _Case(p(case.case_id), case.load, row)


def _check_ids(cases: list[_Case], where: Path) -> None:
    bad = [c.case_id for c in cases if not _ID.match(c.case_id)]
    if bad:
        raise DataError(where, f"case ids {bad[:5]} cannot be file names (letters, digits, '_', '.', '-'; not first)")
    seen: dict[str, str] = {}
    for c in cases:
        key = c.case_id.lower()  # case-insensitive file systems
        if key in seen:
            raise DataError(
                where,
                f"case id {c.case_id!r} ({c.row['kind']}) collides with {seen[key]!r}",
                hint="rename the synthetic dataset's items or export without --with-real",
            )
        seen[key] = c.case_id


def _check_labels(labels: dict[int, str], fmt: str, where: Path) -> None:
    if 0 not in labels:
        raise DataError(where, f"labels {labels} lack 0 (background)")
    if fmt == "nnunetv2" and sorted(labels) != list(range(len(labels))):
        raise DataError(where, f"nnU-Net v2 needs consecutive labels 0..N; these are {sorted(labels)}")
    names = list(labels.values())
    if fmt == "nnunetv2" and len(set(names)) != len(names):
        raise DataError(where, f"nnU-Net v2 needs unique label names; these are {names}")


# ----- writing -------------------------------------------------------------------------------
def _paths(fmt: str, case_id: str, n_channels: int = 1) -> tuple[list[str], str]:
    """Image files (one per channel, channel 0 first) and the label file of a case."""
    if fmt == "nnunetv2":
        sfx = [f"_{k:04d}" for k in range(n_channels)]
        return [f"imagesTr/{case_id}{s}{FILE_ENDING}" for s in sfx], f"labelsTr/{case_id}{FILE_ENDING}"
    sfx = [f"_{k:04d}" for k in range(n_channels)] if n_channels > 1 else [""]
    if fmt == "msd":
        return [f"imagesTr/{case_id}{s}{FILE_ENDING}" for s in sfx], f"labelsTr/{case_id}{FILE_ENDING}"
    return [f"images/{case_id}{s}{FILE_ENDING}" for s in sfx], f"labels/{case_id}{FILE_ENDING}"


def channel_names(cfg: MedsynthConfig) -> dict[str, str]:
    """The ``channel_names`` of an export: ``data.channels`` in order, else one ``MRI`` channel."""
    return {str(k): n for k, n in enumerate(cfg.data.channels)} if cfg.data.channels else {"0": CHANNEL_NAME}


def _dataset_json(fmt: str, labels: dict[int, str], rows: list[dict[str, Any]], cfg: MedsynthConfig) -> dict[str, Any]:
    n = len(rows)
    about = f"medsynth export of {cfg.name} (real + synthetic; see {PROVENANCE_CSV})"
    if fmt == "nnunetv2":
        return {
            "channel_names": channel_names(cfg),
            "labels": {name: int(k) for k, name in sorted(labels.items())},
            "numTraining": n,
            "file_ending": FILE_ENDING,
            "name": cfg.name,
            "description": about,
        }
    return {
        "name": cfg.name,
        "description": about,
        "tensorImageSize": f"{cfg.preprocess.spatial_dims}D",
        "modality": channel_names(cfg),
        "labels": {str(k): v for k, v in sorted(labels.items())},
        "numTraining": n,
        "numTest": 0,
        "training": [{"image": f"./{r['image']}", "label": f"./{r['label']}"} for r in rows],
        "test": [],
    }


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, list) else ("" if v is None else v)) for k, v in r.items()})
    return buf.getvalue()


def export_dataset(
    cfg: MedsynthConfig,
    out_dir: str | Path,
    fmt: str = "nnunetv2",
    *,
    synthetic_dir: str | Path,
    cache_dir: str | Path | None = None,
    with_real: bool = False,
    real_split: str = "train",
    native: bool = False,
    progress: Progress | None = None,
    pseudonymise: Pseudonymiser | None = None,
) -> ExportSummary:
    """Export the synthetic dataset (and the real training cases) as nnU-Net v2, MSD or a plain folder.

    Args:
        cfg: Resolved config (labels, preprocessing, data channel).
        out_dir: New dataset folder (must be empty or absent; never overwritten).
        fmt: ``"nnunetv2"``, ``"msd"`` or ``"folder"``.
        synthetic_dir: A dataset written by :func:`medsynth.synthesis.run.synthesize`.
        cache_dir: Preprocessing cache (needed by ``with_real``, and by ``native`` for cache-split sources).
        with_real: Add the real cases of ``real_split`` (default the training split: test cases stay held out).
        real_split: ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
        native: Write every case on its source mask's own grid (see the module docstring).
        progress: Receives one ``advance()`` per written case.
        pseudonymise: Replaces every case id (file names), source id and source patient by its keyed
            pseudonym, and drops source paths (:mod:`medsynth.privacy`); the id table stays with the caller.

    Returns:
        An :class:`ExportSummary`.

    Raises:
        OutputExistsError: ``out_dir`` is non-empty (checked first).
        DataError: Missing synthetic dataset or cache, ids that cannot be written or collide, labels nnU-Net
            cannot take, or (``native``) a source without a recorded geometry; all before anything is written.
    """
    if fmt not in FORMATS:
        raise DataError("--format", f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    if is_nonempty(out):
        err = OutputExistsError(out)
        err.hint = "export never overwrites: choose a new --out folder"
        raise err
    syn = Path(synthetic_dir)
    loaded: list[_Cache] = []

    def cache() -> _Cache:
        if cache_dir is None:
            raise DataError("cache", "this export needs the preprocessing cache", hint="run `medsynth preprocess`")
        if not loaded:
            loaded.append(_Cache(Path(cache_dir)))
        return loaded[0]

    cases, labels = _synthetic_cases(cfg, syn, native, cache)
    n_syn = len(cases)
    if with_real:
        cases = _real_cases(cfg, cache(), real_split, native) + cases
    if pseudonymise is not None and pseudonymise.enabled:
        cases = [_pseudonymised(c, pseudonymise) for c in cases]
    _check_ids(cases, syn)
    spaces = {str(c.row.get("intensity_space", "")).split(" ")[0] for c in cases}
    if native and len(spaces) > 1:
        log.warning(
            "%s: cases mix intensity scales %s (synthetic cases without a known source image stay on [0, 1]); "
            "per-case normalisation (nnU-Net's z-score for MRI) absorbs this, fixed-range normalisation does not "
            "(see 'intensity_space' in %s)",
            out,
            sorted(spaces),
            PROVENANCE_CSV,
        )
    _check_labels(labels, fmt, syn / MANIFEST_JSON)
    prog = progress or LogProgress(len(cases), "exporting")
    rows: list[dict[str, Any]] = []
    with staged_dir(out) as tmp:
        for c in cases:
            image, mask, affine = c.load()
            bad = sorted(set(np.unique(mask).tolist()) - set(labels))
            if bad:
                raise DataError(c.row.get("source") or c.case_id, f"case {c.case_id}: labels {bad} not in {labels}")
            n_ch = cfg.data.n_channels
            if n_ch > 1 and (image.ndim != mask.ndim + 1 or image.shape[0] != n_ch):
                raise DataError(
                    c.row.get("source") or c.case_id,
                    f"case {c.case_id} has image shape {image.shape}; data.channels lists {n_ch} channels",
                )
            images_rel, label_rel = _paths(fmt, c.case_id, n_ch)
            for rel, ch in zip(images_rel, image if n_ch > 1 else [image], strict=True):
                write_image(tmp / rel, ch.astype(np.float32), affine)
            image_rel = images_rel[0]
            write_image(tmp / label_rel, mask.astype(np.uint8), affine)
            spacing = [round(float(s), 6) for s in np.linalg.norm(affine[:-1, :-1], axis=0)]
            rows.append(
                {
                    **c.row,
                    "case_id": c.case_id,
                    "image": image_rel,
                    "label": label_rel,
                    "shape": list(mask.shape),
                    "spacing": spacing,
                }
            )
            prog.advance(1, c.case_id)
        write_json_atomic(tmp / "dataset.json", _dataset_json(fmt, labels, rows, cfg))
        write_text_atomic(tmp / PROVENANCE_CSV, _csv(rows))
    log.info("exported %d cases (%d synthetic) as %s into %s", len(rows), n_syn, fmt, out)
    return ExportSummary(out, fmt, len(rows) - n_syn, n_syn, native, out / PROVENANCE_CSV)

"""Dataset layouts: find the image/mask pairs of a dataset and build its case table.

Supported layouts:
    * ``msd``: Medical Segmentation Decathlon / nnU-Net — ``dataset.json``, ``imagesTr/``,
      ``labelsTr/`` (nnU-Net's ``_0000`` channel suffix understood).
    * ``paired``: images and masks matched by file stem — either ``images/`` + ``labels/``
      folders, or ``X.png`` + ``X_mask.png`` side by side (e.g. per-patient folders).
    * ``csv``: a manifest with columns ``image``, ``mask`` and optional ``patient``, ``split``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from medsynth.config.data import DataConfig
from medsynth.data.cases import Case
from medsynth.data.io import IMAGE_SUFFIXES, is_dicom_dir, is_image_file
from medsynth.errors import DataError

log = logging.getLogger(__name__)
_CHANNEL = re.compile(r"^(?P<id>.+)_(?P<ch>\d{4})$")
_MASK_DIRS = ("labels", "labelsTr", "masks", "segmentations", "seg")
_IMAGE_DIRS = ("images", "imagesTr", "imgs")


@dataclass(frozen=True)
class Discovery:
    """Result of reading a dataset's layout.

    Attributes:
        layout: The layout used.
        cases: Cases in a deterministic (sorted) order, without splits unless the data gave them.
        message: One line saying which layout was used and why (for logs and reports).
        orphan_masks: Mask files that no image pairs with (an error under ``qc.policy=fail``, listed
            and dropped under ``exclude``). Images without a mask are cases whose ``mask`` is None.
    """

    layout: str
    cases: list[Case]
    message: str
    orphan_masks: list[Path] = field(default_factory=list)


def stem(path: Path) -> str:
    """File name without its (possibly compound) image suffix; folder names unchanged."""
    name = path.name
    low = name.lower()
    for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(s):
            return name[: -len(s)]
    return name


def _visible(p: Path) -> bool:
    return not any(part.startswith(".") for part in p.parts)


def _image_entries(folder: Path) -> list[Path]:
    """Image files and DICOM series folders below ``folder`` (hidden files skipped), sorted."""
    out: list[Path] = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not _visible(rel):
            continue
        if (p.is_file() and is_image_file(p) and p.suffix.lower() != ".dcm") or (p.is_dir() and is_dicom_dir(p)):
            out.append(p)
    return out


def unique_ids(stems: list[str], qualifiers: list[list[str]]) -> list[str]:
    """Case ids from file stems, qualified where stems collide.

    A stem that occurs once is its own id. Colliding stems are prefixed with their qualifier parts
    (e.g. the patient, or the folders below the dataset root) joined by ``__``: BraTS-style
    ``case_1/flair.nii.gz`` and ``case_2/flair.nii.gz`` become ``case_1__flair`` and ``case_2__flair``.

    Args:
        stems: File stems, one per case.
        qualifiers: For each stem, the parts that tell it apart (outermost first).

    Returns:
        One id per stem, in the input order (may still repeat when the qualifiers do too).
    """
    counts = Counter(stems)
    return [s if counts[s] == 1 else "__".join([*q, s]) for s, q in zip(stems, qualifiers, strict=True)]


def _absolute(path: Path) -> Path:
    """Absolute, normalised path without resolving symlinks (a link's own name names the case)."""
    return Path(os.path.abspath(path))


def _patient(cfg: DataConfig, root: Path, image: Path, case_id: str, images_root: Path) -> str:
    rel = image.relative_to(root).as_posix()
    if cfg.patient_regex:
        m = re.search(cfg.patient_regex, rel)
        if not m:
            raise DataError(image, f"patient_regex {cfg.patient_regex!r} does not match {rel!r}")
        return m.group(1) if m.groups() else m.group(0)
    if image.parent != images_root:
        return image.parent.name
    return case_id


def _msd(cfg: DataConfig, root: Path) -> tuple[list[Case], list[Path]]:
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    meta_path = root / "dataset.json"
    pairs: list[tuple[str, Path, Path | None]] = []
    extra: dict[str, tuple[Path, ...]] = {}
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(meta_path, f"not valid JSON ({exc})") from exc
    training = meta.get("training") if isinstance(meta, dict) else None
    if isinstance(training, list) and training and isinstance(training[0], dict) and "image" in training[0]:
        for row in training:
            named = _absolute(root / str(row["image"]))
            img = named.resolve()
            lab = (root / str(row["label"])).resolve() if row.get("label") else None
            s = stem(named)
            m = _CHANNEL.match(s)
            pairs.append((m.group("id") if m else s, img, lab))
        orphans: list[Path] = []
    else:  # no training list: the files are found in imagesTr/ (a training list may point anywhere)
        if not images_dir.is_dir():
            raise DataError(root, "MSD/nnU-Net layout needs an imagesTr/ folder")
        want = cfg.channel if cfg.channel is not None else 0
        labels = {stem(p): p for p in _image_entries(labels_dir)} if labels_dir.is_dir() else {}
        all_ids: set[str] = set()
        files: dict[tuple[str, int], Path] = {}
        for img in _image_entries(images_dir):
            s = stem(img)
            m = _CHANNEL.match(s)
            if m:
                all_ids.add(m.group("id"))
                files[(m.group("id"), int(m.group("ch")))] = img
                if int(m.group("ch")) != want:
                    continue
                s = m.group("id")
            all_ids.add(s)
            pairs.append((s, img, labels.get(s)))
        orphans = [p for s, p in sorted(labels.items()) if s not in all_ids]
        if cfg.n_channels > 1:  # nnU-Net's X_0000, X_0001, ...: channel 0 names the case, the rest join it
            for s, img, _ in pairs:
                missing = [k for k in range(1, cfg.n_channels) if (s, k) not in files]
                if _CHANNEL.match(stem(img)) and missing:
                    raise DataError(
                        img,
                        f"case {s!r} has no channel {missing[0]} file {s}_{missing[0]:04d} "
                        f"(data.channels lists {cfg.n_channels}: {', '.join(cfg.channels)})",
                    )
            extra = {s: tuple(files[(s, k)] for k in range(1, cfg.n_channels)) for s, _, _ in pairs if (s, 1) in files}
    cases = [
        Case(s, s if not cfg.patient_regex else _patient(cfg, root, img, s, images_dir), img, lab)
        for s, img, lab in sorted(pairs, key=lambda t: t[0])
    ]
    if extra:
        cases = [replace(c, extra_images=extra.get(c.case_id, ())) for c in cases]
    return cases, orphans


def _paired(cfg: DataConfig, root: Path) -> tuple[list[Case], list[Path]]:
    images_root = root / cfg.images_dir if cfg.images_dir else root
    if not images_root.is_dir():
        raise DataError(images_root, "images folder does not exist")
    masks_root = root / cfg.masks_dir if cfg.masks_dir else None
    suffix = cfg.mask_suffix
    entries = _image_entries(images_root)
    masks: dict[tuple[Path, str], Path]
    if masks_root is None:
        if not suffix:
            raise DataError(root, "paired layout with masks next to images needs data.mask_suffix (e.g. '_mask')")
        images = [p for p in entries if not stem(p).endswith(suffix)]
        masks = {(p.parent.relative_to(images_root), stem(p)): p for p in entries if stem(p).endswith(suffix)}
    else:
        if not masks_root.is_dir():
            raise DataError(masks_root, "masks folder does not exist")
        images = entries
        masks = {(p.parent.relative_to(masks_root), stem(p)): p for p in _image_entries(masks_root)}
    by_stem: dict[str, list[tuple[Path, str]]] = {}
    for mkey in masks:
        by_stem.setdefault(mkey[1], []).append(mkey)
    rels = [img.relative_to(images_root) for img in images]
    ids = unique_ids([stem(img) for img in images], [list(r.parent.parts) for r in rels])
    cases: list[Case] = []
    used: set[tuple[Path, str]] = set()
    for img, rel, cid in zip(images, rels, ids, strict=True):
        want = stem(img) + suffix
        key: tuple[Path, str] | None = (rel.parent, want)
        if key not in masks:  # masks/ flat while images/ has subfolders (or the reverse): match by stem alone
            same = by_stem.get(want, [])
            key = same[0] if len(same) == 1 else None
        mask = masks[key] if key is not None else None
        if key is not None:
            used.add(key)
        cases.append(Case(cid, _patient(cfg, root, img, cid, images_root), img, mask))
    orphans = [p for k, p in sorted(masks.items()) if k not in used]
    return cases, orphans


def csv_image_column(cols: set[str], channel: int | None, path: Path) -> str:
    """The image column of a manifest: ``image``, or ``image_<k>`` of a multi-contrast manifest.

    Multi-contrast manifests (``image_0``, ``image_1``, ...) read one channel at a time, like
    nnU-Net's ``_0000``/``_0001`` files, use ``data.channel`` to pick the column (default 0); with
    ``data.channels`` every column is read (:func:`csv_channel_columns`).
    """
    channels = sorted(c for c in cols if re.fullmatch(r"image_\d+", c))
    if "image" in cols and (channel is None or not channels):
        return "image"
    if channels:
        want = f"image_{channel if channel is not None else 0}"
        if want not in cols:
            raise DataError(path, f"data.channel {channel} has no column {want!r} (has {channels})")
        return want
    raise DataError(path, f"CSV manifest needs columns 'image' and 'mask' (has {sorted(cols)})")


def csv_channel_columns(cols: set[str], cfg: DataConfig, path: Path) -> list[str]:
    """The image columns of a multi-contrast manifest read jointly: ``image_0`` .. ``image_{C-1}``.

    A single-contrast config (no ``data.channels``) gives the one column of :func:`csv_image_column`.

    Raises:
        DataError: A channel of ``data.channels`` has no column (naming the manifest).
    """
    if cfg.n_channels == 1:
        return [csv_image_column(cols, cfg.channel, path)]
    want = [f"image_{k}" for k in range(cfg.n_channels)]
    missing = [c for c in want if c not in cols]
    if missing:
        raise DataError(
            path,
            f"data.channels lists {cfg.n_channels} contrasts ({', '.join(cfg.channels)}) but the manifest has no "
            f"column {missing[0]!r} (has {sorted(cols)})",
        )
    return want


def _csv(cfg: DataConfig, path: Path) -> list[Case]:
    if not path.is_file():
        raise DataError(path, "CSV manifest does not exist")
    base = path.parent
    rows: list[tuple[int, Path, Path | None, str | None, str | None]] = []
    extras: list[tuple[Path, ...]] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or [])
        image_cols = csv_channel_columns(cols, cfg, path)
        image_col = image_cols[0]
        if "mask" not in cols:
            raise DataError(path, f"CSV manifest needs columns 'image' and 'mask' (has {sorted(cols)})")
        for i, row in enumerate(reader, start=2):
            for col in image_cols:
                if not row.get(col):
                    what = f" (mask {row['mask']!r} has no image)" if row.get("mask") else ""
                    raise DataError(path, f"line {i}: empty {col!r} column{what}")
            named = _absolute(base / row[image_col])  # the name as listed: symlinks are not followed for ids
            mask = (base / row["mask"]).resolve() if row.get("mask") else None
            rows.append((i, named, mask, row.get("patient") or None, row.get("split") or None))
            extras.append(tuple((base / row[c]).resolve() for c in image_cols[1:]))
    stems = [stem(named) for _, named, _, _, _ in rows]
    qualifiers = [[pid] if pid else [named.parent.name] for _, named, _, pid, _ in rows]
    ids = unique_ids(stems, qualifiers)
    if len(set(ids)) != len(ids):  # patient/folder did not tell them apart: the path below the CSV does
        quals = []
        for _, named, _, _, _ in rows:
            try:
                quals.append(list(named.parent.relative_to(_absolute(base)).parts))
            except ValueError:
                quals.append(list(named.parent.parts[1:]))
        ids = unique_ids(stems, quals)
    seen: dict[str, int] = {}
    for (line, named, _, _, _), cid in zip(rows, ids, strict=True):
        if cid in seen:
            raise DataError(path, f"lines {seen[cid]} and {line} both give case id {cid!r} (image {named.name})")
        seen[cid] = line
    return [
        Case(cid, pid or cid, named.resolve(), mask, split, extra)
        for (_, named, mask, pid, split), cid, extra in zip(rows, ids, extras, strict=True)
    ]


def detect_layout(cfg: DataConfig, root: Path) -> tuple[DataConfig, str]:
    """Pick a layout for ``root`` and fill in the paired-layout fields it implies.

    Returns:
        The (possibly updated) data config with a concrete layout, and a message saying why.

    Raises:
        DataError: If nothing matches, listing what was looked for.
    """
    if root.is_file() and root.suffix.lower() == ".csv":
        return cfg.model_copy(update={"layout": "csv"}), f"layout csv: {root.name} is a CSV manifest"
    if not root.is_dir():
        raise DataError(root, "dataset root does not exist")
    if (root / "dataset.json").is_file() or (root / "imagesTr").is_dir():
        return cfg.model_copy(update={"layout": "msd"}), "layout msd: found dataset.json / imagesTr/"
    for idir in _IMAGE_DIRS:
        for mdir in _MASK_DIRS:
            if (root / idir).is_dir() and (root / mdir).is_dir():
                return cfg.model_copy(
                    update={"layout": "paired", "images_dir": idir, "masks_dir": mdir}
                ), f"layout paired: {idir}/ and {mdir}/ matched by file stem"
    suffix = cfg.mask_suffix or "_mask"
    for p in root.rglob(f"*{suffix}.*"):
        if is_image_file(p) and _visible(p.relative_to(root)):
            upd: dict[str, str | None] = {"layout": "paired", "mask_suffix": suffix, "masks_dir": None}
            return cfg.model_copy(update=upd), f"layout paired: masks named X{suffix} next to images X"
    raise DataError(
        root,
        "dataset layout matches nothing",
        hint="expected dataset.json + imagesTr/ + labelsTr/ (MSD/nnU-Net), images/ + labels/ folders, "
        f"X.png + X{suffix}.png pairs, or a CSV manifest; set data.layout to choose one",
    )


def discover(cfg: DataConfig, root: Path | None = None) -> Discovery:
    """Find every case of a dataset.

    Args:
        cfg: Data config (its ``root`` is used unless ``root`` is given).
        root: Resolved dataset root (file for CSV layouts).

    Returns:
        A :class:`Discovery` with cases sorted by case id.

    Raises:
        DataError: Missing root, unknown layout, or an empty dataset.
    """
    r = Path(root if root is not None else cfg.root)
    if cfg.layout == "auto":
        cfg, message = detect_layout(cfg, r)
    else:
        message = f"layout {cfg.layout} (from config)"
    orphans: list[Path] = []
    if cfg.layout == "msd":
        cases, orphans = _msd(cfg, r)
    elif cfg.layout == "paired":
        if not r.is_dir():
            raise DataError(r, "dataset root does not exist")
        cases, orphans = _paired(cfg, r)
    else:
        cases = _csv(cfg, r)
    if cfg.include:
        pattern = re.compile(cfg.include)
        cases = [c for c in cases if pattern.search(c.case_id)]
    if not cases:
        what = f"no case id matches data.include {cfg.include!r}" if cfg.include else "no image files were found"
        raise DataError(r, f"dataset is empty: {message} but {what}")
    ids = Counter(c.case_id for c in cases)
    dup = sorted(i for i, n in ids.items() if n > 1)
    if dup:
        first = next(c for c in cases if c.case_id == dup[0])
        raise DataError(first.image, f"case id {dup[0]!r} is given by {ids[dup[0]]} images ({len(dup)} ids repeat)")
    if orphans:
        log.warning("%d mask(s) without an image, e.g. %s", len(orphans), orphans[0])
    log.info("%s: %d cases", message, len(cases))
    return Discovery(
        layout=cfg.layout, cases=sorted(cases, key=lambda c: c.case_id), message=message, orphan_masks=orphans
    )

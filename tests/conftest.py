"""Shared fixtures: thread limits, the shared data folder, and tiny synthetic datasets.

Every dataset here is written with :func:`medsynth.data.io.write_image` (the real writer), at
tiny sizes: 3D NIfTI volumes of 12 x 10 x 8 voxels with masks {0, 1, 2}, and 2D PNG slices of
16 x 12 pixels in per-patient folders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
import yaml

from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig
from medsynth.data.io import write_image

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHAPE_3D = (12, 10, 8)
SHAPE_2D = (16, 12)
AFFINE_3D = np.diag([1.0, 1.0, 2.0, 1.0])
PNG_AFFINE = np.diag([-1.0, -1.0, 1.0])  # what a PNG reads back with (identity in LPS)
LABELS_3D = {0: "background", 1: "a", 2: "b"}


def shared_root() -> Path:
    """The shared folder: ``$MEDSYNTH_SHARED`` or ``<repo>/../shared``."""
    env = os.environ.get("MEDSYNTH_SHARED")
    return Path(env).resolve() if env else (REPO.parent / "shared").resolve()


@pytest.fixture
def shared_data() -> Path:
    """Path of ``<shared>/data`` (it may not exist; use the ``require_shared`` fixture)."""
    return shared_root() / "data"


def _require_shared(shared_data: Path, name: str) -> Path:
    path = shared_data / name
    if not path.is_dir():
        reason = f"../shared/data/{name} not found; set MEDSYNTH_SHARED"
        if os.environ.get("MEDSYNTH_REQUIRE_SHARED") == "1":  # CI has the data: absence is a failure there
            pytest.fail(reason + " (MEDSYNTH_REQUIRE_SHARED=1)")
        pytest.skip(reason)
    return path


@pytest.fixture
def require_shared(shared_data: Path) -> Callable[[str], Path]:
    """``require_shared("lgg-flair")``: the shared data set's path, or SKIP with a clear reason when absent."""
    return lambda name: _require_shared(shared_data, name)


def make_volume(seed: int, shape: tuple[int, int, int] = SHAPE_3D) -> tuple[np.ndarray, np.ndarray]:
    """A tiny 3D image (positive ellipsoid on a zero background) and its mask {0, 1, 2}.

    Labels sit only in slices 2..5 along axis 2, so slices 0, 1, 6, 7 hold no foreground label
    while their image is not blank (the ellipsoid spans every slice).
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    head = (x / 0.95) ** 2 + (y / 0.95) ** 2 + (z / 1.6) ** 2 <= 1.0
    image = np.where(head, 100.0 + 20.0 * rng.random(shape), 0.0).astype(np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    cx, cy = shape[0] // 2, shape[1] // 2
    mask[cx - 3 : cx, cy - 2 : cy + 2, 2:6] = 1
    mask[cx : cx + 3, cy - 2 : cy + 2, 3:5] = 2
    return image, mask


def make_slice(seed: int, shape: tuple[int, int] = SHAPE_2D, lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A tiny 2D uint8 image (bright disc) and a mask with values {0, 255} (255 = lesion)."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    disc = x**2 + y**2 <= 0.8
    image = np.where(disc, 120 + rng.integers(0, 60, shape), 0).astype(np.uint8)
    mask = np.zeros(shape, dtype=np.uint8)
    if lesion:
        mask[shape[0] // 2 - 2 : shape[0] // 2 + 2, shape[1] // 2 - 2 : shape[1] // 2 + 2] = 255
    return image, mask


def multicontrast_channel(image: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
    """A second contrast of ``image``: label 2 bright, label 1 dark, the rest mid-grey (positive inside the head)."""
    rng = np.random.default_rng(1000 + seed)
    level = np.where(mask == 2, 300.0, np.where(mask == 1, 60.0, 150.0))
    return np.where(image > 0, level + 5.0 * rng.random(image.shape), 0.0).astype(np.float32)


class Synth:
    """Writers of tiny datasets and config builders (the fixture ``synth``)."""

    volume = staticmethod(make_volume)
    slice = staticmethod(make_slice)
    affine_3d = AFFINE_3D
    png_affine = PNG_AFFINE
    labels_3d = LABELS_3D

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    # ----- datasets -------------------------------------------------------------------------
    def msd(
        self,
        root: Path | None = None,
        n: int = 4,
        training_list: bool = True,
        nnunet: bool = False,
        ext: str = ".nii.gz",
    ) -> Path:
        """MSD layout: ``imagesTr/``, ``labelsTr/`` and (optionally) ``dataset.json``.

        With ``nnunet`` the images are named ``X_0000`` (plus an ignored second channel ``X_0001``).
        """
        root = root or self.tmp / "msd"
        rows = []
        for i in range(n):
            cid = f"case_{i:03d}"
            img, msk = make_volume(i)
            img_name = f"{cid}_0000{ext}" if nnunet else f"{cid}{ext}"
            write_image(root / "imagesTr" / img_name, img, AFFINE_3D)
            if nnunet:
                write_image(root / "imagesTr" / f"{cid}_0001{ext}", img * 2, AFFINE_3D)
            write_image(root / "labelsTr" / f"{cid}{ext}", msk, AFFINE_3D)
            rows.append({"image": f"./imagesTr/{img_name}", "label": f"./labelsTr/{cid}{ext}"})
        if training_list:
            (root / "dataset.json").write_text(json.dumps({"name": "tiny", "training": rows}))
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        return root

    def paired_dirs(self, root: Path | None = None, n: int = 3) -> Path:
        """``images/X.nii.gz`` + ``labels/X.nii.gz`` matched by file stem."""
        root = root or self.tmp / "paired"
        for i in range(n):
            img, msk = make_volume(i)
            write_image(root / "images" / f"vol_{i}.nii.gz", img, AFFINE_3D)
            write_image(root / "labels" / f"vol_{i}.nii.gz", msk, AFFINE_3D)
        return root

    def png_patients(
        self, root: Path | None = None, patients: Iterable[str] = ("P1", "P2", "P3"), slices: int = 2
    ) -> Path:
        """Per-patient folders of ``<patient>_<k>.png`` + ``<patient>_<k>_mask.png`` (mask values 0/255)."""
        root = root or self.tmp / "png"
        for p, pid in enumerate(patients):
            for k in range(slices):
                img, msk = make_slice(10 * p + k, lesion=k % 2 == 0)
                write_image(root / pid / f"{pid}_{k}.png", img, PNG_AFFINE)
                write_image(root / pid / f"{pid}_{k}_mask.png", msk, PNG_AFFINE)
        return root

    def multicontrast(self, kind: str, root: Path | None = None, n: int = 4, dim: int = 3) -> Path:
        """Two-contrast cases: channel 0 the ellipsoid image, channel 1 a contrast derived from the labels.

        Channel 1 is bright where label 2 is and dark where label 1 is (channel 0 shows no labels), so
        the channel order can be checked in any cache. ``kind``: ``"csv"`` (manifest with columns
        ``image_0``, ``image_1``, ``mask``; returns the CSV path), ``"nnunet"`` (``imagesTr/X_0000``,
        ``X_0001``, ``labelsTr/X``) or ``"nifti4d"`` (``imagesTr/X`` 4D NIfTI with the channels on its
        last axis). ``dim=2`` gives 32 x 32 slices, ``dim=3`` volumes of :data:`SHAPE_3D`.
        """
        root = root or self.tmp / f"mc-{kind}"
        rows = ["image_0,image_1,mask,patient"]
        for i in range(n):
            cid = f"case_{i:03d}"
            if dim == 2:
                vol, vmask = make_volume(i, (32, 32, 8))
                img, msk, aff = vol[..., 3], vmask[..., 3], np.diag([1.0, 1.0, 1.0])
            else:
                img, msk = make_volume(i)
                aff = AFFINE_3D
            second = multicontrast_channel(img, msk, i)
            if kind == "csv":
                write_image(root / cid / "flair.nii.gz", img, aff)
                write_image(root / cid / "t2.nii.gz", second, aff)
                write_image(root / cid / "seg.nii.gz", msk, aff)
                rows.append(f"{cid}/flair.nii.gz,{cid}/t2.nii.gz,{cid}/seg.nii.gz,P{i}")
            elif kind == "nnunet":
                write_image(root / "imagesTr" / f"{cid}_0000.nii.gz", img, aff)
                write_image(root / "imagesTr" / f"{cid}_0001.nii.gz", second, aff)
                write_image(root / "labelsTr" / f"{cid}.nii.gz", msk, aff)
            else:
                import nibabel as nib

                (root / "imagesTr").mkdir(parents=True, exist_ok=True)
                stack = np.stack([img, second], -1)
                if dim == 2:
                    stack = stack[:, :, None, :]
                a4 = aff if dim == 3 else np.eye(4)
                nib.save(nib.Nifti1Image(stack.astype(np.float32), a4), str(root / "imagesTr" / f"{cid}.nii.gz"))
                write_image(root / "labelsTr" / f"{cid}.nii.gz", msk, aff)
        if kind == "csv":
            (root / "cases.csv").write_text("\n".join(rows) + "\n")
            return root / "cases.csv"
        return root

    # ----- configs --------------------------------------------------------------------------
    def raw(self, root: Path, **sections: Any) -> dict[str, Any]:
        """A raw config dict for a tiny 3D dataset at ``root`` (sections merged one level deep)."""
        raw: dict[str, Any] = {
            "name": "tiny",
            "output_dir": str(self.tmp / "out"),
            "data": {"root": str(root), "labels": dict(LABELS_3D), "split": {"seed": 0}},
            "qc": {"policy": "fail", "n_overlays": 0},
            "preprocess": {"spatial_dims": 3, "spatial_size": list(SHAPE_3D)},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        return raw

    def config(self, raw: dict[str, Any]) -> MedsynthConfig:
        """Validate a raw dict into a frozen :class:`MedsynthConfig` (ConfigError on failure)."""
        return validate_config(raw, "test config", MedsynthConfig)

    def yaml(self, raw: dict[str, Any], name: str = "config.yaml") -> Path:
        """Write ``raw`` as a YAML file in tmp_path; returns its path (for ``load_config``)."""
        path = self.tmp / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path


@pytest.fixture
def synth(tmp_path: Path) -> Synth:
    """Factory of tiny datasets and configs under ``tmp_path``."""
    return Synth(tmp_path)


def _assert_cache_clean(cache: Path) -> None:
    assert not (cache / "manifest.json").exists(), f"{cache} holds a manifest"
    assert not list(cache.glob("cases/*.npz")), f"{cache} holds case arrays"
    assert not list(cache.glob(".staging-*")), f"{cache} holds staging folders"


@pytest.fixture
def assert_cache_clean() -> Callable[[Path], None]:
    """Check that a cache holds nothing a later run could trust: no manifest, case arrays or staging folders."""
    return _assert_cache_clean

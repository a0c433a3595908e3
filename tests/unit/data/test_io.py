"""Reading and writing images with their geometry (medsynth.data.io)."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsynth.data.io import read_image, spacing_from_affine, write_image
from medsynth.errors import DataError


def _oblique_affine() -> np.ndarray:
    """Spacing 0.7/1.3/2.5 mm, rotated 20 degrees about z and 10 about x, origin offset."""
    a, b = np.deg2rad(20.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag([0.7, 1.3, 2.5])
    aff[:3, 3] = [12.5, -30.25, 7.0]
    return aff


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_3d_round_trip_keeps_array_and_oblique_affine(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(12, 10, 8)).astype(np.float32)
    aff = _oblique_affine()
    path = write_image(tmp_path / f"vol{suffix}", arr, aff)
    got = read_image(path)
    assert got.array.shape == (12, 10, 8)
    assert got.array.dtype == np.float32
    np.testing.assert_array_equal(got.array, arr)
    np.testing.assert_allclose(got.affine, aff, atol=1e-5)
    np.testing.assert_allclose(got.spacing, (0.7, 1.3, 2.5), atol=1e-5)
    assert got.path == path


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_3d_mask_round_trip_is_integer(tmp_path: Path, suffix: str) -> None:
    mask = np.random.default_rng(1).integers(0, 3, size=(12, 10, 8)).astype(np.uint8)
    got = read_image(write_image(tmp_path / f"m{suffix}", mask, _oblique_affine()), "mask")
    assert got.array.dtype == np.int64
    np.testing.assert_array_equal(got.array, mask)


def test_png_round_trip_2d_uint8(tmp_path: Path) -> None:
    arr = np.random.default_rng(2).integers(0, 256, size=(16, 12)).astype(np.uint8)
    aff = np.diag([-0.5, -0.5, 1.0])  # PNG stores pixel spacing, no origin or direction
    got = read_image(write_image(tmp_path / "slice.png", arr, aff))
    assert got.ndim == 2
    assert got.array.shape == (16, 12)  # index order (x, y), not display order
    np.testing.assert_array_equal(got.array, arr.astype(np.float32))
    np.testing.assert_allclose(got.affine, aff, atol=1e-6)


def test_2d_nifti_round_trip(tmp_path: Path) -> None:
    arr = np.arange(20, dtype=np.float32).reshape(5, 4)
    aff = np.array([[0.5, 0.0, 3.0], [0.0, 0.8, -2.0], [0.0, 0.0, 1.0]])
    got = read_image(write_image(tmp_path / "plane.nii.gz", arr, aff))
    np.testing.assert_array_equal(got.array, arr)
    np.testing.assert_allclose(got.affine, aff, atol=1e-6)


def test_spacing_from_affine_is_column_norms() -> None:
    assert spacing_from_affine(_oblique_affine()) == pytest.approx((0.7, 1.3, 2.5))


def test_dicom_series_folder(tmp_path: Path) -> None:
    vol = (np.arange(5 * 8 * 6).reshape(5, 8, 6) % 97).astype(np.int16)  # (z, y, x) as SimpleITK wants
    img = sitk.GetImageFromArray(vol)
    img.SetSpacing((0.8, 0.9, 2.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    series = "1.2.826.0.1.3680043.2.1125.1.4242"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    folder = tmp_path / "series"
    folder.mkdir()
    for i in range(img.GetDepth()):
        s = img[:, :, i]
        s.SetMetaData("0008|0060", "MR")
        s.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1.4241")
        s.SetMetaData("0020|000e", series)
        s.SetMetaData("0008|0018", f"{series}.{i + 1}")
        s.SetMetaData("0020|0013", str(i + 1))
        s.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        s.SetMetaData("0020|0032", "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, i))))
        writer.SetFileName(str(folder / f"slice_{i:03d}.dcm"))
        writer.Execute(s)
    got = read_image(folder)
    assert got.array.shape == (6, 8, 5)
    np.testing.assert_array_equal(got.array, vol.transpose(2, 1, 0).astype(np.float32))
    assert got.spacing == pytest.approx((0.8, 0.9, 2.0))
    # LPS origin (1, 2, 3) is RAS (-1, -2, 3)
    np.testing.assert_allclose(got.affine[:3, 3], [-1.0, -2.0, 3.0])


@pytest.mark.parametrize("name", ["broken.nii.gz", "broken.nrrd", "broken.png"])
def test_corrupt_file_is_a_one_line_data_error_naming_the_path(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(os.urandom(400))
    with pytest.raises(DataError) as info:
        read_image(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert "cannot read" in info.value.problem
    assert "\n" not in str(info.value)  # the CLI prints it as one line


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.nii.gz"
    with pytest.raises(DataError, match="does not exist") as info:
        read_image(path)
    assert info.value.path == str(path)


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        read_image(path)


def test_float_mask_with_half_values_is_rejected(tmp_path: Path) -> None:
    mask = np.zeros((4, 4, 4), dtype=np.float32)
    mask[1, 1, 1] = 0.5
    path = write_image(tmp_path / "soft.nii.gz", mask, np.eye(4))
    with pytest.raises(DataError, match="non-integer") as info:
        read_image(path, "mask")
    assert info.value.path == str(path)
    # the same file is a valid image
    assert read_image(path).array.max() == pytest.approx(0.5)


def test_float_mask_with_integer_values_is_accepted(tmp_path: Path) -> None:
    mask = np.zeros((4, 4, 4), dtype=np.float32)
    mask[1, 1, 1] = 2.0
    got = read_image(write_image(tmp_path / "ok.nii.gz", mask, np.eye(4)), "mask")
    assert got.array.dtype == np.int64
    assert set(np.unique(got.array).tolist()) == {0, 2}


def test_4d_image_needs_a_channel(tmp_path: Path) -> None:
    arr = np.stack([np.full((4, 4, 3), c, dtype=np.float32) for c in (1.0, 2.0)], axis=-1)
    path = tmp_path / "multi.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    with pytest.raises(DataError, match=r"data\.channel"):
        read_image(path)
    got = read_image(path, channel=1)
    assert got.array.shape == (4, 4, 3)
    assert float(got.array.max()) == 2.0
    with pytest.raises(DataError, match="channel 5 does not exist"):
        read_image(path, channel=5)

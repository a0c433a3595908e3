"""Reading and writing medical images: the only module that touches nibabel and SimpleITK.

Conventions (the same as MONAI's readers):
    * Arrays are indexed in ITK/voxel index order ``(i, j[, k])``: for a 2D PNG that is
      ``(x, y)``, i.e. the transpose of how it is displayed; :func:`display_2d` flips it back.
    * Geometry is a homogeneous affine in RAS world coordinates of shape ``(D+1, D+1)``
      (``D`` = 2 or 3) mapping voxel indices to millimetres, as MONAI's ``MetaTensor`` expects.
      Formats that store LPS (everything SimpleITK reads) are converted on read and back on write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from medsynth.errors import DataError
from medsynth.fileio import atomic_path

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".dcm")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
DICOM_SUFFIXES = (".dcm", "")

Kind = Literal["image", "mask"]


@dataclass(frozen=True)
class ImageData:
    """A loaded image or mask with its geometry.

    Attributes:
        array: Voxel values, shape ``(X, Y)`` or ``(X, Y, Z)``; float32 for images, int64 for masks.
        affine: RAS affine, shape ``(D+1, D+1)``, voxel index → world millimetres.
        path: The file (or DICOM folder) it came from.
        channels: Every channel of a multi-contrast case ``(C, *S)`` float32 on ``array``'s grid (``array``
            is channel 0), or None for a single-channel image (see :mod:`medsynth.data.channels`).
    """

    array: npt.NDArray[np.generic]
    affine: npt.NDArray[np.float64]
    path: Path
    channels: npt.NDArray[np.float32] | None = None

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return int(self.array.ndim)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis."""
        return spacing_from_affine(self.affine)


def spacing_from_affine(affine: npt.NDArray[np.float64]) -> tuple[float, ...]:
    """Voxel sizes (column norms of the linear part) of a ``(D+1, D+1)`` affine."""
    d = affine.shape[0] - 1
    return tuple(float(v) for v in np.linalg.norm(affine[:d, :d], axis=0))


def _lps_ras_flip(ndim: int) -> npt.NDArray[np.float64]:
    flip = np.eye(ndim + 1)
    flip[0, 0] = -1.0
    if ndim >= 2:
        flip[1, 1] = -1.0
    return flip


def is_dicom_dir(path: Path) -> bool:
    """True if ``path`` is a folder holding DICOM files (``*.dcm`` or extension-less with DICM magic)."""
    if not path.is_dir():
        return False
    for f in path.iterdir():
        if f.is_file():
            if f.suffix.lower() == ".dcm":
                return True
            if is_image_file(f):  # a PNG/NIfTI/... file is no DICOM: do not open every slice of a dataset
                continue
            try:
                with open(f, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def is_image_file(path: Path) -> bool:
    """True if ``path`` has a supported image suffix (NIfTI, NRRD, MHA/MHD, PNG, TIFF, DICOM)."""
    name = path.name.lower()
    return any(name.endswith(s) for s in IMAGE_SUFFIXES) and not name.endswith(".raw")


def _read_nifti(path: Path, kind: Kind) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64]]:
    import nibabel as nib

    img = nib.load(str(path))
    if kind == "mask":
        arr = np.asanyarray(img.dataobj)
    else:
        arr = img.get_fdata(dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    return arr, affine


def _read_itk(path: Path) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64]]:
    import SimpleITK as sitk

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise DataError(path, "folder holds no readable DICOM series")
        if len(series) > 1:
            raise DataError(path, f"folder holds {len(series)} DICOM series; put one series per folder")
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        img = reader.Execute()
    else:
        img = sitk.ReadImage(str(path))
    ncomp = img.GetNumberOfComponentsPerPixel()
    arr = sitk.GetArrayFromImage(img)  # (z, y, x[, c])
    if ncomp > 1:
        chans = [arr[..., c] for c in range(min(ncomp, 3))]
        if ncomp in (3, 4) and all(np.array_equal(chans[0], c) for c in chans[1:]):
            arr = chans[0]
        else:
            raise DataError(path, f"has {ncomp} colour components per pixel; expected a grey-scale image")
    arr = np.ascontiguousarray(arr.transpose(tuple(range(arr.ndim))[::-1]))  # → (x, y, z)
    d = img.GetDimension()
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(d, d)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    lps = np.eye(d + 1)
    lps[:d, :d] = direction @ np.diag(spacing)
    lps[:d, d] = origin
    return arr, _lps_ras_flip(d) @ lps


def image_channels(path: str | Path) -> int:
    """Channels of an image file without reading its voxels: the 4th axis of a NIfTI, else 1."""
    p = Path(path)
    if p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        try:
            shape = nib.load(str(p)).shape  # header only
        except Exception:  # unreadable files are reported by read_image, with their problem
            return 1
        return int(shape[3]) if len(shape) == 4 else 1
    return 1


def read_image(path: str | Path, kind: Kind = "image", channel: int | None = None) -> ImageData:
    """Read an image or mask file (or DICOM series folder) with its geometry.

    Args:
        path: A NIfTI, NRRD, MHA/MHD, PNG/TIFF file or a folder holding one DICOM series.
        kind: ``"image"`` returns float32 intensities; ``"mask"`` returns int64 labels and
            rejects non-integer values.
        channel: For 4D (multi-channel) images, the channel index to keep along the last axis.

    Returns:
        The loaded :class:`ImageData`, 2D or 3D.

    Raises:
        DataError: If the file is missing, unreadable, not 2D/3D, or (masks) not integer-valued.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(p, "file does not exist")
    try:
        if p.name.lower().endswith(NIFTI_SUFFIXES):
            arr, affine = _read_nifti(p, kind)
        elif p.is_dir() or is_image_file(p):
            arr, affine = _read_itk(p)
        else:
            raise DataError(p, f"unsupported file type (supported: {', '.join(IMAGE_SUFFIXES)}, DICOM folder)")
    except DataError:
        raise
    except Exception as exc:  # corrupt or truncated files surface as many exception types
        detail = " ".join(str(exc).split())  # SimpleITK messages span lines; errors are one line
        raise DataError(p, f"cannot read file ({type(exc).__name__}: {detail})") from exc
    if arr.ndim == 4:
        if channel is None:
            raise DataError(p, f"is 4D {arr.shape}; set data.channel to choose one channel")
        if not 0 <= channel < arr.shape[-1]:
            raise DataError(p, f"has {arr.shape[-1]} channels; channel {channel} does not exist")
        arr = arr[..., channel]
    return _finish(p, arr, affine, kind)


def read_channels(path: str | Path) -> list[ImageData]:
    """Every channel of a 4D (multi-contrast) image, reading the file once; a 2D/3D image gives one.

    Args:
        path: An image file; a 4D NIfTI holds its channels on the last axis.

    Returns:
        One float32 :class:`ImageData` per channel, in order, all with the file's geometry.

    Raises:
        DataError: As :func:`read_image`.
    """
    p = Path(path)
    if not (p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES)):
        return [read_image(p, "image")]
    try:
        arr, affine = _read_nifti(p, "image")
    except Exception as exc:
        detail = " ".join(str(exc).split())
        raise DataError(p, f"cannot read file ({type(exc).__name__}: {detail})") from exc
    if arr.ndim != 4:
        return [_finish(p, arr, affine, "image")]
    return [_finish(p, np.ascontiguousarray(arr[..., k]), affine, "image") for k in range(arr.shape[-1])]


def _finish(p: Path, arr: npt.NDArray[np.generic], affine: npt.NDArray[np.float64], kind: Kind) -> ImageData:
    """A read 2D/3D array as :class:`ImageData`: dimensions checked, affine trimmed, values typed."""
    if arr.ndim == 3 and arr.shape[-1] == 1 and affine.shape[0] == 3:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise DataError(p, f"has {arr.ndim} dimensions {arr.shape}; expected a 2D or 3D image")
    if affine.shape[0] - 1 != arr.ndim:  # e.g. NIfTI holding a 2D slice: keep the in-plane part
        affine = np.delete(
            np.delete(affine, list(range(arr.ndim, affine.shape[0] - 1)), 0),
            list(range(arr.ndim, affine.shape[0] - 1)),
            1,
        )
    if kind == "mask":
        if np.issubdtype(arr.dtype, np.floating):
            finite = np.isfinite(arr)
            if not finite.all() or not np.array_equal(arr, np.round(arr)):
                raise DataError(p, "mask holds non-integer or non-finite values; masks must be integer labels")
        out: npt.NDArray[np.generic] = arr.astype(np.int64, copy=False)
    else:
        out = arr.astype(np.float32, copy=False)
    return ImageData(array=out, affine=affine, path=p)


def _to_itk(array: npt.NDArray[np.generic], affine: npt.NDArray[np.float64]):  # type: ignore[no-untyped-def]
    import SimpleITK as sitk

    d = array.ndim
    img = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(tuple(range(d))[::-1])))
    lps = _lps_ras_flip(d) @ affine
    spacing = np.linalg.norm(lps[:d, :d], axis=0)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (lps[:d, :d] / spacing).ravel()])
    img.SetOrigin([float(v) for v in lps[:d, d]])
    return img


def write_image(path: str | Path, array: npt.NDArray[np.generic], affine: npt.NDArray[np.float64]) -> Path:
    """Write an image or mask atomically, keeping its geometry.

    Args:
        path: Destination; the suffix picks the format (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``,
            ``.png``/``.tif`` for 2D). PNG needs uint8 or uint16 data.
        array: Voxel values, shape ``(X, Y)`` or ``(X, Y, Z)`` in index order.
        affine: RAS affine of shape ``(D+1, D+1)``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    import nibabel as nib
    import SimpleITK as sitk

    p = Path(path)
    if affine.shape != (array.ndim + 1, array.ndim + 1):
        raise ValueError(f"affine shape {affine.shape} does not fit a {array.ndim}D array")
    with atomic_path(p) as tmp:
        if p.name.lower().endswith(NIFTI_SUFFIXES):
            aff = affine
            if array.ndim == 2:  # NIfTI is 3D: embed the 2D plane
                aff = np.eye(4)
                aff[:2, :2] = affine[:2, :2]
                aff[:2, 3] = affine[:2, 2]
            nib.save(nib.Nifti1Image(np.asarray(array), aff), str(tmp))
        else:
            sitk.WriteImage(_to_itk(np.asarray(array), affine), str(tmp), useCompression=True)
    return p


def display_2d(array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
    """Turn an index-ordered 2D array ``(X, Y)`` into display order ``(rows, cols)``."""
    return np.asarray(array).T


def resample_to(
    array: npt.NDArray[np.generic],
    affine: npt.NDArray[np.float64],
    shape: tuple[int, ...],
    target_affine: npt.NDArray[np.float64],
    interpolation: Literal["linear", "nearest"],
    default: float = 0.0,
) -> npt.NDArray[np.generic]:
    """Resample an array onto another voxel grid of the same world space (SimpleITK, identity transform).

    Args:
        array: Values ``(*S)`` in index order, placed in the world by ``affine``.
        affine: ``(D+1, D+1)`` RAS affine of ``array``.
        shape: Target grid size ``(*T)``.
        target_affine: ``(D+1, D+1)`` RAS affine of the target grid.
        interpolation: ``"linear"`` for images, ``"nearest"`` for label masks.
        default: Value of target voxels outside ``array``'s extent.

    Returns:
        The resampled array ``(*T)``: float32 for linear, the input dtype for nearest.
    """
    import SimpleITK as sitk

    d = len(shape)
    if np.asarray(array).ndim != d or affine.shape != (d + 1, d + 1) or target_affine.shape != (d + 1, d + 1):
        raise ValueError(f"cannot resample a {np.asarray(array).ndim}D array onto a {d}D grid")
    src = np.asarray(array)
    moving = _to_itk(src.astype(np.float32) if interpolation == "linear" else src, affine)
    ref = _to_itk(np.zeros(tuple(int(s) for s in shape), np.uint8), target_affine)
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(ref)
    f.SetInterpolator(sitk.sitkLinear if interpolation == "linear" else sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(float(default))
    f.SetTransform(sitk.Transform(d, sitk.sitkIdentity))
    out = sitk.GetArrayFromImage(f.Execute(moving))
    return np.ascontiguousarray(out.transpose(tuple(range(d))[::-1]))

"""Masks as users have them: native files in, the model's grid for sampling, native geometry out.

One mechanism serves synthesis from mask files (:mod:`medsynth.synthesis.masks`) and the
native-geometry export (:mod:`medsynth.synthesis.export`):

* **In** (:func:`mask_to_grid`): a mask file (any size, spacing, orientation; raw label values) and
  optionally its image go through the *training* transforms (:func:`medsynth.data.case_transform.transform_case`:
  orientation, spacing, foreground crop, intensity scaling, derived label) and the crop/pad to
  ``preprocess.spatial_size`` (:func:`medsynth.data.case_transform.to_model_grid`). The mask's own
  geometry is kept as a :class:`NativeGeometry` record.
* **Out** (:func:`to_native`): an array on the model grid is resampled with SimpleITK onto the
  recorded native grid (image linear, mask nearest neighbour); voxels outside the model grid's
  field of view (cropped away by the crop/pad) are 0 (background).

Intensities stay on the training scale (``[0, 1]`` = the per-image percentile range of the
preprocessing) unless a source range is known: the one of a given image (the ``lo``/``hi`` its
percentile scaling used, :func:`medsynth.data.transforms.intensity_source_ranges`) or one given in a
mask manifest; ``lo + x * (hi - lo)`` maps back to the source scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medsynth.config.schema import MedsynthConfig
from medsynth.data.case_transform import to_model_grid, transform_case
from medsynth.data.io import read_image, resample_to, spacing_from_affine
from medsynth.data.labels import remap_and_validate
from medsynth.errors import DataError

__all__ = ["GridMask", "NativeGeometry", "mask_to_grid", "to_native"]

_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class NativeGeometry:
    """The voxel grid of a source mask file: size, spacing, direction, origin.

    Attributes:
        shape: Grid size in index order ``(X, Y[, Z])``.
        affine: ``(D+1, D+1)`` RAS affine (voxel index → world mm), as :func:`medsynth.data.io.read_image` gives it.
        file: The mask file it was read from.
    """

    shape: tuple[int, ...]
    affine: npt.NDArray[np.float64]
    file: str = ""

    @property
    def ndim(self) -> int:
        """Spatial dimensions."""
        return len(self.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm per index axis."""
        return spacing_from_affine(self.affine)

    def _lps(self) -> npt.NDArray[np.float64]:
        d = self.ndim
        flip = np.eye(d + 1)
        flip[:d, :d] = _LPS[:d, :d]
        return flip @ self.affine

    @property
    def direction(self) -> tuple[float, ...]:
        """Direction cosines, row-major ``D x D``, in SimpleITK's LPS convention."""
        lps, d = self._lps(), self.ndim
        return tuple(float(v) for v in (lps[:d, :d] / np.asarray(self.spacing)).ravel())

    @property
    def origin(self) -> tuple[float, ...]:
        """World position (mm) of voxel 0, in SimpleITK's LPS convention."""
        lps, d = self._lps(), self.ndim
        return tuple(float(v) for v in lps[:d, d])

    def to_json(self) -> dict[str, Any]:
        """The manifest record (SimpleITK conventions plus the RAS affine)."""
        return {
            "shape": list(self.shape),
            "spacing": [round(v, 6) for v in self.spacing],
            "direction": [round(v, 6) for v in self.direction],
            "origin": [round(v, 6) for v in self.origin],
            "affine_ras": np.asarray(self.affine).tolist(),
            "file": self.file,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NativeGeometry:
        """Inverse of :meth:`to_json`."""
        return cls(
            tuple(int(s) for s in data["shape"]), np.asarray(data["affine_ras"], dtype=np.float64), str(data["file"])
        )


@dataclass(frozen=True)
class GridMask:
    """A mask file brought onto the model's grid.

    Attributes:
        mask: ``(1, *S)`` uint8 labels in the cache's label space (derived label included).
        affine: ``(D+1, D+1)`` RAS affine of the model grid.
        native: The mask file's own geometry.
        image: ``(1, *S)`` float32 normalised image when the image was given, else None.
        source_range: ``(lo, hi)`` source intensities of the given image mapped to 0 and 1, else None.
    """

    mask: npt.NDArray[np.uint8]
    affine: npt.NDArray[np.float64]
    native: NativeGeometry
    image: npt.NDArray[np.float32] | None = None
    source_range: tuple[float, float] | None = None


def _same_grid(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64], tol: float) -> bool:
    scale = max(float(np.abs(a).max()), 1.0)
    return bool(a.shape == b.shape and np.allclose(a, b, atol=tol * scale))


def mask_to_grid(
    mask_path: str | Path,
    cfg: MedsynthConfig,
    labels: dict[int, str],
    image_path: str | Path | None = None,
) -> GridMask:
    """Read a mask (and optionally its image) and apply the training transforms, down to the model grid.

    Args:
        mask_path: Mask file (or DICOM folder), any size/spacing/orientation, raw label values.
        cfg: Config giving ``data.label_remap``, ``data.channel`` and the ``preprocess`` transforms.
        labels: Vocabulary the remapped mask must use (the cache's: ``data.labels`` plus a derived label).
        image_path: The mask's image (same grid), needed when the config derives a label from the image.

    Returns:
        A :class:`GridMask`.

    Raises:
        DataError: Unreadable file, wrong dimensionality, labels outside the vocabulary, an image on another
            grid, or a derived label that is neither in the mask nor derivable (no image).
    """
    pc = cfg.preprocess
    mpath = Path(mask_path)
    m = read_image(mpath, kind="mask", channel=cfg.data.channel)
    if m.ndim != pc.spatial_dims:
        raise DataError(
            mpath,
            f"mask is {m.ndim}D {tuple(m.array.shape)} but the model is {pc.spatial_dims}D "
            f"(preprocess.spatial_dims={pc.spatial_dims})",
            hint=f"give {pc.spatial_dims}D mask files",
        )
    remapped = remap_and_validate(m.array, cfg.data.model_copy(update={"labels": labels}), mpath)
    image: npt.NDArray[np.generic] | None = None
    if image_path is not None:
        ipath = Path(image_path)
        img = read_image(ipath, kind="image", channel=cfg.data.channel)
        if img.array.shape != m.array.shape or not _same_grid(img.affine, m.affine, cfg.qc.geometry_tolerance):
            raise DataError(
                ipath,
                f"image grid {tuple(img.array.shape)} spacing {tuple(round(s, 4) for s in img.spacing)} differs from "
                f"its mask {mpath.name} {tuple(m.array.shape)} spacing {tuple(round(s, 4) for s in m.spacing)}",
                hint="give the image the mask was drawn on",
            )
        image = img.array
    dl = pc.derived_label
    if dl.enabled and image is None and not np.any(remapped == dl.index):
        raise DataError(
            mpath,
            f"mask has no {dl.name!r} label (index {dl.index}), which this config derives from the image "
            "(preprocess.derived_label)",
            hint=f"give the image too (masks manifest column 'image'), or a mask that already holds label {dl.index}",
        )
    tc = transform_case(image, remapped, m.affine, pc)
    grid_image, grid_mask, grid_affine = to_model_grid(tc, pc)
    native = NativeGeometry(tuple(int(s) for s in m.array.shape), np.asarray(m.affine, dtype=np.float64), str(mpath))
    return GridMask(grid_mask, grid_affine, native, grid_image, tc.source_range)


def to_native(
    image: npt.NDArray[np.floating[Any]],
    mask: npt.NDArray[np.integer[Any]],
    affine: npt.NDArray[np.float64],
    native: NativeGeometry,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Resample a model-grid image/mask pair onto a native grid (image linear, mask nearest neighbour).

    Args:
        image: ``(1, *S)`` or ``(*S)`` image on the model grid, or a multi-contrast ``(C, *S)``.
        mask: ``(1, *S)`` or ``(*S)`` labels on the model grid.
        affine: ``(D+1, D+1)`` RAS affine of the model grid.
        native: Target grid.

    Returns:
        ``(image (*T) float32, mask (*T) uint8)`` on the native grid (image ``(C, *T)`` for C > 1
        channels); 0 outside the model grid's extent.
    """
    d = native.ndim
    im = np.asarray(image)
    mk = np.asarray(mask)
    mk = mk[0] if mk.ndim == d + 1 else mk
    if im.ndim == d + 1 and im.shape[0] > 1:  # multi-contrast: every channel onto the same grid
        chans = [resample_to(c.astype(np.float32), affine, native.shape, native.affine, "linear") for c in im]
        out_mk = resample_to(mk.astype(np.uint8), affine, native.shape, native.affine, "nearest")
        return np.stack(chans).astype(np.float32), np.asarray(out_mk, dtype=np.uint8)
    im = im[0] if im.ndim == d + 1 else im
    out_im = resample_to(im.astype(np.float32), affine, native.shape, native.affine, "linear")
    out_mk = resample_to(mk.astype(np.uint8), affine, native.shape, native.affine, "nearest")
    return np.asarray(out_im, dtype=np.float32), np.asarray(out_mk, dtype=np.uint8)

"""Built-in procedural brain phantom: medsynth's embedded default dataset.

Every "patient" is a synthetic, procedurally generated, brain-like FLAIR MRI volume with a label
mask. It is **not** real anatomy: it exists so that the whole pipeline (ingestion, preprocessing,
training, synthesis, evaluation) can run and be tested without downloading anything.

Labels: 0 background, 1 CSF, 2 grey matter, 3 white matter, 4 lesion (tumour).

How a patient is made (all numpy/scipy, deterministic given the random generator):

* **Anatomy is analytic.** Each patient draws a head ellipsoid (own size, shape, pose), a skull
  and scalp shell, a subarachnoid CSF rim, a brain whose cortex is a grey-matter ribbon with
  folds (sulci are the zero lines of a band-limited random function on the sphere, cut radially
  into the brain; white matter reaches up into the gyral cores), an interhemispheric fissure,
  two butterfly-like lateral ventricles and a third ventricle, deep grey nuclei and, with
  probability ``lesion_probability``, an irregular lesion blob covering roughly 1.5–10 % of the
  brain that overrides every other tissue label.
* **Elastic deformation** is a smooth random displacement field applied to the coordinates at
  which the analytic anatomy is evaluated. Image and labels are evaluated at the *same* warped
  points, so they stay exactly consistent; labels are class look-ups at those points (the
  nearest-neighbour limit of resampling a label map), never interpolated.
* **Contrast** is FLAIR-like (CSF dark, white matter slightly darker than grey matter, lesion
  bright, bright scalp with a dark bone line), with a mild texture, a partial-volume blur, a
  smooth multiplicative bias field and Rician noise (magnitude of complex Gaussian noise).

Array convention (that of :mod:`medsynth.data.io`): index order ``(x, y[, z])``. Volumes carry a
1 mm isotropic RAS affine whose origin is the volume centre; 2D PNG slices carry the affine that
PNG files read back with (``diag(-1, -1, 1)``, i.e. identity in LPS), so the anatomy is oriented
consistently with the geometry written next to it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from medsynth.data.io import write_image
from medsynth.data.phantom_anatomy import B0, draw_patient, finish, render
from medsynth.errors import OutputExistsError
from medsynth.fileio import is_nonempty, move_dir_into_place, write_json_atomic, write_text_atomic

__all__ = [
    "LABELS",
    "PHANTOM_VERSION",
    "PNG_AFFINE",
    "PNG_SCALE",
    "PhantomSlice",
    "generate_phantom_volume",
    "phantom_slices_2d",
    "volume_affine",
    "write_phantom_dataset",
]

PHANTOM_VERSION = "1.0.0"
"""Version of the generator; bumped whenever the same seed would give different data."""

LABELS: dict[int, str] = {0: "background", 1: "csf", 2: "grey_matter", 3: "white_matter", 4: "lesion"}
"""Label value → name of the phantom's masks."""

PNG_SCALE = 200.0
"""Fixed factor from phantom intensity (≈ 0..1.2) to 8-bit PNG grey values (then clipped to 0..255)."""

PNG_AFFINE: npt.NDArray[np.float64] = np.diag([-1.0, -1.0, 1.0])
"""RAS affine of 2D PNG slices: what :func:`medsynth.data.io.read_image` returns for a PNG."""

ProgressFn = Callable[[int, int], None]


def _check_shape(shape: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    if len(shape) != ndim or any(int(s) < 8 for s in shape):
        raise ValueError(f"shape must be {ndim} sizes of at least 8, got {shape}")
    return tuple(int(s) for s in shape)


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"lesion_probability must be within [0, 1], got {p}")


def volume_affine(shape: tuple[int, int, int]) -> npt.NDArray[np.float64]:
    """The phantom volumes' affine: 1 mm isotropic, RAS axes, world origin at the volume centre.

    Args:
        shape: Volume shape ``(X, Y, Z)``.

    Returns:
        ``(4, 4)`` float64 affine mapping voxel indices to RAS millimetres.
    """
    aff = np.eye(4)
    aff[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1) / 2
    return aff


def generate_phantom_volume(
    shape: tuple[int, int, int], rng: np.random.Generator, *, lesion_probability: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Generate one phantom patient: a brain-like FLAIR volume and its label mask.

    The head's size, shape and pose, the folding pattern, ventricle size, contrast, bias field,
    noise level and the lesion are all drawn from ``rng``, so each call gives a new patient and the
    same generator state gives identical arrays.

    Args:
        shape: Volume shape ``(X, Y, Z)`` in voxels (1 mm isotropic, RAS index order as written by
            :func:`volume_affine`); each side at least 8. Axial slices run along the last axis.
        rng: Random generator (``numpy.random.default_rng(seed)``); it is advanced.
        lesion_probability: Probability in ``[0, 1]`` that the patient has a lesion (label 4).

    Returns:
        ``(image, labels)``: image ``(X, Y, Z)`` float32, non-negative, tissue intensities ≈ 0..1
        before noise (Rician noise adds a small positive floor); labels ``(X, Y, Z)`` uint8 with values
        in ``{0: background, 1: CSF, 2: grey matter, 3: white matter, 4: lesion}``.

    Raises:
        ValueError: On a bad shape or probability.
    """
    shp = _check_shape(tuple(shape), 3)
    _check_probability(lesion_probability)
    pat = draw_patient(rng, np.asarray(shp, dtype=np.float64), lesion_probability)
    axes = [np.arange(s, dtype=np.float32) - np.float32((s - 1) / 2) for s in shp]
    xw, yw, zw = (a.ravel() for a in np.meshgrid(*axes, indexing="ij"))
    image, labels = render(pat, xw, yw, zw)
    img = finish(pat, image.reshape(shp), (xw, yw, zw), rng, sigma=(0.55, 0.55, 0.55))
    return img, labels.reshape(shp)


class PhantomSlice(NamedTuple):
    """One axial slice of a phantom patient.

    Attributes:
        slice_index: Slice index along the patient's notional volume's last axis (0-based).
        image: ``(X, Y)`` float32 intensities, non-negative, ≈ 0..1 before noise.
        mask: ``(X, Y)`` uint8 labels in ``0..4``.
    """

    slice_index: int
    image: npt.NDArray[np.float32]
    mask: npt.NDArray[np.uint8]


def phantom_slices_2d(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    slices_per_patient: int,
    lesion_probability: float,
    depth: int | None = None,
) -> list[PhantomSlice]:
    """Axial slices of one phantom patient, spread over the central part of the brain.

    The patient is the same analytic volume :func:`generate_phantom_volume` draws, with a notional
    depth of ``depth`` 1 mm slices; only the chosen slices are rendered (cheap at any in-plane size),
    so the slices of one patient share anatomy, lesion, bias field and contrast like real data.
    The in-plane orientation matches :data:`PNG_AFFINE` (displayed with ``.T``: anterior at the top,
    patient right on the left).

    Args:
        shape: In-plane shape ``(X, Y)``, each side at least 8.
        rng: Random generator; it is advanced.
        slices_per_patient: Number of distinct slices, ``1..depth``.
        lesion_probability: Probability in ``[0, 1]`` that the patient has a lesion.
        depth: Number of slices of the notional volume; default ``X * 3 // 4``.

    Returns:
        ``slices_per_patient`` :class:`PhantomSlice` items in increasing ``slice_index`` order, each with
        ``(X, Y)`` float32 image and uint8 mask.

    Raises:
        ValueError: On a bad shape, probability or slice count.
    """
    shp = _check_shape(tuple(shape), 2)
    _check_probability(lesion_probability)
    nz = int(depth) if depth is not None else shp[0] * 3 // 4
    if nz < 8:
        raise ValueError(f"depth must be at least 8, got {nz}")
    if not 1 <= slices_per_patient <= nz:
        raise ValueError(f"slices_per_patient must be within 1..{nz}, got {slices_per_patient}")
    fov = np.array([shp[0], shp[1], nz], dtype=np.float64)
    pat = draw_patient(rng, fov, lesion_probability)
    # Central part of the brain: from the basal ganglia up to the centrum semiovale.
    zc = (nz - 1) / 2 + float(pat.centre[2])
    span = float(pat.semi[2]) * B0
    lo, hi = zc - 0.1 * span, zc + 0.5 * span
    if hi - lo + 1 < slices_per_patient:  # widen symmetrically to fit the requested number of slices
        mid, half = (lo + hi) / 2, (slices_per_patient - 1) / 2
        lo, hi = mid - half, mid + half
    lo, hi = max(lo, 0.0), min(hi, nz - 1.0)
    if hi - lo + 1 < slices_per_patient:
        lo, hi = (0.0, nz - 1.0) if slices_per_patient > 1 else (lo, lo)
    idx = np.floor(np.linspace(lo, hi, slices_per_patient) + 0.5).astype(int)
    idx = np.clip(idx, 0, nz - 1)
    # World coordinates of the PNG grid: index i -> towards patient left, j -> towards posterior.
    xs = -(np.arange(shp[0], dtype=np.float32) - np.float32((shp[0] - 1) / 2))
    ys = -(np.arange(shp[1], dtype=np.float32) - np.float32((shp[1] - 1) / 2))
    zs = idx.astype(np.float32) - np.float32((nz - 1) / 2)
    gshape = (shp[0], shp[1], len(idx))
    xw, yw, zw = (a.ravel() for a in np.meshgrid(xs, ys, zs, indexing="ij"))
    image, labels = render(pat, xw, yw, zw)
    img = finish(pat, image.reshape(gshape), (xw, yw, zw), rng, sigma=(0.55, 0.55, 0.0))
    lab = labels.reshape(gshape)
    return [
        PhantomSlice(int(k), np.ascontiguousarray(img[:, :, s]), np.ascontiguousarray(lab[:, :, s]))
        for s, k in enumerate(idx)
    ]


def _phantom_md(params: dict[str, Any], layout: str) -> str:
    lines = [
        "# medsynth phantom dataset",
        "",
        "This dataset is **synthetic**: procedurally generated brain-like FLAIR MRI with label masks,",
        "made by `medsynth.data.phantom`. It is **not real anatomy** and not derived from any patient;",
        "use it to exercise and test the pipeline, never to draw clinical conclusions.",
        "",
        "## Labels",
        "",
        "| value | name |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in LABELS.items()],
        "",
        "Skull and scalp appear in the image but are labelled background.",
        "",
        "## Contrast",
        "",
        "FLAIR-like: CSF dark, white matter slightly darker than grey matter, lesion bright, bright scalp",
        "with a dark bone line; smooth multiplicative bias field; Rician noise; random smooth elastic",
        "deformation shared by image and labels. Each patient has its own head size, shape and pose.",
        "",
        "## Layout",
        "",
        layout,
        "",
        "## Generator parameters",
        "",
        *[f"- {k}: {v}" for k, v in params.items()],
        "",
        "Regenerate with `medsynth.data.phantom.write_phantom_dataset(out_dir, dim=..., n=..., seed=...,",
        "size=..., slices_per_patient=..., lesion_probability=...)`; the same parameters and generator",
        "version give identical arrays.",
        "",
    ]
    return "\n".join(lines)


def _validate(dim: int, n: int, size: int, slices_per_patient: int, lesion_probability: float) -> None:
    if dim not in (2, 3):
        raise ValueError(f"dim must be 2 or 3, got {dim}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    if dim == 2 and not 1 <= slices_per_patient <= size * 3 // 4:
        raise ValueError(f"slices_per_patient must be within 1..{size * 3 // 4}, got {slices_per_patient}")
    _check_probability(lesion_probability)


def write_phantom_dataset(
    out_dir: str | Path,
    *,
    dim: int,
    n: int,
    seed: int,
    size: int,
    slices_per_patient: int = 8,
    lesion_probability: float = 0.6,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> Path:
    """Write the phantom dataset to ``out_dir``, atomically.

    Layouts:
        * ``dim=3`` (Medical Segmentation Decathlon style): ``dataset.json``,
          ``imagesTr/phantom_NNN.nii.gz`` (float32, shape ``(size, size, size * 3 // 4)``) and
          ``labelsTr/phantom_NNN.nii.gz`` (uint8 labels), 1 mm isotropic, RAS affine with the origin
          at the volume centre (:func:`volume_affine`). Case id = patient id = ``phantom_NNN``.
        * ``dim=2`` (per-patient folders, like the LGG dataset):
          ``phantom_NNN/phantom_NNN_<slice>.png`` (uint8 grey, intensity × :data:`PNG_SCALE` clipped
          to 0..255, the same factor for every patient) and ``phantom_NNN/phantom_NNN_<slice>_mask.png``
          (uint8 labels 0..4, not scaled), shape ``(size, size)``; ``<slice>`` is the 1-based index
          of the slice in the patient's notional ``size * 3 // 4``-slice volume.

    Both also get ``PHANTOM.md``, a provenance note. Patient ``i`` is drawn from
    ``SeedSequence(seed).spawn(n)[i]``, so it does not depend on ``n``; the same arguments give
    byte-identical files. The dataset is built in a temporary sibling folder and moved into place
    only when complete; with ``overwrite`` an existing ``out_dir`` is replaced only then.

    Args:
        out_dir: Destination folder.
        dim: 2 (PNG slices) or 3 (NIfTI volumes).
        n: Number of patients, at least 1.
        seed: Generator seed.
        size: In-plane size in voxels, at least 16.
        slices_per_patient: 2D only: slices written per patient (``1..size * 3 // 4``).
        lesion_probability: Probability in ``[0, 1]`` that a patient has a lesion.
        overwrite: Replace an existing non-empty ``out_dir``.
        progress: Called as ``progress(done, n)`` after each patient.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        OutputExistsError: If ``out_dir`` exists, is not an empty folder and ``overwrite`` is False.
        ValueError: On invalid parameters.
    """
    _validate(dim, n, size, slices_per_patient, lesion_probability)
    out = Path(out_dir)
    if not overwrite and is_nonempty(out):
        raise OutputExistsError(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(n - 1)))
    depth = size * 3 // 4
    children = np.random.SeedSequence(seed).spawn(n)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        training: list[dict[str, str]] = []
        for i, child in enumerate(children):
            rng = np.random.default_rng(child)
            case = f"phantom_{i:0{width}d}"
            if dim == 3:
                shape = (size, size, depth)
                img, lab = generate_phantom_volume(shape, rng, lesion_probability=lesion_probability)
                aff = volume_affine(shape)
                write_image(tmp / "imagesTr" / f"{case}.nii.gz", img, aff)
                write_image(tmp / "labelsTr" / f"{case}.nii.gz", lab, aff)
                training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
            else:
                slices = phantom_slices_2d(
                    (size, size),
                    rng,
                    slices_per_patient=slices_per_patient,
                    lesion_probability=lesion_probability,
                    depth=depth,
                )
                for sl in slices:
                    png = np.clip(np.floor(sl.image * PNG_SCALE + 0.5), 0, 255).astype(np.uint8)
                    write_image(tmp / case / f"{case}_{sl.slice_index + 1}.png", png, PNG_AFFINE)
                    write_image(tmp / case / f"{case}_{sl.slice_index + 1}_mask.png", sl.mask, PNG_AFFINE)
            if progress is not None:
                progress(i + 1, n)
        params: dict[str, Any] = {
            "generator": "medsynth.data.phantom",
            "version": PHANTOM_VERSION,
            "dim": dim,
            "n": n,
            "seed": seed,
            "size": size,
            "lesion_probability": lesion_probability,
        }
        if dim == 3:
            params["volume_shape"] = f"{size} x {size} x {depth} (1 mm isotropic)"
            layout = (
                "Medical Segmentation Decathlon style: `dataset.json`, `imagesTr/phantom_NNN.nii.gz` "
                "(float32) and `labelsTr/phantom_NNN.nii.gz` (uint8)."
            )
            write_json_atomic(
                tmp / "dataset.json",
                {
                    "name": "medsynth-phantom",
                    "description": "Synthetic procedurally generated brain-like FLAIR MRI (not real anatomy)",
                    "reference": "medsynth.data.phantom",
                    "licence": "CC0-1.0",
                    "release": PHANTOM_VERSION,
                    "tensorImageSize": "3D",
                    "modality": {"0": "FLAIR"},
                    "labels": {str(k): v for k, v in LABELS.items()},
                    "numTraining": n,
                    "numTest": 0,
                    "training": training,
                    "test": [],
                },
            )
        else:
            params["slices_per_patient"] = slices_per_patient
            params["slice_shape"] = f"{size} x {size} (from a notional {size} x {size} x {depth} volume)"
            params["png_scale"] = PNG_SCALE
            layout = (
                "Per-patient folders: `phantom_NNN/phantom_NNN_<slice>.png` (uint8 grey, intensity x "
                f"{PNG_SCALE:g} clipped to 0..255) and `phantom_NNN/phantom_NNN_<slice>_mask.png` "
                "(uint8 labels 0..4)."
            )
        write_text_atomic(tmp / "PHANTOM.md", _phantom_md(params, layout))
        move_dir_into_place(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out

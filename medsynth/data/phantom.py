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

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from medsynth.data.io import write_image
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

Arr = npt.NDArray[Any]
ProgressFn = Callable[[int, int], None]

# Tissue classes used while rendering; more than the labels (bone, scalp, deep grey, lesion core).
_BG, _CSF, _GM, _WM, _LES, _BONE, _SCALP, _DGM, _LCORE = range(9)
_CLASS_TO_LABEL = np.array([0, 1, 2, 3, 4, 0, 0, 2, 4], dtype=np.uint8)
_BASE_INTENSITY = np.array([0.0, 0.10, 0.62, 0.50, 0.95, 0.06, 0.75, 0.57, 0.72], dtype=np.float32)

# Head geometry in head-normalised radius units (the scalp surface is at radius ~1).
_T_SCALP = 0.055  # scalp thickness
_T_BONE = 0.045  # bone (dark) thickness
_GAP0 = 0.025  # mean thickness of the subarachnoid CSF rim
_B0 = 1.0 - _T_SCALP - _T_BONE - _GAP0  # mean brain radius: brain-normalised coords = head coords / _B0
_T_CORTEX = 0.06  # cortical ribbon thickness at a gyral crown
_SULC_DEPTH = 0.17  # mean sulcal depth
_SULC_EPS = 0.1  # sulcus half-width in units of the (unit-variance) folding function
_GYRUS_CORE = 1.0  # folding-function value at which white matter reaches closest to the surface

# Direction look-up tables (functions on the unit sphere sampled on a theta/phi grid).
_N_THETA = 96
_N_PHI = 192


@dataclass(frozen=True)
class _SphereField:
    """Band-limited random function on the unit sphere: a normalised sum of random plane waves."""

    dirs: Arr  # (K, 3) unit wave directions
    freqs: Arr  # (K,) angular frequencies (cycles per radian * 2pi)
    phases: Arr  # (K,)

    @classmethod
    def draw(cls, rng: np.random.Generator, k: int, fmin: float, fmax: float) -> _SphereField:
        dirs = rng.standard_normal((k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        return cls(dirs=dirs, freqs=rng.uniform(fmin, fmax, k), phases=rng.uniform(0.0, 2 * np.pi, k))

    def __call__(self, d: Arr) -> Arr:
        """Evaluate at unit directions ``d`` of shape ``(N, 3)``; returns ``(N,)`` with unit variance."""
        proj = d @ self.dirs.T  # (N, K)
        vals: Arr = np.cos(proj * self.freqs + self.phases).sum(axis=1) * math.sqrt(2.0 / len(self.freqs))
        return vals


def _sphere_tables(fields: list[_SphereField]) -> Arr:
    """Sample sphere fields on a (theta, phi) grid; returns ``(F, N_THETA * (N_PHI + 1))`` float32.

    The phi axis carries one extra, wrapped column so that bilinear look-ups never index past it.
    """
    theta = np.linspace(0.0, np.pi, _N_THETA)
    phi = np.linspace(-np.pi, np.pi, _N_PHI + 1)
    st, ct = np.sin(theta)[:, None], np.cos(theta)[:, None]
    d = np.stack(
        [st * np.cos(phi)[None, :], st * np.sin(phi)[None, :], np.broadcast_to(ct, (_N_THETA, _N_PHI + 1))],
        axis=-1,
    ).reshape(-1, 3)
    return np.stack([f(d) for f in fields], axis=0).astype(np.float32)


def _lookup(tables: Arr, ux: Arr, uy: Arr, uz: Arr) -> Arr:
    """Bilinear look-up of sphere tables ``(F, T)`` at unit directions; returns ``(F, N)`` float32."""
    ti = np.arccos(np.clip(uz, -1.0, 1.0)) * np.float32((_N_THETA - 1) / np.pi)
    pj = (np.arctan2(uy, ux) + np.float32(np.pi)) * np.float32(_N_PHI / (2 * np.pi))
    i0 = np.minimum(ti.astype(np.int32), _N_THETA - 2)
    j0 = np.minimum(pj.astype(np.int32), _N_PHI - 1)
    a = ti - i0.astype(np.float32)
    b = pj - j0.astype(np.float32)
    width = _N_PHI + 1
    idx = i0 * width + j0
    w00, w01, w10, w11 = (1 - a) * (1 - b), (1 - a) * b, a * (1 - b), a * b
    out = np.empty((tables.shape[0], ux.shape[0]), dtype=np.float32)
    for f, tab in enumerate(tables):
        out[f] = (
            np.take(tab, idx) * w00
            + np.take(tab, idx + 1) * w01
            + np.take(tab, idx + width) * w10
            + np.take(tab, idx + width + 1) * w11
        )
    return out


def _small_rotation(rng: np.random.Generator, max_deg: tuple[float, float, float]) -> Arr:
    """Rotation matrix from three uniform Euler angles within ``±max_deg`` (about x, y, z)."""
    ax, ay, az = (math.radians(rng.uniform(-m, m)) for m in max_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    out: Arr = rz @ ry @ rx
    return out


def _random_rotation(rng: np.random.Generator) -> Arr:
    """Uniformly random 3D rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _waves(rng: np.random.Generator, k: int, lam_min: float, lam_max: float) -> tuple[Arr, Arr]:
    """Random plane-wave vectors (rad/mm) with wavelengths in ``[lam_min, lam_max]`` mm, and phases."""
    dirs = rng.standard_normal((k, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    vec = dirs * (2 * np.pi / rng.uniform(lam_min, lam_max, k))[:, None]
    return vec.astype(np.float32), rng.uniform(0, 2 * np.pi, k).astype(np.float32)


@dataclass(frozen=True)
class _Patient:
    """Everything random about one phantom patient (drawn once, then rendered on any grid)."""

    centre: Arr  # (3,) head centre, mm
    semi: Arr  # (3,) head semi-axes, mm
    rot: Arr  # (3, 3) head frame -> world
    warp_k: Arr  # (K, 3) elastic warp wave vectors, rad/mm
    warp_phase: Arr  # (K,)
    warp_amp: Arr  # (K, 3) displacement amplitudes, mm
    tables: Arr  # sphere look-up tables: head shape, CSF gap, folding, sulcal depth, thickness
    fissure_w: float
    vent_scale: float
    vent_asym: float
    lesion: bool
    lesion_centre: Arr  # (3,) brain-normalised
    lesion_radii: Arr  # (3,) brain-normalised
    lesion_rot: Arr  # (3, 3)
    lesion_shape: _SphereField
    lesion_core: float  # relative radius of a darker necrotic core (0: none)
    intensity: Arr  # (9,) per tissue class
    tex_amp: float
    bias_k: Arr
    bias_phase: Arr
    bias_amp: Arr
    noise_sigma: float


def _draw_patient(rng: np.random.Generator, fov: Arr, lesion_probability: float) -> _Patient:
    """Draw one patient's parameters for a reference field of view ``fov`` (mm, x/y/z extents)."""
    fov = np.asarray(fov, dtype=np.float64)
    scale = rng.uniform(0.86, 1.0)
    semi = fov / 2 * np.array([0.74, 0.92, 0.88]) * scale * rng.uniform(0.95, 1.05, 3)
    centre = fov * rng.uniform(-0.02, 0.02, 3)
    rot = _small_rotation(rng, (5.0, 4.0, 8.0))
    n_warp = 6
    warp_k, warp_phase = _waves(rng, n_warp, 0.5 * fov.max(), 1.2 * fov.max())
    warp_amp = (rng.standard_normal((n_warp, 3)) * 0.008 * fov).astype(np.float32)
    fields = [
        _SphereField.draw(rng, 10, 1.0, 3.0),  # head shape
        _SphereField.draw(rng, 12, 2.0, 5.0),  # CSF rim thickness
        _SphereField.draw(rng, 48, 14.0, 20.0),  # cortical folding
        _SphereField.draw(rng, 12, 2.0, 5.0),  # sulcal depth
        _SphereField.draw(rng, 12, 2.0, 5.0),  # cortical thickness
    ]
    tables = _sphere_tables(fields)
    fissure_w = float(rng.uniform(0.012, 0.022))
    vent_scale = float(rng.uniform(0.8, 1.45))
    vent_asym = float(rng.uniform(-0.12, 0.12))
    # Lesion: always drawn so that a patient's anatomy and noise do not depend on whether it is shown.
    lesion = bool(rng.random() < lesion_probability)
    frac = math.exp(rng.uniform(math.log(0.015), math.log(0.10)))  # log-uniform share of the brain
    aniso = np.exp(rng.uniform(-0.25, 0.25, 3))
    radii = frac ** (1 / 3) * aniso / np.prod(aniso) ** (1 / 3)
    lesion_centre = np.array([0.3, 0.0, 0.2])
    for _ in range(200):  # rejection sampling: inside the brain, in the slab that 2D slices cover
        c = rng.uniform(-0.8, 0.8, 3)
        if -0.1 <= c[2] <= 0.45 and np.linalg.norm(c) <= 0.82 - 0.6 * radii.max():
            lesion_centre = c
            break
    lesion_rot = _random_rotation(rng)
    lesion_shape = _SphereField.draw(rng, 8, 1.5, 3.5)
    lesion_core = float(rng.uniform(0.3, 0.55)) if rng.random() < 0.4 else 0.0
    intensity = _BASE_INTENSITY * rng.uniform(0.95, 1.05, len(_BASE_INTENSITY)) * rng.uniform(0.92, 1.05)
    intensity[_BG] = 0.0
    bias_k, bias_phase = _waves(rng, 3, 1.0 * fov.max(), 3.0 * fov.max())
    bias_amp = (rng.uniform(0.04, 0.1, 3)).astype(np.float32)
    return _Patient(
        centre=centre.astype(np.float32),
        semi=semi.astype(np.float32),
        rot=rot.astype(np.float32),
        warp_k=warp_k,
        warp_phase=warp_phase,
        warp_amp=warp_amp,
        tables=tables,
        fissure_w=fissure_w,
        vent_scale=vent_scale,
        vent_asym=vent_asym,
        lesion=lesion,
        lesion_centre=lesion_centre.astype(np.float32),
        lesion_radii=radii.astype(np.float32),
        lesion_rot=lesion_rot.astype(np.float32),
        lesion_shape=lesion_shape,
        lesion_core=lesion_core,
        intensity=intensity.astype(np.float32),
        tex_amp=float(rng.uniform(0.03, 0.06)),
        bias_k=bias_k,
        bias_phase=bias_phase,
        bias_amp=bias_amp,
        noise_sigma=float(rng.uniform(0.012, 0.035)),
    )


def _ventricles(pat: _Patient, bx: Arr, by: Arr, bz: Arr) -> Arr:
    """Lateral (two, butterfly-like in axial view) and third ventricles; brain-normalised coords."""
    vs = pat.vent_scale
    inside = np.zeros(bx.shape, dtype=bool)
    y_front, y_back = 0.40, -0.56
    for side in (-1.0, 1.0):
        s_scale = 1.0 + side * pat.vent_asym
        t = (by - y_back) / (y_front - y_back)  # 0 at the occipital tip, 1 at the frontal tip
        sel = np.flatnonzero((t > 0) & (t < 1) & (bx * side > 0) & (np.abs(bz) < 0.6))
        ts = t[sel]
        taper = np.sin(np.pi * ts) ** 0.4
        atrium = np.exp(-(((ts - 0.24) / 0.16) ** 2))
        w = (0.065 + 0.05 * atrium) * vs * s_scale * taper  # lateral half-width
        h = (0.12 + 0.04 * atrium) * math.sqrt(vs) * s_scale * taper  # vertical half-height
        xc = (0.085 + 0.22 * atrium) * math.sqrt(vs)
        xc = np.maximum(xc, w + 0.018)  # keep a septum between the two ventricles
        zc = 0.07 + 0.17 * np.sin(np.pi * ts) ** 0.7
        r2 = ((bx[sel] * side - xc) / w) ** 2 + ((bz[sel] - zc) / h) ** 2
        inside[sel[r2 < 1]] = True
    third = (bx / (0.022 * vs)) ** 2 + ((by + 0.02) / 0.15) ** 2 + ((bz + 0.1) / 0.13) ** 2 < 1
    out: Arr = inside | third
    return out


def _deep_grey(bx: Arr, by: Arr, bz: Arr) -> Arr:
    """Deep grey nuclei (caudate heads, thalami, lentiform nuclei); brain-normalised coords."""
    ax = np.abs(bx)
    caudate = ((ax - 0.17) / 0.065) ** 2 + ((by - 0.24) / 0.12) ** 2 + ((bz - 0.12) / 0.11) ** 2 < 1
    thalamus = ((ax - 0.11) / 0.09) ** 2 + ((by + 0.1) / 0.15) ** 2 + ((bz + 0.02) / 0.11) ** 2 < 1
    lentiform = ((ax - 0.29) / 0.06) ** 2 + ((by - 0.03) / 0.17) ** 2 + ((bz + 0.02) / 0.12) ** 2 < 1
    out: Arr = caudate | thalamus | lentiform
    return out


def _render(pat: _Patient, xw: Arr, yw: Arr, zw: Arr) -> tuple[Arr, Arr]:
    """Evaluate the patient at world points (mm, RAS, volume centre at 0), flat float32 arrays.

    Returns:
        Noise-free, unblurred intensity ``(N,)`` float32 (≈ 0..1) and labels ``(N,)`` uint8 (0..4).
    """
    n = xw.shape[0]
    # Elastic deformation: anatomy is evaluated at displaced points (image and labels alike).
    xa, ya, za = xw.copy(), yw.copy(), zw.copy()
    for k in range(pat.warp_k.shape[0]):
        kx, ky, kz = pat.warp_k[k]
        s = np.sin(xw * kx + yw * ky + zw * kz + pat.warp_phase[k])
        xa += pat.warp_amp[k, 0] * s
        ya += pat.warp_amp[k, 1] * s
        za += pat.warp_amp[k, 2] * s
    dx, dy, dz = xa - pat.centre[0], ya - pat.centre[1], za - pat.centre[2]
    r = pat.rot
    qx = (r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz) / pat.semi[0]
    qy = (r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz) / pat.semi[1]
    qz = (r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz) / pat.semi[2]
    rho = np.sqrt(qx * qx + qy * qy + qz * qz)
    head = np.flatnonzero(rho < 1.1)
    qx, qy, qz, rho = qx[head], qy[head], qz[head], rho[head]
    inv = 1.0 / np.maximum(rho, np.float32(1e-6))
    mods = _lookup(pat.tables, qx * inv, qy * inv, qz * inv)
    head_mod, gap_mod, fold, depth_mod, thick_mod = mods

    cls = np.zeros(head.shape[0], dtype=np.uint8)
    rho_head = 1.0 + 0.025 * head_mod
    rho_in = rho_head - (_T_SCALP + _T_BONE)
    cls[rho < rho_head] = _SCALP
    cls[rho < rho_head - _T_SCALP] = _BONE
    cls[rho < rho_in] = _CSF
    depth = rho_in - _GAP0 * np.exp(0.35 * gap_mod) - rho  # > 0 inside the brain
    brain = np.flatnonzero(depth > 0)

    # Cortex, on brain voxels only.
    qxb, fold_b = qx[brain], fold[brain]
    bx, by, bz = qxb / _B0, qy[brain] / _B0, qz[brain] / _B0
    z_cc = np.where(np.abs(by) < 0.5, 0.32 * np.sqrt(np.clip(1 - (by / 0.5) ** 2, 0, 1)), -2.0)
    medial = np.where(bz > z_cc, np.abs(qxb) - pat.fissure_w, np.inf)  # depth below the medial surface
    cdepth = np.minimum(depth[brain], medial)
    sulc_depth = _SULC_DEPTH * (0.75 + 0.3 * np.tanh(depth_mod[brain]))
    afold = np.abs(fold_b)
    eps = _SULC_EPS * (1.0 + np.clip(1.0 - cdepth / sulc_depth, 0, 1))  # sulci open towards the surface
    sulcus = (afold < eps) & (cdepth < sulc_depth)
    crown = np.clip((afold - eps) / (_GYRUS_CORE - eps), 0, 1)
    wm_depth = _T_CORTEX * (1 + 0.2 * np.tanh(thick_mod[brain])) + sulc_depth * (1 - crown) ** 1.3
    cb = np.full(brain.shape[0], _WM, dtype=np.uint8)
    cb[cdepth < wm_depth] = _GM
    cb[(medial <= 0) | sulcus] = _CSF
    cb[_deep_grey(bx, by, bz)] = _DGM
    cb[_ventricles(pat, bx, by, bz)] = _CSF

    if pat.lesion:
        rel = np.stack([bx, by, bz], axis=1) - pat.lesion_centre
        loc = (rel @ pat.lesion_rot) / pat.lesion_radii
        rl = np.linalg.norm(loc, axis=1)
        near = np.flatnonzero(rl < 1.6)
        if near.size:
            rn = rl[near]
            shape = 1.0 + 0.28 * np.clip(pat.lesion_shape(loc[near] / np.maximum(rn, 1e-6)[:, None]), -2, 2)
            cb[near[rn < shape]] = _LES
            if pat.lesion_core > 0:
                cb[near[rn < pat.lesion_core * shape]] = _LCORE
    cls[brain] = cb

    image = np.zeros(n, dtype=np.float32)
    image[head] = pat.intensity[cls]
    labels = np.zeros(n, dtype=np.uint8)
    labels[head] = _CLASS_TO_LABEL[cls]
    return image, labels


def _finish(
    pat: _Patient, image: Arr, world: tuple[Arr, Arr, Arr], rng: np.random.Generator, sigma: tuple[float, ...]
) -> Arr:
    """Tissue texture, partial-volume blur, bias field and Rician noise on a gridded image.

    Args:
        pat: The patient (texture strength, bias field, noise level).
        image: Noise-free intensities on the grid, any shape.
        world: Flat world coordinates (mm) of the grid points, in ``image``'s C order.
        rng: Random generator for texture and noise.
        sigma: Partial-volume blur per axis, voxels (0 for axes that are not contiguous).
    """
    tex = ndimage.gaussian_filter(rng.standard_normal(image.shape, dtype=np.float32), sigma=[2 * s for s in sigma])
    tex *= np.float32(pat.tex_amp) / max(float(tex.std()), 1e-6)
    img = ndimage.gaussian_filter(image * (1 + tex), sigma=sigma, mode="constant")
    xw, yw, zw = world
    log_bias = np.zeros(xw.shape, dtype=np.float32)
    for k in range(pat.bias_k.shape[0]):
        ph = xw * pat.bias_k[k, 0] + yw * pat.bias_k[k, 1] + zw * pat.bias_k[k, 2] + pat.bias_phase[k]
        log_bias += pat.bias_amp[k] * np.cos(ph)
    img *= np.exp(log_bias).reshape(img.shape)
    sd = np.float32(pat.noise_sigma)
    real = img + sd * rng.standard_normal(img.shape, dtype=np.float32)
    imag = sd * rng.standard_normal(img.shape, dtype=np.float32)
    out: Arr = np.sqrt(real * real + imag * imag).astype(np.float32)
    return out


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
    pat = _draw_patient(rng, np.asarray(shp, dtype=np.float64), lesion_probability)
    axes = [np.arange(s, dtype=np.float32) - np.float32((s - 1) / 2) for s in shp]
    xw, yw, zw = (a.ravel() for a in np.meshgrid(*axes, indexing="ij"))
    image, labels = _render(pat, xw, yw, zw)
    img = _finish(pat, image.reshape(shp), (xw, yw, zw), rng, sigma=(0.55, 0.55, 0.55))
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
    pat = _draw_patient(rng, fov, lesion_probability)
    # Central part of the brain: from the basal ganglia up to the centrum semiovale.
    zc = (nz - 1) / 2 + float(pat.centre[2])
    span = float(pat.semi[2]) * _B0
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
    image, labels = _render(pat, xw, yw, zw)
    img = _finish(pat, image.reshape(gshape), (xw, yw, zw), rng, sigma=(0.55, 0.55, 0.0))
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

"""The procedural phantom's anatomy and image formation (the engine behind :mod:`medsynth.data.phantom`).

A patient (:class:`Patient`) is a set of random parameters drawn by :func:`draw_patient`: head
ellipsoid, skull/scalp shells, a folded cortex (sulci are zero lines of a band-limited random function
on the sphere), ventricles, deep grey nuclei, an optional lesion and an elastic warp. :func:`render`
evaluates the analytic anatomy at (warped) world points, giving noise-free intensities and labels at
those same points; :func:`finish` adds texture, partial-volume blur, a bias field and Rician noise on
the gridded image. The public generators (volumes, 2D slices, dataset writer) live in
:mod:`medsynth.data.phantom`; nothing here is part of the public API.

Coordinates: world millimetres, flat arrays in the grid's C order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

Arr = npt.NDArray[Any]


# Tissue classes used while rendering; more than the labels (bone, scalp, deep grey, lesion core).
_BG, _CSF, _GM, _WM, _LES, _BONE, _SCALP, _DGM, _LCORE = range(9)
_CLASS_TO_LABEL = np.array([0, 1, 2, 3, 4, 0, 0, 2, 4], dtype=np.uint8)
_BASE_INTENSITY = np.array([0.0, 0.10, 0.62, 0.50, 0.95, 0.06, 0.75, 0.57, 0.72], dtype=np.float32)

# Head geometry in head-normalised radius units (the scalp surface is at radius ~1).
_T_SCALP = 0.055  # scalp thickness
_T_BONE = 0.045  # bone (dark) thickness
_GAP0 = 0.025  # mean thickness of the subarachnoid CSF rim
B0 = 1.0 - _T_SCALP - _T_BONE - _GAP0  # mean brain radius: brain-normalised coords = head coords / B0
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
class Patient:
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


def draw_patient(rng: np.random.Generator, fov: Arr, lesion_probability: float) -> Patient:
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
    return Patient(
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


def _ventricles(pat: Patient, bx: Arr, by: Arr, bz: Arr) -> Arr:
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


def render(pat: Patient, xw: Arr, yw: Arr, zw: Arr) -> tuple[Arr, Arr]:
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
    bx, by, bz = qxb / B0, qy[brain] / B0, qz[brain] / B0
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


def finish(
    pat: Patient, image: Arr, world: tuple[Arr, Arr, Arr], rng: np.random.Generator, sigma: tuple[float, ...]
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

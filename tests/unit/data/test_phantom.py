"""Tests of the built-in procedural phantom dataset (medsynth.data.phantom)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from medsynth.data import phantom
from medsynth.data.io import read_image, spacing_from_affine
from medsynth.data.phantom import (
    LABELS,
    PNG_SCALE,
    generate_phantom_volume,
    phantom_slices_2d,
    write_phantom_dataset,
)
from medsynth.errors import OutputExistsError

SHAPE = (40, 40, 32)
SIZE = 32  # dataset tests: 3D volumes are 32 x 32 x 24, 2D slices 32 x 32
DEPTH = SIZE * 3 // 4


def _volume(seed: int, p: float = 1.0, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    return generate_phantom_volume(shape, np.random.default_rng(seed), lesion_probability=p)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.dtype).encode() + str(a.shape).encode() + np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _patient_rng(seed: int, n: int, i: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(n)[i])


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(root: Path) -> list[str]:
    return sorted(p.name for p in root.parent.iterdir() if p.name != root.name)


@pytest.fixture(scope="module")
def ds3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("p3") / "phantom3d"
    return write_phantom_dataset(out, dim=3, n=2, seed=11, size=SIZE, lesion_probability=1.0)


@pytest.fixture(scope="module")
def ds2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("p2") / "phantom2d"
    return write_phantom_dataset(out, dim=2, n=2, seed=5, size=SIZE, slices_per_patient=4, lesion_probability=1.0)


# ---------------------------------------------------------------- volumes


def test_volume_types_shapes_and_ranges() -> None:
    img, lab = _volume(0)
    assert img.shape == SHAPE and lab.shape == SHAPE
    assert img.dtype == np.float32 and lab.dtype == np.uint8
    assert np.isfinite(img).all() and img.min() >= 0.0
    assert 0.6 < float(np.percentile(img, 99.5)) < 1.6  # ≈ 0..1 tissue range plus noise and bias
    assert set(np.unique(lab).tolist()) == {0, 1, 2, 3, 4}
    # background label outside the head, and corners of the box are background with ~noise only
    assert lab[0, 0, 0] == 0 and img[:3, :3, :3].mean() < 0.1


def test_same_seed_identical_different_seed_different() -> None:
    a_img, a_lab = _volume(3)
    b_img, b_lab = _volume(3)
    assert _digest(a_img, a_lab) == _digest(b_img, b_lab)
    c_img, c_lab = _volume(4)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)


def test_patients_from_one_generator_differ_in_anatomy() -> None:
    rng = np.random.default_rng(0)
    volumes = [generate_phantom_volume(SHAPE, rng, lesion_probability=0.0)[1] for _ in range(3)]
    brain_sizes = {int((lab > 0).sum()) for lab in volumes}
    assert len(brain_sizes) == 3  # own head size/shape per patient


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lesion_present_iff_drawn(seed: int) -> None:
    _, with_lesion = _volume(seed, p=1.0)
    _, without = _volume(seed, p=0.0)
    brain = (with_lesion > 0).sum()
    share = (with_lesion == 4).sum() / brain
    assert 0.005 < share < 0.2  # ~1.5-10 % of the brain
    assert not (without == 4).any()
    assert {1, 2, 3} <= set(np.unique(without).tolist())  # all tissues without a lesion too
    # the lesion overrides tissue labels but the rest of the patient's anatomy is unchanged
    outside = with_lesion != 4
    assert np.array_equal(with_lesion[outside], without[outside])


def test_lesion_probability_is_a_probability() -> None:
    rng = np.random.default_rng(7)
    has = [bool((generate_phantom_volume((24, 24, 16), rng, lesion_probability=0.5)[1] == 4).any()) for _ in range(12)]
    assert 0 < sum(has) < 12
    with pytest.raises(ValueError, match="lesion_probability"):
        _volume(0, p=1.5)
    with pytest.raises(ValueError, match="shape"):
        generate_phantom_volume((32, 32), np.random.default_rng(0), lesion_probability=0.5)  # type: ignore[arg-type]


def test_flair_like_contrast() -> None:
    img, lab = _volume(2)
    mean = {k: float(img[lab == k].mean()) for k in range(1, 5)}
    assert mean[1] < mean[2] - 0.1  # CSF dark vs grey matter
    assert mean[4] > mean[3] + 0.15  # lesion bright vs white matter
    # away from partial-volume edges, white matter is slightly darker than grey matter
    gm_core = img[ndimage.binary_erosion(lab == 2)].mean()
    wm_core = img[ndimage.binary_erosion(lab == 3)].mean()
    assert 0.0 < gm_core - wm_core < 0.3
    # bright scalp rim: the background-labelled voxels just outside the brain's CSF include bright ones
    head = ndimage.binary_fill_holes(img > 0.3)
    rim = head & (lab == 0)
    assert rim.any() and np.percentile(img[rim], 90) > mean[3]


# ---------------------------------------------------------------- 2D slices


def test_slices_2d_are_one_patient_over_the_central_brain() -> None:
    slices = phantom_slices_2d((48, 48), np.random.default_rng(1), slices_per_patient=6, lesion_probability=1.0)
    assert len(slices) == 6
    idx = [s.slice_index for s in slices]
    assert idx == sorted(set(idx)) and all(0 <= k < 36 for k in idx)
    for s in slices:
        assert s.image.shape == (48, 48) and s.mask.shape == (48, 48)
        assert s.image.dtype == np.float32 and s.mask.dtype == np.uint8
        assert (s.mask > 0).sum() > 0.2 * s.mask.size  # every slice cuts through the brain
    masks = np.stack([s.mask for s in slices])
    assert {1, 2, 3, 4} <= set(np.unique(masks).tolist())
    # neighbouring slices of one patient overlap far more than a slice of another patient
    other = phantom_slices_2d((48, 48), np.random.default_rng(2), slices_per_patient=6, lesion_probability=1.0)

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return float(((a == 3) & (b == 3)).sum() / ((a == 3) | (b == 3)).sum())

    assert iou(masks[2], masks[3]) > iou(masks[2], other[2].mask)

    again = phantom_slices_2d((48, 48), np.random.default_rng(1), slices_per_patient=6, lesion_probability=1.0)
    assert all(
        np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) for a, b in zip(slices, again, strict=True)
    )


def test_slices_2d_lesion_in_every_drawn_patient() -> None:
    for seed in range(4):
        on = phantom_slices_2d((32, 32), np.random.default_rng(seed), slices_per_patient=4, lesion_probability=1.0)
        off = phantom_slices_2d((32, 32), np.random.default_rng(seed), slices_per_patient=4, lesion_probability=0.0)
        assert any((s.mask == 4).any() for s in on)
        assert not any((s.mask == 4).any() for s in off)
    with pytest.raises(ValueError, match="slices_per_patient"):
        phantom_slices_2d((32, 32), np.random.default_rng(0), slices_per_patient=25, lesion_probability=0.5)


# ---------------------------------------------------------------- datasets


def test_3d_layout_and_read_back(ds3: Path) -> None:
    assert sorted(_files(ds3)) == [
        "PHANTOM.md",
        "dataset.json",
        "imagesTr/phantom_000.nii.gz",
        "imagesTr/phantom_001.nii.gz",
        "labelsTr/phantom_000.nii.gz",
        "labelsTr/phantom_001.nii.gz",
    ]
    meta = json.loads((ds3 / "dataset.json").read_text(encoding="utf-8"))
    assert meta["labels"] == {str(k): v for k, v in LABELS.items()}
    assert meta["labels"]["4"] == "lesion" and meta["modality"] == {"0": "FLAIR"}
    assert meta["numTraining"] == 2 and len(meta["training"]) == 2
    assert meta["training"][1] == {"image": "./imagesTr/phantom_001.nii.gz", "label": "./labelsTr/phantom_001.nii.gz"}
    for i in range(2):
        img = read_image(ds3 / "imagesTr" / f"phantom_00{i}.nii.gz")
        lab = read_image(ds3 / "labelsTr" / f"phantom_00{i}.nii.gz", kind="mask")
        assert img.array.shape == lab.array.shape == (SIZE, SIZE, DEPTH)
        assert spacing_from_affine(img.affine) == (1.0, 1.0, 1.0)
        assert np.allclose(img.affine, lab.affine)
        assert np.allclose(img.affine[:3, :3], np.eye(3))  # RAS
        centre = img.affine @ np.array([(SIZE - 1) / 2, (SIZE - 1) / 2, (DEPTH - 1) / 2, 1.0])
        assert np.allclose(centre[:3], 0.0)  # origin centred
        exp_img, exp_lab = generate_phantom_volume((SIZE, SIZE, DEPTH), _patient_rng(11, 2, i), lesion_probability=1.0)
        assert np.array_equal(lab.array, exp_lab)
        assert set(np.unique(lab.array).tolist()) == {0, 1, 2, 3, 4}
        assert np.array_equal(img.array, exp_img)
    md = (ds3 / "PHANTOM.md").read_text(encoding="utf-8")
    assert "synthetic" in md.lower() and "not real anatomy" in md
    for needle in ("dim: 3", "n: 2", "seed: 11", f"size: {SIZE}", f"version: {phantom.PHANTOM_VERSION}"):
        assert needle in md


def test_2d_layout_and_read_back(ds2: Path) -> None:
    files = sorted(_files(ds2))
    assert "PHANTOM.md" in files
    for i in range(2):
        case = f"phantom_00{i}"
        slices = phantom_slices_2d(
            (SIZE, SIZE), _patient_rng(5, 2, i), slices_per_patient=4, lesion_probability=1.0, depth=DEPTH
        )
        expected = sorted(f"{case}/{case}_{s.slice_index + 1}{suffix}.png" for s in slices for suffix in ("", "_mask"))
        assert [f for f in files if f.startswith(case + "/")] == expected
        for s in slices:
            img = read_image(ds2 / case / f"{case}_{s.slice_index + 1}.png")
            mask = read_image(ds2 / case / f"{case}_{s.slice_index + 1}_mask.png", kind="mask")
            assert img.array.shape == mask.array.shape == (SIZE, SIZE)
            assert np.array_equal(mask.array, s.mask)  # labels 0..4, not scaled
            assert mask.array.max() <= 4
            png = np.clip(np.floor(s.image * PNG_SCALE + 0.5), 0, 255)
            assert np.array_equal(img.array, png.astype(np.float32))  # fixed scale factor
    md = (ds2 / "PHANTOM.md").read_text(encoding="utf-8")
    assert "dim: 2" in md and "slices_per_patient: 4" in md
    assert len(files) == 1 + 2 * 2 * 4


def test_write_is_deterministic_byte_for_byte(tmp_path: Path) -> None:
    kw = {"dim": 3, "n": 2, "size": 24, "lesion_probability": 0.6}
    a = _files(write_phantom_dataset(tmp_path / "a", seed=3, **kw))  # type: ignore[arg-type]
    b = _files(write_phantom_dataset(tmp_path / "b", seed=3, **kw))  # type: ignore[arg-type]
    c = _files(write_phantom_dataset(tmp_path / "c", seed=4, **kw))  # type: ignore[arg-type]
    assert a == b
    assert a.keys() == c.keys()
    assert a["imagesTr/phantom_000.nii.gz"] != c["imagesTr/phantom_000.nii.gz"]
    assert a["PHANTOM.md"] != c["PHANTOM.md"]  # the seed is recorded
    d = _files(write_phantom_dataset(tmp_path / "d", dim=2, n=1, seed=3, size=24, slices_per_patient=2))
    e = _files(write_phantom_dataset(tmp_path / "e", dim=2, n=1, seed=3, size=24, slices_per_patient=2))
    assert d == e and len(d) == 5


def test_patient_does_not_depend_on_n(tmp_path: Path) -> None:
    small = write_phantom_dataset(tmp_path / "s", dim=3, n=1, seed=9, size=24)
    large = write_phantom_dataset(tmp_path / "l", dim=3, n=2, seed=9, size=24)
    name = "imagesTr/phantom_000.nii.gz"
    assert (small / name).read_bytes() == (large / name).read_bytes()


def test_existing_output_and_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def must_not_generate(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated data although the output exists")

    with monkeypatch.context() as m:
        m.setattr(phantom, "phantom_slices_2d", must_not_generate)
        with pytest.raises(OutputExistsError):  # refused up front, before any work
            write_phantom_dataset(out, dim=2, n=1, seed=0, size=24, slices_per_patient=2)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert _siblings(out) == []  # nothing half-written left behind

    calls: list[tuple[int, int]] = []
    write_phantom_dataset(
        out,
        dim=2,
        n=2,
        seed=0,
        size=24,
        slices_per_patient=2,
        overwrite=True,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls == [(1, 2), (2, 2)]
    assert not (out / "keep.txt").exists()
    assert (out / "PHANTOM.md").is_file() and (out / "phantom_001").is_dir()
    assert _siblings(out) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    write_phantom_dataset(empty, dim=3, n=1, seed=0, size=24)  # an empty folder is not "existing output"
    assert (empty / "dataset.json").is_file()


def test_failed_write_leaves_nothing_and_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[Path] = []

    def flaky_write(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
        written.append(Path(path))
        if len(written) == 3:
            raise OSError("disk full")
        return Path(path)

    monkeypatch.setattr(phantom, "write_image", flaky_write)
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        write_phantom_dataset(fresh, dim=3, n=2, seed=0, size=24)
    assert not fresh.exists() and list(tmp_path.iterdir()) == []

    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("old")
    written.clear()
    with pytest.raises(OSError, match="disk full"):
        write_phantom_dataset(old, dim=3, n=2, seed=0, size=24, overwrite=True)
    assert [p.name for p in old.iterdir()] == ["keep.txt"] and _siblings(old) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 4}, "dim"),
        ({"n": 0}, "n must"),
        ({"size": 8}, "size"),
        ({"lesion_probability": -0.1}, "lesion_probability"),
        ({"dim": 2, "slices_per_patient": 0}, "slices_per_patient"),
    ],
)
def test_invalid_parameters(tmp_path: Path, kwargs: dict[str, float], match: str) -> None:
    args: dict[str, float] = {"dim": 3, "n": 1, "seed": 0, "size": 24, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_phantom_dataset(tmp_path / "x", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()

"""Preprocessing into the on-disk cache (medsynth.data.preprocess), on tiny synthetic datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medsynth.config import load_config
from medsynth.data.io import spacing_from_affine, write_image
from medsynth.data.preprocess import load_manifest, plan, run_preprocess
from medsynth.errors import DataError
from medsynth.fileio import sha256_file


def _load(cache: Path, case_id: str) -> dict[str, np.ndarray]:
    with np.load(cache / "cases" / f"{case_id}.npz") as z:
        return {k: z[k] for k in z.files}


def _mtimes(cache: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(cache.glob("cases/*.npz"))}


@pytest.fixture
def dataset(synth) -> Path:
    return synth.msd(n=4)


def test_2d_mode_keeps_only_foreground_slices(synth, dataset: Path, tmp_path: Path) -> None:
    raw = synth.raw(
        dataset,
        preprocess={"spatial_dims": 2, "spatial_size": [16, 16], "slices": {"axis": 2, "keep_empty_fraction": 0.0}},
    )
    s = run_preprocess(synth.config(raw), tmp_path / "cache")
    assert s.n_cases == 4 and s.n_processed == 4 and s.n_items == 16  # slices 2..5 of each volume
    m = load_manifest(tmp_path / "cache")
    assert m["spatial_dims"] == 2
    assert sorted({it["slice"] for it in m["items"]}) == [2, 3, 4, 5]
    z = _load(tmp_path / "cache", "case_000")
    assert z["image"].shape == (4, 1, 16, 16)
    assert z["mask"].shape == (4, 1, 16, 16) and z["mask"].dtype == np.uint8
    assert z["affine"].shape == (4, 3, 3)
    assert all((z["mask"][i] > 0).any() for i in range(4))
    assert z["image"].min() >= 0.0 and z["image"].max() <= 1.0
    assert spacing_from_affine(z["affine"][0]) == pytest.approx((1.0, 1.0))


def test_2d_mode_keeps_every_slice_with_fraction_one(synth, dataset: Path, tmp_path: Path) -> None:
    raw = synth.raw(dataset, preprocess={"spatial_dims": 2, "spatial_size": [12, 10]})
    s = run_preprocess(synth.config(raw), tmp_path / "cache")
    assert s.n_items == 4 * 8
    assert [it["slice"] for it in load_manifest(tmp_path / "cache")["items"][:8]] == list(range(8))


def test_3d_whole_mode(synth, dataset: Path, tmp_path: Path) -> None:
    raw = synth.raw(dataset, preprocess={"spatial_size": [16, 12, 8]})
    cache = tmp_path / "cache"
    s = run_preprocess(synth.config(raw), cache)
    assert s.n_items == 4
    for case_id in ("case_000", "case_003"):
        z = _load(cache, case_id)
        assert z["image"].shape == (1, 1, 16, 12, 8)
        assert z["mask"].shape == (1, 1, 16, 12, 8)
        assert z["affine"].shape == (1, 4, 4)
        assert z["image"].min() >= 0.0 and z["image"].max() == pytest.approx(1.0)
        assert set(np.unique(z["mask"]).tolist()) == {0, 1, 2}
        assert spacing_from_affine(z["affine"][0]) == pytest.approx((1.0, 1.0, 2.0))
    _, mask = synth.volume(0)
    z = _load(cache, "case_000")
    for label in (1, 2):  # padding only adds background: label volumes unchanged
        assert int((z["mask"] == label).sum()) == int((mask == label).sum())


def test_3d_random_crops(synth, dataset: Path, tmp_path: Path) -> None:
    raw = synth.raw(dataset, preprocess={"crop_mode": "random_crops", "crop_size": [8, 6, 4], "crops_per_volume": 3})
    cache = tmp_path / "cache"
    s = run_preprocess(synth.config(raw), cache)
    assert s.n_items == 12
    m = load_manifest(cache)
    assert all(it["shape"] == [8, 6, 4] for it in m["items"])
    assert sorted({it["item_id"] for it in m["items"] if it["case_id"] == "case_002"}) == [
        "case_002_0",
        "case_002_1",
        "case_002_2",
    ]
    z = _load(cache, "case_002")
    assert z["image"].shape == (3, 1, 8, 6, 4)
    assert set(np.unique(z["mask"]).tolist()) <= {0, 1, 2}
    assert z["image"].min() >= 0.0 and z["image"].max() <= 1.0


def test_zscore_intensity(synth, dataset: Path, tmp_path: Path) -> None:
    raw = synth.raw(dataset, preprocess={"intensity": {"method": "zscore", "within_foreground": True}})
    run_preprocess(synth.config(raw), tmp_path / "cache")
    img = _load(tmp_path / "cache", "case_001")["image"][0, 0]
    fg = img[img != 0]
    assert abs(float(fg.mean())) < 1e-3 and float(fg.std()) == pytest.approx(1.0, abs=1e-2)


def test_manifest_items_match_files_patients_and_splits(synth, dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_preprocess(synth.config(synth.raw(dataset)), cache)
    m = load_manifest(cache)
    splits = json.loads((cache / "splits.json").read_text(encoding="utf-8"))["patients"]
    assert m["n_items"] == len(m["items"]) == 4
    assert m["labels"] == {"0": "background", "1": "a", "2": "b"}
    for it in m["items"]:
        assert it["sha256"] == sha256_file(cache / it["file"])
        assert it["patient_id"] == it["case_id"]
        assert it["split"] == splits[it["patient_id"]]
        counts = {int(k): v for k, v in it["label_counts"].items()}
        z = _load(cache, it["case_id"])
        assert counts == {int(v): int(n) for v, n in zip(*np.unique(z["mask"], return_counts=True), strict=True)}
    assert sum(v["cases"] for v in m["splits"].values()) == 4


def test_cache_second_run_does_nothing(synth, dataset: Path, tmp_path: Path) -> None:
    cfg = synth.config(synth.raw(dataset))
    cache = tmp_path / "cache"
    first = run_preprocess(cfg, cache)
    assert first.n_processed == 4
    before = _mtimes(cache)
    manifest_before = (cache / "manifest.json").read_text(encoding="utf-8")
    second = run_preprocess(cfg, cache)
    assert (second.n_processed, second.n_cached, second.n_items) == (0, 4, 4)
    assert _mtimes(cache) == before
    assert json.loads((cache / "manifest.json").read_text(encoding="utf-8")) == json.loads(manifest_before)
    assert plan(cfg, cache).todo == []


def test_changed_input_reprocesses_only_that_case(synth, dataset: Path, tmp_path: Path) -> None:
    cfg = synth.config(synth.raw(dataset))
    cache = tmp_path / "cache"
    run_preprocess(cfg, cache)
    before = _mtimes(cache)
    img, _ = synth.volume(2)
    write_image(dataset / "imagesTr" / "case_002.nii.gz", img * 3.0 + 1.0, synth.affine_3d)
    assert [w.case.case_id for w in plan(cfg, cache).todo] == ["case_002"]
    s = run_preprocess(cfg, cache)
    assert (s.n_processed, s.n_cached) == (1, 3)
    after = _mtimes(cache)
    assert [k for k in before if before[k] != after[k]] == ["case_002.npz"]


def test_changed_preprocess_field_reprocesses_all(synth, dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_preprocess(synth.config(synth.raw(dataset)), cache)
    changed = synth.config(synth.raw(dataset, preprocess={"intensity": {"upper": 90.0}}))
    s = run_preprocess(changed, cache)
    assert (s.n_processed, s.n_cached) == (4, 0)
    # a field that does not change the arrays (qc policy) keeps the cache
    same = synth.config(synth.raw(dataset, preprocess={"intensity": {"upper": 90.0}}, qc={"policy": "exclude"}))
    assert run_preprocess(same, cache).n_processed == 0


def test_subset_run_never_prunes_the_cache_of_the_full_dataset(synth, dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_preprocess(synth.config(synth.raw(dataset)), cache)
    s = run_preprocess(synth.config(synth.raw(dataset, data={"include": "case_00[012]"})), cache)
    assert s.n_cases == 3 and s.n_processed == 0
    assert "case_003" not in {it["case_id"] for it in load_manifest(cache)["items"]}  # the subset's manifest
    assert (cache / "cases" / "case_003.npz").exists()  # but the full dataset's files stay
    again = run_preprocess(synth.config(synth.raw(dataset)), cache)
    assert (again.n_processed, again.n_cached) == (0, 4)


def test_removed_case_is_dropped_from_the_cache(synth, dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_preprocess(synth.config(synth.raw(dataset)), cache)
    for f in [*dataset.rglob("case_003*")]:
        f.unlink()
    listing = json.loads((dataset / "dataset.json").read_text())
    listing["training"] = [r for r in listing["training"] if "case_003" not in r["image"]]
    (dataset / "dataset.json").write_text(json.dumps(listing))
    s = run_preprocess(synth.config(synth.raw(dataset)), cache)
    assert s.n_cases == 3 and s.n_processed == 0
    assert not (cache / "cases" / "case_003.npz").exists()
    assert "case_003" not in {it["case_id"] for it in load_manifest(cache)["items"]}


class _InterruptedError(RuntimeError):
    pass


class _StopAfter:
    """A progress sink that raises after ``n`` cases, simulating an interrupted run."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def advance(self, n: int = 1, info: str = "") -> None:
        self.seen += n
        if self.seen >= self.n:
            raise _InterruptedError(f"interrupted after {info}")


def test_interrupted_run_leaves_nothing_trusted(synth, dataset: Path, tmp_path: Path, assert_cache_clean) -> None:
    cfg = synth.config(synth.raw(dataset))
    cache = tmp_path / "cache"
    stop = _StopAfter(2)
    with pytest.raises(_InterruptedError):
        run_preprocess(cfg, cache, progress=stop)
    assert stop.seen == 2
    assert_cache_clean(cache)
    assert not list(cache.glob("cases/*.json"))  # no case entry a later run would trust
    with pytest.raises(DataError, match="no preprocessing manifest"):
        load_manifest(cache)
    s = run_preprocess(cfg, cache)
    assert (s.n_processed, s.n_items) == (4, 4)
    assert not list(cache.glob(".staging-*"))


def test_interrupted_rerun_keeps_the_previous_cache(synth, dataset: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    run_preprocess(synth.config(synth.raw(dataset)), cache)
    before = _mtimes(cache)
    manifest = (cache / "manifest.json").read_text(encoding="utf-8")
    changed = synth.config(synth.raw(dataset, preprocess={"seed": 5}))
    with pytest.raises(_InterruptedError):
        run_preprocess(changed, cache, progress=_StopAfter(2))
    assert _mtimes(cache) == before
    assert (cache / "manifest.json").read_text(encoding="utf-8") == manifest
    assert not list(cache.glob(".staging-*"))
    assert run_preprocess(changed, cache).n_processed == 4


@pytest.mark.parametrize("lesion_value", [180, 230], ids=["uniform-disc", "bright-lesion"])
def test_derived_label_fills_the_disc_and_keeps_original_labels(synth, tmp_path: Path, lesion_value: int) -> None:
    n = 24
    x, y = np.meshgrid(np.arange(n) - 11.5, np.arange(n) - 11.5, indexing="ij")
    disc, hole = np.hypot(x, y) <= 9, np.hypot(x - 3, y) <= 2.5
    lesion = np.hypot(x + 4, y + 2) <= 2
    image = np.where(disc, 180, 0).astype(np.uint8)  # bright disc on a black background
    image[hole] = 8  # a dark hole inside the disc
    image[lesion] = lesion_value
    mask = np.where(lesion, 1, 0).astype(np.uint8)
    root = tmp_path / "discs"
    write_image(root / "P1" / "P1_0.png", image, synth.png_affine)
    write_image(root / "P1" / "P1_0_mask.png", mask, synth.png_affine)
    raw = synth.raw(
        root,
        data={"labels": {0: "background", 1: "lesion"}},
        preprocess={
            "spatial_dims": 2,
            "spatial_size": [n, n],
            "derived_label": {"enabled": True, "name": "brain", "index": 2},
        },
    )
    cache = tmp_path / "cache"
    run_preprocess(synth.config(raw), cache)
    out = _load(cache, "P1_0")["mask"][0, 0]
    assert out.shape == (n, n)
    np.testing.assert_array_equal(out == 1, lesion)  # the original label keeps priority
    np.testing.assert_array_equal(out > 0, disc)  # derived label: the filled disc, hole included
    assert (out[hole] == 2).all()
    assert load_manifest(cache)["labels"] == {"0": "background", "1": "lesion", "2": "brain"}


def test_derived_label_index_must_be_new(synth, dataset: Path, tmp_path: Path) -> None:
    raw = synth.raw(dataset, preprocess={"derived_label": {"enabled": True, "index": 1}})
    with pytest.raises(DataError, match="already the label"):
        run_preprocess(synth.config(raw), tmp_path / "cache")


def test_resolved_config_saved_next_to_the_cache(synth, dataset: Path, tmp_path: Path) -> None:
    cfg = synth.config(synth.raw(dataset, preprocess={"seed": 9}))
    s = run_preprocess(cfg)  # default cache: <output_dir>/<name>/preprocess
    assert s.cache_dir == Path(cfg.output_dir) / "tiny" / "preprocess"
    assert load_config(s.cache_dir / "config.resolved.yaml") == cfg
    assert (s.cache_dir / "config.resolved.json").is_file()
    assert (s.cache_dir / "splits.json").is_file()


def test_2d_png_dataset_with_remap(synth, tmp_path: Path) -> None:
    root = synth.png_patients(patients=("PA", "PB", "PC"), slices=2)
    raw = synth.raw(
        root,
        data={"labels": {0: "background", 1: "lesion"}, "label_remap": {255: 1}},
        preprocess={"spatial_dims": 2, "spatial_size": [16, 16], "spacing": [0.5, 0.5]},
    )
    cache = tmp_path / "cache"
    s = run_preprocess(synth.config(raw), cache)
    assert s.n_items == 6
    m = load_manifest(cache)
    assert {it["patient_id"] for it in m["items"]} == {"PA", "PB", "PC"}
    by_patient: dict[str, set[str]] = {}
    for it in m["items"]:
        by_patient.setdefault(it["patient_id"], set()).add(it["split"])
    assert all(len(v) == 1 for v in by_patient.values())
    z = _load(cache, "PA_0")
    assert z["image"].shape == (1, 1, 16, 16)
    assert set(np.unique(z["mask"]).tolist()) == {0, 1}
    assert spacing_from_affine(z["affine"][0]) == pytest.approx((0.5, 0.5))

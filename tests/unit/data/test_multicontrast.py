"""Multi-contrast cases (``data.channels``) load as one C-channel image, in order, each channel normalised alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsynth.data.dataset import load_split
from medsynth.data.io import write_image
from medsynth.data.layouts import discover
from medsynth.data.preprocess import plan, run_preprocess
from medsynth.errors import ConfigError, DataError

KINDS = ("csv", "nnunet", "nifti4d")


def _cfg(synth, root: Path, **data):  # type: ignore[no-untyped-def]
    return synth.config(synth.raw(root, data={"channels": ["flair", "t2"], **data}))


def _channel_order_ok(images: np.ndarray, masks: np.ndarray) -> None:
    """Channel 1 shows label 2 brighter than label 1 by far; channel 0 does not (see ``multicontrast_channel``)."""
    m = masks[:, 0]
    c0, c1 = images[:, 0], images[:, 1]
    assert float(c1[m == 2].mean()) > float(c1[m == 1].mean()) + 0.3
    assert abs(float(c0[m == 2].mean()) - float(c0[m == 1].mean())) < 0.2


@pytest.mark.parametrize("kind", KINDS)
def test_two_contrast_cases_load_as_two_channels_in_order(synth, kind: str, tmp_path: Path) -> None:
    root = synth.multicontrast(kind)
    cfg = _cfg(synth, root)
    disc = discover(cfg.data)
    assert len(disc.cases) == 4
    if kind != "nifti4d":
        assert [p.name for p in disc.cases[0].images][1].endswith(("t2.nii.gz", "_0001.nii.gz"))
    run_preprocess(cfg, tmp_path / "cache")
    data = load_split(tmp_path / "cache", None)
    assert tuple(data.images.shape[1:]) == (2, 12, 10, 8)
    _channel_order_ok(data.images.numpy(), data.masks.numpy())
    # each channel normalised on its own: both reach 1 (percentile scaling to [0, 1] per channel)
    for c in range(2):
        assert float(data.images[:, c].max()) == pytest.approx(1.0, abs=1e-4)


def test_single_channel_keys_unchanged_by_multicontrast_support(synth, tmp_path: Path) -> None:
    """A single-channel config's cache key ignores the multi-contrast fields (existing caches stay valid)."""
    from medsynth.data.preprocess import _relevant_config
    from medsynth.pipeline.keys import section

    cfg = synth.config(synth.raw(synth.msd(n=2)))
    assert "channels" not in _relevant_config(cfg)
    assert "channels" not in section(cfg, "data")  # the stage keys of check/preprocess stay as they were
    for w in plan(cfg, tmp_path / "cache").work:
        assert "extra_images" not in w.inputs and "extra_images" not in w.case.to_json()
    two = _cfg(synth, synth.multicontrast("nnunet", n=2))
    assert _relevant_config(two)["channels"] == ["flair", "t2"] and section(two, "data")["channels"] == ["flair", "t2"]
    assert all(len(w.inputs["extra_images"]) == 1 for w in plan(two, tmp_path / "cache2").work)


def test_missing_channel_file_is_one_line_error_naming_it(synth) -> None:
    root = synth.multicontrast("nnunet")
    (root / "imagesTr" / "case_002_0001.nii.gz").unlink()
    with pytest.raises(DataError) as exc:
        discover(_cfg(synth, root).data)
    assert "case_002_0000.nii.gz" in str(exc.value) and "channel 1" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_csv_column_is_an_error_naming_the_manifest(synth) -> None:
    csv = synth.multicontrast("csv")
    with pytest.raises(DataError, match=r"cases\.csv.*no column 'image_2'"):
        discover(synth.config(synth.raw(csv, data={"channels": ["flair", "t2", "t1c"]})).data)


def test_4d_file_with_too_few_channels_names_the_file(synth, tmp_path: Path) -> None:
    root = synth.multicontrast("nifti4d")
    cfg = synth.config(synth.raw(root, data={"channels": ["flair", "t2", "t1c"]}))
    with pytest.raises(DataError, match=r"case_000\.nii\.gz.*has 2 channel\(s\) but data\.channels lists 3"):
        run_preprocess(cfg, tmp_path / "cache")


def test_channel_with_other_field_of_view_is_an_error_naming_its_file(synth, tmp_path: Path) -> None:
    root = synth.multicontrast("nnunet")
    bad = root / "imagesTr" / "case_001_0001.nii.gz"
    shifted = np.diag([1.0, 1.0, 2.0, 1.0])
    shifted[:3, 3] = [40.0, 0.0, 0.0]  # a scan of somewhere else
    write_image(bad, np.ones((12, 10, 8), np.float32), shifted)
    with pytest.raises(DataError) as exc:
        run_preprocess(_cfg(synth, root), tmp_path / "cache")
    assert "case_001_0001.nii.gz" in str(exc.value) and "co-registered" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_channel_at_other_resolution_is_resampled_onto_channel_0(synth, tmp_path: Path) -> None:
    root = synth.multicontrast("nnunet", n=3)
    path = root / "imagesTr" / "case_001_0001.nii.gz"
    from medsynth.data.io import read_image

    src = read_image(path)
    half = src.array[::2, ::2, :]  # same field of view at half the in-plane resolution
    aff = src.affine.copy()
    aff[:2, :2] *= 2
    aff[:2, 3] += 0.5 * np.diag(src.affine)[:2]
    write_image(path, half, aff)
    run_preprocess(_cfg(synth, root), tmp_path / "cache")
    data = load_split(tmp_path / "cache", None)
    assert tuple(data.images.shape[1:]) == (2, 12, 10, 8)
    _channel_order_ok(data.images.numpy(), data.masks.numpy())


def test_channels_and_channel_together_are_a_config_error(synth) -> None:
    with pytest.raises(ConfigError, match="not both"):
        synth.config(synth.raw(Path("x"), data={"channels": ["a", "b"], "channel": 0}))

"""Typed configuration: YAML loading, overrides, errors naming key and file, saving (medsynth.config)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from medsynth.config import MedsynthConfig, load_config, save_resolved
from medsynth.config.loader import RESOLVED_JSON, RESOLVED_YAML, validate_config
from medsynth.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.mark.parametrize(
    "name", ["lgg-2d.yaml", "lgg-2d-128.yaml", "hippocampus-3d.yaml", "hippocampus-3d-1mm.yaml", "demo.yaml"]
)
def test_shipped_configs_load_and_are_frozen(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, MedsynthConfig)
    assert cfg.name == name.removesuffix(".yaml")
    assert 0 in cfg.data.labels
    with pytest.raises(ValidationError, match="frozen"):
        cfg.seed = 5  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.preprocess.spatial_dims = 3  # type: ignore[misc]
    changed = cfg.model_copy(update={"seed": 5})
    assert changed.seed == 5 and cfg.seed == 0


def test_shipped_config_values() -> None:
    lgg = load_config(CONFIGS / "lgg-2d.yaml")
    assert lgg.data.label_remap == {255: 1}
    assert lgg.qc.policy == "exclude"
    lgg128 = load_config(CONFIGS / "lgg-2d-128.yaml")  # extends lgg-2d.yaml, only the resolution differs
    assert (lgg128.preprocess.spacing, lgg128.preprocess.spatial_size) == ([2.0, 2.0], [128, 128])
    assert lgg128.data == lgg.data and lgg128.qc == lgg.qc
    assert lgg128.preprocess.derived_label == lgg.preprocess.derived_label
    hip = load_config(CONFIGS / "hippocampus-3d-1mm.yaml")
    assert hip.preprocess.spatial_dims == 3
    assert hip.preprocess.spacing == [1.0, 1.0, 1.0]
    hip_cpu = load_config(CONFIGS / "hippocampus-3d.yaml")  # the CPU-budget grid
    assert hip_cpu.preprocess.spacing == [1.5, 1.5, 1.5] and hip_cpu.data == hip.data


def test_dotted_override_is_applied_and_typed() -> None:
    cfg = load_config(CONFIGS / "hippocampus-3d.yaml", ["preprocess.spacing=[1,1,1]", "qc.policy=exclude"])
    assert cfg.preprocess.spacing == [1.0, 1.0, 1.0]
    assert all(isinstance(v, float) for v in cfg.preprocess.spacing)
    assert cfg.qc.policy == "exclude"
    cfg = load_config(CONFIGS / "hippocampus-3d.yaml", ["preprocess.spacing=[0.5, 2, 1.5]", "seed=7"])
    assert cfg.preprocess.spacing == [0.5, 2.0, 1.5]
    assert cfg.seed == 7


def test_override_creates_nested_sections(synth) -> None:
    path = synth.yaml({"data": {"root": "x"}})
    cfg = load_config(path, ["preprocess.intensity.method=zscore", "data.split.seed=4"])
    assert cfg.preprocess.intensity.method == "zscore"
    assert cfg.data.split.seed == 4


def test_typo_key_in_yaml_names_key_and_file(synth) -> None:
    path = synth.yaml({"data": {"root": "x"}, "preprocess": {"spatial_dims": 2, "spacng": [1, 1]}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "unknown key 'preprocess.spacng'" in str(info.value)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    assert "docs/configuration.md" in info.value.hint


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "lgg-2d.yaml", ["preprocess.spatial_dims=banana"])
    msg = str(info.value)
    assert "preprocess.spatial_dims" in msg
    assert "banana" in msg
    assert "lgg-2d.yaml" in info.value.source


def test_unknown_override_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'preprocess\.nope'") as info:
        load_config(CONFIGS / "demo.yaml", ["preprocess.nope=1"])
    assert "preprocess.nope=1" in info.value.source  # the source says the override is at fault


@pytest.mark.parametrize("bad", ["no_equals_sign", "=3", "a.b=[1,"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS / "demo.yaml", [bad])
    assert info.value.source == "command line"
    assert bad in str(info.value)


def test_missing_required_key(synth) -> None:
    with pytest.raises(ConfigError, match="missing required key 'data'"):
        load_config(synth.yaml({"name": "x"}))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.source == str(tmp_path / "nope.yaml")


def test_env_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: ${RUN_NAME:-fallback}\ndata:\n  root: ${DATA_HOME:-/defaults}/set\n")
    monkeypatch.delenv("RUN_NAME", raising=False)
    monkeypatch.delenv("DATA_HOME", raising=False)
    cfg = load_config(path)
    assert cfg.name == "fallback"
    assert cfg.data.root == "/defaults/set"
    monkeypatch.setenv("RUN_NAME", "exp1")
    monkeypatch.setenv("DATA_HOME", "/mnt/d")
    cfg = load_config(path)
    assert (cfg.name, cfg.data.root) == ("exp1", "/mnt/d/set")


def test_env_without_default_must_be_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDSYNTH_TEST_UNSET", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: ${MEDSYNTH_TEST_UNSET}\n")
    with pytest.raises(ConfigError, match=r"\$\{MEDSYNTH_TEST_UNSET\} is not set"):
        load_config(path)


def test_shipped_config_uses_medsynth_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSYNTH_SHARED", "/somewhere/shared")
    assert load_config(CONFIGS / "lgg-2d.yaml").data.root == "/somewhere/shared/data/lgg-flair"


def test_extends_merges_nested_sections(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "base.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "base",
                "data": {"root": "r", "labels": {0: "bg", 1: "fg"}},
                "preprocess": {"spatial_dims": 2, "spatial_size": [32, 32], "seed": 3},
            }
        )
    )
    child = tmp_path / "child.yaml"
    child.write_text("extends: base/base.yaml\nname: child\npreprocess:\n  spatial_size: [16, 16]\n")
    cfg = load_config(child)
    assert cfg.name == "child"
    assert cfg.data.labels == {0: "bg", 1: "fg"}
    assert cfg.preprocess.spatial_size == [16, 16]
    assert cfg.preprocess.seed == 3  # kept from the base


def test_save_resolved_round_trip(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "lgg-2d.yaml", ["preprocess.seed=11"])
    out = tmp_path / "saved"
    path = save_resolved(cfg, out)
    assert path == out / RESOLVED_YAML
    assert load_config(out / RESOLVED_YAML) == cfg
    data = json.loads((out / RESOLVED_JSON).read_text(encoding="utf-8"))
    assert validate_config(data, "json", MedsynthConfig) == cfg
    assert load_config(out / RESOLVED_YAML).data.label_remap == {255: 1}  # int keys survive


def test_split_fractions_must_sum_to_one(synth) -> None:
    path = synth.yaml({"data": {"root": "x", "split": {"train": 0.7, "val": 0.2, "test": 0.2}}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "data.split" in str(info.value)
    assert "sum to 1" in str(info.value)


def test_cross_field_validation(synth) -> None:
    with pytest.raises(ConfigError, match="spatial_size"):
        synth.config({"data": {"root": "x"}, "preprocess": {"spatial_dims": 3, "spatial_size": [8, 8]}})
    with pytest.raises(ConfigError, match="crop_size"):
        pre = {"spatial_dims": 3, "spatial_size": [8, 8, 8], "crop_mode": "random_crops"}
        synth.config({"data": {"root": "x"}, "preprocess": pre})
    with pytest.raises(ConfigError, match="labels must contain 0"):
        synth.config({"data": {"root": "x", "labels": {1: "fg"}}})
    with pytest.raises(ConfigError, match="label_remap maps to values"):
        synth.config({"data": {"root": "x", "labels": {0: "bg", 1: "fg"}, "label_remap": {255: 9}}})
    # no labels declared: the vocabulary is resolved from the data later, so any remap target is fine here
    assert synth.config({"data": {"root": "x", "label_remap": {255: 9}}}).data.labels == {}
    with pytest.raises(ConfigError, match="lower percentile"):
        synth.config({"data": {"root": "x"}, "preprocess": {"intensity": {"lower": 90, "upper": 10}}})


def test_auto_guidance_previews_the_middle_of_the_sweep_and_refuses_a_number_until_calibrated() -> None:
    from medsynth.config.stages import SamplingConfig
    from medsynth.errors import ConfigError

    auto = SamplingConfig.model_validate({"guidance_scale": "auto", "calibration": {"scales": [3.0, 1.0, 2.0]}})
    assert auto.preview().scale == 2.0  # training sample grids before the calibration ran
    with pytest.raises(ConfigError, match="auto"):
        _ = auto.scale
    pinned = SamplingConfig.model_validate({"guidance_scale": 1.5})
    assert pinned.preview() is pinned and auto.with_scale(1.0).scale == 1.0

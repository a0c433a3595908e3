"""Provenance: version from one place, the source commit and dirty flag, config hash, shipped config names."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import medsynth
from medsynth.config.loader import config_dict, load_config
from medsynth.config.shipped import resolve_config, shipped_names
from medsynth.errors import ConfigError
from medsynth.provenance import config_hash, git_state, provenance_tags, version_line

ROOT = Path(__file__).resolve().parents[2]


def test_version_lives_in_one_place() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "medsynth.__version__"}
    assert version_line().startswith(f"medsynth {medsynth.__version__}")


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the source checkout (git)")
def test_git_state_is_the_checkouts_head() -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    commit, dirty = git_state()
    assert commit == head and dirty in ("true", "false")
    tags = provenance_tags({"a": 1})
    assert tags["medsynth.git.commit"] == head and tags["medsynth.version"] == medsynth.__version__
    assert tags["medsynth.env.torch"].startswith("2.") and tags["medsynth.env.monai"] != "unknown"


def test_config_hash_follows_content_not_layout() -> None:
    a = config_dict(load_config(ROOT / "configs" / "demo.yaml"))
    b = config_dict(load_config(ROOT / "configs" / "demo.yaml", ["seed=0"]))
    c = config_dict(load_config(ROOT / "configs" / "demo.yaml", ["seed=1"]))
    assert config_hash(a) == config_hash(dict(reversed(list(b.items()))))
    assert config_hash(a) != config_hash(c)
    assert provenance_tags(a)["medsynth.config_hash"] == config_hash(a)


def test_shipped_configs_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert {"demo", "lgg-2d", "hippocampus-3d"} <= set(shipped_names())
    assert resolve_config(None).name == "demo.yaml" and resolve_config("lgg-2d.yaml").name == "lgg-2d.yaml"
    (tmp_path / "demo").mkdir()  # a folder of that name is not a config: the shipped one still wins
    assert resolve_config("demo").is_file()
    own = tmp_path / "mine.yaml"
    own.write_text("name: mine\n")
    assert resolve_config(own) == own
    with pytest.raises(ConfigError, match="does not exist") as err:
        resolve_config("no-such-config")
    assert "demo" in err.value.hint  # the hint lists the shipped names
    with pytest.raises(ConfigError):
        resolve_config("sub/demo.yaml")  # a path is never replaced by a shipped name


def test_cli_version() -> None:
    out = subprocess.run([sys.executable, "-m", "medsynth.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith(f"medsynth {medsynth.__version__}")


def test_every_tracked_run_carries_provenance(tmp_path: Path) -> None:
    from medsynth.tracking.mlflow_store import MlflowSession

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"output_dir={tmp_path}"])
    session = MlflowSession(cfg)
    parent = session.start_run("pipeline")
    child = session.start_run("preprocess", parent.run_id, {"medsynth.stage": "preprocess"})
    for run_id in (parent.run_id, child.run_id):
        tags = session.client.get_run(run_id).data.tags
        assert tags["medsynth.config_hash"] == config_hash(config_dict(cfg))
        assert tags["medsynth.version"] == medsynth.__version__ and "medsynth.git.commit" in tags

"""Opening a tracking session must not change where *other* configs in the same process track."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig


def test_session_does_not_leak_its_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medsynth.tracking.mlflow_store import MlflowSession, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'a.db'}"
    a = validate_config(
        {"name": "a", "output_dir": str(tmp_path / "a"), "data": {"root": "x"}, "tracking": {"uri": store}},
        "test",
        MedsynthConfig,
    )
    b = validate_config({"name": "b", "output_dir": str(tmp_path / "b"), "data": {"root": "x"}}, "test", MedsynthConfig)
    MlflowSession(a)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking_uri(b) == f"sqlite:///{(tmp_path / 'b' / 'mlflow.db').resolve()}"

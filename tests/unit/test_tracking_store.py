"""Which tracking store a config logs to, when one process runs several configs (CLI tests, notebooks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medsynth.config.schema import MedsynthConfig


def _cfg(out: Path) -> MedsynthConfig:
    return MedsynthConfig.model_validate(
        {"name": "t", "output_dir": str(out), "data": {"root": "unused", "labels": {0: "background", 1: "x"}}}
    )


def test_a_session_does_not_redirect_the_next_configs_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI; left there, config B would log into A's store."""
    import os

    from medsynth.tracking.mlflow_store import MlflowSession, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a, b = _cfg(tmp_path / "a"), _cfg(tmp_path / "b")
    session = MlflowSession(a)
    assert session.uri == f"sqlite:///{(tmp_path / 'a' / 'mlflow.db').resolve()}"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking_uri(b) == f"sqlite:///{(tmp_path / 'b' / 'mlflow.db').resolve()}"

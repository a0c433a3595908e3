"""Registry URIs and the promotion gate (pure functions; the registry round trip is in tests/integration)."""

from __future__ import annotations

import pytest

from medsynth.errors import ConfigError
from medsynth.pipeline.promote import gate
from medsynth.tracking.mlflow_store import parse_model_uri


def test_model_uris_by_version_or_alias() -> None:
    assert parse_model_uri("models:/medsynth-demo-generator/3") == ("medsynth-demo-generator", "3", None)
    assert parse_model_uri("models:/medsynth-demo-generator@champion") == ("medsynth-demo-generator", None, "champion")
    for bad in ("models:/x", "models:/x/latest", "runs:/abc/model", "models:/@a", "models:/x@", "x/1"):
        with pytest.raises(ConfigError, match="expected models"):
            parse_model_uri(bad)


def _report(lesion: float | None, brain: float, memorised: float) -> dict[str, object]:
    return {
        "plausibility": {"per_label": {"lesion": {"ratio": {"value": lesion}}, "brain": {"ratio": {"value": brain}}}},
        "memorisation": {"fraction_flagged": memorised},
    }


def test_promotion_gate() -> None:
    failures, checks = gate(_report(0.8, 0.9, 0.0), 0.5, 0.05)
    assert failures == [] and checks == {
        "dice_ratio.brain": "0.9",
        "dice_ratio.lesion": "0.8",
        "memorised_fraction": "0",
    }
    failures, _ = gate(_report(0.3, 0.9, 0.2), 0.5, 0.05)
    assert len(failures) == 2 and "lesion" in failures[0] and "memorisation" in failures[1]
    failures, checks = gate(_report(None, 0.9, 0.0), 0.5, 0.05)  # n/a does not block
    assert failures == [] and checks["dice_ratio.lesion"] == "n/a"

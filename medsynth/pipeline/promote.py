"""Promotion of a registered generator: set an alias (e.g. ``champion``) only after its validation passed.

The gate reads the config's validation report (``<output>/<name>/validation/validation_report.json``):

1. the report is current: the ``validate`` stage is up to date (its stamp carries the current key:
   same generator weights, sampling, segmenter and data as now);
2. every label's Dice ratio synthetic/real (segmenter on synthetic vs real images) is at least
   ``min_dice_ratio`` (labels without a value, "n/a", are listed but do not block);
3. the memorisation audit flagged at most ``max_memorised`` of the synthetic images;
4. the registry version holds exactly the validated weights (SHA-256 of every safetensors file).

Then ``models:/<name>@<alias>`` points at that version, which is tagged with the report's numbers.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsynth.config.schema import MedsynthConfig
from medsynth.errors import MedsynthError
from medsynth.fileio import sha256_file


class PromotionRefusedError(MedsynthError):
    """The validation report is missing, stale, or below the gate."""


@dataclass(frozen=True)
class Promotion:
    """A promoted version: ``models:/<name>@<alias>`` now resolves to ``version``."""

    name: str
    version: str
    alias: str
    checks: dict[str, str]

    @property
    def uri(self) -> str:
        """The alias URI."""
        return f"models:/{self.name}@{self.alias}"


def gate(report: dict[str, Any], min_dice_ratio: float, max_memorised: float) -> tuple[list[str], dict[str, str]]:
    """Failures (empty when the report passes) and the checked numbers, from a validation report."""
    failures: list[str] = []
    checks: dict[str, str] = {}
    for label, r in sorted(report["plausibility"]["per_label"].items()):
        v = (r.get("ratio") or {}).get("value")
        checks[f"dice_ratio.{label}"] = "n/a" if v is None else f"{float(v):.4g}"
        if v is not None and math.isfinite(float(v)) and float(v) < min_dice_ratio:
            failures.append(f"Dice ratio synthetic/real of {label} is {float(v):.3g} < {min_dice_ratio}")
    mem = float(report["memorisation"]["fraction_flagged"])
    checks["memorised_fraction"] = f"{mem:.4g}"
    if math.isfinite(mem) and mem > max_memorised:
        failures.append(f"memorisation audit flagged {mem:.3g} of the synthetic images > {max_memorised}")
    return failures, checks


def _local_weights(cfg: MedsynthConfig) -> dict[str, str]:
    from medsynth.checkpoint import find_checkpoint
    from medsynth.pipeline.runner import stage_root

    out: dict[str, str] = {}
    for part in ("autoencoder", "unet", "controlnet"):
        ckpt = find_checkpoint(stage_root(cfg) / part, "final")
        out.update({f"{part}/{k}": v for k, v in (ckpt.file_hashes() if ckpt else {}).items()})
    return out


def _bundle_weights(bundle: Path) -> dict[str, str]:
    out = {}
    for part in ("autoencoder", "unet", "controlnet"):
        for f in sorted((bundle / part / "checkpoints").glob("*/*.safetensors")):
            if f.stem != "state":
                out[f"{part}/{f.stem}"] = sha256_file(f)
    return out


def promote(
    cfg: MedsynthConfig,
    alias: str,
    version: str | None = None,
    min_dice_ratio: float = 0.5,
    max_memorised: float = 0.05,
) -> Promotion:
    """Point ``alias`` of the config's registered generator at the validated version.

    Args:
        cfg: Resolved config (its validation report and tracking store are used).
        alias: Registry alias to set, e.g. ``champion``.
        version: Version to promote; default: the newest version holding the validated weights.
        min_dice_ratio: Lowest acceptable Dice ratio synthetic/real of any label.
        max_memorised: Highest acceptable fraction of synthetic images flagged as memorised.

    Returns:
        The :class:`Promotion`.

    Raises:
        PromotionRefusedError: No report, a stale report, a failed gate, or no registered version with the
            validated weights.
    """
    from medsynth.evaluation.validate import REPORT_JSON
    from medsynth.pipeline.runner import is_up_to_date, stage_key, stage_root
    from medsynth.tracking.mlflow_store import (
        download_model,
        model_versions,
        registered_name,
        set_model_alias,
        tracking_uri,
    )

    root = stage_root(cfg)
    report_file = root / "validation" / REPORT_JSON
    if not report_file.is_file():
        raise PromotionRefusedError(f"{report_file}: no validation report; run `medsynth validate` first")
    if not is_up_to_date(cfg, "validate"):
        raise PromotionRefusedError(
            f"{report_file}: the report is stale (generator, segmenter, sampling or data changed since); "
            "run `medsynth validate` again"
        )
    failures, checks = gate(json.loads(report_file.read_text(encoding="utf-8")), min_dice_ratio, max_memorised)
    if failures:
        raise PromotionRefusedError(f"validation did not pass ({report_file}): " + "; ".join(failures))
    uri = tracking_uri(cfg)
    name = registered_name(cfg, "generator")
    try:
        versions = model_versions(uri, name)
    except Exception as exc:
        raise PromotionRefusedError(f"{name}: not in the registry at {uri} ({exc})") from None
    candidates = [v for v in versions if version is None or v == str(version)]
    local = _local_weights(cfg)
    chosen = None
    with tempfile.TemporaryDirectory() as tmp:
        for v in candidates:
            bundle = download_model(f"models:/{name}/{v}", Path(tmp) / v, uri)
            if _bundle_weights(bundle) == local:
                chosen = v
                break
    if chosen is None:
        which = f"version {version}" if version else "no version"
        raise PromotionRefusedError(f"{name}: {which} holds the validated generator weights of {root}")
    tags = {f"medsynth.promotion.{k}": v for k, v in {**checks, "validation_key": stage_key(cfg, "validate")}.items()}
    set_model_alias(uri, name, chosen, alias, tags)
    return Promotion(name, chosen, alias, checks)

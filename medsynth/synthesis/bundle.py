"""A generator bundle: the final autoencoder, UNet and ControlNet checkpoints plus the config, in one folder.

This is what the Model Registry stores for the ``generator`` model (safetensors + JSON only), and
what ``medsynth synthesize --model models:/<name>/<version>`` loads back::

    bundle/config.json
    bundle/{autoencoder,unet,controlnet}/checkpoints/{final.json,latest.json,step-NNNNNNN/}
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from medsynth.checkpoint import FINAL, LATEST, find_checkpoint
from medsynth.config.loader import config_dict, validate_config
from medsynth.config.schema import MedsynthConfig
from medsynth.errors import DataError
from medsynth.fileio import write_json_atomic
from medsynth.generator import MaskGenerator, load_generator

PARTS = ("autoencoder", "unet", "controlnet")


def export_bundle(cfg: MedsynthConfig, runs: dict[str, Path], dst: str | Path) -> Path:
    """Copy the final checkpoints of the three generator stages and the config into ``dst``.

    Args:
        cfg: The resolved config the generator was trained with.
        runs: Run folders keyed by ``autoencoder``, ``unet``, ``controlnet``.
        dst: Bundle folder (replaced if it exists).

    Returns:
        ``dst``.
    """
    out = Path(dst)
    if out.exists():
        shutil.rmtree(out)
    for part in PARTS:
        ckpt = find_checkpoint(runs[part], "final")
        if ckpt is None:
            raise DataError(runs[part], f"no final {part} checkpoint to export")
        target = out / part / "checkpoints" / ckpt.path.name
        shutil.copytree(ckpt.path, target)
        for ptr in (FINAL, LATEST):
            write_json_atomic(out / part / "checkpoints" / ptr, {"path": ckpt.path.name, "step": ckpt.step})
    write_json_atomic(out / "config.json", config_dict(cfg))
    return out


def bundle_config(bundle: str | Path) -> MedsynthConfig:
    """The config stored in a bundle."""
    f = Path(bundle) / "config.json"
    if not f.is_file():
        raise DataError(bundle, "not a medsynth generator bundle (config.json missing)")
    return validate_config(json.loads(f.read_text(encoding="utf-8")), str(f), MedsynthConfig)


def load_bundle(bundle: str | Path, device: torch.device) -> MaskGenerator:
    """Load the generator of a bundle; its networks are rebuilt from the bundle's own config."""
    b = Path(bundle)
    return load_generator(bundle_config(b), b / "autoencoder", b / "unet", b / "controlnet", device)

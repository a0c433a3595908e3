"""Make sure a config's dataset exists: generate the built-in phantom when the config asks for it."""

from __future__ import annotations

import logging
from pathlib import Path

from medsynth.config.schema import MedsynthConfig

log = logging.getLogger(__name__)


def ensure_dataset(cfg: MedsynthConfig) -> Path:
    """Return the dataset root, generating the phantom there first if enabled and missing.

    Args:
        cfg: Resolved config; ``cfg.phantom.enabled`` turns generation on.

    Returns:
        The dataset root path.
    """
    root = Path(cfg.data.root)
    if cfg.phantom.enabled and not (root.exists() and any(root.iterdir())):
        from medsynth.data.phantom import write_phantom_dataset

        p = cfg.phantom
        log.info("generating the phantom dataset (%dD, %d patients) in %s", p.dim, p.n, root)
        write_phantom_dataset(
            root,
            dim=p.dim,
            n=p.n,
            seed=p.seed,
            size=p.size,
            slices_per_patient=p.slices_per_patient,
            lesion_probability=p.lesion_probability,
        )
    return root

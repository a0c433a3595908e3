"""Latent cache: encode a split once with the trained autoencoder (latent MEANS, not samples)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsynth.checkpoint import find_checkpoint
from medsynth.config.schema import MedsynthConfig
from medsynth.data.dataset import ArraySet, load_split
from medsynth.errors import DataError
from medsynth.fileio import sha256_file, write_atomic, write_json_atomic
from medsynth.generator import load_autoencoder
from medsynth.models.autoencoder import downsample_factor
from medsynth.models.tiling import encode_latent_means
from medsynth.progress import NullProgress, Progress


@dataclass(frozen=True)
class LatentSet:
    """Encoded items of one split.

    Attributes:
        latents: ``(N, C, *s)`` float32 latent means, UNSCALED (multiply by ``scale_factor``).
        masks: ``(N, 1, *S)`` uint8 full-resolution masks of the same items.
        images: ``(N, 1, *S)`` float32 images (for sample grids).
        item_ids: Item ids, in order.
        scale_factor: 1 / std of the training latents.
        num_classes: Mask channels of the one-hot encoding.
    """

    latents: torch.Tensor
    masks: torch.Tensor
    images: torch.Tensor
    item_ids: list[str]
    scale_factor: float
    num_classes: int

    def __len__(self) -> int:
        return int(self.latents.shape[0])


def encode_split(
    cfg: MedsynthConfig,
    cache_dir: str | Path,
    ae_run: str | Path,
    out_dir: str | Path,
    split: str,
    device: torch.device | None = None,
    batch: int = 32,
    progress: Progress | None = None,
    items: ArraySet | None = None,
) -> Path:
    """Encode a split with the final autoencoder and write ``<out_dir>/<split>.npz`` atomically.

    ``items`` encodes those items instead of the cache's split (e.g. a few patients of a new site),
    written under the name ``split``.

    Returns:
        The written file (holding latents, masks, images, item ids, scale factor, AE hash).
    """
    dev = device or torch.device("cpu")
    ckpt = find_checkpoint(ae_run, "final")
    if ckpt is None:
        raise DataError(ae_run, "no final autoencoder checkpoint", hint="train the autoencoder first")
    ae, scale = load_autoencoder(cfg, ckpt, dev)
    data = items if items is not None else load_split(cache_dir, split)
    prog = progress or NullProgress()
    factor = downsample_factor(cfg.autoencoder)
    zs = []
    with torch.no_grad():
        for i in range(0, len(data), batch):
            x = data.images[i : i + batch].to(dev)
            zs.append(encode_latent_means(ae, x, factor, cfg.autoencoder.tiling).float().cpu())
            prog.advance(min(batch, len(data) - i))
    z = torch.cat(zs).numpy()
    target = Path(out_dir) / f"{split}.npz"
    write_atomic(
        target,
        lambda p: np.savez(
            p,
            latents=z,
            masks=data.masks.numpy(),
            images=data.images.numpy(),
            item_ids=np.array(data.item_ids),
            scale_factor=np.array(scale),
            num_classes=np.array(data.num_classes),
        ),
    )
    write_json_atomic(
        Path(out_dir) / f"{split}.json",
        {
            "split": split,
            "n": len(data),
            "latent_shape": list(z.shape[1:]),
            "scale_factor": scale,
            "autoencoder": ckpt.file_hashes(),
            "file_sha256": sha256_file(target),
        },
    )
    return target


def load_latents(path: str | Path) -> LatentSet:
    """Read a latent cache file written by :func:`encode_split`."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "latent cache file does not exist", hint="run the encode-latents stage first")
    with np.load(p) as z:
        return LatentSet(
            torch.from_numpy(z["latents"]),
            torch.from_numpy(z["masks"]),
            torch.from_numpy(z["images"]),
            [str(s) for s in z["item_ids"]],
            float(z["scale_factor"]),
            int(z["num_classes"]),
        )

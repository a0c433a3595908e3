"""The validation stage keeps its synthetic test images for the analysis stage, tied to their item ids."""

from __future__ import annotations

from pathlib import Path

import torch

from medsynth.evaluation.validate import load_synthetic, save_synthetic


def test_synthetic_images_round_trip_only_for_the_same_items(tmp_path: Path) -> None:
    images = torch.linspace(0, 1, 2 * 8 * 8).reshape(2, 1, 8, 8)
    path = save_synthetic(tmp_path / "synthetic_test.npz", images, ["a", "b"])
    back = load_synthetic(path, ["a", "b"])
    assert back is not None and back.dtype == torch.float32 and back.shape == images.shape
    assert torch.allclose(back, images, atol=1e-3)  # float16 on disk
    assert load_synthetic(path, ["b", "a"]) is None  # other items (or order): generate again
    assert load_synthetic(tmp_path / "missing.npz", ["a", "b"]) is None

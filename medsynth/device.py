"""The one device rule of medsynth: the device asked for, else CUDA when available, else the CPU."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """The torch device to use.

    Args:
        device: An explicit device (``"cpu"``, ``"cuda:1"``); None picks automatically.
        local_rank: Under ``torchrun``, this process's GPU index when picking CUDA.

    Returns:
        The device (CUDA devices are also made current for this process).
    """
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")

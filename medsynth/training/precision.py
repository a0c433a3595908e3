"""Mixed precision chosen by device capability: bf16 where supported, fp16 with loss scaling before Ampere.

The policy is a pure function of the device type, its CUDA compute capability and the requested
mode (``train.amp``), so it is testable without the hardware:

==========  =================================  ==================================  =================
requested   CUDA, capability >= (8, 0)         CUDA, capability < (8, 0)           CPU (and others)
==========  =================================  ==================================  =================
``auto``    bf16 autocast                      fp16 autocast + ``GradScaler``      fp32 (no autocast)
``bf16``    bf16 autocast                      bf16 autocast (slow: emulated)      bf16 autocast
``fp16``    fp16 autocast + ``GradScaler``     fp16 autocast + ``GradScaler``      fp16 autocast + scaler
``off``     fp32                               fp32                                fp32
==========  =================================  ==================================  =================

On CPU ``auto`` keeps fp32 so results do not change with the machine; ``bf16`` is the documented
opt-in for CPUs with native bf16 (AVX512-BF16 / AMX), where it trains 1.3-1.9x faster
(``benchmarks/training.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

AmpMode = Literal["auto", "bf16", "fp16", "off"]

#: The first CUDA compute capability with native bf16 tensor cores (Ampere).
BF16_MIN_CAPABILITY: tuple[int, int] = (8, 0)


@dataclass(frozen=True)
class AmpPolicy:
    """How one training loop runs its forward passes and scales its loss.

    Attributes:
        device_type: ``"cuda"``, ``"cpu"``, ...
        dtype: Autocast dtype (``torch.bfloat16`` / ``torch.float16``), or None for plain fp32.
        use_scaler: Scale the loss with a ``torch.amp.GradScaler`` (fp16: gradients would underflow).
        reason: Why this policy was chosen (logged and recorded in benchmark JSON).
    """

    device_type: str
    dtype: torch.dtype | None
    use_scaler: bool
    reason: str

    @property
    def enabled(self) -> bool:
        """True when forward passes run under autocast."""
        return self.dtype is not None

    @property
    def name(self) -> str:
        """``"bf16"``, ``"fp16"`` or ``"fp32"``."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32") if self.dtype else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The autocast context of this policy (a no-op context for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh ``GradScaler`` for fp16 policies, else None."""
        return torch.amp.GradScaler(self.device_type) if self.use_scaler else None


def amp_policy(device_type: str, capability: tuple[int, int] | None, requested: str) -> AmpPolicy:
    """The mixed-precision policy for a device (pure: the capability is given, not detected).

    Args:
        device_type: ``torch.device.type`` (``"cuda"``, ``"cpu"``, ...).
        capability: CUDA compute capability ``(major, minor)``; None when unknown or not CUDA
            (an unknown CUDA capability is treated as pre-Ampere: fp16 works everywhere).
        requested: ``"auto"``, ``"bf16"``, ``"fp16"`` or ``"off"`` (``train.amp``).

    Returns:
        The :class:`AmpPolicy`.

    Raises:
        ValueError: On an unknown mode.
    """
    if requested == "off":
        return AmpPolicy(device_type, None, False, "amp off (requested)")
    if requested == "bf16":
        return AmpPolicy(device_type, torch.bfloat16, False, "bf16 (requested)")
    if requested == "fp16":
        return AmpPolicy(device_type, torch.float16, True, "fp16 + GradScaler (requested)")
    if requested != "auto":
        raise ValueError(f"unknown amp mode {requested!r}: expected auto, bf16, fp16 or off")
    if device_type != "cuda":
        return AmpPolicy(device_type, None, False, f"fp32: auto keeps full precision on {device_type}")
    if capability is not None and tuple(capability) >= BF16_MIN_CAPABILITY:
        return AmpPolicy(device_type, torch.bfloat16, False, f"bf16: capability {capability} >= (8, 0)")
    return AmpPolicy(device_type, torch.float16, True, f"fp16 + GradScaler: capability {capability} < (8, 0)")


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """CUDA compute capability of ``device`` (None for non-CUDA devices)."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def policy_for(device: torch.device, requested: str) -> AmpPolicy:
    """:func:`amp_policy` for a real device (its capability detected)."""
    return amp_policy(device.type, device_capability(device), requested)

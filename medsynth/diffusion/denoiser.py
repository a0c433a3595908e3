"""The one narrow interface between samplers and networks, and an evaluation counter."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]
"""``denoise(x, t, cond) -> prediction``.

* ``x``: noisy latents, shape ``(B, C, *spatial)``.
* ``t``: timesteps, shape ``(B,)``: int64 in ``[0, T)`` for the DDPM-family samplers, values in
  ``(0, T]`` for rectified flow.
* ``cond``: conditioning (e.g. the one-hot mask ``(B, K, *image_spatial)``) or ``None`` for the
  unconditional branch.
* returns the network's raw prediction, shaped like ``x``: epsilon, v or flow velocity according to
  the objective the network was trained with.
"""


class CountingDenoiser:
    """Wrap a :data:`Denoiser` and count its evaluations (the "number of network evaluations").

    Wrap the *network* (innermost), so that classifier-free guidance shows up as two evaluations
    per step.

    Attributes:
        calls: number of times the wrapped denoiser was called.
        items: sum of the batch sizes of those calls.
    """

    def __init__(self, denoise: Denoiser) -> None:
        self._denoise = denoise
        self.calls = 0
        self.items = 0

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """Evaluate the wrapped denoiser and count the call (same arguments and result)."""
        self.calls += 1
        self.items += int(x.shape[0])
        return self._denoise(x, t, cond)

    def reset(self) -> None:
        """Set both counters back to zero."""
        self.calls = 0
        self.items = 0

"""Classifier-free guidance, applied once as a :data:`Denoiser` wrapper."""

from __future__ import annotations

from torch import Tensor

from medsynth.diffusion.denoiser import Denoiser


def cfg_denoiser(denoise: Denoiser, guidance_scale: float, null_cond: Tensor | None = None) -> Denoiser:
    """Wrap ``denoise`` with classifier-free guidance.

    The result computes ``uncond + s * (cond - uncond)`` where ``cond = denoise(x, t, c)`` and
    ``uncond = denoise(x, t, null_cond)``. The combination is linear in the prediction, so it is valid
    for epsilon, v and flow-velocity outputs alike.

    * ``s == 1``: only the conditional branch is evaluated and returned unchanged (bit-exact).
    * a call with ``c is None``: the two branches coincide, so one evaluation is made.
    * otherwise: two evaluations per call (unconditional first, then conditional).

    Args:
        denoise: the network as a :data:`Denoiser`.
        guidance_scale: ``s`` (>= 0); 1 disables guidance, 0 gives the unconditional model.
        null_cond: conditioning passed to the unconditional branch (e.g. an all-background mask,
            shape ``(B, K, *spatial)``); ``None`` calls the denoiser with ``cond=None``.

    Returns:
        A :data:`Denoiser` with the same signature.

    Raises:
        ValueError: if ``guidance_scale`` is negative.
    """
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")
    scale = float(guidance_scale)

    def guided(x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if scale == 1.0 or cond is None:
            return denoise(x, t, cond)
        uncond_out = denoise(x, t, null_cond)
        cond_out = denoise(x, t, cond)
        return uncond_out + scale * (cond_out - uncond_out)

    return guided

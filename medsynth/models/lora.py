"""Low-rank adapters (peft LoRA) and full fine-tuning of chosen layers of the MONAI generator networks.

The adapted layers are the convolutions (``Conv2d``/``Conv3d``) and the attention projections
(``Linear`` layers inside MONAI's attention blocks: ``to_q``, ``to_k``, ``to_v``, ``out_proj``) of
the diffusion UNet and/or the ControlNet. peft's :func:`peft.inject_adapter_in_model` replaces each
target layer in place by a ``lora.Conv2d``/``lora.Conv3d``/``lora.Linear`` holding the frozen base
layer plus ``lora_A``/``lora_B`` (``lora_B`` starts at zero, so a fresh adapter leaves the network's
output unchanged). ``full`` fine-tunes the weights and biases of the same layers instead.

peft is an optional dependency (``pip install medsynth[adapt]``): it is imported only when a
network is wrapped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

from medsynth.errors import ConfigError

Method = Literal["none", "lora", "full"]
METHODS: tuple[str, ...] = ("none", "lora", "full")
ADAPTER_NAME = "default"
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ATTENTION = re.compile(r"(^|\.)attn\.(to_q|to_k|to_v|out_proj)$")


def target_layers(module: nn.Module, prefixes: Iterable[str] = ("",)) -> list[str]:
    """Names of the layers an adapter targets: convolutions and attention projections.

    Args:
        module: The network (e.g. a :class:`~medsynth.models.controlnet.ControlledUNet`).
        prefixes: Only layers whose name starts with one of these (``("unet.", "controlnet.")``).

    Returns:
        Full module names (as in ``module.named_modules()``), sorted.
    """
    pre = tuple(prefixes)
    out = []
    for name, m in module.named_modules():
        if not name.startswith(pre):
            continue
        if isinstance(m, _CONV) or (isinstance(m, nn.Linear) and _ATTENTION.search(name)):
            out.append(name)
    return sorted(out)


def peft_api() -> tuple[type, object]:
    """peft's ``LoraConfig`` and ``inject_adapter_in_model`` (a one-line error naming the extra without it)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:  # the optional extra
        raise ConfigError(
            "adaptation", f"LoRA needs peft ({exc}); install it with `pip install medsynth[adapt]`"
        ) from None
    return LoraConfig, inject_adapter_in_model


def wrap_lora(module: nn.Module, targets: list[str], rank: int, alpha: float | None = None) -> nn.Module:
    """Inject peft LoRA adapters into ``targets`` of ``module`` (in place) and freeze everything else.

    Args:
        module: The network.
        targets: Exact layer names (from :func:`target_layers`).
        rank: LoRA rank ``r``.
        alpha: LoRA scaling numerator (``lora_alpha``; the update is ``alpha / r * B A``); None: ``rank``.

    Returns:
        ``module`` with the adapters injected; only the ``lora_`` parameters require gradients.
    """
    if not targets:
        raise ValueError("no layers to adapt")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    lora_config, inject = peft_api()
    config = lora_config(  # type: ignore[operator]
        r=rank,
        lora_alpha=float(alpha if alpha is not None else rank),
        lora_dropout=0.0,
        target_modules="|".join(re.escape(t) for t in targets),  # a str: peft full-matches each layer name
        bias="none",
    )
    wrapped: nn.Module = inject(config, module, adapter_name=ADAPTER_NAME)  # type: ignore[operator]
    for name, p in wrapped.named_parameters():
        p.requires_grad_("lora_" in name)
    return wrapped


def adapter_names(module: nn.Module, method: Method, targets: list[str]) -> list[str]:
    """Names of the parameters an adaptation trains (and its adapter file holds).

    Args:
        module: The network (already wrapped with :func:`wrap_lora` for ``lora``).
        method: ``lora`` (the ``lora_A``/``lora_B`` weights) or ``full`` (weights and biases of ``targets``).
        targets: The adapted layers.

    Returns:
        Parameter names, in ``named_parameters()`` order.
    """
    if method == "lora":
        return [n for n, _ in module.named_parameters() if "lora_" in n]
    if method == "full":
        layers = set(targets)
        return [n for n, _ in module.named_parameters() if n.rpartition(".")[0] in layers]
    raise ValueError(f"method {method!r} trains no parameters")


class ParamSubset(nn.Module):
    """Some parameters of another network, shared (not copied): what a training loop optimises and saves.

    ``parameters()`` and ``state_dict()`` cover exactly these parameters (keys ``p0``, ``p1``, ... in
    the order of :attr:`names`), so a training loop's optimiser, EMA copy, gradient clipping and
    checkpoints see only the adapter, and loading a state dict writes into the shared network.

    Attributes:
        names: The parameters' names in the owning network.
    """

    def __init__(self, owner: nn.Module, names: list[str]) -> None:
        super().__init__()
        params = dict(owner.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"no parameters named {missing[:3]}")
        self.names = list(names)
        self.params = nn.ParameterList([params[n] for n in names])
        for p in self.params:
            p.requires_grad_(True)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """``{name in the owner: tensor}`` (detached, on the CPU, contiguous)."""
        return {n: p.detach().cpu().contiguous() for n, p in zip(self.names, self.params, strict=True)}

    def rename(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict of this module (``params.<i>`` keys) keyed by the owner's parameter names."""
        return {self.names[int(k.rsplit(".", 1)[1])]: v for k, v in state.items() if k.startswith("params.")}


def freeze_all_but(module: nn.Module, names: list[str]) -> None:
    """Gradients only for the named parameters of ``module``."""
    keep = set(names)
    for n, p in module.named_parameters():
        p.requires_grad_(n in keep)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameter elements of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

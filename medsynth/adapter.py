"""Site adapters of a trained generator: a folder of safetensors + JSON applied on top of the base networks.

An adapter changes some layers of the mask-conditioned denoiser (the diffusion UNet and/or the
ControlNet inside :class:`~medsynth.models.controlnet.ControlledUNet`); the autoencoder is never
adapted. Layout (never pickled)::

    <adapter>/adapter.json          method, rank, alpha, adapted networks and layers, base weight hashes, notes
    <adapter>/adapter.safetensors   the trained tensors, keyed by parameter name in the ControlledUNet

``lora``: the peft ``lora_A``/``lora_B`` weights of each adapted layer (applied by injecting the same
peft LoRA layers into the base networks and loading them); ``full``: the new weights and biases of
the same layers (loaded over the base weights).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medsynth.errors import DataError
from medsynth.fileio import sha256_file
from medsynth.generator import MaskGenerator
from medsynth.models.controlnet import ControlledUNet
from medsynth.models.lora import Method, target_layers, wrap_lora

ADAPTER_JSON, ADAPTER_WEIGHTS = "adapter.json", "adapter.safetensors"
NETWORKS = ("unet", "controlnet")


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter is (stored as ``adapter.json``).

    Attributes:
        method: ``lora`` or ``full``.
        rank: LoRA rank (0 for ``full``).
        alpha: LoRA ``lora_alpha`` (0 for ``full``).
        networks: Adapted networks of the ControlledUNet (``unet``, ``controlnet``).
        layers: Adapted layer names (convolutions and attention projections).
        trainable_parameters: Parameter elements trained.
        base: SHA-256 of the base generator's weight files (provenance; checked at load).
        info: Free-form JSON values (site, patients, steps, wall time, ...).
    """

    method: Method
    rank: int
    alpha: float
    networks: tuple[str, ...]
    layers: tuple[str, ...]
    trainable_parameters: int
    base: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "format": "medsynth-adapter/1",
            "method": self.method,
            "rank": self.rank,
            "alpha": self.alpha,
            "networks": list(self.networks),
            "layers": list(self.layers),
            "trainable_parameters": self.trainable_parameters,
            "base": self.base,
            "info": self.info,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> AdapterSpec:
        """Parse ``adapter.json`` (a one-line :class:`DataError` when it is not an adapter)."""
        if data.get("format") != "medsynth-adapter/1" or data.get("method") not in ("lora", "full"):
            raise DataError(where, "not a medsynth adapter (format/method missing or unknown)")
        return cls(
            method=data["method"],
            rank=int(data.get("rank", 0)),
            alpha=float(data.get("alpha", 0.0)),
            networks=tuple(data.get("networks", ())),
            layers=tuple(data.get("layers", ())),
            trainable_parameters=int(data.get("trainable_parameters", 0)),
            base=dict(data.get("base", {})),
            info=dict(data.get("info", {})),
        )


def adapted_layers(controlled: torch.nn.Module, networks: tuple[str, ...]) -> list[str]:
    """The layers an adapter of ``networks`` targets in a ControlledUNet."""
    bad = [n for n in networks if n not in NETWORKS]
    if bad or not networks:
        raise ValueError(f"adapted networks must be among {NETWORKS}, got {list(networks)}")
    return target_layers(controlled, tuple(f"{n}." for n in networks))


def prepare_for(controlled: torch.nn.Module, spec: AdapterSpec) -> torch.nn.Module:
    """Make ``controlled`` able to hold the adapter's tensors (inject LoRA layers; nothing for ``full``)."""
    if spec.method == "lora":
        return wrap_lora(controlled, list(spec.layers), spec.rank, spec.alpha)
    return controlled


def save_adapter(folder: str | Path, spec: AdapterSpec, tensors: dict[str, torch.Tensor]) -> Path:
    """Write an adapter folder atomically (a temporary sibling renamed into place; replaces ``folder``).

    Args:
        folder: The adapter folder.
        spec: Its description.
        tensors: ``{parameter name in the ControlledUNet: tensor}``.

    Returns:
        ``folder``.
    """
    out = Path(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS))
        (tmp / ADAPTER_JSON).write_text(json.dumps(spec.to_json(), indent=1), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_adapter(folder: str | Path) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """Read an adapter folder: its spec and tensors."""
    d = Path(folder)
    meta = d / ADAPTER_JSON
    if not meta.is_file() or not (d / ADAPTER_WEIGHTS).is_file():
        raise DataError(d, f"not a medsynth adapter folder ({ADAPTER_JSON} + {ADAPTER_WEIGHTS} expected)")
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(meta, f"unreadable adapter description ({exc.msg})") from None
    tensors: dict[str, torch.Tensor] = load_file(str(d / ADAPTER_WEIGHTS))
    return AdapterSpec.from_json(data, meta), tensors


def apply_to(controlled: torch.nn.Module, spec: AdapterSpec, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Put an adapter's tensors into a (prepared) ControlledUNet; every tensor must find its parameter."""
    params = dict(controlled.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise DataError(where, f"adapter does not fit this generator: no parameter {missing[0]!r} ({len(missing)})")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                have = tuple(params[name].shape)
                raise DataError(where, f"adapter does not fit this generator: {name} {tuple(t.shape)} vs {have}")
            params[name].copy_(t.to(params[name].device, params[name].dtype))


def apply_adapter(gen: MaskGenerator, folder: str | Path) -> MaskGenerator:
    """Apply an adapter folder to a loaded generator (in place) for synthesis; returns ``gen``.

    Raises:
        DataError: The folder is not an adapter, or it does not fit the generator's networks.
    """
    d = Path(folder)
    spec, tensors = load_adapter(d)
    net = gen.denoiser_net
    if not isinstance(net, ControlledUNet):
        raise DataError(d, "adapters apply to a mask-conditioned generator (UNet + ControlNet)")
    prepare_for(net, spec)
    apply_to(net, spec, tensors, d)
    net.requires_grad_(False)
    net.eval()
    gen.hashes[f"adapter/{spec.method}"] = sha256_file(d / ADAPTER_WEIGHTS)
    return gen

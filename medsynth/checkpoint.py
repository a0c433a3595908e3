"""Checkpoints: safetensors weights + JSON (config, step, optimiser structure); never pickled code.

Layout of a training run's checkpoint folder::

    checkpoints/step-0000500/
        <name>.safetensors      weights of each network (e.g. ``autoencoder``, ``autoencoder_ema``)
        state.safetensors       optimiser tensors (moments, step counters)
        state.json              step, optimiser structure and hyper-parameters, LR schedule, extras
        config.json             the resolved configuration that produced it
    checkpoints/latest.json     pointer to the newest complete checkpoint
    checkpoints/final.json      pointer written when training finished

Each step folder is written under a temporary name and renamed into place, and the pointer is
replaced atomically afterwards, so a run killed at any moment leaves either the previous or the
new checkpoint, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medsynth.errors import DataError
from medsynth.fileio import sha256_file, write_json_atomic

LATEST, FINAL = "latest.json", "final.json"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars, "ids": [str(i) for i in state["state"]]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(meta["scalars"].get(pid, {})) for pid in meta["ids"]}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state[int(pid)][name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder on disk."""

    path: Path

    @property
    def state(self) -> dict[str, Any]:
        """The JSON state (step, extras, optimiser structure)."""
        data: dict[str, Any] = json.loads((self.path / "state.json").read_text(encoding="utf-8"))
        return data

    @property
    def step(self) -> int:
        """Optimiser steps completed when it was written."""
        return int(self.state["step"])

    @property
    def extras(self) -> dict[str, Any]:
        """Extra values stored with the checkpoint (e.g. the latent scale factor)."""
        return dict(self.state.get("extras", {}))

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """The state dict of network ``name``."""
        f = self.path / f"{name}.safetensors"
        if not f.is_file():
            raise DataError(f, f"checkpoint has no weights named {name!r}")
        out: dict[str, torch.Tensor] = load_file(str(f))
        return out

    def load_into(self, name: str, module: torch.nn.Module, strict: bool = True) -> None:
        """Load network ``name`` into ``module``."""
        module.load_state_dict(self.weights(name), strict=strict)

    def file_hashes(self) -> dict[str, str]:
        """SHA-256 of every weights file (recorded in synthesis provenance)."""
        return {f.stem: sha256_file(f) for f in sorted(self.path.glob("*.safetensors")) if f.stem != "state"}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    networks: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    extras: dict[str, Any] | None = None,
    keep: int = 2,
    final: bool = False,
) -> Checkpoint:
    """Write a checkpoint atomically and point ``latest.json`` (and ``final.json``) at it.

    Args:
        run_dir: The training run's folder; checkpoints go to ``run_dir/checkpoints``.
        step: Completed optimiser steps.
        networks: Named modules whose ``state_dict`` is saved as safetensors.
        optimizers: Named optimisers (state saved for resuming).
        schedulers: Named LR schedulers (their JSON-compatible ``state_dict``).
        config: Resolved configuration (JSON dict) saved as ``config.json``.
        extras: JSON-compatible values, e.g. ``{"scale_factor": 0.87}``.
        keep: Step folders kept (older ones are removed; the final one is kept).
        final: Also write ``final.json`` (training completed).

    Returns:
        The written :class:`Checkpoint`.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        for key, module in networks.items():
            sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
            save_file(sd, str(tmp / f"{key}.safetensors"))
        opt_meta: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        for key, opt in (optimizers or {}).items():
            t, meta = _flatten_optimizer(opt.state_dict())
            tensors.update({f"{key}/{k}": v for k, v in t.items()})
            opt_meta[key] = meta
        if tensors:
            save_file(tensors, str(tmp / "state.safetensors"))
        state = {
            "step": step,
            "optimizers": opt_meta,
            "schedulers": {k: s.state_dict() for k, s in (schedulers or {}).items()},
            "extras": extras or {},
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float), encoding="utf-8")
        (tmp / "config.json").write_text(json.dumps(config or {}, indent=2), encoding="utf-8")
        target = root / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    write_json_atomic(root / LATEST, {"path": name, "step": step})
    if final:
        write_json_atomic(root / FINAL, {"path": name, "step": step})
    protected = {name}
    fin = root / FINAL
    if fin.is_file():
        protected.add(json.loads(fin.read_text(encoding="utf-8"))["path"])
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)
    return Checkpoint(target)


def find_checkpoint(run_dir: str | Path, which: str = "latest") -> Checkpoint | None:
    """The checkpoint ``latest.json`` or ``final.json`` points to, or None if there is none."""
    root = Path(run_dir) / "checkpoints"
    ptr = root / (FINAL if which == "final" else LATEST)
    if not ptr.is_file():
        return None
    path = root / json.loads(ptr.read_text(encoding="utf-8"))["path"]
    return Checkpoint(path) if (path / "state.json").is_file() else None


def restore_training_state(
    ckpt: Checkpoint,
    networks: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
) -> int:
    """Load networks, optimisers and schedulers from ``ckpt``; returns the step to continue from."""
    for key, module in networks.items():
        ckpt.load_into(key, module)
    state = ckpt.state
    if optimizers:
        f = ckpt.path / "state.safetensors"
        all_t = load_file(str(f)) if f.is_file() else {}
        for key, opt in optimizers.items():
            t = {k.split("/", 1)[1]: v for k, v in all_t.items() if k.startswith(f"{key}/")}
            tuples = [[k for k, v in g.items() if isinstance(v, tuple)] for g in opt.param_groups]
            opt.load_state_dict(_unflatten_optimizer(t, state["optimizers"][key]))
            for group, keys in zip(opt.param_groups, tuples, strict=True):  # JSON turned tuples (betas) into lists
                group.update({k: tuple(group[k]) for k in keys if isinstance(group.get(k), list)})
    for key, sched in (schedulers or {}).items():
        sched.load_state_dict(state["schedulers"][key])
    return int(state["step"])


def completed_checkpoint(run_dir: str | Path, input_key: str | None) -> Checkpoint | None:
    """The final checkpoint of ``run_dir`` if it was produced from the same inputs (``input_key``).

    A stage whose final checkpoint carries the same input key has nothing left to do. Without a
    key (direct library use) nothing is considered complete.
    """
    if input_key is None:
        return None
    ckpt = find_checkpoint(run_dir, "final")
    return ckpt if ckpt is not None and ckpt.extras.get("input_key") == input_key else None


def resumable_checkpoint(run_dir: str | Path, input_key: str | None, resume: bool) -> Checkpoint | None:
    """The latest checkpoint to resume from, or None.

    Only a checkpoint written from the same inputs is resumed: after a config or data change a stage
    starts over instead of continuing a run that optimised something else.
    """
    if not resume:
        return None
    ckpt = find_checkpoint(run_dir)
    if ckpt is None:
        return None
    if input_key is not None and ckpt.extras.get("input_key") != input_key:
        return None
    return ckpt

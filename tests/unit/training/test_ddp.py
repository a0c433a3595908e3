"""Distributed data-parallel training of the diffusion UNet: 2 CPU processes, gloo backend.

Two forked processes get the environment torchrun would give them (MASTER_ADDR/PORT, WORLD_SIZE, RANK,
LOCAL_RANK) and run ``train_diffusion``; ``StageContext.create`` initialises the process group from it.
Each reports a checksum of its UNet weights and the checkpoints it wrote. Ranks draw different batches
and noise, so identical weights at the end show the gradients were all-reduced.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist

from medsynth.checkpoint import find_checkpoint
from medsynth.config.loader import config_dict, validate_config
from medsynth.config.schema import MedsynthConfig
from medsynth.generator import UNET
from medsynth.training import context, diffusion
from medsynth.training.context import StageContext

from .conftest import tiny_cfg

WORLD = 2
STEPS = 6
CKPT_EVERY = 3


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode() + state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_latents(folder: Path, n: int = 8) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    np.savez(
        folder / "train.npz",
        latents=rng.normal(0.5, 2.0, (n, 2, 8, 8)).astype(np.float32),
        masks=rng.integers(0, 5, (n, 1, 16, 16)).astype(np.uint8),
        images=rng.random((n, 1, 16, 16)).astype(np.float32),
        item_ids=np.array([f"item{i}" for i in range(n)]),
        scale_factor=np.array(0.5),
        num_classes=np.array(5),
    )


def test_ddp_two_cpu_ranks_stay_in_sync(tmp_path: Path) -> None:
    cfg = tiny_cfg(
        2, diffusion={"train": {"steps": STEPS, "ckpt_every": CKPT_EVERY, "val_every": 3, "keep_checkpoints": 5}}
    )
    (tmp_path / "cfg.json").write_text(json.dumps(config_dict(cfg)))
    _write_latents(tmp_path / "latents")
    port = _free_port()
    # fork: the children inherit the imported torch/MONAI/medsynth (a fresh interpreter spends ~10 s importing)
    ctx = torch.multiprocessing.start_processes(
        _worker, args=(WORLD, port, tmp_path), nprocs=WORLD, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=2):  # raises if a worker raised
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 120 s")
    res = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(WORLD)]
    assert [r["rank"] for r in res] == [0, 1] and all(r["world"] == WORLD for r in res)
    assert all(r["distributed"] for r in res)
    # identical weights on both ranks (gathered in-process and compared here), different from the start
    assert res[0]["gathered"] == res[1]["gathered"] == [res[0]["final"], res[1]["final"]]
    assert res[0]["final"] == res[1]["final"]
    assert res[0]["initial"] == res[1]["initial"] != res[0]["final"]
    # the batches the training loop itself drew (its record in the result), per step: disjoint across
    # ranks, and together one epoch of the 8 items every 2 steps (global batch 2 ranks x 2)
    drawn = [r["drawn"] for r in res]
    assert len(drawn[0]) == len(drawn[1]) == STEPS
    for s in range(STEPS):
        assert not set(drawn[0][s]) & set(drawn[1][s]), f"step {s}: both ranks drew {drawn[0][s]}, {drawn[1][s]}"
    for s in range(0, STEPS, 2):
        epoch = [i for r in range(WORLD) for i in drawn[r][s] + drawn[r][s + 1]]
        assert sorted(epoch) == list(range(8)), epoch
    # rank 0 alone wrote checkpoints: the intermediate one and the final one
    assert res[0]["saves"] == [[CKPT_EVERY, False], [STEPS, True]]
    assert res[1]["saves"] == []
    final = find_checkpoint(tmp_path / "run", "final")
    assert final is not None and final.step == STEPS
    assert _digest(final.weights(UNET)) == res[0]["final"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == [
        f"step-{CKPT_EVERY:07d}",
        f"step-{STEPS:07d}",
    ]


def _worker(rank: int, world: int, port: int, root: Path) -> None:  # pragma: no cover - runs in the children
    # the environment torchrun gives each process
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    cfg = validate_config(json.loads((root / "cfg.json").read_text(encoding="utf-8")), "cfg.json", MedsynthConfig)
    built: list[tuple[torch.nn.Module, str]] = []
    saves: list[list[Any]] = []
    build, save = diffusion.build_diffusion_unet, context.save_checkpoint

    def build_and_keep(*args: Any, **kwargs: Any) -> torch.nn.Module:
        net = build(*args, **kwargs)
        built.append((net, _digest(net.state_dict())))
        return net

    def save_and_record(run_dir: Any, step: int, *args: Any, **kwargs: Any) -> Any:
        saves.append([step, bool(kwargs.get("final", False))])
        return save(run_dir, step, *args, **kwargs)

    diffusion.build_diffusion_unet = build_and_keep  # type: ignore[assignment]
    context.save_checkpoint = save_and_record  # type: ignore[assignment]  # StageContext.save writes through it

    ctx = StageContext.create(root / "run", device="cpu")
    result = diffusion.train_diffusion(cfg, root / "latents", ctx)
    ((unet, initial),) = built
    final = _digest(unet.state_dict())
    gathered: list[Any] = [None] * ctx.dist.world_size
    dist.all_gather_object(gathered, final)
    out = {
        "rank": ctx.dist.rank,
        "world": ctx.dist.world_size,
        "distributed": dist.is_initialized() and ctx.dist.active,
        "initial": initial,
        "final": final,
        "gathered": gathered,
        "saves": saves,
        "drawn": [list(b) for b in result.drawn],
    }
    (root / f"rank{ctx.dist.rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()

"""A non-finite loss stops a training stage with a clear error; no NaN reaches a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsynth.checkpoint import find_checkpoint
from medsynth.errors import NonFiniteLossError
from medsynth.training.autoencoder import AE, train_autoencoder
from medsynth.training.common import optimizer_step
from medsynth.training.context import StageContext


def test_optimizer_step_refuses_a_nan_loss_before_touching_the_weights() -> None:
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = [p.detach().clone() for p in net.parameters()]
    loss = net(torch.ones(2, 3)).sum() * float("nan")
    with pytest.raises(NonFiniteLossError, match=r"run-x: non-finite loss \(nan\) at step 8"):
        optimizer_step(loss, net, opt, step=7, where="run-x")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    finite = net(torch.ones(2, 3)).sum()
    optimizer_step(finite, net, opt)  # a finite loss updates
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_diverging_autoencoder_stops_and_keeps_finite_checkpoints(cache2d, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = cache2d.cfg(autoencoder={"train": {"steps": 12, "lr": 1e30, "warmup_steps": 0, "ckpt_every": 1}})
    run = tmp_path / "ae"
    with pytest.raises(NonFiniteLossError) as err:
        train_autoencoder(cfg, cache2d.cache_dir, StageContext.create(run, device="cpu"))
    assert str(run) in str(err.value) and err.value.step is not None and err.value.step < 12
    assert find_checkpoint(run, "final") is None
    last = find_checkpoint(run, "latest")
    assert last is not None and 1 <= last.step <= err.value.step  # the steps before the bad one were saved
    assert all(bool(torch.isfinite(w).all()) for w in last.weights(AE).values())

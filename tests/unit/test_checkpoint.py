"""Checkpoints (medsynth.checkpoint): exact round trip, no pickles, pointers, pruning, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medsynth.checkpoint import (
    FINAL,
    LATEST,
    Checkpoint,
    find_checkpoint,
    restore_training_state,
    save_checkpoint,
)
from medsynth.config.training import OptimConfig
from medsynth.fileio import sha256_file
from medsynth.training.common import make_ema, make_optimizer


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _trained(steps: int = 3) -> tuple[torch.nn.Module, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    net = _net()
    opt, sched = make_optimizer(net.parameters(), OptimConfig(lr=1e-2, warmup_steps=5))
    for _ in range(steps):
        loss = net(torch.randn(6, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net, opt, sched


def _fresh() -> tuple[torch.nn.Module, torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(1)  # different initial weights from _trained
    net = _net()
    opt, sched = make_optimizer(net.parameters(), OptimConfig(lr=1e-2, warmup_steps=5))
    return net, opt, sched


def _assert_state_dicts_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def _latest(root: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((root / "checkpoints" / LATEST).read_text(encoding="utf-8"))
    return data


def test_round_trip_restores_weights_optimizer_and_schedule(tmp_path: Path) -> None:
    net, opt, sched = _trained()
    ema = make_ema(net, 0.9)
    assert ema is not None
    ema.update_parameters(net)
    save_checkpoint(
        tmp_path, 3, {"net": net, "net_ema": ema}, {"opt": opt}, {"opt": sched}, {"a": 1}, extras={"scale_factor": 0.5}
    )

    net2, opt2, sched2 = _fresh()
    ema2 = make_ema(net2, 0.9)
    assert ema2 is not None
    ckpt = find_checkpoint(tmp_path)
    assert ckpt is not None
    step = restore_training_state(ckpt, {"net": net2, "net_ema": ema2}, {"opt": opt2}, {"opt": sched2})

    assert step == 3 and ckpt.step == 3
    assert ckpt.extras == {"scale_factor": 0.5}
    assert json.loads((ckpt.path / "config.json").read_text(encoding="utf-8")) == {"a": 1}
    _assert_state_dicts_equal(net.state_dict(), net2.state_dict())  # BatchNorm buffers included
    _assert_state_dicts_equal(ema.state_dict(), ema2.state_dict())  # n_averaged included
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["param_groups"] == sd2["param_groups"]  # types too: betas stays a tuple
    assert sd["state"].keys() == sd2["state"].keys()
    for pid, pstate in sd["state"].items():
        assert pstate.keys() == sd2["state"][pid].keys()
        for k, v in pstate.items():
            assert torch.equal(v, sd2["state"][pid][k]), (pid, k)
    assert sched.state_dict() == sched2.state_dict()
    assert sched2.get_last_lr() == sched.get_last_lr()

    # the restored optimiser continues exactly like the original one
    x = torch.randn(6, 3)
    for n, o, s in ((net, opt, sched), (net2, opt2, sched2)):
        loss = n(x).pow(2).mean()
        o.zero_grad()
        loss.backward()
        o.step()
        s.step()
    _assert_state_dicts_equal(net.state_dict(), net2.state_dict())


def test_checkpoint_holds_only_safetensors_and_json(tmp_path: Path) -> None:
    net, opt, sched = _trained()
    ckpt = save_checkpoint(tmp_path, 3, {"net": net}, {"opt": opt}, {"opt": sched}, {"a": 1}, final=True)
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert files
    assert {p.suffix for p in files} <= {".safetensors", ".json"}, sorted(p.name for p in files)
    assert {p.name for p in ckpt.path.iterdir()} == {
        "net.safetensors",
        "state.safetensors",
        "state.json",
        "config.json",
    }
    for p in files:  # no pickle stream anywhere (pickle protocol 2+ starts with 0x80)
        assert not p.read_bytes().startswith(b"\x80"), p
    assert ckpt.file_hashes() == {"net": sha256_file(ckpt.path / "net.safetensors")}


def test_latest_points_at_newest_and_keep_prunes_older(tmp_path: Path) -> None:
    net, opt, sched = _trained()
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, {"net": net}, {"opt": opt}, {"opt": sched}, keep=2)
        assert _latest(tmp_path) == {"path": f"step-{step:07d}", "step": step}
        latest = find_checkpoint(tmp_path)
        assert latest is not None and latest.step == step
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000003", "step-0000004"]
    assert find_checkpoint(tmp_path, "final") is None

    final = save_checkpoint(tmp_path, 5, {"net": net}, {"opt": opt}, {"opt": sched}, keep=2, final=True)
    assert json.loads((root / FINAL).read_text(encoding="utf-8")) == {"path": "step-0000005", "step": 5}
    # a continued run writes more checkpoints: the final one is never pruned
    for step in (6, 7, 8):
        save_checkpoint(tmp_path, step, {"net": net}, {"opt": opt}, {"opt": sched}, keep=2)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000005", "step-0000007", "step-0000008"]
    found = find_checkpoint(tmp_path, "final")
    assert found == final and found.step == 5
    latest = find_checkpoint(tmp_path)
    assert latest is not None and latest.step == 8


def test_keep_one_keeps_only_the_newest(tmp_path: Path) -> None:
    net = _net()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"net": net}, keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-0000003"]


class _Exploding(torch.nn.Module):
    """A network whose weights cannot be serialised (state_dict raises half-way through the save)."""

    def state_dict(self, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:  # type: ignore[override]
        raise RuntimeError("disk on fire")


def test_crash_while_writing_leaves_previous_checkpoint_intact(tmp_path: Path) -> None:
    net, opt, sched = _trained()
    save_checkpoint(tmp_path, 4, {"net": net}, {"opt": opt}, {"opt": sched}, final=True)
    root = tmp_path / "checkpoints"
    before = _snapshot(root)

    # the exploding network comes after a network that was already written into the temporary folder
    with pytest.raises(RuntimeError, match="disk on fire"):
        save_checkpoint(tmp_path, 8, {"net": net, "bad": _Exploding()}, {"opt": opt}, {"opt": sched})

    assert _snapshot(root) == before  # same files, same bytes: latest.json/final.json unchanged
    assert not (root / "step-0000008").exists()
    assert sorted(p.name for p in root.iterdir()) == [FINAL, LATEST, "step-0000004"]  # no temporary folder left
    ckpt = find_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.step == 4
    net2, opt2, sched2 = _fresh()
    assert restore_training_state(ckpt, {"net": net2}, {"opt": opt2}, {"opt": sched2}) == 4
    _assert_state_dicts_equal(net.state_dict(), net2.state_dict())


def test_find_checkpoint_ignores_pointer_to_missing_folder(tmp_path: Path) -> None:
    assert find_checkpoint(tmp_path) is None
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / LATEST).write_text(json.dumps({"path": "step-0000009", "step": 9}))
    assert find_checkpoint(tmp_path) is None
    assert isinstance(save_checkpoint(tmp_path, 1, {"net": _net()}), Checkpoint)

"""Mixed-precision policy (capability given, not detected), loss scaling and device-side loss means."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsynth.checkpoint import find_checkpoint
from medsynth.config.training import OptimConfig
from medsynth.training.common import make_scaler, optimizer_step
from medsynth.training.context import StageContext, StepMeans, log_due
from medsynth.training.diffusion import train_diffusion
from medsynth.training.precision import amp_policy


@pytest.mark.parametrize(
    ("capability", "dtype", "scaler"),
    [
        ((7, 5), torch.float16, True),  # Turing (T4): no native bf16 -> fp16 + loss scaling
        ((7, 0), torch.float16, True),  # Volta (V100)
        (None, torch.float16, True),  # unknown CUDA capability: fp16 works everywhere
        ((8, 0), torch.bfloat16, False),  # Ampere (A100)
        ((9, 0), torch.bfloat16, False),  # Hopper (H100/H200)
    ],
)
def test_auto_on_cuda_follows_capability(capability: tuple[int, int] | None, dtype: torch.dtype, scaler: bool) -> None:
    p = amp_policy("cuda", capability, "auto")
    assert (p.dtype, p.use_scaler, p.enabled) == (dtype, scaler, True)
    assert p.name == ("fp16" if dtype == torch.float16 else "bf16")


@pytest.mark.parametrize(
    ("requested", "dtype", "scaler"),
    [("auto", None, False), ("off", None, False), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True)],
)
def test_cpu_does_what_is_configured(requested: str, dtype: torch.dtype | None, scaler: bool) -> None:
    p = amp_policy("cpu", None, requested)
    assert (p.dtype, p.use_scaler) == (dtype, scaler)
    assert (p.make_scaler() is not None) == scaler


def test_requested_mode_overrides_capability() -> None:
    assert amp_policy("cuda", (9, 0), "off").dtype is None
    assert amp_policy("cuda", (9, 0), "fp16").use_scaler
    assert amp_policy("cuda", (7, 5), "bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown amp mode"):
        amp_policy("cuda", (8, 0), "fp8")


def test_cpu_autocast_context_casts_only_when_enabled() -> None:
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with amp_policy("cpu", None, "bf16").autocast():
        assert lin(x).dtype == torch.bfloat16
    with amp_policy("cpu", None, "auto").autocast():
        assert lin(x).dtype == torch.float32


def test_yaml_off_and_fp16_are_accepted() -> None:
    assert OptimConfig(amp=False).amp == "off"  # type: ignore[arg-type]  # YAML 1.1 reads `off` as False
    assert OptimConfig(amp="fp16").amp == "fp16"
    with pytest.raises(ValueError):
        OptimConfig(amp=True)  # type: ignore[arg-type]


def _sgd_step(scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(16, 8) * 10
    loss = net(x).pow(2).mean()
    optimizer_step(loss, net, opt, grad_clip=0.5, scaler=scaler)
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_scaled_step_unscales_before_clipping() -> None:
    # with SGD the update is linear in the gradient, so clipping the *scaled* gradient would shrink
    # the step by the scale (65536); unscaling first must give exactly the unscaled update
    scaler = torch.amp.GradScaler("cpu")
    plain, scaled = _sgd_step(None), _sgd_step(scaler)
    assert torch.allclose(plain, scaled, atol=1e-6)
    assert scaler.get_scale() == 65536.0  # finite gradients: step taken, scale kept


def test_make_scaler_only_for_fp16() -> None:
    cpu = torch.device("cpu")
    assert make_scaler(cpu, "auto") is None and make_scaler(cpu, "bf16") is None
    assert isinstance(make_scaler(cpu, "fp16"), torch.amp.GradScaler)


def test_step_means_average_since_last_read() -> None:
    m = StepMeans()
    assert m.means() == {}
    for v in (1.0, 2.0, 3.0):
        m.add(loss=torch.tensor(v), l1=torch.tensor(2 * v))
    assert m.means() == pytest.approx({"loss": 2.0, "l1": 4.0})
    m.add(loss=torch.tensor(10.0))
    assert m.means() == pytest.approx({"loss": 10.0})  # reset after each read


def test_log_due_every_ten_steps_and_at_the_end() -> None:
    assert [d for d in range(1, 26) if log_due(d, 25)] == [10, 20, 25]


@pytest.fixture(scope="module")
def latents(cache2d, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A latent cache folder of a tiny 2D autoencoder (its run folder next to it)."""
    from medsynth.training.autoencoder import train_autoencoder
    from medsynth.training.latents import encode_split

    root = tmp_path_factory.mktemp("precision")
    cfg = cache2d.cfg(autoencoder={"train": {"steps": 2}})
    train_autoencoder(cfg, cache2d.cache_dir, StageContext.create(root / "ae", device="cpu"))
    for split in ("train", "val"):
        encode_split(cfg, cache2d.cache_dir, root / "ae", root / "lat", split)
    return root / "lat"


def _final_weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    ckpt = find_checkpoint(run, "final")
    assert ckpt is not None
    return ckpt.weights(name)


def test_fp16_training_on_cpu_checkpoints_its_loss_scaler(cache2d, latents: Path, tmp_path: Path) -> None:
    """fp16 + GradScaler end to end (the pre-Ampere GPU path, run on the CPU): finite loss, scaler saved."""
    cfg = cache2d.cfg(autoencoder={"train": {"steps": 2}}, diffusion={"train": {"steps": 4, "amp": "fp16"}})
    res = train_diffusion(cfg, latents, StageContext.create(tmp_path / "unet", device="cpu"))
    ckpt = find_checkpoint(tmp_path / "unet", "final")
    assert ckpt is not None
    scaler_state = ckpt.state["schedulers"]["unet_scaler"]
    assert scaler_state["scale"] > 0
    assert torch.isfinite(torch.tensor(res.metrics["val_loss"]))


def test_staging_keeps_cpu_data_and_stages_cuda_splits_by_size() -> None:
    from medsynth.training.common import stage_split, staging_choice

    assert staging_choice(10 * 2**20, "cpu", 2048) == "host"
    assert staging_choice(10 * 2**20, "cuda", 2048) == "device"  # fits: on the GPU once
    assert staging_choice(10 * 2**20, "cuda", 5) == "pinned"  # too large: pinned host memory
    assert staging_choice(1, "cuda", 0) == "pinned"
    t = torch.zeros(4, 1, 8, 8)
    assert stage_split(t, torch.device("cpu"), 2048) is t  # CPU: the very same tensor, no copy


def test_channels_last_changes_layout_not_learning(cache2d, latents: Path, tmp_path: Path) -> None:
    runs = {}
    for flag in (False, True):
        cfg = cache2d.cfg(diffusion={"train": {"steps": 3, "channels_last": flag}})
        train_diffusion(cfg, latents, StageContext.create(tmp_path / f"cl{flag}", device="cpu"))
        runs[flag] = _final_weights(tmp_path / f"cl{flag}", "unet")
    assert runs[False].keys() == runs[True].keys()
    for k, v in runs[False].items():
        assert torch.allclose(v, runs[True][k], atol=1e-5), k


def test_bf16_controlnet_training_on_cpu(cache2d, latents: Path, tmp_path: Path) -> None:
    """The documented CPU choice (controlnet.train.amp: bf16) trains end to end with a finite loss."""
    from medsynth.training.controlnet import train_controlnet

    base = cache2d.cfg(diffusion={"train": {"steps": 2}})
    train_diffusion(base, latents, StageContext.create(tmp_path / "unet", device="cpu"))
    cfg = cache2d.cfg(diffusion={"train": {"steps": 2}}, controlnet={"train": {"steps": 3, "amp": "bf16"}})
    res = train_controlnet(cfg, latents, tmp_path / "unet", StageContext.create(tmp_path / "cn", device="cpu"))
    assert torch.isfinite(torch.tensor(res.metrics["val_loss"]))
    assert all(torch.isfinite(v).all() for v in _final_weights(tmp_path / "cn", "controlnet").values())


def test_maybe_compile_wraps_only_when_asked() -> None:
    from medsynth.training.common import maybe_compile

    net = torch.nn.Linear(2, 2)
    assert maybe_compile(net, False) is net
    compiled = maybe_compile(net, True)  # compiled lazily: nothing runs here
    assert compiled is not net and getattr(compiled, "_orig_mod", None) is net


def test_sync_free_ema_equals_torch_averaged_model() -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from medsynth.training.common import SyncFreeEMA

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))  # parameters and buffers
    ref = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ours = SyncFreeEMA(net, 0.9)
    for _ in range(4):
        net(torch.randn(8, 3))  # moves the BatchNorm buffers
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ref.update_parameters(net)
        ours.update_parameters(net)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ours.state_dict().items())
    # after a checkpoint load the loaded counter counts, not the one seen before: here a fresh state
    # (counter 0) is loaded into a copy that had updated once, so the next update must copy again
    fresh = SyncFreeEMA(net, 0.9).state_dict()
    resumed = SyncFreeEMA(net, 0.9)
    resumed.update_parameters(net)
    resumed.load_state_dict(fresh)
    ref2 = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ref2.load_state_dict(fresh)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    for m in (ref2, resumed):
        m.update_parameters(net)
    assert all(torch.equal(v, ref2.state_dict()[k]) for k, v in resumed.state_dict().items())

"""LoRA / full adapters on the real MONAI UNet + ControlNet at toy sizes: wrapping, gradients, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsynth.adapter import AdapterSpec, adapted_layers, apply_to, load_adapter, prepare_for, save_adapter
from medsynth.config.generative import ControlNetConfig, DiffusionUNetConfig
from medsynth.models.controlnet import ControlledUNet, build_controlnet, init_controlnet_from_unet
from medsynth.models.lora import ParamSubset, adapter_names, count_parameters, freeze_all_but, wrap_lora
from medsynth.models.unet import build_diffusion_unet

pytest.importorskip("peft")

K = 3  # mask classes


def _controlled(seed: int = 0) -> ControlledUNet:
    torch.manual_seed(seed)
    ucfg = DiffusionUNetConfig.model_validate(
        {
            "network": {
                "channels": [8, 16],
                "attention_levels": [False, True],
                "num_res_blocks": 1,
                "num_head_channels": 8,
                "norm_num_groups": 4,
            }
        }
    )
    ccfg = ControlNetConfig.model_validate({"network": {"conditioning_embedding_num_channels": [8, 8]}})
    unet = build_diffusion_unet(ucfg, 2, 2)
    cn = build_controlnet(ccfg, ucfg, 2, 2, K, 2)
    init_controlnet_from_unet(cn, unet)
    with torch.no_grad():  # "trained" networks: no zero-initialised output convolutions left
        for p in [*unet.parameters(), *cn.parameters()]:
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.05)
    return ControlledUNet(unet, cn).eval()


def _loss(out: torch.Tensor) -> torch.Tensor:
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return (out - target).square().mean()


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 8, 8, generator=g)
    t = torch.tensor([3, 40])
    mask = torch.zeros(2, K, 16, 16)
    mask[:, 0] = 1
    mask[:, 0, 4:9, 4:9], mask[:, 2, 4:9, 4:9] = 0, 1
    return x, t, mask


def _prepare(net: ControlledUNet, method: str, rank: int = 2) -> tuple[list[str], ParamSubset]:
    layers = adapted_layers(net, ("unet", "controlnet"))
    if method == "lora":
        wrap_lora(net, layers, rank)
    names = adapter_names(net, method, layers)  # type: ignore[arg-type]
    freeze_all_but(net, names)
    return layers, ParamSubset(net, names)


def test_lora_wraps_the_convolutions_and_attention_projections_of_both_networks() -> None:
    from peft.tuners.lora import layer as lora_layer

    net = _controlled()
    layers = adapted_layers(net, ("unet", "controlnet"))
    assert any(n.startswith("unet.") for n in layers) and any(n.startswith("controlnet.") for n in layers)
    assert "unet.middle_block.attention.attn.to_q" in layers and "unet.time_embed.0" not in layers
    wrap_lora(net, layers, rank=2)
    mods = dict(net.named_modules())
    for name in layers:
        assert isinstance(mods[name], lora_layer.LoraLayer), name
    assert not isinstance(mods["unet.time_embed.0"], lora_layer.LoraLayer)  # not a conv or attention layer
    assert isinstance(mods["unet.conv_in.conv"], lora_layer.Conv2d)
    assert isinstance(mods["unet.middle_block.attention.attn.to_v"], lora_layer.Linear)


def test_a_fresh_lora_adapter_leaves_the_output_unchanged_and_only_adapter_weights_get_gradients() -> None:
    net = _controlled()
    x, t, mask = _inputs()
    with torch.no_grad():
        before = net(x, t, mask).clone()
    _, subset = _prepare(net, "lora")
    with torch.no_grad():
        assert torch.allclose(net(x, t, mask), before, atol=1e-6)  # lora_B starts at zero
    _loss(net(x, t, mask)).backward()
    trained = {n for n, p in net.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)
    assert trained == set(subset.names)
    assert any(".lora_B." in n and net.get_parameter(n).grad.abs().sum() > 0 for n in trained)


def test_lora_trains_far_fewer_parameters_than_full_fine_tuning_of_the_same_layers() -> None:
    lora_net, full_net = _controlled(), _controlled()
    _prepare(lora_net, "lora", rank=2)
    _, full = _prepare(full_net, "full")
    n_lora, n_full = count_parameters(lora_net, trainable_only=True), count_parameters(full_net, trainable_only=True)
    assert n_full == sum(p.numel() for p in full.parameters())
    assert 0 < n_lora < n_full / 5, (n_lora, n_full)
    assert n_full < count_parameters(full_net)  # norms, time embedding and mask embedding stay frozen


@pytest.mark.parametrize("method", ["lora", "full"])
def test_adapter_save_load_round_trip_reproduces_the_outputs_and_leaves_base_weights(
    method: str, tmp_path: Path
) -> None:
    net = _controlled()
    base = {n: p.detach().clone() for n, p in net.named_parameters()}
    layers, subset = _prepare(net, method)
    opt = torch.optim.SGD(subset.parameters(), lr=0.5)
    x, t, mask = _inputs()
    for _ in range(3):  # a few updates: the adapter differs from its initial state
        opt.zero_grad()
        _loss(net(x, t, mask)).backward()
        opt.step()
    with torch.no_grad():
        adapted = net(x, t, mask).clone()
    tensors = subset.rename(subset.state_dict())
    assert set(tensors) == set(subset.names)
    spec = AdapterSpec(method, 2 if method == "lora" else 0, 2.0, ("unet", "controlnet"), tuple(layers), 1)
    folder = save_adapter(tmp_path / "adapter", spec, tensors)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter.json", "adapter.safetensors"]
    if method == "lora":  # LoRA never touches the base weights it wraps
        now = {n.replace(".base_layer", ""): p for n, p in net.named_parameters() if "lora_" not in n}
        assert all(torch.equal(now[n], base[n]) for n in base)

    fresh = _controlled()
    with torch.no_grad():
        assert not torch.allclose(fresh(x, t, mask), adapted, atol=1e-5)  # the adapter changed something
    spec2, loaded = load_adapter(folder)
    assert spec2 == spec
    prepare_for(fresh, spec2)
    apply_to(fresh, spec2, loaded, folder)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, mask), adapted)


def test_an_adapter_that_does_not_fit_is_a_one_line_error(tmp_path: Path) -> None:
    from medsynth.errors import DataError

    net = _controlled()
    layers, subset = _prepare(net, "lora", rank=2)
    spec = AdapterSpec("lora", 2, 2.0, ("unet", "controlnet"), tuple(layers), 1)
    folder = save_adapter(tmp_path / "a", spec, subset.rename(subset.state_dict()))
    other = _controlled()
    wrong = AdapterSpec("lora", 3, 3.0, spec.networks, spec.layers, 1)  # another rank: shapes differ
    prepare_for(other, wrong)
    with pytest.raises(DataError, match="does not fit"):
        apply_to(other, wrong, load_adapter(folder)[1], folder)
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="not a medsynth adapter"):
        load_adapter(tmp_path / "b")

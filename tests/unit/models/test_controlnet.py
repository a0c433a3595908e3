"""ControlNet on the full-resolution mask: shapes, zero start, weight copy, steering and training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsynth.config.generative import (
    ControlNetConfig,
    ControlNetNetworkConfig,
    DiffusionUNetConfig,
    DiffusionUNetNetworkConfig,
)
from medsynth.models.controlnet import (
    ControlledUNet,
    build_controlnet,
    embedding_channels,
    init_controlnet_from_unet,
    one_hot_mask,
)
from medsynth.models.unet import build_diffusion_unet

torch.set_num_threads(1)

LATENT_CHANNELS = 4
NUM_CLASSES = 3
FACTOR = 2  # autoencoder downsampling of the tiny setting: channels (8, 16)
UNET_CFG = DiffusionUNetConfig(
    network=DiffusionUNetNetworkConfig(
        channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8, norm_num_groups=4
    )
)
CN_CFG = ControlNetConfig(network=ControlNetNetworkConfig(conditioning_embedding_num_channels=(4, 8)))
LATENT_SIDE = {2: 8, 3: 4}


def _pretend_trained(unet: nn.Module) -> nn.Module:
    """Fills MONAI's zero-initialised UNet weights (output conv, resnet conv2, attention out).

    A freshly built ``DiffusionModelUNet`` outputs exactly zero, which would make every "equals the
    base UNet" check vacuous and block gradients to the ControlNet residuals.
    """
    with torch.no_grad():
        for p in unet.parameters():
            if p.ndim > 1 and not p.any():
                nn.init.normal_(p, std=0.05)
    return unet


def _controlled(spatial_dims: int, seed: int = 0, unet_cfg: DiffusionUNetConfig = UNET_CFG) -> ControlledUNet:
    torch.manual_seed(seed)
    unet = _pretend_trained(build_diffusion_unet(unet_cfg, spatial_dims, LATENT_CHANNELS))
    controlnet = build_controlnet(CN_CFG, unet_cfg, spatial_dims, LATENT_CHANNELS, NUM_CLASSES, FACTOR)
    init_controlnet_from_unet(controlnet, unet)
    return ControlledUNet(unet, controlnet)


def _inputs(spatial_dims: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    side = LATENT_SIDE[spatial_dims]
    x = torch.randn(batch, LATENT_CHANNELS, *(side,) * spatial_dims)
    t = torch.randint(0, 1000, (batch,))
    labels = torch.randint(0, NUM_CLASSES, (batch, 1, *(side * FACTOR,) * spatial_dims))
    return x, t, one_hot_mask(labels, NUM_CLASSES)


def _zero_convs(controlnet: nn.Module) -> list[nn.Parameter]:
    return [
        p
        for name, p in controlnet.named_parameters()
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out"))
    ]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_residual_shapes_match_unet_skips_and_start_at_zero(spatial_dims: int) -> None:
    model = _controlled(spatial_dims)
    x, t, cond = _inputs(spatial_dims)
    with torch.no_grad():
        down, mid = model.controlnet(x=x, timesteps=t, controlnet_cond=cond)
    side = LATENT_SIDE[spatial_dims]
    # conv_in, level-0 resnet, level-0 downsample, level-1 resnet
    expected = [(8, side), (8, side), (8, side // 2), (16, side // 2)]
    assert [(r.shape[1], r.shape[-1]) for r in down] == expected
    assert all(r.shape[0] == 2 and r.ndim == 2 + spatial_dims for r in down)
    assert mid.shape == (2, 16, *(side // 2,) * spatial_dims)
    assert all(not r.any() for r in [*down, mid])
    assert model.mask_downsample_factor == FACTOR and model.num_mask_channels == NUM_CLASSES


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_controlled_unet_equals_base_unet_until_zero_convs_change(spatial_dims: int) -> None:
    model = _controlled(spatial_dims)
    x, t, cond = _inputs(spatial_dims)
    with torch.no_grad():
        base = model.unet(x, t)
        assert base.abs().mean() > 1e-2  # a non-trivial base prediction
        assert torch.equal(model(x, t, cond), base)
        assert torch.equal(model(x, t, None), base)
        for p in _zero_convs(model.controlnet):
            p.add_(0.1 * torch.randn_like(p))
        steered = model(x, t, cond)
        assert not torch.allclose(steered, base, atol=1e-4)
        assert torch.equal(model(x, t, None), base)  # unconditional = base UNet alone
        assert torch.equal(model(x, t, cond, conditioning_scale=0.0), base)
        # and the mask itself matters once the ControlNet is non-zero
        assert not torch.allclose(model(x, t, cond.flip(0)), steered, atol=1e-4)


def test_init_copies_shared_weights_and_reports_the_rest() -> None:
    torch.manual_seed(0)
    unet = _pretend_trained(build_diffusion_unet(UNET_CFG, 2, LATENT_CHANNELS))
    controlnet = build_controlnet(CN_CFG, UNET_CFG, 2, LATENT_CHANNELS, NUM_CLASSES, FACTOR)
    shared = (
        "conv_in.conv.weight",
        "down_blocks.1.attentions.0.attn.to_q.weight",
        "middle_block.resnet_1.conv1.conv.weight",
    )
    unet_sd = unet.state_dict()
    assert not torch.equal(controlnet.state_dict()[shared[0]], unet_sd[shared[0]])
    missing, unexpected = init_controlnet_from_unet(controlnet, unet)
    cn_sd = controlnet.state_dict()
    for key in shared:
        assert torch.equal(cn_sd[key], unet_sd[key]), key
    assert cn_sd[shared[0]].data_ptr() != unet_sd[shared[0]].data_ptr()  # a copy, not shared storage
    assert missing and all(k.startswith("controlnet_") for k in missing)
    assert unexpected and all(k.startswith(("up_blocks.", "out.")) for k in unexpected)


def test_init_rejects_an_architecture_a_lenient_load_would_skip() -> None:
    torch.manual_seed(0)
    deeper = UNET_CFG.model_copy(update={"network": UNET_CFG.network.model_copy(update={"num_res_blocks": 2})})
    unet = build_diffusion_unet(deeper, 2, LATENT_CHANNELS)
    controlnet = build_controlnet(CN_CFG, UNET_CFG, 2, LATENT_CHANNELS, NUM_CLASSES, FACTOR)
    with pytest.raises(ValueError, match="unmatched keys"):
        init_controlnet_from_unet(controlnet, unet)
    with pytest.raises(ValueError, match="does not match"):
        ControlledUNet(unet, controlnet)


@pytest.mark.parametrize("factor", [4, 3, 0])
def test_embedding_downsampling_mismatch_raises(factor: int) -> None:
    with pytest.raises(ValueError):
        embedding_channels(CN_CFG, factor)
    with pytest.raises(ValueError):
        build_controlnet(CN_CFG, UNET_CFG, 2, LATENT_CHANNELS, NUM_CLASSES, factor)


def test_mask_at_latent_size_is_rejected() -> None:
    model = _controlled(2)
    x, t, cond = _inputs(2)
    with pytest.raises(ValueError, match="does not fit"):
        model(x, t, cond[..., ::2, ::2])
    with pytest.raises(ValueError, match="does not fit"):
        model(x, t, cond[:, :2])


def test_one_hot_mask() -> None:
    labels = torch.tensor([[[[0, 1], [2, 1]]]])
    hot = one_hot_mask(labels, 3)
    assert hot.shape == (1, 3, 2, 2) and hot.dtype == torch.float32
    assert torch.equal(hot.sum(1), torch.ones(1, 2, 2))
    assert torch.equal(hot.argmax(1, keepdim=True), labels)
    assert torch.equal(one_hot_mask(labels.float(), 3), hot)
    for bad in (labels[:, 0], labels + 1, labels.float() + 0.5, labels - 1):
        with pytest.raises(ValueError):
            one_hot_mask(bad, 3)


def test_frozen_unet_stays_in_eval_mode() -> None:
    model = _controlled(2).train()
    assert model.controlnet.training and not model.unet.training
    assert not any(p.requires_grad for p in model.unet.parameters())


def test_short_training_lowers_the_loss_with_the_unet_untouched() -> None:
    # attention at the middle block only (MONAI always has it there), to keep 30 steps well under a second
    light = DiffusionUNetNetworkConfig(
        channels=(8, 16), attention_levels=(False, False), num_res_blocks=1, num_head_channels=16, norm_num_groups=4
    )
    model = _controlled(2, seed=1, unet_cfg=DiffusionUNetConfig(network=light)).train()
    torch.manual_seed(1)
    n = 4
    labels = torch.zeros(n, 1, 16, 16, dtype=torch.long)
    for i in range(n):  # one random square of class 1 per image
        r, c = torch.randint(0, 10, (2,)).tolist()
        labels[i, :, r : r + 6, c : c + 6] = 1
    cond = one_hot_mask(labels, NUM_CLASSES)
    x = torch.randn(n, LATENT_CHANNELS, 8, 8)
    t = torch.randint(0, 1000, (n,))
    target = 2.0 * nn.functional.avg_pool2d(cond[:, 1:2], FACTOR).expand(-1, LATENT_CHANNELS, -1, -1)

    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.controlnet.parameters()}
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x, t, cond), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.75 * first, losses
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, unet_before[k]), k
    with torch.no_grad():  # the fit uses the mask: a shuffled mask predicts worse
        fitted = nn.functional.mse_loss(model(x, t, cond), target).item()
        shuffled = nn.functional.mse_loss(model(x, t, cond.roll(1, 0)), target).item()
    assert shuffled > 1.2 * fitted, (fitted, shuffled)


def test_fuse_swish_keeps_the_function_and_leaves_no_swish() -> None:
    from monai.networks.blocks.activation import Swish

    from medsynth.models.controlnet import fuse_swish

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), Swish(), torch.nn.Sequential(Swish(alpha=2.0)))
    x = torch.randn(2, 2, 8, 8)
    before = net(x)
    assert fuse_swish(net) == 1  # alpha 2 is not SiLU: kept
    assert isinstance(net[1], torch.nn.SiLU) and isinstance(net[2][0], Swish)
    assert torch.allclose(net(x), before, atol=1e-6)
    assert fuse_swish(net) == 0


def test_one_hot_without_check_equals_the_checked_one() -> None:
    from medsynth.models.controlnet import one_hot_mask

    labels = torch.randint(0, 4, (2, 1, 5, 6), dtype=torch.uint8)
    assert torch.equal(one_hot_mask(labels, 4, check=False), one_hot_mask(labels, 4))
    labels3 = torch.randint(0, 3, (1, 1, 3, 4, 5))
    assert torch.equal(one_hot_mask(labels3, 3, torch.bfloat16, check=False), one_hot_mask(labels3, 3, torch.bfloat16))

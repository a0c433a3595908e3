"""The 'counterfactual' pool variant: same-patient transplants generated in context from the real slice."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig
from medsynth.evaluation.pool import make_pool, pool_key
from medsynth.models.tiling import decode_latents
from medsynth.synthesis.counterfactual import encode
from tests.unit.evaluation.test_experiment import LABELS, SIZE, make_set
from tests.unit.synthesis.conftest import TINY_NETS, tiny_generator

torch.set_num_threads(1)


def _cfg(pool_edits: list[str], **counterfactual: Any) -> MedsynthConfig:
    raw: dict[str, Any] = {
        **{k: dict(v) for k, v in TINY_NETS.items()},
        "name": "cf-pool",
        "data": {"root": "unused", "labels": LABELS},
        "preprocess": {"spatial_dims": 2, "spatial_size": [SIZE, SIZE]},
        "sampling": {"sampler": "ddim", "steps": 2, "batch_size": 5, "guidance_scale": 1.0},
        "experiment": {"ratios": [0, 2], "synthetic_pool_per_mask": 2, "pool_edits": pool_edits, "tasks": ["presence"]},
        "counterfactual": {"steps": 2, "dilate": 1, **counterfactual},
    }
    return validate_config(raw, "pool test config", MedsynthConfig)


def test_counterfactual_variant_edits_the_real_lesion_free_slices(tmp_path: Path) -> None:
    cfg = _cfg(["none", "counterfactual"])
    gen = tiny_generator(cfg)
    train = make_set("P", 3, 0)  # 12 items; odd items lesion-free, every patient has lesions
    pool = make_pool(gen, train, cfg, tmp_path)
    n = len(train)
    assert pool.edits[:n] == ["none"] * n
    with torch.no_grad():
        rec = decode_latents(gen.ae, encode(gen, train.images) / gen.scale_factor, gen.ae_factor).clamp(0, 1)
    for i in range(n):
        had_lesion = bool((train.masks[i] == 2).any())
        j = n + i
        if had_lesion:
            assert pool.edits[j] == "elastic"  # no transplant into a slice that has a lesion: from noise
            continue
        assert pool.edits[j] == "counterfactual" and (pool.masks[j] == 2).any()
        # in context: closer to the real slice's round trip than the same mask drawn from noise
        cf_err = float((pool.images[j].float() - rec[i]).abs().mean())
        noise_err = float((pool.images[i].float() - rec[i]).abs().mean())
        assert cf_err < 0.8 * noise_err, (cf_err, noise_err)  # 0.14 vs 0.24 measured
    fresh = make_pool(tiny_generator(cfg), train, cfg, tmp_path / "fresh")
    assert torch.equal(fresh.images, pool.images) and fresh.edits == pool.edits  # reproducible


def test_counterfactual_settings_enter_the_pool_key_only_when_used() -> None:
    train = make_set("P", 2, 0)
    hashes = {"x": "0"}
    plain_a, plain_b = _cfg(["none", "flip"]), _cfg(["none", "flip"], dilate=4)
    assert pool_key(hashes, plain_a.sampling, train, plain_a) == pool_key(hashes, plain_b.sampling, train, plain_b)
    cf_a, cf_b = _cfg(["none", "counterfactual"]), _cfg(["none", "counterfactual"], dilate=4)
    assert pool_key(hashes, cf_a.sampling, train, cf_a) != pool_key(hashes, cf_b.sampling, train, cf_b)


def test_counterfactual_is_a_pool_variant_not_a_chain_step() -> None:
    assert _cfg(["counterfactual"]).experiment.pool_edits == ["counterfactual"]
    with pytest.raises(Exception, match="unknown edit"):
        _cfg(["flip+counterfactual"])

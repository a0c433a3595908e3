"""The benchmarks: shared helpers, and each benchmark's code at toy sizes (tiny networks, few steps).

These keep ``benchmarks/`` from rotting; they measure nothing. The memory benchmark's driver runs
its measurements in this process here (a fresh interpreter per measurement costs seconds of
imports); the real subprocess run is the ``slow`` test at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `benchmarks` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import common, gpu, guidance, memory, preprocessing, sampling, training  # noqa: E402

torch.set_num_threads(1)

LABELS = {0: "background", 1: "csf", 2: "grey_matter", 3: "white_matter", 4: "lesion"}


def tiny_raw(dims: int, root: Path, **extra: Any) -> dict[str, Any]:
    """A config with tiny networks: 16-voxel sides, 8-16 channels, 50 timesteps."""
    size = [16] * dims
    raw: dict[str, Any] = {
        "name": f"tiny{dims}d",
        "output_dir": str(root / "out"),
        "data": {"root": str(root / "data"), "mask_suffix": "_mask", "labels": LABELS},
        "qc": {"policy": "fail", "n_overlays": 0},
        "preprocess": {"spatial_dims": dims, "spatial_size": size},
        "autoencoder": {
            "network": {
                "channels": [8, 8],
                "latent_channels": 2,
                "num_res_blocks": 1,
                "norm_num_groups": 4,
                "attention_levels": [False, False],
            }
        },
        "diffusion": {
            "network": {
                "channels": [8, 16],
                "attention_levels": [False, False],
                "num_res_blocks": 1,
                "num_head_channels": 8,
                "norm_num_groups": 4,
            },
            "num_train_timesteps": 50,
            "schedule": "cosine",
        },
        "controlnet": {
            "network": {"conditioning_embedding_num_channels": [8, 8]},
            "label_weights": {4: 3.0},
            "train": {"batch_size": 2, "warmup_steps": 1, "amp": "off"},
        },
        "sampling": {"sampler": "dpmpp", "steps": 2, "guidance_scale": 1.5, "batch_size": 2},
        "segmenter": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
    }
    raw.update(extra)
    return raw


def write_yaml(path: Path, raw: dict[str, Any]) -> Path:
    """Write ``raw`` as YAML and return ``path``."""
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def cfg2d(tmp_path: Path) -> Path:
    """A tiny 2D config file."""
    return write_yaml(tmp_path / "tiny2d.yaml", tiny_raw(2, tmp_path))


@pytest.fixture
def cfg3d(tmp_path: Path) -> Path:
    """A tiny 3D config file."""
    return write_yaml(tmp_path / "tiny3d.yaml", tiny_raw(3, tmp_path))


# ----------------------------------------------------------------------------------------------
# common helpers
# ----------------------------------------------------------------------------------------------


def test_time_call_runs_warmup_then_repeats() -> None:
    calls: list[int] = []
    t = common.time_call(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(t.seconds) == 3 and t.warmup == 2
    assert 0 <= t.best <= t.median <= max(t.seconds) and t.total == pytest.approx(sum(t.seconds))
    assert set(t.to_json()) == {"seconds", "median", "best", "warmup"}
    with pytest.raises(ValueError):
        common.time_call(lambda: None, repeats=0)


def test_timing_median_and_ratio() -> None:
    assert common.Timing((1.0, 3.0, 2.0, 10.0), 0).median == 2.5
    assert common.Timing((5.0, 1.0, 3.0), 0).median == 3.0
    assert common.ratio(4.0, 2.0) == 2.0
    assert common.ratio(1.0, 0.0) is None and common.ratio(None, 1.0) is None
    assert common.ratio(float("nan"), 1.0) is None


def test_peak_rss_is_a_positive_non_decreasing_peak() -> None:
    first = common.peak_rss_mb()
    block = torch.ones(8 * 2**20 // 4)  # 8 MiB, touched
    second = common.peak_rss_mb()
    assert first > 10 and second >= first
    status = Path("/proc/self/status")
    if status.is_file():  # the peak is at least the current resident size
        rss_kb = next(int(ln.split()[1]) for ln in status.read_text().splitlines() if ln.startswith("VmRSS"))
        assert second >= rss_kb / 1024 - 1
    assert float(block.sum()) > 0
    assert common.peak_device_memory_mb(torch.device("cpu")) is None


def test_device_choice_and_machine_info() -> None:
    assert common.resolve_device("cpu").type == "cpu"
    assert common.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(common.BenchmarkError):
        common.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(common.BenchmarkError, match="no CUDA"):
            common.resolve_device("cuda")
    info = common.machine_info(torch.device("cpu"))
    for key in ("platform", "cpu_count", "torch", "torch_threads", "device", "device_name", "monai"):
        assert key in info
    assert info["torch_threads"] == torch.get_num_threads() and info["device"] == "cpu"


def test_write_result_is_clean_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"name": "a b", "value": float("nan"), "size": (1, 2), "path": tmp_path, "t": torch.tensor([1.5])}]
    out = common.write_result(
        tmp_path / "r" / "x.json",
        "demo",
        ["--n", "it's"],
        torch.device("cpu"),
        {"k": 1},
        "the baseline",
        rows,
        target={"text": "t", "passed": True},
        notes=["n"],
        extra={"more": float("inf")},
    )
    data = json.loads(out.read_text(encoding="utf-8"))  # strict JSON: NaN/inf became null
    assert data["benchmark"] == "demo" and data["baseline"] == "the baseline"
    assert data["command"] == "python -m benchmarks.demo --n 'it'\"'\"'s'"
    assert data["rows"] == [{"name": "a b", "value": None, "size": [1, 2], "path": str(tmp_path), "t": [1.5]}]
    assert data["more"] is None and data["machine"]["device"] == "cpu" and data["target"]["passed"] is True
    assert not list(out.parent.glob(".*"))  # no temporary file left behind
    common.print_table("T", [common.Column("name", "Name"), common.Column("value", "V", "{:.1f}")], rows)
    printed = capsys.readouterr().out
    assert "Name" in printed and "a b" in printed
    assert common.format_cell(None) == "-" and common.format_cell(2.0, "{:.2f}x") == "2.00x"
    assert common.format_cell(True) == "True" and common.format_cell("s") == "s"
    assert [common.verdict(v) for v in (True, False, None)] == ["PASS", "FAIL", "n/a"]


def test_run_main_turns_user_errors_into_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def body(argv: list[str]) -> int:
        raise common.BenchmarkError(f"bad {argv}")

    assert common.run_main(body, ["x"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: bad ['x']"


def test_run_json_subprocess_reports_a_failing_worker() -> None:
    with pytest.raises(common.BenchmarkError, match="unknown measurement kind"):
        common.run_json_subprocess("benchmarks.memory", ["--worker", json.dumps({"kind": "bogus"})], timeout=120)


def test_config_helpers(cfg2d: Path) -> None:
    cfg = common.load_cfg(cfg2d)
    assert common.num_classes_of(cfg) == 5
    assert common.size_multiple(cfg) == 4  # AE factor 2 x one UNet downsampling
    big = common.with_spatial_size(cfg, [32, 48])
    assert big.preprocess.spatial_size == [32, 48] and cfg.preprocess.spatial_size == [16, 16]
    with pytest.raises(common.BenchmarkError):
        common.with_spatial_size(cfg, [32, 32, 32])
    m = common.random_masks(3, [8, 12], 5, seed=1)
    assert m.shape == (3, 1, 8, 12) and m.dtype == torch.uint8 and int(m.max()) < 5
    assert torch.equal(m, common.random_masks(3, [8, 12], 5, seed=1))
    img = common.random_images(2, [4, 4, 4])
    assert img.shape == (2, 1, 4, 4, 4) and float(img.min()) >= 0 and float(img.max()) <= 1


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def test_training_benchmark_toy(cfg2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "training.json"
    argv = ["--config", str(cfg2d), "--steps", "2", "--warmup", "1", "--rounds", "1", "--device", "cpu"]
    assert training.main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "target: medsynth (bf16) >= 1.5x the MONAI inferer's (fp32)" in printed
    assert "PASS" in printed or "FAIL" in printed
    data = json.loads(out.read_text(encoding="utf-8"))
    # baseline fp32 first; both trainers at both precisions (the target pairs medsynth bf16 with MONAI fp32)
    assert [(r["who"], r["precision"]) for r in data["rows"]] == [
        ("monai", "fp32"),
        ("monai", "bf16"),
        ("medsynth", "fp32"),
        ("medsynth", "bf16"),
    ]
    base, ours = data["rows"][0], data["rows"][3]
    assert base["baseline"] and base["ratio"] == 1.0 and not ours["baseline"]
    assert ours["ratio"] == pytest.approx(ours["samples_per_s"] / base["samples_per_s"])
    assert data["target"]["value"] == ours["ratio"]
    assert set(data["equal_precision_ratios"]) == {"fp32", "bf16"}
    assert data["settings"]["batch_size"] == 2 and data["settings"]["steps_per_round"] == 2
    assert data["target"]["passed"] == (ours["ratio"] >= training.TARGET)
    assert data["command"].startswith("python -m benchmarks.training --config")


def test_training_trainers_match_the_stage_setup(cfg2d: Path) -> None:
    cfg = common.load_cfg(cfg2d)
    dev = torch.device("cpu")
    from medsynth.models.autoencoder import build_autoencoder

    ae = build_autoencoder(cfg.autoencoder, 2).eval()
    data = training.make_data(cfg, 4, 5, ae, dev)
    assert data.latents.shape == (4, 2, 8, 8) and data.encode_seconds > 0
    ours = training.CachedLatentTrainer(cfg, data, 5, 2, dev)
    base = training.InfererTrainer(cfg, data, 5, 2, dev, ae)
    # only the ControlNets train; the UNets (and the autoencoder) are frozen
    assert all(not p.requires_grad for p in ours.model.unet.parameters())
    assert all(not p.requires_grad for p in base.unet.parameters())
    assert len(base.cn.controlnet_cond_embedding.blocks) == 0  # the inferer feeds a latent-size mask
    assert len(ours.cn.controlnet_cond_embedding.blocks) == 2  # one stride-2 stage for AE factor 2
    frozen = [p.clone() for p in ours.model.unet.parameters()]
    assert math.isfinite(ours.step().item()) and math.isfinite(base.step().item())
    assert all(torch.equal(a, b) for a, b in zip(frozen, ours.model.unet.parameters(), strict=True))
    assert ours.step_index == 1 and base.step_index == 1


# ----------------------------------------------------------------------------------------------
# gpu (its CPU smoke mode: every workload at tiny sizes, fp32 and bf16)
# ----------------------------------------------------------------------------------------------


def test_gpu_benchmark_smoke_on_cpu(cfg2d: Path, cfg3d: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    argv = ["--smoke", "--device", "cpu", "--threads", "1", "--config-2d", str(cfg2d), "--config-3d", str(cfg3d)]
    assert gpu.main([*argv, "--sizes-2d", "16", "--sizes-3d", "16", "--out", str(out)]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    rows = data["rows"]
    assert {(r["workload"], r["dims"], r["precision"]) for r in rows} == {
        (w, d, p) for w in gpu.WORKLOADS for d in (2, 3) for p in ("fp32", "bf16")
    }
    assert all(r["status"] == "ok" and r["samples_per_s"] > 0 and r["peak_mb"] is None for r in rows)
    for r in rows:
        if r["workload"] == "controlnet":
            base = next(
                b
                for b in rows
                if b["workload"] == "controlnet_monai" and b["size"] == r["size"] and b["amp"] == r["amp"]
            )
            assert r["vs_monai"] == pytest.approx(r["samples_per_s"] / base["samples_per_s"])
    assert data["settings"]["smoke"] and data["settings"]["capability"] is None
    assert data["command"].startswith("python -m benchmarks.gpu --smoke")


def test_gpu_benchmark_rejects_unknown_workloads(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main(["--smoke", "--device", "cpu", "--workloads", "bogus"]) == 2
    assert "--workloads must name" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# memory
# ----------------------------------------------------------------------------------------------


def test_memory_measure_in_process(cfg2d: Path, cfg3d: Path) -> None:
    for cfg, size in ((cfg2d, [16, 16]), (cfg3d, [16, 16, 16])):
        for kind in memory.KINDS:
            spec = {"kind": kind, "config": str(cfg), "size": size, "batch_size": 1, "sample_steps": 1}
            res = memory.measure({**spec, "device": "cpu"})
            assert res["peak_rss_mb"] > 0 and res["seconds"] > 0 and res["peak_device_mb"] is None
    assert memory.measure({"kind": "idle"})["seconds"] is None


def test_memory_benchmark_toy(
    cfg2d: Path, cfg3d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    seen: list[dict[str, Any]] = []

    def in_process(module: str, args: list[str], timeout: float | None = None) -> dict[str, Any]:
        assert module == "benchmarks.memory" and args[0] == "--worker"
        spec = json.loads(args[1])
        seen.append(spec)
        return memory.measure(spec)

    monkeypatch.setattr(memory, "run_json_subprocess", in_process)
    out = tmp_path / "memory.json"
    argv = ["--config-2d", str(cfg2d), "--config-3d", str(cfg3d), "--sizes-2d", "16,32", "--sizes-3d", "16x16x16"]
    argv += ["--batch-size", "1", "--sample-steps", "1", "--device", "cpu", "--threads", "1", "--out", str(out)]
    argv += ["--decode-sizes", "16,32", "--set", "autoencoder.tiling.tile=[16,16,16]"]
    assert memory.main(argv) == 0
    assert [s["kind"] for s in seen] == ["idle"] + ["train"] * 3 + ["sample"] * 3 + ["decode"] * 4
    assert [s["tiled"] for s in seen[-4:]] == [False, False, True, True]
    assert all(s["threads"] == 1 and s["device"] == "cpu" for s in seen)
    data = json.loads(out.read_text(encoding="utf-8"))
    rows = data["rows"]
    assert rows[0]["kind"] == "idle" and rows[0]["baseline"]
    train2d = [r for r in rows if r["kind"] == "train" and r["dims"] == 2]
    assert [r["size"] for r in train2d] == [[16, 16], [32, 32]]
    assert train2d[0]["peak_ratio"] == 1.0 and train2d[1]["voxel_ratio"] == 4.0
    assert set(data["growth"]) == {
        "train 2D",
        "train 3D",
        "sample 2D",
        "sample 3D",
        "decode whole 3D",
        "decode tiled 3D",
    }
    tiled = [r for r in rows if r["kind"] == "decode" and r["tiled"]]
    assert data["target"]["value"] == pytest.approx(tiled[1]["peak_rss_mb"] / tiled[0]["peak_rss_mb"])
    agree = data["decode_agreement"]
    assert agree["16x16x16"]["max_abs"] < 1e-4  # one tile covers 16^3: the whole decode
    assert agree["32x32x32"]["mean_abs"] > 0 and agree["32x32x32"]["correlation"] > 0.5  # 8 tiles + overlaps
    printed = capsys.readouterr().out
    assert "Peak memory" in printed and "target: tiled decode peak (RSS) within 1.2x" in printed


def test_memory_sizes() -> None:
    assert memory.parse_sizes("64,128x96", 2) == [[64, 64], [128, 96]]
    assert memory.parse_sizes("none", 3) == [] and memory.parse_sizes("", 2) == []
    with pytest.raises(common.BenchmarkError):
        memory.parse_sizes("8x8", 3)
    assert memory.scaled_sizes([32, 40, 32], (1.0, 1.5, 2.0), 8) == [[32, 40, 32], [48, 64, 48], [64, 80, 64]]
    rows = [{"voxels": 1, "v": 10.0}, {"voxels": 4, "v": 20.0}, {"voxels": 16, "v": 40.0}]
    assert memory.growth_exponent(rows, "v") == pytest.approx(0.5)
    assert memory.growth_exponent(rows[:1], "v") is None


def test_memory_rejects_sizes_the_networks_cannot_take(cfg2d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert memory.main(["--config-2d", str(cfg2d), "--sizes-2d", "18", "--sizes-3d", "none"]) == 2
    assert "not multiples of 4" in capsys.readouterr().err


@pytest.mark.slow
def test_memory_benchmark_in_fresh_processes(cfg2d: Path, tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    argv = ["--config-2d", str(cfg2d), "--sizes-2d", "16", "--sizes-3d", "none", "--kinds", "train"]
    assert memory.main([*argv, "--batch-size", "1", "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text(encoding="utf-8"))["rows"]
    assert [r["kind"] for r in rows] == ["idle", "train"] and rows[1]["peak_rss_mb"] > rows[0]["peak_rss_mb"] * 0.5


# ----------------------------------------------------------------------------------------------
# sampling (tiny random models: the trained-output path is exercised by the missing-output error)
# ----------------------------------------------------------------------------------------------


def _toy_sampling_setup(root: Path, objective: str) -> tuple[Any, Any, Any, Any]:
    from medsynth.data.dataset import ArraySet
    from medsynth.evaluation.segmenter import Segmenter, build_segmenter

    raw = tiny_raw(2, root)
    raw["diffusion"]["objective"] = objective
    cfg = common.load_cfg(write_yaml(root / f"{objective}.yaml", raw))
    gen = common.random_generator(cfg, 5, torch.device("cpu"))
    seg = Segmenter(build_segmenter(cfg, 5), 5, [16, 16], LABELS).eval()
    n = 3
    data = ArraySet(
        common.random_images(n, [16, 16]),
        common.random_masks(n, [16, 16], 5),
        torch.eye(3).repeat(n, 1, 1).numpy(),
        [f"i{i}" for i in range(n)],
        ["p0", "p0", "p1"],
        LABELS,
    )
    return cfg, gen, seg, data


def test_sampling_rows_count_evaluations(tmp_path: Path) -> None:
    cfg, gen, seg, data = _toy_sampling_setup(tmp_path, "v_prediction")
    specs = sampling.sampler_specs("v_prediction", 20)
    assert [s.label for s in specs][:4] == ["ddpm-20", "ddim-50", "dpmpp-10", "dpmpp-20"] and specs[0].baseline
    rows = sampling.run_rows(gen, seg, data, cfg, specs, seed=0, batch_size=3)
    by = {r["label"]: r for r in rows}
    # guidance 1.5 (the config's): two network evaluations per step; 3 masks in one batch
    assert by["ddpm-20"]["nfe"] == 40 and by["ddpm-20"]["nfe_total"] == 40
    assert by["ddim-50"]["nfe"] == 100 and by["dpmpp-10"]["nfe"] == 20
    assert by["dpmpp-10"]["nfe_ratio"] == 2.0 and by["ddpm-20"]["dice_rel"] in (1.0, None)
    for r in rows:
        if r["sampler"] == "rflow_euler":
            assert r["status"] == "n/a: model trained with v_prediction" and "nfe" not in r
        else:
            assert r["status"] == "ok" and r["seconds"] > 0
            assert r["dice"] != r["dice"] or 0.0 <= r["dice"] <= 1.0  # NaN when the segmenter finds nothing
    passed, meeting = sampling.target_met(rows)
    assert passed in (None, False) and meeting == []  # nothing is 30x cheaper than a 20-step baseline
    counted = sampling.CountingGenerator.wrap(gen)
    assert counted.calls == 0 and counted.denoiser_net is gen.denoiser_net  # same networks, not copies


def test_sampling_rows_for_rectified_flow(tmp_path: Path) -> None:
    cfg, gen, seg, data = _toy_sampling_setup(tmp_path, "rflow")
    specs = sampling.sampler_specs("rflow", 16)
    assert [s.label for s in specs][-3:] == ["rflow_euler-10", "rflow_euler-20", "rflow_euler-30"]
    rows = sampling.run_rows(gen, seg, data, cfg, specs, seed=0, batch_size=2, guidance_scale=1.0, warmup=False)
    by = {r["label"]: r for r in rows}
    # no guidance: one evaluation per step; 3 masks in batches of 2 = 2 batches
    assert by["rflow_euler-16"]["baseline"] and by["rflow_euler-16"]["nfe"] == 16
    assert by["rflow_euler-16"]["nfe_total"] == 32 and by["rflow_euler-30"]["nfe"] == 30
    assert by["rflow_euler-10"]["nfe"] == 10 and by["rflow_euler-10"]["nfe_ratio"] == 1.6
    assert by["ddpm-16"]["status"] == by["dpmpp-20"]["status"] == "n/a: model trained with rflow"
    assert sampling.not_applicable(sampling.SamplerSpec("rflow_euler", 99), "rflow", 50) is not None


def test_sampling_target_rule() -> None:
    base = {"label": "ddpm-1000", "baseline": True, "status": "ok", "dice": 0.8}
    good = {"label": "dpmpp-20", "baseline": False, "status": "ok", "nfe_ratio": 50.0, "dice_rel": 0.985}
    weak = {"label": "dpmpp-10", "baseline": False, "status": "ok", "nfe_ratio": 100.0, "dice_rel": 0.9}
    assert sampling.target_met([base, good, weak]) == (True, ["dpmpp-20"])
    assert sampling.target_met([base, weak]) == (False, [])
    assert sampling.target_met([{**base, "dice": float("nan")}, good]) == (None, [])


def test_sampling_without_trained_outputs_says_what_to_run(
    cfg2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sampling.main(["--config", str(cfg2d), "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"run `medsynth run {cfg2d}` first" in err
    assert not (tmp_path / "s.json").exists()


def test_guidance_selects_masks_with_and_without_the_structure(tmp_path: Path) -> None:
    _, _, _, data = _toy_sampling_setup(tmp_path, "v_prediction")
    masks = torch.full((6, 1, 16, 16), 2, dtype=torch.uint8)
    masks[:3, :, 4:10, 4:10] = 4  # three masks hold a lesion of 36 voxels
    masks[3, :, :, :12] = 0  # a mask lacking it but with a quarter of the reference area: left out
    n = 6
    data = dataclasses.replace(
        data,
        images=common.random_images(n, [16, 16]),
        masks=masks,
        affines=torch.eye(3).repeat(n, 1, 1).numpy(),
        item_ids=[f"i{i}" for i in range(n)],
        patients=[f"p{i}" for i in range(n)],
    )
    held, free = guidance.select_masks(data, 4, 2, 5, 20, [2])
    assert held.item_ids == ["i0", "i2"] and free.item_ids == ["i4", "i5"]
    with pytest.raises(common.BenchmarkError, match="holds label 4"):
        guidance.select_masks(data, 4, 2, 5, 100, [2])


def test_guidance_sweep_rows(tmp_path: Path) -> None:
    cfg, gen, seg, data = _toy_sampling_setup(tmp_path, "v_prediction")
    assert guidance.lesion_label(cfg) == 4 and guidance.contrast_reference(cfg) is None
    rows, images = guidance.sweep(gen, seg, data, cfg, [1.0, 2.5], 4, None, seed=0, n_boot=20)
    real, g1, g25 = rows
    assert real["guidance"] is None and real["contrast_rel"] == 1.0
    # the config samples 2 steps: no guidance is one network evaluation per step, guidance two
    assert g1["nfe"] == 2 and g25["nfe"] == 4 and g1["cost_ratio"] == 1.0
    assert set(images) == {1.0, 2.5} and images[2.5].shape == data.images.shape
    from medsynth.evaluation.metrics import label_contrast

    expected = float(np.nanmean(label_contrast(images[2.5], data.masks, 4)))
    assert g25["contrast"] == pytest.approx(expected)
    assert g25["contrast_rel"] == pytest.approx(expected / real["contrast"])
    # the same seeds at every scale: a repeated sweep gives the same images
    _, again = guidance.sweep(gen, seg, data, cfg, [2.5], 4, None, seed=0, n_boot=20)
    assert torch.equal(again[2.5], images[2.5])
    grid = guidance.save_sweep_grid(tmp_path / "g.png", data, images, 4)
    assert grid.stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# preprocessing (a tiny phantom stands in for the shared data sets)
# ----------------------------------------------------------------------------------------------


def test_preprocessing_rows_on_a_tiny_phantom(tmp_path: Path) -> None:
    from medsynth.data.phantom import write_phantom_dataset

    data = write_phantom_dataset(tmp_path / "phantom", dim=2, n=3, seed=0, size=16, slices_per_patient=2)
    raw = tiny_raw(2, tmp_path)
    raw["data"]["split"] = {"train": 0.34, "val": 0.33, "test": 0.33, "seed": 0}
    spec = preprocessing.DatasetSpec("tiny", str(write_yaml(tmp_path / "pre.yaml", raw)), "phantom")
    rows = preprocessing.bench_dataset(spec, data, 4, [])
    assert [r["row"] for r in rows] == [
        "MONAI Dataset epoch 1",
        "MONAI Dataset epoch 2",
        "medsynth cold (empty cache)",
        "medsynth warm (cache valid)",
        "medsynth warm + load_split",
    ]
    assert all(r["cases"] == 4 for r in rows) and rows[0]["baseline"] and rows[0]["ratio"] == 1.0
    assert rows[2]["processed"] == 4 and rows[3]["processed"] == 0 and rows[4]["processed"] == 0


def test_preprocessing_skips_absent_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEDSYNTH_SHARED", str(tmp_path / "nowhere"))
    out = tmp_path / "pre.json"
    assert preprocessing.main(["--datasets", "lgg", "--out", str(out)]) == 0
    assert "skipped lgg" in capsys.readouterr().out
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["rows"] == [] and "lgg" in data["skipped"]
    assert preprocessing.main(["--datasets", "nope", "--out", str(out)]) == 2

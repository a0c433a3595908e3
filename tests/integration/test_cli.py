"""Every ``medsynth`` command run once through the public command line, on the tiny pipeline's outputs.

In-process commands go through Typer's ``CliRunner`` (exit code and printed output checked); the
error paths go through the console entry point in a subprocess, where ``main()`` turns a
``MedsynthError`` into one line and exit status 2. The trained tiny pipeline (``tiny_run``, session
scoped) makes the training, synthesis, validation and experiment commands cheap: most find their stage
up to date, which is itself what they promise (the CLI shares the flows' cache).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str | Path, code: int = 0) -> str:
    """Run ``medsynth <args>`` in-process; check the exit code; return the printed output."""
    from typer.testing import CliRunner

    from medsynth.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, f"medsynth {' '.join(map(str, args))}: exit {res.exit_code}\n{res.output}"
    if code == 0:
        assert res.exception is None, res.exception
    return res.output


def cli_subprocess(*args: str | Path, code: int) -> str:
    """Run the console entry point ``python -m medsynth.cli <args>``; check the exit code; return stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run(
        [sys.executable, "-m", "medsynth.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=REPO,
    )
    assert res.returncode == code, f"exit {res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    if code == 2:  # a MedsynthError: one line naming the problem (the log lines above it are ordinary logging)
        assert [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")], res.stderr
    return res.stderr


def _copy_outputs(tiny_run: dict[str, Any], dest: Path, everything: bool = False) -> Path:
    """A copy of the tiny pipeline's cache and trained runs (``everything``: its whole output folder,
    tracking store included) under ``dest``; returns the copy's config file."""
    raw = yaml.safe_load(Path(tiny_run["cfg"]).read_text(encoding="utf-8"))
    if everything:
        shutil.copytree(raw["output_dir"], dest / "out")
    else:
        src = Path(raw["output_dir"]) / raw["name"]
        for stage in ("preprocess", "autoencoder", "latents", "unet", "controlnet"):
            shutil.copytree(src / stage, dest / "out" / raw["name"] / stage)
    raw["output_dir"] = str(dest / "out")
    path = dest / "copy.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_help_and_data_commands(tmp_path: Path) -> None:
    assert "synthesize" in cli("--help") and "experiment" in cli("--help")
    out = cli("data", "phantom", "--out", tmp_path / "ph", "--n", "3", "--size", "32", "--slices-per-patient", "1")
    assert "phantom dataset written to" in out
    assert len(list((tmp_path / "ph").rglob("*_mask.png"))) == 3
    labels = "0:background,1:csf,2:grey_matter,3:white_matter,4:lesion"
    out = cli("data", "check", tmp_path / "ph", "--labels", labels, "--out", tmp_path / "qc")
    assert "3 cases, 0 bad" in out
    assert json.loads((tmp_path / "qc" / "qc_report.json").read_text(encoding="utf-8"))
    # a bare dataset path without labels: the vocabulary is inferred from the masks
    out = cli("data", "check", tmp_path / "ph", "--out", tmp_path / "qc1")
    assert "3 cases, 0 bad" in out
    # declared labels that miss values of the masks: a QC failure naming the values, not a traceback
    err = cli_subprocess("data", "check", tmp_path / "ph", "--labels", "0:bg,1:csf", "--out", tmp_path / "qc2", code=2)
    assert "label" in err


def test_config_commands(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    shown = yaml.safe_load(cli("config", "show", "-c", tiny_run["cfg"], "--set", "autoencoder.train.steps=7"))
    assert shown["autoencoder"]["train"]["steps"] == 7 and shown["name"] == "tiny"
    assert shown["synthesis"]["refuse_memorised"] is False  # defaults are resolved
    ref = cli("config", "reference")
    assert "refuse_memorised" in ref and "autoencoder" in ref
    cli("config", "reference", "--out", tmp_path / "ref.md")
    assert (tmp_path / "ref.md").read_text(encoding="utf-8").strip() == ref.strip()
    err = cli_subprocess("config", "show", "-c", tiny_run["cfg"], "--set", "autoencoder.nonsense=1", code=2)
    assert "nonsense" in err


def test_check_preprocess_and_status_commands(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    fresh = ["-c", tiny_run["cfg"], "--set", f"output_dir={tmp_path / 'fresh'}"]
    out = cli("check", *fresh)
    assert "check: done" in out and "qc/n_bad = 0" in out, out
    out = cli("preprocess", *fresh)
    assert "10 cases (10 processed, 0 cached, 0 excluded)" in out, out
    assert (tmp_path / "fresh" / "tiny" / "preprocess" / "manifest.json").is_file()
    again = cli("preprocess", *fresh)
    assert "preprocess: up to date (cached)" in again
    # status on the trained pipeline: everything up to date; a changed ControlNet section re-runs exactly
    # the ControlNet and what depends on it
    status = cli("status", "-c", tiny_run["cfg"])
    assert "would run" not in status and "controlnet" in status and "up to date" in status
    changed = cli("status", "-c", tiny_run["cfg"], "--set", "controlnet.train.lr=0.002")
    would = {line.split()[0] for line in changed.splitlines() if "would run" in line}
    assert would == {"controlnet", "generator", "synthesize", "validate", "experiment", "report"}, changed


def test_train_commands_share_the_pipeline_cache(tiny_run: dict[str, Any]) -> None:
    for command, stage in (("autoencoder", "autoencoder"), ("diffusion", "unet"), ("controlnet", "controlnet")):
        out = cli("train", command, "-c", tiny_run["cfg"], "--device", "cpu")
        assert f"{stage}: up to date (cached)" in out and "checkpoint: " in out, (stage, out)
    for command in ("latents", "generator", "segmenter", "features"):
        out = cli("train", command, "-c", tiny_run["cfg"], "--device", "cpu")
        assert f"{command}: up to date (cached)" in out, out


def test_train_command_trains_when_the_config_changes(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    cfg = _copy_outputs(tiny_run, tmp_path)
    out = cli("train", "diffusion", "-c", cfg, "--set", "diffusion.train.steps=2", "--device", "cpu")
    assert "unet: done" in out and "unet/val_loss = " in out, out
    assert "autoencoder: up to date" in out and "latents: up to date" in out  # upstream untouched
    from medsynth.checkpoint import find_checkpoint

    final = find_checkpoint(tmp_path / "out" / "tiny" / "unet", "final")
    assert final is not None and final.step == 2


def test_synthesize_validate_experiment_commands(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    out = cli("synthesize", "-c", tiny_run["cfg"], "--out", tmp_path / "syn", "--edits", "none,flip", "--device", "cpu")
    manifest = json.loads((tmp_path / "syn" / "manifest.json").read_text(encoding="utf-8"))
    n = len(manifest["items"])
    assert n > 0 and f"synthesis/n_images = {n}" in out and f"out_dir: {tmp_path / 'syn'}" in out
    assert any("_flip_" in r["id"] for r in manifest["items"]) and any("_none_" in r["id"] for r in manifest["items"])
    err = cli_subprocess("synthesize", "-c", tiny_run["cfg"], "--out", tmp_path / "syn", code=2)
    assert "--overwrite" in err or "exists" in err  # never overwritten without --overwrite
    out = cli("validate", "-c", tiny_run["cfg"], "--device", "cpu")
    assert "validate: up to date" in out and "validation_report.json" in out and "val/lesion_ratio" in out
    out = cli("experiment", "-c", tiny_run["cfg"], "--device", "cpu")
    assert "AUROC" in out or "auroc" in out


def test_memorisation_gate_from_config_through_the_cli(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    """``synthesis.refuse_memorised`` set on the command line refuses a generated image planted in the training set."""
    from medsynth.data.io import read_image

    cfg = _copy_outputs(tiny_run, tmp_path)
    common = ["-c", cfg, "--set", "synthesis.n_grid=0", "--device", "cpu"]
    cli("synthesize", *common, "--out", tmp_path / "plain")
    items = json.loads((tmp_path / "plain" / "manifest.json").read_text(encoding="utf-8"))["items"]
    n = len(items)
    assert n >= 2
    copied = items[0]
    image = read_image(tmp_path / "plain" / copied["image"]).array.astype(np.float32)

    # plant that output into the (copied) training cache in place of one training image
    cache = tmp_path / "out" / "tiny" / "preprocess"
    manifest = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
    victim = next(it for it in manifest["items"] if it["split"] == "train")
    with np.load(cache / victim["file"]) as z:
        arrays = {k: z[k].copy() for k in z.files}
    i = int(victim["index"])
    arrays["image"][i] = image.reshape(arrays["image"][i].shape)
    np.savez_compressed(cache / victim["file"], **arrays)

    out = cli("synthesize", *common, "--set", "synthesis.refuse_memorised=true", "--out", tmp_path / "guarded")
    assert f"synthesis/n_images = {n - 1}" in out
    refused = json.loads((tmp_path / "guarded" / "refused_memorised.json").read_text(encoding="utf-8"))
    assert [(r["item_id"], r["nearest_train_id"]) for r in refused["refused"]] == [(copied["id"], victim["item_id"])]
    assert refused["refused"][0]["distance"] < refused["threshold"]
    kept = json.loads((tmp_path / "guarded" / "manifest.json").read_text(encoding="utf-8"))["items"]
    assert copied["id"] not in {r["id"] for r in kept} and len(kept) == n - 1
    # the gate off (the default): the same image is exported
    cli("synthesize", *common, "--out", tmp_path / "open")
    assert not (tmp_path / "open" / "refused_memorised.json").exists()


def test_calibrate_command_chooses_the_guidance_used_by_synthesis(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    """`sampling.guidance_scale: auto`: the calibrate stage sweeps the validation split; synthesis uses its choice."""
    cfg = _copy_outputs(tiny_run, tmp_path, everything=True)
    auto = ["-c", cfg, "--device", "cpu", "--set", "sampling.guidance_scale=auto"]
    auto += ["--set", "sampling.calibration.scales=[1.0,3.0]", "--set", "sampling.calibration.n_with=2"]
    auto += ["--set", "sampling.calibration.n_free=1", "--set", "sampling.calibration.min_voxels=1"]
    out = cli("calibrate", *auto)
    assert "calibrate: done" in out and "calibration/guidance_scale = " in out, out
    chosen = json.loads((tmp_path / "out" / "tiny" / "calibration" / "calibration.json").read_text(encoding="utf-8"))
    assert chosen["scale"] in (1.0, 3.0) and chosen["reason"]
    out = cli("synthesize", *auto, "--out", tmp_path / "syn")
    manifest = json.loads((tmp_path / "syn" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["provenance"]["guidance_scale"] == chosen["scale"]
    assert "calibrate: up to date" in out  # not swept again


def test_runs_and_report_commands(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    out = cli("runs", tiny_run["cfg"])
    parent = tiny_run["second"]["mlflow_parent_run"]
    assert "pipeline " in out and parent in out and "FINISHED" in out
    for stage in ("autoencoder", "controlnet", "validate", "experiment"):
        assert f"  {stage} " in out, stage
    assert "experiment grid:" in out and "model models:/medsynth-tiny-" in out
    err = cli_subprocess("report", "--out", tmp_path / "wp", code=2)
    assert "nothing to report" in err and "hint: pass --config" in err


def test_run_command(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    # the whole pipeline through `medsynth run`, on a copy (its store gets a new latest pipeline run):
    # every stage up to date, nothing retrained
    cfg = _copy_outputs(tiny_run, tmp_path, everything=True)
    out = cli("run", cfg)
    assert "pipeline finished: " in out and "'cached': True" in out and "'cached': False" not in out
    err = cli_subprocess("run", tmp_path / "missing.yaml", code=2)
    assert "missing.yaml: config file does not exist" in err


def test_ui_command_refuses_a_server_store_without_starting_anything(tmp_path: Path, pipeline_config: Any) -> None:
    raw = pipeline_config(tmp_path, tracking={"uri": "http://127.0.0.1:9"})
    cfg = tmp_path / "remote.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    err = cli_subprocess("ui", cfg, "--port", "9", code=2)
    assert "tracking points at a server already" in err
    assert "Port on 127.0.0.1" in cli("ui", "--help")


COMMANDS = {
    "data": {"check", "phantom"},
    "train": {"autoencoder", "latents", "diffusion", "controlnet", "generator", "segmenter", "features"},
    "config": {"show", "reference"},
    **{
        name: set()
        for name in (
            "check",
            "preprocess",
            "calibrate",
            "synthesize",
            "validate",
            "experiment",
            "analyse",  # tests/integration/test_analysis_stage.py
            "export",  # tests/unit/synthesis/test_export.py
            "adapt",  # tests/integration/test_site_adaptation.py
            "adaptation",  # tests/integration/test_site_adaptation.py
            "edit",  # tests/integration/test_counterfactual.py
            "counterfactual",  # tests/integration/test_counterfactual.py
            "status",
            "plan",  # tests/unit/data/test_plan.py
            "promote",  # tests/integration/test_model_registry.py
            "server",  # tests/integration/test_team_server.py
            "ui",  # here and tests/integration/test_ui.py
            "runs",
            "report",
            "run",
        )
    },
}
"""Every command of the CLI, each run by a test above (a new command fails here until it is listed and tested)."""


def test_every_command_is_known_and_has_help() -> None:
    from typer.main import get_command

    from medsynth.cli import app

    root = get_command(app)
    assert set(root.commands) == set(COMMANDS)  # type: ignore[attr-defined]
    for group, subs in COMMANDS.items():
        assert set(getattr(root.commands[group], "commands", {})) == subs, group  # type: ignore[attr-defined]
        for name in subs or [None]:
            args = [group, name] if name else [group]
            assert "Usage: " in cli(*args, "--help")


def _renamed_phantom(dest: Path, prefix: str, seed: int) -> Path:
    """A 2D phantom whose patients are called ``<prefix>_NNN`` (not the tiny run's ``phantom_NNN``)."""
    from medsynth.data.phantom import write_phantom_dataset

    src = write_phantom_dataset(dest / "raw", dim=2, n=2, seed=seed, size=32, slices_per_patient=2)
    out = dest / prefix
    for f in src.rglob("*.png"):
        rel = Path(str(f.relative_to(src)).replace("phantom_", f"{prefix}_"))
        (out / rel.parent).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out / rel)
    return out


def test_validate_scores_an_external_test_set_separately(tiny_run: dict[str, Any], tmp_path: Path) -> None:
    """``validation.external_test``: the same measurements on another cohort, reported apart; a shared patient is
    refused before anything is written."""
    cfg = _copy_outputs(tiny_run, tmp_path, everything=True)
    ext = _renamed_phantom(tmp_path, "extsite", seed=11)
    out = cli("validate", "-c", cfg, "--set", f"validation.external_test={ext}", "--device", "cpu")
    assert "validate: done" in out and "val/external_lesion_ratio" in out, out  # re-ran: its input changed
    folder = tmp_path / "out" / "tiny" / "validation"
    report = json.loads((folder / "validation_report.json").read_text(encoding="utf-8"))
    ext_rep = report["external"]
    assert ext_rep["n_patients"] == 2 and ext_rep["n_items"] > 0
    assert ext_rep["n_items"] != report["n_items"] or ext_rep["plausibility"] != report["plausibility"]
    assert "lesion" in ext_rep["plausibility"]["per_label"] and "rows" not in ext_rep["plausibility"]
    assert (folder / "external_real_vs_synthetic.png").is_file()
    md = (folder / "validation_summary.md").read_text(encoding="utf-8")
    assert "## External test set" in md and str(ext) in md
    # the training phantom itself as "external": every patient is a training patient -> one-line error
    train_root = yaml.safe_load(Path(cfg).read_text(encoding="utf-8"))["data"]["root"]
    err = cli_subprocess(
        "validate", "-c", cfg, "--set", f"validation.external_test={train_root}", "--device", "cpu", code=2
    )
    assert "external test" in err and "phantom_" in err, err

"""Kill ``medsynth run`` with SIGKILL during ControlNet training, run it again: it completes, resumes
the ControlNet from its last checkpoint, and neither rewrites nor retrains the earlier stages.

The pipeline runs as a real subprocess (its own session, so the whole process group — the CLI and
Prefect's temporary API server — dies at once), with its own ``PREFECT_HOME`` and the MLflow store
the config implies (``<output_dir>/mlflow.db``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# two real pipeline runs (each starts Prefect's server): 2.5-3 min on 2 CPU cores; kept in the default suite
# because it is the check of issue #5 ("killed during ControlNet training, re-run completes it").

CN_STEPS, CN_CKPT_EVERY = 80, 10
EARLIER = ("preprocess", "autoencoder", "latents", "unet")
STARTUP_S, RUN_S = 420, 600  # upper bounds (pytest-timeout's 900 s caps the test)


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONUTF8="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        PREFECT_HOME=str(root / "prefect-home"),
    )
    return env


def _start(cfg_path: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-c", "from medsynth.cli import main; main()", "run", str(cfg_path)]
    with log.open("wb") as fh:
        return subprocess.Popen(
            cmd,
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the whole process group (the CLI and Prefect's server) and wait until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while _group_alive(proc.pid):
        assert time.monotonic() < deadline, "processes of the killed pipeline survived SIGKILL"
        time.sleep(0.2)


def _snapshot(stage_root: Path) -> dict[str, tuple[int, str]]:
    """(mtime_ns, sha256) of every file of the earlier stages."""
    out = {}
    for name in EARLIER:
        for f in sorted((stage_root / name).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(stage_root))] = (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
    return out


def _untouched(path: str) -> bool:
    """Files that must keep their mtime: all but the preprocessing index (manifest, splits, resolved
    config), which every preprocess run rewrites atomically — with the same content when nothing changed."""
    return not (path.startswith("preprocess/") and path.count("/") == 1)


def _pointer(ckpt_root: Path, name: str) -> dict[str, Any] | None:
    f = ckpt_root / name
    return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None


def _check_checkpoint_folders(stage_root: Path) -> None:
    """Pointers name complete, visible step folders; every visible step folder is complete."""
    for ckpt_root in stage_root.glob("*/checkpoints"):
        for ptr in ("latest.json", "final.json"):
            data = _pointer(ckpt_root, ptr)
            if data is not None:
                assert not data["path"].startswith("."), (ckpt_root, ptr, data)
                state = json.loads((ckpt_root / data["path"] / "state.json").read_text(encoding="utf-8"))
                assert state["step"] == data["step"], (ckpt_root, ptr)
        for d in ckpt_root.glob("step-*"):
            assert (d / "state.json").is_file() and (d / "config.json").is_file(), d


def _children(client: Any, experiment: str, parent_id: str) -> dict[str, Any]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    return {r.data.tags["medsynth.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}


def test_killed_during_controlnet_resumes_without_redoing_earlier_stages(tmp_path: Path, pipeline_config: Any) -> None:
    cfg = pipeline_config(tmp_path)
    cfg["controlnet"]["train"].update(steps=CN_STEPS, ckpt_every=CN_CKPT_EVERY, val_every=CN_CKPT_EVERY)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = _env(tmp_path)
    stage_root = tmp_path / "out" / "tiny"
    cn_ckpts = stage_root / "controlnet" / "checkpoints"

    # --- first run: SIGKILL the process group once the ControlNet has written a (non-final) checkpoint ---
    proc = _start(cfg_path, tmp_path / "run1.log", env)
    try:
        deadline = time.monotonic() + STARTUP_S
        while not (cn_ckpts / "latest.json").is_file():
            assert proc.poll() is None, "pipeline exited before the ControlNet checkpointed:\n" + _tail(tmp_path)
            assert time.monotonic() < deadline, "no ControlNet checkpoint in time:\n" + _tail(tmp_path)
            time.sleep(0.02)
    finally:
        _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (cn_ckpts / "final.json").exists(), "ControlNet finished before the kill: nothing to resume"
    latest = _pointer(cn_ckpts, "latest.json")
    assert latest is not None
    killed_at = latest["step"]
    assert 0 < killed_at < CN_STEPS and killed_at % CN_CKPT_EVERY == 0
    assert not (stage_root / "pipeline_summary.json").exists()
    assert not (stage_root / "synthetic").exists()
    for name in ("autoencoder", "unet"):  # the earlier stages had finished
        assert (stage_root / name / "checkpoints" / "final.json").is_file(), name
    assert (stage_root / "latents" / "stage.json").is_file()  # the finished stage's stamp
    _check_checkpoint_folders(stage_root)
    before = _snapshot(stage_root)

    # half-written leftovers, named as save_checkpoint/atomic_path name their temporaries (a kill
    # mid-write leaves such files): never read as finished
    decoy = cn_ckpts / f".step-{CN_STEPS - 1:07d}.killed"
    decoy.mkdir()
    (decoy / "state.json").write_text(f'{{"step": {CN_STEPS - 1}, "extr', encoding="utf-8")
    (decoy / "controlnet.safetensors").write_bytes(b"\0" * 64)
    (cn_ckpts / ".latest.killed.json").write_text(json.dumps({"path": decoy.name, "step": CN_STEPS - 1}))
    (cn_ckpts / ".final.killed.json").write_text('{"path": "step-00')

    # --- second run: the same command, to completion ---
    proc = _start(cfg_path, tmp_path / "run2.log", env)
    try:
        rc = proc.wait(timeout=RUN_S)
    finally:
        _kill_group(proc)
    assert rc == 0, _tail(tmp_path, "run2.log")

    # the pipeline finished: summary, synthetic data, validation report
    summary = json.loads((stage_root / "pipeline_summary.json").read_text(encoding="utf-8"))
    for stage in ("preprocess", "autoencoder", "latents", "unet"):
        assert summary[stage]["cached"], stage
    assert not summary["controlnet"]["cached"]
    assert summary["controlnet"]["model_uri"]  # the completed ControlNet is registered
    assert Path(summary["validate"]["result"]["outputs"]["report"]).is_file()

    # earlier stages: the same files with the same content, and none of their outputs rewritten
    after = _snapshot(stage_root)
    assert after.keys() == before.keys()
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}
    rewritten = sorted(k for k in before if _untouched(k) and after[k][0] != before[k][0])
    assert not rewritten
    assert any(k.startswith("autoencoder/") for k in before) and any(k.startswith("unet/") for k in before)

    # the ControlNet: finished from the resumed step, not from scratch
    final = _pointer(cn_ckpts, "final.json")
    assert final == {"path": f"step-{CN_STEPS:07d}", "step": CN_STEPS}
    assert Path(summary["controlnet"]["result"]["checkpoint"]) == cn_ckpts / final["path"]
    _check_checkpoint_folders(stage_root)

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    children = _children(client, "tiny", summary["mlflow_parent_run"])
    assert children["controlnet"].info.status == "FINISHED"
    # the loss is logged every 10 steps: the resumed run logged only the steps after the checkpoint
    history = client.get_metric_history(children["controlnet"].info.run_id, "controlnet/train_loss")
    cn_steps = sorted(m.step for m in history)
    assert cn_steps == list(range(killed_at + 10, CN_STEPS + 1, 10)), (killed_at, cn_steps)
    for stage, metric in (("autoencoder", "ae/train_loss"), ("unet", "unet/train_loss")):  # nothing trained
        run = children[stage]
        assert run.data.tags["medsynth.cached"] == "true", stage
        # a cached run shows the computing run's final values: one point, not a training curve
        assert len(client.get_metric_history(run.info.run_id, metric)) <= 1, stage
        assert run.info.status == "FINISHED"

    # the resumed ControlNet equals an uninterrupted one (batches and noise depend on (seed, step) only)
    from medsynth.checkpoint import find_checkpoint
    from medsynth.config import load_config
    from medsynth.pipeline import run_stage
    from medsynth.pipeline.runner import stage_key

    ref_root = tmp_path / "reference"
    for name in EARLIER:
        shutil.copytree(stage_root / name, ref_root / "tiny" / name)
    ref_cfg = load_config(cfg_path, [f"output_dir={ref_root}", "tracking.enabled=false"])
    assert stage_key(ref_cfg, "controlnet") == find_checkpoint(stage_root / "controlnet", "final").extras["input_key"]
    run_stage(ref_cfg, "controlnet", device="cpu", track=False)
    ref, got = find_checkpoint(ref_root / "tiny" / "controlnet", "final"), find_checkpoint(cn_ckpts.parent, "final")
    assert ref is not None and got is not None
    assert got.file_hashes() == ref.file_hashes()


def _tail(root: Path, name: str = "run1.log", n: int = 4000) -> str:
    f = root / name
    return f.read_text(encoding="utf-8", errors="replace")[-n:] if f.is_file() else ""

"""The registered generator and segmenter are MLflow pyfunc models: loaded in a fresh process with mlflow and
medsynth alone, they reproduce ``medsynth synthesize`` bit for bit; ``models:/name@alias`` works after
``medsynth promote`` (which refuses a failed or stale validation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

FRESH = r"""
import json, sys
import mlflow
import numpy as np
from medsynth.data.io import read_image

uri, gen_uri, seg_uri, out_dir, dst = sys.argv[1:6]
mlflow.set_tracking_uri(uri)
gen = mlflow.pyfunc.load_model(gen_uri)
seg = mlflow.pyfunc.load_model(seg_uri)
rows = json.load(open(f"{out_dir}/manifest.json"))["items"]
batches = {}
for r in rows:
    batches.setdefault(r["batch"]["index"], []).append(r)
out = {}
for b, rs in sorted(batches.items()):
    rs.sort(key=lambda r: r["batch"]["position"])
    masks = np.stack([read_image(f"{out_dir}/{r['mask']}", kind="mask").array[None] for r in rs]).astype(np.int64)
    images = gen.predict(masks, params={"seed": rs[0]["seed"]})
    for r, img in zip(rs, images):
        out[r["id"]] = img
    out["seg-" + str(b)] = seg.predict(images)
np.savez(dst, **out)
"""


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, pipeline_config: Any) -> dict[str, Any]:
    """A tiny trained generator and segmenter, validated, registered as pyfunc models in a SQLite store."""
    import torch

    from medsynth.config import load_config
    from medsynth.pipeline import run_with_upstream
    from medsynth.tracking.mlflow_store import MlflowSession

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("registry")
    raw = pipeline_config(root)
    raw["synthesis"] = {"max_masks": 3, "edits": ["none", "flip"]}
    raw["sampling"]["batch_size"] = 3  # 2 test masks x 2 edits: a full and a partial batch
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg = load_config(cfg_path)
    outs = run_with_upstream(cfg, "validate", track=False)  # generator, segmenter, validation (not registered)
    session = MlflowSession(cfg)
    run = session.start_run("generator")
    gen_uri = session.register(run, "generator", outs["generator"].result.outputs["bundle"])  # type: ignore[union-attr]
    seg_uri = session.register(run, "segmenter", outs["segmenter"].result.model)  # type: ignore[union-attr]
    return {"root": root, "cfg_path": cfg_path, "cfg": cfg, "uri": session.uri, "gen": gen_uri, "seg": seg_uri}


def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from medsynth.cli import app

    return CliRunner().invoke(app, list(args))


def test_pyfunc_models_in_a_fresh_process_reproduce_synthesize(registered: dict[str, Any], tmp_path: Path) -> None:
    import torch

    from medsynth.data.io import read_image
    from medsynth.evaluation.segmenter import load_segmenter, predict
    from medsynth.pipeline.runner import stage_root

    gen, cfg = registered["gen"], registered["cfg"]
    assert gen == "models:/medsynth-tiny-generator/1" and registered["seg"] == "models:/medsynth-tiny-segmenter/1"
    res = _cli("promote", "-c", str(registered["cfg_path"]), "--alias", "champion", "--min-dice-ratio", "0")
    assert res.exit_code == 0, res.output
    assert "models:/medsynth-tiny-generator@champion -> version 1" in res.output
    out = tmp_path / "synthetic"
    res = _cli(
        "synthesize", "-c", str(registered["cfg_path"]), "--out", str(out), "--model", gen.replace("/1", "@champion")
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((out / "manifest.json").read_text())["items"]
    assert len(rows) == 4 and {r["batch"]["size"] for r in rows} == {3, 1}

    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # mlflow + medsynth, nothing else
    dst = tmp_path / "fresh.npz"
    proc = subprocess.run(
        [sys.executable, str(script), registered["uri"], gen, registered["seg"], str(out), str(dst)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = np.load(dst)
    for r in rows:
        written = read_image(out / r["image"]).array
        assert fresh[r["id"]].dtype == np.float32
        np.testing.assert_array_equal(fresh[r["id"]], written.reshape(fresh[r["id"]].shape))  # bit for bit
    seg = load_segmenter(cfg, stage_root(cfg) / "segmenter")
    first = [r for r in rows if r["batch"]["index"] == 0]
    images = torch.from_numpy(np.stack([fresh[r["id"]] for r in sorted(first, key=lambda r: r["batch"]["position"])]))
    np.testing.assert_array_equal(fresh["seg-0"], predict(seg, images, cfg.segmenter.predict_batch_size).numpy())


def test_promote_refuses_a_failed_or_stale_validation(registered: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    from medsynth.errors import ConfigError
    from medsynth.pipeline.promote import PromotionRefusedError, promote
    from medsynth.tracking.mlflow_store import download_model

    cfg = registered["cfg"]
    with pytest.raises(PromotionRefusedError, match="did not pass"):
        promote(cfg, "gold", min_dice_ratio=1e9)
    stale = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"steps": 7})})
    with pytest.raises(PromotionRefusedError, match="stale"):
        promote(stale, "gold", min_dice_ratio=0)
    with pytest.raises(PromotionRefusedError, match="version 5"):
        promote(cfg, "gold", version="5", min_dice_ratio=0)
    client = MlflowClient(registered["uri"])
    with pytest.raises(Exception, match=r"gold|alias"):
        client.get_model_version_by_alias("medsynth-tiny-generator", "gold")
    with pytest.raises(ConfigError, match="not in the registry"):
        download_model("models:/medsynth-tiny-generator@gold", registered["root"] / "dl", registered["uri"])
    with pytest.raises(ConfigError, match="expected models"):
        download_model("models:/medsynth-tiny-generator", registered["root"] / "dl", registered["uri"])

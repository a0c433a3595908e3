"""Counterfactual editing end to end on a tiny trained phantom generator: the optional stage and ``medsynth edit``.

The generator and the reference segmenter are trained once for this module (tiny networks, a few
steps: about 20 s on one thread), without Prefect; the stage and the command then run on them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml


@pytest.fixture(scope="module")
def trained(pipeline_config: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny phantom config with its generator and segmenter trained; ``raw`` config and ``yaml`` path."""
    from medsynth.config.loader import validate_config
    from medsynth.config.schema import MedsynthConfig
    from medsynth.pipeline import run_with_upstream

    root = tmp_path_factory.mktemp("counterfactual")
    raw = pipeline_config(root, tracking={"enabled": False})
    raw["counterfactual"] = {
        "n_cases": 3,
        "min_lesion_voxels": 4,
        "steps": 3,
        "edits": ["remove", "move:2,0", "scale:1.5"],
    }
    cfg = validate_config(raw, "test config", MedsynthConfig)
    run_with_upstream(cfg, "generator")
    run_with_upstream(cfg, "segmenter")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return {"raw": raw, "yaml": path, "root": root}


def _cfg(raw: dict[str, Any], **sections: Any) -> Any:
    from medsynth.config.loader import validate_config
    from medsynth.config.schema import MedsynthConfig

    merged = {**raw, **{k: {**raw.get(k, {}), **v} for k, v in sections.items()}}
    return validate_config(merged, "test config", MedsynthConfig)


def test_stage_is_off_by_default_and_measures_edits_when_enabled(trained: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    from medsynth.pipeline import run_stage
    from medsynth.tracking.mlflow_store import tracking_uri

    assert run_stage(_cfg(trained["raw"]), "counterfactual").result is None  # disabled: nothing runs
    cfg = _cfg(trained["raw"], counterfactual={"enabled": True}, tracking={"enabled": True})
    first = run_stage(cfg, "counterfactual")
    res = first.result
    assert res is not None and not first.cached
    out = trained["root"] / "out" / "tiny" / "counterfactual"
    report = json.loads((out / "counterfactual.json").read_text())
    assert (out / "counterfactual.png").is_file()
    assert report["n_edits"] == res.n_edits > 0
    kinds = {item["edit"] for item in report["items"]}
    assert "remove" in kinds and kinds & {"move:2,0", "scale:1.5"}
    ssim = report["summary"]["ssim_outside"]
    assert res.ssim_outside == ssim and 0 < ssim <= 1
    assert res.metrics["cf/ssim_outside"] == pytest.approx(ssim)
    assert "cf/dice_ratio" in res.metrics or report["summary"].get("dice_ratio") is None
    assert res.fp_rate_removed is not None and 0 <= res.fp_rate_removed <= 1
    removed = [item for item in report["items"] if item["edit"] == "remove"]
    assert removed and all(0 <= item["residual_fraction"] <= 1 for item in removed)
    assert 0 <= report["summary"]["found_rate_real"] <= 1 and "found_rate_real" in report["per_edit"]["remove"]
    assert all(item["region_voxels"] > 0 for item in report["items"])
    client = MlflowClient(tracking_uri(cfg))
    run = client.get_run(first.run_id)
    assert run.data.tags["medsynth.stage"] == "counterfactual"
    assert run.data.metrics["cf/ssim_outside"] == pytest.approx(ssim)
    assert {f.path for f in client.list_artifacts(first.run_id, "counterfactual")} >= {
        "counterfactual/counterfactual.json",
        "counterfactual/counterfactual.png",
    }
    again = run_stage(cfg, "counterfactual")
    assert again.cached and again.result is not None and again.result.ssim_outside == ssim
    from typer.testing import CliRunner

    from medsynth.cli import app

    args = ["counterfactual", "-c", str(trained["yaml"]), "--set", "counterfactual.enabled=true"]
    res = CliRunner().invoke(app, args)  # the derived command shares the stage's cache
    assert res.exit_code == 0 and "counterfactual: up to date (cached)" in res.output, res.output


def _lesion_pair(raw: dict[str, Any]) -> tuple[Path, Path]:
    from medsynth.data.io import read_image

    for mask in sorted(Path(raw["data"]["root"]).rglob("*_mask.png")):
        if (read_image(mask, kind="mask").array == 4).sum() >= 6:
            return mask.with_name(mask.name.replace("_mask", "")), mask
    raise AssertionError("the phantom holds no lesion")


def test_edit_command_single_and_batch(trained: dict[str, Any], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medsynth.cli import app
    from medsynth.data.io import read_image

    image, mask = _lesion_pair(trained["raw"])
    runner = CliRunner()
    out = tmp_path / "single"
    args = ["edit", "-c", str(trained["yaml"]), "--image", str(image), "--mask", str(mask)]
    res = runner.invoke(app, [*args, "--edit", "remove", "--out", str(out)])
    assert res.exit_code == 0, res.output
    stem = image.stem
    assert (out / f"{stem}_remove.png").is_file() and (out / "provenance.json").is_file()
    assert (out / "counterfactual.png").is_file()
    edited = read_image(out / f"{stem}_remove_mask.png", kind="mask").array
    assert not (edited == 4).any() and edited.shape == read_image(mask, kind="mask").array.shape
    res = runner.invoke(app, [*args, "--edit", "remove", "--out", str(out)])
    assert res.exit_code != 0  # never overwritten

    csv = tmp_path / "edits.csv"
    csv.write_text(f'image,mask,edit\n{image},{mask},scale:1.5\n{image},{mask},"move:0,1"\n')
    out2 = tmp_path / "batch"
    res = runner.invoke(app, ["edit", "-c", str(trained["yaml"]), "--batch", str(csv), "--out", str(out2)])
    assert res.exit_code == 0, res.output
    prov = json.loads((out2 / "provenance.json").read_text())
    assert [i["edit"] for i in prov["items"]] == ["scale:1.5", "move:0,1"]
    for item in prov["items"]:
        m = read_image(out2 / item["mask"], kind="mask").array
        assert (m == 4).any() and not np.array_equal(m, read_image(mask, kind="mask").array)


def test_edit_command_bad_input_names_the_file_and_writes_nothing(trained: dict[str, Any], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medsynth.cli import app
    from medsynth.errors import DataError

    _, mask = _lesion_pair(trained["raw"])
    missing = tmp_path / "nope.png"
    args = ["edit", "-c", str(trained["yaml"]), "--image", str(missing), "--mask", str(mask)]
    res = CliRunner().invoke(app, [*args, "--edit", "remove", "--out", str(tmp_path / "o")])
    assert isinstance(res.exception, DataError)  # main() prints a MedsynthError as one line, exit status 2
    assert str(res.exception) == f"{missing}: file does not exist (command line)"
    res = CliRunner().invoke(
        app,
        [
            *args[:-4],
            "--image",
            str(mask.with_name(mask.name.replace("_mask", ""))),
            "--mask",
            str(mask),
            "--edit",
            "grow",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "unknown counterfactual edit 'grow'" in str(res.exception)
    assert not (tmp_path / "o").exists()

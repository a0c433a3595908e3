"""Whitepaper sections built from benchmark JSON results (sampler and guidance tables, copied figures)."""

from __future__ import annotations

import json
from pathlib import Path

from medsynth.report.benchmarks import guidance_section, sampler_section

PNG = b"\x89PNG\r\n\x1a\nnot-a-real-image"


def _write(path: Path, rows: list[dict[str, object]]) -> None:
    payload = {"command": "python -m benchmarks.x", "machine": {"device": "cpu"}, "created_utc": "t", "rows": rows}
    path.write_text(json.dumps(payload), encoding="utf-8")


def test_guidance_section_tables_and_figures(tmp_path: Path) -> None:
    bench, figs = tmp_path / "results", tmp_path / "wp" / "figures"
    bench.mkdir()
    rows = [
        {"row": "real images", "contrast": 0.207, "dice": 0.692, "fp": 0.53},
        {"row": "guidance 5", "nfe": 40, "contrast": 0.149, "contrast_rel": 0.72, "visible": 0.75, "fp": 0.66},
    ]
    _write(bench / "guidance-lgg.json", rows)
    (bench / "guidance-lgg.png").write_bytes(PNG)
    _write(bench / "sampling.json", [{"label": "ddpm-1000", "status": "ok", "dice": 0.5}])
    text = "\n".join(guidance_section(bench, figs))
    assert "`guidance-lgg.json`" in text and "python -m benchmarks.x" in text
    assert "| guidance 5 | 40 | 0.149 | 0.720 | 0.750 | – | – | 0.660 |" in text
    assert "sampling.json" not in text  # only the guidance results
    assert "![guidance-lgg](figures/benchmarks/guidance-lgg.png)" in text
    assert (figs / "benchmarks" / "guidance-lgg.png").read_bytes() == PNG
    sampler = "\n".join(sampler_section(bench))
    assert "| ddpm-1000 | ok |" in sampler and "guidance" not in sampler


def test_sections_say_when_there_is_no_result(tmp_path: Path) -> None:
    assert "No guidance sweep" in guidance_section(tmp_path, None)[0]
    assert "No sampling benchmark" in sampler_section(None)[0]

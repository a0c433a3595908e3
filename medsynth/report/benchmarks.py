"""Whitepaper sections read from benchmark JSON (``benchmarks/results/``): sampler trade-off, guidance sweep."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from medsynth.report.tables import md_table, num


def _benchmark_tables(
    bench_dir: Path | None,
    pattern: str,
    cols: Sequence[tuple[str, str]],
    figures_dir: Path | None = None,
) -> list[str]:
    """One table per benchmark JSON matching ``pattern`` in ``bench_dir`` (with its command and device).

    A PNG next to a JSON (same stem) is copied to ``figures_dir/benchmarks/`` and shown under its table.
    """
    files = sorted(bench_dir.glob(pattern)) if bench_dir and bench_dir.is_dir() else []
    out: list[str] = []
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = [[num(r.get(k), 3) if r.get(k) is not None else "–" for k, _ in cols] for r in data.get("rows", [])]
        out += [
            f"From `{path.name}` (command: `{data.get('command', '?')}`; device: "
            f"{data.get('machine', {}).get('device', '?')}; written {data.get('created_utc', '?')}). A benchmark "
            "is not a tracked run: it measured the generator the config's outputs held at that time.",
            "",
            *md_table([h for _, h in cols], rows),
            "",
        ]
        png = path.with_suffix(".png")
        if figures_dir is not None and png.is_file():
            dst = figures_dir / "benchmarks" / png.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(png, dst)
            out += [f"![{png.stem}](figures/benchmarks/{png.name})", "", f"_{png.stem}_", ""]
    return out


def sampler_section(bench_dir: Path | None) -> list[str]:
    """Sampler speed/quality from ``benchmarks/results/sampling*.json`` (when present)."""
    cols = [
        ("label", "sampler"),
        ("status", "status"),
        ("nfe", "network evaluations / image"),
        ("nfe_ratio", "fewer evaluations (x)"),
        ("seconds", "wall s"),
        ("speedup", "speed-up (x)"),
        ("dice", "mean foreground Dice"),
        ("dice_rel", "Dice vs baseline"),
    ]
    return _benchmark_tables(bench_dir, "sampling*.json", cols) or [
        "_No sampling benchmark result found (run `make bench`)._"
    ]


def guidance_section(bench_dir: Path | None, figures_dir: Path | None) -> list[str]:
    """Guidance sweeps from ``benchmarks/results/guidance-*.json``: is the lesion visible, and only there?"""
    cols = [
        ("row", "row"),
        ("nfe", "network evaluations / image"),
        ("contrast", "lesion contrast"),
        ("contrast_rel", "contrast / real"),
        ("visible", "visible"),
        ("dice", "lesion Dice"),
        ("dice_rel", "Dice / real"),
        ("fp", "FP rate (lesion-free masks)"),
    ]
    tables = _benchmark_tables(bench_dir, "guidance-*.json", cols, figures_dir)
    if not tables:
        return ["_No guidance sweep found (`python -m benchmarks.guidance --config CONFIG`)._"]
    return [
        "Classifier-free guidance scale vs whether the lesion shows where the mask puts it (contrast: mean "
        "intensity inside the lesion minus that of the reference region, the brain for LGG, in [0, 1]; visible: "
        "fraction of masks whose synthetic contrast has the real sign and at least half its size) and nowhere "
        "else (false-positive rate of the reference segmenter on lesion-free masks).",
        "",
        *tables,
    ]

"""The QC report of a dataset: JSON, a readable Markdown summary and PNG overlays."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsynth.config.schema import MedsynthConfig
from medsynth.data.cases import assign_splits, split_summary
from medsynth.data.labels import problem_hint
from medsynth.data.layouts import discover
from medsynth.data.qc import CaseQC, load_and_check
from medsynth.data.vocabulary import Vocabulary, resolve_labels
from medsynth.errors import DataError
from medsynth.fileio import write_json_atomic, write_text_atomic
from medsynth.progress import NullProgress, Progress
from medsynth.viz import overlay_rgb, representative_slice, save_grid, to_2d

REPORT_JSON, REPORT_MD, OVERLAYS = "qc_report.json", "qc_summary.md", "qc_overlays.png"


@dataclass
class QCReport:
    """Outcome of ``medsynth data check``."""

    out_dir: Path
    n_cases: int
    bad: list[CaseQC]
    policy: str
    labels: dict[int, str] | None = None
    labels_detail: str = ""
    orphan_masks: list[Path] = field(default_factory=list)

    @property
    def n_bad(self) -> int:
        """Number of cases with at least one problem."""
        return len(self.bad)


def _summary_md(
    cfg: MedsynthConfig,
    message: str,
    qcs: list[CaseQC],
    splits: dict[str, Any],
    vocab: Vocabulary,
    orphans: list[Path],
) -> str:
    bad = [q for q in qcs if not q.ok]
    codes = Counter(code for q in bad for code, _, _ in q.problems)
    label_totals: Counter[int] = Counter()
    label_cases: Counter[int] = Counter()
    for q in qcs:
        for k, v in q.info.get("label_counts", {}).items():
            label_totals[int(k)] += v
            label_cases[int(k)] += 1 if v else 0
    shapes = Counter(tuple(q.info.get("shape", [])) for q in qcs)
    lines = [
        f"# QC report: {cfg.name}",
        "",
        f"- dataset: `{cfg.data.root}` ({message})",
        f"- cases: {len(qcs)}, patients: {len({q.case.patient_id for q in qcs})}",
        f"- bad cases: {len(bad)} (policy: {cfg.qc.policy})",
        f"- masks without an image: {len(orphans)}",
        "- splits: " + ", ".join(f"{s} {v['patients']} patients/{v['cases']} cases" for s, v in splits.items()),
        f"- most common shapes: {', '.join(f'{list(s)} x{n}' for s, n in shapes.most_common(3))}",
        "",
        "## Labels (voxels over all cases)",
        "",
        f"Vocabulary: {vocab.detail}.",
        "",
        "| index | name | voxels | cases |",
        "|---|---|---|---|",
        *[
            f"| {k} | {cfg.data.labels.get(k, '?')} | {label_totals[k]} | {label_cases[k]} |"
            for k in sorted(set(label_totals) | set(cfg.data.labels))
        ],
    ]
    if orphans:
        lines += ["", "## Masks without an image", "", *[f"- `{p}`" for p in orphans[:200]]]
        if len(orphans) > 200:
            lines.append(f"- ... {len(orphans) - 200} more in qc_report.json")
    if bad:
        lines += [
            "",
            "## Problems",
            "",
            "| problem | cases |",
            "|---|---|",
            *[f"| {c} | {n} |" for c, n in codes.most_common()],
            "",
            "| case | file | problem |",
            "|---|---|---|",
        ]
        lines += [f"| {q.case.case_id} | `{p}` | {m} |" for q in bad[:200] for _, p, m in q.problems]
        if len(bad) > 200:
            lines.append(f"| ... | | {len(bad) - 200} more in qc_report.json |")
    return "\n".join(lines) + "\n"


def run_check(cfg: MedsynthConfig, out_dir: str | Path, progress: Progress | None = None) -> QCReport:
    """Check every image/mask pair of a dataset and write the QC report into ``out_dir``.

    Writes ``qc_report.json`` (every case, its problems and statistics), ``qc_summary.md`` and
    ``qc_overlays.png`` (a sample of cases, problem cases first, with the mask overlaid).

    Args:
        cfg: Resolved config (data, qc sections).
        out_dir: Report folder (created).
        progress: One ``advance()`` per case.

    Returns:
        A :class:`QCReport`; the caller decides what a bad case means (``cfg.qc.policy``).
    """
    out = Path(out_dir)
    cfg, vocab = resolve_labels(cfg)
    disc = discover(cfg.data)
    cases = assign_splits(disc.cases, cfg.data.split)
    prog = progress or NullProgress()
    rng = np.random.default_rng(cfg.seed)
    n_show = cfg.qc.n_overlays
    chosen = set(rng.choice(len(cases), size=min(n_show, len(cases)), replace=False).tolist()) if n_show else set()
    qcs: list[CaseQC] = []
    panels: list[tuple[CaseQC, Any, Any]] = []
    for i, case in enumerate(cases):
        qc, img, mask = load_and_check(case, cfg.data, cfg.qc)
        qcs.append(qc)
        if img is not None and (i in chosen or (not qc.ok and len(panels) < n_show)):
            m = mask if mask is not None and mask.shape == img.array.shape else None
            k = representative_slice(img.array, m) if img.ndim == 3 else None
            panels.append((qc, to_2d(img.array, k), None if m is None else to_2d(m, k)))
        prog.advance(1, case.case_id)
    splits = split_summary(cases)
    report = {
        "dataset": cfg.data.root,
        "layout": disc.message,
        "policy": cfg.qc.policy,
        "n_cases": len(qcs),
        "n_bad": sum(not q.ok for q in qcs),
        "splits": splits,
        "labels": {str(k): v for k, v in cfg.data.labels.items()},
        "labels_source": vocab.to_json(),
        "orphan_masks": [str(p) for p in disc.orphan_masks],
        "cases": [q.to_json() for q in qcs],
    }
    write_json_atomic(out / REPORT_JSON, report)
    write_text_atomic(out / REPORT_MD, _summary_md(cfg, disc.message, qcs, splits, vocab, disc.orphan_masks))
    if panels:
        panels.sort(key=lambda p: p[0].ok)
        panels = panels[:n_show]
        cols = 4
        grid_rows = []
        titles = []
        for j in range(0, len(panels), cols):
            row = panels[j : j + cols]
            grid_rows.append([overlay_rgb(im, mk) for _, im, mk in row])
            titles.append(" | ".join(("BAD " if not q.ok else "") + q.case.case_id[-18:] for q, _, _ in row))
        save_grid(out / OVERLAYS, grid_rows, col_titles=None, cell_inches=2.2)
        write_text_atomic(out / "qc_overlays.txt", "\n".join(titles) + "\n")
    return QCReport(
        out,
        len(qcs),
        [q for q in qcs if not q.ok],
        cfg.qc.policy,
        dict(cfg.data.labels),
        vocab.detail,
        list(disc.orphan_masks),
    )


def enforce_policy(report: QCReport) -> None:
    """Raise the first bad case (or else the first mask without an image) when the policy is ``fail``."""
    if report.orphan_masks and not report.bad and report.policy == "fail":
        raise orphan_error(report.orphan_masks, f"see {report.out_dir / REPORT_MD}")
    if report.bad and report.policy == "fail":
        first = report.bad[0].first_error()
        raise DataError(
            first.path,
            f"{first.problem} ({report.n_bad} bad cases in total; see {report.out_dir / REPORT_MD})",
            hint=problem_hint(report.bad[0].problems[0][0]),
        )


def orphan_error(orphans: list[Path], where: str) -> DataError:
    """The error for masks that no image pairs with (``qc.policy=fail``)."""
    return DataError(
        orphans[0],
        f"mask has no matching image ({len(orphans)} mask(s) without an image in total; {where})",
        hint="add the image, remove the mask, or set qc.policy=exclude to list and drop such masks",
    )

"""The downstream experiment's figure: per task, the metric and its Δ vs real only against the real fraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsynth.evaluation.experiment_report import SummaryRow, arm_label, arm_order
from medsynth.fileio import write_atomic

__all__ = ["plot_summary"]


def plot_summary(path: Path, rows: list[SummaryRow], ci: float) -> Path:
    """One column per task: the metric vs real fraction (top) and Δ vs real only (bottom), with CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in rows)) or ["presence"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 8), squeeze=False)
    for col, task in enumerate(tasks):
        trows = [r for r in rows if r.task == task]
        series: dict[tuple[str, int], list[SummaryRow]] = {}
        for r in trows:
            series.setdefault((r.arm, r.ratio), []).append(r)
        keys = sorted(series, key=lambda k: (arm_order(k[0]), k[1]))
        n = max(len(keys), 1)
        name = "AUROC" if task == "presence" else "Dice"
        for j, (arm, ratio) in enumerate(keys):
            pts = sorted(series[(arm, ratio)], key=lambda r: r.fraction)
            jitter = 1.0 + 0.03 * (j - (n - 1) / 2)  # multiplicative offset: error bars stay apart on a log axis
            x = np.array([r.fraction * jitter for r in pts])
            style = "-" if arm == "real" else ("--" if arm == "synthetic_only" else ":")
            marker = "o" if arm == "real" else ("s" if arm == "synthetic_only" else "^")
            for ax, val, lo, hi in (
                (axes[0, col], [r.mean for r in pts], [r.ci_lo for r in pts], [r.ci_hi for r in pts]),
                (axes[1, col], [r.delta_vs_real for r in pts], [r.delta_lo for r in pts], [r.delta_hi for r in pts]),
            ):
                yv = np.array([np.nan if v is None else v for v in val], dtype=float)
                lo_a = np.array([np.nan if v is None else v for v in lo], dtype=float)
                hi_a = np.array([np.nan if v is None else v for v in hi], dtype=float)
                if np.all(np.isnan(yv)):
                    continue
                err = np.vstack([np.nan_to_num(yv - lo_a, nan=0.0).clip(0), np.nan_to_num(hi_a - yv, nan=0.0).clip(0)])
                ax.errorbar(x, yv, yerr=err, fmt=marker + style, capsize=3, label=arm_label(arm, ratio), ms=4)
        fr = sorted({r.fraction for r in trows})
        for row_i, ax in enumerate(axes[:, col]):
            ax.set_xscale("log")
            if fr:
                ax.set_xticks(fr)
                ax.set_xticklabels([f"{f:g}" for f in fr])
                ax.minorticks_off()
            ax.set_xlabel("fraction of real training patients")
            ax.grid(alpha=0.3)
            if row_i == 1:
                ax.axhline(0.0, color="k", lw=0.8)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
        axes[0, col].set_ylabel(f"test {name} (mean over seeds)")
        axes[0, col].set_title(f"{task}: error bars {100 * ci:g}% CI, bootstrap over test patients", fontsize=9)
        axes[1, col].set_ylabel(f"Δ {name} vs baseline (paired; classical + synthetic: vs classical alone)", fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return path

"""The whitepaper's latent-map and bias section, rendered from the analysis stage's tracked report."""

from __future__ import annotations

from medsynth.evaluation.analysis_summary import downstream_table, latent_map_lines, plausibility_table
from medsynth.report.collect import ExperimentResults
from medsynth.report.tables import no_run_line, run_ref


def analysis_section(res: ExperimentResults) -> list[str]:
    """The latent map's reading (from its coverage numbers) and the bias tables with flags; n/a without the stage."""
    rep, run = res.analysis, res.stage("analysis")
    if rep is None or run is None:
        return [no_run_line("analysis")]
    t = rep.get("targets") or {}
    edges = rep.get("size_edges")
    return [
        f"Run {run_ref(run.run_id)}. " + " ".join(latent_map_lines(rep)),
        "",
        f"Bias by subgroup ({rep['n_items']} test items, {rep['n_patients']} patients; sites from the patient id"
        + (f", lesion-size tertiles split at {edges[0]:g} and {edges[1]:g} voxels" if edges else "")
        + f"). Flagged (bold): the 95% CI upper bound is below the target (lesion Dice ratio {t.get('dice_ratio')}, "
        f"contrast ratio {t.get('contrast_ratio')}) or, downstream, below the same models' score on the whole "
        "test set.",
        "",
        *plausibility_table(rep),
        "",
        "Downstream task models (largest real fraction), per subgroup:",
        "",
        *downstream_table(rep),
    ]

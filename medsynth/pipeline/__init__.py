"""The pipeline as a graph of stage declarations.

A stage is declared once (:class:`~medsynth.pipeline.declare.Stage`): its name, the config sections it
reads, the stages it runs after, a code version, its typed result and the library function doing the
work. Everything mechanical is derived from that declaration by :mod:`medsynth.pipeline.runner`: the
input key, the single "already up to date?" rule, the output folder, the MLflow stage run, the CLI
command (``medsynth.cli``) and the Prefect task or subflow (``flows/``). The declarations live in
:mod:`medsynth.pipeline.stages`, in pipeline order.
"""

from medsynth.pipeline.declare import Stage, StageResult, StageRun
from medsynth.pipeline.registry import STAGES, get_stage, register_stage, stage_order, upstream_closure
from medsynth.pipeline.runner import StageOutcome, run_stage, run_with_upstream

__all__ = [
    "STAGES",
    "Stage",
    "StageOutcome",
    "StageResult",
    "StageRun",
    "get_stage",
    "register_stage",
    "run_stage",
    "run_with_upstream",
    "stage_order",
    "upstream_closure",
]

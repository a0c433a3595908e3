"""What a stage is: one declaration, one typed result, one run-time context.

Adding a stage = one :class:`Stage` passed to :func:`~medsynth.pipeline.registry.register_stage`
plus the library function it names. Nothing else is written per stage: the key, the cache rule,
paths, tracking, CLI command and Prefect task all come from the declaration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from medsynth.config.schema import MedsynthConfig
from medsynth.ledger import ItemLedger
from medsynth.progress import NullProgress, Progress
from medsynth.tracking.base import NullTracker, Tracker


class StageResult(BaseModel):
    """The typed outcome of a stage, stored with its outputs and shown by every (cached) stage run.

    Attributes:
        metrics: Headline numbers, under their one MLflow name (e.g. ``ae/val_psnr``).
        outputs: Named output files or folders (absolute or relative to the working directory).
        model: A folder to register as a model version (safetensors + JSON), if the stage trains one.
        artifacts: Files or folders attached to the stage run (artifact folder -> paths).
        step: The step the metrics belong to (a training stage's last step), so a cached run shows
            them exactly as the run that computed them.
        headline: The few numbers the pipeline's parent run carries (to compare pipelines side by side).
        message: One human line summarising the outcome (printed by the CLI).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    metrics: dict[str, float] = {}
    outputs: dict[str, str] = {}
    model: str | None = None
    artifacts: dict[str, list[str]] = {}
    step: int | None = None
    headline: dict[str, float] = {}
    message: str = ""


class FanOut(Protocol):
    """How a stage's independent items run: ``fan_out(work, items)`` yields results as they finish."""

    def __call__(self, work: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
        """Run ``work(item)`` for every item; yield each result as it completes (any order)."""
        ...


def sequential(work: Callable[[Any], Any], items: list[Any]) -> Iterator[Any]:
    """The default :class:`FanOut`: one item after another in this process."""
    for item in items:
        yield work(item)


ChildRuns = Callable[[str, dict[str, Any]], AbstractContextManager[Tracker]]
"""Opens a tracked child run of the stage run (e.g. one per grid cell): ``child_runs(name, params)``."""


def _null_child_runs(name: str, params: dict[str, Any]) -> AbstractContextManager[Tracker]:
    from contextlib import nullcontext

    return nullcontext(NullTracker())


@dataclass
class StageRun:
    """What a stage function gets: its config, key, folders, and the run-time services.

    Attributes:
        cfg: The resolved config.
        stage: The declaration being run.
        key: The stage's input key (checkpoints and item ledgers are only reused under the same key).
        root: ``<output_dir>/<config name>``; every stage's folder is ``root / <stage folder>``.
        tracker: The stage's MLflow run (a no-op tracker when tracking is off).
        progress: Progress reporter.
        device: Torch device asked for (None: CUDA if available, else CPU).
        resume: Continue from the stage's checkpoints / ledger when the key matches.
        options: The stage's own options (its ``options`` model), e.g. from the command line.
        fan_out: Runs independent items (sequentially, or through the Prefect task runner).
        child_runs: Opens tracked child runs (grid cells), picklable for process-based runners.
    """

    cfg: MedsynthConfig
    stage: Stage
    key: str
    root: Path
    tracker: Tracker = field(default_factory=NullTracker)
    progress: Progress = field(default_factory=NullProgress)
    device: str | None = None
    resume: bool = True
    options: BaseModel | None = None
    fan_out: FanOut = sequential
    child_runs: ChildRuns = _null_child_runs

    @property
    def out(self) -> Path:
        """This stage's output folder."""
        return self.root / self.stage.folder_name

    def path(self, stage: str) -> Path:
        """The output folder of another stage of the same config."""
        from medsynth.pipeline.registry import get_stage

        return self.root / get_stage(stage).folder_name

    def ledger(self, name: str = "items") -> ItemLedger:
        """The stage's item ledger (item-level resume under this key): ``<out>/<name>.jsonl``."""
        return ItemLedger(self.out / f"{name}.jsonl", self.key)

    def torch_device(self) -> Any:
        """The torch device to use (the one asked for, else CUDA if available, else CPU)."""
        from medsynth.device import resolve_device

        return resolve_device(self.device)


StageFn = Callable[[StageRun], StageResult]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, declared once.

    Attributes:
        name: Stage name (MLflow ``medsynth.stage`` tag, Prefect task name, default folder).
        fn: The library function doing the work: ``fn(run: StageRun) -> result``.
        reads: Config sections it reads (dotted paths, e.g. ``validation.features``): part of its key,
            and the only params its MLflow run logs.
        after: Stages whose outputs it reads: their keys and output digests are part of its key, so a
            change upstream re-runs it.
        version: Code version: bump it when the stage's output changes for the same inputs; it
            invalidates this stage and everything downstream.
        result: Its typed result (a :class:`StageResult` subclass).
        help: One line for ``--help`` and docs.
        folder: Output folder under ``<output_dir>/<name>/`` (default: the stage name).
        cli: Command path (``("train", "autoencoder")``); None: no command (pipeline-only stage).
        options: A pydantic model of the stage's own command-line options (fields become options).
        register: Model name under which ``result.model`` is registered (None: nothing registered).
        inputs: Content digest of what the stage reads from outside the pipeline (e.g. the dataset).
        digest: Digest of the stage's outputs on disk (to tell cached outputs that were deleted or
            changed by hand); None: the result JSON is the output.
        enabled: Whether the config runs the stage at all (disabled stages are skipped).
        fan_out: The stage runs many independent items (Prefect runs it as a subflow fanning out
            items through the config's task runner; otherwise as one task with retries).
        progress_total: Steps for a progress bar (e.g. training steps), from the config.
        ignores: Dotted fields inside ``reads`` that do not change this stage's outputs (left out of its key).
        managed: Whether a run with these options writes the pipeline's own outputs (cached and
            stamped); an ad hoc run (e.g. into the user's folder) is neither.
        in_pipeline: Part of ``medsynth run``; False for on-demand stages such as ``export``.
    """

    name: str
    fn: StageFn
    reads: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    version: int = 1
    result: type[StageResult] = StageResult
    help: str = ""
    folder: str | None = None
    cli: tuple[str, ...] | None = None
    options: type[BaseModel] | None = None
    register: str | None = None
    inputs: Callable[[MedsynthConfig], str | None] | None = None
    digest: Callable[[StageRun], str] | None = None
    enabled: Callable[[MedsynthConfig], bool] = lambda cfg: True
    fan_out: bool = False
    progress_total: Callable[[MedsynthConfig], int] | None = None
    ignores: tuple[str, ...] = ()
    managed: Callable[[BaseModel | None], bool] = lambda options: True
    in_pipeline: bool = True

    @property
    def folder_name(self) -> str:
        """The output folder name."""
        return self.folder or self.name

    def is_managed(self, options: BaseModel | None) -> bool:
        """True when this run writes the pipeline's own outputs (cached and stamped)."""
        return self.managed(options)

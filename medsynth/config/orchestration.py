"""How the flows fan work out (the library itself never looks at this)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from medsynth.config.base import StrictModel


class OrchestrationConfig(StrictModel):
    """Prefect task runner used for fanned-out work (per-case preprocessing, experiment-grid cells)."""

    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="'threads': Prefect's ThreadPoolTaskRunner; 'dask': a Dask cluster (prefect-dask)."
    )
    max_workers: int = Field(2, ge=1, description="Threads, or local Dask workers when no address is given.")
    dask_address: str | None = Field(
        None, description="Address of an existing Dask scheduler (tcp://host:8786); None starts a local cluster."
    )
    threads_per_worker: int = Field(1, ge=1, description="Threads per local Dask worker.")

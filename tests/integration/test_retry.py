"""The stage tasks' retry policy, run through real Prefect tasks: a ``MedsynthError`` (bad input or
config) is never retried, any other exception (transient: I/O, a lost worker) is retried exactly once.
Also through a declared stage run by its derived Prefect task, and a fanned-out stage's items."""

from __future__ import annotations

from typing import Any

import pytest

from medsynth.errors import DataError


def _policy_tasks() -> list[Any]:
    from flows import stage

    return [stage.stage_task, stage.item_task]


def _counting_task(template: Any, fail_with: list[BaseException]) -> tuple[Any, list[int]]:
    """A Prefect task with ``template``'s retry settings that raises ``fail_with`` in turn, then returns."""
    from prefect import task

    calls: list[int] = []

    @task(
        name=f"retry-probe-{template.name}",
        retries=template.retries,
        retry_delay_seconds=0,
        retry_condition_fn=template.retry_condition_fn,
    )
    def probe() -> str:
        calls.append(1)
        if len(calls) <= len(fail_with):
            raise fail_with[len(calls) - 1]
        return "done"

    return probe, calls


def test_stage_tasks_declare_one_retry_under_the_transient_condition() -> None:
    from flows.stage import transient

    for t in _policy_tasks():
        assert t.retries == 1, t.name
        assert t.retry_condition_fn is transient, t.name


@pytest.mark.parametrize("template", _policy_tasks(), ids=lambda t: t.name)
def test_medsynth_errors_are_never_retried_and_transient_ones_once(prefect_harness: None, template: Any) -> None:
    # bad input: one attempt, the error reaches the caller unchanged
    probe, calls = _counting_task(template, [DataError("x.nii.gz", "not a NIfTI file")])
    with pytest.raises(DataError, match="not a NIfTI file"):
        probe()
    assert len(calls) == 1

    # a transient failure: retried once, and the retry's result is returned
    probe, calls = _counting_task(template, [OSError("disk hiccup")])
    assert probe() == "done"
    assert len(calls) == 2

    # failing twice: exactly one retry, then the error
    probe, calls = _counting_task(template, [OSError("disk hiccup"), OSError("still down")])
    with pytest.raises(OSError, match="still down"):
        probe()
    assert len(calls) == 2


FAILS: list[BaseException] = []
CALLS: list[str] = []


def _flaky(run: Any) -> Any:
    from medsynth.pipeline import StageResult

    CALLS.append(run.stage.name)
    if FAILS:
        raise FAILS.pop(0)
    return StageResult(metrics={"flaky/ok": 1.0})


def _flaky_item(item: int) -> int:
    CALLS.append(f"item{item}")
    if FAILS:
        raise FAILS.pop(0)
    return item


def _fanned(run: Any) -> Any:
    from medsynth.pipeline import StageResult

    got = sorted(run.fan_out(_flaky_item, [1, 2]))
    return StageResult(metrics={"fanned/n": float(len(got))})


@pytest.fixture
def flaky_stages(tmp_path: Any) -> Any:
    import yaml

    from medsynth.config import load_config
    from medsynth.pipeline import Stage, register_stage, stage_order
    from medsynth.pipeline.registry import unregister_stage

    stage_order()
    register_stage(Stage("flaky", _flaky, reads=("qc",)))
    register_stage(Stage("fanned", _fanned, reads=("qc",), fan_out=True))
    path = tmp_path / "flaky.yaml"
    raw = {"name": "flaky", "output_dir": str(tmp_path / "out"), "data": {"root": str(tmp_path / "d")}}
    path.write_text(yaml.safe_dump({**raw, "tracking": {"enabled": False}}), encoding="utf-8")
    FAILS.clear()
    CALLS.clear()
    yield load_config(path).model_dump(mode="json")
    unregister_stage("flaky")
    unregister_stage("fanned")


def test_a_declared_stage_retries_transient_errors_once_and_never_bad_input(
    prefect_harness: None, flaky_stages: Any
) -> None:
    from flows.stage import run_stage_prefect

    FAILS.append(OSError("disk hiccup"))
    out = run_stage_prefect("flaky", flaky_stages)
    assert out["result"]["metrics"] == {"flaky/ok": 1.0} and CALLS == ["flaky", "flaky"]

    CALLS.clear()
    FAILS.append(DataError("x.nii.gz", "not a NIfTI file"))
    with pytest.raises(DataError, match="not a NIfTI file"):
        run_stage_prefect("flaky", {**flaky_stages, "qc": {**flaky_stages["qc"], "n_overlays": 3}})
    assert CALLS == ["flaky"]


def test_a_fanned_out_stage_retries_the_failing_item_only(prefect_harness: None, flaky_stages: Any) -> None:
    from flows.stage import run_stage_prefect

    FAILS.append(OSError("worker lost"))
    out = run_stage_prefect("fanned", flaky_stages)
    assert out["result"]["metrics"] == {"fanned/n": 2.0}
    assert sorted(CALLS) == ["item1", "item1", "item2"] or sorted(CALLS) == ["item1", "item2", "item2"]

"""The training tasks' retry policy, run through real Prefect tasks: a ``MedsynthError`` (bad input or
config) is never retried, any other exception (transient: I/O, a lost worker) is retried exactly once."""

from __future__ import annotations

from typing import Any

import pytest

from medsynth.errors import DataError


def _policy_tasks() -> list[Any]:
    from flows import train

    return [train.autoencoder_task, train.latents_task, train.unet_task, train.controlnet_task]


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


def test_training_tasks_declare_one_retry_under_the_transient_condition() -> None:
    from flows.train import transient

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

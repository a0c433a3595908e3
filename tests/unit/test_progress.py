"""Progress lines: an ETA only while the total is known, never a negative one."""

from __future__ import annotations

import logging

import pytest

from medsynth.progress import LogProgress


def test_known_total_reports_eta_and_completion(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="medsynth.progress")
    p = LogProgress(4, "cells", every_s=3600)
    for _ in range(4):
        p.advance()
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["cells: 4/4"]
    assert "ETA 0s" in caplog.records[0].getMessage()


@pytest.mark.parametrize("total", [0, 1])
def test_unknown_or_exceeded_total_shows_count_without_eta(caplog: pytest.LogCaptureFixture, total: int) -> None:
    caplog.set_level(logging.INFO, logger="medsynth.progress")
    p = LogProgress(total, "preprocess", every_s=0.0)
    p.advance(64)
    p.advance(64)
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all("ETA" not in m and "/1 " not in m for m in lines), lines
    assert lines[-1].startswith("preprocess: 128 done")

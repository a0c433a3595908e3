"""Patient-level train/val/test splits (medsynth.data.cases.assign_splits)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medsynth.config.data import SplitConfig
from medsynth.data.cases import SPLITS, Case, assign_splits, split_summary, splits_json
from medsynth.errors import DataError


def _cases(cases_per_patient: list[int], split: str | None = None) -> list[Case]:
    out = []
    for p, n in enumerate(cases_per_patient):
        for k in range(n):
            out.append(Case(f"p{p}_c{k}", f"p{p}", Path(f"p{p}_c{k}.png"), Path(f"p{p}_c{k}_mask.png"), split))
    return out


def _patient_splits(cases: list[Case]) -> dict[str, set[str | None]]:
    out: dict[str, set[str | None]] = {}
    for c in cases:
        out.setdefault(c.patient_id, set()).add(c.split)
    return out


patients = st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=40)


@settings(max_examples=25, deadline=None)
@given(per_patient=patients, seed=st.integers(0, 2**31 - 1))
def test_splits_are_by_patient_and_deterministic(per_patient: list[int], seed: int) -> None:
    cases = _cases(per_patient)
    cfg = SplitConfig(seed=seed)
    a = assign_splits(cases, cfg)
    assert [c.case_id for c in a] == [c.case_id for c in cases]  # input order kept
    assert all(c.split in SPLITS for c in a)
    assert all(len(s) == 1 for s in _patient_splits(a).values())  # no patient in two splits
    assert assign_splits(cases, SplitConfig(seed=seed)) == a


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(3, 60),
    fractions=st.sampled_from([(0.7, 0.1, 0.2), (0.8, 0.1, 0.1), (0.5, 0.25, 0.25), (0.6, 0.0, 0.4)]),
    seed=st.integers(0, 1000),
)
def test_fractions_roughly_respected(n: int, fractions: tuple[float, float, float], seed: int) -> None:
    train, val, test = fractions
    cfg = SplitConfig(train=train, val=val, test=test, seed=seed)
    summary = split_summary(assign_splits(_cases([2] * n), cfg))
    got = {s: summary[s]["patients"] for s in SPLITS}
    assert sum(got.values()) == n
    assert abs(got["test"] - n * test) <= 1
    assert abs(got["val"] - n * val) <= 1
    assert abs(got["train"] - n * train) <= 2
    for s, frac in zip(SPLITS, fractions, strict=True):  # a requested split is never empty (n >= 3)
        assert (got[s] > 0) == (frac > 0)
    assert summary["test"]["cases"] == 2 * got["test"]


def test_another_seed_gives_another_split() -> None:
    cases = _cases([1] * 30)
    splits = {tuple(c.split for c in assign_splits(cases, SplitConfig(seed=s))) for s in range(4)}
    assert len(splits) > 1
    a = assign_splits(cases, SplitConfig(seed=0))
    b = assign_splits(cases, SplitConfig(seed=1))
    assert [c.split for c in a] != [c.split for c in b]


@settings(max_examples=25, deadline=None)
@given(
    given_splits=st.lists(st.sampled_from(SPLITS), min_size=1, max_size=8),
    n_free=st.integers(0, 12),
    seed=st.integers(0, 1000),
)
def test_given_splits_are_kept(given_splits: list[str], n_free: int, seed: int) -> None:
    fixed = [Case(f"g{i}", f"G{i}", Path(f"g{i}.png"), None, s) for i, s in enumerate(given_splits)]
    free = _cases([1] * n_free)
    out = assign_splits(fixed + free, SplitConfig(seed=seed))
    assert [c.split for c in out[: len(fixed)]] == given_splits
    assert all(c.split in SPLITS for c in out)


def test_patient_with_conflicting_given_splits_is_an_error() -> None:
    cases = [
        Case("a", "P", Path("a.png"), None, "train"),
        Case("b", "P", Path("b.png"), None, "test"),
    ]
    with pytest.raises(DataError, match="patient P is in splits train and test"):
        assign_splits(cases, SplitConfig())


def test_unknown_given_split_is_an_error() -> None:
    with pytest.raises(DataError, match="'holdout'"):
        assign_splits([Case("a", "P", Path("a.png"), None, "holdout")], SplitConfig())


def test_splits_json_maps_patients() -> None:
    cases = assign_splits(_cases([3, 1, 2, 2, 1]), SplitConfig(seed=3))
    js = splits_json(cases)
    assert set(js["patients"]) == {f"p{i}" for i in range(5)}
    assert sum(v["cases"] for v in js["summary"].values()) == 9

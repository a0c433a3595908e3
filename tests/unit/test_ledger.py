"""The item ledger: finished items survive a re-open, other keys and torn lines are ignored."""

from __future__ import annotations

from pathlib import Path

from medsynth.ledger import ItemLedger


def test_ledger_records_and_resumes(tmp_path: Path) -> None:
    led = ItemLedger(tmp_path / "items.jsonl", "k1")
    led.record("a", {"v": 1})
    led.record("b")
    again = ItemLedger(tmp_path / "items.jsonl", "k1")
    assert again.done() == {"a": {"v": 1}, "b": {}}
    assert again.todo(["a", "b", "c"]) == ["c"]


def test_ledger_ignores_other_keys_and_torn_lines(tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    ItemLedger(path, "old").record("a")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"key": "new", "item": "x"')  # a kill mid-write
    led = ItemLedger(path, "new")
    assert led.done() == {}
    led.record("b", {"n": 2})
    assert led.done() == {"b": {"n": 2}}
    assert led.todo(["a", "b"]) == ["a"]
    led.reset()
    assert led.done() == {}

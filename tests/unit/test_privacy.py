"""Keyed pseudonyms: stable under one key, different under another, not a plain hash, never colliding silently."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest

from medsynth.config.loader import validate_config
from medsynth.config.schema import MedsynthConfig
from medsynth.privacy import KEY_FILE, MAP_FILE, Pseudonymiser, privacy_dir, pseudonymiser


def _cfg(tmp_path: Path, **privacy: object) -> MedsynthConfig:
    raw = {"name": "p", "output_dir": str(tmp_path / "out"), "data": {"root": "x"}, "privacy": privacy}
    return validate_config(raw, "privacy test", MedsynthConfig)


def test_disabled_is_the_identity(tmp_path: Path) -> None:
    p = pseudonymiser(_cfg(tmp_path))
    assert not p.enabled and p("TCGA_CS_4941_19") == "TCGA_CS_4941_19"
    assert p.save_table(tmp_path / "t.csv") is None and not (tmp_path / "t.csv").exists()
    assert not privacy_dir(_cfg(tmp_path)).exists()  # no key is made when nothing is pseudonymised


def test_keyed_stable_and_not_a_plain_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDSYNTH_PSEUDONYM_KEY", raising=False)
    cfg = _cfg(tmp_path, pseudonymise_ids=True)
    a = pseudonymiser(cfg)
    x = a("TCGA_CS_4941_19")
    assert x.startswith("anon-") and len(x) == len("anon-") + 12 and "4941" not in x
    assert x[5:] != hashlib.sha256(b"TCGA_CS_4941_19").hexdigest()[:12]  # keyed: not recomputable from the id
    key = privacy_dir(cfg) / KEY_FILE
    assert key.is_file() and (key.stat().st_mode & 0o077) == 0  # the key is private to its owner
    assert pseudonymiser(cfg)("TCGA_CS_4941_19") == x  # same key file -> same pseudonym in a later run
    assert a("TCGA_CS_4941_20") != x
    monkeypatch.setenv("MEDSYNTH_PSEUDONYM_KEY", "shared secret")
    b = pseudonymiser(cfg)
    assert b("TCGA_CS_4941_19") != x and b("TCGA_CS_4941_19") == pseudonymiser(cfg)("TCGA_CS_4941_19")
    # the table merges runs and maps back
    path = b.save_table(privacy_dir(cfg) / MAP_FILE)
    c = pseudonymiser(cfg)
    c("TCGA_HT_7692_3")
    c.save_table(path)  # type: ignore[arg-type]
    with open(path, newline="", encoding="utf-8") as fh:  # type: ignore[arg-type]
        rows = {r["id"]: r["pseudonym"] for r in csv.DictReader(fh)}
    assert rows == {"TCGA_CS_4941_19": b("TCGA_CS_4941_19"), "TCGA_HT_7692_3": c("TCGA_HT_7692_3")}


def test_a_collision_is_an_error_not_a_merge() -> None:
    p = Pseudonymiser(b"k")
    p("a")
    p._back[p("b")] = "someone else"  # as if two ids had the same 48-bit pseudonym
    p._seen.pop("b")
    with pytest.raises(ValueError, match="collision"):
        p("b")

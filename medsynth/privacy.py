"""Keyed pseudonyms for case and patient ids in figures, logged reports and exports.

A :class:`Pseudonymiser` maps an id to ``<prefix>-<12 hex digits>`` of HMAC-SHA256(key, id): the same
id always gets the same pseudonym under one key (so a case keeps its name across figures, reports and
runs), nobody without the key can recompute it from a list of known ids (unlike a plain hash), and
2^48 values make collisions negligible for any dataset (checked anyway: a collision is an error). The
disabled pseudonymiser returns ids unchanged, so callers apply it unconditionally.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from medsynth.config.schema import MedsynthConfig
from medsynth.fileio import write_text_atomic

__all__ = ["KEY_FILE", "MAP_FILE", "Pseudonymiser", "privacy_dir", "pseudonymiser"]

KEY_FILE = "pseudonym.key"
MAP_FILE = "pseudonyms.csv"


class Pseudonymiser:
    """``p(id) -> pseudonym`` (identity when disabled); remembers what it mapped.

    Args:
        key: Secret key; None disables pseudonymisation.
        prefix: Start of every pseudonym.
    """

    def __init__(self, key: bytes | None, prefix: str = "anon") -> None:
        self._key = key
        self.prefix = prefix
        self._seen: dict[str, str] = {}
        self._back: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        """Whether ids are replaced."""
        return self._key is not None

    def __call__(self, identifier: object) -> str:
        """The pseudonym of ``identifier`` (its ``str``); the id itself when disabled."""
        text = str(identifier)
        if self._key is None:
            return text
        if text in self._seen:
            return self._seen[text]
        digest = hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).hexdigest()[:12]
        out = f"{self.prefix}-{digest}"
        if self._back.get(out, text) != text:  # 48 bits: practically never; never silently merge two cases
            raise ValueError(f"pseudonym collision between {self._back[out]!r} and {text!r}; use another key")
        self._seen[text], self._back[out] = out, text
        return out

    def many(self, identifiers: Iterable[object]) -> list[str]:
        """Pseudonyms of several ids, in order."""
        return [self(i) for i in identifiers]

    def table(self) -> dict[str, str]:
        """Every id mapped so far -> its pseudonym."""
        return dict(self._seen)

    def save_table(self, path: str | Path) -> Path | None:
        """Merge the ids mapped so far into the CSV table at ``path`` (``id,pseudonym``); None when disabled.

        The table re-identifies patients: keep it where the raw data is, never with what is shared.
        """
        if not self.enabled:
            return None
        p = Path(path)
        rows: dict[str, str] = {}
        if p.is_file():
            with open(p, newline="", encoding="utf-8") as fh:
                rows = {r["id"]: r["pseudonym"] for r in csv.DictReader(fh)}
        rows.update(self._seen)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["id", "pseudonym"])
        w.writerows(sorted(rows.items()))
        write_text_atomic(p, buf.getvalue())
        return p


def privacy_dir(cfg: MedsynthConfig) -> Path:
    """``<output_dir>/<name>/privacy``: the key file and the id table (local only)."""
    return Path(cfg.output_dir) / cfg.name / "privacy"


def _key(cfg: MedsynthConfig) -> bytes:
    env = os.environ.get(cfg.privacy.key_env)
    if env:
        return env.encode("utf-8")
    path = privacy_dir(cfg) / KEY_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # first writer wins; a concurrent run reads the same key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text(encoding="utf-8").strip().encode("utf-8")


def pseudonymiser(cfg: MedsynthConfig) -> Pseudonymiser:
    """The config's pseudonymiser (identity unless ``privacy.pseudonymise_ids``)."""
    pc = cfg.privacy
    if not pc.pseudonymise_ids:
        return Pseudonymiser(None)
    return Pseudonymiser(_key(cfg), pc.prefix)

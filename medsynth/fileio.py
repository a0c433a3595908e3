"""Atomic file and folder writing and content hashing, shared by every module that writes outputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medsynth.errors import OutputExistsError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` and move it into place only on success.

    The temporary file keeps the final suffix(es) so that format-sniffing writers (nibabel,
    SimpleITK, numpy) behave as for the final name. If the block raises, the temporary file is
    removed and ``path`` is untouched, so a reader never sees a half-written file.

    Args:
        path: Final destination.

    Yields:
        The temporary path to write to.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` and atomically rename the result to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write text to ``path`` atomically (UTF-8)."""
    return write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def is_nonempty(path: str | Path) -> bool:
    """True if ``path`` is a folder with entries, or any other existing file or link."""
    p = Path(path)
    if p.is_dir():
        return any(p.iterdir())
    return p.exists() or p.is_symlink()


def move_dir_into_place(tmp: str | Path, out: str | Path, overwrite: bool) -> None:
    """Atomically rename the finished folder ``tmp`` to ``out`` (a sibling on the same file system).

    A missing or empty ``out`` is simply replaced. A non-empty ``out`` is replaced only with
    ``overwrite``: it is first renamed aside, then ``tmp`` takes its place, then the old content is
    deleted; if the second rename fails the old folder is put back.

    Args:
        tmp: The complete new folder.
        out: The destination.
        overwrite: Replace a non-empty ``out``.

    Raises:
        OutputExistsError: If ``out`` is non-empty (or became so meanwhile) and ``overwrite`` is False.
    """
    tmp, out = Path(tmp), Path(out)
    if not is_nonempty(out):
        try:
            os.replace(tmp, out)  # also replaces an empty folder
            return
        except OSError:
            if not overwrite and is_nonempty(out):  # somebody wrote there meanwhile
                raise OutputExistsError(out) from None
            if not overwrite:
                raise
    if not overwrite:
        raise OutputExistsError(out)
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, trash / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        os.replace(trash / out.name, out)  # put the old folder back
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def staged_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build a folder in a temporary sibling of ``out`` and move it into place only on success.

    A non-empty ``out`` is refused up front (before any work) unless ``overwrite``; with
    ``overwrite`` it is replaced only once the new folder is complete. If the block raises, the
    temporary folder is removed and ``out`` is left untouched.

    Args:
        out: Final folder.
        overwrite: Replace a non-empty ``out``.

    Yields:
        The temporary folder to fill.

    Raises:
        OutputExistsError: If ``out`` is non-empty and ``overwrite`` is False.
    """
    final = Path(out)
    if not overwrite and is_nonempty(final):
        raise OutputExistsError(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        move_dir_into_place(tmp, final, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, or of every file below a folder (sorted by relative path)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex SHA-256 of the canonical JSON form of ``obj`` (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()

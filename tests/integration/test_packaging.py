"""A non-editable install works from any folder: shipped configs are package data, ``--version`` answers.

The fresh virtual environment reuses the test interpreter's installed dependencies through a ``.pth``
line (no downloads) and gets medsynth itself from a plain ``pip install`` of a copy of the source tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

import medsynth

ROOT = Path(__file__).resolve().parents[2]


def _copy_tree(dst: Path) -> None:
    """Copy the tracked and untracked-but-not-ignored files (links kept as links), as a clone would have them."""
    files = (
        subprocess.run(
            ["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    tar = dst.parent / "src.tar"
    with tarfile.open(tar, "w") as t:
        for f in filter(None, files):
            if (ROOT / f).exists() or (ROOT / f).is_symlink():
                t.add(ROOT / f, arcname=f, recursive=False)
    with tarfile.open(tar) as t:
        t.extractall(dst, filter="tar")


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the source checkout (git)")
def test_non_editable_install_runs_from_another_folder(tmp_path: Path) -> None:
    src, venv, elsewhere = tmp_path / "src", tmp_path / "venv", tmp_path / "elsewhere"
    src.mkdir()
    elsewhere.mkdir()
    _copy_tree(src)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch & co. without a download
    py, exe = venv / "bin" / "python", venv / "bin" / "medsynth"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--ignore-installed", str(src)], check=True, env=env, cwd=elsewhere)

    def run(*args: str) -> str:
        out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300)
        assert out.returncode == 0, out.stderr
        return out.stdout

    where = run(str(py), "-c", "import medsynth; print(medsynth.__file__)")
    assert Path(where.strip()).is_relative_to(site), where  # the installed copy, not the source tree
    assert run(str(exe), "--version").startswith(f"medsynth {medsynth.__version__}")
    assert "Usage: medsynth run" in run(str(exe), "run", "--help")
    assert run(str(exe), "config", "show", "-c", "demo").startswith("name: demo\n")
    demo = run(str(py), "-c", "from medsynth.config.shipped import resolve_config; print(resolve_config(None))")
    assert Path(demo.strip()).is_relative_to(site / "medsynth" / "configs")  # what `medsynth run` uses
    assert (site / "medsynth" / "py.typed").is_file()
    lic = list(site.glob("medsynth-*.dist-info/licenses/LICENSE"))
    assert lic and "Apache License" in lic[0].read_text()

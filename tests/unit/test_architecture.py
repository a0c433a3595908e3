"""Boundaries of the code base: the library never imports Prefect; only ``medsynth/tracking`` imports MLflow."""

from __future__ import annotations

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[2] / "medsynth"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_prefect() -> None:
    offenders = [str(p.relative_to(LIB)) for p in LIB.rglob("*.py") if "prefect" in _imports(p)]
    assert offenders == []


def test_only_tracking_imports_mlflow() -> None:
    offenders = [
        str(p.relative_to(LIB)) for p in LIB.rglob("*.py") if "mlflow" in _imports(p) and p.parent.name != "tracking"
    ]
    assert offenders == []
    assert "mlflow" in _imports(LIB / "tracking" / "mlflow_store.py")  # the check sees real imports


def test_only_data_io_reads_images_with_nibabel_or_simpleitk() -> None:
    users = {str(p.relative_to(LIB)) for p in LIB.rglob("*.py") if _imports(p) & {"nibabel", "SimpleITK"}}
    assert users == {"data/io.py"}

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


LAYERS: dict[str, int] = {
    # the bottom: no medsynth dependencies beyond these
    "errors": 0,
    "fileio": 0,
    "progress": 0,
    "ledger": 0,
    "viz": 0,
    "config": 0,
    "checkpoint": 0,
    "device": 0,
    "na": 0,
    "provenance": 0,
    "privacy": 0,
    # data, networks, diffusion maths, the tracker interface
    "data": 1,
    "models": 1,
    "diffusion": 1,
    "tracking": 1,
    "locking": 1,
    # generator assembly, shared by training and synthesis
    "generator": 2,
    # adapters (safetensors + JSON) put on a loaded generator, by synthesis and adaptation alike
    "adapter": 2,
    # training and synthesis never import each other
    "training": 3,
    "synthesis": 3,
    "evaluation": 4,
    # site adaptation: the ControlNet training loop with a trainable-parameter hook, measured by evaluation
    "adaptation": 4,
    "planning": 4,
    "report": 5,
    # the MLflow model flavour wraps the trained generator and segmenter: above synthesis and evaluation,
    # inside the one package that imports mlflow
    "tracking.pyfunc": 5,
    "pipeline": 6,
    "cli_stages": 7,
    "cli": 7,
}
"""Layers only point down: a module imports lower layers and its own layer, never a higher one."""

APART = {frozenset({"training", "synthesis"})}
"""Packages of one layer that must not import each other."""


def _medsynth_imports(path: Path) -> set[str]:
    """Top-level medsynth packages/modules a file imports (module level and inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for n in names:
            parts = n.split(".")
            if parts[0] == "medsynth" and len(parts) > 1:
                out.add(parts[1])
    return out


def _unit(path: Path) -> str:
    rel = path.relative_to(LIB)
    if rel.parts[0] == "tracking" and rel.stem.startswith("pyfunc"):
        return "tracking.pyfunc"
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def test_every_module_has_a_layer() -> None:
    units = {_unit(p) for p in LIB.rglob("*.py")} - {"__init__", "__main__"}
    assert units <= set(LAYERS), units - set(LAYERS)


def test_imports_never_run_back_up_the_layers() -> None:
    offenders = []
    for p in LIB.rglob("*.py"):
        unit = _unit(p)
        if unit not in LAYERS:
            continue
        for dep in _medsynth_imports(p):
            if dep in LAYERS and (LAYERS[dep] > LAYERS[unit] or frozenset({dep, unit}) in APART):
                offenders.append(f"{p.relative_to(LIB)} -> medsynth.{dep}")
    assert offenders == [], offenders


def test_the_layer_check_sees_real_imports() -> None:
    assert "generator" in _medsynth_imports(LIB / "training" / "diffusion.py")
    assert "pipeline" in _medsynth_imports(LIB / "cli.py")


def test_samplers_and_inversion_never_import_networks() -> None:
    """``diffusion/`` (samplers, DDIM inversion, blending) reaches networks only through ``denoise(x, t, cond)``."""
    offenders = [p.name for p in (LIB / "diffusion").glob("*.py") if _medsynth_imports(p) & {"models", "generator"}]
    assert offenders == []
    assert "diffusion" in _medsynth_imports(LIB / "synthesis" / "counterfactual.py")  # the check sees real imports


ANALYSIS_MODULES = {
    "evaluation/latent_map.py": "evaluation",
    "evaluation/bias.py": "evaluation",
    "evaluation/analysis.py": "evaluation",
    "evaluation/analysis_summary.py": "evaluation",
    "config/analysis.py": "config",
    "report/analysis.py": "report",
}
"""The analysis stage's modules (issue 16) and their layers: the library computes, the report only renders."""


def test_analysis_modules_sit_in_their_layers() -> None:
    for rel, unit in ANALYSIS_MODULES.items():
        path = LIB / rel
        assert _unit(path) == unit, rel
        deps = _medsynth_imports(path) & set(LAYERS)
        assert all(LAYERS[d] <= LAYERS[unit] for d in deps), (rel, deps)
    assert "pipeline" not in _medsynth_imports(LIB / "evaluation" / "analysis.py")
    assert "evaluation" in _medsynth_imports(LIB / "report" / "analysis.py")  # it renders the library's text


def test_umap_is_imported_in_one_module_only() -> None:
    users = {
        str(p.relative_to(LIB))
        for p in LIB.rglob("*.py")
        if "umap" in _imports(p) or 'import_module("umap")' in p.read_text(encoding="utf-8")
    }
    assert users == {"evaluation/latent_map.py"}  # an optional extra: one place to say "not installed"

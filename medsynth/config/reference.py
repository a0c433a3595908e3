"""Generate the configuration reference (Markdown) from the pydantic models themselves."""

from __future__ import annotations

import json
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from medsynth.config.schema import MedsynthConfig


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if annotation is type(None):
        return "None"
    if origin in (Union, UnionType):
        return " \\| ".join(_type_name(a) for a in get_args(annotation))
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in get_args(annotation))
    if origin is None:
        return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")
    args = ", ".join(_type_name(a) for a in get_args(annotation))
    name = getattr(origin, "__name__", str(origin)).replace("typing.", "")
    return f"{name}[{args}]"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def _rows(model: type[BaseModel], prefix: str, sections: list[tuple[str, type[BaseModel]]]) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _model_of(field.annotation)
        if sub is not None:
            sections.append((key, sub))
            continue
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{key}` | `{_type_name(field.annotation)}` | {_default(field)} | {desc} |")
    return rows


def config_reference() -> str:
    """Markdown reference of every config key: type, default and description, section by section."""
    out = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models by `medsynth config reference` — do not edit by hand.",
        "Every section is frozen and rejects unknown keys; override any key on the command line with",
        "`--set section.key=value` (values are parsed as YAML). A config may `extends: other.yaml`.",
        "",
    ]
    queue: list[tuple[str, type[BaseModel]]] = [("", MedsynthConfig)]
    while queue:
        prefix, model = queue.pop(0)
        title = prefix or "(top level)"
        doc = (model.__doc__ or "").strip().split("\n")[0]
        sections: list[tuple[str, type[BaseModel]]] = []
        rows = _rows(model, f"{prefix}." if prefix else "", sections)
        out += [f"## `{title}` — {model.__name__}", "", doc, ""]
        if rows:
            out += ["| key | type | default | description |", "|---|---|---|---|", *rows, ""]
        queue = sections + queue
    return "\n".join(out) + "\n"

"""Load a pipeline spec from YAML with ``--set`` overrides, and turn validation errors into one clear message."""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from reelflow.schemas.errors import GraphError, SpecError
from reelflow.schemas.pipeline import PipelineSpec
from reelflow.schemas.stages import STAGE_TYPES, stage_tag


def load_spec(source: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()) -> PipelineSpec:
    """Read a spec from a YAML file (or an already parsed mapping), apply ``key.path=value`` overrides, validate."""
    raw = dict(source) if isinstance(source, Mapping) else _read_yaml(Path(source))
    for override in overrides:
        raw = apply_override(raw, override)
    return validate_spec(raw)


def validate_spec(raw: Mapping[str, Any]) -> PipelineSpec:
    try:
        return PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise _spec_error(exc, raw) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist; give the path of a pipeline YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file {str(path)!r} is not valid YAML: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise SpecError(f"spec file {str(path)!r} must hold a mapping with `name` and `stages`, not {type(data).__name__}")
    return data


def apply_override(raw: Mapping[str, Any], override: str) -> dict[str, Any]:
    """Set one dotted path, e.g. ``stages.encode_video.params.crf=23``; a stage is addressed by its id."""
    path, sep, text = override.partition("=")
    if not sep or not path:
        raise SpecError(f"override {override!r} is not of the form key.path=value, e.g. seed=3")
    value = yaml.safe_load(text) if text.strip() else ""
    updated = _deep_copy(raw)
    parts = path.split(".")
    target: Any = updated
    for i, part in enumerate(parts[:-1]):
        target = _step(target, part, parts[: i + 1], create=True)
    _assign(target, parts[-1], value, parts)
    return updated


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def _step(container: Any, part: str, walked: list[str], *, create: bool) -> Any:
    if isinstance(container, list):
        return container[_list_index(container, part, walked)]
    if isinstance(container, dict):
        if part not in container or container[part] is None:
            container[part] = {}
        return container[part]
    raise SpecError(f"override path {'.'.join(walked)!r} goes through a {type(container).__name__}, not a mapping")


def _assign(container: Any, part: str, value: Any, parts: list[str]) -> None:
    if isinstance(container, list):
        container[_list_index(container, part, parts)] = value
    elif isinstance(container, dict):
        container[part] = value
    else:
        raise SpecError(f"override path {'.'.join(parts)!r} cannot be set inside a {type(container).__name__}")


def _list_index(items: list[Any], part: str, walked: list[str]) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    ids = [_stage_id(item) for item in items]
    if part in ids:
        return ids.index(part)
    raise SpecError(
        f"override path {'.'.join(walked)!r}: no entry {part!r}; use an index or one of: {', '.join(map(str, ids))}"
    )


def _stage_id(item: Any) -> str:
    if isinstance(item, Mapping):
        return str(item.get("id") or item.get("stage") or "?")
    return "?"


def _spec_error(exc: ValidationError, raw: Mapping[str, Any]) -> SpecError:
    errors = exc.errors()
    graph_errors = [e["ctx"]["error"] for e in errors if isinstance(e.get("ctx", {}).get("error"), GraphError)]
    if graph_errors:
        return graph_errors[0]
    problems = [_describe(e, raw) for e in errors]
    name = raw.get("name", "?") if isinstance(raw, Mapping) else "?"
    count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
    return SpecError(f"invalid pipeline spec {name!r} ({count}): " + "; ".join(problems))


def _describe(error: Mapping[str, Any], raw: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    where = _render_loc(loc, raw) or "spec"
    if error["type"] == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return f"{where}: unknown field (set to {_short(error.get('input'))}){hint}"
    if error["type"] == "missing":
        return f"{where}: required field is missing"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message} (got {_short(error.get('input'))})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _render_loc(loc: tuple[Any, ...], raw: Mapping[str, Any]) -> str:
    parts: list[str] = []
    stages = raw.get("stages") if isinstance(raw, Mapping) else None
    i = 0
    while i < len(loc):
        part = loc[i]
        if part == "stages" and i == 0 and i + 1 < len(loc) and isinstance(loc[i + 1], int):
            index = loc[i + 1]
            entry = stages[index] if isinstance(stages, list) and index < len(stages) else None
            parts.append(f"stages.{_stage_id(entry) if entry is not None else index}")
            i += 3 if i + 2 < len(loc) and loc[i + 2] in _by_tag() else 2
            continue
        parts.append(str(part))
        i += 1
    return ".".join(parts)


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at a validation-error location, for 'allowed: ...' hints."""
    current: Any = PipelineSpec
    for part in loc:
        current = _descend(current, part)
        if current is None:
            return []
    model = _as_model(current)
    return list(model.model_fields) if model else []


def _descend(annotation: Any, part: Any) -> Any:
    if typing.get_origin(annotation) is dict:
        return typing.get_args(annotation)[-1]
    model = _as_model(annotation)
    tagged = _by_tag()
    if model is not None:
        if part in tagged and model is not tagged[part]:
            return tagged[part]
        field = model.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field else None
    if isinstance(part, str) and part in tagged:
        return tagged[part]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else None


def _as_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    candidates = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return candidates[0] if len(candidates) == 1 else None


def _by_tag() -> dict[str, type[BaseModel]]:
    return {stage_tag(*key): cls for key, cls in STAGE_TYPES.items()}

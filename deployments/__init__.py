"""Deployment assets shipped with the package: pipeline presets and prefect.yaml."""

from __future__ import annotations

from pathlib import Path

from reelflow.schemas.errors import SpecError

HERE = Path(__file__).resolve().parent
PRESETS = HERE / "presets"


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS.glob("*.yaml"))


def spec_path(name: str) -> Path:
    """A spec file path, or the preset of that name in deployments/presets/."""
    path = Path(name)
    if path.is_file():
        return path
    preset = PRESETS / f"{name}.yaml"
    if preset.is_file():
        return preset
    raise SpecError(f"{name!r} is neither a spec file nor a preset; presets: {', '.join(preset_names())}")

"""Deployment assets shipped with the package: pipeline presets and prefect.yaml.

Presets are found through the installed method packages (reelflow's own live in ``presets/``), so
a method installed from outside brings its presets with it.
"""

from __future__ import annotations

from pathlib import Path

from reelflow.schemas.errors import SpecError
from reelflow.schemas.registry import presets as installed_presets

HERE = Path(__file__).resolve().parent
PRESETS = HERE / "presets"


def preset_names() -> list[str]:
    return sorted(installed_presets())


def spec_path(name: str | Path) -> Path:
    """A spec file path, or the installed preset of that name."""
    path = Path(name)
    if path.is_file():
        return path
    found = installed_presets().get(str(name))
    if found is not None:
        return found
    raise SpecError(f"{str(name)!r} is neither a spec file nor a preset; presets: {', '.join(preset_names())}")

"""Deployment assets shipped with the package: pipeline presets (and, later, prefect.yaml)."""

from __future__ import annotations

from pathlib import Path

PRESETS = Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESETS.glob("*.yaml"))

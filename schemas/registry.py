"""Method packages: how stages, implementations, presets and tiny-model builders are found.

A method package (FateZero, Videoshop, a lab's own method) exposes one :class:`Method` through the
``reelflow.methods`` entry-point group. Loading the entry point imports the module that defines it,
which declares the package's stages (pydantic models, no torch); ``implementations`` name the
modules that register the stage tasks, imported only when tasks are needed; ``presets`` names a
package (or folder) of pipeline YAML files; ``tiny`` maps builder names to ``module:function``
writers of tiny random models for tests and demos. reelflow's own stages come in the same way, so
adding a method never edits the engine.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

from reelflow.schemas.errors import RegistryError

ENTRY_POINT_GROUP = "reelflow.methods"


@dataclass(frozen=True)
class Method:
    """A package of stages (declared in the module that defines this object) and what comes with them."""

    name: str
    implementations: tuple[str, ...] = ()
    presets: str | None = None
    tiny: Mapping[str, str] = field(default_factory=dict)
    description: str = ""

    def preset_files(self) -> dict[str, Path]:
        """Preset name -> YAML file, from a package (``pkg.presets``) or a folder path."""
        if self.presets is None:
            return {}
        folder = Path(self.presets) if "/" in self.presets else Path(str(resources.files(self.presets)))
        return {path.stem: path for path in sorted(folder.glob("*.yaml"))}

    def tiny_builder(self, name: str) -> Callable[..., Path]:
        """The writer of tiny model ``name``: ``builder(out_dir, seed=0) -> Path``."""
        module, _, attr = self.tiny[name].partition(":")
        return getattr(importlib.import_module(module), attr)


METHODS: dict[str, Method] = {}
DECLARED_IN: dict[str, str] = {}  # module of an entry point's Method -> the method's name


def load_methods() -> dict[str, Method]:
    """Load every installed method package once (each entry point's module declares its stages)."""
    if METHODS:
        return METHODS
    try:
        _load_entry_points()
    except RegistryError:
        METHODS.clear()  # never a half-loaded registry: every later call fails the same way
        raise
    return METHODS


def _load_entry_points() -> None:
    for entry in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name != "core", e.name)):
        try:
            method = entry.load()
        except Exception as exc:  # noqa: BLE001  (a broken plugin is named, not a bare traceback)
            raise RegistryError(
                f"method package {entry.name!r} ({entry.value}) cannot be loaded: {type(exc).__name__}: {exc}; "
                "fix or uninstall it"
            ) from exc
        if not isinstance(method, Method):
            raise RegistryError(f"entry point {entry.name!r} ({entry.value}) is not a reelflow Method")
        if method.name in METHODS and METHODS[method.name] is not method:
            raise RegistryError(f"two method packages are named {method.name!r}; uninstall one")
        METHODS[method.name] = method
        DECLARED_IN[entry.value.partition(":")[0]] = method.name
    if "core" not in METHODS:
        raise RegistryError("reelflow's own stages are not registered: install the package (pip install -e .)")


def presets() -> dict[str, Path]:
    """Every installed preset by name; two packages shipping one name is an error."""
    found: dict[str, Path] = {}
    for method in load_methods().values():
        for name, path in method.preset_files().items():
            if name in found:
                raise RegistryError(f"preset {name!r} is shipped twice ({found[name]}, {path}); rename one")
            found[name] = path
    return found


def tiny_builders() -> dict[str, Method]:
    """Every installed tiny-model builder name -> the method package that ships it."""
    found: dict[str, Method] = {}
    for method in load_methods().values():
        for name in method.tiny:
            if name in found:
                raise RegistryError(f"tiny model {name!r} is shipped by both {found[name].name!r} and {method.name!r}")
            found[name] = method
    return found

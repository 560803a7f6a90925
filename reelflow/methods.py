"""Everything a method package needs, in one import.

A method package declares its stages in a module that imports only the declaration names below
(pydantic, no torch), registers their bodies in implementation modules, and exposes one
:class:`Method` through the ``reelflow.methods`` entry-point group::

    # pyproject.toml
    [project.entry-points."reelflow.methods"]
    mymethod = "mymethod.declarations:METHOD"

    # mymethod/declarations.py
    @declare_stage
    class InvertLatents(StageSpec):
        slots: ClassVar[dict[str, tuple[str, ...]]] = {"latents": ("latents",)}
        produces: ClassVar[str] = "inversion/mine"
        roles: ClassVar[dict[str, Role]] = {"unet": Role(families=("diffusers",))}
        stage: Literal["invert_latents"] = "invert_latents"
        method: Literal["mine"] = "mine"
        params: MyParams = Field(default_factory=MyParams)

    METHOD = Method(name="mymethod", implementations=("mymethod.stages",), presets="mymethod.presets")

    # mymethod/stages.py
    @stage_task("invert_latents", "mine")
    def invert_latents(call):
        return run_stage(call, _invert, resumable=True)

    @stage_check("invert_latents", "mine")  # optional: refuse bad input before any model loads
    def check_invert(ctx):
        frames = ctx.input("latents")
        if frames is not None and frames.count < 14:
            raise ValueError(f"clip has {frames.count} frames but the model needs 14")

Declaration names are imported eagerly; implementation names (``stage_task``, ``stage_check``,
``run_stage``, ``StageContext``, ``run_windows``, ...) on first use, so a declarations module stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import Field

from reelflow.core.windows import Window, WindowPlan
from reelflow.schemas.base import Model, NonNegativeFloat, PositiveInt
from reelflow.schemas.kinds import Attrs, NoAttrs, register_kind
from reelflow.schemas.registry import Method
from reelflow.schemas.stages import Export, Role, StageSpec
from reelflow.schemas.stages import register_stage as declare_stage

_LAZY = {
    "stage_task": "reelflow.tasks.stage",
    "run_stage": "reelflow.tasks.runtime",
    "StageContext": "reelflow.tasks.runtime",
    "stage_check": "reelflow.tasks.preflight",
    "PreflightContext": "reelflow.tasks.preflight",
    "FramesPreview": "reelflow.tasks.preflight",
    "SourceInfo": "reelflow.tasks.preflight",
    "run_windows": "reelflow.tasks.windows",
    "read_window": "reelflow.tasks.windows",
    "read_image": "reelflow.core.sources",
    "build_tiny_bundle": "reelflow.core.tiny",
}

__all__ = [
    "Attrs",
    "Export",
    "Field",
    "Method",
    "Model",
    "NoAttrs",
    "NonNegativeFloat",
    "PositiveInt",
    "Role",
    "StageSpec",
    "Window",
    "WindowPlan",
    "declare_stage",
    "register_kind",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'reelflow.methods' has no attribute {name!r}")

"""Declarations and implementations are registered under one key, and a mismatch fails at import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reelflow.schemas.errors import RegistryError
from reelflow.schemas.stages import STAGE_TYPES
from reelflow.tasks import TASKS, load_implementations
from reelflow.tasks.stage import check_registries, stage_task


def test_every_declared_stage_has_its_task() -> None:
    load_implementations()
    assert set(STAGE_TYPES) == set(TASKS)
    assert TASKS[("invert_latents", "fatezero")].name == "invert-latents-fatezero"


def test_a_declaration_without_implementation_names_the_missing_half() -> None:
    declared = {("decode_video", None): object, ("frobnicate_frames", "mine"): type("Frob", (), {"__module__": "mine.decl"})}
    with pytest.raises(RegistryError, match=r"no implementation for frobnicate_frames:mine \(declared in mine.decl\)"):
        check_registries(declared, {("decode_video", None): object()})


def test_an_implementation_without_declaration_is_refused_when_decorated() -> None:
    with pytest.raises(RegistryError, match="implements stage frobnicate_frames:mine, which no method declares"):
        stage_task("frobnicate_frames", "mine")(lambda call: call)
    assert ("frobnicate_frames", "mine") not in TASKS


PLUGIN = '''
from typing import ClassVar, Literal
from reelflow.methods import Field, Method, Model, StageSpec, declare_stage

class Params(Model):
    pass

@declare_stage
class Frobnicate(StageSpec):
    slots: ClassVar[dict[str, tuple[str, ...]]] = {"frames": ("video_frames",)}
    produces: ClassVar[str] = "frames"
    stage: Literal["frobnicate_frames"] = "frobnicate_frames"
    params: Params = Field(default_factory=Params)

METHOD = Method(name="halfdone", implementations=())
'''


def install_fake_plugin(root: Path) -> None:
    """A method package as pip would leave it: a module and a dist-info naming its entry point."""
    (root / "halfdone.py").write_text(PLUGIN)
    info = root / "halfdone-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: halfdone\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[reelflow.methods]\nhalfdone = halfdone:METHOD\n")


def test_a_plugin_declaring_a_stage_it_never_implements_fails_at_import(tmp_path: Path) -> None:
    install_fake_plugin(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    probe = "import reelflow.schemas.pipeline as p; print(sorted(t for t in p.STAGE_TYPES if t[0] == 'frobnicate_frames'))"
    declared = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert declared.stdout.strip() == "[('frobnicate_frames', None)]", declared.stderr
    failed = subprocess.run([sys.executable, "-c", "import reelflow.flows.edit"], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert failed.returncode != 0
    assert "RegistryError: no implementation for frobnicate_frames (declared in halfdone)" in failed.stderr


def test_an_optional_role_the_stage_does_not_have_is_refused() -> None:
    from typing import ClassVar, Literal

    from reelflow.schemas.stages import Role, StageSpec, register_stage

    class Adapted(StageSpec):
        produces: ClassVar[str] = "latents"
        roles: ClassVar[dict[str, Role]] = {"unet": Role()}
        optional_roles: ClassVar[tuple[str, ...]] = ("adapter",)
        stage: Literal["adapt_latents"] = "adapt_latents"

    with pytest.raises(RegistryError, match="stage adapt_latents declares optional roles it does not have: adapter"):
        register_stage(Adapted)
    assert ("adapt_latents", None) not in STAGE_TYPES

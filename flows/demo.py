"""``reelflow demo``: a synthetic clip, tiny models, and a preset wired to both.

Any installed preset runs: every model entry points at the tiny model its roles name (the tiny
Stable-Diffusion-style bundle by default, or one a method package ships), every named source gets
a synthetic file of its kind, and every stage takes the small sizes its
declaration lists under ``demo`` (a few frames at 96x64, a few steps), so a preset runs in seconds
on a CPU.

Torch and diffusers are imported inside ``prepare_demo``, so the CLI can show ``DEMO_DESCRIPTION``
in ``reelflow demo --help`` without loading them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from reelflow.deployments import spec_path
from reelflow.schemas.errors import SpecError
from reelflow.schemas.loading import load_spec
from reelflow.schemas.pipeline import PipelineSpec
from reelflow.schemas.registry import tiny_builders
from reelflow.schemas.stages import STAGE_TYPES, DecodeVideo, stage_tag

CLIP_SECONDS, WIDTH, HEIGHT = 2.0, 96, 64


def _description() -> str:
    video = DecodeVideo.demo
    others = "; ".join(
        f"{stage_tag(*key)}: " + ", ".join(f"{k}={v}" for k, v in cls.demo.items())
        for key, cls in sorted(STAGE_TYPES.items(), key=lambda item: stage_tag(*item[0]))
        if cls.demo and cls is not DecodeVideo
    )
    return (
        f"Run a preset on a synthetic {CLIP_SECONDS:.0f} s clip with a tiny random Stable-Diffusion-style model, on a "
        f"local store. Every preset takes {video['num_frames']} frames at {video['width']}x{video['height']}"
        + (f", and these stages take small sizes of their own: {others}" if others else "")
        + ". Everything goes under --workdir (default: demo): source.mp4, models/tiny-sd/, sources/, store/, and the "
        "output video with its run manifest in <workdir>/output."
    )


DEMO_DESCRIPTION = _description()


def prepare_demo(workdir: Path, preset: str = "reconstruct") -> PipelineSpec:
    """Make (once) the clip, the tiny bundle and the sources under ``workdir``; return ``preset`` wired to them."""
    from reelflow.core.synthetic import write_synthetic_clip

    workdir.mkdir(parents=True, exist_ok=True)
    clip = workdir / "source.mp4"
    if not clip.is_file():
        write_synthetic_clip(clip, width=WIDTH, height=HEIGHT, fps=24, seconds=CLIP_SECONDS)
    spec = load_spec(spec_path(preset))
    given = [f"input={json.dumps(str(clip))}", f"store={json.dumps(str(workdir / 'store'))}",
             f"output={json.dumps(str(workdir / 'output'))}"]  # fmt: skip
    given += [f"models.{name}.id={json.dumps(str(_tiny_model(workdir, kind)))}" for name, kind in tiny_models(spec).items()]
    makers = demo_source_makers(spec)
    given += [f"sources.{name}.path={json.dumps(str(_source(workdir, name, s.kind, clip, makers.get(name))))}"
              for name, s in spec.sources.items()]  # fmt: skip
    given += [f"stages.{stage.id}.params.{k}={json.dumps(v)}" for stage in spec.stages for k, v in type(stage).demo.items()]
    return load_spec(spec_path(preset), given)


def tiny_models(spec: PipelineSpec) -> dict[str, str]:
    """Model name -> the tiny model that stands in for it: the model's own ``tiny``, or the one its roles
    name (they must agree)."""
    kinds: dict[str, set[str]] = {}
    for node in spec.graph.order():
        for role, name in node.models.items():
            stated = spec.models[name].tiny
            kinds.setdefault(name, set()).add(stated or node.spec.roles[role].tiny)
    for name, found in kinds.items():
        if len(found) > 1:
            raise SpecError(f"model {name!r} fills roles whose tiny stand-ins differ ({', '.join(sorted(found))}); "
                            f"set `models.{name}.tiny` or give each role its own model entry")  # fmt: skip
    return {name: found.pop() for name, found in kinds.items()}


def _tiny_model(workdir: Path, kind: str) -> Path:
    """The tiny model ``kind`` under ``<workdir>/models/``, written once."""
    path = workdir / "models" / ("tiny-sd" if kind == "sd" else f"tiny-{kind}")
    if not path.is_dir():
        builders = tiny_builders()
        if kind not in builders:
            raise SpecError(f"no tiny model {kind!r} is installed; installed: {', '.join(sorted(builders))}")
        builders[kind].tiny_builder(kind)(path, seed=0)
    return path


def demo_source_makers(spec: PipelineSpec) -> dict[str, str]:
    """Source name -> the ``module:function`` a stage reading it declares for the demo (``demo_sources``)."""
    makers: dict[str, str] = {}
    for node in spec.graph.order():
        for slot, name in node.sources.items():
            maker = type(node.spec).demo_sources.get(slot)
            if maker is not None:
                makers.setdefault(name, maker)
    return makers


def _source(workdir: Path, name: str, kind: str, clip: Path, maker: str | None = None) -> Path:
    """A file for a named source: what a stage's demo maker writes from the clip, else a synthetic one
    (a gradient image, a centred mask, or the clip itself for video and audio)."""
    if kind in ("video", "audio"):
        return clip
    import numpy as np
    from PIL import Image

    path = workdir / "sources" / f"{name}.png"
    if not path.is_file() and maker is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        module, _, function = maker.partition(":")
        getattr(importlib.import_module(module), function)(clip, path)
    elif not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
        if kind == "mask":
            inside = ((x - WIDTH / 2) / (WIDTH / 4)) ** 2 + ((y - HEIGHT / 2) / (HEIGHT / 4)) ** 2 <= 1
            Image.fromarray((inside * 255).astype(np.uint8)).save(path)
        else:
            rgb = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, np.full_like(x, 128)], axis=-1).astype(np.uint8)
            Image.fromarray(rgb).save(path)
    return path

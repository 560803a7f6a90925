"""A tiny random LPIPS (VGG16, v0.1) in the layout its weights are published in
(:mod:`reelflow.core.models.lpips_family`): ``config.json``, torchvision's trunk checkpoint as
``vgg16-397923af.pth`` and lpips' linear layers as ``vgg.pth``, a pure function of its seed, so tests and
``reelflow demo`` run the real loading code (``torch.load(weights_only=True)``) with no download.

"Tiny" in content only: VGG16 has no smaller variant that the published weights would fit, so the trunk has its
real shapes (13 convolutions, 14.7 M parameters, 59 MB). The checkpoint holds the ``classifier.*`` keys the real
one has, at their real shapes, so the loader's dropping of them is exercised; they are zero-strided views of one
zero, since 120 M random parameters that nothing reads would add 480 MB.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from reelflow.core.guidance.lpips import LpipsVgg
from reelflow.core.models.lpips_family import CONFIG, LIN_PICKLED, PUBLISHED_BACKBONE
from reelflow.core.tiny import _builder_readme, _seeded, _write_staged

# torchvision's VGG16 head: Linear(25088, 4096), ReLU, Dropout, Linear(4096, 4096), ReLU, Dropout, Linear(4096, 1000).
CLASSIFIER_SHAPES = {
    "classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,), "classifier.3.weight": (4096, 4096),
    "classifier.3.bias": (4096,), "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,),
}  # fmt: skip


def build_tiny_lpips(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random LPIPS VGG16 into ``out_dir`` as ``vgg16-397923af.pth`` + ``vgg.pth`` + ``config.json``.

    Args:
        out_dir: Target directory. It may be missing, empty, or a tiny model written before (which is replaced);
            anything else is refused rather than overwritten.
        seed: Seeds every random weight; the same seed gives byte-identical files.

    Raises:
        ModelError: ``out_dir`` is a file, or a non-empty directory that is not a tiny model.
    """

    def write(staging: Path) -> None:
        model = _seeded(seed, 9, _random_lpips)
        state = model.state_dict()
        trunk = {k: v.contiguous() for k, v in state.items() if k.startswith("features.")}
        head = {k: torch.zeros(()).expand(shape) for k, shape in CLASSIFIER_SHAPES.items()}
        torch.save({**trunk, **head}, staging / PUBLISHED_BACKBONE)
        torch.save({f"lin{level}.model.1.weight": state[f"lins.{level}.weight"].contiguous()
                    for level in range(len(model.lins))}, staging / LIN_PICKLED)  # fmt: skip
        (staging / "config.json").write_text(json.dumps(CONFIG, indent=2))

    return _write_staged(Path(out_dir), write, _builder_readme("LPIPS (VGG16, v0.1)", "build_tiny_lpips", seed,
                                                               module="reelflow.core.tiny_lpips"))  # fmt: skip


def _random_lpips() -> LpipsVgg:
    model = LpipsVgg()
    with torch.no_grad():
        for lin in model.lins:
            # lpips keeps its learned weights non-negative (a distance), so the random ones are too.
            lin.weight.copy_(torch.rand_like(lin.weight))
    return model

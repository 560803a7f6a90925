"""LPIPS (VGG16, v0.1) as Soundini's perceptual background term: agreement with the maintained lpips package,
the metric's identities, loading by family from the published files, and the tiny builder."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lpips  # the dev extra's reference implementation
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from reelflow.core.guidance.lpips import LpipsVgg
from reelflow.core.models import fingerprint_model, infer_family, load_model
from reelflow.core.tiny_lpips import build_tiny_lpips
from reelflow.schemas.errors import ModelError

LIN_WEIGHTS = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"


def _images(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    """lpips' own LPIPS: its shipped v0.1 linear layers on a random VGG16 (pnet_rand: nothing is downloaded)."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(0)
        warnings.simplefilter("ignore", UserWarning)  # torchvision's note on the `pretrained` argument lpips passes
        return lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()


@pytest.fixture(scope="module")
def published(reference: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference's weights as they are published: torchvision's VGG16 checkpoint (with its classifier keys) and
    lpips' vgg.pth, copied from the package."""
    root = tmp_path_factory.mktemp("lpips-published")
    # lpips keeps torchvision's feature indices as the names inside its slices ("slice2.5.weight": features.5).
    trunk = {f"features.{name.split('.', 1)[1]}": p.detach().clone() for name, p in reference.net.named_parameters()}
    head = {"classifier.0.weight": torch.zeros(()).expand(4096, 25088), "classifier.6.bias": torch.zeros(1000)}
    torch.save({**trunk, **head}, root / "vgg16-397923af.pth")
    shutil.copy(LIN_WEIGHTS, root / "vgg.pth")
    (root / "config.json").write_text(json.dumps({"library": "lpips", "net": "vgg", "version": "0.1"}))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lpips(tmp_path_factory.mktemp("tiny") / "lpips", seed=0)


def test_distance_and_its_gradient_match_the_lpips_package(reference: torch.nn.Module, published: Path) -> None:
    ours = load_model(str(published), family="lpips")
    x, y = _images(0, (3, 3, 48, 80)), _images(1, (3, 3, 48, 80))
    y[0] = x[0] + 0.05 * y[0]  # one near pair, two far ones
    theirs = reference(x, y).flatten()
    assert theirs.min() > 1e-4 and theirs.max() - theirs.min() > 1e-2  # distances that tell weights apart
    torch.testing.assert_close(ours(x, y), theirs, rtol=1e-5, atol=1e-6)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(x_ours, y).sum().backward()
    reference(x_theirs, y).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-4, atol=1e-9)


def test_safetensors_files_load_the_same_model(published: Path, tmp_path: Path) -> None:
    trunk = torch.load(published / "vgg16-397923af.pth", map_location="cpu", weights_only=True)
    save_file({k: v for k, v in trunk.items() if k.startswith("features.")}, tmp_path / "backbone.safetensors")
    save_file(torch.load(published / "vgg.pth", map_location="cpu", weights_only=True), tmp_path / "lin.safetensors")
    shutil.copy(published / "config.json", tmp_path / "config.json")
    assert infer_family(str(tmp_path)) == infer_family(str(published)) == "lpips"
    x, y = _images(2, (2, 3, 32, 32)), _images(3, (2, 3, 32, 32))
    assert torch.equal(
        load_model(str(tmp_path), family="lpips")(x, y), load_model(str(published), family="lpips")(x, y)
    )


def test_identical_images_are_at_zero_and_the_gradient_reaches_the_input(tiny: Path) -> None:
    model = load_model(str(tiny), family="lpips")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x, y = _images(4, (3, 3, 32, 32)), _images(5, (3, 3, 32, 32))
    assert torch.equal(model(x, x), torch.zeros(3))
    far = model(x, y)
    assert far.shape == (3,) and bool((far > 0).all())
    torch.testing.assert_close(far[1:2], model(x[1:2], y[1:2]))  # each pair on its own, whatever the batch
    x = x.requires_grad_()
    model(x, y).sum().backward()
    assert x.grad is not None and bool(x.grad.isfinite().all()) and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_half_precision_survives_a_level_with_no_activation(tiny: Path) -> None:
    model = copy.deepcopy(load_model(str(tiny), family="lpips"))  # the loaded one is shared through the cache
    with torch.no_grad():
        model.features[28].bias.fill_(-1e3)  # relu5_3 is zero everywhere: lpips' 1e-10 is what keeps 0 / 0 away
    x, y = _images(6, (2, 3, 32, 32)), _images(7, (2, 3, 32, 32))
    full = model(x, y)
    half = model.half()(x, y)
    assert half.dtype == torch.float32 and bool(half.isfinite().all())
    torch.testing.assert_close(half, full, rtol=2e-2, atol=1e-3)


def test_the_documented_config_without_a_version_loads(tiny: Path, tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(tiny, tmp_path / "lpips"))
    (folder / "config.json").write_text('{"library": "lpips", "net": "vgg"}')
    x, y = _images(10, (1, 3, 32, 32)), _images(11, (1, 3, 32, 32))
    torch.testing.assert_close(load_model(str(folder), family="lpips")(x, y), load_model(str(tiny), family="lpips")(x, y))


def test_the_tiny_model_is_a_pure_function_of_its_seed_in_the_published_layout(tiny: Path, tmp_path: Path) -> None:
    again, other = build_tiny_lpips(tmp_path / "again", seed=0), build_tiny_lpips(tmp_path / "other", seed=1)
    files = sorted(p.name for p in tiny.iterdir())
    assert files == ["README.md", "config.json", "vgg.pth", "vgg16-397923af.pth"]
    assert all(_digest(tiny / f) == _digest(again / f) for f in files)
    assert fingerprint_model(str(again)) == fingerprint_model(str(tiny)) != fingerprint_model(str(other))
    with torch.device("meta"):
        vgg16 = torchvision.models.vgg16().state_dict()
    checkpoint = torch.load(tiny / "vgg16-397923af.pth", map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in checkpoint.items()} == {k: tuple(v.shape) for k, v in vgg16.items()}
    lins = torch.load(tiny / "vgg.pth", map_location="cpu", weights_only=True)
    assert {k: tuple(v.shape) for k, v in lins.items()} == {
        k: tuple(v.shape) for k, v in torch.load(LIN_WEIGHTS, map_location="cpu", weights_only=True).items()
    }
    assert all(bool((v >= 0).all()) for v in lins.values())
    x, y = _images(8, (1, 3, 32, 32)), _images(9, (1, 3, 32, 32))
    assert infer_family(str(tiny)) == "lpips"
    assert load_model(str(tiny), family="lpips")(x, y) != load_model(str(other), family="lpips")(x, y)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Note:
    text: str


def _drop_lin(root: Path) -> None:
    (root / "vgg.pth").unlink()


def _pickle_an_object(root: Path) -> None:
    torch.save({"lin0.model.1.weight": torch.ones(1, 64, 1, 1), "note": Note("trained by us")}, root / "vgg.pth")


def _add_a_string(root: Path) -> None:
    lins = torch.load(root / "vgg.pth", map_location="cpu", weights_only=True)
    torch.save({**lins, "version": "0.1"}, root / "vgg.pth")


def _drop_a_level(root: Path) -> None:
    lins = torch.load(root / "vgg.pth", map_location="cpu", weights_only=True)
    torch.save({k: v for k, v in lins.items() if not k.startswith("lin4.")}, root / "vgg.pth")


def _narrow_a_level(root: Path) -> None:
    lins = torch.load(root / "vgg.pth", map_location="cpu", weights_only=True)
    torch.save({**lins, "lin1.model.1.weight": torch.ones(1, 64, 1, 1)}, root / "vgg.pth")


def _lpips_own_layout(root: Path) -> None:
    model = LpipsVgg()
    trunk = {f"net.slice1.{k.removeprefix('features.')}": v for k, v in model.state_dict().items() if "features" in k}
    (root / "vgg16-397923af.pth").unlink()
    torch.save(trunk, root / "vgg16-397923af.pth")


def _two_trunks(root: Path) -> None:
    (root / "vgg16_bn.pth").symlink_to(root / "vgg16-397923af.pth")


def _alexnet(root: Path) -> None:
    (root / "config.json").write_text(json.dumps({"library": "lpips", "net": "alex", "version": "0.1"}))


def _no_config(root: Path) -> None:
    (root / "config.json").unlink()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_drop_lin, r"needs the linear layers at .*: lin.safetensors, or exactly one vgg.pth \(the lpips package's "
                    r"lpips/weights/v0.1/vgg.pth\); found none"),
        (_pickle_an_object, r"vgg.pth holds more than tensors, so it is not unpickled"),
        (_add_a_string, r"vgg.pth is not a state dict \(names to tensors\)"),
        (_drop_a_level, r"/vgg.pth are not lpips' v0.1 vgg.pth .* missing \['lin4.model.1.weight'\], unexpected "),
        (_narrow_a_level, r"misshapen \['lin1.model.1.weight \(1, 64, 1, 1\) \(wants \(1, 128, 1, 1\)\)'\]"),
        (_lpips_own_layout, r"/vgg16-397923af.pth are not torchvision's VGG16 .* unexpected \['net.slice1"),
        (_two_trunks, r"exactly one vgg16\*.pth \(torchvision's .*\); found vgg16-397923af.pth, vgg16_bn.pth"),
        (_alexnet, r"asks for LPIPS net 'alex', version '0.1'; only .*\"net\": \"vgg\""),
        (_no_config, r"has no config.json at .*; write \{\"library\": \"lpips\""),
    ],
)  # fmt: skip
def test_the_family_refuses_files_it_cannot_trust_or_fit(
    corrupt: Callable[[Path], None], message: str, tiny: Path, tmp_path: Path
) -> None:
    root = tmp_path / "model"
    root.mkdir()
    for path in tiny.iterdir():
        (root / path.name).symlink_to(path)  # the files a case rewrites are unlinked or replaced, not written through
    for name in ("vgg.pth", "config.json"):
        (root / name).unlink()
        shutil.copy(tiny / name, root / name)
    corrupt(root)
    with pytest.raises(ModelError, match=message):
        load_model(str(root), family="lpips")

"""The model-family registry: each family's tiny model, hub revisions pinned to commits, safe loading."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, UNet2DConditionModel
from huggingface_hub import HfApi
from huggingface_hub import constants as hf_constants
from transformers import CLIPImageProcessor, CLIPVisionModel, CLIPVisionModelWithProjection

from reelflow.core import tiny
from reelflow.core.models import (
    FAMILIES,
    clear_model_cache,
    fingerprint_model,
    infer_family,
    load_component,
    load_model,
    resolve_revision,
)
from reelflow.schemas.errors import ModelError
from reelflow.schemas.registry import tiny_builders

SHA_A = "a" * 40
SHA_B = "b" * 40


def _unet_out(unet: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sample, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    return unet(sample, 10, encoder_hidden_states=context).sample


def _clip_out(model: Any) -> torch.Tensor:
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model(pixel_values=pixels).image_embeds


def _timm_out(model: Any) -> torch.Tensor:
    return model(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


def _raft_out(model: Any) -> torch.Tensor:
    # RAFT's correlation pyramid needs at least 128x128 inputs.
    g = torch.Generator().manual_seed(0)
    first, second = (torch.rand(1, 3, 128, 128, generator=g) * 2 - 1 for _ in range(2))
    return model(first, second, num_flow_updates=2)[-1]


@dataclass(frozen=True)
class Case:
    builder: str
    family: str
    reference: Callable[[int], Any]  # the in-memory model a builder saves, by seed
    run: Callable[[Any], torch.Tensor]
    kwargs: dict[str, Any] = field(default_factory=dict)
    hub_id: str = ""


CASES = [
    Case("sd", "diffusers", lambda s: tiny.tiny_pipeline(s).unet, _unet_out, {"component": "unet"}),
    Case(
        "clip-vision",
        "transformers",
        tiny.tiny_clip_vision,
        _clip_out,
        {"cls": CLIPVisionModelWithProjection},
    ),
    Case("timm", "timm", tiny.tiny_timm, _timm_out, hub_id="hf-hub:org/timm"),
    Case("torchvision-raft", "torchvision", tiny.tiny_raft, _raft_out),
]
IDS = [case.builder for case in CASES]


# The tiny models reelflow's own method package ships (``reelflow models tiny --kind NAME``).
BUILDERS = {name: method.tiny_builder(name) for name, method in tiny_builders().items() if method.name == "core"}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        (name, seed): build(root / f"{name}-{seed}", seed=seed)
        for name, build in BUILDERS.items()
        for seed in (0, 1)
    }


@pytest.fixture(autouse=True)
def empty_cache():
    clear_model_cache()
    yield
    clear_model_cache()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub in offline mode, and any question to the hub a test failure."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(HfApi, "model_info", _no_network)


def _no_network(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the hub was asked")


def fake_hub(cache: Path, repo: str, snapshots: dict[str, Path], main: str) -> Path:
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    for sha, source in snapshots.items():
        shutil.copytree(source, repo_dir / "snapshots" / sha)
    move_ref(repo_dir, "main", main)
    return repo_dir


def move_ref(repo_dir: Path, ref: str, sha: str) -> None:
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(sha)


def check_prepared(model: torch.nn.Module) -> None:
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


# -- every family loads its tiny model -------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_family_loads_its_tiny_model_as_saved(case: Case, built: dict) -> None:
    loaded = load_model(str(built[case.builder, 0]), family=case.family, **case.kwargs)

    check_prepared(loaded)
    with torch.no_grad():
        expected, other_seed = case.run(case.reference(0)), case.run(case.reference(1))
        # Not bit-equal: safetensors weights are memory-mapped at other alignments, so matmul
        # kernels may round the last ulp differently. Wrong weights miss by far more.
        torch.testing.assert_close(case.run(loaded), expected)
    assert not torch.allclose(expected, other_seed, atol=1e-3)  # the input exercises the weights


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_builders_are_pure_functions_of_the_seed(
    case: Case, built: dict, tmp_path: Path
) -> None:
    again = BUILDERS[case.builder](tmp_path / "again", seed=0)

    assert fingerprint_model(str(again)) == fingerprint_model(str(built[case.builder, 0]))
    assert fingerprint_model(str(again)) != fingerprint_model(str(built[case.builder, 1]))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_infer_family_recognises_each_tiny_model(case: Case, built: dict) -> None:
    assert infer_family(str(built[case.builder, 0])) == case.family


def test_infer_family_knows_a_lone_diffusers_model_and_admits_what_it_cannot_tell(
    built: dict, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))

    assert infer_family(str(built["sd", 0] / "unet")) == "diffusers"
    assert infer_family(str(tmp_path)) is None
    assert infer_family("/no/such/dir") is None
    assert infer_family("org/not-cached", cache_dir=str(tmp_path)) is None


def test_infer_family_reads_a_cached_hub_snapshot(built: dict, tmp_path: Path, offline) -> None:
    fake_hub(tmp_path, "org/clip", {SHA_A: built["clip-vision", 0]}, main=SHA_A)

    assert infer_family("org/clip", cache_dir=str(tmp_path)) == "transformers"


def test_a_lone_diffusers_model_loads_by_its_class_name(built: dict) -> None:
    unet = load_model(str(built["sd", 0] / "unet"), family="diffusers")

    assert isinstance(unet, UNet2DConditionModel)


# -- hub revisions resolve to commits ---------------------------------------------------------


def test_main_resolves_through_the_cache_and_moving_it_changes_the_fingerprint(
    built: dict, tmp_path: Path, offline
) -> None:
    snapshots = {SHA_A: built["clip-vision", 0], SHA_B: built["clip-vision", 1]}
    repo_dir = fake_hub(tmp_path, "org/clip", snapshots, main=SHA_A)
    move_ref(repo_dir, "v1", SHA_A)
    cache = str(tmp_path)

    assert resolve_revision("org/clip", None, cache) == SHA_A
    before = fingerprint_model("org/clip", cache_dir=cache)
    assert before == f"hub:org/clip@{SHA_A}"

    move_ref(repo_dir, "main", SHA_B)

    assert fingerprint_model("org/clip", "main", cache_dir=cache) == f"hub:org/clip@{SHA_B}"
    assert fingerprint_model("org/clip", "v1", cache_dir=cache) == before  # the tag stayed
    assert fingerprint_model("hf-hub:org/clip", "v1", cache_dir=cache) == before


def test_a_commit_revision_needs_no_cache(tmp_path: Path, offline) -> None:
    assert resolve_revision("org/absent", SHA_B, str(tmp_path)) == SHA_B
    assert fingerprint_model("org/absent", SHA_B, cache_dir=str(tmp_path)) == f"hub:org/absent@{SHA_B}"


def test_an_uncached_hub_id_offline_says_what_to_do(tmp_path: Path, offline) -> None:
    with pytest.raises(ModelError) as info:
        fingerprint_model("org/absent", "dev", cache_dir=str(tmp_path))

    message = str(info.value)
    for part in ("'org/absent'", "'dev'", "HF_HUB_OFFLINE", "hf download org/absent", "commit", "local path"):
        assert part in message
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_online_the_hub_answers_what_the_cache_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, str]] = []

    def model_info(self: HfApi, repo_id: str, *, revision: str, **kwargs: Any) -> SimpleNamespace:
        asked.append((repo_id, revision))
        return SimpleNamespace(sha=SHA_B)

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", model_info)

    assert resolve_revision("hf-hub:org/remote", None, str(tmp_path)) == SHA_B
    assert asked == [("org/remote", "main")]


def test_online_the_hub_answers_before_the_cache_and_the_cache_answers_when_it_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo_dir = tmp_path / "models--org--moved"
    move_ref(repo_dir, "main", SHA_A)
    down = [False]

    def model_info(self: HfApi, repo_id: str, *, revision: str, **kwargs: Any) -> SimpleNamespace:
        if down[0]:
            raise OSError("Name or service not known")
        return SimpleNamespace(sha=SHA_B)  # upstream main moved on since the cache was filled

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", model_info)
    assert resolve_revision("org/moved", "main", str(tmp_path)) == SHA_B
    down[0] = True
    assert resolve_revision("org/moved", "main", str(tmp_path)) == SHA_A


def test_a_failed_hub_answer_is_a_model_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def model_info(self: HfApi, repo_id: str, **kwargs: Any) -> None:
        raise OSError("503 Service Unavailable")

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "model_info", model_info)

    with pytest.raises(ModelError, match="asking the hub failed.*503.*pin a 40-hex commit") as info:
        resolve_revision("org/remote", "main", str(tmp_path))
    assert isinstance(info.value.__cause__, OSError)


def test_a_revision_that_climbs_out_of_refs_is_refused(tmp_path: Path, offline) -> None:
    with pytest.raises(ModelError, match="not a branch, tag or commit"):
        resolve_revision("org/clip", "../../../etc/passwd", str(tmp_path))


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_load_model_loads_the_planned_commit_after_main_moves(
    case: Case, built: dict, tmp_path: Path, offline
) -> None:
    model_id = case.hub_id or f"org/{case.builder}"
    snapshots = {SHA_A: built[case.builder, 0], SHA_B: built[case.builder, 1]}
    repo_dir = fake_hub(tmp_path, model_id.removeprefix("hf-hub:"), snapshots, main=SHA_A)
    cache = str(tmp_path)
    planned = fingerprint_model(model_id, cache_dir=cache)

    move_ref(repo_dir, "main", SHA_B)
    pinned = load_model(model_id, family=case.family, cache_dir=cache, fingerprint=planned, **case.kwargs)
    current = load_model(model_id, family=case.family, cache_dir=cache, **case.kwargs)

    with torch.no_grad():
        torch.testing.assert_close(case.run(pinned), case.run(case.reference(0)))
        torch.testing.assert_close(case.run(current), case.run(case.reference(1)))


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_load_component_reads_a_bundle_from_the_hub_cache(built: dict, tmp_path: Path, offline) -> None:
    fake_hub(tmp_path, "org/sd", {SHA_A: built["sd", 0]}, main=SHA_A)

    assert isinstance(load_component("org/sd", "scheduler", cache_dir=str(tmp_path)), DDIMScheduler)


def test_a_fingerprint_of_another_model_is_refused(built: dict, tmp_path: Path, offline) -> None:
    fake_hub(tmp_path, "org/clip", {SHA_A: built["clip-vision", 0]}, main=SHA_A)

    with pytest.raises(ModelError, match="does not name a commit of hub model 'org/clip'"):
        load_model("org/clip", family="transformers", cache_dir=str(tmp_path), fingerprint=f"hub:org/other@{SHA_A}")


# -- local models: fingerprints and changes on disk -------------------------------------------


def test_a_local_model_changed_since_planning_is_refused(built: dict, tmp_path: Path) -> None:
    path = shutil.copytree(built["timm", 0], tmp_path / "timm")
    planned = fingerprint_model(str(path))
    assert load_model(str(path), family="timm", fingerprint=planned) is not None

    tiny.build_tiny_timm(path, 1)

    with pytest.raises(ModelError, match="changed on disk since the run was planned.*rerun"):
        load_model(str(path), family="timm", fingerprint=planned)


def test_fingerprint_counts_pth_weights_and_timm_configs(built: dict, tmp_path: Path) -> None:
    raft = Path(shutil.copytree(built["torchvision-raft", 0], tmp_path / "raft"))
    state = torch.load(raft / "model.pth", weights_only=True)
    state[next(iter(state))] += 1  # a retrained tensor
    timm_dir = Path(shutil.copytree(built["timm", 0], tmp_path / "timm"))
    config = json.loads((timm_dir / "config.json").read_text())
    config["pretrained_cfg"]["mean"] = [0.4, 0.4, 0.4]  # other preprocessing, same weights

    torch.save(state, raft / "model.pth")
    (timm_dir / "config.json").write_text(json.dumps(config))

    assert fingerprint_model(str(raft)) != fingerprint_model(str(built["torchvision-raft", 0]))
    assert fingerprint_model(str(timm_dir)) != fingerprint_model(str(built["timm", 0]))


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_a_pth_is_unpickled_weights_only(built: dict, tmp_path: Path) -> None:
    model_dir = Path(shutil.copytree(built["torchvision-raft", 0], tmp_path / "raft"))
    marker = tmp_path / "code-ran"
    torch.save({"weight": _RunsCode(marker)}, model_dir / "model.pth")

    with pytest.raises(ModelError, match="holds more than tensors"):
        load_model(str(model_dir), family="torchvision")
    assert not marker.exists()

    torch.load(model_dir / "model.pth", weights_only=False)  # the file is a real attack
    assert marker.exists()


# -- classes come from the index, the caller, and the known libraries only ---------------------


def test_the_bundle_index_chooses_the_class_and_load_component_keeps_ddim(
    built: dict, tmp_path: Path
) -> None:
    bundle = Path(shutil.copytree(built["sd", 0], tmp_path / "sd"))
    index = json.loads((bundle / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (bundle / "model_index.json").write_text(json.dumps(index))

    assert type(load_model(str(bundle), family="diffusers", component="scheduler")) is PNDMScheduler
    assert type(load_component(str(bundle), "scheduler")) is DDIMScheduler


def test_an_index_naming_another_library_is_refused(built: dict, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(built["sd", 0], tmp_path / "sd"))
    index = json.loads((bundle / "model_index.json").read_text())
    index["vae"] = ["os", "system"]
    (bundle / "model_index.json").write_text(json.dumps(index))

    with pytest.raises(ModelError, match="library 'os'; only diffusers and transformers"):
        load_component(str(bundle), "vae")


def test_transformers_class_and_components(built: dict) -> None:
    path = str(built["clip-vision", 0])

    with_projection = load_model(path, family="transformers", cls="CLIPVisionModelWithProjection")
    processor = load_model(path, family="transformers", component="image_processor")

    assert type(load_model(path, family="transformers")) is CLIPVisionModel  # AutoModel's pick
    assert type(with_projection) is CLIPVisionModelWithProjection
    assert load_model(path, family="transformers", cls=CLIPVisionModelWithProjection) is with_projection
    assert isinstance(processor, CLIPImageProcessor)
    assert processor.crop_size == {"height": 32, "width": 32}
    with pytest.raises(ModelError, match="unknown transformers component 'unet'; valid: model, processor"):
        load_model(path, family="transformers", component="unet")


def test_unknown_family_and_misplaced_component_are_refused(built: dict) -> None:
    with pytest.raises(ModelError, match="unknown model family 'onnx'; valid: " + ", ".join(FAMILIES)):
        load_model(str(built["timm", 0]), family="onnx")
    with pytest.raises(ModelError, match="a timm model is one module"):
        load_model(str(built["timm", 0]), family="timm", component="head")


def test_every_family_is_described() -> None:
    assert set(FAMILIES) == {"diffusers", "transformers", "timm", "torchvision", "midas", "ip_adapter", "soundclip",
                             "guided_diffusion", "lpips"}
    for name, loader in FAMILIES.items():
        assert loader.name == name and loader.description

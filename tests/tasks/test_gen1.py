"""Gen-1 style stages on tiny models: depth reused across a sweep, the structure level as stored, the guards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reelflow.core.guidance.structure import laplacian_energy
from reelflow.core.tiny_depth import build_tiny_depth_anything
from reelflow.core.tiny_gen1 import build_tiny_controlnet, build_tiny_ip_adapter, build_tiny_sd_depth
from reelflow.deployments import spec_path
from reelflow.flows.dag import plan_run
from reelflow.flows.edit import prepare_run
from reelflow.flows.sources import hash_sources, source_urls
from reelflow.schemas.calls import StoreSpec
from reelflow.schemas.errors import SpecError
from reelflow.schemas.loading import load_spec
from reelflow.schemas.settings import Settings
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import task_for

SMALL = ("stages.decode_video.params.num_frames=6", "stages.decode_video.params.width=64",
         "stages.decode_video.params.height=64", "stages.decode_video.params.multiple=8",
         "stages.denoise_latents.params.num_steps=5", "stages.denoise_latents.params.window=4",
         "stages.denoise_latents.params.overlap=1")  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> dict[str, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("gen1-models")
    Image.new("RGB", (40, 30), (200, 120, 40)).save(root / "reference.png")
    return {"sd": tiny_bundle, "sd_depth": build_tiny_sd_depth(root / "sd-depth"),
            "controlnet": build_tiny_controlnet(root / "controlnet"), "depth": build_tiny_depth_anything(root / "depth"),
            "ip_adapter": build_tiny_ip_adapter(root / "ip-adapter"), "reference": root / "reference.png"}  # fmt: skip


def spec(preset: str, models: dict[str, Path], *extra: str):
    """The preset on the tiny models, small; a reference image it reads is ``models["reference"]`` unless given."""
    declared = load_spec(spec_path(preset))
    ids = [f"models.{name}.id={path}" for name, path in models.items() if name in declared.models]
    given = any(e.startswith("sources.reference") for e in extra)
    reference = [f"sources.reference.path={models['reference']}"] if "reference" in declared.sources and not given else []
    return load_spec(spec_path(preset), [*ids, *reference, *SMALL, *extra])


def planned(spec_, clip: Path, store: str) -> dict:
    spec_ = load_spec(spec_.model_dump(mode="json"), [f"input={clip}"])
    sources = hash_sources(spec_, source_urls(spec_), Settings())
    stages = plan_run(spec_, sources=sources, store=StoreSpec(url=store), run_id="r", default_dtype="float32")
    return {p.id: p for p in stages}


def run(stages: dict) -> dict:
    return {sid: task_for(p.call.stage).fn(call=p.call) for sid, p in stages.items()}


def test_a_sweep_of_t_s_reuses_the_depth_and_stores_each_structure_level(models, clip: Path, tmp_path: Path) -> None:
    sweep = "stages.denoise_latents.each=[{t_s: 0}, {t_s: 3}]"
    stages = planned(spec("gen1-controlnet", models, sweep), clip, str(tmp_path / "store"))
    refs = run(stages)
    store = ArtifactStore(str(tmp_path / "store"))
    assert stages["denoise_latents_0"].call.inputs["depth"].key == stages["denoise_latents_1"].call.inputs["depth"].key
    assert stages["denoise_latents_0"].key != stages["denoise_latents_1"].key
    depth = torch.from_numpy(np.asarray(store.open("estimate_depth", refs["estimate_depth"].key)["depth"][:], np.float32))
    level = [torch.from_numpy(np.asarray(store.open("denoise_latents", refs[f"denoise_latents_{i}"].key)["structure"][:],
                                         np.float32)) for i in (0, 1)]  # fmt: skip
    torch.testing.assert_close(level[0], depth, atol=1e-3, rtol=0)  # t_s = 0: the depth itself
    assert (laplacian_energy(level[1]) < 0.5 * laplacian_energy(level[0])).all()
    latents = store.open("denoise_latents", refs["denoise_latents_0"].key)
    assert latents["latents"].shape == (6, 4, 8, 8) and latents.attrs["windows"]["count"] == 2
    assert not np.allclose(latents["latents"][:], store.open("denoise_latents", refs["denoise_latents_1"].key)["latents"][:])


def test_the_depth_unet_reads_the_structure_level_on_the_latent_grid(models, clip: Path, tmp_path: Path) -> None:
    store, edits = str(tmp_path / "store"), {}
    for t_s in (0, 1):
        refs = run(planned(spec("gen1-depth2img", models, f"stages.denoise_latents.params.t_s={t_s}"), clip, store))
        edits[t_s] = ArtifactStore(store).open("denoise_latents", refs["denoise_latents"].key)
    structure = {t_s: torch.from_numpy(np.asarray(edit["structure"][:], np.float32)) for t_s, edit in edits.items()}
    assert structure[0].shape == (6, 8, 8)  # what the UNet's depth channel sees, before the [-1, 1] map
    assert (laplacian_energy(structure[1]) < 0.8 * laplacian_energy(structure[0])).all()  # one level already shows
    assert edits[0].attrs["structure_range"][0] < edits[0].attrs["structure_range"][1]
    assert not np.allclose(edits[0]["latents"][:], edits[1]["latents"][:])


def test_a_four_channel_unet_is_refused_for_the_concat_method(models, clip: Path, tmp_path: Path) -> None:
    given = spec("gen1-depth2img", {**models, "sd_depth": models["sd"]}, f"input={clip}", f"store={tmp_path / 's'}")
    with pytest.raises(SpecError, match="needs 5 input channels .* use method gen1_controlnet"):
        prepare_run(given, Settings())


def test_a_black_mask_keeps_the_source_trajectory_and_a_white_one_edits_everywhere(
    models, clip: Path, tmp_path: Path
) -> None:
    from PIL import Image

    for name, value in (("keep", 0), ("edit", 255)):
        Image.new("L", (64, 64), value).save(tmp_path / f"{name}.png")
    store = str(tmp_path / "store")
    results = {}
    for name in ("keep", "edit", None):
        extra = (f"sources.mask={{kind: mask, path: {tmp_path / f'{name}.png'}}}",) if name else ()
        stages = planned(spec("gen1-controlnet", models, *extra), clip, store)
        refs = run(stages)
        results[name] = ArtifactStore(store).open("denoise_latents", refs["denoise_latents_0"].key)["latents"][:]
    np.testing.assert_allclose(results["edit"], results[None], rtol=1e-5, atol=1e-5)
    encoded = ArtifactStore(store).open("encode_latents", refs["encode_latents"].key)["latents"][:].astype(np.float32)
    # Kept: the source's own trajectory at the schedule's last level (sqrt(abar) z0 + sqrt(1 - abar) n), next to z0.
    assert np.abs(results["keep"] - encoded).mean() < 0.1 < np.abs(results[None] - encoded).mean()


def with_inversion(spec_):
    """The pipeline with an invert_latents stage of its edit's method, which the edits then start from (inverted
    without content, so without the edit's IP-Adapter)."""
    raw = spec_.model_dump(mode="json", exclude_unset=True)
    edit = next(stage for stage in raw["stages"] if stage["stage"] == "denoise_latents")
    params = {name: edit.get("params", {})[name] for name in ("num_steps", "strength") if name in edit.get("params", {})}
    raw["stages"].insert(raw["stages"].index(edit), {
        "stage": "invert_latents", "method": edit["method"], "model": edit.get("model"),
        "models": {role: name for role, name in edit.get("models", {}).items() if role != "ip_adapter"},
        "inputs": {"latents": "encode_latents", "depth": "estimate_depth", "content": "embed_content"}, "params": params,
    })  # fmt: skip
    return load_spec(raw)


def test_edits_start_from_a_stored_inversion_shared_by_a_sweep(models, clip: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    sweep = "stages.denoise_latents.each=[{t_s: 0}, {t_s: 2}]"
    stages = planned(with_inversion(spec("gen1-controlnet", models, sweep, "stages.denoise_latents.params.strength=0.4")),
                     clip, store)  # fmt: skip
    assert stages["denoise_latents_0"].call.inputs["inversion"].key == stages["denoise_latents_1"].call.inputs["inversion"].key
    refs = run(stages)
    inversion = ArtifactStore(store).open("invert_latents", refs["invert_latents"].key)
    encoded = ArtifactStore(store).open("encode_latents", refs["encode_latents"].key)["latents"][:].astype(np.float32)
    assert inversion["levels"].shape == (3, 6, 4, 8, 8)  # int(5 * 0.4) = 2 steps, and the clean latents
    np.testing.assert_allclose(inversion["levels"][0], encoded, rtol=0, atol=0)
    sdedit = run(planned(spec("gen1-controlnet", models, sweep, "stages.denoise_latents.params.strength=0.4"), clip, store))
    edited = ArtifactStore(store).open("denoise_latents", refs["denoise_latents_0"].key)["latents"][:]
    assert not np.allclose(edited, ArtifactStore(store).open("denoise_latents", sdedit["denoise_latents_0"].key)["latents"][:])


def test_an_inversion_with_another_schedule_is_refused(models) -> None:
    raw = with_inversion(spec("gen1-controlnet", models)).model_dump(mode="json", exclude_unset=True)
    next(stage for stage in raw["stages"] if stage["stage"] == "denoise_latents")["params"]["strength"] = 0.4
    with pytest.raises(SpecError, match="inverted with strength 0.8, but edits with 0.4; set both to the same"):
        load_spec(raw)


def test_windows_with_the_shared_anchor_give_per_frame_edits_their_own_frames(models, clip: Path, tmp_path: Path) -> None:
    """With omega_t = 0 every frame is edited alone, from noise seeded by its own index, so cutting the clip
    into windows (the anchor prepended to each) must change nothing: each frame lands in its own slot."""
    store = str(tmp_path / "store")
    edits = {}
    for window, overlap in ((4, 1), (16, 0)):
        refs = run(planned(spec("gen1-controlnet", models, "stages.denoise_latents.params.omega_t=0",
                                f"stages.denoise_latents.params.window={window}",
                                f"stages.denoise_latents.params.overlap={overlap}"), clip, store))  # fmt: skip
        edits[window] = ArtifactStore(store).open("denoise_latents", refs["denoise_latents_0"].key)
    assert edits[4].attrs["windows"]["count"] == 2 and edits[16].attrs["windows"]["count"] == 1
    np.testing.assert_allclose(edits[4]["latents"][:], edits[16]["latents"][:], rtol=1e-5, atol=1e-5)


def test_reference_content_is_the_image_variation_pipelines_embedding_and_reaches_the_edit(
    models, clip: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionImageVariationPipeline
    from PIL import Image

    from reelflow.core.tiny_gen1 import build_tiny_image_variations

    variations = build_tiny_image_variations(tmp_path / "variations")
    store, edits = str(tmp_path / "store"), {}
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{name}.png")
        given = {**models, "variations": variations}
        refs = run(planned(spec("gen1-reference", given, f"sources.reference.path={tmp_path / f'{name}.png'}"), clip, store))
        content = ArtifactStore(store).open("embed_content", refs["embed_content"].key)
        edits[name] = ArtifactStore(store).open("denoise_latents", refs["denoise_latents"].key)["latents"][:]
    pipe = StableDiffusionImageVariationPipeline.from_pretrained(variations, safety_checker=None)
    theirs = pipe._encode_image(Image.open(tmp_path / "blue.png"), "cpu", 1, True)  # (uncond zeros; image), (2, 1, D)
    np.testing.assert_allclose(content["embeds"][:], theirs.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(edits["red"], edits["blue"])  # the content reaches the UNet's cross-attention


def test_ip_adapter_content_is_diffusers_image_embedding_and_the_reference_steers_the_edit(
    models, clip: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    store, edits = str(tmp_path / "store"), {}
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        Image.new("RGB", (40, 30), colour).save(tmp_path / f"{name}.png")
        refs = run(planned(spec("gen1-controlnet", models, f"sources.reference.path={tmp_path / f'{name}.png'}",
                                "stages.denoise_latents.each=[{}, {ip_adapter_scale: 0}]"), clip, store))  # fmt: skip
        content = ArtifactStore(store).open("embed_content", refs["embed_content"].key)
        edits[name] = ArtifactStore(store).open("denoise_latents", refs["denoise_latents_0"].key)["latents"][:]
        edits[name, 0] = ArtifactStore(store).open("denoise_latents", refs["denoise_latents_1"].key)["latents"][:]
    pipe = StableDiffusionPipeline.from_pretrained(models["sd"], safety_checker=None)
    pipe.load_ip_adapter(str(models["ip_adapter"]), subfolder="models", weight_name="ip-adapter_sd15.safetensors")
    image, uncond = pipe.encode_image(Image.open(tmp_path / "blue.png"), "cpu", 1)  # diffusers' own CLIP preprocessing
    np.testing.assert_allclose(content["image_embeds"][:], torch.cat([uncond, image])[:, None].detach().numpy(), rtol=1e-5, atol=1e-6)
    assert content.attrs["image_size"] == [40, 30] and content["embeds"].shape[0] == 2
    assert not np.allclose(edits["red"], edits["blue"])  # the reference reaches the UNet through the adapter
    np.testing.assert_allclose(edits["red", 0], edits["blue", 0], rtol=1e-5, atol=1e-6)  # ...weighed by ip_adapter_scale


def test_an_ip_adapter_is_named_on_both_sides_or_neither(models) -> None:
    with pytest.raises(SpecError, match="its content 'embed_content' is for an IP-Adapter; name the same adapter here"):
        spec("gen1-controlnet", models, "stages.denoise_latents.models={unet: sd, controlnet: controlnet}")
    with pytest.raises(SpecError, match="ip_adapter_scale 0.5 weighs an IP-Adapter's image tokens, but this edit has none"):
        spec("gen1-depth2img", models, "stages.denoise_latents.params.ip_adapter_scale=0.5")
    with pytest.raises(SpecError, match="is for an IP-Adapter, which method gen1 does not take .* use method gen1_controlnet"):
        spec("gen1-depth2img", models, "stages.embed_content.method=ip_adapter", "stages.embed_content.model=null",
             "models.ip_adapter={id: x, family: ip_adapter, weight_name: models/ip-adapter_sd15.safetensors}",
             "stages.embed_content.models={text_encoder: sd_depth, ip_adapter: ip_adapter}",
             "sources.reference={kind: image}")  # fmt: skip
    with pytest.raises(SpecError, match="uses model 'other' as its ip_adapter but reads 'content' from 'embed_content'"):
        spec("gen1-controlnet", models, f"models.other={{id: {models['ip_adapter']}, family: ip_adapter, "
                                        "weight_name: models/ip-adapter_sd15.safetensors}",
             "stages.denoise_latents.models.ip_adapter=other")  # fmt: skip


def test_a_weight_name_is_refused_on_a_model_read_whole(models, clip: Path, tmp_path: Path) -> None:
    given = spec("gen1-controlnet", models, "models.controlnet.weight_name=x.safetensors", f"input={clip}",
                 f"store={tmp_path / 's'}")  # fmt: skip
    with pytest.raises(SpecError, match="model 'controlnet' .*: models of family diffusers are read whole, so they take no weight_name"):
        prepare_run(given, Settings())


def test_the_adapter_file_and_its_scale_enter_the_edits_key_only_with_an_adapter(models, clip: Path, tmp_path: Path) -> None:
    import shutil

    two = tmp_path / "two-adapters"
    shutil.copytree(models["ip_adapter"], two)
    shutil.copy(two / "models/ip-adapter_sd15.safetensors", two / "models/ip-adapter_sd15_light.safetensors")
    keys = {}
    for name in ("ip-adapter_sd15", "ip-adapter_sd15_light"):
        stages = planned(spec("gen1-controlnet", {**models, "ip_adapter": two}, f"models.ip_adapter.weight_name=models/{name}.safetensors"),
                         clip, str(tmp_path / "store"))  # fmt: skip
        keys[name] = (stages["embed_content"].key, stages["denoise_latents_0"].key)
    assert keys["ip-adapter_sd15"][0] != keys["ip-adapter_sd15_light"][0] and keys["ip-adapter_sd15"][1] != keys["ip-adapter_sd15_light"][1]
    assert "ip_adapter_scale" in spec("gen1-controlnet", models).graph.nodes["denoise_latents_0"].spec.key_params()
    plain = next(n for n in spec("gen1-depth2img", models).graph.order() if n.spec.stage == "denoise_latents")
    assert "ip_adapter_scale" not in plain.spec.key_params()  # inert there: text edits keep their keys


def test_gen1_refuses_a_mask_per_frame(models, clip: Path, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "masks"
    folder.mkdir()
    for i in range(6):
        Image.new("L", (64, 64), 255).save(folder / f"{i:05d}.png")
    given = spec("gen1-controlnet", models, f"sources.mask={{kind: mask, path: {folder}}}", f"input={clip}",
                 f"store={tmp_path / 's'}")  # fmt: skip
    with pytest.raises(SpecError, match="Gen-1 blends outside one mask image for every frame; this mask source holds 6"):
        prepare_run(given, Settings())

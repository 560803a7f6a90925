"""Soundini on tiny models through the stage seam (methods.md 5.8): the background is the source's exactly, the sound
reaches the region, a CLIP space of the wrong width is refused before any model loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reelflow.core.tiny import build_tiny_clip_vision
from reelflow.core.tiny_adm import build_tiny_adm
from reelflow.core.tiny_lpips import build_tiny_lpips
from reelflow.core.tiny_audio import build_tiny_clip_512, build_tiny_soundclip_swin
from reelflow.deployments import spec_path
from reelflow.flows.dag import plan_run
from reelflow.flows.edit import prepare_run
from reelflow.flows.sources import hash_sources, source_urls
from reelflow.schemas.calls import StoreSpec
from reelflow.schemas.errors import GraphError, SpecError
from reelflow.schemas.loading import load_spec
from reelflow.schemas.settings import Settings
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import task_for

SMALL = ("stages.decode_video.params.num_frames=4", "stages.decode_video.params.width=64",
         "stages.decode_video.params.height=64", "stages.decode_video.params.multiple=8",
         "stages.denoise_latents.params.num_steps=4", "stages.denoise_latents.params.strength=0.5",
         "stages.denoise_latents.params.augmentations=2", "stages.denoise_latents.params.chunk=2")  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("soundini")
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 24:72] = 255  # the middle of the 96x64 clip
    Image.fromarray(mask).save(root / "mask.png")
    return {"sd": tiny_bundle, "clip": build_tiny_clip_512(root / "clip"), "adm": build_tiny_adm(root / "adm"),
            "audio_encoder": build_tiny_soundclip_swin(root / "audio"), "lpips": build_tiny_lpips(root / "lpips"),
            "mask": root / "mask.png"}  # fmt: skip


def spec(models: dict[str, Path], clip: Path, store: Path, *extra: str, preset: str = "soundini-sd"):
    backbone = "sd" if preset == "soundini-sd" else "adm"
    ids = [f"models.{name}.id={models[name]}" for name in (backbone, "clip", "audio_encoder", "lpips")]
    return load_spec(spec_path(preset), [*ids, f"sources.mask.path={models['mask']}", "sources.audio.path=null",
                                         f"input={clip}", f"store={store}", *SMALL, *extra])  # fmt: skip


def run(spec_) -> dict:  # noqa: ANN001
    spec_ = load_spec(spec_.model_dump(mode="json"))
    from reelflow.flows.sources import without_absent_optional_sources

    spec_ = without_absent_optional_sources(spec_, Settings())
    sources = hash_sources(spec_, source_urls(spec_), Settings())
    planned = plan_run(spec_, sources=sources, store=StoreSpec(url=spec_.store), run_id="r", default_dtype="float32")
    store = ArtifactStore(spec_.store)
    return {p.id: store.open(ref.stage, ref.key) for p in planned for ref in [task_for(p.call.stage).fn(call=p.call)]}


def test_the_background_is_the_source_exactly_and_the_region_is_edited(models, clip: Path, tmp_path: Path) -> None:
    out = run(spec(models, clip, tmp_path / "store"))
    edited, source = out["denoise_latents"]["frames"][:], out["decode_video"]["frames"][:]
    inside = out["decode_mask"]["mask"][:]
    assert edited.shape == source.shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(edited[~inside], source[~inside])
    assert np.abs(edited[inside].astype(int) - source[inside].astype(int)).mean() > 1.0
    assert out["denoise_latents"]["latents"].shape == (4, 4, 8, 8)


def test_the_pixel_backbone_edits_the_frames_themselves_and_keeps_the_background(models, clip: Path, tmp_path: Path) -> None:
    out = run(spec(models, clip, tmp_path / "store", preset="soundini"))
    denoised = out["denoise_latents"]
    edited, source, inside = denoised["frames"][:], out["decode_video"]["frames"][:], out["decode_mask"]["mask"][:]
    assert "encode_latents" not in out and "latents" not in denoised
    assert denoised["state"].shape == (2, 4, 3, 64, 64)  # the last two steps, the frames in [-1, 1]
    np.testing.assert_array_equal(edited[~inside], source[~inside])
    assert np.abs(edited[inside].astype(int) - source[inside].astype(int)).mean() > 1.0
    last = np.clip(np.asarray(denoised["state"][1]) * 127.5 + 127.5, 0, 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(edited[inside], last[inside])  # the region is step 1's frames (slot 1), no decoder between


def _denoise_stage(raw: dict) -> dict:
    return next(s for s in raw["stages"] if s["stage"] == "denoise_latents")


def _pixel_in_soundini_sd(raw: dict, models: dict[str, Path]) -> None:
    """soundini-sd's pipeline (encode_latents included) with its Soundini stage on the ADM, in pixels."""
    raw["models"]["adm"] = {"id": str(models["adm"]), "family": "guided_diffusion"}
    stage = _denoise_stage(raw)
    stage["params"]["backbone"] = "pixel"
    stage["models"] = {"unet": "adm", "clip": "clip", "lpips": "lpips"}
    del stage["inputs"]["latents"]


def _latent_on_the_adm(raw: dict, models: dict[str, Path]) -> None:
    raw["models"]["adm"] = {"id": str(models["adm"]), "family": "guided_diffusion"}
    _denoise_stage(raw)["models"]["unet"] = "adm"


@pytest.mark.parametrize(
    ("preset", "change", "message"),
    [
        ("soundini-sd", lambda raw, models: _denoise_stage(raw)["params"].update(backbone="pixel"),
         "the pixel backbone denoises the frames themselves and reads no `latents`; drop them from its inputs"),
        ("soundini-sd", lambda raw, models: (_pixel_in_soundini_sd(raw, models), _denoise_stage(raw)["models"].update(vae="sd")),
         "names a model as its vae, which it does not use with these params; drop 'vae' from its `models`"),
        ("soundini-sd", lambda raw, models: (_pixel_in_soundini_sd(raw, models), _denoise_stage(raw)["models"].update(unet="sd")),
         "the unet takes 4 channels, not pixels: for SD set `backbone: latent`"),
        ("soundini-sd", _latent_on_the_adm, "the unet is a pixel-space model, which cannot denoise SD latents: set `backbone: pixel`"),
        ("soundini", lambda raw, models: _denoise_stage(raw)["params"].update(backbone="latent"),
         "the latent backbone .* denoises `latents`: add an encode_latents stage"),
        ("soundini", lambda raw, models: raw["stages"][0]["params"].update(multiple=1, width=63),
         "both sides must divide by 2, but they are 63x64; set decode_video's `multiple: 2`"),
        ("soundini", lambda raw, models: (raw["models"].pop("lpips"), _denoise_stage(raw)["models"].pop("lpips")),
         "needs a lpips model as its lpips: add one under `models`"),
        ("soundini", lambda raw, models: _denoise_stage(raw)["params"].update(perceptual=0),
         "names a model as its lpips, which it does not use with these params"),
    ],
)  # fmt: skip
def test_a_backbone_or_loss_given_the_wrong_parts_is_refused_before_any_model_loads(
    models, clip: Path, tmp_path: Path, preset: str, change, message: str  # noqa: ANN001
) -> None:
    raw = spec(models, clip, tmp_path / "store", preset=preset).model_dump(mode="json", exclude_unset=True)
    change(raw, models)
    with pytest.raises((SpecError, GraphError), match=message):
        prepare_run(load_spec(raw), Settings())


def test_a_pixel_edit_beside_an_encode_latents_stage_reads_no_latents(models, clip: Path, tmp_path: Path) -> None:
    raw = spec(models, clip, tmp_path / "store").model_dump(mode="json", exclude_unset=True)
    _pixel_in_soundini_sd(raw, models)  # latents left out, though exactly one stage makes them
    out = run(load_spec(raw))
    assert "encode_latents" in out and "latents" not in out["denoise_latents"]
    assert out["denoise_latents"]["state"].shape[2] == 3


def test_a_clip_space_of_another_width_is_refused_before_any_model_loads(models, clip: Path, tmp_path: Path) -> None:
    narrow = build_tiny_clip_vision(tmp_path / "clip16")
    given = load_spec(spec(models, clip, tmp_path / "store").model_dump(mode="json"), [f"models.clip.id={narrow}"])
    with pytest.raises(SpecError, match="the clip role's image embeddings are 16-wide but the audio encoders embed into"):
        prepare_run(given, Settings())


def test_another_sound_gives_another_region_and_the_same_background(models, clip: Path, tmp_path: Path) -> None:
    from tests.tasks.test_audio import write_wav

    rate = 22_050
    t = np.arange(rate) / rate
    edits = {}
    for name, sound in (("hum", 0.5 * np.sin(2 * np.pi * 110 * t)), ("whistle", 0.5 * np.sin(2 * np.pi * 3000 * t))):
        wav = write_wav(tmp_path / f"{name}.wav", sound.astype(np.float32), rate)
        out = run(spec(models, clip, tmp_path / "store", f"sources.audio.path={wav}"))
        edits[name] = out["denoise_latents"]["frames"][:]
        inside = out["decode_mask"]["mask"][:]
    assert np.abs(edits["hum"][inside].astype(int) - edits["whistle"][inside].astype(int)).mean() > 0.5
    np.testing.assert_array_equal(edits["hum"][~inside], edits["whistle"][~inside])


def test_an_edit_killed_after_a_step_resumes_there_and_ends_as_an_uninterrupted_one(
    models, clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import reelflow.tasks.soundini as tasks

    whole = run(spec(models, clip, tmp_path / "whole"))["denoise_latents"]
    real, starts = tasks.soundini_denoise, []

    def crashing(*args, on_step, first_step, **kwargs):  # noqa: ANN002, ANN003, ANN202
        starts.append(first_step)

        def step_then_die(i: int, latents) -> None:  # noqa: ANN001
            on_step(i, latents)
            if len(starts) == 1:
                raise RuntimeError("killed after a step")

        return real(*args, on_step=step_then_die, first_step=first_step, **kwargs)

    monkeypatch.setattr(tasks, "soundini_denoise", crashing)
    with pytest.raises(RuntimeError, match="killed after a step"):
        run(spec(models, clip, tmp_path / "resumed"))
    resumed = run(spec(models, clip, tmp_path / "resumed"))["denoise_latents"]
    assert starts == [0, 1]  # the second attempt began at the step after the one stored
    np.testing.assert_allclose(resumed["latents"][:], whole["latents"][:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(resumed["state"][:], whole["state"][:], rtol=1e-5, atol=1e-5)


def test_the_text_guided_variant_takes_a_prompt_in_place_of_the_sound(models, clip: Path, tmp_path: Path) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    raw = spec(models, clip, tmp_path / "store").model_dump(mode="json", exclude_unset=True)
    raw["stages"] = [s for s in raw["stages"] if s["stage"] != "embed_audio"]
    raw["stages"].insert(1, {"stage": "embed_content", "method": "clip_text", "model": "clip", "params": {"prompt": "a fire"}})
    next(s for s in raw["stages"] if s["stage"] == "denoise_latents")["inputs"]["target"] = "embed_content"
    next(s for s in raw["stages"] if s["stage"] == "compute_metrics")["params"]["metrics"].remove("audio_visual")  # no sound
    edits = {}
    for prompt in ("a fire", "a frozen lake"):
        raw["stages"][1]["params"]["prompt"] = prompt
        out = run(load_spec(raw))
        edits[prompt], inside = out["denoise_latents"]["frames"][:], out["decode_mask"]["mask"][:]
    reference = CLIPModel.from_pretrained(models["clip"])
    tokens = CLIPTokenizer.from_pretrained(models["clip"])(["a frozen lake"], padding="max_length", return_tensors="pt")
    np.testing.assert_allclose(out["embed_content"]["embeddings"][:], reference.get_text_features(**tokens).pooler_output.detach().numpy(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert np.abs(edits["a fire"][inside].astype(int) - edits["a frozen lake"][inside].astype(int)).mean() > 0.5


def test_the_perceptual_term_is_lpips_between_the_backgrounds_alone(models) -> None:
    import torch

    from reelflow.core.frames import to_model_range
    from reelflow.core.models.base import ModelSource
    from reelflow.core.models.lpips_family import LpipsFamily
    from reelflow.schemas.soundini import SoundiniParams
    from reelflow.tasks.soundini import _losses

    lpips = LpipsFamily().load(ModelSource("tiny", path=models["lpips"]))
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    masks = np.zeros((2, 32, 32), bool)
    masks[:, 8:24, 8:24] = True
    only = SoundiniParams(sound=0, direction=0, flow=0, background=0, range=0, perceptual=10.0)
    losses = _losses(only, frames, masks, torch.zeros(2, 512), {}, None, lpips, seed=0, ramp_steps=1)
    source, inside = to_model_range(frames), torch.from_numpy(masks[:, None].astype(np.float32))
    noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(1))
    assert float(losses(source + inside * noise, slice(0, 2), False, 0)) == 0.0  # the region is free to change
    changed = source + 0.3 * noise
    expected = 10.0 * lpips((1 - inside) * changed, (1 - inside) * source).sum()
    torch.testing.assert_close(losses(changed, slice(0, 2), False, 0), expected)
    assert float(expected) > 0
    anchored = losses(changed, slice(0, 2), True, 0)  # the fixed neighbour's own terms belong to its own chunk
    torch.testing.assert_close(anchored, 10.0 * lpips((1 - inside[1:]) * changed[1:], (1 - inside[1:]) * source[1:]).sum())


def test_a_perception_encoder_embeds_the_sound_and_the_region_in_its_own_space(
    models, clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import reelflow.tasks.soundini as tasks
    from reelflow.core.tiny_audio import build_tiny_pe_av

    pe = build_tiny_pe_av(tmp_path / "pe-av")
    seen, real = [], tasks.image_embeddings
    monkeypatch.setattr(tasks, "image_embeddings", lambda model, images, processor: seen.append(images.shape) or real(model, images, processor))
    out = run(spec(models, clip, tmp_path / "store", f"models.audio_encoder.id={pe}", "models.audio_encoder.family=transformers",
                   f"models.clip.id={pe}", "stages.compute_metrics.params.metrics=[psnr_outside]", preset="soundini"))  # fmt: skip
    edited, source, inside = out["denoise_latents"]["frames"][:], out["decode_video"]["frames"][:], out["decode_mask"]["mask"][:]
    assert out["embed_audio"]["embeddings"].shape == (4, 32)  # PE's space, not CLIP's 512
    assert seen and all(shape[1:] == (3, 32, 32) for shape in seen)  # the region went through PE's video tower
    np.testing.assert_array_equal(edited[~inside], source[~inside])
    assert np.abs(edited[inside].astype(int) - source[inside].astype(int)).mean() > 1.0


def test_images_and_a_target_of_different_spaces_are_refused_before_the_models_load(models, clip: Path, tmp_path: Path) -> None:
    from reelflow.core.tiny_audio import build_tiny_pe_av

    pe = build_tiny_pe_av(tmp_path / "pe-av")  # 32-wide audio against CLIP's 512-wide images
    given = spec(models, clip, tmp_path / "store", f"models.audio_encoder.id={pe}", "models.audio_encoder.family=transformers",
                 preset="soundini")  # fmt: skip
    with pytest.raises(SpecError, match="the target's embeddings are 32-wide but the clip role embeds images 512-wide"):
        run(given)


def test_a_sound_embedded_by_another_perception_encoder_is_refused(models, clip: Path, tmp_path: Path) -> None:
    from reelflow.core.tiny_audio import build_tiny_pe_av

    heard, seeing = build_tiny_pe_av(tmp_path / "pe-a", seed=0), build_tiny_pe_av(tmp_path / "pe-b", seed=1)  # one width
    given = spec(models, clip, tmp_path / "store", f"models.audio_encoder.id={heard}", "models.audio_encoder.family=transformers",
                 f"models.clip.id={seeing}", preset="soundini")  # fmt: skip
    with pytest.raises(SpecError, match="the sound was embedded by another Perception Encoder .* give embed_audio and this stage the same"):
        run(given)

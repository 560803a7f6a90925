"""Wan by role on tiny bundles built from config: kinds, shapes and the conditioning, against diffusers' pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanVACEPipeline

from reelflow.core.frames import to_model_range
from reelflow.core.inversion.flowmatch import FlowSchedule, generate, generate_scheduled, invert
from reelflow.core.tiny_wan import build_tiny_wan_i2v, build_tiny_wan_vace, tiny_t5_tokenizer
from reelflow.core.wan import (
    WanVelocity,
    check_size,
    checkpoint_kind,
    denormalise,
    encode_prompts,
    i2v_condition,
    image_states,
    normalise,
    plan_frames,
    vace_control,
)


@pytest.fixture(scope="module")
def wan_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan")
    return {"i2v": build_tiny_wan_i2v(root / "i2v"), "vace": build_tiny_wan_vace(root / "vace")}


def test_the_checkpoint_kind_is_read_from_the_transformers_config(wan_bundles: dict[str, Path]) -> None:
    for kind, bundle in wan_bundles.items():
        config = json.loads((bundle / "transformer" / "config.json").read_text())
        assert checkpoint_kind(config["_class_name"], config) == kind
    assert checkpoint_kind("WanTransformer3DModel", {"in_channels": 16, "out_channels": 16}) == "t2v"
    assert checkpoint_kind("WanTransformer3DModel", {"in_channels": 36, "out_channels": 16, "image_dim": None}) == "i2v"  # 2.2 A14B


def test_frame_counts_meet_4k_plus_1_by_the_stated_policy() -> None:
    assert plan_frames(14, "trim").frames == 13 and plan_frames(14, "pad").frames == 17
    assert plan_frames(14, "pad").padded == 3 and plan_frames(17, "pad").padded == 0 and plan_frames(17, "trim").used == 17
    assert plan_frames(81, "refuse").latent_frames == 21 and plan_frames(1, "trim").latent_frames == 1
    with pytest.raises(ValueError, match="14 frames; Wan takes 4k\\+1 frames \\(13 or 17\\): decode 13 or 17 frames"):
        plan_frames(14, "refuse")
    with pytest.raises(ValueError, match="at least 1"):
        plan_frames(0, "pad")


def test_sizes_the_vae_and_patches_cannot_tile_are_refused_with_the_nearest_that_fit() -> None:
    check_size(480, 832)
    with pytest.raises(ValueError, match="width 840: use 832 or 848"):
        check_size(480, 840)
    with pytest.raises(ValueError, match="height 8: use 16 or 16"):
        check_size(8, 64)


def test_the_image_to_video_condition_is_the_pipelines(wan_bundles: dict[str, Path]) -> None:
    pipe = WanImageToVideoPipeline.from_pretrained(wan_bundles["i2v"])
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _, expected = pipe.prepare_latents(image, 1, 16, 64, 64, 9, torch.float32, "cpu", torch.Generator().manual_seed(0))
    torch.testing.assert_close(i2v_condition(pipe.vae, image, 9), expected, rtol=1e-5, atol=1e-5)
    latents = torch.randn(1, 16, 3, 8, 8)
    torch.testing.assert_close(denormalise(normalise(latents, pipe.vae.config), pipe.vae.config), latents)


def test_the_velocity_is_the_transformers_output_with_guidance_and_drives_inversion(wan_bundles: dict[str, Path]) -> None:
    pipe = WanImageToVideoPipeline.from_pretrained(wan_bundles["i2v"])
    tokenizer = tiny_t5_tokenizer()
    ids = tokenizer(["a red car on a road", ""], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        prompt, negative = pipe.text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state.split(1)
        states = pipe.image_encoder(torch.rand(1, 3, 32, 32), output_hidden_states=True).hidden_states[-2]
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    condition = i2v_condition(pipe.vae, image, 9)
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    velocity = WanVelocity(pipe.transformer, prompt, negative, guidance_scale=3.0, condition=condition, image=states)

    def direct(text: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return pipe.transformer(hidden_states=torch.cat([x, condition], dim=1), timestep=torch.tensor([500.0]),
                                    encoder_hidden_states=text, encoder_hidden_states_image=states, return_dict=False)[0]  # fmt: skip

    torch.testing.assert_close(velocity(x, 0.5, 500.0), direct(negative) + 3.0 * (direct(prompt) - direct(negative)))
    schedule = FlowSchedule.from_scheduler(pipe.scheduler, 4)
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler) and schedule.sigmas[0] == pytest.approx(1.0, abs=1e-5)
    inverted = invert(velocity, x, schedule, strength=0.5)
    assert inverted.shape == x.shape and torch.isfinite(generate(velocity, inverted, schedule, strength=0.5)).all()


def test_prompts_and_image_tokens_are_the_pipelines(wan_bundles: dict[str, Path]) -> None:
    pipe = WanImageToVideoPipeline.from_pretrained(wan_bundles["i2v"])
    prompts = ["a  red car &amp; a road", ""]
    expected = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=24, device="cpu")
    got = encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, max_length=24)
    torch.testing.assert_close(got, expected)
    assert got[1, 1:].abs().sum() == 0 and got[0, 5].abs().sum() > 0  # past each prompt's own tokens: zeros
    image = (torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8).numpy()
    from PIL import Image

    torch.testing.assert_close(image_states(pipe.image_encoder, pipe.image_processor, image),
                               pipe.encode_image(Image.fromarray(image), "cpu"))  # fmt: skip


@pytest.mark.parametrize("reference", [False, True])
def test_the_vace_control_is_the_pipelines_and_its_layers_read_it(wan_bundles: dict[str, Path], reference: bool) -> None:
    pipe = WanVACEPipeline.from_pretrained(wan_bundles["vace"])
    g = torch.Generator().manual_seed(3)
    video = torch.rand(1, 3, 9, 32, 48, generator=g) * 2 - 1
    mask = (torch.rand(1, 1, 9, 32, 48, generator=g) > 0.5).float()
    image = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1 if reference else None
    refs = [[image[0]]] if reference else [[]]
    expected = torch.cat([pipe.prepare_video_latents(video, mask.expand(-1, 3, -1, -1, -1), refs, device="cpu"),
                          pipe.prepare_masks(mask.expand(-1, 3, -1, -1, -1), refs)], dim=1)  # fmt: skip
    control = vace_control(pipe.vae, video, mask, image)
    assert control.shape == (1, 96, 3 + reference, 4, 6)
    torch.testing.assert_close(control, expected, rtol=1e-5, atol=1e-5)
    prompt = torch.randn(1, 8, 32, generator=g)
    x = torch.randn(1, 16, 3 + reference, 4, 6, generator=g)
    with torch.no_grad():
        direct = pipe.transformer(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=prompt,
                                  control_hidden_states=control, control_hidden_states_scale=torch.full((2,), 0.5),
                                  return_dict=False)[0]  # fmt: skip
    velocity = WanVelocity(pipe.transformer, prompt, control=control, control_scale=0.5)
    torch.testing.assert_close(velocity(x, 0.7, 700.0), direct)
    assert not torch.allclose(WanVelocity(pipe.transformer, prompt, control=control, control_scale=0.0)(x, 0.7, 700.0), direct)


def test_the_same_seed_rebuilds_identical_weights_and_the_roles_load_through_the_family(wan_bundles: dict[str, Path],
                                                                                        tmp_path: Path) -> None:  # fmt: skip
    from reelflow.core.models import load_model

    again = build_tiny_wan_i2v(tmp_path / "again")
    for component in ("transformer", "vae", "text_encoder", "image_encoder"):
        (weights,) = sorted((wan_bundles["i2v"] / component).glob("*.safetensors"))
        assert weights.read_bytes() == (again / component / weights.name).read_bytes(), component
    tokenizer = load_model(str(again), family="diffusers", component="tokenizer")
    assert tokenizer("a red car").input_ids[-1] == tokenizer.eos_token_id == 1
    assert type(load_model(str(again), family="diffusers", component="vae")).__name__ == "AutoencoderKLWan"


def test_vace_sampled_with_the_schedulers_own_steps_is_the_pipelines(wan_bundles: dict[str, Path]) -> None:
    from PIL import Image

    pipe = WanVACEPipeline.from_pretrained(wan_bundles["vace"])
    g = torch.Generator().manual_seed(4)
    frames = (torch.rand(9, 32, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
    prompts = torch.randn(2, 8, 32, generator=g)
    noise = torch.randn(1, 16, 3, 4, 6, generator=g)
    expected = pipe(video=[Image.fromarray(f) for f in frames], prompt_embeds=prompts[1:], negative_prompt_embeds=prompts[:1],
                    height=32, width=48, num_frames=9, num_inference_steps=4, guidance_scale=3.0, conditioning_scale=0.7,
                    latents=noise.clone(), output_type="latent").frames  # fmt: skip
    video = to_model_range(frames).transpose(0, 1)[None]
    control = vace_control(pipe.vae, video, torch.ones(1, 1, 9, 32, 48))
    velocity = WanVelocity(pipe.transformer, prompts[1:], prompts[:1], guidance_scale=3.0, control=control, control_scale=0.7)
    got = generate_scheduled(velocity, noise.clone(), pipe.scheduler, 4, strength=1.0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    euler = generate(velocity, noise.clone(), FlowSchedule.from_scheduler(pipe.scheduler, 4), strength=1.0)
    assert not torch.allclose(euler, expected, atol=1e-3)  # Euler on the same sigmas is another sampler


def test_group_offload_moves_blocks_and_leaves_and_changes_no_output(wan_bundles: dict[str, Path]) -> None:
    from reelflow.core.models import is_offloaded, load_model

    vace = str(wan_bundles["vace"])
    plain, offloaded = (load_model(vace, family="diffusers", component="transformer", offload=o) for o in ("none", "group"))
    assert offloaded is not plain and is_offloaded(offloaded) and not is_offloaded(plain)
    g = torch.Generator().manual_seed(5)
    x, control, text = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 96, 2, 4, 4, generator=g), torch.randn(1, 8, 32, generator=g)
    outputs = [WanVelocity(model, text, control=control)(x, 0.5, 500.0) for model in (plain, offloaded)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    encoder = load_model(vace, family="diffusers", component="text_encoder", offload="group")  # UMT5: by leaf layers
    tokenizer = load_model(vace, family="diffusers", component="tokenizer", offload="group")  # no weights: as without
    assert is_offloaded(encoder) and not is_offloaded(tokenizer)
    reference = load_model(vace, family="diffusers", component="text_encoder")
    torch.testing.assert_close(encode_prompts(encoder, tokenizer, ["a fox"], 16), encode_prompts(reference, tokenizer, ["a fox"], 16))

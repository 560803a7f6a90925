"""FateZero's edit plan, latent blender, heat maps and the two UNet passes, on tiny tensors (methods.md 1.6-1.9)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPTokenizer

from reelflow.core.editing.fatezero import (FusionController, FusionPlan, RecordingController, fused_word_maps, fusion_plan,
                                            word_heatmaps)
from reelflow.core.editing.fatezero_edit import LatentBlender, fatezero_edit, fatezero_invert
from reelflow.core.editing.prompt_to_prompt import apply_cross_fusion, refine_mapper
from reelflow.core.inversion.ddim import inversion_timesteps
from reelflow.core.sampling.ddim import ddim_denoise_step, denoising_timesteps
from reelflow.core.tiny import sd15_scheduler, tiny_tokenizer

FRAMES = 2
SOURCE = "a cat walking on a street"  # BOS a cat ...: "cat" is token 2
REFINED = "a painting of a cat walking on a street"  # BOS a painting of a cat ...: "painting" 2, "cat" 5
SWAPPED = "a dog walking on a street"  # same word count as SOURCE


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return tiny_tokenizer()


def plan_for(tokenizer: CLIPTokenizer, target: str, steps: int = 10, **options) -> tuple[FusionPlan, str]:
    windows = {"cross_replace_steps": 0.5, "self_replace_steps": 0.3}
    return fusion_plan(tokenizer, SOURCE, target, steps, latent_shape=(8, 8), **{**windows, **options})


# --- fusion plan ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "cross", "self_", "cross_on", "self_on"),
    [(10, 0.5, 0.3, 5, 3), (50, 0.8, 0.58, 40, 29), (4, 1.0, 0.0, 4, 0)],
)
def test_plan_windows_are_the_first_steps_of_each_fraction(
    tokenizer: CLIPTokenizer, steps: int, cross: float, self_: float, cross_on: int, self_on: int
) -> None:
    plan, _ = plan_for(tokenizer, REFINED, steps, cross_replace_steps=cross, self_replace_steps=self_)

    assert plan.cross_window.tolist() == [True] * cross_on + [False] * (steps - cross_on)
    assert plan.self_window.tolist() == [True] * self_on + [False] * (steps - self_on)


def test_refine_mapper_sends_target_tokens_to_source_tokens(tokenizer: CLIPTokenizer) -> None:
    plan, fusion = plan_for(tokenizer, REFINED)

    assert fusion == "refine" and plan.replace is None
    assert plan.mapper[5] == 2, "the target's 'cat' reads the source's 'cat' column"
    assert plan.alphas[2] == 0 and plan.alphas[5] == 1, "'painting' is new, 'cat' is aligned"


def test_replace_with_equal_word_counts_uses_the_word_swap_matrix(tokenizer: CLIPTokenizer) -> None:
    plan, fusion = plan_for(tokenizer, SWAPPED, replace=True)

    assert fusion == "replace" and plan.mapper is None and plan.alphas is None
    assert plan.replace[2, 2] == 1 and plan.replace[2].sum() == 1, "source 'cat' feeds target 'dog' only"


def test_replace_with_different_word_counts_falls_back_to_refine_and_says_so(tokenizer: CLIPTokenizer) -> None:
    plan, fusion = plan_for(tokenizer, REFINED, replace=True)

    assert fusion == "refine (replace needs the same word count)"
    assert plan.replace is None
    mapper, alphas = refine_mapper(tokenizer, SOURCE, REFINED)
    assert torch.equal(plan.mapper, mapper) and torch.equal(plan.alphas, alphas)


def test_blend_words_come_from_the_source_prompt_and_latent_targets_from_the_target(tokenizer: CLIPTokenizer) -> None:
    plan, _ = plan_for(tokenizer, REFINED, blend_words=(["cat"], ["cat", "painting"]), blend_latents=True)

    assert plan.blend_tokens == [2], "'cat' in the source prompt"
    assert plan.target_tokens == [5, 2], "'cat' then 'painting' in the target prompt"


def test_reweight_scales_target_prompt_tokens(tokenizer: CLIPTokenizer) -> None:
    plan, _ = plan_for(tokenizer, REFINED, reweight={"painting": 10.0})

    expected = torch.ones(77)
    expected[2] = 10.0
    assert torch.equal(plan.equalizer, expected)


def test_latent_window_is_fatezeros_open_interval_of_its_step_counter(tokenizer: CLIPTokenizer) -> None:
    """FateZero blends while its counter i + 1 is in (0.2T, 0.8T): steps 10..38 of 50."""
    plan, _ = plan_for(tokenizer, SWAPPED, 50, blend_words=(["cat"], ["dog"]), blend_latents=True)
    style, _ = plan_for(tokenizer, SWAPPED, 50, blend_words=(["cat"], ["dog"]))

    assert plan.latent_window.nonzero().flatten().tolist() == list(range(10, 39))
    assert style.latent_window is None and style.target_tokens is None
    with pytest.raises(ValueError, match="blend_latents needs blend_words"):
        plan_for(tokenizer, SWAPPED, blend_latents=True)


# --- latent blender ---------------------------------------------------------------------------


def blend_controller(
    cross: torch.Tensor,
    steps: int,
    *,
    self_window: torch.Tensor | None = None,
    latent_window: torch.Tensor | None = None,
) -> FusionController:
    """Source word token 2, a 4x4 latent grid, source cross maps ``cross`` ``(F, 2, 16, 77)`` at every step."""
    never = torch.zeros(steps, dtype=torch.bool)
    self_window = never if self_window is None else self_window
    plan = FusionPlan(steps, never, self_window, blend_tokens=[2], blend_threshold=0.5, latent_shape=(4, 4),
                      blend_resolution=4, latent_window=latent_window)  # fmt: skip
    return FusionController(plan, source=lambda k: {"cross": cross}, layers={"cross": (True, 16)})


def test_latent_blender_reads_the_inversion_latent_of_the_matching_level_inside_its_window() -> None:
    steps = 4
    cross = torch.zeros(FRAMES, 2, 16, 77)
    cross[:, :, :8, 2] = 1.0  # top half of the 4x4 grid; the mask's 3x3 max-pool makes it rows 0-2
    controller = blend_controller(cross, steps, latent_window=torch.tensor([False, True, True, False]))
    requested: list[int] = []

    def inversion_latent(k: int) -> torch.Tensor:
        requested.append(k)
        return torch.full((FRAMES, 4, 4, 4), float(k))

    blender = LatentBlender(controller, inversion_latent)
    z = torch.full((FRAMES, 4, 4, 4), -1.0)
    for i in range(steps):
        controller.begin_step(i)
        out = blender(i, z)
        if i in (1, 2):
            assert torch.equal(out[..., :3, :], z[..., :3, :]), "mask 1 keeps the edit"
            assert (out[..., 3, :] == steps - 1 - i).all(), "mask 0 takes z_{T-1-i}"
        else:
            assert out is z, "outside the window the latents pass through"
    assert requested == [2, 1]


def test_word_heatmaps_are_each_words_source_attention_normalised_per_frame() -> None:
    cross = torch.zeros(FRAMES, 2, 16, 77)
    cross[:, :, 5, 2] = torch.tensor([1.0, 4.0])[:, None]  # frame f peaks at (1, 1) with height 1 or 4
    cross[:, :, 6, 2] = torch.tensor([0.5, 2.0])[:, None]  # half that at (1, 2)
    cross[:, :, :, 3] = 0.25
    controller = blend_controller(cross, 1, self_window=torch.ones(1, dtype=torch.bool))
    controller.begin_step(0)
    controller.mask(16)

    heat = word_heatmaps(controller, [[2], [3]])

    expected = torch.zeros(FRAMES, 4, 4)
    expected[:, 1, 1], expected[:, 1, 2] = 1.0, 0.5
    torch.testing.assert_close(heat[0], expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(heat[1], torch.ones(FRAMES, 4, 4), rtol=0, atol=1e-7)


def test_fused_word_maps_sum_the_source_and_the_edits_own_maps_over_the_fused_steps_only() -> None:
    steps, never = 3, torch.zeros(3, dtype=torch.bool)
    cross = torch.zeros(FRAMES, 2, 16, 77)
    cross[:, :, 5, 2] = 1.0  # the source word (token 2) attends to cell (1, 1)
    replace = torch.rand(77, 77, generator=torch.Generator().manual_seed(0))
    plan = FusionPlan(steps, torch.tensor([True, True, False]), never, replace=replace, latent_shape=(4, 4),
                      blend_resolution=4)  # fmt: skip
    controller = FusionController(plan, source=lambda k: {"cross": cross}, layers={"cross": (True, 16)})
    outputs, expected_outputs = [], []
    for step in range(steps):
        controller.begin_step(step)
        edit = torch.zeros(FRAMES, 2, 16, 77)
        edit[:, :, 10, 3] = step + 1.0  # the target word (token 3) attends to cell (2, 2), more each step
        if controller.wants("cross", True, 16):
            expected_outputs.append(apply_cross_fusion(cross, edit.clone(), replace=replace))
            outputs.append(controller(edit, layer="cross", is_cross=True, num_frames=FRAMES))

    assert len(outputs) == 2, "the third step is outside the cross window"
    for output, expected_output in zip(outputs, expected_outputs):  # showing the maps changes no fusion
        torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    target = controller.shown_maps["target"]["cross"]
    assert target.shape == (FRAMES, 1, 16, 77), "kept as the mean over heads"
    assert torch.all(target[:, :, 10, 3] == 3.0), "steps 1 and 2 (1 + 2), not the unfused third"
    expected = torch.zeros(FRAMES, 4, 4)
    expected[:, 2, 2] = 1.0
    target_heat = fused_word_maps(controller, "target", [[3]])[0]
    torch.testing.assert_close(target_heat, expected, rtol=0, atol=1e-7)
    expected = torch.zeros(FRAMES, 4, 4)
    expected[:, 1, 1] = 1.0
    torch.testing.assert_close(fused_word_maps(controller, "source", [[2]])[0], expected, rtol=0, atol=1e-7)


# --- the two passes on a stand-in UNet --------------------------------------------------------


class ConstantUNet:
    """Stands in for the UNet: eps is a fixed tensor times the mean of each row's text embeddings,
    whatever the latents and the timestep."""

    dtype = torch.float32
    device = torch.device("cpu")
    attn_processors: dict = {}

    def __init__(self, eps: torch.Tensor, on_call=None) -> None:  # noqa: ANN001
        self.eps, self.on_call, self.calls = eps, on_call, 0

    def __call__(self, z: torch.Tensor, t: int, *, encoder_hidden_states: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        if self.on_call is not None:
            self.on_call()
        scale = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return SimpleNamespace(sample=self.eps.repeat(z.shape[0] // FRAMES, 1, 1, 1) * scale)


def idle_controller(steps: int, reads: list[int] | None = None) -> FusionController:
    """Windows open on every step but no recorded layers: it asks for each step's maps (noted in
    ``reads``) and fuses nothing."""
    always = torch.ones(steps, dtype=torch.bool)
    reads = [] if reads is None else reads
    return FusionController(FusionPlan(steps, always, always), source=lambda k: reads.append(k) or {}, layers={})


def test_edit_step_i_undoes_inversion_step_t_minus_1_minus_i_when_eps_ignores_the_latents() -> None:
    """With the same eps both ways the two DDIM updates are exact inverses, so edit step i lands on
    z_{T-1-i}: the inversion latent the latent blender reads, at the same noise level."""
    steps, scheduler = 5, sd15_scheduler()
    generator = torch.Generator().manual_seed(0)
    z0 = torch.randn(FRAMES, 4, 4, 4, generator=generator)
    recorder = RecordingController(0, set(), sink=lambda *args: None)
    seen: list[int] = []
    unet = ConstantUNet(torch.randn(FRAMES, 4, 4, 4, generator=generator), on_call=lambda: seen.append(recorder.step))
    inverted = [z0]

    z_T = fatezero_invert(unet, z0, torch.ones(1, 77, 8), scheduler, steps, recorder,
                          on_step=lambda k, t, z: inverted.append(z.clone()))  # fmt: skip
    assert seen == list(range(steps)), "the recorder knows the inversion step of every UNet call"
    edited: list[torch.Tensor] = []
    reads: list[int] = []
    z = fatezero_edit(unet, z_T, torch.ones(2, 77, 8), scheduler, steps, idle_controller(steps, reads), 7.5,
                      inverted_timesteps=inversion_timesteps(scheduler, steps).tolist(),
                      on_step=lambda i, t, z: edited.append(z.clone()))  # fmt: skip

    assert reads == list(range(steps - 1, -1, -1)), "edit step i asks for the maps of inversion step T-1-i"
    assert not torch.allclose(z_T, z0, atol=0.1)
    for i in range(steps):
        torch.testing.assert_close(edited[i], inverted[steps - 1 - i], rtol=0, atol=1e-5)
    torch.testing.assert_close(z, z0, rtol=0, atol=1e-5)


def test_guidance_extrapolates_from_the_negative_rows_to_the_target_rows() -> None:
    scheduler = sd15_scheduler()
    generator = torch.Generator().manual_seed(1)
    z_T, eps = torch.randn(2, FRAMES, 4, 4, 4, generator=generator)
    embeddings = torch.stack([torch.zeros(77, 8), torch.ones(77, 8)])  # negative: eps_u = 0; target: eps_c = eps

    z = fatezero_edit(ConstantUNet(eps), z_T, embeddings, scheduler, 1, idle_controller(1), guidance_scale=3.0)

    t = int(denoising_timesteps(scheduler, 1)[0])
    torch.testing.assert_close(z, ddim_denoise_step(3.0 * eps, t, z_T, scheduler, 1), rtol=0, atol=1e-6)


def test_edit_refuses_timesteps_other_than_the_inversions() -> None:
    scheduler, unet = sd15_scheduler(), ConstantUNet(torch.zeros(FRAMES, 4, 4, 4))
    with pytest.raises(ValueError, match="differ from the inversion's"):
        fatezero_edit(unet, torch.zeros(FRAMES, 4, 4, 4), torch.ones(2, 77, 8), scheduler, 4, idle_controller(4), 7.5,
                      inverted_timesteps=inversion_timesteps(scheduler, 5).tolist())  # fmt: skip
    assert unet.calls == 0

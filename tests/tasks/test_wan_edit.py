"""Editing on Wan's tiny bundles, stage by stage: the inversion's stored times, the window chain of both edits, resume
after a kill, VACE's structure from the stored depth, and the guards that refuse before any model loads."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler

from reelflow.core.frames import to_model_range
from reelflow.core.guidance.structure import structure_level
from reelflow.core.models import FAMILIES, load_model
from reelflow.core.sources import read_image
from reelflow.core.synthetic import write_edited_first_frame
from reelflow.core.tiny_depth import build_tiny_depth_anything
from reelflow.core.tiny_wan import build_tiny_wan22_i2v, build_tiny_wan_vace
from reelflow.core.wan import WanVelocity
from reelflow.deployments import spec_path
from reelflow.flows.dag import plan_run
from reelflow.flows.edit import prepare_run
from reelflow.schemas.calls import SourceRef, StoreSpec
from reelflow.schemas.errors import SpecError
from reelflow.schemas.kinds import VideoFrames
from reelflow.schemas.loading import load_spec
from reelflow.schemas.settings import Settings
from reelflow.storage.keys import content_key
from reelflow.storage.store import ArtifactStore
from reelflow.tasks import task_for
from reelflow.tasks import wan_edit
from reelflow.tasks.propagation import resize_like
from reelflow.tasks.wan import decode_window

FRAMES, STEPS = 8, 6  # windows of 5 frames sharing one: (0, 5) and (3, 8), the last moved back to end at frame 8
SPANS = [(0, 5), (3, 8)]
SMALL = (f"stages.decode_video.params.num_frames={FRAMES}", "stages.decode_video.params.width=64",
         "stages.decode_video.params.height=48", "stages.encode_latents.params.window=5")  # fmt: skip


@pytest.fixture(scope="module")
def edit(clip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("edits") / "clip.edit.png"
    write_edited_first_frame(clip, path)
    return path


@pytest.fixture(scope="module")
def vace_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return build_tiny_wan_vace(root / "tiny-wan-vace"), build_tiny_depth_anything(root / "depth")


def propagate_spec(wan: Path, edit: Path, *extra: str):
    return load_spec(spec_path("videoshop-wan"), [f"models.wan.id={wan}", f"models.wan_vae.id={wan}", f"sources.edited_frame.path={edit}",
                                                  *SMALL, f"stages.invert_latents.params.num_steps={STEPS}", *extra])  # fmt: skip


def vace_spec(models: tuple[Path, Path], *extra: str):
    vace, depth = models
    return load_spec(spec_path("gen1-vace"), [f"models.vace.id={vace}", f"models.vace_vae.id={vace}", f"models.depth.id={depth}",
                                              "sources={}", "stages.denoise_latents.sources={}", *SMALL,
                                              "stages.denoise_latents.params.num_steps=4", *extra])  # fmt: skip


def plan(spec, clip: Path, store_url: str, edit: Path | None = None) -> dict:
    fs = fsspec.filesystem("file")
    sources = {"video": SourceRef(url=str(clip), key=content_key(fs, str(clip)))}
    if edit is not None:
        sources["edited_frame"] = SourceRef(url=str(edit), key=content_key(fs, str(edit)), kind="image")
    planned = plan_run(spec, sources=sources, store=StoreSpec(url=store_url), run_id="run", default_dtype="float32")
    return {p.id: p for p in planned}


def run(stages: dict, *ids: str) -> dict:
    return {sid: task_for(stages[sid].call.stage).fn(call=stages[sid].call) for sid in ids or stages}


PROPAGATE = ("decode_video", "encode_latents", "embed_content", "invert_latents", "denoise_latents")
VACE = ("decode_video", "encode_latents", "estimate_depth", "embed_content", "denoise_latents")


@pytest.fixture(scope="module")
def propagated(clip: Path, tiny_wan: Path, edit: Path, tmp_path_factory: pytest.TempPathFactory):
    store_url = str(tmp_path_factory.mktemp("wan") / "store")
    stages = plan(propagate_spec(tiny_wan, edit), clip, store_url, edit)
    refs = run(stages, *PROPAGATE)
    store = ArtifactStore(store_url)
    return {sid: store.open(ref.stage, ref.key) for sid, ref in refs.items()}, stages, store_url


def test_the_inversion_stores_the_schedulers_own_times_and_the_edit_starts_where_it_ends(propagated, tiny_wan: Path) -> None:
    groups, _, _ = propagated
    inversion, latents = groups["invert_latents"], groups["encode_latents"]
    scheduler = UniPCMultistepScheduler.from_pretrained(tiny_wan, subfolder="scheduler")
    scheduler.set_timesteps(STEPS)
    sigmas, timesteps = scheduler.sigmas.tolist(), scheduler.timesteps.tolist()
    climbed = int(STEPS * 0.6)  # the preset's strength
    assert inversion.attrs["sigmas"] == pytest.approx([sigmas[STEPS - i] for i in range(climbed + 1)], abs=0)
    assert inversion.attrs["timesteps"] == pytest.approx([0.0] + [timesteps[STEPS - i] for i in range(1, climbed + 1)], abs=0)
    assert inversion["steps"].shape == (2, climbed + 1, 2, 16, 6, 8) and latents["latents"].shape == (2, 2, 16, 6, 8)
    np.testing.assert_array_equal(inversion["steps"][:, 0], latents["latents"][:])  # level 0: the clean latents
    assert [tuple(span) for span in latents.attrs["windows"]["spans"]] == SPANS
    start = groups["denoise_latents"].attrs["start_sigma"]
    assert start == inversion.attrs["sigmas"][-1] == sigmas[STEPS - climbed]


def test_each_window_is_conditioned_on_the_previous_windows_edited_frame(
    propagated, clip: Path, tiny_wan: Path, edit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups, _, _ = propagated
    stages = plan(propagate_spec(tiny_wan, edit), clip, str(tmp_path / "store"), edit)
    run(stages, *PROPAGATE[:-1])
    seen: list[np.ndarray] = []
    original = wan_edit._Wan.i2v
    monkeypatch.setattr(wan_edit._Wan, "i2v", lambda self, image, frames: seen.append(image) or original(self, image, frames))
    ref = run(stages, "denoise_latents")["denoise_latents"]
    edited = ArtifactStore(str(tmp_path / "store")).open(ref.stage, ref.key)
    assert edited["frames"].shape == (FRAMES, 48, 64, 3)  # the clip's own frame count
    assert len(seen) == 2
    with open(edit, "rb") as handle:
        given, _ = resize_like(read_image("image", handle), VideoFrames.read(groups["decode_video"].attrs))
    np.testing.assert_array_equal(seen[0], given)  # window 0: the user's edited frame, resized like the video
    np.testing.assert_array_equal(edited["condition_frames"][0], given)
    vae = load_model(str(tiny_wan), family="diffusers", component="vae")
    first_window = decode_window(vae, torch.from_numpy(np.asarray(edited["window_latents"][0])), 5, False)
    np.testing.assert_array_equal(seen[1], first_window[SPANS[1][0]])  # window 0's output at window 1's first frame
    np.testing.assert_array_equal(edited["condition_frames"][1], seen[1])
    np.testing.assert_array_equal(edited["frames"][:], groups["denoise_latents"]["frames"][:])


def test_a_kill_between_windows_computes_only_the_missing_windows(
    propagated, clip: Path, tiny_wan: Path, edit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups, _, _ = propagated
    store_url = str(tmp_path / "store")
    stages = plan(propagate_spec(tiny_wan, edit), clip, store_url, edit)
    run(stages, *PROPAGATE[:-1])
    calls: list[int] = []
    original = wan_edit.generate

    def killed_in_window_one(*args, **kwargs):
        calls.append(len(calls))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # not retried, as a SIGKILL would not be
        return original(*args, **kwargs)

    monkeypatch.setattr(wan_edit, "generate", killed_in_window_one)
    with pytest.raises(KeyboardInterrupt):
        run(stages, "denoise_latents")
    ref = run(stages, "denoise_latents")["denoise_latents"]
    assert len(calls) == 3  # window 0 once, window 1 twice
    group = ArtifactStore(store_url).open(ref.stage, ref.key)
    assert group.attrs["windows"]["computed"] == [1]
    assert group.attrs["provenance"]["resumed_parts"] == ["window-0"]
    np.testing.assert_array_equal(group["frames"][:], groups["denoise_latents"]["frames"][:])


def test_a_killed_inversion_resumes_from_its_last_step(
    propagated, clip: Path, tiny_wan: Path, edit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups, _, _ = propagated
    store_url = str(tmp_path / "store")
    stages = plan(propagate_spec(tiny_wan, edit), clip, store_url, edit)
    run(stages, *PROPAGATE[:3])
    steps: list[int] = []
    original = wan_edit.invert

    def killed_in_window_one(*args, on_step, resume=None, **kwargs):
        def step(i, sigma, x):
            on_step(i, sigma, x)
            steps.append(i)
            if len(steps) == 4:  # window 0's three steps and the first of window 1
                raise KeyboardInterrupt("killed")

        return original(*args, on_step=step, resume=resume, **kwargs)

    monkeypatch.setattr(wan_edit, "invert", killed_in_window_one)
    with pytest.raises(KeyboardInterrupt):
        run(stages, "invert_latents")
    ref = run(stages, "invert_latents")["invert_latents"]
    assert steps == [0, 1, 2, 0, 1, 2]  # window 1 resumed at its second step
    group = ArtifactStore(store_url).open(ref.stage, ref.key)
    np.testing.assert_array_equal(group["steps"][:], groups["invert_latents"]["steps"][:])


def test_vace_reads_the_stored_depth_at_t_s_and_each_window_gets_the_previous_ones_frames(
    vace_models, clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_url = str(tmp_path / "store")
    stages = plan(vace_spec(vace_models, "stages.denoise_latents.params.t_s=2"), clip, store_url)
    refs = run(stages, *VACE[:-1])
    controls: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = wan_edit.vace_control
    monkeypatch.setattr(wan_edit, "vace_control", lambda vae, video, mask, reference=None: controls.append((video, mask))
                        or original(vae, video, mask, reference))  # fmt: skip
    ref = run(stages, "denoise_latents")["denoise_latents"]
    store = ArtifactStore(store_url)
    edited, depth = store.open(ref.stage, ref.key), store.open("estimate_depth", refs["estimate_depth"].key)["depth"][:]
    expected = structure_level(torch.from_numpy(np.asarray(depth, np.float32)), 2).clamp(0, 1).numpy()
    np.testing.assert_array_equal(edited["structure"][:], expected)  # depth at the frames' size: t_s applied, no more
    assert not np.array_equal(expected, depth)
    for (start, stop), (video, mask) in zip(SPANS, controls):
        head = 0 if start == 0 else SPANS[0][1] - start
        np.testing.assert_allclose(video[0, 0, head:].numpy(), expected[start + head : stop] * 2 - 1, atol=1e-6)
        assert (video[0, 0] == video[0, 2]).all() or head  # a grey video where it generates
        assert (mask[0, 0, :head] == 0).all() and (mask[0, 0, head:] == 1).all()
    frames = np.asarray(edited["frames"][:])
    head = SPANS[0][1] - SPANS[1][0]
    window_zero = decode_window(load_model(str(vace_models[0]), family="diffusers", component="vae"),
                                torch.from_numpy(np.asarray(edited["window_latents"][0])), 5, False)  # fmt: skip
    np.testing.assert_allclose(controls[1][0][0, :, :head].numpy(), to_model_range(window_zero[SPANS[1][0] :]).transpose(0, 1).numpy(),
                               atol=1e-6)  # fmt: skip
    assert frames.shape == (FRAMES, 48, 64, 3)
    # A t_s sweep: the depth (and the latents, the prompt) are the same artifacts; only the edit is new.
    other = plan(vace_spec(vace_models, "stages.denoise_latents.params.t_s=0"), clip, store_url)
    assert all(other[s].call.key == stages[s].call.key for s in VACE[:-1])
    assert other["denoise_latents"].call.key != stages["denoise_latents"].call.key


def test_vace_with_a_reference_image_and_a_mask_keeps_the_source_outside_it(
    vace_models, clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    reference, mask = tmp_path / "reference.png", tmp_path / "mask.png"
    Image.new("RGB", (32, 40), (200, 120, 40)).save(reference)
    pixels = np.zeros((48, 64), np.uint8)
    pixels[:, 32:] = 255  # edit the right half
    Image.fromarray(pixels).save(mask)
    spec = vace_spec(vace_models, "stages.decode_video.params.num_frames=5", "stages.encode_latents.params.window=null",
                     f"sources={{reference: {{kind: image, path: {reference}}}, mask: {{kind: mask, path: {mask}}}}}",
                     "stages.denoise_latents.sources={reference: reference, mask: mask}")  # fmt: skip
    fs = fsspec.filesystem("file")
    sources = {"video": SourceRef(url=str(clip), key=content_key(fs, str(clip))),
               "reference": SourceRef(url=str(reference), key=content_key(fs, str(reference)), kind="image"),
               "mask": SourceRef(url=str(mask), key=content_key(fs, str(mask)), kind="mask")}  # fmt: skip
    planned = {p.id: p for p in plan_run(spec, sources=sources, store=StoreSpec(url=str(tmp_path / "store")), run_id="run",
                                         default_dtype="float32")}  # fmt: skip
    run(planned, *VACE[:-1])
    controls: list[torch.Tensor] = []
    original = wan_edit.vace_control
    monkeypatch.setattr(wan_edit, "vace_control", lambda vae, video, m, ref=None: controls.append((video, m, ref))
                        or original(vae, video, m, ref))  # fmt: skip
    ref = run(planned, "denoise_latents")["denoise_latents"]
    video, generate_mask, image = controls[0]
    source = ArtifactStore(str(tmp_path / "store")).open("decode_video", planned["decode_video"].call.key)["frames"][:]
    assert (generate_mask[..., :32] == 0).all() and (generate_mask[..., 32:] == 1).all()
    np.testing.assert_allclose(video[0, :, :, :, :32].numpy(), to_model_range(source).transpose(0, 1)[:, :, :, :32].numpy())
    assert image.shape == (1, 3, 48, 64) and (image[0, :, 0, 0] == 1).all()  # fitted, centred on white
    group = ArtifactStore(str(tmp_path / "store")).open(ref.stage, ref.key)
    assert group["window_latents"].shape == (1, 2, 16, 6, 8) and group.attrs["reference"] and group.attrs["mask"]


def test_wan_2_2s_two_experts_take_the_steps_on_either_side_of_the_boundary(
    clip: Path, edit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_tiny_wan22_i2v(tmp_path / "tiny-wan22")
    stages = plan(propagate_spec(model, edit, "stages.invert_latents.params.strength=1.0"), clip, str(tmp_path / "store"), edit)
    run(stages, *PROPAGATE[:3])
    asked: list[tuple[float, str]] = []
    original = WanVelocity.__call__

    def spy(self, x, sigma, timestep):
        asked.append((timestep, id(self.transformer)))
        return original(self, x, sigma, timestep)

    monkeypatch.setattr(WanVelocity, "__call__", spy)
    run(stages, "invert_latents")
    by_expert: dict[int, set[float]] = {}
    for timestep, expert in asked:
        by_expert.setdefault(expert, set()).add(timestep)
    assert len(asked) == 2 * STEPS and len(by_expert) == 2  # two windows, every step; two transformers asked
    high, low = sorted(by_expert.values(), key=max, reverse=True)
    assert min(high) >= 900 > max(low)  # boundary_ratio 0.9 of 1000 training timesteps


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the guards ran")

    monkeypatch.setattr(FAMILIES["diffusers"], "load", refuse)


def test_a_checkpoint_of_the_wrong_kind_is_refused_before_loading(
    vace_models, tiny_wan: Path, clip: Path, edit: Path, tmp_path: Path, no_model_loads
) -> None:
    given = [f"input={clip}", f"store={tmp_path / 'store'}", f"output={tmp_path / 'out'}"]
    spec = propagate_spec(vace_models[0], edit, *given)
    with pytest.raises(SpecError, match=r"method flowmatch needs an I2V transformer, but this model's is VACE "
                                        r"\(WanVACETransformer3DModel\); use an image-to-video bundle"):  # fmt: skip
        prepare_run(spec, Settings())
    spec = vace_spec((tiny_wan, vace_models[1]), *given)
    with pytest.raises(SpecError, match=r"method vace needs a VACE transformer, but this model's is I2V"):
        prepare_run(spec, Settings())
    spec = propagate_spec(tiny_wan, edit, *given, "stages.denoise_latents.params.guidance_scale_2=3")
    with pytest.raises(SpecError, match="guidance_scale_2 guides Wan 2.2 A14B's low-noise expert, but this bundle has one"):
        prepare_run(spec, Settings())


def test_windows_wan_cannot_take_are_refused_when_the_spec_loads(tiny_wan: Path, edit: Path) -> None:
    with pytest.raises(SpecError, match=r"window 6 is not 4k\+1 frames, which Wan takes; use 5 or 9"):
        propagate_spec(tiny_wan, edit, "stages.encode_latents.params.window=6")
    with pytest.raises(SpecError, match="extrapolate is Videoshop's proxy for the Euler step"):
        propagate_spec(tiny_wan, edit, "stages.invert_latents.params.solver=heun")

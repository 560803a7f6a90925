"""Cross-frame attention processor and controller hooks on a tiny UNet and on single Attention layers."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from reelflow.core.attention.processor import (
    FrameAttnProcessor,
    frame_indices,
    install_frame_processors,
    restore_default_processors,
    set_cross_frame,
    set_num_frames,
)

FRAMES, TEXT_LEN, TEXT_DIM, HEADS = 4, 7, 32, 4
ATOL = 1e-5


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    # 8x8 latents: 32-channel attention at 8x8 (Nq 64), 64-channel mid block at 4x4 (Nq 16).
    model = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=HEADS,
        norm_num_groups=8,
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return model.eval()


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def latents() -> torch.Tensor:
    return _randn(FRAMES, 4, 8, 8, seed=1)


@pytest.fixture(scope="module")
def text() -> torch.Tensor:
    return _randn(1, TEXT_LEN, TEXT_DIM, seed=2).expand(FRAMES, -1, -1)


@torch.no_grad()
def run(
    unet: UNet2DConditionModel, latents: torch.Tensor, text: torch.Tensor, num_frames: int, **install: object
) -> torch.Tensor:
    """UNet output ``(B*F, 4, 8, 8)`` with freshly installed frame processors."""
    install_frame_processors(unet, **install)
    set_num_frames(unet, num_frames)
    return unet(latents, 500, encoder_hidden_states=text).sample


@torch.no_grad()
def run_stock(unet: UNet2DConditionModel, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    restore_default_processors(unet)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    return unet(latents, 500, encoder_hidden_states=text).sample


class Identity:
    def wants(self, layer: str, is_cross: bool, query_len: int) -> bool:
        return True

    def __call__(self, probs: torch.Tensor, *, layer: str, is_cross: bool, num_frames: int) -> torch.Tensor:
        return probs


class Recorder:
    """Records what it sees; asks only for the layers ``select`` accepts."""

    def __init__(self, select=lambda layer, is_cross, query_len: True) -> None:
        self.select = select
        self.asked: list[tuple[str, bool, int]] = []
        self.seen: list[tuple[str, bool, int, tuple[int, ...], float]] = []

    def wants(self, layer: str, is_cross: bool, query_len: int) -> bool:
        self.asked.append((layer, is_cross, query_len))
        return self.select(layer, is_cross, query_len)

    def __call__(self, probs: torch.Tensor, *, layer: str, is_cross: bool, num_frames: int) -> torch.Tensor:
        row_error = (probs.sum(-1) - 1).abs().max().item()
        self.seen.append((layer, is_cross, num_frames, tuple(probs.shape), row_error))
        return probs


class Uniform:
    def wants(self, layer: str, is_cross: bool, query_len: int) -> bool:
        return not is_cross

    def __call__(self, probs: torch.Tensor, *, layer: str, is_cross: bool, num_frames: int) -> torch.Tensor:
        return torch.full_like(probs, 1.0 / probs.shape[-1])


# Processor equivalences


def test_identity_controller_equals_stock_and_sdpa_paths(unet, latents, text) -> None:
    stock = run_stock(unet, latents, text)
    sdpa = run(unet, latents, text, FRAMES)
    explicit = run(unet, latents, text, FRAMES, controller=Identity())
    torch.testing.assert_close(sdpa, stock, atol=ATOL, rtol=0)
    torch.testing.assert_close(explicit, stock, atol=ATOL, rtol=0)
    # Also with gathered keys: explicit probabilities and SDPA agree.
    cross_sdpa = run(unet, latents, text, FRAMES, frame_keys=("self", "mid"))
    cross_explicit = run(unet, latents, text, FRAMES, frame_keys=("self", "mid"), controller=Identity())
    torch.testing.assert_close(cross_explicit, cross_sdpa, atol=ATOL, rtol=0)
    assert torch.allclose(run_stock(unet, latents, text), stock, atol=ATOL, rtol=0)


@pytest.mark.parametrize("frame_keys", [("mid",), ("self", "mid"), ("first", -1)])
def test_single_frame_or_identical_frames_equal_per_frame(unet, latents, text, frame_keys) -> None:
    single = latents[:1]
    per_frame = run(unet, single, text[:1], 1)
    torch.testing.assert_close(run(unet, single, text[:1], 1, frame_keys=frame_keys), per_frame, atol=ATOL, rtol=0)

    same = single.expand(FRAMES, -1, -1, -1)
    per_frame = run(unet, same, text, FRAMES)
    torch.testing.assert_close(run(unet, same, text, FRAMES, frame_keys=frame_keys), per_frame, atol=ATOL, rtol=0)


def test_mid_keys_change_other_frames_but_not_the_mid_frame(unet, latents, text) -> None:
    per_frame = run(unet, latents, text, FRAMES)
    mid = run(unet, latents, text, FRAMES, frame_keys=("mid",))
    m = (FRAMES - 1) // 2
    # The mid frame attends only to itself at every layer, and the rest of the UNet is per-image.
    torch.testing.assert_close(mid[m], per_frame[m], atol=ATOL, rtol=0)
    others = [i for i in range(FRAMES) if i != m]
    assert (mid[others] - per_frame[others]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


# Single Attention layer against a reference built from the stock processor


def test_frame_indices_table() -> None:
    table = frame_indices(("self", "first", "last", "mid", "previous", 1, -2), 4)
    expected = [
        [0, 0, 3, 1, 0, 1, 0],
        [1, 0, 3, 1, 0, 2, 0],
        [2, 0, 3, 1, 1, 3, 0],
        [3, 0, 3, 1, 2, 3, 1],
    ]
    assert table.tolist() == expected
    assert frame_indices(("mid",), 5).flatten().tolist() == [2] * 5


@pytest.mark.parametrize(
    ("frame_keys", "keys_of"),
    [
        (("mid",), lambda i: [1]),
        (("self", "mid"), lambda i: [i, 1]),
        (("previous", "first"), lambda i: [max(i - 1, 0), 0]),
        ((1, "last"), lambda i: [min(i + 1, 3), 3]),
    ],
)
@pytest.mark.parametrize("controller", [None, Identity()])
def test_single_layer_matches_stock_attention_on_concatenated_key_frames(frame_keys, keys_of, controller) -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    batch = 2  # CFG-like: two clips of 4 frames
    x = _randn(batch * 4, 5, 16, seed=3)
    processor = FrameAttnProcessor("layer", frame_keys, controller)
    processor.num_frames = 4
    with torch.no_grad():
        out = processor(attn, x)
        for b in range(batch):
            for i in range(4):
                context = torch.cat([x[b * 4 + j] for j in keys_of(i)], dim=0)[None]
                ref = AttnProcessor2_0()(attn, x[b * 4 + i][None], encoder_hidden_states=context)
                torch.testing.assert_close(out[b * 4 + i], ref[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("controller", [None, Identity()])
def test_masked_cross_attention_matches_stock_and_ignores_frame_keys(controller) -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    x, text = _randn(4, 5, 16, seed=7), _randn(4, 6, 12, seed=8)
    # Additive bias hiding the last two text tokens, the form UNet2DConditionModel builds from a 0/1 mask.
    mask = torch.zeros(4, 1, 6)
    mask[..., -2:] = -10000.0
    processor = FrameAttnProcessor("layer", ("mid",), controller)
    processor.num_frames = 4
    with torch.no_grad():
        out = processor(attn, x, encoder_hidden_states=text, attention_mask=mask)
        ref = AttnProcessor2_0()(attn, x, encoder_hidden_states=text, attention_mask=mask)
        unmasked = AttnProcessor2_0()(attn, x, encoder_hidden_states=text)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert (ref - unmasked).abs().max() > 1e-3


def test_controller_probs_list_key_frames_in_frame_keys_order() -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = _randn(3, 5, 16, seed=6)
    captured = []

    class Capture(Identity):
        def __call__(self, probs, **kwargs):
            captured.append(probs)
            return probs

    processor = FrameAttnProcessor("layer", ("self", "last"), Capture())
    processor.num_frames = 3
    with torch.no_grad():
        processor(attn, x)
        for i in range(3):
            context = torch.cat([x[i], x[2]])[None]
            query = attn.head_to_batch_dim(attn.to_q(x[i][None]))
            key = attn.head_to_batch_dim(attn.to_k(context))
            torch.testing.assert_close(captured[0][i], attn.get_attention_scores(query, key), atol=ATOL, rtol=0)


def test_processor_rejects_bad_keys_missing_frames_and_ragged_batches() -> None:
    with pytest.raises(ValueError, match="valid"):
        FrameAttnProcessor("layer", ("middle",))
    with pytest.raises(ValueError, match="valid"):
        FrameAttnProcessor("layer", (True,))
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    processor = FrameAttnProcessor("layer", ("mid",))
    with pytest.raises(RuntimeError, match="set_num_frames"):
        processor(attn, torch.zeros(4, 5, 16))
    processor.num_frames = 3
    with pytest.raises(ValueError, match="whole number"):
        processor(attn, torch.zeros(4, 5, 16))


# Controller hooks


def _layer_channels(unet: UNet2DConditionModel, layer: str) -> int:
    return unet.get_submodule(layer).to_q.in_features


def test_controller_sees_normalised_probs_of_the_expected_shapes(unet, latents, text) -> None:
    recorder = Recorder()
    processors = run_and_get(unet, latents, text, frame_keys=("self", "mid"), controller=recorder)
    assert len(processors) == 8 and len(recorder.seen) == 8
    for layer, is_cross, num_frames, shape, row_error in recorder.seen:
        batch, heads, query_len, key_len = shape
        assert (batch, heads, num_frames) == (FRAMES, HEADS, FRAMES)
        assert query_len in (64, 16)
        assert key_len == (TEXT_LEN if is_cross else 2 * query_len)
        assert is_cross == layer.endswith("attn2")
        assert row_error < 1e-5


def run_and_get(unet, latents, text, **install: object) -> dict[str, FrameAttnProcessor]:
    processors = install_frame_processors(unet, **install)
    set_num_frames(unet, FRAMES)
    with torch.no_grad():
        unet(latents, 500, encoder_hidden_states=text)
    return processors


def test_unwanted_layers_stay_on_sdpa(unet, latents, text, monkeypatch) -> None:
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    # Like FateZero's store: only maps with few query tokens, and only self-attention.
    recorder = Recorder(lambda layer, is_cross, query_len: query_len <= 16 and not is_cross)
    run_and_get(unet, latents, text, frame_keys=("mid",), controller=recorder)
    assert len(recorder.asked) == 8
    assert [seen[0] for seen in recorder.seen] == ["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert len(calls) == 7


def test_editing_controller_changes_output(unet, latents, text) -> None:
    plain = run(unet, latents, text, FRAMES, frame_keys=("mid",), controller=Identity())
    edited = run(unet, latents, text, FRAMES, frame_keys=("mid",), controller=Uniform())
    assert (edited - plain).abs().max() > 1e-3


@pytest.mark.parametrize("controller", [None, Uniform()])
def test_cfg_batch_gathers_frames_within_each_batch_element(unet, controller) -> None:
    clips = _randn(2 * FRAMES, 4, 8, 8, seed=4)  # [uncond frames; cond frames], all distinct
    prompts = _randn(2, TEXT_LEN, TEXT_DIM, seed=5).repeat_interleave(FRAMES, dim=0)
    keys = dict(frame_keys=("self", "mid"), controller=controller)
    both = run(unet, clips, prompts, FRAMES, **keys)
    halves = [run(unet, clips[s], prompts[s], FRAMES, **keys) for s in (slice(0, FRAMES), slice(FRAMES, None))]
    torch.testing.assert_close(both, torch.cat(halves), atol=ATOL, rtol=0)
    # Taken as one 8-frame clip, the gathering would mix the halves: the test can tell.
    assert (run(unet, clips, prompts, 2 * FRAMES, **keys) - both).abs().max() > 1e-3


# Installation


def test_min_channels_keeps_narrow_self_attention_per_frame(unet, latents, text) -> None:
    processors = install_frame_processors(unet, frame_keys=("self", "mid"), min_channels=64)
    for layer, processor in processors.items():
        wide = _layer_channels(unet, layer) >= 64
        cross_frame = layer.endswith("attn1") and wide
        assert processor.frame_keys == (("self", "mid") if cross_frame else ())
    assert [layer for layer, p in processors.items() if p.frame_keys] == [
        "mid_block.attentions.0.transformer_blocks.0.attn1"
    ]

    recorder = Recorder()
    run_and_get(unet, latents, text, frame_keys=("self", "mid"), min_channels=64, controller=recorder)
    for layer, is_cross, _, (_, _, query_len, key_len), _ in recorder.seen:
        if not is_cross:
            assert key_len == (2 * query_len if _layer_channels(unet, layer) >= 64 else query_len)

    # Every layer below the threshold: plain per-frame attention.
    per_frame = run(unet, latents, text, FRAMES)
    torch.testing.assert_close(run(unet, latents, text, FRAMES, frame_keys=("mid",), min_channels=65), per_frame)


def test_install_covers_every_attention_layer_and_restore_puts_back_sdpa(unet) -> None:
    restore_default_processors(unet)
    processors = install_frame_processors(unet, frame_keys=("mid",))
    names = {name.removesuffix(".processor") for name in unet.attn_processors}
    assert set(processors) == names
    assert all(unet.attn_processors[f"{layer}.processor"] is p for layer, p in processors.items())
    restore_default_processors(unet)
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


@torch.no_grad()
def test_image_mode_is_per_frame_attention_and_video_mode_reads_the_key_frames(unet, latents, text) -> None:
    """Gen-1's two modes from one installation: set_cross_frame switches without reinstalling."""
    stock = run_stock(unet, latents, text)
    video = run(unet, latents, text, FRAMES, frame_keys=("self", "first"))
    set_cross_frame(unet, False)
    image = unet(latents, 500, encoder_hidden_states=text).sample
    set_cross_frame(unet, True)
    again = unet(latents, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(image, stock, atol=ATOL, rtol=0)
    torch.testing.assert_close(again, video, atol=0, rtol=0)
    assert not torch.allclose(video[1:], stock[1:], atol=1e-3)


def test_cross_attention_processors_can_be_left_alone(unet) -> None:
    class Other(AttnProcessor2_0):
        pass

    restore_default_processors(unet)
    unet.set_attn_processor({name: Other() if name.endswith("attn2.processor") else p
                             for name, p in unet.attn_processors.items()})  # fmt: skip
    installed = install_frame_processors(unet, frame_keys=("self", "first"), cross_attention=False)
    assert installed and all(layer.endswith(".attn1") for layer in installed)
    assert all(isinstance(p, Other) for name, p in unet.attn_processors.items() if name.endswith("attn2.processor"))
    restore_default_processors(unet)

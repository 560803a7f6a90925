"""A tiny, randomly initialised Stable-Diffusion-style bundle for tests and demos.

``build_tiny_bundle(dir)`` writes the standard diffusers layout (``model_index.json``,
``vae/``, ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, safetensors weights) so
that code under test goes through the same ``from_pretrained`` path as a real checkpoint. The
weights are random: outputs are noise, but shapes, dtypes, latent scaling and the attention layout
(self- and cross-attention in both UNet resolutions and in the mid block) match Stable Diffusion
1.5.

The bundle is a pure function of ``seed``: two builds with the same seed are byte-identical, so the
bundle's fingerprint, and every stage key derived from it, is stable across processes.

Beside it, one tiny model per other model family (``reelflow.core.models.FAMILIES``), each written
the way its library saves a real one and each a pure function of ``seed`` too: a CLIP image encoder
with projection and its image processor (transformers), a ViT (timm), and RAFT (torchvision, its
state dict pickled as ``model.pth``, as torchvision publishes checkpoints). The core method package
names every builder (``reelflow models tiny --kind``).

``build_tiny_svd(dir)`` writes a tiny random Stable Video Diffusion (image-to-video) bundle the same
way: a spatio-temporal UNet over 8 input channels (noisy latents beside the conditioning frame's
latents) with a native frame count of 4, the video VAE whose decoder mixes frames, a CLIP image
encoder whose projection is the UNet's cross-attention width, its image processor, and Euler with
SVD's published scheduler config.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from tokenizers import pre_tokenizers
from torchvision.models.optical_flow import raft_small
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from reelflow.schemas.errors import ModelError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EOW = "</w>"
MAX_LENGTH = 77
MARKER = "reelflow-tiny-bundle"

# Words a test prompt is likely to use; each becomes one token, anything else splits into pieces.
_CORPUS = """
a an the this that of in on at by with from into over under through along across near behind
and or but not is are was be being it its he she they his her their one two three four five
man woman boy girl child people person family friend crowd dancer runner rider skier surfer
cat dog horse bird fish cow sheep bear lion tiger monkey rabbit duck swan fox wolf deer panda
car van truck bus train bicycle bike motorcycle boat ship plane jeep taxi tram scooter skateboard
walking running jumping dancing swimming flying riding driving sitting standing playing eating
drinking reading singing smiling talking skating surfing skiing climbing falling turning moving
street road city town village house building bridge tower park garden forest jungle desert beach
sea ocean lake river waterfall mountain hill field farm meadow valley island cave sky cloud sun
moon star rain snow fog storm wind fire smoke water ice grass tree flower leaf rock sand stone
day night morning evening sunset sunrise winter summer spring autumn sunny rainy snowy cloudy
red orange yellow green blue purple pink brown black white gray grey golden silver dark bright
big small tall short long old young new happy sad fast slow beautiful cute wild calm colorful
painting style van gogh monet picasso ukiyo anime cartoon watercolor oil sketch pencil drawing
photo photograph photorealistic realistic cinematic vintage retro pixel art digital render
lego clay origami marble bronze wooden glass metal paper neon cyberpunk steampunk fantasy
starry impressionist expressionist abstract surreal pop comic illustration portrait landscape
high quality detailed sharp blurry lighting light shadow color texture background foreground
camera shot close wide view scene video frame motion zoom pan slow still up down left right
"""


def build_tiny_bundle(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion bundle into ``out_dir`` and return its path.

    Args:
        out_dir: Target directory. It may be missing, empty, or a tiny bundle written before (which
            is replaced); anything else is refused rather than overwritten.
        seed: Seeds every random weight; the same seed gives byte-identical files.

    Raises:
        ModelError: ``out_dir`` is a file, or a non-empty directory that is not a tiny bundle.
    """

    def write(staging: Path) -> None:
        _tiny_pipeline(seed).save_pretrained(staging, safe_serialization=True)
        _write_tokenizer_files(staging / "tokenizer")

    return _write_staged(Path(out_dir), write, _readme(seed))


def is_tiny_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`build_tiny_bundle`."""
    readme = Path(path) / "README.md"
    return readme.is_file() and MARKER in readme.read_text(errors="replace")


def _check_target(out: Path) -> None:
    if out.is_file():
        raise ModelError(f"cannot write a tiny bundle to {out}: it is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not is_tiny_bundle(out):
        raise ModelError(
            f"cannot write a tiny bundle to {out}: the directory is not empty and is not a tiny "
            "bundle; give an empty or new directory"
        )


def _tiny_pipeline(seed: int) -> StableDiffusionPipeline:
    tokenizer = tiny_tokenizer()
    return StableDiffusionPipeline(
        vae=_seeded(seed, 0, _tiny_vae),
        text_encoder=_seeded(seed, 1, lambda: _tiny_text_encoder(tokenizer)),
        tokenizer=tokenizer,
        unet=_seeded(seed, 2, tiny_unet),
        scheduler=sd15_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _seeded(seed: int, stream: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module from its own seeded stream, leaving the caller's global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        # One stream per component, so resizing one component leaves the others' weights alone.
        torch.manual_seed(seed * 1009 + stream)
        return build()


def _tiny_vae() -> AutoencoderKL:
    # Four blocks give the SD downscale of 2**(4 - 1) = 8.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    )


def tiny_unet() -> UNet2DConditionModel:
    """The bundle's UNet architecture, randomly initialised from the current torch seed."""
    # SD-era configs read attention_head_dim as the head count: 4 heads of 8, then of 16 channels.
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def _tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def sd15_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion 1.5's scheduler config."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with a BPE vocabulary trained on the built-in corpus (about 1.5k tokens)."""
    vocab, merges = _corpus_bpe()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH)


@cache
def _corpus_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = train_bpe(Counter(_CORPUS.split()))
    return _clip_vocab(merges), merges


def train_bpe(word_counts: Counter[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until every word is one symbol (Sennrich et al. 2016, §3.2).

    Words end in ``</w>`` as in CLIP. Ties go to the smaller pair, so the merges never depend on
    hash order; the ``tokenizers`` trainer breaks ties by Rust hash order, which differs between
    processes and would change the bundle's fingerprint from run to run.
    """
    words = {w: [*w[:-1], w[-1] + EOW] for w in word_counts}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += word_counts[word]
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = {word: _merge(symbols, best) for word, symbols in words.items()}


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's id order: 256 byte symbols, the same with ``</w>``, one per merge, BOS, EOS."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = [*alphabet, *(c + EOW for c in alphabet), *(a + b for a, b in merges), BOS, EOS]
    vocab: dict[str, int] = {}
    for symbol in symbols:
        vocab.setdefault(symbol, len(vocab))
    return vocab


def _write_tokenizer_files(tokenizer_dir: Path) -> None:
    """Add ``vocab.json`` and ``merges.txt``, the layout SD checkpoints ship and older readers need.

    transformers 5 ``save_pretrained`` writes only ``tokenizer.json``.
    """
    vocab, merges = _corpus_bpe()
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (tokenizer_dir / "merges.txt").write_text("\n".join(lines) + "\n")


def _readme(seed: int) -> str:
    return (
        f"# Tiny random Stable Diffusion bundle ({MARKER})\n\n"
        f"Written by `reelflow.core.tiny.build_tiny_bundle(seed={seed})`. The weights are random: "
        "outputs are noise. It exists so tests and demos run the real `from_pretrained` path "
        "without a download. Do not use it for anything else.\n"
    )


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The pipeline :func:`build_tiny_bundle` writes, in memory."""
    return _tiny_pipeline(seed)


CLIP_IMAGE_SIZE = 32
TIMM_ARCHITECTURE = "vit_tiny_patch16_224"
# vit_tiny's factory shrunk: 2 blocks of width 32 over a 4x4 grid of 8-pixel patches, 10 classes.
TIMM_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}
RAFT_ARCHITECTURE = "raft_small"


def tiny_clip_vision(seed: int = 0) -> CLIPVisionModelWithProjection:
    """The CLIP image encoder :func:`build_tiny_clip_vision` writes, in memory (eval mode)."""
    return _seeded(seed, 0, lambda: _tiny_clip_vision_model(projection_dim=16)).eval()


def _tiny_clip_vision_model(*, projection_dim: int) -> CLIPVisionModelWithProjection:
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=8,
        projection_dim=projection_dim,
    )
    return CLIPVisionModelWithProjection(config)


def _tiny_clip_processor() -> CLIPImageProcessor:
    crop = {"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}
    return CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE}, crop_size=crop)


def build_tiny_clip_vision(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random CLIP image encoder with projection and its image processor.

    The directory is what ``save_pretrained`` writes for ``openai/clip-vit-*``'s vision tower:
    ``config.json``, ``model.safetensors`` and ``preprocessor_config.json``.

    Raises:
        ModelError: ``out_dir`` is a file, or a non-empty directory that is not a tiny model.
    """

    def write(staging: Path) -> None:
        tiny_clip_vision(seed).save_pretrained(staging)
        _tiny_clip_processor().save_pretrained(staging)

    return _write_staged(Path(out_dir), write, _builder_readme("CLIP image encoder", "build_tiny_clip_vision", seed))


def tiny_timm(seed: int = 0) -> torch.nn.Module:
    """The timm ViT :func:`build_tiny_timm` writes, in memory (eval mode)."""
    # timm takes about a second to import; only callers of the timm builders pay for it.
    import timm

    return _seeded(seed, 0, lambda: timm.create_model(TIMM_ARCHITECTURE, pretrained=False, **TIMM_ARGS)).eval()


def build_tiny_timm(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random timm ViT as ``timm.models.save_for_hf`` does: config.json, model.safetensors.

    Raises:
        ModelError: ``out_dir`` is a file, or a non-empty directory that is not a tiny model.
    """
    from timm.models import save_for_hf

    def write(staging: Path) -> None:
        save_for_hf(tiny_timm(seed), staging, model_args=TIMM_ARGS, safe_serialization=True)

    return _write_staged(Path(out_dir), write, _builder_readme("timm ViT", "build_tiny_timm", seed))


def tiny_raft(seed: int = 0) -> torch.nn.Module:
    """The torchvision RAFT (small) :func:`build_tiny_raft` writes, in memory (eval mode)."""
    return _seeded(seed, 0, lambda: raft_small(weights=None)).eval()


def build_tiny_raft(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random torchvision ``raft_small``: config.json and its state dict as ``model.pth``.

    Full size (about 1M parameters, 4 MB): RAFT's layout is fixed by torchvision's builder.

    Raises:
        ModelError: ``out_dir`` is a file, or a non-empty directory that is not a tiny model.
    """

    def write(staging: Path) -> None:
        config = {"library": "torchvision", "architecture": RAFT_ARCHITECTURE}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        torch.save(tiny_raft(seed).state_dict(), staging / "model.pth")

    return _write_staged(Path(out_dir), write, _builder_readme("torchvision RAFT", "build_tiny_raft", seed))


SVD_FRAMES = 4
"""The tiny SVD UNet's native frame count (``unet.config.num_frames``; 14 or 25 in the real models)."""

# stabilityai/stable-video-diffusion-img2vid(-xt) scheduler/scheduler_config.json, verbatim. The last
# three keys are not Euler parameters; diffusers keeps them in the config, as it does for the real one.
SVD_SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "v_prediction",
    "interpolation_type": "linear",
    "use_karras_sigmas": True,
    "sigma_min": 0.002,
    "sigma_max": 700.0,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
}


def build_tiny_svd(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Stable Video Diffusion bundle into ``out_dir`` and return its path.

    The layout is ``StableVideoDiffusionPipeline.save_pretrained``'s: ``model_index.json``, ``unet/``,
    ``vae/``, ``image_encoder/``, ``feature_extractor/``, ``scheduler/``, safetensors weights.

    Raises:
        ModelError: ``out_dir`` is a file, or a non-empty directory that is not a tiny model.
    """

    def write(staging: Path) -> None:
        tiny_svd_pipeline(seed).save_pretrained(staging, safe_serialization=True)

    return _write_staged(Path(out_dir), write, _builder_readme("Stable Video Diffusion bundle", "build_tiny_svd", seed))


def tiny_svd_pipeline(seed: int = 0) -> StableVideoDiffusionPipeline:
    """The pipeline :func:`build_tiny_svd` writes, in memory."""
    return StableVideoDiffusionPipeline(
        vae=_seeded(seed, 0, _tiny_svd_vae),
        image_encoder=_seeded(seed, 1, lambda: _tiny_clip_vision_model(projection_dim=32)),
        unet=_seeded(seed, 2, _tiny_svd_unet),
        scheduler=svd_scheduler(),
        feature_extractor=_tiny_clip_processor(),
    )


def _tiny_svd_vae() -> AutoencoderKLTemporalDecoder:
    # Four blocks give SVD's downscale of 8; the temporal decoder's group norms fix 32 groups, so
    # 32 channels per block is the narrowest it builds with.
    return AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.18215,
    )


def _tiny_svd_unet() -> UNetSpatioTemporalConditionModel:
    # SVD's layout shrunk to two levels: 8 input channels (noisy latents, conditioning-frame latents),
    # spatial and temporal attention at the first level and in the mid block, heads of 16 channels
    # at every level (SVD's are 64), and added time ids (fps, motion bucket, noise augmentation) of
    # 3 x 32 features.
    return UNetSpatioTemporalConditionModel(
        sample_size=32,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=3 * 32,
        layers_per_block=1,
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        num_frames=SVD_FRAMES,
    )


def svd_scheduler() -> EulerDiscreteScheduler:
    """Euler with Stable Video Diffusion's published scheduler config (:data:`SVD_SCHEDULER_CONFIG`)."""
    return EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG)


def _write_staged(out: Path, write: Callable[[Path], None], readme: str) -> Path:
    """Run ``write`` on a staging sibling of ``out``, add ``readme``, then swap it in: a crash never leaves
    a half-written model that looks whole."""
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()
    try:
        write(staging)
        (staging / "README.md").write_text(readme)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _builder_readme(what: str, builder: str, seed: int, module: str = "reelflow.core.tiny") -> str:
    return (
        f"# Tiny random {what} ({MARKER})\n\n"
        f"Written by `{module}.{builder}(seed={seed})`. The weights are random. It "
        "exists so tests run the real loading path without a download.\n"
    )


class PoolingVae:
    """A stand-in VAE that round-trips, for checks of how colour travels through a pipeline (the tiny
    random VAEs do not: their decoded colours do not follow their latents). Latents are the frame
    averaged over 8x8 blocks, RGB and grey in [-1, 1]; decoding upsamples the RGB back. It has the
    interface reelflow's VAE code uses (``encode(...).latent_dist.mode()``, ``decode(...).sample``,
    ``config``, ``device``, ``dtype``); it holds no weights and is never saved.
    """

    config = SimpleNamespace(scaling_factor=1.0, shift_factor=None, block_out_channels=(1, 1, 1, 1), latent_channels=4)
    device, dtype = torch.device("cpu"), torch.float32

    def encode(self, pixels: torch.Tensor) -> SimpleNamespace:
        pooled = torch.nn.functional.avg_pool2d(pixels.float(), 8)
        latents = torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: latents))

    def decode(self, latents: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=torch.nn.functional.interpolate(latents[:, :3].float(), scale_factor=8))

"""Stages by (stage, method), typed artifact kinds, models by role and named sources in the spec."""

from __future__ import annotations

import pytest
import yaml

from reelflow.deployments import spec_path
from reelflow.schemas.errors import GraphError, SpecError
from reelflow.schemas.fatezero import DdimAttentionInversion, InvertLatents
from reelflow.schemas.kinds import KINDS, Attrs
from reelflow.schemas.loading import load_spec
from reelflow.schemas.stages import STAGE_TYPES

TINY = "models.sd.id=tiny"


def fatezero_raw() -> dict:
    return yaml.safe_load(spec_path("fatezero-style").read_text())


def test_stages_are_keyed_by_stage_and_method() -> None:
    assert STAGE_TYPES[("invert_latents", "fatezero")] is InvertLatents
    assert ("decode_video", None) in STAGE_TYPES
    spec = load_spec(fatezero_raw())
    assert spec.graph.nodes["invert_latents"].spec.tag == "invert_latents:fatezero"


def test_a_stage_with_one_implementation_needs_no_method_tag_and_one_with_several_does(monkeypatch) -> None:
    from reelflow.schemas import pipeline

    raw = load_spec(spec_path("videoshop")).model_dump(mode="json", exclude_unset=True)
    entry = next(stage for stage in raw["stages"] if stage["stage"] == "embed_content")
    del entry["method"]
    with pytest.raises(GraphError, match=r"stage 'embed_content' has several methods \('clip_text', 'image', 'ip_adapter', 'reference', 'text', 'wan_text'\); set `method:`"):
        load_spec(raw)
    # With one implementation left, the tag is implied.
    only = {key: cls for key, cls in STAGE_TYPES.items() if key[0] != "embed_content" or key[1] == "image"}
    monkeypatch.setattr(pipeline, "STAGE_TYPES", only)
    monkeypatch.setattr("reelflow.schemas.stages.STAGE_TYPES", only)
    assert pipeline._tag_of(entry) == "embed_content:image"


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("stages.invert_latents.method=videoshopp", ["no method 'videoshopp'", "its methods: 'fatezero', 'flowmatch', 'gen1', 'gen1_controlnet', 'videoshop'"]),
        ("stages.decode_video.method=fast", ["stage 'decode_video' has no method 'fast'", "leave `method` out"]),
        ("stages.invert_latents.stage=invert_latent", ["'invert_latent' is not a stage", "'invert_latents'"]),
    ],
)
def test_unknown_stage_or_method_names_the_valid_ones(override: str, fragments: list[str]) -> None:
    with pytest.raises(GraphError) as info:
        load_spec(fatezero_raw(), [override])
    for fragment in fragments:
        assert fragment in str(info.value)


def test_wiring_the_wrong_artifact_kind_names_both_stages() -> None:
    with pytest.raises(GraphError) as info:
        load_spec(fatezero_raw(), ["stages.decode_latents.inputs.latents=invert_latents"])
    message = str(info.value)
    assert "'decode_latents' (decode_latents) input 'latents' needs latents" in message
    assert "'invert_latents' (invert_latents:fatezero) produces inversion/ddim-attention" in message


def test_the_inversion_kind_carries_its_attrs_model() -> None:
    kind = KINDS[InvertLatents.produces]
    assert kind.attrs is DdimAttentionInversion and issubclass(kind.attrs, Attrs)
    attrs = {"source_prompt": "a cat", "num_steps": 2, "timesteps": [1, 501], "recorded_steps": [1],
             "recorded_cross_steps": [1], "recorded_self_steps": [1], "frame_keys": ["mid"], "min_channels": 0,
             "layers": {"up.attn1": {"is_cross": False, "query_len": 64, "shape": [2, 4, 64, 8], "stored": "tokens",
                                     "key_frames": [0], "frame_indices": [[0], [0]]}},
             "provenance": {"ignored": True}, "seconds": 1.0}  # fmt: skip
    read = DdimAttentionInversion.read(attrs)
    assert read.layers["up.attn1"].query_len == 64 and read.frame_keys == ["mid"]
    with pytest.raises(ValueError):
        DdimAttentionInversion.read({**attrs, "num_steps": "many"})
    version_1 = {"up.attn1": {"is_cross": False, "query_len": 64, "shape": [2, 4, 64, 64]}}  # maps, no `stored`
    with pytest.raises(ValueError, match="stored"):
        DdimAttentionInversion.read({**attrs, "layers": version_1})


def test_roles_default_to_the_only_model_and_can_be_mapped_one_by_one() -> None:
    spec = load_spec(fatezero_raw())
    assert spec.graph.nodes["invert_latents"].models == {"unet": "sd", "text_encoder": "sd"}
    spec = load_spec(fatezero_raw(), ["models.vae_ft={id: other/vae}", "stages.encode_latents.models={vae: vae_ft}",
                                      "stages.decode_latents.models={vae: vae_ft}", "stages.invert_latents.model=sd",
                                      "stages.denoise_latents.model=sd"])  # fmt: skip
    assert spec.graph.nodes["encode_latents"].models == {"vae": "vae_ft"}
    assert spec.graph.nodes["decode_latents_0"].models == {"vae": "vae_ft"}


def test_an_optional_role_is_filled_only_when_the_stage_names_its_model() -> None:
    adapted = load_spec(spec_path("gen1-controlnet"))
    assert adapted.graph.nodes["denoise_latents_0"].models == {"unet": "sd", "controlnet": "controlnet", "ip_adapter": "ip_adapter"}
    plain = load_spec(spec_path("gen1-depth2img"))  # `model: sd` fills the roles it must, not the adapter
    assert set(next(n for n in plain.graph.order() if n.spec.stage == "denoise_latents").models) == {"unet"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stages.encode_latents.models={unet: sd}"], "has no model role 'unet'; its roles are: vae"),
        (["models.clip={id: openai/clip, family: transformers}", "stages.encode_latents.models={vae: clip}"],
         "needs a diffusers model as its vae, but 'clip' is transformers"),
        (["models.second={id: other/sd}"], "needs a diffusers model as its vae: set `models: {vae: <name>}` to one of sd, second"),
        (["models.second={id: other/sd}", "stages.encode_latents.model=sd", "stages.decode_latents.model=sd",
          "stages.invert_latents.model=sd", "stages.denoise_latents.models={unet: second, text_encoder: sd}"],
         "uses model 'second' as its unet but reads 'inversion' from 'invert_latents', which used 'sd'"),
    ],
)
def test_role_errors_say_what_to_set(overrides: list[str], message: str) -> None:
    with pytest.raises(GraphError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_spec(fatezero_raw(), overrides)


def test_a_stage_reading_an_undeclared_source_is_refused() -> None:
    with pytest.raises(GraphError, match=r"reads the video source 'clip2', which the pipeline does not declare"):
        load_spec(fatezero_raw(), ["stages.decode_video.sources={video: clip2}"])
    with pytest.raises(GraphError, match="is declared with kind .image."):
        load_spec(fatezero_raw(), ["sources.still={kind: image}", "stages.decode_video.sources={video: still}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sources.video={kind: video}", "the source 'video' is the pipeline's `input`"),
        ("sources.edit={kind: image, sidecar: '../{stem}.png'}", "must be a path below the video's folder"),
        ("sources.edit={kind: image, sidecar: '{clip}.png'}", "using only {stem} and {name}"),
        ("sources.edit={kind: picture}", "sources.edit.kind"),
    ],
)
def test_source_declarations_are_checked(override: str, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_spec(fatezero_raw(), [override])

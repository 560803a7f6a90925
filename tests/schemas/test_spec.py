"""Pipeline specs: YAML round trips, graph validation, and error messages that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from reelflow.deployments import PRESETS
from reelflow.schemas.errors import GraphError, SpecError
from reelflow.schemas.loading import apply_override, load_spec
from reelflow.schemas.pipeline import PipelineSpec
from reelflow.schemas.stages import STAGE_TYPES


def reconstruct_raw() -> dict:
    return yaml.safe_load((PRESETS / "reconstruct.yaml").read_text())


def test_every_preset_validates() -> None:
    presets = sorted(PRESETS.glob("*.yaml"))
    assert presets
    for path in presets:
        spec = load_spec(path)
        assert spec.graph.order()


def test_round_trip_through_json_and_yaml(tmp_path: Path) -> None:
    spec = load_spec(reconstruct_raw(), ["seed=7", "input=clip.mp4"])
    again = PipelineSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert load_spec(path) == spec
    assert again.seed == 7 and again.input == "clip.mp4"


def test_stage_id_defaults_to_stage_type_and_topological_order() -> None:
    raw = reconstruct_raw()
    raw["stages"] = list(reversed(raw["stages"]))
    spec = load_spec(raw)
    order = [n.id for n in spec.graph.order()]
    assert order.index("decode_video") < order.index("encode_latents") < order.index("decode_latents")
    assert order.index("decode_latents") < order.index("encode_video")
    assert spec.graph.descendants("encode_latents") == {"decode_latents", "encode_video", "compute_metrics"}


def test_unique_producer_is_wired_implicitly() -> None:
    raw = reconstruct_raw()
    del raw["stages"][2]["inputs"]  # decode_latents.latents: only encode_latents produces latents
    spec = load_spec(raw)
    assert spec.graph.nodes["decode_latents"].inputs == {"latents": "encode_latents"}


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("stages.encode_video.params.crf=99", ["stages.encode_video.params.crf", "less than or equal to 51", "99"]),
        ("stages.encode_video.params.crff=9", ["stages.encode_video.params.crff", "unknown field (set to 9)", "allowed: codec, crf"]),
        ("stages.decode_video.params.fit=zoom", ["stages.decode_video.params.fit", "'crop' or 'pad'", "zoom"]),
        ("stages.decode_video.params.width=500", ["width=500 is not a multiple of 64", "use 448 or 512"]),
        ("models.sd.revison=main", ["models.sd.revison", "unknown field", "allowed: id, revision, dtype"]),
        ("bogus=1", ["bogus", "unknown field", "allowed: name"]),
        ("stages.0.stage=decod_video", ["decod_video", "'decode_video'", "'encode_latents'"]),
        ("seed=-1", ["seed", "greater than or equal to 0", "-1"]),
    ],
)
def test_field_errors_name_field_value_and_allowed(override: str, fragments: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(reconstruct_raw(), [override])
    for fragment in fragments:
        assert fragment in str(info.value)


def test_stride_and_fps_are_exclusive() -> None:
    with pytest.raises(SpecError, match="either stride .* or fps"):
        load_spec(reconstruct_raw(), ["stages.decode_video.params.stride=2", "stages.decode_video.params.fps=12"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stages.encode_latents.inputs.frames=nowhere"], "reads 'frames' from 'nowhere', which is not a stage"),
        (["stages.decode_latents.inputs.latents=decode_video"], "needs latents, but 'decode_video'"),
        (["stages.encode_latents.inputs.frames=decode_latents"], "form a cycle"),
        (["stages.encode_latents.inputs.pixels=decode_video"], "has no input 'pixels'; its inputs are: frames"),
        (["stages.encode_latents.model=other"], "uses model 'other' as its vae, which is not in `models`"),
        (["stages.decode_latents.id=encode_latents"], "two stages have the id 'encode_latents'"),
    ],
)
def test_graph_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(GraphError, match=message):
        load_spec(reconstruct_raw(), overrides)


def test_ambiguous_slot_lists_candidates() -> None:
    raw = reconstruct_raw()
    del raw["stages"][1]["inputs"]  # encode_latents.frames: decode_video and decode_latents both fit
    with pytest.raises(GraphError, match="'frames' is not wired.*candidates: decode_video, decode_latents"):
        load_spec(raw)


def test_model_stage_without_models_says_to_add_one() -> None:
    raw = reconstruct_raw()
    raw["models"] = {}
    with pytest.raises(GraphError, match="needs a diffusers model as its vae: add one under `models`"):
        load_spec(raw)


def test_specs_are_frozen() -> None:
    spec = load_spec(reconstruct_raw())
    with pytest.raises(ValidationError, match="frozen"):
        spec.seed = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="frozen"):
        spec.stages[0].params.num_frames = 3  # type: ignore[misc]


def test_every_stage_field_has_a_description() -> None:
    for cls in STAGE_TYPES.values():
        params = cls.model_fields["params"].annotation
        for name, field in params.model_fields.items():
            assert field.description, f"{cls.__name__}.params.{name} has no description"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("novalue", "not of the form key.path=value"),
        ("stages.nosuchstage.params.x=1", "no entry 'nosuchstage'; use an index or one of: decode_video"),
        ("name.sub=1", "cannot be set inside a str"),
        ("name.sub.deeper=1", "goes through a str"),
    ],
)
def test_override_errors(override: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        apply_override(reconstruct_raw(), override)


def test_override_parses_yaml_scalars_and_addresses_stages_by_id() -> None:
    raw = apply_override(reconstruct_raw(), "stages.encode_video.params.crf=23")
    raw = apply_override(raw, "stages.decode_video.params.fps=12.5")
    assert raw["stages"][3]["params"]["crf"] == 23
    assert raw["stages"][0]["params"]["fps"] == 12.5


def test_missing_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must hold a mapping"):
        load_spec(listing)

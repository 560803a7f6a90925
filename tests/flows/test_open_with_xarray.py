"""Every artifact the pipelines write opens as an xarray Dataset: no two arrays of a group give one
dimension name two lengths."""

from __future__ import annotations

from pathlib import Path

import pytest
import xarray

from reelflow.deployments import spec_path
from reelflow.flows.edit import edit_video
from reelflow.schemas.loading import load_spec
from reelflow.storage.store import ArtifactStore
from tests.flows.conftest import FATEZERO_TINY

pytestmark = pytest.mark.flow

FATEZERO = (
    *FATEZERO_TINY,
    # A plain edit and a local one, so the store also holds a blend mask and word heat maps.
    "stages.denoise_latents.each=[{target_prompt: a painting of a cat walking on a street, reweight: {}},"
    " {target_prompt: a dog walking on a street, blend_words: [[cat], [dog]], reweight: {}}]",
)


def open_dataset(store: ArtifactStore, rel: str, group: str | None = None):
    return xarray.open_zarr(store.abspath(rel), group=group, consolidated=False)


def assert_opens_with_its_dims(store: ArtifactStore, rel: str, group: str | None = None) -> dict[str, tuple]:
    """The Dataset holds every array of the group, each with the group's own dimension names."""
    zgroup = store.open_path(rel)
    zgroup = zgroup[group] if group else zgroup
    arrays = {name: tuple(a.metadata.dimension_names) for name, a in zgroup.arrays()}
    dataset = open_dataset(store, rel, group)
    assert {name: dataset[name].dims for name in dataset.data_vars} == arrays
    return arrays


def test_every_reconstruct_artifact_opens_as_a_dataset(make_spec) -> None:
    manifest = edit_video(make_spec())
    store = ArtifactStore(manifest.store)
    dims = {info.stage: assert_opens_with_its_dims(store, info.path) for info in store.list()}
    assert set(dims) == {"decode_video", "encode_latents", "decode_latents", "encode_video", "compute_metrics"}
    assert dims["decode_video"]["frames"] == ("frame", "y", "x", "rgb")
    assert dims["decode_video"]["audio"] == ("audio_channel", "sample")
    assert dims["encode_latents"]["latents"] == ("frame", "latent_channel", "y", "x")
    assert dims["decode_latents"]["frames"] == ("frame", "y", "x", "rgb")


def test_every_fatezero_artifact_and_its_attention_groups_open_as_datasets(
    tiny_bundle: Path, clip: Path, tmp_path: Path
) -> None:
    paths = (f"models.sd.id={tiny_bundle}", f"input={clip}", f"store={tmp_path / 'store'}", f"output={tmp_path}/out")
    manifest = edit_video(load_spec(spec_path("fatezero-style"), [*paths, *FATEZERO]))
    store = ArtifactStore(manifest.store)
    opened = {}
    for info in store.list():
        opened.setdefault(info.stage, []).append(assert_opens_with_its_dims(store, info.path))
    [inversion] = opened["invert_latents"]
    assert inversion["latents"][:3] == ("level", "frame", "latent_channel")
    assert any("blend_mask" in arrays and "word_heatmaps" in arrays for arrays in opened["denoise_latents"])

    rel = next(i.path for i in store.list("invert_latents"))
    for group, first in (("attention", "frame"), ("queries", "frame"), ("keys", "key_frame_1")):
        layers = assert_opens_with_its_dims(store, rel, group=group)
        assert len(layers) > 1 and len({dims for dims in layers.values()}) > 1, "layers of different sizes"
        dataset = open_dataset(store, rel, group=group)
        for name, dims in layers.items():
            assert dims[:2] == ("step", first)
            assert dataset[name].shape[2:] == tuple(int(d.rsplit("_", 1)[1]) for d in dims[2:]), "names carry sizes"

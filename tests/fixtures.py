"""Shared fixtures: a tiny model bundle, synthetic clips, stores, and one Prefect harness per session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest


def write_audio_only(path: Path, rate: int = 16000) -> None:
    """A one-second AAC tone in an MP4 container with no video stream."""
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.float32)[None]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from reelflow.core.tiny import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("models") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_svd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Stable Video Diffusion bundle (4 frames per window)."""
    from reelflow.core.tiny import build_tiny_svd

    return build_tiny_svd(tmp_path_factory.mktemp("models") / "tiny-svd", seed=0)


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Wan 2.1 image-to-video bundle (its VAE: 16 channels, 4x in time, 8x in space)."""
    from reelflow.core.tiny_wan import build_tiny_wan_i2v

    return build_tiny_wan_i2v(tmp_path_factory.mktemp("models") / "tiny-wan-i2v", seed=0)


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 96x64, 24 fps, 1 s synthetic clip with motion and a sound track."""
    from reelflow.core.synthetic import write_synthetic_clip

    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    write_synthetic_clip(path, width=96, height=64, fps=24, seconds=1.0)
    return path


@pytest.fixture
def memory_url() -> Iterator[str]:
    url = f"memory://reelflow-test-{uuid.uuid4().hex[:8]}"
    yield url
    import fsspec

    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Prefect test server for the session, with result storage of its own."""
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    results = tmp_path_factory.mktemp("prefect-results")
    with temporary_settings({PREFECT_RESULTS_LOCAL_STORAGE_PATH: results}):
        with prefect_test_harness(server_startup_timeout=90):
            from prefect.settings import PREFECT_API_URL

            yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def s3_server():
    """A local S3 server (moto's server mode) on loopback for the session, and a boto3 client for it."""
    boto3 = pytest.importorskip("boto3", reason="the s3 extra (s3fs, moto) is not installed")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")  # fmt: skip
    yield endpoint, client
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict]:
    """A fresh bucket, with REELFLOW_STORAGE_OPTIONS pointing at the local server; returns (bucket, options)."""
    import json

    endpoint, client = s3_server
    bucket = f"media-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    options = {"key": "testing", "secret": "testing", "endpoint_url": endpoint}
    monkeypatch.setenv("REELFLOW_STORAGE_OPTIONS", json.dumps(options))
    return bucket, options

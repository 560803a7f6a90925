"""Session-wide test setup: no network, an isolated Prefect home, and the markers' switches."""

from __future__ import annotations

import os
import tempfile

# Before anything imports prefect or huggingface_hub: no telemetry, no downloads, no shared state.
_PREFECT_HOME = tempfile.mkdtemp(prefix="reelflow-prefect-home-")
os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PREFECT_HOME": _PREFECT_HOME,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": os.path.join(_PREFECT_HOME, "results"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
)
os.environ.pop("PREFECT_API_URL", None)
for _name in [n for n in os.environ if n.startswith("REELFLOW_")]:
    os.environ.pop(_name)

import pytest  # noqa: E402

pytest_plugins = ["tests.fixtures"]


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # Tiny models on 2 shared cores: intra-op threads only oversubscribe them (measured 10-50x slower).
    torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)

"""The project installs as one namespace, ``reelflow.*``: no generic top-level module on a user's path."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("schemas", "storage", "core", "tasks", "flows", "deployments")


def test_every_package_folder_is_installed_under_reelflow() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        "reelflow." + ".".join(init.parent.relative_to(ROOT).parts)
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert on_disk - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert {f"reelflow.{f}": f for f in FOLDERS}.items() <= config["package-dir"].items()


def test_only_the_reelflow_namespace_is_importable_after_install(tmp_path: Path) -> None:
    probe = (
        "import importlib.util as u, reelflow.flows.cli;"
        f"print([n for n in {FOLDERS!r} if u.find_spec(n) is not None])"
    )
    # Run away from the checkout, so only what the install put on the path can be imported.
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

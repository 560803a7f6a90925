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
        "import importlib.util as u, reelflow.methods, reelflow.api, reelflow.flows.cli;"
        f"print([n for n in {FOLDERS!r} if u.find_spec(n) is not None])"
    )
    # Run away from the checkout, so only what the install put on the path can be imported.
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_module_imports_a_bare_folder_name() -> None:
    """The tests run from the checkout, where a bare `import core` would work; installed, it would not."""
    import ast

    offenders = []
    for folder in (*FOLDERS, "reelflow", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert offenders == []


def test_the_command_line_starts_without_torch() -> None:
    """`reelflow --help` and spec errors stay fast: torch is imported by the handlers that need it, not at start-up."""
    import subprocess
    import sys

    code = "import sys; sys.modules['torch'] = None; import reelflow.flows.cli, reelflow.flows.commands, reelflow.flows.sources"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

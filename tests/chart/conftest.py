"""Fixtures for the chart tests: helm (from a PyPI wheel, see tools.py) and a renderer."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

# tools.py is a plain module next to this file (tests/ is not a package).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import tools  # noqa: E402 (after the sys.path line)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kondense"
KUBE_VERSION = "1.33.0"
RELEASE, NAMESPACE = "kondense", "kondense-system"


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return tools.helm()
    except tools.ToolUnavailable as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def run_helm(
    helm: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., subprocess.CompletedProcess]:
    """helm <command> <chart> with a values file and extra arguments; never raises."""
    folder = tmp_path_factory.mktemp("values")
    counter = iter(range(1_000_000))

    def run(
        command: list[str], values: dict[str, Any] | None = None, *extra: str
    ) -> subprocess.CompletedProcess:
        args = [str(helm), *command]
        if values:
            path = folder / f"values-{next(counter)}.yaml"
            path.write_text(yaml.safe_dump(values))
            args += ["--values", str(path)]
        return subprocess.run([*args, *extra], check=False, capture_output=True, text=True, timeout=60)

    return run


@pytest.fixture(scope="session")
def render(run_helm) -> Callable[[dict[str, Any] | None], list[dict[str, Any]]]:
    """The objects `helm template --include-crds` renders for the given values."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def rendered(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        key = yaml.safe_dump(values or {})
        if key not in cache:
            done = run_helm(
                [
                    "template",
                    RELEASE,
                    str(CHART),
                    "--namespace",
                    NAMESPACE,
                    "--include-crds",
                    "--kube-version",
                    KUBE_VERSION,
                ],
                values,
            )
            assert done.returncode == 0, done.stderr
            cache[key] = [d for d in yaml.safe_load_all(done.stdout) if d]
        return cache[key]

    return rendered

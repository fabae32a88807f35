"""The Dockerfile, read as text (no image can be built here): targets, users, pinned bases."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str  # with global ARG defaults substituted
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        found = [arg for kw, arg in self.instructions if kw == keyword]
        return found[-1] if found else None


def logical_lines(text: str) -> list[str]:
    lines, current = [], ""
    for raw in text.splitlines():
        if not current and raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        current += raw
        if current.strip():
            lines.append(current.strip())
        current = ""
    return lines


def substitute(text: str, args: dict[str, str]) -> str:
    for _ in range(5):  # defaults may refer to earlier ARGs
        text = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)
    return text


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and stage is None:
            name, _, default = rest.partition("=")
            global_args[name.strip()] = substitute(default.strip().strip('"'), global_args)
        elif keyword == "FROM":
            match = re.match(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert match, line
            stage = Stage(
                name=match.group(2) or str(len(stages)), base=substitute(match.group(1), global_args)
            )
            stages[stage.name] = stage
        elif stage is not None:
            stage.instructions.append((keyword, rest.strip()))
    return global_args, stages


ARGS, STAGES = parse(DOCKERFILE.read_text())


def test_targets_exist():
    assert {"operator", "jobs"} <= set(STAGES)
    assert list(STAGES)[-1] == "operator", "the default target (the last stage) is the light operator image"


@pytest.mark.parametrize("target", ["operator", "jobs"])
def test_final_stage_runs_as_non_root(target):
    user = STAGES[target].last("USER")
    assert user is not None, f"{target}: no USER"
    name = user.split(":")[0]
    assert name not in ("root", "0") and name.isdigit() and int(name) == 65532, user


@pytest.mark.parametrize(
    "target, entrypoint",
    [("operator", ["python", "-m", "kondense.operator"]), ("jobs", ["python", "-m", "kondense_jobs"])],
)
def test_entrypoints(target, entrypoint):
    assert json.loads(STAGES[target].last("ENTRYPOINT")) == entrypoint


def test_every_base_image_is_pinned():
    for stage in STAGES.values():
        if stage.base in STAGES:  # FROM an earlier stage
            continue
        assert "$" not in stage.base, f"{stage.name}: unresolved {stage.base}"
        assert ":" in stage.base.rsplit("/", 1)[-1] or "@sha256:" in stage.base, (
            f"{stage.name}: {stage.base} has no tag"
        )
        assert not stage.base.endswith(":latest"), stage.base
    assert ":latest" not in DOCKERFILE.read_text()


def test_final_stages_copy_only_from_their_build_stage():
    """Compilers stay in the build stages: the final stages install nothing with pip and no build tools."""
    for target, builder in (("operator", "operator-build"), ("jobs", "jobs-build")):
        stage = STAGES[target]
        runs = " ".join(arg for kw, arg in stage.instructions if kw == "RUN")
        assert "pip install" not in runs
        assert not re.search(r"build-essential|cmake|gcc|python3-dev", runs), runs
        copies = [arg for kw, arg in stage.instructions if kw == "COPY"]
        assert copies and all(f"--from={builder}" in c for c in copies), copies


def test_operator_installs_the_light_package_and_jobs_the_extra():
    operator_runs = " ".join(a for kw, a in STAGES["operator-build"].instructions if kw == "RUN")
    jobs_runs = " ".join(a for kw, a in STAGES["jobs-build"].instructions if kw == "RUN")
    assert re.search(r"pip install \.(\s|$)", operator_runs) and "[jobs]" not in operator_runs
    assert '".[jobs]"' in jobs_runs or "'.[jobs]'" in jobs_runs


def test_llama_cpp_build_flags_and_gpu_switch():
    build = STAGES["jobs-build"]
    env = " ".join(a for kw, a in build.instructions if kw == "ENV")
    for flag in (
        "-DGGML_NATIVE=OFF",
        "-DGGML_AVX2=ON",
        "-DGGML_AVX512=OFF",
        "-DGGML_AMX_INT8=OFF",
        "-DGGML_LLAMAFILE=OFF",
    ):
        assert flag in env
    assert "${LLAMA_CMAKE_ARGS}" in env
    assert any(kw == "ARG" and a.startswith("LLAMA_CMAKE_ARGS") for kw, a in build.instructions)


def test_jobs_image_uses_the_job_mounts():
    env = " ".join(a for kw, a in STAGES["jobs"].instructions if kw == "ENV")
    assert "HF_HOME=/home/kondense/.cache/huggingface" in env
    assert "KONDENSE_CACHE=/home/kondense/.cache/kondense" in env
    assert "HOME=/home/kondense" in env

"""Re-running a pipeline: nothing is recomputed, and an edit recomputes only what it touches.

1. resume: the demo pipeline runs once in a fresh folder, then again: prints both times and
   the ratio second/first (target < 2%).
2. incremental: one quantize stage's parameters are edited (gptq groupSize 32 -> 64) and the
   pipeline runs again: prints the stages that ran (target: gptq and eval only).

    python benchmarks/local_resume.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from kondense import demo
from kondense.store import to_uri


def run(pipeline: Path, cwd: Path) -> tuple[float, list[str]]:
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "kondense.cli", "run", str(pipeline)], cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if r.returncode != 0:
        raise SystemExit(r.stdout[-2000:] + r.stderr[-2000:])
    ran = re.search(r"Stages run: (.*) in ", r.stdout).group(1)
    return elapsed, [] if ran.startswith("none") else ran.split(", ")


def main() -> None:
    inputs = demo.build_inputs(demo.inputs_cache())  # built once, cached: not part of the timings
    with tempfile.TemporaryDirectory(prefix="kondense-resume-") as tmp:
        work = Path(tmp)
        base = to_uri(str(work / "base"))
        demo.stage_inputs(inputs, base)
        doc = yaml.safe_load(demo.template().replace(demo.PLACEHOLDER, base))
        pipeline = work / "pipeline.yaml"
        pipeline.write_text(yaml.safe_dump(doc))

        first, ran_first = run(pipeline, work)
        second, ran_second = run(pipeline, work)
        print(f"resume: first run {first:.1f}s ({len(ran_first)} stages), second run {second:.2f}s "
              f"({len(ran_second)} stages): ratio {second / first:.2%} (target < 2%)")

        gptq = next(s for s in doc["spec"]["stages"] if s["name"] == "gptq")
        gptq["quantize"]["groupSize"] = 64
        pipeline.write_text(yaml.safe_dump(doc))
        third, ran_third = run(pipeline, work)
        print(f"incremental: editing gptq.groupSize re-ran {len(ran_third)} of {len(doc['spec']['stages'])} stages "
              f"({', '.join(ran_third)}) in {third:.1f}s, {third / first:.0%} of the first run")


if __name__ == "__main__":
    main()

"""What the preloaded interpreter saves `kondense run`: the same pipeline with stages forked from
it (kondense.preload) and with every stage a fresh `python -m kondense_jobs` process, side by side.

The pipeline is the demo's short stages on the demo's inputs: nf4, GPTQ and GGUF q8_0 copies of
the student, then an evaluate stage of the four (perplexity, KLD, speed). Each mode runs into a
store of its own, in turns (plain, preloaded, plain, preloaded, ...), after one untimed
`import torch, transformers` so that neither mode pays for a cold page cache. Prints each stage's
wall time (as `kondense run` counts it) and the whole run's, and the ratio plain / preloaded of
the best run of each; exits 1 below TARGET.

    python benchmarks/preload.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kondense import demo, preload
from kondense.api import CompressionPipeline
from kondense.local import LocalRunner
from kondense.store import to_uri

TARGET = 1.3  # the whole pipeline at least 1.3x faster with its stages forked


def pipeline(inputs_uri: str, store: Path) -> CompressionPipeline:
    return CompressionPipeline.model_validate({
        "apiVersion": "kondense.io/v1alpha1", "kind": "CompressionPipeline", "metadata": {"name": "preload"},
        "spec": {
            "teacher": {"uri": f"{inputs_uri}/teacher"}, "student": {"uri": f"{inputs_uri}/student"},
            "dataset": {"uri": f"{inputs_uri}/dataset.jsonl", "evalSplit": 0.1, "seed": 0},
            "storage": {"uri": to_uri(str(store))}, "resources": {"gpus": 0},
            "stages": [
                {"name": "nf4", "from": "student", "quantize": {"method": "bnb-nf4"}},
                {"name": "gptq", "from": "student", "quantize": {"method": "gptq", "bits": 4, "groupSize": 32,
                                                                  "calibrationSamples": 16, "calibrationSeqLength": 128}},
                {"name": "gguf", "from": "student", "quantize": {"method": "gguf", "type": "q8_0"}},
                {"name": "eval", "evaluate": {"of": ["student", "nf4", "gptq", "gguf"], "baseline": "student",
                                              "seqLength": 128, "maxEvalTokens": 4096, "generateTokens": 8}},
            ],
        },
    })


def run(inputs_uri: str, work: Path, mode: str, round_: int) -> tuple[float, dict[str, float], list[str]]:
    folder = work / f"{mode}-{round_}"
    runner = LocalRunner(pipeline(inputs_uri, folder / "store"), folder / "state", out=io.StringIO(),
                         env={preload.ENV: "1" if mode == "preloaded" else "0"})
    started = time.monotonic()
    status = runner.run()
    took = time.monotonic() - started
    failed = [f"{s.name}: {s.reason}: {s.message}" for s in status.stages if s.state != "Succeeded"]
    if failed:
        raise SystemExit(f"{mode} run {round_} failed: {failed}; logs in {folder / 'state' / 'logs'}")
    return took, dict(runner.seconds), runner.forked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not preload.wanted():
        print("preloading does not apply on this machine (a GPU device, not Linux, or KONDENSE_PRELOAD=0)")
        return 1
    inputs = demo.build_inputs(demo.inputs_cache())
    subprocess.run([sys.executable, "-c", "import torch, transformers"], check=True)  # the page cache, for both
    with tempfile.TemporaryDirectory(prefix="kondense-preload-") as tmp:
        work = Path(tmp)
        demo.stage_inputs(inputs, to_uri(str(work / "base")))
        inputs_uri = to_uri(str(work / "base")) + "/inputs"
        results: dict[str, list[tuple[float, dict[str, float], list[str]]]] = {"plain": [], "preloaded": []}
        for r in range(args.rounds):
            for mode in ("plain", "preloaded"):
                results[mode].append(run(inputs_uri, work, mode, r))
                print(f"round {r + 1} {mode:<9}: {results[mode][-1][0]:6.1f}s", flush=True)
    best = {mode: min(runs, key=lambda x: x[0]) for mode, runs in results.items()}
    assert best["plain"][2] == [] and sorted(best["preloaded"][2]) == ["eval", "gguf", "gptq", "nf4"], best
    print(f"\n{'stage':<8}{'plain':>9}{'preloaded':>11}{'saved':>8}")
    for name in best["plain"][1]:
        a, b = best["plain"][1][name], best["preloaded"][1][name]
        print(f"{name:<8}{a:8.1f}s{b:10.1f}s{a - b:7.1f}s")
    ratio = best["plain"][0] / best["preloaded"][0]
    print(f"{'run':<8}{best['plain'][0]:8.1f}s{best['preloaded'][0]:10.1f}s{best['plain'][0] - best['preloaded'][0]:7.1f}s")
    print(f"\nplain / preloaded: {ratio:.2f}x (target >= {TARGET}x)")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

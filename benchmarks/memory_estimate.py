"""The memory plan against reality: estimate vs measured peak memory per worker, on CPU.

For three model sizes (about 2M, 20M and 100M parameters, Llama-style, built from config on the
spot) on 1 worker, 2 ddp workers and 2 fsdp workers (the student sharded with FSDP2), the logits
distill stage runs as a pod would run it (the launcher for 2 workers, gloo) for a few steps of
the same global batch. Each prints:

  estimate  the stage's preflightGiB: kondense.memory's per-worker total (the number
            `kondense plan` prints, +10% fragmentation)
  measured  the stage's peakMemoryGiB: rank 0's peak resident memory above what the process
            held before loading any model (interpreter, torch, transformers)

and the error (estimate / measured - 1). The teacher has twice the student's layers. Exits 1
when an error is outside +-TARGET.

    python benchmarks/memory_estimate.py [--sizes small,medium,large] [--seq 256] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kondense.api import DatasetRef, DistillSpec, InputRef, Resources, StageRun, Storage
from kondense.events import parse_summary
from kondense.launch import stage_command
from kondense_jobs import tiny
from kondense_jobs.preflight import count_parameters

TARGET = 0.25
SIZES = {"small": (2, 128, 4), "medium": (6, 384, 6), "large": (12, 768, 12)}  # layers, hidden, heads


RUNS = ((1, "ddp"), (2, "ddp"), (2, "fsdp"))  # workers, strategy


def run_stage(root: Path, name: str, teacher: Path, student: Path, dataset: Path, workers: int, strategy: str,
              args) -> dict:
    folder = root / name
    folder.mkdir()
    spec = DistillSpec(method="logits", max_steps=args.steps, batch_size=args.batch, global_batch_size=2 * args.batch,
                       max_seq_length=args.seq, learning_rate=1e-4, checkpoint_every=10_000, strategy=strategy)
    run = StageRun(
        pipeline="bench", namespace="memory", stage=name, stage_kind="distill", distill=spec,
        models={"teacher": InputRef(uri=f"file://{teacher}"), "student": InputRef(uri=f"file://{student}")},
        dataset=DatasetRef(uri=f"file://{dataset}", eval_split=0.05), output=f"file://{folder}/store/out",
        input_digest=f"sha256:{name}", storage=Storage(uri=f"file://{folder}/store"),
        resources=Resources(gpus=0, workers=workers),
    )
    (folder / "stage.json").write_text(run.model_dump_json(by_alias=True, exclude_none=True))
    stage_args = ["--spec", str(folder / "stage.json"), "--termination-log", str(folder / "t"),
                  "--cache-dir", str(folder / "cache")]
    proc = subprocess.run(stage_command("distill", stage_args, run.resources, python=sys.executable, sharded=run.sharded),
                          capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    summary = parse_summary((folder / "t").read_text()) if (folder / "t").exists() else None
    if proc.returncode != 0 or summary is None:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return summary.metrics


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kondense-memory-"))
    texts = tiny.corpus(max_docs=3000)
    tok = tiny.train_tokenizer(texts, vocab_size=8192)
    dataset = tiny.write_jsonl(root / "data.jsonl", [{"text": t} for t in texts])
    rows, worst = [], 0.0
    for size in args.sizes.split(","):
        layers, hidden, heads = SIZES[size]
        student = tiny.build_model(root / f"{size}-student", tok, "llama", layers, hidden, heads, seed=2)
        teacher = tiny.build_model(root / f"{size}-teacher", tok, "llama", 2 * layers, hidden, heads, seed=1)
        for workers, strategy in RUNS:
            m = run_stage(root, f"{size}-{workers}-{strategy}", teacher, student, dataset, workers, strategy, args)
            error = m["preflightGiB"] / m["peakMemoryGiB"] - 1
            worst = max(worst, abs(error))
            rows.append({"size": size, "studentParams": count_parameters(student), "teacherParams": count_parameters(teacher),
                         "workers": workers, "strategy": strategy, "estimateGiB": m["preflightGiB"], "measuredGiB": m["peakMemoryGiB"],
                         "error": round(error, 3)})
            print(f"{size:<7} student {rows[-1]['studentParams'] / 1e6:6.1f}M teacher {rows[-1]['teacherParams'] / 1e6:6.1f}M "
                  f"{workers} x {strategy}: estimate {m['preflightGiB']:.3f} GiB, measured {m['peakMemoryGiB']:.3f} GiB, "
                  f"error {error:+.1%}", flush=True)
    print(json.dumps(rows, indent=1))
    print(f"worst |error| {worst:.1%} (target {TARGET:.0%})")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())

"""Does the teacher help? Logit-KD student vs a CE-only student (alpha 0), same steps and data.

Both students start from the demo's random student and train with the logits-distill stage
(`kondense_jobs.distill.run`, in-process) on the demo dataset's training split, with the same
steps, learning rate, batch, sequence length and seed; only alpha (and so the teacher's
soft targets) differs. The held-out perplexity of each is measured on the eval split (token
stream joined with EOS, non-overlapping windows), as the evaluate stage does. The demo's
inputs (teacher pretrained on the other 7/8 of the corpus) come from `kondense.demo.build_inputs`.

    python benchmarks/distill_quality.py [--steps 300] [--alpha 0.5] [--temperature 2]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import transformers

from kondense.api import DatasetRef, DistillSpec, InputRef, Resources, StageRun, Storage
from kondense.events import Progress
from kondense_jobs import data
from kondense_jobs.runtime import Context

DATASET = dict(eval_split=0.1, seed=0)  # as in the demo pipeline


def inputs_folder(arg: str | None) -> Path:
    """A folder with teacher/, student/ and dataset.jsonl: --inputs as given, or the demo's (built once)."""
    if arg:
        return Path(arg)
    from kondense import demo

    return demo.build_inputs(demo.inputs_cache())


@torch.no_grad()
def perplexity(model_dir: Path, windows: list[list[int]]) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for i in range(0, len(windows), 16):
        batch = torch.tensor(windows[i : i + 16])
        loss = model(input_ids=batch, labels=batch).loss
        n = batch.numel() - batch.shape[0]
        nll, count = nll + loss.item() * n, count + n
    return math.exp(nll / count)


def distill(work: Path, inputs: Path, spec: DistillSpec, name: str) -> tuple[Path, dict]:
    run = StageRun(
        pipeline="quality", namespace="default", stage=name, stage_kind="distill", distill=spec,
        models={"teacher": InputRef(uri=f"file://{inputs / 'teacher'}"), "student": InputRef(uri=f"file://{inputs / 'student'}")},
        dataset=DatasetRef(uri=f"file://{inputs / 'dataset.jsonl'}", **DATASET),
        output=f"file://{work}/store/{name}", input_digest=f"sha256:{name}",
        storage=Storage(uri=f"file://{work}/store"), resources=Resources(gpus=0),
    )
    (work / name).mkdir(parents=True)
    from kondense_jobs import distill as stage

    with open("/dev/null", "w") as quiet:
        summary = stage.run(Context(run, work / name, work / "cache", progress=Progress(name, out=quiet)))
    return work / "store" / name, summary.metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", help="demo inputs folder with teacher/, student/, dataset.jsonl (default: the demo's, built once)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    a = p.parse_args()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    inputs = inputs_folder(a.inputs)
    tok = transformers.AutoTokenizer.from_pretrained(inputs / "student")
    split = data.load(inputs / "dataset.jsonl", DatasetRef(uri="file:///unused", **DATASET))
    windows = data.windows(data.token_stream(tok, [r["text"] for r in split.eval]), a.seq)
    common = dict(
        method="logits", max_steps=a.steps, learning_rate=a.lr, warmup_ratio=0.05, batch_size=a.batch,
        max_seq_length=a.seq, checkpoint_every=a.steps + 1, seed=0,
    )
    rows = [("teacher", inputs / "teacher", None), ("student (untrained)", inputs / "student", None)]
    with tempfile.TemporaryDirectory(prefix="distill-quality-") as tmp:
        work = Path(tmp)
        for name, alpha in (("ce-only", 0.0), ("logit-kd", a.alpha)):
            started = time.monotonic()
            out, metrics = distill(work, inputs, DistillSpec(alpha=alpha, temperature=a.temperature, **common), name)
            rows.append((f"{name} (alpha {alpha:g})", out, metrics))
            print(f"trained {name} in {time.monotonic() - started:.0f} s", flush=True)
        ppl = {name: perplexity(path, windows) for name, path, _ in rows}

    print(
        f"\nheld-out perplexity on {len(windows)} windows of {a.seq} tokens ({len(split.eval)} eval records); "
        f"{a.steps} steps of {a.batch}x{a.seq} tokens, lr {a.lr:g}, T {a.temperature:g}, {len(split.train)} train records"
    )
    print(f"{'model':28}{'perplexity':>12}{'final stage loss':>18}")
    for name, _, metrics in rows:
        loss = f"{metrics['finalLoss']:.3f}" if metrics else "-"
        print(f"{name:28}{ppl[name]:>12.1f}{loss:>18}")
    kd, ce = ppl[rows[3][0]], ppl[rows[2][0]]
    print(f"ratio logit-KD / CE-only perplexity: {kd / ce:.3f} (target <= 0.90)")


if __name__ == "__main__":
    main()

"""Does the teacher help, and do its stored top-k logits help as much? Logit-KD students, online
(the teacher run at every step) and offline (the teacher's top-k logits stored once by the
teacher_logits stage), vs a CE-only student (alpha 0), same steps and data.

Every student starts from the demo's random student and trains with the logits-distill stage
(`kondense_jobs.distill.run`, in-process) on the demo dataset's training split, with the same
steps, learning rate, batch, sequence length and seed: the online and offline students even see
the same windows in the same order; only the teacher's targets differ (its whole distribution,
or its top k renormalized, see `topk_kd_loss`, or those of a bitsandbytes int8/nf4 copy of the
teacher; the online student's own teacher is held in the training precision, fp32 on CPU, bf16 on
GPUs). The held-out perplexity of each is measured on the eval split (token stream joined with
EOS, non-overlapping windows), as the evaluate stage does. Exits 1 when the logit-KD student is
not at least 10% lower in perplexity than the CE-only one. The teacher pass
(`kondense_jobs.teacher_logits.run`) reports the artifact's bytes per token and the teacher's
top-k mass at T=1. The demo's inputs (teacher pretrained on the other 7/8 of the
corpus) come from `kondense.demo.build_inputs`.

    python benchmarks/distill_quality.py [--steps 300] [--alpha 0.5] [--temperature 2] [--top-k 64[,8,...]] [--teacher-loads nf4[,int8]]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from kondense.api import DatasetRef, DistillSpec, InputRef, Resources, StageRun, Storage, TeacherLogitsSpec
from kondense.events import Progress
from kondense_jobs import data
from kondense_jobs.runtime import Context

DATASET = dict(eval_split=0.1, seed=0)  # as in the demo pipeline
TARGET = 0.90  # the KD student at least 10% lower in perplexity than CE-only at equal steps


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


def stage(work: Path, inputs: Path, kind: str, config, name: str, models: dict[str, InputRef]) -> tuple[Path, dict]:
    run = StageRun(
        pipeline="quality", namespace="default", stage=name, stage_kind=kind, **{kind: config}, models=models,
        dataset=DatasetRef(uri=f"file://{inputs / 'dataset.jsonl'}", **DATASET),
        output=f"file://{work}/store/{name}", input_digest=f"sha256:{name}",
        storage=Storage(uri=f"file://{work}/store"), resources=Resources(gpus=0),
    )
    (work / name).mkdir(parents=True)
    from kondense_jobs.__main__ import load_stage

    with open("/dev/null", "w") as quiet:
        summary = load_stage(kind)(Context(run, work / name, work / "cache", progress=Progress(name, out=quiet)))
    return work / "store" / name, summary.metrics


def distill(work: Path, inputs: Path, spec: DistillSpec, name: str, logits: str | None = None) -> tuple[Path, dict]:
    """A student, from the teacher (online) or from the teacher_logits stage named `logits` (offline)."""
    teacher = {"teacher": InputRef(uri=f"file://{inputs / 'teacher'}")}
    if logits:
        teacher = {"teacherLogits": InputRef(uri=f"file://{work}/store/{logits}", stage=logits, input_digest=f"sha256:{logits}")}
    models = {**teacher, "student": InputRef(uri=f"file://{inputs / 'student'}")}
    return stage(work, inputs, "distill", spec, name, models)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", help="demo inputs folder with teacher/, student/, dataset.jsonl (default: the demo's, built once)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--top-k", default="64", help="teacher logits kept per token for the offline students, e.g. 64 or 8,64,256")
    p.add_argument("--teacher-loads", default="nf4", help="quantized online teachers to compare, e.g. nf4 or int8,nf4 ('' for none)")
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
    passes = {}
    with tempfile.TemporaryDirectory(prefix="distill-quality-") as tmp:
        work = Path(tmp)
        for name, alpha in (("ce-only", 0.0), ("logit-kd", a.alpha)):
            started = time.monotonic()
            out, metrics = distill(work, inputs, DistillSpec(alpha=alpha, temperature=a.temperature, **common), name)
            rows.append((f"{name} (alpha {alpha:g})", out, metrics))
            print(f"trained {name} in {time.monotonic() - started:.0f} s", flush=True)
        for load in filter(None, a.teacher_loads.split(",")):
            started = time.monotonic()
            spec = DistillSpec(alpha=a.alpha, temperature=a.temperature, teacher_load=load, **common)
            out, metrics = distill(work, inputs, spec, f"teacher-{load}")
            rows.append((f"logit-kd, {load} teacher", out, metrics))
            print(f"trained with the {load} teacher in {time.monotonic() - started:.0f} s", flush=True)
        for k in (int(x) for x in a.top_k.split(",")):
            logits = f"teacher-logits-{k}"
            started = time.monotonic()
            _, passes[k] = stage(
                work, inputs, "teacher_logits", TeacherLogitsSpec(top_k=k, max_seq_length=a.seq, batch_size=16), logits,
                {"teacher": InputRef(uri=f"file://{inputs / 'teacher'}")},
            )
            print(f"teacher pass (top {k}) in {time.monotonic() - started:.0f} s", flush=True)
            started = time.monotonic()
            spec = DistillSpec(alpha=a.alpha, temperature=a.temperature, teacher_logits=logits, **common)
            out, metrics = distill(work, inputs, spec, f"offline-top{k}", logits)
            rows.append((f"offline top-{k} (alpha {a.alpha:g})", out, metrics))
            print(f"trained offline-top{k} in {time.monotonic() - started:.0f} s", flush=True)
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
    print(f"ratio logit-KD / CE-only perplexity: {kd / ce:.3f} (target <= {TARGET:.2f})")
    full = rows[3][2]["teacherMemoryMiB"]
    for name, _, metrics in rows[4:]:
        if "teacherMemoryMiB" in metrics:
            print(
                f"{name}: perplexity {ppl[name] / kd:.3f}x the student of the unquantized teacher; the teacher held in "
                f"{metrics['teacherMemoryMiB']:.2f} MiB vs {full:.2f} MiB ({metrics['teacherMemoryMiB'] / full:.2f}x)"
            )
    offline = [name for name, _, metrics in rows if "teacherTopK" in (metrics or {})]
    for (k, m), name in zip(passes.items(), offline):
        print(
            f"offline top-{k}: perplexity {ppl[name] / kd:.3f}x the online student's; artifact {m['bytesPerToken']:.1f} "
            f"bytes per token ({m['windows']:.0f} windows), teacher's top-{k} mass at T=1 {m['topKMass']:.3f}, "
            f"teacher pass {m['teacherSeconds']:.0f} s"
        )
    if kd / ce > TARGET:
        sys.exit(f"missed: the logit-KD student's perplexity is {kd / ce:.3f}x CE-only's, target <= {TARGET:.2f}")


if __name__ == "__main__":
    main()

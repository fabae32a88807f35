"""Overhead of the logits-distill stage over a bare transformers Trainer doing the same work.

Side by side in one process, on the same models, data, steps and seed:
  stage: kondense_jobs.distill.run(ctx) called in-process, so process start and imports are not
         timed (the whole stage: its TrainingArguments, callbacks, progress lines, checkpoint
         staging when on, the LogitDistillTrainer).
  bare:  a plain transformers.Trainer subclass whose compute_loss calls the same kd_loss, with
         default TrainingArguments and no callbacks of ours.
Both are timed by one wrapper around `transformers.Trainer.train` (wall clock and process CPU
time), tokens = steps x batch x seq. Runs alternate in pairs (bare, stage) after an untimed
warm-up of each; the median of the per-pair ratios is printed. Pairs run back to back, which
cancels most of the drift of a shared machine; CPU time is less sensitive to other processes
than wall time. The stage's checkpoints are off (checkpointEvery > steps) unless
--checkpoint-every is given: by default this measures the training loop, not storage.

    python benchmarks/distill_overhead.py [--steps 20] [--rounds 7] [--batch 8] [--seq 128] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from kondense.api import DatasetRef, DistillSpec, InputRef, Resources, StageRun, Storage
from kondense.events import Progress
from kondense_jobs import data, tiny
from kondense_jobs.distill import Windows, kd_loss
from kondense_jobs.runtime import Context

TIMES: list[tuple[float, float]] = []  # (wall, cpu) seconds of each Trainer.train call
_train = transformers.Trainer.train


def timed_train(self, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        return _train(self, *args, **kwargs)
    finally:
        TIMES.append((time.perf_counter() - wall, time.process_time() - cpu))


transformers.Trainer.train = timed_train


class BareKD(transformers.Trainer):
    """The baseline: a plain Trainer whose compute_loss is the same KD loss."""

    def __init__(self, *args, teacher, temperature, alpha, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"])
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"]).logits
        loss = kd_loss(outputs.logits, teacher_logits, inputs["labels"], self.temperature, self.alpha, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


def build(folder: Path) -> tuple[Path, Path, Path]:
    """Demo-shaped models (teacher 4x256, student 2x128, vocab 4096); random weights do for throughput."""
    texts = tiny.corpus(max_docs=1500)
    tok = tiny.train_tokenizer(texts, vocab_size=4096)
    teacher = tiny.build_model(folder / "teacher", tok, "llama", layers=4, hidden=256, heads=4, seed=1)
    student = tiny.build_model(folder / "student", tok, "llama", layers=2, hidden=128, heads=4, seed=2)
    dataset = tiny.write_jsonl(folder / "dataset.jsonl", [{"text": t} for t in texts])
    return teacher, student, dataset


def stage_run(folder: Path, models: tuple[Path, Path, Path], spec: DistillSpec, n: int) -> tuple[float, float]:
    from kondense_jobs import distill

    teacher, student, dataset = models
    work = folder / f"stage-{n}"
    run = StageRun(
        pipeline="bench", namespace="default", stage="distill", stage_kind="distill", distill=spec,
        models={"teacher": InputRef(uri=f"file://{teacher}"), "student": InputRef(uri=f"file://{student}")},
        dataset=DatasetRef(uri=f"file://{dataset}", eval_split=0.1),
        output=f"file://{work}/store/distill", input_digest=f"sha256:bench-{n}",
        storage=Storage(uri=f"file://{work}/store"), resources=Resources(gpus=0),
    )
    (work / "tmp").mkdir(parents=True)
    with open("/dev/null", "w") as quiet:
        summary = distill.run(Context(run, work / "tmp", work / "cache", progress=Progress("distill", out=quiet)))
    assert summary.metrics["steps"] == spec.max_steps
    return TIMES[-1]


def bare_run(folder: Path, models: tuple[Path, Path, Path], spec: DistillSpec, n: int) -> tuple[float, float]:
    teacher_dir, student_dir, dataset = models
    tok = transformers.AutoTokenizer.from_pretrained(student_dir)
    split = data.load(dataset, DatasetRef(uri=f"file://{dataset}", eval_split=0.1))
    rows = data.windows(data.token_stream(tok, [r["text"] for r in split.train]), spec.max_seq_length)
    transformers.set_seed(spec.seed)
    student = transformers.AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    args = transformers.TrainingArguments(
        output_dir=str(folder / f"bare-{n}"), max_steps=spec.max_steps, learning_rate=spec.learning_rate,
        lr_scheduler_type="linear", per_device_train_batch_size=spec.batch_size, seed=spec.seed,
        use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to="none", disable_tqdm=True,
    )
    trainer = BareKD(
        model=student, args=args, train_dataset=Windows(torch.tensor(rows)), data_collator=transformers.default_data_collator,
        teacher=teacher, temperature=spec.temperature, alpha=spec.alpha,
    )
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    return TIMES[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="stage checkpoints (default: none within the run)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    spec = DistillSpec(
        method="logits", max_steps=a.steps, temperature=2.0, alpha=0.5, learning_rate=1e-3, batch_size=a.batch,
        max_seq_length=a.seq, checkpoint_every=a.checkpoint_every or a.steps + 1, seed=0,
    )
    tokens = a.steps * a.batch * a.seq
    with tempfile.TemporaryDirectory(prefix="distill-overhead-") as tmp:
        folder = Path(tmp)
        models = build(folder / "models")
        warm = spec.model_copy(update={"max_steps": 3})
        bare_run(folder, models, warm, 0), stage_run(folder, models, warm, 0)
        pairs = []
        for n in range(1, a.rounds + 1):
            (bw, bc), (sw, sc) = bare_run(folder, models, spec, n), stage_run(folder, models, spec, n)
            pairs.append((tokens / bw, tokens / sw, tokens / bc, tokens / sc))
            print(
                f"round {n}: wall tok/s bare {pairs[-1][0]:6.0f} stage {pairs[-1][1]:6.0f} ratio {bw / sw:.3f}   "
                f"CPU tok/s bare {pairs[-1][2]:6.0f} stage {pairs[-1][3]:6.0f} ratio {bc / sc:.3f}",
                flush=True,
            )
    med = [statistics.median(col) for col in zip(*pairs)]
    wall_ratio = statistics.median(s / b for b, s, _, _ in pairs)
    cpu_ratio = statistics.median(s / b for _, _, b, s in pairs)
    print(
        f"\nlogits distill, {a.steps} steps of {a.batch}x{a.seq} tokens, {torch.get_num_threads()} threads, "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}, stage checkpoints "
        f"{'every %d steps' % a.checkpoint_every if a.checkpoint_every else 'off'}"
    )
    print(f"{'':24}{'wall tok/s':>12}{'CPU tok/s':>12}")
    print(f"{'bare Trainer + kd_loss':24}{med[0]:>12.0f}{med[2]:>12.0f}")
    print(f"{'kondense distill stage':24}{med[1]:>12.0f}{med[3]:>12.0f}")
    print(f"ratio stage/bare, median of {a.rounds} pairs: wall {wall_ratio:.3f}, CPU time {cpu_ratio:.3f} (target >= 0.97)")


if __name__ == "__main__":
    main()

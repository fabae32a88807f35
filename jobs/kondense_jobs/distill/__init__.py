"""The distill stage: teach the student to imitate the teacher.

`run(ctx)` reads as three steps: fetch inputs (teacher, student, dataset; the tokenizers are
compared and the memory planned before any weight is loaded) -> train -> publish the student.

One module per method, each `build(ctx, job) -> Built` on a library trainer, so that gradient
accumulation, the schedule, mixed precision, activation checkpointing, data parallelism, FSDP2
and checkpoint/resume come from the library, not from here:

- logits.py: transformers.Trainer with the KD loss, teacher online or its stored top-k;
- losses.py: kd_loss (loss and gradient in one blockwise pass) and topk_kd_loss;
- synthetic.py: teacher completions, then trl.SFTTrainer;
- gkd.py: trl.experimental.gkd.GKDTrainer (on-policy);
- setup.py: what they share (inputs, memory plan, model loading, the training config);
- checkpoints.py: resumable checkpoints staged in the store.

Several workers (`resources.gpus`, `workers`, `nodes`): the stage runs under
`python -m kondense_jobs.launch` (torch.distributed.run); every worker runs this same code.
The memory plan (kondense.memory, the very estimate `kondense plan` prints) decides ddp or fsdp
for the student and how the teacher is held; with `globalBatchSize` the gradient accumulation
follows the worker count so that any count trains the same steps on the same batches. The
node's first worker fetches inputs while the others wait; rank 0 alone writes progress, the
checkpoints' manifests and the published student, in the training precision (bf16 by default on
GPUs) as safetensors shards.
"""

from __future__ import annotations

import logging
import time

from kondense.api import DistillSpec, Summary
from kondense.errors import InvalidSpec

from kondense_jobs import data
from kondense_jobs.distill import gkd, logits, synthetic
from kondense_jobs.distill.checkpoints import Checkpoints, Resume
from kondense_jobs.distill.gkd import gkd_records
from kondense_jobs.distill.logits import Windows
from kondense_jobs.distill.losses import kd_loss
from kondense_jobs.distill.setup import (
    Inputs,
    MemoryProbe,
    accelerate_fsdp,
    callback,
    check_strategy,
    check_vocabularies,
    held_bytes,
    log_published,
    plan_memory,
    resolve_precision,
    save_student,
    sequence_length,
    sharding,
    training_metrics,
)
from kondense_jobs.parallel import World
from kondense_jobs.runtime import Context, require

__all__ = ["Checkpoints", "METHODS", "Windows", "check_vocabularies", "gkd_records", "kd_loss", "run"]

log = logging.getLogger("kondense_jobs.distill")

METHODS = {"logits": logits.build, "synthetic": synthetic.build, "gkd": gkd.build}


def fetch_inputs(ctx: Context, world: World) -> Inputs:
    """Models and data, with the tokenizers compared and the memory planned before any weight is loaded.

    Logits with alpha 0 (the CE-only baseline) never uses the teacher, so it is not even fetched;
    with teacherLogits the teacher's stored top-k logits are fetched instead of the teacher.
    The node's first worker fetches into the shared cache; the others wait, then find it there.
    """
    spec: DistillSpec = ctx.config
    offline = spec.teacher_logits is not None
    with world.local_main_first():
        student_dir = ctx.model_dir("student")
        unused = (spec.method == "logits" and spec.alpha == 0) or offline
        teacher_dir = None if unused else ctx.model_dir("teacher")
        stored = ctx.model_dir("teacherLogits") if offline else None
        dataset = ctx.dataset_path()
    tokenizer = check_vocabularies(teacher_dir, student_dir, spec.method)
    precision = resolve_precision(spec.precision)
    seq = sequence_length(spec, *[d for d in (teacher_dir, student_dir) if d is not None])
    plan = plan_memory(ctx, spec, teacher_dir, student_dir)
    check_strategy(teacher_dir, plan)
    # logits trains on the tokens artifact (data.tokens, in its build step): no record is loaded here
    split = None if spec.method == "logits" else data.load(dataset, ctx.run.dataset)
    return Inputs(
        spec, student_dir, teacher_dir, tokenizer, split, seq, precision, plan, world, MemoryProbe(), ctx.work_dir / "trainer",
        stored,
    )


def resume_mismatch(resume: Resume, strategy: str) -> str:
    """Why a checkpoint of the other strategy cannot be resumed, and the edit that resumes it.

    FSDP writes torch.distributed.checkpoint shards (one per worker, resharded on load on any
    worker count), DDP the full state: the Trainer reads only the format it wrote. The strategy is
    not in the input digest, so setting it keeps the checkpoints.
    """
    wrote = "fsdp" if resume.sharded else "ddp"
    return (
        f"distill.strategy: the checkpoint of step {resume.step} ({resume.uri}) was written by {wrote} workers and "
        f"this run planned {strategy}; set distill.strategy: {wrote} to resume it"
        + (" (on any worker count, one included)" if wrote == "fsdp" else "")
        + f", or delete {resume.uri.rsplit('/', 1)[0]} to start over"
    )


def run(ctx: Context) -> Summary:
    spec: DistillSpec = ctx.config
    transformers = require("transformers", "distillation")
    transformers.utils.logging.disable_progress_bar()  # no tqdm bars per weight load/save: progress lines say it
    if spec.method != "logits":
        require("datasets", f"{spec.method} distillation").disable_progress_bars()
    world = World.from_env()
    world.init()

    # 1. Fetch inputs.
    job = fetch_inputs(ctx, world)
    log.info(
        "Fetched teacher %s and student %s (shared vocabulary of %d tokens), %s; precision %s; "
        "%d worker(s) on %d node(s), student %s, teacher %s",
        job.teacher_dir.name if job.teacher_dir else "(stored top-k logits)" if job.teacher_logits else "(unused: alpha 0)",
        job.student_dir.name,
        len(job.tokenizer),
        f"{len(job.split.train)} training records" if job.split is not None else "training windows from the tokens",
        job.precision, world.size, world.nodes,
        "on one worker" if job.plan.strategy == "ddp" and not world.distributed else job.plan.strategy,
        job.plan.teacher_load,
    )

    # 2. Transform: train the student, resuming from the newest staged checkpoint.
    checkpoints = Checkpoints(ctx, world)
    resume = checkpoints.latest(ctx.work_dir / "resume")
    if resume and resume.sharded != (job.plan.strategy == "fsdp"):
        raise InvalidSpec(resume_mismatch(resume, job.plan.strategy))
    transformers.set_seed(spec.seed)
    with accelerate_fsdp(job.plan, job.precision):
        built = METHODS[spec.method](ctx, job)
    trainer = built.trainer
    if job.plan.strategy == "fsdp" and not trainer.is_fsdp_enabled:  # a DDP fallback would break the memory plan
        raise InvalidSpec("distill.strategy: fsdp, but accelerate did not shard the student: a sharded stage "
                          "runs under the launcher (python -m kondense_jobs.launch), as kondense run and the Job start it")
    trainer.remove_callback(transformers.PrinterCallback)  # it prints a dict per log; we print progress lines
    progress = callback(ctx, checkpoints, world)
    trainer.add_callback(progress)
    log.info(
        "Distilling with %s: %s steps of %d sequences x %d tokens%s",
        built.what, spec.max_steps or f"{spec.epochs:g} epochs of", spec.global_batch(world.size),
        job.seq, f", resuming from step {resume.step} ({resume.uri})" if resume else "",
    )
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
    train_seconds = time.monotonic() - started
    log.info("Trained %s as %s%s", type(trainer.model).__name__, type(trainer.model_wrapped).__name__, sharding(trainer))
    checkpoints.wait()

    # 3. Publish the student (rank 0); the staged checkpoints are no longer needed.
    metrics = training_metrics(trainer.state, progress, built, train_seconds)
    metrics["peakMemoryGiB"] = job.probe.peak_gib()
    metrics["studentMemoryMiB"] = round(held_bytes(trainer.model) / 2**20, 3)  # this worker's shard under FSDP
    if resume:
        metrics["resumedFromStep"] = float(resume.step)
    save_student(trainer, job.tokenizer, ctx.output_dir(), job.precision, world)
    if not world.is_main:
        world.barrier()  # rank 0 publishes; the workers end together
        return Summary(state="Succeeded", reason="Succeeded", message=f"worker {world.rank} done", metrics=metrics)
    log_published(metrics)
    summary = ctx.publish(metrics=metrics)
    checkpoints.clear()
    world.barrier()
    return summary

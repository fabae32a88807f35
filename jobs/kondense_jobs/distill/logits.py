"""logits: the student learns the teacher's softened next-token distribution, on the training
texts packed into windows of maxSeqLength tokens.

`LogitDistillTrainer` is a `transformers.Trainer` whose `compute_loss` is `kd_loss` (losses.py):
alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(labels). The
teacher runs in eval mode under no_grad, held as the memory plan chose (replicated, sharded
over the workers, int8 or nf4); with alpha 0 it is neither loaded nor run (the CE-only baseline).

Offline (distill.teacherLogits): the windows and the teacher's top-k log-probabilities come
from a teacherLogits stage's artifact (kondense_jobs.teacher_logits), no teacher is loaded, and
the KD term is `topk_kd_loss` (top k plus one tail bucket; its gap is documented there).
"""

from __future__ import annotations

import numpy as np

from kondense.errors import InvalidInput

from kondense_jobs import data
from kondense_jobs.distill.losses import kd_loss, topk_kd_loss
from kondense_jobs.distill.setup import Built, Inputs, load_student, load_teacher, teacher_metrics, training_args
from kondense_jobs.runtime import Context, require


def trainer_class():
    transformers = require("transformers", "distillation")
    torch = require("torch", "distillation")

    class LogitDistillTrainer(transformers.Trainer):
        """transformers.Trainer with the KD loss; the teacher stays outside the optimizer and checkpoints."""

        def __init__(
            self, *args, teacher=None, temperature: float = 2.0, alpha: float = 0.5, vocabulary: int | None = None, **kwargs
        ):
            super().__init__(*args, **kwargs)
            self.teacher, self.temperature, self.alpha = teacher, temperature, alpha
            self.vocabulary = vocabulary  # offline: the tokens the stored teacher's distribution spans

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            outputs = model(input_ids=inputs["input_ids"], attention_mask=mask)
            student_logits = outputs.logits
            if "top_ids" in inputs:  # offline: the teacher's stored top k
                loss = topk_kd_loss(
                    student_logits, inputs["top_logprobs"], inputs["top_ids"], inputs["labels"], self.temperature,
                    self.alpha, num_items_in_batch, self.vocabulary,
                )
            else:
                loss = self._online_loss(inputs, mask, student_logits, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts the tokens of every worker's batch, and DDP/FSDP average the
                # gradients over the workers: scale back up, as Trainer.compute_loss does for its own losses.
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

        def _online_loss(self, inputs, mask, student_logits, num_items_in_batch):
            teacher_logits = None
            if self.alpha > 0:
                with torch.no_grad():
                    device = self.teacher.device
                    teacher_logits = self.teacher(
                        input_ids=inputs["input_ids"].to(device),
                        attention_mask=None if mask is None else mask.to(device),
                    ).logits.to(student_logits.device)
            # vocabularies padded differently (Qwen2.5 7B vs 0.5B): kd_loss compares the ids they share
            return kd_loss(
                student_logits, teacher_logits, inputs["labels"], self.temperature, self.alpha, num_items_in_batch
            )

    return LogitDistillTrainer


class Windows:
    """Map-style dataset of equal-length token windows; labels are the inputs (the model shifts).

    `rows` is a tensor, or an (n, L) view of the tokens artifact's memory map: a row is then
    converted to int64 when the Trainer asks for it, so only the batches in flight are in memory."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i):
        row = self.rows[i]
        if isinstance(row, np.ndarray):
            import torch

            row = torch.from_numpy(data.long_rows(row))
        return {"input_ids": row, "labels": row}


def build(ctx: Context, job: Inputs) -> Built:
    if job.teacher_logits is not None:
        return build_offline(ctx, job)
    transformers = require("transformers", "distillation")
    spec = job.spec
    with job.world.local_main_first():  # a node's first worker builds or fetches the tokens, the others reuse them
        stream = data.tokens(ctx, job.tokenizer).train
    rows = data.windows(stream, job.seq)
    if not len(rows):
        raise InvalidInput(
            f"dataset: the training split holds fewer than maxSeqLength={job.seq} tokens; lower maxSeqLength"
        )
    args = training_args(transformers.TrainingArguments, job)
    student = load_student(job)
    teacher = load_teacher(job) if job.teacher_dir else None
    trainer = trainer_class()(
        model=student,
        args=args,
        train_dataset=Windows(rows),
        data_collator=transformers.default_data_collator,
        processing_class=job.tokenizer,
        teacher=teacher,
        temperature=spec.temperature,
        alpha=spec.alpha,
    )
    skipped = ", teacher skipped" if teacher is None else f", teacher {job.plan.teacher_load}"
    return Built(
        trainer,
        f"logit KD (T={spec.temperature:g}, alpha={spec.alpha:g}{skipped})",
        spec.global_batch(job.world.size) * job.seq,
        {"trainWindows": float(len(rows)), **teacher_metrics(teacher)},
    )


def build_offline(ctx: Context, job: Inputs) -> Built:
    """The same trainer on a teacherLogits artifact: its windows, its top-k; no teacher in memory."""
    transformers = require("transformers", "distillation")
    from kondense_jobs.distill.setup import _config
    from kondense_jobs.teacher_logits import StoredLogits

    spec = job.spec
    assert job.teacher_logits is not None
    stored = StoredLogits(job.teacher_logits, ctx.run.models["teacherLogits"].uri)
    stored.check(job.tokenizer, job.seq, _config(job.student_dir).get("vocab_size") or len(job.tokenizer))
    # the items carry the teacher's top k: the Trainer must not drop what the model's forward does not name
    args = training_args(transformers.TrainingArguments, job, remove_unused_columns=False)
    trainer = trainer_class()(
        model=load_student(job),
        args=args,
        train_dataset=stored,
        data_collator=transformers.default_data_collator,
        processing_class=job.tokenizer,
        temperature=spec.temperature,
        alpha=spec.alpha,
        vocabulary=int(stored.meta["vocabulary"]),
    )
    return Built(
        trainer,
        f"logit KD (T={spec.temperature:g}, alpha={spec.alpha:g}, the teacher's stored top-{stored.top_k} logits)",
        spec.global_batch(job.world.size) * job.seq,
        {"trainWindows": float(len(stored)), "teacherTopK": float(stored.top_k)},
    )

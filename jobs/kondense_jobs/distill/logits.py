"""logits: the student learns the teacher's softened next-token distribution, on the training
texts packed into windows of maxSeqLength tokens.

`LogitDistillTrainer` is a `transformers.Trainer` whose `compute_loss` is `kd_loss`:
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
from kondense_jobs.distill.setup import Built, Inputs, load_student, load_teacher, teacher_metrics, training_args
from kondense_jobs.runtime import Context, require


def _shifted(student_logits, labels, num_items_in_batch):
    """The logits that predict a token, their targets, the mask of real targets and the divisor."""
    logits = student_logits[:, :-1, :]
    target = labels[:, 1:]
    mask = target != -100
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp_min(1)
    return logits, target, mask, denom


def _ce_term(logits, target, denom, alpha: float):
    import torch.nn.functional as F

    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return (1 - alpha) * ce / denom


def _masked(x, mask):
    """The rows of x (batch, seq, ...) at the masked positions, without a copy when all count."""
    return x.reshape(-1, *x.shape[2:]) if bool(mask.all()) else x[mask]


def kd_loss(
    student_logits, teacher_logits, labels, temperature: float, alpha: float, num_items_in_batch=None
):
    """alpha * T^2 * KL(p_teacher || p_student) at temperature T + (1 - alpha) * CE(labels).

    Logits are (batch, seq, vocab) as a causal LM returns them and labels (batch, seq) as in
    Hugging Face: position t predicts labels[t + 1], and -100 marks positions without a target
    (padding, prompts). The KL is summed over the vocabulary; both terms are averaged over the
    predicted tokens, or divided by `num_items_in_batch` (the token count of the whole
    accumulated batch, which Trainer passes) so that gradient accumulation is exact.
    `teacher_logits` may be None when alpha is 0.
    """
    import torch
    import torch.nn.functional as F

    logits, target, mask, denom = _shifted(student_logits, labels, num_items_in_batch)
    loss = logits.new_zeros((), dtype=torch.float32)
    if alpha < 1:
        loss = loss + _ce_term(logits, target, denom, alpha)
    if alpha > 0:
        if teacher_logits is None:
            raise ValueError("kd_loss: alpha > 0 needs teacher_logits")
        s, t = _masked(logits, mask), _masked(teacher_logits[:, :-1, :], mask)
        log_p_student = F.log_softmax(s.float() / temperature, dim=-1)
        log_p_teacher = F.log_softmax(t.float() / temperature, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
        loss = loss + alpha * temperature**2 * kl / denom
    return loss


def topk_kd_loss(
    student_logits, top_logprobs, top_ids, labels, temperature: float, alpha: float, num_items_in_batch=None,
    vocabulary: int | None = None,
):
    """kd_loss with the teacher's stored top-k in place of its whole distribution (offline logits).

    `top_logprobs` and `top_ids` are (batch, seq - 1, k): at position t (which predicts
    labels[t + 1]) the teacher's k most likely token ids and their log-probabilities at
    temperature 1 over its whole vocabulary of `vocabulary` tokens (default: the student's
    logits' width), as a teacherLogits stage stores them.

    The approximation: top k plus one tail bucket. The KD term is the KL between the two
    distributions coarsened to k + 1 outcomes (the teacher's top-k tokens, and "any other token"):
        KD = alpha * T^2 * [sum_i p~_i log(p~_i / q_T(i)) + tau log(tau / q_T(tail))],
    q_T the student's full softmax at T, q_T(tail) its mass outside the teacher's top k. At T = 1
    the teacher's side is exact: p~_i = P(i), tau = 1 - sum_i P(i). At another T the tail's own
    logits are unknown; they are taken as equal (the tail's mass at T = 1 spread evenly over its
    vocabulary - k tokens), which over-estimates the tail's mass for T > 1 and under-estimates it
    for T < 1. Why not renormalize over the top k alone: with the student's full softmax that
    drives the student's tail mass to zero, and on a flat teacher (the demo's top 64 of 4096 hold
    54% of the mass) the offline student's perplexity came out 5x the online one's.

    The gap, for any student: per predicted token, the gradient w.r.t. the student's logits
    differs from the full-distribution term's by an L1 norm of at most 2 * alpha * T *
    max(1 - m_T, tau_T), m_T the teacher's true top-k mass at T and tau_T the bucket's; at T = 1
    it is 0 on the top-k logits and at most 2 * alpha * (1 - m_1) on the others, and the term is
    at most the full one (coarsening never increases a KL). Equal to kd_loss when k covers the
    vocabulary. tests/jobs/test_teacher_logits.py checks these on random and peaked teachers.
    """
    import math

    import torch

    if vocabulary is not None:
        student_logits = student_logits[..., :vocabulary]
    logits, target, mask, denom = _shifted(student_logits, labels, num_items_in_batch)
    loss = logits.new_zeros((), dtype=torch.float32)
    if alpha < 1:
        loss = loss + _ce_term(logits, target, denom, alpha)
    if alpha > 0:
        s = _masked(logits, mask).float() / temperature
        values, ids = _masked(top_logprobs, mask).float(), _masked(top_ids, mask).long()
        tail_tokens = (vocabulary or s.shape[-1]) - values.shape[-1]
        total = s.logsumexp(-1, keepdim=True)
        log_q = s.gather(-1, ids) - total
        teacher = values / temperature
        if tail_tokens > 0:
            # the teacher's tail mass at T = 1 (fp16 sums may reach 1: keep it above 0), spread evenly
            tail_1 = torch.log(-torch.expm1(values.logsumexp(-1, keepdim=True).clamp(max=-1e-6)))
            tail_t = math.log(tail_tokens) + (tail_1 - math.log(tail_tokens)) / temperature
            teacher = torch.cat([teacher, tail_t], -1)
            outside = s.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True) - total
            log_q = torch.cat([log_q, outside], -1)
        log_p = torch.log_softmax(teacher, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum()
        loss = loss + alpha * temperature**2 * kl / denom
    return loss


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
            student_logits, teacher_logits = outputs.logits, None
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
                # Same tokenizer, vocab_size padded differently (Qwen2.5 7B vs 0.5B): compare the shared ids.
                vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
                student_logits, teacher_logits = student_logits[..., :vocab], teacher_logits[..., :vocab]
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

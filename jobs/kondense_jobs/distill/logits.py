"""logits: the student learns the teacher's softened next-token distribution, on the training
texts packed into windows of maxSeqLength tokens.

`LogitDistillTrainer` is a `transformers.Trainer` whose `compute_loss` is `kd_loss`:
alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(labels). The
teacher runs in eval mode under no_grad, held as the memory plan chose (replicated, sharded
over the workers, int8 or nf4); with alpha 0 it is neither loaded nor run (the CE-only baseline).
"""

from __future__ import annotations

from kondense.errors import InvalidInput

from kondense_jobs import data
from kondense_jobs.distill.setup import Built, Inputs, load_student, load_teacher, training_args
from kondense_jobs.runtime import Context, require


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

    logits = student_logits[:, :-1, :]
    target = labels[:, 1:]
    mask = target != -100
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp_min(1)
    vocab = logits.shape[-1]
    loss = logits.new_zeros((), dtype=torch.float32)
    if alpha < 1:
        ce = F.cross_entropy(
            logits.reshape(-1, vocab).float(), target.reshape(-1), ignore_index=-100, reduction="sum"
        )
        loss = loss + (1 - alpha) * ce / denom
    if alpha > 0:
        if teacher_logits is None:
            raise ValueError("kd_loss: alpha > 0 needs teacher_logits")
        teacher = teacher_logits[:, :-1, :]
        if bool(mask.all()):  # packed windows: no copy of the logits
            s, t = logits.reshape(-1, vocab), teacher.reshape(-1, vocab)
        else:
            s, t = logits[mask], teacher[mask]
        log_p_student = F.log_softmax(s.float() / temperature, dim=-1)
        log_p_teacher = F.log_softmax(t.float() / temperature, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
        loss = loss + alpha * temperature**2 * kl / denom
    return loss


def trainer_class():
    transformers = require("transformers", "distillation")
    torch = require("torch", "distillation")

    class LogitDistillTrainer(transformers.Trainer):
        """transformers.Trainer with the KD loss; the teacher stays outside the optimizer and checkpoints."""

        def __init__(self, *args, teacher=None, temperature: float = 2.0, alpha: float = 0.5, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            outputs = model(input_ids=inputs["input_ids"], attention_mask=mask)
            student_logits, teacher_logits = outputs.logits, None
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
            loss = kd_loss(
                student_logits, teacher_logits, inputs["labels"], self.temperature, self.alpha, num_items_in_batch
            )
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                # num_items_in_batch counts the tokens of every worker's batch, and DDP/FSDP average the
                # gradients over the workers: scale back up, as Trainer.compute_loss does for its own losses.
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return LogitDistillTrainer


class Windows:
    """Map-style dataset of equal-length token windows; labels are the inputs (the model shifts)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def build(ctx: Context, job: Inputs) -> Built:
    torch = require("torch", "distillation")
    transformers = require("transformers", "distillation")
    spec = job.spec
    rows = data.windows(data.token_stream(job.tokenizer, data.texts(job.split.train, ctx.run.dataset)), job.seq)
    if not rows:
        raise InvalidInput(
            f"dataset: the training split holds fewer than maxSeqLength={job.seq} tokens; lower maxSeqLength"
        )
    args = training_args(transformers.TrainingArguments, job)
    student = load_student(job)
    teacher = load_teacher(job) if job.teacher_dir else None
    trainer = trainer_class()(
        model=student,
        args=args,
        train_dataset=Windows(torch.tensor(rows, dtype=torch.long)),
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
        {"trainWindows": float(len(rows))},
    )

"""The logit-distillation losses: the full-distribution KD term (online teacher) and its top-k
approximation (the teacher's stored logits).

`kd_loss` computes the loss and its gradient together, a block of positions at a time, so that no
fp32 copy of the (batch, seq, vocab) logits is ever whole in memory: it keeps one tensor of the
logits' shape and dtype (the gradient, handed to backward) and per block a few fp32 tensors of
`KD_BLOCK_ELEMENTS` values (kondense.memory, whose estimate counts them). The autograd version of
the same formula keeps the upcast logits, their log-softmax at T and at 1 and the teacher's fp32
log-probabilities alive until backward, each as large as the logits: at real size (128k
vocabulary, 32k tokens a micro-batch) each is 16 GiB. It works on the logits any causal LM
returns, whatever comes before them (soft-capping, scaled or tied embeddings, FSDP-sharded
heads), which a loss fused with the LM head would have to know.
"""

from __future__ import annotations

import functools
import math

from kondense.memory import KD_BLOCK_ELEMENTS


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


def _block(s, t, target, mask, temperature: float, alpha: float):
    """One block of rows: the loss summed over its rows and its gradient w.r.t. s (fp32, unscaled).

    s, t: (rows, vocab) student and teacher logits; target: (rows,) token ids, -100 where none;
    mask: target != -100. The KD term's gradient is alpha * T * (q_T - p_T), the CE term's
    (1 - alpha) * (q_1 - onehot(target)), q and p the student's and the teacher's softmax.
    """
    import torch

    s = s.float()
    weight = mask.to(s.dtype)
    loss = s.new_zeros(())
    grad = None
    if alpha < 1:
        log_q = torch.log_softmax(s, -1)
        index = target.clamp_min(0).unsqueeze(1)
        loss = loss - (1 - alpha) * (log_q.gather(1, index).squeeze(1) * weight).sum()
        grad = log_q.exp_().scatter_add_(1, index, torch.full_like(index, -1, dtype=s.dtype)).mul_(1 - alpha)
    if alpha > 0:
        log_p = torch.log_softmax(t.float() / temperature, -1)
        log_q = torch.log_softmax(s / temperature, -1)
        p = log_p.exp()
        kl = log_p.sub_(log_q).mul_(p).sum(-1)  # log_p is spent: KL(p || q) per row
        loss = loss + alpha * temperature**2 * (kl * weight).sum()
        kd = log_q.exp_().sub_(p).mul_(alpha * temperature)
        grad = kd if grad is None else grad.add_(kd)
    return loss, grad.mul_(weight.unsqueeze(1))


@functools.cache
def _kd_function():
    import torch

    class FusedKD(torch.autograd.Function):
        """The KD + CE loss of (rows, V) logits, its gradient computed in the forward pass block by
        block and kept in the logits' dtype for backward (which only scales it)."""

        @staticmethod
        def forward(ctx, student, teacher, target, temperature, alpha, denom):
            vocab = student.shape[-1] if teacher is None else min(student.shape[-1], teacher.shape[-1])
            grad = torch.zeros_like(student)
            total = student.new_zeros((), dtype=torch.float32)
            step = max(1, KD_BLOCK_ELEMENTS["cpu" if student.device.type == "cpu" else "gpu"] // vocab)
            for start in range(0, student.shape[0], step):
                rows = slice(start, start + step)
                mask = target[rows] != -100
                if not bool(mask.any()):
                    continue
                t = None if teacher is None else teacher[rows, :vocab]
                loss, g = _block(student[rows, :vocab], t, target[rows], mask, temperature, alpha)
                total += loss
                grad[rows, :vocab] = g.div_(denom)
            ctx.save_for_backward(grad)
            return total / denom

        @staticmethod
        def backward(ctx, grad_output):
            (grad,) = ctx.saved_tensors
            return grad * grad_output.to(grad.dtype), None, None, None, None, None

    return FusedKD


def kd_loss(
    student_logits, teacher_logits, labels, temperature: float, alpha: float, num_items_in_batch=None
):
    """alpha * T^2 * KL(p_teacher || p_student) at temperature T + (1 - alpha) * CE(labels).

    Logits are (batch, seq, vocab) as a causal LM returns them and labels (batch, seq) as in
    Hugging Face: position t predicts labels[t + 1], and -100 marks positions without a target
    (padding, prompts). The KL is summed over the vocabulary; both terms are averaged over the
    predicted tokens, or divided by `num_items_in_batch` (the token count of the whole
    accumulated batch, which Trainer passes) so that gradient accumulation is exact.
    `teacher_logits` may be None when alpha is 0. When the two vocabularies differ in width (the
    same tokenizer, embeddings padded differently: Qwen2.5 7B vs 0.5B) both terms use the ids
    they share; the student's other logits get no gradient.
    Memory: see the module's docstring; the values equal the plain autograd formula's.
    """
    import torch

    if alpha > 0 and teacher_logits is None:
        raise ValueError("kd_loss: alpha > 0 needs teacher_logits")
    target = torch.full_like(labels, -100)
    target[:, :-1] = labels[:, 1:]
    denom = num_items_in_batch if num_items_in_batch is not None else (target != -100).sum().clamp_min(1)
    rows = student_logits.shape[0] * student_logits.shape[1]
    teacher = None
    if alpha > 0:
        teacher = teacher_logits.reshape(rows, teacher_logits.shape[-1])
    return _kd_function().apply(
        student_logits.reshape(rows, student_logits.shape[-1]), teacher, target.reshape(-1), float(temperature),
        float(alpha), denom,
    )


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

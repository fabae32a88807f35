"""The logit-distillation losses: the full-distribution KD term (online teacher) and its top-k
approximation (the teacher's stored logits).

Both compute the loss and its gradient together, a block of positions at a time, so that no
fp32 copy of the (batch, seq, vocab) logits is ever whole in memory: each keeps one tensor of the
logits' shape and dtype (the gradient, handed to backward) and per block a few fp32 tensors of
`KD_BLOCK_ELEMENTS` values (kondense.memory, whose estimate counts them). The autograd versions of
the same formulas keep the upcast logits, their log-softmax at T and at 1 and the teacher's fp32
log-probabilities alive until backward, each as large as the logits: at real size (128k
vocabulary, 32k tokens a micro-batch) each is 16 GiB. They work on the logits any causal LM
returns, whatever comes before them (soft-capping, scaled or tied embeddings, FSDP-sharded
heads), which a loss fused with the LM head would have to know.
"""

from __future__ import annotations

import functools
import math

from kondense.memory import KD_BLOCK_ELEMENTS


def _cross_entropy(s, target, alpha: float):
    """(1 - alpha) * CE per row of s (fp32 logits), and its gradient (1 - alpha) * (q - onehot(target))."""
    import torch

    log_q = torch.log_softmax(s, -1)
    index = target.clamp_min(0).unsqueeze(1)
    loss = -(1 - alpha) * log_q.gather(1, index).squeeze(1)
    grad = log_q.exp_().scatter_add_(1, index, torch.full_like(index, -1, dtype=s.dtype)).mul_(1 - alpha)
    return loss, grad


def _full_kd(s, t, temperature: float, alpha: float):
    """alpha * T^2 * KL(p_T || q_T) per row, and its gradient alpha * T * (q_T - p_T)."""
    import torch

    log_p = torch.log_softmax(t.float() / temperature, -1)
    log_q = torch.log_softmax(s / temperature, -1)
    p = log_p.exp()
    kl = log_p.sub_(log_q).mul_(p).sum(-1)  # log_p is spent: KL(p || q) per row
    return alpha * temperature**2 * kl, log_q.exp_().sub_(p).mul_(alpha * temperature)


def _topk_kd(s, values, ids, temperature: float, alpha: float, vocabulary: int):
    """topk_kd_loss's KD term per row (see there), and its gradient: alpha * T * (q_T - p~ on the
    teacher's top k - tau * the student's own distribution over the other tokens at T)."""
    import torch

    z = s / temperature
    total = z.logsumexp(-1, keepdim=True)
    values, ids = values.float(), ids.long()
    teacher = values / temperature
    log_q = z.gather(-1, ids) - total
    tail_tokens = vocabulary - values.shape[-1]
    if tail_tokens > 0:
        # the teacher's tail mass at T = 1 (fp16 sums may reach 1: keep it above 0), spread evenly; in
        # float64, as 1 - (top-k mass) of a peaked teacher is below fp32's resolution near 1
        top = values.double().logsumexp(-1, keepdim=True).clamp(max=-1e-6)
        tail_1 = torch.log(-torch.expm1(top)).float()
        tail_t = math.log(tail_tokens) + (tail_1 - math.log(tail_tokens)) / temperature
        teacher = torch.cat([teacher, tail_t], -1)
        outside = z.scatter(-1, ids, float("-inf"))
        outside_total = outside.logsumexp(-1, keepdim=True)
        log_q = torch.cat([log_q, outside_total - total], -1)
    log_p = torch.log_softmax(teacher, -1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum(-1)
    grad = z.sub_(total).exp_()  # q_T; z is spent
    if tail_tokens > 0:
        grad.sub_(outside.sub_(outside_total).exp_().mul_(p[:, -1:]))  # the bucket's mass, spread as q_T spreads it
    grad.scatter_add_(-1, ids, -p[:, : ids.shape[-1]])
    return alpha * temperature**2 * kl, grad.mul_(alpha * temperature)


@functools.cache
def _function():
    import torch

    class Blockwise(torch.autograd.Function):
        """A loss of (rows, V) logits summed over the rows with a target, divided by `denom`; its
        gradient is computed in the forward pass a block of rows at a time, by `terms(rows, s,
        target) -> (loss per row, gradient)` on the block's first `vocab` logits in fp32, and kept
        in the logits' dtype for backward (which only scales it)."""

        @staticmethod
        def forward(ctx, student, target, denom, vocab, terms):
            grad = torch.zeros_like(student)
            total = student.new_zeros((), dtype=torch.float32)
            step = max(1, KD_BLOCK_ELEMENTS["cpu" if student.device.type == "cpu" else "gpu"] // vocab)
            for start in range(0, student.shape[0], step):
                rows = slice(start, start + step)
                mask = target[rows] != -100  # no skipping of empty blocks: bool(mask.any()) syncs a GPU per block
                loss, g = terms(rows, student[rows, :vocab].float(), target[rows])
                # where, not a product: a position without a target may hold any logits (NaN under padding)
                total += torch.where(mask, loss, 0.0).sum()
                grad[rows, :vocab] = g.masked_fill_(~mask.unsqueeze(1), 0.0).div_(denom)
            ctx.save_for_backward(grad)
            return total / denom

        @staticmethod
        def backward(ctx, grad_output):
            (grad,) = ctx.saved_tensors
            return grad * grad_output.to(grad.dtype), None, None, None, None

    return Blockwise


def _blockwise(student_logits, labels, num_items_in_batch, vocab: int, alpha: float, kd_term):
    """(1 - alpha) * CE + kd_term over the positions with a target, through `Blockwise`.

    kd_term(rows, s) -> (loss per row, gradient) for the flattened rows (batch * seq) of a block;
    None when alpha is 0."""
    import torch

    target = torch.full_like(labels, -100)
    target[:, :-1] = labels[:, 1:]  # position t predicts labels[t + 1]
    target = target.reshape(-1)
    denom = num_items_in_batch if num_items_in_batch is not None else (target != -100).sum().clamp_min(1)

    def terms(rows, s, y):
        loss, grad = _cross_entropy(s, y, alpha) if alpha < 1 else (None, None)
        if kd_term is not None:
            kd, kd_grad = kd_term(rows, s)
            loss, grad = (kd, kd_grad) if loss is None else (loss.add_(kd), grad.add_(kd_grad))
        return loss, grad

    flat = student_logits.reshape(-1, student_logits.shape[-1])
    return _function().apply(flat, target, denom, vocab, terms)


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
    if alpha > 0 and teacher_logits is None:
        raise ValueError("kd_loss: alpha > 0 needs teacher_logits")
    vocab = student_logits.shape[-1]
    kd_term = None
    if alpha > 0:
        vocab = min(vocab, teacher_logits.shape[-1])
        teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1])

        def kd_term(rows, s):
            return _full_kd(s, teacher[rows, :vocab], temperature, alpha)

    return _blockwise(student_logits, labels, num_items_in_batch, vocab, alpha, kd_term)


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
    import torch.nn.functional as F

    vocab = vocabulary or student_logits.shape[-1]
    kd_term = None
    if alpha > 0:
        # (batch, seq - 1, k) -> one row per position, as the logits: the last position has no target
        values = F.pad(top_logprobs, (0, 0, 0, 1)).reshape(-1, top_logprobs.shape[-1])
        ids = F.pad(top_ids, (0, 0, 0, 1)).reshape(-1, top_ids.shape[-1])

        def kd_term(rows, s):
            return _topk_kd(s, values[rows], ids[rows], temperature, alpha, vocab)

    return _blockwise(student_logits, labels, num_items_in_batch, vocab, alpha, kd_term)

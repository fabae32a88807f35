"""Offline teacher logits: the top-k KD loss against the full one, the teacher_logits stage (its
artifact, its resume after a kill, bad input) and the logits method trained from it.

End-to-end tests run the real entrypoint (`python -m kondense_jobs teacher_logits|distill`) on
the tiny models of conftest.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kondense.api import DistillSpec, InputRef, TeacherLogitsSpec
from kondense.store import FileStore
from kondense_jobs.distill import kd_loss
from kondense_jobs.distill.losses import topk_kd_loss

FAST = dict(learning_rate=3e-3, batch_size=4, max_seq_length=64, checkpoint_every=1000, seed=0)


# ---------------------------------------------------------------------------------------------
# The top-k loss against the full-distribution loss
# ---------------------------------------------------------------------------------------------


def teacher_student(kind: str, vocab: int = 1024, seq: int = 33, seed: int = 0):
    """(student logits, teacher logits, labels): a spread-out random teacher, or a peaked one
    (8 tokens per position far above the rest, as a trained LM's next-token distribution)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, seq, vocab, generator=g)
    teacher = 2 * torch.randn(2, seq, vocab, generator=g)
    if kind == "peaked":
        hot = torch.randint(0, vocab, (2, seq, 8), generator=g)
        teacher.scatter_add_(-1, hot, torch.full(hot.shape, 12.0))
    labels = torch.randint(0, vocab, (2, seq), generator=g)
    return student, teacher, labels


def stored(teacher, k: int):
    """What a teacher_logits stage stores: the top-k log-probabilities at T=1 (and ids) of the predicting positions."""
    values, ids = torch.log_softmax(teacher[:, :-1].float(), -1).topk(k, -1)
    return values, ids


def autograd_topk_kd_loss(student, values, ids, labels, temperature, alpha, vocabulary):
    """topk_kd_loss's formula (its docstring) as plain autograd, position by position, in float64."""
    s, y = student[:, :-1, :vocabulary].double(), labels[:, 1:]
    mask = y != -100
    loss = (1 - alpha) * F.cross_entropy(s.reshape(-1, vocabulary), y.reshape(-1), ignore_index=-100, reduction="sum")
    z = s[mask] / temperature
    v, i = values[mask].double(), ids[mask]
    tail = vocabulary - v.shape[-1]
    q = torch.log_softmax(z, -1)
    tail_1 = torch.log1p(-v.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    p = torch.log_softmax(torch.cat([v / temperature, math.log(tail) + (tail_1 - math.log(tail)) / temperature], -1), -1)
    outside = torch.logsumexp(q.scatter(-1, i, float("-inf")), -1, keepdim=True)
    kl = (p.exp() * (p - torch.cat([q.gather(-1, i), outside], -1))).sum()
    return (loss + alpha * temperature**2 * kl) / mask.sum()


@pytest.mark.parametrize("temperature, alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.3)], ids=lambda v: f"{v:g}")
def test_topk_loss_and_its_gradient_equal_the_autograd_formula_across_blocks(monkeypatch, temperature, alpha):
    from kondense import memory

    vocab, k = 96, 8
    monkeypatch.setitem(memory.KD_BLOCK_ELEMENTS, "cpu", 5 * vocab)  # blocks of 5 rows: 66 rows, 14 blocks
    student, teacher, labels = teacher_student("peaked", vocab=vocab + 4, seq=33)  # 4 padding logits past the vocabulary
    teacher = teacher[..., :vocab]
    labels = labels % vocab
    labels[1, :6] = -100
    values, ids = stored(teacher, k)
    ours, theirs = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    loss = topk_kd_loss(ours, values.half(), ids, labels, temperature, alpha, vocabulary=vocab)
    expected = autograd_topk_kd_loss(theirs, values.half(), ids, labels, temperature, alpha, vocab)
    loss.backward()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7)
    assert ours.grad[..., vocab:].abs().sum() == 0 and ours.grad[1, :5].abs().sum() == 0


def test_topk_loss_is_the_full_loss_when_k_covers_the_vocabulary():
    student, teacher, labels = teacher_student("random", vocab=64)
    labels[0, :5] = -100  # a prompt: not counted by either
    values, ids = stored(teacher, 64)
    for alpha, temperature in ((1.0, 2.0), (0.5, 1.0), (0.3, 4.0)):
        full = kd_loss(student, teacher, labels, temperature, alpha)
        top = topk_kd_loss(student, values, ids, labels, temperature, alpha)
        assert top.item() == pytest.approx(full.item(), rel=1e-5)
    # fp16 as stored: the same to within fp16's rounding of the log-probabilities
    assert topk_kd_loss(student, values.half(), ids, labels, 2.0, 1.0).item() == pytest.approx(
        kd_loss(student, teacher, labels, 2.0, 1.0).item(), rel=1e-3
    )


@pytest.mark.parametrize("kind, temperature", [("random", 2.0), ("random", 1.0), ("peaked", 2.0), ("peaked", 1.0)],
                         ids=lambda v: f"{v:g}" if isinstance(v, float) else v)
def test_topk_loss_gap_to_the_full_loss_is_bounded_by_the_teachers_missing_mass(kind, temperature):
    """The stated gap (topk_kd_loss's docstring): per predicted token, the gradient w.r.t. the
    student's logits differs from the full-distribution KD term's by an L1 norm of at most
    2 * alpha * T * max(1 - m_T, tau_T) / N (N predicted tokens, m_T the teacher's top-k mass at T,
    tau_T the tail bucket's), whatever the student; at T = 1 not at all on the top-k logits, and
    the loss is at most the full one.

    Measured here (k=64 of 1024, 64 tokens), sum |grad gap| / sum |full grad|: random teacher
    (m_1 0.67) 0.28 at T=1, 0.69 at T=2; peaked teacher (m_1 0.999) 0.0005 at T=1, 0.13 at T=2.
    """
    k, alpha, vocab = 64, 1.0, 1024
    student, teacher, labels = teacher_student(kind, vocab=vocab)
    values, ids = stored(teacher, k)
    s_full, s_top = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    full = kd_loss(s_full, teacher, labels, temperature, alpha)
    top = topk_kd_loss(s_top, values, ids, labels, temperature, alpha)
    full.backward()
    top.backward()

    mass = torch.softmax(teacher[:, :-1] / temperature, -1).gather(-1, ids).sum(-1)  # m_T per position
    log_tail_1 = torch.log(-torch.expm1(values.logsumexp(-1, keepdim=True).clamp(max=-1e-6)))  # as the loss keeps it
    bucket = math.log(vocab - k) + (log_tail_1 - math.log(vocab - k)) / temperature
    tau = torch.softmax(torch.cat([values / temperature, bucket], -1), -1)[..., -1]
    n = labels[:, 1:].numel()
    diff = (s_full.grad - s_top.grad)[:, :-1]
    gap = diff.abs().sum(-1)
    assert (gap <= 2 * alpha * temperature * torch.maximum(1 - mass, tau) / n + 1e-6).all()
    assert float(gap.max()) > 1e-5  # a real truncation: the bound is not trivially met by equality
    relative = float(diff.abs().sum() / s_full.grad.abs().sum())
    expected = {("random", 1.0): 0.28, ("random", 2.0): 0.69, ("peaked", 1.0): 0.0005, ("peaked", 2.0): 0.13}
    assert relative == pytest.approx(expected[kind, temperature], rel=0.1, abs=2e-4)
    if temperature == 1.0:  # the tail bucket is exact at T = 1: the top-k logits get the full gradient
        on_top = diff.gather(-1, ids)
        assert float(on_top.abs().max()) < 1e-7
        assert float(gap.max()) <= 2 * alpha * float((1 - mass).max()) / n + 1e-6
        assert top.item() <= full.item() + 1e-6  # coarsening never increases a KL


def test_topk_loss_masks_positions_and_mixes_cross_entropy():
    student, teacher, labels = teacher_student("peaked", vocab=128, seq=9)
    values, ids = stored(teacher, 16)
    labels[1, :4] = -100
    mixed = topk_kd_loss(student, values, ids, labels, 2.0, 0.3)
    kd, ce = (topk_kd_loss(student, values, ids, labels, 2.0, a) for a in (1.0, 0.0))
    assert mixed.item() == pytest.approx(0.3 * kd.item() + 0.7 * ce.item(), rel=1e-6)
    assert ce.item() == pytest.approx(kd_loss(student, None, labels, 2.0, 0.0).item(), rel=1e-6)
    masked = torch.nn.functional.pad(labels[:, 1:] == -100, (0, 1))
    noisy = student + 100 * masked.unsqueeze(-1) * torch.randn_like(student)
    assert topk_kd_loss(noisy, values, ids, labels, 2.0, 0.5).item() == pytest.approx(
        topk_kd_loss(student, values, ids, labels, 2.0, 0.5).item(), rel=1e-6
    )
    identical = topk_kd_loss(teacher, values, ids, labels, 1.0, 1.0)  # the teacher itself, at T = 1: exact
    assert abs(identical.item()) < 1e-5 < kd.item()


# ---------------------------------------------------------------------------------------------
# The teacher_logits stage
# ---------------------------------------------------------------------------------------------

K, SEQ = 16, 64


def teacher_pass(tmp_path, make_run, run_stage, teacher, dataset, **fields):
    spec = TeacherLogitsSpec(**{"top_k": K, "max_seq_length": SEQ, "chunk_windows": 64, "batch_size": 16, **fields})
    run, path = make_run(tmp_path, "teacher_logits", spec, {"teacher": teacher}, dataset, stage="teacher-logits")
    return run, path


def logits_ref(run) -> InputRef:
    return InputRef(uri=run.output, stage=run.stage, input_digest=run.input_digest)


@pytest.fixture(scope="module")
def stored_logits(tmp_path_factory, make_run, run_stage, tiny_teacher, tiny_dataset):
    """One teacher pass (top 16, windows of 64) shared by the tests that read it: (run, summary, output)."""
    tmp = tmp_path_factory.mktemp("stored-logits")
    run, path = teacher_pass(tmp, make_run, run_stage, tiny_teacher, tiny_dataset)
    code, summary, output = run_stage("teacher_logits", path, tmp)
    assert code == 0, output[-3000:]
    return run, summary, output


def test_the_artifact_holds_the_teachers_top_k_in_chunks_committed_last(stored_logits, tiny_teacher):
    from transformers import AutoModelForCausalLM

    run, summary, output = stored_logits
    folder = FileStore.path(run.output)
    manifest = json.loads((folder / "manifest.json").read_text())
    meta = json.loads((folder / "teacher-logits.json").read_text())
    m = summary.metrics
    assert meta["topK"] == K and meta["windowLength"] == SEQ and meta["idDtype"] == "uint16"
    assert meta["chunks"] == m["chunks"] == -(-meta["windows"] // 64) >= 2
    assert m["chunksComputed"] == meta["chunks"] and m["chunksReused"] == 0
    assert m["teacherForwardPasses"] == sum(-(-min(64, meta["windows"] - 64 * i) // 16) for i in range(meta["chunks"]))
    listed = set(manifest["files"])
    assert listed == {"teacher-logits.json"} | {f"chunks/{i:05d}/{a}.npy" for i in range(meta["chunks"])
                                                  for a in ("input_ids", "top_ids", "top_logprobs")}
    # 2 bytes of fp16 value + 2 of uint16 id per kept logit, the window's ids, the .npy headers
    assert 4 * K < m["bytesPerToken"] < 4 * K + 4, m["bytesPerToken"]
    assert 0 < m["topKMass"] < 1
    assert f"{m['bytesPerToken']:.1f} bytes per token" in output

    # The first window's values are the teacher's own log-probabilities, largest first.
    ids = np.load(folder / "chunks/00000/input_ids.npy")
    top_ids = np.load(folder / "chunks/00000/top_ids.npy")
    top_lp = np.load(folder / "chunks/00000/top_logprobs.npy")
    assert ids.shape[1] == SEQ and top_ids.shape[1:] == top_lp.shape[1:] == (SEQ - 1, K) and top_lp.dtype == np.float16
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=torch.tensor(ids[:1].astype(np.int64))).logits[0, :-1], -1)
    values, expected = lp.topk(K, -1)
    assert (np.diff(top_lp[0].astype(np.float32), axis=-1) <= 0).all()
    assert (top_ids[0, :, :4] == expected[:, :4].numpy()).all()  # the clear leaders (later ranks may tie in fp16)
    assert np.allclose(top_lp[0].astype(np.float32), values.numpy(), atol=2e-2)


@pytest.mark.slow
def test_distill_trains_from_stored_logits_without_a_teacher(tmp_path, make_run, run_stage, stored_logits, tiny_student, tiny_dataset):
    """alpha 1: the loss is the top-k KD term alone, so the student learns only if that term is there."""
    logits_run, _, _ = stored_logits
    spec = DistillSpec(method="logits", max_steps=8, alpha=1.0, temperature=2.0, teacher_logits="teacher-logits", **FAST)
    run, path = make_run(tmp_path, "distill", spec, {"teacherLogits": logits_ref(logits_run), "student": tiny_student}, tiny_dataset)
    code, summary, output = run_stage("distill", path, tmp_path)
    assert code == 0, output[-3000:]
    m = summary.metrics
    assert m["steps"] == 8 and m["teacherTopK"] == K
    assert m["initialLoss"] > 0.05 and m["finalLoss"] < 0.95 * m["initialLoss"], m
    assert "stored top-16 logits" in output and "teacher (stored top-k logits)" in output
    assert (FileStore.path(summary.artifact.uri) / "model.safetensors").exists()


@pytest.mark.slow
def test_a_killed_teacher_pass_resumes_after_its_last_complete_chunk(
    tmp_path, make_run, run_stage, kill_when_committed, tiny_teacher, tiny_dataset
):
    """One window per chunk: the kill lands after some chunks are committed; the rerun computes
    every other chunk once and none of the committed ones (it recomputes at most the one in progress)."""
    run, path = teacher_pass(tmp_path, make_run, run_stage, tiny_teacher, tiny_dataset, chunk_windows=1, batch_size=1)
    chunks = FileStore.path(run.output) / "chunks"
    committed = kill_when_committed(run, path, tmp_path, chunks, "*/manifest.json")
    assert committed

    code, summary, output = run_stage("teacher_logits", path, tmp_path)
    assert code == 0, output[-3000:]
    m = summary.metrics
    assert m["chunksReused"] == len(committed) < m["chunks"]
    assert m["chunksComputed"] == m["teacherForwardPasses"] == m["chunks"] - len(committed)
    assert f"{len(committed)} chunks already committed" in output


def test_top_k_beyond_the_vocabulary_is_refused_before_any_weight_loads(tmp_path, make_run, run_stage, tiny_teacher, tiny_dataset):
    run, path = teacher_pass(tmp_path, make_run, run_stage, tiny_teacher, tiny_dataset, top_k=2048)
    code, summary, output = run_stage("teacher_logits", path, tmp_path)
    assert code == 10, output[-2000:]
    assert summary.reason == "InvalidSpec"
    assert summary.message.startswith("teacherLogits.topK: 2048 is more than the teacher's vocabulary of 1024 tokens")
    assert not FileStore.path(run.output).exists()


@pytest.fixture(scope="module")
def other_tokenizer_teacher(models_root, corpus_texts) -> Path:
    from kondense_jobs.tiny import build_model, train_tokenizer

    tokenizer = train_tokenizer(corpus_texts[:300], vocab_size=512)
    return build_model(models_root / "teacher-other-tokenizer", tokenizer, family="llama", layers=1, hidden=32, heads=2)


def test_logits_of_another_tokenizer_are_refused_naming_the_file(
    tmp_path, make_run, run_stage, other_tokenizer_teacher, tiny_student, tiny_dataset
):
    logits_run, path = teacher_pass(tmp_path, make_run, run_stage, other_tokenizer_teacher, tiny_dataset)
    code, _, output = run_stage("teacher_logits", path, tmp_path)
    assert code == 0, output[-2000:]
    spec = DistillSpec(method="logits", max_steps=2, teacher_logits="teacher-logits", **FAST)
    run, path = make_run(tmp_path, "distill", spec, {"teacherLogits": logits_ref(logits_run), "student": tiny_student}, tiny_dataset)
    code, summary, output = run_stage("distill", path, tmp_path)
    assert code == 11, output[-2000:]
    assert summary.reason == "InvalidInput"
    assert summary.message.startswith(f"{logits_run.output}/teacher-logits.json: the teacher logits were computed with another tokenizer (512 tokens")
    assert not (FileStore.path(run.output) / "manifest.json").exists()


def test_logits_of_another_window_length_are_refused_naming_the_file(
    tmp_path, make_run, run_stage, stored_logits, tiny_student, tiny_dataset
):
    logits_run, _, _ = stored_logits
    spec = DistillSpec(method="logits", max_steps=2, teacher_logits="teacher-logits", **{**FAST, "max_seq_length": 32})
    run, path = make_run(tmp_path, "distill", spec, {"teacherLogits": logits_ref(logits_run), "student": tiny_student}, tiny_dataset)
    code, summary, output = run_stage("distill", path, tmp_path)
    assert code == 11, output[-2000:]
    assert summary.message.startswith(f"{logits_run.output}/teacher-logits.json: windows of 64 tokens, but this stage trains on 32")


def test_a_half_written_artifact_is_never_read(tmp_path, make_run, run_stage, stored_logits, tiny_student, tiny_dataset):
    """Every chunk there but no manifest.json (a pass stopped before its commit): refused, not read."""
    import shutil

    logits_run, _, _ = stored_logits
    half = tmp_path / "half"
    shutil.copytree(FileStore.path(logits_run.output), half)
    (half / "manifest.json").unlink()
    ref = InputRef(uri=f"file://{half}", stage="teacher-logits", input_digest=logits_run.input_digest)
    spec = DistillSpec(method="logits", max_steps=2, teacher_logits="teacher-logits", **FAST)
    run, path = make_run(tmp_path, "distill", spec, {"teacherLogits": ref, "student": tiny_student}, tiny_dataset)
    code, summary, output = run_stage("distill", path, tmp_path)
    assert code == 11, output[-2000:]
    assert summary.reason == "InvalidInput" and f"{half}/manifest.json is missing" in summary.message


# ---------------------------------------------------------------------------------------------
# The pipeline: one teacher pass for every student and every edit of a student
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_students_and_an_edited_learning_rate_share_one_teacher_pass(tmp_path, tiny_teacher, tiny_student, tiny_dataset):
    import io

    from kondense.api import CompressionPipeline
    from kondense.local import LocalRunner

    student = {"method": "logits", "teacherLogits": "teacher-logits", "maxSteps": 2, "batchSize": 4,
               "maxSeqLength": SEQ, "checkpointEvery": 1000}
    doc = {
        "apiVersion": "kondense.io/v1alpha1", "kind": "CompressionPipeline", "metadata": {"name": "shared"},
        "spec": {
            "teacher": {"uri": f"file://{tiny_teacher}"}, "student": {"uri": f"file://{tiny_student}"},
            "dataset": {"uri": f"file://{tiny_dataset}", "evalSplit": 0.1}, "storage": {"uri": f"file://{tmp_path}/store"},
            "resources": {"gpus": 0},
            "stages": [
                {"name": "teacher-logits", "teacherLogits": {"topK": K, "maxSeqLength": SEQ, "chunkWindows": 128}},
                {"name": "a", "distill": {**student, "learningRate": 1e-3}},
                {"name": "b", "distill": {**student, "learningRate": 3e-3, "temperature": 4.0}},
            ],
        },
    }

    def run(doc) -> LocalRunner:
        runner = LocalRunner(CompressionPipeline.model_validate(doc), tmp_path / "state", out=io.StringIO(), cache_dir=tmp_path / "cache")
        status = runner.run()
        assert [s.state for s in status.stages] == ["Succeeded"] * 3, [(s.name, s.reason, s.message) for s in status.stages]
        return runner

    def teacher_passes() -> int:  # the stage's own line, once per execution (the log is appended to)
        return (tmp_path / "state/logs/teacher-logits.log").read_text().count("Teacher pass over")

    first = run(doc)
    assert first.executed == ["teacher-logits", "a", "b"]
    assert teacher_passes() == 1
    logits_uri = first.stages["teacher-logits"].artifact.uri
    assert first.stages["a"].metrics["teacherTopK"] == K == first.stages["b"].metrics["teacherTopK"]

    doc["spec"]["stages"][1]["distill"]["learningRate"] = 2e-3  # edit a student's hyper-parameter
    second = run(doc)
    assert second.executed == ["a"], "only the edited student runs again"
    assert second.stages["teacher-logits"].reason == "UpToDate" and second.stages["teacher-logits"].artifact.uri == logits_uri
    assert teacher_passes() == 1

"""The distill stage: kd_loss properties, the staged checkpoints, and every method end to end.

End-to-end tests run the real entrypoint (`python -m kondense_jobs distill`) on the tiny
models of conftest.py with a few steps of 4 x 64 tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kondense.api import DatasetRef, DistillSpec, Resources
from kondense.errors import InvalidInput
from kondense.events import parse_line
from kondense.store import FileStore
from kondense_jobs.distill import Checkpoints, check_vocabularies, gkd_records, kd_loss

FAST = dict(learning_rate=3e-3, batch_size=4, max_seq_length=64, checkpoint_every=1000, seed=0)


# ---------------------------------------------------------------------------------------------
# kd_loss
# ---------------------------------------------------------------------------------------------


def logits_and_labels(seed: int = 0, batch: int = 3, seq: int = 7, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, vocab, generator=g)
    teacher = torch.randn(batch, seq, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, -3:] = -100  # padding
    labels[1, :2] = -100  # a prompt
    return student, teacher, labels


def reference_kl(student, teacher, labels, temperature):
    """KL(p_t || p_s) per predicted token, written out longhand."""
    s, t, y = student[:, :-1], teacher[:, :-1], labels[:, 1:]
    p_t = torch.softmax(t / temperature, -1)
    kl = (p_t * (torch.log_softmax(t / temperature, -1) - torch.log_softmax(s / temperature, -1))).sum(-1)
    return kl[y != -100].mean()


def test_kd_term_is_zero_for_identical_logits_and_has_no_gradient():
    student, _, labels = logits_and_labels()
    student.requires_grad_(True)
    loss = kd_loss(student, student.detach().clone(), labels, temperature=2.0, alpha=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert student.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0], ids=lambda t: f"T={t:g}")
def test_kd_term_is_kl_scaled_by_t_squared(temperature):
    student, teacher, labels = logits_and_labels()
    loss = kd_loss(student, teacher, labels, temperature=temperature, alpha=1.0)
    assert loss.item() == pytest.approx(temperature**2 * reference_kl(student, teacher, labels, temperature).item(), rel=1e-5)
    # Scaling the logits by T and dividing by T inside cancel: only the T^2 factor remains.
    scaled = kd_loss(student * temperature, teacher * temperature, labels, temperature=temperature, alpha=1.0)
    plain = kd_loss(student, teacher, labels, temperature=1.0, alpha=1.0)
    assert scaled.item() == pytest.approx(temperature**2 * plain.item(), rel=1e-5)


def test_alpha_zero_is_cross_entropy_and_needs_no_teacher():
    student, _, labels = logits_and_labels()
    ce = F.cross_entropy(student[:, :-1].reshape(-1, student.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert kd_loss(student, None, labels, temperature=2.0, alpha=0.0).item() == pytest.approx(ce.item(), rel=1e-6)


def test_alpha_mixes_the_two_terms():
    student, teacher, labels = logits_and_labels()
    kd = kd_loss(student, teacher, labels, 2.0, 1.0)
    ce = kd_loss(student, teacher, labels, 2.0, 0.0)
    assert kd_loss(student, teacher, labels, 2.0, 0.3).item() == pytest.approx(0.3 * kd.item() + 0.7 * ce.item(), rel=1e-6)


def test_masked_positions_do_not_count():
    student, teacher, labels = logits_and_labels()
    before = kd_loss(student, teacher, labels, 2.0, 0.5)
    # Logits at position t predict labels[t + 1]; change those whose target is -100.
    masked = torch.nn.functional.pad(labels[:, 1:] == -100, (0, 1))
    noisy = student + 100 * masked.unsqueeze(-1) * torch.randn_like(student)
    assert kd_loss(noisy, teacher, labels, 2.0, 0.5).item() == pytest.approx(before.item(), rel=1e-6)
    # even NaN there (a fully masked attention row under padding): neither the loss nor a gradient sees it
    poisoned = student.masked_fill(masked.unsqueeze(-1), float("nan")).requires_grad_(True)
    loss = kd_loss(poisoned, teacher.masked_fill(masked.unsqueeze(-1), float("nan")), labels, 2.0, 0.5)
    loss.backward()
    assert loss.item() == pytest.approx(before.item(), rel=1e-6)
    assert torch.isfinite(poisoned.grad).all()


def test_num_items_in_batch_makes_gradient_accumulation_exact():
    student, teacher, labels = logits_and_labels(batch=4)
    whole = kd_loss(student, teacher, labels, 2.0, 0.5)
    n = int((labels[:, 1:] != -100).sum())
    halves = sum(kd_loss(student[i : i + 2], teacher[i : i + 2], labels[i : i + 2], 2.0, 0.5, num_items_in_batch=n) for i in (0, 2))
    assert halves.item() == pytest.approx(whole.item(), rel=1e-5)


def autograd_kd_loss(student, teacher, labels, temperature, alpha, num_items_in_batch=None):
    """The same loss as plain autograd formulas (what kd_loss replaced), on the ids both logits share."""
    vocab = student.shape[-1] if teacher is None else min(student.shape[-1], teacher.shape[-1])
    s, y = student[:, :-1, :vocab].float(), labels[:, 1:]
    mask = y != -100
    n = num_items_in_batch if num_items_in_batch is not None else mask.sum()
    loss = (1 - alpha) * F.cross_entropy(s.reshape(-1, vocab), y.reshape(-1), ignore_index=-100, reduction="sum")
    if alpha > 0:
        t = teacher[:, :-1, :vocab].float()
        kl = F.kl_div(F.log_softmax(s[mask] / temperature, -1), F.log_softmax(t[mask] / temperature, -1),
                      log_target=True, reduction="sum")
        loss = loss + alpha * temperature**2 * kl
    return loss / n


@pytest.mark.parametrize(
    "temperature, alpha, dtype, student_vocab, teacher_vocab",
    [
        (2.0, 0.5, torch.float32, 11, 11),
        (1.0, 0.5, torch.float32, 11, 11),
        (4.0, 1.0, torch.float32, 11, 11),
        (2.0, 0.0, torch.float32, 11, 11),
        (2.0, 0.5, torch.float32, 13, 11),  # the student's vocabulary padded wider
        (2.0, 0.5, torch.float32, 11, 16),  # the teacher's
        (2.0, 0.5, torch.bfloat16, 11, 11),
    ],
    ids=lambda v: str(v).removeprefix("torch."),
)
def test_kd_loss_and_its_gradient_equal_the_autograd_formula_across_blocks(
    monkeypatch, temperature, alpha, dtype, student_vocab, teacher_vocab
):
    from kondense import memory

    monkeypatch.setitem(memory.KD_BLOCK_ELEMENTS, "cpu", 4 * 13)  # blocks of 4 rows or fewer: 21 rows, 6 blocks
    g = torch.Generator().manual_seed(1)
    student = torch.randn(3, 7, student_vocab, generator=g).to(dtype)
    teacher = torch.randn(3, 7, teacher_vocab, generator=g).to(dtype)
    labels = torch.randint(0, min(student_vocab, teacher_vocab), (3, 7), generator=g)
    labels[0, -3:] = -100
    labels[1, :2] = -100
    ours, theirs = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    loss = kd_loss(ours, teacher, labels, temperature, alpha, num_items_in_batch=torch.tensor(17))
    expected = autograd_kd_loss(theirs, teacher, labels, temperature, alpha, num_items_in_batch=torch.tensor(17))
    (3 * loss).backward()
    (3 * expected).backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert loss.item() == pytest.approx(expected.item(), rel=tol)
    assert ours.grad.dtype == dtype
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=tol, atol=tol * ours.grad.abs().max().item())
    assert ours.grad[..., min(student_vocab, teacher_vocab):].abs().sum() == 0  # ids the teacher lacks: no gradient
    assert ours.grad[:, -1].abs().sum() == 0 and ours.grad[0, -4:].abs().sum() == 0  # no target: no gradient


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while fn() runs (each storage once)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_kd_loss_keeps_one_logits_sized_tensor_for_backward():
    """The memory kondense.memory counts for the logits method: the gradient in the logits' dtype,
    not the fp32 upcasts and log-softmaxes that the autograd formula keeps."""
    student, teacher, labels = logits_and_labels(batch=4, seq=64, vocab=512)
    student = student.to(torch.bfloat16).requires_grad_(True)
    teacher = teacher.to(torch.bfloat16)
    logits_bytes = student.numel() * student.element_size()
    assert saved_bytes(lambda: kd_loss(student, teacher, labels, 2.0, 0.5)) <= logits_bytes
    assert saved_bytes(lambda: autograd_kd_loss(student, teacher, labels, 2.0, 0.5)) > 5 * logits_bytes


# ---------------------------------------------------------------------------------------------
# Inputs: vocabularies and GKD records
# ---------------------------------------------------------------------------------------------


def test_padded_vocab_size_is_fine_for_logits_but_not_for_gkd(tmp_path, tiny_student):
    # The same tokenizer with a larger embedding matrix (as Qwen2.5 7B vs 0.5B): only config.json differs.
    teacher = tmp_path / "padded"
    teacher.mkdir()
    for f in tiny_student.glob("*.json"):
        (teacher / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((teacher / "config.json").read_text())
    cfg["vocab_size"] += 64
    (teacher / "config.json").write_text(json.dumps(cfg))
    assert len(check_vocabularies(teacher, tiny_student, "logits")) == cfg["vocab_size"] - 64
    with pytest.raises(InvalidInput, match="vocab_size"):
        check_vocabularies(teacher, tiny_student, "gkd")


def copy_config(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    return dst


def test_a_teacher_without_a_tokenizer_is_refused_not_assumed_from_vocab_size(tmp_path, tiny_student):
    """The same config.json (vocab_size and all) but no tokenizer saved: nothing shows the ids mean
    the same tokens, as Llama-2's and Mistral-7B's 32000 do not."""
    teacher = copy_config(tiny_student, tmp_path / "teacher")
    with pytest.raises(InvalidInput, match=f"the teacher's folder {teacher} holds no tokenizer"):
        check_vocabularies(teacher, tiny_student, "logits")


def test_a_tokenizer_that_does_not_load_is_refused_naming_the_folder(tmp_path, tiny_student):
    teacher = copy_config(tiny_student, tmp_path / "teacher")
    (teacher / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "NoSuchModel"}}')
    with pytest.raises(InvalidInput, match=f"the teacher's tokenizer in {teacher} does not load"):
        check_vocabularies(teacher, tiny_student, "logits")


def test_tokenizers_of_equal_size_that_differ_are_refused_with_the_first_token_that_differs(tmp_path, tiny_student):
    from transformers import AutoTokenizer

    from kondense_jobs.tiny import train_tokenizer

    size = len(AutoTokenizer.from_pretrained(tiny_student))
    other = train_tokenizer([f"entirely other words {i} zebra quartz {i * 7}" for i in range(2000)], vocab_size=size)
    assert len(other) == size  # as Llama-2 and Mistral-7B: the same count, other tokens
    teacher = copy_config(tiny_student, tmp_path / "teacher")
    other.save_pretrained(teacher)
    with pytest.raises(InvalidInput, match=f"both tokenizers have {size} tokens but differ"):
        check_vocabularies(teacher, tiny_student, "logits")


def test_gkd_records_split_prompt_and_completion(tiny_student):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_student)
    ref = DatasetRef(uri="file:///unused", prompt_tokens=5)
    text = "Return the number of items in the container, counting each one once. " * 3
    records = gkd_records([{"text": text}, {"text": text, "prompt": "Return the number"}], ref, tok, seq=16)
    by_tokens, by_field = records
    for r in records:
        assert len(r["input_ids"]) == len(r["completion_mask"]) <= 16
        assert r["completion_mask"][0] == 0 and r["completion_mask"][-1] == 1
        assert r["completion_mask"] == sorted(r["completion_mask"])  # prompt first, then completion
    assert by_tokens["completion_mask"].count(0) == 5
    assert by_tokens["input_ids"] == tok(text)["input_ids"][:16]
    assert by_field["prompt"] == "Return the number"
    assert tok.decode(by_field["input_ids"]).startswith("Return the number of items")


# ---------------------------------------------------------------------------------------------
# Checkpoints in the store (file:// and s3://)
# ---------------------------------------------------------------------------------------------


def checkpoint_folder(root: Path, step: int) -> Path:
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


@pytest.mark.parametrize("scheme", ["file", "s3"])
def test_checkpoints_keep_newest_two_and_resume_from_newest_complete(scheme, tmp_path, make_run, monkeypatch):
    from kondense.api import Storage
    from kondense_jobs.runtime import Context

    if scheme == "s3":
        moto = pytest.importorskip("moto")
        for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        mock = moto.mock_aws()
        mock.start()
        import boto3

        boto3.client("s3").create_bucket(Bucket="ckpt")
        storage = Storage(uri="s3://ckpt/store")
        output = "s3://ckpt/store/distill"
    else:
        storage, output = None, None
    try:
        overrides = {"storage": storage, "output": output} if storage else {}
        run, _ = make_run(tmp_path, "distill", DistillSpec(), {"teacher": tmp_path, "student": tmp_path}, **overrides)
        ctx = Context(run, tmp_path / "work", tmp_path / "cache")
        ckpts = Checkpoints(ctx)
        assert ckpts.latest(tmp_path / "resume") is None
        for step in (5, 10, 15):
            ckpts.stage(checkpoint_folder(tmp_path / "trainer", step), step)
        ckpts.wait()
        assert ckpts.steps() == [15, 10]
        # An upload cut short (no manifest) and another version's checkpoint are never resumed from.
        ctx.store.upload([(tmp_path / "trainer" / "checkpoint-5" / "trainer_state.json", f"{ctx.checkpoint_uri()}/step-20/trainer_state.json")])
        ctx.store.publish(
            checkpoint_folder(tmp_path / "other", 25), f"{ctx.checkpoint_uri()}/step-25",
            stage="distill", stage_kind="distill", input_digest="sha256:other",
        )
        assert ckpts.steps() == [25, 20, 15, 10]
        assert ckpts.committed() == [15, 10]
        resume = ckpts.latest(tmp_path / "resume")
        assert resume.step == 15
        assert json.loads((resume.path / "trainer_state.json").read_text()) == {"global_step": 15}
        ckpts.clear()
        assert ckpts.steps() == []
    finally:
        if scheme == "s3":
            mock.stop()


# ---------------------------------------------------------------------------------------------
# The stage end to end
# ---------------------------------------------------------------------------------------------


def progress_events(output: str) -> list[dict]:
    return [ev for line in output.splitlines() if (ev := parse_line(line)) and ev["kondense"] == "progress"]


def assert_trained_and_reloads(tmp_path: Path, code: int, summary, output: str, steps: int) -> None:
    assert code == 0, output[-3000:]
    assert summary.state == "Succeeded"
    m = summary.metrics
    assert m["steps"] == steps
    assert m["finalLoss"] < m["initialLoss"], m
    assert m["tokensPerSecond"] > 0 and m["trainSeconds"] > 0
    steps_lines = [ev for ev in progress_events(output) if ev.get("phase") == "steps"]
    assert steps_lines[0]["step"] >= 1 and steps_lines[-1]["step"] == steps == steps_lines[-1]["total"]
    assert "loss" in steps_lines[0] and "loss" in steps_lines[-1]
    assert "it/s]" not in output and "examples/s]" not in output, "tqdm bars in the stage output"
    out = FileStore.path(summary.artifact.uri)
    assert (out / "manifest.json").exists() and not (out / "training_args.bin").exists()
    assert not FileStore.path(summary.artifact.uri + ".checkpoints").exists(), "checkpoints left after publishing"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The module", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 5


def distill_and_check(tmp_path, make_run, run_stage, spec, teacher, student, dataset):
    """Run the stage on these models; it must train spec.max_steps steps and publish a model that reloads."""
    _, path = make_run(tmp_path, "distill", spec, {"teacher": teacher, "student": student}, dataset)
    code, summary, output = run_stage("distill", path, tmp_path)
    assert_trained_and_reloads(tmp_path, code, summary, output, spec.max_steps)
    return summary, output


@pytest.mark.slow
def test_logits(tmp_path, make_run, run_stage, tiny_teacher, tiny_student, tiny_dataset):
    spec = DistillSpec(method="logits", max_steps=12, temperature=2.0, alpha=0.5, **FAST)
    summary, output = distill_and_check(tmp_path, make_run, run_stage, spec, tiny_teacher, tiny_student, tiny_dataset)
    assert "teacher skipped" not in output


@pytest.mark.slow
def test_logits_alpha_zero_skips_the_teacher(tmp_path, make_run, run_stage, tiny_student, tiny_dataset):
    # The CE-only baseline neither fetches, loads nor runs the teacher: a missing one does not matter.
    teacher = tmp_path / "no-such-teacher"
    spec = DistillSpec(method="logits", max_steps=6, alpha=0.0, **FAST)
    summary, output = distill_and_check(tmp_path, make_run, run_stage, spec, teacher, tiny_student, tiny_dataset)
    assert "teacher skipped" in output


@pytest.mark.slow
def test_synthetic(tmp_path, make_run, run_stage, tiny_teacher, tiny_student, tiny_dataset):
    spec = DistillSpec(method="synthetic", max_steps=6, max_new_tokens=16, generation_temperature=0.7, top_p=0.95, **FAST)
    summary, output = distill_and_check(tmp_path, make_run, run_stage, spec, tiny_teacher, tiny_student, tiny_dataset)
    assert summary.metrics["syntheticSamples"] >= 6 * 4 * 0.9  # one batch of prompts per step, few empty completions
    assert any(ev.get("phase") == "prompts" for ev in progress_events(output))


@pytest.mark.slow
def test_gkd(tmp_path, make_run, run_stage, tiny_teacher, tiny_student, tiny_dataset):
    # lmbda 1: every batch is generated on-policy by the student (GKD's point), so the losses of
    # the first and last steps are of the same kind and comparable; gkd_records is tested below.
    spec = DistillSpec(method="gkd", max_steps=10, lmbda=1.0, beta=0.5, max_new_tokens=16, generation_temperature=0.9, **FAST)
    summary, output = distill_and_check(tmp_path, make_run, run_stage, spec, tiny_teacher, tiny_student, tiny_dataset)
    assert "GKDTrainer" in output


@pytest.mark.slow
def test_student_of_another_family(tmp_path, make_run, run_stage, tiny_teacher, tiny_student_gpt2, tiny_dataset):
    # Llama teacher, GPT-2 student (LayerNorm, learned positions, Conv1D): only the tokenizer is shared.
    student = tiny_student_gpt2
    assert json.loads((student / "config.json").read_text())["model_type"] == "gpt2"
    spec = DistillSpec(method="logits", max_steps=8, **FAST)
    summary, output = distill_and_check(tmp_path, make_run, run_stage, spec, tiny_teacher, student, tiny_dataset)


@pytest.fixture(scope="session")
def student_with_other_tokenizer(models_root, corpus_texts) -> Path:
    from kondense_jobs.tiny import build_model, train_tokenizer

    tokenizer = train_tokenizer(corpus_texts[:300], vocab_size=512)
    return build_model(models_root / "student-other-tokenizer", tokenizer, family="llama", layers=1, hidden=32, heads=2)


def test_vocabulary_mismatch_fails_before_loading_weights(tmp_path, make_run, run_stage, tiny_teacher, student_with_other_tokenizer, tiny_dataset):
    spec = DistillSpec(method="logits", max_steps=2, **FAST)
    run, path = make_run(tmp_path, "distill", spec, {"teacher": tiny_teacher, "student": student_with_other_tokenizer}, tiny_dataset)
    code, summary, output = run_stage("distill", path, tmp_path, env={"TRANSFORMERS_VERBOSITY": "info"})  # logs each load
    assert code == 11, output[-2000:]
    assert summary.reason == "InvalidInput"
    assert "\n" not in summary.message
    assert "1024" in summary.message and "512" in summary.message and "share a tokenizer" in summary.message
    assert not (FileStore.path(run.output) / "manifest.json").exists()
    assert "loading weights file" not in output and "Preflight" not in output


def test_preflight_refuses_what_cannot_fit(tmp_path, make_run, run_stage, tiny_teacher, tiny_student, tiny_dataset):
    spec = DistillSpec(method="logits", max_steps=2, **FAST)
    run, path = make_run(
        tmp_path, "distill", spec, {"teacher": tiny_teacher, "student": tiny_student}, tiny_dataset,
        resources=Resources(gpus=0, memory="1Mi"),
    )
    code, summary, output = run_stage("distill", path, tmp_path)
    assert code == 14, output[-2000:]
    assert summary.reason == "InsufficientResources"
    assert "distill needs" in summary.message and "GiB per worker" in summary.message and "1Mi" in summary.message
    assert not (FileStore.path(run.output) / "manifest.json").exists()


@pytest.mark.slow
def test_killed_run_resumes_from_its_newest_checkpoint(
    tmp_path, make_run, run_stage, kill_at_first_checkpoint, tiny_teacher, tiny_student, tiny_dataset
):
    steps, every = 24, 3
    spec = DistillSpec(method="logits", max_steps=steps, **{**FAST, "checkpoint_every": every})
    run, path = make_run(tmp_path, "distill", spec, {"teacher": tiny_teacher, "student": tiny_student}, tiny_dataset)
    checkpoints = FileStore.path(run.output + ".checkpoints")
    work = tmp_path / "work"
    work.mkdir()
    committed = kill_at_first_checkpoint(run, path, tmp_path, work)  # a killed run leaves its scratch
    assert committed and committed[-1] < steps

    code, summary, output = run_stage("distill", path, tmp_path)
    assert code == 0, output[-3000:]
    resumed = summary.metrics["resumedFromStep"]
    assert resumed == committed[-1] and resumed % every == 0
    assert f"resuming from step {int(resumed)}" in output
    assert summary.metrics["steps"] == steps
    first = [ev for ev in progress_events(output) if ev.get("phase") == "steps"][0]
    assert first["step"] > resumed, "the step count did not continue"
    assert not checkpoints.exists()

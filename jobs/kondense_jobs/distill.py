"""The distill stage: teach the student to imitate the teacher.

`run(ctx)` reads as three steps: fetch inputs (teacher, student, dataset; the tokenizers are
compared and the memory estimated before any weight is loaded) -> train -> publish the student.

Methods (`spec.method`), each built on a library trainer so that gradient accumulation, the
linear schedule with warm-up, mixed precision, gradient checkpointing, multi-GPU (accelerate)
and checkpoint/resume come from the library, not from here:

- logits: `LogitDistillTrainer`, a `transformers.Trainer` whose `compute_loss` is `kd_loss`:
  alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(labels), on the
  training texts packed into windows of maxSeqLength tokens. The teacher runs in eval mode
  under no_grad; with alpha 0 it is neither loaded nor run (the CE-only baseline).
- synthetic: the teacher completes the prompts (`data.prompts`: the prompt field, or the first
  promptTokens tokens of the text) in left-padded batches with maxNewTokens,
  generationTemperature (0 = greedy) and topP; then `trl.SFTTrainer` / `trl.SFTConfig` with
  `completion_only_loss=True` trains the student on the prompt/completion records. The
  generated records are staged beside the checkpoints, so a resumed stage does not regenerate.
- gkd: `trl.experimental.gkd.GKDTrainer` / `GKDConfig` (TRL 1.16). Chosen over the stable
  `trl.DistillationTrainer` because the API's `lmbda` (the fraction of batches the student
  generates on-policy, the rest being the dataset's own continuations) exists only there:
  DistillationTrainer is always on-policy. Knobs: lmbda -> lmbda, beta -> beta (generalized
  JSD: 0 forward KL, 1 reverse KL), maxNewTokens -> max_new_tokens, generationTemperature ->
  temperature (in GKD that is the *sampling* temperature; its divergence is taken at T = 1, so
  spec.temperature is not used; 0 switches the student's sampling to greedy), seq_kd off. The
  records are given pre-tokenized ({input_ids, completion_mask}: prompt tokens then the rest
  of the text), a form TRL's DataCollatorForChatML accepts as is, so no chat template is needed.

Checkpoints: every checkpointEvery steps the Trainer's checkpoint folder is staged (in a
background thread, so that training does not wait for the upload) under
`ctx.checkpoint_uri()/step-<N>`, manifest.json last; the newest two are kept. A starting stage
resumes from the newest complete checkpoint whose inputDigest matches its own, so the step
count, the optimizer, the schedule and the loss history continue. Once the student is
published the staged checkpoints are deleted: a published stage is never recomputed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kondense.api import DistillSpec, Summary
from kondense.errors import InvalidInput
from kondense.store import FileStore, S3Store, Store, join

from kondense_jobs import data, preflight
from kondense_jobs.runtime import Context, require

# Heavy imports (torch, transformers, trl) are done inside functions via require(), so that a
# missing library becomes MissingDependency with a fix, and `import kondense_jobs.distill` is cheap.

log = logging.getLogger("kondense_jobs.distill")

CHECKPOINTS_KEPT = 2
STEP_DIR = re.compile(r"step-(\d+)")
SYNTHETIC = "synthetic"  # folder beside the step-<N> checkpoints holding the generated records
LOGGING_RATIO = 0.02  # log the loss every 2% of the steps (Trainer reads a float < 1 as a ratio)


# ---------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------


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


def _logit_trainer_class():
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
            return (loss, outputs) if return_outputs else loss

    return LogitDistillTrainer


# ---------------------------------------------------------------------------------------------
# Step 1 helpers: vocabularies, precision, preflight
# ---------------------------------------------------------------------------------------------


def _config(model_dir: Path) -> dict:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise InvalidInput(f"{model_dir}/config.json is missing: not a Hugging Face model folder") from None
    return cfg.get("text_config", cfg)


def _tokenizer(model_dir: Path):
    transformers = require("transformers", "distillation")
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        return None


def check_vocabularies(teacher_dir: Path | None, student_dir: Path, method: str):
    """The student's tokenizer (pad token set) when it is the teacher's; else InvalidInput naming both sizes.

    Reads tokenizer files and config.json only, never weights. Without a teacher (alpha 0) it
    only loads the student's tokenizer.
    """
    if teacher_dir is None:
        teacher_dir = student_dir
    t_tok, s_tok = _tokenizer(teacher_dir), _tokenizer(student_dir)
    t_cfg, s_cfg = _config(teacher_dir), _config(student_dir)
    fix = "Teacher and student must share a tokenizer: pick a student of the teacher's family or retokenize."
    if t_tok is not None and s_tok is not None:
        t_vocab, s_vocab = t_tok.get_vocab(), s_tok.get_vocab()
        if len(t_vocab) != len(s_vocab):
            raise InvalidInput(
                f"vocabulary mismatch: the teacher's tokenizer has {len(t_vocab)} tokens, the student's {len(s_vocab)}. {fix}"
            )
        if t_vocab != s_vocab:
            token = next(k for k in sorted(t_vocab) if s_vocab.get(k) != t_vocab[k])
            raise InvalidInput(
                f"vocabulary mismatch: both tokenizers have {len(t_vocab)} tokens but differ (token {token!r} is id "
                f"{t_vocab[token]} in the teacher, {s_vocab.get(token)} in the student). {fix}"
            )
    tokenizer = s_tok or t_tok
    t_size, s_size = t_cfg.get("vocab_size"), s_cfg.get("vocab_size")
    if t_size != s_size:
        if tokenizer is None:
            raise InvalidInput(f"vocabulary mismatch: the teacher's vocab_size is {t_size}, the student's {s_size}. {fix}")
        if method == "gkd" or min(t_size, s_size) < len(tokenizer):
            raise InvalidInput(
                f"vocabulary mismatch: the teacher's vocab_size is {t_size}, the student's {s_size} "
                f"(tokenizer: {len(tokenizer)} tokens). {fix}"
                + (" gkd (TRL GKDTrainer) also needs equal vocab_size in config.json; use method logits." if method == "gkd" else "")
            )
    if tokenizer is None:
        raise InvalidInput(f"{student_dir} and {teacher_dir} hold no tokenizer files: save the tokenizer with the model.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_precision(requested: str) -> str:
    """auto: bf16 where the GPU supports it, else fp32; on CPU always fp32."""
    torch = require("torch", "distillation")
    if not torch.cuda.is_available():
        if requested in ("bf16", "fp16"):
            log.warning("precision %s asked for but no CUDA device: training in fp32 on CPU", requested)
        return "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return requested


def sequence_length(spec: DistillSpec, *model_dirs: Path) -> int:
    """maxSeqLength, capped at the smallest max_position_embeddings of the models."""
    limits = [c.get("max_position_embeddings") or c.get("n_positions") for c in map(_config, model_dirs)]
    return min([spec.max_seq_length, *[n for n in limits if n]])


def check_memory(
    ctx: Context, spec: DistillSpec, teacher_dir: Path | None, student_dir: Path, precision: str, seq: int
) -> None:
    """Teacher inference + student training vs ctx.run.resources (InsufficientResources if it cannot fit)."""
    student_shape = preflight.Shape.of(student_dir)
    student = preflight.training_bytes(student_shape, spec.batch_size, seq, spec.gradient_checkpointing)
    teacher = preflight.inference_bytes(preflight.Shape.of(teacher_dir), precision) if teacher_dir else 0.0
    if teacher_dir is None:
        parts = {"student training": student}
    elif spec.method == "synthetic":  # the teacher is freed before the student trains
        parts = {"teacher generation" if teacher > student else "student training": max(teacher, student)}
    else:
        parts = {f"teacher inference ({precision})": teacher, "student training": student}
    ctx.metrics.update(preflight.check(parts, ctx.run.resources))


def load_teacher(model_dir: Path, precision: str):
    torch = require("torch", "distillation")
    transformers = require("transformers", "distillation")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    kwargs: dict[str, Any] = {}
    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", "-1"))
        kwargs["device_map"] = {"": rank} if rank >= 0 else "auto"  # one copy per rank, or spread over the GPUs
    teacher = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)
    teacher.eval().requires_grad_(False)
    return teacher


def load_student(model_dir: Path, spec: DistillSpec):
    torch = require("torch", "distillation")
    transformers = require("transformers", "distillation")
    # fp32 master weights; bf16/fp16 are autocast by the Trainer
    student = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if spec.gradient_checkpointing:
        student.config.use_cache = False
    return student


# ---------------------------------------------------------------------------------------------
# Checkpoints in the store
# ---------------------------------------------------------------------------------------------


def list_dirs(store: Store, uri: str) -> list[str]:
    """Names of the immediate sub-folders of uri (committed or not). The Store has no listing primitive."""
    if isinstance(store, FileStore):
        root = store.path(uri)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if isinstance(store, S3Store):
        return sorted({k.split("/", 1)[0] for k in store.list_keys(uri) if "/" in k})
    raise NotImplementedError(f"cannot list {uri} in {type(store).__name__}")


@dataclass(frozen=True)
class Resume:
    step: int
    path: Path
    uri: str


class Checkpoints:
    """The stage's resumable checkpoints: <output>.checkpoints/step-<N>/, manifest.json last."""

    def __init__(self, ctx: Context):
        self.ctx, self.store, self.uri = ctx, ctx.store, ctx.checkpoint_uri()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload")
        self._pending: Future | None = None

    def steps(self) -> list[int]:
        """Every step folder, newest first, committed or not."""
        found = (m.group(1) for n in list_dirs(self.store, self.uri) if (m := STEP_DIR.fullmatch(n)))
        return sorted(map(int, found), reverse=True)

    def committed(self) -> list[int]:
        """Steps whose manifest exists and belongs to this stage version, newest first."""
        out = []
        for step in self.steps():
            manifest = self.store.read_manifest(join(self.uri, f"step-{step}"))
            if manifest is not None and manifest.input_digest == self.ctx.run.input_digest:
                out.append(step)
        return out

    def latest(self, dest: Path) -> Resume | None:
        """Fetch the newest complete checkpoint into dest (falling back to older ones if one is corrupt)."""
        for step in self.committed():
            uri = join(self.uri, f"step-{step}")
            try:
                self.store.fetch(uri, dest / f"step-{step}", expect_input_digest=self.ctx.run.input_digest)
            except InvalidInput as e:
                log.warning("Skipping checkpoint %s: %s", uri, e)
                continue
            return Resume(step, dest / f"step-{step}", uri)
        return None

    def stage(self, folder: Path, step: int) -> None:
        """Upload a checkpoint folder in the background, one at a time; an upload error surfaces here or in wait()."""
        self.wait()
        self._pending = self._pool.submit(self._publish, folder, step)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _publish(self, folder: Path, step: int) -> None:
        uri = join(self.uri, f"step-{step}")
        run = self.ctx.run
        self.store.publish(
            folder, uri, stage=run.stage, stage_kind=run.stage_kind, input_digest=run.input_digest,
            format="checkpoint", metrics={"step": float(step)},
        )
        keep = set(self.committed()[:CHECKPOINTS_KEPT])
        for old in self.steps():
            if old not in keep and old < step:
                self.store.delete_prefix(join(self.uri, f"step-{old}"))
        log.info("Checkpoint of step %d staged at %s", step, uri)

    def clear(self) -> None:
        self.wait()
        self._pool.shutdown()
        self.store.delete_prefix(self.uri)


# ---------------------------------------------------------------------------------------------
# Training plumbing shared by the three methods
# ---------------------------------------------------------------------------------------------


def _callback(ctx: Context, checkpoints: Checkpoints):
    transformers = require("transformers", "distillation")

    class StageCallback(transformers.TrainerCallback):
        """Progress lines with the loss, and each saved checkpoint staged to the store."""

        def __init__(self):
            self.loss: float | None = None
            self.start_step = 0
            self.start_tokens = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step, self.start_tokens = state.global_step, state.num_input_tokens_seen or 0
            ctx.progress.reset_clock(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                first = self.loss is None
                self.loss = float(logs["loss"])
                if first:
                    ctx.progress.update(state.global_step, state.max_steps, phase="steps", force=True, loss=self.loss)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = False  # the final model is published anyway
            elif self.loss is not None:  # the first line comes from on_log, with the first loss
                ctx.progress.update(state.global_step, state.max_steps, phase="steps", loss=self.loss)

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                checkpoints.stage(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            ctx.progress.update(state.global_step, state.max_steps, phase="steps", force=True, loss=self.loss)

    return StageCallback()


def training_args(config_class, spec: DistillSpec, out_dir: Path, precision: str, **extra):
    """The library config (TrainingArguments, SFTConfig or GKDConfig) with the spec's shared knobs."""
    torch = require("torch", "distillation")
    return config_class(
        output_dir=str(out_dir),
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps or -1,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=spec.warmup_ratio,  # a float < 1 is a ratio of the total steps
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=spec.gradient_checkpointing,
        seed=spec.seed,
        data_seed=spec.seed,
        save_strategy="steps",
        save_steps=spec.checkpoint_every,
        save_total_limit=CHECKPOINTS_KEPT,
        logging_strategy="steps",
        logging_steps=LOGGING_RATIO,
        logging_first_step=True,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )


class Windows:
    """Map-style dataset of equal-length token windows; labels are the inputs (the model shifts)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


# ---------------------------------------------------------------------------------------------
# The three methods
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """What step 1 fetched and checked."""

    spec: DistillSpec
    student_dir: Path
    teacher_dir: Path | None  # None: logits with alpha 0, the teacher is unused
    tokenizer: Any
    split: data.Split
    seq: int
    precision: str
    trainer_dir: Path  # the Trainer's scratch output_dir (its checkpoint-<N> folders)


@dataclass(frozen=True)
class Built:
    trainer: Any
    what: str  # for the log line
    tokens_per_step: int | None  # None: the Trainer counts non-padding tokens
    info: dict[str, float]


def logits_trainer(ctx: Context, job: Inputs, student) -> Built:
    torch = require("torch", "distillation")
    transformers = require("transformers", "distillation")
    spec = job.spec
    rows = data.windows(data.token_stream(job.tokenizer, data.texts(job.split.train, ctx.run.dataset)), job.seq)
    if not rows:
        raise InvalidInput(
            f"dataset: the training split holds fewer than maxSeqLength={job.seq} tokens; lower maxSeqLength"
        )
    teacher = load_teacher(job.teacher_dir, job.precision) if job.teacher_dir else None
    args = training_args(transformers.TrainingArguments, spec, job.trainer_dir, job.precision)
    trainer = _logit_trainer_class()(
        model=student,
        args=args,
        train_dataset=Windows(torch.tensor(rows, dtype=torch.long)),
        data_collator=transformers.default_data_collator,
        processing_class=job.tokenizer,
        teacher=teacher,
        temperature=spec.temperature,
        alpha=spec.alpha,
    )
    skipped = ", teacher skipped" if teacher is None else ""
    return Built(
        trainer,
        f"logit KD (T={spec.temperature:g}, alpha={spec.alpha:g}{skipped})",
        spec.batch_size * spec.gradient_accumulation_steps * args.world_size * job.seq,
        {"trainWindows": float(len(rows))},
    )


def generate(teacher, tokenizer, prompts: list[str], spec: DistillSpec, seq: int, progress) -> list[str]:
    """Teacher completions of the prompts: left-padded batches, the spec's sampling parameters."""
    torch = require("torch", "distillation")
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    sampling = (
        {"do_sample": True, "temperature": spec.generation_temperature, "top_p": spec.top_p}
        if spec.generation_temperature > 0
        else {"do_sample": False}
    )
    max_prompt = max(seq // 2, seq - spec.max_new_tokens)
    out: list[str] = []
    try:
        for i in range(0, len(prompts), spec.batch_size):
            batch = tokenizer(
                prompts[i : i + spec.batch_size],
                return_tensors="pt", padding=True, truncation=True, max_length=max_prompt,
            ).to(teacher.device)
            with torch.inference_mode():
                seqs = teacher.generate(
                    **batch, max_new_tokens=spec.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
                )
            out += tokenizer.batch_decode(seqs[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            progress.update(len(out), len(prompts), phase="prompts")
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = "right", "right"
    return out


def synthetic_records(ctx: Context, job: Inputs) -> list[dict]:
    """prompt/completion records generated by the teacher, or fetched where an earlier attempt staged them."""
    torch = require("torch", "distillation")
    spec, run = job.spec, ctx.run
    uri = join(ctx.checkpoint_uri(), SYNTHETIC)
    folder = ctx.work_dir / SYNTHETIC
    manifest = ctx.store.read_manifest(uri)
    if manifest is not None and manifest.input_digest == run.input_digest:
        ctx.store.fetch(uri, folder, expect_input_digest=run.input_digest)
        records = data.load_records(folder / "records.jsonl")
        log.info("Reusing %d teacher completions staged at %s", len(records), uri)
        return records
    sources = job.split.train
    if spec.max_steps:  # generate what the steps consume, not the whole split
        world = int(os.environ.get("WORLD_SIZE", "1"))
        sources = sources[: spec.max_steps * spec.batch_size * spec.gradient_accumulation_steps * world]
    # A trailing blank would merge with the completion's first token and blur the prompt/completion boundary.
    prompts = [p.rstrip() for p in data.prompts(sources, run.dataset, job.tokenizer)]
    log.info("Teacher generating up to %d tokens for each of %d prompts", spec.max_new_tokens, len(prompts))
    teacher = load_teacher(job.teacher_dir, job.precision)
    require("transformers", "distillation").set_seed(spec.seed)
    completions = generate(teacher, job.tokenizer, prompts, spec, job.seq, ctx.progress)
    del teacher
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    records = [{"prompt": p, "completion": c} for p, c in zip(prompts, completions) if c.strip()]
    if not records:
        raise InvalidInput("synthetic: the teacher generated only empty completions; raise maxNewTokens or check the teacher")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    ctx.store.publish(
        folder, uri, stage=run.stage, stage_kind=run.stage_kind, input_digest=run.input_digest, format="dataset"
    )
    return records


def synthetic_trainer(ctx: Context, job: Inputs, student) -> Built:
    datasets = require("datasets", "synthetic distillation")
    trl = require("trl", "synthetic distillation")
    records = synthetic_records(ctx, job)
    args = training_args(
        trl.SFTConfig, job.spec, job.trainer_dir, job.precision,
        max_length=job.seq, completion_only_loss=True, packing=False, include_num_input_tokens_seen="non_padding",
    )
    trainer = trl.SFTTrainer(
        model=student, args=args, train_dataset=datasets.Dataset.from_list(records), processing_class=job.tokenizer
    )
    return Built(
        trainer, f"SFT on {len(records)} teacher completions (trl.SFTTrainer)", None,
        {"syntheticSamples": float(len(records))},
    )


def gkd_records(records: list[dict], ref, tokenizer, seq: int) -> list[dict]:
    """Pre-tokenized {prompt, input_ids, completion_mask}: the prompt, then the rest of the text.

    The rest of the text is what the off-policy batches (a fraction 1 - lmbda) train on. TRL's
    collator reads "prompt" only when completion_mask is absent, but it must be present.
    """
    eos = tokenizer.eos_token_id
    out = []
    for r in records:
        text, prompt = r[ref.text_field], r.get(ref.prompt_field)
        if isinstance(prompt, str) and prompt:
            p_ids = tokenizer(prompt)["input_ids"]
            rest = text[len(prompt) :] if text.startswith(prompt) else text
            c_ids = tokenizer(rest, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(text)["input_ids"]
            p_ids, c_ids = ids[: ref.prompt_tokens], ids[ref.prompt_tokens :]
        p_ids = p_ids[-max(1, seq // 2) :]
        if eos is not None and len(p_ids) + len(c_ids) < seq:
            c_ids = c_ids + [eos]
        c_ids = c_ids[: seq - len(p_ids)]
        mask = [0] * len(p_ids) + [1] * len(c_ids)
        out.append({"prompt": tokenizer.decode(p_ids), "input_ids": p_ids + c_ids, "completion_mask": mask})
    return out


def gkd_trainer(ctx: Context, job: Inputs, student) -> Built:
    datasets = require("datasets", "gkd distillation")
    with warnings.catch_warnings():  # TRLExperimentalWarning: a deliberate choice, see the module docstring
        warnings.simplefilter("ignore")
        gkd = require("trl.experimental.gkd", "gkd distillation")
    spec = job.spec
    records = gkd_records(job.split.train, ctx.run.dataset, job.tokenizer, job.seq)
    greedy = spec.generation_temperature == 0
    args = training_args(
        gkd.GKDConfig, spec, job.trainer_dir, job.precision,
        max_length=job.seq, lmbda=spec.lmbda, beta=spec.beta, max_new_tokens=spec.max_new_tokens,
        temperature=1.0 if greedy else spec.generation_temperature, seq_kd=False,
        include_num_input_tokens_seen="non_padding",
    )
    trainer = gkd.GKDTrainer(
        model=student, teacher_model=load_teacher(job.teacher_dir, job.precision), args=args,
        train_dataset=datasets.Dataset.from_list(records), processing_class=job.tokenizer,
    )
    if greedy:  # GKDConfig always samples; generationTemperature 0 means greedy on-policy completions
        for key in ("temperature", "top_k", "top_p"):
            trainer.generation_kwargs.pop(key, None)
        trainer.generation_kwargs["do_sample"] = False
        trainer.generation_config.do_sample = False
    return Built(
        trainer, f"GKD (lmbda={spec.lmbda:g}, beta={spec.beta:g}, trl.experimental.gkd.GKDTrainer)", None,
        {"gkdRecords": float(len(records))},
    )


METHODS = {"logits": logits_trainer, "synthetic": synthetic_trainer, "gkd": gkd_trainer}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def fetch_inputs(ctx: Context) -> Inputs:
    """Models and data, with the tokenizers compared and the memory estimated before any weight is loaded.

    Logits with alpha 0 (the CE-only baseline) never uses the teacher, so it is not even fetched.
    """
    spec: DistillSpec = ctx.config
    student_dir = ctx.model_dir("student")
    teacher_dir = None if spec.method == "logits" and spec.alpha == 0 else ctx.model_dir("teacher")
    tokenizer = check_vocabularies(teacher_dir, student_dir, spec.method)
    precision = resolve_precision(spec.precision)
    seq = sequence_length(spec, *[d for d in (teacher_dir, student_dir) if d is not None])
    check_memory(ctx, spec, teacher_dir, student_dir, precision, seq)
    split = data.load(ctx.dataset_path(), ctx.run.dataset)
    return Inputs(spec, student_dir, teacher_dir, tokenizer, split, seq, precision, ctx.work_dir / "trainer")


def run(ctx: Context) -> Summary:
    spec: DistillSpec = ctx.config
    transformers = require("transformers", "distillation")
    transformers.utils.logging.disable_progress_bar()  # no tqdm bars per weight load/save: progress lines say it
    if spec.method != "logits":
        require("datasets", f"{spec.method} distillation").disable_progress_bars()

    # 1. Fetch inputs.
    job = fetch_inputs(ctx)
    log.info(
        "Fetched teacher %s and student %s (shared vocabulary of %d tokens), %d training records; precision %s",
        job.teacher_dir.name if job.teacher_dir else "(unused: alpha 0)", job.student_dir.name,
        len(job.tokenizer), len(job.split.train), job.precision,
    )

    # 2. Transform: train the student, resuming from the newest staged checkpoint.
    checkpoints = Checkpoints(ctx)
    resume = checkpoints.latest(ctx.work_dir / "resume")
    transformers.set_seed(spec.seed)
    built = METHODS[spec.method](ctx, job, load_student(job.student_dir, spec))
    trainer = built.trainer
    trainer.remove_callback(transformers.PrinterCallback)  # it prints a dict per log; we print progress lines
    callback = _callback(ctx, checkpoints)
    trainer.add_callback(callback)
    log.info(
        "Distilling with %s: %s steps of %d x %d tokens%s",
        built.what, spec.max_steps or f"{spec.epochs:g} epochs of", spec.batch_size * spec.gradient_accumulation_steps,
        job.seq, f", resuming from step {resume.step} ({resume.uri})" if resume else "",
    )
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(resume.path) if resume else None)
    train_seconds = time.monotonic() - started
    checkpoints.wait()

    # 3. Publish the student; the staged checkpoints are no longer needed.
    metrics = training_metrics(trainer.state, callback, built, train_seconds)
    if resume:
        metrics["resumedFromStep"] = float(resume.step)
    if not trainer.is_world_process_zero():
        return Summary(state="Succeeded", reason="Succeeded", message="worker process done", metrics=metrics)
    out = ctx.output_dir()
    trainer.save_model(str(out))
    job.tokenizer.save_pretrained(out)
    (out / "training_args.bin").unlink(missing_ok=True)  # a pickle of local paths; consumers need none of it
    log.info(
        "Publishing the student: %d steps, loss %.4f -> %.4f, %.0f tokens/s", metrics["steps"],
        metrics.get("initialLoss", math.nan), metrics.get("finalLoss", math.nan), metrics["tokensPerSecond"],
    )
    summary = ctx.publish(metrics=metrics)
    checkpoints.clear()
    return summary


def training_metrics(state, callback, built: Built, train_seconds: float) -> dict[str, float]:
    """Losses over the whole run (the history survives a resume); throughput of this attempt."""
    losses = [float(h["loss"]) for h in state.log_history if "loss" in h]
    if built.tokens_per_step:
        tokens = (state.global_step - callback.start_step) * built.tokens_per_step
    else:
        tokens = state.num_input_tokens_seen - callback.start_tokens
    metrics = {
        "steps": float(state.global_step),
        "tokensPerSecond": round(tokens / train_seconds, 2) if train_seconds > 0 else 0.0,
        "trainSeconds": round(train_seconds, 3),
        **built.info,
    }
    if losses:
        metrics |= {"initialLoss": losses[0], "trainLoss": sum(losses) / len(losses), "finalLoss": losses[-1]}
    return metrics

"""What the three methods share: inputs checked before any weight loads, the memory plan, the
models loaded the way the plan chose, the library's training config, progress and metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kondense import memory
from kondense.api import DistillSpec
from kondense.errors import InvalidInput, InvalidSpec

from kondense_jobs import data, preflight
from kondense_jobs.distill.checkpoints import CHECKPOINTS_KEPT
from kondense_jobs.parallel import World
from kondense_jobs.runtime import Context, require

log = logging.getLogger("kondense_jobs.distill")

LOGGING_RATIO = 0.02  # log the loss every 2% of the steps (Trainer reads a float < 1 as a ratio)
MAX_SHARD_SIZE = "5GB"  # the published student's safetensors shards, as the hub's models have them


@dataclass(frozen=True)
class Inputs:
    """What step 1 fetched and checked."""

    spec: DistillSpec
    student_dir: Path
    teacher_dir: Path | None  # None: logits with alpha 0, the teacher is unused
    tokenizer: Any
    split: data.Split | None  # None for logits: it trains on the tokens artifact (data.tokens)
    seq: int
    precision: str
    plan: memory.Choice  # strategy and teacher load the memory plan chose
    world: World
    probe: MemoryProbe  # started by the first model load
    trainer_dir: Path  # the Trainer's scratch output_dir (its checkpoint-<N> folders)
    teacher_logits: Path | None = None  # a teacherLogits artifact (distill.teacherLogits): no teacher run


@dataclass(frozen=True)
class Built:
    trainer: Any
    what: str  # for the log line
    tokens_per_step: int | None  # None: the Trainer counts non-padding tokens
    info: dict[str, float]


# ---------------------------------------------------------------------------------------------
# Step 1: vocabularies, precision, the memory plan
# ---------------------------------------------------------------------------------------------


def _config(model_dir: Path) -> dict:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise InvalidInput(f"{model_dir}/config.json is missing: not a Hugging Face model folder") from None
    return cfg.get("text_config", cfg)


# The files a tokenizer is saved as (fast, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tokenizer_config.json")


def _tokenizer(model_dir: Path, role: str):
    """The tokenizer saved with a model; InvalidInput naming the folder when it is missing or does
    not load. Never guessed from config.json: Llama-2 and Mistral-7B both have 32000 tokens."""
    transformers = require("transformers", "distillation")
    if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
        raise InvalidInput(
            f"the {role}'s folder {model_dir} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
            "save it with the model (tokenizer.save_pretrained); teacher and student vocabularies are compared "
            "token by token, never assumed from vocab_size"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - any failure to load is the same bad input, said with its cause
        raise InvalidInput(f"the {role}'s tokenizer in {model_dir} does not load: {type(e).__name__}: {e}") from None


def check_vocabularies(teacher_dir: Path | None, student_dir: Path, method: str):
    """The student's tokenizer (pad token set) when it is the teacher's, token for token; else InvalidInput
    naming the folder whose tokenizer is missing or broken, or the first token that differs.

    Reads tokenizer files and config.json only, never weights. Without a teacher (alpha 0) it
    only loads the student's tokenizer.
    """
    tokenizer = _tokenizer(student_dir, "student")
    if teacher_dir is None:
        return _with_pad(tokenizer)
    t_tok = _tokenizer(teacher_dir, "teacher")
    t_cfg, s_cfg = _config(teacher_dir), _config(student_dir)
    fix = "Teacher and student must share a tokenizer: pick a student of the teacher's family or retokenize."
    t_vocab, s_vocab = t_tok.get_vocab(), tokenizer.get_vocab()
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
    t_size, s_size = t_cfg.get("vocab_size"), s_cfg.get("vocab_size")
    if t_size != s_size:
        if method == "gkd" or min(t_size, s_size) < len(tokenizer):
            raise InvalidInput(
                f"vocabulary mismatch: the teacher's vocab_size is {t_size}, the student's {s_size} "
                f"(tokenizer: {len(tokenizer)} tokens). {fix}"
                + (" gkd (TRL GKDTrainer) also needs equal vocab_size in config.json; use method logits." if method == "gkd" else "")
            )
    return _with_pad(tokenizer)


def _with_pad(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_precision(requested: str) -> str:
    """auto: bf16 where the GPU supports it, else fp32. On CPU: bf16 when asked for (CPU autocast), else fp32."""
    torch = require("torch", "distillation")
    if not torch.cuda.is_available():
        if requested == "fp16":
            log.warning("precision fp16 asked for but no CUDA device: training in fp32 on CPU")
        return "bf16" if requested == "bf16" else "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return requested


def sequence_length(spec: DistillSpec, *model_dirs: Path) -> int:
    """maxSeqLength, capped at the smallest max_position_embeddings of the models."""
    limits = [c.get("max_position_embeddings") or c.get("n_positions") for c in map(_config, model_dirs)]
    return min([spec.max_seq_length, *[n for n in limits if n]])


def plan_memory(ctx: Context, spec: DistillSpec, teacher_dir: Path | None, student_dir: Path) -> memory.Choice:
    """The per-worker estimate of `kondense plan`, from the same function: the way to run that fits,
    or InsufficientResources in the words the plan prints."""
    student = preflight.shape_of(student_dir, "student")
    teacher = preflight.shape_of(teacher_dir, "teacher") if teacher_dir else None
    estimate, fixes = memory.distill_plan(spec, ctx.run.resources, student, teacher, preflight.host_bytes())
    preflight.check(ctx.run.stage, estimate, fixes)
    ctx.metrics["preflightGiB"] = round(estimate.total / memory.GIB, 3)
    assert estimate.choice is not None
    return estimate.choice


def check_strategy(teacher_dir: Path | None, plan: memory.Choice) -> None:
    """A way of running that this machine or the teacher's architecture cannot use: exit 10 naming the field."""
    cfg = _config(teacher_dir) if teacher_dir else {}
    if plan.teacher_load in ("int8", "nf4") and cfg.get("model_type") == "gpt2":
        raise InvalidSpec(
            f"distill.teacherLoad: {plan.teacher_load} quantizes nn.Linear layers with bitsandbytes, and "
            f"{cfg.get('model_type')} models use Conv1D; use teacherLoad replicated or sharded"
        )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _dtype(precision: str):
    torch = require("torch", "distillation")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def decoder_layers(model_class: type) -> list[str]:
    """Class names of the model's repeated blocks: what FSDP shards and gathers one at a time."""
    names = list(getattr(model_class, "_no_split_modules", None) or [])
    if not names:
        raise InvalidSpec(
            f"distill.strategy: {model_class.__name__} names no decoder layer class (_no_split_modules), so FSDP "
            "cannot shard it layer by layer; use strategy ddp (or teacherLoad replicated)"
        )
    return names


def load_teacher(job: Inputs):
    """The frozen teacher, held as the plan chose: replicated, sharded over the workers, int8 or nf4."""
    model_dir, precision, load, world = job.teacher_dir, job.precision, job.plan.teacher_load, job.world
    job.probe.start()
    torch = require("torch", "distillation")
    transformers = require("transformers", "distillation")
    kwargs: dict[str, Any] = {"dtype": _dtype(precision)}
    if load in ("int8", "nf4"):
        require("bitsandbytes", f"teacherLoad {load}")
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_8bit=load == "int8",
            load_in_4bit=load == "nf4",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        )
        kwargs["device_map"] = {"": world.device()}
    elif load == "replicated" and torch.cuda.is_available():
        kwargs["device_map"] = {"": world.local_rank} if world.distributed else "auto"
    if load != "sharded":
        teacher = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval().requires_grad_(False)
    else:
        teacher = _sharded_teacher(model_dir, kwargs["dtype"], world)
    log.info("Teacher held %s: %.1f MiB of weights on this worker", load, held_bytes(teacher) / 2**20)
    return teacher


def teacher_metrics(teacher) -> dict[str, float]:
    """The summary's figure for the teacher as held (none when the method ran without one)."""
    return {} if teacher is None else {"teacherMemoryMiB": round(held_bytes(teacher) / 2**20, 3)}


def held_bytes(model) -> int:
    """Bytes of the weights and buffers this worker holds: its shard under FSDP2 (DTensor's local
    part), the packed 4- or 8-bit data of a bitsandbytes layer (without its small scales)."""
    from torch.distributed.tensor import DTensor

    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in (*model.parameters(), *model.buffers())]
    return sum(t.nelement() * t.element_size() for t in tensors)


def _sharded_teacher(model_dir: Path, dtype, world: World):
    """FSDP2 over all workers: each keeps 1/world of every layer and gathers one layer at a time.

    The local workers load the full teacher into host memory one after the other and keep only
    their shard, so a node needs one teacher's worth of host memory at a time, not one per worker.
    """
    torch = require("torch", "distillation")
    transformers = require("transformers", "distillation")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(world.device().type, (world.size,))
    teacher = None
    for turn in range(world.local_size):
        if turn == world.local_rank:
            teacher = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            teacher.eval().requires_grad_(False)
            layers = set(decoder_layers(type(teacher)))
            for module in teacher.modules():
                if type(module).__name__ in layers:
                    fully_shard(module, mesh=mesh, reshard_after_forward=True)
            fully_shard(teacher, mesh=mesh, reshard_after_forward=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        world.barrier()
    log.info("Teacher sharded over %d workers (FSDP2)", world.size)
    return teacher


def load_student(job: Inputs):
    model_dir, spec = job.student_dir, job.spec
    job.probe.start()
    torch = require("torch", "distillation")
    transformers = require("transformers", "distillation")
    # fp32 master weights; bf16/fp16 are autocast by the Trainer (or FSDP2's mixed precision)
    student = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if spec.gradient_checkpointing:
        student.config.use_cache = False
    return student


# ---------------------------------------------------------------------------------------------
# The library's training config
# ---------------------------------------------------------------------------------------------


def fsdp_options(job: Inputs, student_dir: Path) -> dict[str, Any]:
    """TrainingArguments fields for FSDP2 through accelerate (none for ddp)."""
    if job.plan.strategy != "fsdp":
        return {}
    transformers = require("transformers", "distillation")
    arch = (_config(student_dir).get("architectures") or ["?"])[0]
    model_class = getattr(transformers, arch, None)
    if model_class is None:
        raise InvalidSpec(f"distill.strategy: fsdp cannot find the student's class {arch} in transformers; use strategy ddp")
    layers = decoder_layers(model_class)
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": list(layers),
            "reshard_after_forward": True,
            "activation_checkpointing": job.spec.gradient_checkpointing,
            "state_dict_type": "SHARDED_STATE_DICT",  # checkpoints per worker; reloadable on any worker count
            "cpu_ram_efficient_loading": False,
        },
    }


@contextlib.contextmanager
def accelerate_fsdp(plan: memory.Choice, precision: str) -> Iterator[None]:
    """While the Trainer creates its Accelerator: FSDP2 as kondense runs it, on GPUs and CPUs alike.

    - Gradients are reduced in fp32 under bf16/fp16 compute (accelerate's policy reduces in the
      compute dtype: summing many workers' gradients in bf16 keeps 3 significant digits).
    - CPU workers shard too. accelerate 1.15 turns an FSDP plugin into FSDP on accelerator devices
      only; on CPU its state stays MULTI_CPU and the Trainer silently wraps the student in DDP.
      FSDP2 itself (fully_shard over a gloo mesh) runs on CPU, as the sharded teacher does, so a
      CPU state given an FSDP plugin is made FSDP as the GPU branch of AcceleratorState does; once
      accelerate takes CPUs itself the state is already FSDP and this part does nothing.
    """
    if plan.strategy != "fsdp":
        yield
        return
    torch = require("torch", "distillation")
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = _dtype(precision)
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute != torch.float32 else None
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        if fsdp_plugin is not None and fsdp_plugin.mixed_precision_policy is None:
            fsdp_plugin.mixed_precision_policy = policy  # accelerate sets its own only where none is
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type

    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = original


def sharding(trainer) -> str:
    """How FSDP holds the student, for the log: its mixed precision and the layers it recomputes."""
    if not trainer.is_fsdp_enabled:
        return ""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    policy = trainer.accelerator.state.fsdp_plugin.mixed_precision_policy
    compute = getattr(policy, "param_dtype", None) or next(trainer.model.parameters()).dtype
    reduce = getattr(policy, "reduce_dtype", None) or compute  # FSDP2 reduces in param_dtype unless told
    recomputed = sum(isinstance(m, CheckpointWrapper) for m in trainer.model.modules())
    return (
        f" (FSDP2: computes in {str(compute).removeprefix('torch.')}, reduces gradients in "
        f"{str(reduce).removeprefix('torch.')}, recomputes the activations of {recomputed} layers)"
    )


def training_args(config_class, job: Inputs, **extra):
    """The library config (TrainingArguments, SFTConfig or GKDConfig) with the spec's shared knobs.

    The global batch is batchSize x gradient accumulation x workers; with globalBatchSize set,
    the accumulation follows the worker count, so the same run on 1 or 8 workers takes the same
    optimizer steps. average_tokens_across_devices makes the loss a mean over the global
    batch's tokens, exactly as one worker would compute it.
    """
    torch = require("torch", "distillation")
    spec = job.spec
    fsdp = fsdp_options(job, job.student_dir)
    return config_class(
        output_dir=str(job.trainer_dir),
        num_train_epochs=spec.epochs,
        max_steps=spec.max_steps or -1,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=spec.warmup_ratio,  # a float < 1 is a ratio of the total steps
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.accumulation(job.world.size),
        average_tokens_across_devices=True,
        bf16=job.precision == "bf16",
        fp16=job.precision == "fp16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=spec.gradient_checkpointing and not fsdp,  # FSDP checkpoints its own layers
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
        ddp_find_unused_parameters=False,
        **fsdp,
        **extra,
    )


# ---------------------------------------------------------------------------------------------
# Progress, checkpoints staged, metrics
# ---------------------------------------------------------------------------------------------


def callback(ctx: Context, checkpoints, world: World):
    transformers = require("transformers", "distillation")

    class StageCallback(transformers.TrainerCallback):
        """Progress lines with the loss (rank 0), and each saved checkpoint staged to the store."""

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
            checkpoints.stage(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            ctx.progress.update(state.global_step, state.max_steps, phase="steps", force=True, loss=self.loss)

    return StageCallback()


def training_metrics(state, callback, built: Built, train_seconds: float) -> dict[str, float]:
    """Losses over the whole run (the history survives a resume); throughput of this attempt."""
    losses = [float(h["loss"]) for h in state.log_history if "loss" in h]
    norms = [float(h["grad_norm"]) for h in state.log_history if "grad_norm" in h]
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
    if norms:  # before clipping: what the optimizer was given
        metrics |= {"initialGradNorm": norms[0], "finalGradNorm": norms[-1]}
    return metrics


class MemoryProbe:
    """This worker's peak memory from the first weight it loads, to hold against the plan's estimate
    (preflightGiB): CUDA's high-water mark on a GPU; on CPU the peak resident memory above what the
    process held just before (the interpreter, the libraries, the tokenized data)."""

    def __init__(self):
        self.baseline: int | None = None

    def start(self) -> None:
        if self.baseline is None:
            require("transformers", "distillation").Trainer  # noqa: B018 - its import is not the models' memory
            with open("/proc/self/statm") as f:
                self.baseline = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak_gib(self) -> float:
        torch = require("torch", "distillation")
        if torch.cuda.is_available():
            return round(torch.cuda.max_memory_allocated() / memory.GIB, 3)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return round((peak - (self.baseline or 0)) / memory.GIB, 3)


def save_student(trainer, tokenizer, out: Path, precision: str, world: World) -> None:
    """The student in the training precision as ordinary safetensors shards, by rank 0.

    Every worker takes part in gathering the full weights (FSDP); rank 0 casts and writes them.
    """
    torch = require("torch", "distillation")
    dtype = _dtype(precision)
    state = trainer.accelerator.get_state_dict(trainer.model)  # a collective under FSDP: every worker calls it
    if not world.is_main:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    state = {k: v.detach().to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.save_pretrained(out, state_dict=state, max_shard_size=MAX_SHARD_SIZE)
    # save_pretrained records the dtype of the (fp32 master) parameters; the files hold `dtype`
    model.config.dtype = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def log_published(metrics: dict[str, float]) -> None:
    log.info(
        "Publishing the student: %d steps, loss %.4f -> %.4f, %.0f tokens/s", metrics["steps"],
        metrics.get("initialLoss", math.nan), metrics.get("finalLoss", math.nan), metrics["tokensPerSecond"],
    )

"""How much memory one worker of a stage needs: the estimate `kondense plan` prints and preflight enforces.

Pure and light (no torch): it reads the numbers of a model's config.json and the stage's spec and
resources, and returns a per-worker breakdown for a strategy. `kondense plan`, `kondense
validate` and the stage's own preflight call the same `estimate`, so the words a user reads
before submitting are the words the pod refuses with.

The model, per worker (W workers in all, P parameters, s tokens per sequence, b sequences per
micro-batch, h hidden size, i MLP width, V vocabulary):

- weights, gradients, optimizer: mixed-precision AdamW keeps fp32 master weights (4 bytes),
  fp32 gradients (4) and two fp32 moments (8). ddp replicates all of it and adds DDP's fp32
  gradient buckets (4); fsdp divides it by W and adds the gathered 16-bit copies of the layers
  in flight (two layers: the one computing and the one prefetched).
- activations: what autograd keeps per token and layer of a Llama-style block, counted from
  the block's saved tensors: about 10h + 4i values (norms, q/k/v, attention output, the MLP's
  gate, up and product), in the compute dtype; SDPA/flash attention keeps no s x s matrix. With
  activation checkpointing each layer keeps only its input (h values), plus one layer's full set
  while it is recomputed.
- logits: the student's logits in the compute dtype and three fp32 tensors of the same shape
  (the upcast, its log-softmax and its gradient); the teacher's logits and two fp32 copies.
- teacher: its weights by load mode (replicated, sharded over W plus two gathered layers,
  int8 1 byte per linear weight, nf4 about 0.56), embeddings kept in 16 bits.
- runtime: a fixed 1 GiB per GPU worker (CUDA context, NCCL buffers), 0.25 GiB per CPU worker
  (measured by benchmarks/memory_estimate.py: allocator arenas, thread pools), and 10% for allocator
  fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kondense.api import DistillSpec, EvaluateSpec, QuantizeSpec, Resources, TeacherLogitsSpec

GIB = 1024**3
RUNTIME_GIB = {"gpu": 1.0, "cpu": 0.25}  # per worker: CUDA context, NCCL and cuBLAS workspaces; malloc arenas, OpenMP
FRAGMENTATION = 1.10
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.5625}
DDP_BUCKET_BYTES = 4.0  # DDP's fp32 gradient buckets
GATHERED_LAYERS = 2  # fsdp: the layer computing and the one prefetched
PLAIN_MLP = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi"}  # two MLP matrices, not three


@dataclass(frozen=True)
class Shape:
    """The numbers of a decoder's config.json that memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool
    gated: bool = True  # a SwiGLU MLP (gate, up, down: Llama, Qwen, Mistral) or a plain one (GPT-2's up, down)
    max_positions: int | None = None
    parameters: int | None = None  # exact count when known (safetensors headers); else from the formula
    name: str = "model"

    @classmethod
    def from_config(cls, cfg: dict[str, Any], name: str = "model", parameters: int | None = None) -> Shape:
        cfg = cfg.get("text_config", cfg)
        hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
        layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
        vocab = cfg.get("vocab_size")
        missing = [k for k, v in (("hidden_size", hidden), ("num_hidden_layers", layers), ("vocab_size", vocab)) if not v]
        if missing:
            raise ValueError(f"{name}: config.json lacks {', '.join(missing)}")
        heads = cfg.get("num_attention_heads") or cfg.get("n_head") or max(1, hidden // 64)
        return cls(
            layers=int(layers),
            hidden=int(hidden),
            intermediate=int(cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden),
            vocab=int(vocab),
            heads=int(heads),
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            tied=bool(cfg.get("tie_word_embeddings", True)),
            gated="intermediate_size" in cfg and cfg.get("model_type") not in PLAIN_MLP,
            max_positions=cfg.get("max_position_embeddings") or cfg.get("n_positions"),
            parameters=parameters,
            name=name,
        )

    @property
    def embedding_parameters(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def layer_parameters(self) -> int:
        kv = self.hidden // self.heads * self.kv_heads
        mlp = (3 if self.gated else 2) * self.hidden * self.intermediate
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + mlp + 2 * self.hidden

    @property
    def total_parameters(self) -> int:
        return self.parameters or self.embedding_parameters + self.layers * self.layer_parameters + self.hidden


@dataclass(frozen=True)
class Choice:
    """How a training stage runs: the knobs the plan may turn."""

    strategy: str  # ddp | fsdp
    teacher_load: str  # none | replicated | sharded | int8 | nf4
    batch_size: int
    checkpointing: bool


@dataclass(frozen=True)
class Estimate:
    """Bytes per worker by part, against what one worker has."""

    parts: dict[str, float]
    capacity: float
    capacity_what: str
    choice: Choice | None = None
    workers: int = 1
    nodes: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values()) * FRAGMENTATION

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def table(self) -> str:
        shown = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v)
        return f"{self.total / GIB:.2f} GiB per worker ({shown}; +10% fragmentation) of {self.capacity / GIB:.1f} GiB ({self.capacity_what})"


def capacity(resources: Resources, host_bytes: float | None = None) -> tuple[float, str]:
    """What one worker may use: one GPU's memory, or its share of the pod's (or host's) memory on CPU."""
    if resources.gpus > 0:
        return resources.gpu_memory_gib * GIB, f"one {resources.gpu_memory_gib:g} GiB GPU"
    workers = resources.workers_per_node
    if resources.memory:
        total, what = parse_quantity(resources.memory), f"resources.memory {resources.memory}"
    elif host_bytes:
        total, what = host_bytes, f"host memory {host_bytes / GIB:.1f} GiB"
    else:
        return math.inf, "memory not declared"
    return total / workers, (what if workers == 1 else f"{what} / {workers} workers")


def parse_quantity(q: str) -> float:
    units = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
    for suffix in sorted(units, key=len, reverse=True):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * units[suffix]
    return float(q)


def compute_dtype(precision: str, gpus: int) -> str:
    """The precision a stage computes in: auto is bf16 on GPUs, fp32 on CPU."""
    if precision == "auto":
        return "bf16" if gpus > 0 else "fp32"
    return precision


def _linear_parameters(shape: Shape) -> int:
    return shape.layers * (shape.layer_parameters - 2 * shape.hidden)


def teacher_bytes(shape: Shape, load: str, dtype: str, world: int) -> float:
    """The teacher's weights held by one worker."""
    total = shape.total_parameters
    if load == "none":
        return 0.0
    if load in ("int8", "nf4"):
        linear = _linear_parameters(shape)
        return linear * DTYPE_BYTES[load] + (total - linear) * DTYPE_BYTES["bf16"]
    per = DTYPE_BYTES[dtype]
    if load == "sharded":
        return total * per / world + GATHERED_LAYERS * shape.layer_parameters * per
    return total * per


def activation_bytes(shape: Shape, batch: int, seq: int, dtype: str, checkpointing: bool) -> float:
    tokens = batch * seq
    per_layer = (10 * shape.hidden + 4 * shape.intermediate) * tokens * DTYPE_BYTES[dtype]
    if checkpointing:
        return shape.layers * shape.hidden * tokens * DTYPE_BYTES[dtype] + per_layer
    return shape.layers * per_layer


def logits_bytes(student: Shape, teacher: Shape | None, batch: int, seq: int, dtype: str) -> float:
    n = batch * seq * student.vocab
    out = n * (DTYPE_BYTES[dtype] + 3 * 4)
    if teacher is not None:
        out += batch * seq * teacher.vocab * (DTYPE_BYTES[dtype] + 2 * 4)
    return out


def training(
    student: Shape,
    teacher: Shape | None,
    choice: Choice,
    seq: int,
    dtype: str,
    resources: Resources,
    host_bytes: float | None = None,
) -> Estimate:
    """One training worker of a distill stage."""
    world = resources.world_size
    p = student.total_parameters
    if choice.strategy == "fsdp":
        gathered = GATHERED_LAYERS * student.layer_parameters * DTYPE_BYTES[dtype]
        parts = {
            "weights": 4 * p / world + gathered,
            "gradients": 4 * p / world,
            "optimizer": 8 * p / world,
        }
    else:
        parts = {
            "weights": 4 * p,
            "gradients": 4 * p + (DDP_BUCKET_BYTES * p if world > 1 else 0.0),
            "optimizer": 8 * p,
        }
    parts["activations"] = activation_bytes(student, choice.batch_size, seq, dtype, choice.checkpointing)
    parts["logits"] = logits_bytes(student, teacher if choice.teacher_load != "none" else None, choice.batch_size, seq, dtype)
    parts["teacher"] = teacher_bytes(teacher, choice.teacher_load, dtype, world) if teacher else 0.0
    parts["runtime"] = RUNTIME_GIB["gpu" if resources.gpus else "cpu"] * GIB
    cap, what = capacity(resources, host_bytes)
    return Estimate(parts, cap, what, choice, resources.workers_per_node, resources.nodes)


def inference(shape: Shape, dtype: str, seq: int, resources: Resources, host_bytes: float | None = None) -> Estimate:
    """A quantize or evaluate stage: one process spreads the model over its pod's GPUs (device_map auto)."""
    gpus = max(1, resources.gpus)
    parts = {
        "weights": shape.total_parameters * DTYPE_BYTES[dtype] / gpus,
        "activations": activation_bytes(shape, 1, seq, dtype, checkpointing=True),
        "logits": seq * shape.vocab * (DTYPE_BYTES[dtype] + 4),
    }
    parts["runtime"] = RUNTIME_GIB["gpu" if resources.gpus else "cpu"] * GIB
    cap, what = capacity(resources.model_copy(update={"workers": None}), host_bytes)
    return Estimate(parts, cap, what)


def choices(spec: DistillSpec, resources: Resources, has_teacher: bool) -> list[Choice]:
    """Every way the stage may run under its spec, the preferred (fastest) first.

    auto tries ddp before fsdp and a replicated teacher before a sharded one; a value set in
    the spec is the only one tried. On one worker fsdp and sharded mean one full copy.
    """
    world = resources.world_size
    fsdp = ["fsdp"] if world > 1 and resources.gpus else []  # accelerate runs FSDP on GPUs only
    strategies = [spec.strategy] if spec.strategy != "auto" else ["ddp", *fsdp]
    if not has_teacher:
        loads = ["none"]
    elif spec.teacher_load != "auto":
        loads = [spec.teacher_load]
    elif world > 1 and spec.method == "logits":
        loads = ["replicated", "sharded"]
    else:
        loads = ["replicated"]
    if world == 1:  # nothing to shard over: one worker holds everything
        strategies = ["ddp" if s == "fsdp" else s for s in strategies]
        loads = ["replicated" if t == "sharded" else t for t in loads]
    return [Choice(s, t, spec.batch_size, spec.gradient_checkpointing) for t in loads for s in strategies]


@dataclass(frozen=True)
class Fix:
    """A change of the spec that makes a stage fit."""

    field: str  # "distill.strategy: fsdp, resources.gpus: 8"
    estimate: Estimate
    cost: int  # lower is cheaper: 0 free, 1 slower, 2 approximates the teacher, 3 more hardware


def distill_plan(
    spec: DistillSpec,
    resources: Resources,
    student: Shape,
    teacher: Shape | None,
    host_bytes: float | None = None,
) -> tuple[Estimate, list[Fix]]:
    """The estimate the stage will run with (the first choice that fits, else the preferred one) and,
    when nothing fits, the cheapest changes that would."""
    dtype = compute_dtype(spec.precision, resources.gpus)
    seq = sequence_length(spec.max_seq_length, student, teacher)
    options = [training(student, teacher, c, seq, dtype, resources, host_bytes) for c in choices(spec, resources, teacher is not None)]
    chosen = next((e for e in options if e.fits), None) or min(options, key=lambda e: e.total)
    if chosen.fits:
        return chosen, []
    return chosen, fixes(spec, resources, student, teacher, chosen, seq, dtype, host_bytes)


def sequence_length(requested: int, *shapes: Shape | None) -> int:
    limits = [s.max_positions for s in shapes if s is not None and s.max_positions]
    return min([requested, *limits])


def fixes(
    spec: DistillSpec,
    resources: Resources,
    student: Shape,
    teacher: Shape | None,
    current: Estimate,
    seq: int,
    dtype: str,
    host_bytes: float | None,
) -> list[Fix]:
    """Single or paired changes that make the stage fit, cheapest first (at most five)."""
    assert current.choice is not None
    base = current.choice
    world = resources.world_size
    loads = [] if teacher is None or base.teacher_load == "none" else ["sharded", "int8", "nf4"]

    def est(choice: Choice, r: Resources = resources) -> Estimate:
        return training(student, teacher, choice, seq, dtype, r, host_bytes)

    candidates: list[tuple[list[tuple[str, str]], Choice, Resources, int]] = []
    more_gpus = [] if not resources.gpus else [
        ("resources.gpus", str(g), resources.model_copy(update={"gpus": g, "workers": None}))
        for g in (2, 4, 8) if g > resources.gpus
    ]
    more_nodes = [
        ("resources.nodes", str(n), resources.model_copy(update={"nodes": n})) for n in (2, 4, 8) if n > resources.nodes
    ]
    hardware = [(f, v, r) for f, v, r in more_gpus + more_nodes if r.world_size > world]
    micro = [b for b in (spec.batch_size // 2, 1) if 0 < b < spec.batch_size]
    for strategy in ("ddp", "fsdp"):
        for load in dict.fromkeys([base.teacher_load, *loads]):
            if load == "sharded" and spec.method != "logits":
                continue
            for ckpt in dict.fromkeys([base.checkpointing, True]):
                for b in dict.fromkeys([base.batch_size, *micro]):
                    choice = Choice(strategy, load, b, ckpt)
                    edits = []
                    cost = 0
                    # an edit is named only where the spec says otherwise; auto finds ddp/fsdp, replicated/sharded itself
                    if spec.strategy not in (strategy, "auto"):
                        edits.append(("distill.strategy", strategy))
                    if load != base.teacher_load:
                        if spec.teacher_load != load and not (spec.teacher_load == "auto" and load in ("replicated", "sharded")):
                            edits.append(("distill.teacherLoad", load))
                        cost = max(cost, 2 if load in ("int8", "nf4") else 0)
                    if ckpt != base.checkpointing:
                        edits.append(("distill.gradientCheckpointing", "true"))
                        cost = max(cost, 1)
                    if b != base.batch_size:
                        edits.append(("distill.batchSize", str(b)))
                        cost = max(cost, 1)
                    needs_world = strategy == "fsdp" or load == "sharded"
                    if strategy == "fsdp" and not resources.gpus:
                        continue
                    if choice != base and (not needs_world or world > 1):
                        candidates.append((edits, choice, resources, cost + len(edits) * 0.1))
                    for f, v, r in hardware:
                        nodes = 0.5 if f == "resources.nodes" else 0.0  # the network is slower than NVLink
                        candidates.append(([*edits, (f, v)], choice, r, cost + 3 + nodes + len(edits) * 0.1 + r.world_size / 100))
    out: list[Fix] = []
    seen: set[Choice] = set()  # one fix per way of running: the cheapest hardware for it
    for edits, choice, r, cost in sorted(candidates, key=lambda c: c[3]):
        if choice in seen:
            continue
        e = est(choice, r)
        if e.fits:
            seen.add(choice)
            out.append(Fix(", ".join(f"{f}: {v}" for f, v in edits), e, int(cost)))
        if len(out) == 5:
            break
    return out


def more_gpus(estimate_for, resources: Resources) -> list[Fix]:
    """For a single-process stage: the fewest GPUs (up to 8) that hold it."""
    for g in (2, 4, 8):
        if g > resources.gpus > 0:
            e = estimate_for(resources.model_copy(update={"gpus": g}))
            if e.fits:
                return [Fix(f"resources.gpus: {g}", e, 3)]
    return []


CALIBRATED_METHODS = ("gptq", "awq", "w8a8-int8")


def quantize_plan(spec: QuantizeSpec, resources: Resources, shape: Shape, host_bytes: float | None = None) -> Estimate:
    # Calibrated methods run the model on calibrationSeqLength tokens; fp8-dynamic, bnb and gguf on none.
    seq = spec.calibration_seq_length if spec.method in CALIBRATED_METHODS else 1
    dtype = "fp32" if spec.method == "gguf" else "bf16" if resources.gpus else "fp32"
    if spec.method == "gguf":  # the converter runs on the CPU: host memory, not GPU
        resources = resources.model_copy(update={"gpus": 0})
    return inference(shape, dtype, seq, resources, host_bytes)


def evaluate_plan(spec: EvaluateSpec, resources: Resources, largest: Shape, host_bytes: float | None = None) -> Estimate:
    return inference(largest, "bf16" if resources.gpus else "fp32", spec.seq_length, resources, host_bytes)


def teacher_logits_plan(
    spec: TeacherLogitsSpec, resources: Resources, teacher: Shape, host_bytes: float | None = None
) -> Estimate:
    """The teacher's forward pass over batchSize windows: its activations and logits (with their
    fp32 log-softmax) grow with the batch; no gradients."""
    dtype = "bf16" if resources.gpus else "fp32"
    one = inference(teacher, dtype, spec.max_seq_length, resources, host_bytes)
    parts = {k: v * spec.batch_size if k in ("activations", "logits") else v for k, v in one.parts.items()}
    return Estimate(parts, one.capacity, one.capacity_what)


def shortfall(stage: str, estimate: Estimate, fixes: list[Fix]) -> list[str]:
    """The words for a stage that does not fit: `kondense plan` prints them, preflight refuses with them."""
    lines = [f"{stage} needs {estimate.table()}."]
    if fixes:
        lines.append("Changes that would make it fit, cheapest first:")
        lines += [f"  - {fix.field}  ->  {fix.estimate.total / GIB:.1f} GiB per worker" for fix in fixes]
    else:
        lines.append("Nothing up to 8 GPUs x 8 nodes (with fsdp, a sharded or quantized teacher, a smaller batch) makes it fit.")
    return lines

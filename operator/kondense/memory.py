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
  in flight (two layers: the one computing and the one prefetched). To publish, fsdp's rank 0
  gathers the full fp32 weights into host memory (4P), which on CPU workers is the same memory.
- activations: what autograd keeps per token and layer of a Llama-style block, counted from
  the block's saved tensors: about 10h + 4i values (norms, q/k/v, attention output, the MLP's
  gate, up and product), in the compute dtype; SDPA/flash attention keeps no s x s matrix. With
  activation checkpointing each layer keeps only its input (h values), plus one layer's full set
  while it is recomputed.
- logits: with the logits method's own losses (kondense_jobs.distill.losses, which compute the
  gradient with the loss a block of positions at a time), the student's logits and their
  gradient in the compute dtype, the teacher's logits (none from stored top-k), and six fp32
  temporaries of one block (`KD_BLOCK_ELEMENTS`). With a library's autograd loss (TRL's SFT and GKD),
  the student's logits and three fp32 tensors of the same shape (the upcast, its log-softmax and
  its gradient), the teacher's logits and two fp32 copies.
- teacher: its weights by load mode (replicated, sharded over W plus two gathered layers,
  int8 1 byte per linear weight, nf4 about 0.56), embeddings kept in 16 bits.
- runtime: a fixed 1 GiB per GPU worker (CUDA context, NCCL buffers), 0.05 GiB per CPU worker
  (fitted by benchmarks/memory_estimate.py: allocator arenas, thread pools; it was 0.25 while the
  loss's fp32 copies were under-counted and it made up for them), and 10% for allocator
  fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kondense.api import DistillSpec, EvaluateSpec, QuantizeSpec, Resources, TeacherLogitsSpec

GIB = 1024**3
RUNTIME_GIB = {"gpu": 1.0, "cpu": 0.05}  # per worker: CUDA context, NCCL and cuBLAS workspaces; malloc arenas, OpenMP
FRAGMENTATION = 1.10
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "nf4": 0.5625}
DDP_BUCKET_BYTES = 4.0  # DDP's fp32 gradient buckets
GATHERED_LAYERS = 2  # fsdp: the layer computing and the one prefetched
CONFIG_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
KD_BLOCK_ELEMENTS = {"cpu": 1 << 20, "gpu": 1 << 24}  # kd_loss's block, rows x vocabulary: CPU caches; few GPU launches
KD_BLOCK_TEMPORARIES = 6  # fp32 tensors of one block alive at once in the blockwise losses
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
    dtype: str | None = None  # the checkpoint's dtype (config.json torch_dtype/dtype): what dtype="auto" loads

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
            dtype=CONFIG_DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "")),
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

    @property
    def linear_inputs(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of one decoder layer's Linear modules: q, k, v and o read the
        hidden state (o reads the heads' concatenation, hidden wide), gate and up read it too, down
        reads the MLP width; a plain MLP has no gate."""
        kv = self.hidden // self.heads * self.kv_heads
        h, i = self.hidden, self.intermediate
        attention = [(h, h), (h, kv), (h, kv), (h, h)]
        return attention + ([(h, i)] * (2 if self.gated else 1)) + [(i, h)]


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
    # A stage whose GPUs and host both hold a share (quantize: layers on the GPU, the model and the
    # offloaded activations in host memory): the host's side, checked against resources.memory.
    host: Estimate | None = None

    @property
    def total(self) -> float:
        return sum(self.parts.values()) * FRAGMENTATION

    @property
    def gpu_fits(self) -> bool:
        """The per-worker side alone (a GPU, or a CPU worker's share), whatever the host's side says."""
        return self.total <= self.capacity

    @property
    def fits(self) -> bool:
        """Both sides fit: the per-worker part its GPU (or CPU share), and the host part the pod's memory."""
        return self.total <= self.capacity and (self.host is None or self.host.fits)

    def table(self, unit: str = "per worker") -> str:
        shown = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v)
        line = f"{self.total / GIB:.2f} GiB {unit} ({shown}; +10% fragmentation) of {self.capacity / GIB:.1f} GiB ({self.capacity_what})"
        if self.host is not None:
            line += f"; and {self.host.table('in host memory')}"
        return line

    def totals(self) -> str:
        """The short form a fix is shown with: "12.3 GiB per worker", and the host's part when there is one."""
        out = f"{self.total / GIB:.1f} GiB per worker"
        return out if self.host is None else f"{out}, {self.host.total / GIB:.1f} GiB in host memory"


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


def fused_loss(spec: DistillSpec) -> bool:
    """Whether the stage trains on the logits method's own loss (kd_loss, or topk_kd_loss on stored
    logits), whose gradient is computed blockwise, rather than on a library's autograd loss."""
    return spec.method == "logits"


def logits_bytes(
    student: Shape, teacher: Shape | None, batch: int, seq: int, dtype: str, fused: bool, device: str
) -> float:
    n = batch * seq
    b = DTYPE_BYTES[dtype]
    if fused:
        out = n * student.vocab * 2 * b + KD_BLOCK_TEMPORARIES * 4 * KD_BLOCK_ELEMENTS[device]
        return out + (n * teacher.vocab * b if teacher is not None else 0.0)
    out = n * student.vocab * (b + 3 * 4)
    return out + (n * teacher.vocab * (b + 2 * 4) if teacher is not None else 0.0)


def training(
    student: Shape,
    teacher: Shape | None,
    choice: Choice,
    seq: int,
    dtype: str,
    resources: Resources,
    host_bytes: float | None = None,
    fused: bool = True,
) -> Estimate:
    """One training worker of a distill stage; `fused`: its loss is blockwise (see `fused_loss`)."""
    world = resources.world_size
    p = student.total_parameters
    device = "gpu" if resources.gpus else "cpu"
    if choice.strategy == "fsdp":
        gathered = GATHERED_LAYERS * student.layer_parameters * DTYPE_BYTES[dtype]
        published = 4 * p if device == "cpu" else 0.0  # rank 0's full copy to publish, in host memory
        parts = {
            "weights": 4 * p / world + gathered + published,
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
    held = teacher if choice.teacher_load != "none" else None
    parts["logits"] = logits_bytes(student, held, choice.batch_size, seq, dtype, fused, device)
    parts["teacher"] = teacher_bytes(teacher, choice.teacher_load, dtype, world) if teacher else 0.0
    parts["runtime"] = RUNTIME_GIB[device] * GIB
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
    the spec is the only one tried. On one worker a sharded teacher is a replicated one, and fsdp
    (only when asked: its checkpoints resume on any worker count) holds one full copy.
    """
    world = resources.world_size
    fsdp = ["fsdp"] if world > 1 else []
    strategies = [spec.strategy] if spec.strategy != "auto" else ["ddp", *fsdp]
    if not has_teacher:
        loads = ["none"]
    elif spec.teacher_load != "auto":
        loads = [spec.teacher_load]
    elif world > 1 and spec.method == "logits":
        loads = ["replicated", "sharded"]
    else:
        loads = ["replicated"]
    if world == 1:  # nothing to shard over: one worker holds everything (fsdp over a world of one, if asked)
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
    fused = fused_loss(spec)
    options = [
        training(student, teacher, c, seq, dtype, resources, host_bytes, fused)
        for c in choices(spec, resources, teacher is not None)
    ]
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
        return training(student, teacher, choice, seq, dtype, r, host_bytes, fused_loss(spec))

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


CALIBRATED_METHODS = ("gptq", "awq", "w8a8-int8")  # llm-compressor runs them on calibration windows
HESSIAN_METHODS = ("gptq", "w8a8-int8")  # GPTQModifier: an fp32 Hessian per Linear of the layer being calibrated
LLMC_METHODS = (*CALIBRATED_METHODS, "fp8-dynamic")
BNB_METHODS = {"bnb-nf4": "nf4", "bnb-int8": "int8"}
HESSIAN_BYTES = 4.0  # llm-compressor's GPTQ_PRECISION is float32
TOKEN_ID_BYTES = 16.0  # input_ids and attention_mask, int64, kept with the offloaded intermediates


def quantize_how(spec: QuantizeSpec, resources: Resources) -> str:
    """How a quantize stage holds its model, in the words `kondense plan` prints as the strategy."""
    if spec.method == "gguf":
        return "llama.cpp, host only"
    if spec.method in BNB_METHODS:
        return f"whole model on {resources.gpus} GPUs" if resources.gpus > 1 else "whole model, one process"
    pipeline = "sequential" if spec.method in CALIBRATED_METHODS else "data-free"
    return f"{pipeline}, layer by layer" + ("" if resources.gpus else " on CPU")


def quantize_plan(spec: QuantizeSpec, resources: Resources, shape: Shape, host_bytes: float | None = None) -> Estimate:
    """A quantize stage, per method: what one GPU holds and what the host holds (the `host` part).

    llm-compressor (gptq, awq, w8a8-int8 calibrated; fp8-dynamic data-free) loads the model into
    host memory in its checkpoint dtype and runs the sequential pipeline: one subgraph (a decoder
    layer; the embeddings before the first, the norm and lm_head after the last) is onloaded to
    the first GPU at a time; the calibration windows' activations between layers are offloaded to
    host memory and onloaded one window at a time. Only the first GPU is used, so more GPUs do not
    lower the per-GPU figure. Per GPU: the largest subgraph's weights; for GPTQ (gptq, w8a8-int8)
    the fp32 Hessians of the layer's Linear modules (in_features^2 x 4 bytes each) and the
    compression of the widest one (gptq_module_peak; llm-compressor's "auto" batching compresses
    more same-shaped modules at once only into GPU memory that is free anyway); one window through one layer
    (its input and output, the block's temporaries, the fp32 upcast GPTQ takes of a Linear's input);
    the runtime. Host: the whole model in its dtype, the offloaded intermediates (input and output
    of the current layer for every calibration window, plus their token ids; awq also caches its
    mappings' inputs, two more hidden-wide tensors per window), the CPU runtime. fp8-dynamic needs
    no data: the host holds the model, a GPU one subgraph at a time. Saving compresses module by
    module in place (compressed-tensors' compress_model).

    bitsandbytes (bnb-nf4, bnb-int8) loads the whole model onto the GPUs (device_map auto spreads it
    over the pod's GPUs) and quantizes each Linear as its weights load: the GPUs hold the quantized
    model (Linear weights at 0.5625 or 1 byte per parameter, the rest in its dtype) plus one layer
    still in its dtype, never the whole 16-bit model. Host: save_pretrained copies the quantized
    tensors to host memory as it writes them (counted as the whole quantized model, an upper bound).

    gguf runs on the CPU only: llama.cpp's converter is lazy (its default), reading the memory-mapped
    safetensors one tensor at a time, so it holds the largest tensor (the embedding or lm_head) as
    read, as an fp32 working copy and as converted, 3 x 4 bytes per value; llama.cpp's quantizer
    then works tensor by tensor too. The mapped files are page cache, which the kernel reclaims.
    With an importance matrix, llama-imatrix runs the mapped model over one calibration window at a
    time: it holds that window's logits at every position (fp32, `logits`), its f16 KV cache and a
    layer's activations (`activations`).

    With resources.gpus 0 every part is host memory: one estimate against resources.memory (or the
    host's memory), no `host` part.
    """
    gpus = resources.gpus
    dtype = shape.dtype or ("bf16" if gpus else "fp32")
    b = DTYPE_BYTES[dtype]
    host_cap, host_what = capacity(resources.model_copy(update={"gpus": 0, "workers": None}), host_bytes)
    runtime_cpu = RUNTIME_GIB["cpu"] * GIB
    whole = shape.total_parameters * b

    if spec.method == "gguf":
        largest = max(shape.vocab * shape.hidden, *(i * o for i, o in shape.linear_inputs))
        parts = {"weights": largest * 4.0 * 3, "runtime": runtime_cpu}
        if spec.uses_imatrix:
            n = spec.calibration_seq_length
            kv_width = shape.hidden * shape.kv_heads // shape.heads
            parts["logits"] = n * shape.vocab * 4.0  # every position's, fp32
            parts["activations"] = (
                n * shape.layers * 2 * kv_width * 2.0  # the f16 KV cache of one window
                + n * max(shape.hidden, shape.intermediate) * 4.0 * 4  # a layer's activations, fp32
            )
        return Estimate(parts, host_cap, host_what)

    if spec.method in BNB_METHODS:
        linear = _linear_parameters(shape)
        quantized = linear * DTYPE_BYTES[BNB_METHODS[spec.method]] + (shape.total_parameters - linear) * b
        device = {"weights": quantized / max(1, gpus) + shape.layer_parameters * b}
        if not gpus:
            return Estimate({**device, "runtime": runtime_cpu}, host_cap, host_what)
        host = Estimate({"weights": quantized, "runtime": runtime_cpu}, host_cap, host_what)
        cap, what = capacity(resources.model_copy(update={"workers": None}), host_bytes)
        return Estimate({**device, "runtime": RUNTIME_GIB["gpu"] * GIB}, cap, what, host=host)

    # llm-compressor: the sequential (calibrated) or data-free pipeline
    h, i = shape.hidden, shape.intermediate
    subgraph = max(shape.layer_parameters, shape.vocab * shape.hidden) * b
    device: dict[str, float] = {"weights": subgraph}
    offloaded = 0.0
    if spec.method in CALIBRATED_METHODS:
        seq = sequence_length(spec.calibration_seq_length, shape)
        if spec.method in HESSIAN_METHODS:
            hessians = sum(n_in * n_in for n_in, _ in shape.linear_inputs) * HESSIAN_BYTES
            device["hessians"] = hessians + max(gptq_module_peak(n_in, n_out) for n_in, n_out in shape.linear_inputs)
        device["activations"] = seq * ((10 * h + 4 * i + 2 * h) * b + max(h, i) * 4.0)
        per_window = seq * (2 * h * b + TOKEN_ID_BYTES + (2 * h * b if spec.method == "awq" else 0.0))
        offloaded = spec.calibration_samples * per_window
    if not gpus:  # the "onloaded" layer is the model's own: counted once, with the model
        parts = {"weights": whole, **{k: v for k, v in device.items() if k != "weights"}}
        parts["activations"] = parts.get("activations", 0.0) + offloaded
        return Estimate({**parts, "runtime": runtime_cpu}, host_cap, host_what)
    host = Estimate({"weights": whole, "activations": offloaded, "runtime": runtime_cpu}, host_cap, host_what)
    cap, what = capacity(resources.model_copy(update={"workers": None}), host_bytes)
    return Estimate({**device, "runtime": RUNTIME_GIB["gpu"] * GIB}, cap, what, host=host)


def gptq_module_peak(n_in: int, n_out: int, block: int = 128) -> float:
    """Bytes GPTQ works in to compress one Linear, llm-compressor 0.14's own count (gptq/helpers.py
    max_batch_size): the larger of its quantization phase (the Hessian reused as its inverse, the
    weight, its fp32 working copy and the error update, four column blocks) and its activation
    ordering phase (the Hessian and both permuted copies, two weights), in fp32."""
    weight, hessian = n_in * n_out, n_in * n_in
    return max(hessian + 3 * weight + 4 * n_out * block, 3 * hessian + 2 * weight) * HESSIAN_BYTES


def quantize_fixes(spec: QuantizeSpec, resources: Resources, shape: Shape, host_bytes: float | None = None) -> list[Fix]:
    """What would make a quantize stage fit, cheapest first: fewer calibration samples (the offloaded
    intermediates shrink with them), a shorter calibrationSeqLength (what one GPU holds shrinks), more
    GPUs (bitsandbytes only: llm-compressor uses the first), more memory for the pod."""
    current = quantize_plan(spec, resources, shape, host_bytes)
    if current.fits:
        return []
    out: list[Fix] = []

    def plan(s: QuantizeSpec = spec, r: Resources = resources) -> Estimate:
        return quantize_plan(s, r, shape, host_bytes)

    shorter: tuple[QuantizeSpec, Fix] | None = None
    if spec.method in CALIBRATED_METHODS:
        n = spec.calibration_samples
        while n > 1 and not plan(spec.model_copy(update={"calibration_samples": n})).fits:
            n //= 2
        e = plan(spec.model_copy(update={"calibration_samples": n}))
        if n < spec.calibration_samples and e.fits:
            out.append(Fix(f"quantize.calibrationSamples: {n}", e, 1))
        seq = spec.calibration_seq_length
        while seq > 128 and not plan(spec.model_copy(update={"calibration_seq_length": seq})).gpu_fits:
            seq //= 2
        s = spec.model_copy(update={"calibration_seq_length": seq})
        if seq < spec.calibration_seq_length and plan(s).gpu_fits:
            shorter = (s, Fix(f"quantize.calibrationSeqLength: {seq}", plan(s), 1))
            if shorter[1].estimate.fits:
                out.append(shorter[1])
    if spec.method in BNB_METHODS:
        out += more_gpus(lambda r: plan(r=r), resources)
    # more memory for the pod: the host part (on CPU, the whole estimate), rounded up to a GiB
    host = current.host if current.host is not None else current
    if not host.fits:
        gib = math.ceil(host.total / GIB)
        more = resources.model_copy(update={"memory": f"{gib}Gi"})
        fix = Fix(f"resources.memory: {gib}Gi", plan(r=more), 3)
        if not fix.estimate.fits and shorter is not None:  # the GPU's side too: with the shorter windows
            fix = Fix(f"{fix.field}, {shorter[1].field}", plan(shorter[0], more), 3)
        if fix.estimate.fits:
            out.append(fix)
    return out


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
        lines += [f"  - {fix.field}  ->  {fix.estimate.totals()}" for fix in fixes]
    elif estimate.host is not None:
        lines.append(
            "Nothing up to 8 GPUs, more memory, fewer calibration samples or a shorter calibrationSeqLength makes it fit: "
            "one GPU must hold the largest layer (with GPTQ, its Hessians too)."
        )
    else:
        lines.append("Nothing up to 8 GPUs x 8 nodes (with fsdp, a sharded or quantized teacher, a smaller batch) makes it fit.")
    return lines

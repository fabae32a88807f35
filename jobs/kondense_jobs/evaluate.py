"""The evaluate stage: every variant measured the same way, a report, and the quality gates.

    variants = [ctx.model_dir(name) for name in spec.of]     # fetch
    measure each on identical held-out windows                # transform
    report.json / report.md / plot.png, then ctx.publish      # publish (also when a gate fails)

Perplexity is exp(mean NLL) over every predicted token of non-overlapping windows cut from the
held-out split, tokenized once with the baseline's tokenizer (the variants share it), so every
variant sees exactly the same tokens. Hugging Face folders (full precision, bitsandbytes,
compressed-tensors GPTQ) are scored with transformers, GGUF files with llama.cpp
(kondense_jobs.gguf, logits of every position on the same token ids). Speed and memory are
measured alike for every variant and engine (kondense_jobs.speed): the same `promptTokens`-token
prompts from the held-out split, `generateTokens` new tokens each, prefill and decode tokens/s
apart, at batch 1 and at `speedBatch`, and the peak runtime memory at `speedBatch`.

Divergence from the baseline, at every predicted position of the same windows, from log-softmax
in float64: KL(baseline || variant) = sum_t p(t) (log p(t) - log q(t)), p the baseline's
next-token distribution (llama.cpp's `perplexity --kl-divergence` direction), and top-1 agreement,
the share of positions where the variant's argmax is the baseline's. The baseline is measured
first; its logits are never all held in memory: each window's log-probabilities go to
memory-mapped files in the work dir, and each later variant is compared with them window by
window. When every position's whole distribution fits in KL_FULL_BYTES (16 bytes per token id
and log-prob: small vocabularies or few tokens) all are kept and the KL is exact; otherwise the
top-KL_TOP_K tokens and the log of the rest's mass as one bucket, which leaves out only the
divergence inside the bucket: a lower bound, close when the baseline puts little mass there
(report.json's setup.kl_top_k says which: the vocabulary size when exact).
Holding two models at once (lockstep) would need both in memory, the full logits on disk
gigabytes (65536 tokens x 128k vocabulary in float16 is 16 GiB); the top-k files take 16 bytes
per kept entry whatever the vocabulary (65536 tokens: 270 MB).

A variant that cannot be measured (InvalidInput: a file llama.cpp cannot load, token ids outside
its vocabulary) is a row of n/a with the reason in `note`, which fails every gate applied to it;
the baseline must be measured.

Tasks (evaluate.tasks) are scored with lm-evaluation-harness on each variant right after its
perplexity, on the model already loaded (kondense_jobs.tasks): every task is looked up and its
data loaded before any model, so an unknown task or missing data fails the stage at once. Recovery
is a variant's score over the baseline's, per task, and their mean; a variant that cannot run a
task (a GGUF file with another vocabulary, an error of the task on it) has that task's score n/a
with the reason, which fails its recovery gates.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kondense.api import LOADS_IN, EvaluateSpec, Gates, QuantizeSpec, Report, ReportRow, Summary, TaskSpec
from kondense.errors import InvalidInput, InvalidSpec, QualityGateFailed
from kondense.store import MANIFEST, Manifest
from kondense_jobs import data, report, speed, tasks
from kondense_jobs.quantize import device_map, gguf_backend, load_tokenizer, weight_bytes
from kondense_jobs.report import Check, GateResult, Measurement, relative_increase
from kondense_jobs.runtime import Context

log = logging.getLogger("kondense_jobs.evaluate")

TOKENS_PER_BATCH = 4096  # perplexity batch: windows per forward = TOKENS_PER_BATCH // seqLength
KL_TOP_K = 256  # baseline log-probabilities kept per position for the KL divergence, when not all fit
KL_FULL_BYTES = 1 << 30  # the baseline's whole distributions are kept when they take at most this on disk


class Once(logging.Filter):
    """Let each distinct message through once (bitsandbytes warns on every int8 matmul)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.seen:
            return False
        self.seen.add(record.msg)
        return True


logging.getLogger("bitsandbytes.autograd._functions").addFilter(Once())


@dataclass(frozen=True)
class Variant:
    name: str
    path: Path
    format: str  # hf | gguf


def run(ctx: Context) -> Summary:
    spec: EvaluateSpec = ctx.config
    baseline = spec.baseline or spec.of[0]
    check_names(spec, baseline)
    missing = {name: ctx.run.missing[name] for name in spec.of if name in ctx.run.missing}
    if baseline in missing:
        raise InvalidInput(f"the baseline {baseline} was not produced: {missing[baseline]}")
    for name, reason in missing.items():
        log.info("Variant %s not evaluated: %s", name, reason)
    prepared = tasks.prepare(ctx, spec.tasks, ctx.work_dir)  # unknown tasks, missing data: before any model loads

    # 1. Fetch: every variant that exists, the held-out windows (cut once, with the baseline's tokenizer).
    variants = []
    for name in spec.of:
        if name in missing:
            continue
        path = ctx.model_dir(name)
        variants.append(Variant(name, path, format_of(name, path)))
    tokenizer = shared_tokenizer(variants, baseline)
    stream = data.tokens(ctx, tokenizer).eval
    windows = data.windows(stream, spec.seq_length, limit=spec.max_eval_tokens)  # (n, L) view, no copy
    if not len(windows):
        raise InvalidInput(
            f"the held-out split has {len(stream)} tokens, fewer than seqLength {spec.seq_length}. "
            "To resolve, lower evaluate.seqLength or raise dataset.evalSplit."
        )
    prompts = Prompts(speed.prompts(stream, spec.prompt_tokens, spec.speed_batch), spec.generate_tokens, [1, spec.speed_batch])
    log.info(
        "Fetched %d variants; evaluating on %d windows of %d tokens", len(variants), len(windows), spec.seq_length
    )

    # 2. Measure each variant, the baseline first (the others are compared with it), then apply the gates.
    speed.warm_up(quantizers(variants))  # the process's one-time costs, charged to no variant's peak memory
    reference = Reference(ctx.work_dir / "baseline-topk", len(windows) * (spec.seq_length - 1))
    order = sorted(variants, key=lambda v: v.name != baseline)
    by_name = {}
    for i, variant in enumerate(order):
        ctx.progress.update(i, len(variants), phase="variants", force=True)
        try:
            m = measure(variant, windows, prompts, reference, tokenizer, prepared)
        except InvalidInput as e:
            if variant.name == baseline:
                raise
            log.warning("%s cannot be measured: %s", variant.name, e)
            m = Measurement(variant.name, variant.format, None, None, None, None, None, note=f"not measured: {e}")
            m.tasks = [tasks.TaskScore(p.spec.name, p.metric, note=f"not measured: {e}") for p in prepared]
        log.info(
            "%s (%s): perplexity %s, KLD %s, top-1 %s, decode %s tokens/s at batch 1, peak %s, %s on disk, %.1f s",
            m.variant, m.format, _shown(m.perplexity, ".3f"), _shown(m.kl_divergence, ".5f"), _shown(m.top1_agreement, ".4f"),
            _shown(m.tokens_per_second, ".1f"), report.human_bytes(m.memory_bytes), report.human_bytes(m.size_bytes), m.seconds,
        )
        m.made_by, m.loads_in, m.fallback_tensors = provenance(variant)
        by_name[m.variant] = m
    reference.close()
    measurements = [by_name[v.name] for v in variants]  # in `of` order
    ctx.progress.update(len(variants), len(variants), phase="variants", force=True)
    gate = check_gates(spec.gates, baseline, measurements, missing, spec.tasks)

    # 3. Publish the report, also when a gate failed (so that users can see why), then fail.
    base_m = by_name[baseline]
    rows = {m.variant: m.row(base_m) for m in measurements}
    rows |= {name: ReportRow(variant=name, missing=reason) for name, reason in missing.items()}
    summary_report = Report(uri=ctx.run.output, baseline=baseline, table=[rows[name] for name in spec.of])
    if best := report.best_variant(measurements, gate, baseline):
        summary_report.best, summary_report.best_size_ratio, summary_report.size_reference = best
    setup = {
        "seq_length": spec.seq_length,
        "windows": len(windows),
        "tokens": len(windows) * spec.seq_length,
        "prompt_tokens": spec.prompt_tokens,
        "generate_tokens": spec.generate_tokens,
        "speed_batches": prompts.batches,
        "kl_top_k": reference.k,
        "gates": spec.gates.dump(),
        "tasks": [p.setup for p in prepared],
        "lm_eval": tasks.lm_eval_version() if prepared else None,
    }
    report.write(ctx.output_dir(), summary_report, measurements, gate, setup, missing)
    metrics = {f"{m.variant}.perplexity": round(m.perplexity, 4) for m in measurements if math.isfinite(m.perplexity)}
    for m in measurements:
        if m.variant != baseline and report.finite(m.kl_divergence) is not None:
            metrics[f"{m.variant}.klDivergence"] = round(m.kl_divergence, 6)
            metrics[f"{m.variant}.top1Agreement"] = round(m.top1_agreement, 6)
        for t in m.tasks:
            if t.score is not None:
                metrics[f"{m.variant}.{t.task}"] = round(t.score, 6)
        if m.variant != baseline and (overall := report.recoveries(m, base_m)[1]) is not None:
            metrics[f"{m.variant}.recovery"] = round(overall, 6)
    summary = ctx.publish(
        metrics=metrics,
        format="report",
        extra={"gate": gate.dump(), "report": summary_report.dump(), "missing": missing},
        report=summary_report,
    )
    if not gate.passed:
        raise QualityGateFailed(gate.message)
    log.info("Quality gates: %s", gate.message)
    return summary


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def check_names(spec: EvaluateSpec, baseline: str) -> None:
    if len(set(spec.of)) != len(spec.of):
        raise InvalidSpec(f"evaluate.of names a variant twice: {spec.of}")
    if baseline not in spec.of:
        raise InvalidSpec(f"evaluate.baseline {baseline!r} is not one of evaluate.of {spec.of}")
    unknown = [n for n in spec.gates.applies_to if n not in spec.of]
    if unknown:
        raise InvalidSpec(f"evaluate.gates.appliesTo names {unknown}, which are not in evaluate.of {spec.of}")


def format_of(name: str, path: Path) -> str:
    """hf or gguf: from the artifact's manifest, else from the folder's files (teacher/student sources)."""
    manifest_path = path / MANIFEST
    if manifest_path.exists():
        fmt = Manifest.model_validate_json(manifest_path.read_text()).format
        if fmt not in ("hf", "gguf"):
            raise InvalidInput(f"variant {name}: {path} holds a {fmt!r} artifact, not a model")
        return fmt
    if (path / "config.json").exists():
        return "hf"
    if any(path.glob("*.gguf")):
        return "gguf"
    raise InvalidInput(f"variant {name}: {path} holds neither config.json (Hugging Face) nor a .gguf file")


# quantization_config.quant_method -> the module transformers imports to load it
QUANTIZERS = {"bitsandbytes": "bitsandbytes", "compressed-tensors": "compressed_tensors"}


def quantizers(variants: list[Variant]) -> set[str]:
    """The modules the HF variants' quantization configs load with."""
    import json

    found = set()
    for v in variants:
        if v.format == "hf" and (v.path / "config.json").exists():
            method = (json.loads((v.path / "config.json").read_text()).get("quantization_config") or {}).get("quant_method")
            if method in QUANTIZERS:
                found.add(QUANTIZERS[method])
    return found


def provenance(variant: Variant) -> tuple[str, str, int | None]:
    """(made by, loads in, fallback tensors) from the artifact's manifest; a source is what it is."""
    manifest_path = variant.path / MANIFEST
    if not manifest_path.exists():
        return "source", LOADS_IN["gguf"] if variant.format == "gguf" else "transformers, vLLM", None
    manifest = Manifest.model_validate_json(manifest_path.read_text())
    config = manifest.spec.get(manifest.spec.get("stageKind", manifest.stage_kind)) or {}
    if manifest.stage_kind == "quantize" and config:
        spec = QuantizeSpec.model_validate(config)
        fallbacks = manifest.metrics.get("ggufFallbackTensors")
        return spec.describe(), LOADS_IN[spec.method], None if fallbacks is None else int(fallbacks)
    if manifest.stage_kind == "distill":
        return f"distill {config.get('method', 'logits')}", "transformers, vLLM", None
    return manifest.stage_kind, LOADS_IN["gguf"] if variant.format == "gguf" else "transformers, vLLM", None


def shared_tokenizer(variants: list[Variant], baseline: str):
    """The baseline's tokenizer (the first HF variant's when the baseline is GGUF); HF variants must share it."""
    hf = [v for v in variants if v.format == "hf"]
    if not hf:
        raise InvalidInput("evaluate needs at least one Hugging Face variant to take the tokenizer from")
    source = next((v for v in hf if v.name == baseline), hf[0])
    tokenizer = load_tokenizer(source.path)
    vocab = tokenizer.get_vocab()
    for v in hf:
        if v is not source and load_tokenizer(v.path).get_vocab() != vocab:
            raise InvalidInput(
                f"variant {v.name} has a different tokenizer than {source.name}: "
                "perplexities would not be comparable. "
                "To resolve, evaluate only variants that share one tokenizer."
            )
    return tokenizer


@dataclass(frozen=True)
class Prompts:
    """What every variant generates from when speed is timed (kondense_jobs.speed)."""

    rows: np.ndarray  # (largest batch, prompt tokens) token ids from the held-out split
    new_tokens: int
    batches: list[int]


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def measure(
    variant: Variant, windows: list[list[int]], prompts: Prompts, reference: Reference, tokenizer,
    prepared: list[tasks.PreparedTask] = (),
) -> Measurement:
    """One variant: its scores on the windows (the baseline's are recorded in `reference`, the
    others compared with them), its task scores, then size, speed and peak memory."""
    start = time.monotonic()
    if variant.format == "gguf":
        m = measure_gguf(variant, windows, prompts, reference, tokenizer, prepared)
    else:
        m = measure_hf(variant, windows, prompts, reference, tokenizer, prepared)
    m.seconds = round(time.monotonic() - start, 2)
    return m


def measure_hf(
    variant: Variant, windows: list[list[int]], prompts: Prompts, reference, tokenizer=None,
    prepared: list[tasks.PreparedTask] = (),
):
    import torch
    from transformers import AutoModelForCausalLM

    timed = None
    if why := speed.vllm_applies(variant.path):  # before torch loads it: the GPU is vLLM's meanwhile
        log.info("Timing %s in vLLM: %s", variant.name, why)
        timed = speed.vllm(variant.path, prompts.rows, prompts.new_tokens, prompts.batches)
    footprint = speed.Footprint("torch-cuda" if torch.cuda.is_available() else "host")
    footprint.before_load()
    model = AutoModelForCausalLM.from_pretrained(variant.path, dtype="auto", device_map=device_map())
    model.eval()
    try:
        # Speed first: the peak is then the model's alone, before the baseline's distributions (memory-mapped,
        # resident once written) exist; later variants have them in the footprint's starting point.
        timed = timed or speed.hf(model, prompts.rows, prompts.new_tokens, prompts.batches, footprint)
        scores = Scores(reference, variant.name)
        scores.add_all(hf_logits(model, windows), windows)
        task_scores = []
        if prepared:
            lm = tasks.hf_lm(model, tokenizer or load_tokenizer(variant.path), tasks.model_max_length(model))
            task_scores = list(tasks.run_tasks(lm, prepared, variant.name).values())
        return Measurement(
            tasks=task_scores,
            variant=variant.name,
            format="hf",
            size_bytes=weight_bytes(variant.path),
            parameters=logical_parameters(model),
            perplexity=scores.perplexity(),
            **timed_fields(timed),
            **scores.divergence(),
        )
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def timed_fields(timed: speed.Speed) -> dict:
    """Measurement's speed and memory fields: tokens_per_second is decode at batch 1."""
    one = timed.at(1)
    return {
        "memory_bytes": timed.peak_memory_bytes,
        "tokens_per_second": one.decode_tokens_per_second if one else None,
        "engine": timed.engine,
        "speed": [asdict(t) for t in timed.timings],
        "memory_note": timed.memory_note,
    }


def logical_parameters(model) -> int:
    """Parameters as the architecture counts them, whatever the storage (packed 4-bit, int8, compressed)."""
    total = 0
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        rows, cols = getattr(module, "out_features", None), getattr(module, "in_features", None)
        if isinstance(rows, int) and isinstance(cols, int):  # Linear, bnb Linear4bit/8bitLt, compressed Linear
            total += rows * cols + (rows if getattr(module, "bias", None) is not None else 0)
        else:
            total += sum(p.numel() for p in own.values())
    return total


def hf_logits(model, windows: list[list[int]]):
    """Each window's logits [len(window), vocab], batched TOKENS_PER_BATCH tokens per forward."""
    import torch

    batch = max(1, TOKENS_PER_BATCH // len(windows[0]))
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            logits = model(input_ids=torch.from_numpy(data.long_rows(windows[i : i + batch])).to(model.device)).logits
            yield from logits


class Reference:
    """The baseline's next-token distributions, position by position over all windows: the
    KL_TOP_K most likely tokens' ids and log-probabilities and the log of the rest's mass, in
    memory-mapped files (see the module's docstring)."""

    def __init__(self, folder: Path, positions: int):
        self.folder, self.positions = folder, positions
        self.k = 0  # set by the baseline's first window: min(KL_TOP_K, its vocabulary)
        self.vocab: int | None = None
        self.baseline: str | None = None

    def record(self, at: int, logp) -> None:
        import torch

        if self.vocab is None:
            self.vocab = logp.shape[-1]
            exact = self.positions * self.vocab * 16 <= KL_FULL_BYTES
            self.k = self.vocab if exact else min(KL_TOP_K, self.vocab)
            self.folder.mkdir(parents=True, exist_ok=True)
            opened = np.lib.format.open_memmap
            self.ids = opened(self.folder / "ids.npy", mode="w+", dtype=np.int64, shape=(self.positions, self.k))
            self.logp = opened(self.folder / "logp.npy", mode="w+", dtype=np.float64, shape=(self.positions, self.k))
            self.rest = opened(self.folder / "rest.npy", mode="w+", dtype=np.float64, shape=(self.positions,))
        top = torch.topk(logp, self.k, dim=-1)  # sorted: column 0 is the argmax
        n = logp.shape[0]
        self.ids[at : at + n] = top.indices.cpu().numpy()
        self.logp[at : at + n] = top.values.cpu().numpy()
        self.rest[at : at + n] = _rest(logp, top.indices).cpu().numpy()

    def compare(self, at: int, logq) -> tuple[float, int]:
        """(sum over the window's positions of KL(baseline || variant), positions whose argmax agrees)."""
        import torch

        n = logq.shape[0]
        ids = torch.from_numpy(np.asarray(self.ids[at : at + n])).to(logq.device)
        logp = torch.from_numpy(np.asarray(self.logp[at : at + n])).to(logq.device)
        rest_p = torch.from_numpy(np.asarray(self.rest[at : at + n])).to(logq.device)
        kl = (logp.exp() * (logp - logq.gather(-1, ids))).sum(-1)
        rest_q = _rest(logq, ids)
        bucket = torch.where(torch.isfinite(rest_p), rest_p.exp() * (rest_p - rest_q), torch.zeros_like(rest_p))
        agree = (logq.argmax(-1) == ids[:, 0]).sum()
        return float((kl + bucket).sum()), int(agree)

    def close(self) -> None:
        for name in ("ids", "logp", "rest"):
            if hasattr(self, name):
                delattr(self, name)
        for f in self.folder.glob("*.npy"):
            f.unlink()


def _rest(logp, top_ids):
    """log of the probability mass outside `top_ids` (-inf when they are the whole vocabulary)."""
    import torch

    return torch.logsumexp(logp.scatter(-1, top_ids, float("-inf")), dim=-1)


class Scores:
    """One variant's pass over the windows: NLL for the perplexity; for the baseline its
    distributions into `reference`, for the others KL and top-1 against it."""

    def __init__(self, reference: Reference, variant: str):
        self.reference, self.variant = reference, variant
        self.is_baseline = reference.baseline is None
        if self.is_baseline:
            reference.baseline = variant
        self.nll, self.count, self.kl, self.agree = 0.0, 0, 0.0, 0
        self.note: str | None = None

    def add_all(self, logits_per_window, windows: list[list[int]]) -> None:
        for logits, window in zip(logits_per_window, windows, strict=True):
            self.add(window, logits)

    def add(self, window: list[int], logits) -> None:
        """One window: logits [len(window), vocab] (a torch tensor or a numpy array)."""
        import torch

        if isinstance(logits, np.ndarray):
            logits = torch.from_numpy(logits)
        logp = torch.log_softmax(logits[:-1].double(), dim=-1)  # position i predicts token i + 1
        target = torch.from_numpy(data.long_rows(window[1:])).to(logp.device)
        self.nll -= float(logp.gather(-1, target[:, None]).sum())
        at = self.count
        self.count += len(window) - 1
        ref = self.reference
        if self.is_baseline:
            ref.record(at, logp)
        elif self.note is None:
            if logp.shape[-1] != ref.vocab:
                self.note = (
                    f"KLD and top-1 n/a: logits over {logp.shape[-1]} tokens, the baseline {ref.baseline}'s over "
                    f"{ref.vocab}; they need one vocabulary"
                )
                return
            kl, agree = ref.compare(at, logp)
            self.kl += kl
            self.agree += agree

    def perplexity(self) -> float:
        return math.exp(self.nll / self.count)

    def divergence(self) -> dict:
        if self.is_baseline:
            return {"kl_divergence": 0.0, "top1_agreement": 1.0}
        if self.note is not None:
            return {"note": self.note}
        return {"kl_divergence": self.kl / self.count, "top1_agreement": self.agree / self.count}


def measure_gguf(
    variant: Variant, windows: list[list[int]], prompts: Prompts, reference, tokenizer,
    prepared: list[tasks.PreparedTask] = (),
):
    backend = gguf_backend()
    path = backend.find_gguf(variant.path)
    if path is None:
        raise InvalidInput(f"variant {variant.name}: no .gguf file in {variant.path}")
    size = path.stat().st_size
    scores = Scores(reference, variant.name)
    scores.note = vocabulary_mismatch(path, tokenizer)
    scores.add_all(backend.window_logits(path, data.ListRows(windows)), windows)
    task_scores = []
    if prepared and scores.note is not None:  # the task's text would be read as other tokens
        why = scores.note.removeprefix("KLD and top-1 n/a: ")
        task_scores = [tasks.TaskScore(p.spec.name, p.metric, note=f"{p.spec.name} n/a: {why}") for p in prepared]
    elif prepared:
        lm = tasks.llama_cpp_lm(path, tokenizer, gguf_context_length(path))
        try:
            task_scores = list(tasks.run_tasks(lm, prepared, variant.name).values())
        finally:
            lm.close()
    return Measurement(
        tasks=task_scores,
        variant=variant.name,
        format="gguf",
        size_bytes=size,
        parameters=gguf_parameters(path),
        perplexity=scores.perplexity(),
        **timed_fields(speed.llama_cpp(path, prompts.rows, prompts.new_tokens, prompts.batches)),
        **scores.divergence(),
    )


def vocabulary_mismatch(path: Path, tokenizer) -> str | None:
    """Why the GGUF file's vocabulary is not the tokenizer's (the windows' ids would mean other
    tokens), or None when every token of the file is the tokenizer's token of the same id."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return "KLD and top-1 n/a: the gguf package is missing, so the file's vocabulary cannot be checked"
    field = GGUFReader(path).fields.get("tokenizer.ggml.tokens")
    if field is None:
        return "KLD and top-1 n/a: the file has no tokenizer.ggml.tokens to check against the baseline's tokenizer"
    tokens = [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
    ours = tokenizer.convert_ids_to_tokens(list(range(min(len(tokens), len(tokenizer)))))
    for i, (theirs, mine) in enumerate(zip(tokens, ours)):
        if theirs != mine:
            return (
                f"KLD and top-1 n/a: token {i} is {theirs!r} in the file and {mine!r} in the baseline's tokenizer; "
                "they need one vocabulary"
            )
    return None


def gguf_context_length(path: Path) -> int | None:
    """The model's trained context (`<architecture>.context_length`), as HFLM takes max_position_embeddings."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    fields = GGUFReader(path).fields
    arch = fields.get("general.architecture")
    if arch is None:
        return None
    length = fields.get(f"{bytes(arch.parts[arch.data[0]]).decode()}.context_length")
    return int(length.parts[length.data[0]][0]) if length is not None else None


def gguf_parameters(path: Path) -> int | None:
    """Elements of every tensor in the file (logical counts, whatever the quantization)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    return int(sum(int(t.n_elements) for t in GGUFReader(path).tensors))


def _shown(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


def check_gates(
    gates: Gates, baseline: str, measurements: list[Measurement], missing: dict[str, str] | None = None,
    task_specs: list[TaskSpec] = (),
) -> GateResult:
    """The gates on the variants in appliesTo (default: all but the baseline). A number that could
    not be measured fails its gate, saying why; a variant that was not evaluated (`missing`, with
    its stage's reason) is listed as n/a and fails nothing: its own stage failed."""
    missing = missing or {}
    by_name = {m.variant: m for m in measurements}
    base = by_name[baseline]
    names = gates.applies_to or [m.variant for m in measurements if m.variant != baseline] + list(missing)
    checks: list[Check] = []
    any_gate = any(
        g is not None
        for g in (gates.max_perplexity_increase, gates.min_tokens_per_second, gates.max_kl_divergence, gates.min_top1_agreement,
                  gates.min_recovery, *(t.min_recovery for t in task_specs))
    )
    for name in names:
        if name in missing:
            if any_gate:
                checks.append(Check(name, "missing", None, None, None, f"{name}: n/a, not evaluated: {missing[name]}"))
            continue
        m = by_name[name]
        if gates.max_perplexity_increase is not None:
            limit = gates.max_perplexity_increase
            inc = relative_increase(m.perplexity, base.perplexity)
            if inc is None and m.perplexity is None:
                text = f"{name}: perplexity n/a ({m.note or 'not measured'}); gate maxPerplexityIncrease {limit:g}"
                checks.append(Check(name, "maxPerplexityIncrease", None, limit, False, text))
            elif inc is None:
                text = (
                    f"{name}: perplexity {m.perplexity} against {baseline} ({base.perplexity}) is not a finite number; "
                    f"gate maxPerplexityIncrease {limit:g}"
                )
                checks.append(Check(name, "maxPerplexityIncrease", None, limit, False, text))
            else:
                delta = f"+{inc * 100:.2f}% over" if inc >= 0 else f"{-inc * 100:.2f}% under"
                text = (
                    f"{name}: perplexity {m.perplexity:.1f} is {delta} {baseline} ({base.perplexity:.1f}); "
                    f"gate maxPerplexityIncrease {limit:g}"
                )
                checks.append(Check(name, "maxPerplexityIncrease", inc, limit, inc <= limit, text))
        if gates.min_tokens_per_second is not None:
            limit = gates.min_tokens_per_second
            tps = m.tokens_per_second
            ok = tps is not None and math.isfinite(tps) and tps >= limit
            shown = tps if tps is None else round(tps, 1)
            text = f"{name}: {shown} tokens/s {'meets' if ok else 'is below'} gate minTokensPerSecond {limit:g}"
            checks.append(Check(name, "minTokensPerSecond", tps, limit, ok, text))
        if gates.max_kl_divergence is not None:
            limit = gates.max_kl_divergence
            kl = report.finite(m.kl_divergence)
            if kl is None:
                why = m.note or f"KLD is {m.kl_divergence}"
                text = f"{name}: KL divergence from {baseline} n/a ({why}); gate maxKLDivergence {limit:g}"
                checks.append(Check(name, "maxKLDivergence", None, limit, False, text))
            else:
                word = "is within" if kl <= limit else "exceeds"
                text = f"{name}: KL divergence from {baseline} {kl:.4f} {word} gate maxKLDivergence {limit:g}"
                checks.append(Check(name, "maxKLDivergence", kl, limit, kl <= limit, text))
        if gates.min_top1_agreement is not None:
            limit = gates.min_top1_agreement
            top1 = report.finite(m.top1_agreement)
            if top1 is None:
                why = m.note or f"top-1 agreement is {m.top1_agreement}"
                text = f"{name}: top-1 agreement with {baseline} n/a ({why}); gate minTop1Agreement {limit:g}"
                checks.append(Check(name, "minTop1Agreement", None, limit, False, text))
            else:
                word = "meets" if top1 >= limit else "is below"
                text = f"{name}: top-1 agreement with {baseline} {top1:.4f} {word} gate minTop1Agreement {limit:g}"
                checks.append(Check(name, "minTop1Agreement", top1, limit, top1 >= limit, text))
        checks += recovery_checks(gates, task_specs, baseline, m, base)
    failed = [c for c in checks if c.passed is False]
    if failed:
        return GateResult(False, "; ".join(c.text for c in failed), checks)
    if not checks:
        return GateResult(True, "no quality gates set", checks)
    measured = [c for c in checks if c.passed]
    not_evaluated = [c for c in checks if c.passed is None]
    if not measured:
        return GateResult(True, "no variant the gates apply to was evaluated: " + "; ".join(c.text for c in not_evaluated), checks)
    text = "all quality gates passed: " + "; ".join(c.text for c in measured)
    if not_evaluated:
        text = "quality gates passed on the variants evaluated: " + "; ".join(c.text for c in checks)
    return GateResult(True, text, checks)


def recovery_checks(gates: Gates, task_specs: list[TaskSpec], baseline: str, m: Measurement, base: Measurement) -> list[Check]:
    """minRecovery on each task (its own, else gates.minRecovery) and gates.minRecovery on the mean."""
    per_task, overall = report.recoveries(m, base)
    scores = {t.task: t for t in m.tasks}
    base_scores = {t.task: t for t in base.tasks}
    checks = []
    for spec in task_specs:
        limit = spec.min_recovery if spec.min_recovery is not None else gates.min_recovery
        if limit is None:
            continue
        rec, why = per_task.get(spec.name, (None, f"{spec.name} was not scored"))
        own, theirs = scores.get(spec.name), base_scores.get(spec.name)
        if rec is None:
            text = f"{m.variant}: {spec.name} recovery n/a ({why}); gate minRecovery {limit:g}"
            checks.append(Check(m.variant, "minRecovery", None, limit, False, text, task=spec.name))
            continue
        word = "meets" if rec >= limit else "is below"
        text = (
            f"{m.variant}: {spec.name} {own.score:.4f} against {baseline}'s {theirs.score:.4f}, recovery {rec:.4f} "
            f"{word} gate minRecovery {limit:g}"
        )
        checks.append(Check(m.variant, "minRecovery", rec, limit, rec >= limit, text, task=spec.name))
    if gates.min_recovery is not None and task_specs:
        limit = gates.min_recovery
        if overall is None:
            whys = "; ".join(why for rec, why in per_task.values() if rec is None)
            text = f"{m.variant}: mean recovery over the tasks n/a ({whys}); gate minRecovery {limit:g}"
            checks.append(Check(m.variant, "minRecovery", None, limit, False, text, task="mean"))
        else:
            word = "meets" if overall >= limit else "is below"
            text = f"{m.variant}: mean recovery over {len(task_specs)} tasks {overall:.4f} {word} gate minRecovery {limit:g}"
            checks.append(Check(m.variant, "minRecovery", overall, limit, overall >= limit, text, task="mean"))
    return checks

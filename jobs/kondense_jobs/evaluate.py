"""The evaluate stage: every variant measured the same way, a report, and the quality gates.

    variants = [ctx.model_dir(name) for name in spec.of]     # fetch
    measure each on identical held-out windows                # transform
    report.json / report.md / plot.png, then ctx.publish      # publish (also when a gate fails)

Perplexity is exp(mean NLL) over every predicted token of non-overlapping windows cut from the
held-out split, tokenized once with the baseline's tokenizer (the variants share it), so every
variant sees exactly the same tokens. Hugging Face folders (full precision, bitsandbytes,
compressed-tensors GPTQ) are scored with transformers, GGUF files with llama.cpp
(kondense_jobs.gguf). Throughput is greedy generation of `generateTokens` new tokens after a
short held-out prompt, timed after one warm-up.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from kondense.api import EvaluateSpec, Gates, Report, Summary
from kondense.errors import InvalidInput, InvalidSpec, QualityGateFailed
from kondense.store import MANIFEST, Manifest
from kondense_jobs import data, report
from kondense_jobs.quantize import device_map, gguf_backend, load_tokenizer, weight_bytes
from kondense_jobs.report import Check, GateResult, Measurement, relative_increase
from kondense_jobs.runtime import Context

log = logging.getLogger("kondense_jobs.evaluate")

TOKENS_PER_BATCH = 4096  # perplexity batch: windows per forward = TOKENS_PER_BATCH // seqLength
WARMUP_TOKENS = 4


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

    # 1. Fetch: every variant, the held-out windows (cut once, with the baseline's tokenizer).
    variants = []
    for name in spec.of:
        path = ctx.model_dir(name)
        variants.append(Variant(name, path, format_of(name, path)))
    tokenizer = shared_tokenizer(variants, baseline)
    split = data.load(ctx.dataset_path(), ctx.run.dataset)
    stream = data.token_stream(tokenizer, data.texts(split.eval, ctx.run.dataset))
    windows = data.windows(stream, spec.seq_length, limit=spec.max_eval_tokens)
    if not windows:
        raise InvalidInput(
            f"the held-out split has {len(stream)} tokens, fewer than seqLength {spec.seq_length}. "
            "To resolve, lower evaluate.seqLength or raise dataset.evalSplit."
        )
    prompt_ids = prompt(tokenizer, split.eval, ctx.run.dataset, windows[0])
    log.info(
        "Fetched %d variants; evaluating on %d windows of %d tokens", len(variants), len(windows), spec.seq_length
    )

    # 2. Measure each variant, then apply the gates.
    measurements = []
    for i, variant in enumerate(variants):
        ctx.progress.update(i, len(variants), phase="variants", force=True)
        m = measure(variant, windows, prompt_ids, spec.generate_tokens)
        log.info(
            "%s (%s): perplexity %.3f, %.1f tokens/s, %s on disk, %.1f s",
            m.variant, m.format, m.perplexity, m.tokens_per_second or 0, report.human_bytes(m.size_bytes), m.seconds,
        )
        measurements.append(m)
    ctx.progress.update(len(variants), len(variants), phase="variants", force=True)
    gate = check_gates(spec.gates, baseline, measurements)

    # 3. Publish the report, also when a gate failed (so that users can see why), then fail.
    summary_report = Report(uri=ctx.run.output, baseline=baseline, table=[m.row() for m in measurements])
    if best := report.best_variant(measurements, gate, baseline):
        summary_report.best, summary_report.best_size_ratio, summary_report.size_reference = best
    setup = {
        "seq_length": spec.seq_length,
        "windows": len(windows),
        "tokens": len(windows) * spec.seq_length,
        "prompt_tokens": len(prompt_ids),
        "generate_tokens": spec.generate_tokens,
        "gates": spec.gates.dump(),
    }
    report.write(ctx.output_dir(), summary_report, measurements, gate, setup)
    metrics = {f"{m.variant}.perplexity": round(m.perplexity, 4) for m in measurements if math.isfinite(m.perplexity)}
    summary = ctx.publish(
        metrics=metrics,
        format="report",
        extra={"gate": gate.dump(), "report": summary_report.dump()},
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


def prompt(tokenizer, records: list[dict], ref, first_window: list[int]) -> list[int]:
    """A short held-out prompt: the first eval record's prompt (or its first promptTokens tokens)."""
    text = data.prompts(records[:1], ref, tokenizer)[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: ref.prompt_tokens]
    return ids or first_window[: ref.prompt_tokens]


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def measure(variant: Variant, windows: list[list[int]], prompt_ids: list[int], generate_tokens: int) -> Measurement:
    start = time.monotonic()
    if variant.format == "gguf":
        m = measure_gguf(variant, windows, prompt_ids, generate_tokens)
    else:
        m = measure_hf(variant, windows, prompt_ids, generate_tokens)
    m.seconds = round(time.monotonic() - start, 2)
    return m


def measure_hf(variant: Variant, windows: list[list[int]], prompt_ids: list[int], generate_tokens: int):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(variant.path, dtype="auto", device_map=device_map())
    model.eval()
    try:
        return Measurement(
            variant=variant.name,
            format="hf",
            size_bytes=weight_bytes(variant.path),
            parameters=logical_parameters(model),
            memory_bytes=int(model.get_memory_footprint()),
            perplexity=hf_perplexity(model, windows),
            tokens_per_second=hf_tokens_per_second(model, prompt_ids, generate_tokens),
        )
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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


def hf_perplexity(model, windows: list[list[int]]) -> float:
    """exp(mean NLL) over all predicted tokens; the model's mean loss per batch, weighted by its token count."""
    import torch

    device = model.device
    batch = max(1, TOKENS_PER_BATCH // len(windows[0]))
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(windows), batch):
            ids = torch.tensor(windows[i : i + batch], device=device)
            loss = model(input_ids=ids, labels=ids).loss
            n = ids.shape[0] * (ids.shape[1] - 1)
            nll += loss.float().item() * n
            count += n
    return math.exp(nll / count)


def hf_tokens_per_second(model, prompt_ids: list[int], n_tokens: int) -> float:
    import torch

    ids = torch.tensor([prompt_ids], device=model.device)
    pad = model.generation_config.pad_token_id
    if pad is None:  # silence "Setting pad_token_id to eos_token_id"; eos may be a list (Llama 3)
        eos = model.generation_config.eos_token_id
        pad = eos[0] if isinstance(eos, list) else eos
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=pad)

    def generate(n: int) -> int:
        with torch.inference_mode():
            out = model.generate(ids, min_new_tokens=n, max_new_tokens=n, **kwargs)
        return out.shape[1] - ids.shape[1]

    generate(min(WARMUP_TOKENS, n_tokens))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    produced = generate(n_tokens)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return produced / (time.perf_counter() - start)


def measure_gguf(variant: Variant, windows: list[list[int]], prompt_ids: list[int], generate_tokens: int):
    backend = gguf_backend()
    path = backend.find_gguf(variant.path)
    if path is None:
        raise InvalidInput(f"variant {variant.name}: no .gguf file in {variant.path}")
    size = path.stat().st_size
    return Measurement(
        variant=variant.name,
        format="gguf",
        size_bytes=size,
        parameters=gguf_parameters(path),
        memory_bytes=size,
        perplexity=backend.perplexity(path, windows),
        tokens_per_second=backend.tokens_per_second(path, prompt_ids, generate_tokens),
    )


def gguf_parameters(path: Path) -> int | None:
    """Elements of every tensor in the file (logical counts, whatever the quantization)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    return int(sum(int(t.n_elements) for t in GGUFReader(path).tensors))


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


def check_gates(gates: Gates, baseline: str, measurements: list[Measurement]) -> GateResult:
    """maxPerplexityIncrease and minTokensPerSecond on the variants in appliesTo (default: all but the baseline)."""
    by_name = {m.variant: m for m in measurements}
    base = by_name[baseline]
    names = gates.applies_to or [m.variant for m in measurements if m.variant != baseline]
    checks: list[Check] = []
    for name in names:
        m = by_name[name]
        if gates.max_perplexity_increase is not None:
            limit = gates.max_perplexity_increase
            inc = relative_increase(m.perplexity, base.perplexity)
            if inc is None:
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
    failed = [c for c in checks if not c.passed]
    if failed:
        return GateResult(False, "; ".join(c.text for c in failed), checks)
    if not checks:
        return GateResult(True, "no quality gates set", checks)
    return GateResult(True, "all quality gates passed: " + "; ".join(c.text for c in checks), checks)

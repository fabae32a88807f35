"""The quantize stage: one input model in, one quantized variant out.

    model = ctx.model_dir("model")       # fetch: an earlier stage's artifact (or teacher/student)
    METHODS[spec.method](ctx, model, out) # transform
    ctx.publish(...)                      # publish: weights, tokenizer, manifest.json last

Methods (one registry, METHODS):
  bnb-nf4, bnb-int8  bitsandbytes through transformers' BitsAndBytesConfig: the weights are
                     quantized while they load and saved with save_pretrained; the folder reloads
                     with plain AutoModelForCausalLM.from_pretrained (bitsandbytes installed).
  gptq               GPTQ through llm-compressor's `oneshot` with a GPTQModifier, calibrated on
                     windows of the training split. GPTQ output is compressed-tensors format
                     (vLLM and transformers load it). Not AutoGPTQ: it is unmaintained and
                     `import auto_gptq` fails with transformers 5. Not GPTQModel: it sizes its
                     worker pools as (cpu_count + 1) // 2 and refuses to start on 2-core machines
                     ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only
                     has 1"), and the transformers GPTQConfig path through it saved models that
                     failed to reload (qweight shape mismatch). 4 or 8 bits only: vLLM's
                     compressed-tensors WNA16 kernels take no others. actorder static by default.
  awq                AWQModifier (activation-aware scales) then QuantizationModifier W4A16_ASYM,
                     calibrated. GPU only: AWQ_NEEDS_GPU says why; without one it exits 14.
  fp8-dynamic        QuantizationModifier with the FP8_DYNAMIC preset: no calibration data.
  w8a8-int8          SmoothQuantModifier, then GPTQModifier with the W8A8 (INT8) preset, calibrated.
                     The four llm-compressor methods share one function (llm_compressor) and write
                     compressed-tensors that transformers and vLLM load; each keeps `ignore` (default
                     lm_head and MoE routers/gates) in full precision. A modifier or preset that the
                     installed llm-compressor lacks exits 12 naming its version.
  gguf               llama.cpp's converter and quantizer, in kondense_jobs.gguf.

Families. Before any weight loads, kondense_jobs.families decides from config.json, the tokenizer
files and the module types (the model built on the meta device) whether the method takes the
model's family, and refuses it otherwise (exit 10 or 11) naming the family, the reason and the
method to use instead: GPT-2's Conv1D layers with llm-compressor's methods; Gemma and Phi-3 with
gguf when the folder has no SentencePiece tokenizer.model. families.TABLE holds what was found.

Memory. A model larger than one GPU quantizes within bounded memory: llm-compressor's methods load
the model into host memory (no device_map) and its sequential pipeline onloads one decoder layer at
a time to the GPU, offloading the calibration windows' activations between layers to host memory;
bitsandbytes holds the whole (quantized) model on the pod's GPUs; gguf runs on the CPU. Before any
weight loads, the stage runs `kondense plan`'s estimate (kondense.memory.quantize_plan: per GPU and
host memory, from config.json and the safetensors headers) and exits 14 in the plan's words when
the stage cannot fit `resources`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

from kondense import memory
from kondense.api import QuantizeSpec, Summary
from kondense.errors import InsufficientResources, InvalidInput, InvalidSpec, MissingDependency
from kondense_jobs import data, families, preflight
from kondense_jobs.runtime import Context, require

log = logging.getLogger("kondense_jobs.quantize")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
GPTQ_DEFAULT_BITS = 4
GPTQ_DEFAULT_GROUP_SIZE = 128
SMOOTHING_STRENGTH = 0.8  # llm-compressor's W8A8 INT8 examples
LLMC_TESTED = "0.14.0.1"  # the llm-compressor release these recipes are tested with
AWQ_NEEDS_GPU = (
    "method awq needs a GPU: llm-compressor {version}'s AWQModifier pins its cached activations in "
    "page-locked memory (IntermediatesCache.pin_memory), which needs an NVIDIA driver, and none of its "
    "options avoids that. To resolve, give this stage resources.gpus >= 1, or use method gptq (bits 4), "
    "which runs on CPUs."
)
GGUF_DEFAULT_TYPE = "q8_0"


def run(ctx: Context) -> Summary:
    spec: QuantizeSpec = ctx.config
    quantize = method(spec.method)

    # 1. Fetch the input model (an earlier stage's artifact is verified against its manifest).
    model_dir = ctx.model_dir("model")
    log.info("Fetched input model: %s", model_dir)
    # Before any weight (or safetensors header) is read: does the method take this family?
    log.info("Model family %s: method %s takes it", families.check(spec.method, model_dir).family, spec.method)
    plan_memory(ctx, spec, model_dir)

    # 2. Quantize into the output folder.
    out = ctx.output_dir()
    start = time.monotonic()
    ctx.progress.update(0, 1, phase="quantize", force=True)
    metrics = quantize(ctx, model_dir, out)
    ctx.progress.update(1, 1, phase="quantize", force=True)
    metrics = {**metrics, "sizeBytes": weight_bytes(out), "seconds": round(time.monotonic() - start, 2)}
    log.info("Quantized with %s in %.1f s: %d bytes of weights", spec.method, metrics["seconds"], metrics["sizeBytes"])

    # 3. Publish: files, then manifest.json.
    return ctx.publish(metrics=metrics, format="gguf" if spec.method == "gguf" else "hf")


def plan_memory(ctx: Context, spec: QuantizeSpec, model_dir: Path) -> memory.Estimate:
    """The per-GPU and host-memory estimate of `kondense plan`, from the same function, before any weight
    loads (config.json and safetensors headers only): InsufficientResources (exit 14) in the plan's
    words when it cannot fit, else one "Preflight:" line and preflightGiB (per GPU, or the CPU
    process's whole estimate) and preflightHostGiB (host memory, when the GPU holds a share)."""
    shape = preflight.shape_of(model_dir, "model")
    resources, host = ctx.run.resources, preflight.host_bytes()
    estimate = memory.quantize_plan(spec, resources, shape, host)
    fixes = [] if estimate.fits else memory.quantize_fixes(spec, resources, shape, host)
    preflight.check(ctx.run.stage, estimate, fixes)
    ctx.metrics["preflightGiB"] = round(estimate.total / memory.GIB, 3)
    if estimate.host is not None:
        ctx.metrics["preflightHostGiB"] = round(estimate.host.total / memory.GIB, 3)
    return estimate


def method(name: str) -> Callable[[Context, Path, Path], dict[str, float]]:
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidSpec(f"unknown quantization method {name!r}; known methods: {', '.join(METHODS)}") from None


# --------------------------------------------------------------------------------------------
# Shared helpers (evaluate uses them too)
# --------------------------------------------------------------------------------------------


def weight_bytes(folder: Path) -> int:
    """Size on disk of a model's weight files (safetensors, bin, gguf), not its tokenizer or configs."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def device_map() -> str:
    import torch

    return "auto" if torch.cuda.is_available() else "cpu"


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise InvalidInput(
            f"{model_dir} has no loadable tokenizer ({str(e).splitlines()[0][:200]}). "
            "To resolve, save the tokenizer next to the weights (tokenizer.save_pretrained)."
        ) from None


def gguf_backend():
    """kondense_jobs.gguf, imported on first use (it needs llama.cpp's converter)."""
    try:
        from kondense_jobs import gguf
    except ModuleNotFoundError as e:
        if e.name != "kondense_jobs.gguf":
            raise
        raise MissingDependency(
            "method gguf needs kondense_jobs.gguf, which this build lacks. "
            "To resolve, use the kondense jobs image or a source checkout with jobs/kondense_jobs/gguf.py."
        ) from None
    return gguf


# --------------------------------------------------------------------------------------------
# bitsandbytes
# --------------------------------------------------------------------------------------------


def bnb_nf4(ctx: Context, model_dir: Path, out: Path) -> dict[str, float]:
    spec: QuantizeSpec = ctx.config
    torch = require("torch", "method bnb-nf4")
    transformers = require("transformers", "method bnb-nf4")
    double_quant = spec.double_quant is not False
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, spec.compute_dtype),
    )
    log.info("Quantizing to NF4 (double quant %s, compute %s)", double_quant, spec.compute_dtype)
    return _bitsandbytes(model_dir, out, config, "Linear4bit", "method bnb-nf4")


def bnb_int8(ctx: Context, model_dir: Path, out: Path) -> dict[str, float]:
    transformers = require("transformers", "method bnb-int8")
    log.info("Quantizing to LLM.int8()")
    config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    return _bitsandbytes(model_dir, out, config, "Linear8bitLt", "method bnb-int8")


def _bitsandbytes(model_dir: Path, out: Path, config, layer_class: str, feature: str) -> dict[str, float]:
    bnb = require("bitsandbytes", feature)
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir)
    # bitsandbytes quantizes each Linear as its weights load; other layers keep the checkpoint's dtype.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=config, device_map=device_map(), dtype="auto"
    )
    quantized = sum(isinstance(m, getattr(bnb.nn, layer_class)) for m in model.modules())
    if quantized == 0:
        raise InvalidInput(f"{model_dir}: bitsandbytes found no Linear layer to quantize")
    log.info("Quantized %d modules to %s", quantized, layer_class)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"quantizedModules": quantized}


# --------------------------------------------------------------------------------------------
# llm-compressor: gptq, awq, fp8-dynamic, w8a8-int8 (compressed-tensors output)
# --------------------------------------------------------------------------------------------


def llmcompressor_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llmcompressor")
    except PackageNotFoundError:
        return "(not installed)"


def llmc_class(feature: str, module: str, name: str):
    """`name` from llm-compressor's `module`; one this llm-compressor lacks is a MissingDependency naming its version."""
    import importlib

    require("llmcompressor", feature)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise MissingDependency(
            f"{feature} needs {module}.{name}, which the installed llmcompressor {llmcompressor_version()} lacks. "
            f"To resolve, use the kondense jobs image or pip install 'llmcompressor=={LLMC_TESTED}'."
        ) from None


def preset_scheme(feature: str, preset: str):
    """compressed-tensors' preset scheme `preset` on Linear layers (a copy: callers may change it)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    try:
        return preset_name_to_scheme(preset, ["Linear"])
    except (KeyError, ValueError):
        raise MissingDependency(
            f"{feature} needs the {preset} scheme, which the installed compressed-tensors (with llmcompressor "
            f"{llmcompressor_version()}) lacks. To resolve, pip install 'llmcompressor=={LLMC_TESTED}'."
        ) from None


def gptq_scheme(bits: int, group_size: int, preset: str = "W{bits}A16"):
    """compressed-tensors' preset W{bits}A16 with the group size asked for (-1: one scale per output channel)."""
    from compressed_tensors.quantization import QuantizationStrategy

    if bits not in (4, 8):
        raise InvalidSpec(f"quantize.bits {bits} is not offered: vLLM's compressed-tensors kernels take 4 and 8 bits")
    if group_size == 0 or group_size < -1:
        raise InvalidSpec(
            f"quantize.groupSize {group_size} is invalid; use -1 (one scale per output channel) or a positive column count"
        )
    scheme = preset_scheme("quantize", preset.format(bits=bits))
    if group_size == -1:
        update = {"strategy": QuantizationStrategy.CHANNEL, "group_size": None}
    else:
        update = {"strategy": QuantizationStrategy.GROUP, "group_size": group_size}
    scheme.weights = scheme.weights.model_copy(update=update)
    return scheme


def check_ignore(model, patterns: list[str]) -> None:
    """Each `ignore` pattern must be a valid regular expression (after 're:') and match a module of the model."""
    import re

    from compressed_tensors.utils import is_match

    modules = list(model.named_modules())
    for i, pattern in enumerate(patterns):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise InvalidSpec(f"quantize.ignore[{i}]: {pattern!r} is not a regular expression ({e})") from None
        if not any(is_match(name, module, pattern) for name, module in modules if name):
            linears = [name for name, m in modules if type(m).__name__ == "Linear"][:3]
            raise InvalidSpec(
                f"quantize.ignore[{i}]: {pattern!r} matches no module of the model. Patterns are module names "
                f"(e.g. {', '.join(linears) or 'lm_head'}), class names, or regular expressions after 're:' "
                "matched from the start of the name (re:.*mlp[.]gate$). To resolve, fix or drop the pattern."
            )


def gptq_targets(model, ignore: list[str] | tuple[str, ...] = QuantizeSpec.DEFAULT_IGNORE) -> dict[str, int]:
    """The Linear layers that llm-compressor quantizes (targets ["Linear"] less `ignore`) -> their input width."""
    from compressed_tensors.utils import is_match

    return {
        name: module.in_features
        for name, module in model.named_modules()
        if name and is_match(name, module, "Linear", ignore)
    }


def check_group_size(targets: dict[str, int], group_size: int) -> None:
    """Group quantization needs every layer's column count to be a multiple of groupSize."""
    if group_size == -1:
        return
    bad = {name: cols for name, cols in targets.items() if cols % group_size}
    if not bad:
        return
    common = math.gcd(*targets.values())
    divisor = max(d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256) if common % d == 0)
    examples = ", ".join(f"{name} ({cols})" for name, cols in list(bad.items())[:3])
    raise InvalidSpec(
        f"quantize.groupSize {group_size} does not divide the input width of {len(bad)} of {len(targets)} layers, "
        f"e.g. {examples}. To resolve, set groupSize to a divisor of {common} (e.g. {divisor}) "
        "or to -1 for per-channel scales."
    )


def calibration_windows(ctx: Context, tokenizer, samples: int, seq_length: int):
    """Up to `samples` windows of `seq_length` tokens from the training split (records joined with EOS):
    an (n, seq_length) view of the tokens artifact's train stream."""
    stream = data.tokens(ctx, tokenizer).train
    windows = data.windows(stream, seq_length, limit=samples * seq_length)
    if not len(windows):
        if not len(stream):
            raise InvalidInput("the training split holds no tokens to calibrate on")
        log.warning(
            "The training split has %d tokens, fewer than calibrationSeqLength %d: calibrating on one shorter sample",
            len(stream), seq_length,
        )
        windows = stream[None, :]
    elif len(windows) < samples:
        log.warning(
            "The training split yields %d windows of %d tokens, fewer than calibrationSamples %d",
            len(windows), seq_length, samples,
        )
    return windows


def gptq_recipe(spec: QuantizeSpec, ignore: list[str]) -> tuple[list, dict[str, float], str]:
    """GPTQ W{bits}A16: (recipe, metrics, description)."""
    GPTQModifier = llmc_class("method gptq", "llmcompressor.modifiers.quantization", "GPTQModifier")
    bits = spec.bits or GPTQ_DEFAULT_BITS
    group_size = spec.group_size if spec.group_size is not None else GPTQ_DEFAULT_GROUP_SIZE
    scheme = gptq_scheme(bits, group_size)
    recipe = [GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore, actorder=actorder(spec))]
    what = f"W{bits}A16, groupSize {group_size}, actorder {spec.actorder or 'static'}"
    return recipe, {"bits": bits, "groupSize": group_size}, what


def awq_recipe(spec: QuantizeSpec, ignore: list[str]) -> tuple[list, dict[str, float], str]:
    """AWQ's activation-aware smoothing, then round-to-nearest W4A16 (llm-compressor's two-modifier recipe)."""
    AWQModifier = llmc_class("method awq", "llmcompressor.modifiers.transform", "AWQModifier")
    QuantizationModifier = llmc_class("method awq", "llmcompressor.modifiers.quantization", "QuantizationModifier")
    group_size = spec.group_size if spec.group_size is not None else GPTQ_DEFAULT_GROUP_SIZE
    scheme = gptq_scheme(4, group_size, preset="W{bits}A16_ASYM")
    recipe = [AWQModifier(), QuantizationModifier(config_groups={"group_0": scheme}, ignore=ignore)]
    return recipe, {"bits": 4, "groupSize": group_size}, f"W4A16 asymmetric, groupSize {group_size}"


def fp8_recipe(spec: QuantizeSpec, ignore: list[str]) -> tuple[list, dict[str, float], str]:
    """FP8 weights (per channel) and per-token dynamic FP8 activations: no calibration data."""
    QuantizationModifier = llmc_class("method fp8-dynamic", "llmcompressor.modifiers.quantization", "QuantizationModifier")
    scheme = preset_scheme("method fp8-dynamic", "FP8_DYNAMIC")
    return [QuantizationModifier(config_groups={"group_0": scheme}, ignore=ignore)], {"bits": 8}, "W8A8 FP8 dynamic"


def w8a8_int8_recipe(spec: QuantizeSpec, ignore: list[str]) -> tuple[list, dict[str, float], str]:
    """SmoothQuant moves activation outliers into the weights, then GPTQ quantizes them to INT8 (per channel);
    activations are quantized per token at run time."""
    SmoothQuantModifier = llmc_class("method w8a8-int8", "llmcompressor.modifiers.transform", "SmoothQuantModifier")
    GPTQModifier = llmc_class("method w8a8-int8", "llmcompressor.modifiers.quantization", "GPTQModifier")
    strength = spec.smoothing_strength if spec.smoothing_strength is not None else SMOOTHING_STRENGTH
    scheme = preset_scheme("method w8a8-int8", "W8A8")
    recipe = [
        SmoothQuantModifier(smoothing_strength=strength),
        GPTQModifier(config_groups={"group_0": scheme}, ignore=ignore, actorder=actorder(spec)),
    ]
    return recipe, {"bits": 8, "smoothingStrength": strength}, f"W8A8 INT8, SmoothQuant {strength}"


def actorder(spec: QuantizeSpec):
    return None if spec.actorder == "none" else "static"


def llmc_device() -> str:
    """Where llm-compressor onloads each layer: the first accelerator (its get_main_device), else the CPU."""
    import torch

    return "GPU 0" if torch.cuda.is_available() else "the CPU"


def require_gpu_for_awq() -> None:
    """llm-compressor's AWQModifier cannot run on CPUs: see AWQ_NEEDS_GPU."""
    import torch

    if not torch.cuda.is_available():
        raise InsufficientResources(AWQ_NEEDS_GPU.format(version=llmcompressor_version()))


LlmcRecipe = Callable[[QuantizeSpec, list[str]], tuple[list, dict[str, float], str]]
# method -> (recipe builder, needs calibration data)
LLMC_RECIPES: dict[str, tuple[LlmcRecipe, bool]] = {
    "gptq": (gptq_recipe, True),
    "awq": (awq_recipe, True),
    "fp8-dynamic": (fp8_recipe, False),
    "w8a8-int8": (w8a8_int8_recipe, True),
}
# method -> oneshot's `pipeline`, and the words the log line uses. Every calibrated modifier runs in
# llm-compressor's sequential pipeline: one decoder layer on the GPU at a time, the activations
# between layers offloaded to host memory (kondense.memory.quantize_plan counts exactly that).
# gptq names it. A two-modifier recipe keeps "independent", which gives each modifier its own
# pass and infers "sequential" for each calibrated one: one shared sequential pass would accumulate
# GPTQ's Hessians (w8a8-int8) on inputs that SmoothQuant rescales at the end of the same layer.
# fp8-dynamic needs no data: "independent" infers the data-free pipeline (also a layer at a time).
LLMC_PIPELINES: dict[str, tuple[str, str]] = {
    "gptq": ("sequential", "sequential pipeline"),
    "awq": ("independent", "sequential pipeline per modifier (AWQ smoothing, then quantization)"),
    "fp8-dynamic": ("independent", "data-free pipeline"),
    "w8a8-int8": ("independent", "sequential pipeline per modifier (SmoothQuant, then GPTQ)"),
}


def llm_compressor(ctx: Context, model_dir: Path, out: Path) -> dict[str, float]:
    """Every llm-compressor method: one `oneshot` over the method's recipe, saved as compressed-tensors."""
    spec: QuantizeSpec = ctx.config
    feature = f"method {spec.method}"
    build, calibrated = LLMC_RECIPES[spec.method]
    # llm-compressor logs two lines per module (INFO and its METRIC level, 38): keep them for
    # KONDENSE_LOG_LEVEL=DEBUG only (its own LLM_COMPRESSOR_LOG_LEVEL wins when set).
    verbose = os.environ.get("KONDENSE_LOG_LEVEL") == "DEBUG"
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "INFO" if verbose else "ERROR")
    if spec.method == "awq":
        require_gpu_for_awq()
    oneshot = llmc_class(feature, "llmcompressor", "oneshot")
    datasets = require("datasets", feature)
    from transformers import AutoModelForCausalLM

    ignore = list(spec.ignore if spec.ignore is not None else QuantizeSpec.DEFAULT_IGNORE)
    recipe, metrics, what = build(spec, ignore)
    tokenizer = load_tokenizer(model_dir)
    # On the CPU, in the checkpoint's dtype, no device_map: llm-compressor's pipelines onload one
    # layer at a time to the first GPU (sequential onloading), so a model larger than a GPU fits.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    if spec.ignore is not None:  # the defaults name modules that only some families have
        check_ignore(model, spec.ignore)
    targets = gptq_targets(model, ignore)
    if not targets:
        raise InvalidInput(f"{model_dir}: no Linear layer to quantize (ignore: {', '.join(ignore)})")
    if "groupSize" in metrics:
        check_group_size(targets, int(metrics["groupSize"]))

    kwargs: dict = {}
    if calibrated:
        # datasets copies the samples into Arrow anyway: int64 lists of the few calibration windows
        windows = data.long_rows(calibration_windows(ctx, tokenizer, spec.calibration_samples, spec.calibration_seq_length)).tolist()
        masks = [[1] * len(w) for w in windows]
        kwargs = {
            "dataset": datasets.Dataset.from_dict({"input_ids": windows, "attention_mask": masks}),
            "max_seq_length": max(len(w) for w in windows),
            "num_calibration_samples": len(windows),
            "shuffle_calibration_samples": False,
        }
        metrics["calibrationSamples"] = len(windows)
        log.info("Quantizing %d modules with %d samples (%s)", len(targets), len(windows), what)
    else:
        log.info("Quantizing %d modules without calibration data (%s)", len(targets), what)
    pipeline, pipeline_words = LLMC_PIPELINES[spec.method]
    log.info("Model in host memory (%s); llm-compressor's %s, layer by layer on %s",
             model.dtype, pipeline_words, llmc_device())
    oneshot(model=model, processor=tokenizer, recipe=recipe, pipeline=pipeline, **kwargs)
    quantized = sum(getattr(m, "quantization_scheme", None) is not None for m in model.modules())
    if quantized != len(targets):
        log.warning("llm-compressor quantized %d modules, expected %d", quantized, len(targets))
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return {"quantizedModules": quantized, **metrics}


# --------------------------------------------------------------------------------------------
# GGUF (llama.cpp)
# --------------------------------------------------------------------------------------------


def gguf(ctx: Context, model_dir: Path, out: Path) -> dict[str, float]:
    """llama.cpp's file type; with an importance matrix (spec.uses_imatrix) computed by llama-imatrix on
    calibration windows of the training split, decoded to text that llama.cpp tokenizes back."""
    spec: QuantizeSpec = ctx.config
    backend = gguf_backend()
    file_type = spec.type or GGUF_DEFAULT_TYPE
    calibration = None
    if spec.uses_imatrix:
        tokenizer = load_tokenizer(model_dir)
        windows = calibration_windows(ctx, tokenizer, spec.calibration_samples, spec.calibration_seq_length)
        # llama-imatrix runs at least 2 windows: a shorter split is cut in two (with a margin for re-tokenizing)
        n_ctx = windows.shape[1] if len(windows) >= 2 else max(8, windows.size * 9 // 20)
        text = "".join(tokenizer.decode(w, skip_special_tokens=False, clean_up_tokenization_spaces=False) for w in windows)
        calibration = backend.Calibration(text, n_ctx, max(len(windows), 2))
    log.info("Converting to GGUF %s%s", file_type, " with an importance matrix" if calibration else "")
    made = backend.quantize(model_dir, out, file_type, ctx.progress, calibration)
    log.info("Wrote %s", made.path.name)
    metrics = {"ggufFallbackTensors": made.fallbacks}
    if made.imatrix_chunks:
        metrics["imatrixWindows"] = made.imatrix_chunks
    return metrics


METHODS: dict[str, Callable[[Context, Path, Path], dict[str, float]]] = {
    "bnb-nf4": bnb_nf4,
    "bnb-int8": bnb_int8,
    "gptq": llm_compressor,
    "awq": llm_compressor,
    "fp8-dynamic": llm_compressor,
    "w8a8-int8": llm_compressor,
    "gguf": gguf,
}

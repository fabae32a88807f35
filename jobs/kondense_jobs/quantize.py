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
                     failed to reload (qweight shape mismatch).
  gguf               llama.cpp's converter and quantizer, in kondense_jobs.gguf.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

from kondense.api import QuantizeSpec, Summary
from kondense.errors import InvalidInput, InvalidSpec, MissingDependency
from kondense_jobs import data
from kondense_jobs.runtime import Context, require

log = logging.getLogger("kondense_jobs.quantize")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
GPTQ_DEFAULT_BITS = 4
GPTQ_DEFAULT_GROUP_SIZE = 128
GPTQ_IGNORE = ["lm_head"]
GGUF_DEFAULT_TYPE = "q8_0"


def run(ctx: Context) -> Summary:
    spec: QuantizeSpec = ctx.config
    quantize = method(spec.method)

    # 1. Fetch the input model (an earlier stage's artifact is verified against its manifest).
    model_dir = ctx.model_dir("model")
    log.info("Fetched input model: %s", model_dir)

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
# GPTQ (llm-compressor)
# --------------------------------------------------------------------------------------------


def gptq_scheme(bits: int, group_size: int):
    """compressed-tensors' preset W{bits}A16 with the group size asked for (-1: one scale per output channel)."""
    from compressed_tensors.quantization import QuantizationStrategy, preset_name_to_scheme

    if group_size == 0 or group_size < -1:
        raise InvalidSpec(
            f"gptq: groupSize {group_size} is invalid; use -1 (one scale per output channel) or a positive column count"
        )
    scheme = preset_name_to_scheme(f"W{bits}A16", ["Linear"])
    if group_size == -1:
        update = {"strategy": QuantizationStrategy.CHANNEL, "group_size": None}
    else:
        update = {"strategy": QuantizationStrategy.GROUP, "group_size": group_size}
    scheme.weights = scheme.weights.model_copy(update=update)
    return scheme


def gptq_targets(model, ignore: list[str] = GPTQ_IGNORE) -> dict[str, int]:
    """The Linear layers GPTQ quantizes -> their input width (columns)."""
    import torch

    return {
        name: module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in ignore and name not in ignore
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
        f"gptq: groupSize {group_size} does not divide the input width of {len(bad)} of {len(targets)} layers, "
        f"e.g. {examples}. To resolve, set groupSize to a divisor of {common} (e.g. {divisor}) "
        "or to -1 for per-channel scales."
    )


def calibration_windows(ctx: Context, tokenizer, samples: int, seq_length: int) -> list[list[int]]:
    """Up to `samples` windows of `seq_length` tokens from the training split (records joined with EOS)."""
    split = data.load(ctx.dataset_path(), ctx.run.dataset)
    stream = data.token_stream(tokenizer, data.texts(split.train, ctx.run.dataset))
    windows = data.windows(stream, seq_length, limit=samples * seq_length)
    if not windows:
        if not stream:
            raise InvalidInput("gptq: the training split holds no tokens to calibrate on")
        log.warning(
            "The training split has %d tokens, fewer than calibrationSeqLength %d: calibrating on one shorter sample",
            len(stream), seq_length,
        )
        windows = [stream]
    elif len(windows) < samples:
        log.warning(
            "The training split yields %d windows of %d tokens, fewer than calibrationSamples %d",
            len(windows), seq_length, samples,
        )
    return windows


def gptq(ctx: Context, model_dir: Path, out: Path) -> dict[str, float]:
    spec: QuantizeSpec = ctx.config
    bits = spec.bits or GPTQ_DEFAULT_BITS
    group_size = spec.group_size if spec.group_size is not None else GPTQ_DEFAULT_GROUP_SIZE
    # llm-compressor logs two lines per module (INFO and its METRIC level, 38): keep them for
    # KONDENSE_LOG_LEVEL=DEBUG only (its own LLM_COMPRESSOR_LOG_LEVEL wins when set).
    verbose = os.environ.get("KONDENSE_LOG_LEVEL") == "DEBUG"
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "INFO" if verbose else "ERROR")
    require("llmcompressor", "method gptq")
    datasets = require("datasets", "method gptq")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    scheme = gptq_scheme(bits, group_size)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    targets = gptq_targets(model)
    if not targets:
        raise InvalidInput(f"{model_dir}: no Linear layer to quantize (besides {', '.join(GPTQ_IGNORE)})")
    check_group_size(targets, group_size)
    windows = calibration_windows(ctx, tokenizer, spec.calibration_samples, spec.calibration_seq_length)

    log.info(
        "Quantizing %d modules with %d samples (W%dA16, groupSize %d)", len(targets), len(windows), bits, group_size
    )
    masks = [[1] * len(w) for w in windows]
    calibration = datasets.Dataset.from_dict({"input_ids": windows, "attention_mask": masks})
    oneshot(
        model=model,
        dataset=calibration,
        recipe=GPTQModifier(config_groups={"group_0": scheme}, ignore=GPTQ_IGNORE),
        max_seq_length=max(len(w) for w in windows),
        num_calibration_samples=len(windows),
        shuffle_calibration_samples=False,
    )
    quantized = sum(getattr(m, "quantization_scheme", None) is not None for m in model.modules())
    if quantized != len(targets):
        log.warning("llm-compressor quantized %d modules, expected %d", quantized, len(targets))
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    return {"quantizedModules": quantized, "calibrationSamples": len(windows), "bits": bits, "groupSize": group_size}


# --------------------------------------------------------------------------------------------
# GGUF (llama.cpp)
# --------------------------------------------------------------------------------------------


def gguf(ctx: Context, model_dir: Path, out: Path) -> dict[str, float]:
    spec: QuantizeSpec = ctx.config
    file_type = spec.type or GGUF_DEFAULT_TYPE
    log.info("Converting to GGUF %s", file_type)
    path = gguf_backend().quantize(model_dir, out, file_type, ctx.progress)
    log.info("Wrote %s", path.name)
    return {}


METHODS: dict[str, Callable[[Context, Path, Path], dict[str, float]]] = {
    "bnb-nf4": bnb_nf4,
    "bnb-int8": bnb_int8,
    "gptq": gptq,
    "gguf": gguf,
}

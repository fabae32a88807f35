"""The quantize stage through its real entrypoint: bitsandbytes NF4/int8 and GPTQ on a tiny trained model.

Each method's output must reload with plain AutoModelForCausalLM, generate, really be quantized
(bitsandbytes layers / a compressed-tensors config with the bits and groups asked for) and stay
close to the input's held-out perplexity. Relative changes measured on the tiny teacher (4 layers,
hidden 128, ppl ~213): nf4 -0.025%, int8 -0.003%, GPTQ W4 g32 -0.024%, GPTQ W8 per-channel
+0.002%. The bounds leave a wide margin for other seeds and BLAS builds; a broken quantizer
(garbage weights) moves perplexity by orders of magnitude.
"""

from __future__ import annotations

import json
import math
import re
import typing

import pytest

from kondense.api import DatasetRef, InputRef, QuantizeSpec, Resources
from kondense.errors import InvalidSpec, MissingDependency
from kondense.store import FileStore

SEQ = 64


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


CUDA = _cuda()


@pytest.fixture(scope="module")
def upstream(tiny_teacher, tmp_path_factory) -> InputRef:
    """The trained teacher published as an earlier stage's artifact (manifest.json, digests)."""
    uri = f"file://{tmp_path_factory.mktemp('upstream')}/distill-0123"
    FileStore().publish(tiny_teacher, uri, stage="distill", stage_kind="distill", input_digest="sha256:distill-0123")
    return InputRef(uri=uri, stage="distill", input_digest="sha256:distill-0123")


@pytest.fixture(scope="module")
def eval_windows(tiny_teacher, tiny_dataset) -> list[list[int]]:
    from transformers import AutoTokenizer

    from kondense_jobs import data

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    ref = DatasetRef(uri=f"file://{tiny_dataset}", eval_split=0.1)
    stream = data.token_stream(tokenizer, data.texts(data.load(tiny_dataset, ref).eval, ref))
    return data.windows(stream, SEQ, limit=4096)


def perplexity(model, windows: list[list[int]]) -> float:
    """exp(mean NLL) of next-token predictions, computed from the logits (independent of the stages' code)."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor(windows, device=model.device)
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
    return math.exp(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item())


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu")


@pytest.fixture(scope="module")
def teacher_perplexity(tiny_teacher, eval_windows) -> float:
    return perplexity(load(tiny_teacher), eval_windows)


CASES = [
    pytest.param(
        {"method": "bnb-nf4", "compute_dtype": "float32"},
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        "Linear4bit",
        0.02,
        id="bnb-nf4",
    ),
    pytest.param(
        {"method": "bnb-int8"},
        {"quant_method": "bitsandbytes", "load_in_8bit": True},
        "Linear8bitLt",
        0.005,
        id="bnb-int8",
    ),
    pytest.param(
        {"method": "gptq", "bits": 4, "group_size": 32, "calibration_samples": 16, "calibration_seq_length": SEQ},
        {"quant_method": "compressed-tensors", "num_bits": 4, "strategy": "group", "group_size": 32},
        None,
        0.02,
        id="gptq-w4-g32",
    ),
    pytest.param(
        {"method": "gptq", "bits": 8, "group_size": -1, "actorder": "none", "calibration_samples": 16, "calibration_seq_length": SEQ},
        {"quant_method": "compressed-tensors", "num_bits": 8, "strategy": "channel", "group_size": None, "actorder": None},
        None,
        0.005,
        id="gptq-w8-channel",
    ),
    pytest.param(
        {"method": "fp8-dynamic"},
        {"quant_method": "compressed-tensors", "format": "float-quantized", "type": "float", "num_bits": 8,
         "strategy": "channel", "activations": ("float", 8, True)},
        None,
        0.02,
        id="fp8-dynamic",
    ),
    pytest.param(
        {"method": "w8a8-int8", "calibration_samples": 16, "calibration_seq_length": SEQ},
        {"quant_method": "compressed-tensors", "format": "int-quantized", "type": "int", "num_bits": 8,
         "strategy": "channel", "actorder": "static", "activations": ("int", 8, True)},
        None,
        0.02,
        id="w8a8-int8",
    ),
    pytest.param(
        {"method": "awq", "group_size": 32, "calibration_samples": 16, "calibration_seq_length": SEQ},
        {"quant_method": "compressed-tensors", "num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32},
        None,
        0.03,
        id="awq-w4-g32",
        marks=pytest.mark.skipif(not CUDA, reason="llm-compressor's AWQModifier needs a GPU (pin_memory)"),
    ),
]

TEACHER_LINEARS = 4 * 7  # 4 layers x (q, k, v, o, gate, up, down); lm_head stays full precision


@pytest.mark.slow
@pytest.mark.parametrize("config, expect_config, layer_class, max_increase", CASES)
def test_quantize_reloads_generates_and_keeps_perplexity(
    tmp_path, make_run, run_stage, upstream, tiny_teacher, tiny_dataset, eval_windows, teacher_perplexity,
    config, expect_config, layer_class, max_increase,
):
    run, spec = make_run(tmp_path, "quantize", QuantizeSpec(**config), {"model": upstream}, dataset=tiny_dataset)
    code, summary, output = run_stage("quantize", spec, tmp_path)
    assert code == 0, output[-3000:]
    assert summary.state == "Succeeded" and summary.artifact.uri == run.output

    out = FileStore.path(run.output)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "hf" and manifest["inputDigest"] == run.input_digest
    input_bytes = sum(p.stat().st_size for p in tiny_teacher.glob("*.safetensors"))
    assert 0 < summary.metrics["sizeBytes"] < input_bytes
    assert summary.metrics["quantizedModules"] == TEACHER_LINEARS
    assert summary.metrics["seconds"] > 0

    # Really quantized, in the format its loaders expect.
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    if qconfig["quant_method"] == "compressed-tensors":
        assert qconfig["ignore"] == ["lm_head"]  # the default patterns, resolved to the modules they matched
        group = qconfig["config_groups"]["group_0"]
        acts = group["input_activations"]
        qconfig = {
            "quant_method": qconfig["quant_method"], "format": qconfig["format"], **group["weights"],
            "activations": acts and (acts["type"], acts["num_bits"], acts["dynamic"]),
        }
        calibration = "without calibration data" if config["method"] == "fp8-dynamic" else "with 16 samples"
        assert f"Quantizing {TEACHER_LINEARS} modules {calibration}" in output
    assert {k: qconfig.get(k) for k in expect_config} == expect_config

    model = load(out)
    if layer_class:
        import bitsandbytes as bnb

        assert sum(isinstance(m, getattr(bnb.nn, layer_class)) for m in model.modules()) == TEACHER_LINEARS
    ppl = perplexity(model, eval_windows)
    increase = ppl / teacher_perplexity - 1
    assert math.isfinite(ppl) and abs(increase) <= max_increase, f"perplexity {ppl:.3f} vs input {teacher_perplexity:.3f} ({increase:+.4%})"

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("The module provides", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 8


def one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    return errors[0]


def test_missing_input_manifest_fails_with_one_clear_line(tmp_path, make_run, run_stage, tiny_student, tiny_dataset):
    # A folder with weights but no manifest.json: an interrupted upload, not an artifact.
    ref = InputRef(uri=f"file://{tiny_student}", stage="distill", input_digest="sha256:distill-0123")
    _, spec = make_run(tmp_path, "quantize", QuantizeSpec(method="bnb-int8"), {"model": ref}, dataset=tiny_dataset)
    code, summary, output = run_stage("quantize", spec, tmp_path)
    assert code == 11
    assert summary.reason == "InvalidInput" and "\n" not in summary.message
    assert f"model: file://{tiny_student}/manifest.json is missing: re-run stage distill." == summary.message
    assert summary.message in one_error_line(output)


def test_unknown_method_fails_with_the_known_ones(tmp_path, make_run, run_stage, tiny_student, tiny_dataset):
    _, spec = make_run(tmp_path, "quantize", QuantizeSpec(method="bnb-int8"), {"model": tiny_student}, dataset=tiny_dataset)
    doc = json.loads(spec.read_text())
    doc["quantize"]["method"] = "hqq"
    spec.write_text(json.dumps(doc))
    code, summary, output = run_stage("quantize", spec, tmp_path)
    assert code == 10
    assert summary.reason == "InvalidSpec" and "\n" not in summary.message
    assert "quantize.method" in summary.message and "'bnb-nf4'" in summary.message and "'gguf'" in summary.message
    assert summary.message in one_error_line(output)


def test_registry_matches_the_api():
    from kondense_jobs import quantize

    assert set(quantize.METHODS) == set(typing.get_args(QuantizeSpec.model_fields["method"].annotation))
    known = "bnb-nf4, bnb-int8, gptq, awq, fp8-dynamic, w8a8-int8, gguf"
    with pytest.raises(InvalidSpec, match=f"unknown quantization method 'hqq'; known methods: {known}"):
        quantize.method("hqq")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size, strategy", [(32, "group"), (128, "group"), (-1, "channel")], ids=["g32", "g128", "channel"])
def test_gptq_scheme_for_every_allowed_bits_and_group_size(bits, group_size, strategy):
    from kondense_jobs.quantize import gptq_scheme

    weights = gptq_scheme(bits, group_size).weights
    assert (weights.num_bits, weights.strategy, weights.group_size) == (bits, strategy, None if group_size == -1 else group_size)
    assert weights.symmetric and weights.type == "int"


def test_gptq_group_size_zero_is_rejected():
    from kondense_jobs.quantize import gptq_scheme

    with pytest.raises(InvalidSpec, match="groupSize 0 is invalid"):
        gptq_scheme(4, 0)


@pytest.mark.parametrize(
    "targets, group_size, ok",
    [
        ({"q": 128, "down": 384}, 32, True),
        ({"q": 128, "down": 384}, 128, True),
        ({"q": 64, "down": 192}, 128, False),
        ({"q": 128, "down": 384}, 48, False),
        ({"q": 100}, -1, True),
    ],
    ids=["divides", "divides-all", "wider-than-layer", "does-not-divide", "per-channel"],
)
def test_gptq_group_size_must_divide_every_layer(targets, group_size, ok):
    from kondense_jobs.quantize import check_group_size

    if ok:
        check_group_size(targets, group_size)
    else:
        with pytest.raises(InvalidSpec, match=rf"groupSize {group_size} does not divide .* set groupSize to a divisor of"):
            check_group_size(targets, group_size)


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_below_4_bits_is_not_offered(bits):
    # vLLM's compressed-tensors WNA16 kernels take 4 and 8 bits: the API refuses 2 and 3, the stage too.
    from kondense_jobs.quantize import gptq_scheme

    with pytest.raises(InvalidSpec, match=f"quantize.bits {bits} is not offered"):
        gptq_scheme(bits, 128)


def test_awq_and_int8_smoothquant_schemes():
    from kondense_jobs.quantize import gptq_scheme, preset_scheme

    awq = gptq_scheme(4, 64, preset="W{bits}A16_ASYM")
    assert (awq.weights.num_bits, awq.weights.symmetric, awq.weights.group_size) == (4, False, 64)
    int8 = preset_scheme("method w8a8-int8", "W8A8")
    assert (int8.weights.type, int8.input_activations.type, int8.input_activations.dynamic) == ("int", "int", True)


def moe_like():
    """Module names of a Mixtral/Qwen-MoE-like decoder layer, with a router, an MoE gate and an MLP gate_proj."""
    from torch import nn

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(64, 32), nn.Linear(64, 32), nn.Linear(32, 64)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Module()
            self.mlp.gate = nn.Linear(64, 4)  # Qwen-MoE / DeepSeek router
            self.mlp.experts = nn.ModuleList([Experts()])
            self.block_sparse_moe = nn.Module()
            self.block_sparse_moe.gate = nn.Linear(64, 4)  # Mixtral
            self.feed_forward = nn.Module()
            self.feed_forward.router = nn.Linear(64, 4)  # Llama 4

    model = nn.Module()
    model.layers = nn.ModuleList([Layer()])
    model.lm_head = nn.Linear(64, 100)
    return model


def test_default_ignore_keeps_lm_head_and_moe_routers():
    from kondense_jobs.quantize import gptq_targets

    targets = gptq_targets(moe_like())
    assert sorted(targets) == [f"layers.0.mlp.experts.0.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
    # An overriding list is used as given: here the routers are quantized too.
    assert "layers.0.mlp.gate" in gptq_targets(moe_like(), ["lm_head"])


@pytest.mark.parametrize(
    "patterns, error",
    [
        (["lm_head", "re:.*mlp[.]gate$", "Linear"], None),
        (["lm_head", "re:.*attn.*"], r"quantize.ignore\[1\]: 're:.\*attn.\*' matches no module"),
        (["lm_heads"], r"quantize.ignore\[0\]: 'lm_heads' matches no module .* \(e.g. layers.0.mlp.gate"),
        (["re:(unclosed"], r"quantize.ignore\[0\]: 're:\(unclosed' is not a regular expression"),
    ],
    ids=["all-match", "regex-matches-nothing", "name-matches-nothing", "bad-regex"],
)
def test_ignore_patterns_must_match_a_module(patterns, error):
    from kondense_jobs.quantize import check_ignore

    if error is None:
        check_ignore(moe_like(), patterns)
    else:
        with pytest.raises(InvalidSpec, match=error):
            check_ignore(moe_like(), patterns)


def test_a_modifier_this_llm_compressor_lacks_is_a_missing_dependency():
    from kondense_jobs.quantize import llmc_class, llmcompressor_version, preset_scheme

    assert llmc_class("method gptq", "llmcompressor.modifiers.quantization", "GPTQModifier").__name__ == "GPTQModifier"
    version = llmcompressor_version()
    assert version[0].isdigit()
    with pytest.raises(MissingDependency, match=f"method x needs llmcompressor.modifiers.quantization.NoSuchModifier, "
                       f"which the installed llmcompressor {re.escape(version)} lacks") as e:
        llmc_class("method x", "llmcompressor.modifiers.quantization", "NoSuchModifier")
    assert e.value.exit_code == 12
    with pytest.raises(MissingDependency, match=f"needs the W3A5 scheme.*llmcompressor {re.escape(version)}"):
        preset_scheme("method x", "W3A5")


@pytest.mark.skipif(CUDA, reason="on a GPU machine AWQ runs (the awq-w4-g32 case)")
def test_awq_without_a_gpu_exits_14_saying_why(tmp_path, make_run, run_stage, tiny_student, tiny_dataset):
    spec_ = QuantizeSpec(method="awq", calibration_samples=4, calibration_seq_length=SEQ)
    _, spec = make_run(tmp_path, "quantize", spec_, {"model": tiny_student}, dataset=tiny_dataset)
    code, summary, output = run_stage("quantize", spec, tmp_path)
    assert code == 14, output[-3000:]
    assert summary.reason == "InsufficientResources"
    assert summary.message.startswith("method awq needs a GPU: llm-compressor 0.14")
    assert "pin_memory" in summary.message and "resources.gpus >= 1" in summary.message
    assert summary.message in one_error_line(output)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"method": "gptq", "group_size": 48}, "quantize.groupSize 48 does not divide the input width of 12 of 14 layers"),
        ({"method": "fp8-dynamic", "ignore": ["lm_head", "re:.*moe.*"]}, "quantize.ignore[1]: 're:.*moe.*' matches no module"),
    ],
    ids=["group-size-does-not-divide", "ignore-matches-nothing"],
)
def test_what_only_the_model_decides_exits_10_naming_the_field(tmp_path, make_run, run_stage, tiny_student, tiny_dataset, config, message):
    spec_ = QuantizeSpec(**config, calibration_samples=4, calibration_seq_length=SEQ)
    _, spec = make_run(tmp_path, "quantize", spec_, {"model": tiny_student}, dataset=tiny_dataset)
    code, summary, output = run_stage("quantize", spec, tmp_path)
    assert code == 10, output[-3000:]
    assert summary.reason == "InvalidSpec" and message in summary.message
    assert summary.message in one_error_line(output)


def test_preflight_refuses_gptq_that_cannot_fit_host_memory_before_loading_weights(
    tmp_path, make_run, run_stage, tiny_student, tiny_dataset
):
    spec_ = QuantizeSpec(method="gptq", group_size=32, calibration_samples=4, calibration_seq_length=SEQ)
    run, spec = make_run(tmp_path, "quantize", spec_, {"model": tiny_student}, dataset=tiny_dataset,
                         resources=Resources(gpus=0, memory="1Mi"))
    code, summary, output = run_stage("quantize", spec, tmp_path, env={"TRANSFORMERS_VERBOSITY": "info"})  # logs each load
    assert code == 14, output[-3000:]
    assert summary.reason == "InsufficientResources"
    assert summary.message.startswith("quantize needs ") and "(resources.memory 1Mi)" in summary.message
    assert "Changes that would make it fit" in summary.message and "resources.memory: 1Gi" in summary.message
    assert summary.message in one_error_line(output)
    # refused from config.json and the safetensors headers: no weight loaded, nothing published
    assert "loading weights file" not in output and "Preflight" not in output and "Quantizing" not in output
    assert not FileStore.path(run.output).exists() or not any(FileStore.path(run.output).iterdir())


def test_preflight_logs_the_plan_and_records_it_when_gptq_fits(tmp_path, make_run, run_stage, tiny_student, tiny_dataset):
    from kondense import memory
    from kondense_jobs import preflight

    spec_ = QuantizeSpec(method="gptq", group_size=32, calibration_samples=4, calibration_seq_length=SEQ)
    resources = Resources(gpus=0, memory="4Gi")
    run, spec = make_run(tmp_path, "quantize", spec_, {"model": tiny_student}, dataset=tiny_dataset, resources=resources)
    code, summary, output = run_stage("quantize", spec, tmp_path, env={"TRANSFORMERS_VERBOSITY": "info"})  # logs each load
    assert code == 0, output[-3000:]
    expected = memory.quantize_plan(spec_, resources, preflight.shape_of(tiny_student, "model"))
    line = next(line for line in output.splitlines() if "Preflight: " in line)
    assert line.split("Preflight: ", 1)[1] == expected.table() and "(resources.memory 4Gi)" in line
    assert summary.metrics["preflightGiB"] == round(expected.total / memory.GIB, 3) > 0
    assert output.index("Preflight: ") < output.index("loading weights file") < output.index("Quantizing ")
    assert "sequential pipeline, layer by layer on the CPU" in output or CUDA

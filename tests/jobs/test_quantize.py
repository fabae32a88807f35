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
import typing

import pytest

from kondense.api import DatasetRef, InputRef, QuantizeSpec
from kondense.errors import InvalidSpec
from kondense.store import FileStore

SEQ = 64


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
        {"method": "gptq", "bits": 8, "group_size": -1, "calibration_samples": 16, "calibration_seq_length": SEQ},
        {"quant_method": "compressed-tensors", "num_bits": 8, "strategy": "channel", "group_size": None},
        None,
        0.005,
        id="gptq-w8-channel",
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
        assert qconfig["ignore"] == ["lm_head"]
        qconfig = {"quant_method": qconfig["quant_method"], **qconfig["config_groups"]["group_0"]["weights"]}
        assert f"Quantizing {TEACHER_LINEARS} modules with 16 samples" in output
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
    doc["quantize"]["method"] = "awq"
    spec.write_text(json.dumps(doc))
    code, summary, output = run_stage("quantize", spec, tmp_path)
    assert code == 10
    assert summary.reason == "InvalidSpec" and "\n" not in summary.message
    assert "quantize.method" in summary.message and "'bnb-nf4'" in summary.message and "'gguf'" in summary.message
    assert summary.message in one_error_line(output)


def test_registry_matches_the_api():
    from kondense_jobs import quantize

    assert set(quantize.METHODS) == set(typing.get_args(QuantizeSpec.model_fields["method"].annotation))
    with pytest.raises(InvalidSpec, match="unknown quantization method 'awq'; known methods: bnb-nf4, bnb-int8, gptq, gguf"):
        quantize.method("awq")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
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

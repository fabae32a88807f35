"""The memory model, `kondense plan` and the launcher command. Pure, fast."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kondense import fit, memory
from kondense.api import DistillSpec, PipelineSpec, Resources
from kondense.launch import stage_command
from kondense.plan import resolve

ROOT = Path(__file__).resolve().parents[2]
FLAGSHIP = ROOT / "crds/examples/llama-70b-to-8b.yaml"
GIB = memory.GIB
LLAMA_8B = memory.Shape.from_config(fit.catalogue()["llama-3.1-8b"], "student")
LLAMA_70B = memory.Shape.from_config(fit.catalogue()["llama-3.1-70b"], "teacher")


# ---------------------------------------------------------------------------------------------
# Shapes and parts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, billions",
    [("llama-3.1-8b", 8.03), ("llama-3.1-70b", 70.55), ("llama-3.2-1b", 1.24), ("llama-3.2-3b", 3.21), ("qwen2.5-7b", 7.62)],
)
def test_parameter_counts_from_config_match_the_published_models(name, billions):
    assert memory.Shape.from_config(fit.catalogue()[name]).total_parameters / 1e9 == pytest.approx(billions, rel=0.01)


def test_gpt2_style_mlp_is_counted_with_two_matrices():
    gpt2 = memory.Shape.from_config({"n_embd": 768, "n_layer": 12, "vocab_size": 50257, "n_head": 12})
    assert gpt2.total_parameters / 1e6 == pytest.approx(124.4, rel=0.01)  # GPT-2 small


def test_fsdp_divides_the_training_state_by_the_workers():
    spec = DistillSpec(batch_size=1, max_seq_length=2048, gradient_checkpointing=True)
    r = Resources(gpus=8)
    ddp = memory.training(LLAMA_8B, None, memory.Choice("ddp", "none", 1, True), 2048, "bf16", r)
    fsdp = memory.training(LLAMA_8B, None, memory.Choice("fsdp", "none", 1, True), 2048, "bf16", r)
    p = LLAMA_8B.total_parameters
    assert ddp.parts["optimizer"] == 8 * p and ddp.parts["gradients"] == 8 * p  # fp32 grads + DDP buckets
    assert fsdp.parts["optimizer"] == 8 * p / 8 and fsdp.parts["gradients"] == 4 * p / 8
    assert fsdp.parts["activations"] == ddp.parts["activations"]
    # To publish, rank 0 gathers the full fp32 weights into host memory: a GPU's estimate leaves them
    # out, a CPU worker's (host memory is its memory) counts them.
    cpu = memory.training(LLAMA_8B, None, memory.Choice("fsdp", "none", 1, True), 2048, "fp32",
                          Resources(gpus=0, workers=8))
    on_gpu = memory.training(LLAMA_8B, None, memory.Choice("fsdp", "none", 1, True), 2048, "fp32", r)
    assert cpu.parts["weights"] - on_gpu.parts["weights"] == 4 * p
    del spec


def test_logits_column_follows_the_stages_loss():
    """The logits method's losses keep the logits and their gradient in bf16 (4 bytes a value) and
    the teacher's (2); TRL's SFT loss the logits and three fp32 tensors (14), whatever the teacher."""
    r = Resources(gpus=4)
    n = 2 * 4096 * LLAMA_8B.vocab
    block = memory.KD_BLOCK_TEMPORARIES * 4 * memory.KD_BLOCK_ELEMENTS["gpu"]

    def logits(method: str, teacher=LLAMA_70B, **fields) -> float:
        spec = DistillSpec(method=method, batch_size=2, max_seq_length=4096, gradient_checkpointing=True, **fields)
        return memory.distill_plan(spec, r, LLAMA_8B, teacher)[0].parts["logits"]

    assert logits("logits") == pytest.approx(n * (4 + 2) + block)
    assert logits("logits", None, alpha=0.0) == pytest.approx(n * 4 + block)  # CE-only: no teacher
    assert logits("synthetic") == pytest.approx(n * (14 + 10))
    assert logits("logits", None, teacher_logits="stored") == pytest.approx(n * 4 + block)  # topk_kd_loss


@pytest.mark.parametrize("load, ratio", [("replicated", 1.0), ("int8", 0.51), ("nf4", 0.29)])
def test_teacher_load_modes(load, ratio):
    full = memory.teacher_bytes(LLAMA_70B, "replicated", "bf16", 8)
    assert memory.teacher_bytes(LLAMA_70B, load, "bf16", 8) / full == pytest.approx(ratio, abs=0.02)
    sharded = memory.teacher_bytes(LLAMA_70B, "sharded", "bf16", 8)
    assert full / 8 < sharded < full / 8 + 2 * LLAMA_70B.layer_parameters * 2 + 1


def test_checkpointing_keeps_one_layer_of_activations():
    full = memory.activation_bytes(LLAMA_8B, 2, 2048, "bf16", checkpointing=False)
    ckpt = memory.activation_bytes(LLAMA_8B, 2, 2048, "bf16", checkpointing=True)
    assert ckpt < full / 10


def test_cpu_workers_share_the_declared_memory():
    cap, what = memory.capacity(Resources(gpus=0, workers=4, memory="32Gi"))
    assert cap == 8 * GIB and what == "resources.memory 32Gi / 4 workers"


# ---------------------------------------------------------------------------------------------
# Plans and fixes
# ---------------------------------------------------------------------------------------------


def flagship(**resources) -> tuple[PipelineSpec, list]:
    doc = yaml.safe_load(FLAGSHIP.read_text())
    doc["spec"]["stages"][0]["resources"].update(resources)
    spec = PipelineSpec.model_validate(doc["spec"])
    return spec, resolve(spec, "ml-team", "llama-70b-to-8b")


def test_the_flagship_fits_on_eight_80gib_gpus():
    spec, plans = flagship()
    fits = fit.plan_stages(spec, plans, {"teacher": LLAMA_70B, "student": LLAMA_8B})
    assert all(f.fits for f in fits), fit.format_plan(fits, {})
    distill = fits[0].estimate
    assert distill.choice == memory.Choice("fsdp", "sharded", 2, True)
    assert 40 * GIB < distill.total < 70 * GIB


def test_the_flagship_on_one_gpu_names_what_would_fit():
    spec, plans = flagship(gpus=1)
    d = fit.plan_stages(spec, plans, {"teacher": LLAMA_70B, "student": LLAMA_8B})[0]
    assert not d.fits
    assert d.fixes and all(f.estimate.fits for f in d.fixes)
    assert d.fixes[0].field == "resources.gpus: 8"
    costs = [f.cost for f in d.fixes]
    assert costs == sorted(costs)


def test_auto_prefers_ddp_and_a_replicated_teacher_when_they_fit():
    spec = DistillSpec(batch_size=1, max_seq_length=512)
    small = memory.Shape.from_config(fit.catalogue()["llama-3.2-1b"])
    estimate, fixes = memory.distill_plan(spec, Resources(gpus=4), small, small)
    assert estimate.fits and not fixes
    assert (estimate.choice.strategy, estimate.choice.teacher_load) == ("ddp", "replicated")


def test_cpu_workers_shard_the_student_when_a_replica_does_not_fit():
    """FSDP2 runs on CPU workers too (gloo): auto picks it where ddp does not fit, and a ddp spec is told to switch."""
    spec = DistillSpec(batch_size=1, max_seq_length=1024, gradient_checkpointing=True)
    r = Resources(gpus=0, workers=4, memory="400Gi")
    auto, fixes = memory.distill_plan(spec, r, LLAMA_8B, None)
    assert auto.fits and not fixes and auto.choice.strategy == "fsdp"
    ddp, fixes = memory.distill_plan(spec.model_copy(update={"strategy": "ddp"}), r, LLAMA_8B, None)
    assert not ddp.fits
    assert fixes[0].field == "distill.strategy: fsdp" and fixes[0].estimate.total == auto.total
    # One worker has nothing to shard over: auto keeps the full copy; fsdp, when asked, is a world of one.
    one = Resources(gpus=0, workers=1, memory="400Gi")
    assert memory.distill_plan(spec, one, LLAMA_8B, None)[0].choice.strategy == "ddp"
    asked, _ = memory.distill_plan(spec.model_copy(update={"strategy": "fsdp"}), one, LLAMA_8B, None)
    assert asked.choice.strategy == "fsdp" and asked.parts["optimizer"] == 8 * LLAMA_8B.total_parameters


# ---------------------------------------------------------------------------------------------
# `kondense plan`
# ---------------------------------------------------------------------------------------------


def plan_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}  # no credentials: the catalogue is used
    return subprocess.run([sys.executable, "-m", "kondense.cli", "plan", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120, env=env)


def test_plan_of_the_flagship_fits_and_exits_0(tmp_path):
    r = plan_cli(str(FLAGSHIP), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "built-in llama-3.1-70b config" in r.stdout
    row = next(line for line in r.stdout.splitlines() if line.startswith("distill"))
    assert "8 x 1" in row and "fsdp, teacher sharded" in row and row.rstrip().endswith("fits")


def test_plan_on_one_gpu_exits_14_and_names_what_would_fit(tmp_path):
    doc = yaml.safe_load(FLAGSHIP.read_text())
    doc["spec"]["stages"][0]["resources"]["gpus"] = 1
    path = tmp_path / "one-gpu.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = plan_cli(str(path), cwd=tmp_path)
    assert r.returncode == 14, r.stdout + r.stderr
    assert "DOES NOT FIT" in r.stdout and "resources.gpus: 8" in r.stdout
    assert "InsufficientResources: distill" in r.stderr


def test_plan_reads_config_json_given_on_the_command_line(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text('{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1024, "num_attention_heads": 4}')
    doc = yaml.safe_load((ROOT / "crds/examples/minimal.yaml").read_text())
    path = tmp_path / "minimal.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = plan_cli(str(path), "--config", f"teacher={cfg}", "--config", f"student={cfg}", "--gpu-memory", "16Gi", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "16.0" in r.stdout
    bad = plan_cli(str(path), cwd=tmp_path)
    assert bad.returncode == 2 and "--config ROLE=path/to/config.json" in bad.stderr


# ---------------------------------------------------------------------------------------------
# The command a stage runs
# ---------------------------------------------------------------------------------------------


LAUNCHED = ["python", "-m", "kondense_jobs.launch", "--nnodes"]


@pytest.mark.parametrize(
    "kind, resources, sharded, expected",
    [
        ("distill", Resources(gpus=1), False, ["python", "-m", "kondense_jobs", "distill", "--spec", "s.json"]),
        ("quantize", Resources(gpus=4), False, ["python", "-m", "kondense_jobs", "quantize", "--spec", "s.json"]),
        ("distill", Resources(gpus=4), False,
         [*LAUNCHED, "1", "--nproc-per-node", "4", "--standalone", "--", "distill", "--spec", "s.json"]),
        ("distill", Resources(gpus=0, workers=2, nodes=2), False,
         [*LAUNCHED, "2", "--nproc-per-node", "2", "--rdzv-endpoint", "job-0.svc:29400", "--rdzv-id", "job", "--",
          "distill", "--spec", "s.json"]),
        # a world of one writes FSDP's resharding checkpoints, so a sharded stage resumes on any worker count
        ("distill", Resources(gpus=1), True,
         [*LAUNCHED, "1", "--nproc-per-node", "1", "--standalone", "--", "distill", "--spec", "s.json"]),
    ],
    ids=["one-gpu", "quantize-on-4-gpus", "one-node", "two-nodes", "fsdp-on-one-gpu"],
)
def test_stage_command(kind, resources, sharded, expected):
    argv = stage_command(kind, ["--spec", "s.json"], resources, rendezvous=("job-0.svc:29400", "job"), sharded=sharded)
    assert argv == expected


def test_launcher_keeps_the_exit_code_and_summary_of_the_worker_that_failed_first(tmp_path):
    from kondense.api import Summary
    from kondense.events import summary_line
    from kondense_jobs.launch import outcome, summary_path

    summary_path(tmp_path, 0).write_text(summary_line(Summary(state="Succeeded", reason="Succeeded", message="ok")))
    summary_path(tmp_path, 1).write_text(summary_line(Summary(state="Failed", reason="InsufficientResources", message="no room")))
    assert outcome(tmp_path, {}, None)[1] == 0
    summary, code = outcome(tmp_path, {1: 14, 0: -15}, 1)
    assert (code, summary.reason, summary.message) == (14, "InsufficientResources", "worker 1: no room")
    summary, code = outcome(tmp_path, {2: -9}, 2)  # killed without a word: the OOM killer
    assert (code, summary.reason) == (137, "OOMKilled") and "SIGKILL" in summary.message


def test_pods_of_a_multi_node_stage_wait_for_each_other_longer_than_torchruns_60_s():
    import argparse

    from kondense_jobs.launch import RDZV_WAIT_SECONDS, torchrun_args

    args = argparse.Namespace(nnodes=2, nproc_per_node=8, standalone=False, rdzv_endpoint="job-0.svc:29400", rdzv_id="job")
    argv = torchrun_args(args, ["distill", "--spec", "s.json"])
    conf = argv[argv.index("--rdzv-conf") + 1]
    assert conf == f"read_timeout={RDZV_WAIT_SECONDS},join_timeout={RDZV_WAIT_SECONDS}" and RDZV_WAIT_SECONDS >= 600
    assert argv[argv.index("--max-restarts") + 1] == "0"
    assert argv[-5:] == ["--module", "kondense_jobs", "distill", "--spec", "s.json"]


# ---------------------------------------------------------------------------------------------
# Quantize: one layer on the GPU, the model and the offloaded activations in host memory
# ---------------------------------------------------------------------------------------------

LLAMA_70B_BF16 = memory.Shape.from_config({**fit.catalogue()["llama-3.1-70b"], "torch_dtype": "bfloat16"}, "model")
GPU_80 = Resources(gpus=1, gpu_memory_gib=80)


def test_shape_reads_the_checkpoint_dtype():
    assert LLAMA_70B_BF16.dtype == "bf16" and LLAMA_70B.dtype is None
    assert memory.Shape.from_config({**fit.catalogue()["llama-3.2-1b"], "dtype": "float32"}).dtype == "fp32"


def test_gptq_on_one_gpu_holds_about_one_layer_and_the_host_the_whole_model():
    from kondense.api import QuantizeSpec

    e = memory.quantize_plan(QuantizeSpec(method="gptq"), GPU_80, LLAMA_70B_BF16)
    whole = LLAMA_70B_BF16.total_parameters * 2
    assert e.fits and e.host is not None and e.host.fits  # no resources.memory: the host side is not bounded
    # per GPU: the largest subgraph (the 2 GiB embedding; a layer is 1.6 GiB), GPTQ's fp32 Hessians, one window
    h, i = LLAMA_70B_BF16.hidden, LLAMA_70B_BF16.intermediate
    assert e.parts["hessians"] >= (6 * h * h + i * i) * 4
    assert 5 * GIB < e.total < 24 * GIB and e.total < whole / 5  # one layer and its GPTQ work, not 131 GiB
    # host: the whole bf16 model (~131 GiB) plus 128 windows x 512 tokens x hidden, in and out
    assert e.host.parts["weights"] == whole and whole / GIB == pytest.approx(131.4, abs=0.5)
    assert e.host.parts["activations"] == pytest.approx(128 * 512 * (2 * h * 2 + 16))
    assert 131 * GIB < e.host.total < 150 * GIB


def test_gptq_of_a_70b_model_is_refused_with_64gi_of_host_memory_naming_resources_memory():
    from kondense.api import QuantizeSpec

    q, r = QuantizeSpec(method="gptq"), GPU_80.model_copy(update={"memory": "64Gi"})
    e = memory.quantize_plan(q, r, LLAMA_70B_BF16)
    assert e.gpu_fits and not e.fits
    assert e.host.capacity == 64 * GIB and e.host.capacity_what == "resources.memory 64Gi"
    fixes = memory.quantize_fixes(q, r, LLAMA_70B_BF16)
    needed = math.ceil(e.host.total / GIB)
    assert [f.field for f in fixes] == [f"resources.memory: {needed}Gi"]  # fewer samples cannot shrink the model
    words = "\n".join(memory.shortfall("gptq", e, fixes))
    assert "in host memory" in words and "of 64.0 GiB (resources.memory 64Gi)" in words
    assert f"resources.memory: {needed}Gi  ->  " in words and "GiB in host memory" in words


def test_fewer_calibration_samples_is_offered_when_the_intermediates_are_what_overflows():
    from kondense.api import QuantizeSpec

    q = QuantizeSpec(method="gptq", calibration_samples=4096, calibration_seq_length=4096)
    r = Resources(gpus=1, gpu_memory_gib=80, memory="40Gi")
    e = memory.quantize_plan(q, r, LLAMA_8B)
    assert e.host.parts["activations"] > 100 * GIB and not e.fits
    fixes = memory.quantize_fixes(q, r, LLAMA_8B)
    assert fixes[0].field.startswith("quantize.calibrationSamples: ") and fixes[0].estimate.fits
    assert int(fixes[0].field.rsplit(" ", 1)[1]) < 4096
    assert all(f.estimate.fits for f in fixes) and fixes[-1].field.startswith("resources.memory: ")


def test_a_tiny_model_fits_anywhere():
    from kondense.api import QuantizeSpec

    tiny = memory.Shape.from_config({"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 1024, "num_attention_heads": 4,
                                     "intermediate_size": 256, "torch_dtype": "float32"})
    for method in ("gptq", "w8a8-int8", "fp8-dynamic", "bnb-nf4", "gguf"):
        for r in (Resources(gpus=0, memory="2Gi"), Resources(gpus=1, gpu_memory_gib=8, memory="2Gi")):
            assert memory.quantize_plan(QuantizeSpec(method=method), r, tiny).fits, (method, r)


@pytest.mark.parametrize(
    "method, gpu_parts",
    [("gptq", {"weights", "hessians", "activations", "runtime"}), ("w8a8-int8", {"weights", "hessians", "activations", "runtime"}),
     ("awq", {"weights", "activations", "runtime"}), ("fp8-dynamic", {"weights", "runtime"}), ("bnb-nf4", {"weights", "runtime"})],
)
def test_what_each_method_holds_on_the_gpu(method, gpu_parts):
    from kondense.api import QuantizeSpec

    short, long = (
        memory.quantize_plan(QuantizeSpec(method=method, calibration_seq_length=seq), GPU_80, LLAMA_8B) for seq in (512, 4096)
    )
    assert {k for k, v in short.parts.items() if v} == gpu_parts
    assert (long.total > short.total) == (method in memory.CALIBRATED_METHODS)
    layer_or_embedding = max(LLAMA_8B.layer_parameters, LLAMA_8B.vocab * LLAMA_8B.hidden) * 2
    if method in memory.LLMC_METHODS:  # sequential / data-free: one subgraph on the GPU, however many GPUs
        assert short.parts["weights"] == layer_or_embedding
        assert memory.quantize_plan(QuantizeSpec(method=method), Resources(gpus=4), LLAMA_8B).total == short.total
    else:  # bitsandbytes: the whole model, quantized as it loads (NF4 linears, 16-bit rest, one 16-bit layer)
        assert 0.25 * LLAMA_8B.total_parameters * 2 < short.parts["weights"] < 0.5 * LLAMA_8B.total_parameters * 2
        assert memory.quantize_plan(QuantizeSpec(method=method), Resources(gpus=2), LLAMA_8B).total < short.total


def test_gguf_and_cpu_stages_are_host_memory_only():
    from kondense.api import QuantizeSpec

    gguf = memory.quantize_plan(QuantizeSpec(method="gguf"), GPU_80.model_copy(update={"memory": "32Gi"}), LLAMA_8B)
    assert gguf.host is None and gguf.capacity_what == "resources.memory 32Gi"
    assert set(gguf.parts) == {"weights", "runtime"}  # q8_0: the converter's, no importance matrix
    k_quant = memory.quantize_plan(QuantizeSpec(method="gguf", type="q4_k_m"), Resources(gpus=0), LLAMA_8B)
    longer = memory.quantize_plan(QuantizeSpec(method="gguf", type="q4_k_m", calibration_seq_length=4096), Resources(gpus=0), LLAMA_8B)
    assert k_quant.parts["logits"] == 512 * LLAMA_8B.vocab * 4 and longer.parts["logits"] == 8 * k_quant.parts["logits"]
    assert 0 < k_quant.parts["activations"] < longer.parts["activations"]  # llama-imatrix's window
    assert k_quant.parts["weights"] == gguf.parts["weights"]
    cpu = memory.quantize_plan(QuantizeSpec(method="gptq"), Resources(gpus=0, memory="64Gi"), LLAMA_8B)
    assert cpu.host is None and cpu.parts["weights"] == LLAMA_8B.total_parameters * 4  # no dtype: fp32 on CPU
    assert cpu.parts["hessians"] > 0 and cpu.parts["activations"] > 128 * 512 * LLAMA_8B.hidden * 4 * 2

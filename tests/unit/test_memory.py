"""The memory model, `kondense plan` and the launcher command. Pure, fast."""

from __future__ import annotations

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
    del spec


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


def test_fixes_never_offer_fsdp_to_cpu_workers():
    spec = DistillSpec(batch_size=8, max_seq_length=4096)
    estimate, fixes = memory.distill_plan(spec, Resources(gpus=0, workers=2, memory="40Gi"), LLAMA_8B, None)
    assert not estimate.fits
    assert all("fsdp" not in f.field for f in fixes)


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


@pytest.mark.parametrize(
    "kind, resources, expected",
    [
        ("distill", Resources(gpus=1), ["python", "-m", "kondense_jobs", "distill", "--spec", "s.json"]),
        ("quantize", Resources(gpus=4), ["python", "-m", "kondense_jobs", "quantize", "--spec", "s.json"]),
        ("distill", Resources(gpus=4), ["python", "-m", "kondense_jobs.launch", "--nnodes", "1", "--nproc-per-node", "4",
                                        "--standalone", "--", "distill", "--spec", "s.json"]),
        ("distill", Resources(gpus=0, workers=2, nodes=2),
         ["python", "-m", "kondense_jobs.launch", "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint",
          "job-0.svc:29400", "--rdzv-id", "job", "--", "distill", "--spec", "s.json"]),
    ],
    ids=["one-gpu", "quantize-on-4-gpus", "one-node", "two-nodes"],
)
def test_stage_command(kind, resources, expected):
    assert stage_command(kind, ["--spec", "s.json"], resources, rendezvous=("job-0.svc:29400", "job")) == expected


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


@pytest.mark.parametrize(
    "method, calibrated",
    [("gptq", True), ("awq", True), ("w8a8-int8", True), ("fp8-dynamic", False), ("bnb-nf4", False)],
)
def test_quantize_plan_runs_calibrated_methods_on_calibration_windows(method, calibrated):
    from kondense.api import QuantizeSpec

    r = Resources(gpus=1, gpu_memory_gib=80)
    short, long = (
        memory.quantize_plan(QuantizeSpec(method=method, calibration_seq_length=seq), r, LLAMA_8B) for seq in (512, 4096)
    )
    assert short.parts["weights"] == long.parts["weights"] == pytest.approx(LLAMA_8B.total_parameters * 2)
    assert (long.parts["activations"] > short.parts["activations"]) == calibrated
    assert (long.parts["logits"] == 4096 * LLAMA_8B.vocab * 6) == calibrated

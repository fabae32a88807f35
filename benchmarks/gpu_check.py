"""The GPU paths in one short run, for a machine with an NVIDIA GPU (prints figures, exits 1 on failure).

Uses the real stages in-process on models built on the spot (no hub):
  0. real-size distillation: a bf16 logit-KD stage with a ~1B student and a ~3B teacher (built
     from config, random weights); tokens/s, MFU against the GPU's dense bf16 peak, and the
     memory plan's per-GPU estimate (kondense.memory, what `kondense plan` prints) against
     torch.cuda.max_memory_allocated. Exits 1 below MIN_MFU or outside ESTIMATE_ERROR. One GPU
     runs one worker: the multi-worker paths (DDP, FSDP2, the sharded teacher) are tested on
     CPU workers in tests/jobs/test_parallel.py.
  0a. the same step with the student under FSDP2 (strategy fsdp: the launcher, NCCL, bf16 compute
     with fp32 gradient reduction, activation checkpointing) over a world of one: tokens/s
     against the unsharded run, and the plan's estimate against the measured peak (ESTIMATE_ERROR).
  0b. GPTQ of the ~1B model (fp32, built from config) through the quantize stage: llm-compressor's
     sequential pipeline onloads one layer at a time, so torch.cuda.max_memory_allocated must stay
     within the plan's per-GPU estimate (kondense.memory.quantize_plan, less the CUDA context,
     which is not allocated memory) and far below the whole model. GPTQ's "auto" batching would
     grow into whatever GPU memory is free; here it compresses one module at a time, as the
     plan counts. Exits 1 when the peak passes the estimate.
  1. bf16 logit-KD throughput: the distill stage (precision auto -> bf16 on CUDA) vs the same
     steps in fp32; tokens/s of each and the ratio
  2. bitsandbytes NF4 and int8 on CUDA: quantize, reload with device_map="auto", generate
  3. GPTQ W4A16 through llm-compressor on CUDA: quantize, reload, perplexity vs bf16; its speed
     timed in vLLM when vLLM is installed (exits 1 if another engine timed it)
Run: python benchmarks/gpu_check.py [--hidden 1024 --layers 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kondense.api import DatasetRef, DistillSpec, EvaluateSpec, InputRef, QuantizeSpec, Resources, StageRun, Storage
from kondense.events import Progress, parse_summary
from kondense.launch import stage_command
from kondense.store import FileStore
from kondense_jobs import distill, evaluate, quantize, tiny
from kondense_jobs.runtime import Context


# Targets, provisional until measured on the H200: see the README's GPU section.
MIN_MFU = 0.25
ESTIMATE_ERROR = 0.25
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


def stage(root: Path, kind: str, config, models: dict[str, Path | InputRef], dataset: Path, name: str) -> dict:
    refs = {k: v if isinstance(v, InputRef) else InputRef(uri=f"file://{v}") for k, v in models.items()}
    run = StageRun(
        pipeline="gpu", namespace="check", stage=name, stage_kind=kind, **{kind: config}, models=refs,
        dataset=DatasetRef(uri=f"file://{dataset}", eval_split=0.1), output=f"file://{root}/store/{name}",
        input_digest=f"sha256:{name}", storage=Storage(uri=f"file://{root}/store"), resources=Resources(gpus=1),
    )
    fn = {"distill": distill.run, "quantize": quantize.run, "evaluate": evaluate.run}[kind]
    summary = fn(Context(run, root / "work" / name, root / "cache", Progress(name, min_interval=30)))
    return {"uri": run.output, "digest": run.input_digest, "metrics": summary.metrics, "report": summary.report}


def launched(root: Path, config: DistillSpec, models: dict[str, Path], dataset: Path, name: str) -> dict:
    """A distill stage as a pod runs it (a subprocess, under the launcher when sharded): its metrics."""
    folder = root / name
    folder.mkdir()
    run = StageRun(
        pipeline="gpu", namespace="check", stage=name, stage_kind="distill", distill=config,
        models={k: InputRef(uri=f"file://{v}") for k, v in models.items()},
        dataset=DatasetRef(uri=f"file://{dataset}", eval_split=0.1), output=f"file://{root}/store/{name}",
        input_digest=f"sha256:{name}", storage=Storage(uri=f"file://{root}/store"), resources=Resources(gpus=1),
    )
    (folder / "stage.json").write_text(run.model_dump_json(by_alias=True, exclude_none=True))
    args = ["--spec", str(folder / "stage.json"), "--termination-log", str(folder / "t"), "--cache-dir", str(root / "cache")]
    proc = subprocess.run(stage_command("distill", args, run.resources, python=sys.executable, sharded=run.sharded),
                          capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    summary = parse_summary((folder / "t").read_text()) if (folder / "t").exists() else None
    if proc.returncode != 0 or summary is None:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    print(next((line for line in proc.stdout.splitlines() if "FSDP2:" in line), "no FSDP2 line"), flush=True)
    return summary.metrics


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}")
    root = Path(tempfile.mkdtemp(prefix="kondense-gpu-"))
    texts = tiny.corpus(max_docs=3000)
    tok = tiny.train_tokenizer(texts, vocab_size=8192)
    teacher = tiny.build_model(root / "teacher", tok, "llama", args.layers, args.hidden, 16, seed=1)
    student = tiny.build_model(root / "student", tok, "llama", args.layers // 2, args.hidden // 2, 8, seed=2)
    dataset = tiny.write_jsonl(root / "data.jsonl", [{"text": t} for t in texts])
    figures: dict[str, float] = {}
    failures: list[str] = []

    # 0. Real size: ~1B student, ~3B teacher, bf16, activation checkpointing.
    big_tok = tiny.train_tokenizer(texts, vocab_size=32000)
    t3 = tiny.build_model(root / "teacher-3b", big_tok, "llama", 28, 3072, 24, seed=1)
    s1 = tiny.build_model(root / "student-1b", big_tok, "llama", 16, 2048, 16, seed=2)
    from kondense_jobs.preflight import count_parameters

    p_t, p_s = count_parameters(t3), count_parameters(s1)
    seq, batch, steps = 2048, 4, 12
    cfg = DistillSpec(method="logits", max_steps=steps, batch_size=batch, max_seq_length=seq, precision="bf16",
                      gradient_checkpointing=True, learning_rate=1e-5, checkpoint_every=10_000)
    torch.cuda.reset_peak_memory_stats()
    m = stage(root, "distill", cfg, {"teacher": t3, "student": s1}, dataset, "kd-1b-3b")["metrics"]
    tokens_s = m["tokensPerSecond"]
    name = torch.cuda.get_device_name(0)
    peak = next((peak for gpu, peak in PEAK_BF16.items() if gpu in name), PEAK_BF16["H100"])
    # training the student: 6 FLOPs per parameter and token (+2 for the recomputed forward); the teacher's forward: 2
    flops_per_token = (6 + 2) * p_s + 2 * p_t
    mfu = tokens_s * flops_per_token / peak
    error = m["preflightGiB"] / m["peakMemoryGiB"] - 1
    figures |= {"student_parameters_B": p_s / 1e9, "teacher_parameters_B": p_t / 1e9, "kd_1b_3b_tokens_per_second": tokens_s,
                "kd_1b_3b_mfu": mfu, "plan_estimate_GiB": m["preflightGiB"], "measured_peak_GiB": m["peakMemoryGiB"],
                "estimate_error": error}
    if mfu < MIN_MFU:
        failures.append(f"MFU {mfu:.2f} < {MIN_MFU}")
    if abs(error) > ESTIMATE_ERROR:
        failures.append(f"estimate {m['preflightGiB']:.1f} GiB vs measured {m['peakMemoryGiB']:.1f} GiB: {error:+.0%}")

    # 0a. The same step, the student sharded by FSDP2 (a world of one, under the launcher).
    torch.cuda.empty_cache()
    f = launched(root, cfg.model_copy(update={"strategy": "fsdp"}), {"teacher": t3, "student": s1}, dataset, "kd-1b-3b-fsdp")
    fsdp_error = f["preflightGiB"] / f["peakMemoryGiB"] - 1
    figures |= {"kd_1b_3b_fsdp_tokens_per_second": f["tokensPerSecond"],
                "kd_1b_3b_fsdp_mfu": f["tokensPerSecond"] * flops_per_token / peak,
                "fsdp_over_unsharded": f["tokensPerSecond"] / tokens_s, "fsdp_plan_estimate_GiB": f["preflightGiB"],
                "fsdp_measured_peak_GiB": f["peakMemoryGiB"], "fsdp_estimate_error": fsdp_error}
    if abs(fsdp_error) > ESTIMATE_ERROR:
        failures.append(f"fsdp: estimate {f['preflightGiB']:.1f} GiB vs measured {f['peakMemoryGiB']:.1f} GiB: {fsdp_error:+.0%}")

    # 0b. GPTQ of the ~1B model: one layer on the GPU, the model and the offloaded activations in host memory.
    from llmcompressor.modifiers.gptq import helpers as gptq_helpers

    from kondense import memory
    from kondense_jobs.preflight import shape_of

    qspec = QuantizeSpec(method="gptq", bits=4, group_size=128, calibration_samples=64, calibration_seq_length=2048)
    plan = memory.quantize_plan(qspec, Resources(gpus=1), shape_of(s1, "model"))
    allocatable = (sum(plan.parts.values()) - plan.parts["runtime"]) * memory.FRAGMENTATION / memory.GIB
    batching = gptq_helpers.max_batch_size
    gptq_helpers.max_batch_size = lambda *args, **kwargs: 1  # the plan's count: one module compressed at a time
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        q = stage(root, "quantize", qspec, {"model": s1}, dataset, "gptq-1b")["metrics"]
    finally:
        gptq_helpers.max_batch_size = batching
    peak = torch.cuda.max_memory_allocated() / memory.GIB
    whole = p_s * 4 / memory.GIB
    figures |= {"gptq_1b_plan_GiB": allocatable, "gptq_1b_measured_peak_GiB": peak, "gptq_1b_whole_model_GiB": whole,
                "gptq_1b_peak_over_plan": peak / allocatable, "gptq_1b_preflight_GiB": q["preflightGiB"]}
    if peak > allocatable:
        failures.append(f"gptq 1B: peak {peak:.2f} GiB on the GPU passes the plan's {allocatable:.2f} GiB")
    if peak > whole / 2:
        failures.append(f"gptq 1B: peak {peak:.2f} GiB is not layer by layer (whole model {whole:.2f} GiB)")

    for precision in ("fp32", "bf16"):
        cfg = DistillSpec(method="logits", max_steps=args.steps, batch_size=16, max_seq_length=512, precision=precision,
                          learning_rate=1e-4, checkpoint_every=10_000)
        out = stage(root, "distill", cfg, {"teacher": teacher, "student": student}, dataset, f"kd-{precision}")
        figures[f"kd_{precision}_tokens_per_second"] = out["metrics"]["tokensPerSecond"]
    figures["bf16_over_fp32"] = figures["kd_bf16_tokens_per_second"] / figures["kd_fp32_tokens_per_second"]

    published = FileStore().publish(student, f"file://{root}/store/base", stage="base", stage_kind="distill",
                                    input_digest="sha256:base")
    base = InputRef(uri=f"file://{root}/store/base", stage="base", input_digest=published.input_digest)
    variants: dict[str, InputRef] = {"base": base}
    for name, cfg in {
        "nf4": QuantizeSpec(method="bnb-nf4", compute_dtype="bfloat16"),
        "int8": QuantizeSpec(method="bnb-int8"),
        "gptq": QuantizeSpec(method="gptq", bits=4, group_size=128, calibration_samples=64),
    }.items():
        started = time.perf_counter()
        out = stage(root, "quantize", cfg, {"model": base}, dataset, name)
        figures[f"{name}_seconds"] = time.perf_counter() - started
        variants[name] = InputRef(uri=out["uri"], stage=name, input_digest=out["digest"])
    report = stage(root, "evaluate", EvaluateSpec(of=list(variants), baseline="base", seq_length=512), variants, dataset, "eval")["report"]
    for row in report.table:
        figures[f"{row.variant}_perplexity"] = row.perplexity
        figures[f"{row.variant}_tokens_per_second"] = row.tokens_per_second  # decode at batch 1
        figures[f"{row.variant}_batch{row.batch}_tokens_per_second"] = row.batch_tokens_per_second
        figures[f"{row.variant}_peak_memory_GiB"] = (row.memory_bytes or 0) / 2**30
        print(f"{row.variant}: timed by {row.engine}", flush=True)
    gptq_engine = next(r.engine for r in report.table if r.variant == "gptq")
    if importlib.util.find_spec("vllm") is not None and gptq_engine != "vllm (cuda)":
        failures.append(f"gptq: vLLM is installed, yet {gptq_engine} timed the compressed-tensors variant")
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}, indent=2))
    for f in failures:
        print(f"BELOW TARGET: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

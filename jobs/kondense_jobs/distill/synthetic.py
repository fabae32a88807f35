"""synthetic: the teacher completes the prompts, then the student is fine-tuned on its completions.

Prompts come from `data.prompts`: a chat conversation up to its last user turn through the
tokenizer's chat template (with its generation prompt; a trailing assistant turn is dropped, the
teacher writes it), else the prompt field, else the first promptTokens tokens of the text.

Generation at scale, resumable. The prompts are cut into chunks of generationChunk; within a
chunk worker r completes prompts r, r + workers, ...; rank 0 gathers the chunk and commits it to
the store (records.jsonl, then the chunk's manifest with the run's input digest) under
`<checkpoints>/synthetic/chunks/NNNNN` before the next chunk starts. A restarted stage reuses
every committed chunk and regenerates at most the one it was killed in; training starts only
after the last chunk is committed, so it reads committed records only. Each chunk samples with
its own seed (seed + chunk x workers + rank), so a regenerated chunk is the one that was lost.

Engines: vLLM (`vllm.LLM`, tensor parallel over the pod's GPUs) when `import vllm` succeeds, a
GPU is present and the stage runs one worker per pod (vLLM's tensor parallelism wants the pod's
GPUs in one process); else transformers `generate` in left-padded batches whose size comes from
memory (`generation_batch`: the KV cache and logits of one sequence against the free memory),
not from the training batchSize. The log says which engine generated, and why.

Then `trl.SFTTrainer` / `trl.SFTConfig` with `completion_only_loss=True` trains the student on
prompt/completion records (chat prompts keep their template's text, special tokens included).
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import logging
import math
from pathlib import Path

from kondense import memory
from kondense.errors import InvalidInput
from kondense.store import join

from kondense_jobs import data
from kondense_jobs.chunks import Chunks, chunk_dir
from kondense_jobs.distill.setup import Built, Inputs, _config, load_student, load_teacher, training_args
from kondense_jobs.parallel import World
from kondense_jobs.runtime import Context, require

log = logging.getLogger("kondense_jobs.distill")

SYNTHETIC = "synthetic"  # folder beside the step-<N> checkpoints holding the committed chunks of records
RECORDS = "records.jsonl"
MAX_GENERATION_BATCH = 256  # beyond this a bigger batch buys little throughput and risks a long padded tail
MEMORY_FRACTION = 0.5  # of the free memory, for the generation batch: the rest covers allocator slack and spikes


# ---------------------------------------------------------------------------------------------
# The batch size, from memory
# ---------------------------------------------------------------------------------------------


def sequence_bytes(shape: memory.Shape, head_dim: int, prompt_tokens: int, new_tokens: int, dtype_bytes: int) -> int:
    """Memory one sequence of a generation batch needs, beside the weights.

    KV cache: 2 (keys, values) x layers x kv_heads x head_dim x (prompt + new tokens) x dtype bytes;
    next-token logits: vocab x (dtype + 4) bytes (generate takes them in fp32); the prefill's
    transient activations of one layer: prompt x (4 x hidden + 3 x intermediate) x dtype bytes.
    """
    tokens = prompt_tokens + new_tokens
    kv = 2 * shape.layers * shape.kv_heads * head_dim * tokens * dtype_bytes
    logits = shape.vocab * (dtype_bytes + 4)
    prefill = prompt_tokens * (4 * shape.hidden + 3 * shape.intermediate) * dtype_bytes
    return kv + logits + prefill


def generation_batch(per_sequence: int, free_bytes: float, fraction: float = MEMORY_FRACTION, cap: int = MAX_GENERATION_BATCH) -> int:
    """Sequences per generate call: `fraction` of the free memory over one sequence's need, in [1, cap]."""
    return max(1, min(cap, int(free_bytes * fraction // per_sequence)))


def free_memory(world: World) -> float:
    """Bytes this worker may use: the GPU's free memory, else the host's available memory over the node's workers."""
    torch = require("torch", "distillation")
    if torch.cuda.is_available():
        return float(torch.cuda.mem_get_info(world.device())[0])
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024 / world.local_size


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


def choose_engine(world: World) -> tuple[str, str]:
    """("vllm" or "transformers", why)."""
    torch = require("torch", "distillation")
    if importlib.util.find_spec("vllm") is None:
        return "transformers", "vllm is not installed (pip install 'kondense[vllm]' on GPU nodes)"
    if not torch.cuda.is_available():
        return "transformers", "no CUDA device (vLLM runs on GPUs)"
    if world.size > 1:
        return "transformers", f"{world.size} workers: vLLM takes the pod's GPUs in one process (workers: 1 to use it)"
    return "vllm", f"tensor parallel over {torch.cuda.device_count()} GPU(s)"


class TransformersEngine:
    """The teacher's `generate` in left-padded batches sized from memory."""

    name = "transformers"

    def __init__(self, job: Inputs, max_prompt: int):
        self.job, self.spec, self.tokenizer = job, job.spec, job.tokenizer
        self.teacher = load_teacher(job)
        cfg = _config(job.teacher_dir)
        shape = memory.Shape.from_config(cfg, "teacher")
        head_dim = int(cfg.get("head_dim") or shape.hidden // shape.heads)
        dtype_bytes = 2 if job.precision in ("bf16", "fp16") else 4
        per_sequence = sequence_bytes(shape, head_dim, max_prompt, self.spec.max_new_tokens, dtype_bytes)
        free = free_memory(job.world)
        self.batch = generation_batch(per_sequence, free)
        log.info(
            "Generation batch %d: %.2f MiB per sequence (%d prompt + %d new tokens) against %.2f GiB free x %.2f, at most %d",
            self.batch, per_sequence / 2**20, max_prompt, self.spec.max_new_tokens, free / memory.GIB,
            MEMORY_FRACTION, MAX_GENERATION_BATCH,
        )

    def generate(self, prompts: list[list[int]], seed: int) -> list[str]:
        torch = require("torch", "distillation")
        require("transformers", "distillation").set_seed(seed)
        spec, tokenizer = self.spec, self.tokenizer
        sampling = (
            {"do_sample": True, "temperature": spec.generation_temperature, "top_p": spec.top_p}
            if spec.generation_temperature > 0
            else {"do_sample": False}
        )
        out: list[str] = []
        tokenizer.padding_side = "left"
        try:
            for i in range(0, len(prompts), self.batch):
                batch = tokenizer.pad({"input_ids": prompts[i : i + self.batch]}, padding=True, return_tensors="pt")
                batch = batch.to(self.teacher.device)
                with torch.inference_mode():
                    seqs = self.teacher.generate(
                        **batch, max_new_tokens=spec.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
                    )
                out += tokenizer.batch_decode(seqs[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        finally:
            tokenizer.padding_side = "right"
        return out

    def close(self) -> None:
        torch = require("torch", "distillation")
        del self.teacher
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class VllmEngine:
    """vllm.LLM over the pod's GPUs; it schedules its own batches within its KV-cache budget."""

    name = "vllm"

    def __init__(self, job: Inputs):
        torch = require("torch", "distillation")
        self.vllm = importlib.import_module("vllm")
        self.spec = job.spec
        dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(job.precision, "float32")
        self.llm = self.vllm.LLM(
            model=str(job.teacher_dir), dtype=dtype, tensor_parallel_size=torch.cuda.device_count(), seed=job.spec.seed,
        )

    def generate(self, prompts: list[list[int]], seed: int) -> list[str]:
        spec = self.spec
        greedy = spec.generation_temperature == 0  # vLLM: temperature 0 is greedy
        params = self.vllm.SamplingParams(
            temperature=spec.generation_temperature, top_p=1.0 if greedy else spec.top_p,
            max_tokens=spec.max_new_tokens, seed=seed,
        )
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]

    def close(self) -> None:
        torch = require("torch", "distillation")
        del self.llm  # its engine process ends with it, and the GPUs' memory goes back to the student
        gc.collect()
        torch.cuda.empty_cache()


def start_engine(job: Inputs, max_prompt: int):
    name, why = choose_engine(job.world)
    if name == "vllm":
        log.info("Teacher generating with vLLM: %s", why)
        return VllmEngine(job)
    log.info("Teacher generating with transformers generate: %s", why)
    return TransformersEngine(job, max_prompt)


# ---------------------------------------------------------------------------------------------
# Chunks of records
# ---------------------------------------------------------------------------------------------


def tokenized_prompts(records: list[dict], ref, tokenizer, max_prompt: int) -> tuple[list[str], list[list[int]]]:
    """The prompts' text and ids, each cut to its last max_prompt tokens. A chat prompt is template
    text (its special tokens written out); a plain one is stripped of trailing blanks, which would
    merge with the completion's first token and blur the prompt/completion boundary."""
    texts, ids = [], []
    for r, p in zip(records, data.prompts(records, ref, tokenizer)):
        chat = data.is_chat(r, ref)
        p = p if chat else p.rstrip()
        texts.append(p)
        ids.append(tokenizer(p, add_special_tokens=not chat)["input_ids"][-max_prompt:])
    return texts, ids


def records(ctx: Context, job: Inputs) -> tuple[list[dict], dict[str, float]]:
    """prompt/completion records, every one from a committed chunk: reused where an earlier attempt
    committed it, else generated now and committed chunk by chunk."""
    spec, run, world = job.spec, ctx.run, job.world
    sources = job.split.train
    if spec.max_steps:  # generate what the steps consume, not the whole split
        sources = sources[: spec.max_steps * spec.global_batch(world.size)]
    max_prompt = max(job.seq // 2, job.seq - spec.max_new_tokens)
    texts, ids = tokenized_prompts(sources, run.dataset, job.tokenizer, max_prompt)
    size = spec.generation_chunk
    n_chunks = math.ceil(len(texts) / size)
    chunks = Chunks(ctx, join(ctx.checkpoint_uri(), SYNTHETIC), {RECORDS}, "synthetic-chunk")
    # rank 0's view of what is committed, for every worker: they must skip the same chunks
    done = world.gather(sorted(i for i in range(n_chunks) if chunks.committed(i)) if world.is_main else None)[0]
    found: dict[int, list[dict]] = {}
    with world.local_main_first():  # the node's workers share the work dir: one fetch
        for i in done:
            folder = ctx.work_dir / SYNTHETIC / chunk_dir(i)
            if world.is_local_main:
                ctx.store.fetch(chunks.uri(i), folder, expect_input_digest=run.input_digest)
    for i in done:
        found[i] = read_records(ctx.work_dir / SYNTHETIC / chunk_dir(i) / RECORDS)
    reused = sum(len(texts[i * size : (i + 1) * size]) for i in done)
    log.info(
        "Synthetic data: %d prompts in %d chunks of %d, up to %d new tokens each; %d chunks (%d prompts) already committed",
        len(texts), n_chunks, size, spec.max_new_tokens, len(done), reused,
    )

    generated = 0
    ctx.progress.update(reused, len(texts), phase="prompts", force=True)
    if len(done) < n_chunks:
        engine = start_engine(job, max_prompt)
        for i in range(n_chunks):
            if i in found:
                continue
            part = slice(i * size, (i + 1) * size)
            log.info("Chunk %d/%d: generating %d prompts", i + 1, n_chunks, len(texts[part]))
            mine = engine.generate(ids[part][world.rank :: world.size], seed=spec.seed + i * world.size + world.rank)
            completions: list[str | None] = [None] * len(texts[part])
            for rank, theirs in enumerate(world.gather(mine)):  # worker r completed prompts r, r + size, ...
                completions[rank :: world.size] = theirs
            found[i] = [{"prompt": p, "completion": c} for p, c in zip(texts[part], completions) if c.strip()]
            if world.is_main:
                commit(ctx, chunks, i, found[i], len(texts[part]))
            world.barrier()  # committed before any worker moves on
            generated += len(texts[part])
            ctx.progress.update(reused + generated, len(texts), phase="prompts", force=True)
        engine.close()
    out = [r for i in range(n_chunks) for r in found[i]]
    if not out:
        raise InvalidInput("synthetic: the teacher generated only empty completions; raise maxNewTokens or check the teacher")
    metrics = {"promptsGenerated": float(generated), "promptsReused": float(reused), "generationChunks": float(n_chunks)}
    return out, metrics


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def commit(ctx: Context, chunks: Chunks, index: int, found: list[dict], prompts: int) -> None:
    folder = ctx.work_dir / SYNTHETIC / chunk_dir(index)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECORDS).write_text("".join(json.dumps(r) + "\n" for r in found), encoding="utf-8")
    chunks.commit(index, folder, {"prompts": float(prompts), "records": float(len(found))})


def build(ctx: Context, job: Inputs) -> Built:
    datasets = require("datasets", "synthetic distillation")
    trl = require("trl", "synthetic distillation")
    found, metrics = records(ctx, job)
    args = training_args(
        trl.SFTConfig, job,
        max_length=job.seq, completion_only_loss=True, packing=False, include_num_input_tokens_seen="non_padding",
    )
    trainer = trl.SFTTrainer(
        model=load_student(job), args=args,
        train_dataset=datasets.Dataset.from_list(found), processing_class=job.tokenizer,
    )
    return Built(
        trainer, f"SFT on {len(found)} teacher completions (trl.SFTTrainer)", None,
        {"syntheticSamples": float(len(found)), **metrics},
    )

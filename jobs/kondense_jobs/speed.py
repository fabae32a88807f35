"""Speed and memory, measured the same way for every variant and every engine.

Every variant generates from the same token ids: `rows` prompts of `prompt_tokens` ids cut from
the held-out split (ids, not text, so no tokenizer can make them differ), greedily, exactly
`new_tokens` per row (EOS does not stop it), by one loop written once per engine:

    prefill   one pass over the rows' prompts that yields each row's first new token
    decode    new_tokens - 1 steps of one token per row through the KV cache

    prefill tokens/s = rows x prompt_tokens / prefill seconds
    decode tokens/s  = rows x (new_tokens - 1) / decode seconds

at batch 1 and at the larger batch, each once untimed first (allocations, kernel selection) and
then timed. Only the last position's logits are computed in the prefill, as generate() does.

Memory is the peak a variant takes while it generates, above what the process held before the
variant was loaded; the larger batch sets it (its KV cache and activations), so it is the same
kind of number for every engine, and the file size is a column of its own:

    host (CPU)          the resident set's high-water mark (VmHWM), reset through
                        /proc/self/clear_refs once the model is loaded, so the loading's transient
                        copies are not counted; memory-mapped weights (llama.cpp) count as they are
                        touched, as the kernel counts them
    torch on CUDA       torch.cuda.max_memory_allocated, reset once the model is loaded
    llama.cpp on CUDA   the device memory in use (cudaMemGetInfo) while its context is alive:
                        llama.cpp allocates its weights, KV cache and compute buffers up front

On a GPU, GGUF variants run with every layer offloaded (when the llama.cpp build can offload),
and compressed-tensors variants (GPTQ, what vLLM serves them from) are timed in vLLM when it is
installed: its `generate` runs prefill and decode in one call, so the prefill is timed as a
generation of one token and the decode as the rest of a generation of new_tokens (prefix caching
off, so that the second call computes the prompt again). vLLM takes its KV cache up front; it is
given exactly what the larger batch needs (kv_cache_memory_bytes, `vllm_kv_bytes`), so that its
device memory in use (weights, that cache, CUDA graphs and buffers) compares with the others'
peaks. Each row of the report names the engine that timed it.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from kondense.errors import InvalidInput

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Timing:
    batch: int
    prefill_tokens_per_second: float
    decode_tokens_per_second: float | None  # None with new_tokens 1: there is no decode step


@dataclass
class Speed:
    engine: str  # "transformers (cpu)", "llama.cpp (cuda, all layers)", ...
    timings: list[Timing]
    peak_memory_bytes: int | None
    memory_note: str | None = None  # why the peak is n/a, or what it leaves out
    generated: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # batch -> (rows, new_tokens) ids

    def at(self, batch: int) -> Timing | None:
        return next((t for t in self.timings if t.batch == batch), None)


def prompts(stream, prompt_tokens: int, rows: int) -> np.ndarray:
    """(rows, prompt_tokens) int64: consecutive pieces of the held-out stream (repeated when it is short)."""
    pieces = len(stream) // prompt_tokens
    if pieces < 1:
        raise InvalidInput(
            f"the held-out split has {len(stream)} tokens, fewer than a {prompt_tokens}-token prompt. "
            "To resolve, lower dataset.promptTokens or raise dataset.evalSplit."
        )
    cut = np.asarray(stream[: pieces * prompt_tokens], dtype=np.int64).reshape(pieces, prompt_tokens)
    return cut[np.arange(rows) % pieces]


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        found = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def _trim() -> None:
    """Give freed heap back to the system (glibc), so that the next baseline is not inflated."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Footprint:
    """A model's peak memory while it generates (see the module's docstring): before_load(), then
    loaded() once it is in memory, then sample() while an engine that allocates outside torch is
    alive, then peak()."""

    def __init__(self, where: str):
        assert where in ("host", "torch-cuda", "device"), where
        self.where = where
        self.base: int | None = None
        self.highest = 0
        self.note: str | None = None

    def before_load(self) -> None:
        _trim()
        if self.where == "host":
            rss = _status_kib("VmRSS")
            self.base = None if rss is None else rss * 1024
            if rss is None:
                self.note = "memory n/a: /proc/self/status is not readable here"
        elif self.where == "torch-cuda":
            import torch

            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
        else:
            import torch

            self.base = self._device_used(torch)

    def loaded(self) -> None:
        """Forget the peaks of loading (and of anything measured since): only generating counts."""
        _trim()
        if self.where == "host":
            try:
                CLEAR_REFS.write_text("5")  # resets VmHWM to the current resident set
            except OSError as e:
                self.note = f"includes loading: the peak could not be reset ({e.strerror})"
        elif self.where == "torch-cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def sample(self) -> None:
        if self.where == "device" and self.base is not None:
            import torch

            self.highest = max(self.highest, self._device_used(torch) - self.base)

    def peak(self) -> int | None:
        if self.base is None:
            return None
        if self.where == "host":
            hwm = _status_kib("VmHWM")
            return None if hwm is None else max(0, hwm * 1024 - self.base)
        if self.where == "torch-cuda":
            import torch

            return max(0, torch.cuda.max_memory_allocated() - self.base)
        self.sample()
        return self.highest

    @staticmethod
    def _device_used(torch) -> int:
        free, total = torch.cuda.mem_get_info()
        return total - free


# --------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------


def warm_up(quantizers: set[str] = frozenset()) -> None:
    """Pay the process's one-time costs before any variant's footprint starts, so that none is
    charged to the first variant measured: the quantization libraries the variants load with
    (bitsandbytes, compressed_tensors: imported on their first load), and a first generation
    (transformers' lazily imported modules, torch's thread pools and kernel caches), run on a
    tiny Llama built here."""
    import importlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    for name in quantizers:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    rows = np.arange(32, dtype=np.int64).reshape(2, 16)
    hf(model.to("cuda") if torch.cuda.is_available() else model, rows, 4, [1, 2], Footprint("host"))
    del model
    _trim()


def hf(model, prompt_rows: np.ndarray, new_tokens: int, batches: list[int], footprint: Footprint) -> Speed:
    """Time `model` (loaded; footprint.before_load() was called before it was) at each batch size."""
    import inspect

    import torch

    device = model.device
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(rows: np.ndarray, n: int) -> tuple[float, float, np.ndarray]:
        ids = torch.from_numpy(rows).to(device)
        extra = {"logits_to_keep": 1} if keep_last else {}
        with torch.inference_mode():
            sync()
            start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, **extra)
            tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
            sync()
            prefilled = time.perf_counter()
            cache = out.past_key_values
            for _ in range(n - 1):
                out = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
            sync()
            done = time.perf_counter()
        return prefilled - start, done - prefilled, torch.cat(tokens, dim=1).cpu().numpy()

    footprint.loaded()
    timed = Speed(f"transformers ({device.type})", [], None)
    for b in batches:
        _timed(timed, run, prompt_rows, b, new_tokens)
    timed.peak_memory_bytes, timed.memory_note = footprint.peak(), footprint.note
    return timed


def _timed(timed: Speed, run, prompt_rows: np.ndarray, batch: int, new_tokens: int) -> None:
    """Warm up at this batch size (untimed), then time it into `timed`."""
    rows = prompt_rows[:batch]
    run(rows, min(new_tokens, 2))
    prefill, decode, generated = run(rows, new_tokens)
    timed.timings.append(
        Timing(
            batch=batch,
            prefill_tokens_per_second=rows.size / prefill,
            decode_tokens_per_second=batch * (new_tokens - 1) / decode if new_tokens > 1 else None,
        )
    )
    timed.generated[batch] = generated


# --------------------------------------------------------------------------------------------
# llama.cpp
# --------------------------------------------------------------------------------------------


def llama_cpp(gguf_path: Path, prompt_rows: np.ndarray, new_tokens: int, batches: list[int]) -> Speed:
    """Time a GGUF file with llama.cpp's own batch API (one sequence per row, as llama-server
    serves parallel requests), every layer offloaded when a GPU is present and the build can."""
    import logging

    from kondense_jobs.gguf import library
    from kondense_jobs.runtime import cpu_budget

    lib = library()
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its log callback prints every load line
    threads = cpu_budget()
    offload = _cuda() and bool(lib.llama_supports_gpu_offload())
    footprint = Footprint("device" if offload else "host")
    footprint.before_load()
    params = lib.llama_model_default_params()
    params.n_gpu_layers = -1 if offload else 0
    model = lib.llama_model_load_from_file(str(gguf_path).encode(), params)
    if not model:
        raise InvalidInput(f"llama.cpp cannot load {Path(gguf_path).name}")
    try:
        n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        if prompt_rows.max() >= n_vocab:
            raise InvalidInput(
                f"prompt token ids reach {int(prompt_rows.max())}, outside {Path(gguf_path).name}'s vocabulary of {n_vocab}"
            )
        footprint.loaded()
        timed = Speed("llama.cpp (cuda, all layers)" if offload else "llama.cpp (cpu)", [], None)
        for b in batches:
            with _context(lib, model, b, prompt_rows.shape[1] + new_tokens, threads) as ctx:

                def run(rows: np.ndarray, n: int, ctx=ctx) -> tuple[float, float, np.ndarray]:
                    lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
                    return _generate(lib, ctx, rows, n, n_vocab)

                _timed(timed, run, prompt_rows, b, new_tokens)
                footprint.sample()
        timed.peak_memory_bytes, timed.memory_note = footprint.peak(), footprint.note
    finally:
        lib.llama_model_free(model)
    if _cuda() and not offload:
        timed.memory_note = "this llama.cpp build cannot offload to the GPU: timed on the CPU"
    return timed


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@contextlib.contextmanager
def _context(lib, model, rows: int, length: int, threads: int):
    """A context of `rows` sequences of `length` tokens each, logits only where asked."""
    params = lib.llama_context_default_params()
    params.n_ctx = rows * length
    params.n_batch = max(rows * length, 1)
    params.n_seq_max = rows
    params.n_threads = params.n_threads_batch = threads
    params.no_perf = True
    ctx = lib.llama_init_from_model(model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context of {rows} x {length} tokens")
    try:
        yield ctx
    finally:
        lib.llama_free(ctx)


def _generate(lib, ctx, rows: np.ndarray, n: int, n_vocab: int) -> tuple[float, float, np.ndarray]:
    """Greedy: the prompts of every row in one batch, then n - 1 batches of one token per row:
    (prefill seconds, decode seconds, the generated ids (rows, n))."""
    batch_rows, length = rows.shape
    batch = lib.llama_batch_init(batch_rows * length, 0, 1)
    try:

        def decode(tokens: list[tuple[int, int, int, bool]]) -> list[int]:
            for k, (token, pos, seq, wanted) in enumerate(tokens):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = token, pos, 1
                batch.seq_id[k][0], batch.logits[k] = seq, wanted
            batch.n_tokens = len(tokens)
            if (rc := lib.llama_decode(ctx, batch)) != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            picked = []
            for k, (*_, wanted) in enumerate(tokens):
                if wanted:
                    logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, k), shape=(n_vocab,))
                    picked.append(int(logits.argmax()))
            return picked

        start = time.perf_counter()
        generated = [decode([(int(t), i, s, i == length - 1) for s in range(batch_rows) for i, t in enumerate(rows[s])])]
        prefilled = time.perf_counter()
        for step in range(n - 1):
            generated.append(decode([(generated[-1][s], length + step, s, True) for s in range(batch_rows)]))
        done = time.perf_counter()
    finally:
        lib.llama_batch_free(batch)
    return prefilled - start, done - prefilled, np.array(generated, dtype=np.int64).T


# --------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------

VLLM_BLOCK = 16  # tokens per KV-cache block (vLLM's default block size)


def vllm_applies(model_dir: Path) -> str | None:
    """Why vLLM times this variant, or None: a compressed-tensors checkpoint, vLLM installed, a GPU."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method != "compressed-tensors" or importlib.util.find_spec("vllm") is None or not _cuda():
        return None
    return "a compressed-tensors checkpoint, served by vLLM"


def vllm_kv_bytes(config: dict, rows: int, tokens: int) -> int:
    """The KV cache `rows` sequences of `tokens` tokens take in vLLM: keys and values of every layer,
    in whole blocks per sequence, in the checkpoint's dtype (what dtype="auto" runs in)."""
    from kondense.memory import DTYPE_BYTES, Shape

    shape = Shape.from_config(config)
    head_dim = int(config.get("text_config", config).get("head_dim") or shape.hidden // shape.heads)
    per_token = 2 * shape.layers * shape.kv_heads * head_dim * int(DTYPE_BYTES[shape.dtype or "bf16"])
    return rows * math.ceil(tokens / VLLM_BLOCK) * VLLM_BLOCK * per_token


def vllm(model_dir: Path, prompt_rows: np.ndarray, new_tokens: int, batches: list[int]) -> Speed:
    """Time a checkpoint in vLLM at each batch size (see the module's docstring)."""
    import gc

    import torch

    engine = importlib.import_module("vllm")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    length = prompt_rows.shape[1] + new_tokens
    footprint = Footprint("device")
    footprint.before_load()
    llm = engine.LLM(
        model=str(model_dir), dtype="auto", seed=0, max_model_len=length, max_num_seqs=max(batches),
        enable_prefix_caching=False, kv_cache_memory_bytes=vllm_kv_bytes(config, max(batches), length),
    )
    try:
        footprint.sample()
        timed = _vllm_timed(engine, llm, prompt_rows, new_tokens, batches, footprint)
    finally:
        del llm  # its engine process ends with it, and the device memory goes back
        gc.collect()
        torch.cuda.empty_cache()
    return timed


def _vllm_timed(engine, llm, prompt_rows: np.ndarray, new_tokens: int, batches: list[int], footprint: Footprint) -> Speed:
    def generate(prompts: list[dict], n: int) -> list:
        params = engine.SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        return llm.generate(prompts, params, use_tqdm=False)

    def run(rows: np.ndarray, n: int) -> tuple[float, float, np.ndarray]:
        prompts = [{"prompt_token_ids": [int(t) for t in row]} for row in rows]
        start = time.perf_counter()
        generate(prompts, 1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        outputs = generate(prompts, n)
        whole = time.perf_counter() - start
        ids = np.array([list(o.outputs[0].token_ids) for o in outputs], dtype=np.int64)
        return prefill, max(whole - prefill, 1e-9), ids

    timed = Speed("vllm (cuda)", [], None)
    for b in batches:
        _timed(timed, run, prompt_rows, b, new_tokens)
        footprint.sample()
    timed.peak_memory_bytes = footprint.peak()
    timed.memory_note = "vLLM's device memory in use: weights, a KV cache sized for the larger batch, CUDA graphs"
    return timed

"""kondense_jobs.speed: every variant timed on the same prompts by the same greedy loop, and a
peak memory that counts what generating holds, not what loading held.

The GGUF side (llama.cpp's batch API generating what transformers generates) is in test_gguf.py,
next to the converted teacher it uses.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from kondense.errors import InvalidInput
from kondense_jobs import speed

MIB = 1 << 20


def test_prompts_are_the_same_ids_cut_from_the_stream_and_repeat_when_it_is_short():
    stream = np.arange(100, dtype=np.uint16)
    rows = speed.prompts(stream, 30, 5)
    assert rows.dtype == np.int64 and rows.shape == (5, 30)
    assert rows[:3].tolist() == [list(range(30)), list(range(30, 60)), list(range(60, 90))]
    assert rows[3].tolist() == rows[0].tolist() and rows[4].tolist() == rows[1].tolist()  # 3 pieces, cycled
    with pytest.raises(InvalidInput, match="fewer than a 101-token prompt.*dataset.promptTokens"):
        speed.prompts(stream, 101, 2)


def _touched(mib: int) -> np.ndarray:
    return np.ones(mib * MIB, dtype=np.uint8)  # every page written: resident


def test_host_peak_counts_what_is_held_and_made_while_generating_not_while_loading():
    footprint = speed.Footprint("host")
    footprint.before_load()
    weights = _touched(96)  # the model: stays resident
    loading = _touched(160)  # a loader's transient copy, freed before loaded()
    del loading
    footprint.loaded()
    cache = _touched(48)  # generating: a KV cache, freed before the peak is read
    del cache
    peak = footprint.peak()
    assert footprint.note is None
    # 96 + 48 MiB; the 160 MiB of loading would make it 256 if the high-water mark were not reset.
    assert 140 * MIB <= peak <= 150 * MIB, peak / MIB
    del weights


@pytest.mark.slow
def test_transformers_loop_is_greedy_generation_row_by_row_at_every_batch(tiny_teacher, argmax_steps):
    import torch
    from transformers import AutoModelForCausalLM

    footprint = speed.Footprint("host")
    footprint.before_load()
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    stream = np.random.default_rng(0).integers(5, model.config.vocab_size, 4000)
    rows = speed.prompts(stream, 24, 4)
    timed = speed.hf(model, rows, 6, [1, 4], footprint)

    assert timed.engine == "transformers (cpu)"
    assert [t.batch for t in timed.timings] == [1, 4]
    assert all(t.prefill_tokens_per_second > 0 and t.decode_tokens_per_second > 0 for t in timed.timings)
    expected = argmax_steps(tiny_teacher, rows, 6)
    assert timed.generated[4].tolist() == expected
    assert timed.generated[1].tolist() == expected[:1]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights <= timed.peak_memory_bytes < weights + 256 * MIB, (timed.peak_memory_bytes, weights)


_TWICE = """
import sys
from transformers import AutoModelForCausalLM
from kondense_jobs import speed
if sys.argv[2] == "warm":
    speed.warm_up()
rows = speed.prompts(list(range(1000)), 32, 8)
for _ in range(2):
    footprint = speed.Footprint("host")
    footprint.before_load()
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
    print(speed.hf(model, rows, 16, [1, 8], footprint).peak_memory_bytes)
    del model
"""


@pytest.mark.slow
def test_warm_up_charges_the_processs_one_time_costs_to_no_variant(tiny_teacher):
    """The same model measured first and again in a fresh process: without warm_up() the first carries
    the first generation's lazy imports and thread pools; with it, both peaks agree."""
    import subprocess
    import sys

    def twice(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", _TWICE, str(tiny_teacher), mode], capture_output=True, text=True, check=True)
        first, again = map(int, out.stdout.split()[-2:])
        return first, again

    cold_first, cold_again = twice("cold")
    warm_first, warm_again = twice("warm")
    assert cold_first - cold_again > 12 * MIB, (cold_first, cold_again)  # what warm_up removes
    assert abs(warm_first - warm_again) < 6 * MIB, (warm_first, warm_again)


def test_vllm_gets_a_kv_cache_of_whole_blocks_for_the_larger_batch():
    llama = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128, "vocab_size": 512,
             "dtype": "bfloat16"}
    per_token = 2 * 2 * 2 * 32 * 2  # keys and values x layers x kv heads x head_dim x bf16
    assert speed.vllm_kv_bytes(llama, rows=8, tokens=96) == 8 * 96 * per_token  # 6 whole blocks per sequence
    assert speed.vllm_kv_bytes(llama, rows=8, tokens=97) == 8 * 112 * per_token  # a 7th block for the 97th token
    assert speed.vllm_kv_bytes({**llama, "dtype": "float32"}, rows=1, tokens=16) == 16 * per_token * 2
    assert speed.vllm_kv_bytes({**llama, "head_dim": 64}, rows=1, tokens=16) == 16 * per_token * 2


@pytest.mark.parametrize(
    "method, vllm, cuda, applies",
    [("compressed-tensors", True, True, True), ("bitsandbytes", True, True, False),
     ("compressed-tensors", False, True, False), ("compressed-tensors", True, False, False), (None, True, True, False)],
)
def test_vllm_times_compressed_tensors_variants_where_it_is_installed_on_a_gpu(tmp_path, monkeypatch, method, vllm, cuda, applies):
    import json

    config = {"model_type": "llama"} | ({"quantization_config": {"quant_method": method}} if method else {})
    (tmp_path / "config.json").write_text(json.dumps(config))
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if vllm else None) if name == "vllm" else found(name, *a))
    monkeypatch.setattr(speed, "_cuda", lambda: cuda)
    assert bool(speed.vllm_applies(tmp_path)) is applies


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (kondense[vllm], GPU nodes)")
def test_vllm_loop_generates_what_transformers_does(tiny_teacher, argmax_steps):
    """On a GPU with vLLM installed only (never in CI): the tiny teacher timed in vLLM."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM runs on a GPU")
    rows = np.arange(3, 3 + 4 * 24, dtype=np.int64).reshape(4, 24) % 500
    timed = speed.vllm(tiny_teacher, rows, 6, [1, 4])
    assert timed.engine == "vllm (cuda)" and timed.peak_memory_bytes > 0
    assert [t.batch for t in timed.timings] == [1, 4] and all(t.decode_tokens_per_second > 0 for t in timed.timings)
    expected = argmax_steps(tiny_teacher, rows, 6)
    agree = np.mean(timed.generated[4] == np.array(expected))  # fp32 in both; kernels may break near-ties
    assert agree >= 0.9, (timed.generated[4], expected)

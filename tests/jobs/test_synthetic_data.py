"""Synthetic data at scale: the generation batch from memory, the engine choice, chat messages
through the tokenizer's chat template in all three methods (and their errors), and a synthetic
stage killed half-way through generation that resumes from its last committed chunk.

End-to-end tests run the real entrypoint (`python -m kondense_jobs distill`) on the tiny models of
conftest.py, given a chat template on the spot.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from kondense import memory
from kondense.api import DatasetRef, DistillSpec
from kondense.errors import InvalidInput
from kondense.events import parse_line
from kondense.store import FileStore
from kondense_jobs import data
from kondense_jobs.distill import gkd_records, synthetic
from kondense_jobs.parallel import World

FAST = dict(learning_rate=3e-3, batch_size=4, max_seq_length=64, checkpoint_every=1000, seed=0)
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
REF = DatasetRef(uri="file:///chat.jsonl")
CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What does os.path.join do?"},
        {"role": "assistant", "content": "It joins path components."},
    ]
}


# ---------------------------------------------------------------------------------------------
# The generation batch, from memory
# ---------------------------------------------------------------------------------------------

LLAMA_7B = memory.Shape(layers=32, hidden=4096, intermediate=11008, vocab=32000, heads=32, kv_heads=32, tied=False)


def test_sequence_bytes_is_kv_cache_logits_and_one_layers_prefill():
    # 512 prompt + 512 new tokens in bf16: KV 2 x 32 layers x 32 heads x 128 x 1024 tokens x 2 bytes = 512 MiB,
    # logits 32000 x (2 + 4) bytes, prefill 512 x (4 x 4096 + 3 x 11008) x 2 bytes.
    assert synthetic.sequence_bytes(LLAMA_7B, 128, 512, 512, 2) == 512 * 2**20 + 192_000 + 50_593_792
    gqa = memory.Shape(**{**LLAMA_7B.__dict__, "kv_heads": 8})  # grouped-query attention: a quarter of the cache
    assert synthetic.sequence_bytes(gqa, 128, 512, 512, 2) == 128 * 2**20 + 192_000 + 50_593_792


@pytest.mark.parametrize(
    "free_gib, expected",
    [
        pytest.param(80, 73, id="80GiB-GPU: 40 GiB usable / 560 MiB"),
        pytest.param(0.25, 1, id="too-little-memory: still one"),
        pytest.param(10_000, synthetic.MAX_GENERATION_BATCH, id="capped"),
    ],
)
def test_generation_batch_divides_half_the_free_memory(free_gib, expected):
    per_sequence = synthetic.sequence_bytes(LLAMA_7B, 128, 512, 512, 2)  # 560.4 MiB
    assert synthetic.generation_batch(per_sequence, free_gib * memory.GIB) == expected


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "installed, gpu, workers, engine",
    [
        pytest.param(False, True, 1, "transformers", id="vllm-missing"),
        pytest.param(True, False, 1, "transformers", id="no-gpu"),
        pytest.param(True, True, 2, "transformers", id="several-workers"),
        pytest.param(True, True, 1, "vllm", id="vllm"),
    ],
)
def test_vllm_only_when_installed_on_a_gpu_with_one_worker(monkeypatch, installed, gpu, workers, engine):
    import importlib.util

    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if installed else None) if name == "vllm" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4 if gpu else 0)
    name, why = synthetic.choose_engine(World(size=workers, local_size=workers))
    assert name == engine, why


def test_this_machine_generates_with_transformers():
    import torch

    if importlib_find("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are here: the vLLM path runs on GPU machines")
    assert synthetic.choose_engine(World())[0] == "transformers"


def importlib_find(name: str):
    import importlib.util

    return importlib.util.find_spec(name)


# ---------------------------------------------------------------------------------------------
# Chat messages, rendered with the tokenizer's chat template
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def test_logits_text_is_the_whole_conversation(chat_tokenizer):
    eos = chat_tokenizer.eos_token
    whole = f"<|system|>\nAnswer briefly.{eos}\n<|user|>\nWhat does os.path.join do?{eos}\n<|assistant|>\nIt joins path components.{eos}\n"
    assert data.texts([CONVERSATION, {"text": "plain"}], REF, chat_tokenizer) == [whole, "plain"]


def test_synthetic_prompt_ends_at_the_last_user_turn_with_the_generation_prompt(chat_tokenizer):
    eos = chat_tokenizer.eos_token
    texts, ids = synthetic.tokenized_prompts([CONVERSATION, {"text": "Return the number  "}], REF, chat_tokenizer, 200)
    prompt = f"<|system|>\nAnswer briefly.{eos}\n<|user|>\nWhat does os.path.join do?{eos}\n<|assistant|>\n"
    assert texts == [prompt, "Return the number"]  # the assistant's turn dropped: the teacher writes it
    assert ids[0] == chat_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0].count(chat_tokenizer.eos_token_id) == 2  # the template's, as special tokens, none added
    # cut from the left: the generation prompt stays at the end
    assert synthetic.tokenized_prompts([CONVERSATION], REF, chat_tokenizer, 5)[1][0] == ids[0][-5:]


def test_gkd_prompt_is_the_templated_turns_and_the_completion_the_assistants_reply(chat_tokenizer):
    eos_id = chat_tokenizer.eos_token_id
    asked = {"messages": CONVERSATION["messages"][:2]}  # no reply: the student's own on-policy completions teach
    rec, open_ = gkd_records([CONVERSATION, asked], REF, chat_tokenizer, seq=128)
    prompt_ids = [t for t, m in zip(rec["input_ids"], rec["completion_mask"]) if m == 0]
    completion_ids = [t for t, m in zip(rec["input_ids"], rec["completion_mask"]) if m == 1]
    assert chat_tokenizer.decode(prompt_ids) == rec["prompt"] == data.prompts([CONVERSATION], REF, chat_tokenizer)[0]
    assert chat_tokenizer.decode(completion_ids) == f"It joins path components.{chat_tokenizer.eos_token}\n"
    assert completion_ids.count(eos_id) == 1
    assert open_["prompt"] == rec["prompt"] and sum(open_["completion_mask"]) == 1  # only an EOS to learn


def test_messages_without_a_chat_template_name_the_field_and_the_tokenizer(tiny_tokenizer, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert not tok.chat_template
    for render in (
        lambda: data.texts([CONVERSATION], REF, tok),
        lambda: data.prompts([CONVERSATION], REF, tok),
        lambda: gkd_records([CONVERSATION], REF, tok, seq=64),
    ):
        with pytest.raises(InvalidInput, match="has no chat template") as e:
            render()
        assert "'messages'" in str(e.value) and str(tiny_tokenizer_dir) in str(e.value) and "'text'" in str(e.value)


@pytest.mark.parametrize(
    "messages, says",
    [
        pytest.param("hello", "'messages' is not a non-empty list", id="a-string"),
        pytest.param([], "'messages' is not a non-empty list", id="empty"),
        pytest.param([{"role": "user"}], r"messages\[0\] is not a \{role, content\} pair", id="no-content"),
        pytest.param([{"role": "user", "content": ["a"]}], r"messages\[0\] is not", id="content-not-a-string"),
        pytest.param([{"role": "assistant", "content": "hi"}], "'messages' has no user turn", id="no-user-turn"),
    ],
)
def test_malformed_messages_name_the_record_and_the_field(messages, says):
    records = [{"text": "fine"}, CONVERSATION, {"messages": messages}]
    with pytest.raises(InvalidInput, match=f"^dataset: record 3: {says}"):
        data.split(records, REF)


def test_a_record_with_neither_text_nor_messages_is_refused():
    with pytest.raises(InvalidInput, match="record 2 has no string field 'text'.*'messages'"):
        data.split([CONVERSATION, {"other": 1}], REF)


def test_chat_records_split_like_text_records():
    records = [CONVERSATION] * 5 + [{"text": f"t{i}"} for i in range(15)]
    split = data.split(records, DatasetRef(uri="file:///x.jsonl", eval_split=0.25))
    assert len(split.train) == 15 and len(split.eval) == 5


# ---------------------------------------------------------------------------------------------
# The stage end to end
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory, tiny_teacher, tiny_student) -> tuple[Path, Path]:
    """The tiny teacher and student, their tokenizer given a chat template (an instruct pair)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat-models")
    out = []
    for src in (tiny_teacher, tiny_student):
        dst = shutil.copytree(src, root / src.name)
        tok = AutoTokenizer.from_pretrained(dst)
        tok.chat_template = TEMPLATE
        tok.save_pretrained(dst)
        out.append(dst)
    return out[0], out[1]


@pytest.fixture(scope="module")
def chat_dataset(tmp_path_factory, corpus_texts) -> Path:
    """Conversations: the user asks with a text's first words, the assistant answers with the rest."""
    from kondense_jobs.tiny import write_jsonl

    rows = []
    for t in corpus_texts[:200]:
        words = t.split()
        rows.append({"messages": [
            {"role": "user", "content": " ".join(words[:6])},
            {"role": "assistant", "content": " ".join(words[6:40]) or "."},
        ]})
    return write_jsonl(tmp_path_factory.mktemp("chat-data") / "chat.jsonl", rows)


def test_the_tokens_logits_train_on_are_the_whole_rendered_conversations(tmp_path, chat_tokenizer, chat_dataset):
    """The logits method (and teacherLogits, quantize, evaluate) read the tokens artifact: its train
    stream is the templated conversations, EOS-joined, exactly as data.texts renders them."""
    ref = DatasetRef(uri=f"file://{chat_dataset}", eval_split=0.1)
    meta = data.write_tokens(chat_dataset, ref, chat_tokenizer, tmp_path / "tokens")
    train = np.fromfile(tmp_path / "tokens" / "train.bin", dtype=meta["dtype"]).tolist()
    rendered = data.texts(data.load(chat_dataset, ref).train, ref, chat_tokenizer)
    assert rendered[0].startswith("<|user|>\n") and "<|assistant|>\n" in rendered[0]
    assert train == data.token_stream(chat_tokenizer, rendered)


def test_tokens_of_chat_records_without_a_chat_template_are_refused(tmp_path, tiny_tokenizer_dir, chat_dataset):
    from transformers import AutoTokenizer

    ref = DatasetRef(uri=f"file://{chat_dataset}", eval_split=0.1)
    with pytest.raises(InvalidInput, match="records hold chat messages in 'messages'.*has no chat template"):
        data.write_tokens(chat_dataset, ref, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), tmp_path / "tokens")
    assert not (tmp_path / "tokens" / data.TOKENS_META).exists()


def test_chat_records_without_a_chat_template_fail_the_stage_before_generating(
    tmp_path, make_run, run_stage, tiny_teacher, tiny_student, chat_dataset
):
    spec = DistillSpec(method="synthetic", max_steps=2, max_new_tokens=4, **FAST)
    run, path = make_run(tmp_path, "distill", spec, {"teacher": tiny_teacher, "student": tiny_student}, chat_dataset)
    code, summary, output = run_stage("distill", path, tmp_path)
    assert code == 11, output[-2000:]
    assert summary.reason == "InvalidInput"
    assert "records hold chat messages in 'messages'" in summary.message and "has no chat template" in summary.message
    assert "Chunk 1/" not in output, "generation started"
    assert not (FileStore.path(run.output) / "manifest.json").exists()
    assert not (FileStore.path(run.output + ".checkpoints") / synthetic.SYNTHETIC).exists()


@pytest.mark.slow
def test_a_killed_generation_resumes_from_its_last_committed_chunk(
    tmp_path, make_run, run_stage, kill_when_committed, chat_models, chat_dataset
):
    """16 chat prompts in 8 chunks of 2: SIGKILL once a chunk is committed, rerun. The prompts
    generated twice (those the killed attempt started plus those the rerun generated, beyond 16)
    are at most one chunk; every committed chunk is reused; the result trains and publishes."""
    teacher, student = chat_models
    spec = DistillSpec(method="synthetic", max_steps=4, max_new_tokens=24, generation_chunk=2, **FAST)
    total, size = 4 * 4, 2
    run, path = make_run(tmp_path, "distill", spec, {"teacher": teacher, "student": student}, chat_dataset)
    chunks = FileStore.path(run.output + ".checkpoints") / synthetic.SYNTHETIC / "chunks"

    committed = kill_when_committed(run, path, tmp_path, chunks, "*/manifest.json")
    assert 0 < len(committed) < total // size, "kill after some chunks, not all"
    first = (tmp_path / "first.log").read_text()
    started = sum(int(n) for n in re.findall(r"Chunk \d+/8: generating (\d+) prompts", first))
    records = [json.loads(line) for m in committed for line in (m.parent / synthetic.RECORDS).read_text().splitlines()]
    assert all(r["prompt"].startswith("<|user|>\n") and r["prompt"].endswith("<|assistant|>\n") for r in records)

    code, summary, output = run_stage("distill", path, tmp_path)
    assert code == 0, output[-3000:]
    m = summary.metrics
    assert m["promptsReused"] == size * len(committed)
    assert m["promptsGenerated"] + m["promptsReused"] == total
    twice = started + m["promptsGenerated"] - total
    assert 0 <= twice <= size, f"{twice} prompts generated twice"
    assert f"{len(committed)} chunks ({size * len(committed)} prompts) already committed" in output
    assert m["steps"] == spec.max_steps and m["finalLoss"] > 0
    prompts = [ev for line in output.splitlines() if (ev := parse_line(line)) and ev.get("phase") == "prompts"]
    assert prompts[0]["step"] == m["promptsReused"] and prompts[-1]["step"] == total == prompts[-1]["total"]
    assert (FileStore.path(run.output) / "manifest.json").exists()
    assert not FileStore.path(run.output + ".checkpoints").exists(), "the chunks outlived the published student"

"""The tokens artifact (kondense_jobs.data.tokens): the same windows and split as the list path,
content-addressed, reused across stages, never read half-written, uint16 or int32 by vocabulary.

Fast: the session's tiny tokenizer and dataset; no model is loaded.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from kondense.api import DatasetRef, QuantizeSpec
from kondense.store import MANIFEST, FileStore
from kondense_jobs import data
from kondense_jobs.runtime import Context

SEQ = 64


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def list_path(tiny_dataset, tokenizer):
    """Today's path: every record in memory, the streams as Python lists."""
    ref = DatasetRef(uri=f"file://{tiny_dataset}", eval_split=0.1)
    split = data.load(tiny_dataset, ref)
    return {part: data.token_stream(tokenizer, data.texts(getattr(split, part), ref, tokenizer)) for part in data.PARTS}


def context(make_run, tmp_path: Path, dataset: Path, stage: str = "quantize", cache: str = "cache", **ref) -> Context:
    dataset_ref = DatasetRef(uri=f"file://{dataset}", **{"eval_split": 0.1, **ref})
    run, _ = make_run(tmp_path, "quantize", QuantizeSpec(method="bnb-int8"), {}, stage=stage, dataset_ref=dataset_ref)
    return Context(run, tmp_path / f"work-{stage}", tmp_path / cache)


@pytest.fixture
def builds(monkeypatch) -> list[Path]:
    """The folders write_tokens tokenized into: one entry per build."""
    calls: list[Path] = []
    real = data.write_tokens

    def counted(dataset, ref, tokenizer, folder, digest=""):
        calls.append(folder)
        return real(dataset, ref, tokenizer, folder, digest)

    monkeypatch.setattr(data, "write_tokens", counted)
    return calls


def test_windows_are_views_equal_to_the_list_path(make_run, tmp_path, tiny_dataset, tokenizer, list_path):
    tokens = data.tokens(context(make_run, tmp_path, tiny_dataset), tokenizer)
    for part in data.PARTS:
        stream = getattr(tokens, part)
        assert isinstance(stream, np.memmap) and not stream.flags.writeable
        assert stream.tolist() == list_path[part], part
        rows = data.windows(stream, SEQ)
        assert np.shares_memory(rows, stream), "windows must be views of the memory map, not copies"
        assert rows.tolist() == data.windows(list_path[part], SEQ), part
        limited = data.windows(stream, SEQ, limit=5 * SEQ + 3)
        assert limited.tolist() == data.windows(list_path[part], SEQ, limit=5 * SEQ + 3)
    assert tokens.meta["train"]["tokens"] == len(list_path["train"])


@pytest.mark.parametrize(
    "count, seed, max_samples, eval_split",
    [(400, 0, None, 0.1), (1000, 7, None, 0.02), (1000, 3, 250, 0.2), (17, 12345, 5, 0.5)],
    ids=["tiny", "seeded", "capped", "small"],
)
def test_split_is_the_records_shuffle_of_before(count, seed, max_samples, eval_split):
    ref = DatasetRef(uri="file:///unused", seed=seed, max_samples=max_samples, eval_split=eval_split)
    order = list(range(count))  # the split as it was: a shuffled list of record numbers
    random.Random(seed).shuffle(order)
    order = order[:max_samples] if max_samples else order
    n_eval = max(1, round(len(order) * eval_split))
    train, held_out = data.split_order(count, ref)
    assert held_out.tolist() == order[:n_eval]
    assert train.tolist() == order[n_eval:]


def test_records_read_by_offset_are_load_records(tmp_path):
    """Blank and whitespace lines skipped, CRLF, a last line without newline, a folder of files."""
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b'{"text": "one"}\n\n   \n{"text": "two \\u00e9"}\r\n{"text": "three"}')
    (folder / "b.jsonl").write_bytes(b'\n{"text": "four", "n": 4}\n' + b'{"text": "%s"}\n' % (b"x" * 300))
    (folder / "manifest.json").write_text("{}")
    index = data.RecordIndex(folder)
    records = data.load_records(folder)
    assert len(index) == len(records) == 5
    assert index.read(np.array([4, 0, 3, 1, 2])) == [records[i] for i in (4, 0, 3, 1, 2)]


def test_a_second_stage_reuses_the_artifact(make_run, tmp_path, tiny_dataset, tokenizer, builds, caplog):
    caplog.set_level("INFO", logger="kondense_jobs")
    first = data.tokens(context(make_run, tmp_path, tiny_dataset, stage="gptq"), tokenizer)
    assert first.built and len(builds) == 1
    second = data.tokens(context(make_run, tmp_path, tiny_dataset, stage="eval", cache="cache-eval"), tokenizer)
    assert not second.built and len(builds) == 1, "the second stage tokenized the dataset again"
    assert second.folder == first.folder  # file:// store: read in place
    assert "Tokens: built" in caplog.text and "Tokens: reused" in caplog.text
    assert np.array_equal(second.train, first.train) and np.array_equal(second.eval, first.eval)


class RemoteFileStore(FileStore):
    """A file store that pretends to be remote: readers must fetch into their cache."""

    def local_path(self, uri: str):
        return None


def test_a_remote_artifact_is_fetched_once_into_the_cache(make_run, tmp_path, tiny_dataset, tokenizer, builds):
    ctx = context(make_run, tmp_path, tiny_dataset)
    ctx.__dict__["store"] = RemoteFileStore()
    built = data.tokens(ctx, tokenizer)
    assert built.built and built.folder == ctx.cache_dir / "tokens" / built.digest[7:19]
    other = context(make_run, tmp_path, tiny_dataset, stage="eval", cache="cache-eval")
    other.__dict__["store"] = RemoteFileStore()
    fetched = data.tokens(other, tokenizer)
    assert not fetched.built and len(builds) == 1
    assert fetched.folder == other.cache_dir / "tokens" / built.digest[7:19]
    assert (fetched.folder / MANIFEST).is_file() and not list(fetched.folder.parent.glob("*.partial-*"))
    assert np.array_equal(fetched.train, built.train)


def test_the_address_names_dataset_split_and_whole_tokenizer(tmp_path, tiny_dataset, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    ref = DatasetRef(uri=f"file://{tiny_dataset}", eval_split=0.1)
    base = data.address(tiny_dataset, ref, AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    same = data.address(tiny_dataset, ref.model_copy(update={"prompt_tokens": 8}), AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    assert same == base, "the prompt fields do not change the token stream"

    # the same vocabulary with a chat template: another serialization, another artifact
    templated = tmp_path / "templated"
    shutil.copytree(tiny_tokenizer_dir, templated)
    config = json.loads((templated / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (templated / "tokenizer_config.json").write_text(json.dumps(config))
    other = AutoTokenizer.from_pretrained(templated)
    assert other.get_vocab() == AutoTokenizer.from_pretrained(tiny_tokenizer_dir).get_vocab()
    assert data.address(tiny_dataset, ref, other) != base

    assert data.address(tiny_dataset, ref.model_copy(update={"eval_split": 0.2}), AutoTokenizer.from_pretrained(tiny_tokenizer_dir)) != base
    assert data.address(tiny_dataset, ref.model_copy(update={"seed": 1}), AutoTokenizer.from_pretrained(tiny_tokenizer_dir)) != base
    edited = tmp_path / "edited.jsonl"
    edited.write_bytes(tiny_dataset.read_bytes() + b'{"text": "one more"}\n')
    assert data.address(edited, ref, AutoTokenizer.from_pretrained(tiny_tokenizer_dir)) != base


def test_a_partial_artifact_is_never_read_and_is_rebuilt(make_run, tmp_path, tiny_dataset, tokenizer, builds, list_path):
    ctx = context(make_run, tmp_path, tiny_dataset)
    digest = data.address(tiny_dataset, ctx.run.dataset, tokenizer)
    folder = FileStore.path(ctx.run.storage.uri) / data.TOKENS_PREFIX / digest[7:19]
    folder.mkdir(parents=True)  # an interrupted build: files, no manifest.json
    (folder / "train.bin").write_bytes(b"\xff" * 64)
    (folder / "eval.bin").write_bytes(b"")
    (folder / data.TOKENS_META).write_text(json.dumps({"dtype": "uint16", "train": {"tokens": 32}, "eval": {"tokens": 0}}))
    tokens = data.tokens(ctx, tokenizer)
    assert tokens.built and len(builds) == 1
    assert tokens.train.tolist() == list_path["train"] and tokens.eval.tolist() == list_path["eval"]
    assert (folder / MANIFEST).is_file()


def test_publishes_into_one_folder_from_two_builders_at_once_never_collide(tmp_path):
    """file:// publish (data._replace_into) from two builders at a time, and again with the same
    files: every call lands, nothing temporary is left behind."""
    dst, errors = tmp_path / "published", []
    barrier = threading.Barrier(2)

    def publish(builder: int) -> None:
        barrier.wait()
        for i in range(60):
            src = tmp_path / f"tokens.partial-{builder}-{i}"  # each build has its own folder, as mkdtemp gives
            src.mkdir()
            for name in ("train.bin", "eval.bin"):
                (src / name).write_bytes(bytes([builder, i]) * 512)
            try:
                data._replace_into(src, dst)
                data._replace_into(src, dst)  # the same files again: dst already links them
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=publish, args=(b,)) for b in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in dst.iterdir()) == ["eval.bin", "train.bin"]


def test_concurrent_builders_both_end_up_correct(make_run, tmp_path, tiny_dataset, tiny_tokenizer_dir, list_path):
    from transformers import AutoTokenizer

    contexts = [context(make_run, tmp_path, tiny_dataset, stage=f"s{i}", cache=f"cache-{i}") for i in range(2)]
    tokenizers = [AutoTokenizer.from_pretrained(tiny_tokenizer_dir) for _ in range(2)]  # one per stage, as processes
    results: list = [None, None]
    barrier = threading.Barrier(2)

    def build(i: int) -> None:
        barrier.wait()
        results[i] = data.tokens(contexts[i], tokenizers[i])

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tokens in results:
        assert tokens.train.tolist() == list_path["train"] and tokens.eval.tolist() == list_path["eval"]
    folder = results[0].folder
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    assert data.tokens(contexts[0], tokenizers[0]).built is False


class WideTokenizer:
    """The tiny tokenizer with ids moved above 65535, as a vocabulary of 70,000 tokens would have."""

    OFFSET = 69_000 - 1024

    def __init__(self, inner):
        self.inner = inner
        self.eos_token_id = inner.eos_token_id + self.OFFSET

    def __len__(self) -> int:
        return 70_000

    def __call__(self, texts, **kwargs):
        return {"input_ids": [[i + self.OFFSET for i in ids] for ids in self.inner(texts, **kwargs)["input_ids"]]}


@pytest.mark.parametrize("vocabulary, dtype", [(1024, "uint16"), (65536, "uint16"), (65537, "int32"), (151_936, "int32")])
def test_id_dtype_by_vocabulary(vocabulary, dtype):
    assert data.id_dtype(vocabulary) == np.dtype(dtype)


def test_a_vocabulary_over_65536_is_stored_as_int32(tmp_path, tiny_dataset, tokenizer, list_path):
    ref = DatasetRef(uri=f"file://{tiny_dataset}", eval_split=0.1)
    small = data.write_tokens(tiny_dataset, ref, tokenizer, tmp_path / "small")
    wide = data.write_tokens(tiny_dataset, ref, WideTokenizer(tokenizer), tmp_path / "wide")
    assert small["dtype"] == "uint16" and (tmp_path / "small" / "eval.bin").stat().st_size == 2 * len(list_path["eval"])
    assert wide["dtype"] == "int32" and (tmp_path / "wide" / "eval.bin").stat().st_size == 4 * len(list_path["eval"])
    stream = data.Tokens.open(tmp_path / "wide", "", built=True).eval
    assert (stream.astype(np.int64) - WideTokenizer.OFFSET).tolist() == list_path["eval"]

"""Dataset records: loading, the train/eval split every stage agrees on, prompts and windows.

A record is text (the text field, optionally a prompt field) or a chat conversation (the messages
field: [{role, content}, ...]) rendered with the tokenizer's chat template. `text` is the one
record -> text rendering every stage reads; `prompts` and `chat_prompt` cut a conversation at its
last user turn for the methods that generate (synthetic, gkd).

Two ways to the same tokens:

- `load` / `split` / `token_stream` / `windows`: records as dicts and the EOS-joined stream as a
  Python list. Kept for the small callers that need record dicts (prompts for synthetic and gkd
  distillation) and as the reference the token artifact is tested against. A list costs about
  36 bytes of host memory per token (a pointer and an int object).

- `tokens(ctx, tokenizer)`: the tokens artifact. The train and eval splits' EOS-joined streams,
  written batch by batch as uint16 (vocabularies of at most 65536 tokens) or int32 to raw files,
  then memory-mapped read-only; windows are views (`stream[: n * L].reshape(n, L)`, no copy) and
  consumers convert one batch at a time. Building it never holds the dataset in memory: one pass
  indexes where each record's line starts (8 bytes per record), the indices are shuffled exactly
  as `split` shuffles them (random.Random(seed).shuffle depends only on the length), and records
  are read back by offset in batches. So the split, and every digest and result built on it, is
  the same as the list path's.

The artifact is content-addressed: `address()` digests the dataset files' bytes, the DatasetRef
fields that shape the stream (all but uri and the prompt fields) and the tokenizer's full
serialization (tokenizer.json, tokenizer_config.json, any chat template file: the same vocabulary
with another normalizer or template is another artifact). It lives at
`<storage.uri>/_tokens/<digest12>/`, shared by every stage and pipeline of that storage: the first
stage to need it builds and publishes it (files first, manifest.json last: the commit point); the
others read it in place (file:// stores) or fetch it once into `<cache>/tokens/` (s3://). A
folder without a manifest is an interrupted build and is rebuilt over. Builders write into a
private `.partial-*` folder and replace files by rename, never in place, so two stages building
at once both end up with the same bytes, and a reader's memory map is never truncated under it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

from kondense.api import DatasetRef
from kondense.errors import InvalidInput
from kondense.store import MANIFEST, Manifest, join, sha256_file, verify

if TYPE_CHECKING:
    from kondense_jobs.runtime import Context

log = logging.getLogger("kondense_jobs")

TOKENS_FORMAT = 1  # bump when the artifact's layout or the record -> text rendering changes
TOKENS_META = "tokens.json"
# Under storage.uri, beside the <namespace>/<pipeline> folders; "_" is not allowed in a namespace name.
TOKENS_PREFIX = "_tokens"
PARTS = ("train", "eval")
BATCH_BYTES = 1024 * 1024  # records read and tokenized per batch (by their JSON size)
# The tokenizer's serialization: what decides how a text becomes ids (and EOS).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt", "merges.txt",
    "tokenizer.model", "spiece.model",
)
# DatasetRef fields that do not change the token stream (everything else does, new fields included).
NOT_IN_ADDRESS = {"uri", "prompt_field", "prompt_tokens"}


@dataclass(frozen=True)
class Split:
    train: list[dict]
    eval: list[dict]


def dataset_files(path: Path) -> list[Path]:
    """The .jsonl/.json files of a dataset: the file itself, or a folder's (sorted by name)."""
    files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json")) if path.is_dir() else [path]
    files = [f for f in files if f.name != MANIFEST]
    if not files:
        raise InvalidInput(f"dataset: no .jsonl file in {path}")
    return files


def load_records(path: Path) -> list[dict]:
    """Records of a .jsonl/.json file, or of every such file in a folder (sorted by name)."""
    records: list[dict] = []
    for f in dataset_files(path):
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            records.append(_parse(line, f, n))
    if not records:
        raise InvalidInput(f"dataset: {path} holds no records")
    return records


def _parse(line: str | bytes, f: Path, n: int | None) -> dict:
    where = f"{f.name} line {n}" if n is not None else f.name
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"dataset: {where} is not JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"dataset: {where} is not UTF-8") from None
    if not isinstance(rec, dict):
        raise InvalidInput(f"dataset: {where} is not a JSON object")
    return rec


def split_order(count: int, ref: DatasetRef) -> tuple[np.ndarray, np.ndarray]:
    """Record numbers of (train, eval): shuffled with ref.seed, capped at ref.maxSamples, ref.evalSplit
    held out (at least one record). The permutation random.Random(seed).shuffle makes depends only on
    the length, so an int64 array is shuffled exactly as a list would be."""
    order = np.arange(count, dtype=np.int64)
    random.Random(ref.seed).shuffle(order)
    if ref.max_samples:
        order = order[: ref.max_samples]
    n_eval = max(1, round(len(order) * ref.eval_split))
    if n_eval >= len(order):
        raise InvalidInput(f"dataset: {len(order)} records leave nothing to train on with evalSplit {ref.eval_split}")
    return order[n_eval:], order[:n_eval]


def split(records: list[dict], ref: DatasetRef) -> Split:
    """Shuffle with ref.seed, cap at ref.maxSamples, hold out ref.evalSplit (at least one record)."""
    check_records(records, ref)
    train, held_out = split_order(len(records), ref)
    return Split(train=[records[i] for i in train], eval=[records[i] for i in held_out])


def load(path: Path, ref: DatasetRef) -> Split:
    return split(load_records(path), ref)


# ---------------------------------------------------------------------------------------------
# Records -> text: the text field, or chat messages rendered with the tokenizer's chat template
# ---------------------------------------------------------------------------------------------


def check_records(records: list[dict], ref: DatasetRef, numbers=None) -> None:
    """Every record has a string text field or a well-formed messages list; else InvalidInput naming
    the first bad record (its number in file order: `numbers[i]` when records are a shuffled batch)
    and the field."""
    number = (lambda i: i + 1) if numbers is None else (lambda i: int(numbers[i]) + 1)
    missing = [i for i, r in enumerate(records) if r.get(ref.messages_field) is None and not isinstance(r.get(ref.text_field), str)]
    if missing:
        raise InvalidInput(
            f"dataset: record {number(missing[0])} has no string field {ref.text_field!r} "
            f"({len(missing)} records affected); set spec.dataset.textField, or give it chat messages in "
            f"{ref.messages_field!r} (spec.dataset.messagesField)"
        )
    for i, r in enumerate(records):
        if r.get(ref.messages_field) is not None:
            _check_messages(r[ref.messages_field], number(i), ref.messages_field)


def _check_messages(messages, n: int, field: str) -> None:
    fix = f'; it must be a list of {{"role": ..., "content": ...}} strings with at least one "user" turn'
    if not isinstance(messages, list) or not messages:
        raise InvalidInput(f"dataset: record {n}: {field!r} is not a non-empty list{fix}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise InvalidInput(f"dataset: record {n}: {field}[{i}] is not a {{role, content}} pair of strings{fix}")
    if not any(m["role"] == "user" for m in messages):
        raise InvalidInput(f"dataset: record {n}: {field!r} has no user turn{fix}")


def is_chat(record: dict, ref: DatasetRef) -> bool:
    """Whether the record is a chat conversation (its text is templated, special tokens included)."""
    return record.get(ref.messages_field) is not None


def _template(tokenizer, ref: DatasetRef, messages: list[dict], generation: bool) -> str:
    if tokenizer is None:
        raise ValueError("chat messages are rendered with a tokenizer's chat template: pass the tokenizer")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInput(
            f"dataset: records hold chat messages in {ref.messages_field!r}, but the tokenizer in "
            f"{tokenizer.name_or_path} has no chat template to render them; use models whose tokenizer has one "
            f"(an instruct model's tokenizer_config.json chat_template), or give the records plain text in "
            f"{ref.text_field!r} and no {ref.messages_field!r}"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def chat_turns(messages: list[dict]) -> tuple[list[dict], dict | None]:
    """(the turns up to and including the last user turn, the assistant turn right after it or None)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    reply = messages[last + 1] if last + 1 < len(messages) and messages[last + 1]["role"] == "assistant" else None
    return messages[: last + 1], reply


def text(record: dict, ref: DatasetRef, tokenizer=None) -> str:
    """The one record -> text rendering: the whole conversation through the chat template when the
    record has messages, else its text field. Every stage that reads text reads it through here."""
    if is_chat(record, ref):
        return _template(tokenizer, ref, record[ref.messages_field], generation=False)
    return record[ref.text_field]


def texts(records: list[dict], ref: DatasetRef, tokenizer=None) -> list[str]:
    return [text(r, ref, tokenizer) for r in records]


def chat_prompt(record: dict, ref: DatasetRef, tokenizer) -> tuple[str, str | None]:
    """A conversation's prompt (the turns up to the last user turn, then the template's generation
    prompt) and the rest of the rendered conversation up to the assistant's reply, or None without one."""
    turns, reply = chat_turns(record[ref.messages_field])
    prompt = _template(tokenizer, ref, turns, generation=True)
    if reply is None:
        return prompt, None
    whole = _template(tokenizer, ref, [*turns, reply], generation=False)
    # the reply with the template's end-of-turn tokens; its bare content where the template re-renders the prompt
    return prompt, whole[len(prompt) :] if whole.startswith(prompt) else reply["content"]


def prompts(records: list[dict], ref: DatasetRef, tokenizer) -> list[str]:
    """The conversation up to its last user turn through the chat template (a trailing assistant turn
    dropped: the teacher writes it), else the record's prompt field, else the first promptTokens
    tokens of its text."""
    out = []
    for r in records:
        p = r.get(ref.prompt_field)
        if is_chat(r, ref):
            out.append(chat_prompt(r, ref, tokenizer)[0])
        elif isinstance(p, str) and p:
            out.append(p)
        else:
            ids = tokenizer(r[ref.text_field], add_special_tokens=False)["input_ids"][: ref.prompt_tokens]
            out.append(tokenizer.decode(ids))
    return out


def token_stream(tokenizer, docs: list[str]) -> list[int]:
    """All documents tokenized and joined with EOS: the stream perplexity windows are cut from."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream += ids
        if eos is not None:
            stream.append(eos)
    return stream


def windows(stream, length: int, limit: int | None = None):
    """Non-overlapping windows of `length` tokens (the last partial one dropped).

    A list gives a list of lists; a numpy array (the tokens artifact's memory map) gives an
    (n, length) view of it, no copy."""
    if limit is not None:
        stream = stream[:limit]
    if isinstance(stream, np.ndarray):
        n = len(stream) // length
        return stream[: n * length].reshape(n, length)
    return [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]


def long_rows(rows) -> np.ndarray:
    """Windows (a slice of the artifact's view, or lists) as int64, what embedding layers index with."""
    return np.asarray(rows, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Streaming the dataset: an index of line offsets, records read back by offset
# ---------------------------------------------------------------------------------------------


class RecordIndex:
    """Where each record's line starts, over the dataset's files taken as one byte string.

    `starts` is one int64 per record (blank lines are not records, as in load_records); a record
    ends at the next one's start or its file's end (json.loads ignores the whitespace between)."""

    def __init__(self, path: Path):
        self.path = path
        self.files = dataset_files(path)
        sizes = [f.stat().st_size for f in self.files]
        self.bounds = np.cumsum([0, *sizes], dtype=np.int64)  # file i spans bounds[i]:bounds[i+1]
        self.starts = np.concatenate([self._lines(f, int(base)) for f, base in zip(self.files, self.bounds)])
        if not len(self.starts):
            raise InvalidInput(f"dataset: {path} holds no records")

    @staticmethod
    def _lines(f: Path, base: int) -> np.ndarray:
        found, offset, carry_start = [], 0, 0
        with open(f, "rb") as fh:
            while block := fh.read(BATCH_BYTES):
                nl = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10) + offset
                line_starts = np.concatenate([[carry_start], nl[:-1] + 1]) if len(nl) else np.empty(0, np.int64)
                ends = nl
                if len(nl):
                    carry_start = int(nl[-1]) + 1
                found.append((line_starts.astype(np.int64), ends.astype(np.int64)))
                offset += len(block)
            if carry_start < offset:  # a last line without a newline
                found.append((np.array([carry_start], np.int64), np.array([offset], np.int64)))
            starts = np.concatenate([s for s, _ in found]) if found else np.empty(0, np.int64)
            ends = np.concatenate([e for _, e in found]) if found else np.empty(0, np.int64)
            # Blank lines are not records. Lines of 64 bytes or fewer are read to tell blank from short.
            keep = ends > starts
            for i in np.flatnonzero(keep & (ends - starts <= 64)):
                if not os.pread(fh.fileno(), int(ends[i] - starts[i]), int(starts[i])).strip():
                    keep[i] = False
        return starts[keep] + base

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, numbers: np.ndarray) -> list[dict]:
        """The records with these numbers (0-based, in the given order)."""
        out = []
        fds: dict[int, int] = {}
        try:
            for k in numbers:
                start = int(self.starts[k])
                i = int(np.searchsorted(self.bounds, start, side="right")) - 1
                end = int(self.starts[k + 1]) if k + 1 < len(self.starts) else int(self.bounds[-1])
                end = min(end, int(self.bounds[i + 1]))
                if i not in fds:
                    fds[i] = os.open(self.files[i], os.O_RDONLY)
                line = os.pread(fds[i], end - start, start - int(self.bounds[i]))
                try:
                    out.append(_parse(line, self.files[i], None))
                except InvalidInput:
                    n = self._line_number(i, start - int(self.bounds[i]))
                    _parse(line, self.files[i], n)  # raises again, naming the line
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def _line_number(self, i: int, offset: int) -> int:
        with open(self.files[i], "rb") as fh:
            return fh.read(offset).count(b"\n") + 1


class ListRows:
    """An (n, L) array's rows as lists of ints, each converted when read: for consumers that take
    lists (llama.cpp), without a copy of all windows."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[int]:
        return _as_list(self.rows[i])

    def __iter__(self) -> Iterator[list[int]]:
        return (_as_list(row) for row in self.rows)


def _as_list(row) -> list[int]:
    return row.tolist() if hasattr(row, "tolist") else list(row)


# ---------------------------------------------------------------------------------------------
# The tokens artifact
# ---------------------------------------------------------------------------------------------


def id_dtype(vocabulary: int) -> np.dtype:
    """uint16 (2 bytes per token) when every id fits, else int32."""
    return np.dtype(np.uint16) if vocabulary <= 65536 else np.dtype(np.int32)


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The tokenizer's serialization: its folder's files, or save_pretrained's when it has none."""
    folder = Path(getattr(tokenizer, "name_or_path", "") or "")
    if folder.is_dir() and (folder / "tokenizer.json").is_file():
        return {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {name: (Path(tmp) / name).read_bytes() for name in TOKENIZER_FILES if (Path(tmp) / name).is_file()}


def address(dataset: Path, ref: DatasetRef, tokenizer) -> str:
    """The artifact's content address: dataset bytes, the stream-shaping DatasetRef fields, the tokenizer."""
    h = hashlib.sha256(f"kondense-tokens/{TOKENS_FORMAT}\n".encode())
    for f in dataset_files(dataset):
        h.update(f"dataset {f.relative_to(dataset).as_posix() if dataset.is_dir() else f.name} {sha256_file(f)}\n".encode())
    fields = {k: v for k, v in ref.model_dump().items() if k not in NOT_IN_ADDRESS}
    h.update(f"ref {json.dumps(fields, sort_keys=True)}\n".encode())
    for name, raw in sorted(tokenizer_files(tokenizer).items()):
        h.update(f"tokenizer {name} {hashlib.sha256(raw).hexdigest()}\n".encode())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class Tokens:
    """A committed tokens artifact, memory-mapped: `train` and `eval` are 1-D read-only arrays."""

    folder: Path
    digest: str
    meta: dict
    built: bool  # this call built it (else it was reused)
    train: np.ndarray
    eval: np.ndarray

    @classmethod
    def open(cls, folder: Path, digest: str, built: bool) -> Tokens:
        meta = json.loads((folder / TOKENS_META).read_text())
        dtype = np.dtype(meta["dtype"])
        parts = {}
        for part in PARTS:
            n = meta[part]["tokens"]
            parts[part] = np.memmap(folder / f"{part}.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.empty(0, dtype)
        return cls(folder, digest, meta, built, parts["train"], parts["eval"])

    def describe(self) -> str:
        return (
            f"{'built' if self.built else 'reused'} tokens {self.digest[7:19]} ({self.meta['dtype']}): "
            f"train {self.meta['train']['tokens']} tokens in {self.meta['train']['records']} records, "
            f"eval {self.meta['eval']['tokens']} tokens in {self.meta['eval']['records']} records"
        )


def write_tokens(dataset: Path, ref: DatasetRef, tokenizer, folder: Path, digest: str = "") -> dict:
    """Tokenize the train and eval splits into folder/{train,eval}.bin and tokens.json, batch by batch."""
    index = RecordIndex(dataset)
    train, held_out = split_order(len(index), ref)
    dtype = id_dtype(len(tokenizer))
    eos = tokenizer.eos_token_id
    encode = encoder(tokenizer)
    # Batches of records by their JSON size: bounded memory whatever the record sizes.
    sizes = np.diff(np.append(index.starts, index.bounds[-1]))
    meta = {"format": TOKENS_FORMAT, "digest": digest, "dtype": dtype.name, "eos": eos, "vocabulary": len(tokenizer)}
    folder.mkdir(parents=True, exist_ok=True)
    for part, numbers in (("train", train), ("eval", held_out)):
        count = 0
        with open(folder / f"{part}.bin", "wb") as out:
            for batch in _batches(numbers, sizes):
                records = index.read(batch)
                check_records(records, ref, batch)
                flat: list[int] = []
                for ids in encode(texts(records, ref, tokenizer)):
                    flat += ids
                    if eos is not None:
                        flat.append(eos)
                try:
                    out.write(np.asarray(flat, dtype=dtype).tobytes())
                except OverflowError:
                    raise InvalidInput(
                        f"tokenizer: ids up to {max(flat)} do not fit {dtype.name} (len(tokenizer) is {len(tokenizer)}); "
                        "the tokenizer's added tokens are inconsistent. To resolve, re-save the tokenizer."
                    ) from None
                count += len(flat)
        meta[part] = {"tokens": count, "records": int(len(numbers))}
    (folder / TOKENS_META).write_text(json.dumps(meta, indent=2))
    return meta


def encoder(tokenizer):
    """texts -> ids per text, as tokenizer(texts, add_special_tokens=False)["input_ids"] gives them.

    A fast tokenizer's Rust backend is called directly when it can be (tokenizers' encode_batch_fast
    skips the character offsets the wrapper computes and drops): ~1.3x the tokens/s on 2 cores. Only
    when the backend itself truncates and pads nothing; tests/jobs/test_data.py checks the ids are the
    wrapper's token for token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is not None and backend.truncation is None and backend.padding is None:
        return lambda batch: [e.ids for e in fast(batch, add_special_tokens=False)]
    return lambda batch: tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def _batches(numbers: np.ndarray, sizes: np.ndarray) -> Iterator[np.ndarray]:
    start, acc = 0, 0
    for i, k in enumerate(numbers):
        acc += int(sizes[k])
        if acc >= BATCH_BYTES:
            yield numbers[start : i + 1]
            start, acc = i + 1, 0
    if start < len(numbers):
        yield numbers[start:]


def tokens(ctx: Context, tokenizer) -> Tokens:
    """The run's dataset tokenized with `tokenizer`: reused when any stage made it, else built and published."""
    dataset, ref = ctx.dataset_path(), ctx.run.dataset
    digest = address(dataset, ref, tokenizer)
    uri = join(ctx.run.storage.uri, TOKENS_PREFIX, digest[7:19])
    cache = ctx.cache_dir / "tokens" / digest[7:19]
    started = time.monotonic()
    found = _committed(ctx.store, uri, digest, cache)
    if found is None:
        found = _build(ctx, dataset, ref, tokenizer, digest, uri, cache)
        result = Tokens.open(found, digest, built=True)
    else:
        result = Tokens.open(found, digest, built=False)
    log.info("Tokens: %s; %s in %.1f s", result.describe(), uri, time.monotonic() - started)
    return result


def _committed(store, uri: str, digest: str, cache: Path) -> Path | None:
    """The folder holding the committed artifact (in place for file://, else a verified local copy)."""
    if (cache / MANIFEST).is_file():  # fetched before (s3://)
        manifest = Manifest.model_validate_json((cache / MANIFEST).read_text())
        if manifest.input_digest == digest:
            verify(cache, manifest, uri)
            return cache
    manifest = store.read_manifest(uri)
    if manifest is None or manifest.input_digest != digest:
        return None  # never built, or an interrupted build (files without manifest.json)
    local = store.local_path(uri)
    if local is not None:
        verify(local, manifest, uri)
        return local
    partial = Path(tempfile.mkdtemp(prefix=f"{cache.name}.partial-", dir=_mkdir(cache.parent)))
    store.fetch(uri, partial, expect_input_digest=digest)
    return _settle(partial, cache)


def _build(ctx: Context, dataset: Path, ref: DatasetRef, tokenizer, digest: str, uri: str, cache: Path) -> Path:
    """Tokenize into a private .partial folder, publish (files, then manifest.json), return the folder to read."""
    partial = Path(tempfile.mkdtemp(prefix=f"{cache.name}.partial-", dir=_mkdir(cache.parent)))
    try:
        log.info("Tokenizing %s into %s", ctx.run.dataset.uri, uri)
        meta = write_tokens(dataset, ref, tokenizer, partial, digest)
        store = ctx.store
        if store.read_manifest(uri) is None:  # another stage may have committed it meanwhile: same bytes
            local = store.local_path(uri)
            if local is not None:
                files = _replace_into(partial, local)
            else:
                files = store.upload_folder(partial, uri)
            store.commit(
                uri, files, stage=ctx.run.stage, stage_kind="tokens", input_digest=digest, format="tokens",
                metrics={f"{p}Tokens": float(meta[p]["tokens"]) for p in PARTS}, extra={"dataset": ctx.run.dataset.uri},
            )
        local = store.local_path(uri)
        if local is not None:
            shutil.rmtree(partial, ignore_errors=True)
            return local
        manifest = store.read_manifest(uri)
        (partial / MANIFEST).write_text(manifest.model_dump_json(by_alias=True, indent=2))
        verify(partial, manifest, uri)  # another builder's commit: the same bytes, or an error naming the file
        return _settle(partial, cache)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _replace_into(src: Path, dst: Path) -> dict:
    """A file:// publish that never writes a file in place: each lands under a temporary name, then
    os.replace. A reader that memory-mapped an earlier copy keeps its (identical) inode."""
    from kondense.store import hash_folder

    files = hash_folder(src)
    dst.mkdir(parents=True, exist_ok=True)
    for rel in files:
        tmp = dst / f".tmp-{src.name}-{rel}"  # src is this builder's own mkdtemp folder: no two writers share a name
        try:
            os.link(src / rel, tmp)
        except OSError:
            shutil.copyfile(src / rel, tmp)
        os.replace(tmp, dst / rel)
        tmp.unlink(missing_ok=True)  # rename(2) is a no-op when both names link one inode: a republish of the same files
    return files


def _settle(partial: Path, cache: Path) -> Path:
    """Move a complete local copy into place; when another process got there first, use theirs."""
    try:
        partial.rename(cache)
    except OSError:  # cache exists: a concurrent fetch or build settled first
        shutil.rmtree(partial, ignore_errors=True)
    return cache


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path

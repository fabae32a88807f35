"""Dataset records: loading, the train/eval split every stage agrees on, prompts and windows."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from kondense.api import DatasetRef
from kondense.errors import InvalidInput


@dataclass(frozen=True)
class Split:
    train: list[dict]
    eval: list[dict]


def load_records(path: Path) -> list[dict]:
    """Records of a .jsonl/.json file, or of every such file in a folder (sorted by name)."""
    files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json")) if path.is_dir() else [path]
    files = [f for f in files if f.name != "manifest.json"]
    if not files:
        raise InvalidInput(f"dataset: no .jsonl file in {path}")
    records: list[dict] = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"dataset: {f.name} line {n} is not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise InvalidInput(f"dataset: {f.name} line {n} is not a JSON object")
            records.append(rec)
    if not records:
        raise InvalidInput(f"dataset: {path} holds no records")
    return records


def split(records: list[dict], ref: DatasetRef) -> Split:
    """Shuffle with ref.seed, cap at ref.maxSamples, hold out ref.evalSplit (at least one record)."""
    missing = [i for i, r in enumerate(records) if not isinstance(r.get(ref.text_field), str)]
    if missing:
        raise InvalidInput(
            f"dataset: record {missing[0] + 1} has no string field {ref.text_field!r} "
            f"({len(missing)} records affected); set spec.dataset.textField"
        )
    order = list(range(len(records)))
    random.Random(ref.seed).shuffle(order)
    if ref.max_samples:
        order = order[: ref.max_samples]
    n_eval = max(1, round(len(order) * ref.eval_split))
    if n_eval >= len(order):
        raise InvalidInput(f"dataset: {len(order)} records leave nothing to train on with evalSplit {ref.eval_split}")
    return Split(train=[records[i] for i in order[n_eval:]], eval=[records[i] for i in order[:n_eval]])


def load(path: Path, ref: DatasetRef) -> Split:
    return split(load_records(path), ref)


def texts(records: list[dict], ref: DatasetRef) -> list[str]:
    return [r[ref.text_field] for r in records]


def prompts(records: list[dict], ref: DatasetRef, tokenizer) -> list[str]:
    """The record's prompt field, or the first promptTokens tokens of its text."""
    out = []
    for r in records:
        p = r.get(ref.prompt_field)
        if isinstance(p, str) and p:
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


def windows(stream: list[int], length: int, limit: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `length` tokens (the last partial one dropped)."""
    if limit is not None:
        stream = stream[:limit]
    return [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]

"""Dataset records: loading, the train/eval split every stage agrees on, prompts and windows.

A record is text (the text field, optionally a prompt field) or a chat conversation (the messages
field: [{role, content}, ...]) rendered with the tokenizer's chat template. `text` is the one
record -> text rendering every stage reads; `prompts` and `chat_prompt` cut a conversation at its
last user turn for the methods that generate (synthetic, gkd).
"""

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
    check_records(records, ref)
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


# ---------------------------------------------------------------------------------------------
# Records -> text: the text field, or chat messages rendered with the tokenizer's chat template
# ---------------------------------------------------------------------------------------------


def check_records(records: list[dict], ref: DatasetRef) -> None:
    """Every record has a string text field or a well-formed messages list; else InvalidInput naming
    the first bad record (its number in file order) and the field."""
    missing = [i for i, r in enumerate(records) if r.get(ref.messages_field) is None and not isinstance(r.get(ref.text_field), str)]
    if missing:
        raise InvalidInput(
            f"dataset: record {missing[0] + 1} has no string field {ref.text_field!r} "
            f"({len(missing)} records affected); set spec.dataset.textField, or give it chat messages in "
            f"{ref.messages_field!r} (spec.dataset.messagesField)"
        )
    for n, r in enumerate(records, 1):
        if r.get(ref.messages_field) is not None:
            _check_messages(r[ref.messages_field], n, ref.messages_field)


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


def windows(stream: list[int], length: int, limit: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `length` tokens (the last partial one dropped)."""
    if limit is not None:
        stream = stream[:limit]
    return [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]

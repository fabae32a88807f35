"""The teacher_logits stage: the teacher runs once over the training windows and its top-k logits
are stored, so that logit distillation trains with no teacher in memory (distill.teacherLogits).

`run(ctx)` reads as three steps: fetch inputs (teacher and dataset; topK and maxSeqLength checked
against the teacher's vocabulary and positions before any weight loads) -> run the teacher chunk
by chunk, committing each chunk to the store as it completes -> publish teacher-logits.json and
manifest.json, which lists every chunk's files, last. A restarted stage skips the chunks already
committed for its input digest: it recomputes at most the chunk it was stopped in.

The artifact, under the stage's output (L tokens per window, k = topK):

    teacher-logits.json             format, topK, windowLength, windows, chunks, vocabulary, dtypes
    chunks/00000/input_ids.npy      (n, L)        the windows' token ids
    chunks/00000/top_ids.npy        (n, L-1, k)   the teacher's k most likely next tokens at each position
    chunks/00000/top_logprobs.npy   (n, L-1, k)   their log-probabilities (temperature 1, whole vocabulary), fp16
    chunks/00000/manifest.json      the chunk's own commit marker
    manifest.json                   the artifact's commit, written last

Token ids are uint16 when the vocabulary has at most 65536 tokens, else int32: a token costs
k x 4 bytes (k x 6 over 65536) plus its id. The windows are those the logits method cuts from the
training split (data.windows over the EOS-joined token stream), so an online and an offline
student see the same batches. Log-probabilities rather than raw logits: any temperature
renormalizes them alike (softmax is shift-invariant), and the top-k mass at T = 1 is their sum.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kondense.api import Summary, TeacherLogitsSpec
from kondense.errors import InvalidInput, InvalidSpec
from kondense.store import FileEntry, dumps_canonical, join

from kondense_jobs import chunks, data
from kondense_jobs.chunks import chunk_dir
from kondense_jobs.runtime import Context, library_versions, require

log = logging.getLogger("kondense_jobs.teacher_logits")

FORMAT = "kondense.teacher-logits/v1"
META = "teacher-logits.json"
ARRAYS = ("input_ids", "top_ids", "top_logprobs")


def vocabulary_digest(tokenizer) -> str:
    """Fingerprint of a tokenizer's vocabulary, token by token: the ids the artifact stores mean these tokens."""
    return "sha256:" + hashlib.sha256(dumps_canonical(tokenizer.get_vocab()).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading: a committed artifact as a map-style dataset (distill.teacherLogits)
# ---------------------------------------------------------------------------------------------


class StoredLogits:
    """A committed teacherLogits artifact, its chunks memory-mapped: windows with the teacher's top k.

    Items are what the logits method's trainer reads: input_ids and labels (L), top_ids and
    top_logprobs (L-1, k) for the positions that predict a token.
    """

    def __init__(self, folder: Path, uri: str):
        self.uri = uri
        self.meta_uri = join(uri, META)
        try:
            self.meta = json.loads((folder / META).read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise InvalidInput(f"{self.meta_uri} is missing or unreadable ({e}): not a teacherLogits artifact") from None
        if self.meta.get("format") != FORMAT:
            raise InvalidInput(f"{self.meta_uri}: format {self.meta.get('format')!r}, expected {FORMAT}")
        self.chunks = [
            {name: np.load(folder / chunk_dir(i) / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
            for i in range(self.meta["chunks"])
        ]
        self.starts = np.cumsum([0] + [len(c["input_ids"]) for c in self.chunks])
        if self.starts[-1] != self.meta["windows"]:
            raise InvalidInput(f"{self.meta_uri}: {self.meta['windows']} windows, the chunks hold {self.starts[-1]}")

    @property
    def top_k(self) -> int:
        return int(self.meta["topK"])

    @property
    def window_length(self) -> int:
        return int(self.meta["windowLength"])

    def check(self, tokenizer, seq: int, student_vocab_size: int) -> None:
        """The student reads these ids as its own tokens and trains on windows of `seq`: InvalidInput
        naming the artifact's file when they are another tokenizer's or another length."""
        theirs, ours = self.meta["tokenizer"], vocabulary_digest(tokenizer)
        if theirs["vocabularyDigest"] != ours:
            raise InvalidInput(
                f"{self.meta_uri}: the teacher logits were computed with another tokenizer ({theirs['tokens']} tokens, "
                f"{theirs['vocabularyDigest'][:19]}...) than the student's ({len(tokenizer)} tokens, {ours[:19]}...): "
                "their token ids would mean other tokens. Run the teacherLogits stage with a teacher of the "
                "student's family, or distil online"
            )
        if self.window_length != seq:
            raise InvalidInput(
                f"{self.meta_uri}: windows of {self.window_length} tokens, but this stage trains on {seq} "
                "(distill.maxSeqLength, capped by the student's max_position_embeddings); set the teacherLogits "
                "stage's maxSeqLength and the distill stage's to the same length the student can take"
            )
        if self.meta["vocabulary"] > student_vocab_size:
            raise InvalidInput(
                f"{self.meta_uri}: token ids up to {self.meta['vocabulary'] - 1}, but the student's vocab_size "
                f"is {student_vocab_size}"
            )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int):
        torch = require("torch", "distillation")
        c = int(np.searchsorted(self.starts, i, side="right")) - 1
        chunk, j = self.chunks[c], i - int(self.starts[c])
        ids = torch.from_numpy(chunk["input_ids"][j].astype(np.int64))
        return {
            "input_ids": ids,
            "labels": ids,
            "top_ids": torch.from_numpy(chunk["top_ids"][j].astype(np.int64)),
            "top_logprobs": torch.from_numpy(np.array(chunk["top_logprobs"][j])),
        }


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """What step 1 fetched and checked."""

    teacher_dir: Path
    tokenizer: object
    windows: np.ndarray  # (n, L) view of the tokens artifact's train stream
    seq: int
    vocabulary: int  # ids below this are the tokenizer's tokens: the top k is taken among them


def fetch_inputs(ctx: Context) -> Pass:
    """The teacher's tokenizer and config (no weights yet), the training windows; topK and
    maxSeqLength refused with the field's name when the teacher cannot give them."""
    from kondense_jobs.distill.setup import _config, _tokenizer

    spec: TeacherLogitsSpec = ctx.config
    teacher_dir = ctx.model_dir("teacher")
    tokenizer = _tokenizer(teacher_dir, "teacher")
    cfg = _config(teacher_dir)
    vocabulary = min(len(tokenizer), cfg.get("vocab_size") or len(tokenizer))
    if spec.top_k > vocabulary:
        raise InvalidSpec(
            f"teacherLogits.topK: {spec.top_k} is more than the teacher's vocabulary of {vocabulary} tokens "
            f"({teacher_dir}); set topK to at most {vocabulary}"
        )
    positions = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    if positions and spec.max_seq_length > positions:
        raise InvalidSpec(
            f"teacherLogits.maxSeqLength: {spec.max_seq_length} is more than the teacher's max_position_embeddings "
            f"{positions} ({teacher_dir}/config.json); set maxSeqLength to at most {positions}"
        )
    windows = data.windows(data.tokens(ctx, tokenizer).train, spec.max_seq_length)
    if not len(windows):
        raise InvalidInput(
            f"dataset: the training split holds fewer than maxSeqLength={spec.max_seq_length} tokens; lower "
            "teacherLogits.maxSeqLength"
        )
    return Pass(teacher_dir, tokenizer, windows, spec.max_seq_length, vocabulary)


class Chunks(chunks.Chunks):
    """The stage's chunks beside its artifact, each one's files keyed by their path in the artifact."""

    def __init__(self, ctx: Context):
        super().__init__(ctx, ctx.run.output, {f"{name}.npy" for name in ARRAYS}, "teacher-logits-chunk")

    def committed(self, index: int) -> dict | None:
        """The chunk's files (paths relative to the artifact) and metrics when it is committed, else None."""
        manifest = super().committed(index)
        return None if manifest is None else self._entry(index, manifest)

    def commit(self, index: int, folder: Path, metrics: dict[str, float]) -> dict:
        return self._entry(index, super().commit(index, folder, metrics))

    @staticmethod
    def _entry(index: int, manifest) -> dict:
        return {"files": {f"{chunk_dir(index)}/{rel}": e for rel, e in manifest.files.items()}, "metrics": manifest.metrics}


def load_teacher(teacher_dir: Path, precision: str):
    torch = require("torch", "teacher logits")
    transformers = require("transformers", "teacher logits")
    from kondense_jobs.distill.setup import _dtype

    kwargs = {"dtype": _dtype(precision)}
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"  # spread over the pod's GPUs when one does not hold it
    return transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, **kwargs).eval().requires_grad_(False)


def top_k(teacher, rows, k: int, vocabulary: int):
    """The teacher's top k log-probabilities (fp16) and ids at every position but the last: (n, L-1, k)."""
    torch = require("torch", "teacher logits")
    with torch.no_grad():
        device = next(teacher.parameters()).device
        logits = teacher(input_ids=torch.from_numpy(data.long_rows(rows)).to(device)).logits
        logprobs = torch.log_softmax(logits[:, :-1, :vocabulary].float(), dim=-1)
        values, ids = logprobs.topk(k, dim=-1)
    return values.cpu(), ids.cpu()


def run(ctx: Context) -> Summary:
    spec: TeacherLogitsSpec = ctx.config
    require("transformers", "teacher logits").utils.logging.disable_progress_bar()
    from kondense_jobs.distill.setup import resolve_precision

    # 1. Fetch inputs.
    job = fetch_inputs(ctx)
    precision = resolve_precision(spec.precision)
    windows, size = job.windows, spec.chunk_windows
    n_chunks = math.ceil(len(windows) / size)
    chunks = Chunks(ctx)
    done = {i: c for i in range(n_chunks) if (c := chunks.committed(i)) is not None}
    reused = len(done)
    log.info(
        "Teacher pass over %d windows of %d tokens in %d chunks (top %d of %d tokens, %s); %d chunks already committed",
        len(windows), job.seq, n_chunks, spec.top_k, job.vocabulary, precision, len(done),
    )

    # 2. Transform: the teacher over every chunk not committed yet, each committed as it completes.
    started, forwards = time.monotonic(), 0
    teacher = load_teacher(job.teacher_dir, precision) if len(done) < n_chunks else None
    dtype = data.id_dtype(job.vocabulary)
    ctx.progress.update(len(done), n_chunks, phase="chunks", force=True)
    for i in range(n_chunks):
        if i in done:
            continue
        rows = windows[i * size : (i + 1) * size]
        values, ids, mass = [], [], 0.0
        for b in range(0, len(rows), spec.batch_size):
            v, t = top_k(teacher, rows[b : b + spec.batch_size], spec.top_k, job.vocabulary)
            forwards += 1
            mass += float(v.exp().sum(-1).sum())
            values.append(v.numpy().astype(np.float16))
            ids.append(t.numpy().astype(dtype))
        folder = ctx.work_dir / chunk_dir(i)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "input_ids.npy", np.asarray(rows, dtype=dtype))
        np.save(folder / "top_ids.npy", np.concatenate(ids))
        np.save(folder / "top_logprobs.npy", np.concatenate(values))
        positions = float(len(rows) * (job.seq - 1))
        done[i] = chunks.commit(i, folder, {"topKMassSum": mass, "positions": positions, "windows": float(len(rows))})
        ctx.progress.update(i + 1, n_chunks, phase="chunks")
    ctx.progress.update(n_chunks, n_chunks, phase="chunks", force=True)
    seconds = time.monotonic() - started

    # 3. Publish: teacher-logits.json, then manifest.json over every chunk's files, last.
    files: dict[str, FileEntry] = {}
    for i in range(n_chunks):
        files |= done[i]["files"]
    positions = sum(done[i]["metrics"]["positions"] for i in range(n_chunks))
    data_bytes = sum(e.size for e in files.values())
    meta = {
        "format": FORMAT,
        "topK": spec.top_k,
        "windowLength": job.seq,
        "windows": len(windows),
        "chunks": n_chunks,
        "chunkWindows": size,
        "vocabulary": job.vocabulary,
        "idDtype": dtype.name,
        "valueDtype": "float16",
        "values": "log-probabilities at temperature 1 over the whole vocabulary, largest first",
        "tokenizer": {"tokens": len(job.tokenizer), "vocabularyDigest": vocabulary_digest(job.tokenizer)},
    }
    out = ctx.output_dir()
    (out / META).write_text(json.dumps(meta, indent=2))
    files |= ctx.store.upload_folder(out, ctx.run.output)
    metrics = {
        **ctx.metrics,
        "windows": float(len(windows)),
        "chunks": float(n_chunks),
        "chunksReused": float(reused),
        "chunksComputed": float(n_chunks - reused),
        "teacherForwardPasses": float(forwards),
        "topK": float(spec.top_k),
        "topKMass": round(sum(done[i]["metrics"]["topKMassSum"] for i in range(n_chunks)) / positions, 6),
        "bytesPerToken": round(data_bytes / positions, 3),
        "teacherSeconds": round(seconds, 3),
    }
    return publish(ctx, files, metrics, meta)


def publish(ctx: Context, files: dict[str, FileEntry], metrics: dict[str, float], meta: dict) -> Summary:
    """manifest.json over the chunks' files and the meta file: the artifact's commit point."""
    run = ctx.run
    manifest = ctx.store.commit(
        run.output, files, stage=run.stage, stage_kind=run.stage_kind, input_digest=run.input_digest,
        format="teacher-logits", metrics=metrics, spec=run.dump(), versions=library_versions(), extra={"teacherLogits": meta},
    )
    log.info(
        "Published %s: %d windows, %d chunks, %.1f bytes per token, top-%d mass %.3f",
        run.output, meta["windows"], meta["chunks"], metrics["bytesPerToken"], meta["topK"], metrics["topKMass"],
    )
    return Summary(
        state="Succeeded", reason="Succeeded", message=f"published {run.output}", metrics=metrics,
        artifact=manifest.artifact(run.output),
    )

"""Host memory and speed of the data path: today's lists vs the memory-mapped tokens artifact.

A synthetic corpus of at least --tokens tokens (default 50M) is written as JSON Lines into a temp
dir: documents of random words drawn from the docstring corpus kondense_jobs.tiny builds, tokenized
with a BPE tokenizer trained on it (kondense_jobs.tiny.train_tokenizer, --vocab tokens). Each path
runs in a subprocess of its own, from the same imports, and does the whole data path a stage does:
  list:   data.load (every record in memory), data.token_stream over the train and eval texts
          (Python lists), data.windows (lists of lists);
  tokens: data.tokens(ctx, tokenizer) (index line offsets, shuffled split, records read by offset
          in batches, uint16 ids appended to files, published to a file:// store), then the memory
          maps and data.windows views.
Both then read every window once, a batch of 8 at a time converted to int64 (what a consumer
does). Measured per process: host RSS growth, peak (VmHWM) minus the RSS after imports and the
tokenizer load, per token of the stream, and tokens/s of the data path (wall clock from the first
data call to the last window read). The list path holds ~36 bytes per token, so on a machine of
24 GiB it runs on the first --list-tokens tokens of the corpus (default 5M), and the tokens path
runs on that sample too (same size, same work) as well as on the whole corpus. The tokens path
runs a second time on the whole corpus with its artifact committed: what a later stage pays.

    python benchmarks/data_path.py [--tokens 50e6] [--list-tokens 5e6] [--vocab 4096] [--seq 512]

Exit status 1 when the tokens path on the whole corpus grows host RSS by more than 8 bytes per token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_BYTES_PER_TOKEN = 8.0
BATCH_WINDOWS = 8


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


# ---------------------------------------------------------------------------------------------
# Worker: one path, in its own process
# ---------------------------------------------------------------------------------------------


def worker(args) -> None:
    import numpy as np
    from transformers import AutoTokenizer

    from kondense.api import DatasetRef
    from kondense_jobs import data

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    dataset = Path(args.dataset)
    ref = DatasetRef(uri=f"file://{dataset}", eval_split=0.02)
    ctx = None
    if args.worker == "tokens":
        ctx = context(dataset, ref, Path(args.store), Path(args.cache))
        ctx.store  # imported before the baseline, as the stage's store is
    tokenizer(["warm up"], add_special_tokens=False)
    baseline = status_kib("VmRSS")
    started = time.perf_counter()
    if args.worker == "list":
        split = data.load(dataset, ref)
        streams = {part: data.token_stream(tokenizer, data.texts(getattr(split, part), ref, tokenizer)) for part in data.PARTS}
        built = None
    else:
        tokens = data.tokens(ctx, tokenizer)
        streams = {part: getattr(tokens, part) for part in data.PARTS}
        built = tokens.built
    windows = data.windows(streams["train"], args.seq)
    checksum = 0
    for i in range(0, len(windows), BATCH_WINDOWS):
        checksum += int(data.long_rows(windows[i : i + BATCH_WINDOWS]).sum())
    seconds = time.perf_counter() - started
    count = sum(len(s) for s in streams.values())
    peak = status_kib("VmHWM")
    print(json.dumps({
        "path": args.worker, "tokens": count, "windows": len(windows), "seconds": seconds, "built": built,
        "baseline_kib": baseline, "peak_kib": peak, "bytes_per_token": (peak - baseline) * 1024 / count,
        "tokens_per_second": count / seconds, "checksum": checksum,
        "ids": str(np.asarray(streams["train"][:0]).dtype),
    }))


def context(dataset: Path, ref, store: Path, cache: Path):
    from kondense.api import InputRef, QuantizeSpec, Resources, StageRun, Storage
    from kondense_jobs.runtime import Context

    run = StageRun(
        pipeline="bench", namespace="default", stage="gptq", stage_kind="quantize", quantize=QuantizeSpec(method="gptq"),
        models={"model": InputRef(uri="file:///unused")}, dataset=ref, output=f"file://{store}/gptq",
        input_digest="sha256:bench", storage=Storage(uri=f"file://{store}"), resources=Resources(gpus=0),
    )
    return Context(run, cache.parent / "work", cache)


# ---------------------------------------------------------------------------------------------
# Driver: corpus, tokenizer, the runs side by side
# ---------------------------------------------------------------------------------------------


def write_corpus(folder: Path, tokens: float, list_tokens: float, vocab: int) -> tuple[Path, Path, Path]:
    """(tokenizer dir, whole corpus, its first ~list_tokens tokens as a file of its own)."""
    import numpy as np

    from kondense_jobs.tiny import corpus, train_tokenizer

    texts = corpus(max_docs=3000)
    tokenizer = train_tokenizer(texts, vocab_size=vocab)
    tokenizer.save_pretrained(folder / "tokenizer")
    words = np.array(sorted({w for t in texts for w in t.split()}))
    rng = np.random.default_rng(0)
    sample = [" ".join(rng.choice(words, 200)) for _ in range(200)]
    per_word = sum(len(ids) + 1 for ids in tokenizer(sample)["input_ids"]) / (200 * 200)
    n_words = int(tokens / per_word * 1.02) + 1
    big, small = folder / "corpus.jsonl", folder / "sample.jsonl"
    written, small_words = 0, int(list_tokens / per_word * 1.02) + 1
    with open(big, "w") as out, open(small, "w") as first:
        while written < n_words:
            lengths = rng.integers(50, 400, 2000).tolist()
            picks = rng.choice(words, sum(lengths)).tolist()
            at = 0
            lines = []
            for n in lengths:
                lines.append(json.dumps({"text": " ".join(picks[at : at + n]), "id": written + at}) + "\n")
                at += n
            chunk = "".join(lines)
            out.write(chunk)
            if written < small_words:
                first.write(chunk)
            written += at
    print(
        f"corpus: {big.stat().st_size / 2**20:.0f} MiB, ~{n_words * per_word / 1e6:.1f}M tokens "
        f"({per_word:.2f} tokens per word, vocabulary {len(tokenizer)}); sample: {small.stat().st_size / 2**20:.0f} MiB",
        flush=True,
    )
    return folder / "tokenizer", big, small


def run_worker(kind: str, dataset: Path, tokenizer: Path, root: Path, seq: int) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", kind, "--dataset", str(dataset), "--tokenizer", str(tokenizer),
        "--store", str(root / "store"), "--cache", str(root / "cache"), "--seq", str(seq),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{kind} on {dataset.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=float, default=50e6)
    p.add_argument("--list-tokens", type=float, default=5e6)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--worker", choices=["list", "tokens"])
    p.add_argument("--dataset"), p.add_argument("--tokenizer"), p.add_argument("--store"), p.add_argument("--cache")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="kondense-data-path-") as tmp:
        root = Path(tmp)
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the start", flush=True)
        started = time.perf_counter()
        tokenizer, big, small = write_corpus(root, args.tokens, args.list_tokens, args.vocab)
        print(f"corpus written in {time.perf_counter() - started:.0f} s", flush=True)
        runs = [
            ("list (today)", "sample", run_worker("list", small, tokenizer, root / "a", args.seq)),
            ("tokens (new)", "sample", run_worker("tokens", small, tokenizer, root / "b", args.seq)),
            ("tokens (new)", "corpus", run_worker("tokens", big, tokenizer, root / "c", args.seq)),
            ("tokens (new)", "corpus", run_worker("tokens", big, tokenizer, root / "c", args.seq)),
        ]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at the end: tokens/s move with other processes")
    print(f"\n{'path':<14} {'data':<7} {'artifact':<9} {'tokens':>11} {'RSS growth':>11} {'bytes/token':>12} {'tokens/s':>11}")
    for name, which, r in runs:
        artifact = "-" if r["built"] is None else "built" if r["built"] else "reused"
        growth = (r["peak_kib"] - r["baseline_kib"]) / 1024
        print(
            f"{name:<14} {which:<7} {artifact:<9} {r['tokens']:>11,} {growth:>8.1f} MiB {r['bytes_per_token']:>12.2f} "
            f"{r['tokens_per_second']:>11,.0f}"
        )
    old, same, whole, reused = (r for _, _, r in runs)
    if old["checksum"] != same["checksum"] or old["tokens"] != same["tokens"]:
        print("MISMATCH: the two paths cut different windows from the sample")
        return 1
    print(
        f"\nsame sample ({old['tokens']:,} tokens, identical windows): tokens path {old['bytes_per_token'] / same['bytes_per_token']:.1f}x "
        f"less host memory per token, {same['tokens_per_second'] / old['tokens_per_second']:.2f}x the tokens/s"
    )
    print(
        f"whole corpus ({whole['tokens']:,} tokens; the list path would need ~{old['bytes_per_token'] * whole['tokens'] / 2**30:.1f} GiB): "
        f"{whole['bytes_per_token']:.2f} bytes/token when built, {reused['bytes_per_token']:.2f} when reused "
        f"({reused['tokens_per_second']:,.0f} tokens/s); goal <= {GOAL_BYTES_PER_TOKEN:g}"
    )
    return 0 if whole["bytes_per_token"] <= GOAL_BYTES_PER_TOKEN else 1


if __name__ == "__main__":
    sys.exit(main())

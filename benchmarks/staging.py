"""Staging a ~500 MB checkpoint to a local S3 server: kondense's store vs boto3's defaults.

Both sides move the same files to the same server in the same run, alternating, best of N:
  baseline  boto3 `upload_file`/`download_file` per file with the default TransferConfig
            (8 MiB parts, 10 threads), one file after another
  kondense  S3Store.upload/download: 32 MiB parts, 16 threads per file, 4 files at once
Prints seconds, MB/s and the ratio baseline_time / kondense_time (target >= 1.0).

    python benchmarks/staging.py [--mb 500] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import boto3

from kondense.store import S3Store, join


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def checkpoint(folder: Path, total_mb: int) -> list[Path]:
    """A checkpoint's shape: a few large shards and small JSON files."""
    folder.mkdir(parents=True)
    sizes = [total_mb * 2 // 5, total_mb * 2 // 5, total_mb // 5]
    files = []
    for i, mb in enumerate(sizes):
        p = folder / f"model-0000{i + 1}-of-00003.safetensors"
        with open(p, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
        files.append(p)
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        (folder / name).write_bytes(os.urandom(64 * 1024))
        files.append(folder / name)
    return files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    proc, url = start_moto()
    tmp = Path(tempfile.mkdtemp(prefix="kondense-staging-"))
    try:
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket="bench")
        files = checkpoint(tmp / "ckpt", args.mb)
        total = sum(p.stat().st_size for p in files)
        store = S3Store(endpoint=url)

        def baseline_up(prefix):
            for p in files:
                client.upload_file(str(p), "bench", f"{prefix}/{p.name}")

        def baseline_down(prefix, dest):
            dest.mkdir(parents=True, exist_ok=True)
            for p in files:
                client.download_file("bench", f"{prefix}/{p.name}", str(dest / p.name))

        def ours_up(prefix):
            store.upload([(p, join("s3://bench", prefix, p.name)) for p in files])

        def ours_down(prefix, dest):
            store.download([(join("s3://bench", prefix, p.name), dest / p.name) for p in files])

        best = {k: float("inf") for k in ("base_up", "ours_up", "base_down", "ours_down")}
        for r in range(args.rounds):
            for name, fn in (("base_up", baseline_up), ("ours_up", ours_up)) if r % 2 == 0 else (("ours_up", ours_up), ("base_up", baseline_up)):
                t = time.perf_counter()
                fn(f"{name}-{r}")
                best[name] = min(best[name], time.perf_counter() - t)
            for name, fn, src in ((("base_down", baseline_down, "base_up"), ("ours_down", ours_down, "ours_up"))
                                  if r % 2 == 0 else (("ours_down", ours_down, "ours_up"), ("base_down", baseline_down, "base_up"))):
                dest = tmp / f"{name}-{r}"
                t = time.perf_counter()
                fn(f"{src}-{r}", dest)
                best[name] = min(best[name], time.perf_counter() - t)
                shutil.rmtree(dest)
        mb = total / 1e6
        print(f"checkpoint: {len(files)} files, {mb:.0f} MB, local S3 server (moto), best of {args.rounds}")
        for op in ("up", "down"):
            b, o = best[f"base_{op}"], best[f"ours_{op}"]
            print(f"{op + 'load':<9} boto3 defaults {b:6.2f}s ({mb / b:6.1f} MB/s)   kondense {o:6.2f}s ({mb / o:6.1f} MB/s)   ratio {b / o:.2f}x")
    finally:
        proc.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`kondense demo`: the embedded default pipeline on models built on the spot.

Inputs are built once into <base>/inputs and reused: a tokenizer and a dataset (the paragraphs of
Python's docstrings), a teacher trained on the dataset's training split (the split the pipeline
itself makes, never its held-out records: the same domain, as a real teacher would be), a random
smaller student, and two small lm-eval tasks made from the dataset's text (a multiple-choice
next word and an exact-match phrase completion). The pipeline is data/demo.yaml with
s3://kondense-demo replaced by the base URI.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import threading
import time
from importlib import resources
from pathlib import Path

import yaml

from kondense.api import CompressionPipeline
from kondense.errors import KondenseError
from kondense.store import join, open_store
from kondense.validation import parse

PLACEHOLDER = "s3://kondense-demo"
# Bump when the recipe below changes, so that cached inputs are rebuilt.
RECIPE = {
    "version": 3, "vocab": 4096, "docs": 6000, "teacher": [4, 256, 4], "student": [2, 128, 4], "steps": 400, "batch": 8,
    "lr": 7e-4, "inDomain": 8,
}
# The tasks have their own marker: changing them rebuilds them alone, not the models.
TASKS_RECIPE = {"version": 1, "examples": 60, "fewshot": 8, "seed": 0}


def template() -> str:
    return resources.files("kondense").joinpath("data/demo.yaml").read_text()


def pipeline(base_uri: str) -> CompressionPipeline:
    return parse(yaml.safe_load(template().replace(PLACEHOLDER, base_uri.rstrip("/"))))


def build_inputs(folder: Path, out=print) -> Path:
    """Tokenizer, teacher, student and dataset in folder (reused when the recipe matches)."""
    marker = folder / "recipe.json"
    if marker.exists() and json.loads(marker.read_text()) == RECIPE:
        build_tasks(folder, out)
        return folder
    try:
        from kondense_jobs import tiny
    except ImportError as e:
        raise SystemExit(f"kondense demo needs the stage libraries ({e}). To resolve: pip install -e '.[jobs]'") from None
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out("Building the demo inputs (once): tokenizer, teacher, student, dataset")
    texts = tiny.corpus(max_docs=RECIPE["docs"])
    tokenizer = tiny.train_tokenizer(texts, vocab_size=RECIPE["vocab"])
    # The dataset: the last 1/8 of the paragraphs (other modules than the rest). The teacher learns from
    # the other 7/8 and from the dataset's training split, `inDomain` times over, never its held-out records.
    cut = len(texts) * 7 // 8
    tiny.write_jsonl(folder / "dataset.jsonl", [{"text": t} for t in texts[cut:]])
    train, _ = split(texts[cut:])
    layers, hidden, heads = RECIPE["teacher"]
    teacher = tiny.build_model(folder / "teacher", tokenizer, "llama", layers, hidden, heads, seed=1)
    out(f"Training the teacher on {cut} paragraphs and the dataset's {len(train)} training ones ({RECIPE['steps']} steps)")
    tiny.pretrain(teacher, texts[:cut] + train * RECIPE["inDomain"], steps=RECIPE["steps"], seq_len=128,
                  batch=RECIPE["batch"], lr=RECIPE["lr"], progress=_Printed(out))
    layers, hidden, heads = RECIPE["student"]
    tiny.build_model(folder / "student", tokenizer, "llama", layers, hidden, heads, seed=2)
    marker.write_text(json.dumps(RECIPE))
    build_tasks(folder, out)
    return folder


def prefetch_tools(pipeline: CompressionPipeline) -> threading.Thread | None:
    """Fetch llama.cpp's converter for a gguf stage in the background (a one-time `pip download` of
    the llama-cpp-python sdist: 5 to 30 s of network and pip, little CPU) while the inputs build.

    The install is atomic, so the stage finds it whole or installs it itself; a failure here (no
    llama-cpp-python, no index) is left to the stage, which says what went wrong and how to fix it.
    """
    if not any(s.quantize and s.quantize.method == "gguf" for s in pipeline.spec.stages):
        return None

    def fetch() -> None:
        try:
            from kondense_jobs import gguf

            gguf.ensure_converter()  # returns at once when installed
        except (ImportError, KondenseError, OSError, tarfile.TarError) as e:
            logging.getLogger(__name__).debug("prefetching llama.cpp's converter failed: %s", e)

    thread = threading.Thread(target=fetch, name="prefetch-gguf-converter", daemon=True)
    thread.start()
    return thread


def build_tasks(folder: Path, out=print) -> Path:
    """<folder>/tasks: the demo's two lm-eval tasks (YAML + JSONL) from the dataset's paragraphs."""
    tasks_dir = folder / "tasks"
    marker = tasks_dir / "recipe.json"
    if marker.exists() and json.loads(marker.read_text()) == TASKS_RECIPE:
        return tasks_dir
    from kondense_jobs.tasks import build_demo_tasks

    shutil.rmtree(tasks_dir, ignore_errors=True)
    with open(folder / "dataset.jsonl") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    names = build_demo_tasks(texts, tasks_dir, examples=TASKS_RECIPE["examples"],
                             fewshot_examples=TASKS_RECIPE["fewshot"], seed=TASKS_RECIPE["seed"])
    out(f"Built the demo tasks: {', '.join(names)}")
    marker.write_text(json.dumps(TASKS_RECIPE))
    return tasks_dir


def split(texts: list[str]) -> tuple[list[str], list[str]]:
    """(training, held-out) paragraphs: the split the demo pipeline's stages make of dataset.jsonl."""
    from kondense_jobs.data import split_order

    train, held_out = split_order(len(texts), pipeline(PLACEHOLDER).spec.dataset)
    return [texts[i] for i in train], [texts[i] for i in held_out]


class _Printed:
    """Pretraining progress as a human line per 10% (the stages' JSON lines are for machines)."""

    def __init__(self, out):
        self.out, self.shown, self.started = out, -1, time.monotonic()

    def update(self, step: int, total: int, phase: str = "steps", **metrics: float) -> None:
        decile = 10 * step // total
        if decile != self.shown:
            self.shown = decile
            eta = (time.monotonic() - self.started) / max(step, 1) * (total - step)
            self.out(f"  teacher {step}/{total} {phase}, ETA {int(eta) // 60}:{int(eta) % 60:02d}, loss {metrics.get('loss', float('nan')):.2f}")


def stage_inputs(local_inputs: Path, base_uri: str) -> None:
    """Put the inputs under <base>/inputs (hard links for folders, an upload for s3://)."""
    store = open_store(base_uri)
    target = join(base_uri, "inputs")
    markers = ("recipe.json", "tasks/recipe.json")
    if all(store.read_bytes(join(target, m)) == (local_inputs / m).read_bytes() for m in markers):
        return
    files = [(p, join(target, p.relative_to(local_inputs).as_posix())) for p in sorted(local_inputs.rglob("*")) if p.is_file()]
    files.sort(key=lambda f: f[0].name == "recipe.json")  # the marker last: a partial copy is redone
    store.upload(files)


def inputs_cache() -> Path:
    return Path(os.environ.get("KONDENSE_CACHE", Path.home() / ".cache" / "kondense")) / "demo-inputs"

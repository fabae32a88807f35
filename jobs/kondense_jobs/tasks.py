"""Task accuracy for the evaluate stage, through lm-evaluation-harness (lm-eval 0.4.13).

    prepared = prepare(ctx, spec.tasks)             # fetch, look up and load every task, check few-shot
    scores = run_tasks(hf_lm(model, tokenizer), prepared)   # or LlamaCppLM(gguf_file, tokenizer)

Where a task comes from, in order:
  1. `uri`: a folder (file://, s3://, pvc://) holding a YAML task definition whose `task:` is the
     name, with its data files beside it (`dataset_path: json`, `dataset_kwargs.data_files` relative
     to the folder). lm-eval reads the YAML through a copy in the work dir that `include:`s it and
     points data_files at the fetched files.
  2. `uri` without such a YAML, for a task of lm-eval's registry: the folder is a Hugging Face
     datasets cache holding that task's data (passed to `datasets.load_dataset` as cache_dir).
  3. lm-eval's registry, its data from the pod's own datasets cache (HF_DATASETS_CACHE). Datasets
     are read offline (HF_DATASETS_OFFLINE=1) unless the pod's environment says otherwise.

Scoring is lm-eval's own: `lm_eval.evaluator.evaluate` on the loaded Task objects, each with its
own few-shot count (set on the task, as simple_evaluate does) and limit; the score is the task's
first metric (e.g. acc, exact_match) with lm-eval's standard error. Hugging Face variants run as
lm-eval's HFLM around the model already loaded for perplexity; GGUF files through LlamaCppLM below
(llama.cpp in-process, the same token ids as the HF tokenizer gives: loglikelihood from the logits of
context + continuation, greedy generation), not lm-eval's "gguf" model, which talks to a server.

`build_demo_tasks` writes two small tasks from a text corpus (the demo's and the tests'): a
multiple-choice next word among distractors and the exact-match completion of a frequent phrase.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kondense.api import InputRef, TaskSpec
from kondense.errors import InvalidInput, InvalidSpec
from kondense_jobs.runtime import cpu_budget, require

log = logging.getLogger("kondense_jobs.tasks")

BOOTSTRAP_ITERS = 1000  # lm-eval's stderr of non-mean metrics (means have a closed form)
FEWSHOT_SEED = 1234  # lm-eval's default: the same few-shot examples for every variant
HF_BATCH = 8


@dataclass
class TaskScore:
    """One variant on one task."""

    task: str
    metric: str | None = None  # e.g. "acc", "exact_match,first-word" (lm-eval's metric,filter key)
    score: float | None = None
    stderr: float | None = None
    samples: int | None = None  # examples scored (after limit)
    note: str | None = None  # why the score is n/a

    def dump(self) -> dict[str, Any]:
        return {"task": self.task, "metric": self.metric, "score": self.score, "stderr": self.stderr,
                "samples": self.samples, "note": self.note}


@dataclass
class PreparedTask:
    spec: TaskSpec
    index: int  # position in evaluate.tasks, for messages
    source: str  # "uri" (a task definition), "registry", "registry+cache"
    task: Any  # lm_eval ConfigurableTask
    metric: str = ""
    fewshot_pool: int = 0
    setup: dict = field(default_factory=dict)


def lm_eval_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm-eval")


def _import_lm_eval():
    # Read data offline unless the pod says otherwise: a pod without network would otherwise wait
    # on retries before saying that the data is missing.
    if "HF_DATASETS_OFFLINE" not in os.environ and "HF_HUB_OFFLINE" not in os.environ:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        if "datasets.config" in sys.modules:  # imported already: its flag was read at import
            sys.modules["datasets.config"].HF_HUB_OFFLINE = True
    lm_eval = require("lm_eval", "evaluate.tasks (lm-evaluation-harness)")
    from lm_eval.tasks import TaskManager  # noqa: F401

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    return lm_eval


# --------------------------------------------------------------------------------------------
# Fetch and load
# --------------------------------------------------------------------------------------------


def where_tasks_come_from(i: int) -> str:
    return (
        f"tasks are looked up (1) in evaluate.tasks[{i}].uri, a folder (file://, s3://, pvc://) with a YAML task "
        f"definition whose `task:` is the name and its data files, then (2) in lm-eval {lm_eval_version()}'s "
        "registry (`lm-eval ls tasks` lists it; its data from a datasets cache in evaluate.tasks[i].uri or the pod's)"
    )


def prepare(ctx, specs: list[TaskSpec], work_dir: Path) -> list[PreparedTask]:
    """Fetch each task's folder, load every task with lm-eval (its data included) and check it:
    InvalidSpec for an unknown name or more few-shot examples than the task has, InvalidInput for
    data that is missing. Runs before any model loads."""
    if not specs:
        return []
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    prepared = []
    for i, spec in enumerate(specs):
        overrides = work_dir / "task-overrides" / str(i)
        overrides.mkdir(parents=True, exist_ok=True)
        if spec.uri is not None:
            folder = ctx.fetch(InputRef(uri=spec.uri), f"evaluate.tasks[{i}] ({spec.name})")
            folder = folder.parent if folder.is_file() else folder
            definition = _find_definition(folder, spec.name)
            if definition is not None:
                _write_override(overrides, spec.name, definition, _data_kwargs(definition, folder, spec, i))
                source = "uri"
            else:
                if spec.name not in registry().all_subtasks:
                    yamls = sorted(p.name for p in folder.rglob("*.yaml"))
                    raise InvalidSpec(
                        f"evaluate.tasks[{i}].name {spec.name!r}: no YAML in {spec.uri} defines `task: {spec.name}` "
                        f"(it holds {yamls or 'no YAML'}), and lm-eval's registry has no such task; "
                        + where_tasks_come_from(i)
                    )
                yaml_path = registry().task_index[spec.name].yaml_path
                kwargs = dict(_load_yaml(yaml_path).get("dataset_kwargs") or {}) if yaml_path else {}
                _write_override(overrides, spec.name, yaml_path, kwargs | {"cache_dir": str(folder)})
                source = "registry+cache"
            manager = TaskManager(include_path=str(overrides), include_defaults=False)
        else:
            source, manager = "registry", registry()
            if spec.name not in manager.all_subtasks:
                groups = " (a group: list its tasks one by one)" if spec.name in manager.all_groups else ""
                close = [t for t in manager.all_subtasks if spec.name.lower() in t.lower()][:5]
                hint = f"; similar names: {close}" if close else ""
                raise InvalidSpec(
                    f"evaluate.tasks[{i}].name {spec.name!r} is not a task{groups}{hint}; " + where_tasks_come_from(i)
                )
        task = _load(manager, spec, i, source)
        prepared.append(_check(task, spec, i, source))
    return prepared


_REGISTRY = None


def registry():
    """lm-eval's own task index (thousands of YAMLs, ~20 s to build): built once, when a task needs it."""
    global _REGISTRY
    if _REGISTRY is None:
        from lm_eval.tasks import TaskManager

        log.info("Indexing lm-eval's task registry")
        _REGISTRY = TaskManager()
    return _REGISTRY


def _load_yaml(path) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(path), resolve_func=False)


def _find_definition(folder: Path, name: str) -> Path | None:
    for path in sorted(folder.rglob("*.yaml")) + sorted(folder.rglob("*.yml")):
        try:
            cfg = _load_yaml(path)
        except Exception as e:  # noqa: BLE001 - any parse error is the user's file: say which
            raise InvalidInput(f"task definition {path.name} cannot be read as lm-eval YAML: {e}") from None
        if isinstance(cfg, dict) and cfg.get("task") == name:
            return path
    return None


def _data_kwargs(definition: Path, folder: Path, spec: TaskSpec, i: int) -> dict:
    """The definition's dataset_kwargs with data_files (and data_dir) resolved against the fetched
    folder; every file must be there."""
    cfg = _load_yaml(definition)
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    base = definition.parent

    def resolve(name: str) -> str:
        path = Path(name) if Path(name).is_absolute() else base / name
        if not path.exists():
            raise InvalidInput(
                f"evaluate.tasks[{i}] ({spec.name}): {definition.name} names the data file {name}, which is not in "
                f"{spec.uri} (looked for {path}). To resolve, put the file beside the YAML or fix dataset_kwargs.data_files."
            )
        return str(path)

    files = kwargs.get("data_files")
    if isinstance(files, str):
        kwargs["data_files"] = resolve(files)
    elif isinstance(files, list):
        kwargs["data_files"] = [resolve(f) for f in files]
    elif isinstance(files, dict):
        kwargs["data_files"] = {k: [resolve(f) for f in v] if isinstance(v, list) else resolve(v) for k, v in files.items()}
    if isinstance(kwargs.get("data_dir"), str):
        kwargs["data_dir"] = resolve(kwargs["data_dir"])
    if cfg.get("dataset_path") in ("json", "csv", "parquet", "text") and not files and not kwargs.get("data_dir"):
        raise InvalidInput(
            f"evaluate.tasks[{i}] ({spec.name}): {definition.name} reads dataset_path {cfg['dataset_path']} but names no "
            "dataset_kwargs.data_files. To resolve, list the task's data files (relative to the YAML)."
        )
    return kwargs


def _write_override(folder: Path, name: str, include: Path | str | None, dataset_kwargs: dict) -> None:
    doc = {"task": name, "dataset_kwargs": dataset_kwargs}
    if include is not None:
        doc = {"include": str(include), **doc}
    (folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))


def _load(manager, spec: TaskSpec, i: int, source: str):
    try:
        return manager.load([spec.name])["tasks"][spec.name]
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        where = {
            "uri": f"the files of {spec.uri}",
            "registry+cache": f"the datasets cache {spec.uri}",
            "registry": "the pod's datasets cache (HF_DATASETS_CACHE; read offline)",
        }[source]
        raise InvalidInput(
            f"evaluate.tasks[{i}] ({spec.name}): its data cannot be loaded from {where}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. To resolve, copy the task's data into a datasets cache "
            f"(python -c \"import datasets; datasets.load_dataset(...)\" where there is network) and give that folder "
            f"as evaluate.tasks[{i}].uri (pvc:// or s3://), or give the task as a folder with its YAML and JSONL files."
        ) from None


def _check(task, spec: TaskSpec, i: int, source: str) -> PreparedTask:
    metrics = list(task._metric_fn_list)
    if not metrics:
        raise InvalidSpec(f"evaluate.tasks[{i}] ({spec.name}): the task defines no metric")
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    metric = f"{metrics[0]},{filters[0]}"
    docs = task.fewshot_docs()
    eval_docs = task.eval_docs
    pool = len(docs) if docs is not None else 0
    same = docs is not None and task.fewshot_cfg.split in (None, task.config.test_split) and not task.has_training_docs() and not task.has_validation_docs()
    if same:
        pool -= 1  # drawn from the evaluated split, the current example excluded
    if spec.num_fewshot > pool:
        raise InvalidSpec(
            f"evaluate.tasks[{i}].numFewshot {spec.num_fewshot} is more than the {pool} examples task {spec.name} "
            f"has to draw few-shot examples from. To resolve, lower numFewshot to at most {pool}"
            + (" or give the task a training split (fewshot_split)" if same else "")
            + "."
        )
    task.set_config(key="num_fewshot", value=spec.num_fewshot)
    n = len(eval_docs)
    log.info(
        "Task %s (%s): %s, %d examples%s, %d-shot, metric %s", spec.name, source, task.OUTPUT_TYPE, n,
        f", limit {spec.limit}" if spec.limit else "", spec.num_fewshot, metric,
    )
    setup = {
        "name": spec.name, "source": source, "uri": spec.uri, "output_type": task.OUTPUT_TYPE, "metric": metric,
        "num_fewshot": spec.num_fewshot, "limit": spec.limit, "examples": n,
        "samples": min(n, spec.limit) if spec.limit else n,
    }
    return PreparedTask(spec, i, source, task, metric, pool, setup)


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def run_tasks(lm, prepared: list[PreparedTask], variant: str) -> dict[str, TaskScore]:
    """Each task through lm_eval.evaluator.evaluate with its own limit and few-shot count."""
    from lm_eval.evaluator import evaluate

    out = {}
    for p in prepared:
        name = p.spec.name
        p.task.set_config(key="num_fewshot", value=p.spec.num_fewshot)
        p.task.set_fewshot_seed(seed=FEWSHOT_SEED)  # the same few-shot examples for every variant
        try:
            results = evaluate(
                lm=lm, task_dict={"tasks": {name: p.task}, "groups": {}, "group_map": {}}, limit=p.spec.limit,
                bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False, verbosity="WARNING",
            )
        except InvalidInput as e:
            out[name] = TaskScore(name, p.metric, note=f"{name} n/a: {e}")
            log.warning("%s cannot run task %s: %s", variant, name, e)
            continue
        out[name] = score_of(results, name, p.metric)
        s = out[name]
        log.info("%s on %s: %s %s +- %s (%d examples)", variant, name, p.metric, _f(s.score), _f(s.stderr), s.samples or 0)
    return out


def score_of(results: dict, name: str, metric: str) -> TaskScore:
    """The metric and its standard error from lm-eval's results for one task."""
    row = results["results"][name]
    base, _, filt = metric.partition(",")
    value = row.get(metric)
    stderr = row.get(f"{base}_stderr,{filt}")
    samples = results.get("n-samples", {}).get(name, {}).get("effective")
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    return TaskScore(
        task=name, metric=metric, score=float(value) if ok else None,
        stderr=float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None,
        samples=samples, note=None if ok else f"{name} n/a: lm-eval reported {metric} = {value!r}",
    )


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def hf_lm(model, tokenizer, max_length: int | None = None):
    """lm-eval's HFLM around a model already loaded (full precision, bitsandbytes, compressed-tensors)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=HF_BATCH, max_length=max_length)


def model_max_length(model) -> int | None:
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) else None


def llama_cpp_lm(gguf_path: Path, tokenizer, max_length: int | None = None):
    _import_lm_eval()
    return _llama_cpp_lm_class()(gguf_path, tokenizer, max_length)


_CLASS = None


def _llama_cpp_lm_class():
    """LlamaCppLM, defined on first use (lm_eval is imported lazily)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    import numpy as np
    from lm_eval.api.model import TemplateLM

    class LlamaCppLM(TemplateLM):
        """A GGUF file through llama.cpp in-process, on the Hugging Face tokenizer's token ids.

        loglikelihood: llama.cpp's logits at every position of context + continuation (tokenized as
        HFLM does, a BOS where the tokenizer adds one), summed log-softmax of the continuation's tokens and
        whether each is the argmax; generate_until: greedy decoding from the logits until a stop
        string, EOS or max_gen_toks. Inputs longer than max_length keep their last tokens, as HFLM."""

        def __init__(self, gguf_path: Path, tokenizer, max_length: int | None = None):
            super().__init__()
            self.path, self.tokenizer = Path(gguf_path), tokenizer
            self._max_length = max_length or 2048
            self._llm = None
            self._n_ctx = 0

        # -- TemplateLM's hooks
        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.eot_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            # As HFLM: the tokenizer's own default (a BOS where it adds one), none when the text starts with it.
            if add_special_tokens is None:
                bos = self.tokenizer.bos_token
                add_special_tokens = False if bos and string.startswith(bos) else None
            extra = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            return self.tokenizer.encode(string, **extra)

        def _model(self, n_ctx: int):
            import llama_cpp

            if self._llm is None or n_ctx > self._n_ctx:
                self.close()
                n_ctx = max(n_ctx, 8)
                threads = cpu_budget()
                try:
                    self._llm = llama_cpp.Llama(
                        model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                        n_threads=threads, n_threads_batch=threads, verbose=False,
                    )
                except ValueError as e:
                    raise InvalidInput(f"llama.cpp cannot load {self.path.name}: {e}") from None
                self._n_ctx = n_ctx
            return self._llm

        def close(self) -> None:
            if self._llm is not None:
                self._llm.close()
                self._llm = None

        def _eval(self, ids: list[int]):
            llm = self._model(len(ids))
            if max(ids) >= llm.n_vocab():
                raise InvalidInput(
                    f"token id {max(ids)} falls outside {self.path.name}'s vocabulary of {llm.n_vocab()}: the task's text "
                    "was tokenized with another tokenizer"
                )
            llm.reset()
            llm.eval(ids)
            return np.asarray(llm.scores[: len(ids)], dtype=np.float64)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            out = []
            if requests:  # one load, as long as the longest request
                self._model(min(self._max_length, max(len(c) + len(k) for _, c, k in requests)))
            for _, context_enc, continuation_enc in requests:
                ids = (context_enc + continuation_enc)[-(self._max_length + 1):][:-1]
                n = len(continuation_enc)
                logits = self._eval(ids)[-n:]  # position j predicts token j + 1
                top = logits.max(axis=1, keepdims=True)
                logp = logits - (np.log(np.exp(logits - top).sum(axis=1, keepdims=True)) + top)
                cont = np.asarray(continuation_enc)
                ll = float(logp[np.arange(n), cont].sum())
                greedy = bool((logits.argmax(axis=1) == cont).all())
                out.append((ll, greedy))
                self.cache_hook.add_partial("loglikelihood", _, (ll, greedy))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils

            out = []
            for (string,) in [r.args for r in requests]:
                windows = utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1,
                )
                pairs = [(None, *utils.make_disjoint_window(w)) for w in windows]
                out.append(sum(ll for ll, _ in self._loglikelihood_tokens(pairs)))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for context, gen_kwargs in [r.args for r in requests]:
                kwargs = dict(gen_kwargs)
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.pop("max_gen_toks", 256))
                if kwargs.get("do_sample") or kwargs.get("temperature", 0.0) > 0:
                    raise InvalidInput("LlamaCppLM decodes greedily; the task asks for sampling (do_sample or temperature > 0)")
                eos = self.tokenizer.decode([self.eot_token_id])
                stops = [s for s in until + [eos] if s]
                ids = self.tok_encode(context)[-(self._max_length - max_new):]
                llm = self._model(len(ids) + max_new)
                llm.reset()
                llm.eval(ids)
                new: list[int] = []
                text = ""
                for _ in range(max_new):
                    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                    if token == self.eot_token_id:
                        break
                    new.append(token)
                    text = self.tokenizer.decode(new)
                    if any(s in text for s in stops):
                        break
                    llm.eval([token])
                for s in stops:
                    text = text.split(s)[0]
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            return out

    _CLASS = LlamaCppLM
    return _CLASS


# --------------------------------------------------------------------------------------------
# Two small tasks from a corpus (the demo and the tests)
# --------------------------------------------------------------------------------------------

WORD = re.compile(r"[A-Za-z_][A-Za-z_]*")
NEXT_WORD, PHRASE = "next-word", "phrase"

NEXT_WORD_YAML = """\
# Multiple choice: the word that comes next in a paragraph, among 3 distractors (frequent words of
# the corpus). lm-eval scores each choice's log-likelihood after the context; metric acc.
task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{train: {name}.train.jsonl, test: {name}.test.jsonl}}
output_type: multiple_choice
training_split: train
test_split: test
fewshot_split: train
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

PHRASE_YAML = """\
# Exact match: complete a frequent phrase of the corpus with its next word (greedy generation, the
# first word of the output compared with the answer).
task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{train: {name}.train.jsonl, test: {name}.test.jsonl}}
output_type: generate_until
training_split: train
test_split: test
fewshot_split: train
doc_to_text: "{{{{context}}}}"
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
filter_list:
  - name: first-word
    filter:
      - function: regex
        regex_pattern: "([A-Za-z_]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def _paragraph_words(text: str):
    """(word, start, end) of each word joined to the previous one by exactly one space (so that the
    context before it ends cleanly)."""
    return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def build_demo_tasks(
    texts: list[str], folder: Path, examples: int = 120, fewshot_examples: int = 16, context_words: int = 12, seed: int = 0,
    prefix: str = "docstring-",
) -> dict[str, str]:
    """Write `<prefix>next-word` (multiple choice) and `<prefix>phrase` (exact match) into folder:
    a YAML and train/test JSONL per task. Returns {task name: kind}."""
    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paragraphs = [_paragraph_words(t) for t in texts]
    counts = Counter(w for p in paragraphs for w, _, _ in p)
    frequent = [w for w, _ in counts.most_common(300) if len(w) > 2]

    # Multiple choice: a frequent word after at least `context_words` words of its paragraph.
    mc = []
    for text, words in zip(texts, paragraphs):
        for k in range(context_words, len(words)):
            word, start, _ = words[k]
            if word in frequent[:150] and text[words[k - 1][2] : start] == " ":
                mc.append((text[words[k - context_words][1] : start - 1], word))
    # Phrase: two words whose next word is the same at least half of the time (seen 4 times or more).
    followers: dict[tuple, Counter] = defaultdict(Counter)
    for text, words in zip(texts, paragraphs):
        for k in range(2, len(words)):
            if all(text[words[j - 1][2] : words[j][1]] == " " for j in range(k - 1, k + 1)):
                followers[(words[k - 2][0], words[k - 1][0])][words[k][0]] += 1
    fixed = {
        p: c.most_common(1)[0][0]
        for p, c in followers.items()
        if sum(c.values()) >= 4 and c.most_common(1)[0][1] >= 0.5 * sum(c.values())
    }
    phrases = []
    for text, words in zip(texts, paragraphs):
        for k in range(context_words, len(words)):
            key = (words[k - 2][0], words[k - 1][0])
            if fixed.get(key) == words[k][0] and text[words[k - 1][2] : words[k][1]] == " ":
                phrases.append((text[words[k - context_words][1] : words[k - 1][2]], words[k][0]))
    need = examples + fewshot_examples
    if len(mc) < need or len(phrases) < need:
        raise InvalidInput(
            f"the corpus gives {len(mc)} next-word and {len(phrases)} phrase examples, fewer than {need}: use more texts"
        )
    rnd.shuffle(mc)
    rnd.shuffle(phrases)

    def mc_record(context: str, word: str) -> dict:
        choices = [word] + rnd.sample([w for w in frequent if w != word], 3)
        rnd.shuffle(choices)
        return {"context": context, "choices": choices, "label": choices.index(word)}

    names = {f"{prefix}{NEXT_WORD}": "multiple_choice", f"{prefix}{PHRASE}": "generate_until"}
    mc_name, phrase_name = list(names)
    sets = {
        mc_name: [mc_record(c, w) for c, w in mc[:need]],
        phrase_name: [{"context": c, "answer": w} for c, w in phrases[:need]],
    }
    for name, records in sets.items():
        for split, part in (("train", records[:fewshot_examples]), ("test", records[fewshot_examples:])):
            with open(folder / f"{name}.{split}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in part)
    (folder / f"{mc_name}.yaml").write_text(NEXT_WORD_YAML.format(name=mc_name))
    (folder / f"{phrase_name}.yaml").write_text(PHRASE_YAML.format(name=phrase_name))
    return names

"""Will it fit? Memory estimates from config.json alone, before any weight is loaded.

Bytes per parameter (weights only): fp32 4, bf16/fp16 2, int8 1, nf4 ~0.55 (4 bits plus
block constants). Training with AdamW needs, per trainable parameter, the weights, their
gradients and two fp32 moments, plus an fp32 master copy under mixed precision:
fp32 4+4+8 = 16 bytes, bf16/fp16 2+2+8+4 = 16 bytes. Activations follow Korthikanti et al.
(2022): about 34*s*b*h bytes per layer in 16-bit without recomputation, 2*s*b*h with
gradient checkpointing, plus the logits (s*b*vocab, fp32, for student and teacher).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kondense.api import Resources
from kondense.errors import InsufficientResources, InvalidInput

log = logging.getLogger("kondense_jobs.preflight")

GIB = 1024**3
WEIGHT_BYTES = {"fp32": 4.0, "float32": 4.0, "bf16": 2.0, "bfloat16": 2.0, "fp16": 2.0, "float16": 2.0, "int8": 1.0, "nf4": 0.55}
TRAIN_BYTES_PER_PARAM = 16.0
OVERHEAD = 1.10  # CUDA context, allocator fragmentation


@dataclass(frozen=True)
class Shape:
    parameters: int
    layers: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, model_dir: Path) -> Shape:
        try:
            cfg = json.loads((model_dir / "config.json").read_text())
        except FileNotFoundError:
            raise InvalidInput(f"{model_dir}/config.json is missing: not a Hugging Face model folder") from None
        cfg = cfg.get("text_config", cfg)
        hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
        layers = cfg.get("num_hidden_layers") or cfg.get("n_layer")
        vocab = cfg.get("vocab_size")
        if not (hidden and layers and vocab):
            raise InvalidInput(f"{model_dir}/config.json lacks hidden_size/num_hidden_layers/vocab_size")
        return cls(parameters=count_parameters(model_dir, cfg, hidden, layers, vocab), layers=layers, hidden=hidden, vocab=vocab)


def count_parameters(model_dir: Path, cfg: dict, hidden: int, layers: int, vocab: int) -> int:
    """Exact from safetensors headers when present, else the usual decoder formula."""
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
        for name, meta in header.items():
            if name != "__metadata__":
                n = 1
                for d in meta["shape"]:
                    n *= d
                total += n
    if total:
        return total
    inter = cfg.get("intermediate_size") or 4 * hidden
    embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings", True) else 2)
    return embeddings + layers * (4 * hidden * hidden + 3 * hidden * inter)


def available_bytes(resources: Resources) -> tuple[float, str]:
    """Memory the stage may use: the GPUs' memory, or the pod's/host's memory on CPU."""
    if resources.gpus > 0:
        return resources.gpus * resources.gpu_memory_gib * GIB, f"{resources.gpus} x {resources.gpu_memory_gib:g} GiB GPU"
    if resources.memory:
        return parse_quantity(resources.memory), f"resources.memory {resources.memory}"
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "host memory"


def parse_quantity(q: str) -> float:
    units = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3}
    for suffix in sorted(units, key=len, reverse=True):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * units[suffix]
    return float(q)


def inference_bytes(shape: Shape, dtype: str) -> float:
    return shape.parameters * WEIGHT_BYTES[dtype]


def training_bytes(shape: Shape, batch: int, seq: int, checkpointing: bool) -> float:
    per_layer = (2 if checkpointing else 34) * seq * batch * shape.hidden
    logits = 3 * 4 * seq * batch * shape.vocab
    return shape.parameters * TRAIN_BYTES_PER_PARAM + shape.layers * per_layer + logits


def check(parts: dict[str, float], resources: Resources) -> dict[str, float]:
    """Raise InsufficientResources with the table when the sum does not fit; return the estimate in GiB."""
    need = sum(parts.values()) * OVERHEAD
    have, what = available_bytes(resources)
    table = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in parts.items())
    if need > have:
        raise InsufficientResources(
            f"needs about {need / GIB:.1f} GiB ({table}, +10% overhead) but has {have / GIB:.1f} GiB ({what}). "
            "To resolve, raise resources.gpus, use bf16 precision, lower batchSize or maxSeqLength, "
            "or enable gradientCheckpointing."
        )
    log.info("Preflight: needs about %.2f GiB of %.1f GiB (%s)", need / GIB, have / GIB, table)
    return {"preflightGiB": round(need / GIB, 3)}

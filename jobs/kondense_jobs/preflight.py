"""Will it fit? The stage's side of kondense.memory, before any weight is loaded.

The estimate itself lives in the light package (kondense.memory), so that `kondense plan` on a
laptop and this check in the pod are one function: the pod refuses with the words the plan
printed. Here: the model's shape from its folder (config.json, the exact parameter count from
the safetensors headers), the host's memory, and the refusal.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from kondense import memory
from kondense.errors import InsufficientResources, InvalidInput

log = logging.getLogger("kondense_jobs.preflight")


def shape_of(model_dir: Path, name: str) -> memory.Shape:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise InvalidInput(f"{model_dir}/config.json is missing: not a Hugging Face model folder") from None
    try:
        return memory.Shape.from_config(cfg, name, parameters=count_parameters(model_dir) or None)
    except ValueError as e:
        raise InvalidInput(f"{model_dir}/config.json: {e}") from None


def count_parameters(model_dir: Path) -> int:
    """Exact from the safetensors headers (8-byte length, then JSON); 0 when there are none."""
    total = 0
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, meta in header.items():
            if name != "__metadata__":
                n = 1
                for d in meta["shape"]:
                    n *= d
                total += n
    return total


def host_bytes() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check(stage: str, estimate: memory.Estimate, fixes: list[memory.Fix]) -> None:
    """InsufficientResources in the plan's words when the estimate does not fit."""
    if not estimate.fits:
        raise InsufficientResources(" ".join(line.strip() for line in memory.shortfall(stage, estimate, fixes)))
    log.info("Preflight: %s", estimate.table())

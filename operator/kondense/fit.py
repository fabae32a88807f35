"""`kondense plan`: will each stage fit, and if not, what would make it fit.

Reads each model's config.json only (never weights), walks the stages in DAG order and asks
kondense.memory for a per-worker estimate. A distill stage's output has its student's shape
(in the precision it is published in); a quantize stage's has its input's; evaluate is sized by
its largest variant. A quantize stage has a second row, its host memory: llm-compressor keeps the
model and the offloaded activations there and one layer on the GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources as package_files
from pathlib import Path
from urllib.parse import urlparse

from kondense import memory
from kondense.api import ModelRef, PipelineSpec, Resources, Storage
from kondense.errors import InvalidSpec
from kondense.plan import StagePlan
from kondense.store import join, open_store

GIB = memory.GIB


@dataclass(frozen=True)
class StageFit:
    name: str
    kind: str
    estimate: memory.Estimate
    fixes: list[memory.Fix] = field(default_factory=list)
    strategy: str = "one process"

    @property
    def fits(self) -> bool:
        return self.estimate.fits


def catalogue() -> dict[str, dict]:
    doc = json.loads(package_files.files("kondense").joinpath("data/architectures.json").read_text())
    return {k: v for k, v in doc.items() if not k.startswith("_")}


def known_architecture(uri: str) -> tuple[str, dict] | None:
    """The catalogue entry whose name the URI's last path part contains (longest name first)."""
    tail = urlparse(uri).path.rstrip("/").rsplit("/", 1)[-1].lower() or urlparse(uri).netloc.lower()
    for name, cfg in sorted(catalogue().items(), key=lambda kv: -len(kv[0])):
        if name in tail:
            return name, cfg
    return None


def read_config(ref: ModelRef, storage: Storage) -> tuple[dict, str]:
    """config.json of a source model and where it came from; the catalogue when it cannot be read."""
    scheme = urlparse(ref.uri).scheme
    problem = ""
    try:
        if scheme in ("file", "s3"):
            raw = open_store(ref.uri, storage.endpoint, storage.region, max_attempts=2).read_bytes(join(ref.uri, "config.json"))
            if raw is not None:
                return json.loads(raw), join(ref.uri, "config.json")
            problem = "no config.json there"
        else:
            problem = f"{scheme}:// sources are not read by kondense plan"
    except Exception as e:  # noqa: BLE001 - any failure to read falls back to the catalogue, and says why
        problem = getattr(e, "reason", None) or type(e).__name__
    known = known_architecture(ref.uri)
    if known is None:
        raise InvalidSpec(
            f"{ref.uri}: cannot read config.json ({problem}) and the name matches no known architecture "
            f"({', '.join(sorted(catalogue()))}). To resolve, pass --config ROLE=path/to/config.json"
        )
    return known[1], f"{ref.uri} not readable ({problem}): built-in {known[0]} config"


def load_config_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidSpec(f"--config {path}: {e}") from None


def shapes(spec: PipelineSpec, plans: list[StagePlan], sources: dict[str, memory.Shape]) -> dict[str, memory.Shape]:
    """The shape of every source and stage output."""
    out = dict(sources)
    for p in plans:
        if p.kind == "distill":
            d = spec.stages[p.index].distill
            assert d is not None
            published = memory.compute_dtype(d.precision, p.resources.gpus)  # the student is saved as it trained
            out[p.name] = replace(out[p.inputs["student"]], dtype=published)
        elif p.kind == "quantize":
            out[p.name] = out[p.inputs["model"]]
    return out


def plan_stages(
    spec: PipelineSpec,
    plans: list[StagePlan],
    sources: dict[str, memory.Shape],
    gpu_memory_gib: float | None = None,
    host_bytes: float | None = None,
) -> list[StageFit]:
    """One StageFit per stage, in order."""
    by_shape = shapes(spec, plans, sources)
    fits = []
    for p in plans:
        stage = spec.stages[p.index]
        r: Resources = p.resources
        if gpu_memory_gib is not None:
            r = r.model_copy(update={"gpu_memory_gib": gpu_memory_gib})
        if p.kind == "distill":
            d = stage.distill
            assert d is not None
            online = not (d.method == "logits" and d.alpha == 0) and d.teacher_logits is None
            teacher = by_shape["teacher"] if online else None  # none in memory: alpha 0, or stored logits
            estimate, fixes = memory.distill_plan(d, r, by_shape[p.inputs["student"]], teacher, host_bytes)
            c = estimate.choice
            assert c is not None
            what = c.strategy if r.world_size > 1 else "one worker"
            teacher_mode = {"none": "no teacher"}.get(c.teacher_load, f"teacher {c.teacher_load}")
            fits.append(StageFit(p.name, p.kind, estimate, fixes, f"{what}, {teacher_mode}"))
        elif p.kind == "quantize":
            q = stage.quantize
            assert q is not None
            shape = by_shape[p.inputs["model"]]
            estimate = memory.quantize_plan(q, r, shape, host_bytes)
            fixes = memory.quantize_fixes(q, r, shape, host_bytes)
            fits.append(StageFit(p.name, p.kind, estimate, fixes, memory.quantize_how(q, r)))
        elif p.kind == "teacher_logits":
            t = stage.teacher_logits
            assert t is not None
            teacher = by_shape["teacher"]
            fits.append(_single(p, r, lambda r, t=t: memory.teacher_logits_plan(t, r, teacher, host_bytes)))
        else:
            ev = stage.evaluate
            assert ev is not None
            largest = max((by_shape[v] for v in ev.of), key=lambda s: s.total_parameters)
            fits.append(_single(p, r, lambda r, ev=ev, largest=largest: memory.evaluate_plan(ev, r, largest, host_bytes)))
    return fits


def _single(p: StagePlan, r: Resources, estimate_for) -> StageFit:
    estimate = estimate_for(r)
    fixes = [] if estimate.fits else memory.more_gpus(estimate_for, r)
    return StageFit(p.name, p.kind, estimate, fixes, "one process" + (f" on {r.gpus} GPUs" if r.gpus > 1 else ""))


def format_plan(fits: list[StageFit], origins: dict[str, str]) -> str:
    lines = [f"{role}: {origin}" for role, origin in origins.items()]
    lines.append("")
    parts = ["weights", "gradients", "optimizer", "activations", "logits", "teacher", "runtime"]
    if any("hessians" in f.estimate.parts for f in fits):  # GPTQ's, on the GPU
        parts.insert(3, "hessians")
    header = ["stage", "workers", "strategy", *parts, "total", "of", "verdict"]
    rows = [header]
    for f in fits:
        e = f.estimate
        workers = f"{e.workers} x {e.nodes}" if f.kind == "distill" else "1"
        rows.append(
            [
                f.name, workers, f.strategy,
                *[_gib(e.parts.get(k)) for k in parts],
                _gib(e.total), _gib(e.capacity), "fits" if e.gpu_fits else "DOES NOT FIT",
            ]
        )
        if e.host is not None:  # the same stage's host memory, against resources.memory
            h = e.host
            rows.append(
                [
                    "", "host", "host memory",
                    *[_gib(h.parts.get(k)) for k in parts],
                    _gib(h.total), _gib(h.capacity), "fits" if h.fits else "DOES NOT FIT",
                ]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("GiB per worker (one GPU, or a CPU worker's share of memory); totals include +10% fragmentation.")
    if any(f.estimate.host is not None for f in fits):
        lines.append("host: the same stage's host memory (the model, offloaded activations) against resources.memory.")
    for f in fits:
        if not f.fits:
            lines += ["", *memory.shortfall(f.name, f.estimate, f.fixes)]
    return "\n".join(lines)


def _gib(v: float | None) -> str:
    if v is None or v == 0:
        return "-"
    if v == float("inf"):
        return "inf"
    return f"{v / GIB:.1f}"

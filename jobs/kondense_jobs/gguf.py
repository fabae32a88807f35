"""GGUF files through llama.cpp's own converter and quantizer, and measurements through llama.cpp.

    quantize(model_dir, out_dir, "q4_k_m")        -> out_dir/model-q4_k_m.gguf
    perplexity(gguf_path, windows)                -> float (llama.cpp's logits, HF's convention)
    window_logits(gguf_path, windows)             -> each window's logits (evaluate's KLD)
    find_gguf(folder)                             -> Path | None

Where the converter comes from. The llama-cpp-python wheel carries llama.cpp's library but not
`convert_hf_to_gguf.py`; its sdist carries the whole llama.cpp tree. `install_converter()` (the
command `python -m kondense_jobs.gguf install-converter`) runs `pip download --no-deps --no-binary
:all: llama-cpp-python==<installed version>` (PyPI only; pip's cache makes it free the second
time) or takes a local sdist (`--sdist`), and extracts convert_hf_to_gguf.py, conversion/ and
gguf-py/gguf/ into $KONDENSE_LLAMA_CPP_DIR or ~/.cache/kondense/llama.cpp-<version>. The converter
is therefore the very commit the installed llama.cpp library was built from: every file it writes
is one that library reads. `quantize()` installs it on first use if it is missing.

How it runs. The converter runs as a subprocess (`python -m kondense_jobs.gguf convert-hf ...`)
with the vendored gguf-py first on sys.path: the PyPI `gguf` package may be older or newer than
the converter expects, and a subprocess keeps the two apart. f32/f16/bf16/q8_0 come straight from
the converter; every other type is made by llama.cpp's quantizer (`llama_model_quantize`, also in
a subprocess, so that a crash of native code becomes an error message, not a dead stage) from a
lossless intermediate: the source's own dtype (f32 for f32 weights, bf16 for bf16, f16 for f16).
Tiny and fine-tuned models are usually saved in f32; rounding them to f16 before quantizing adds a
second error on top of the quantization, so the intermediate never narrows the source.

Two patches, in-process, to the converter's classes (no llama.cpp file is edited). First, the
hyper-parameters it reads get the keys transformers 5 no longer writes (GPT-2's n_ctx, GPT-NeoX's
rotary_pct) from where transformers 5 keeps them (LEGACY_HPARAMS); a key already there wins.
Second, the pre-tokenizer. The converter names a BPE tokenizer's pre-tokenizer by hashing the tokenization of a fixed string and refuses
hashes it does not know; the hash depends on the vocabulary, so every locally trained tokenizer is
refused, even one that pre-tokenizes exactly as a model llama.cpp knows. When, and only when, the
converter does not recognise the hash and tokenizer.json's normalizer, pre-tokenizer and BPE flags
are exactly those of a model llama.cpp names, `TextModel.get_vocab_base_pre` answers that name:
gpt-2 (GPT-2's ByteLevel), mpt (NFC + ByteLevel: GPT-NeoX's, as transformers 5 re-saves it), qwen2
(NFC + Qwen2's Split regex, as transformers 5 re-saves a Qwen2 tokenizer) or llama-bpe (Llama 3's
Split regex); kondense_jobs.families.llama_cpp_pretokenizer holds the table and says where each
entry comes from. A hub model with a known hash goes through unpatched; any other unknown
tokenizer is refused as before (InvalidInput).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kondense.api import GGUF_CONVERTER_TYPES, GGUF_QUANTIZER_TYPES, GGUF_TYPES
from kondense.errors import InvalidInput, InvalidSpec, MissingDependency

log = logging.getLogger("kondense_jobs.gguf")

DISTRIBUTION = "llama-cpp-python"
# What the converter imports, relative to the sdist's vendor/llama.cpp/.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
CONVERTER_TYPES = GGUF_CONVERTER_TYPES  # written by convert_hf_to_gguf.py itself
QUANTIZER_TYPES = GGUF_QUANTIZER_TYPES  # by llama.cpp's quantizer
TYPES = GGUF_TYPES

# Exit codes of the convert-hf subcommand that mean "this input cannot be converted".
EXIT_UNSUPPORTED_ARCH = 3
EXIT_UNKNOWN_PRETOKENIZER = 4

LLAMA_CPP_HINT = (
    "To resolve, use the kondense jobs image, or build it from source: "
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON" '
    "pip install 'llama-cpp-python==0.3.36' --no-binary llama-cpp-python"
)


# -- the converter --------------------------------------------------------------------------------
def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependency(
            f"GGUF needs the Python package llama_cpp ({DISTRIBUTION} is not installed). {LLAMA_CPP_HINT}"
        ) from None


def converter_dir(version: str | None = None) -> Path:
    """Where convert_hf_to_gguf.py lives: $KONDENSE_LLAMA_CPP_DIR or ~/.cache/kondense/llama.cpp-<version>."""
    if env := os.environ.get("KONDENSE_LLAMA_CPP_DIR"):
        return Path(env)
    return Path.home() / ".cache" / "kondense" / f"llama.cpp-{version or llama_cpp_version()}"


def _installed(folder: Path) -> bool:
    return (folder / ".complete").exists() and (folder / "convert_hf_to_gguf.py").exists()


def install_converter(
    version: str | None = None, dest: Path | None = None, sdist: Path | None = None
) -> Path:
    """Extract llama.cpp's converter from the llama-cpp-python sdist of `version` into `dest`.

    The sdist is `sdist` if given, else `pip download`ed from the configured index (PyPI).
    Idempotent: an existing complete install is kept.
    """
    version = version or llama_cpp_version()
    dest = dest or converter_dir(version)
    if _installed(dest):
        return dest
    with tempfile.TemporaryDirectory(prefix="kondense-llama-cpp-") as tmp:
        sdist = sdist or _download_sdist(version, Path(tmp), "convert_hf_to_gguf.py", "install-converter")
        log.info("Extracting llama.cpp's converter from %s into %s", Path(sdist).name, dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        partial.chmod(0o755)  # mkdtemp makes it 0700: the image runs as another user than builds it
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                _, _, rel = m.name.partition("/vendor/llama.cpp/")
                if rel and any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in CONVERTER_PARTS):
                    if "/tests/" in rel or not (m.isfile() or m.isdir()):
                        continue
                    m.name = rel
                    members.append(m)
            if not any(m.name == "convert_hf_to_gguf.py" for m in members):
                shutil.rmtree(partial)
                raise InvalidInput(f"{sdist} has no vendor/llama.cpp/convert_hf_to_gguf.py: not the sdist")
            tar.extractall(partial, members=members, filter="data")
        (partial / ".complete").write_text(f"{DISTRIBUTION}=={version}\n")
        if _installed(dest):  # another process finished first
            shutil.rmtree(partial)
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
    return dest


def _download_sdist(version: str, folder: Path, what: str, command: str) -> Path:
    """`pip download` the llama-cpp-python sdist of `version` into `folder` (PyPI; pip's cache)."""
    log.info("Downloading the %s %s sdist for llama.cpp's %s", DISTRIBUTION, version, what)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--quiet", f"{DISTRIBUTION}=={version}", "-d", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        why = _last_line(proc.stderr) or "no sdist"
        raise MissingDependency(
            f"GGUF needs llama.cpp's {what} and `pip download {DISTRIBUTION}=={version}` failed ({why}). "
            f"To resolve, run `python -m kondense_jobs.gguf {command}` where PyPI is reachable (the jobs "
            "image does) or set KONDENSE_LLAMA_CPP_DIR to a folder holding it."
        )
    return found[0]


def ensure_converter() -> Path:
    """The converter folder, installed now if missing (needs PyPI)."""
    return _ensure(converter_dir, _installed, install_converter, "converter", "install-converter")


def _ensure(where, installed, install, what: str, command: str) -> Path:
    """where(version), installed now by install(version, folder) if missing; a warning when it was
    made from another release than the installed llama-cpp-python."""
    version = llama_cpp_version()
    folder = where(version)
    if not installed(folder):
        return install(version, folder)
    if (release := _converter_release(folder)) != f"{DISTRIBUTION}=={version}":
        log.warning("%s holds the %s of %s but %s %s is installed: re-run %s",
                    folder, what, release, DISTRIBUTION, version, command)
    return folder


# -- the tools: llama-imatrix and llama-quantize ----------------------------------------------------
# Neither ships in the llama-cpp-python wheel. The importance matrix is llama-imatrix's (its own
# activation statistics and file format); llama-quantize reads that file and records it in the GGUF
# (quantize.imatrix.*). Both are built from the same sdist as the library and the converter,
# statically linked, into <converter folder>/bin.
TOOLS = ("llama-imatrix", "llama-quantize")
# What the build needs whatever CMAKE_ARGS says: static binaries, no network code, only the tools.
TOOLS_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_COMMON=ON", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
)


def tools_dir(version: str | None = None) -> Path:
    return converter_dir(version) / "bin"


def _tools_installed(folder: Path) -> bool:
    return (folder / ".complete").exists() and all((folder / t).is_file() for t in TOOLS)


def install_tools(version: str | None = None, dest: Path | None = None, sdist: Path | None = None) -> Path:
    """Build llama-imatrix and llama-quantize from the llama-cpp-python sdist of `version` into `dest`.

    The ggml flags are the ones the wheel was built with: $CMAKE_ARGS (the README, .ci/run and the
    Dockerfile set it; a CUDA build of the wheel gives CUDA tools). Idempotent: an existing complete
    build is kept. About 6 minutes on 2 cores, once per machine (or image).
    """
    version = version or llama_cpp_version()
    dest = dest or tools_dir(version)
    if _tools_installed(dest):
        return dest
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise MissingDependency(
                f"building llama.cpp's {' and '.join(TOOLS)} needs {tool}, which is not on PATH. To resolve, "
                "install cmake and a C++ compiler (the jobs image has both at build time), or set "
                "KONDENSE_LLAMA_CPP_DIR to a folder whose bin/ holds them."
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kondense-llama-cpp-tools-") as tmp:
        tmp = Path(tmp)
        sdist = sdist or _download_sdist(version, tmp, " and ".join(TOOLS), "install-tools")
        source = tmp / "src"
        log.info("Extracting llama.cpp's sources from %s", Path(sdist).name)
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                _, _, rel = m.name.partition("/vendor/llama.cpp/")
                if rel and (m.isfile() or m.isdir()):
                    m.name = rel
                    members.append(m)
            tar.extractall(source, members=members, filter="data")
        if not (source / "tools" / "imatrix").is_dir():
            raise InvalidInput(f"{sdist} has no vendor/llama.cpp/tools/imatrix: not the llama-cpp-python sdist")
        flags = [*shlex.split(os.environ.get("CMAKE_ARGS", "")), *TOOLS_CMAKE_ARGS]
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        build = tmp / "build"
        log.info("Building %s from %s %s (cmake %s)", ", ".join(TOOLS), DISTRIBUTION, version, " ".join(flags))
        start = time.monotonic()
        for cmd in (
            ["cmake", "-S", str(source), "-B", str(build), *generator, *flags],
            ["cmake", "--build", str(build), "--target", *TOOLS, "--parallel", str(_build_jobs())],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                (tmp_log := dest.parent / f"{dest.name}-build.log").write_text(proc.stdout + proc.stderr)
                raise MissingDependency(
                    f"building llama.cpp's tools failed at `{' '.join(cmd[:3])}` (exit {proc.returncode}): "
                    f"{_last_line(proc.stderr) or _last_line(proc.stdout)}; the whole log is in {tmp_log}"
                )
        partial = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        partial.chmod(0o755)  # mkdtemp makes it 0700: the image runs as another user than builds it
        for tool in TOOLS:
            shutil.copy2(build / "bin" / tool, partial / tool)
        shutil.copy2(source / "LICENSE", partial / "LICENSE")
        (partial / ".complete").write_text(f"{DISTRIBUTION}=={version}\n")
        if _tools_installed(dest):  # another process finished first
            shutil.rmtree(partial)
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
    log.info("Built %s into %s in %.0f s", ", ".join(TOOLS), dest, time.monotonic() - start)
    return dest


def _build_jobs() -> int:
    return int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or os.cpu_count() or 1)


def ensure_tools() -> Path:
    """The folder holding llama-imatrix and llama-quantize, built now if missing (needs PyPI, cmake)."""
    return _ensure(tools_dir, _tools_installed, install_tools, "tools", "install-tools")


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")
_PROGRESS_LINE = re.compile(r"\d+%\||it/s\]|/s\]$")


def _last_line(text: str) -> str:
    """The line of a subprocess's stderr that says why it failed: the exception, else the last error."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not _PROGRESS_LINE.search(ln)]
    for pattern in (_EXCEPTION_LINE, re.compile(r"^(ERROR|CRITICAL)\b")):
        for line in reversed(lines):
            if pattern.match(line):
                return line[:300]
    return lines[-1][:300] if lines else ""


def _source_outtype(model_dir: Path) -> str:
    """The converter outtype that holds the source weights exactly (see the module docstring)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "f32"
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "f16"}.get(dtype, "f32")


def convert(model_dir: Path, outfile: Path, outtype: str) -> Path:
    """Run convert_hf_to_gguf.py (vendored gguf-py first, pre-tokenizer patch) in a subprocess."""
    folder = ensure_converter()
    cmd = [sys.executable, "-m", "kondense_jobs.gguf", "convert-hf", "--converter", str(folder),
           str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode in (EXIT_UNSUPPORTED_ARCH, EXIT_UNKNOWN_PRETOKENIZER):
        raise InvalidInput(_last_line(proc.stderr))
    if proc.returncode != 0 or not outfile.exists():
        raise _failure(f"convert_hf_to_gguf.py {model_dir.name} --outtype {outtype}", proc)
    log.debug("converter output:\n%s", proc.stderr[-4000:])
    log.info("Converted %s to %s in %.1f s", model_dir.name, outfile.name, time.monotonic() - start)
    return outfile


# llama.cpp's quantizer says how many tensors it could not give the asked type (rows that do not
# divide the type's block of 256 go to a 32-block type): src/llama-quant.cpp, n_fallback.
_FALLBACK_LINE = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")
# Failures a retry can cure; any other failure of a tool on the same input fails the same way again.
_TRANSIENT = re.compile(r"No space left|Cannot allocate memory|out of memory|bad_alloc|MemoryError|Killed", re.I)


def _failure(what: str, proc: subprocess.CompletedProcess) -> Exception:
    """A tool's failure: transient (RuntimeError, retried) when a signal or the machine stopped it,
    InvalidInput (permanent) when the tool refused this input, as it would again."""
    reason = _last_line(proc.stderr) or _last_line(proc.stdout)
    if proc.returncode < 0 or _TRANSIENT.search(reason):
        why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        return RuntimeError(f"{what} failed ({why}): {reason}")
    return InvalidInput(f"{what} failed (exit {proc.returncode}): {reason}")


def _fallbacks(output: str) -> int:
    found = _FALLBACK_LINE.search(output or "")
    return int(found.group(1)) if found else 0


def _quantize_file(src: Path, dst: Path, type: str, imatrix: Path | None = None) -> int:
    """src -> dst at `type` by llama.cpp's quantizer in a subprocess (one line of error if it fails or
    crashes): llama_model_quantize through the library, or llama-quantize with an importance matrix.
    Returns how many tensors fell back to another type."""
    if imatrix is None:
        cmd = [sys.executable, "-m", "kondense_jobs.gguf", "quantize-gguf", str(src), str(dst), type]
    else:
        tool = ensure_tools() / "llama-quantize"
        cmd = [str(tool), "--imatrix", str(imatrix), str(src), str(dst), type.upper(), str(_threads())]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not dst.exists():
        raise _failure(f"llama.cpp's quantizer {src.name} -> {type}", proc)
    fallbacks = _fallbacks(proc.stderr + proc.stdout)
    log.info("Quantized %s to %s in %.1f s%s%s", src.name, dst.name, time.monotonic() - start,
             " with an importance matrix" if imatrix else "",
             f"; {fallbacks} tensor(s) fell back to another type" if fallbacks else "")
    return fallbacks


@dataclass(frozen=True)
class Calibration:
    """What llama-imatrix runs over: the calibration windows decoded to text (llama-imatrix tokenizes
    it back, special tokens included), `n_ctx` tokens per window, at most `chunks` windows."""

    text: str
    n_ctx: int
    chunks: int


@dataclass(frozen=True)
class Made:
    """A GGUF file and how it was made."""

    path: Path
    fallbacks: int = 0  # tensors whose rows did not divide the type's block: a 32-block type instead
    imatrix_chunks: int = 0  # windows the importance matrix was computed on; 0 without one


_CHUNK = re.compile(r"\[(\d+)\]")
_CHUNK_COUNT = re.compile(r"computing over (\d+) chunks")


def imatrix(model: Path, calibration: Calibration, out: Path, progress=None) -> int:
    """llama-imatrix over the calibration text: out (GGUF imatrix). Returns the chunks it ran.

    Progress comes from its per-chunk perplexity line ("[1]12.3,[2]..."), read as it is written.
    """
    tool = ensure_tools() / "llama-imatrix"
    text = out.with_suffix(".txt")
    text.write_text(calibration.text, encoding="utf-8")
    cmd = [str(tool), "-m", str(model), "-f", str(text), "-o", str(out), "--parse-special",
           "-c", str(calibration.n_ctx), "-b", str(calibration.n_ctx), "--chunks", str(calibration.chunks),
           "-t", str(_threads()), "--output-frequency", str(1 << 30)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, total, done = "", calibration.chunks, 0
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(4096):
        output += chunk.decode("utf-8", "replace")
        if found := _CHUNK_COUNT.search(output):
            total = int(found.group(1))
        if (seen := max((int(n) for n in _CHUNK.findall(output[-4096:])), default=0)) > done:
            done = seen
            if progress is not None:
                progress.update(done, total, phase="gguf imatrix")
    proc.wait()
    result = subprocess.CompletedProcess(cmd, proc.returncode, output, output)
    if proc.returncode != 0 or not out.exists():
        raise _failure(f"llama-imatrix on {model.name}", result)
    log.info("Computed the importance matrix of %s over %d windows of %d tokens in %.1f s",
             model.name, done or total, calibration.n_ctx, time.monotonic() - start)
    return done or total


# -- the interface ---------------------------------------------------------------------------------
def quantize(model_dir: Path, out_dir: Path, type: str, progress=None, calibration: Calibration | None = None) -> Made:
    """Write out_dir/model-<type>.gguf from a Hugging Face model folder.

    With `calibration`, a quantizer type is quantized with llama.cpp's importance matrix computed on
    it (llama-imatrix on the lossless intermediate, then llama-quantize --imatrix).
    """
    type = type.lower()
    if type not in TYPES:
        raise InvalidSpec(f"quantize.type {type!r} is not a GGUF type; use one of {', '.join(TYPES)}.")
    if calibration is not None and type in CONVERTER_TYPES:
        raise InvalidSpec(f"an importance matrix needs a type made by llama.cpp's quantizer, not {type}")
    library()  # fail before the conversion, not after it
    if calibration is not None:
        ensure_tools()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"model-{type}.gguf"
    phases = ["gguf convert"] + (["gguf imatrix"] if calibration else []) + ([] if type in CONVERTER_TYPES else ["gguf quantize"])

    def step(done: int) -> None:
        if progress is not None:
            progress.update(done, len(phases), phase=phases[min(done, len(phases) - 1)], force=True)

    step(0)
    fallbacks, chunks = 0, 0
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out_dir) as tmp:  # nothing half-written stays
        if type in CONVERTER_TYPES:
            convert(model_dir, Path(tmp) / target.name, type).replace(target)
        else:
            outtype = _source_outtype(model_dir)
            intermediate = convert(model_dir, Path(tmp) / f"model-{outtype}.gguf", outtype)
            matrix = None
            if calibration is not None:
                step(1)
                matrix = Path(tmp) / "imatrix.gguf"
                chunks = imatrix(intermediate, calibration, matrix, progress)
            step(len(phases) - 1)
            fallbacks = _quantize_file(intermediate, Path(tmp) / target.name, type, matrix)
            (Path(tmp) / target.name).replace(target)
    step(len(phases))
    return Made(target, fallbacks, chunks)


def find_gguf(folder: Path) -> Path | None:
    """The .gguf file of an artifact folder (the largest if several), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = sorted(folder.glob("*.gguf"), key=lambda p: (-p.stat().st_size, p.name))
    return files[0] if files else None


def library():
    try:
        import llama_cpp
    except ImportError as e:
        raise MissingDependency(f"GGUF needs the Python package llama_cpp ({e}). {LLAMA_CPP_HINT}") from e
    return llama_cpp


def _threads() -> int:
    from kondense_jobs.runtime import cpu_budget

    return cpu_budget()


def _load(gguf_path: Path, n_ctx: int, logits_all: bool):
    llama_cpp = library()
    if not Path(gguf_path).is_file():
        raise InvalidInput(f"GGUF file {gguf_path} does not exist")
    n_ctx = max(n_ctx, 8)
    try:
        return llama_cpp.Llama(
            model_path=str(gguf_path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
            logits_all=logits_all, n_threads=_threads(), n_threads_batch=_threads(), verbose=False,
        )
    except ValueError as e:  # llama-cpp-python says "Failed to load model from file: ..."
        raise InvalidInput(f"llama.cpp cannot load {gguf_path.name}: {e}") from None


def perplexity(gguf_path: Path, windows: list[list[int]]) -> float:
    """exp(mean NLL) over every predicted token, tokens 1..n-1 of each window from their prefix.

    The windows are token ids of the Hugging Face tokenizer, fed to llama.cpp as they are (no BOS
    added), so every variant is scored on identical input, with llama.cpp's own defaults otherwise.
    """
    import numpy as np

    windows = [list(w) for w in windows if len(w) >= 2]
    if not windows:
        raise InvalidInput("perplexity needs at least one window of 2 or more tokens")
    llm = _load(Path(gguf_path), max(len(w) for w in windows), logits_all=True)
    try:
        n_vocab = llm.n_vocab()
        nll, count = 0.0, 0
        for w in windows:
            if max(w) >= n_vocab or min(w) < 0:
                raise InvalidInput(
                    f"token ids {min(w)}..{max(w)} fall outside {gguf_path.name}'s vocabulary of {n_vocab}: "
                    "the windows come from another tokenizer"
                )
            llm.reset()
            llm.eval(w)
            logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            nll += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
            count += len(w) - 1
    finally:
        llm.close()
    return float(np.exp(nll / count))


def window_logits(gguf_path: Path, windows: list[list[int]]):
    """Each window's logits [len(window), n_vocab] (float32), every position, from the same token
    ids as perplexity() feeds (no BOS added): what evaluate compares with the baseline's."""
    import numpy as np

    llm = _load(Path(gguf_path), max(len(w) for w in windows), logits_all=True)
    try:
        n_vocab = llm.n_vocab()
        for w in windows:
            if max(w) >= n_vocab or min(w) < 0:
                raise InvalidInput(
                    f"token ids {min(w)}..{max(w)} fall outside {Path(gguf_path).name}'s vocabulary of {n_vocab}: "
                    "the windows come from another tokenizer"
                )
            llm.reset()
            llm.eval(w)
            yield np.array(llm.scores[: len(w)], dtype=np.float32)
    finally:
        llm.close()


# -- subprocess entry points ----------------------------------------------------------------------
def _converter_release(converter: Path) -> str:
    marker = converter / ".complete"
    return marker.read_text().strip() if marker.exists() else str(converter)


# Keys llama.cpp's converter reads that transformers 5 no longer writes -> where it keeps the value.
LEGACY_HPARAMS = {
    "n_ctx": ("n_positions",),  # GPT-2
    "rotary_pct": ("partial_rotary_factor", "rope_parameters.partial_rotary_factor"),  # GPT-NeoX
}


def _find(hparams: dict, paths: tuple[str, ...]):
    for path in paths:
        value = hparams
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def _convert_hf_main(converter: Path, model_dir: Path, argv: list[str]) -> int:
    """Run convert_hf_to_gguf.main() with the vendored gguf-py and the pre-tokenizer fallback."""
    sys.path[:0] = [str(converter / "gguf-py"), str(converter)]
    import gguf  # the vendored one: it is first on sys.path

    if not Path(gguf.__file__).resolve().is_relative_to(converter.resolve()):
        print(f"kondense: imported gguf from {gguf.__file__}, not from {converter}", file=sys.stderr)
        return 1
    from conversion import TEXT_MODEL_MAP
    from conversion.base import ModelBase, ModelType, TextModel, get_model_architecture

    load_hparams = ModelBase.load_hparams

    def with_legacy_keys(dir_model: Path, is_mistral_format: bool):
        """config.json as the converter reads it, plus the keys it still reads under names transformers 5
        dropped (GPT-2's n_ctx, GPT-NeoX's rotary_pct), from where transformers 5 keeps their values."""
        hparams = load_hparams(dir_model, is_mistral_format)
        for key, found in LEGACY_HPARAMS.items():
            if key not in hparams and (value := _find(hparams, found)) is not None:
                hparams[key] = value
        return hparams

    ModelBase.load_hparams = staticmethod(with_legacy_keys)
    arch = get_model_architecture(ModelBase.load_hparams(model_dir, False), ModelType.TEXT)
    if arch not in TEXT_MODEL_MAP:
        print(
            f"llama.cpp's converter (from {_converter_release(converter)}) does not support {arch!r}; "
            "to resolve, quantize this model with another method (bnb-nf4, bnb-int8, gptq)",
            file=sys.stderr,
        )
        return EXIT_UNSUPPORTED_ARCH

    original = TextModel.get_vocab_base_pre
    converter_log = logging.getLogger("hf-to-gguf")

    def get_vocab_base_pre(self, tokenizer) -> str:
        level = converter_log.level
        converter_log.setLevel(logging.ERROR)  # its "not recognized" banner is not the last word here
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            from kondense_jobs.families import LLAMA_CPP_PRETOKENIZERS, llama_cpp_pretokenizer

            try:
                tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                tokenizer_json = {}
            if name := llama_cpp_pretokenizer(tokenizer_json):
                converter_log.setLevel(level)
                converter_log.info("kondense: unknown pre-tokenizer hash; tokenizer.json pre-tokenizes exactly as %s", name)
                return name
            print(
                f"{model_dir.name}: llama.cpp's converter does not recognise this tokenizer's BPE pre-tokenizer, "
                "and its normalizer and pre-tokenizer are not exactly those of one llama.cpp names "
                f"({', '.join(LLAMA_CPP_PRETOKENIZERS)}); to resolve, use a tokenizer llama.cpp knows",
                file=sys.stderr,
            )
            raise SystemExit(EXIT_UNKNOWN_PRETOKENIZER) from None
        finally:
            converter_log.setLevel(level)

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), *argv]
    convert_hf_to_gguf.main()
    return 0


def _quantize_gguf_main(src: str, dst: str, type: str) -> int:
    import ctypes

    llama_cpp = library()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type.upper()}")
    params.nthread = _threads()
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    return 1 if rc != 0 else 0  # llama.cpp has said why on stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kondense_jobs.gguf", description="llama.cpp's converter")
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install-converter", help="extract convert_hf_to_gguf.py from the sdist")
    inst.add_argument("--version", help="llama-cpp-python version (default: the installed one)")
    inst.add_argument("--dest", type=Path, help="target folder (default: see converter_dir)")
    inst.add_argument("--sdist", type=Path, help="a local llama_cpp_python-<version>.tar.gz to extract")
    tools = sub.add_parser("install-tools", help="build llama-imatrix and llama-quantize from the sdist (cmake)")
    tools.add_argument("--version", help="llama-cpp-python version (default: the installed one)")
    tools.add_argument("--dest", type=Path, help="target folder (default: see tools_dir)")
    tools.add_argument("--sdist", type=Path, help="a local llama_cpp_python-<version>.tar.gz to build from")
    conv = sub.add_parser("convert-hf", help="(internal) run convert_hf_to_gguf.py with kondense's patch")
    conv.add_argument("--converter", type=Path, required=True)
    conv.add_argument("model", type=Path)
    quant = sub.add_parser("quantize-gguf", help="(internal) llama_model_quantize SRC DST TYPE")
    quant.add_argument("src")
    quant.add_argument("dst")
    quant.add_argument("type", choices=QUANTIZER_TYPES)
    args, rest = parser.parse_known_args(argv)
    if args.command == "convert-hf":
        return _convert_hf_main(args.converter, args.model, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "quantize-gguf":
        return _quantize_gguf_main(args.src, args.dst, args.type)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    install = install_tools if args.command == "install-tools" else install_converter
    print(install(args.version, args.dest, args.sdist))
    return 0


if __name__ == "__main__":
    sys.exit(main())

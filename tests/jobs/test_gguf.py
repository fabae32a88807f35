"""GGUF through llama.cpp's converter and quantizer, measured through llama.cpp.

Fast tests cover the pure parts (error lines, converter extraction, the tools build, failure
classification). Slow tests convert the tiny models and compare llama.cpp's perplexity with the
Hugging Face model's on identical token windows; transformers' own GGUF reader (dequantizing in
numpy, evaluating in torch) is an independent second opinion on the quantized files.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from kondense.errors import InvalidInput, InvalidSpec, MissingDependency
from kondense_jobs import gguf

N_WINDOWS, WINDOW = 12, 128

# |llama.cpp perplexity / HF perplexity - 1| allowed per type. f32 and q8_0 are the issue's
# figures; the others are measured on the tiny teacher (these 12 windows: q4_0 0.06%, q4_k_m 0.04%,
# q5_k_m 0.004%; 16 other windows: 0.12%, 0.11%, 0.07%) with a 3-5x margin.
BOUNDS = {"f32": 0.001, "q8_0": 0.005, "q4_0": 0.006, "q4_k_m": 0.004, "q5_k_m": 0.003}


# -- fast ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stderr, expected",
    [
        pytest.param(
            'INFO:x: loading\nTraceback (most recent call last):\n  File "a.py"\nValueError: bad shape\n'
            "Writing:   0%|          | 0.00/255k [00:00<?, ?byte/s]\n",
            "ValueError: bad shape",
            id="exception-before-tqdm",
        ),
        pytest.param(
            "INFO:a\nERROR:hf-to-gguf:Model Foo is not supported\nINFO:b\n",
            "ERROR:hf-to-gguf:Model Foo is not supported",
            id="error-log",
        ),
        pytest.param(
            "llama_model_quantize: failed to quantize: tensor 'x' is corrupted\n",
            "llama_model_quantize: failed to quantize: tensor 'x' is corrupted",
            id="plain-last-line",
        ),
        pytest.param("", "", id="empty"),
    ],
)
def test_last_line_finds_the_reason(stderr, expected):
    assert gguf._last_line(stderr) == expected


def _fake_sdist(path: Path, version: str) -> Path:
    root = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    files = {
        "convert_hf_to_gguf.py": "print('converter')\n",
        "conversion/__init__.py": "",
        "conversion/llama.py": "",
        "gguf-py/gguf/__init__.py": "",
        "gguf-py/tests/test_x.py": "",
        "gguf-py/README.md": "",
        "LICENSE": "MIT",
        "src/llama.cpp": "// not needed",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in {
            **{root + k: v for k, v in files.items()},
            f"llama_cpp_python-{version}/setup.py": "",
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_install_converter_extracts_only_what_the_converter_imports(tmp_path):
    sdist = _fake_sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", "9.9.9")
    dest = gguf.install_converter("9.9.9", tmp_path / "conv", sdist)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == [
        ".complete",
        "LICENSE",
        "conversion/__init__.py",
        "conversion/llama.py",
        "convert_hf_to_gguf.py",
        "gguf-py/gguf/__init__.py",
    ]
    assert (dest / ".complete").read_text().strip() == "llama-cpp-python==9.9.9"
    assert dest.stat().st_mode & 0o777 == 0o755  # readable by the image's non-root user
    assert (
        gguf.install_converter("9.9.9", dest, tmp_path / "absent.tar.gz") == dest
    )  # idempotent: not re-read


def _tools_sdist(path: Path, version: str, broken: bool = False) -> Path:
    """An sdist whose vendor/llama.cpp is a small CMake project with the two tool targets."""
    root = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    main = 'int main(void) { return 0; }\n'
    files = {
        "CMakeLists.txt": "cmake_minimum_required(VERSION 3.14)\nproject(fake C)\n"
        "set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)\n"
        "add_executable(llama-imatrix tools/imatrix/imatrix.c)\nadd_executable(llama-quantize tools/quantize/main.c)\n"
        "add_executable(llama-server tools/server/server.c)\n",
        "tools/imatrix/imatrix.c": main if not broken else "this is not C\n",
        "tools/quantize/main.c": main,
        "tools/server/server.c": "#error only the two tools are built\n",
        "LICENSE": "MIT",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(root + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("cc") is None, reason="needs cmake and a C compiler")
def test_install_tools_builds_only_the_two_tools_from_the_sdist(tmp_path):
    import subprocess

    sdist = _tools_sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", "9.9.9")
    dest = gguf.install_tools("9.9.9", tmp_path / "bin", sdist)
    assert sorted(p.name for p in dest.iterdir()) == [".complete", "LICENSE", "llama-imatrix", "llama-quantize"]
    assert subprocess.run([dest / "llama-imatrix"]).returncode == 0  # a binary cmake built, not a copy of text
    assert (dest / ".complete").read_text().strip() == "llama-cpp-python==9.9.9"
    assert dest.stat().st_mode & 0o777 == 0o755  # runnable by the image's non-root user
    assert gguf.install_tools("9.9.9", dest, tmp_path / "absent.tar.gz") == dest  # idempotent: not rebuilt


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("cc") is None, reason="needs cmake and a C compiler")
def test_a_failed_tools_build_says_where_its_log_is_and_installs_nothing(tmp_path):
    sdist = _tools_sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", "9.9.9", broken=True)
    with pytest.raises(MissingDependency, match="cmake --build") as err:
        gguf.install_tools("9.9.9", tmp_path / "bin", sdist)
    log = Path(str(err.value).rsplit(" ", 1)[1])
    assert log.exists() and "imatrix.c" in log.read_text()
    assert not (tmp_path / "bin").exists() and not list(tmp_path.glob(".bin.partial-*"))


def test_install_converter_without_an_index_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "no-pip.conf"))  # no find-links from a config
    with pytest.raises(MissingDependency, match="install-converter") as err:
        gguf.install_converter("0.0.1", tmp_path / "conv")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "conv").exists()


def test_demo_fetches_the_converter_beside_the_inputs_and_leaves_failures_to_the_stage(tmp_path, monkeypatch):
    from kondense import demo

    version = gguf.llama_cpp_version()
    monkeypatch.setenv("KONDENSE_LLAMA_CPP_DIR", str(tmp_path / "conv"))
    fetched_in = []

    def download(v, folder, what, command):  # the pip download; extraction and install are real
        fetched_in.append(threading.current_thread().name)
        return _fake_sdist(tmp_path / f"llama_cpp_python-{v}.tar.gz", v)

    monkeypatch.setattr(gguf, "_download_sdist", download)
    pipeline = demo.pipeline("file:///unused")
    thread = demo.prefetch_tools(pipeline)
    thread.join(30)
    assert fetched_in == ["prefetch-gguf-converter"]
    assert (tmp_path / "conv" / ".complete").read_text().strip() == f"llama-cpp-python=={version}"

    # no gguf stage: nothing to fetch
    pipeline.spec.stages = [s for s in pipeline.spec.stages if not (s.quantize and s.quantize.method == "gguf")]
    assert demo.prefetch_tools(pipeline) is None

    # an unreachable index: the thread ends quietly, nothing is half installed, the stage will say why
    def unreachable(v, folder, what, command):
        fetched_in.append(threading.current_thread().name)
        raise MissingDependency("no index")

    monkeypatch.setenv("KONDENSE_LLAMA_CPP_DIR", str(tmp_path / "conv2"))
    monkeypatch.setattr(gguf, "_download_sdist", unreachable)
    raised = []
    monkeypatch.setattr(threading, "excepthook", raised.append)
    thread = demo.prefetch_tools(demo.pipeline("file:///unused"))
    thread.join(30)
    assert fetched_in == ["prefetch-gguf-converter"] * 2  # it did try
    assert not thread.is_alive() and raised == [] and not (tmp_path / "conv2").exists()


def test_converter_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("KONDENSE_LLAMA_CPP_DIR", str(tmp_path / "x"))
    assert gguf.converter_dir("1.2.3") == tmp_path / "x"
    monkeypatch.delenv("KONDENSE_LLAMA_CPP_DIR")
    assert gguf.converter_dir("1.2.3").name == "llama.cpp-1.2.3"


def test_unknown_type_is_invalid_spec(tmp_path):
    with pytest.raises(InvalidSpec, match="q4_k_m"):
        gguf.quantize(tmp_path, tmp_path / "out", "q3_k_xl")


def test_missing_llama_cpp_is_missing_dependency(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    with pytest.raises(MissingDependency, match="pip install"):
        gguf.quantize(tmp_path, tmp_path / "out", "q8_0")
    with pytest.raises(MissingDependency):
        gguf.perplexity(tmp_path / "model.gguf", [[1, 2, 3]])


@pytest.mark.parametrize(
    "returncode, stderr, transient",
    [
        pytest.param(1, "Traceback (most recent call last):\nValueError: bad shape\n", False, id="exception"),
        pytest.param(1, "llama_model_quantize: failed to quantize: unknown model architecture\n", False, id="refused"),
        pytest.param(-9, "", True, id="killed"),
        pytest.param(1, "OSError: [Errno 28] No space left on device\n", True, id="disk-full"),
        pytest.param(1, "terminate called after throwing an instance of 'std::bad_alloc'\n", True, id="bad-alloc"),
    ],
)
def test_a_tool_failure_is_permanent_unless_the_machine_stopped_it(returncode, stderr, transient):
    error = gguf._failure("tool x", __import__("subprocess").CompletedProcess(["x"], returncode, "", stderr))
    assert type(error) is (RuntimeError if transient else InvalidInput), error
    assert str(error).startswith("tool x failed (")


def test_fallbacks_are_read_from_the_quantizer_log():
    log = "llama_model_quantize_impl: WARNING: 14 of 23 tensor(s) required fallback quantization\n"
    assert gguf._fallbacks(log) == 14
    assert gguf._fallbacks("llama_model_quantize_impl: model size = 21.00 MiB\n") == 0


def test_an_importance_matrix_is_refused_for_the_converters_types(tmp_path):
    with pytest.raises(InvalidSpec, match="quantizer"):
        gguf.quantize(tmp_path, tmp_path / "out", "q8_0", calibration=gguf.Calibration("text", 8, 2))


def test_find_gguf(tmp_path):
    assert gguf.find_gguf(tmp_path) is None
    assert gguf.find_gguf(tmp_path / "absent") is None
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "model-q8_0.gguf").write_bytes(b"G" * 10)
    assert gguf.find_gguf(tmp_path) == tmp_path / "model-q8_0.gguf"


# -- slow: real conversions ------------------------------------------------------------------------
needs_llama_cpp = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed"
)


def hf_perplexity(model_dir: Path, windows: list[list[int]]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _torch_perplexity(model, windows)


def _torch_perplexity(model, windows: list[list[int]]) -> float:
    import torch

    with torch.no_grad():
        ids = torch.tensor(windows)
        logits = model(input_ids=ids).logits[:, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(nll.item())


def transformers_gguf_perplexity(path: Path, windows: list[list[int]]) -> float:
    """The same GGUF file read by transformers (numpy dequantization) and run in torch."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return _torch_perplexity(model, windows)


def _windows(model_dir: Path, texts: list[str]) -> list[list[int]]:
    from kondense_jobs.data import token_stream, windows
    from transformers import AutoTokenizer

    ws = windows(
        token_stream(AutoTokenizer.from_pretrained(model_dir), texts), WINDOW, limit=WINDOW * N_WINDOWS
    )
    assert len(ws) == N_WINDOWS
    return ws


@pytest.fixture(scope="module")
def held_out(corpus_texts) -> list[str]:
    return corpus_texts[1200:]  # the teacher fixture trains on [:1200]


@pytest.fixture(scope="module")
def teacher_windows(tiny_teacher, held_out):
    return _windows(tiny_teacher, held_out)


@pytest.fixture(scope="module")
def teacher_hf_ppl(tiny_teacher, teacher_windows) -> float:
    return hf_perplexity(tiny_teacher, teacher_windows)


@pytest.fixture(scope="module")
def teacher_made(tiny_teacher, tmp_path_factory):
    """teacher_made(type) -> gguf.Made, each type converted once per module."""
    out = tmp_path_factory.mktemp("gguf-teacher")
    made: dict[str, gguf.Made] = {}

    def get(type: str) -> gguf.Made:
        if type not in made:
            made[type] = gguf.quantize(tiny_teacher, out, type)
        return made[type]

    return get


@pytest.fixture(scope="module")
def teacher_gguf(teacher_made):
    """teacher_gguf(type) -> Path"""
    return lambda type: teacher_made(type).path


def _rel(a: float, b: float) -> float:
    return abs(a / b - 1)


@needs_llama_cpp
@pytest.mark.slow
def test_f32_matches_hf_and_generates_the_same_tokens(
    tiny_teacher, teacher_gguf, teacher_windows, teacher_hf_ppl, argmax_steps
):
    import numpy as np

    from kondense_jobs import speed

    path = teacher_gguf("f32")
    assert path.name == "model-f32.gguf"
    assert all(
        p.name.startswith("model-") and p.suffix == ".gguf" for p in path.parent.iterdir()
    )  # no leftovers
    ppl = gguf.perplexity(path, teacher_windows)
    assert _rel(ppl, teacher_hf_ppl) < BOUNDS["f32"], (ppl, teacher_hf_ppl)

    prompt = np.array([teacher_windows[0][:16]])
    timed = speed.llama_cpp(path, prompt, 16, [1])
    assert timed.generated[1].tolist() == argmax_steps(tiny_teacher, prompt, 16)
    assert timed.timings[0].decode_tokens_per_second > 0


@needs_llama_cpp
@pytest.mark.slow
def test_speed_batches_sequences_in_llama_cpp_and_generates_what_transformers_does(
    teacher_gguf, teacher_windows, tiny_teacher, argmax_steps
):
    """kondense_jobs.speed times GGUF files with llama.cpp's batch API (one sequence per row): the
    rows of a batch generate, each, what transformers generates for that row alone; and the peak
    memory holds the memory-mapped weights, which generating touches."""
    import numpy as np

    from kondense_jobs import speed

    path = teacher_gguf("f32")
    rows = speed.prompts(np.concatenate(teacher_windows), 16, 4)
    timed = speed.llama_cpp(path, rows, 8, [1, 4])
    assert timed.engine == "llama.cpp (cpu)" and [t.batch for t in timed.timings] == [1, 4]
    assert all(t.prefill_tokens_per_second > 0 and t.decode_tokens_per_second > 0 for t in timed.timings)
    expected = argmax_steps(tiny_teacher, rows, 8)
    assert timed.generated[4].tolist() == expected
    assert timed.generated[1].tolist() == expected[:1]
    assert path.stat().st_size <= timed.peak_memory_bytes < path.stat().st_size + (256 << 20)


@needs_llama_cpp
@pytest.mark.slow
def test_q8_0_within_half_a_percent_of_hf(teacher_gguf, teacher_windows, teacher_hf_ppl):
    ppl = gguf.perplexity(teacher_gguf("q8_0"), teacher_windows)
    assert _rel(ppl, teacher_hf_ppl) < BOUNDS["q8_0"], (ppl, teacher_hf_ppl)


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("type", ["q4_0", "q4_k_m", "q5_k_m"])
def test_quantizer_types_load_generate_and_stay_close(type, teacher_gguf, teacher_windows, teacher_hf_ppl):
    from gguf import GGUFReader  # PyPI gguf: reads what llama.cpp wrote

    path = teacher_gguf(type)
    file_type = GGUFReader(path).fields["general.file_type"].contents()
    assert file_type == getattr(__import__("llama_cpp"), f"LLAMA_FTYPE_MOSTLY_{type.upper()}")
    ppl = gguf.perplexity(path, teacher_windows)
    assert _rel(ppl, teacher_hf_ppl) < BOUNDS[type], (ppl, teacher_hf_ppl)
    assert ppl != gguf.perplexity(teacher_gguf("f32"), teacher_windows)  # it really is quantized


@needs_llama_cpp
@pytest.mark.slow
@pytest.mark.parametrize("type", ["q4_k_m", "q2_k", "iq4_xs"])
def test_fallback_tensors_are_counted(type, teacher_made):
    """The teacher's rows (128, 384) do not divide 256: every K/IQ matrix falls back to a 32-block
    type, and Made.fallbacks says how many, as the report will. output.weight is not counted:
    llama.cpp gives a narrow output tensor Q8_0 by its own rule, before any fallback."""
    from gguf import GGUFReader

    made = teacher_made(type)
    tensors = {t.name: t.tensor_type.name for t in GGUFReader(made.path).tensors if len(t.shape) == 2}
    fallback_types = {"Q5_0", "Q8_0", "Q4_0", "IQ4_NL"}  # what 256-block types fall back to
    fell_back = [name for name, kind in tensors.items() if name != "output.weight" and kind in fallback_types]
    assert made.fallbacks == len(fell_back) == len(tensors) - 1, (made.fallbacks, tensors)


@needs_llama_cpp
@pytest.mark.slow
def test_llama_cpp_agrees_with_transformers_reading_the_same_file(teacher_gguf, teacher_windows):
    path = teacher_gguf("q4_k_m")
    ours, theirs = gguf.perplexity(path, teacher_windows), transformers_gguf_perplexity(path, teacher_windows)
    assert _rel(ours, theirs) < 0.001, (ours, theirs)


@needs_llama_cpp
@pytest.mark.slow
def test_sizes_shrink_with_bits(teacher_gguf):
    sizes = {t: teacher_gguf(t).stat().st_size for t in ("f32", "q8_0", "q4_k_m")}
    assert sizes["f32"] > sizes["q8_0"] > sizes["q4_k_m"], sizes


@needs_llama_cpp
@pytest.mark.slow
def test_qwen2_converts(tiny_student_qwen2, held_out, tmp_path):
    windows = _windows(tiny_student_qwen2, held_out)[:4]
    path = gguf.quantize(tiny_student_qwen2, tmp_path, "q8_0").path
    ppl, hf = gguf.perplexity(path, windows), hf_perplexity(tiny_student_qwen2, windows)
    assert _rel(ppl, hf) < BOUNDS["q8_0"], (ppl, hf)


@needs_llama_cpp
@pytest.mark.slow
def test_k_quant_blocks_on_a_model_wide_enough_for_them(wide_model, held_out, tmp_path):
    """K-quants need rows of 256: the 128-wide teacher's q4_k_m falls back to Q5_0/Q8_0 everywhere."""
    from gguf import GGUFReader

    model_dir = wide_model
    made = gguf.quantize(model_dir, tmp_path / "out", "q4_k_m")
    path = made.path
    kinds = {t.tensor_type.name for t in GGUFReader(path).tensors}
    assert {"Q4_K", "Q6_K"} <= kinds, kinds
    assert made.fallbacks == 0 and made.imatrix_chunks == 0
    windows = _windows(model_dir, held_out)[:4]
    ours, theirs = gguf.perplexity(path, windows), transformers_gguf_perplexity(path, windows)
    assert _rel(ours, theirs) < 0.001, (ours, theirs)


@pytest.fixture(scope="module")
def wide_model(tiny_tokenizer, tmp_path_factory) -> Path:
    """Rows of 256 and 768: K-quants apply without fallbacks."""
    from kondense_jobs.tiny import build_model

    return build_model(tmp_path_factory.mktemp("wide") / "m", tiny_tokenizer, family="llama", layers=1, hidden=256, heads=4, seed=3)


@needs_llama_cpp
@pytest.mark.slow
def test_an_importance_matrix_is_computed_by_llama_cpp_and_quantizes_the_file(wide_model, held_out, tmp_path):
    """llama-imatrix runs over the calibration windows; llama-quantize records the matrix it used
    (quantize.imatrix.*) and the weights differ from the same type without it."""
    from gguf import GGUFReader

    text = "\n\n".join(held_out[:200])
    with_matrix = gguf.quantize(wide_model, tmp_path / "with", "q4_k_m", calibration=gguf.Calibration(text, 64, 4))
    without = gguf.quantize(wide_model, tmp_path / "without", "q4_k_m")
    assert with_matrix.imatrix_chunks == 4 and without.imatrix_chunks == 0

    reader = GGUFReader(with_matrix.path)
    fields = {name: field.contents() for name, field in reader.fields.items() if name.startswith("quantize.imatrix.")}
    matrices = [t.name for t in reader.tensors if len(t.shape) == 2 and t.name not in ("token_embd.weight", "output.weight")]
    assert fields["quantize.imatrix.chunks_count"] == 4, fields
    assert fields["quantize.imatrix.entries_count"] == len(matrices), (fields, matrices)  # every linear layer's input
    assert not any(name.startswith("quantize.") for name in GGUFReader(without.path).fields)

    blocks = {t.name: bytes(t.data) for t in reader.tensors if t.name in matrices}
    changed = [n for n, b in blocks.items() if b != bytes(next(t for t in GGUFReader(without.path).tensors if t.name == n).data)]
    assert changed == matrices  # the matrix weighed every quantized layer's rounding
    windows = _windows(wide_model, held_out)[:4]
    ours, theirs = gguf.perplexity(with_matrix.path, windows), hf_perplexity(wide_model, windows)
    assert _rel(ours, theirs) < 0.01, (ours, theirs)


@needs_llama_cpp
@pytest.mark.slow
def test_the_quantize_stage_computes_the_matrix_on_its_calibration_windows(tmp_path, make_run, run_stage, tiny_teacher, tiny_dataset):
    """q4_k_m takes an importance matrix by default, over calibrationSamples windows of the training
    split; the stage reports them and the fallbacks of the teacher's 128-wide rows."""
    from gguf import GGUFReader
    from kondense.api import QuantizeSpec

    config = QuantizeSpec(method="gguf", type="q4_k_m", calibration_samples=3, calibration_seq_length=64)
    _, spec = make_run(tmp_path, "quantize", config, {"model": tiny_teacher}, dataset=tiny_dataset)
    code, summary, output = run_stage("quantize", spec, tmp_path)
    assert code == 0, output[-3000:]
    assert summary.metrics["imatrixWindows"] == 3 and summary.metrics["ggufFallbackTensors"] > 0, summary.metrics
    path = gguf.find_gguf(tmp_path / "store" / "quantize")
    fields = GGUFReader(path).fields
    assert fields["quantize.imatrix.chunks_count"].contents() == 3
    assert "with an importance matrix" in output


@needs_llama_cpp
@pytest.mark.slow
def test_unsupported_architecture_is_invalid_input(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["KondenseToyForCausalLM"], "model_type": "toy"})
    )
    with pytest.raises(InvalidInput, match="KondenseToyForCausalLM"):
        gguf.quantize(tmp_path, tmp_path / "out", "q8_0")
    assert list((tmp_path / "out").iterdir()) == []


@needs_llama_cpp
@pytest.mark.slow
def test_unknown_pretokenizer_is_still_refused(tiny_student_qwen2, tmp_path):
    model_dir = tmp_path / "whitespace"
    shutil.copytree(tiny_student_qwen2, model_dir)
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (model_dir / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InvalidInput, match="pre-tokenizer"):
        gguf.quantize(model_dir, tmp_path / "out", "f32")


@needs_llama_cpp
@pytest.mark.slow
def test_converter_failure_is_one_line_with_its_reason(tiny_student_qwen2, tmp_path):
    model_dir = tmp_path / "truncated"
    shutil.copytree(tiny_student_qwen2, model_dir)
    with open(model_dir / "model.safetensors", "r+b") as f:
        f.truncate(5000)
    # The same file fails the same way again: permanent (exit 11), never retried as a transient Error.
    with pytest.raises(InvalidInput, match=r"convert_hf_to_gguf.py truncated --outtype q8_0 failed") as err:
        gguf.quantize(model_dir, tmp_path / "out", "q8_0")
    assert "\n" not in str(err.value) and "Error" in str(err.value).split("failed", 1)[1], str(err.value)
    assert list((tmp_path / "out").iterdir()) == []

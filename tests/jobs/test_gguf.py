"""GGUF through llama.cpp's converter and quantizer, measured through llama.cpp.

Fast tests cover the pure parts (pre-tokenizer recognition, error lines, converter extraction,
error mapping). Slow tests convert the tiny models and compare llama.cpp's perplexity with the
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
GPT2_PRE = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


@pytest.mark.parametrize(
    "pre_tokenizer, normalizer, model_type, expected",
    [
        pytest.param(GPT2_PRE, None, "BPE", True, id="gpt2-bytelevel"),
        pytest.param({"type": "ByteLevel"}, None, "BPE", True, id="bytelevel-defaults"),
        pytest.param({**GPT2_PRE, "add_prefix_space": True}, None, "BPE", False, id="prefix-space"),
        pytest.param({**GPT2_PRE, "use_regex": False}, None, "BPE", False, id="no-regex"),
        pytest.param({"type": "Sequence", "pretokenizers": [GPT2_PRE]}, None, "BPE", False, id="sequence"),
        pytest.param({"type": "Metaspace", "replacement": "_"}, None, "BPE", False, id="metaspace"),
        pytest.param(GPT2_PRE, {"type": "NFC"}, "BPE", False, id="normalizer"),
        pytest.param(GPT2_PRE, None, "WordPiece", False, id="wordpiece"),
    ],
)
def test_gpt2_pretokenizer_is_recognised_only_exactly(
    tmp_path, pre_tokenizer, normalizer, model_type, expected
):
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"pre_tokenizer": pre_tokenizer, "normalizer": normalizer, "model": {"type": model_type}})
    )
    assert gguf._is_gpt2_pretokenizer(tmp_path) is expected


def test_no_tokenizer_json_is_not_gpt2(tmp_path):
    assert gguf._is_gpt2_pretokenizer(tmp_path) is False


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
    assert (
        gguf.install_converter("9.9.9", dest, tmp_path / "absent.tar.gz") == dest
    )  # idempotent: not re-read


def test_install_converter_without_an_index_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "no-pip.conf"))  # no find-links from a config
    with pytest.raises(MissingDependency, match="install-converter") as err:
        gguf.install_converter("0.0.1", tmp_path / "conv")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "conv").exists()


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
def teacher_gguf(tiny_teacher, tmp_path_factory):
    """teacher_gguf(type) -> Path, each type converted once per module."""
    out = tmp_path_factory.mktemp("gguf-teacher")
    made: dict[str, Path] = {}

    def get(type: str) -> Path:
        if type not in made:
            made[type] = gguf.quantize(tiny_teacher, out, type)
        return made[type]

    return get


def _rel(a: float, b: float) -> float:
    return abs(a / b - 1)


@needs_llama_cpp
@pytest.mark.slow
def test_f32_matches_hf_and_generates_the_same_tokens(
    tiny_teacher, teacher_gguf, teacher_windows, teacher_hf_ppl
):
    import torch
    from transformers import AutoModelForCausalLM

    path = teacher_gguf("f32")
    assert path.name == "model-f32.gguf"
    assert all(
        p.name.startswith("model-") and p.suffix == ".gguf" for p in path.parent.iterdir()
    )  # no leftovers
    ppl = gguf.perplexity(path, teacher_windows)
    assert _rel(ppl, teacher_hf_ppl) < BOUNDS["f32"], (ppl, teacher_hf_ppl)

    prompt = teacher_windows[0][:16]
    ids, seconds = gguf.greedy(path, prompt, 16)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    expected = list(prompt)
    with torch.no_grad():  # plain argmax steps: generate() would mask EOS under min_new_tokens
        for _ in range(16):
            expected.append(int(model(input_ids=torch.tensor([expected])).logits[0, -1].argmax()))
    assert ids == expected[16:]
    assert seconds > 0


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
    assert math.isfinite(tps := gguf.tokens_per_second(path, teacher_windows[1][:16], 16)) and tps > 0


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
    path = gguf.quantize(tiny_student_qwen2, tmp_path, "q8_0")
    ppl, hf = gguf.perplexity(path, windows), hf_perplexity(tiny_student_qwen2, windows)
    assert _rel(ppl, hf) < BOUNDS["q8_0"], (ppl, hf)


@needs_llama_cpp
@pytest.mark.slow
def test_k_quant_blocks_on_a_model_wide_enough_for_them(tiny_tokenizer, held_out, tmp_path):
    """K-quants need rows of 256: the 128-wide teacher's q4_k_m falls back to Q5_0/Q8_0 everywhere."""
    from gguf import GGUFReader
    from kondense_jobs.tiny import build_model

    model_dir = build_model(
        tmp_path / "wide", tiny_tokenizer, family="llama", layers=1, hidden=256, heads=4, seed=3
    )
    path = gguf.quantize(model_dir, tmp_path / "out", "q4_k_m")
    kinds = {t.tensor_type.name for t in GGUFReader(path).tensors}
    assert {"Q4_K", "Q6_K"} <= kinds, kinds
    windows = _windows(model_dir, held_out)[:4]
    ours, theirs = gguf.perplexity(path, windows), transformers_gguf_perplexity(path, windows)
    assert _rel(ours, theirs) < 0.001, (ours, theirs)


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
    with pytest.raises(RuntimeError, match=r"convert_hf_to_gguf.py truncated --outtype q8_0 failed") as err:
        gguf.quantize(model_dir, tmp_path / "out", "q8_0")
    assert "\n" not in str(err.value) and "Error" in str(err.value).split("failed", 1)[1], str(err.value)
    assert list((tmp_path / "out").iterdir()) == []

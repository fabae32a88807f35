"""Every quantize method on a tiny model of each causal-LM family, through the stage's entrypoint.

Each family's model is built once per session from a config (2 layers, hidden 64), with the shared
byte-level BPE tokenizer saved as transformers 5.17 saves it for that family (tiny.save_tokenizer:
Qwen2 comes back with NFC + Qwen2's Split regex, GPT-NeoX with NFC). A method that takes the
family must publish an output that reloads (transformers, or llama.cpp for GGUF) and generates; a
method that does not must fail before any weight loads, naming the family, the method and what to
use instead. EXPECTED is what running them found; families.TABLE and README's table must say the same.

The stages run in this process through kondense_jobs.__main__.main, the function
`python -m kondense_jobs quantize` runs: one import of torch, transformers and llm-compressor for
the ~35 runs instead of one per run (the file takes about 2 minutes on 2 cores instead of 10).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from kondense.api import QuantizeSpec
from kondense.events import parse_summary
from kondense.store import FileStore
from kondense_jobs import families, tiny

ROOT = Path(__file__).resolve().parents[2]
SEQ = 32
# method -> the spec the matrix runs (gguf: q8_0, the converter alone)
SPECS = {
    "bnb-nf4": {"method": "bnb-nf4", "compute_dtype": "float32"},
    "bnb-int8": {"method": "bnb-int8"},
    "gptq": {"method": "gptq", "bits": 4, "group_size": 32, "calibration_samples": 4, "calibration_seq_length": SEQ},
    "awq": {"method": "awq", "group_size": 32, "calibration_samples": 4, "calibration_seq_length": SEQ},
    "fp8-dynamic": {"method": "fp8-dynamic"},
    "w8a8-int8": {"method": "w8a8-int8", "calibration_samples": 4, "calibration_seq_length": SEQ},
    "gguf": {"method": "gguf", "type": "q8_0"},
}
CPU_METHODS = ("bnb-nf4", "bnb-int8", "gptq", "fp8-dynamic", "w8a8-int8", "gguf")
CONV1D = ("InvalidSpec", "Conv1D", "bnb-nf4, bnb-int8 or gguf")
SENTENCEPIECE = ("InvalidInput", "tokenizer.model", "bnb-nf4, bnb-int8 or gptq")
# (family, method) -> (reason, words of the why, the alternative) for every refused combination
REFUSED = {
    **{("gpt2", m): CONV1D for m in ("gptq", "awq", "fp8-dynamic", "w8a8-int8")},
    ("gemma", "gguf"): SENTENCEPIECE,
    ("phi3", "gguf"): SENTENCEPIECE,
    ("gpt_neox", "w8a8-int8"): ("InvalidSpec", "SmoothQuant", r"gptq \(bits 8\) or fp8-dynamic"),
}
# the pre-tokenizer llama.cpp is told for each family's tokenizer as transformers re-saves it
PRETOKENIZER = {"llama": "gpt-2", "qwen2": "qwen2", "mistral": "gpt-2", "gemma": "gpt-2", "phi3": "gpt-2",
                "gpt2": "gpt-2", "gpt_neox": "mpt"}  # what the tokenizer.json maps to (gguf converts some)
TEXT = "The module's 2024 results: 33 tests   passed,\n\n  1,234.5 ok? I'll see"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def family_model(models_root, tiny_tokenizer):
    """family -> the folder of its tiny model (built on first use, once per session)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny.build_model(models_root / f"family-{family}", tiny_tokenizer, family=family,
                                             layers=2, hidden=64, heads=4, seed=3)
        return built[family]

    return get


def run_quantize(tmp_path: Path, make_run, model: Path, dataset: Path, spec: dict):
    """The quantize stage's entrypoint in this process: (exit code, summary, published folder)."""
    from kondense_jobs.__main__ import main

    run, spec_path = make_run(tmp_path, "quantize", QuantizeSpec(**spec), {"model": model}, dataset=dataset)
    term = tmp_path / "termination.log"
    code = main(["quantize", "--spec", str(spec_path), "--termination-log", str(term),
                 "--cache-dir", str(tmp_path / "cache")])
    return code, parse_summary(term.read_text()), FileStore.path(run.output)


def without_weights(model: Path, into: Path) -> Path:
    """A copy of the model folder whose weight file is garbage: loading it (or reading its safetensors
    header) fails, so a refusal that names the family proves no weight was read."""
    shutil.copytree(model, into)
    for weights in into.glob("*.safetensors"):
        weights.write_bytes(b"\xff" * 64)
    return into


def llama_cpp_tokens(path: Path, text: str) -> list[int]:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return vocab.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        vocab.close()


def gguf_pretokenizer(path: Path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(path).fields["tokenizer.ggml.pre"]
    return bytes(field.parts[-1]).decode()


# -- every family x every CPU method ---------------------------------------------------------------
MATRIX = [pytest.param(f, m, id=f"{f}-{m}") for f in tiny.FAMILIES for m in CPU_METHODS]


@pytest.mark.slow
@pytest.mark.parametrize("family, method", MATRIX)
def test_method_quantizes_the_family_or_refuses_before_loading(tmp_path, make_run, family_model, tiny_dataset, family, method):
    model = family_model(family)
    assert json.loads((model / "config.json").read_text())["model_type"] == family
    refused = REFUSED.get((family, method))
    if refused:
        reason, why, instead = refused
        broken = without_weights(model, tmp_path / "model")
        code, summary, _ = run_quantize(tmp_path, make_run, broken, tiny_dataset, SPECS[method])
        assert (code, summary.reason) == ({"InvalidSpec": 10, "InvalidInput": 11}[reason], reason), summary.message
        name = families.NAMES[family]
        assert summary.message.startswith(f"{name} ({family}) cannot be quantized with method {method}: "), summary.message
        assert why in summary.message and re.search(rf"To resolve, (.*, or )?use method {instead}[.,]", summary.message), summary.message
        return

    code, summary, out = run_quantize(tmp_path, make_run, model, tiny_dataset, SPECS[method])
    assert code == 0 and summary.state == "Succeeded", summary.message
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt = tokenizer("The module provides", add_special_tokens=False)["input_ids"]
    if method == "gguf":
        from kondense_jobs import gguf

        path = gguf.find_gguf(out)
        assert path is not None and path.name == "model-q8_0.gguf"
        assert gguf_pretokenizer(path) == PRETOKENIZER[family]
        # llama.cpp pre-tokenizes as the Hugging Face tokenizer does: digits, contractions, spaces, newlines
        assert llama_cpp_tokens(path, TEXT) == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
        import numpy as np

        from kondense_jobs import speed

        assert speed.llama_cpp(path, np.array([prompt]), 4, [1]).generated[1].shape == (1, 4)
        return

    import torch
    from transformers import AutoModelForCausalLM

    assert "quantization_config" in json.loads((out / "config.json").read_text())
    assert summary.metrics["quantizedModules"] > 0
    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    assert AutoTokenizer.from_pretrained(out)(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    ids = torch.tensor([prompt])
    generated = reloaded.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                  min_new_tokens=4, do_sample=False)
    assert generated.shape[1] == len(prompt) + 4


@pytest.mark.skipif(_cuda(), reason="on a GPU machine AWQ runs; this checks the CPU refusal order")
def test_awq_refuses_gpt2_for_its_layers_before_asking_for_a_gpu(tmp_path, make_run, family_model, tiny_dataset):
    broken = without_weights(family_model("gpt2"), tmp_path / "model")
    code, summary, _ = run_quantize(tmp_path, make_run, broken, tiny_dataset, SPECS["awq"])
    assert (code, summary.reason) == (10, "InvalidSpec")
    assert summary.message.startswith("GPT-2 (gpt2) cannot be quantized with method awq: ") and "Conv1D" in summary.message


# -- deterministic converter failures are permanent ------------------------------------------------
def test_a_tokenizer_llama_cpp_cannot_name_is_invalid_input(tmp_path, make_run, family_model, tiny_dataset):
    # GPT-2's ByteLevel, but with a prefix space: no model llama.cpp names pre-tokenizes so
    model = tmp_path / "model"
    shutil.copytree(family_model("llama"), model)
    tokenizer_json = json.loads((model / "tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"]["add_prefix_space"] = True
    (model / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    code, summary, _ = run_quantize(tmp_path, make_run, model, tiny_dataset, SPECS["gguf"])
    assert (code, summary.reason) == (11, "InvalidInput"), summary.message
    assert "does not recognise this tokenizer's BPE pre-tokenizer" in summary.message
    assert "gpt-2, mpt, qwen2, llama-bpe" in summary.message


def test_an_architecture_the_converter_lacks_is_invalid_input(tmp_path, make_run, tiny_tokenizer, tiny_dataset):
    # OPT: transformers builds it, llm-compressor would take it, llama.cpp's converter has no class for it
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                       ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=128,
                       pad_token_id=tiny_tokenizer.pad_token_id, bos_token_id=tiny_tokenizer.bos_token_id,
                       eos_token_id=tiny_tokenizer.eos_token_id)
    model = tmp_path / "opt"
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    code, summary, _ = run_quantize(tmp_path, make_run, model, tiny_dataset, SPECS["gguf"])
    assert (code, summary.reason) == (11, "InvalidInput"), summary.message
    assert "does not support 'OPTForCausalLM'" in summary.message


# -- the rules, the pre-tokenizer table and the docs (fast) ----------------------------------------
def _facts(**kw) -> families.Facts:
    base = dict(model_type="llama", architectures=("LlamaForCausalLM",), module_types=frozenset({"Linear"}),
                files=frozenset({"config.json", "tokenizer.json"}), tokenizer_class="TokenizersBackend")
    return families.Facts(**{**base, **kw})


@pytest.mark.parametrize(
    "facts, method, refused",
    [
        pytest.param(_facts(), "gptq", False, id="llama-gptq"),
        pytest.param(_facts(model_type="gpt2", module_types=frozenset({"Conv1D"})), "fp8-dynamic", True, id="conv1d-llmc"),
        pytest.param(_facts(model_type="gpt2", module_types=frozenset({"Conv1D"})), "bnb-int8", False, id="conv1d-bnb"),
        pytest.param(_facts(module_types=frozenset({"Conv1D", "Linear"})), "gptq", False, id="conv1d-and-linear"),
        pytest.param(_facts(module_types=frozenset()), "gptq", False, id="unknown-modules"),
        pytest.param(_facts(model_type="gemma2", architectures=("Gemma2ForCausalLM",)), "gguf", True, id="gemma2-no-spm"),
        pytest.param(_facts(model_type="gemma", architectures=("GemmaForCausalLM",),
                            files=frozenset({"config.json", "tokenizer.model"})), "gguf", False, id="gemma-spm"),
        pytest.param(_facts(model_type="phi3", architectures=("Phi3ForCausalLM",)), "gguf", True, id="phi3-no-spm"),
        pytest.param(_facts(model_type="phi3", architectures=("Phi3ForCausalLM",), tokenizer_class="GPT2Tokenizer"),
                     "gguf", False, id="phi4-gpt2-tokenizer"),
        pytest.param(_facts(model_type="gemma", architectures=("GemmaForCausalLM",)), "gptq", False, id="gemma-gptq"),
        pytest.param(_facts(model_type="gpt2", architectures=("GPT2LMHeadModel",)), "gguf", False, id="gpt2-gguf"),
    ],
)
def test_rules(facts, method, refused):
    assert (families.refusal(method, facts) is not None) is refused


def test_module_types_come_from_the_meta_device(family_model):
    assert families.module_types(family_model("gpt2")) >= {"Conv1D"}
    assert "Conv1D" not in families.module_types(family_model("gpt_neox"))
    assert "Linear" in families.module_types(family_model("gpt_neox"))


LLAMA3_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": families.LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
GPT2_PRE = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _tok(pre, normalizer=None, **model) -> dict:
    return {"normalizer": normalizer, "pre_tokenizer": pre, "model": {"type": "BPE", "byte_fallback": False,
                                                                      "ignore_merges": False, **model}}


@pytest.mark.parametrize(
    "tokenizer_json, name",
    [
        pytest.param(_tok(GPT2_PRE), "gpt-2", id="gpt2"),
        pytest.param(_tok({**GPT2_PRE, "trim_offsets": False}), "gpt-2", id="gpt2-trim-offsets-only-offsets"),
        pytest.param(_tok(GPT2_PRE, {"type": "NFC"}), "mpt", id="gpt-neox-nfc"),
        pytest.param(_tok(LLAMA3_PRE, ignore_merges=True), "llama-bpe", id="llama3"),
        pytest.param(_tok(LLAMA3_PRE), None, id="llama3-regex-without-ignore-merges"),
        pytest.param(_tok(LLAMA3_PRE, {"type": "NFC"}, ignore_merges=True), None, id="llama3-with-nfc"),
        pytest.param(_tok({**GPT2_PRE, "add_prefix_space": True}), None, id="prefix-space"),
        pytest.param(_tok({**GPT2_PRE, "use_regex": False}), None, id="no-regex"),
        pytest.param(_tok({"type": "ByteLevel"}), None, id="keys-missing"),
        pytest.param(_tok(GPT2_PRE, {"type": "NFKC"}), None, id="nfkc"),
        pytest.param(_tok(GPT2_PRE, byte_fallback=True), None, id="byte-fallback"),
        pytest.param({**_tok(GPT2_PRE), "model": {"type": "WordPiece"}}, None, id="wordpiece"),
        pytest.param({}, None, id="empty"),
    ],
)
def test_llama_cpp_pretokenizer_names_only_exact_matches(tokenizer_json, name):
    assert families.llama_cpp_pretokenizer(tokenizer_json) == name


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_each_family_tokenizer_as_transformers_resaves_it(family, family_model):
    from transformers import AutoTokenizer

    model = family_model(family)
    # saving again changes nothing: this is the tokenizer every stage re-saves
    before = (model / "tokenizer.json").read_text()
    AutoTokenizer.from_pretrained(model).save_pretrained(model)
    assert (model / "tokenizer.json").read_text() == before
    assert families.llama_cpp_pretokenizer(json.loads(before)) == PRETOKENIZER[family]


def test_table_matches_what_running_found():
    words = {CONV1D: "Conv1D", SENTENCEPIECE: "needs tokenizer.model", REFUSED[("gpt_neox", "w8a8-int8")]: "no SmoothQuant mappings"}
    for family in tiny.FAMILIES:
        for method in families.METHODS:
            cell = families.TABLE[family][method]
            refused = REFUSED.get((family, method))
            want = f"no ({words[refused]}" if refused else ("GPU" if method == "awq" else "yes")
            assert cell.startswith(want), (family, method, cell)


def test_readme_table_is_the_table():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Model families\n", 1)[1]
    lines = [line for line in section.split("\n\n- ", 1)[0].splitlines() if line.startswith("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert rows[0] == ["family", *[f"`{m}`" for m in families.METHODS]]
    assert {row[0]: row[1:] for row in rows[2:]} == {
        families.NAMES[f]: [families.TABLE[f][m] for m in families.METHODS] for f in tiny.FAMILIES
    }

"""Which quantize method takes which causal-LM family, decided before any weight loads.

    refusal(method, model_dir)  -> Refusal | None   (config.json, tokenizer files, module types)
    check(method, model_dir)                        raises the refusal's error (InvalidSpec / InvalidInput)
    llama_cpp_pretokenizer(tokenizer_json) -> str | None

What is known, from running every method on a tiny model of each family (tests/jobs/test_families.py;
transformers 5.17, llm-compressor 0.14.0.1, bitsandbytes 0.50, llama.cpp's converter of
llama-cpp-python 0.3.36), is in TABLE; what each refusal says is in RULES. A rule looks at facts a
stage can read without loading weights: config.json's model_type and architectures, the tokenizer
files, and the module types of the model built on the meta device (no memory, no weights).

  GPT-2 (and any model whose projections are transformers' Conv1D): llm-compressor's methods target
  torch.nn.Linear and find nothing to quantize. bitsandbytes (transformers swaps Conv1D for its
  layers) and gguf take it.
  Gemma and Gemma 2 with gguf: llama.cpp's converter reads their vocabulary from a SentencePiece
  tokenizer.model only; a checkpoint with only tokenizer.json fails inside the converter.
  Phi-3 with gguf: the converter reads tokenizer.model, or tokenizer.json when tokenizer_config.json
  says GPT2Tokenizer (Phi-4); anything else fails inside the converter. transformers 5 re-saves a
  Phi-3 tokenizer as TokenizersBackend, so a Phi-4 tokenizer re-saved by transformers 5 no longer
  converts either.
  GPT-NeoX with w8a8-int8: SmoothQuant has no mappings for its fused query_key_value.

The pre-tokenizer table. llama.cpp's converter names a BPE tokenizer's pre-tokenizer by hashing the
tokenization of a fixed text, so a locally trained vocabulary is never recognised.
`llama_cpp_pretokenizer` names it from tokenizer.json instead, when its normalizer, pre-tokenizer and
the BPE flags that change tokens are exactly those of the model llama.cpp names (its
convert_hf_to_gguf_update.py table; the regexes are llama-vocab.cpp's for that name):

  gpt-2      openai-community/gpt2        no normalizer; ByteLevel with GPT-2's regex
  mpt        mosaicml/mpt-7b              NFC; ByteLevel with GPT-2's regex (EleutherAI/gpt-neox-20b's
                                          tokenizer, which transformers' GPTNeoXTokenizer builds)
  qwen2      Qwen/Qwen1.5-7B              NFC; Split(Qwen2's regex, isolated), ByteLevel without regex
  llama-bpe  meta-llama/Meta-Llama-3-8B   no normalizer; Split(Llama 3's regex: digits in 1-3),
                                          ByteLevel without regex; ignore_merges true

Only offsets differ between ByteLevel's trim_offsets settings, so that key is not compared; every other
key must be present and equal. llama.cpp implements none of these normalizers (it pre-tokenizes with
the regex only), as for the hub models it names: NFC changes only text that is not NFC already.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kondense.errors import InvalidInput, InvalidSpec, KondenseError

LLMC_METHODS = ("gptq", "awq", "fp8-dynamic", "w8a8-int8")
METHODS = ("bnb-nf4", "bnb-int8", *LLMC_METHODS, "gguf")

# model_type -> the name messages use
NAMES = {
    "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral", "gemma": "Gemma", "gemma2": "Gemma 2",
    "phi3": "Phi-3", "gpt2": "GPT-2", "gpt_neox": "GPT-NeoX",
}


@dataclass(frozen=True)
class Facts:
    """What a stage knows about a model folder without loading its weights."""

    model_type: str
    architectures: tuple[str, ...]
    module_types: frozenset[str]  # class names of the model's modules, built on the meta device
    files: frozenset[str]  # file names in the folder
    tokenizer_class: str | None  # tokenizer_config.json's

    @property
    def family(self) -> str:
        return NAMES.get(self.model_type, self.model_type or "this model")


@dataclass(frozen=True)
class Rule:
    methods: tuple[str, ...]
    applies: Callable[[Facts], bool]
    reason: str  # after "{family} cannot be quantized with method {method}: "
    instead: str  # after "To resolve, "
    error: type[KondenseError]


def _conv1d_only(f: Facts) -> bool:
    """The projections are transformers' Conv1D and none is a torch.nn.Linear (lm_head aside)."""
    return "Conv1D" in f.module_types and "Linear" not in f.module_types


def _gguf_needs_sentencepiece(f: Facts) -> bool:
    """llama.cpp's converter reads Gemma's, Gemma 2's and Phi-3's vocabulary from tokenizer.model
    (GemmaModel/Gemma2Model.set_vocab -> _set_vocab_sentencepiece; Phi3MiniModel.set_vocab takes
    tokenizer.json only when tokenizer_config.json says GPT2Tokenizer)."""
    if "tokenizer.model" in f.files:
        return False
    if {"GemmaForCausalLM", "Gemma2ForCausalLM"} & set(f.architectures):
        return True
    return "Phi3ForCausalLM" in f.architectures and f.tokenizer_class != "GPT2Tokenizer"


# llm-compressor 0.14's SmoothQuant maps input_layernorm -> q/k/v_proj and post_attention_layernorm ->
# gate/up_proj (or per-architecture mappings); GPT-NeoX's fused query_key_value matches none and it
# stops with "Error resolving mappings for given architecture".
NO_SMOOTHQUANT_MAPPINGS = {"GPTNeoXForCausalLM"}


RULES: tuple[Rule, ...] = (
    Rule(
        LLMC_METHODS,
        _conv1d_only,
        "its projections are transformers' Conv1D layers and llm-compressor quantizes torch.nn.Linear only "
        "(it would find nothing to quantize)",
        "use method bnb-nf4, bnb-int8 or gguf, which take Conv1D",
        InvalidSpec,
    ),
    Rule(
        ("w8a8-int8",),
        lambda f: bool(NO_SMOOTHQUANT_MAPPINGS & set(f.architectures)),
        "llm-compressor's SmoothQuant has no layer mappings for its fused query_key_value projection "
        "(it stops with \"Error resolving mappings for given architecture\")",
        "use method gptq (bits 8) or fp8-dynamic",
        InvalidSpec,
    ),
    Rule(
        ("gguf",),
        _gguf_needs_sentencepiece,
        "llama.cpp's converter reads this family's vocabulary from a SentencePiece tokenizer.model "
        "(Phi-3: or from tokenizer.json when tokenizer_config.json says GPT2Tokenizer), and the folder has none",
        "add the model's tokenizer.model next to config.json, or use method bnb-nf4, bnb-int8 or gptq",
        InvalidInput,
    ),
)


# What running every method on each family's tiny model found (tests/jobs/test_families.py runs
# every cell on CPUs and checks this table and README's "Model families" against it): "yes", "GPU"
# (awq: llm-compressor's AWQ needs one; same Linear layers as gptq), or "no (why)" from RULES.
_YES = {"bnb-nf4": "yes", "bnb-int8": "yes", "gptq": "yes", "awq": "GPU", "fp8-dynamic": "yes", "w8a8-int8": "yes", "gguf": "yes"}
_CONV1D = "no (Conv1D layers)"
_SPM = "no (needs tokenizer.model)"
TABLE: dict[str, dict[str, str]] = {
    "llama": _YES,
    "qwen2": _YES,
    "mistral": _YES,
    "gemma": {**_YES, "gguf": _SPM},
    "phi3": {**_YES, "gguf": _SPM},
    "gpt2": {**_YES, **{m: _CONV1D for m in LLMC_METHODS}},
    "gpt_neox": {**_YES, "w8a8-int8": "no (no SmoothQuant mappings)"},
}


def facts(model_dir: Path) -> Facts:
    """config.json, the tokenizer files and the module types of the model built on the meta device."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{model_dir}/config.json cannot be read ({e}); a model folder holds config.json") from None
    try:
        tokenizer_class = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError):
        tokenizer_class = None
    return Facts(
        model_type=str(config.get("model_type") or ""),
        architectures=tuple(config.get("architectures") or ()),
        module_types=module_types(model_dir),
        files=frozenset(p.name for p in model_dir.iterdir()),
        tokenizer_class=tokenizer_class,
    )


def module_types(model_dir: Path) -> frozenset[str]:
    """Class names of the projections of the model (every module except lm_head and the embeddings),
    built from config.json on the meta device: no weight is read and no memory is taken. Empty when
    transformers cannot build it (remote code, an unknown model_type): then no rule refuses it here."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError, ImportError):
        return frozenset()
    head = model.get_output_embeddings()
    return frozenset(type(m).__name__ for name, m in model.named_modules() if name and m is not head)


def refusal(method: str, f: Facts) -> Rule | None:
    return next((rule for rule in RULES if method in rule.methods and rule.applies(f)), None)


def check(method: str, model_dir: Path) -> Facts:
    """Raise the refusal of `method` for the model in `model_dir` (InvalidSpec or InvalidInput), naming
    the family, the method, the reason and what to use instead; else return the facts."""
    f = facts(model_dir)
    if (rule := refusal(method, f)) is not None:
        raise rule.error(f"{f.family} ({f.model_type}) cannot be quantized with method {method}: {rule.reason}. "
                         f"To resolve, {rule.instead}.")
    return f


# -- llama.cpp's pre-tokenizer names ----------------------------------------------------------------
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTELEVEL_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_BYTELEVEL_PLAIN = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


# name -> (normalizer, pre_tokenizer, BPE model flags), as in the tokenizer.json of the model llama.cpp names
LLAMA_CPP_PRETOKENIZERS: dict[str, tuple[dict | None, dict, dict]] = {
    "gpt-2": (None, _BYTELEVEL_REGEX, {"ignore_merges": False}),
    "mpt": ({"type": "NFC"}, _BYTELEVEL_REGEX, {"ignore_merges": False}),
    "qwen2": ({"type": "NFC"}, {"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), _BYTELEVEL_PLAIN]},
              {"ignore_merges": False}),
    "llama-bpe": (None, {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), _BYTELEVEL_PLAIN]},
                  {"ignore_merges": True}),
}


def _tokens_only(node):
    """The pre-tokenizer without ByteLevel's trim_offsets (it changes offsets, never tokens)."""
    if isinstance(node, dict):
        return {k: _tokens_only(v) for k, v in node.items() if not (k == "trim_offsets" and node.get("type") == "ByteLevel")}
    if isinstance(node, list):
        return [_tokens_only(v) for v in node]
    return node


def llama_cpp_pretokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a parsed tokenizer.json, when its normalizer,
    pre-tokenizer and BPE flags are exactly those of a model llama.cpp names; else None."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        return None
    normalizer = tokenizer_json.get("normalizer")
    pre = _tokens_only(tokenizer_json.get("pre_tokenizer"))
    for name, (want_normalizer, want_pre, flags) in LLAMA_CPP_PRETOKENIZERS.items():
        if (
            normalizer == want_normalizer
            and pre == want_pre
            and all(bool(model.get(k, False)) == v for k, v in flags.items())
        ):
            return name
    return None

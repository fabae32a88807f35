"""Tiny models built on the spot: the demo's teacher and student, and every test's fixtures.

Nothing is downloaded. The text is English prose that every Python installation carries: the
docstrings of the standard library. A byte-level BPE tokenizer is trained on it in about a
second, and models of any transformers family are created from a config.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

# The families config_for builds (model_type as config.json names it). Gemma is Gemma 1
# (GemmaForCausalLM): transformers 5.17 builds and saves both Gemma and Gemma2, and llama.cpp's
# converter treats the two alike (both read only a SentencePiece tokenizer.model).
FAMILIES = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "gpt_neox")
# The tokenizer class a checkpoint of the family names, where transformers 5.17 has one that keeps
# a byte-level BPE vocabulary: it rebuilds the tokenizer with the family's own normalizer and
# pre-tokenizer (Qwen2: NFC + Qwen2's Split regex; GPT-NeoX: NFC + ByteLevel). transformers maps
# llama, mistral (without mistral-common) and phi3 to TokenizersBackend, which keeps tokenizer.json
# as it is (Llama 3's and Phi-4's checkpoints say so too). GemmaTokenizer would rebuild the
# vocabulary SentencePiece-style (spaces -> "\u2581", byte fallback), in which a byte-level vocabulary
# encodes every space as <unk>: the tiny Gemma keeps TokenizersBackend.
FAMILY_TOKENIZERS = {"qwen2": "Qwen2Tokenizer", "gpt2": "GPT2Tokenizer", "gpt_neox": "GPTNeoXTokenizer"}


def corpus(max_docs: int = 6000, min_chars: int = 200) -> list[str]:
    """Paragraphs of the standard library's docstrings, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    seen: set[str] = set()
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if path.name.startswith("test") or path.parent.name in ("test", "tests", "idlelib"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in doc.split("\n\n"):
                text = " ".join(para.split())
                if len(text) >= min_chars and text not in seen and not text.startswith(">>>"):
                    seen.add(text)
                    docs.append(text)
                    if len(docs) >= max_docs:
                        return docs
    return docs


def train_tokenizer(texts: list[str], vocab_size: int = 4096):
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenization) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, **SPECIAL)


def config_for(family: str, vocab_size: int, layers: int, hidden: int, heads: int, tokenizer, max_positions: int = 512):
    """A small config of `family` (one of FAMILIES) around the tokenizer's vocabulary and special tokens.

    Each family keeps what sets it apart: Mistral's sliding window, Gemma's tied embeddings and
    (1 + weight) RMSNorm, Phi-3's fused qkv_proj and gate_up_proj, GPT-2's Conv1D layers and learned
    positions, GPT-NeoX's fused query_key_value, partial rotary and parallel residual."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    decoder = dict(
        hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, max_position_embeddings=max_positions, **common,
    )
    if family == "llama":
        return transformers.LlamaConfig(**decoder)
    if family == "qwen2":
        return transformers.Qwen2Config(**decoder)
    if family == "mistral":
        return transformers.MistralConfig(**{**decoder, "num_key_value_heads": max(1, heads // 2)}, sliding_window=max_positions // 2)
    if family == "gemma":  # head_dim defaults to 256: keep it hidden / heads
        return transformers.GemmaConfig(**{**decoder, "tie_word_embeddings": True}, head_dim=hidden // heads)
    if family == "phi3":
        return transformers.Phi3Config(**decoder, original_max_position_embeddings=max_positions)
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, **common)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers, num_attention_heads=heads,
            max_position_embeddings=max_positions, **common,
        )
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def build_model(
    out: Path,
    tokenizer,
    family: str = "llama",
    layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised causal LM with the tokenizer in Hugging Face layout."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = config_for(family, len(tokenizer), layers, hidden, heads, tokenizer)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out, family)
    return out


def save_tokenizer(tokenizer, out: Path, family: str) -> None:
    """Save the tokenizer as a checkpoint of `family` holds it: through the family's tokenizer class
    (FAMILY_TOKENIZERS), then loaded with AutoTokenizer and saved again, as every stage re-saves it."""
    from transformers import AutoTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    tokenizer.save_pretrained(out)
    if family in FAMILY_TOKENIZERS:
        tokenizer_class_from_name(FAMILY_TOKENIZERS[family]).from_pretrained(out).save_pretrained(out)
    AutoTokenizer.from_pretrained(out).save_pretrained(out)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def pretrain(model_dir: Path, texts: list[str], steps: int, seq_len: int = 128, batch: int = 16, lr: float = 3e-3, seed: int = 0, progress=None) -> dict[str, float]:
    """Train a tiny model in place with plain next-token prediction (AdamW, cosine decay).

    The demo's teacher is pretrained this way so that distillation has something to learn from.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
    data = torch.tensor(stream[: len(stream) // seq_len * seq_len]).view(-1, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        idx = torch.randint(0, data.shape[0], (batch,), generator=gen)
        loss = model(input_ids=data[idx], labels=data[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress.update(step, steps, phase="pretrain steps", loss=loss.item())
    model.save_pretrained(model_dir)
    return {"loss": float(loss.item())}

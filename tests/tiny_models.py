"""Tiny random models of each handler family, with a real BPE tokenizer trained on the fly.

Each builds in well under a second: two layers, 64-wide, a ~600-token vocabulary. The tokenizer is a
byte-level BPE (any text round-trips) with ChatML special tokens and a chat template, like SmolLM2's.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from llmbox_handlers import CHATML_TEMPLATE

FAMILIES = ("llama", "mistral", "qwen2", "gemma3", "gpt2", "phi3")
SPECIAL_TOKENS = ["<pad>", "<s>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]

_CORPUS = """\
The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital of France.
You are a helpful assistant. Answer the question. Explain how photosynthesis works in plants.
Water boils at 100 degrees Celsius at sea level. The sum of two and two is four. Write a short poem.
user assistant system instruction input output question answer context prompt completion text image caption
0 1 2 3 4 5 6 7 8 9 10 42 100 2019 { } [ ] ( ) : ; , . ! ? ' " - + * / = < > | _ # @ % & \\ \n
"""


@cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return str(tok.to_str())


@cache
def _sentencepiece_style_json() -> str:
    """BPE over "▁"-marked words with byte fallback, as Llama 2, Mistral v1 and Gemma ship (in tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", *SPECIAL_TOKENS[:4], *(f"<0x{i:02X}>" for i in range(256))]
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainers.BpeTrainer(vocab_size=700, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])  # adds BOS
    return str(tok.to_str())


def build_tokenizer(chat_template: str | None = CHATML_TEMPLATE, sentencepiece_style: bool = False) -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = _sentencepiece_style_json() if sentencepiece_style else _tokenizer_json()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(spec),
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        **({"unk_token": "<unk>"} if sentencepiece_style else {}),
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_config(family: str, vocab_size: int) -> Any:
    import transformers as tf

    common: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "bos_token_id": 1, "eos_token_id": 3, "pad_token_id": 0, "tie_word_embeddings": True,
        # wide enough initial weights that a frozen 64-wide embedding can still produce confident logits,
        # so a LoRA adapter can actually fit small data (with 0.02 the loss floors near ln(vocab) - 1)
        "initializer_range": 0.25,
    }  # fmt: skip
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=64)
    if family == "phi3":
        return tf.Phi3Config(**common)
    if family == "gpt2":
        return tf.GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512,
            bos_token_id=1, eos_token_id=3, pad_token_id=0, initializer_range=0.25,
        )  # fmt: skip
    raise ValueError(f"no tiny config for family {family!r}")


def build_tiny_model(
    family: str,
    out_dir: Path,
    chat_template: str | None = CHATML_TEMPLATE,
    seed: int = 0,
    sentencepiece_style: bool = False,
    **overrides: Any,
) -> Path:
    """Save a random model of `family` and its tokenizer to `out_dir` (an HF folder); `overrides` set config values."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(chat_template, sentencepiece_style)
    torch.manual_seed(seed)
    config = tiny_config(family, len(tokenizer))
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    for key, value in {**ids, **overrides}.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir

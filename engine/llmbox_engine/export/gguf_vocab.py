"""The tokenizer as GGUF metadata: tokens, their types, merges or scores, special ids and the chat template.

Two tokenizer kinds cover the supported families: byte-level BPE (`gpt2` in GGUF: SmolLM, Qwen, Llama 3,
Mistral's tekken) and SentencePiece-style BPE with byte fallback (`llama` in GGUF: Gemma, Llama 2, Mistral v1).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from llmbox.errors import UserError

# llama.cpp picks a byte-level BPE's pre-tokenizer (its split regex) by name. It names them by the hash of
# how the tokenizer encodes CHECK_TEXT (the text and hashes are llama.cpp's: convert_hf_to_gguf.py).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}


def add_vocab(writer: Any, tokenizer: Any, model_dir: Path, vocab_size: int, chat_template: str | None) -> list[str]:
    """Write the tokenizer keys for a model with `vocab_size` embedding rows; returns notes for the user."""
    import gguf

    spec = _tokenizer_json(model_dir)
    model = spec.get("model") or {}
    notes: list[str] = []
    if model.get("type") != "BPE":
        raise UserError(f"{model_dir}: a {model.get('type') or 'unknown'} tokenizer; the GGUF export writes BPE ones")
    byte_fallback = bool(model.get("byte_fallback"))
    tokens, types = _tokens_and_types(tokenizer, vocab_size, byte_fallback)
    if byte_fallback:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        # Llama 2 and Mistral v1 mark the first word with "▁" as every other; Gemma does not
        writer.add_add_space_prefix(tokenizer.tokenize("a")[0].startswith("▁"))
        # SentencePiece BPE merges the highest-scoring pair first; its pieces are stored in merge order
        writer.add_token_scores([-float(i) for i in range(len(tokens))])
    else:
        writer.add_tokenizer_model("gpt2")
        pre = _pre_tokenizer(tokenizer, spec)
        if pre is None:
            pre = "default"
            notes.append("llama.cpp does not know this tokenizer's pre-tokenizer: it splits text its default way")
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(str(model_dir), load_merges=not byte_fallback, n_vocab=vocab_size)
    special.chat_template = chat_template or special.chat_template
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(_adds(tokenizer, tokenizer.bos_token_id, first=True))
    writer.add_add_eos_token(_adds(tokenizer, tokenizer.eos_token_id, first=False))
    return notes


def _tokenizer_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; the GGUF export reads the fast tokenizer's file")
    value = json.loads(path.read_text())
    return value if isinstance(value, dict) else {}


def _tokens_and_types(tokenizer: Any, vocab_size: int, byte_fallback: bool) -> tuple[list[str], list[int]]:
    """Every embedding row's token; rows past the tokenizer (padding to a round size) are UNUSED."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            tokens.append(token)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _pre_tokenizer(tokenizer: Any, spec: dict[str, Any]) -> str | None:
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # GPT-2's own split regex, which llama.cpp's gpt-2 pre-tokenizer is
    return None


def _adds(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    """Whether encoding a text adds this special token (what llama.cpp must then add too)."""
    if token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and (ids[0] if first else ids[-1]) == token_id

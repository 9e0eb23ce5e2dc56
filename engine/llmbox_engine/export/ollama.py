"""An Ollama Modelfile for an exported GGUF: FROM, the chat template's stop tokens, the context length."""

from __future__ import annotations

import re
from pathlib import Path

# end-of-turn markers of the common chat template families; a template that writes one stops on it
END_OF_TURN_MARKERS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")
# ChatML spelled for Ollama's Go templates; other families' templates Ollama derives from the GGUF's metadata
CHATML_GO_TEMPLATE = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
DEFAULT_NUM_CTX = 4096


def stop_tokens(chat_template: str | None, eos_token: str | None) -> list[str]:
    """The end-of-turn markers the template writes, then the tokenizer's EOS (each once)."""
    found = [m for m in END_OF_TURN_MARKERS if chat_template and m in chat_template]
    if eos_token and eos_token not in found:
        found.append(eos_token)
    return found


def modelfile(
    gguf_name: str,
    chat_template: str | None,
    eos_token: str | None,
    context_length: int | None,
    adapter_name: str | None = None,
) -> str:
    """The Modelfile text; FROM (and ADAPTER) name files beside it, which `ollama create -f` resolves."""
    lines = [f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    if chat_template and "<|im_start|>" in chat_template:
        lines.append(f'TEMPLATE """{CHATML_GO_TEMPLATE}"""')
    else:
        lines.append("# TEMPLATE: Ollama derives it from the chat template stored in the GGUF")
    lines += [f'PARAMETER stop "{_quoted(token)}"' for token in stop_tokens(chat_template, eos_token)]
    lines.append(f"PARAMETER num_ctx {min(context_length or DEFAULT_NUM_CTX, DEFAULT_NUM_CTX)}")
    return "\n".join(lines) + "\n"


def ollama_name(path: Path) -> str:
    """A model name `ollama create` accepts, from the file's name."""
    stem = re.sub(r"\.(gguf|lora)$", "", path.stem, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "llmbox-model"


def _quoted(token: str) -> str:
    return token.replace("\\", "\\\\").replace('"', '\\"')

"""What `llmbox export` was asked for, checked before any weights load (pure: the host checks it too)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmbox.errors import UserError

# what the gguf package quantizes itself (numpy); the K-quants need llama.cpp's own quantizer
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# llama.cpp applies LoRA tensors in these
LORA_GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
MODELFILE = "Modelfile"


@dataclass(frozen=True)
class ExportRequest:
    format: str  # hf | gguf | lora-gguf
    output: Path
    dtype: str  # hf: auto | bf16 | f16 | f32
    quant: str  # gguf and lora-gguf: one of GGUF_TYPES
    with_adapter: bool
    ollama: bool
    force: bool

    @property
    def modelfile(self) -> Path | None:
        return self.output.with_name(MODELFILE) if self.ollama else None

    @property
    def outputs(self) -> list[Path]:
        return [self.output, *([self.modelfile] if self.modelfile else [])]


def export_request(values: dict[str, Any]) -> ExportRequest:
    """The request in `values` (the command's options), or a UserError naming the contradiction."""
    fmt, quant = values["format"], str(values["quant"]).lower()
    output = Path(values["output"]).expanduser().resolve()
    if fmt == "lora-gguf" and values["no_lora"]:
        raise UserError("--format lora-gguf exports the adapter: --no-lora leaves nothing to export")
    if fmt != "hf":
        allowed = GGUF_TYPES if fmt == "gguf" else LORA_GGUF_TYPES
        if quant not in allowed:
            hint = (
                f"; for {quant.upper()}, export f16 and run llama.cpp's `llama-quantize OUT.gguf OUT-{quant}.gguf "
                f"{quant.upper()}`"
                if "_k" in quant or quant.startswith("iq")
                else ""
            )
            raise UserError(f"--quant {quant}: {fmt} takes {', '.join(allowed)}{hint}")
        if output.suffix.lower() != ".gguf":
            raise UserError(f"--output {output}: a {fmt} export is one file; name it *.gguf")
    if values["ollama"] and fmt != "gguf":
        raise UserError(
            "--ollama takes --format gguf (the merged model); for a lora-gguf, Ollama's Modelfile names "
            "the base GGUF (--no-lora --format gguf) in FROM and the adapter in ADAPTER"
        )
    if values["quant"] != "f16" and fmt == "hf":
        raise UserError("--quant is for GGUF exports; an hf export takes --dtype")
    if values["dtype"] != "auto" and fmt != "hf":
        raise UserError("--dtype is for hf exports; a GGUF export takes --quant")
    request = ExportRequest(
        format=fmt,
        output=output,
        dtype=values["dtype"],
        quant=quant,
        with_adapter=not values["no_lora"],
        ollama=bool(values["ollama"]),
        force=bool(values["force"]),
    )
    if not request.force:
        for path in request.outputs:
            if path.exists():
                raise UserError(f"{path} exists: --force replaces it")
    return request

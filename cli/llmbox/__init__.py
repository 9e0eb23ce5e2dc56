"""llmbox: fine-tune and serve LLMs with LoRA/QLoRA. This package is the light host side (no torch)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmbox")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"

import warnings

from llmbox.entry import run_cli
from llmbox_engine import quantized
from llmbox_engine.cli import engine

quantized.quiet_noise()  # before peft or transformers import bitsandbytes, which logs at import

# transformers' per-file progress bars and deprecation chatter drown the training status lines
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
try:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
except ImportError:  # the engine's packages are missing: the command itself will say so
    pass

run_cli(engine, "python -m llmbox_engine")

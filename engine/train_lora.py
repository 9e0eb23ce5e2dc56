#!/usr/bin/env python3
"""The engine's training entry point as a script, for pipelines that call it with subprocess:

    python train_lora.py --model-path ./model --data 'data/*.json' --output ./run --mode adaptive --lora-r 128

It takes every flag of `llmbox train` (see --help). Exit status 0 means trained (or stopped by Ctrl+C/SIGTERM
with the adapter saved); anything else ends with one `error:` line on stderr.
"""

import sys

from llmbox.entry import run_cli
from llmbox_engine.cli import engine

if __name__ == "__main__":
    sys.argv[1:1] = ["train"]
    run_cli(engine, "train_lora.py")

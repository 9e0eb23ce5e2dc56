from llmbox.entry import run_cli
from llmbox_engine.cli import engine

run_cli(engine, "python -m llmbox_engine")

"""The engine's own entry point (`python -m llmbox_engine COMMAND`): what the host runs locally or in a container."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from llmbox.errors import UserError
from llmbox.options import (
    DATA_REPORT_OPTIONS,
    EXPORT_OPTIONS,
    SERVE_OPTIONS,
    TRAIN_OPTIONS,
    config_file_option,
    with_options,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def engine() -> None:
    """llmbox engine commands."""
    from llmbox_engine import lifeline

    lifeline.hold()  # started by llmbox: stop when it ends


@engine.command()
@with_options(DATA_REPORT_OPTIONS)
def data(**values: Any) -> None:
    """Show what training would see in --data."""
    from llmbox_engine.data.ingest import load_examples
    from llmbox_engine.data.report import build_report, print_report, token_statistics

    result = load_examples(
        values["data"],
        dataset_format=values["dataset_format"],
        max_examples=values["max_examples"],
        skip_bad_records=values["skip_bad_records"],
        seed=values["seed"],
    )
    tokens = None
    if values["model"]:
        tokens = token_statistics(result.examples, Path(values["model"]), values["max_seq_length"])
    report = build_report(result, tokens)
    if values["json"]:
        click.echo(json.dumps(report, indent=2))
    else:
        print_report(report)


@engine.command("import-gguf")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--output", "output", type=click.Path(path_type=Path), required=True, help="The HF folder to write.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
def import_gguf_command(gguf_file: Path, output: Path, dtype: str) -> None:
    """Import a GGUF file into a Hugging Face folder (safetensors + tokenizer)."""
    from llmbox_engine.gguf_import import import_gguf

    if output.exists() and any(output.iterdir()) and not (output / "config.json").is_file():
        raise UserError(f"{output}: exists and is not a model folder; refusing to replace it")
    folder = import_gguf(gguf_file, output, dtype)
    click.echo(f"imported {gguf_file} -> {folder}")


@engine.command()
@click.option("--model-path", type=click.Path(path_type=Path), required=True, help="The base model (an HF folder).")
@click.option(
    "--trust-remote-code", is_flag=True, help="Run the model repository's own Python code (only if you trust it)."
)
@config_file_option(TRAIN_OPTIONS)
@with_options(TRAIN_OPTIONS)
def train(model_path: Path, trust_remote_code: bool, **values: Any) -> None:
    """Fine-tune MODEL_PATH with LoRA/QLoRA on --data (what `llmbox train` runs)."""
    from llmbox_engine.train.command import run_train

    run_train(model_path, trust_remote_code, values)


@engine.command()
@click.option("--logdir", type=click.Path(path_type=Path), required=True, help="The training logs (each run a folder).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 shares it on the network).")
@click.option("--port", type=click.IntRange(1, 65535), default=6006, show_default=True)
def tensorboard(logdir: Path, host: str, port: int) -> None:
    """Serve TensorBoard on LOGDIR (what `llmbox tensorboard` and a training's sidecar run)."""
    from llmbox_engine.train.tensorboard_server import serve_forever

    serve_forever(logdir, port, host)


@engine.command()
@click.option("--model-path", type=click.Path(path_type=Path), required=True, help="The base model (an HF folder).")
@click.option(
    "--adapter-dir",
    type=click.Path(path_type=Path),
    help="The adapter folder to serve and watch for new ones (default: lora/ of the model's directory).",
)
@click.option(
    "--trust-remote-code", is_flag=True, help="Run the model repository's own Python code (only if you trust it)."
)
@with_options(SERVE_OPTIONS)
def serve(model_path: Path, adapter_dir: Path | None, trust_remote_code: bool, **values: Any) -> None:
    """Serve MODEL_PATH, and its trained adapter, behind an OpenAI-compatible API (what `llmbox serve` runs)."""
    from llmbox.model_facts import read_config
    from llmbox.serve_engine import check_engine_options, choose_serve_engine, exposure_warning, is_vision_model
    from llmbox_engine.host_view import model_directory

    if values["no_lora"] and adapter_dir is not None:
        raise UserError("--no-lora and --adapter-dir contradict each other: give one")
    config = read_config(model_path)  # a folder without a model stops here, whichever the engine
    home = model_directory(model_path)  # where training writes lora/
    adapter = None if values["no_lora"] else (adapter_dir or home / "lora")
    api_key = values["api_key"] or os.environ.get("LLMBOX_API_KEY") or None
    vllm_python, gpus = _vllm_python(), _gpu_count()
    engine, why = choose_serve_engine(
        values["engine"],
        vllm_installed=vllm_python is not None,
        gpus=gpus > 0,
        images=bool(values["image_dir"]),
        vision=is_vision_model(config),
    )
    check_engine_options(engine, values)
    print(f"engine: {engine} ({why})", flush=True)
    warning = exposure_warning(values["host"], api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    if engine == "vllm":
        assert vllm_python is not None  # choose_serve_engine refuses vllm without it
        sys.exit(_serve_on_vllm(model_path, adapter, api_key, vllm_python, gpus, trust_remote_code, values))
    from llmbox_engine.serve.server import ServeConfig, run_server

    run_server(
        ServeConfig(
            model_path=model_path,
            adapter_dir=adapter,
            host=values["host"],
            port=values["port"],
            api_key=api_key,
            max_concurrency=values["max_concurrency"] or ServeConfig.max_concurrency,
            max_batch_size=values["max_batch_size"] or ServeConfig.max_batch_size,
            dtype=values["dtype"],
            base_weights=values["base_weights"],
            threads=values["threads"],
            trust_remote_code=trust_remote_code,
            image_dir=Path(values["image_dir"]) if values["image_dir"] else None,
        )
    )


def _serve_on_vllm(
    model_path: Path, adapter: Path | None, api_key: str | None, python: str, gpus: int, trust_remote_code: bool,
    values: dict[str, Any],
) -> int:  # fmt: skip
    from llmbox_engine.serve_vllm.command import parse_extra_args
    from llmbox_engine.serve_vllm.supervisor import VllmConfig, run_vllm

    # every GPU this server was given (--gpus, CUDA_VISIBLE_DEVICES) holds a share of the model
    parallel = values["tensor_parallel_size"] or (gpus if gpus > 1 else None)
    if parallel and not values["tensor_parallel_size"]:
        print(f"vLLM: tensor parallel over the {gpus} GPUs given (--tensor-parallel-size to choose)", flush=True)
    return run_vllm(VllmConfig(
        model_path=model_path, adapter_dir=adapter, python=python, host=values["host"], port=values["port"],
        api_key=api_key, dtype=vllm_dtype(values["dtype"], cpu=not gpus), max_num_seqs=values["max_batch_size"],
        max_lora_rank=values["max_lora_rank"], tensor_parallel_size=parallel, max_model_len=values["max_model_len"],
        trust_remote_code=trust_remote_code, extra_args=parse_extra_args(values["vllm_args"]), cpu=not gpus,
    ))  # fmt: skip


def vllm_dtype(asked: str, cpu: bool) -> str:
    """--dtype auto means float32 on a CPU on either engine (vLLM's own auto would take the config's bf16)."""
    return "float32" if cpu and asked == "auto" else asked


def _vllm_python() -> str | None:
    """The Python that runs vLLM: $LLMBOX_VLLM_PYTHON (vLLM in a virtualenv of its own), else this one if it has it."""
    import importlib.util
    import shutil

    given = os.environ.get("LLMBOX_VLLM_PYTHON", "").strip()
    if given:
        found = shutil.which(given)
        if found is None:
            raise UserError(f"LLMBOX_VLLM_PYTHON={given}: no such program")
        return found
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def _gpu_count() -> int:
    from llmbox.facts import read_gpu_facts

    return len(read_gpu_facts())


@engine.command()
@click.option("--model-path", type=click.Path(path_type=Path), required=True, help="The base model (an HF folder).")
@click.option("--adapter-dir", type=click.Path(path_type=Path), help="The adapter folder to export with the base.")
@click.option(
    "--trust-remote-code", is_flag=True, help="Run the model repository's own Python code (only if you trust it)."
)
@with_options(EXPORT_OPTIONS)
def export(model_path: Path, adapter_dir: Path | None, trust_remote_code: bool, **values: Any) -> None:
    """Export MODEL_PATH with an adapter: merged HF weights, a GGUF, or a LoRA GGUF (what `llmbox export` runs)."""
    from llmbox.export_request import export_request
    from llmbox_engine.export.command import run_export

    if values["no_lora"] and adapter_dir is not None:
        raise UserError("--no-lora and --adapter-dir contradict each other: give one")
    if not values["no_lora"] and adapter_dir is None:
        raise UserError("give --adapter-dir, or --no-lora to export the base alone")
    run_export(model_path, adapter_dir, export_request(values), trust_remote_code)

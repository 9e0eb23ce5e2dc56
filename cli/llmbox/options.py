"""Command options shared by the host CLI and the engine entry point: one definition, two parsers.

The host parses a command's options (to validate them early and, for Docker, to rewrite paths), then
hands the engine the same options as argv through `to_argv`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import click
import yaml

from llmbox.planning.terms import MODES, OPTIMIZERS, PRECISIONS
from llmbox.serve_engine import ENGINES

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Opt:
    flag: str
    help: str
    type: Any = str
    default: Any = None
    is_flag: bool = False
    required: bool = False
    flag_value: Any = None  # the value of an option given without one (`--tensorboard-only` alone)
    short: str | None = None  # a one-letter alias (`-o`)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def click_option(self) -> Callable[[F], F]:
        names = (self.short, self.flag) if self.short else (self.flag,)
        if self.is_flag:
            return click.option(*names, self.dest, is_flag=True, default=False, help=self.help)
        optional_value = {"is_flag": False, "flag_value": self.flag_value} if self.flag_value is not None else {}
        return click.option(
            *names, self.dest, type=self.type, default=self.default, required=self.required,
            show_default=self.default is not None, help=self.help, **optional_value,
        )  # fmt: skip

    def to_argv(self, value: Any) -> list[str]:
        if self.is_flag:
            return [self.flag] if value else []
        if value is None:
            return []
        return [self.flag, str(value)]


def with_options(options: Sequence[Opt]) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        for opt in reversed(options):
            func = opt.click_option()(func)
        return func

    return decorate


def config_file_option(options: Sequence[Opt]) -> Callable[[F], F]:
    """`--config FILE.yaml`: any option as a YAML key; options on the command line win.

    The file's values become the command's defaults (click's default_map), which is exactly
    "the command line wins" without a second merge step.
    """
    known = {opt.dest: opt for opt in options}

    def load(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is None:
            return
        try:
            with open(value) as f:  # noqa: PTH123 (click hands us a str)
                loaded = yaml.safe_load(f) or {}
        except OSError as exc:
            raise click.BadParameter(f"{value}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise click.BadParameter(f"{value}: malformed YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise click.BadParameter(f"{value}: expected a mapping of option names to values")
        defaults = {}
        for key, item in loaded.items():
            dest = str(key).lstrip("-").replace("-", "_")
            if dest not in known:
                raise click.BadParameter(f"{value}: unknown option {key!r}")
            defaults[dest] = item
        ctx.default_map = {**(ctx.default_map or {}), **defaults}

    return click.option(
        "--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False, callback=load,
        help="A YAML file of options (any option as a key, e.g. `lora-r: 16`); the command line wins.",
    )  # fmt: skip


def to_argv(options: Sequence[Opt], values: Mapping[str, Any]) -> list[str]:
    argv: list[str] = []
    for opt in options:
        argv += opt.to_argv(values.get(opt.dest))
    return argv


DATA_SPEC_HELP = (
    "Training data: a file, a folder (recursive), a quoted glob ('data/*.json'), a comma list of those, "
    "or a Hugging Face dataset as name:split."
)

DATA_OPTIONS: tuple[Opt, ...] = (
    Opt("--data", DATA_SPEC_HELP, required=True),
    Opt(
        "--dataset-format",
        "Force one format for every record: alpaca, sharegpt, openai, qa, completion, text, vision.",
    ),
    Opt("--max-examples", "Use at most N examples (a seeded random sample).", type=click.IntRange(min=1)),
    Opt(
        "--skip-bad-records",
        "Skip records that fail validation (and report how many) instead of stopping.",
        is_flag=True,
    ),
    Opt("--seed", "Random seed for sampling, the validation split and training.", type=int, default=42),
)

DATA_REPORT_OPTIONS: tuple[Opt, ...] = (
    *DATA_OPTIONS,
    Opt("--model", "A model folder: adds token-length statistics rendered with its chat template."),
    Opt("--max-seq-length", "Truncate longer examples to this many tokens (default: the model's limit).",
        type=click.IntRange(min=2)),
    Opt("--json", "Print one JSON object instead of tables.", is_flag=True),
)  # fmt: skip


TRAIN_OPTIONS: tuple[Opt, ...] = (
    *DATA_OPTIONS,
    Opt("--mode", "Training mode (see README): slow, medium, fast, non-stop, adaptive.", type=click.Choice(MODES),
        default="medium"),
    Opt("--circular", "Cycle through a small dataset, growing the batch between cycles, until the loss is perfect.",
        is_flag=True),
    Opt("--max-circular-epochs", "Cycle limit for --circular.", type=click.IntRange(min=1), default=100),
    Opt("--force-epochs", "Run exactly the epochs (or cycles) asked: every auto-stop off.", is_flag=True),
    Opt("--epochs", "Epochs to train (default: by mode).", type=click.IntRange(min=1)),
    Opt("--max-steps", "Stop after this many optimizer steps.", type=click.IntRange(min=1)),
    Opt("--batch-size", "Examples per micro-batch (default: fit to memory).", type=click.IntRange(min=1)),
    Opt("--gradient-accumulation-steps", "Micro-batches per optimizer step (default: auto).",
        type=click.IntRange(min=1)),
    Opt("--learning-rate", "Peak learning rate (default: by method, size and mode).", type=click.FloatRange(min=0,
        min_open=True)),
    Opt("--optimizer", "Optimizer.", type=click.Choice(OPTIMIZERS)),
    Opt("--method", "lora or qlora (4-bit); default: qlora only when 16-bit weights do not fit.",
        type=click.Choice(["lora", "qlora"])),
    Opt("--use-8bit", "Load the base weights in 8 bits (bitsandbytes).", is_flag=True),
    Opt("--precision", "auto: bf16 on GPUs that have it; on CPU, bf16 matmuls over fp32 weights (bf16-mixed) where "
        "the CPU has native bf16, else fp32.", type=click.Choice(PRECISIONS), default="auto"),
    Opt("--lora-r", "LoRA rank (default: by model size).", type=click.IntRange(min=1)),
    Opt("--lora-alpha", "LoRA alpha (default: 2 x rank).", type=click.IntRange(min=1)),
    Opt("--lora-dropout", "LoRA dropout (default 0.05).", type=click.FloatRange(0, 1, max_open=True)),
    Opt("--max-seq-length", "Truncate examples to this many tokens (default: fit the data, within the model's limit).",
        type=click.IntRange(min=2)),
    Opt("--validation-split", "Fraction held out for validation (default 0.1; 0 in circular mode).",
        type=click.FloatRange(min=0, max=1, max_open=True)),
    Opt("--patience", "Evaluations without improvement before stopping (default: by task).",
        type=click.IntRange(min=1)),
    Opt("--overfitting-threshold", "Relative train/validation gap that counts as overfitting (default: by task).",
        type=click.FloatRange(min=0, min_open=True)),
    Opt("--nproc-per-node", "Training processes, one per GPU (default: every visible GPU, else 1); torchrun starts "
        "them. On CPU, N > 1 runs N processes with gloo.", type=click.IntRange(min=1)),
    Opt("--nnodes", "Machines training together (torchrun's --nnodes; default $PET_NNODES, else 1); run the same "
        "command on each, with its --node-rank.", type=click.IntRange(min=1)),
    Opt("--node-rank", "This machine's place among them, 0 to nnodes-1 (default $PET_NODE_RANK); node 0 writes the "
        "adapter, checkpoints and logs.", type=click.IntRange(min=0)),
    Opt("--master-addr", "With --nnodes > 1: node 0's address, reachable from every node (default $PET_MASTER_ADDR)."),
    Opt("--master-port", "With --nnodes > 1: a free port on node 0 for the rendezvous (default $PET_MASTER_PORT, "
        "else 29500).", type=click.IntRange(1, 65535)),
    Opt("--strategy", "With several processes: ddp (a replica per device) or fsdp2 (shards); default: ddp when a "
        "replica fits one device.", type=click.Choice(["ddp", "fsdp2"])),
    Opt("--resume", "Continue from the newest whole checkpoint.", is_flag=True),
    Opt("--resume-from", "Continue from this checkpoint folder."),
    Opt("--output", "Where lora/, checkpoints/, logs/ and the plot go (default: the model's directory)."),
    Opt("--no-tensorboard", "Do not start a TensorBoard server (logs are still written).", is_flag=True),
    Opt("--tensorboard-port", "TensorBoard server port.", type=click.IntRange(1, 65535), default=6006),
    Opt("--tensorboard-only", "Serve past runs' logs on PORT (default 6006) and train nothing.",
        type=click.IntRange(1, 65535), flag_value=6006),
    Opt("--skip-test", "Skip the sample answers after training.", is_flag=True),
    Opt("--dry-run", "Print the training plan and exit.", is_flag=True),
    Opt("--json", "With --dry-run: print the plan as JSON.", is_flag=True),
)  # fmt: skip


SERVE_OPTIONS: tuple[Opt, ...] = (
    Opt("--host", "Interface to listen on; 0.0.0.0 listens on every interface (set an API key then).",
        default="127.0.0.1"),
    Opt("--port", "Port to listen on.", type=click.IntRange(1, 65535), default=8000),
    Opt("--no-lora", "Serve the base model alone, even where a trained adapter is.", is_flag=True),
    Opt("--api-key", "Require `Authorization: Bearer KEY` on every endpoint but /health (default: $LLMBOX_API_KEY)."),
    Opt("--engine", "The server: llmbox's own, or vLLM (its OpenAI server: for GPUs and real traffic); auto is vLLM "
        "where there is a GPU and vLLM is installed.", type=click.Choice(ENGINES), default="auto"),
    Opt("--max-concurrency", "llmbox engine: requests queued or running at once (default 64); more are answered 429.",
        type=click.IntRange(min=1)),
    Opt("--max-batch-size", "Sequences generated together in one batch (default 16 on llmbox's engine, vLLM's "
        "own --max-num-seqs on vLLM).", type=click.IntRange(min=1)),
    Opt("--dtype", "Weight precision: auto is bfloat16 (float16 without bf16) on a GPU, float32 on CPU.",
        type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto"),
    Opt("--base-weights", "How the base is held: auto = as the adapter was trained (4-bit for a QLoRA adapter, "
        "8-bit after --use-8bit, else full precision); full, 4bit or 8bit to choose (bitsandbytes: less memory, "
        "slower on CPU).", type=click.Choice(["auto", "full", "4bit", "8bit"]), default="auto"),
    Opt("--threads", "CPU threads per operation (default: PyTorch's, one per core); 1 suits tiny models and busy "
        "machines.", type=click.IntRange(min=1)),
    Opt("--image-dir", "Vision models: chat requests may name image files (a path or file:// URL) inside this "
        "folder; without it only data: URLs are taken, and http(s) URLs never.",
        type=click.Path(exists=True, file_okay=False, resolve_path=True)),
    Opt("--max-lora-rank", "vLLM: the largest adapter rank it makes room for (1, 8, 16, 32, 64, 128, 256, 320 or 512; "
        "default: the adapter's rank rounded up, 64 without an adapter yet).", type=click.IntRange(min=1)),
    Opt("--tensor-parallel-size", "vLLM: split the model over this many GPUs (default: vLLM's, 1).",
        type=click.IntRange(min=1)),
    Opt("--max-model-len", "vLLM: the longest prompt + answer in tokens (default: the model's context).",
        type=click.IntRange(min=16)),
    Opt("--vllm-args", "vLLM: more of its own flags, as one quoted string (e.g. \"--gpu-memory-utilization 0.8\")."),
)  # fmt: skip


EXPORT_OPTIONS: tuple[Opt, ...] = (
    Opt("--format", "hf: the adapter merged into the base weights (safetensors); gguf: the merged model as one "
        "GGUF file (llama.cpp, Ollama); lora-gguf: the adapter alone as a GGUF LoRA.",
        type=click.Choice(["hf", "gguf", "lora-gguf"]), required=True),
    Opt("--output", "The folder (hf) or .gguf file to write.", required=True, short="-o"),
    Opt("--dtype", "hf: the merged weights' precision (auto: as the base is stored).",
        type=click.Choice(["auto", "bf16", "f16", "f32"]), default="auto"),
    Opt("--quant", "gguf, lora-gguf: the weights' type (f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0; K-quants "
        "through llama.cpp's llama-quantize).", default="f16"),
    Opt("--no-lora", "Export the base model alone (the base GGUF a lora-gguf export applies over).", is_flag=True),
    Opt("--ollama", "gguf: write an Ollama Modelfile beside the file and print the `ollama create` command.",
        is_flag=True),
    Opt("--force", "Replace an existing output.", is_flag=True),
)  # fmt: skip

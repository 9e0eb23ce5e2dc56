"""The `llmbox` command: the host side, light on purpose (no torch)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from llmbox import __version__
from llmbox.console import make_console
from llmbox.entry import run_cli
from llmbox.errors import UserError
from llmbox.model_home import ModelHome, llmbox_home, resolve_model
from llmbox.options import (
    DATA_REPORT_OPTIONS,
    EXPORT_OPTIONS,
    SERVE_OPTIONS,
    TRAIN_OPTIONS,
    config_file_option,
    to_argv,
    with_options,
)
from llmbox.runtime.local import ENGINE_PACKAGES, run_engine
from llmbox.serve_engine import ENGINES


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="llmbox")
def cli() -> None:
    """Fine-tune LLMs with LoRA/QLoRA and serve them behind an OpenAI-compatible API."""


@cli.command()
@with_options(DATA_REPORT_OPTIONS)
def data(**values: Any) -> None:
    """Show what training would see in --data: formats, record counts, task, duplicates, token lengths."""
    sys.exit(run_engine("data", to_argv(DATA_REPORT_OPTIONS, values)))


RUNTIMES = ("auto", "docker", "local")
NETWORK_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE")


def choose_runtime(asked: str) -> str:
    """auto: Docker when a daemon answers, else local; always say which."""
    from llmbox.runtime.docker import daemon_answers

    if asked == "local":
        return "local"
    if daemon_answers():
        if asked == "auto":
            click.echo("runtime: docker (the Docker daemon answers)", err=True)
        return "docker"
    if asked == "docker":
        raise UserError("--runtime docker: no Docker daemon answers here (`llmbox doctor` says why)")
    click.echo("runtime: local (no Docker daemon answers: the engine runs in this machine's Python)", err=True)
    return "local"


def engine_options(func: Any) -> Any:
    """What `train` and `serve` share: where the engine runs, remote code, and the container's image and GPUs."""
    for option in reversed([
        click.option("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
                     help="Where the engine runs: a Docker container, or this machine's Python."),
        click.option("--trust-remote-code", is_flag=True,
                     help="Run the model repository's own Python code (only if you trust it)."),
        click.option("--image", help="The engine image (default: llmbox/engine:cuda with GPUs, :cpu without)."),
        click.option("--gpus", help="GPUs to use: all (default when there are GPUs) or indices like 0,1; training runs "
                     "one process per GPU (torchrun), vLLM splits the model over them (tensor parallel)."),
    ]):  # fmt: skip
        func = option(func)
    return func


def limit_local_gpus(gpus: str | None) -> None:
    """What `--gpus` gives a container, for a local run: those GPUs only."""
    if gpus and gpus != "all":
        from llmbox.runtime.docker import gpu_args

        gpu_args(gpus)  # the same check of the indices
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus


def engine_image(image: str | None, gpus: str | None, vllm: bool = False) -> tuple[str, str | None]:
    """The image to run and the GPUs to give it; the image is built on first use."""
    from llmbox.runtime import docker

    gpus = gpus or ("all" if _has_gpus() else None)
    chosen = image or docker.image_tag(cuda=gpus is not None, vllm=vllm)
    if gpus:
        from llmbox.doctor import NVIDIA_RUNTIME_FIX, docker_info, nvidia_runtime

        if not nvidia_runtime(docker_info()):
            # Docker's own words for this are "could not select device driver": say what to do instead
            raise UserError(f"GPUs were asked for, but Docker has no NVIDIA runtime: {NVIDIA_RUNTIME_FIX}")
    if not docker.image_exists(chosen):
        click.echo(f"{chosen} is not built yet: building it now (once)", err=True)
        if docker.build_image(chosen, cpu=gpus is None, base_image=None, version=__version__, vllm=vllm):
            raise UserError(f"building {chosen} failed (see above); `llmbox build` retries it")
    return chosen, gpus


@cli.command()
@click.argument("model")
@engine_options
@config_file_option(TRAIN_OPTIONS)
@with_options(TRAIN_OPTIONS)
def train(
    model: str, runtime: str, trust_remote_code: bool, image: str | None, gpus: str | None, **values: Any
) -> None:
    """Fine-tune MODEL (an installed name or a model folder) with LoRA/QLoRA on --data."""
    home = resolve_model(model)
    output = Path(values["output"]).expanduser().resolve() if values["output"] else home.root
    flags = ["--trust-remote-code"] if trust_remote_code else []
    if choose_runtime(runtime) == "local":
        limit_local_gpus(gpus)
        argv = ["--model-path", str(home.weights), *flags, *to_argv(TRAIN_OPTIONS, values | {"output": str(output)})]
        sys.exit(run_engine("train", argv))
    from llmbox.runtime import docker

    chosen, gpus = engine_image(image, gpus)
    data, mounts = docker.rewrite_data_spec(values["data"])
    output.mkdir(parents=True, exist_ok=True)
    mounts += [docker.Mount(home.weights, "/model"), docker.Mount(output, "/work", read_only=False)]
    values = values | {"data": data, "output": "/work"}
    if values["resume_from"]:
        mounts.append(docker.Mount(Path(values["resume_from"]).expanduser().resolve(), "/resume"))
        values["resume_from"] = "/resume"
    command = [
        "python",
        "-m",
        "llmbox_engine",
        "train",
        "--model-path",
        "/model",
        *flags,
        *to_argv(TRAIN_OPTIONS, values),
    ]
    name = docker.container_name("train", home.name)
    # the topology a cluster may give in the environment, and which network interface the collectives use
    passed = tuple((key, value) for key, value in os.environ.items() if key in NETWORK_ENV or key.startswith("PET_"))
    spec = docker.ContainerSpec(chosen, command, mounts, gpus=gpus, name=name, model_name=home.name, env=passed)
    sys.exit(docker.run_container(spec))


@cli.command()
@click.option("--cpu", is_flag=True, help="The CPU variant (no CUDA; bitsandbytes on CPU): for machines without a GPU.")
@click.option("--base-image", help="Build on this image instead of the default CUDA (or Debian, with --cpu) base.")
@click.option(
    "--vllm", is_flag=True, help="The vLLM serving image (`llmbox serve --engine vllm`) instead of the engine's."
)
@click.option("--tag", help="Image tag (default: llmbox/engine:cuda, :cpu with --cpu; llmbox/vllm:... with --vllm).")
def build(cpu: bool, vllm: bool, base_image: str | None, tag: str | None) -> None:
    """Build the engine image that `train` and `serve` run in (they build it on first use too)."""
    from llmbox.runtime import docker

    tag = tag or docker.image_tag(cuda=not cpu, vllm=vllm)
    code = docker.build_image(tag, cpu=cpu, base_image=base_image, version=__version__, vllm=vllm)
    if code:
        raise UserError(f"building {tag} failed (see the build log above)")
    click.echo(f"built {tag}")


def chosen_adapter(home: ModelHome, adapter: Path | None, no_lora: bool) -> Path | None:
    """--adapter PATH, else MODEL's lora/; None with --no-lora (which contradicts --adapter)."""
    if adapter is not None and no_lora:
        raise UserError("--adapter and --no-lora contradict each other: give one")
    return None if no_lora else (adapter.expanduser().resolve() if adapter else home.lora)


@cli.command()
@click.argument("model")
@click.option("--adapter", type=click.Path(path_type=Path), help="Serve this adapter folder (default: MODEL's lora/).")
@engine_options
@with_options(SERVE_OPTIONS)
def serve(
    model: str,
    runtime: str,
    adapter: Path | None,
    trust_remote_code: bool,
    image: str | None,
    gpus: str | None,
    **values: Any,
) -> None:
    """Serve MODEL behind an OpenAI-compatible API, with its trained adapter (reloaded when training publishes one)."""
    from llmbox.model_facts import read_config
    from llmbox.serve_engine import check_engine_options, choose_serve_engine, is_vision_model

    home = resolve_model(model)
    lora = chosen_adapter(home, adapter, values["no_lora"])
    # the key travels in the environment, not argv, where every user of the machine could read it
    api_key = values.pop("api_key") or os.environ.get("LLMBOX_API_KEY")
    flags = ["--trust-remote-code"] if trust_remote_code else []
    if choose_runtime(runtime) == "local":  # the engine chooses its server: it knows where vLLM is
        if api_key:
            os.environ["LLMBOX_API_KEY"] = api_key
        limit_local_gpus(gpus)
        adapter_dir = ["--adapter-dir", str(lora)] if lora else []
        argv = ["--model-path", str(home.weights), *flags, *adapter_dir, *to_argv(SERVE_OPTIONS, values)]
        sys.exit(run_engine("serve", argv, needs=("llmbox_engine",) if values["engine"] == "vllm" else ENGINE_PACKAGES))
    from llmbox.runtime import docker

    if values["engine"] != "llmbox":  # the image decides the engine, so the host does: vLLM's image has vLLM
        has_gpus = gpus is not None or _has_gpus()
        engine, why = choose_serve_engine(
            values["engine"],
            vllm_installed=True,
            gpus=has_gpus,
            images=bool(values["image_dir"]),
            vision=is_vision_model(read_config(home.weights)),
        )
        check_engine_options(engine, values)
        values["engine"] = engine
        click.echo(f"engine: {engine} ({why})", err=True)
    chosen, gpus = engine_image(image, gpus, vllm=values["engine"] == "vllm")
    mounts = [docker.Mount(home.weights, "/model")]
    if values["image_dir"]:  # resolved and checked by click; read-only at the same path, as clients name files
        mounts.append(docker.Mount(Path(values["image_dir"]), values["image_dir"]))
    adapter_dir = []
    if lora is not None:
        if not lora.parent.is_dir():
            raise UserError(f"{lora}: its folder {lora.parent} does not exist")
        # the adapter's parent, not the adapter: training replaces lora/ by a rename, which a mount of it would miss
        mounts.append(docker.Mount(lora.parent, "/adapters"))
        adapter_dir = ["--adapter-dir", f"/adapters/{lora.name}"]
    options = to_argv(SERVE_OPTIONS, values)
    command = ["python", "-m", "llmbox_engine", "serve", "--model-path", "/model", *flags, *adapter_dir, *options]
    secrets = (("LLMBOX_API_KEY", api_key),) if api_key else ()
    name = docker.container_name("serve", home.name)
    spec = docker.ContainerSpec(chosen, command, mounts, gpus=gpus, name=name, model_name=home.name, secrets=secrets)
    sys.exit(docker.run_container(spec))


def _has_gpus() -> bool:
    from llmbox.facts import read_gpu_facts

    return bool(read_gpu_facts())


@cli.command()
@click.argument("model")
@click.option("--adapter", type=click.Path(path_type=Path), help="Export this adapter folder (default: MODEL's lora/).")
@engine_options
@with_options(EXPORT_OPTIONS)
def export(
    model: str,
    runtime: str,
    adapter: Path | None,
    trust_remote_code: bool,
    image: str | None,
    gpus: str | None,
    **values: Any,
) -> None:
    """Export MODEL with its trained adapter: merged HF weights, a GGUF (llama.cpp, Ollama) or a LoRA GGUF."""
    from llmbox.export_request import export_request

    home = resolve_model(model)
    lora = chosen_adapter(home, adapter, values["no_lora"])
    request = export_request(values)
    if lora is not None and not lora.is_dir():
        raise UserError(f"{lora}: no trained adapter there (train first, --adapter PATH, or --no-lora for the base)")
    flags = ["--trust-remote-code"] if trust_remote_code else []
    request.output.parent.mkdir(parents=True, exist_ok=True)
    if choose_runtime(runtime) == "local":
        adapter_dir = ["--adapter-dir", str(lora)] if lora else []
        options = to_argv(EXPORT_OPTIONS, values | {"output": str(request.output)})
        sys.exit(run_engine("export", ["--model-path", str(home.weights), *flags, *adapter_dir, *options]))
    from llmbox.runtime import docker

    chosen, gpus = engine_image(image, gpus)
    mounts = [docker.Mount(home.weights, "/model"), docker.Mount(request.output.parent, "/out", read_only=False)]
    adapter_dir = []
    if lora is not None:
        mounts.append(docker.Mount(lora, "/adapter"))
        adapter_dir = ["--adapter-dir", "/adapter"]
    options = to_argv(EXPORT_OPTIONS, values | {"output": f"/out/{request.output.name}"})
    command = ["python", "-m", "llmbox_engine", "export", "--model-path", "/model", *flags, *adapter_dir, *options]
    name = docker.container_name("export", home.name)
    spec = docker.ContainerSpec(chosen, command, mounts, gpus=gpus, name=name, model_name=home.name)
    sys.exit(docker.run_container(spec))


@cli.group()
def k8s() -> None:
    """Kubernetes manifests: a Kubeflow Trainer TrainJob to train, a Deployment and Service to serve."""


# what a TrainJob decides itself (topology, output, TensorBoard) or a pod cannot use
K8S_NOT_PASSED = {"output", "nnodes", "node_rank", "master_addr", "master_port", "nproc_per_node", "dry_run", "json",
                  "tensorboard_only", "no_tensorboard", "tensorboard_port", "resume_from"}  # fmt: skip
K8S_TRAIN_OPTIONS = tuple(opt for opt in TRAIN_OPTIONS if opt.dest not in K8S_NOT_PASSED)


def placement_options(func: Any) -> Any:
    for option in reversed([
        click.option("--image", required=True, help="The engine image, pushed where the cluster pulls from."),
        click.option("--pvc", required=True, help="A ReadWriteMany PersistentVolumeClaim holding models/MODEL/ "
                     "(and the data), mounted at /llmbox."),
        click.option("-n", "--namespace", help="The objects' namespace (default: kubectl's)."),
        click.option("--name", help="The objects' name (default: from MODEL)."),
        click.option("-o", "--file", "file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Write the manifests here instead of printing them."),
    ]):  # fmt: skip
        func = option(func)
    return func


def emit_manifests(text: str, file: Path | None) -> None:
    if file is None:
        click.echo(text, nl=False)
        return
    file.write_text(text)
    click.echo(f"wrote {file}: kubectl apply -f {file}", err=True)


@k8s.command("train")
@click.argument("model")
@click.option("--nodes", type=click.IntRange(min=1), default=1, show_default=True, help="Machines (pods) training.")
@click.option("--gpus-per-node", type=click.IntRange(min=0), default=1, show_default=True,
              help="GPUs per machine, one training process each (0: one CPU process).")  # fmt: skip
@placement_options
@with_options(K8S_TRAIN_OPTIONS)
def k8s_train(
    model: str, nodes: int, gpus_per_node: int, image: str, pvc: str, namespace: str | None, name: str | None,
    file: Path | None, **values: Any,
) -> None:  # fmt: skip
    """Print a TrainJob that trains MODEL (models/MODEL on the volume) on --data (paths on the volume)."""
    from llmbox import k8s as manifests

    manifests.require_packages()
    where = manifests.Placement(manifests.object_name(name or f"{model}-train"), namespace, image, pvc)
    args = to_argv(K8S_TRAIN_OPTIONS, values | {"data": manifests.data_on_volume(values["data"])})
    job = manifests.train_job(where, model, nodes, gpus_per_node, args)
    text = manifests.to_yaml([job])
    manifests.check(text)
    emit_manifests(f"# {manifests.TRAINER_RELEASE}, runtime {manifests.TORCH_RUNTIME}\n{text}", file)


@k8s.command("serve")
@click.argument("model")
@click.option("--gpus", type=click.IntRange(min=0), default=1, show_default=True, help="GPUs for the server (0: CPU).")
@click.option("--api-key-secret", help="The Secret holding the API key under `api-key` (default: NAME-api-key).")
@click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True,
              help="The server; auto: vLLM with GPUs (--image then names the vLLM image, `llmbox build --vllm`), "
              "llmbox's without.")  # fmt: skip
@placement_options
def k8s_serve(
    model: str, gpus: int, api_key_secret: str | None, engine: str, image: str, pvc: str, namespace: str | None,
    name: str | None, file: Path | None,
) -> None:  # fmt: skip
    """Print a Deployment and Service serving MODEL (models/MODEL on the volume, read-only) with its adapter."""
    from llmbox import k8s as manifests
    from llmbox.serve_engine import choose_serve_engine

    manifests.require_packages()
    engine, why = choose_serve_engine(engine, vllm_installed=True, gpus=gpus > 0, images=False)
    click.echo(f"engine: {engine} ({why}; --image must hold it)", err=True)
    where = manifests.Placement(manifests.object_name(name or f"{model}-serve"), namespace, image, pvc)
    secret = api_key_secret or f"{where.name}-api-key"
    text = manifests.to_yaml(manifests.serving(where, model, gpus, secret, engine))
    manifests.check(text)
    scope = f" -n {namespace}" if namespace else ""
    create = f"kubectl create secret generic {secret}{scope} --from-literal={manifests.API_KEY_ITEM}=..."
    header = f"# the API key is read from Secret {secret} (never written here); create it once with:\n#   {create}\n"
    emit_manifests(header + text, file)


@cli.command()
@click.argument("source")
@click.option("--name", help="The model's name under $LLMBOX_HOME/models (default: from SOURCE).")
@click.option("--force", is_flag=True, help="Replace the weights of an installed model of that name.")
def install(source: str, name: str | None, force: bool) -> None:
    """Install SOURCE (a Hugging Face repo id, a local HF folder or a .gguf file) as a model directory."""
    from llmbox import install as installer

    home = installer.prepare(name or installer.default_name(source), force)
    target = home / "model"
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"{source}: no such GGUF file")
        code = run_engine("import-gguf", [str(path.resolve()), "--output", str(target)])
        if code:
            sys.exit(code)
    elif path.is_dir():
        installer.copy_local_folder(path, target)
    elif path.exists():
        raise UserError(f"{source}: expected a model folder, a .gguf file or a Hugging Face repo id")
    else:
        installer.download_from_hub(source, target)
    installer.write_scripts(home)
    click.echo(f"installed {home.name} in {home}")
    click.echo(f"  train: llmbox train {home.name} --data 'data/*.json'   (or: cd {home} && ./train.sh --data ...)")


@cli.command("list")
def list_models() -> None:
    """The installed models: family, size, handler, and whether a trained adapter is there."""
    from rich.table import Table

    from llmbox.catalog import installed_models

    table = Table(title=f"Models in {llmbox_home() / 'models'}", title_justify="left")
    for column in ("name", "family", "params", "handler", "adapter", "final loss"):
        table.add_column(column)
    for m in installed_models():
        params = f"{m.params / 1e9:.2f}B" if m.params and m.params >= 1e9 else f"{(m.params or 0) / 1e6:.0f}M"
        loss = f"{m.final_loss:.4f}" if m.final_loss is not None else "-"
        table.add_row(m.name, m.family, params if m.params else "?", m.handler, "yes" if m.adapter else "no", loss)
        if m.problem:
            table.add_row("", f"[red]{m.problem}[/]", "", "", "", "")
    make_console().print(table)


@cli.command()
@click.argument("model")
@click.option("--port", type=click.IntRange(1, 65535), default=6006, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (0.0.0.0 shares it on the network).")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True)
@click.option("--image", help="The engine image (default: llmbox/engine:cpu; TensorBoard needs no GPU).")
def tensorboard(model: str, port: int, host: str, runtime: str, image: str | None) -> None:
    """Serve MODEL's training logs (all runs) with TensorBoard: the sidecar, in a container or locally."""
    home = resolve_model(model)
    logs = home.root / "logs"
    if not logs.is_dir():
        raise UserError(f"{logs}: no training logs yet (train first)")
    address = ["--host", host, "--port", str(port)]
    click.echo(f"tensorboard: http://{host}:{port}/  (Ctrl+C stops it)", err=True)
    if choose_runtime(runtime) == "local":
        sys.exit(run_engine("tensorboard", ["--logdir", str(logs), *address], needs=("tensorboard",)))
    from llmbox.runtime import docker

    chosen, _ = engine_image(image, None)
    command = ["python", "-m", "llmbox_engine", "tensorboard", "--logdir", "/work/logs", *address]
    name = docker.container_name("tensorboard", home.name)
    sys.exit(docker.run_container(docker.ContainerSpec(chosen, command, [docker.Mount(home.root, "/work")], name=name)))


@cli.command()
def doctor() -> None:
    """Check Docker, the NVIDIA container runtime, GPUs, disk space and the engine image; explain each fix."""
    from rich.table import Table

    from llmbox.doctor import run_checks

    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
    table = Table(title="llmbox doctor", title_justify="left")
    for column in ("check", "", "finding", "fix"):
        table.add_column(column)
    checks = run_checks()
    for check in checks:
        table.add_row(check.name, marks[check.status], check.detail, check.fix)
    make_console().print(table)
    if any(c.status == "fail" for c in checks):
        sys.exit(1)


def main() -> None:
    run_cli(cli, "llmbox")


if __name__ == "__main__":
    main()

"""The Docker runtime, for real: the CPU engine image is built here and `llmbox train --runtime docker` runs in it.

Without a Docker daemon these tests skip, except under CI (`CI` set), where `.ci/run` starts one: there a
missing daemon is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llmbox.runtime import docker
from llmbox.runtime.docker import ContainerSpec, Mount, gpu_args, rewrite_data_spec

from conftest import REPO, free_port, run_llmbox, tensorboard_tags, write_json
from train_helpers import qa_records


@pytest.fixture(scope="session")
def cpu_image() -> str:
    if not docker.daemon_answers():
        if os.environ.get("CI"):
            pytest.fail("no Docker daemon answers, and CI must run the Docker tests (.ci/run starts dockerd)")
        pytest.skip("no Docker daemon here")
    subprocess.run(["bash", str(REPO / "images" / "cpu-base.sh")], check=True)
    wheels = REPO / "images" / "wheels"
    if not list(wheels.glob("torch-*.whl")):
        # a local CPU wheel (this machine's find-links) saves a download; without one the CPU index is used
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-index", "--no-deps", "torch==2.13.0",
                        "-d", str(wheels)], check=False)  # fmt: skip
    proc = run_llmbox("build", "--cpu", "--base-image", "llmbox/base:bookworm")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return docker.CPU_IMAGE


def test_train_in_the_container_writes_an_adapter_the_caller_owns(
    cpu_image: str, tmp_path: Path, tiny_llama: Path
) -> None:
    env = {"LLMBOX_HOME": str(tmp_path / "home")}
    assert run_llmbox("install", str(tiny_llama), "--name", "tiny", env=env).returncode == 0
    data = write_json(tmp_path / "data" / "qa.json", qa_records(24))
    proc = run_llmbox("train", "tiny", "--runtime", "docker", "--data", str(tmp_path / "data"), "--max-steps", "3",
                      "--no-tensorboard", "--skip-test", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    home = tmp_path / "home" / "models" / "tiny"
    adapter = home / "lora" / "adapter_model.safetensors"
    assert adapter.is_file() and adapter.stat().st_uid == os.getuid() and adapter.stat().st_gid == os.getgid()
    info = json.loads((home / "lora" / "adapter_info.json").read_text())
    assert info["steps"] == 3 and info["data"]["sources"][0]["path"] == "/data/0/qa.json"
    assert info["base_model"]["name"] == "tiny"  # the model directory's name, though the container sees /model
    assert f"adapter: {home / 'lora'}" in proc.stdout and "/work/lora" not in proc.stdout  # host paths shown
    assert not (home / "model" / "lora").exists()  # the weights are mounted read-only, nothing lands there
    assert data.stat().st_uid == os.getuid()


def test_export_in_the_container_writes_a_gguf_the_caller_owns(
    cpu_image: str, tmp_path: Path, trained: Callable[[str], tuple[Path, Path]]
) -> None:
    model_dir, adapter_dir = trained("llama")
    home = tmp_path / "tiny"
    shutil.copytree(model_dir, home / "model")
    shutil.copytree(adapter_dir, home / "lora")
    out = tmp_path / "exports" / "tiny.gguf"
    proc = run_llmbox("export", str(home), "--runtime", "docker", "--format", "gguf", "-o", str(out), "--ollama")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert out.read_bytes()[:4] == b"GGUF" and out.stat().st_uid == os.getuid()
    assert f"exported {out}" in proc.stdout and "/out/" not in proc.stdout  # host paths shown
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./tiny.gguf")


def start_container_node(model: Path, rank: int, out: Path, data: Path, port: int) -> subprocess.Popen[str]:
    """`llmbox train --runtime docker` as node RANK of 2 (one process each), meeting on 127.0.0.1:PORT."""
    from test_distributed import BATCHES, EXACT

    command = [str(Path(sys.executable).with_name("llmbox")), "train", str(model), "--runtime", "docker",
               "--data", str(data), "--output", str(out), "--no-tensorboard", "--skip-test", *EXACT, *BATCHES,
               "--max-steps", "4", "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
               "--master-port", str(port), "--nproc-per-node", "1"]  # fmt: skip
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # the collectives stay on loopback
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run_container_nodes(model: Path, tmp_path: Path, data: list[Path]) -> list[tuple[int, str, str]]:
    """Two machines: each node its own model directory and its own copy of the data."""
    port = free_port()
    nodes = [start_container_node(model, rank, tmp_path / f"node{rank}", data[rank], port) for rank in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    return [(node.returncode, stdout, stderr) for node, (stdout, stderr) in zip(nodes, outputs, strict=True)]


def test_two_nodes_in_two_containers_train_one_adapter_like_one_process(cpu_image: str, tmp_path: Path) -> None:
    from test_distributed import assert_same_run, train_cli

    from tiny_models import build_tiny_model

    model = build_tiny_model("llama", tmp_path / "model")
    data = [write_json(tmp_path / f"data{rank}" / "qa.json", qa_records(40)) for rank in range(2)]
    train_cli(model, tmp_path / "one", data[0], "--max-steps", "4")
    (code0, out0, err0), (code1, out1, err1) = run_container_nodes(model, tmp_path, data)
    assert code0 == 0 and code1 == 0, out0[-2000:] + err0[-2000:] + out1[-2000:] + err1[-2000:]
    assert "2 = 2 nodes x 1 (ddp)" in out0
    assert_same_run(tmp_path / "one", tmp_path / "node0")
    adapter = tmp_path / "node0" / "lora" / "adapter_model.safetensors"
    assert adapter.stat().st_uid == os.getuid() and not (tmp_path / "node1" / "lora").exists()


def test_two_container_nodes_given_different_data_stop_naming_the_node(cpu_image: str, tmp_path: Path) -> None:
    from tiny_models import build_tiny_model

    model = build_tiny_model("llama", tmp_path / "model")
    data = [write_json(tmp_path / f"data{rank}" / "qa.json", qa_records(40, seed=rank)) for rank in range(2)]
    results = run_container_nodes(model, tmp_path, data)
    shown = "".join(stderr for _, _, stderr in results)
    assert all(code != 0 for code, _, _ in results), shown
    assert "the training data on node 1 differs from node 0's" in shown and "Traceback" not in shown
    assert not (tmp_path / "node0" / "lora").exists()


def test_the_model_and_data_are_read_only_inside(cpu_image: str, tmp_path: Path, tiny_llama: Path) -> None:
    spec = ContainerSpec(
        cpu_image,
        ["sh", "-c", "touch /model/x 2>/dev/null && echo model-writable;"
         " touch /data/0/x 2>/dev/null && echo data-writable; touch /work/x && echo work-writable"],
        [Mount(tiny_llama, "/model"), Mount(tmp_path, "/data/0"), Mount(tmp_path, "/work", read_only=False)],
    )  # fmt: skip
    proc = subprocess.run(spec.run_args(os.getuid(), os.getgid()), capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["work-writable"], proc.stdout + proc.stderr


def test_data_paths_are_rewritten_to_read_only_mounts(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "a.json").write_text("[]")
    spec, mounts = rewrite_data_spec(f"{folder / 'a.json'},{folder},{folder}/*.json,tatsu-lab/alpaca:train")
    assert spec == "/data/0/a.json,/data/1,/data/2/*.json,tatsu-lab/alpaca:train"
    assert [(m.source, m.target, m.read_only) for m in mounts] == [
        (folder, "/data/0", True), (folder, "/data/1", True), (folder, "/data/2", True),
    ]  # fmt: skip


def test_container_arguments(tmp_path: Path) -> None:
    args = ContainerSpec("img", ["python", "-V"], [Mount(tmp_path, "/work", read_only=False)], gpus="0,1").run_args(
        7, 8
    )
    assert args[:3] == ["docker", "run", "--rm"] and "--init" in args
    assert "--interactive" in args and "LLMBOX_LIFELINE=stdin" in args  # stdin is llmbox's lifeline
    assert args[args.index("--user") + 1] == "7:8" and args[args.index("--network") + 1] == "host"
    assert args[args.index("--gpus") + 1] == '"device=0,1"'
    assert f"type=bind,source={tmp_path},target=/work" in args
    assert args[-3:] == ["img", "python", "-V"]
    assert gpu_args(None) == [] and gpu_args("all") == ["--gpus", "all"]
    secret = ContainerSpec("img", ["true"], [], secrets=(("LLMBOX_API_KEY", "s3cret"),)).run_args(7, 8)
    assert "LLMBOX_API_KEY" in secret and not any("s3cret" in a for a in secret)  # never in argv, where ps shows it


def test_runtime_docker_without_a_daemon_is_a_clear_error(tmp_path: Path, tiny_llama: Path) -> None:
    proc = run_llmbox("train", str(tiny_llama), "--runtime", "docker", "--data", "x.json",
                      env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})  # fmt: skip
    assert proc.returncode != 0 and "error: --runtime docker: no Docker daemon answers" in proc.stderr


def test_doctor_reports_the_daemon_and_explains_a_missing_one(cpu_image: str, tmp_path: Path) -> None:
    ok = run_llmbox("doctor", env={"LLMBOX_HOME": str(tmp_path)})
    assert ok.returncode == 0 and "Docker" in ok.stdout and "answers" in ok.stdout
    broken = run_llmbox("doctor", env={"LLMBOX_HOME": str(tmp_path), "DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert broken.returncode == 1 and "FAIL" in broken.stdout and "systemctl start docker" in broken.stdout


def test_a_gpu_request_without_the_nvidia_runtime_is_explained(cpu_image: str, tiny_llama: Path) -> None:
    proc = run_llmbox("train", str(tiny_llama), "--runtime", "docker", "--gpus", "all", "--data", "x.json")
    assert proc.returncode != 0 and "could not select device driver" not in proc.stderr
    assert "error: GPUs were asked for, but Docker has no NVIDIA runtime" in proc.stderr


def test_compose_tensorboard_answers_on_its_port(cpu_image: str, tmp_path: Path, tiny_llama: Path) -> None:
    from train_helpers import train

    home = tmp_path / "home"
    train(tiny_llama, home, write_json(tmp_path / "qa.json", qa_records(24)), max_steps=2)
    port = free_port()
    env = {**os.environ, "LLMBOX_MODEL_DIR": str(home), "LLMBOX_TENSORBOARD_PORT": str(port),
           "LLMBOX_UID": str(os.getuid()), "LLMBOX_GID": str(os.getgid())}  # fmt: skip
    compose = ["docker", "compose", "-p", f"llmbox-test-{port}", "-f", str(REPO / "compose" / "docker-compose.yml")]
    up = subprocess.run([*compose, "up", "-d", "tensorboard"], env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    try:
        tags = tensorboard_tags(port)
        assert any("train/loss" in run for run in tags.values()), tags
    finally:
        subprocess.run([*compose, "down", "--timeout", "5"], env=env, capture_output=True, timeout=120)


def test_the_tensorboard_sidecar_container(cpu_image: str, tmp_path: Path, tiny_llama: Path) -> None:
    from train_helpers import train

    home = tmp_path / "home"
    shutil.copytree(tiny_llama, home / "model")
    train(home / "model", home, write_json(tmp_path / "qa.json", qa_records(24)), max_steps=2)
    port = free_port()
    llmbox = str(Path(sys.executable).with_name("llmbox"))
    command = [llmbox, "tensorboard", str(home), "--runtime", "docker", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        tags = tensorboard_tags(port)
        assert any("eval/val_loss" in run for run in tags.values()), tags
    finally:
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) is not None


def test_serve_in_the_container_answers_the_openai_client_with_the_adapter(
    cpu_image: str, tmp_path: Path, tiny_llama: Path
) -> None:
    from llmbox_engine.train.artifacts import publish_adapter
    from serve_helpers import chat, copy_model_home, running_server, trained_adapter

    adapter = trained_adapter(tiny_llama, "a")
    home = copy_model_home(tiny_llama, tmp_path / "home" / "models" / "tiny")
    publish_adapter(adapter.lora, home / "lora", adapter.info)
    env = {"LLMBOX_HOME": str(tmp_path / "home")}
    args = ["tiny", "--runtime", "docker", "--threads", "1"]
    with running_server(args, tmp_path / "serve.log", api_key="k3y", host_cli=True, env=env) as server:
        ids = {m.id for m in server.client().models.list()}
        assert ids == {"tiny", "tiny:lora"}, ids  # the directory's name, not the container's /model
        assert chat(server.client(), "tiny:lora").choices[0].message.content.strip() == adapter.answer
        status, body = server.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert str(home / "lora") in server.output() and "/adapters/lora" not in server.output()
        running = subprocess.run(["docker", "ps", "-q", "--filter", f"ancestor={cpu_image}"], capture_output=True,
                                 text=True, check=True)  # fmt: skip
        assert running.stdout.strip(), "the server is not running in a container"
    # SIGTERM to `llmbox serve` stops the container, and --rm removes it
    left = subprocess.run(["docker", "ps", "-aq", "--filter", f"ancestor={cpu_image}"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    assert left.stdout.strip() == ""


def test_train_in_the_container_with_two_processes(
    cpu_image: str, tmp_path: Path, installed_tiny: dict[str, str]
) -> None:
    proc = run_llmbox("train", "tiny", "--runtime", "docker", "--data", str(tmp_path / "data"), "--max-steps", "2",
                      "--nproc-per-node", "2", "--no-tensorboard", "--skip-test", env=installed_tiny)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((tmp_path / "home" / "models" / "tiny" / "lora" / "adapter_info.json").read_text())
    assert (info["plan"]["strategy"], info["plan"]["world_size"], info["steps"]) == ("ddp", 2, 2)


def test_qlora_with_an_8bit_optimizer_trains_in_the_cpu_image(
    cpu_image: str, tmp_path: Path, installed_tiny: dict[str, str]
) -> None:
    """The CPU image carries bitsandbytes with its CPU backend: the quantized paths run there as they do locally."""
    proc = run_llmbox("train", "tiny", "--runtime", "docker", "--data", str(tmp_path / "data"), "--max-steps", "2",
                      "--method", "qlora", "--optimizer", "adamw_bnb_8bit", "--no-tensorboard", "--skip-test",
                      env=installed_tiny)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernels-community" not in proc.stdout + proc.stderr  # bitsandbytes' hub-kernel notice stays quiet
    info = json.loads((tmp_path / "home" / "models" / "tiny" / "lora" / "adapter_info.json").read_text())
    assert (info["plan"]["load_in_4bit"], info["plan"]["optimizer"], info["steps"]) == (True, "adamw_bnb_8bit", 2)


def containers(prefix: str) -> list[str]:
    """The containers, running or not, whose names start with `prefix`."""
    listed = subprocess.run(["docker", "ps", "-a", "--filter", f"name=^{prefix}", "--format", "{{.Names}}"],
                            capture_output=True, text=True, check=True)  # fmt: skip
    return listed.stdout.split()


def wait_no_containers(prefix: str, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := containers(prefix)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


@pytest.fixture
def installed_tiny(tmp_path: Path, tiny_llama: Path) -> dict[str, str]:
    """LLMBOX_HOME with the tiny model installed as `tiny`, and training data beside it."""
    env = {**os.environ, "LLMBOX_HOME": str(tmp_path / "home")}
    assert run_llmbox("install", str(tiny_llama), "--name", "tiny", env=env).returncode == 0
    write_json(tmp_path / "data" / "qa.json", qa_records(40))
    return env


def test_sigint_to_llmbox_stops_the_train_container_which_saves_and_holds_the_directory_meanwhile(
    cpu_image: str, tmp_path: Path, installed_tiny: dict[str, str]
) -> None:
    from process_helpers import start_training
    from train_helpers import finish, wait_for

    process = start_training("tiny", None, tmp_path / "data", "--runtime", "docker", host_cli=True, env=installed_tiny)
    wait_for(process, "eval   2", timeout=300)
    (running,) = containers("llmbox-train-tiny-")
    # a second training on the same model directory, even outside Docker, names the container and stops
    second = run_llmbox("train", "tiny", "--runtime", "local", "--data", str(tmp_path / "data"), "--max-steps", "1",
                        env=installed_tiny)  # fmt: skip
    assert second.returncode == 2 and f"being trained by the container {running}" in second.stderr, second.stderr
    assert f"`docker kill --signal INT {running}`" in second.stderr
    process.send_signal(signal.SIGINT)  # to llmbox alone, as a pipeline stops it
    rest = finish(process)
    assert process.returncode == 0, rest
    assert "stopped: stopped by SIGINT" in rest and "aborting" not in rest
    lora = tmp_path / "home" / "models" / "tiny" / "lora"
    assert json.loads((lora / "adapter_info.json").read_text())["stop_reason"] == "stopped by SIGINT"
    assert wait_no_containers("llmbox-train-tiny-", timeout=30) == []  # stopped and removed


def test_a_killed_llmbox_leaves_no_train_container_behind(
    cpu_image: str, tmp_path: Path, installed_tiny: dict[str, str]
) -> None:
    from process_helpers import command_line, descendants, start_training, wait_gone
    from train_helpers import wait_for

    process = start_training("tiny", None, tmp_path / "data", "--runtime", "docker", host_cli=True, env=installed_tiny)
    wait_for(process, "eval   2", timeout=300)
    client = descendants(process.pid)
    assert containers("llmbox-train-tiny-") and client
    process.kill()  # SIGKILL: the docker client's stdin closes, and with it the container's
    process.wait()
    assert wait_no_containers("llmbox-train-tiny-", timeout=60) == []
    assert not wait_gone(client, timeout=30), [command_line(p) for p in client]
    info = json.loads((tmp_path / "home" / "models" / "tiny" / "lora" / "adapter_info.json").read_text())
    assert info["stop_reason"] == "stopped by SIGTERM"  # it saved before it went


def test_a_killed_llmbox_leaves_no_serve_container_behind(
    cpu_image: str, tmp_path: Path, installed_tiny: dict[str, str]
) -> None:
    from serve_helpers import running_server

    from process_helpers import port_free

    args = ["tiny", "--runtime", "docker", "--no-lora", "--threads", "1"]
    env = {"LLMBOX_HOME": installed_tiny["LLMBOX_HOME"]}
    with running_server(args, tmp_path / "serve.log", host_cli=True, env=env) as server:
        assert containers("llmbox-serve-tiny-")
        server.process.kill()
        server.process.wait()
        assert wait_no_containers("llmbox-serve-tiny-", timeout=60) == []
        assert port_free(server.port)


def test_vision_train_and_serve_in_containers_read_images_from_read_only_mounts(cpu_image: str, tmp_path: Path) -> None:
    from serve_helpers import running_server

    from tiny_vision_models import build_tiny_vision_model, write_caption_dataset

    env = {"LLMBOX_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    model = build_tiny_vision_model("llava", tmp_path / "built")
    assert run_llmbox("install", str(model), "--name", "seeing", env=env).returncode == 0
    data = write_caption_dataset(tmp_path / "data")  # image paths relative to captions.json
    data.write_text(json.dumps([{**r, "caption": "a red circle"} for r in json.loads(data.read_text())]))
    proc = run_llmbox("train", "seeing", "--runtime", "docker", "--data", str(data), "--epochs", "8", "--force-epochs",
                      "--learning-rate", "3e-2", "--batch-size", "4", "--validation-split", "0", "--no-tensorboard",
                      "--skip-test", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((tmp_path / "home" / "models" / "seeing" / "lora" / "adapter_info.json").read_text())
    assert info["handler"] == "llava" and info["data"]["examples"] == 8
    image = tmp_path / "data" / "images" / "red_circle.png"
    args = ["seeing", "--runtime", "docker", "--threads", "1", "--image-dir", str(tmp_path / "data")]
    with running_server(args, tmp_path / "serve.log", host_cli=True, env=env) as server:
        # the client names the file as it is on the host; the server reads it from its read-only mount
        message = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{image}"}},
                                                 {"type": "text", "text": "Describe this image."}]}]  # fmt: skip
        answer = server.client().chat.completions.create(model="seeing:lora", messages=message, max_tokens=6,
                                                         temperature=0)  # fmt: skip
        assert answer.choices[0].message.content.startswith("a red"), answer.choices[0].message.content

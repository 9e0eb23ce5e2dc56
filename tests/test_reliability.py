"""Reliability as a pipeline meets it: a killed llmbox leaves nothing running, one training per model directory,
damaged checkpoints passed over on --resume, and a full disk never costs the published adapter."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmbox.errors import UserError
from llmbox.plan import PlanFlags
from llmbox_engine.train.artifacts import checkpoint_problem, checkpoint_step, numbered_checkpoints
from llmbox_engine.train.recipe import LoraRecipe, TrainOptions
from llmbox_engine.train.writer_lock import busy_message, exclusive_writer
from serve_helpers import Server, copy_model_home, running_server

from conftest import free_port, run_llmbox, tensorboard_tags, write_json
from process_helpers import LLMBOX, command_line, descendants, port_free, start_training, wait_gone
from train_helpers import adapter_info, finish, qa_records, train, wait_for


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_json(tmp_path / "qa.json", qa_records(40))


# ---- no orphans ------------------------------------------------------------------------------------------------


def test_a_killed_llmbox_train_leaves_no_engine_behind_and_the_engine_saves_first(
    tiny_llama: Path, tmp_path: Path, data: Path
) -> None:
    out, port = tmp_path / "out", free_port()
    process = start_training(tiny_llama, out, data, "--tensorboard-port", str(port), host_cli=True)
    wait_for(process, "eval   2")
    tree = descendants(process.pid)
    assert len(tree) >= 2, [command_line(p) for p in tree]  # the engine and its TensorBoard
    process.kill()  # SIGKILL: llmbox can pass nothing on; only the lifeline tells the engine
    process.wait()
    left = wait_gone(tree, timeout=60)
    assert not left, [command_line(p) for p in left]
    assert port_free(port)  # TensorBoard went with it
    # the engine stopped as it does on SIGTERM: it finished the step and saved
    assert adapter_info(out)["stop_reason"] == "stopped by SIGTERM"
    with exclusive_writer(out):  # and the kernel released its lock
        pass


def test_a_killed_engine_takes_its_tensorboard_along(tiny_llama: Path, tmp_path: Path, data: Path) -> None:
    port = free_port()
    process = start_training(tiny_llama, tmp_path / "out", data, "--tensorboard-port", str(port), host_cli=True)
    wait_for(process, "eval   2")
    (engine,) = (pid for pid in descendants(process.pid) if "llmbox_engine train" in command_line(pid))
    sidecar = descendants(engine)
    assert sidecar, "no TensorBoard below the engine"
    subprocess.run(["kill", "-KILL", str(engine)], check=True)
    finish(process)
    assert process.returncode == 137  # 128 + SIGKILL, as a shell reports it
    assert not wait_gone(sidecar, timeout=60)
    assert port_free(port)


def test_a_killed_llmbox_serve_frees_its_port(tiny_llama: Path, tmp_path: Path) -> None:
    home = copy_model_home(tiny_llama, tmp_path / "home")
    args = [str(home), "--runtime", "local", "--no-lora", "--threads", "1"]
    with running_server(args, tmp_path / "serve.log", host_cli=True) as server:
        tree = descendants(server.process.pid)
        assert tree
        server.process.kill()
        server.process.wait()
        left = wait_gone(tree, timeout=60)
        assert not left, [command_line(p) for p in left]
        assert port_free(server.port)


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell does to a command it starts with `&` in a script


@pytest.mark.parametrize(
    ("sig", "background"), [(signal.SIGINT, False), (signal.SIGKILL, False), (signal.SIGINT, True)]
)
def test_llmbox_tensorboard_stops_with_llmbox(
    tiny_llama: Path, tmp_path: Path, data: Path, sig: int, background: bool
) -> None:
    home = copy_model_home(tiny_llama, tmp_path / "home")
    train(home / "model", home, data, max_steps=2)
    port = free_port()
    command = [LLMBOX, "tensorboard", str(home), "--runtime", "local", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               preexec_fn=ignore_sigint if background else None)  # fmt: skip
    try:
        assert tensorboard_tags(port, expected=frozenset({"train/loss"}))
        tree = descendants(process.pid)
        process.send_signal(sig)
        process.wait(timeout=60)
        assert not wait_gone(tree, timeout=60)
        assert port_free(port)
    finally:
        process.kill()


# ---- one writer per model directory ------------------------------------------------------------------------------


def test_a_second_training_on_the_same_directory_stops_at_once_and_the_first_finishes(
    tiny_llama: Path, tmp_path: Path, data: Path
) -> None:
    out = tmp_path / "out"
    first = start_training(tiny_llama, out, data, host_cli=True)
    wait_for(first, "eval   2")
    (engine,) = descendants(first.pid)
    second = run_llmbox("train", str(tiny_llama), "--runtime", "local", "--data", str(data), "--output", str(out),
                        "--max-steps", "2", "--no-tensorboard", "--skip-test")  # fmt: skip
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"error: {out} is being trained by process {engine}" in second.stderr
    assert f"`kill -INT {engine}`" in second.stderr and "Traceback" not in second.stderr
    # a dry run writes nothing, so it needs no lock
    dry = run_llmbox("train", str(tiny_llama), "--runtime", "local", "--data", str(data), "--output", str(out),
                     "--dry-run")  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    first.send_signal(signal.SIGINT)  # as a supervisor stops it
    rest = finish(first)
    assert first.returncode == 0, rest
    assert "error" not in rest and adapter_info(out)["stop_reason"] == "stopped by SIGINT"


def test_the_busy_message_names_a_container_or_a_process_elsewhere(tmp_path: Path) -> None:
    container = busy_message(tmp_path, {"pid": 7, "container": "llmbox-train-tiny-abc123", "started": "12:00"})
    assert "the container llmbox-train-tiny-abc123" in container
    assert "`docker kill --signal INT llmbox-train-tiny-abc123`" in container
    elsewhere = busy_message(tmp_path, {"pid": 99, "host": "gpu-node-7"})
    assert "process 99 on host gpu-node-7" in elsewhere and "`kill -INT 99` there" in elsewhere


def test_the_lock_is_exclusive_and_an_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with exclusive_writer(out):
        probe = subprocess.run(
            ["python3", "-c", "import fcntl, sys; f = open(sys.argv[1]); fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)",
             str(out / ".llmbox-train.lock")], capture_output=True, text=True,
        )  # fmt: skip
        assert probe.returncode != 0 and "BlockingIOError" in probe.stderr  # another process cannot take it
        holder = json.loads((out / ".llmbox-train.lock").read_text())
        assert holder["pid"] > 0 and holder["started"]
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="cannot write to"), exclusive_writer(tmp_path / "file" / "out"):
        pass


# ---- checkpoints a resume can trust ---------------------------------------------------------------------------

RESUME_FLAGS = {"epochs": 2, "force_epochs": True, "learning_rate": 1e-2, "batch_size": 4,
                "gradient_accumulation_steps": 1}  # fmt: skip


def resume(out: Path, model: Path, data: Path, resume_from: Path | None = None) -> None:
    options = TrainOptions(model, out, str(data), PlanFlags(**RESUME_FLAGS), resume=resume_from is None,
                           resume_from=resume_from, tensorboard=False, skip_test=True)  # fmt: skip
    LoraRecipe(options).run()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_passes_over_damaged_checkpoints_and_still_reaches_the_same_result(
    tiny_llama: Path, tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    whole = train(tiny_llama, tmp_path / "whole", data, **RESUME_FLAGS)
    out = tmp_path / "parts"
    train(tiny_llama, out, data, **RESUME_FLAGS, max_steps=6)
    checkpoints = out / "checkpoints"
    numbered = numbered_checkpoints(checkpoints)
    assert len(numbered) >= 2 and all(checkpoint_problem(c) is None for c in [*numbered, checkpoints / "last"])
    newest, older = numbered[-1], numbered[-2]
    older_step = checkpoint_step(older)
    truncate(checkpoints / "last" / "adapter_model.safetensors")  # a disk that filled while copying
    flipped = bytearray((newest / "training_state.pt").read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # same size, other bytes
    (newest / "training_state.pt").write_bytes(bytes(flipped))
    assert "truncated" in (checkpoint_problem(checkpoints / "last") or "")
    assert "hash differs" in (checkpoint_problem(newest) or "")
    capsys.readouterr()
    resume(out, tiny_llama, data)
    said = capsys.readouterr().out
    assert f"skipping {checkpoints / 'last'}" in said and f"skipping {newest}" in said
    assert f"resuming from {older} at step {older_step}" in " ".join(said.split())
    # the older checkpoint carries everything: the run ends exactly where the uninterrupted one did
    a, b = adapter_info(tmp_path / "whole"), adapter_info(out)
    assert b["steps"] == whole.steps
    assert b["final_val_loss"] == pytest.approx(a["final_val_loss"], rel=1e-4)


def test_resume_from_a_damaged_checkpoint_named_by_hand_is_refused(
    tiny_llama: Path, tmp_path: Path, data: Path
) -> None:
    out = tmp_path / "out"
    train(tiny_llama, out, data, **RESUME_FLAGS, max_steps=2)
    last = out / "checkpoints" / "last"
    truncate(last / "training_state.pt")
    with pytest.raises(UserError, match=r"cannot resume from it: training_state.pt holds \d+ bytes .* \(truncated\)"):
        resume(out, tiny_llama, data, resume_from=last)


# ---- a full disk -------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real file system that fills up (mounting needs root, which CI has)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def fill(disk: Path) -> None:
    with (disk / "filler").open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def served_adapter(server: Server) -> str:
    """The fingerprint of the adapter the server answers `home:lora` with."""
    models = {m.id: m for m in server.client().models.list()}
    return str(models["home:lora"].model_extra["llmbox"]["fingerprint"])


def test_a_full_disk_during_publish_keeps_the_old_adapter_serving(
    tiny_llama: Path, tmp_path: Path, small_disk: Path
) -> None:
    home = copy_model_home(tiny_llama, tmp_path / "home")  # serve reads the weights from here
    out = small_disk  # lora/ on the small disk; checkpoints/ on a roomy one, so the publish is what fails
    (tmp_path / "checkpoints").mkdir()
    (out / "checkpoints").symlink_to(tmp_path / "checkpoints")
    records = write_json(tmp_path / "qa.json", qa_records(24))
    train(tiny_llama, out, records, max_steps=2)
    published = {p.name: p.read_bytes() for p in (out / "lora").iterdir()}
    shutil.rmtree(out / "logs")  # room for the filler's last bytes, not for the run's logs
    args = [str(home), "--runtime", "local", "--adapter", str(out / "lora"), "--threads", "1"]
    with running_server(args, tmp_path / "serve.log", host_cli=True) as server:
        served = served_adapter(server)
        fill(out)
        engine = [
            *[sys.executable, "-m", "llmbox_engine", "train", "--model-path", str(tiny_llama), "--data", str(records)],
            *["--output", str(out), "--max-steps", "4", "--learning-rate", "1e-2", "--no-tensorboard", "--skip-test"],
        ]
        failed = subprocess.run(engine, capture_output=True, text=True, timeout=600)
        assert failed.returncode == 2, failed.stdout[-2000:] + failed.stderr[-2000:]
        errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr
        assert "writing the adapter to lora/ failed: No space left on device" in errors[0]
        assert f"the adapter published before is untouched in {out / 'lora'}" in errors[0]
        assert {p.name: p.read_bytes() for p in (out / "lora").iterdir()} == published
        assert not [p for p in out.iterdir() if p.name.startswith(".lora")]  # no staging left behind
        assert served_adapter(server) == served  # still serving, still the same adapter
        assert server.client().models.list()  # and answering
    # with room again, --resume continues from the last whole checkpoint and publishes
    (out / "filler").unlink()
    resumed = subprocess.run([*engine, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and adapter_info(out)["steps"] == 4

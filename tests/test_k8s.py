"""`llmbox k8s`: manifests built from, and checked against, the upstream API models (Kubeflow Trainer's TrainJob,
the kubernetes client's Deployment and Service); a broken manifest fails the same check. No cluster here."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from llmbox import k8s
from llmbox.errors import UserError
from llmbox.main import cli


def run(*args: str, env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(cli, ["k8s", *args], env=env)
    assert result.exit_code == 0, result.output
    return result.stdout


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_train_job_runs_the_engine_on_every_node_with_the_volume_and_gpus() -> None:
    text = run("train", "smollm2", "--image", "registry.example/llmbox:cuda", "--pvc", "shared", "--nodes", "2",
               "--gpus-per-node", "8", "--data", "data/*.json,more/extra.jsonl", "--mode", "fast",
               "-n", "ml")  # fmt: skip
    (job,) = k8s.check(text)  # what `kubectl apply` would send, read back through the Trainer's own models
    assert job.api_version == "trainer.kubeflow.org/v1alpha1" and job.metadata.namespace == "ml"
    assert job.spec.runtime_ref.name == "torch-distributed"
    trainer = job.spec.trainer
    assert (trainer.num_nodes, trainer.num_proc_per_node) == (2, 8)
    assert trainer.resources_per_node.limits["nvidia.com/gpu"].actual_instance == "8"
    command = trainer.command
    assert command[:4] == ["python", "-m", "llmbox_engine", "train"]
    assert command[command.index("--data") + 1] == "/llmbox/data/*.json,/llmbox/more/extra.jsonl"
    assert command[command.index("--model-path") + 1] == "/llmbox/models/smollm2/model"
    assert "--mode" in command and "--nnodes" not in command  # the topology comes from Trainer's PET_* variables
    pod = job.spec.runtime_patches[0].training_runtime_spec.template.spec.replicated_jobs[0].template.spec.template.spec
    assert pod.volumes[0].persistent_volume_claim.claim_name == "shared"
    assert pod.containers[0].volume_mounts[0].mount_path == "/llmbox" and pod.security_context.run_as_non_root


def test_serving_reads_the_key_from_a_secret_and_never_prints_it() -> None:
    text = run("serve", "smollm2", "--image", "img:1", "--pvc", "shared", "--gpus", "1",
               env={"LLMBOX_API_KEY": "sk-never-printed"})  # fmt: skip
    assert "sk-never-printed" not in text
    deployment, service = k8s.check(text)
    container = deployment.spec.template.spec.containers[0]
    (key,) = container.env
    assert key.name == "LLMBOX_API_KEY" and key.value is None
    assert (key.value_from.secret_key_ref.name, key.value_from.secret_key_ref.key) == (
        "smollm2-serve-api-key",
        "api-key",
    )
    assert container.readiness_probe.http_get.path == "/health"
    assert (
        container.volume_mounts[0].read_only
        and deployment.spec.template.spec.volumes[0].persistent_volume_claim.read_only
    )
    assert "--host" in container.command and container.resources.limits == {"nvidia.com/gpu": "1"}
    assert service.spec.selector == deployment.spec.selector.match_labels and service.spec.ports[0].port == 8000
    assert "kubectl create secret generic smollm2-serve-api-key" in text


def test_serving_on_vllm_splits_the_model_over_the_pods_gpus() -> None:
    text = run("serve", "smollm2", "--image", "img-vllm:1", "--pvc", "shared", "--gpus", "4")
    deployment, _ = k8s.check(text)
    pod = deployment.spec.template.spec
    command = pod.containers[0].command
    assert command[command.index("--engine") + 1] == "vllm"  # auto: GPUs
    assert command[command.index("--tensor-parallel-size") + 1] == "4"
    shm = next(v for v in pod.volumes if v.name == "shm")
    assert shm.empty_dir.medium == "Memory" and "/dev/shm" in [m.mount_path for m in pod.containers[0].volume_mounts]
    cpu = k8s.check(run("serve", "smollm2", "--image", "img:1", "--pvc", "shared", "--gpus", "0"))[0]
    command = cpu.spec.template.spec.containers[0].command
    assert command[command.index("--engine") + 1] == "llmbox" and "--tensor-parallel-size" not in command
    assert [v.name for v in cpu.spec.template.spec.volumes] == ["llmbox"]


def broken(text: str, change: Any) -> str:
    docs = documents(text)
    change(docs[0])
    return yaml.safe_dump_all(docs)


@pytest.mark.parametrize(
    ("command", "change", "message"),
    [
        ("train", lambda d: d["spec"]["trainer"].update(numNodes="two"), "numNodes"),
        ("train", lambda d: d["spec"]["runtimeRef"].pop("name"), "name"),
        ("train", lambda d: d["spec"]["trainer"].update(numNode=2), "spec.trainer.numNode"),
        ("serve", lambda d: d["spec"].update(replicas="two"), "V1DeploymentSpec"),
        ("serve", lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"), "V1Container"),
        ("serve", lambda d: d.update(apiVersion="v1"), "expected 'apps/v1'"),
    ],
    ids=[
        "wrong-type",
        "missing-required",
        "misspelt",
        "deployment-wrong-type",
        "container-without-name",
        "wrong-api-version",
    ],
)
def test_a_broken_manifest_fails_the_same_check(command: str, change: Any, message: str) -> None:
    args = ["--image", "img:1", "--pvc", "shared"] + (["--data", "d.json"] if command == "train" else [])
    good = run(command, "smollm2", *args)
    k8s.check(good)
    with pytest.raises(UserError, match=message):
        k8s.check(broken(good, change))

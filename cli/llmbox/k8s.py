"""Kubernetes manifests for training (a Kubeflow Trainer `TrainJob`) and serving (a Deployment and a Service).

Built from the upstream API models, never hand-written dictionaries: `kubeflow-trainer-api` (Trainer 2.3's
`trainer.kubeflow.org/v1alpha1`) for the TrainJob, the official `kubernetes` client for the rest. `check` parses
a printed manifest back through the same models and refuses anything they reject or would drop.

Every pod mounts one ReadWriteMany claim at /llmbox, laid out like $LLMBOX_HOME: models/<name>/{model,lora,...}
and the data wherever the user keeps it on the volume.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from llmbox.errors import UserError

TRAINER_RELEASE = "Kubeflow Trainer v2.3 (trainer.kubeflow.org/v1alpha1)"
TRAINER_API_VERSION = "trainer.kubeflow.org/v1alpha1"
TORCH_RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Trainer installs for PyTorch
VOLUME, MOUNT = "llmbox", "/llmbox"
IMAGE_UID = 1000  # the engine image's user
API_KEY_ITEM = "api-key"
SERVE_PORT = 8000


@dataclass(frozen=True)
class Placement:
    name: str  # the object's name
    namespace: str | None
    image: str
    pvc: str


def require_packages() -> None:
    try:
        import kubeflow_trainer_api  # noqa: F401
        import kubernetes  # noqa: F401
    except ImportError:
        raise UserError("llmbox k8s builds manifests with the kubernetes and kubeflow-trainer-api packages: "
                        "pip install 'llmbox[k8s]'") from None  # fmt: skip


def object_name(text: str) -> str:
    """A name Kubernetes accepts (RFC 1123: lowercase letters, digits and '-', at most 63)."""
    import re

    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    if not name:
        raise UserError(f"{text!r} gives no usable Kubernetes name: pass --name")
    return name


def model_paths(model: str) -> tuple[str, str]:
    """(weights folder, model directory) of MODEL on the volume."""
    home = f"{MOUNT}/models/{model}"
    return f"{home}/model", home


def data_on_volume(spec: str) -> str:
    """--data as the pods see it: relative paths are on the volume; hub datasets (name:split) stay as given."""
    parts = []
    for part in spec.split(","):
        part = part.strip()
        is_hub = ":" in part and not part.startswith((".", "/"))
        parts.append(part if part.startswith("/") or is_hub else f"{MOUNT}/{part.removeprefix('./')}")
    return ",".join(parts)


def train_job(where: Placement, model: str, nodes: int, gpus_per_node: int, engine_args: Sequence[str]) -> Any:
    """A TrainJob on the torch-distributed runtime: the engine's own train command on every node, which reads
    the topology Trainer gives each pod (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, ...) and runs torchrun."""
    from kubeflow_trainer_api import models as t

    weights, home = model_paths(model)
    command = ["python", "-m", "llmbox_engine", "train", "--model-path", weights, "--output", home,
               "--no-tensorboard", *engine_args]  # fmt: skip
    gpu = {"nvidia.com/gpu": t.IoK8sApimachineryPkgApiResourceQuantity(str(gpus_per_node))} if gpus_per_node else None
    node_pod = t.TrainerV1alpha1PodSpecPatch(
        security_context=t.IoK8sApiCoreV1PodSecurityContext(run_as_non_root=True, run_as_user=IMAGE_UID),
        volumes=[t.IoK8sApiCoreV1Volume(
            name=VOLUME, persistent_volume_claim=t.IoK8sApiCoreV1PersistentVolumeClaimVolumeSource(claim_name=where.pvc)
        )],
        containers=[t.TrainerV1alpha1ContainerPatch(
            name="node", volume_mounts=[t.IoK8sApiCoreV1VolumeMount(name=VOLUME, mount_path=MOUNT)]
        )],
    )  # fmt: skip
    patch = t.TrainerV1alpha1RuntimePatch(
        manager="llmbox",
        training_runtime_spec=t.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=t.TrainerV1alpha1JobSetTemplatePatch(
                spec=t.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[t.TrainerV1alpha1ReplicatedJobPatch(
                    name="node", template=t.TrainerV1alpha1JobTemplatePatch(spec=t.TrainerV1alpha1JobSpecPatch(
                        template=t.TrainerV1alpha1PodTemplatePatch(spec=node_pod)
                    ))
                )])
            )
        ),
    )  # fmt: skip
    return t.TrainerV1alpha1TrainJob(
        api_version=TRAINER_API_VERSION,
        kind="TrainJob",
        metadata=t.IoK8sApimachineryPkgApisMetaV1ObjectMeta(name=where.name, namespace=where.namespace),
        spec=t.TrainerV1alpha1TrainJobSpec(
            runtime_ref=t.TrainerV1alpha1RuntimeRef(name=TORCH_RUNTIME),
            trainer=t.TrainerV1alpha1Trainer(
                image=where.image,
                command=command,
                num_nodes=nodes,
                num_proc_per_node=max(1, gpus_per_node),
                env=[t.IoK8sApiCoreV1EnvVar(name="HF_HOME", value=f"{MOUNT}/.cache/huggingface")],
                resources_per_node=t.IoK8sApiCoreV1ResourceRequirements(limits=gpu) if gpu else None,
            ),
            runtime_patches=[patch],
        ),
    )


def serving(where: Placement, model: str, gpus: int, api_key_secret: str, engine: str = "llmbox") -> list[Any]:
    """A Deployment running `serve` on the volume's model (read-only) behind a ClusterIP Service; the API key
    comes from a Secret the user creates (its name and key here, never its value). On vLLM (`engine`) the model
    is split over the pod's GPUs (tensor parallel), whose workers talk through a memory-backed /dev/shm."""
    from kubernetes import client as k

    weights, home = model_paths(model)
    engine_args = ["--engine", engine]
    if engine == "vllm" and gpus > 1:
        engine_args += ["--tensor-parallel-size", str(gpus)]
    shm = engine == "vllm"  # the container runtime's default /dev/shm (64 MiB) is too small for vLLM's workers
    labels = {"app.kubernetes.io/name": "llmbox-serve", "app.kubernetes.io/instance": where.name}
    container = k.V1Container(
        name="serve",
        image=where.image,
        command=[
            "python",
            "-m",
            "llmbox_engine",
            "serve",
            "--model-path",
            weights,
            "--adapter-dir",
            f"{home}/lora",
            "--host",
            "0.0.0.0",
            "--port",
            str(SERVE_PORT),
            *engine_args,
        ],
        ports=[k.V1ContainerPort(container_port=SERVE_PORT, name="http")],
        env=[
            k.V1EnvVar(
                name="LLMBOX_API_KEY",
                value_from=k.V1EnvVarSource(
                    secret_key_ref=k.V1SecretKeySelector(name=api_key_secret, key=API_KEY_ITEM)
                ),
            )
        ],
        volume_mounts=[k.V1VolumeMount(name=VOLUME, mount_path=MOUNT, read_only=True)]
        + ([k.V1VolumeMount(name="shm", mount_path="/dev/shm")] if shm else []),
        # /health answers 503 (vLLM: does not answer) until the model has loaded: no traffic before that
        readiness_probe=k.V1Probe(http_get=k.V1HTTPGetAction(path="/health", port=SERVE_PORT), period_seconds=5),
        resources=k.V1ResourceRequirements(limits={"nvidia.com/gpu": str(gpus)}) if gpus else None,
        security_context=k.V1SecurityContext(allow_privilege_escalation=False),
    )
    pod = k.V1PodSpec(
        containers=[container],
        volumes=[
            k.V1Volume(
                name=VOLUME,
                persistent_volume_claim=k.V1PersistentVolumeClaimVolumeSource(claim_name=where.pvc, read_only=True),
            )
        ]
        + ([k.V1Volume(name="shm", empty_dir=k.V1EmptyDirVolumeSource(medium="Memory"))] if shm else []),
        security_context=k.V1PodSecurityContext(run_as_non_root=True, run_as_user=IMAGE_UID),
    )
    meta = k.V1ObjectMeta(name=where.name, namespace=where.namespace, labels=labels)
    deployment = k.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=meta,
        spec=k.V1DeploymentSpec(
            replicas=1,
            selector=k.V1LabelSelector(match_labels=labels),
            template=k.V1PodTemplateSpec(metadata=k.V1ObjectMeta(labels=labels), spec=pod),
        ),
    )
    service = k.V1Service(
        api_version="v1",
        kind="Service",
        metadata=meta,
        spec=k.V1ServiceSpec(
            selector=labels, ports=[k.V1ServicePort(port=SERVE_PORT, target_port="http", name="http")]
        ),
    )
    return [deployment, service]


def to_yaml(objects: Sequence[Any]) -> str:
    return "---\n".join(yaml.safe_dump(as_dict(o), sort_keys=False) for o in objects)


def as_dict(obj: Any) -> dict[str, Any]:
    if type(obj).__module__.startswith("kubeflow_trainer_api"):
        return dict(obj.to_dict())
    from kubernetes import client as k

    return dict(k.ApiClient().sanitize_for_serialization(obj))


KINDS = {  # kind -> (apiVersion, model)
    "TrainJob": (TRAINER_API_VERSION, "kubeflow_trainer_api.models.TrainerV1alpha1TrainJob"),
    "Deployment": ("apps/v1", "V1Deployment"),
    "Service": ("v1", "V1Service"),
    "Secret": ("v1", "V1Secret"),
}


def check(text: str) -> list[Any]:
    """Parse manifests (YAML documents) through the upstream models; UserError names the document and what
    the models refused, or the fields they do not know (a misspelt field would be dropped silently)."""
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    parsed = []
    for number, document in enumerate(documents, start=1):
        kind = document.get("kind") if isinstance(document, dict) else None
        if kind not in KINDS:
            raise UserError(f"manifest {number}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
        api_version, model = KINDS[kind]
        if document.get("apiVersion") != api_version:
            raise UserError(f"manifest {number} ({kind}): apiVersion {document.get('apiVersion')!r}, "
                            f"expected {api_version!r}")  # fmt: skip
        try:
            obj = _parse(model, document)
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            detail = " ".join(line.strip() for line in str(exc).splitlines()[:3])
            raise UserError(f"manifest {number} ({kind}): {detail}") from None
        lost = _dropped(document, as_dict(obj))
        if lost:
            raise UserError(f"manifest {number} ({kind}): fields the {kind} API does not have: {', '.join(lost)}")
        parsed.append(obj)
    return parsed


def _parse(model: str, document: dict[str, Any]) -> Any:
    if model.startswith("kubeflow_trainer_api"):
        from kubeflow_trainer_api import models as t

        obj = t.TrainerV1alpha1TrainJob.from_dict(document)
        if obj is None or obj.spec is None:
            raise ValueError("spec is required")
        return obj
    from kubernetes import client as k

    return k.ApiClient().deserialize(json.dumps(document), model, "application/json")


def _dropped(given: Any, kept: Any, path: str = "") -> list[str]:
    """Paths present in `given` but absent from the re-serialised `kept`."""
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return [path or "."]
        lost: list[str] = []
        for key, value in given.items():
            where = f"{path}.{key}" if path else str(key)
            lost += [where] if key not in kept else _dropped(value, kept[key], where)
        return lost
    if isinstance(given, list) and isinstance(kept, list):
        return [p for i, (a, b) in enumerate(zip(given, kept, strict=False)) for p in _dropped(a, b, f"{path}[{i}]")]
    return []

"""What the endpoints do, apart from HTTP: model ids, the model list, and requests turned into generation jobs.

Model ids: the base model is served as `<name>` (the model directory's name, as `llmbox list` shows it) and
the trained adapter as `<name>:lora`; a request's `model` field picks one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from llmbox_engine.serve.errors import ApiError, bad_request, model_not_found
from llmbox_engine.serve.generation import Event, GenerationWorker, Job
from llmbox_engine.serve.images import ImagePolicy
from llmbox_engine.serve.loading import LoadedModel
from llmbox_engine.serve.prompts import PromptBuilder
from llmbox_engine.serve.sampling import SamplingParams
from llmbox_engine.serve.schemas import ChatRequest, CompletionRequest
from llmbox_engine.serve.vision import VisionPromptBuilder

ADAPTER_SUFFIX = ":lora"


@dataclass
class Attached:
    loaded: LoadedModel
    worker: GenerationWorker
    prompts: PromptBuilder
    vision: VisionPromptBuilder | None = None  # multimodal models: chat requests with images


class Service:
    def __init__(self, name: str, images: ImagePolicy | None = None) -> None:
        self.images = images or ImagePolicy()
        self.base_id = name
        self.adapter_id = f"{name}{ADAPTER_SUFFIX}"
        self.started = int(time.time())
        self.attached: Attached | None = None  # set once the weights are loaded

    def attach(self, loaded: LoadedModel, worker: GenerationWorker) -> None:
        prompts = PromptBuilder(
            loaded.prompt_tokenizer, loaded.fallback_template, loaded.context_length, loaded.vocab_size
        )
        vision = VisionPromptBuilder(loaded.processor, self.images, prompts) if loaded.processor is not None else None
        self.attached = Attached(loaded, worker, prompts, vision)

    @property
    def ready(self) -> bool:
        return self.attached is not None

    def _parts(self) -> Attached:
        if self.attached is None:
            raise ApiError(503, "the model is still loading; retry shortly", type="server_error", code="model_loading")
        return self.attached

    def model_ids(self) -> list[str]:
        parts = self._parts()
        return [self.base_id] + ([self.adapter_id] if parts.worker.current_adapter() else [])

    def resolve(self, model: str) -> bool:
        """Whether `model` names the adapter (True) or the base model (False); 404 for anything else."""
        ids = self.model_ids()
        if model not in ids:
            raise model_not_found(model, ids)
        return model == self.adapter_id

    def models(self) -> dict[str, Any]:
        parts = self._parts()
        loaded = parts.loaded
        data: list[dict[str, Any]] = [
            {
                "id": self.base_id,
                "object": "model",
                "created": self.started,
                "owned_by": "llmbox",
                "llmbox": {
                    "kind": "base",
                    "path": str(loaded.path),
                    "model_type": loaded.model_type,
                    "fingerprint": loaded.fingerprint,
                    "context_length": loaded.context_length,
                },
            }
        ]
        adapter = parts.worker.current_adapter()
        if adapter is not None:
            files = adapter.files
            loss = files.final_loss
            data.append(
                {
                    "id": self.adapter_id,
                    "object": "model",
                    "created": _epoch(files.created_at) or int(adapter.loaded_at),
                    "owned_by": "llmbox",
                    "parent": self.base_id,
                    "llmbox": {
                        "kind": "adapter",
                        "path": str(files.path),
                        "created_at": files.created_at,
                        "final_loss": loss[1] if loss else None,
                        "final_loss_on": loss[0] if loss else None,
                        "fingerprint": files.fingerprint,
                        "loaded_at": datetime.fromtimestamp(adapter.loaded_at).astimezone().isoformat(),
                        "base_matches": files.base_matches,
                    },
                }
            )
        return {"object": "list", "data": data}

    def model(self, model_id: str) -> dict[str, Any]:
        for entry in self.models()["data"]:
            if entry["id"] == model_id:
                return entry
        raise model_not_found(model_id, self.model_ids())

    def chat_job(self, request: ChatRequest, sink: Callable[[Event], None]) -> Job:
        parts = self._parts()
        use_adapter = self.resolve(request.model)
        if request.has_images:
            if parts.vision is None:
                raise bad_request(f"{self.base_id} is a text-only model: it does not take images", "messages")
            prompt, vision_inputs = parts.vision.chat(request)
            budget = parts.prompts.completion_budget(len(prompt), request.token_limit)
            job = self._job(request, [prompt], [budget], use_adapter, sink)
            job.vision_inputs = [vision_inputs]
            return job
        prompt = parts.prompts.chat(request.conversation())
        budget = parts.prompts.completion_budget(len(prompt), request.token_limit)
        return self._job(request, [prompt], [budget], use_adapter, sink)

    def completion_job(self, request: CompletionRequest, sink: Callable[[Event], None]) -> Job:
        parts = self._parts()
        use_adapter = self.resolve(request.model)
        if request.echo:
            raise bad_request("echo is not supported", "echo")
        prompts = [parts.prompts.completion(p) for p in request.prompts()]
        budgets = [parts.prompts.completion_budget(len(p), request.token_limit) for p in prompts]
        return self._job(request, prompts, budgets, use_adapter, sink)

    @staticmethod
    def _job(
        request: ChatRequest | CompletionRequest,
        prompts: list[list[int]],
        budgets: list[int],
        use_adapter: bool,
        sink: Callable[[Event], None],
    ) -> Job:
        sampling = SamplingParams(
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
        )
        return Job(
            prompts=prompts,
            max_tokens=budgets,
            sink=sink,
            sampling=sampling,
            n=request.choices,
            stop=request.stop_strings(),
            use_adapter=use_adapter,
        )


def _epoch(iso: str | None) -> int | None:
    if not iso:
        return None
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return None

"""The generation worker: one thread owns the model and runs every request through it, batched.

Continuous batching. Requests wait in a bounded queue; between decoding steps the worker admits waiting
sequences (up to `max_batch_size` rows and a prefill token budget), prefills them together with left padding,
and joins them to the running batch, whose KV cache grows one column per step. Each row has its own position
ids, sampling parameters, random generator, stop tokens, stop strings and token limit; a finished or cancelled
row leaves the batch at once, so short answers never wait for long ones.

Adapters. The base model and LoRA adapters share one batch: peft's mixed-batch forward (`adapter_names`) applies
each row's adapter. A request is pinned, when admitted, to the adapter current at that moment. A hot-reloaded
adapter is loaded under a new peft name between two steps and becomes current for requests admitted from then
on; requests already running finish on the adapter they started with, which is deleted once none uses it.

Images. A prompt with images (multimodal models) is prefilled on its own, with its pixel values (and Gemma 3's
token types), never mixed into another prefill: the vision tower runs once, for that prompt alone. After the
prefill its image is in the KV cache, and its rows decode in the shared batch like any text row.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmbox_engine.serve import kv
from llmbox_engine.serve.adapters import AdapterFiles
from llmbox_engine.serve.loading import LoadedModel
from llmbox_engine.serve.sampling import SamplingParams, make_generator, next_tokens
from llmbox_engine.serve.text import TextTracker
from llmbox_engine.serve.watch import AdapterError

log = logging.getLogger("llmbox.serve")

BASE = "__base__"  # peft's row name for "no adapter" in a mixed batch
PREFILL_TOKEN_BUDGET = 8192  # padded prompt tokens prefilled in one forward pass (one longer prompt still goes)


@dataclass(frozen=True)
class Admitted:
    fingerprint: str  # of the weights serving the request: the adapter's, or the base model's


@dataclass(frozen=True)
class TextDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ChoiceDone:
    index: int
    finish_reason: str  # "stop": an end-of-turn token or a stop string; "length": max_tokens or the context
    completion_tokens: int


@dataclass(frozen=True)
class JobDone:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class JobFailed:
    message: str


Event = Admitted | TextDelta | ChoiceDone | JobDone | JobFailed


@dataclass
class Job:
    """One request: prompts (token ids), each answered `n` times; events go to `sink` from the worker thread."""

    prompts: list[list[int]]
    max_tokens: list[int]  # per prompt
    sink: Callable[[Event], None]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    stop: tuple[str, ...] = ()
    use_adapter: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    vision_inputs: list[dict[str, Any]] = field(default_factory=list)  # per prompt, for prompts with images

    def cancel(self) -> None:
        """Stop generating for this job (a client that went away); safe from any thread, at any time."""
        self.cancelled.set()


class OverloadedError(Exception):
    """The worker holds --max-concurrency requests already."""


@dataclass(frozen=True)
class AdapterMeta:
    name: str  # the peft adapter name (lora1, lora2, ... as reloads come)
    files: AdapterFiles
    loaded_at: float


@dataclass(eq=False)
class _Request:
    job: Job
    remaining: int
    prompt_tokens: int
    completion_tokens: int = 0
    adapter: str | None = None  # pinned at admission
    admitted: bool = False
    closed: bool = False

    @property
    def gone(self) -> bool:
        return self.closed or self.job.cancelled.is_set()


@dataclass(eq=False)
class _Sequence:
    request: _Request
    index: int  # the choice index
    prompt_index: int
    prompt: list[int]
    max_tokens: int
    generator: torch.Generator | None
    text: TextTracker
    generated: int = 0
    last_token: int = -1
    position: int = 0  # position id of `last_token`, fed at the next step
    finished: bool = False
    vision: dict[str, Any] | None = None  # the prompt's pixel values (and token types), prefilled alone


@dataclass
class _Batch:
    seqs: list[_Sequence]
    cache: Any
    mask: torch.Tensor  # [rows, cache length]: 1 where the cache holds a real token
    joinable: bool


class GenerationWorker:
    def __init__(self, loaded: LoadedModel, max_batch_size: int = 16, max_concurrency: int = 64) -> None:
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.max_concurrency = max_concurrency
        self.model: Any = loaded.model
        self.peft: Any = None  # the PeftModel around `model`, once an adapter is loaded
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._in_flight = 0
        self._running: _Batch | None = None
        self._pending_adapter: AdapterFiles | None = None
        self._adapters: dict[str, AdapterMeta] = {}
        self._current: str | None = None
        self._retired: set[str] = set()
        self._refs: Counter[str] = Counter()
        self._versions = 0
        self._layers_state: str | None = None  # what the LoRA layers do now: BASE (disabled), an adapter, or mixed
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self.on_adapter_loaded: Callable[[AdapterMeta], None] = lambda meta: None
        self.on_adapter_refused: Callable[[AdapterFiles, str], None] = lambda files, reason: None

    # ---- the public side, called from any thread ---------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def current_adapter(self) -> AdapterMeta | None:
        with self._lock:
            return self._adapters.get(self._current) if self._current else None

    def submit(self, job: Job) -> None:
        """Queue `job`; raises OverloadedError when --max-concurrency requests are queued or running."""
        request = _Request(job, remaining=len(job.prompts) * job.n, prompt_tokens=sum(len(p) for p in job.prompts))
        seqs = [
            _Sequence(
                request=request,
                index=p * job.n + k,
                prompt_index=p,
                prompt=prompt,
                max_tokens=job.max_tokens[p],
                generator=make_generator(job.sampling, p * job.n + k, self.loaded.device),
                text=TextTracker(self.loaded.tokenizer, job.stop),
                vision=job.vision_inputs[p] if job.vision_inputs else None,
            )
            for p, prompt in enumerate(job.prompts)
            for k in range(job.n)
        ]
        with self._lock:
            if self._stopping:
                raise OverloadedError("the server is shutting down")
            if self._in_flight >= self.max_concurrency:
                raise OverloadedError(
                    f"{self._in_flight} requests are already queued or running (--max-concurrency "
                    f"{self.max_concurrency}); retry later"
                )
            self._in_flight += 1
            self._waiting.extend(seqs)
            self._lock.notify_all()

    def offer_adapter(self, files: AdapterFiles) -> None:
        """A checked adapter to swap in between two steps (the newest offer wins)."""
        with self._lock:
            self._pending_adapter = files
            self._lock.notify_all()

    # ---- adapters: called before start() or on the worker thread only ------------------------------------

    def load_adapter(self, files: AdapterFiles) -> AdapterMeta:
        """Load `files` under a new peft name and make it current; AdapterError leaves the model as it was."""
        from peft import get_peft_model, set_peft_model_state_dict

        self._versions += 1
        name = f"lora{self._versions}"
        created = self.peft is None
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on missing keys: checked below, with a clearer message
            try:
                if created:
                    self.peft = get_peft_model(self.model, files.config, adapter_name=name)
                else:
                    self.peft.add_adapter(name, files.config)
                result: Any = set_peft_model_state_dict(self.peft, files.state_dict, adapter_name=name)
                missing = [k for k in result.missing_keys if f".{name}." in k and ".lora_" in k]
                unexpected = [k for k in result.unexpected_keys if ".lora_" in k]
                if missing or unexpected:
                    detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
                    raise AdapterError(f"{files.path}: the weights do not match adapter_config.json ({detail})")
                self.peft.eval()
            except Exception as exc:
                self._undo_adapter(name, created)
                if isinstance(exc, AdapterError):
                    raise
                raise AdapterError(f"{files.path}: {type(exc).__name__}: {exc}") from None
        meta = AdapterMeta(name, files, time.time())
        with self._lock:
            self._adapters[name] = meta
            if self._current is not None:
                self._retired.add(self._current)
            self._current = name
        self._layers_state = None
        return meta

    def _undo_adapter(self, name: str, created: bool) -> None:
        if self.peft is None:
            return
        if created:
            self.model = self.peft.base_model.unload()
            self.peft = None
        elif name in self.peft.peft_config:
            self.peft.delete_adapter(name)
        self._layers_state = None

    def _install_pending(self) -> None:
        with self._lock:
            files, self._pending_adapter = self._pending_adapter, None
        if files is None:
            return
        try:
            meta = self.load_adapter(files)
        except AdapterError as exc:
            self.on_adapter_refused(files, str(exc))
            return
        self.on_adapter_loaded(meta)

    def _retire_unused(self) -> None:
        with self._lock:
            unused = [name for name in self._retired if self._refs[name] == 0]
            for name in unused:
                self._retired.discard(name)
                del self._adapters[name]
                self._refs.pop(name, None)
        for name in unused:
            with torch.inference_mode(False), torch.no_grad():
                self.peft.delete_adapter(name)
            self._layers_state = None

    # ---- the loop ----------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._stopping or self._waiting or self._running or self._pending_adapter):
                        self._lock.wait()
                    if self._stopping:
                        break
                try:
                    self._install_pending()
                    self._step()
                    self._retire_unused()
                except Exception:  # a last resort: the worker thread must outlive any one failure
                    log.exception("generation worker: unexpected error")
                    self._fail_everything("internal error in the generation worker")
        self._fail_everything("the server is shutting down")

    def _step(self) -> None:
        self._drop_gone()
        new = self._admit()
        try:
            if new:
                self._prefill(new)
            if self._running is not None:
                self._decode()
        except Exception as exc:  # one bad batch must not take the server down: its requests fail, others go on
            log.exception("generation failed")
            message = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"
            victims = {s.request for s in new} | {s.request for s in (self._running.seqs if self._running else [])}
            self._running = None
            for request in victims:
                self._fail(request, f"generation failed: {message}")

    def _drop_gone(self) -> None:
        """Forget cancelled requests: their rows leave the batch, their queue entries go."""
        with self._lock:
            gone = [s for s in self._waiting if s.request.gone]
            if gone:
                self._waiting = deque(s for s in self._waiting if not s.request.gone)
        for seq in gone:
            self._close(seq.request)
        if self._running is not None:
            for seq in self._running.seqs:
                if seq.request.gone:
                    seq.finished = True
                    self._close(seq.request)
            self._remove_finished()

    def _admit(self) -> list[_Sequence]:
        running = self._running
        room = self.max_batch_size - (len(running.seqs) if running else 0)
        if running is not None and not running.joinable:
            room = 0
        admitted: list[_Sequence] = []
        longest = 0
        with self._lock:
            while room > 0 and self._waiting:
                seq = self._waiting[0]
                if admitted and not _prefill_together(admitted[0], seq):
                    break
                longest_after = max(longest, len(seq.prompt))
                if admitted and longest_after * (len(admitted) + 1) > PREFILL_TOKEN_BUDGET:
                    break
                self._waiting.popleft()
                if seq.request.gone:
                    continue
                admitted.append(seq)
                longest = longest_after
                room -= 1
        for seq in admitted:
            self._pin(seq.request)
        return admitted

    def _pin(self, request: _Request) -> None:
        if request.admitted:
            return
        request.admitted = True
        with self._lock:
            if request.job.use_adapter and self._current is not None:
                request.adapter = self._current
                self._refs[self._current] += 1
                fingerprint = self._adapters[self._current].files.fingerprint
            else:
                fingerprint = self.loaded.fingerprint
        self._emit(request, Admitted(fingerprint))

    def _prefill(self, seqs: list[_Sequence]) -> None:
        # n > 1: each distinct prompt is prefilled once, and its cache row copied to its n sequences
        rows: dict[tuple[int, int], int] = {}
        prompts: list[list[int]] = []
        adapters: list[str | None] = []
        for seq in seqs:
            key = (id(seq.request), seq.prompt_index)
            if key not in rows:
                rows[key] = len(prompts)
                prompts.append(seq.prompt)
                adapters.append(seq.request.adapter)
        device = self.loaded.device
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, None, adapters, seqs[0].vision)
        expand = [rows[(id(s.request), s.prompt_index)] for s in seqs]
        if expand != list(range(len(prompts))):
            index = torch.tensor(expand, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            mask, logits = mask.index_select(0, index), logits.index_select(0, index)
        for seq in seqs:
            seq.position = len(seq.prompt)
        tokens = next_tokens(logits, [s.request.job.sampling for s in seqs], [s.generator for s in seqs])
        batch = _Batch(list(seqs), cache, mask, kv.can_join(cache))
        if self._running is None:
            self._running = batch
        else:
            cache, mask = kv.join(self._running.cache, self._running.mask, batch.cache, batch.mask)
            self._running = _Batch(self._running.seqs + batch.seqs, cache, mask, joinable=True)
        for seq, token in zip(seqs, tokens, strict=True):
            self._advance(seq, token)
        self._remove_finished()

    def _decode(self) -> None:
        batch = self._running
        assert batch is not None
        device = self.loaded.device
        ids = torch.tensor([[s.last_token] for s in batch.seqs], dtype=torch.long, device=device)
        positions = torch.tensor([[s.position] for s in batch.seqs], dtype=torch.long, device=device)
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.seqs), 1))], dim=1)
        logits, _ = self._forward(ids, mask, positions, batch.cache, [s.request.adapter for s in batch.seqs])
        batch.mask = mask
        for seq in batch.seqs:
            seq.position += 1
        tokens = next_tokens(logits, [s.request.job.sampling for s in batch.seqs], [s.generator for s in batch.seqs])
        for seq, token in zip(batch.seqs, tokens, strict=True):
            self._advance(seq, token)
        self._remove_finished()

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: Any,
        adapters: list[str | None],
        vision: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, Any]:
        inputs: dict[str, Any] = {
            "input_ids": ids, "attention_mask": mask, "position_ids": positions, self.loaded.cache_argument: cache,
            "use_cache": True,
        }  # fmt: skip
        if vision is not None:  # one image prompt, prefilled alone: no padding to line its token types up with
            inputs.update({name: value.to(self.loaded.device) for name, value in vision.items()})
        if self.loaded.keeps_logits:
            inputs["logits_to_keep"] = 1
        if self.peft is None:
            out = self.model(**inputs)
        else:
            names = set(adapters)
            if len(names) > 1:
                self._set_layers("mixed")
                inputs["adapter_names"] = [name or BASE for name in adapters]
            else:
                self._set_layers(next(iter(names)) or BASE)
            out = self.peft(**inputs)
        return out.logits[:, -1, :], out[self.loaded.cache_argument]

    def _set_layers(self, state: str) -> None:
        """Switch the LoRA layers only when the batch's needs change: toggling them walks every module."""
        if state == self._layers_state:
            return
        with torch.inference_mode(False):
            if state == BASE:
                self.peft.base_model.disable_adapter_layers()
            else:
                if self._layers_state in (BASE, None):
                    self.peft.base_model.enable_adapter_layers()
                if state != "mixed":
                    self.peft.set_adapter(state, inference_mode=True)
        self._layers_state = state

    # ---- per-token bookkeeping ---------------------------------------------------------------------------

    def _advance(self, seq: _Sequence, token: int) -> None:
        seq.generated += 1
        if token in self.loaded.stop_ids:
            self._finish(seq, "stop")
            return
        seq.last_token = token
        piece = seq.text.add(token)
        if piece:
            self._emit(seq.request, TextDelta(seq.index, piece))
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif seq.generated >= seq.max_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.finished = True
        request = seq.request
        if request.closed:
            return
        rest = seq.text.finish()
        if rest:
            self._emit(request, TextDelta(seq.index, rest))
        self._emit(request, ChoiceDone(seq.index, reason, seq.generated))
        request.remaining -= 1
        request.completion_tokens += seq.generated
        if request.remaining == 0:
            self._emit(request, JobDone(request.prompt_tokens, request.completion_tokens))
            self._close(request)

    def _remove_finished(self) -> None:
        batch = self._running
        if batch is None:
            return
        keep = [i for i, s in enumerate(batch.seqs) if not s.finished]
        if not keep:
            self._running = None
        elif len(keep) < len(batch.seqs):
            mask = kv.keep_rows(batch.cache, batch.mask, keep)
            batch.mask = kv.trim_left(batch.cache, mask)
            batch.seqs = [batch.seqs[i] for i in keep]

    def _emit(self, request: _Request, event: Event) -> None:
        try:
            request.job.sink(event)
        except Exception:  # a sink that cannot take events has lost its client
            log.exception("dropping a request whose sink failed")
            request.job.cancel()

    def _close(self, request: _Request) -> None:
        """The request is over (done, failed or cancelled): free its slot and its hold on an adapter."""
        if request.closed:
            return
        request.closed = True
        with self._lock:
            self._in_flight -= 1
            if request.adapter is not None:
                self._refs[request.adapter] -= 1

    def _fail(self, request: _Request, message: str) -> None:
        if not request.closed:
            self._emit(request, JobFailed(message))
            self._close(request)

    def _fail_everything(self, message: str) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        running = self._running.seqs if self._running else []
        self._running = None
        for seq in [*running, *waiting]:
            self._fail(seq.request, message)


def _prefill_together(first: _Sequence, other: _Sequence) -> bool:
    """Text prompts share a prefill; a prompt with images goes alone (with its own n copies)."""
    if first.vision is None and other.vision is None:
        return True
    return other.request is first.request and other.prompt_index == first.prompt_index

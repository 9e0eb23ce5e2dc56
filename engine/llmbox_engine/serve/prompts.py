"""From a request to prompt token ids, with the chat template training used, and the tokens that end a turn."""

from __future__ import annotations

import threading
from typing import Any

from llmbox_engine.data.render import chat_template_for
from llmbox_engine.serve.errors import ApiError, bad_request

# End-of-turn markers of the common chat templates; whichever the tokenizer has also stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<|eom_id|>")


def stop_token_ids(tokenizer: Any, generation_eos: int | list[int] | None = None) -> frozenset[int]:
    """EOS, the generation config's EOS ids, and every end-of-turn token the vocabulary holds."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if isinstance(generation_eos, int):
        ids.add(generation_eos)
    elif isinstance(generation_eos, list):
        ids.update(int(i) for i in generation_eos)
    vocab = tokenizer.get_vocab()
    ids.update(int(vocab[token]) for token in END_OF_TURN_TOKENS if token in vocab)
    return frozenset(ids)


class PromptBuilder:
    """Renders and tokenizes prompts for the HTTP side.

    It holds its own tokenizer, behind a lock: a fast tokenizer is not safe to call from two threads at once
    (it reconfigures padding and truncation per call), and the generation worker decodes with another one.
    """

    def __init__(self, tokenizer: Any, fallback_template: str, context_length: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.template = chat_template_for(tokenizer, fallback_template)
        self.context_length = context_length
        self.vocab_size = vocab_size
        self._lock = threading.Lock()

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja's raise_exception(): roles the template refuses, and the like
            raise bad_request(f"the model's chat template refused these messages: {exc}", "messages") from None
        # the template writes its own BOS, as in training
        return self._encode(text, add_special_tokens=False, param="messages")

    def completion(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self._encode(prompt, add_special_tokens=True, param="prompt")
        if any(not 0 <= token < self.vocab_size for token in prompt):
            raise bad_request(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        self.check_length(len(prompt), "prompt")
        return list(prompt)

    def _encode(self, text: str, *, add_special_tokens: bool, param: str) -> list[int]:
        with self._lock:
            ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        self.check_length(len(ids), param)
        return ids

    def check_length(self, prompt_tokens: int, param: str) -> None:
        if prompt_tokens >= self.context_length:
            raise ApiError(
                400,
                f"the prompt is {prompt_tokens} tokens; this model's context is {self.context_length} tokens, "
                "and the answer needs at least one",
                param=param,
                code="context_length_exceeded",
            )

    def completion_budget(self, prompt_tokens: int, asked: int | None) -> int:
        """max_tokens, capped so prompt + answer fits the context (absent: all the room there is)."""
        room = self.context_length - prompt_tokens
        return room if asked is None else min(asked, room)

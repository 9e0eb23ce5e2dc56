"""Rendering with the chat template: loss on assistant tokens only, text on everything, truncation counted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmbox.errors import DataError
from llmbox_engine.data import Example, Message, Origin
from llmbox_engine.data.render import Renderer, TokenizedExample, chat_template_for, render_stats
from llmbox_handlers import CHATML_TEMPLATE, FAMILY_HANDLERS, GENERIC

from tiny_models import build_tokenizer

ORIGIN = Origin("test.json", 1)


def chat(*turns: tuple[str, str]) -> Example:
    return Example("openai", ORIGIN, messages=tuple(Message(r, c) for r, c in turns))


def trained_text(tokenizer: Any, tokenized: TokenizedExample) -> str:
    return str(tokenizer.decode(tokenized.input_ids[tokenized.trainable].tolist()))


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


def test_single_turn_trains_on_the_answer_and_its_end_of_turn(tokenizer: Any) -> None:
    (tok,) = Renderer(tokenizer, CHATML_TEMPLATE, 512).tokenize([chat(("user", "What is 2+2?"), ("assistant", "4."))])
    assert trained_text(tokenizer, tok) == "4.<|im_end|>\n"
    full = tokenizer.decode(tok.input_ids.tolist())
    assert full == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n"
    assert tok.labels[0] == -100 and not tok.truncated


def test_multi_turn_with_system_trains_on_every_assistant_turn_only(tokenizer: Any) -> None:
    example = chat(
        ("system", "Be brief."),
        ("user", "Hello there"),
        ("assistant", "Hi."),
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
    )
    (tok,) = Renderer(tokenizer, CHATML_TEMPLATE, 512).tokenize([example])
    assert trained_text(tokenizer, tok) == "Hi.<|im_end|>\nParis.<|im_end|>\n"


def test_text_trains_on_everything_and_ends_with_eos(tokenizer: Any) -> None:
    example = Example("text", ORIGIN, text="Water boils at 100 degrees.")
    (tok,) = Renderer(tokenizer, CHATML_TEMPLATE, 512).tokenize([example])
    assert tok.trainable.all()
    assert tok.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(tok.input_ids[:-1].tolist()) == "Water boils at 100 degrees."


def test_completion_trains_on_the_completion_only(tokenizer: Any) -> None:
    example = Example("completion", ORIGIN, text=" Paris.", prompt="The capital of France is")
    (tok,) = Renderer(tokenizer, CHATML_TEMPLATE, 512).tokenize([example])
    assert trained_text(tokenizer, tok) == " Paris.<|im_end|>"
    assert not tok.trainable[0]


def test_long_examples_are_truncated_and_counted_never_dropped(tokenizer: Any) -> None:
    long = chat(("user", "word " * 200), ("assistant", "answer"))
    short = chat(("user", "hi"), ("assistant", "hello"))
    tokenized = Renderer(tokenizer, CHATML_TEMPLATE, 64).tokenize([long, short])
    assert [len(t) for t in tokenized] == [64, len(tokenized[1])] and len(tokenized[1]) < 64
    stats = render_stats(tokenized)
    assert (stats.truncated, stats.without_targets) == (1, 1)  # the answer was cut away: reported
    assert stats.summary()["max"] == 64


def test_batched_tokenization_matches_one_by_one(tokenizer: Any) -> None:
    examples = [chat(("user", f"question {i}"), ("assistant", f"answer {i}" * (i + 1))) for i in range(7)]
    examples.append(Example("text", ORIGIN, text="raw text"))
    renderer = Renderer(tokenizer, CHATML_TEMPLATE, 512)
    together = renderer.tokenize(examples, chunk_size=3)
    alone = [renderer.tokenize([e])[0] for e in examples]
    for a, b in zip(together, alone, strict=True):
        assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.trainable, b.trainable)


@pytest.mark.parametrize("handler", [*FAMILY_HANDLERS, GENERIC], ids=lambda h: h.name)
def test_every_handler_fallback_template_masks_correctly(handler: Any) -> None:
    tokenizer = build_tokenizer(chat_template=None)
    template = chat_template_for(tokenizer, handler.chat_template)
    assert template == handler.chat_template
    example = chat(("system", "Sys prompt."), ("user", "Question one"), ("assistant", "Answer one"),
                   ("user", "Question two"), ("assistant", "Answer two"))  # fmt: skip
    (tok,) = Renderer(tokenizer, template, 512).tokenize([example])
    trained = trained_text(tokenizer, tok)
    assert "Answer one" in trained and "Answer two" in trained
    assert "Question" not in trained and "Sys prompt" not in trained


def test_templates_that_rewrite_earlier_turns_fall_back_to_searching_the_answers(tokenizer: Any) -> None:
    # the last message is marked, so a prefix render is not a prefix of the whole conversation
    template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} END{% endif %}\n{% endfor %}"
    )
    example = chat(("user", "Question"), ("assistant", "Answer one"), ("user", "Again"), ("assistant", "Answer two"))
    (tok,) = Renderer(tokenizer, template, 512).tokenize([example])
    # byte-level BPE glues the space before each answer to its first word: that token overlaps the answer
    assert trained_text(tokenizer, tok) == " Answer one Answer two"


def test_a_template_that_refuses_a_conversation_names_the_record(tokenizer: Any) -> None:
    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    with pytest.raises(DataError, match=r"test\.json: record 1: the chat template refused .*System role not supported"):
        Renderer(tokenizer, template, 512).tokenize([chat(("system", "s"), ("user", "u"), ("assistant", "a"))])


def test_image_records_need_a_multimodal_model(tokenizer: Any, tmp_path: Path) -> None:
    example = Example("vision", ORIGIN, messages=(Message("user", "Describe"), Message("assistant", "red")),
                      images=(str(tmp_path / "a.png"),))  # fmt: skip
    with pytest.raises(DataError, match="image records need a multimodal model"):
        Renderer(tokenizer, CHATML_TEMPLATE, 512).tokenize([example])
